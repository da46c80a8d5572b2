"""GPT-NeoX (EleutherAI's Pythia, GPT-NeoX-20B and their fine-tunes): a pre-LayerNorm causal decoder with
a fused, per-head interleaved ``query_key_value`` projection, partial rotary positions and, by default,
a parallel residual.

:class:`GPTNeoX` is a :class:`~jaxtune.models.decoder.Decoder` with its own blocks (``block_class``) and
a LayerNorm as its final norm (``norm_class``), so the embeddings, the scanned layer stack, the output
layer, the KV cache, generation, chunked losses and prompt tuning are the decoder family's. Its own
parts, from transformers' ``modeling_gpt_neox``:

- ``attention/query_key_value`` ``(D, 3D)``: one projection whose output is laid out per head, ``[heads,
  3, head_dim]`` (q, k, v of head 0, then of head 1, ...), not ``[3, heads, head_dim]`` as GPT-2's
  ``c_attn``; the kernel is kept in that order, so checkpoints and PEFT adapters on it map one to one.
  Then RoPE on the first ``partial_rotary_factor`` of each head (``rotary_pct``, 0.25 by default),
  causal multi-head attention and ``dense``; both projections have biases unless ``attention_bias``
  is false.
- ``mlp``: ``dense_4h_to_h(act(dense_h_to_4h(x)))`` with biases; ``hidden_act`` as the encoders read it.
- The block: ``x + attn(ln_in(x)) + mlp(ln_post(x))`` with ``use_parallel_residual`` (the default:
  both branches read the block's input), else ``y = x + attn(ln_in(x)); y + mlp(ln_post(y))``.
  ``hidden_dropout`` drops the embeddings and each branch's output in training.
- LayerNorms with bias everywhere (``layer_norm_eps``); an untied output layer by default.

Param tree: the blocks keep HF's names (``layers_3/attention/query_key_value``, ``layers_3/input_layernorm``,
``layers_3/mlp/dense_h_to_4h``), so plans target ``query_key_value``/``dense``/``dense_h_to_4h``/
``dense_4h_to_h`` as PEFT users do on GPT-NeoX; the top level uses the decoder family's names
(``embed_tokens``, ``layers_i``, ``norm``, ``lm_head``), so the tuning layer's handling of embeddings,
blocks and output layers applies as it is. :func:`hf_module` maps them (``embed_tokens`` ->
``gpt_neox.embed_in``, ``norm`` -> ``gpt_neox.final_layer_norm``). The output layer is the module
``lm_head`` in transformers 5 but is stored as ``embed_out.weight`` (Pythia's checkpoints, and what
transformers' own ``save_pretrained`` writes): :func:`checkpoint_name` maps one to the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from jaxtune.models.decoder import Decoder, DecoderClassifier, DecoderConfig, renamed_hf_module
from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS
from jaxtune.models.kv_cache import LayerCache, rope_attend
from jaxtune.models.layers import (
    QUANTIZED_PARTS,
    Array,
    LayerNorm,
    PartitionRules,
    feed_forward,
    hf_architecture,
    partition_rules,
)
from jaxtune.models.rope import rope_inverse_frequencies, rope_parameters

ARCHITECTURES = ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")
MODEL_TYPES = {"gpt_neox": "GPTNeoXForCausalLM"}
# query_key_value is column-parallel: a tensor axis splits whole heads' [q, k, v] groups when it divides heads.
PARTITION_RULES: PartitionRules = partition_rules(column=("query_key_value", "dense_h_to_4h"),
                                                  row=("attention/dense", "dense_4h_to_h")) + (
    (rf"lm_head/kernel{QUANTIZED_PARTS}$", ("fsdp", "tensor")),)
# transformers' GPTNeoXConfig defaults for what a config.json may leave out.
_DEFAULT_ROTARY_PCT = 0.25
_DEFAULT_ROTARY_BASE = 10000.0


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(DecoderConfig):
    """:class:`DecoderConfig` with GPT-NeoX's own fields; ``rms_norm_eps`` holds ``layer_norm_eps`` (every
    LayerNorm's), ``qkv_bias``/``o_bias`` ``attention_bias``, ``num_kv_heads == num_heads``, and
    ``rope_scaling`` the rope dict (always kept: it carries ``partial_rotary_factor``)."""

    activation: str = "gelu"  # hidden_act
    dropout: float = 0.0  # hidden_dropout: on the embeddings and on each branch's output
    parallel_residual: bool = True  # use_parallel_residual

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> GPTNeoXConfig:
        """Build from a Hugging Face GPT-NeoX ``config.json`` dict (transformers v4 ``rotary_pct``/
        ``rotary_emb_base``/``rope_scaling`` or v5 ``rope_parameters``)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "GPT-NeoX")
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {act!r} is not supported by GPT-NeoX; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if d % heads:
            raise ValueError(f"config.json: hidden_size {d} is not a multiple of num_attention_heads {heads}")
        head_dim = d // heads
        # GPTNeoXConfig has no head_dim: its attention uses hidden / heads, but its RoPE would read a stray one.
        if hf.get("head_dim") not in (None, head_dim):
            raise ValueError(f"config.json: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads "
                             f"({head_dim}), which GPT-NeoX's attention uses; remove head_dim")
        # transformers' GPTNeoXConfig fills the v4 names into the rope dict, unless the dict sets them.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rotary_emb_base", _DEFAULT_ROTARY_BASE))
        rope.setdefault("partial_rotary_factor", hf.get("rotary_pct", _DEFAULT_ROTARY_PCT))
        rope = rope_parameters(hf, rope)
        theta = float(rope.pop("rope_theta"))
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("layer_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())),
            qkv_bias=bool(hf.get("attention_bias", True)),
            o_bias=bool(hf.get("attention_bias", True)),
            mlp_bias=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            activation=act,
            dropout=float(hf.get("hidden_dropout", 0.0)),
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
        )
        fields.update(overrides)
        cfg = cls(**fields)
        # A bad rope dict fails here, checked against the config built (overrides included).
        rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
        return cfg

    def layer_norm(self, name: str | None = None) -> LayerNorm:
        """A :class:`LayerNorm` with ``layer_norm_eps`` (held by ``rms_norm_eps``)."""
        return LayerNorm(self.rms_norm_eps, self.compute_dtype, self.param_dtype, name=name)


