"""The grain pipeline: source → shuffle → epochs → shard → tokenize → pack/pad → batch → prefetch.

::

    MapDataset.source(source).shuffle(seed).repeat(num_epochs)[shard_index::shard_count]
      .map(Tokenize)                      # threads (ReadOptions), or worker processes below
      .to_iter_dataset() → rows           # pack (first fit over a window of records) or pad
      [.mp_prefetch(workers)]             # tokenizing and packing run in the workers
      .batch(per_process_batch) → [fill the last partial batch] → [thread prefetch]

Shuffling is a seeded permutation that changes every epoch; each process reads a disjoint
stride of the shuffled stream (``ShardByJaxProcess`` by default). Packing is a pure function
of a fixed window of records, and its iterator state is "the parent's state at the start of
the window, and how many of the window's rows were emitted", so ``get_state``/``set_state``
resume exactly, with or without worker processes. The state is a small JSON-able dict (the
checkpoint stores it with ``grain.checkpoint.CheckpointSave``).

With ``worker_count > 0`` each training worker packs its own slice of the records, so the rows depend
on the number of workers (deterministically); keep it fixed across a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import grain
import numpy as np

from jaxtune.data import packing
from jaxtune.data.preference import MARGINS, PAIR_IDS, TokenizePairs, pair_rows
from jaxtune.data.source_types import LM_KINDS, PREFERENCE, DataError, Source
from jaxtune.data.tokenize import Tokenize, TokenStats, scan
from jaxtune.schema import check_fields

Batch = dict[str, np.ndarray]
log = logging.getLogger("jaxtune.data")


# Fields a loader's role decides (training: shuffle, repeat, drop the remainder; evaluation: one
# ordered pass, fill the last batch) and the process's shard. They are not part of a recipe's
# data section: jaxtune.config refuses them there with the reason.
ROLE = {"config": "set by the loader's role (training shuffles and repeats; evaluation reads once, in order)"}


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How a source becomes batches (the batching half of a recipe's ``data`` section).

    Attributes:
      batch_size: global batch size in rows, over all processes (each process yields
        ``batch_size // shard_count`` rows per batch).
      max_length: row length ``L`` in tokens.
      seed: shuffle seed (the permutation changes each epoch, reproducibly).
      packing: pack several examples per row (first fit, each a segment of its own: attention,
        positions and pooling stay within it) or, ``False``, pad one example per row. ``None``
        (default): LM kinds and preference pairs pack, classification and regression pad. A packed
        classification/regression batch carries ``labels`` and ``example_weights`` ``(B, S)``
        (:mod:`jaxtune.data.packing`), so a step sees more examples than ``batch_size`` rows.
      pack_window: records packed together (larger packs tighter, buffers more).
      truncation: what an example longer than ``max_length`` becomes: ``right`` (keep its start),
        ``left`` (chat and prompt/completion: keep the last answer whole, cut the oldest turns and
        the start of the prompt), ``drop``, ``error`` (refuse) or (raw text) ``split``; see
        ``tokenize.truncate``. Drops are reported per label, with a warning.
      add_eos: append EOS to prompt/completion and raw-text examples.
      pad_to_multiple_of: dynamic padding: cut each batch to its longest row rounded up to a
        multiple of this (at most ``max_length``). Short texts then cost what they are, not
        ``max_length`` tokens; each distinct width compiles the step once (at most
        ``max_length / pad_to_multiple_of`` widths). ``None``: every row is ``max_length``.
        One process only (processes would choose different widths).
      worker_count: grain worker processes that tokenize and pack the training data (0:
        in-process threads). Evaluation always reads on threads (:func:`evaluation_loader`).
      worker_buffer_size: rows buffered per worker.
      read_threads: threads tokenizing records in the process that packs.
      read_buffer_size: records tokenized ahead.
      prefetch_batches: finished batches a background thread keeps ready (without workers).
      shuffle: shuffle records (off for evaluation). Set by the role (:func:`training_loader`,
        :func:`evaluation_loader`).
      num_epochs: passes over the data; ``None`` repeats forever (training runs for a number of
        steps; with packing, processes may otherwise run out at different steps). Set by the role.
      drop_remainder: drop the last partial batch; ``False`` fills it with empty rows (all
        ``segment_ids`` 0, weights 0) so shapes stay static. Set by the role.
      pack_in_order: packed classification/regression rows keep the examples in order (next fit:
        less full rows) instead of filling rows first fit. Set by the role (evaluation).
      shard_index, shard_count: this process's shard; ``None`` means
        ``grain.sharding.ShardByJaxProcess`` (``jax.process_index()`` / ``process_count()``).
    """

    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    packing: bool | None = None
    pack_window: int = 128
    truncation: Literal["right", "left", "drop", "error", "split"] = "right"
    add_eos: bool = True
    pad_to_multiple_of: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 4
    read_threads: int = 1
    read_buffer_size: int = 64
    prefetch_batches: int = 2
    shuffle: bool = dataclasses.field(default=True, metadata=ROLE)
    num_epochs: int | None = dataclasses.field(default=1, metadata=ROLE)
    drop_remainder: bool = dataclasses.field(default=True, metadata=ROLE)
    pack_in_order: bool = dataclasses.field(default=False, metadata=ROLE)
    shard_index: int | None = dataclasses.field(default=None, metadata=ROLE)
    shard_count: int | None = dataclasses.field(default=None, metadata=ROLE)

    def __post_init__(self) -> None:
        # the types a recipe's values are held to (a DataConfig's own fields too)
        check_fields(self, "data")
        for name in ("batch_size", "max_length", "pack_window", "read_threads", "read_buffer_size",
                     "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"data.max_length: expected an integer >= 2 (a row holds an input and its target), "
                             f"got {self.max_length}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed: expected an integer in [0, 2**32), got {self.seed}")
        for name in ("worker_count", "prefetch_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs: expected an integer >= 1 or null, got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError("data.pad_to_multiple_of: expected an integer >= 1 or null, "
                             f"got {self.pad_to_multiple_of}")


