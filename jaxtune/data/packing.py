"""Rows from examples: packing several examples into one fixed-length row, or padding.

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

A classifier row (classification or regression) holds the same token arrays (``targets`` and
``loss_weights`` aside) plus ``token_type_ids``, and ``labels``: the example's label, or in a
packed row ``labels`` ``(S,)`` and ``example_weights`` float32 ``(S,)``: segment ``s + 1``'s label
at index ``s`` and 1.0 there, zeros after the last segment. ``S`` (:func:`max_segments`) is
static so the step compiles once.

An LM batch may also carry ``answer_index`` (:func:`answer_index`): each row's supervised
positions, so that the LM head and the loss run on those alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

from jaxtune.data.tokenize import Example

LM_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
ANSWER_INDEX = "answer_index"  # int32 (..., K): a row's supervised positions in order, then -1
CLASSIFIER_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids", "labels")
# A packed classifier row holds at most one example per this many tokens: bounds S, the label
# slots per row, and only binds when examples average fewer tokens (rows are then less full).
MIN_SEGMENT_TOKENS = 8
# A packer: the items' lengths in, each row's item indices out (first_fit or next_fit, bound to a row's size).
Fit = Callable[[Sequence[int]], list[list[int]]]


def max_segments(max_length: int) -> int:
    """``S``: the examples a packed classifier row of ``max_length`` tokens holds at most."""
    return max(1, max_length // MIN_SEGMENT_TOKENS)


def first_fit(lengths: Sequence[int], max_length: int, max_items: int | None = None) -> list[list[int]]:
    """Assign items to rows of capacity ``max_length`` (and at most ``max_items`` items), each
    to the first row it fits in.

    Returns the item indices of each row, rows in the order they were opened and items in
    input order within a row.
    """
    cap = len(lengths) if max_items is None else max_items
    room = np.empty(len(lengths), np.int64)
    slots = np.empty(len(lengths), np.int64)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has length {n} > max_length={max_length}; truncate first")
        fits = np.flatnonzero((room[:len(rows)] >= n) & (slots[:len(rows)] > 0))
        if len(fits):
            rows[fits[0]].append(i)
            room[fits[0]] -= n
            slots[fits[0]] -= 1
        else:
            room[len(rows)] = max_length - n
            slots[len(rows)] = cap - 1
            rows.append([i])
    return rows


def next_fit(lengths: Sequence[int], max_length: int, max_items: int | None = None) -> list[list[int]]:
    """Like :func:`first_fit`, but each item goes to the last row opened or a new one, so the
    items stay in input order across rows (rows are less full)."""
    rows: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has length {n} > max_length={max_length}; truncate first")
        if rows and n <= room and (max_items is None or len(rows[-1]) < max_items):
            rows[-1].append(i)
            room -= n
        else:
            rows.append([i])
            room = max_length - n
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


def pack(examples: Sequence[Example], max_length: int, pad_id: int = 0, *,
         fit: Fit | None = None) -> list[dict[str, np.ndarray]]:
    """Packing of ``examples`` into LM rows: first fit into as few as it finds, or ``fit``'s rows."""
    fit = fit or functools.partial(first_fit, max_length=max_length)
    rows = fit([len(e["input_ids"]) for e in examples])
    return [lm_row([examples[i] for i in row], max_length, pad_id) for row in rows]


