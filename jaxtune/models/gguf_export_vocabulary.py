"""A ``tokenizer.json`` as llama.cpp's vocabulary (``tokenizer.ggml.*``), for the GGUF export
(:mod:`jaxtune.models.gguf_export`).

The tokenizer (a byte-level BPE ``tokenizer.json``, as SmolLM2, Llama 3 and Qwen ship) is written as
``tokenizer.ggml.*``: its tokens by id, which are special (control) or added (user-defined), the merges, special
token ids and the chat template (``gguf.SpecialVocab``). A SentencePiece-style ``tokenizer.json`` (Llama 2,
TinyLlama, Mistral: BPE with byte fallback, spaces as "▁") is written as llama.cpp's ``llama`` vocabulary: no
merges but a score per token (minus the rank of the merge that makes it, which llama.cpp's SentencePiece merges
by), the ``<0xNN>`` tokens as BYTE, ``<unk>`` as UNKNOWN, and ``add_space_prefix``. llama.cpp then puts a "▁"
before the text and after every special token in it, as Llama 2's normalizer (Prepend "▁") does. A Metaspace
with ``prepend_scheme: "first"`` (Mistral's tokenizer.json) puts one only at the start and not before a space,
so text that starts with a space or follows a special token (``<s>[INST]``) gets one "▁" more in llama.cpp than
in the original. transformers' GGUF reader rebuilds that Metaspace: it agrees with Mistral's tokenizer there and
with neither llama.cpp nor Llama 2's (jaxtune's importer tokenizes as llama.cpp:
:mod:`jaxtune.models.gguf_tokenizer`). Gemma's ``tokenizer.json`` (a Replace normalizer alone) puts no "▁"
before the text: ``add_space_prefix`` false, as llama.cpp's converter writes Gemma. A file llama.cpp could not
tokenize as the model was trained (a Unigram tokenizer, another tokenizer model, or a pre-tokenizer it has no
name for) is refused before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from jaxtune.models.gguf_architectures import GGUFError

# llama.cpp's names for the byte-level pre-tokenizers it implements (`tokenizer.ggml.pre`), by the
# tokenizer.json pre-tokenizer that splits text the same way. Its converter names them by hashing
# the tokenizer's output on a test text; a directory's own pre-tokenizer says the same directly.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def check_tokenizer(tokenizer_dir: str | os.PathLike[str], vocab_size: int) -> None:
    """:class:`GGUFError` when ``tokenizer_dir``'s tokenizer has no GGUF form here (see
    :func:`jaxtune.models.gguf_export.hf_to_gguf`)."""
    read_vocabulary(Path(tokenizer_dir), vocab_size)


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as llama.cpp reads it: ``model`` ``"gpt2"`` (byte-level BPE, split by ``pre``) or
    ``"llama"`` (SentencePiece: merges by ``scores``, bytes as ``<0xNN>`` tokens, a space prefix)."""

    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    space_prefix: bool = False


