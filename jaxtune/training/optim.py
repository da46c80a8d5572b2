"""Optimizers and schedules from a small config, composed from optax pieces.

``build_optimizer`` is ``chain(clip, adamw(schedule, decay mask), per-group scale)``; any optax
``GradientTransformation`` a user passes instead is used as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtune.models import stacking
from jaxtune.models.layers import VECTOR_LEAVES
from jaxtune.schema import check_fields

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
# The hyperparameters beyond the learning rate, schedule, decay and clipping that each optimizer
# reads: another one set (not left at its default) would be ignored, so it is refused instead.
READS = {"adamw": ("b1", "b2", "eps"), "adam": ("b1", "b2", "eps"), "lion": ("b1", "b2"),
         "sgd": ("momentum",), "adafactor": ()}
SCHEDULES = ("constant", "cosine", "linear")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What a recipe says about optimisation. ``group_lr`` multiplies the learning rate of a
    plan label group, e.g. ``{"head": 10.0}`` trains a new head 10x faster than the body. The
    groups are ``train``, ``lora`` (LoRA's and DoRA's A and B), ``dora`` (DoRA's magnitude vectors
    only), ``prompt`` and ``head``. Of ``b1``, ``b2``, ``eps`` and ``momentum`` each optimizer reads
    its own (:data:`READS`): another one set is an error, as is ``min_lr_ratio`` with ``constant``."""

    name: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9  # adamw, adam, lion
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd (torch.optim.SGD's default: none)
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    group_lr: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # The types a recipe's values are held to, before the ranges below (group_lr=[...] failed on .items()).
        check_fields(self, "optimizer")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name {self.name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        _check("learning_rate", self.learning_rate, "a number > 0, e.g. 1e-4", lambda v: v > 0)
        _check("weight_decay", self.weight_decay, "a number >= 0 (0 turns decay off), e.g. 0.01", lambda v: v >= 0)
        for name, typical in (("b1", 0.9), ("b2", 0.999), ("momentum", 0.9)):
            _check(name, getattr(self, name), f"a number in [0, 1), e.g. {typical}", lambda v: 0 <= v < 1)
        _check("eps", self.eps, "a number > 0, e.g. 1e-8", lambda v: v > 0)
        _check("warmup_steps", self.warmup_steps, "an integer >= 0", lambda v: v >= 0)
        _check("warmup_ratio", self.warmup_ratio, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _check("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1] (the final fraction of the learning rate)",
               lambda v: 0 <= v <= 1)
        if self.clip_grad_norm is not None:
            _check("clip_grad_norm", self.clip_grad_norm, "a number > 0, e.g. 1.0, or null for no clipping",
                   lambda v: v > 0)
        for group, multiplier in self.group_lr.items():
            _check(f"group_lr.{group}", multiplier, "a number > 0 (the group's learning-rate multiplier)",
                   lambda v: v > 0)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("b1", "b2", "eps", "momentum"):
            if name not in READS[self.name] and getattr(self, name) != defaults[name]:
                reads = ", ".join(READS[self.name]) or "none of b1, b2, eps, momentum"
                raise ValueError(f"optimizer.{name}={getattr(self, name)!r} is not used by optimizer {self.name!r} "
                                 f"(it reads {reads}); remove it or choose an optimizer that reads it")
        if self.schedule == "constant" and self.min_lr_ratio != defaults["min_lr_ratio"]:
            raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio!r} is not used by schedule 'constant' (it is "
                             "the floor that cosine and linear decay to); remove it or choose one of those")


def _check(name: str, value: float, expected: str, ok: Callable[[float], bool]) -> None:
    """``optimizer.<name>`` must be finite and pass ``ok``; the error says what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"optimizer.{name}: expected {expected}, got {value!r}")


def make_schedule(cfg: OptimizerConfig, total_steps: int, *, warn: bool = True) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then constant, cosine or linear decay to ``min_lr_ratio``.

    A warmup as long as the run or longer is cut to ``total_steps - 1`` steps (none for a 1-step run),
    with a warning unless ``warn`` is False (a trainer that only evaluates follows no schedule)."""
    total = max(int(total_steps), 1)
    # A ratio rounds up, as transformers' TrainingArguments.get_warmup_steps: a short run keeps some warmup.
    asked = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    # The last step is at the peak, so a warmup of the whole run is cut by one: a 1-step run keeps none
    # (transformers' would take its one step at a learning rate of 0), said so as every cut is.
    warmup = min(asked, total - 1)
    if warn and asked >= total:
        field = (f"warmup_steps {cfg.warmup_steps}" if cfg.warmup_steps
                 else f"warmup_ratio {cfg.warmup_ratio} ({asked} steps)")
        log.warning("optimizer.%s is not shorter than the run's %d steps: the warmup is cut to %d steps and the "
                    "learning rate does not decay; use a shorter warmup or more steps", field, total, warmup)
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(total - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(peak, floor, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup - 1), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices, not biases, norm scales or magnitudes."""
    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return name not in VECTOR_LEAVES and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_group(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its group's learning-rate multiplier (a tree of floats)."""

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class AdafactorState(NamedTuple):
    count: jax.Array  # steps taken, int32
    row: Any  # per leaf: the factored second moment's row means (..., in), or the full one for a vector
    col: Any  # per leaf: its column means (..., out), or an unused one-element array for a vector


def _stacked(path: tuple[Any, ...]) -> int:
    """1 for a leaf of a scanned run of layers (its leading axis is the layer), else 0."""
    return int(any(stacking.stack_range(str(getattr(k, "key", k))) is not None for k in path))


def _factored_axes(path: tuple[Any, ...], ndim: int) -> tuple[int, int] | None:
    """The two axes Adafactor factors a leaf's second moment over, as transformers factors the
    leaf's torch tensor over its last two; None for a vector (or a scalar), whose moment is kept whole.

    A matrix's are its two axes (a transposed torch ``Linear.weight`` factors the same way: the
    row-times-column estimate is symmetric). A convolution kernel (4 axes, stored as the full
    transpose of torch's ``(out, in, kh, kw)``, see :mod:`jaxtune.models.efficientnet`) has torch's
    ``kw`` and ``kh`` first: factoring its channels instead gave other steps than transformers'.
    """
    lead = _stacked(path)
    if ndim - lead < 2:
        return None
    kernel = getattr(path[-1], "key", None) == "kernel"
    return (lead, lead + 1) if kernel and ndim - lead == 4 else (ndim - 2, ndim - 1)


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1:]


def scale_by_adafactor(decay_rate: float = 0.8, eps: float = 1e-30, clip_threshold: float = 1.0
                       ) -> optax.GradientTransformation:
    """The update direction of transformers' ``Adafactor(scale_parameter=False, relative_step=False)``
    (what ``Trainer(optim="adafactor")`` builds), before the learning rate: a second moment factored
    into row and column means for every matrix (``1 - t^-0.8`` decay), the update clipped to RMS 1.

    Why not ``optax.adafactor``: it multiplies the step by each weight's RMS (a zero-initialised LoRA
    B would barely move), adds weight decay after the learning rate (1/lr times too strong), factors
    only dimensions of 128 or more, and takes a scanned run of layers as one tensor; here each layer
    of a stacked leaf (leading axis) gets its own moments and clipping, as its own torch parameter,
    and a convolution kernel is factored over its height and width, as torch's ``(out, in, kh, kw)``
    weight is (:func:`_factored_axes`).
    """

    def init(params: Any) -> AdafactorState:
        def row(path: tuple[Any, ...], p: Any) -> jax.Array:
            axes = _factored_axes(path, p.ndim)
            return jnp.zeros(_without(p.shape, axes[1]) if axes else p.shape, jnp.float32)

        def col(path: tuple[Any, ...], p: Any) -> jax.Array:
            axes = _factored_axes(path, p.ndim)
            # a vector's moment is whole (row) and its column factor unused: one element, not none,
            # because Orbax refuses to save a zero-size array (a run training a bias could not checkpoint)
            return jnp.zeros(_without(p.shape, axes[0]) if axes else (1,), jnp.float32)

        return AdafactorState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map_with_path(row, params),
                              jax.tree_util.tree_map_with_path(col, params))

    def update(updates: Any, state: AdafactorState, params: Any = None) -> tuple[Any, AdafactorState]:
        count = state.count + 1
        beta = 1.0 - count.astype(jnp.float32) ** -decay_rate

        def one(path: tuple[Any, ...], g: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, ...]:
            lead, factored = _stacked(path), _factored_axes(path, g.ndim)
            g32 = g.astype(jnp.float32)
            sq = g32 * g32 + eps
            if factored:
                a, b = factored  # row keeps a and averages b, col the reverse
                row = beta * row + (1 - beta) * sq.mean(b)
                col = beta * col + (1 - beta) * sq.mean(a)
                r = jax.lax.rsqrt(row / row.mean(a, keepdims=True))
                u = g32 * jnp.expand_dims(r, b) * jnp.expand_dims(jax.lax.rsqrt(col), a)
            else:
                row = beta * row + (1 - beta) * sq
                u = g32 * jax.lax.rsqrt(row)
            axes = tuple(range(lead, u.ndim))
            rms = jnp.sqrt(jnp.mean(u * u, axis=axes, keepdims=True)) if axes else jnp.abs(u)
            return (u / jnp.maximum(rms / clip_threshold, 1.0)).astype(g.dtype), row, col

        out = jax.tree_util.tree_map_with_path(one, updates, state.row, state.col)
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))  # noqa: E731
        return pick(0), AdafactorState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg: OptimizerConfig, total_steps: int, groups: Any | None = None, *,
                    warn: bool = True) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``total_steps`` steps and its learning-rate schedule.

    Args:
      groups: a tree of group labels with the trainable params' structure (from the plan), needed
        only when ``cfg.group_lr`` is set. An unknown group name is an error listing the groups.
      warn: warn of a warmup cut to fit the run (:func:`make_schedule`).
    """
    schedule = make_schedule(cfg, total_steps, warn=warn)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adam":  # weight decay as torch.optim.Adam's: L2, added to the gradient before Adam
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.adam(schedule, cfg.b1, cfg.b2, cfg.eps))
    elif cfg.name == "lion":
        core = optax.lion(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adafactor":  # transformers' Adafactor as its Trainer builds it; decay scaled by the lr
        core = optax.chain(scale_by_adafactor(), optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.scale_by_learning_rate(schedule))
    else:
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.sgd(schedule, momentum=cfg.momentum))  # a trace at 0 too: one state layout
    parts = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []
    parts.append(core)
    if cfg.group_lr:
        if groups is None:
            raise ValueError("optimizer.group_lr needs the plan's labels (groups) to know each parameter's group")
        known = set(jax.tree.leaves(groups))
        unknown = sorted(set(cfg.group_lr) - known)
        if unknown:
            raise ValueError(f"optimizer.group_lr: group(s) {unknown} are not in the plan; groups: {sorted(known)}")
        parts.append(scale_by_group(jax.tree.map(lambda g: float(cfg.group_lr.get(g, 1.0)), groups)))
    return optax.chain(*parts), schedule