class _RowsIterDataset(grain.IterDataset):
    """Turns a stream of example lists into rows, ``window`` records at a time. ``give_up`` is
    the records read without a single row after which the data is declared empty (a stream that
    repeats forever would otherwise look for a row forever when every record is dropped)."""

    def __init__(self, parent: grain.IterDataset, to_rows: Callable[[list], list], window: int, give_up: int):
        super().__init__(parent)
        self._to_rows, self._window, self._give_up = to_rows, window, give_up

    def __iter__(self) -> _RowsIterator:
        return _RowsIterator(self._parent.__iter__(), self._to_rows, self._window, self._give_up)


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, to_rows: Callable[[list], list], window: int, give_up: int):
        super().__init__(parent)
        self._to_rows, self._window, self._give_up = to_rows, window, give_up
        self._window_state = parent.get_state()  # parent state where the current window starts
        self._rows: list | None = []  # None: rebuild the current window (after set_state)
        self._emitted = 0
        self._barren = 0  # records pulled since the last window that gave a row

    def _pull_window(self) -> list:
        examples, pulled = [], 0
        for _ in range(self._window):
            try:
                examples.extend(next(self._parent))
            except StopIteration:
                break
            pulled += 1
        if not pulled:
            raise StopIteration
        rows = self._to_rows(examples)
        self._barren = 0 if rows else self._barren + pulled
        if self._barren >= self._give_up:
            raise DataError("data", f"{self._barren} records in a row gave no example (every one was dropped)",
                            "raise data.max_length or set data.truncation to right")
        return rows

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = self._pull_window()
        while self._emitted >= len(self._rows):
            self._window_state, self._emitted, self._rows = self._parent.get_state(), 0, []
            self._rows = self._pull_window()
        self._emitted += 1
        return self._rows[self._emitted - 1]

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_state, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._window_state, self._emitted, self._rows = state["window_start"], int(state["emitted"]), None


