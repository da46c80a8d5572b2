"""Preference pairs: read and validate OpenAI's and TRL's formats, tokenize, pair rows.

Two file formats are read, one JSON object per line, detected per row:

- OpenAI's preference fine-tuning format::

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

- TRL's: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` with plain strings (the answers
  continue the prompt text) or message lists (conversational); conversational rows may leave the
  prompt implicit, as the shared opening turns of two full ``chosen``/``rejected`` conversations.

Every row is checked when the source is built, like the chat source: a bad row raises a one-line
:class:`~jaxtune.data.source_types.DataError` ``"path:line: problem — fix"`` (missing fields, empty
answers, answers that are not assistant turns, a prompt that ends with an assistant turn, mixed
plain and conversational fields, identical answers), or with ``skip_bad_rows`` is counted and
left out.

A record (``source[i]``) is ``{"prompt", "chosen", "rejected", "where"}``: three message lists
(conversational) or three strings (plain). :class:`TokenizePairs` turns it into a chosen and a
rejected example that share the prompt's tokens: conversations go through the chat template with
the answer turns supervised (:func:`jaxtune.data.tokenize.encode_chat`), plain rows as
``prompt + answer + EOS`` between the tokenizer's own special tokens (:func:`jaxtune.data.tokenize.special_ends`:
an encoder's ``[CLS] ... [SEP]``), as TRL's trainers tokenize them. :func:`pair_rows` packs pairs
into paired LM rows ``(2, L)``, the layout :mod:`jaxtune.training.preference` reads: row 0 chosen,
row 1 rejected, pair ``s`` in segment ``s`` of both. Rows also carry ``pair_ids`` ``(2, L)``: the
source index + 1 of the pair each token belongs to (0 on padding), so anything computed per
example (a cached reference model's log-probs) can be found again in any shuffled, packed batch,
and ``margins`` ``(2, L)``: each token's pair ``margin`` (an optional number of a TRL row, which only
a reward model's loss reads, as TRL's ``RewardTrainer``; 0 without one).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data import packing
from jaxtune.data.parquet import is_parquet, read_parquet
from jaxtune.data.row_sources import jsonl_lines
from jaxtune.data.rows import RowError, check_message, string_field
from jaxtune.data.source_types import (
    PREFERENCE,
    DataError,
    FileSource,
    Source,
    SourceReport,
    existing_file,
    finish_report,
    reject_row,
)
from jaxtune.data.tokenize import (
    Example,
    encode_chat,
    encode_pieces,
    special_ends,
    with_eos,
)
from jaxtune.data.tokenizer_backend import backend

KIND = PREFERENCE  # the source kind (one of jaxtune.data.source_types.KINDS)
TRUNCATION = ("right", "drop", "error")
Pair = dict[str, Any]  # {"chosen": Example, "rejected": Example, "index": source index or -1}
PAIR_IDS = "pair_ids"  # the rows' key for source index + 1 per token (0: padding or unknown)
MARGINS = "margins"  # the rows' key for each token's pair margin (a reward model's; 0: none given, or padding)

PREFERENCE_COLUMNS = ("input", "preferred_output", "non_preferred_output", "prompt", "chosen", "rejected")
_OPENAI_HINT = ('write each line as {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", '
                '"content": ...}], "non_preferred_output": [...]} or {"prompt": ..., "chosen": ..., "rejected": ...}')


# ----------------------------------------------------------------------------- validation


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{field!r} must be a non-empty list of messages", f"list the turns of {field!r} in order")
    return [check_message(m, f"{field}[{n}]") for n, m in enumerate(value)]


def _prompt(messages: list[dict], field: str) -> list[dict]:
    if messages[-1]["role"] == "assistant":
        raise RowError(f"the prompt ends with an assistant turn ({field}[{len(messages) - 1}]), so the answers do not "
                       "follow a request", "end the prompt with the user turn the answers reply to, and move "
                       "assistant replies into the answers")
    return messages


def _answer(value: Any, field: str) -> list[dict]:
    messages = _messages(value, field)
    for n, m in enumerate(messages):
        if m["role"] != "assistant":
            raise RowError(f"{field}[{n}] has role {m['role']!r}, but answers are assistant turns",
                           f"give {field!r} only assistant messages and put other turns in the prompt")
    return messages


def _distinct(record: dict, chosen: str, rejected: str) -> dict:
    if record["chosen"] == record["rejected"]:
        raise RowError(f"{chosen!r} and {rejected!r} are identical, so the pair prefers nothing",
                       "give two different answers or remove the row")
    return record


def check_openai_preference(obj: dict) -> dict:
    """Validate one row of OpenAI's preference format; return ``{"prompt", "chosen", "rejected"}`` messages."""
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise RowError(f"missing {key!r} key", _OPENAI_HINT)
    source = obj["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise RowError("'input' has no 'messages' list",
                       'write "input": {"messages": [{"role": "user", "content": ...}]}')
    if source.get("tools") or source.get("parallel_tool_calls"):
        raise RowError("'input' declares tools, which are not supported", "remove tools and tool calls from the row")
    prompt = _prompt(_messages(source["messages"], "input.messages"), "input.messages")
    record = {"prompt": prompt, "chosen": _answer(obj["preferred_output"], "preferred_output"),
              "rejected": _answer(obj["non_preferred_output"], "non_preferred_output")}
    return _distinct(record, "preferred_output", "non_preferred_output")


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two full conversations into their shared opening turns and the two answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError("'chosen' and 'rejected' share no opening turns and there is no 'prompt'",
                       "add a 'prompt' message list, or start both conversations with the same prompt turns")
    if shared == len(chosen) or shared == len(rejected):
        raise RowError("'chosen' and 'rejected' are identical or one is a prefix of the other, so an answer is empty",
                       "end each conversation with its own assistant answer")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_trl_preference(obj: dict) -> dict:
    """Validate one TRL row (``prompt``/``chosen``/``rejected``, plain or conversational)."""
    for key in ("chosen", "rejected"):
        if key not in obj or obj[key] is None:
            raise RowError(f"missing {key!r} key",
                           'write each line as {"prompt": ..., "chosen": ..., "rejected": ...}')
    fields = [k for k in ("prompt", "chosen", "rejected") if obj.get(k) is not None]
    kinds = {k: "string" if isinstance(obj[k], str) else "message list" if isinstance(obj[k], list) else
             type(obj[k]).__name__ for k in fields}
    bad = [k for k in fields if kinds[k] not in ("string", "message list")]
    if bad:
        raise RowError(f"{bad[0]!r} is a {kinds[bad[0]]}, not a string or a message list",
                       "use plain strings or lists of {\"role\", \"content\"} messages")
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{k} is a {v}" for k, v in kinds.items())
        raise RowError(f"mixed plain and conversational fields ({listing})",
                       "use strings for all of prompt, chosen and rejected, or message lists for all")
    if kinds["chosen"] == "string":
        if "prompt" not in kinds:
            raise RowError("missing 'prompt' key", "plain-text pairs need the prompt the answers continue")
        record = {"prompt": string_field(obj, "prompt", nonempty=False),
                  "chosen": string_field(obj, "chosen", nonempty=True),
                  "rejected": string_field(obj, "rejected", nonempty=True)}
        return _distinct(record, "chosen", "rejected")
    if "prompt" in kinds:
        record = {"prompt": _prompt(_messages(obj["prompt"], "prompt"), "prompt"),
                  "chosen": _answer(obj["chosen"], "chosen"), "rejected": _answer(obj["rejected"], "rejected")}
        return _distinct(record, "chosen", "rejected")
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    _prompt(prompt, "chosen")  # the shared opening turns must end before the answers
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        for n, m in enumerate(answer, start=len(prompt)):
            if m["role"] != "assistant":
                raise RowError(f"{field}[{n}] has role {m['role']!r} after the shared prompt, but answers are "
                               "assistant turns", "make the conversations differ only in their final assistant turns")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _margin(obj: dict) -> float:
    """The row's optional ``margin`` (TRL's reward data: how much higher the chosen answer's reward
    should be), 0 without one."""
    value = obj.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise RowError(f"'margin' is {value!r}, not a finite number", "give the margin as a number, or remove it")
    return float(value)


