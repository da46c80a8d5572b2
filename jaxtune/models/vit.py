"""Vision Transformer: transformers' ``ViTModel`` and ``ViTForImageClassification``.

:class:`ViT` is ``ViTModel``: non-overlapping patches projected to ``D`` (HF's stride-``p``
convolution, written as one einsum over patchified pixels), a learned ``[CLS]`` token and
absolute position embeddings, pre-norm blocks, a final LayerNorm and an optional tanh pooler.
:class:`ViTClassifier` is ``ViTForImageClassification``: a linear ``classifier`` on the final
``[CLS]`` state (no pooler, no dropout).

Inputs are ``pixel_values`` float ``(B, C, H, W)``, channels first and normalised as the
checkpoint's image processor does (HF's convention, so batches are interchangeable with
transformers'). Position embeddings are not interpolated: ``H, W`` must equal ``image_size`` (an image
processor that gives another size is refused when the image spec is made, before training:
:meth:`ViTConfig.image_input_problem`).

Param paths mirror transformers' *module* names (also PEFT's): ``layers.2.attention.q_proj`` is
``params["layers_2"]["attention"]["q_proj"]``. Checkpoints on disk use the older tensor names
(``encoder.layer.2.attention.attention.query``); :func:`checkpoint_name` maps to those when reading.
Tensors that are parameters of no module (``cls_token``, ``position_embeddings``) are leaves named
``tensor`` under a module of that name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS
from jaxtune.models.layers import (
    Array,
    ClassifierLayout,
    ImageInputs,
    ModuleBuilders,
    PartitionRules,
    attention_dropout_key,
    dot_product_attention,
    feed_forward,
    hf_architecture,
    partition_rules,
)

ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
CLASSIFIERS = ("ViTForImageClassification",)
MODEL_TYPES = {"vit": "ViTModel"}
PARTITION_RULES: PartitionRules = partition_rules(column=("q_proj", "k_proj", "v_proj", "fc1"),
                                                  row=("o_proj", "fc2"))
TENSOR_LEAF = "tensor"  # a parameter that is a whole HF tensor (not a module's weight/bias)


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModuleBuilders, ImageInputs):
    """Everything that shapes a ViT. Hashable, so it can sit on a linen module."""

    modality: ClassVar[str] = "image"
    # ViTForImageClassification: the final [CLS] state straight into ``classifier`` (no dropout).
    classifier_layout: ClassVar[ClassifierLayout] = ClassifierLayout("vit", "cls", (), "gelu", "classifier",
                                                                     input_dropout=False)

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0  # on the attention probabilities in training (attention_probs_dropout_prob)
    qkv_bias: bool = True
    use_pooler: bool = True
    pooler_output_size: int | None = None
    num_labels: int = 2  # ViTClassifier only
    architecture: str = "ViTModel"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ViTConfig:
        """Build from a Hugging Face ``config.json`` dict (``model_type: vit``)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a ViT jaxtune supports")
        for key, allowed in (("hidden_act", tuple(ACTIVATIONS)), ("pooler_act", ("tanh",))):
            if hf.get(key, allowed[0]) not in allowed:
                raise ValueError(f"config.json: {key} {hf[key]!r} is not supported; supported: {', '.join(allowed)}")
        size, patch = hf.get("image_size", 224), hf.get("patch_size", 16)
        if isinstance(size, list | tuple) or isinstance(patch, list | tuple):
            raise ValueError("config.json: non-square image_size/patch_size is not supported; give one int each")
        if size % patch:
            raise ValueError(f"config.json: image_size {size} is not a multiple of patch_size {patch}")
        fields = dict(
            image_size=size,
            patch_size=patch,
            num_channels=hf.get("num_channels", 3),
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            qkv_bias=hf.get("qkv_bias", True),
            use_pooler=arch == "ViTModel",
            pooler_output_size=hf.get("pooler_output_size"),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def classifier_dropout(self) -> float:
        """A fresh head's dropout between its layers (HF's classifier has none before it)."""
        return self.hidden_dropout

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def image_input_problem(self, height: int, width: int) -> str | None:
        """Why this ViT cannot take ``height x width`` images (None when it can): only its
        ``image_size`` square, as its position embeddings are not interpolated (transformers'
        ``interpolate_pos_encoding`` is not supported)."""
        if (height, width) == (self.image_size, self.image_size):
            return None
        return (f"this ViT takes only its image_size {self.image_size} x {self.image_size} (jaxtune does not "
                "interpolate its position embeddings, transformers' interpolate_pos_encoding)")


class BareTensor(nn.Module):
    """A bare parameter tensor (HF's ``nn.Parameter`` outside any layer), as ``<name>/tensor``."""

    shape: tuple[int, ...]
    param_dtype: str

    @nn.compact
    def __call__(self) -> Array:
        return self.param(TENSOR_LEAF, nn.initializers.normal(0.02), self.shape, self.param_dtype)


class PatchProjection(nn.Module):
    """HF's ``Conv2d(C, D, kernel=p, stride=p)`` on non-overlapping patches.

    ``kernel`` is stored ``(p_w, p_h, C, D)``: the full transpose of PyTorch's ``(D, C, p_h, p_w)``,
    as every jaxtune ``kernel`` is, so checkpoint I/O needs no special case.
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg, p = self.cfg, self.cfg.patch_size
        b, c, h, w = pixels.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, cfg.hidden_size), cfg.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (cfg.hidden_size,), cfg.param_dtype)
        dt = cfg.compute_dtype
        patches = pixels.astype(dt).reshape(b, c, h // p, p, w // p, p)
        out = jnp.einsum("bcipjq,qpcd->bijd", patches, kernel.astype(dt)) + bias.astype(dt)
        return out.reshape(b, (h // p) * (w // p), cfg.hidden_size)


class Embeddings(nn.Module):
    cfg: ViTConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.cls_token = BareTensor((1, 1, cfg.hidden_size), cfg.param_dtype)
        self.position_embeddings = BareTensor((1, cfg.num_patches + 1, cfg.hidden_size), cfg.param_dtype)
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.dropout = Dropout(cfg.hidden_dropout)

    def __call__(self, pixel_values: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values: shape {tuple(pixel_values.shape)}, but this ViT takes "
                             f"(B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}); resize the images to "
                             f"image_size {cfg.image_size} (channels first)")
        x = self.patch_embeddings(pixel_values)
        cls = jnp.broadcast_to(self.cls_token().astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings().astype(x.dtype)
        return self.dropout(x, deterministic=deterministic)


class PatchEmbeddings(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        return PatchProjection(self.cfg, name="projection")(pixel_values)


class Attention(nn.Module):
    """HF's ``ViTAttention``: q/k/v projections, softmax attention over all tokens, ``o_proj``."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        b, t, d = x.shape

        def heads(name: str) -> Array:
            return cfg.linear(d, name, cfg.qkv_bias)(x, deterministic).reshape(b, t, cfg.num_heads, d // cfg.num_heads)

        out = dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), None, causal=False,
                                    dropout_rate=cfg.attention_dropout,
                                    dropout_rng=attention_dropout_key(self, cfg.attention_dropout, deterministic))
        return cfg.linear(d, "o_proj")(out.reshape(b, t, d), deterministic)


