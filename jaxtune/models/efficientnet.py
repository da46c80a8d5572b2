"""EfficientNet-Lite (Tan & Le 2019, the TFLite-friendly variant): the PyPI package
``efficientnet-lite-pytorch``'s ``EfficientNet`` for ``efficientnet-lite0``..``lite4``.

Lite networks are EfficientNets without squeeze-and-excitation, with ReLU6 and a stem/head that
do not scale. The body is a 3x3 stride-2 stem, mobile inverted bottleneck blocks (1x1 expand,
depthwise kxk, 1x1 project, residual where shapes allow, stochastic depth in training) and a 1x1
head conv to 1280 channels; every conv is followed by BatchNorm (eps 1e-3). Convolutions pad like
TensorFlow's ``SAME`` (extra padding bottom/right), as the reference does.

:class:`EfficientNetLite` maps ``pixel_values`` ``(B, 3, H, W)`` (channels first, normalised as
TF-Lite's ``(x - 127) / 128``: the packaged ``preprocessor_config.json``) to its final feature map as
tokens ``(B, H/32 * W/32, 1280)``; mean pooling over them is the reference's global average pool,
and with ``include_top`` a dropout + linear ``fc`` gives the ImageNet logits.

**BatchNorm statistics** are leaves ``running_mean``/``running_var`` beside each BatchNorm's
``scale``/``bias``. They are model state, not parameters: no gradient flows into them. What they do
follows the plan (``jaxtune.tuning.labels``), as ``model.train()`` on the trained modules does in
PyTorch:

- a BatchNorm whose ``scale`` is frozen keeps its pretrained statistics and normalises with them,
  in training too (a frozen stage computes exactly the pretrained features);
- a BatchNorm whose ``scale`` trains (its stage trains) has its statistics labelled ``state``: in
  training it normalises with the batch's mean and (biased) variance over batch and pixels, and
  moves its running statistics toward them, ``running = m * running + (1 - m) * batch`` with the
  reference's ``batch_norm_momentum`` m = 0.99 and the unbiased batch variance, as
  ``torch.nn.BatchNorm2d(momentum=0.01)`` does. Evaluation always uses the running statistics.
- a ``freeze`` rule that names the statistics (``match: "running_(mean|var)$"``) keeps them as
  pretrained where their BatchNorm trains (frozen-statistics fine-tuning).
- a statistics pass (the ``BATCH_STATISTICS`` collection mutable, ``deterministic``: no dropout or
  stochastic depth) normalises the trained BatchNorms with the batch's statistics and reports them,
  mean and unbiased variance, without updating anything: ``train.recalibrate_batch_norm`` averages
  them over training batches to re-estimate the running statistics for the final weights
  (:mod:`jaxtune.training.batch_norm`).

The batch statistics are those of the whole (global) batch, also on a mesh: the mean over the
batch axis of a sharded array reduces over every device's rows ("sync BatchNorm"). Training batches are
always full (fill rows exist only in evaluation batches), so no row dilutes them.

Param paths mirror the reference's state dict: ``_blocks.3._depthwise_conv.weight`` is
``params["layers_3"]["depthwise_conv"]["kernel"]`` (blocks are ``layers_i`` so that partial plans'
``blocks`` selectors count them; see :func:`hf_module`). Conv kernels are stored as the full
transpose of PyTorch's ``(O, I/groups, kh, kw)``, like every jaxtune ``kernel``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.dropout import Dropout, dropout
from jaxtune.models.layers import (
    BATCH_STATISTICS,
    STATE_UPDATES,
    Array,
    ClassifierLayout,
    ImageInputs,
    LinearBuilder,
    PartitionRules,
    hf_architecture,
    partition_rules,
)

ARCHITECTURES = ("EfficientNetLiteForImageClassification", "EfficientNetLiteModel")
CLASSIFIERS = ("EfficientNetLiteForImageClassification",)
MODEL_TYPES = {"efficientnet_lite": "EfficientNetLiteForImageClassification"}
PARTITION_RULES: PartitionRules = partition_rules(column=(), row=())  # small convnets replicate
STATE_LEAVES = ("running_mean", "running_var")
# (repeats, kernel, stride, expand ratio, input filters, output filters) of lite0..lite4 before scaling.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig(LinearBuilder, ImageInputs):
    """The shape of an EfficientNet-Lite. Hashable, so it can sit on a linen module."""

    modality: ClassVar[str] = "image"
    # The reference's global average pool -> dropout -> ``fc`` (no transformers class to export to).
    classifier_layout: ClassVar[ClassifierLayout] = ClassifierLayout("", "mean", (), "relu", "fc")

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    num_channels: int = 3
    hidden_dropout: float = 0.2  # before the classifier (the reference's dropout_rate)
    drop_connect_rate: float = 0.2
    batch_norm_epsilon: float = 1e-3
    batch_norm_momentum: float = 0.99  # TensorFlow's convention: the weight of the running value
    # The BatchNorms (module paths, "layers_15/bn2") whose statistics train: set from the plan's labels.
    training_batch_norms: tuple[str, ...] = ()
    num_labels: int = 1000
    include_top: bool = True
    architecture: str = "EfficientNetLiteForImageClassification"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> EfficientNetConfig:
        """Build from the ``config.json`` that jaxtune's converter writes (``model_type: efficientnet_lite``)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "an EfficientNet-Lite jaxtune supports")
        fields = {k: hf[k] for k in ("width_coefficient", "depth_coefficient", "image_size", "num_channels",
                                     "drop_connect_rate", "batch_norm_epsilon", "batch_norm_momentum") if k in hf}
        fields.update(hidden_dropout=hf.get("dropout_rate", 0.2), architecture=arch, include_top=arch in CLASSIFIERS,
                      num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 1000))
        fields.update(overrides)
        return cls(**fields)

    @property
    def classifier_dropout(self) -> float:
        """The dropout before ``fc``, as the reference applies it."""
        return self.hidden_dropout

    @property
    def hidden_size(self) -> int:
        return 1280  # the head conv's width (not scaled in Lite models)

    @property
    def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """Every block's (kernel, stride, expand ratio, input filters, output filters), in order."""
        out = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
            fixed = i in (0, len(STAGES) - 1)  # Lite keeps the first and last stage's depth
            repeats = repeats if fixed else int(math.ceil(self.depth_coefficient * repeats))
            cin = 32 if i == 0 else self.filters(cin)
            cout = self.filters(cout)
            out.append((kernel, stride, expand, cin, cout))
            out.extend((kernel, 1, expand, cout, cout) for _ in range(repeats - 1))
        return tuple(out)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def filters(self, n: int) -> int:
        """The reference's ``round_filters``: width-scaled, rounded to a multiple of 8."""
        if self.width_coefficient == 1.0:
            return n
        scaled = n * self.width_coefficient
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded


