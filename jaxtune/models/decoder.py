"""Decoder-only language models: Llama, Mistral, Qwen2, Qwen3 and SmolLM3 in one family.

The five Hugging Face architectures differ only by switches in :class:`DecoderConfig`:

===================  ==============  ==============  ========  ======================  ==================
architecture         q/k/v bias      o bias          q/k norm  sliding window          RoPE
===================  ==============  ==============  ========  ======================  ==================
LlamaForCausalLM     attention_bias  attention_bias  no        no                      every layer
MistralForCausalLM   no              no              no        ``sliding_window``      every layer
Qwen2ForCausalLM     yes             no              no        per ``layer_types``     every layer
Qwen3ForCausalLM     attention_bias  attention_bias  per head  per ``layer_types``     every layer
SmolLM3ForCausalLM   attention_bias  attention_bias  no        per ``layer_types``     per ``no_rope_layers``
===================  ==============  ==============  ========  ======================  ==================

All share grouped-query attention, RoPE (default; ``linear``, ``llama3``, ``yarn``, ``dynamic`` scaling), RMSNorm,
a SwiGLU MLP and optionally tied input/output embeddings. SmolLM3 leaves RoPE out of some layers
("NoPE", by default every 4th): those layers' blocks get a config with ``rope=False``
(:meth:`DecoderConfig.layer_config`), and the scanned runs split where RoPE changes. OLMo 2
(:mod:`jaxtune.models.olmo2`) reuses this config (its q/k norm spans the whole projection,
``qk_norm="projection"``) with its own block.
Their ``*ForSequenceClassification`` checkpoints load as :class:`DecoderClassifier` (the same
body with HF's bias-free ``score`` on the last real token).

The parameter tree mirrors the HF names one to one (``model.layers.3.self_attn.q_proj.weight``
is ``params["layers_3"]["self_attn"]["q_proj"]["kernel"]``, transposed); :func:`hf_key` is the map.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models import stacking
from jaxtune.models.kv_cache import KVCache, LayerCache, rope_attend
from jaxtune.models.layers import (
    QUANTIZED_PARTS,
    Array,
    Embed,
    LinearBuilder,
    PartitionRules,
    RMSNorm,
    hf_architecture,
    partition_rules,
    pool,
    remat_block,
    shard_rows,
)
from jaxtune.models.rope import SUPPORTED_ROPE_TYPES, rope_parameters

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "SmolLM3ForCausalLM")
# Sequence classifiers: the same body (its switches are its causal-LM sibling's) with a ``score`` head.
CLASSIFIERS = {a.replace("ForCausalLM", "ForSequenceClassification"): a for a in ARCHITECTURES}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
MODEL_TYPES = _MODEL_TYPES
# Defaults of the transformers config classes for keys a config.json may leave out.
_TIED_BY_DEFAULT = ("SmolLM3ForCausalLM",)
# What each transformers config class assumes where config.json leaves a field out (else 1e4 and 1e-6).
DEFAULT_ROPE_THETA = {"SmolLM3ForCausalLM": 2_000_000.0, "MixtralForCausalLM": 1_000_000.0}
DEFAULT_RMS_NORM_EPS = {"Olmo2ForCausalLM": 1e-5, "MixtralForCausalLM": 1e-5}
# The MLPs that read ``mlp_bias``; the others build bias-free projections whatever config.json says.
_MLP_BIAS_ARCHS = ("LlamaForCausalLM", "SmolLM3ForCausalLM")
PARTITION_RULES: PartitionRules = partition_rules(
    column=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), row=("o_proj", "down_proj")
) + ((rf"lm_head/kernel{QUANTIZED_PARTS}$", ("fsdp", "tensor")),)


# The deepest stack that ``unroll_layers: auto`` unrolls (on CPU).
UNROLL_AUTO_LAYERS = 8


@dataclasses.dataclass(frozen=True)
class DecoderConfig(LinearBuilder):
    """Everything that shapes a decoder. Hashable, so it can sit on a linen module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool | str = False  # False, True / "head" (Qwen3: per head) or "projection" (OLMo 2: whole q/k)
    tie_word_embeddings: bool = False
    # False for a bare body checkpoint (``LlamaModel``, e5-mistral's ``MistralModel``): no output layer of its
    # own, so no logits unless tied; a head plan (jaxtune.tuning) trains it.
    lm_head: bool = True
    layer_windows: tuple[int | None, ...] = ()
    layer_rope: tuple[bool, ...] = ()  # whether each layer applies RoPE (SmolLM3's NoPE layers); () = every one
    rope: bool = True  # whether this block applies RoPE: set per layer from layer_rope by layer_config
    num_labels: int = 2  # DecoderClassifier only
    architecture: str = "LlamaForCausalLM"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # dtype of freshly initialised params
    remat: str = "none"  # a layers.REMAT_POLICIES name: none | block | dots | dots_no_batch | offload
    # The layer stack: scanned runs of layers (jaxtune.models.stacking), or one module per layer.
    scan_layers: bool = True
    # Whether the compiled program unrolls each scanned run (a copy of the block per layer, the params
    # still stacked) instead of looping over it; "auto" as :meth:`unrolls` says.
    unroll_layers: bool | str = "auto"
    layer_groups: tuple[int, ...] = ()  # run lengths; () = runs of equal attention window
    adapter_dropout: float = 0.0  # dropout on the input of LoRA/DoRA updates, set by tuning
    attention_dropout: float = 0.0  # on the attention probabilities in training (HF's attention_dropout)

    def __post_init__(self) -> None:
        self.layer_runs  # noqa: B018 - fail at the door on run lengths that do not fit the layers
        if self.unroll_layers not in (True, False, "auto"):
            raise ValueError(f"model.unroll_layers: expected true, false or auto, got {self.unroll_layers!r}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 layout)."""
        arch = hf_architecture(hf, ARCHITECTURES, _MODEL_TYPES, "a decoder jaxtune supports", CLASSIFIERS)
        attention_bias = bool(hf.get("attention_bias", False))
        fields = dict(
            common_fields(hf, arch),
            qkv_bias=arch == "Qwen2ForCausalLM" or (attention_bias and arch != "MistralForCausalLM"),
            o_bias=attention_bias and arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM",
            layer_windows=layer_windows(hf, arch),
            layer_rope=_layer_rope(hf) if arch == "SmolLM3ForCausalLM" else (),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def makes_logits(self) -> bool:
        """Whether the model has a vocabulary projection: its own ``lm_head`` or the tied embedding."""
        return self.tie_word_embeddings or self.lm_head

    def mlp_activation(self, x: Array) -> Array:
        """The gate's activation: silu (SwiGLU) in the Llama family."""
        return nn.silu(x)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        return self.layer_windows or (None,) * self.num_layers

    @property
    def layer_kinds(self) -> tuple[tuple[int | None, bool], ...]:
        """Each layer's static shape of attention, ``(window, rope)``: a scanned run holds one kind."""
        return tuple(zip(self.windows, self.layer_rope or (True,) * self.num_layers, strict=True))

    def layer_config(self, layer: int) -> DecoderConfig:
        """The config that layer ``layer``'s block is built with: this one, with ``rope=False`` on a NoPE layer."""
        return self if self.layer_kinds[layer][1] else dataclasses.replace(self, rope=False)

    def unrolls(self) -> bool:
        """Whether the scanned runs are unrolled in the compiled program (``unroll_layers``).

        A loop slices each layer's params out of the stack and writes its residuals into stacked
        buffers, copies that an unrolled program does without: on XLA:CPU its steps take 0.88-0.94x
        the loop's time (4 and 8 layers; 0.96x at SmolLM2's 30), while its compile time grows with
        depth (the loop's does not). ``"auto"`` unrolls models of up to :data:`UNROLL_AUTO_LAYERS`
        layers on a single CPU device; GPUs, TPUs and meshes keep the loop, whose large matmuls hide
        its copies and whose FSDP gathers stay one layer at a time.
        """
        if self.unroll_layers == "auto":
            return (self.num_layers <= UNROLL_AUTO_LAYERS and jax.default_backend() == "cpu"
                    and jax.device_count() == 1)
        return bool(self.unroll_layers)

    @property
    def layer_runs(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of each run of layers the model scans as one (see :mod:`jaxtune.models.stacking`)."""
        return stacking.layer_runs(self.num_layers, self.layer_groups, self.layer_kinds)


def common_fields(hf: dict[str, Any], arch: str, family: str = "the decoder family",
                  partial_rotary: bool = False) -> dict[str, Any]:
    """The :class:`DecoderConfig` fields that every Llama-style ``config.json`` states the same way
    (sizes, heads, RoPE, norm epsilon, tying, labels); a family adds its own switches. ``family`` names
    it in errors; ``partial_rotary``: its ``default`` RoPE reads ``partial_rotary_factor`` (Phi-3's
    does, Llama's does not), so the rope dict is kept when that rotates part of each head."""
    heads = hf["num_attention_heads"]
    # v5 writes rope_parameters (theta inside); v4 wrote rope_theta + rope_scaling.
    rope = rope_parameters(hf)  # with the config-level fields some scalings read
    theta = rope.pop("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA.get(arch, 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported by {family} (silu)")
    keep_rope = kind != "default" or (partial_rotary and float(rope.get("partial_rotary_factor", 1.0)) != 1.0)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS.get(arch, 1e-6)),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())) if keep_rope else None,
        mlp_bias=bool(hf.get("mlp_bias", False)) and arch in _MLP_BIAS_ARCHS,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch in _TIED_BY_DEFAULT)),
        num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
        architecture=arch,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )


def _layer_rope(hf: dict[str, Any]) -> tuple[bool, ...]:
    """SmolLM3's per-layer RoPE flags: ``no_rope_layers`` (1 = RoPE, 0 = NoPE), else NoPE on every
    ``no_rope_layer_interval``-th layer (transformers' default: every 4th)."""
    n = hf["num_hidden_layers"]
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval") or 4
        flags = [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) < n:
        raise ValueError(f"config.json: no_rope_layers has {len(flags)} entries for {n} layers; give one per layer")
    return tuple(bool(f) for f in flags[:n])


def layer_windows(hf: dict[str, Any], arch: str) -> tuple[int | None, ...]:
    """Per-layer sliding window (None = full attention), as each architecture declares it: its
    ``layer_types``, else the rule (and defaults) its transformers config class fills them in by."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if arch == "MistralForCausalLM":
        return (window,) * n
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "SmolLM3ForCausalLM") \
            or not (hf.get("use_sliding_window") and window):
        return (None,) * n
    types = hf.get("layer_types")
    if not types:
        last_full = hf.get("max_window_layers", 28)  # transformers' default for the Qwen configs
        if arch == "SmolLM3ForCausalLM":  # the NoPE layers slide
            slides = [not rope for rope in _layer_rope(hf)]
        elif arch == "Qwen2MoeForCausalLM":  # every other layer below max_window_layers
            slides = [bool((i + 1) % 2) and i < last_full for i in range(n)]
        else:
            slides = [i >= last_full for i in range(n)]
        types = ["sliding_attention" if s else "full_attention" for s in slides]
    return tuple(window if t == "sliding_attention" else None for t in types)


def project_heads(cfg: DecoderConfig, x: Array, deterministic: bool) -> tuple[Array, Array, Array]:
    """``q_proj``/``k_proj``/``v_proj`` of ``x`` ``(B, T, D)`` split into heads: q ``(B, T, N, H)``, k and v
    ``(B, T, K, H)``, with biases where ``cfg.qkv_bias`` says. Called from an attention module's compact
    ``__call__``, so the three projections are that module's children (``self_attn/q_proj``)."""
    b, t, _ = x.shape

    def heads(name: str, n: int) -> Array:
        return cfg.linear(n * cfg.head_dim, name, cfg.qkv_bias)(x, deterministic).reshape(b, t, n, cfg.head_dim)

    return heads("q_proj", cfg.num_heads), heads("k_proj", cfg.num_kv_heads), heads("v_proj", cfg.num_kv_heads)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's per-head q/k RMSNorm).

    With a ``cache`` the new keys/values are written at ``cache.index`` and the queries attend to
    the whole cache; the call then returns ``(out, (k, v))`` with the updated cache arrays.
    """

    cfg: DecoderConfig
    window: int | None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, t, _ = x.shape
        q, k, v = project_heads(cfg, x, deterministic)
        if cfg.qk_norm:
            # Per head (Qwen3: a (head_dim,) gain) or over the whole projection (OLMo 2: (heads * head_dim,)).
            # OLMo 2's norms also multiply their gain in float32 (RMSNorm.gain_in_float32).
            whole = cfg.qk_norm == "projection"
            q = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, gain_in_float32=whole, name="q_norm")(
                q.reshape(b, t, -1) if whole else q).reshape(q.shape)
            k = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, gain_in_float32=whole, name="k_norm")(
                k.reshape(b, t, -1) if whole else k).reshape(k.shape)
        out, kv = rope_attend(self, cfg, q, k, v, positions, segment_ids, self.window, cache, deterministic)
        out = cfg.linear(cfg.hidden_size, "o_proj", cfg.o_bias)(out, deterministic)
        return out if cache is None else (out, kv)


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; SwiGLU (``act`` = silu) for this family, GeGLU
    where a family's config says so (its ``mlp_activation``)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        gate = cfg.linear(cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x, deterministic)
        up = cfg.linear(cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x, deterministic)
        return cfg.linear(cfg.hidden_size, "down_proj", cfg.mlp_bias)(cfg.mlp_activation(gate) * up, deterministic)


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With a ``cache`` it returns ``(x, (k, v))``, the attention's updated cache arrays.
    """

    cfg: DecoderConfig
    window: int | None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="input_layernorm")(x)
        attn = Attention(cfg, self.window, name="self_attn")(h, positions, segment_ids, deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="post_attention_layernorm")(x)
        x = x + self.mlp(h, segment_ids, deterministic)
        return x if cache is None else (x, kv)

    def mlp(self, h: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        """The block's feed-forward part on the normed ``h`` ``(B, T, D)`` (a family's block swaps it)."""
        return MLP(self.cfg, name="mlp")(h, deterministic)


class LayerStep(nn.Module):
    """One layer of a scanned run, as ``nn.scan`` calls it: ``(x, positions, segment_ids, deterministic,
    index, start, kv) -> (x, kv')`` where ``kv`` is this layer's ``(k, v)`` cache slice or None.

    The block shares this module's scope, so a run's params are the block's params with a leading
    layer axis (``layers_0-31/self_attn/q_proj/kernel``), nothing in between.
    """

    cfg: DecoderConfig
    window: int | None
    block_class: Any

    def setup(self) -> None:
        self.block = remat_block(self.block_class, self.cfg.remat)(self.cfg, self.window)
        nn.share_scope(self, self.block)

    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool, index: Array | None,
        start: Array | None, kv: tuple[Array, Array] | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        x = shard_rows(x)  # rows stay split under a mesh, so FSDP gathers this layer's weights here
        if kv is None:
            return self.block(x, positions, segment_ids, deterministic), None
        return self.block(x, positions, None, deterministic, LayerCache(kv[0], kv[1], index, start))


# Auxiliary outputs a model may sow while training (flax ``sow``): values named AUX_LOSS anywhere in
# this collection are losses the train step adds to the task loss (jaxtune.training.losses.auxiliary_loss);
# anything else there is the model's own bookkeeping (e.g. the MoE router's statistics).
AUX, AUX_LOSS = "aux", "loss"


def scanned_run(cfg: DecoderConfig, block_class: type[nn.Module], start: int, stop: int) -> nn.Module:
    """Layers ``start..stop-1`` as one ``nn.scan`` over :class:`LayerStep` (params and sown :data:`AUX`
    values stacked on axis 0; dropout and init keys split per layer; the cache slices scanned, everything
    else broadcast), unrolled in the compiled program where :meth:`DecoderConfig.unrolls`."""
    scan = nn.scan(LayerStep, variable_axes={"params": 0, AUX: 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * 5 + (0,), length=stop - start, unroll=cfg.unrolls())
    return scan(cfg.layer_config(start), cfg.windows[start], block_class)


class Decoder(nn.Module):
    """A causal language model.

    ``__call__(input_ids (B,T) int32, segment_ids (B,T) int32 | None, positions (B,T) int32 | None)``
    (the calling convention every jaxtune model shares)
    returns logits ``(B, T, vocab)`` in the compute dtype. ``segment_ids`` confines attention to
    each packed document and masks padding (0); ``positions`` default to ``0..T-1``.
    :meth:`hidden` and :meth:`logits` split the same computation so a loss can chunk the vocab
    projection, and :meth:`hidden` accepts ``inputs_embeds`` for prompt tuning. :meth:`decode` is
    :meth:`hidden` with a :class:`KVCache`, for generation.

    With ``cfg.scan_layers`` (the default) each run of layers (``cfg.layer_runs``) is one scan over
    stacked params ``layers_a-b/...`` (the physical tree of :mod:`jaxtune.models.stacking`);
    otherwise each layer is its own module ``layers_i/...`` (the logical tree, HF's layout).
    """

    cfg: DecoderConfig
    # A family that differs only in its blocks and final norm (Gemma) overrides these two.
    block_class: ClassVar[type[nn.Module]] = DecoderBlock
    norm_class: ClassVar[type[nn.Module]] = RMSNorm

    def setup(self) -> None:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dt, cfg.param_dtype)
        self.layers = self._layer_modules()
        self.norm = self.norm_class(cfg.rms_norm_eps, dt, cfg.param_dtype)
        if not cfg.tie_word_embeddings and cfg.lm_head:
            self.lm_head = cfg.linear(cfg.vocab_size, bias=False)

    def _layer_modules(self) -> dict[str, nn.Module] | list[nn.Module]:
        """The blocks (``block_class``), for :meth:`_stack`: one scan per run of layers, or one module per layer."""
        cfg = self.cfg
        if cfg.scan_layers:  # a dict attribute names its modules layers_<key>: the physical keys
            return {stacking.stack_key(a, b)[len("layers_"):]: scanned_run(cfg, self.block_class, a, b)
                    for a, b in cfg.layer_runs}
        block = remat_block(self.block_class, cfg.remat)
        return [block(cfg.layer_config(i), w) for i, w in enumerate(cfg.windows)]

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings ``(B, T, D)``."""
        return self.embed_tokens(input_ids)

    def _stack(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool,
               cache: KVCache | None) -> tuple[Array, KVCache | None]:
        """Every layer in order, with or without a cache; returns the output and the updated cache."""
        ks, vs = [], []
        index, start = (None, None) if cache is None else (cache.index, cache.start)
        for r, (a, b) in enumerate(self.cfg.layer_runs):
            kv = None if cache is None else (cache.k[r], cache.v[r])
            if self.cfg.scan_layers:
                x, kv = self.layers[stacking.stack_key(a, b)[len("layers_"):]](
                    x, positions, segment_ids, deterministic, index, start, kv)
            else:
                outs = []
                for j, layer in enumerate(self.layers[a:b]):
                    x = shard_rows(x)
                    if kv is None:
                        x = layer(x, positions, segment_ids, deterministic)
                    else:
                        x, out = layer(x, positions, None, deterministic, LayerCache(kv[0][j], kv[1][j], index, start))
                        outs.append(out)
                kv = None if kv is None else (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        if cache is None:
            return x, None
        return x, KVCache(tuple(ks), tuple(vs), cache.index + x.shape[1], cache.start)

    def _inputs(self, input_ids: Array | None, inputs_embeds: Array | None, positions: Array | None,
                deterministic: bool) -> tuple[Array, Array]:
        """The first block's input ``(B, T, D)`` and the positions ``(B, T)`` (default ``0..T-1``); a
        family with learned positions (GPT-2) adds them here."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.cfg.compute_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        return x, positions

    def hidden(
        self,
        input_ids: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        inputs_embeds: Array | None = None,
    ) -> Array:
        """Final normed hidden states ``(B, T, D)``; give ``input_ids`` or ``inputs_embeds``."""
        x, positions = self._inputs(input_ids, inputs_embeds, positions, deterministic)
        x, _ = self._stack(x, positions, segment_ids, deterministic, None)
        return self.norm(x)

    def decode(
        self,
        input_ids: Array | None,
        positions: Array,
        cache: KVCache,
        inputs_embeds: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """:meth:`hidden` for ``T`` new tokens that continue the cached ones: prefill (the whole
        left-padded prompt into an empty cache) and each generation step (``T`` = 1) alike.

        Shapes: ``input_ids`` ``(B, T)`` int32 (or ``inputs_embeds`` ``(B, T, D)``), ``positions``
        ``(B, T)`` int32 (a real token's position counts from its row's ``cache.start``) ->
        final normed hidden states ``(B, T, D)`` (logits via :meth:`logits`) and the cache with
        the new keys/values written at ``cache.index`` and ``index`` advanced by ``T``.
        """
        x, positions = self._inputs(input_ids, inputs_embeds, positions, True)
        x, cache = self._stack(x, positions, None, True, cache)
        return self.norm(x), cache

    def logits(self, hidden: Array) -> Array:
        """Vocabulary logits ``(..., vocab)`` for hidden states ``(..., D)``."""
        check_makes_logits(self.cfg)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        return self.logits(self.hidden(input_ids, segment_ids, positions, deterministic))


def check_makes_logits(cfg: DecoderConfig) -> None:
    """Refuse vocabulary logits (generation, a language-model loss) of a bare body without an output layer."""
    if not cfg.makes_logits:
        raise ValueError(f"this checkpoint is the bare body of a {cfg.architecture}: it stores no lm_head and does "
                         "not tie one to its embedding, so it has no vocabulary logits to generate or train a language "
                         "model with; add a head rule (jaxtune.head('classification') or 'regression'), "
                         "or load a *ForCausalLM checkpoint")


class DecoderClassifier(nn.Module):
    """``*ForSequenceClassification``: the decoder body, then a bias-free ``score`` on the last real
    token, so checkpoints that transformers (or jaxtune's merged export) writes load as they are.

    The body's params sit at the root beside ``score`` (as HF's ``score`` sits beside ``model``), so
    the tree is the causal LM's with ``score`` in place of ``lm_head``. HF pools on the last token that
    is not ``pad_token_id``; here ``segment_ids`` (nonzero = real) say which tokens are real.
    ``__call__`` returns ``(B, num_labels)``.
    """

    cfg: DecoderConfig
    body_class: ClassVar[type[Decoder]] = Decoder  # a family with its own body (Gemma, OLMo 2) overrides it

    def setup(self) -> None:
        self.body = self.body_class(self.cfg)
        nn.share_scope(self, self.body)
        self.score = self.cfg.linear(self.cfg.num_labels, bias=False)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        hidden = self.body.hidden(input_ids, segment_ids, positions, deterministic)
        real = segment_ids if segment_ids is not None else jnp.ones(input_ids.shape, jnp.int32)
        return self.score(pool(hidden, real, "last"), deterministic)


def hf_module(modules: tuple[str, ...]) -> str:
    """The Hugging Face module name of a param path's modules, e.g. ``('layers_0', 'mlp', 'up_proj')``
    -> ``'model.layers.0.mlp.up_proj'``. Names map one to one, so the inverse is implied. The task
    heads ``lm_head`` and ``score`` (``*ForSequenceClassification``) sit beside ``model``, not in it."""
    name = ".".join("layers." + m[len("layers_"):] if m.startswith("layers_") else m for m in modules)
    return name if modules[0] in ("lm_head", "score") else "model." + name


def renamed_hf_module(modules: tuple[str, ...], root: str, layers: str, top: dict[str, str]) -> str:
    """:func:`hf_module` for a family whose HF names differ from the decoder's at the top level: the body
    under ``root`` (not ``model``), block ``i`` at ``{layers}.i``, ``top`` renaming the other top-level
    modules (``{"norm": "ln_f"}``); ``lm_head`` and ``score`` sit beside ``root``. E.g. GPT-2's
    ``('layers_0', 'attn', 'c_attn')`` -> ``'transformer.h.0.attn.c_attn'``."""
    if modules[0] in ("lm_head", "score"):
        return ".".join(modules)
    first = modules[0]
    first = f"{layers}." + first[len("layers_"):] if first.startswith("layers_") else top.get(first, first)
    return ".".join((root, first) + modules[1:])
