"""Rows from examples: packing several LM examples into one fixed-length row, or padding.

Pure functions of their inputs (so a resumed iterator rebuilds the same rows). An LM row is a
dict of arrays of length ``L = max_length``:

- ``input_ids`` int32: the examples' tokens back to back, then ``pad_id``;
- ``targets`` int32: ``input_ids[t + 1]`` when ``t + 1`` is in the same segment, else 0;
- ``loss_weights`` float32: 1.0 where ``targets[t]`` is a supervised token, else 0 (the last
  token of each segment, padding, unsupervised tokens);
- ``segment_ids`` int32: 1, 2, 3, ... per example in the row, 0 on padding;
- ``positions`` int32: 0, 1, ... restarting in each segment, 0 on padding.

Every supervised token of every example is a target exactly once, whether packed or padded,
so a summed loss does not depend on packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxtune.data.tokenize import Example

LM_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
CLASSIFIER_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids", "labels")


def first_fit(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Assign items to rows of capacity ``max_length``, each to the first row it fits in.

    Returns the item indices of each row, rows in the order they were opened and items in
    input order within a row.
    """
    room = np.empty(len(lengths), np.int64)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has length {n} > max_length={max_length}; truncate first")
        fits = np.flatnonzero(room[:len(rows)] >= n)
        if len(fits):
            rows[fits[0]].append(i)
            room[fits[0]] -= n
        else:
            room[len(rows)] = max_length - n
            rows.append([i])
    return rows


def lm_row(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One LM row holding ``examples`` as consecutive segments (total length ≤ ``max_length``)."""
    row = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "targets": np.zeros(max_length, np.int32),
        "loss_weights": np.zeros(max_length, np.float32),
        "segment_ids": np.zeros(max_length, np.int32),
        "positions": np.zeros(max_length, np.int32),
    }
    start = 0
    for segment, example in enumerate(examples, start=1):
        ids, mask = example["input_ids"], example["loss_mask"]
        end = start + len(ids)
        if end > max_length:
            raise ValueError(f"examples total more than max_length={max_length} tokens")
        row["input_ids"][start:end] = ids
        row["targets"][start:end - 1] = ids[1:]
        row["loss_weights"][start:end - 1] = mask[1:]
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(ids), dtype=np.int32)
        start = end
    return row


def pack(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """First-fit packing of ``examples`` into as few LM rows as it finds."""
    rows = first_fit([len(e["input_ids"]) for e in examples], max_length)
    return [lm_row([examples[i] for i in row], max_length, pad_id) for row in rows]


def pad(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """One LM row per example, padded to ``max_length``."""
    return [lm_row([e], max_length, pad_id) for e in examples]


def classifier_row(example: Example, max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One classification/regression row: tokens padded to ``max_length`` and a scalar label."""
    n = len(example["input_ids"])
    if n > max_length:
        raise ValueError(f"example has {n} tokens > max_length={max_length}; truncate first")
    row = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
        "positions": np.zeros(max_length, np.int32),
        "token_type_ids": np.zeros(max_length, np.int32),
        "labels": example["label"],
    }
    row["input_ids"][:n] = example["input_ids"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    row["token_type_ids"][:n] = example["token_type_ids"]
    return row


def classifier_rows(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """One classifier row per example."""
    return [classifier_row(e, max_length, pad_id) for e in examples]


def padding_rows(like: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """``count`` empty rows shaped like the batch ``like`` (all ids, weights and segments 0)."""
    return {k: np.zeros((count,) + v.shape[1:], v.dtype) for k, v in like.items()}
