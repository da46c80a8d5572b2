"""Tokenization with the model's Hugging Face tokenizer: ids, loss masks and truncation.

An *example* is a dict of 1-D numpy arrays for one record:

- LM kinds: ``input_ids`` int32 [n] and ``loss_mask`` bool [n], where ``loss_mask[i]`` says
  that token ``i`` is a supervised target (the model is trained to predict it from tokens
  ``< i``). Packing turns this into shifted ``targets`` / ``loss_weights``.
- labeled kinds: ``input_ids`` int32 [n], ``token_type_ids`` int32 [n] and ``label`` (int32
  or float32 scalar).

Chat conversations become text pieces, supervised or not, in :mod:`jaxtune.data.chat_turns` (the
tokenizer's own chat template locates each assistant turn). Each piece is tokenized on its own, as
at inference, where the prompt is tokenized before the reply is generated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxtune.data.chat_turns import chat_pieces
from jaxtune.data.source_types import KINDS, LM_KINDS, PREFERENCE, DataError, Source
from jaxtune.data.tokenizer_backend import backend

TRUNCATION = ("right", "left", "drop", "error", "split")
# Label breakdowns (drops per label) are reported only when the labels are a small set.
MAX_LABELS = 20

Example = dict[str, np.ndarray]


@dataclasses.dataclass
class TokenStats:
    """Counts over one pass of a source (see :func:`scan`)."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0
    largest_id: int = -1  # the largest token id of any example (checked against the model's vocabulary)
    largest_id_where: str | None = None  # the record that has it (``path:line`` where the source knows it)
    # the row space of each example (a pair's longer side), record after record, and where each record's
    # examples start (``starts[i]:starts[i + 1]``): what packing needs to count a pass's rows
    lengths: array = dataclasses.field(default_factory=lambda: array("i"), repr=False)
    starts: array = dataclasses.field(default_factory=lambda: array("q", [0]), repr=False)
    labels: Counter = dataclasses.field(default_factory=Counter)  # records per label (see record_label)
    dropped_labels: Counter = dataclasses.field(default_factory=Counter)  # dropped records per label
    # The most supervised tokens of one example (or pair side), and (supervised, length) of the example with
    # the largest supervised share: bounds on any row's supervised positions (Loader.answer_bound)
    most_supervised: int = 0
    densest: tuple[int, int] = (0, 1)

    def summary(self) -> str:
        supervised = f" ({self.target_tokens} supervised)" if self.target_tokens else ""
        text = (f"{self.records} records -> {self.examples} examples, {self.tokens} tokens{supervised}, "
                f"longest record {self.longest} tokens; {self.truncated} truncated, {self.split} split, "
                f"{self.dropped} dropped")
        return text + (f" ({self.drops_by_label()})" if self.dropped and self.drops_by_label() else "")

    def _informative(self) -> bool:
        return 1 < len(self.labels) <= MAX_LABELS

    def drops_by_label(self) -> str:
        """``"positive 12 of 40, negative 2 of 38"``; empty when the labels are not a small set."""
        if not self._informative():
            return ""
        return ", ".join(f"{label} {self.dropped_labels[label]} of {n}" for label, n in self.labels.most_common())

    def mix_change(self, threshold: float = 0.05) -> str:
        """How the drops moved the label shares, when some share moved by ``threshold`` or more
        (``"positive 50% -> 38%, negative 50% -> 62%"``); else empty."""
        kept = self.labels - self.dropped_labels
        total, left = sum(self.labels.values()), sum(kept.values())
        if not (self._informative() and self.dropped and total and left):
            return ""
        shares = {k: (n / total, kept[k] / left) for k, n in self.labels.most_common()}
        if max(abs(a - b) for a, b in shares.values()) < threshold:
            return ""
        return ", ".join(f"{k} {a:.0%} -> {b:.0%}" for k, (a, b) in shares.items())


# A SentencePiece-style tokenizer's word-start marker, which it writes in front of the text.
_SPACE = "\u2581"
_CONTINUATIONS: weakref.WeakKeyDictionary[Any, tuple[Tokenizer, bool, frozenset[int]] | None] = (
    weakref.WeakKeyDictionary())