class MLP(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        return feed_forward(self.cfg, x, ("fc1", "fc2"), ACTIVATIONS[self.cfg.hidden_act], deterministic)


class ViTBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (dropout after each, as HF)."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        drop = Dropout(cfg.hidden_dropout)
        h = Attention(cfg, name="attention")(cfg.layer_norm("layernorm_before")(x), deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = MLP(cfg, name="mlp")(cfg.layer_norm("layernorm_after")(x), deterministic)
        return x + drop(h, deterministic=deterministic)


class ViT(nn.Module):
    """``ViTModel``. ``__call__`` maps ``pixel_values`` ``(B, C, H, W)`` to the final
    (LayerNorm-ed) token states ``(B, 1 + num_patches, D)``, ``[CLS]`` first; :meth:`pooled`
    is the pooler output."""

    cfg: ViTConfig

    def setup(self) -> None:
        self.embeddings = Embeddings(self.cfg)
        self.layers = [ViTBlock(self.cfg) for _ in range(self.cfg.num_layers)]
        self.layernorm = self.cfg.layer_norm("layernorm")
        if self.cfg.use_pooler:
            self.pooler = _Pooler(self.cfg)

    def __call__(self, pixel_values: Array, deterministic: bool = True) -> Array:
        x = self.embeddings(pixel_values, deterministic)
        for block in self.layers:
            x = block(x, deterministic)
        x = self.layernorm(x)
        if self.cfg.use_pooler and self.is_initializing():
            self.pooler(x)  # create the pooler's params at init
        return x

    def pooled(self, hidden: Array, deterministic: bool = True) -> Array:
        """The pooler: ``tanh(dense(hidden[:, 0]))`` ``(B, pooler_output_size)``."""
        return self.pooler(hidden, deterministic)


class _Pooler(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool = True) -> Array:
        size = self.cfg.pooler_output_size or self.cfg.hidden_size
        return jnp.tanh(self.cfg.linear(size, "dense")(hidden[:, 0], deterministic))


class ViTClassifier(nn.Module):
    """``ViTForImageClassification``: logits ``(B, num_labels)`` from the final ``[CLS]`` state."""

    cfg: ViTConfig

    def setup(self) -> None:
        self.vit = ViT(dataclasses.replace(self.cfg, use_pooler=False))
        self.classifier = self.cfg.linear(self.cfg.num_labels)

    def __call__(self, pixel_values: Array, deterministic: bool = True) -> Array:
        return self.classifier(self.vit(pixel_values, deterministic)[:, 0], deterministic)


def hf_module(modules: tuple[str, ...]) -> str:
    """transformers module name of a param path's modules: ``('layers_2', 'attention', 'q_proj')``
    -> ``'layers.2.attention.q_proj'``; ``('vit', ...)`` keeps its ``vit.``; a head's ``('head', 'out')``
    is ``ViTForImageClassification``'s ``classifier``."""
    if modules[0] == "head":
        return ViTConfig.classifier_layout.hf_names()[modules[1]]
    return ".".join(m.replace("layers_", "layers.", 1) if m.startswith("layers_") else m for m in modules)


# transformers >= 5 renamed ViT's modules but still writes (and reads) the old tensor names.
_CHECKPOINT_NAMES = (
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.(q|k|v)_proj\."),
     lambda m: f"{m[1]}encoder.layer.{m[2]}.attention.attention.{dict(q='query', k='key', v='value')[m[3]]}."),
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.o_proj\."), r"\1encoder.layer.\2.attention.output.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\.mlp\.fc1\."), r"\1encoder.layer.\2.intermediate.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\.mlp\.fc2\."), r"\1encoder.layer.\2.output.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
)


def rename_first(name: str, rules: tuple[tuple[re.Pattern[str], Any], ...]) -> str:
    """``name`` rewritten by the first of ``rules`` (``(pattern, replacement)``, as ``re.sub`` takes them)
    that changes it, else ``name``: the old tensor names of a family whose modules transformers renamed."""
    for pattern, replacement in rules:
        new = pattern.sub(replacement, name)
        if new != name:
            return new
    return name


def checkpoint_name(name: str) -> str:
    """The tensor name a ViT checkpoint stores for module-named ``name``:
    ``vit.layers.0.mlp.fc1.weight`` -> ``vit.encoder.layer.0.intermediate.dense.weight``."""
    return rename_first(name, _CHECKPOINT_NAMES)
