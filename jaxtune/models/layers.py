"""Building blocks shared by the model families: linear (with optional adapter leaves),
norms, the config mixins that build them (:class:`LinearBuilder`, :class:`ModuleBuilders`, and
:class:`ImageInputs` for image families), the two-layer MLP (:func:`feed_forward`), block
rematerialisation and pooling. Attention (masks, soft-capping, the kernels by backend) is
:mod:`jaxtune.models.attention`, re-exported here; rotary embeddings are :mod:`jaxtune.models.rope`.

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
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models import quant
from jaxtune.models.attention import attention_mask as attention_mask  # re-exported: attention moved there
from jaxtune.models.attention import batch_axes, data_parallel_size
from jaxtune.models.attention import dot_product_attention as dot_product_attention
from jaxtune.models.attention import grouped_attention as grouped_attention
from jaxtune.models.attention import softcap as softcap
from jaxtune.models.dropout import Dropout

Array = jax.Array
Dtype = Any

# The adapter leaves a Linear reads when present: defined here once, because evaluating them is
# part of the layer; jaxtune.tuning creates, labels, merges and exports them by these names.
LORA_A, LORA_B, LORA_SCALE, MAGNITUDE = "lora_a", "lora_b", "lora_scale", "magnitude"
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_SCALE, MAGNITUDE)
# Leaves that are scales or offsets, not weight matrices: the optimizer does not decay them toward 0,
# and a rounded copy of the model keeps them in their own dtype (norms read their float32 gain).
VECTOR_LEAVES = ("bias", "scale", MAGNITUDE, LORA_SCALE)

# Model state that training updates from the batches rather than by gradient (BatchNorm's running
# statistics): a module that trains such state puts each leaf's new value into this collection,
# under the leaf's own param path, and the train step writes it into the params.
STATE_UPDATES = "state_updates"
# Asked for (made mutable) by a forward pass that re-estimates such state: each module that trains
# statistics computes them from the batch, also in a deterministic pass, and puts this batch's values
# here under the same paths (jaxtune.training.batch_norm averages them over batches).
BATCH_STATISTICS = "batch_statistics"

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
        kernel = weight_param(self, "kernel", (x.shape[-1], self.features))
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
        scale = self.get_variable("params", LORA_SCALE).astype(jnp.float32)
        dropped = self.adapter_dropout > 0.0 and not deterministic
        if dropped:
            x = Dropout(self.adapter_dropout, deterministic=False)(x)
        # The scale multiplies in float32, then one rounding (as PEFT's float scaling under autocast):
        # alpha / r in bf16 (16/6 -> 2.672) made every adapter output ~0.2 % too large.
        low_rank = (((x @ a) @ b).astype(jnp.float32) * scale).astype(self.dtype)
        if not self.has_variable("params", MAGNITUDE):
            return low_rank
        if dropped:  # PEFT's DoRA rescales the base output of the *dropped* input when dropout is active
            base = quant.dot(x, kernel, self.dtype)
        # DoRA (Liu et al. 2024), as PEFT computes it: the column norm of the adapted weight is
        # treated as a constant in the backward pass, and without dropout the base output is
        # rescaled rather than recomputed, so the update costs one extra norm and no second matmul.
        magnitude = self.get_variable("params", MAGNITUDE).astype(jnp.float32)
        adapted = (quant.as_float(kernel, jnp.float32)
                   + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted, axis=0))
        # The ratio stays float32 until after ``- 1``: in bf16 a ratio near 1 moves in steps of 0.4-0.8 %,
        # so smaller magnitude changes did nothing to the output (PEFT rounds only the result).
        ratio = magnitude / norm
        return base * (ratio - 1).astype(self.dtype) + low_rank * ratio.astype(self.dtype)


def weight_param(module: nn.Module, name: str, shape: tuple[int, ...]) -> Any:
    """``module.param(name, default_kernel_init, shape, module.param_dtype)``, except that a quantized
    weight is read as it is: flax's own check would compare the shape of its codes (4-bit codes are
    packed two per byte) with ``shape``. For any weight a plan may quantize (kernels, embeddings,
    expert stacks)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if quant.is_quantized(value):
            return value
    return module.param(name, default_kernel_init, shape, module.param_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama-family checkpoints expect.

    The normalised ``x`` is rounded to ``dtype`` and then multiplied by the gain (Llama's
    ``weight * x.to(dtype)``: two roundings in bf16), or with ``gain_in_float32`` multiplied in
    float32 and rounded once (OLMo 2's ``(weight * x).to(dtype)``).

    Shapes: ``x`` ``(..., d)`` -> same shape, in ``dtype``.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gain_in_float32: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gain_in_float32:
            return (scale.astype(jnp.float32) * x32).astype(self.dtype)
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with ``scale``/``bias``, statistics in float32 (BERT-style, ``eps`` 1e-12).
    ``use_bias=False`` has no ``bias`` param (ModernBERT's ``norm_bias: false`` norms)."""

    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table ``(num_embeddings, features)``; ``attend`` gives tied-output logits."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = weight_param(self, "embedding", (self.num_embeddings, self.features))

    def __call__(self, ids: Array) -> Array:
        return quant.take(self.embedding, ids, self.dtype)

    def attend(self, x: Array) -> Array:
        lead = x.shape[:-1]
        out = quant.dot(x.reshape(-1, x.shape[-1]), self.embedding, self.dtype, transpose=True)
        return out.reshape(*lead, self.num_embeddings)


class LinearBuilder:
    """Mixin (no fields) for a family's frozen config dataclass: the compute dtype and the
    :class:`Linear` its modules build, from the config's ``dtype``, ``param_dtype`` and ``adapter_dropout``."""

    @property
    def compute_dtype(self) -> Any:
        """The config's ``dtype`` as a numpy dtype: what the family's modules compute in."""
        return jnp.dtype(self.dtype)

    def linear(self, features: int, name: str | None = None, bias: bool = True) -> Linear:
        """A :class:`Linear` to ``features`` in the compute dtype (with a ``bias`` unless told not)."""
        return Linear(features, use_bias=bias, dtype=self.compute_dtype, param_dtype=self.param_dtype,
                      adapter_dropout=self.adapter_dropout, name=name)


class ModuleBuilders(LinearBuilder):
    """:class:`LinearBuilder` and the :class:`LayerNorm` a family's modules build, with the config's
    ``layer_norm_eps``."""

    def layer_norm(self, name: str | None = None) -> LayerNorm:
        """A :class:`LayerNorm` with the config's ``layer_norm_eps``, in the compute dtype."""
        return LayerNorm(self.layer_norm_eps, self.compute_dtype, self.param_dtype, name=name)


class ImageInputs:
    """Mixin (no fields) for an image family's config: example inputs from its ``num_channels`` and
    ``image_size``."""

    def init_inputs(self) -> tuple[Array, ...]:
        """Example model inputs for shape inference: one all-zero image ``(1, C, H, W)`` float32."""
        return (jnp.zeros((1, self.num_channels, self.image_size, self.image_size), jnp.float32),)


def feed_forward(cfg: LinearBuilder, x: Array, names: tuple[str, str], activation: Any,
                 deterministic: bool) -> Array:
    """The two-layer MLP ``names[1](activation(names[0](x)))``: ``x`` ``(..., D)`` -> ``(..., cfg.intermediate_size)``
    -> ``(..., D)``, both linears built by ``cfg.linear`` (with biases). Called from a module's compact
    ``__call__``, so the linears are that module's children: their params stay ``<module>/<names[i]>``."""
    inner, outer = names
    h = activation(cfg.linear(cfg.intermediate_size, inner)(x, deterministic))
    return cfg.linear(x.shape[-1], outer)(h, deterministic)


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


def shard_rows(x: Array) -> Array:
    """``x`` ``(B, ...)`` constrained to rows split over the batch axes (:func:`attention.batch_axes`)
    of the mesh the step is traced under (``jax.sharding.use_abstract_mesh``, which the train step
    sets), else unchanged.

    Applied to each layer's input, it keeps activations data-parallel, so XLA gathers a layer's
    FSDP-sharded weights where the layer runs (inside the layer scan: one layer at a time)
    instead of moving activations between devices, which its cost model prefers at small widths.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else batch_axes(mesh)
    if not axes:
        return x
    if x.shape[0] % data_parallel_size(mesh):
        return x  # rows that do not split evenly stay where XLA puts them
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def attention_dropout_key(module: nn.Module, rate: float, deterministic: bool) -> Array | None:
    """The key for dropout on attention probabilities, from ``module``'s ``dropout`` stream; None
    (nothing drawn) in evaluation, in cached decoding (pass ``deterministic=True``) or at rate 0."""
    return None if deterministic or not rate else module.make_rng("dropout")


def hf_architecture(hf: dict[str, Any], architectures: Sequence[str], model_types: Mapping[str, str], family: str,
                    classifiers: Mapping[str, str] | None = None) -> str:
    """The architecture a Hugging Face ``config.json`` dict declares among ``architectures`` (one of
    ``classifiers`` maps to the model it wraps), else the one its ``model_type`` maps to; a ValueError
    naming the field and what ``family`` supports when neither is."""
    classifiers = classifiers or {}
    declared = hf.get("architectures") or []
    for arch in declared:
        if arch in architectures or arch in classifiers:
            return classifiers.get(arch, arch)
    if hf.get("model_type") in model_types:
        return model_types[hf["model_type"]]
    raise ValueError(f"config.json: architecture {declared or hf.get('model_type')!r} is not {family}; "
                     f"supported: {', '.join([*architectures, *classifiers])}")


POOLING = ("mean", "cls", "last", "cls_mean")


def pool(hidden: Array, segment_ids: Array, how: str, segments: int | None = None) -> Array:
    """Pool token states ``(B, T, D)`` into ``(B, D)`` over real tokens (``segment_ids != 0``), or
    with ``segments=S`` each packed row's segments ``1..S`` apart into ``(B, S, D)`` (a segment
    absent from a row pools to zeros for ``mean``, to an arbitrary token otherwise).

    ``mean``: average of real tokens (sentence-transformers style); ``cls``: the first token (of
    each segment); ``last``: the last real token (the pooling of decoder classifiers, padding on
    either side); ``cls_mean``: ``cls`` concatenated with the mean of the real tokens after it,
    ``(..., 2D)`` (``Dinov2ForImageClassification``'s [CLS] ++ mean of the patches). ``cls`` of an
    unpacked row reads position 0 as transformers does, but a left-padded row's position 0 is padding,
    which attends to nothing here and to every real token in transformers: encoder classifiers want
    right padding (as jaxtune's loaders give them).
    """
    if how not in POOLING:
        raise ValueError(f"unknown pooling {how!r}; choose one of {', '.join(POOLING)}")
    if segments is None:
        member = (segment_ids != 0)[:, None, :]  # one segment: every real token
    else:
        member = segment_ids[:, None, :] == jnp.arange(1, segments + 1, dtype=segment_ids.dtype)[None, :, None]
    t = jnp.arange(hidden.shape[1])
    # The first token of each segment: an unpacked row's position 0, as transformers reads it.
    first = jnp.zeros(member.shape[:2], jnp.int32) if segments is None else jnp.argmax(member, axis=-1)
    if how == "mean":
        pooled = _masked_mean(hidden, member)
    elif how == "cls_mean":
        rest = member & (t[None, None, :] != first[..., None])
        pooled = jnp.concatenate([jnp.take_along_axis(hidden, first[..., None], axis=1),
                                  _masked_mean(hidden, rest)], axis=-1)
    else:
        index = first if how == "cls" else jnp.maximum(jnp.max(jnp.where(member, t, -1), axis=-1), 0)
        pooled = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return pooled[:, 0] if segments is None else pooled


def _masked_mean(hidden: Array, member: Array) -> Array:
    """The mean of ``hidden`` ``(B, T, D)`` over the tokens ``member`` ``(B, S, T)`` marks: ``(B, S, D)``
    (zeros where none is marked), summed in float32."""
    real = member.astype(jnp.float32)
    summed = jnp.einsum("bst,btd->bsd", real, hidden.astype(jnp.float32))
    return (summed / jnp.maximum(real.sum(-1)[..., None], 1.0)).astype(hidden.dtype)


@dataclasses.dataclass(frozen=True)
class ClassifierLayout:
    """A family's ``*ForSequenceClassification`` head: pool (BERT's ``pooler``, the first token
    ``cls``, or ``mean``), then each of ``dense`` followed by ``activation``, then ``norm`` if any,
    then ``out``; dropout before every layer except, where ``input_dropout`` is False, the first."""

    body: str  # the body's prefix in the checkpoint
    pooling: str  # pooler | cls | mean
    dense: tuple[str, ...]  # HF module names of the layers between pooling and ``out`` (head/dense_i)
    activation: str
    out: str  # HF module name of the output layer (head/out)
    input_dropout: bool = True
    dense_bias: bool = True  # whether the ``dense`` layers have a bias (ModernBERT's ``classifier_bias``)
    # HF module name of a LayerNorm after the dense layers (ModernBERT's ``head.norm``; head/norm), its
    # epsilon and whether it has a bias.
    norm: str | None = None
    norm_eps: float = 1e-5
    norm_bias: bool = True

    def hf_names(self) -> dict[str, str]:
        """jaxtune head module (``dense_0``, ``norm``, ``out``) -> HF module name."""
        return {**{f"dense_{i}": n for i, n in enumerate(self.dense)}, **({"norm": self.norm} if self.norm else {}),
                "out": self.out}