def read_vocabulary(hf_dir: Path, vocab_size: int) -> Vocabulary:
    """The directory's tokenizer (byte-level BPE, or SentencePiece-style BPE with byte fallback) as
    llama.cpp reads it, padded with unused ``[PAD<id>]`` tokens to the model's ``vocab_size``."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{hf_dir}: no tokenizer.json; a GGUF carries its tokenizer (export from a model "
                        "loaded with its tokenizer)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocabulary(spec, path, vocab_size, _space_prefix(spec, path))
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise GGUFError(f"{path}: a {model.get('type')} tokenizer; the GGUF export writes byte-level BPE "
                        "(SmolLM2, Llama 3, Qwen) and SentencePiece-style BPE with byte fallback (Llama 2, "
                        "Mistral) tokenizers only")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), path)
    tokens, types = _padded(_tokens_by_id(spec, model), path, vocab_size)
    return Vocabulary("gpt2", tokens, types, pre=pre)


def add_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary, tokenizer_dir: Path) -> None:
    """Write ``vocabulary`` (:func:`read_vocabulary` of ``tokenizer_dir``) as ``writer``'s ``tokenizer.ggml.*``
    keys, with the special token ids, BOS/EOS flags and chat template of the tokenizer in ``tokenizer_dir``."""
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    # a byte-level BPE encodes the text's own spaces; SentencePiece puts a "▁" before the text (not Gemma's)
    writer.add_add_space_prefix(vocabulary.space_prefix)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    # llama.cpp's SentencePiece merges by the scores, not merges (its converter writes none for it)
    special_vocab(tokenizer_dir, len(vocabulary.tokens), merges=vocabulary.model == "gpt2").add_to_gguf(
        writer, quiet=True)


def _tokens_by_id(spec: dict[str, Any], model: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Each id's token and llama.cpp type: the model's (NORMAL), then the added ones over them
    (CONTROL when special, else USER_DEFINED)."""
    by_id: dict[int, tuple[str, int]] = {i: (tok, TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    return by_id


def _padded(by_id: dict[int, tuple[str, int]], path: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, types) for ids 0..vocab_size-1, ids the tokenizer lacks as UNUSED ``[PAD<id>]``."""
    if max(by_id) >= vocab_size:
        raise GGUFError(f"{path}: token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    entries = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    return [tok for tok, _ in entries], [int(kind) for _, kind in entries]


def _space_prefix(spec: dict[str, Any], path: Path) -> bool:
    """Whether SentencePiece puts a "▁" before the text (llama.cpp's ``add_space_prefix``): True for Llama 2's
    normalizer (Prepend + Replace) and Mistral's Metaspace pre-tokenizer without splitting, False for Gemma's
    normalizer (Replace alone; its pre-tokenizer, a split at " ", finds none left). Any other way the text
    could reach the model is :class:`GGUFError`: llama.cpp only replaces spaces by "▁", with or without one
    before the text."""
    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        return (part or {}).get(key, [part] if part else [])

    normalizer = steps(spec.get("normalizer"), "normalizers")
    pre = steps(spec.get("pre_tokenizer"), "pretokenizers")
    legacy = ([(s.get("type"), s.get("prepend") or s.get("content")) for s in normalizer]
              == [("Prepend", "▁"), ("Replace", "▁")] and not pre
              and normalizer[1].get("pattern", {}).get("String") == " ")
    metaspace = (not normalizer and len(pre) == 1 and pre[0].get("type") == "Metaspace"
                 and pre[0].get("replacement") == "▁" and pre[0].get("prepend_scheme", "always") != "never"
                 and not pre[0].get("split", True))
    gemma = ([(s.get("type"), s.get("content")) for s in normalizer] == [("Replace", "▁")]
             and normalizer[0].get("pattern", {}).get("String") == " "
             and all(s.get("type") == "Split" and s.get("pattern", {}).get("String") == " " for s in pre))
    if not (legacy or metaspace or gemma):
        raise GGUFError(f"{path}: a SentencePiece-style BPE whose normalizer {json.dumps(spec.get('normalizer'))[:80]} "
                        f"and pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]} are not SentencePiece's "
                        "(spaces as ▁, one ▁ prefixed or none, no split); llama.cpp would tokenize it differently")
    return not gemma


def _sentencepiece_vocabulary(spec: dict[str, Any], path: Path, vocab_size: int, space_prefix: bool) -> Vocabulary:
    """llama.cpp's SentencePiece vocabulary of a ``tokenizer.json`` BPE with byte fallback.

    llama.cpp merges the adjacent pair whose joined token has the highest score, where the BPE
    merges the pair of lowest rank: so a token's score is minus the rank of the merge that makes it
    (as SentencePiece's own BPE scores are its merge order). Tokens no merge makes (characters,
    ``<0xNN>`` bytes, special tokens) score 0, as in SentencePiece's files; llama.cpp never merges
    into a character, and special tokens are matched whole before merging."""
    model = spec["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    scores_by_token = {}
    for rank, (left, right) in enumerate(merges):
        scores_by_token.setdefault(left + right, -float(rank))
    by_id = _tokens_by_id(spec, model)
    unk = model.get("unk_token")
    for i, (tok, kind) in by_id.items():
        if tok == unk:  # special or not, llama.cpp's type for what byte fallback does not cover
            by_id[i] = (tok, TokenType.UNKNOWN)
        elif kind == TokenType.NORMAL and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            by_id[i] = (tok, TokenType.BYTE)
    tokens, types = _padded(by_id, path, vocab_size)
    scores = [scores_by_token.get(tok, 0.0) if kind == TokenType.NORMAL else 0.0 for tok, kind in zip(tokens, types)]
    # llama.cpp's converter names no pre-tokenizer for a SentencePiece vocabulary ("default"), which it ignores
    return Vocabulary("llama", tokens, types, pre="default", scores=scores, space_prefix=space_prefix)


def special_vocab(hf_dir: Path, n_vocab: int, merges: bool) -> gguf.SpecialVocab:
    """The merges, special token ids, whether a text gets BOS/EOS, and the chat template. ``gguf``'s
    reader of the files fills ids the tokenizer leaves unset from ``config.json`` (as llama.cpp's
    converter does); what the tokenizer itself says (as transformers loads it: a template saved as
    ``chat_template.jinja``, BOS/EOS by what it adds to a text) takes precedence."""
    from transformers import AutoTokenizer

    special = gguf.SpecialVocab(hf_dir, load_merges=merges, n_vocab=n_vocab)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: gguf writes "default" as the main one
        template = [{"name": name, "template": text} for name, text in template.items()]
    special.chat_template = template or special.chat_template
    return special


def _pre_tokenizer(pre: dict[str, Any] | None, path: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or :class:`GGUFError` for one it does not implement."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split; it refuses to load a file naming "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    regex = (steps[0].get("pattern") or {}).get("Regex") if kinds == ["Split", "ByteLevel"] else None
    if regex == r"\p{N}" and steps[1].get("use_regex", True):  # SmolLM's, as jaxtune's GGUF import writes it
        return "smollm"
    if regex in _SPLIT_PRE and not steps[1].get("use_regex", True):
        return _SPLIT_PRE[regex]
    raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp implements "
                    "(GPT-2's, SmolLM's, Llama 3's or Qwen2's split); a GGUF of it would tokenize differently")