class Conv(nn.Module):
    """A bias-free convolution with TensorFlow ``SAME`` padding; ``x`` is NHWC."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    cfg: EfficientNetConfig = EfficientNetConfig()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, cin = self.kernel_size, self.stride, x.shape[-1]
        # Stored (kw, kh, in/groups, out): the full transpose of PyTorch's layout.
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, cin // self.groups, self.features),
                            self.cfg.param_dtype)
        dt = self.cfg.compute_dtype
        x, kernel = x.astype(dt), kernel.transpose(1, 0, 2, 3).astype(dt)  # (kh, kw, in/groups, out)
        if k == 1 and s == 1 and self.groups == 1:  # pointwise: a matmul over pixels
            return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        pads = []
        for size in x.shape[1:3]:
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        if self.groups == cin == self.features and jax.default_backend() == "cpu":
            return depthwise_by_shifts(x, kernel[:, :, 0, :], s, pads)
        return jax.lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=self.groups)


def depthwise_by_shifts(x: Array, kernel: Array, stride: int, pads: list[tuple[int, int]]) -> Array:
    """A depthwise convolution as the sum of ``k * k`` strided windows of the padded input, each
    scaled by its per-channel weight.

    Equal to ``conv_general_dilated`` with ``feature_group_count = C``; on XLA:CPU, which runs a
    grouped convolution generically, this fuses into one elementwise loop and is 2.5-5x faster
    forward and backward at EfficientNet's shapes (GPUs and TPUs keep their convolution kernels).

    Args:
      x: ``(B, H, W, C)``.
      kernel: ``(kh, kw, C)``.
      stride: the same along height and width.
      pads: ``[(top, bottom), (left, right)]``.

    Returns:
      ``(B, H', W', C)`` with ``H' = (H + top + bottom - kh) // stride + 1`` (likewise ``W'``).
    """
    kh, kw, _ = kernel.shape
    padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    b, h, w, c = padded.shape
    out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = jnp.zeros((b, out_h, out_w, c), x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(padded, (0, i, j, 0), (b, i + (out_h - 1) * stride + 1,
                                                         j + (out_w - 1) * stride + 1, c), (1, stride, stride, 1))
            out = out + window * kernel[i, j]
    return out


class BatchNorm(nn.Module):
    """BatchNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``, with the
    running statistics, or in training those of the batch where the plan trains this BatchNorm
    (see the module docstring). ``x`` is ``(B, H, W, C)``."""

    cfg: EfficientNetConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg, d, dt = self.cfg, x.shape[-1], self.cfg.param_dtype
        scale = self.param("scale", nn.initializers.ones, (d,), dt)
        bias = self.param("bias", nn.initializers.zeros, (d,), dt)
        # Model state, not parameters: no gradient flows into the statistics.
        running_mean = jax.lax.stop_gradient(self.param("running_mean", nn.initializers.zeros, (d,), dt))
        running_var = jax.lax.stop_gradient(self.param("running_var", nn.initializers.ones, (d,), dt))
        x32 = x.astype(jnp.float32)
        trains = "/".join(self.path) in cfg.training_batch_norms
        # A statistics pass (BATCH_STATISTICS mutable) is deterministic otherwise: no dropout, no update.
        if not trains or (deterministic and not self.is_mutable_collection(BATCH_STATISTICS)):
            mean, var = running_mean.astype(jnp.float32), running_var.astype(jnp.float32)
        else:
            axes = tuple(range(x.ndim - 1))
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            n = math.prod(x.shape[:-1])
            # The running variance estimates the population's: the batch's unbiased variance, as PyTorch's.
            stats = (("running_mean", running_mean, jax.lax.stop_gradient(mean)),
                     ("running_var", running_var, jax.lax.stop_gradient(var) * (n / max(n - 1, 1))))
            m = cfg.batch_norm_momentum
            for name, old, value in stats:
                if self.is_mutable_collection(BATCH_STATISTICS):
                    self.put_variable(BATCH_STATISTICS, name, value)
                if not deterministic and self.is_mutable_collection(STATE_UPDATES):
                    self.put_variable(STATE_UPDATES, name, (m * old.astype(jnp.float32) + (1 - m) * value).astype(dt))
        inv = jax.lax.rsqrt(var + cfg.batch_norm_epsilon) * scale.astype(jnp.float32)
        y = (x32 - mean) * inv + bias.astype(jnp.float32)
        return y.astype(cfg.compute_dtype)


def relu6(x: Array) -> Array:
    return jnp.clip(x, 0, 6)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (the Lite block)."""

    cfg: EfficientNetConfig
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
        cfg, hidden = self.cfg, self.cin * self.expand
        x = inputs
        if self.expand != 1:
            x = relu6(BatchNorm(cfg, name="bn0")(Conv(hidden, 1, cfg=cfg, name="expand_conv")(x), deterministic))
        x = Conv(hidden, self.kernel, self.stride, groups=hidden, cfg=cfg, name="depthwise_conv")(x)
        x = relu6(BatchNorm(cfg, name="bn1")(x, deterministic))
        x = BatchNorm(cfg, name="bn2")(Conv(self.cout, 1, cfg=cfg, name="project_conv")(x), deterministic)
        if self.stride == 1 and self.cin == self.cout:
            if self.drop_rate and not deterministic:  # stochastic depth: drop the residual branch per example
                x = dropout(x, self.drop_rate, self.make_rng("dropout"), shape=(x.shape[0], 1, 1, 1))
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """The network (see the module docstring): ``pixel_values`` ``(B, C, H, W)`` -> feature tokens
    ``(B, H/32 * W/32, 1280)``, or with ``cfg.include_top`` logits ``(B, num_labels)``."""

    cfg: EfficientNetConfig

    @nn.compact
    def __call__(self, pixel_values: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}, but EfficientNet-Lite takes "
                             f"(B, {cfg.num_channels}, H, W) images, channels first")
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))
        x = relu6(BatchNorm(cfg, name="bn0")(Conv(32, 3, 2, cfg=cfg, name="conv_stem")(x), deterministic))
        blocks = cfg.blocks
        for i, (kernel, stride, expand, cin, cout) in enumerate(blocks):
            rate = cfg.drop_connect_rate * i / len(blocks)
            x = MBConvBlock(cfg, kernel, stride, expand, cin, cout, rate, name=f"layers_{i}")(x, deterministic)
        x = relu6(BatchNorm(cfg, name="bn1")(Conv(cfg.hidden_size, 1, cfg=cfg, name="conv_head")(x), deterministic))
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        if not cfg.include_top:
            return tokens
        pooled = Dropout(cfg.hidden_dropout)(tokens.mean(axis=1), deterministic=deterministic)
        return cfg.linear(cfg.num_labels, "fc")(pooled, deterministic)



def hf_module(modules: tuple[str, ...]) -> str:
    """The reference's module name of a param path: ``('layers_3', 'depthwise_conv')`` ->
    ``'_blocks.3._depthwise_conv'``, ``('bn0',)`` -> ``'_bn0'``."""
    return ".".join("_blocks." + m[len("layers_"):] if m.startswith("layers_") else "_" + m for m in modules)
