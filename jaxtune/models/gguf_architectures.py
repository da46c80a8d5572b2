"""llama.cpp's GGUF architectures as jaxtune reads them: one table, and how a file's metadata becomes a config.

Each llama.cpp architecture jaxtune reads is one row of :data:`ARCHITECTURES` (an :class:`Arch`):
its HF class, its tensor-name tables and how llama.cpp's converter (`convert_hf_to_gguf.py`) changed
the tensors on the way in, which the import undoes: the rotary row permutation of Q/K (llama only),
the `+ 1` it adds to Gemma's RMSNorm weights, the transpose of GPT-2's Conv1D weights, the stacking of
a mixture-of-experts layer's experts into one tensor (split back into HF's one tensor per expert). A family
added to jaxtune becomes readable from GGUF by adding its row (and its config function, which turns the
file's metadata into the transformers config's arguments: :func:`hf_config_of`).

The metadata reader (:class:`Metadata`) and :class:`GGUFError` live here too. This module converts no tensors:
:mod:`jaxtune.models.gguf` converts a file's tensors with it (dequantized), :mod:`jaxtune.models.gguf_quantized`
reads them as quantized leaves with the same name tables, and :mod:`jaxtune.models.hf` maps families to rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, ReaderTensor

# transformers is imported inside the function that needs it: importing this module (jaxtune.models.hf
# does, for the CLI's model list) should not cost the seconds its import takes.

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
# GPT-NeoX keeps its fused projection (attn_qkv, rows regrouped: Arch.regroup_qkv) and LayerNorms with biases.
_GPTNEOX_GLOBAL_NAMES = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
                         "output": "embed_out"}
_GPTNEOX_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                        "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                        "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}


@dataclass(frozen=True)
class Arch:
    """How llama.cpp writes one architecture, and what :func:`jaxtune.models.gguf.gguf_to_hf` makes of it.

    ``config`` turns the file's metadata into the transformers config's keyword arguments beyond
    the shared ones (:func:`hf_config_of`). The tensor changes llama.cpp's converter made, which the conversion undoes:
    ``permute_qk`` (its rotary row permutation of Q/K weights and biases: llama only, because its
    llama kernel rotates adjacent pairs while the other architectures' kernels use HF's halves),
    ``norm_shift`` (subtracted from every ``*norm.weight``: Gemma computes ``x * (1 + w)`` and
    llama.cpp stores ``w + 1``), ``transposed`` (block parts whose GGUF rows are the transpose of
    the HF tensor: GPT-2's Conv1D weights, which llama.cpp stores as ``(out, in)``), ``regroup_qkv`` (GPT-NeoX's
    fused ``attn_qkv`` rows (and bias), which its converter reorders from HF's per-head ``[heads, 3, head_dim]``
    into llama.cpp's ``[q | k | v]``).
    ``config_tensors``: tensors outside the blocks that are configuration, not weights (``rope_freqs``:
    Llama 3.1's per-frequency RoPE divisors; Phi-3's LongRoPE factors, which ``config`` reads).
    ``partial_rotary``: RoPE may rotate part of a head.
    ``experts``: block parts that stack every expert (split into one HF tensor per expert); ``row_vectors``:
    block parts that are ``(1, n)`` in HF and may be ``(n,)`` in the file (Qwen2-MoE's shared expert gate).
    """

    hf_architecture: str
    config_class: str  # the transformers config class that writes config.json
    config: Callable[[Metadata, str, dict[str, Any]], dict[str, Any]]
    blocks: dict[str, str] = field(default_factory=lambda: _BLOCK_NAMES)
    globals: dict[str, str] = field(default_factory=lambda: _GLOBAL_NAMES)
    block_prefix: str = "model.layers"
    permute_qk: bool = False
    norm_shift: float = 0.0
    transposed: tuple[str, ...] = ()
    regroup_qkv: bool = False
    rms_norm: bool = True  # else LayerNorm (its epsilon key differs)
    config_tensors: tuple[str, ...] = ("rope_freqs",)
    partial_rotary: bool = False
    experts: dict[str, str] = field(default_factory=dict)
    row_vectors: tuple[str, ...] = ()



class GGUFError(ValueError):
    """A GGUF file cannot be converted; the message names the file (and tensor or key) and the fix."""



_REQUIRED = object()


class Metadata:
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


def architecture_of(meta: Metadata) -> Arch:
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


def hf_config_of(meta: Metadata, reader: GGUFReader, arch: Arch) -> Any:
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
    if not arch.rms_norm:  # GPT-2 and GPT-NeoX name their sizes their own way
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


def _frequency_factors(meta: Metadata, tensor: ReaderTensor, fields: dict[str, Any]) -> dict[str, Any]:
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


def _llama_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    tensors = found["tensors"]
    return dict(attention_bias=found["attention_bias"],
                mlp_bias=any(n.endswith(("ffn_up.bias", "ffn_gate.bias", "ffn_down.bias")) for n in tensors))


def _smollm3_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp skips RoPE in every 4th layer of SmolLM3 (a constant there, not in the file), as
    # transformers' SmolLM3Config does from no_rope_layer_interval when no_rope_layers is not given.
    return {**_llama_extra(meta, name, found), "no_rope_layer_interval": 4}


def _moe_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
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


def _mixtral_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    # Mixtral's experts are feed_forward_length wide; llama.cpp renormalises its top-k weights, as Mixtral does.
    return dict(num_local_experts=meta.get(f"{name}.expert_count"),
                num_experts_per_tok=meta.get(f"{name}.expert_used_count"))


def _qwen2_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return {}  # Qwen2 always has q/k/v biases and never an o bias or MLP bias


def _attention_bias_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return dict(attention_bias=found["attention_bias"])


# The Gemma 2/3 layer counts for which llama.cpp scales attention by (hidden / heads) ** -0.5 instead of
# head_dim ** -0.5: the 27B models, whose query_pre_attn_scalar is hidden / heads (144 and 168). llama.cpp
# infers the scale from the model size, so the file does not carry it (unless a newer writer states
# `{arch}.attention.scale`).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
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
    # Gemma 3: its final soft-cap when the file states one (llama.cpp's gemma3 reads it; no attention soft-cap),
    # the global layers' RoPE from the file, the sliding layers' base 10000 unless stated.
    extra["final_logit_softcapping"] = meta.get(f"{name}.final_logit_softcapping", None)
    local = float(meta.get(f"{name}.rope.freq_base_swa", 10000.0))
    extra["rope_parameters"] = {"full_attention": found["rope_parameters"],
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return extra


def _gpt2_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    return dict(n_embd=found["hidden"], n_head=found["heads"], n_layer=meta.get(f"{name}.block_count"),
                n_inner=meta.get(f"{name}.feed_forward_length"), n_positions=meta.get(f"{name}.context_length"),
                layer_norm_epsilon=meta.get(f"{name}.attention.layer_norm_epsilon"))


def _gptneox_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX (Pythia): partial rotary (``rope.dimension_count``), the residual mode, and the activation
    llama.cpp's gptneox computes, GELU's tanh form (``gelu_new``), whatever the model was trained with:
    the file does not say, and this is the model llama.cpp runs."""
    head_dim = found["hidden"] // found["heads"]
    rope = _rope_parameters(meta, name)
    rope["partial_rotary_factor"] = meta.get(f"{name}.rope.dimension_count", head_dim) / head_dim
    return dict(hidden_size=found["hidden"], num_attention_heads=found["heads"],
                num_hidden_layers=meta.get(f"{name}.block_count"),
                intermediate_size=meta.get(f"{name}.feed_forward_length"),
                max_position_embeddings=meta.get(f"{name}.context_length"),
                layer_norm_eps=meta.get(f"{name}.attention.layer_norm_epsilon"),
                use_parallel_residual=bool(meta.get(f"{name}.use_parallel_residual", True)),
                rope_parameters=rope, hidden_act="gelu_new", attention_bias=True)


def _phi3_extra(meta: Metadata, name: str, found: dict[str, Any]) -> dict[str, Any]:
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
    "gptneox": Arch("GPTNeoXForCausalLM", "GPTNeoXConfig", _gptneox_extra, blocks=_GPTNEOX_BLOCK_NAMES,
                    globals=_GPTNEOX_GLOBAL_NAMES, block_prefix="gpt_neox.layers", regroup_qkv=True, rms_norm=False,
                    partial_rotary=True),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config", _phi3_extra, blocks=_PHI3_NAMES,
                 config_tensors=("rope_factors_long", "rope_factors_short", "rope_freqs"),
                 partial_rotary=True),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# llama.cpp writes Mixtral as `llama` with experts (`llama.expert_count`); architecture_of picks this row for
# such files.
LLAMA_MOE = Arch("MixtralForCausalLM", "MixtralConfig", _mixtral_extra, blocks=_MIXTRAL_NAMES,
                 experts=_MIXTRAL_EXPERTS, permute_qk=True)


def _rope_parameters(meta: Metadata, arch: str) -> dict[str, Any]:
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
