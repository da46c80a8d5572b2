"""Write a Hugging Face decoder directory as one GGUF file that llama.cpp, Ollama and transformers load.

The inverse of :func:`jaxtune.models.gguf.gguf_to_hf` for the families both llama.cpp and transformers'
GGUF loader read as plain decoders (:data:`GGUF_EXPORT_ARCHITECTURES`: Llama, SmolLM2 included,
Mistral, Qwen2, Qwen3, GPT-2)::

    hf_to_gguf("out/merged", "out/model.gguf", dtype="float16")

Tensors get llama.cpp's names from the ``gguf`` package's own tables (:func:`gguf.get_tensor_name_map`),
Llama's Q/K rows are permuted into llama.cpp's interleaved rotary layout (its ``llama`` kernel rotates
adjacent pairs; Qwen's kernels rotate HF's halves, so theirs stay), Llama 3.1/3.2's ``llama3`` RoPE
scaling becomes llama.cpp's per-frequency divisors (``rope_freqs.weight``; other scalings are refused),
and the model's sizes become llama.cpp's ``{arch}.*`` metadata keys. The tokenizer (a byte-level BPE
``tokenizer.json``, as SmolLM2, Llama 3 and Qwen ship) is written as ``tokenizer.ggml.*``: its tokens by
id, which are special (control) or added (user-defined), the merges, special token ids and the chat template
(``gguf.SpecialVocab``). A SentencePiece-style ``tokenizer.json`` (Llama 2, TinyLlama, Mistral: BPE with
byte fallback, spaces as "▁") is written as llama.cpp's ``llama`` vocabulary: no merges but a score per
token (minus the rank of the merge that makes it, which llama.cpp's SentencePiece merges by), the
``<0xNN>`` tokens as BYTE, ``<unk>`` as UNKNOWN, and ``add_space_prefix``. llama.cpp then puts a "▁"
before the text and after every special token in it, as Llama 2's normalizer (Prepend "▁") does. A
Metaspace with ``prepend_scheme: "first"`` (Mistral's tokenizer.json) puts one only at the start and
not before a space, so text that starts with a space or follows a special token (``<s>[INST]``) gets
one "▁" more in llama.cpp than in the original. transformers' GGUF reader (and jaxtune's importer,
built on it) rebuilds that Metaspace: it agrees with Mistral's tokenizer there and with neither
llama.cpp nor Llama 2's. A file llama.cpp could not tokenize as the model was
trained (a Unigram tokenizer as Gemma's and Phi-3's ``tokenizer.model``, another tokenizer model, or
a pre-tokenizer it has no name for) is refused before anything is written.

Norm gains and biases are stored float32 (llama.cpp keeps 1-D tensors so); the matrices in ``dtype``:
``float32``, ``float16``, ``bfloat16`` or ``q8_0`` (llama.cpp's 8-bit blocks of 32; a matrix whose rows
are not whole blocks stays float16, as llama.cpp's converter does). ``None`` keeps each tensor's own
float dtype. The tensors are declared first and then read, converted and written one at a time: memory
holds one tensor, not the model.

transformers' GGUF loader (5.x) ignores two things llama.cpp reads, as it does in llama.cpp's own
files: a Llama's attention biases and the ``rope_freqs`` factors; jaxtune's importer reads both.

A Mistral is written as llama.cpp's ``llama`` (as its converter does), which has no sliding window: a
Mistral whose ``sliding_window`` is shorter than its ``max_position_embeddings`` (Mistral 7B v0.1) gets
the window as its context length, the span over which full attention and the window agree.

GPT-2's Conv1D weights (``(in, out)``) are written transposed, as llama.cpp's rows. llama.cpp's ``gpt2``
computes GELU's tanh form and attention scaled by 1/sqrt(head_dim), so a GPT-2 config asking another
activation or scaling is refused. transformers' GGUF loader (5.x) builds a GPT-2 GGUF with 1024 positions
and a ``4 * n_embd`` MLP whatever the file says (it reads ``gpt2.context_length`` as ``n_ctx``); a GPT-2
of other sizes loads in llama.cpp and jaxtune's importer, which read them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

from jaxtune.dtypes import GGUF_DTYPE_NAMES
from jaxtune.models.gguf_architectures import ARCHITECTURES, Arch, GGUFError

# HF architecture -> llama.cpp architecture. Whether Q/K rows are permuted, and which weights are transposed, is
# the importer's row of it (ARCHITECTURES[name].permute_qk, .transposed), which undoes them: the two cannot disagree.
# Mistral is llama.cpp's `llama` (its converter writes it so; jaxtune's importer reads it back as Llama, the
# same model without a sliding window: see _context_length).
GGUF_EXPORT_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                             "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2"}
GGUF_DTYPES = GGUF_DTYPE_NAMES
_GGML_TYPES = {"float32": GGMLQuantizationType.F32, "float16": GGMLQuantizationType.F16,
               "bfloat16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FILE_TYPES = {"float32": LlamaFileType.ALL_F32, "float16": LlamaFileType.MOSTLY_F16,
               "bfloat16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}

# llama.cpp's names for the byte-level pre-tokenizers it implements (`tokenizer.ggml.pre`), by the
# tokenizer.json pre-tokenizer that splits text the same way. Its converter names them by hashing
# the tokenizer's output on a test text; a directory's own pre-tokenizer says the same directly.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def check_architecture(hf_config: dict[str, Any], where: str = "model") -> str:
    """llama.cpp's architecture name for an HF ``config.json`` dict; :class:`GGUFError` (one line,
    naming what is supported) for a family, or a RoPE scaling, this module does not write."""
    arch = (hf_config.get("architectures") or [None])[0]
    if arch not in GGUF_EXPORT_ARCHITECTURES:
        raise GGUFError(f"{where}: {arch} has no GGUF export; supported: {', '.join(GGUF_EXPORT_ARCHITECTURES)} "
                        "(export it merged and convert that with llama.cpp's convert_hf_to_gguf.py)")
    kind = _rope(hf_config).get("rope_type", "default")
    if kind != "default" and not (kind == "llama3" and arch == "LlamaForCausalLM"):
        raise GGUFError(f"{where}: RoPE scaling {kind!r} has no GGUF export here; unscaled RoPE is written, and "
                        "Llama 3.1/3.2's llama3 scaling (export it merged and convert that with llama.cpp's "
                        "convert_hf_to_gguf.py)")
    if arch == "GPT2LMHeadModel":
        _check_gpt2(hf_config, where)
    return GGUF_EXPORT_ARCHITECTURES[arch]


def _check_gpt2(hf_config: dict[str, Any], where: str) -> None:
    """llama.cpp's gpt2 is GPT-2 as released: tanh-approximated GELU, attention scaled by 1/sqrt(head_dim)."""
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GGUFError(f"{where}: GPT-2 activation_function {activation!r} has no GGUF export; llama.cpp's gpt2 "
                        "computes gelu_new (export it merged instead)")
    if not hf_config.get("scale_attn_weights", True) or hf_config.get("scale_attn_by_inverse_layer_idx"):
        raise GGUFError(f"{where}: GPT-2 attention scaled other than by 1/sqrt(head_dim) (scale_attn_weights, "
                        "scale_attn_by_inverse_layer_idx) has no GGUF export (export it merged instead)")


