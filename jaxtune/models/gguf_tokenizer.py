"""A GGUF file's vocabulary (``tokenizer.ggml.*``) as the ``tokenizer.json`` and ``tokenizer_config.json`` of
the directory :func:`jaxtune.models.gguf.gguf_to_hf` writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jaxtune.models.gguf_architectures import Metadata

logger = logging.getLogger(__name__)

# llama.cpp pre-tokenizers that transformers' GGUF tokenizer does not reproduce.
# "smollm": llama.cpp first isolates every number character, then applies the GPT-2 split
# (as SmolLM's own tokenizer.json: Digits(individual) + ByteLevel). transformers (5.23) falls
# back to the plain GPT-2 split, which differs on whitespace before digits ("  2").
_PRE_TOKENIZER_SPLITS = {"smollm": r"\p{N}"}
# Architectures transformers' GGUF loader does not read (5.25): AutoTokenizer refuses their files (it reads the
# model's config first: "GGUF model with architecture olmo2 is not supported yet"), while the generic fast tokenizer
# reads their vocabulary as any other.
_NOT_IN_TRANSFORMERS = ("gemma", "gptneox", "olmo2", "smollm3")
# tokenizer_config.json's special tokens and the `tokenizer.ggml.*` id keys naming them (as transformers' GGUF loader)
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def write_tokenizer(meta: Metadata, config: Any, out_dir: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` from the file's tokenizer metadata.

    The vocabulary, merges and special tokens are turned into a fast tokenizer by transformers'
    own GGUF support (no torch needed), fed the fields our reader has parsed already (:func:`transformers_tokenizer`);
    we fix the pre-tokenizer where llama.cpp's differs (and a SentencePiece vocabulary's spaces and added tokens:
    :func:`_as_llama_cpp_sentencepiece`) and write `tokenizer_config.json` ourselves so it carries the chat template
    and no load-time noise. ``config`` is the file's transformers config (its class picks the tokenizer class, as
    ``AutoTokenizer`` does; ``max_position_embeddings`` is the ``model_max_length``).
    """
    from tokenizers import Regex, pre_tokenizers

    tokenizer = transformers_tokenizer(meta, config)
    backend = tokenizer.backend_tokenizer
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", None))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if meta.get("tokenizer.ggml.model", None) == "llama":
        backend = _as_llama_cpp_sentencepiece(backend, meta)
    backend.save(str(out_dir / "tokenizer.json"))

    tokens = meta.reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}", None)
        return None if index is None else tokens.contents(index)

    settings: dict[str, Any] = {
        # the generic class loads tokenizer.json as written; a model class could rebuild the pipeline
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    }
    if "tokenizer.chat_template" in meta:
        settings["chat_template"] = meta.get("tokenizer.chat_template")
    settings = {k: v for k, v in settings.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def transformers_tokenizer(meta: Metadata, config: Any) -> Any:
    """What ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` builds from the file, without it reading the
    file again (transformers 5.25 parses it twice more, for the config and the vocabulary: tens of seconds each for
    a 262k-token vocabulary): transformers' ``convert_gguf_tokenizer`` on :func:`tokenizer_fields`, in the tokenizer
    class ``AutoTokenizer`` picks for ``config``'s class.

    Those functions are not documented API: where a transformers lacks them or changed their signature or output,
    this logs one warning and lets transformers read the file itself (:func:`_read_by_transformers`: the same
    tokenizer, built the slow way).
    """
    try:
        from transformers import TokenizersBackend
        from transformers.integrations.gguf import convert_gguf_tokenizer
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

        architecture, tokenizer_dict, tokenizer_config = tokenizer_fields(meta)
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        # AutoTokenizer refuses the files of _NOT_IN_TRANSFORMERS; the generic class reads their vocabulary
        cls = None if architecture in _NOT_IN_TRANSFORMERS else TOKENIZER_MAPPING.get(type(config), None)
        return (cls or TokenizersBackend)(tokenizer_object=backend, **tokenizer_config)
    except (ImportError, AttributeError, TypeError, KeyError) as err:
        logger.warning("%s: transformers' GGUF tokenizer functions are not usable here (%s: %s), so the fast path "
                       "is unavailable: transformers reads the file again", meta.path, type(err).__name__, err)
    return _read_by_transformers(meta)


def _read_by_transformers(meta: Metadata) -> Any:
    """The file's tokenizer as transformers' public GGUF loading builds it (``AutoTokenizer``; the generic fast
    class for :data:`_NOT_IN_TRANSFORMERS`), parsing the file itself."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loader = PreTrainedTokenizerFast if meta.get("general.architecture") in _NOT_IN_TRANSFORMERS else AutoTokenizer
    return loader.from_pretrained(str(meta.path.parent), gguf_file=meta.path.name)


def tokenizer_fields(meta: Metadata) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """transformers' ``get_gguf_tokenizer(path)`` (``architecture, tokenizer_dict, tokenizer_config``) from the fields
    our reader has parsed; ``gguf``'s ``contents()`` gives the values transformers' own reader does.

    ``get_gguf_tokenizer`` reads the file itself, so its few lines are repeated here. It, ``convert_gguf_tokenizer``
    and ``GGUF_TOKENIZER_MAPPING`` are not documented API: tests/test_gguf_export.py checks this and
    :func:`transformers_tokenizer` against them and ``AutoTokenizer`` on every family it exports, so a transformers
    that changes or moves them fails there loudly.
    """
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    fields = meta.reader.fields
    grouped = {group: {name: fields[f"tokenizer.{key}"].contents() for key, name in renames.items()
                       if f"tokenizer.{key}" in fields}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS unless the file says otherwise
    elif tokenizer.get("tokenizer_type") == "gemma4":
        tokenizer_config["add_bos_token"] = False  # transformers follows the reference: the chat template writes it
    for name, key in _SPECIAL_TOKENS.items():
        index = meta.get(f"tokenizer.ggml.{key}", None)
        tokenizer_config[name] = None if index is None else tokenizer["tokens"][index]
    return meta.get("general.architecture"), tokenizer, tokenizer_config


def _as_llama_cpp_sentencepiece(backend: Any, meta: Metadata) -> Any:
    """transformers' tokenizer of a ``llama`` (SentencePiece) vocabulary, made to tokenize as llama.cpp does.

    llama.cpp puts a "▁" before the text and after every special or added token in it (``add_space_prefix``,
    true unless the file says otherwise) and turns spaces into "▁": Llama 2's normalizer, which transformers
    rebuilds only for Phi-3 (a Llama's gets Mistral's Metaspace, no "▁" after ``<s>`` nor before a leading
    space). And it matches the added (USER_DEFINED) tokens whole in the text, longest first: Gemma's runs of
    spaces among them, which transformers re-spells "▁▁" and leaves to the merges (they then pair up a run of
    32 spaces 16 + 16 where llama.cpp takes 31 + 1); they get back their spelling and are added tokens again.
    """
    from gguf import TokenType
    from tokenizers import Tokenizer, decoders, normalizers

    spec = json.loads(backend.to_str())
    model = spec["model"]
    file_tokens = meta.reader.fields["tokenizer.ggml.tokens"].contents()
    types = meta.get("tokenizer.ggml.token_type", [])
    spelled = {i: token for token, i in model["vocab"].items()}
    respelled = {spelled[i]: token for i, (token, kind) in enumerate(zip(file_tokens, types))
                 if kind == TokenType.USER_DEFINED and spelled.get(i, token) != token}
    if respelled:
        model["vocab"] = {respelled.get(token, token): i for token, i in model["vocab"].items()}
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        model["merges"] = [list(pair) for pair in pairs if not {*pair, "".join(pair)} & set(respelled)]
        spec["added_tokens"] = [*spec.get("added_tokens", []), *(
            {"id": model["vocab"][token], "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False} for token in respelled.values())]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if prefix else []),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer
