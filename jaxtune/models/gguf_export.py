"""Write a Hugging Face decoder directory as one GGUF file that llama.cpp, Ollama and transformers load.

The inverse of :func:`jaxtune.models.gguf.gguf_to_hf` for the families both llama.cpp and transformers'
GGUF loader read as plain decoders (:data:`GGUF_EXPORT_ARCHITECTURES`: Llama, SmolLM2 included,
Mistral, Qwen2, Qwen3, GPT-2, Gemma 2, Gemma 3 text, Phi-3)::

    hf_to_gguf("out/merged", "out/model.gguf", dtype="float16")

:func:`write_gguf` does the same from tensors declared by name, shape and dtype and read when written
(:func:`jaxtune.models.hf.hf_tensors` of merged params in memory: ``jt.export(format="gguf")`` writes no
merged directory).

Tensors get llama.cpp's names from the ``gguf`` package's own tables (:func:`gguf.get_tensor_name_map`),
Llama's Q/K rows are permuted into llama.cpp's interleaved rotary layout (its ``llama`` kernel rotates
adjacent pairs; Qwen's kernels rotate HF's halves, so theirs stay), Llama 3.1/3.2's ``llama3`` RoPE
scaling becomes llama.cpp's per-frequency divisors (``rope_freqs.weight``; besides Gemma 3's linear scaling
and Phi-3's LongRoPE below, other scalings are refused),
and the model's sizes become llama.cpp's ``{arch}.*`` metadata keys (the config completed with its
transformers class's defaults, which ``config.json`` leaves out). The tokenizer (a byte-level BPE
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
llama.cpp nor Llama 2's. Gemma's ``tokenizer.json`` (a Replace normalizer alone) puts no "▁" before the
text: ``add_space_prefix`` false, as llama.cpp's converter writes Gemma. A file llama.cpp could not
tokenize as the model was trained (a Unigram tokenizer, another tokenizer model, or a pre-tokenizer it
has no name for) is refused before anything is written.

Norm gains and biases are stored float32 (llama.cpp keeps 1-D tensors so); the matrices in ``dtype``:
``float32``, ``float16``, ``bfloat16`` or ``q8_0`` (llama.cpp's 8-bit blocks of 32; a matrix whose rows
are not whole blocks stays float16, as llama.cpp's converter does). ``None`` keeps each tensor's own
float dtype. The tensors are declared first and then read, converted and written one at a time: memory
holds one tensor, not the model.

transformers' GGUF loader (5.x) ignores two things llama.cpp reads, as it does in llama.cpp's own
files: a Llama's attention biases and the ``rope_freqs`` factors; jaxtune's importer reads both.

Gemma 2/3 (llama.cpp's ``gemma2`` / ``gemma3``): the RMSNorm gains are stored ``w + 1`` (Gemma computes
``x * (1 + w)``, llama.cpp ``x * w``; in float32, as its converter adds it), with the sliding window, Gemma
2's two soft-caps, Gemma 3's final soft-cap and the linear RoPE scaling of its global layers. llama.cpp fixes
what the file does not say, so a model it would compute otherwise is refused, naming the setting: the
sliding layers (all but every 2nd / 6th from layer 0; for Gemma 2 a window no shorter than the context
is full attention, written as the context length; Gemma 3's layer types pick each layer's RoPE base too,
so they are the pattern's whatever the window), attention scaled by ``query_pre_attn_scalar ** -0.5`` other
than head_dim's (hidden / heads for the 27B layer counts), Gemma 3's local RoPE other than unscaled base
10000, Gemma 2 without either soft-cap or with an untied output, biases, exact GELU.

Phi-3 (llama.cpp's ``phi3``) keeps its fused ``qkv_proj`` / ``gate_up_proj`` (``attn_qkv``, ``ffn_up``),
its partial rotary (``rope.dimension_count``), original context length and window (0: none; llama.cpp
reads it and applies none, so a window shorter than the positions, Phi-3-mini-4k's, becomes the file's
context length as a Mistral's does, and with LongRoPE is refused), and its
LongRoPE as ``rope_factors_long`` / ``rope_factors_short`` tensors with the attention factor transformers
computes (``rope.scaling.attn_factor``). Which set applies, llama.cpp decides once per run by its context
size (the long one above the original context length, as at the file's default context), transformers per
input by its length: on an input longer than the original context both take the long one; on a shorter
input they agree when llama.cpp runs with a context no longer than the original (``-c``). transformers'
GGUF loader reads none of this (nor Gemma's scalar, soft-caps and local base): jaxtune's importer does.

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

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

from jaxtune.dtypes import GGUF_DTYPE_NAMES
from jaxtune.models.gguf_architectures import ARCHITECTURES, Arch, GGUFError
from jaxtune.models.hf import HFTensor

# HF architecture -> llama.cpp architecture. Whether Q/K rows are permuted, and which weights are transposed, is
# the importer's row of it (ARCHITECTURES[name].permute_qk, .transposed), which undoes them: the two cannot disagree.
# Mistral is llama.cpp's `llama` (its converter writes it so; jaxtune's importer reads it back as Llama, the
# same model without a sliding window: see _context_length).
GGUF_EXPORT_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                             "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2", "Gemma2ForCausalLM": "gemma2",
                             "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3"}
# The RoPE scalings llama.cpp computes for a family (on Gemma 3's global layers): Llama 3.1's per-frequency
# divisors, a linear position scale, Phi-3's LongRoPE ("su" is its older name); every family takes unscaled RoPE.
_ROPE_KINDS = {"LlamaForCausalLM": ("llama3",), "Gemma3ForCausalLM": ("linear",), "Phi3ForCausalLM": ("longrope", "su")}
# llama.cpp's sliding-window layers: all but every `period`-th one, counting from layer 0 (a constant of its gemma2
# and gemma3 code, not read from the file); the local layers' RoPE base, Gemma 3's 10000, is another.
_SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6}
# Families whose sliding window llama.cpp does not apply (see _context_length).
_WINDOW_IGNORED = ("MistralForCausalLM", "Phi3ForCausalLM")
_GEMMA3_LOCAL_BASE = 10000.0
# The layer counts of the 27B models, for which llama.cpp scales attention by (hidden / heads) ** -0.5 instead of
# head_dim ** -0.5; it infers the scale from the size (the importer's _GEMMA_27B_LAYERS reads the same).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GGUF_DTYPES = GGUF_DTYPE_NAMES
_GGML_TYPES = {"float32": GGMLQuantizationType.F32, "float16": GGMLQuantizationType.F16,
               "bfloat16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # else read as float32
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
    hf_config = _complete(hf_config)
    kind = _rope(hf_config).get("rope_type", "default")
    if kind != "default" and kind not in _ROPE_KINDS.get(arch, ()):
        raise GGUFError(f"{where}: RoPE scaling {kind!r} has no GGUF export here; unscaled RoPE is written, and "
                        "Llama 3.1/3.2's llama3 scaling, Gemma 3's linear one, Phi-3's longrope (export it merged and "
                        "convert that with llama.cpp's convert_hf_to_gguf.py)")
    if arch == "GPT2LMHeadModel":
        _check_gpt2(hf_config, where)
    elif arch.startswith("Gemma"):
        _check_gemma(hf_config, where, GGUF_EXPORT_ARCHITECTURES[arch])
    elif kind != "default" and _context_length(hf_config) < hf_config["max_position_embeddings"]:
        raise GGUFError(f"{where}: Phi-3 with LongRoPE and a sliding_window ({hf_config['sliding_window']}) shorter "
                        "than its max_position_embeddings has no GGUF export; llama.cpp's phi3 applies no window, "
                        "and a shorter context would change which LongRoPE factors it takes (export it merged instead)")
    return GGUF_EXPORT_ARCHITECTURES[arch]


def _complete(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` with every value its transformers config class fills in (``config.json`` leaves out
    the defaults: Gemma 2's soft-caps, its ``query_pre_attn_scalar``...), as the model runs it."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return hf_config
    complete = CONFIG_MAPPING[model_type].from_dict(hf_config).to_dict()
    return {**complete, "architectures": hf_config.get("architectures")}


def _check_gemma(config: dict[str, Any], where: str, arch: str) -> None:
    """What llama.cpp's gemma2 / gemma3 compute: tanh-GELU, no biases, attention scaled as its model sizes
    say (:data:`_GEMMA_27B_LAYERS`), Gemma 2's two soft-caps always and its output tied to the embedding,
    sliding-window layers in its fixed pattern (:func:`_sliding_window`), Gemma 3's local RoPE unscaled
    at base 10000."""
    name = "Gemma 2" if arch == "gemma2" else "Gemma 3"
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation not in ("gelu_pytorch_tanh", "gelu_new"):
        raise GGUFError(f"{where}: {name} hidden_activation {activation!r} has no GGUF export; llama.cpp computes "
                        "gelu_pytorch_tanh (export it merged instead)")
    if config.get("attention_bias"):
        raise GGUFError(f"{where}: {name} with attention_bias has no GGUF export; llama.cpp's {arch} has no "
                        "attention biases (export it merged instead)")
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    scalar = config["hidden_size"] // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim
    if config.get("query_pre_attn_scalar") != scalar:
        raise GGUFError(f"{where}: {name} query_pre_attn_scalar {config.get('query_pre_attn_scalar')} has no GGUF "
                        f"export; llama.cpp scales attention by {scalar} ** -0.5 for {layers} layers (head_dim, or "
                        "hidden_size / num_attention_heads for the 27B's layer count)")
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is None:
                raise GGUFError(f"{where}: Gemma 2 without {key} has no GGUF export; llama.cpp's gemma2 always "
                                "soft-caps (50 and 30 when the file says none); export it merged instead")
        if not config.get("tie_word_embeddings", True):
            raise GGUFError(f"{where}: Gemma 2 with tie_word_embeddings false has no GGUF export; llama.cpp's "
                            "gemma2 computes the logits with the embedding (export it merged instead)")
    else:
        local = _local_rope(config)
        if local.get("rope_type", "default") != "default" or float(local["rope_theta"]) != _GEMMA3_LOCAL_BASE:
            raise GGUFError(f"{where}: Gemma 3 sliding-window layers' RoPE {json.dumps(local)} has no GGUF export; "
                            "llama.cpp's gemma3 rotates them unscaled at base 10000 (rope_local_base_freq)")
    _sliding_window(config, arch, where)


def _sliding_window(config: dict[str, Any], arch: str, where: str = "model") -> int:
    """The window llama.cpp's gemma2 / gemma3 get: ``sliding_window`` when the layers that slide are the ones
    its fixed pattern makes slide (:data:`_SLIDING_PERIOD`), the context length when no window is shorter
    than the context (full attention everywhere, which a window that long is); else :class:`GGUFError`.
    Gemma 3's layer types also pick each layer's RoPE (local or global), so they must be the pattern's
    whatever the window."""
    layers, context, window = config["num_hidden_layers"], config["max_position_embeddings"], config["sliding_window"]
    period = _SLIDING_PERIOD[arch]
    types = config.get("layer_types") or ["sliding_attention" if (i + 1) % period else "full_attention"
                                          for i in range(layers)]
    binding = window is not None and window < context
    expected = [i % period < period - 1 for i in range(layers)]
    if (binding or arch == "gemma3") and [kind == "sliding_attention" for kind in types] != expected:
        raise GGUFError(f"{where}: layer_types {types} has no GGUF export; llama.cpp's {arch} slides every layer "
                        f"but each {period}th (sliding_attention at layers "
                        f"{[i for i, s in enumerate(expected) if s]})")
    return window if binding else context


def _rotary_dims(config: dict[str, Any]) -> int:
    """How many of each head's dims RoPE rotates (transformers' ``int(head_dim * partial_rotary_factor)``)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = _rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * partial)


def _original_context(config: dict[str, Any]) -> int:
    """Phi-3's pre-training context length, where LongRoPE's short factors end."""
    return _rope(config).get("original_max_position_embeddings") or config.get("original_max_position_embeddings")


def longrope_attention_factor(config: dict[str, Any]) -> float:
    """What LongRoPE scales cos/sin by, as transformers computes it: the config's ``attention_factor``, else
    ``sqrt(1 + ln(factor) / ln(original))`` for the extension ``factor`` (``max_position_embeddings /
    original_max_position_embeddings`` unless stated), 1 when it does not extend."""
    rope, original = _rope(config), _original_context(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


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
    """The config's RoPE parameters (transformers 5's ``rope_parameters``, older ``rope_scaling``); Gemma 3's
    global layers' (its ``full_attention`` entry), which are the file's ``rope.*`` keys."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    return rope


def _local_rope(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's sliding-window layers' RoPE parameters (``rope_parameters.sliding_attention``)."""
    rope = dict((hf_config.get("rope_parameters") or {}).get("sliding_attention")
                or {"rope_theta": hf_config.get("rope_local_base_freq", _GEMMA3_LOCAL_BASE)})
    rope.setdefault("rope_type", rope.get("type", "default"))
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
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    return write_gguf(_checkpoint_tensors(hf_dir), config, hf_dir, out_file, dtype, name=name or hf_dir.name,
                      where=str(hf_dir))


def write_gguf(tensors: list[HFTensor], hf_config: dict[str, Any], tokenizer_dir: str | os.PathLike[str],
               out_file: str | os.PathLike[str], dtype: str | None = None, *, name: str, where: str = "model") -> Path:
    """Write the HF decoder whose checkpoint tensors are ``tensors`` (:func:`jaxtune.models.hf.hf_tensors` of
    params in memory, or a directory's files), ``config.json`` dict ``hf_config`` and tokenizer in
    ``tokenizer_dir`` as the GGUF file ``out_file`` (see :func:`hf_to_gguf`); each tensor is read when the
    writer reaches it. ``where`` names the model in errors."""
    out_file = Path(out_file)
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF dtype {dtype!r} is not supported; use one of {', '.join(GGUF_DTYPES)}")
    config = _standard_names(_complete(hf_config))
    arch = check_architecture(config, where)
    vocabulary = _vocabulary(Path(tokenizer_dir), config["vocab_size"])
    declared = _tensors(tensors, config, arch, dtype, where)

    writer = gguf.GGUFWriter(out_file, arch)
    try:
        _write(writer, Path(tokenizer_dir), config, declared, dtype, vocabulary, name)
    finally:
        writer.close()
    return out_file


def _checkpoint_tensors(hf_dir: Path) -> list[HFTensor]:
    """The tensors of ``hf_dir``'s safetensors files, each read from its file when asked."""
    from safetensors import safe_open

    def read(path: Path, key: str) -> np.ndarray:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(key)

    out = []
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_slice(key)
                dtype = np.dtype(_SAFETENSORS_DTYPES.get(tensor.get_dtype(), "float32"))
                out.append(HFTensor(key, tuple(tensor.get_shape()), dtype, functools.partial(read, path, key)))
    return out


def _write(writer: gguf.GGUFWriter, tokenizer_dir: Path, config: dict[str, Any], tensors: list[_Tensor],
           dtype: str | None, vocabulary: _Vocabulary, name: str) -> None:
    """The metadata, then the tensor table, then each tensor's data (one in memory at a time)."""
    writer.add_name(name)
    _add_hparams(writer, config, ARCHITECTURES[writer.arch])
    writer.add_file_type(_file_type(tensors, dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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
    _special_vocab(tokenizer_dir, len(vocabulary.tokens), merges=vocabulary.model == "gpt2").add_to_gguf(
        writer, quiet=True)
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
    writer.add_rope_dimension_count(_rotary_dims(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if writer.arch in _SLIDING_PERIOD:
        _add_gemma_hparams(writer, config)
    elif writer.arch == "phi3":
        _add_phi3_hparams(writer, config)


def _add_gemma_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """Gemma 2/3's keys beyond the shared ones: the sliding window, the soft-caps (Gemma 3 computes no
    attention soft-cap, whatever its config says), Gemma 3's linear RoPE scaling of its global layers."""
    writer.add_sliding_window(_sliding_window(config, writer.arch))
    if writer.arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    rope = _rope(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _add_phi3_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """Phi-3's keys beyond the shared ones: its original context length, the sliding window (0: none, as
    llama.cpp's converter writes it; llama.cpp reads it and applies none: :func:`_context_length`), LongRoPE's
    attention factor (its factors are tensors: :func:`_tensors`)."""
    writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if _rope(config)["rope_type"] != "default":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))


def _context_length(config: dict[str, Any]) -> int:
    """The file's context length: ``max_position_embeddings``, or the shorter sliding window of a Mistral or
    a Phi-3, as llama.cpp attends to every earlier token there (its ``llama`` has no window; its ``phi3``
    reads the window and disables it) and the two differ only past the window."""
    window = config.get("sliding_window") if config["architectures"][0] in _WINDOW_IGNORED else None
    return min(config["max_position_embeddings"], window or config["max_position_embeddings"])


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its llama.cpp name and type, and where its values come from (``read``, a
    checkpoint tensor's, Q/K rows permuted for ``heads``, or transposed: GPT-2's Conv1D ``(in, out)``;
    or ``values`` computed from the config)."""

    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # as stored, llama.cpp's rows: (out, in)
    read: Callable[[], np.ndarray] | None = None
    heads: int | None = None
    values: np.ndarray | None = None
    transpose: bool = False
    shift: float = 0.0  # added (Gemma's RMSNorm gains: llama.cpp computes x * w where Gemma computes x * (1 + w))

    def stored(self) -> np.ndarray:
        """The bytes (as an array) llama.cpp reads: read now, one tensor at a time."""
        data = np.asarray(self.read() if self.values is None else self.values, np.float32)
        if self.heads is not None:
            data = permute_qk(data, self.heads)
        if self.transpose:
            data = data.T
        if self.shift:
            data = data + np.float32(self.shift)
        return np.ascontiguousarray(gguf.quants.quantize(data, self.kind))


def _tensors(tensors: list[HFTensor], config: dict[str, Any], arch: str, dtype: str | None,
             where: str) -> list[_Tensor]:
    """Every tensor of the file, its type decided and nothing read yet: the writer takes one at a time."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"]}
    permute, transposed = ARCHITECTURES[arch].permute_qk, ARCHITECTURES[arch].transposed
    out = [_Tensor(gguf.TENSOR_NAMES[part] + ".weight", GGMLQuantizationType.F32, values.shape, values=values)
           for part, values in _rope_tensors(config).items()]
    for tensor in tensors:
        if tensor.name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads a missing output.weight as the embedding
        if tensor.name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, which older checkpoints saved
        name = names.get_name(tensor.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{where}: tensor {tensor.name!r} has no llama.cpp {arch} name; "
                            f"this is not a plain {arch} model")
        part = name.split(".")[-2]
        transpose = part in transposed and name.endswith(".weight")
        shape = tensor.shape[::-1] if transpose else tensor.shape
        kind = _kind(shape, dtype or (tensor.dtype.name if tensor.dtype.name in _GGML_TYPES else "float32"))
        shift = ARCHITECTURES[arch].norm_shift if name.endswith("norm.weight") else 0.0
        out.append(_Tensor(name, kind, shape, tensor.read, heads[part] if permute and part in heads else None,
                           transpose=transpose, shift=shift))
    return out


def _rope_tensors(config: dict[str, Any]) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    """RoPE scaling llama.cpp reads as tensors: Llama 3.1's divisor per frequency (``rope_freqs``), Phi-3's
    LongRoPE factors (``rope_factors_long`` / ``_short``: which one a run takes, llama.cpp decides by its
    context size, transformers by each input's length)."""
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        return {gguf.MODEL_TENSOR.ROPE_FREQS: llama3_rope_factors(config)}
    if rope["rope_type"] in ("longrope", "su"):
        return {gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: np.asarray(rope["long_factor"], np.float32),
                gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: np.asarray(rope["short_factor"], np.float32)}
    return {}


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
    space_prefix: bool = False


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
        return _sentencepiece_vocabulary(spec, path, vocab_size, _space_prefix(spec, path))
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


def _sentencepiece_vocabulary(spec: dict[str, Any], path: Path, vocab_size: int, space_prefix: bool) -> _Vocabulary:
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
    return _Vocabulary("llama", tokens, types, pre="default", scores=scores, space_prefix=space_prefix)


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