def _without_prepend(component: dict | None) -> tuple[dict | None, str | None]:
    """A normalizer or pre-tokenizer (JSON) that no longer writes ``_SPACE`` in front of a text, and
    where the original wrote it: ``"first"`` (the text's start only), ``"always"`` (each stretch of
    text between special tokens), or None where it writes none."""
    if component is None:
        return None, None
    kind = component.get("type")
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in component else "pretokenizers"
        parts, scheme = [], None
        for part in component[key]:
            changed, found = _without_prepend(part)
            scheme = scheme or found
            if changed is not None:
                parts.append(changed)
        return {**component, key: parts}, scheme
    if kind == "Prepend" and component.get("prepend") == _SPACE:  # older Llama tokenizer.json files
        return None, "always"
    if kind == "Metaspace":
        if component.get("prepend_scheme", "always") in ("first", "always") and "add_prefix_space" not in component:
            return {**component, "prepend_scheme": "never"}, component.get("prepend_scheme", "always")
        if component.get("add_prefix_space"):
            return {**component, "add_prefix_space": False}, "always"
    return component, None


def _continuation(tokenizer: Any) -> tuple[Tokenizer, bool, frozenset[int]] | None:
    """For a tokenizer that writes ``_SPACE`` in front of a text (Llama 2, Mistral, Phi-3's
    SentencePiece vocabularies): a copy of :func:`backend` that does not, whether the original
    writes it after every special token too (``always``) or only at the text's start, and the ids of
    its added tokens (what starts a stretch); else None. Made once per tokenizer."""
    try:
        return _CONTINUATIONS[tokenizer]
    except KeyError:
        pass
    spec = json.loads(backend(tokenizer).to_str())
    normalizer, by_normalizer = _without_prepend(spec.get("normalizer"))
    pre_tokenizer, by_pre_tokenizer = _without_prepend(spec.get("pre_tokenizer"))
    scheme = by_normalizer or by_pre_tokenizer
    found = None
    if scheme is not None:
        copy = Tokenizer.from_str(json.dumps({**spec, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer}))
        found = (copy, scheme == "always", frozenset(backend(tokenizer).get_added_tokens_decoder()))
    _CONTINUATIONS[tokenizer] = found
    return found


def encode_pieces(tokenizer: Any, pieces: Sequence[str]) -> list[list[int]]:
    """Token ids of each piece of one text, without special tokens added by the tokenizer.

    Each piece is tokenized on its own (as at inference, where the prompt is tokenized before the
    reply is generated), but as a continuation of the pieces before it: a SentencePiece-style
    tokenizer writes its word-start marker where one call on the whole text would (at the text's
    start, and after a special token where it does so after each), not at every piece.
    """
    if not pieces:
        return []
    first = backend(tokenizer)
    continuation = _continuation(tokenizer)
    if continuation is None:
        return [e.ids for e in first.encode_batch(list(pieces), add_special_tokens=False)]
    rest, always, added = continuation
    out: list[list[int]] = []
    last: int | None = None  # the text's last token so far
    for piece in pieces:
        starts_stretch = last is None or (always and last in added)
        ids = (first if starts_stretch else rest).encode(piece, add_special_tokens=False).ids
        out.append(ids)
        last = ids[-1] if ids else last
    return out


def _example(id_pieces: Sequence[Sequence[int]], supervised: Sequence[bool]) -> Example:
    ids = np.fromiter((t for piece in id_pieces for t in piece), np.int32)
    mask = np.repeat(np.asarray(supervised, bool), [len(p) for p in id_pieces])
    return {"input_ids": ids, "loss_mask": mask}


def encode_chat(tokenizer: Any, messages: list[dict], weights: Sequence[int], where: str = "<chat>") -> Example:
    """Tokenize a conversation with the tokenizer's chat template; mask = weighted assistant turns."""
    pieces = chat_pieces(tokenizer, messages, weights, where)
    return _example(encode_pieces(tokenizer, [p for p, _ in pieces]), [s for _, s in pieces])


