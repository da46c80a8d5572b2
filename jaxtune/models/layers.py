"""Building blocks shared by the model families: linear (with optional adapter leaves),
norms, soft-capping, block rematerialisation, rotary embeddings, attention masks, attention
(with an optional score scale and soft-cap) and pooling.

Every block is a Flax linen module or a pure function, so a model is a pure function of a
parameter pytree. Parameter leaf names follow one rule that the checkpoint I/O relies on:
``kernel`` is a transposed PyTorch ``Linear.weight`` (stored ``(in, out)``), ``embedding`` is an
``Embedding.weight``, ``scale`` is a norm's ``weight`` and ``bias`` is a ``bias``.

A :class:`Linear` also reads the optional adapter leaves that ``jaxtune.tuning`` adds next to its
``kernel``: ``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)``, ``lora_scale`` ``()`` and, for DoRA,
``magnitude`` ``(out,)``. The arithmetic lives here because it is part of evaluating the layer;
creating, labelling, merging and exporting adapters is the tuning layer's job.

A frozen ``kernel`` or ``embedding`` may be a :class:`jaxtune.models.quant.QuantizedArray`
(QLoRA); :class:`Linear` and :class:`Embed` read it through :mod:`jaxtune.models.quant`, which
dequantizes inside the matmul or the row gather.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models import quant

Array = jax.Array
Dtype = Any

# The adapter leaves a Linear reads when present: defined here once, because evaluating them is
# part of the layer; jaxtune.tuning creates, labels, merges and exports them by these names.
LORA_A, LORA_B, LORA_SCALE, MAGNITUDE = "lora_a", "lora_b", "lora_scale", "magnitude"
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_SCALE, MAGNITUDE)

# PyTorch's default Linear/Embedding initialisations are irrelevant for pretrained weights;
# these only matter for freshly added layers and random test models.
default_kernel_init = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
    """``y = x @ kernel + bias`` computed in ``dtype``, plus a LoRA/DoRA update when the
    adapter leaves are present in this module's params.

    Shapes: ``x`` ``(..., in)`` -> ``(..., features)``.
    """

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    adapter_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        kernel = _param(self, "kernel", (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        # Matmuls on (tokens, features): XLA:CPU runs rank-3 dots with a small contraction (the
        # LoRA factors) about 2x slower than the same work flattened; GPUs do not care.
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        y = quant.dot(x, kernel, self.dtype)
        if self.has_variable("params", LORA_A):
            y = y + self._adapter_delta(x, kernel, y, deterministic)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y.reshape(*lead, self.features)

    def _adapter_delta(self, x: Array, kernel: Array, base: Array, deterministic: bool) -> Array:
        """The adapter's additive contribution to ``x @ kernel`` (before the bias)."""
        a = self.get_variable("params", LORA_A).astype(self.dtype)
        b = self.get_variable("params", LORA_B).astype(self.dtype)
        scale = self.get_variable("params", LORA_SCALE).astype(self.dtype)
        dropped = self.adapter_dropout > 0.0 and not deterministic
        if dropped:
            x = nn.Dropout(self.adapter_dropout, deterministic=False)(x)
        low_rank = ((x @ a) @ b) * scale
        if not self.has_variable("params", MAGNITUDE):
            return low_rank
        if dropped:  # PEFT's DoRA rescales the base output of the *dropped* input when dropout is active
            base = quant.dot(x, kernel, self.dtype)
        # DoRA (Liu et al. 2024), as PEFT computes it: the column norm of the adapted weight is
        # treated as a constant in the backward pass, and without dropout the base output is
        # rescaled rather than recomputed, so the update costs one extra norm and no second matmul.
        magnitude = self.get_variable("params", MAGNITUDE).astype(jnp.float32)
        adapted = (quant.as_float(kernel, jnp.float32)
                   + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale.astype(jnp.float32))
        norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
        ratio = (magnitude / norm).astype(self.dtype)
        return base * (ratio - 1) + low_rank * ratio


def _param(module: nn.Module, name: str, shape: tuple[int, ...]) -> Any:
    """``module.param(name, ...)``, except that a quantized weight is read as it is: flax's own
    check would compare the shape of its codes (4-bit codes are packed two per byte) with ``shape``."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if quant.is_quantized(value):
            return value
    return module.param(name, default_kernel_init, shape, module.param_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama-family checkpoints expect.

    Shapes: ``x`` ``(..., d)`` -> same shape, in ``dtype``.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with ``scale``/``bias``, statistics in float32 (BERT-style, ``eps`` 1e-12)."""

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table ``(num_embeddings, features)``; ``attend`` gives tied-output logits."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = _param(self, "embedding", (self.num_embeddings, self.features))

    def __call__(self, ids: Array) -> Array:
        return quant.take(self.embedding, ids, self.dtype)

    def attend(self, x: Array) -> Array:
        lead = x.shape[:-1]
        out = quant.dot(x.reshape(-1, x.shape[-1]), self.embedding, self.dtype, transpose=True)
        return out.reshape(*lead, self.num_embeddings)