def _standard_names(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` with the size names the Llama-like configs use, filled from GPT-2's own
    (``n_embd``..., as ``GPT2Config.attribute_map`` reads them; ``n_inner`` unset is 4 * ``n_embd``)."""
    if "n_embd" not in hf_config:
        return hf_config
    return {**hf_config, "hidden_size": hf_config["n_embd"], "num_hidden_layers": hf_config["n_layer"],
            "num_attention_heads": hf_config["n_head"], "max_position_embeddings": hf_config["n_positions"],
            "intermediate_size": hf_config.get("n_inner") or 4 * hf_config["n_embd"]}


def _rope(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config's RoPE parameters (transformers 5's ``rope_parameters``, older ``rope_scaling``)."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    return rope


def llama3_rope_factors(hf_config: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.1/3.2's ``llama3`` RoPE scaling: per rotary frequency,
    the divisor that turns the unscaled frequency into the scaled one (1 for short wavelengths, ``factor``
    for long ones, a smooth blend between), as transformers computes the scaled frequencies."""
    rope = _rope(hf_config)
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelength = 2 * np.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    scaled = np.where(wavelength > old_context / low, inv_freq / factor,
                      np.where(wavelength < old_context / high, inv_freq,
                               (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return (inv_freq / scaled).astype(np.float32)


def check_tokenizer(tokenizer_dir: str | os.PathLike[str], vocab_size: int) -> None:
    """:class:`GGUFError` when ``tokenizer_dir``'s tokenizer has no GGUF form here (see :func:`hf_to_gguf`)."""
    _vocabulary(Path(tokenizer_dir), vocab_size)


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's "rotate half" rows of a Q or K projection (weight or bias) in llama.cpp's interleaved
    order; :func:`jaxtune.models.gguf.unpermute_qk` is the inverse."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_to_gguf(hf_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], dtype: str | None = None, *,
               name: str | None = None) -> Path:
    """Write the HF decoder directory ``hf_dir`` (``config.json``, safetensors weights, a fast
    tokenizer) as the GGUF file ``out_file`` (replaced if it exists); ``dtype`` of the matrices is
    one of :data:`GGUF_DTYPES` (``None``: each tensor's own); ``name`` is ``general.name`` (default:
    the directory's). Raises :class:`GGUFError` before writing when the family, RoPE or tokenizer
    has no GGUF form here."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    config = _standard_names(json.loads((hf_dir / "config.json").read_text()))
    arch = check_architecture(config, str(hf_dir))
    vocabulary = _vocabulary(hf_dir, config["vocab_size"])
    tensors = _tensors(hf_dir, config, arch, dtype)

    writer = gguf.GGUFWriter(out_file, arch)
    try:
        _write(writer, hf_dir, config, tensors, dtype, vocabulary, name or hf_dir.name)
    finally:
        writer.close()
    return out_file


def _write(writer: gguf.GGUFWriter, hf_dir: Path, config: dict[str, Any], tensors: list[_Tensor], dtype: str | None,
           vocabulary: _Vocabulary, name: str) -> None:
    """The metadata, then the tensor table, then each tensor's data (one in memory at a time)."""
    writer.add_name(name)
    _add_hparams(writer, config, ARCHITECTURES[writer.arch])
    writer.add_file_type(_file_type(tensors, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    # a byte-level BPE encodes the text's own spaces; SentencePiece puts a "▁" before the text
    writer.add_add_space_prefix(vocabulary.model == "llama")
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    # llama.cpp's SentencePiece merges by the scores, not merges (its converter writes none for it)
    _special_vocab(hf_dir, len(vocabulary.tokens), merges=vocabulary.model == "gpt2").add_to_gguf(writer, quiet=True)
    for tensor in tensors:
        _add_tensor_info(writer, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.stored())


def _add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], arch: Arch) -> None:
    """The sizes llama.cpp (and transformers' GGUF loader) build the model from."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = _rope(config)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_vocab_size(config["vocab_size"])
    if not arch.rms_norm:  # GPT-2: LayerNorm, learned positions
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def _context_length(config: dict[str, Any]) -> int:
    """The file's context length: ``max_position_embeddings``, or a Mistral's shorter sliding window, as
    llama.cpp's ``llama`` attends to every earlier token and the two differ only past the window."""
    window = config.get("sliding_window") if config["architectures"][0] == "MistralForCausalLM" else None
    return min(config["max_position_embeddings"], window or config["max_position_embeddings"])


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its llama.cpp name and type, and where its values come from (a key of a
    safetensors file, Q/K rows permuted for ``heads``, or transposed: GPT-2's Conv1D ``(in, out)``;
    or ``values`` computed from the config)."""

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored, llama.cpp's rows: (out, in)
    path: Path | None = None
    key: str = ""
    heads: int | None = None
    values: np.ndarray | None = None
    transpose: bool = False

    def stored(self) -> np.ndarray:
        """The bytes (as an array) llama.cpp reads: read now, one tensor at a time."""
        from safetensors import safe_open

        if self.values is None:
            with safe_open(str(self.path), framework="numpy") as f:
                data = np.asarray(f.get_tensor(self.key), np.float32)
        else:
            data = self.values
        if self.heads is not None:
            data = permute_qk(data, self.heads)
        if self.transpose:
            data = data.T
        return np.ascontiguousarray(gguf.quants.quantize(data, self.kind))


def _tensors(hf_dir: Path, config: dict[str, Any], arch: str, dtype: str | None) -> list[_Tensor]:
    """Every tensor of the file, its type decided and nothing read yet: the writer takes one at a time."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"]}
    permute, transposed = ARCHITECTURES[arch].permute_qk, ARCHITECTURES[arch].transposed
    out = []
    if _rope(config)["rope_type"] == "llama3":  # llama.cpp divides each frequency by its factor
        factors = llama3_rope_factors(config)
        out.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", GGMLQuantizationType.F32,
                           factors.shape, values=factors))
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reads a missing output.weight as the embedding
                if key.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # GPT-2's causal-mask buffers, which older checkpoints saved
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFError(f"{path}: tensor {key!r} has no llama.cpp {arch} name; "
                                    f"this directory is not a plain {arch} model")
                part = name.split(".")[-2]
                tensor = f.get_slice(key)
                transpose = part in transposed and name.endswith(".weight")
                shape = tuple(tensor.get_shape())[::-1] if transpose else tuple(tensor.get_shape())
                kind = _kind(shape, dtype or _SAFETENSORS_DTYPES.get(tensor.get_dtype(), "float32"))
                out.append(_Tensor(name, kind, shape, path, key, heads[part] if permute and part in heads else None,
                                   transpose=transpose))
    return out


def _kind(shape: tuple[int, ...], dtype: str) -> GGMLQuantizationType:
    """How llama.cpp stores a tensor of ``shape`` asked in ``dtype``: 1-D tensors float32; Q8_0 falls
    back to float16 for rows that are not whole 32-value blocks."""
    kind = _GGML_TYPES[dtype]
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if kind == GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return GGMLQuantizationType.F16
    return kind


def _add_tensor_info(writer: gguf.GGUFWriter, tensor: _Tensor) -> None:
    """Declare ``tensor`` (its stored byte layout, learned from one quantized row) before any data is written."""
    row = gguf.quants.quantize(np.zeros((1, tensor.shape[-1]), np.float32), tensor.kind)
    rows = math.prod(tensor.shape[:-1])
    writer.add_tensor_info(tensor.name, (*tensor.shape[:-1], row.shape[-1]), row.dtype, rows * row.nbytes,
                           raw_dtype=tensor.kind)


def _file_type(tensors: list[_Tensor], dtype: str | None) -> LlamaFileType:
    """``general.file_type``: the export's dtype, or the matrices' own (the most common one)."""
    if dtype is not None:
        return _FILE_TYPES[dtype]
    kinds = [t.kind for t in tensors if len(t.shape) > 1]
    by_kind = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}
    return _FILE_TYPES[by_kind.get(max(set(kinds), key=kinds.count), "float32")] if kinds else LlamaFileType.ALL_F32


@dataclass(frozen=True)
class _Vocabulary:
    """A tokenizer as llama.cpp reads it: ``model`` ``"gpt2"`` (byte-level BPE, split by ``pre``) or
    ``"llama"`` (SentencePiece: merges by ``scores``, bytes as ``<0xNN>`` tokens, a space prefix)."""

    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None


def _vocabulary(hf_dir: Path, vocab_size: int) -> _Vocabulary:
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
        _check_metaspace(spec, path)
        return _sentencepiece_vocabulary(spec, path, vocab_size)
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise GGUFError(f"{path}: a {model.get('type')} tokenizer; the GGUF export writes byte-level BPE "
                        "(SmolLM2, Llama 3, Qwen) and SentencePiece-style BPE with byte fallback (Llama 2, "
                        "Mistral) tokenizers only")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), path)
    tokens, types = _padded(_tokens_by_id(spec, model), path, vocab_size)
    return _Vocabulary("gpt2", tokens, types, pre=pre)


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


def _check_metaspace(spec: dict[str, Any], path: Path) -> None:
    """:class:`GGUFError` unless the text reaches the model as SentencePiece gives it: spaces as "▁" and one
    "▁" before the text (Llama 2's normalizer Prepend + Replace, or Mistral's Metaspace pre-tokenizer
    without splitting), which is llama.cpp's ``add_space_prefix``."""
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
    if not (legacy or metaspace):
        raise GGUFError(f"{path}: a SentencePiece-style BPE whose normalizer {json.dumps(spec.get('normalizer'))[:80]} "
                        f"and pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]} are not SentencePiece's "
                        "(spaces as ▁, one ▁ prefixed, no split); llama.cpp would tokenize it differently")


def _sentencepiece_vocabulary(spec: dict[str, Any], path: Path, vocab_size: int) -> _Vocabulary:
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
    return _Vocabulary("llama", tokens, types, scores=scores)


def _special_vocab(hf_dir: Path, n_vocab: int, merges: bool) -> gguf.SpecialVocab:
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
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    regex = (steps[0].get("pattern") or {}).get("Regex") if kinds == ["Split", "ByteLevel"] else None
    if regex == r"\p{N}" and steps[1].get("use_regex", True):  # SmolLM's, as jaxtune's GGUF import writes it
        return "smollm"
    if regex in _SPLIT_PRE and not steps[1].get("use_regex", True):
        return _SPLIT_PRE[regex]
    raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp implements "
                    "(GPT-2's, SmolLM's, Llama 3's or Qwen2's split); a GGUF of it would tokenize differently")
