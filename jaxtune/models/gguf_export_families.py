"""What llama.cpp computes of each family the GGUF export writes (:mod:`jaxtune.models.gguf_export`), read from
an HF ``config.json``: the families and settings it runs as the model was trained (any other is refused before
writing, naming the setting), and the ``{arch}.*`` metadata keys and RoPE tensors it builds the model from (the
config completed with its transformers class's defaults, which ``config.json`` leaves out).

Llama 3.1/3.2's ``llama3`` RoPE scaling becomes llama.cpp's per-frequency divisors (``rope_freqs.weight``);
besides Gemma 3's linear scaling and Phi-3's LongRoPE below, other scalings are refused.

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

GPT-NeoX (llama.cpp's ``gptneox``): its fused ``query_key_value`` rows are regrouped from HF's per-head
``[heads, 3, head_dim]`` into ``[q | k | v]`` (weight and bias), as llama.cpp's converter does, with the
partial rotary (``rope.dimension_count``), the base (``rope.freq_base``, which the converter leaves out:
llama.cpp then assumes 10000) and ``use_parallel_residual``. llama.cpp needs the attention biases and an untied
output, and computes GELU's tanh form: a model without either is refused, an exact-GELU one (Pythia) written
with a warning.

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
import warnings
from typing import Any

import gguf
import numpy as np

from jaxtune.models.gguf_architectures import Arch, GGUFError

# HF architecture -> llama.cpp architecture. Whether Q/K rows are permuted, and which weights are transposed, is
# the importer's row of it (ARCHITECTURES[name].permute_qk, .transposed), which undoes them: the two cannot disagree.
# Mistral is llama.cpp's `llama` (its converter writes it so; jaxtune's importer reads it back as Llama, the
# same model without a sliding window: see _context_length).
GGUF_EXPORT_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                             "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2", "Gemma2ForCausalLM": "gemma2",
                             "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3", "GPTNeoXForCausalLM": "gptneox"}
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


def check_architecture(hf_config: dict[str, Any], where: str = "model") -> str:
    """llama.cpp's architecture name for an HF ``config.json`` dict; :class:`GGUFError` (one line,
    naming what is supported) for a family, or a RoPE scaling, this module does not write."""
    arch = (hf_config.get("architectures") or [None])[0]
    if arch not in GGUF_EXPORT_ARCHITECTURES:
        raise GGUFError(f"{where}: {arch} has no GGUF export; supported: {', '.join(GGUF_EXPORT_ARCHITECTURES)} "
                        "(export it merged and convert that with llama.cpp's convert_hf_to_gguf.py)")
    hf_config = complete_config(hf_config)
    kind = rope_parameters(hf_config).get("rope_type", "default")
    if kind != "default" and kind not in _ROPE_KINDS.get(arch, ()):
        raise GGUFError(f"{where}: RoPE scaling {kind!r} has no GGUF export here; unscaled RoPE is written, and "
                        "Llama 3.1/3.2's llama3 scaling, Gemma 3's linear one, Phi-3's longrope (export it merged and "
                        "convert that with llama.cpp's convert_hf_to_gguf.py)")
    if arch == "GPT2LMHeadModel":
        _check_gpt2(hf_config, where)
    elif arch == "GPTNeoXForCausalLM":
        _check_gptneox(hf_config, where)
    elif arch.startswith("Gemma"):
        _check_gemma(hf_config, where, GGUF_EXPORT_ARCHITECTURES[arch])
    elif kind != "default" and _context_length(hf_config) < hf_config["max_position_embeddings"]:
        raise GGUFError(f"{where}: Phi-3 with LongRoPE and a sliding_window ({hf_config['sliding_window']}) shorter "
                        "than its max_position_embeddings has no GGUF export; llama.cpp's phi3 applies no window, "
                        "and a shorter context would change which LongRoPE factors it takes (export it merged instead)")
    return GGUF_EXPORT_ARCHITECTURES[arch]


def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
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
    partial = rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * partial)


def _original_context(config: dict[str, Any]) -> int:
    """Phi-3's pre-training context length, where LongRoPE's short factors end."""
    return (rope_parameters(config).get("original_max_position_embeddings")
            or config.get("original_max_position_embeddings"))


def longrope_attention_factor(config: dict[str, Any]) -> float:
    """What LongRoPE scales cos/sin by, as transformers computes it: the config's ``attention_factor``, else
    ``sqrt(1 + ln(factor) / ln(original))`` for the extension ``factor`` (``max_position_embeddings /
    original_max_position_embeddings`` unless stated), 1 when it does not extend."""
    rope, original = rope_parameters(config), _original_context(config)
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


def _check_gptneox(hf_config: dict[str, Any], where: str) -> None:
    """llama.cpp's gptneox reads a bias on every projection and an output layer of its own (both required
    tensors), and computes GELU's tanh form: an exact-GELU model (Pythia) is written, as llama.cpp's
    converter writes it, with a warning that llama.cpp's logits differ from the model's by that approximation."""
    if not hf_config.get("attention_bias", True):
        raise GGUFError(f"{where}: GPT-NeoX with attention_bias false has no GGUF export; llama.cpp's gptneox "
                        "needs the attention biases (export it merged instead)")
    if hf_config.get("tie_word_embeddings"):
        raise GGUFError(f"{where}: GPT-NeoX with tie_word_embeddings has no GGUF export; llama.cpp's gptneox needs "
                        "its own output.weight (export it merged instead)")
    activation = hf_config.get("hidden_act", "gelu")
    if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise GGUFError(f"{where}: GPT-NeoX hidden_act {activation!r} has no GGUF export; llama.cpp's gptneox "
                        "computes GELU (export it merged instead)")
    if activation == "gelu":
        warnings.warn(f"{where}: GPT-NeoX hidden_act 'gelu' (exact) is written as llama.cpp's converter writes it, "
                      "but llama.cpp's gptneox computes GELU's tanh form (gelu_new), so its logits differ slightly "
                      "from this model's; jaxtune's GGUF import reads the file as gelu_new", stacklevel=3)


def standard_names(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` with the size names the Llama-like configs use, filled from GPT-2's own
    (``n_embd``..., as ``GPT2Config.attribute_map`` reads them; ``n_inner`` unset is 4 * ``n_embd``)."""
    if "n_embd" not in hf_config:
        return hf_config
    return {**hf_config, "hidden_size": hf_config["n_embd"], "num_hidden_layers": hf_config["n_layer"],
            "num_attention_heads": hf_config["n_head"], "max_position_embeddings": hf_config["n_positions"],
            "intermediate_size": hf_config.get("n_inner") or 4 * hf_config["n_embd"]}


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
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
    rope = rope_parameters(hf_config)
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


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], arch: Arch) -> None:
    """The sizes llama.cpp (and transformers' GGUF loader) build the model from."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = rope_parameters(config)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_vocab_size(config["vocab_size"])
    if writer.arch == "gptneox":  # LayerNorm, RoPE on part of each head, the residual mode
        writer.add_rope_dimension_count(_rotary_dims(config))
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_parallel_residual(bool(config.get("use_parallel_residual", True)))
        writer.add_layer_norm_eps(config["layer_norm_eps"])
        return
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
    rope = rope_parameters(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _add_phi3_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """Phi-3's keys beyond the shared ones: its original context length, the sliding window (0: none, as
    llama.cpp's converter writes it; llama.cpp reads it and applies none: :func:`_context_length`), LongRoPE's
    attention factor (its factors are tensors: :func:`rope_tensors`)."""
    writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope_parameters(config)["rope_type"] != "default":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))


def _context_length(config: dict[str, Any]) -> int:
    """The file's context length: ``max_position_embeddings``, or the shorter sliding window of a Mistral or
    a Phi-3, as llama.cpp attends to every earlier token there (its ``llama`` has no window; its ``phi3``
    reads the window and disables it) and the two differ only past the window."""
    window = config.get("sliding_window") if config["architectures"][0] in _WINDOW_IGNORED else None
    return min(config["max_position_embeddings"], window or config["max_position_embeddings"])


def rope_tensors(config: dict[str, Any]) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    """RoPE scaling llama.cpp reads as tensors: Llama 3.1's divisor per frequency (``rope_freqs``), Phi-3's
    LongRoPE factors (``rope_factors_long`` / ``_short``: which one a run takes, llama.cpp decides by its
    context size, transformers by each input's length)."""
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        return {gguf.MODEL_TENSOR.ROPE_FREQS: llama3_rope_factors(config)}
    if rope["rope_type"] in ("longrope", "su"):
        return {gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: np.asarray(rope["long_factor"], np.float32),
                gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: np.asarray(rope["short_factor"], np.float32)}
    return {}