class GPTNeoXAttention(nn.Module):
    """``attention``: ``query_key_value`` ``(D, 3D)`` read as ``(heads, 3, head_dim)`` into q, k, v
    ``(B, T, N, H)``, partial RoPE on q and k, causal attention, ``dense``. With a ``cache`` returns
    ``(out, (k, v))``."""

    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg = self.cfg
        b, t, d = x.shape
        n, h = cfg.num_heads, cfg.head_dim
        qkv = cfg.linear(3 * n * h, "query_key_value", cfg.qkv_bias)(x, deterministic).reshape(b, t, n, 3, h)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        out, new_kv = rope_attend(self, cfg, q, k, v, positions, segment_ids, None, cache, deterministic)
        out = cfg.linear(d, "dense", cfg.o_bias)(out, deterministic)
        return out if cache is None else (out, new_kv)


class GPTNeoXMLP(nn.Module):
    """``mlp``: ``dense_4h_to_h(act(dense_h_to_4h(x)))``, both with biases."""

    cfg: GPTNeoXConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        return feed_forward(self.cfg, x, ("dense_h_to_4h", "dense_4h_to_h"), ACTIVATIONS[self.cfg.activation],
                            deterministic)


class GPTNeoXBlock(nn.Module):
    """``x + drop(attn(input_layernorm(x))) + drop(mlp(post_attention_layernorm(x)))`` (parallel residual),
    or the two residual steps one after the other; the decoder block's call signature (with a ``cache``
    returns ``(x, (k, v))``)."""

    cfg: GPTNeoXConfig
    window: int | None = None  # the decoder blocks' signature; GPT-NeoX attends to everything before

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg = self.cfg
        attn = GPTNeoXAttention(cfg, name="attention")(cfg.layer_norm("input_layernorm")(x), positions, segment_ids,
                                                       deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        attn = Dropout(cfg.dropout)(attn, deterministic=deterministic)
        mlp, post_norm = GPTNeoXMLP(cfg, name="mlp"), cfg.layer_norm("post_attention_layernorm")
        if cfg.parallel_residual:
            x = x + attn + Dropout(cfg.dropout)(mlp(post_norm(x), deterministic), deterministic=deterministic)
        else:
            x = x + attn
            x = x + Dropout(cfg.dropout)(mlp(post_norm(x), deterministic), deterministic=deterministic)
        return x if cache is None else (x, kv)


class GPTNeoX(Decoder):
    """``GPTNeoXForCausalLM``: :class:`~jaxtune.models.decoder.Decoder`'s interface with GPT-NeoX's blocks, a
    LayerNorm ``final_layer_norm`` and dropout on the embeddings (see the module docstring).
    ``__call__(input_ids (B, T), segment_ids, positions, deterministic)`` -> logits ``(B, T, vocab)``."""

    cfg: GPTNeoXConfig
    block_class: ClassVar[type[nn.Module]] = GPTNeoXBlock
    norm_class: ClassVar[type[nn.Module]] = LayerNorm

    def setup(self) -> None:
        super().setup()
        self.drop = Dropout(self.cfg.dropout)

    def _inputs(self, input_ids: Array | None, inputs_embeds: Array | None, positions: Array | None,
                deterministic: bool) -> tuple[Array, Array]:
        """The embeddings (or prompt tuning's ``inputs_embeds``) ``(B, T, D)`` after dropout, and the positions."""
        x, positions = super()._inputs(input_ids, inputs_embeds, positions, deterministic)
        return self.drop(x, deterministic=deterministic), positions


class GPTNeoXClassifier(DecoderClassifier):
    """``GPTNeoXForSequenceClassification``: the GPT-NeoX body and a bias-free ``score`` on the last real token."""

    cfg: GPTNeoXConfig
    body_class: ClassVar[type[Decoder]] = GPTNeoX


def hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a param path's modules: ``('layers_0', 'attention', 'query_key_value')`` ->
    ``'gpt_neox.layers.0.attention.query_key_value'``; ``lm_head`` and ``score`` sit beside ``gpt_neox``."""
    return renamed_hf_module(modules, "gpt_neox", "layers", {"embed_tokens": "embed_in", "norm": "final_layer_norm"})


def checkpoint_name(name: str) -> str:
    """The tensor name a GPT-NeoX checkpoint stores for module-named ``name``: the output layer, the module
    ``lm_head`` in transformers 5, is ``embed_out.weight`` on disk; every other name is its own."""
    return "embed_out." + name[len("lm_head."):] if name.startswith("lm_head.") else name