def softcap(x: Array, cap: float | None) -> Array:
    """Soft-capping ``cap * tanh(x / cap)`` (Gemma 2's attention scores and final logits): smooth,
    and bounded to ``(-cap, cap)``. ``cap`` None returns ``x`` unchanged; shape and dtype are kept."""
    if cap is None:
        return x
    return (jnp.tanh(x / cap) * cap).astype(x.dtype)


REMAT_POLICIES = ("none", "block", "dots", "dots_no_batch", "offload")


def remat_policy(policy: str) -> Any:
    """The ``jax.checkpoint`` policy of a ``remat`` name (None for ``block``: save nothing but the
    block's input). ``dots`` saves every matmul output; ``dots_no_batch`` only those without batch
    dimensions (the projections, not attention's batched score and value products); ``offload``
    saves the same matmul outputs as ``dots_no_batch`` in pinned host memory and copies them back
    for the backward pass (GPU/TPU; the CPU backend's device memory is host memory already)."""
    policies = {
        "block": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }
    if policy not in policies:
        raise ValueError(f"remat {policy!r} is not a policy; choose one of {', '.join(REMAT_POLICIES)}")
    return policies[policy]


def remat_block(block: type[nn.Module], policy: str) -> type[nn.Module]:
    """``block`` (a transformer block called ``(x, positions, segment_ids, deterministic, cache)``)
    wrapped for rematerialisation with :func:`remat_policy` (``none`` keeps every activation for
    the backward pass and returns ``block`` itself). Under a scanned layer stack the wrapped block
    is the scan's body, so the policy applies per layer. ``deterministic`` is static."""
    if policy == "none":
        return block
    return nn.remat(block, static_argnums=(4,), policy=remat_policy(policy))


# ----------------------------------------------------------------------------- sharding

PartitionRules = tuple[tuple[str, tuple[str | None, ...]], ...]
# The path suffix of a QuantizedArray's components below its leaf (``kernel/.codes``,
# ``kernel/.scale/.codes``), for partition patterns that should also place quantized weights.
QUANTIZED_PARTS = r"(/\.\w+)*"


def partition_rules(column: tuple[str, ...], row: tuple[str, ...]) -> PartitionRules:
    """Megatron-style placement of a family's linears on a ``(data, fsdp, tensor)`` mesh.

    ``column`` names the projections whose outputs split over ``tensor`` (q/k/v, MLP up), ``row``
    those whose inputs do (attention output, MLP down); the other dimension is sharded over
    ``fsdp``. LoRA factors follow their kernel, so an adapted matmul needs no extra gather.
    Patterns are searched in the ``/``-joined param path; the first match wins.
    """
    col, rw = "|".join(column), "|".join(row)
    # A quantized kernel's components (codes, scales: same rank, same axes) follow the kernel.
    return (
        (rf"({col})/kernel{QUANTIZED_PARTS}$", ("fsdp", "tensor")),
        (rf"({rw})/kernel{QUANTIZED_PARTS}$", ("tensor", "fsdp")),
        (rf"({col})/{LORA_A}$", ("fsdp", None)),
        (rf"({col})/{LORA_B}$", (None, "tensor")),
        (rf"({rw})/{LORA_A}$", ("tensor", None)),
        (rf"({rw})/{LORA_B}$", (None, "fsdp")),
    )


# The mesh axes that split a batch's rows: plain and fully sharded data parallelism.
BATCH_AXES = ("data", "fsdp")