def check_preference(obj: Any) -> dict:
    """Validate one preference row in either format (detected by its keys); return the record, with
    its ``margin`` (0 when the row has none)."""
    if not isinstance(obj, dict):
        raise RowError(f"row is a JSON {type(obj).__name__}, not an object", _OPENAI_HINT)
    if {"input", "preferred_output", "non_preferred_output"} & obj.keys():
        record = check_openai_preference(obj)
    elif {"chosen", "rejected"} & obj.keys():
        record = check_trl_preference(obj)
    else:
        raise RowError(f"row has neither OpenAI's nor TRL's preference keys (keys: {sorted(obj)[:6]})", _OPENAI_HINT)
    return {**record, "margin": _margin(obj)}


# ----------------------------------------------------------------------------- source


class PreferenceSource(FileSource):
    """Preference rows of JSONL files (``kind == "preference"``), read with ``os.pread``: random
    access, picklable and thread-safe like every :class:`~jaxtune.data.source_types.FileSource`."""

    def __init__(self, paths: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 lines: np.ndarray, report: SourceReport):
        super().__init__(KIND, paths, file_ids, offsets, lengths, lines, report)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        raw = os.pread(self._fd(int(self._file_ids[index])), int(self._lengths[index]), int(self._offsets[index]))
        record = check_preference(json.loads(raw))
        record["where"] = self.where(index)
        record["index"] = index
        return record

    def select(self, indices: Sequence[int]) -> PreferenceSource:
        idx = np.asarray(indices, dtype=np.int64)
        out = PreferenceSource(self.paths, self._file_ids[idx], self._offsets[idx], self._lengths[idx],
                               self._lines[idx], self.report)
        out._stamps = self._stamps
        return out