def special_ends(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text: ``([BOS], [])`` for Llama, ``([], [])``
    for SmolLM2, ``([CLS], [SEP])`` for BERT, ``([<s>], [</s>])`` for RoBERTa."""
    plain = backend(tokenizer).encode("a", add_special_tokens=False).ids
    full = backend(tokenizer).encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS for Llama; none for SmolLM2)."""
    return special_ends(tokenizer)[0]


def longest_first(lengths: list[int], room: int) -> list[int]:
    """How many tokens of one text, or of each of a pair, fit ``room``: the ``tokenizers`` library's
    ``LongestFirst`` truncation (what ``tokenizer(a, b, truncation=True)`` does), so a pair trains on
    the tokens transformers gives it at inference: the shorter text stays whole and the longer keeps
    what is left, unless that is less than the shorter; then each keeps half, the second the odd one
    (or the longer, when the first is longer)."""
    if len(lengths) == 1:
        return [min(lengths[0], room)]
    short, long = sorted(lengths)
    keep_long = short if short > room else max(short, room - short)
    keep_short = short
    if keep_short + keep_long > room:
        keep_short, keep_long = room // 2, room // 2 + room % 2
    kept = [keep_long, keep_short] if lengths[0] > lengths[1] else [keep_short, keep_long]
    return [min(n, k) for n, k in zip(lengths, kept)]


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` ending in ``eos`` once: a text that already ends with the EOS token (data prepared for
    an older recipe) gets no second one, as TRL's ``add_eos``; ``eos`` None adds nothing."""
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str, *, prefix: Sequence[int] = (),
                             eos: int | None = None) -> Example:
    """``prefix + prompt + completion + [eos]``; mask = completion and EOS."""
    ids = encode_pieces(tokenizer, [prompt, completion])
    return _example([list(prefix), ids[0], with_eos(ids[1], eos)], [False, False, True])


def encode_text(tokenizer: Any, text: str, *, prefix: Sequence[int] = (), eos: int | None = None) -> Example:
    """``prefix + text + [eos]``; every token after the prefix is a target."""
    ids = encode_pieces(tokenizer, [text])[0]
    return _example([list(prefix), with_eos(ids, eos)], [False, True])


def answer_tokens(tokenizer: Any, kind: str, answer: str) -> list[int]:
    """The supervised tokens of ``answer`` when it is a reply (``chat``: the assistant turn after a
    user turn, end-of-turn marker included; ``prompt_completion``: the completion), encoded exactly
    as training data is."""
    if kind == "chat":
        example = encode_chat(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}],
                              [0, 1], where=f"<answer {answer!r}>")
    elif kind == "prompt_completion":
        example = encode_prompt_completion(tokenizer, "?", answer)
    else:
        raise ValueError(f"answer choices need chat or prompt_completion data, not {kind!r}")
    ids = example["input_ids"][example["loss_mask"]]
    if not len(ids):
        raise ValueError(f"the answer {answer!r} encodes to no tokens")
    return [int(t) for t in ids]


def answer_first_token(tokenizer: Any, kind: str, answer: str) -> int:
    """The first supervised token of ``answer`` as a reply (see :func:`answer_tokens`)."""
    return answer_tokens(tokenizer, kind, answer)[0]


@dataclasses.dataclass(frozen=True)
class AnswerChoices:
    """How choice accuracy tells a fixed set of answers apart: each reply starts with ``prefix``,
    the tokens the chat template writes before any answer's content (Qwen3's empty think block;
    usually none), and then ``ids[c]`` for choice ``c``: the logits of ``ids`` at that position are
    compared."""

    prefix: tuple[int, ...]
    ids: tuple[int, ...]


def choice_token_ids(tokenizer: Any, kind: str, choices: Sequence[str]) -> AnswerChoices:
    """The tokens that tell the answers in ``choices`` apart as ``kind`` data encodes them (see
    :class:`AnswerChoices`); answers whose content begins with the same token are refused."""
    answers = [answer_tokens(tokenizer, kind, c) for c in choices]
    # The template's own opening: what every reply starts with before the content (the content
    # itself may begin with the same token for two choices, which is refused below, not skipped).
    opening = _template_opening(tokenizer, kind, answers)
    ids = tuple(a[len(opening)] if len(a) > len(opening) else -1 for a in answers)
    for i, a in enumerate(choices):
        for j in range(i):
            if ids[i] == ids[j]:
                name = tokenizer.convert_ids_to_tokens(ids[i]) if ids[i] >= 0 else "nothing"
                raise ValueError(f"eval.choices: {choices[j]!r} and {a!r} begin with the same token ({name!r}); "
                                 "choice accuracy compares first tokens, so use answers that begin differently")
    return AnswerChoices(tuple(opening), ids)


def _template_opening(tokenizer: Any, kind: str, answers: Sequence[Sequence[int]]) -> list[int]:
    """The tokens every one of ``answers`` starts with that a reply of other content starts with too:
    what the chat template writes before the content, not the content's own first tokens."""
    common = os.path.commonprefix([list(a) for a in answers])  # element-wise: any sequences, not only paths
    if not common or kind != "chat":
        return []
    probe = answer_tokens(tokenizer, kind, "\u2063")  # an invisible character no answer starts with
    return os.path.commonprefix([common, probe])


def truncate(example: Example, max_length: int, policy: str) -> tuple[list[Example], str]:
    """Apply the truncation policy to an LM example longer than ``max_length``.

    ``right`` keeps the first ``max_length`` tokens; ``left`` keeps the last answer whole and
    cuts the oldest tokens (the start of the prompt or conversation: system prompt, earlier
    turns, the start of the user turn), and drops the example when that answer alone does not
    fit; ``drop`` drops the example; ``error`` raises ``ValueError``; ``split`` cuts it into
    chunks that overlap by one token, so every target of the original is a target in exactly
    one chunk. Returns the examples and a status (``ok``, ``truncated``, ``dropped``, ``split``).
    """
    n = len(example["input_ids"])
    if n <= max_length:
        return [example], "ok"
    if policy == "error":
        raise ValueError(f"{n} tokens is longer than max_length={max_length}")
    if policy == "drop":
        return [], "dropped"
    if policy == "right":
        return [{k: v[:max_length] for k, v in example.items()}], "truncated"
    if policy == "left":
        targets = np.flatnonzero(example["loss_mask"])
        if not len(targets):
            return [{k: v[n - max_length:] for k, v in example.items()}], "truncated"
        gaps = np.flatnonzero(np.diff(targets) > 1)
        answer_start = int(targets[gaps[-1] + 1] if len(gaps) else targets[0])
        answer_end = int(targets[-1]) + 1
        # The token before the answer predicts its first token, so it stays in the window too.
        if answer_end - answer_start + 1 > max_length:
            return [], "dropped"
        start = min(n - max_length, answer_start - 1)
        return [{k: v[start:start + max_length] for k, v in example.items()}], "truncated"
    if policy == "split":
        starts = range(0, n - 1, max_length - 1)
        return [{k: v[s:s + max_length] for k, v in example.items()} for s in starts], "split"
    raise ValueError(f"truncation must be one of {TRUNCATION}, got {policy!r}")


class Tokenize:
    """Record → list of examples (usually one; none if dropped; several if split).

    A picklable callable for a grain ``map``; ``encode`` also returns the truncation status
    for :func:`scan`. ``kind`` is a source kind (:data:`jaxtune.data.source_types.KINDS`).
    """

    def __init__(self, tokenizer: Any, kind: str, max_length: int, *, truncation: str = "right",
                 add_eos: bool = True):
        if kind not in KINDS:
            raise ValueError(f"unknown data kind {kind!r}; use one of {KINDS}")
        if kind == PREFERENCE:
            raise ValueError("preference pairs become two rows per record: tokenize them with "
                             "jaxtune.data.preference.TokenizePairs (the Loader does)")
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        if truncation == "split" and kind != "text":
            raise ValueError("truncation='split' cuts documents into chunks: use it only for raw text")
        if truncation == "left" and kind not in ("chat", "prompt_completion"):
            raise ValueError(f"truncation='left' keeps a conversation's or prompt's answer and cuts what precedes it: "
                             f"use right, drop, error{' or split' if kind == 'text' else ''} for {kind} data")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.tokenizer: the tokenizer has no chat template, which chat data needs; give "
                             "model.tokenizer one that has (or set tokenizer.chat_template), or use "
                             "prompt_completion data")
        backend(tokenizer)  # fail here if it is not a fast tokenizer
        self.tokenizer, self.kind, self.max_length, self.truncation = tokenizer, kind, max_length, truncation
        self.prefix = special_prefix(tokenizer) if kind in ("prompt_completion", "text") else []
        self.eos = tokenizer.eos_token_id if add_eos and kind in ("prompt_completion", "text") else None
        if add_eos and kind in ("prompt_completion", "text") and self.eos is None:
            raise ValueError("the tokenizer has no EOS token; pass add_eos=False")

    def encode(self, record: dict) -> tuple[list[Example], str, int]:
        """Examples for ``record``, the truncation status, and the record's untruncated length."""
        where = record.get("where", "<record>")
        if self.kind not in LM_KINDS:
            return self._encode_labeled(record, where)
        if self.kind == "chat":
            example = encode_chat(self.tokenizer, record["messages"], record["weights"], where)
        elif self.kind == "prompt_completion":
            example = encode_prompt_completion(self.tokenizer, record["prompt"], record["completion"],
                                               prefix=self.prefix, eos=self.eos)
        else:
            example = encode_text(self.tokenizer, record["text"], prefix=self.prefix, eos=self.eos)
        length = len(example["input_ids"])
        try:
            examples, status = truncate(example, self.max_length, self.truncation)
        except ValueError as err:
            policies = "left (keeps the answer), right or drop" if self.kind != "text" else "right, drop or split"
            raise DataError(where, str(err), f"raise data.max_length, shorten the example, or set data.truncation to "
                                             f"{policies}") from None
        kept = [e for e in examples if e["loss_mask"][1:].any()]
        if len(kept) < len(examples):
            status = "dropped"  # truncation cut off every supervised token
        return kept, status, length

    def _encode_labeled(self, record: dict, where: str) -> tuple[list[Example], str, int]:
        tok = backend(self.tokenizer)
        pair = record.get("text_pair")
        parts = [tok.encode(t, add_special_tokens=False) for t in (record["text"], pair) if t is not None]
        room = self.max_length - tok.num_special_tokens_to_add(pair is not None)
        lengths = [len(p) for p in parts]
        length, status = sum(lengths) + self.max_length - room, "ok"
        if sum(lengths) > room:
            if self.truncation == "error":
                raise DataError(where, f"{length} tokens is longer than max_length={self.max_length}",
                                "raise data.max_length, shorten the text, or set data.truncation to right or drop")
            if self.truncation == "drop":
                return [], "dropped", length
            for part, n in zip(parts, longest_first(lengths, room)):
                part.truncate(n)
            status = "truncated"
        enc = tok.post_process(parts[0], parts[1] if len(parts) > 1 else None, add_special_tokens=True)
        label = np.asarray(record["label"], np.int32 if self.kind == "classification" else np.float32)
        return [{"input_ids": np.asarray(enc.ids, np.int32), "token_type_ids": np.asarray(enc.type_ids, np.int32),
                 "label": label}], status, length

    def __call__(self, record: dict) -> list[Example]:
        return self.encode(record)[0]


def record_label(record: dict, names: Sequence | None = None) -> str | None:
    """What a record's "label" is, for counting drops per label: a classification label's name,
    else the (last learned) answer of a chat or prompt/completion record; None for the others."""
    if "messages" in record:
        answers = [m["content"] for m, w in zip(record["messages"], record["weights"])
                   if w and m["role"] == "assistant"]
        return answers[-1].strip() if answers else None
    if "completion" in record:
        return record["completion"].strip()
    if names is not None and isinstance(record.get("label"), (int, np.integer)) and record["label"] >= 0:
        return str(names[record["label"]])
    return None


def scan(source: Source, tokenize: Tokenize) -> TokenStats:
    """Tokenize every record once and count what the truncation policy did.

    Run before training: it reports truncated/dropped counts and raises the first
    :class:`DataError` (e.g. a template failure, or an over-long example with
    ``truncation="error"``) before any compute starts. ``tokenize`` may also be a
    :class:`~jaxtune.data.preference.TokenizePairs`: a pair then counts the row space it takes
    (its longer side) in ``tokens`` and both answers in ``target_tokens``.
    """
    stats = TokenStats()
    names = getattr(source, "label_names", None)
    for i in range(len(source)):
        record = source[i]
        examples, status, length = tokenize.encode(record)
        label = record_label(record, names)
        if label is not None:
            stats.labels[label] += 1
            if status == "dropped":
                stats.dropped_labels[label] += 1
        stats.records += 1
        stats.examples += len(examples)
        stats.longest = max(stats.longest, length)
        if status != "ok":
            setattr(stats, status, getattr(stats, status) + 1)
        for example in examples:
            sides = [example["chosen"], example["rejected"]] if "chosen" in example else [example]
            # A pair's two sides share one paired row: the row space is the longer side.
            space = max(len(e["input_ids"]) for e in sides)
            stats.tokens += space
            stats.lengths.append(space)
            largest = max(int(np.max(e["input_ids"], initial=-1)) for e in sides)
            if largest > stats.largest_id:
                stats.largest_id, stats.largest_id_where = largest, record.get("where")
            for e in sides:
                if "loss_mask" in e:
                    supervised = int(e["loss_mask"][1:].sum())  # a row's loss weights: the mask shifted by one
                    stats.target_tokens += supervised
                    stats.most_supervised = max(stats.most_supervised, supervised)
                    most, length = stats.densest
                    if supervised * length > most * len(e["input_ids"]):
                        stats.densest = (supervised, len(e["input_ids"]))
        stats.starts.append(len(stats.lengths))
    return stats