def pad(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """One LM row per example, padded to ``max_length``."""
    return [lm_row([e], max_length, pad_id) for e in examples]


def _classifier_tokens(examples: Sequence[Example], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The token arrays of a classifier row holding ``examples`` as segments 1, 2, ..."""
    row = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
        "positions": np.zeros(max_length, np.int32),
        "token_type_ids": np.zeros(max_length, np.int32),
    }
    start = 0
    for segment, example in enumerate(examples, start=1):
        n = len(example["input_ids"])
        if start + n > max_length:
            raise ValueError(f"example has {n} tokens, more than the {max_length - start} left of max_length="
                             f"{max_length}; truncate first")
        row["input_ids"][start:start + n] = example["input_ids"]
        row["segment_ids"][start:start + n] = segment
        row["positions"][start:start + n] = np.arange(n, dtype=np.int32)
        row["token_type_ids"][start:start + n] = example["token_type_ids"]
        start += n
    return row


def classifier_row(example: Example, max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One classification/regression row: tokens padded to ``max_length`` and a scalar label."""
    return {**_classifier_tokens([example], max_length, pad_id), "labels": example["label"]}


def classifier_rows(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """One classifier row per example."""
    return [classifier_row(e, max_length, pad_id) for e in examples]


def packed_classifier_row(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One classifier row holding ``examples`` (at most :func:`max_segments`) as segments, with
    ``labels`` and ``example_weights`` ``(S,)`` (see the module docstring)."""
    slots = max_segments(max_length)
    if len(examples) > slots:
        raise ValueError(f"{len(examples)} examples do not fit the {slots} label slots of a row of {max_length} tokens")
    labels = np.asarray([e["label"] for e in examples])
    dtype = np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int32
    row = {**_classifier_tokens(examples, max_length, pad_id),
           "labels": np.zeros(slots, dtype), "example_weights": np.zeros(slots, np.float32)}
    row["labels"][:len(examples)] = labels
    row["example_weights"][:len(examples)] = 1.0
    return row


def pack_classifiers(examples: Sequence[Example], max_length: int, pad_id: int = 0, *,
                     in_order: bool = False, fit: Fit | None = None) -> list[dict[str, np.ndarray]]:
    """Packing of classifier ``examples``: first fit into as few rows as it finds, or with
    ``in_order`` next fit, whose segments, read row by row, are the examples in order; at most
    :func:`max_segments` a row. ``fit``, when given, is the packer instead (of the same bound)."""
    fit = fit or functools.partial(next_fit if in_order else first_fit, max_length=max_length,
                                   max_items=max_segments(max_length))
    rows = fit([len(e["input_ids"]) for e in examples])
    return [packed_classifier_row([examples[i] for i in row], max_length, pad_id) for row in rows]


def padding_rows(like: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """``count`` empty rows shaped like the batch ``like`` (all ids, weights and segments 0)."""
    return {k: np.zeros((count,) + v.shape[1:], v.dtype) for k, v in like.items()}


def index_width(most: int, length: int) -> int:
    """The width ``K`` of an answer index for rows of ``length`` positions whose fullest has ``most``
    supervised ones: the smallest of ``length/16, length/8, length/4, length/2`` (each rounded up to a
    multiple of 8) that holds ``most``, else ``length``. A few widths: a run compiles a few programs."""
    widths = sorted({-(-length // (8 * d)) * 8 for d in (16, 8, 4, 2)})  # ceil(length / d), rounded up to 8
    return next((w for w in widths if most <= w < length), length)


def answer_index(loss_weights: np.ndarray, most: int | None = None) -> np.ndarray:
    """Each row's supervised positions (loss weight > 0) in order, then -1: int32 ``(..., K)`` for
    ``loss_weights`` float ``(..., T)``.

    The vocabulary projection is a large share of a step (a fifth of SmolLM2-135M's forward), and
    only supervised positions need it: a chat's prompt, a preference pair's shared prompt and the
    padding do not. ``K`` is :func:`index_width` of the row with the most supervised positions, or of
    ``most`` when given: a bound every batch of a run keeps (on several processes, whose batches must
    share one width), and a row above it is an error. ``K == T`` saves nothing; the step then ignores it.
    """
    t = loss_weights.shape[-1]
    supervised = loss_weights.reshape(-1, t) > 0
    counts = supervised.sum(-1)
    fullest = int(counts.max(initial=0))
    if most is not None and fullest > most:
        raise ValueError(f"a row has {fullest} supervised positions, more than the bound of {most} its answer index "
                         "was given")
    k = index_width(fullest if most is None else most, t)
    order = np.argsort(~supervised, axis=-1, kind="stable")[:, :k]  # supervised positions first, in order
    index = np.where(np.arange(k) < counts[:, None], order, -1).astype(np.int32)
    return index.reshape(loss_weights.shape[:-1] + (k,))