def read_preference(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> Source:
    """Read a preference JSONL file (OpenAI's or TRL's format, see the module docstring), or a Parquet
    file or folder of shards with those columns (:mod:`jaxtune.data.parquet`).

    Raises :class:`DataError` (``path:line``, ``path[row]`` for Parquet) on the first bad row unless
    ``skip_bad_rows``, in which case bad rows are counted in ``source.report.skipped``.
    """
    if is_parquet(path):
        return read_parquet(path, KIND, check_preference, optional=PREFERENCE_COLUMNS, skip_bad_rows=skip_bad_rows,
                            indexed=True)
    path = existing_file(path)
    report = SourceReport([path])
    lines, offsets, lengths = [], [], []
    for line_no, start, length, parsed in jsonl_lines(path, report, skip_bad_rows):
        try:
            check_preference(parsed)
        except RowError as err:
            reject_row(report, f"{path}:{line_no}", err, skip_bad_rows)
            continue
        lines.append(line_no), offsets.append(start), lengths.append(length)
    finish_report(report, len(offsets), "rows")
    return PreferenceSource([path], np.zeros(len(offsets), np.int32), np.asarray(offsets, np.int64),
                            np.asarray(lengths, np.int64), np.asarray(lines, np.int64), report)


# ----------------------------------------------------------------------------- tokenization


def _prompt_length(example: Example) -> int:
    """Tokens before the first supervised one."""
    supervised = np.flatnonzero(example["loss_mask"])
    return int(supervised[0]) if len(supervised) else len(example["input_ids"])


def encode_pair(tokenizer: Any, record: dict, *, prefix: Sequence[int] = (), eos: int | None = None,
                suffix: Sequence[int] = ()) -> Pair:
    """The chosen and rejected examples of a record (``input_ids`` int32 ``[n]``, ``loss_mask`` bool
    ``[n]``: the answer's tokens, end-of-turn marker or EOS included), sharing the prompt tokens.

    Conversations are rendered with the tokenizer's chat template (prompt turns unsupervised,
    answer turns supervised); plain rows are ``prefix + prompt + answer + [eos] + suffix``: what
    TRL's trainers tokenize, ``tokenizer(prompt + answer + eos_token)`` with the tokenizer's special
    tokens (``[CLS] ... [SEP]`` for BERT, ``<s> ... </s></s>`` for RoBERTa, ``<s> ... </s>`` for Llama). Raises
    :class:`DataError` if the template renders the prompt differently in front of the two answers.
    """
    where = record.get("where", "<pair>")
    pair = {}
    for side in ("chosen", "rejected"):
        if isinstance(record["prompt"], list):
            messages = record["prompt"] + record[side]
            weights = [0] * len(record["prompt"]) + [1] * len(record[side])
            pair[side] = encode_chat(tokenizer, messages, weights, where)
        else:
            ids = encode_pieces(tokenizer, [record["prompt"], record[side]])
            answer = with_eos(ids[1], eos) + list(suffix)
            tokens = list(prefix) + ids[0] + answer
            mask = [False] * (len(prefix) + len(ids[0])) + [True] * len(answer)
            pair[side] = {"input_ids": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, bool)}
    n = _prompt_length(pair["chosen"])
    if n != _prompt_length(pair["rejected"]) or not np.array_equal(pair["chosen"]["input_ids"][:n],
                                                                    pair["rejected"]["input_ids"][:n]):
        raise DataError(where, "the prompt does not end before the answers: its tokens differ in front of the chosen "
                        "and the rejected answer", "use a chat template that renders the prompt turns the same "
                        "whatever answer follows")
    return pair