def shard_rows(x: Array) -> Array:
    """``x`` ``(B, ...)`` constrained to rows split over :data:`BATCH_AXES` of the mesh the step is
    traced under (``jax.sharding.use_abstract_mesh``, which the train step sets), else unchanged.

    Applied to each layer's input, it keeps activations data-parallel, so XLA gathers a layer's
    FSDP-sharded weights where the layer runs (inside the layer scan: one layer at a time)
    instead of moving activations between devices, which its cost model prefers at small widths.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x  # rows that do not split evenly stay where XLA puts them
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


# ----------------------------------------------------------------------------- rotary embeddings

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Array:
    """Inverse frequencies ``(head_dim // 2,)`` float32 for RoPE, with HF's scaling types.

    ``scaling`` is the HF ``rope_parameters`` / ``rope_scaling`` dict (or None). The ``linear``
    type divides every frequency by ``factor``; ``llama3`` divides only the low frequencies and
    interpolates smoothly between, exactly as ``transformers.modeling_rope_utils`` does.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported RoPE type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate ``x`` ``(B, T, heads, head_dim)`` by ``positions`` ``(B, T)`` int (HF's half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, head_dim/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def attention_mask(segment_ids: Array | None, *, causal: bool, window: int | None = None) -> Array | None:
    """Boolean mask ``(B, 1, T, T)``: True where a query may attend to a key.

    ``segment_ids`` ``(B, T)`` int: tokens attend only within their own segment (packed
    documents), and segment 0 marks padding, which no query attends to. ``window`` restricts a
    query to itself and the ``window - 1`` keys before it (sliding-window attention). Returns None
    when there are no segment ids: plain causality and windows then go to the attention kernel as
    flags, which lets cuDNN skip the masked blocks instead of reading a dense mask.
    """
    if segment_ids is None:
        return None
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = mask & (segment_ids[:, None, None, :] != 0)
    t = segment_ids.shape[1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    if causal:
        mask = mask & (k <= q)[None, None]
    if window is not None:
        mask = mask & (q - k < window)[None, None]
    return mask


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array | None, *, causal: bool, window: int | None = None,
    scale: float | None = None, logit_cap: float | None = None,
) -> Array:
    """Multi-head attention with grouped-query heads.

    Shapes: ``q`` ``(B, T, N, H)``, ``k``/``v`` ``(B, S, K, H)`` with ``N % K == 0`` (GQA),
    ``mask`` broadcastable to ``(B, 1, T, S)`` or None -> ``(B, T, N, H)``. Scores are
    ``q . k * scale`` (default ``H ** -0.5``), soft-capped by ``logit_cap`` (:func:`softcap`)
    before masking when given.

    On GPU/TPU this is ``jax.nn.dot_product_attention`` (cuDNN flash attention where it
    applies). On CPU it is :func:`grouped_attention`: XLA:CPU runs the rank-5 batched dots of
    the generic path about 2x slower, forward and backward, than the same work as rank-3 dots.
    Soft-capped attention is :func:`grouped_attention` everywhere, because
    ``jax.nn.dot_product_attention`` has no logit soft-capping.
    """
    if jax.default_backend() == "cpu" or logit_cap is not None:
        if mask is None and (causal or window is not None):
            mask = attention_mask(jnp.ones((1, q.shape[1]), jnp.int32), causal=causal, window=window)
        return grouped_attention(q, k, v, mask, scale=scale, logit_cap=logit_cap)
    if mask is None:
        local = (window - 1, 0) if window is not None else None
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=local)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def grouped_attention(q: Array, k: Array, v: Array, mask: Array | None, *, scale: float | None = None,
                      logit_cap: float | None = None) -> Array:
    """Softmax attention as two rank-3 batched matmuls over ``B*K`` (batch x KV head) groups.

    The ``G = N / K`` query heads that share a KV head are stacked along the query axis, so
    keys and values are never repeated. Scores and softmax are float32 (whatever the input
    dtype); masked scores get the float32 minimum, so a fully masked row (padding) averages
    the values instead of producing NaN. Shapes, ``scale`` and ``logit_cap`` as
    :func:`dot_product_attention`.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    qg = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, h)
    kf = k.transpose(0, 2, 1, 3).reshape(b * kv, s, h)
    vf = v.transpose(0, 2, 1, 3).reshape(b * kv, s, h)
    scale = h ** -0.5 if scale is None else scale
    scores = softcap(jnp.einsum("xqh,xsh->xqs", qg, kf, preferred_element_type=jnp.float32) * scale, logit_cap)
    if mask is not None:
        scores = scores.reshape(b, kv, g, t, s)
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min).reshape(b * kv, g * t, s)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("xqs,xsh->xqh", probs, vf)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# ----------------------------------------------------------------------------- pooling

POOLING = ("mean", "cls", "last")


def pool(hidden: Array, segment_ids: Array, how: str) -> Array:
    """Pool token states ``(B, T, D)`` into ``(B, D)`` over real tokens (``segment_ids != 0``).

    ``mean``: average of real tokens (sentence-transformers style); ``cls``: the first token;
    ``last``: the last real token (the pooling of decoder classifiers, padding on either side).
    """
    real = (segment_ids != 0).astype(jnp.float32)
    if how == "mean":
        summed = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), real)
        return (summed / jnp.maximum(real.sum(-1, keepdims=True), 1.0)).astype(hidden.dtype)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        t = hidden.shape[1]
        last = jnp.max(jnp.where(real > 0, jnp.arange(t)[None, :], -1), axis=-1)
        return jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown pooling {how!r}; choose one of {', '.join(POOLING)}")


@dataclasses.dataclass(frozen=True)
class ClassifierLayout:
    """A family's ``*ForSequenceClassification`` head: pool (BERT's ``pooler`` or the first token,
    ``cls``), then each of ``dense`` followed by ``activation``, then ``out``; dropout before every
    layer except, where ``input_dropout`` is False, the first."""

    body: str  # the body's prefix in the checkpoint
    pooling: str  # pooler | cls
    dense: tuple[str, ...]  # HF module names of the layers between pooling and ``out`` (head/dense_i)
    activation: str
    out: str  # HF module name of the output layer (head/out)
    input_dropout: bool = True

    def hf_names(self) -> dict[str, str]:
        """jaxtune head module (``dense_0``, ``out``) -> HF module name."""
        return {**{f"dense_{i}": n for i, n in enumerate(self.dense)}, "out": self.out}
