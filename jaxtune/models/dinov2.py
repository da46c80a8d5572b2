"""DINOv2: transformers' ``Dinov2Model`` and ``Dinov2ForImageClassification``, with registers too.

:class:`Dinov2` is ``Dinov2Model``, a ViT with DINOv2's changes, in the order a forward runs them:

- patch embeddings (a stride-``p`` convolution, as ViT's: :class:`jaxtune.models.vit.PatchProjection`),
  a learned ``[CLS]`` token in front, and an optional ``mask_token`` (``use_mask_token``) that replaces
  the patches ``bool_masked_pos`` marks. Masking is DINOv2's pre-training objective and fine-tuning
  never masks; the tensor is kept so that a checkpoint round-trips whole.
- position embeddings learned for the config's ``image_size`` and **bicubically interpolated to the
  input's patch grid** as transformers does (:func:`bicubic_matrix`): any image whose sides are at
  least one patch runs, and pixels past the last whole patch are ignored, as HF's convolution ignores them.
- pre-norm blocks (``norm1``, attention (ViT's :class:`jaxtune.models.vit.Attention`), ``layer_scale1``;
  ``norm2``, MLP, ``layer_scale2``), where LayerScale multiplies each branch by a learned per-channel
  ``lambda1`` before the residual add and, in training, drop-path (stochastic depth, ``drop_path_rate``,
  the same rate in every block as transformers) drops a whole sample's branch. The MLP is ``fc1`` ->
  activation -> ``fc2``, or with ``use_swiglu_ffn`` SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.
- a final LayerNorm. There is no pooler; ``Dinov2Model``'s ``pooler_output`` is the ``[CLS]`` state.

:class:`Dinov2Classifier` is ``Dinov2ForImageClassification``: a linear ``classifier`` on the
concatenation of the final ``[CLS]`` state and the mean of the patch states, ``(B, 2D)``: pooling
``cls_mean`` (:func:`jaxtune.models.layers.pool`). It is stored as ``head/out``, so a plan reads it as
the head it is.

Inputs are ``pixel_values`` float ``(B, C, H, W)``, normalised as the checkpoint's image processor does.
Param paths mirror transformers' module names with jaxtune's block names (``layers_2/attention/q_proj``
is ``encoder.layer.2.attention.q_proj``); checkpoints store older names (``attention.attention.query``,
``mlp.weights_in`` holding ``gate_proj`` and ``up_proj`` stacked), which :func:`checkpoint_name` and
:func:`checkpoint_chunk` give.

``Dinov2WithRegistersModel`` (and its classifier) is the same model with ``num_register_tokens``
learned tokens between ``[CLS]`` and the patches (no position of their own; the classifier's mean leaves
them out) and positions interpolated with torch's antialiased bicubic (Keys' a=-0.5, stretched when
shrinking). Not supported (refused at load, naming the field): non-square ``image_size``/``patch_size``
and an activation other than the GELUs and ReLU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS
from jaxtune.models.layers import (
    Array,
    ClassifierLayout,
    ImageInputs,
    ModuleBuilders,
    PartitionRules,
    feed_forward,
    hf_architecture,
    partition_rules,
    pool,
)
from jaxtune.models.vit import Attention, BareTensor, PatchEmbeddings, rename_first

ARCHITECTURES = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
                 "Dinov2WithRegistersForImageClassification")
CLASSIFIERS = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
PARTITION_RULES: PartitionRules = partition_rules(column=("q_proj", "k_proj", "v_proj", "fc1", "gate_proj", "up_proj"),
                                                  row=("o_proj", "fc2", "down_proj"))
# The body's prefix in a *ForImageClassification checkpoint (transformers' base_model_prefix).
BODIES = {False: "dinov2", True: "dinov2_with_registers"}
_LAYOUT = dict(pooling="cls_mean", dense=(), activation="gelu", out="classifier", input_dropout=False)


@dataclasses.dataclass(frozen=True)
class Dinov2Config(ModuleBuilders, ImageInputs):
    """Everything that shapes a DINOv2. Hashable, so it can sit on a linen module."""

    modality: ClassVar[str] = "image"

    image_size: int  # the grid the position embeddings were learned on (image_size // patch_size per side)
    patch_size: int
    hidden_size: int
    intermediate_size: int  # of the MLP, or of SwiGLU's gate/up projections
    num_layers: int
    num_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.0  # on the embeddings only, as transformers (hidden_dropout_prob)
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True
    layerscale_value: float = 1.0  # LayerScale's initial value (a fresh model only)
    # Dinov2WithRegisters: learned tokens between [CLS] and the patches, with no position; its positions
    # interpolate with torch's antialiased bicubic.
    num_register_tokens: int = 0
    num_labels: int = 2  # Dinov2Classifier only
    architecture: str = "Dinov2Model"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """Build from a Hugging Face ``config.json`` dict (``model_type: dinov2``)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a DINOv2 jaxtune supports")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        size, patch = hf.get("image_size", 224), hf.get("patch_size", 14)
        if isinstance(size, list | tuple) or isinstance(patch, list | tuple):
            raise ValueError("config.json: non-square image_size/patch_size is not supported; give one int each")
        hidden = hf["hidden_size"]
        intermediate = int(hidden * hf.get("mlp_ratio", 4))
        registers = hf.get("num_register_tokens", 4) if arch.startswith("Dinov2WithRegisters") else 0
        if registers < 0:
            raise ValueError(f"config.json: num_register_tokens {registers} is negative; give 0 or more")
        if hf.get("use_swiglu_ffn", False):
            intermediate = (int(intermediate * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN width
        fields = dict(
            image_size=size,
            patch_size=patch,
            num_channels=hf.get("num_channels", 3),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            drop_path_rate=hf.get("drop_path_rate", 0.0),
            qkv_bias=hf.get("qkv_bias", True),
            use_swiglu_ffn=hf.get("use_swiglu_ffn", False),
            # Dinov2WithRegisters has no use_mask_token: its checkpoints always carry the mask token.
            use_mask_token=hf.get("use_mask_token", True) or arch.startswith("Dinov2WithRegisters"),
            num_register_tokens=registers,
            layerscale_value=hf.get("layerscale_value", 1.0),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def with_registers(self) -> bool:
        """Whether this is ``Dinov2WithRegisters*`` (by architecture: a config may ask for 0 registers)."""
        return self.architecture.startswith("Dinov2WithRegisters")

    @property
    def classifier_layout(self) -> ClassifierLayout:
        """``*ForImageClassification``: [CLS] ++ mean(patches) straight into ``classifier`` (no dropout)."""
        return ClassifierLayout(BODIES[self.with_registers], **_LAYOUT)

    def pooled_tokens(self, shape: tuple[int, int]) -> Array:
        """Segment ids ``shape`` ``(B, T)`` int32 for the head's pooling: 1 for ``[CLS]`` and the patches,
        0 for the register tokens, which transformers' classifier leaves out of its mean."""
        ids = jnp.ones(shape, jnp.int32)
        return ids.at[:, 1:1 + self.num_register_tokens].set(0) if self.num_register_tokens else ids

    @property
    def classifier_dropout(self) -> float:
        """A fresh head's dropout between its layers: none, as transformers' classifier has none."""
        return 0.0

    @property
    def grid(self) -> int:
        """Patches per side of the grid the position embeddings were learned on."""
        return self.image_size // self.patch_size

    def image_input_problem(self, height: int, width: int) -> str | None:
        """Why this DINOv2 cannot take ``height x width`` images (None when it can): its positions are
        interpolated to any grid of at least one patch a side."""
        if min(height, width) >= self.patch_size:
            return None
        return f"this DINOv2 needs at least one patch ({self.patch_size} pixels) a side"


# ----------------------------------------------------------------------------- position interpolation

def _cubic(x: float, a: float) -> float:
    """The cubic convolution kernel with parameter ``a`` at distance ``x``."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int, antialias: bool = False) -> np.ndarray:
    """``(size_out, size_in)`` float64 weights of torch's ``interpolate(mode="bicubic",
    align_corners=False, size=...)`` along one axis; a resize is ``M_h @ x @ M_w.T``.

    Without ``antialias`` (DINOv2), output ``i`` samples source ``(i + 0.5) * in / out - 0.5`` with
    the kernel a=-0.75 over four neighbours, indices clamped at the edges. With it (DINOv2 with
    registers), torch's PIL-style filter: Keys' a=-0.5, stretched by ``in / out`` when shrinking,
    cut at the edges and renormalised. Either is the identity when ``size_in == size_out``."""
    out = np.zeros((size_out, size_in))
    scale = size_in / size_out
    for i in range(size_out):
        if not antialias:
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            for offset in range(-1, 3):
                out[i, min(max(base + offset, 0), size_in - 1)] += _cubic(src - (base + offset), -0.75)
            continue
        stretch = max(scale, 1.0)
        center = (i + 0.5) * scale
        first = max(int(center - 2 * stretch + 0.5), 0)
        last = min(int(center + 2 * stretch + 0.5), size_in)
        weights = [_cubic((j - center + 0.5) / stretch, -0.5) for j in range(first, last)]
        out[i, first:last] = np.asarray(weights) / sum(weights)
    return out


def interpolate_positions(positions: Array, grid: int, rows: int, cols: int, antialias: bool = False) -> Array:
    """Patch position embeddings ``(grid * grid, D)`` learned on a ``grid x grid`` patch grid, resized
    to ``rows x cols`` patches: ``(rows * cols, D)`` in float32, as transformers interpolates them."""
    if (rows, cols) == (grid, grid):
        return positions.astype(jnp.float32)
    m_rows = jnp.asarray(bicubic_matrix(grid, rows, antialias), jnp.float32)
    m_cols = jnp.asarray(bicubic_matrix(grid, cols, antialias), jnp.float32)
    square = positions.astype(jnp.float32).reshape(grid, grid, -1)
    return jnp.einsum("ia,jb,abd->ijd", m_rows, m_cols, square,
                      precision=jax.lax.Precision.HIGHEST).reshape(rows * cols, -1)


# ----------------------------------------------------------------------------- the model


class Embeddings(nn.Module):
    """Patches, ``[CLS]`` in front, optional mask token, interpolated positions, dropout."""

    cfg: Dinov2Config

    def setup(self) -> None:
        cfg = self.cfg
        self.cls_token = BareTensor((1, 1, cfg.hidden_size), cfg.param_dtype)
        if cfg.use_mask_token:
            self.mask_token = BareTensor((1, cfg.hidden_size), cfg.param_dtype)
        self.position_embeddings = BareTensor((1, cfg.grid ** 2 + 1, cfg.hidden_size), cfg.param_dtype)
        if cfg.with_registers:
            self.register_tokens = BareTensor((1, cfg.num_register_tokens, cfg.hidden_size), cfg.param_dtype)
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.dropout = Dropout(cfg.hidden_dropout)

    def __call__(self, pixel_values: Array, deterministic: bool, bool_masked_pos: Array | None = None) -> Array:
        cfg, p = self.cfg, self.cfg.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels or min(pixel_values.shape[2:]) < p:
            raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}, but this DINOv2 takes "
                             f"(B, {cfg.num_channels}, H, W) with H, W >= patch_size {p} (channels first)")
        rows, cols = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        # transformers' stride-p convolution ignores the pixels past the last whole patch.
        x = self.patch_embeddings(pixel_values[:, :, :rows * p, :cols * p])
        if bool_masked_pos is not None:
            if not cfg.use_mask_token:
                raise ValueError("bool_masked_pos: this DINOv2 has no mask token (use_mask_token: false)")
            x = jnp.where(bool_masked_pos[..., None], self.mask_token().astype(x.dtype), x)
        elif cfg.use_mask_token and self.is_initializing():
            self.mask_token()  # create the param at init
        cls = jnp.broadcast_to(self.cls_token().astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        table = self.position_embeddings()[0]
        positions = jnp.concatenate([table[:1].astype(jnp.float32), interpolate_positions(
            table[1:], cfg.grid, rows, cols, antialias=cfg.with_registers)])
        x = jnp.concatenate([cls, x], axis=1) + positions.astype(table.dtype).astype(x.dtype)
        if cfg.with_registers:
            registers = self.register_tokens().astype(x.dtype)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers, (x.shape[0], *registers.shape[1:])), x[:, 1:]],
                                axis=1)
        return self.dropout(x, deterministic=deterministic)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``, or SwiGLU ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        if cfg.use_swiglu_ffn:
            gate = cfg.linear(cfg.intermediate_size, "gate_proj")(x, deterministic)
            up = cfg.linear(cfg.intermediate_size, "up_proj")(x, deterministic)
            return cfg.linear(cfg.hidden_size, "down_proj")(nn.silu(gate) * up, deterministic)
        return feed_forward(cfg, x, ("fc1", "fc2"), ACTIVATIONS[cfg.hidden_act], deterministic)


class LayerScale(nn.Module):
    """``x * lambda1``, a learned per-channel gain on a residual branch."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        gain = BareTensor((cfg.hidden_size,), cfg.param_dtype, name="lambda1")
        return x * gain().astype(x.dtype)


def drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
    """Stochastic depth: in training, each sample's ``x`` ``(B, ...)`` is zeroed with probability
    ``rate`` and the kept ones scaled by ``1 / (1 - rate)`` (transformers' ``Dinov2DropPath``);
    the key comes from ``module``'s ``dropout`` stream."""
    if deterministic or not rate:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dinov2Block(nn.Module):
    """``x + drop_path(ls1(attn(norm1(x))))`` then ``x + drop_path(ls2(mlp(norm2(x))))``."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        h = Attention(cfg, name="attention")(cfg.layer_norm("norm1")(x), deterministic)
        x = x + drop_path(self, LayerScale(cfg, name="layer_scale1")(h), cfg.drop_path_rate, deterministic)
        h = MLP(cfg, name="mlp")(cfg.layer_norm("norm2")(x), deterministic)
        return x + drop_path(self, LayerScale(cfg, name="layer_scale2")(h), cfg.drop_path_rate, deterministic)


class Dinov2(nn.Module):
    """``Dinov2Model``: ``pixel_values`` ``(B, C, H, W)`` -> the final (LayerNorm-ed) token states
    ``(B, 1 + (H // p) * (W // p), D)``, ``[CLS]`` first. ``bool_masked_pos`` ``(B, patches)``, where
    given, replaces those patches by the mask token (DINOv2's pre-training; fine-tuning passes none)."""

    cfg: Dinov2Config

    def setup(self) -> None:
        self.embeddings = Embeddings(self.cfg)
        self.layers = [Dinov2Block(self.cfg) for _ in range(self.cfg.num_layers)]
        self.layernorm = self.cfg.layer_norm("layernorm")

    def __call__(self, pixel_values: Array, deterministic: bool = True, bool_masked_pos: Array | None = None) -> Array:
        x = self.embeddings(pixel_values, deterministic, bool_masked_pos)
        for block in self.layers:
            x = block(x, deterministic)
        return self.layernorm(x)


class Dinov2Classifier(nn.Module):
    """``Dinov2ForImageClassification``: logits ``(B, num_labels)`` from ``[CLS]`` ++ the mean of the
    patch states, ``(B, 2D)`` (pooling ``cls_mean``)."""

    cfg: Dinov2Config

    @nn.compact
    def __call__(self, pixel_values: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        hidden = Dinov2(cfg, name=cfg.classifier_layout.body)(pixel_values, deterministic)
        features = pool(hidden, cfg.pooled_tokens(hidden.shape[:2]), "cls_mean")
        return _Head(cfg.num_labels, cfg, name="head")(features, deterministic)


class _Head(nn.Module):
    num_labels: int
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, features: Array, deterministic: bool = True) -> Array:
        return self.cfg.linear(self.num_labels, "out")(features, deterministic)


# ----------------------------------------------------------------------------- names


def hf_module(modules: tuple[str, ...]) -> str:
    """transformers module name of a param path's modules: ``('layers_2', 'attention', 'q_proj')`` ->
    ``'encoder.layer.2.attention.q_proj'``; ``('dinov2', ...)`` keeps its ``dinov2.``; the head's
    ``('head', 'out')`` is ``Dinov2ForImageClassification``'s ``classifier``."""
    if modules[0] == "head":
        return {"out": _LAYOUT["out"]}[modules[1]]
    return ".".join(m.replace("layers_", "encoder.layer.", 1) if m.startswith("layers_") else m for m in modules)


# transformers >= 5 renamed DINOv2's modules but still reads (and its checkpoints hold) the old tensor names.
_CHECKPOINT_NAMES = (
    (re.compile(r"\.attention\.(q|k|v)_proj\."),
     lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.down_proj\."), ".mlp.weights_out."),
)
_FUSED = re.compile(r"\.mlp\.(gate|up)_proj\.")


def checkpoint_name(name: str) -> str:
    """The tensor name a DINOv2 checkpoint stores for module-named ``name``:
    ``encoder.layer.0.attention.q_proj.weight`` -> ``encoder.layer.0.attention.attention.query.weight``."""
    return rename_first(name, _CHECKPOINT_NAMES)


def checkpoint_chunk(name: str) -> tuple[str, int, int] | None:
    """Where a checkpoint stores module-named ``name`` as a part of a fused tensor: ``(stored name,
    part, parts)`` along the stored tensor's first axis (SwiGLU's ``gate_proj`` and ``up_proj`` are
    the halves of ``mlp.weights_in``, as transformers' loader chunks them); None for every other tensor."""
    m = _FUSED.search(name)
    if m is None:
        return None
    return _FUSED.sub(".mlp.weights_in.", name), ("gate", "up").index(m[1]), 2