class TokenizePairs:
    """Record -> ``[{"chosen": Example, "rejected": Example}]`` (empty if dropped); picklable, for a
    grain ``map``. ``encode`` also returns the truncation status and the longer side's length.

    ``truncation``: ``right`` keeps the first ``max_length`` tokens of each side (the prompt stays
    shared; a plain pair's closing special tokens, an encoder's ``[SEP]``, stay last, as
    ``tokenizer(text, truncation=True)`` keeps them), ``drop`` drops over-long pairs, ``error`` raises.
    A pair whose answer tokens are all cut off on either side is dropped (status ``dropped``).
    """

    def __init__(self, tokenizer: Any, max_length: int, *, truncation: str = "right", add_eos: bool = True):
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION} for preference pairs, got {truncation!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        backend(tokenizer)  # fail here if it is not a fast tokenizer
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.prefix, self.suffix = special_ends(tokenizer)
        self.eos = tokenizer.eos_token_id if add_eos else None
        # An encoder's tokenizer (BERT's) may have no EOS but closes each text itself ([SEP]): that ends the answer.
        if add_eos and self.eos is None and not self.suffix:
            raise ValueError("the tokenizer has no EOS token; pass add_eos=False")

    def encode(self, record: dict) -> tuple[list[Pair], str, int]:
        where = record.get("where", "<pair>")
        if isinstance(record["prompt"], list) and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(where, "conversational pair, but the tokenizer has no chat template",
                            "set tokenizer.chat_template or write plain-text prompt/chosen/rejected strings")
        pair = encode_pair(self.tokenizer, record, prefix=self.prefix, eos=self.eos, suffix=self.suffix)
        length = max(len(e["input_ids"]) for e in pair.values())
        extra = {"index": int(record.get("index", -1)), "margin": float(record.get("margin", 0.0))}
        if length <= self.max_length:
            return [{**pair, **extra}], "ok", length
        if self.truncation == "error":
            raise DataError(where, f"{length} tokens is longer than max_length={self.max_length}",
                            "raise max_length, shorten the pair, or set truncation")
        if self.truncation == "drop":
            return [], "dropped", length
        # Plain text keeps its closing special tokens (an encoder's [SEP]), as the tokenizer truncates a text.
        closing = len(self.suffix) if isinstance(record["prompt"], str) else 0
        keep = self.max_length - closing
        cut = {side: {k: np.concatenate([v[:keep], v[len(v) - closing:]]) if len(v) > self.max_length else v
                      for k, v in e.items()} for side, e in pair.items()}
        if not all(e["loss_mask"][1:keep].any() for e in cut.values()):
            return [], "dropped", length  # truncation cut off a whole answer
        return [{**cut, **extra}], "truncated", length

    def __call__(self, record: dict) -> list[Pair]:
        return self.encode(record)[0]


# ----------------------------------------------------------------------------- rows


def pair_row(pairs: Sequence[Pair], max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One paired row: each LM key (:data:`jaxtune.data.packing.LM_KEYS`), :data:`PAIR_IDS` and
    :data:`MARGINS` (float32) shaped ``(2, max_length)``, ``[0]`` the chosen answers and ``[1]`` the
    rejected ones, pair ``s`` in segment ``s`` of both."""
    chosen = packing.lm_row([p["chosen"] for p in pairs], max_length, pad_id)
    rejected = packing.lm_row([p["rejected"] for p in pairs], max_length, pad_id)
    row = {k: np.stack([chosen[k], rejected[k]]) for k in packing.LM_KEYS}
    ids = np.asarray([0] + [p.get("index", -1) + 1 for p in pairs], np.int32)  # segment s -> its pair's id
    row[PAIR_IDS] = ids[row["segment_ids"]]
    margins = np.asarray([0.0] + [p.get("margin", 0.0) for p in pairs], np.float32)
    row[MARGINS] = margins[row["segment_ids"]]
    return row


def pair_rows(pairs: Sequence[Pair], max_length: int, pad_id: int = 0, *, pack: bool = True,
              max_pairs: int | None = None, fit: packing.Fit | None = None) -> list[dict[str, np.ndarray]]:
    """Paired rows for ``pairs``: first-fit packing by the longer side of each pair (at most
    ``max_pairs`` a row: the loss's ``preference.max_segments``), or ``fit``'s rows when given, or
    one pair per row (``pack=False``). Batching ``B`` rows gives the ``(B, 2, L)`` layout of
    :mod:`jaxtune.training.preference`."""
    if not pack:
        return [pair_row([p], max_length, pad_id) for p in pairs]
    lengths = [max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"])) for p in pairs]
    fit = fit or functools.partial(packing.first_fit, max_length=max_length, max_items=max_pairs)
    rows = fit(lengths)
    return [pair_row([pairs[i] for i in row], max_length, pad_id) for row in rows]
