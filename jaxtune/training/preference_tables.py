"""Per-pair numbers of a whole source (a cached reference's log-probs, a reward model's scores):
each pair's segment found by its ``pair_ids``, every process's share of the rows gathered into one
table."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxtune import processes
from jaxtune.data.preference import PAIR_IDS
from jaxtune.training.evaluate import in_lockstep

Batch = dict[str, jax.Array]


def segment_pair_ids(pair_ids: np.ndarray, segment_ids: np.ndarray, num_segments: int) -> np.ndarray:
    """Host-side: int ``(..., S)`` from per-token ``pair_ids`` and ``segment_ids`` ``(..., T)``: the
    pair id (source index + 1) of segment ``s + 1`` of each row, 0 where the row has no such segment."""
    t = segment_ids.shape[-1]
    seg, ids = segment_ids.reshape(-1, t), pair_ids.reshape(-1, t)
    out = np.zeros((seg.shape[0], num_segments), np.int64)
    rows, cols = np.nonzero((seg >= 1) & (seg <= num_segments))
    out[rows, seg[rows, cols] - 1] = ids[rows, cols]  # every token of a segment carries its pair's id
    return out.reshape(*segment_ids.shape[:-1], num_segments)


def pair_table(compute: Callable[[Batch], jax.Array], batches: Iterable[Batch], size: int, doing: str) -> np.ndarray:
    """float32 ``(size, 2)``: row ``i`` the (chosen, rejected) numbers of source pair ``i``, NaN for a
    pair no batch held (dropped by truncation). ``compute`` maps a host paired batch (this process's
    rows, with ``pair_ids``) to float ``(B, 2, S)`` per segment, a global array laid out as the batch
    (each process reads back its own rows). Each process reads its own share of the rows (``doing``
    names the pass in the error another process reports); every process gets the whole table."""
    table = np.full((size, 2), np.nan, np.float32)
    with processes.stop_together(lambda: doing):
        for batch in in_lockstep(batches):  # each process as many steps (empty pairs fill: ids 0)
            out = local_rows(compute(batch))  # (B, 2, S)
            ids = segment_pair_ids(batch[PAIR_IDS], batch["segment_ids"], out.shape[-1])[:, 0]
            real = ids > 0
            table[ids[real] - 1] = out.transpose(0, 2, 1)[real]
        # Training shuffles every row to any process: each keeps every row's numbers (the shares are
        # disjoint: one process has each).
        tables = processes.stacked(table)
    return np.where((~np.isnan(tables)).any(axis=0), np.nansum(tables, axis=0), np.nan).astype(np.float32)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local batch order."""
    shards = {(s.index[0].start or 0): s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])