class _FillBatch:
    """Pads a partial final batch with empty rows so every batch has the same shape."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: Batch) -> Batch:
        missing = self.size - len(next(iter(batch.values())))
        if missing <= 0:
            return batch
        fill = packing.padding_rows(batch, missing)
        return {k: np.concatenate([v, fill[k]]) for k, v in batch.items()}


TOKEN_KEYS = frozenset(packing.LM_KEYS + packing.CLASSIFIER_KEYS[:-1] + (PAIR_IDS, MARGINS))  # with a token axis


class _TrimBatch:
    """Cuts the token columns (the last axis) of a batch to its longest real row, rounded up to
    ``multiple``. Token arrays are ``(B, L)``, or ``(B, 2, L)`` for preference pairs, where the
    longest of either side sets the width; the others (labels ``(B,)`` or, packed, ``(B, S)``) are
    left alone."""

    def __init__(self, multiple: int, max_length: int):
        self.multiple, self.max_length = multiple, max_length

    def __call__(self, batch: Batch) -> Batch:
        segments = batch["segment_ids"]
        used = np.flatnonzero(segments.reshape(-1, segments.shape[-1]).any(axis=0))
        longest = int(used[-1]) + 1 if len(used) else 1
        width = min(-(-longest // self.multiple) * self.multiple, self.max_length)
        return {k: v[..., :width] if k in TOKEN_KEYS else v for k, v in batch.items()}


def _with_answer_index(batch: Batch, most: int | None = None) -> Batch:
    """An LM batch with its rows' supervised positions (:func:`jaxtune.data.packing.answer_index`, as wide
    as ``most`` of them when given)."""
    return {**batch, packing.ANSWER_INDEX: packing.answer_index(batch["loss_weights"], most)}


def in_workers(it: grain.IterDataset, config: LoaderConfig) -> grain.IterDataset:
    """``it`` computed in ``config.worker_count`` grain worker processes (``it`` itself for 0).

    grain reads absl flags when it starts workers; outside an absl app they are unparsed and
    reading them raises ``UnparsedFlagAccessError``, so they are marked parsed (parsed flags are
    left alone)."""
    if not config.worker_count:
        return it
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                       per_worker_buffer_size=config.worker_buffer_size))


def _shard(config: LoaderConfig) -> tuple[int, int]:
    if config.shard_index is not None:
        index, count = config.shard_index, config.shard_count
    else:
        options = grain.sharding.ShardByJaxProcess(drop_remainder=False)
        index, count = options.shard_index, options.shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is not in [0, {count})")
    if config.batch_size % count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {count} processes")
    return index, count


class Loader:
    """Batches from a source: iterate for a resumable grain iterator (``get_state``/``set_state``).

    LM kinds yield ``input_ids``, ``targets``, ``segment_ids``, ``positions`` (int32
    [B, L]) and ``loss_weights`` (float32 [B, L]); preference pairs yield the same keys shaped
    [B, 2, L] (``[:, 0]`` chosen, ``[:, 1]`` rejected; packed pairs share segment ids across the
    two sides, see :func:`jaxtune.data.preference.pair_rows`) plus ``pair_ids`` (each token's
    source index + 1, 0 on padding) and ``margins`` (float32, each token's pair margin). Both also yield
    ``answer_index`` (int32 [B, K] or [B, 2, K]: each row's supervised positions,
    :func:`jaxtune.data.packing.answer_index`; on several processes ``K`` is the same for every batch,
    from :meth:`answer_bound`). Classification/regression yield
    ``input_ids``, ``segment_ids``, ``positions``, ``token_type_ids`` (int32 [B, L]) and
    ``labels`` (int32 or float32 [B]), or packed (``packing: true``) ``labels`` and
    ``example_weights`` (float32) [B, S]. ``B`` is the per-process batch (``batch_size``).
    """

    def __init__(self, source: Source, tokenizer: Any, config: LoaderConfig, *, max_pairs: int | None = None,
                 stats: TokenStats | None = None):
        """``max_pairs``: the most preference pairs a packed row holds (the loss's ``preference.max_segments``,
        beyond which it would not see them); None: as many as fit. ``stats``: :meth:`scan` of ``source`` by a
        loader that tokenizes as this one does (another role's over the same data), not repeated here."""
        self.source, self.tokenizer, self.config = source, tokenizer, config
        self.pairs = source.kind == PREFERENCE
        self.max_pairs = max_pairs
        if self.pairs:
            if config.truncation == "split":
                raise ValueError("data.truncation: 'split' cuts raw text into chunks; preference pairs take right, "
                                 "drop or error")
            self.tokenize = TokenizePairs(tokenizer, config.max_length, truncation=config.truncation,
                                          add_eos=config.add_eos)
        else:
            self.tokenize = Tokenize(tokenizer, source.kind, config.max_length, truncation=config.truncation,
                                     add_eos=config.add_eos)
        self.shard_index, self.shard_count = _shard(config)
        if config.pad_to_multiple_of is not None and self.shard_count > 1:
            raise ValueError(f"pad_to_multiple_of needs one process, but the data is sharded over {self.shard_count}: "
                             "each would cut its batches to a different width; pad to max_length instead (None)")
        self.batch_size = config.batch_size // self.shard_count
        self.lm = source.kind in LM_KINDS or self.pairs  # LM rows (packed or padded), single or paired
        self.packs = self.lm if config.packing is None else config.packing
        self._stats = stats
        # LM rows list their supervised positions (answer_index). One process sizes each batch's index to its
        # fullest row (None); several share every batch's shape, so each sizes it to one bound of the source's rows.
        self.answer_most = self.answer_bound() if self.lm and self.shard_count > 1 else None
        self.dataset = self._build()

    def _fit(self) -> packing.Fit:
        """The packer of this loader's packed rows: first fit, at most ``max_pairs`` pairs a row, for
        preference pairs; first fit for LM rows; for classifier rows next fit (``pack_in_order``) or
        first fit, at most :func:`~jaxtune.data.packing.max_segments` examples a row. The one place
        that chooses it: :meth:`_to_rows` packs with it and :meth:`rows_per_epoch` counts with it,
        so the epoch's step count cannot drift from the rows training reads."""
        cfg = self.config
        if self.pairs:
            return functools.partial(packing.first_fit, max_length=cfg.max_length, max_items=self.max_pairs)
        if self.lm:
            return functools.partial(packing.first_fit, max_length=cfg.max_length)
        return functools.partial(packing.next_fit if cfg.pack_in_order else packing.first_fit,
                                 max_length=cfg.max_length, max_items=packing.max_segments(cfg.max_length))

    def _to_rows(self) -> Callable[[list], list]:
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        if self.pairs:
            return functools.partial(pair_rows, max_length=self.config.max_length, pad_id=pad_id, pack=self.packs,
                                     fit=self._fit() if self.packs else None)
        if not self.packs:
            fn = packing.pad if self.lm else packing.classifier_rows
        else:
            fn = functools.partial(packing.pack if self.lm else packing.pack_classifiers, fit=self._fit())
        return functools.partial(fn, max_length=self.config.max_length, pad_id=pad_id)

    def _build(self) -> grain.IterDataset:
        cfg = self.config
        ds = grain.MapDataset.source(self.source)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds.repeat(cfg.num_epochs)[self.shard_index::self.shard_count].map(self.tokenize)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        window = cfg.pack_window if self.packs else 1
        give_up = len(self.source) // self.shard_count + window  # a whole pass over this shard
        it = _RowsIterDataset(it, self._to_rows(), window, give_up)
        it = in_workers(it, cfg)
        it = it.batch(self.batch_size, drop_remainder=cfg.drop_remainder)
        if not cfg.drop_remainder:
            it = it.map(_FillBatch(self.batch_size))
        if cfg.pad_to_multiple_of is not None:
            it = it.map(_TrimBatch(cfg.pad_to_multiple_of, cfg.max_length))
        if self.lm:
            it = it.map(functools.partial(_with_answer_index, most=self.answer_most))
        if not cfg.worker_count and cfg.prefetch_batches:
            it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch_batches)
        return it

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def scan(self) -> TokenStats:
        """Tokenize the whole source once (cached): truncation/drop counts, token totals.

        Raises the first :class:`DataError` a record would raise during training.
        """
        if self._stats is None:
            stats = scan(self.source, self.tokenize)
            if stats.examples == 0:
                raise self._nothing_left(stats)
            self._stats = stats
            if stats.dropped:
                self._warn_dropped(stats)
        return self._stats

    def _warn_dropped(self, stats: TokenStats) -> None:
        """Nothing is dropped without a word: how many, of which labels, and how to keep them."""
        cfg = self.config
        where = ", ".join(self.source.report.paths) if getattr(self.source, "report", None) else "data"
        by_label = stats.drops_by_label()
        mix = stats.mix_change()
        if cfg.truncation == "drop":
            why = f"longer than data.max_length={cfg.max_length}"
        elif cfg.truncation == "left":
            why = f"their last answer alone is longer than data.max_length={cfg.max_length}"
        else:
            why = f"data.truncation={cfg.truncation} at data.max_length={cfg.max_length} cut off every answer token"
        keep = (f"raise data.max_length (the longest record has {stats.longest} tokens)"
                + (" or set data.truncation=left (keeps the answer, cuts the oldest turns)"
                   if self.source.kind in ("chat", "prompt_completion") and cfg.truncation != "left" else ""))
        # A validation split of the training file names the same file: say which pass drops them.
        role = "training data" if cfg.shuffle else "validation data"
        log.warning("%s (%s): %d of %d examples dropped: %s%s%s; to keep them, %s", where, role, stats.dropped,
                    stats.records, why, f" (per label: {by_label})" if by_label else "",
                    f"; dropping changes the label mix: {mix}" if mix else "", keep)

    def _nothing_left(self, stats: TokenStats) -> DataError:
        """The error for a source none of whose records survives tokenization and truncation."""
        where = ", ".join(self.source.report.paths) if getattr(self.source, "report", None) else "data"
        cfg = self.config
        if stats.dropped and cfg.truncation == "drop":
            return DataError(where, f"all {stats.records} records are longer than data.max_length={cfg.max_length} "
                                    f"(the longest has {stats.longest} tokens) and data.truncation=drop drops them",
                             f"raise data.max_length to at least {stats.longest} or set data.truncation=right")
        return DataError(where, f"none of the {stats.records} records leaves a supervised token within "
                                f"data.max_length={cfg.max_length} (the longest has {stats.longest} tokens)",
                         f"raise data.max_length to at least {stats.longest} or shorten the prompts")

    def answer_bound(self) -> int:
        """The most supervised positions a row of this loader can hold, from :meth:`scan`: the most of one
        example (a pair's side) when each has a row; packed, ``max_length`` times the largest supervised share
        of an example (a row's examples fill at most ``max_length`` positions, each supervised at most at that
        share). The same on every process, which all scan the whole source."""
        stats, length = self.scan(), self.config.max_length
        if not self.packs:
            return stats.most_supervised
        supervised, tokens = stats.densest
        return min(length, supervised * length // tokens)

    def rows_per_epoch(self) -> tuple[int, str]:
        """Rows one pass over the source fills, and how that was counted: examples after
        truncation, or for packed data the rows this loader's packer makes of the first pass's
        shuffled records, window by window, over every process's shard (later passes are shuffled
        otherwise and may differ by a few rows)."""
        stats = self.scan()
        if not self.packs:
            return stats.examples, f"{stats.examples} examples"
        cfg, n = self.config, len(self.source)
        order = grain.MapDataset.range(n)
        if cfg.shuffle:
            order = order.shuffle(seed=cfg.seed)
        fit = self._fit()
        rows = 0
        for shard in range(self.shard_count):
            records = [order[i] for i in range(shard, n, self.shard_count)]
            for start in range(0, len(records), cfg.pack_window):
                window = [length for r in records[start:start + cfg.pack_window]
                          for length in stats.lengths[stats.starts[r]:stats.starts[r + 1]]]
                rows += len(fit(window)) if window else 0
        return rows, f"{rows} packed rows"

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each array in a (per-process) batch (the widest shape, with
        ``pad_to_multiple_of``; an ``answer_index`` as wide as a row on one process, whose batches' index
        widths vary, and on several the one width of all their batches: that needs :meth:`scan`)."""
        shape = (self.batch_size, self.config.max_length)
        if self.pairs:
            shape = (self.batch_size, 2, self.config.max_length)
        if self.lm:
            keys = packing.LM_KEYS + ((PAIR_IDS, MARGINS) if self.pairs else ())
            spec = {k: (shape, np.dtype(np.float32 if k in ("loss_weights", MARGINS) else np.int32)) for k in keys}
            width = (self.config.max_length if self.answer_most is None
                     else packing.index_width(self.answer_most, self.config.max_length))
            spec[packing.ANSWER_INDEX] = (shape[:-1] + (width,), np.dtype(np.int32))
            return spec
        spec = {k: (shape, np.dtype(np.int32)) for k in packing.CLASSIFIER_KEYS[:-1]}
        per_row = (self.batch_size, packing.max_segments(self.config.max_length)) if self.packs else (self.batch_size,)
        spec["labels"] = (per_row, np.dtype(np.int32 if self.source.kind == "classification" else np.float32))
        if self.packs:
            spec["example_weights"] = (per_row, np.dtype(np.float32))
        return spec


def reading_config(config: LoaderConfig, *, train: bool, batch_size: int | None = None) -> LoaderConfig:
    """The :class:`LoaderConfig` (never a subclass: only the loader's fields) of ``config`` in one of
    the two roles every loader, text or image, reads in. Training: shuffled, repeated forever, full
    batches only. Evaluation: one pass in file order, packed rows in file order, the last batch
    filled, ``batch_size`` (default ``config.batch_size``) rows a batch, and no worker processes
    (``worker_count`` 0: an evaluation iterates afresh each time, and workers would start anew,
    seconds each, and pack per worker, out of file order)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoaderConfig)}
    role = (dict(shuffle=True, num_epochs=None, drop_remainder=True) if train else
            dict(shuffle=False, num_epochs=1, pack_in_order=True, drop_remainder=False, worker_count=0,
                 batch_size=batch_size or config.batch_size))
    return LoaderConfig(**{**fields, **role})


def training_loader(source: Source, tokenizer: Any, config: LoaderConfig, *, max_pairs: int | None = None) -> Loader:
    """The loader a training run reads: shuffled, repeated forever, full batches only."""
    return Loader(source, tokenizer, reading_config(config, train=True), max_pairs=max_pairs)


def evaluation_loader(source: Source, tokenizer: Any, config: LoaderConfig, batch_size: int | None = None, *,
                      max_pairs: int | None = None, stats: TokenStats | None = None) -> Loader:
    """The loader an evaluation reads: one pass in file order, the last batch filled with empty
    rows; packed classification/regression rows hold the examples in file order (next fit), so
    their outputs, row by row and segment by segment, line up with the file. It reads on threads
    (:func:`reading_config`). ``stats``: the source's scan, when a loader of it has made one (:class:`Loader`)."""
    return Loader(source, tokenizer, reading_config(config, train=False, batch_size=batch_size), max_pairs=max_pairs,
                  stats=stats)


def make_loader(source: Source, tokenizer: Any, config: LoaderConfig, *, scan_first: bool = True) -> Loader:
    """Build a :class:`Loader`; with ``scan_first`` tokenize everything once and log the counts.

    The scan finds template failures and over-long examples (``truncation="error"``) before
    training starts, and reports how many examples were truncated, split or dropped.
    """
    loader = Loader(source, tokenizer, config)
    if scan_first:
        log.info("%s: %s", source.report.summary(), loader.scan().summary())
    return loader


def to_global(batch: Batch, sharding: Any) -> dict[str, Any]:
    """Per-process numpy batch → global ``jax.Array``s laid out by ``sharding`` (e.g. a
    ``NamedSharding`` over the mesh's data axis); every process calls it with its own rows."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

