"""Optimizers and schedules from a small config, composed from optax pieces.

``build_optimizer`` is ``chain(clip, adamw(schedule, decay mask), per-group scale)``; any optax
``GradientTransformation`` a user passes instead is used as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtune.models.layers import LORA_SCALE, MAGNITUDE

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
# Leaves that are scales or offsets, not weight matrices: decaying them toward 0 hurts.
_NO_DECAY_LEAVES = ("bias", "scale", MAGNITUDE, LORA_SCALE)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What a recipe says about optimisation. ``group_lr`` multiplies the learning rate of a
    plan label group, e.g. ``{"head": 10.0}`` trains a new head 10x faster than the body. The
    groups are ``train``, ``lora`` (LoRA's and DoRA's A and B), ``dora`` (DoRA's magnitude vectors
    only), ``prompt`` and ``head``."""

    name: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    group_lr: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name {self.name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        _check("learning_rate", self.learning_rate, "a number > 0, e.g. 1e-4", lambda v: v > 0)
        _check("weight_decay", self.weight_decay, "a number >= 0 (0 turns decay off), e.g. 0.01", lambda v: v >= 0)
        for name, typical in (("b1", 0.9), ("b2", 0.999)):
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


def _check(name: str, value: float, expected: str, ok: Callable[[float], bool]) -> None:
    """``optimizer.<name>`` must be finite and pass ``ok``; the error says what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"optimizer.{name}: expected {expected}, got {value!r}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then constant, cosine or linear decay to ``min_lr_ratio``."""
    total = max(int(total_steps), 1)
    # A ratio rounds up, as transformers' TrainingArguments.get_warmup_steps: a short run keeps some warmup.
    warmup = min(cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total), total - 1) if total > 1 else 0
    if cfg.warmup_steps >= total > 1:
        log.warning("optimizer.warmup_steps %d is not shorter than the run's %d steps: the warmup is cut to %d steps "
                    "and the learning rate does not decay; use fewer warmup steps or more steps",
                    cfg.warmup_steps, total, warmup)
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
        return name not in _NO_DECAY_LEAVES and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_group(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update leaf by its group's learning-rate multiplier (a tree of floats)."""

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg: OptimizerConfig, total_steps: int,
                    groups: Any | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``total_steps`` steps and its learning-rate schedule.

    Args:
      groups: a tree of group labels with the trainable params' structure (from the plan), needed
        only when ``cfg.group_lr`` is set. An unknown group name is an error listing the groups.
    """
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adam":  # weight decay as torch.optim.Adam's: L2, added to the gradient before Adam
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.adam(schedule, cfg.b1, cfg.b2, cfg.eps))
    elif cfg.name == "lion":
        core = optax.lion(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adafactor":
        # Always a rate (0.0 too): None would drop a chain element, and a weight_decay changed on resume
        # would then not fit the saved optimizer state.
        core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay, weight_decay_mask=decay_mask)
    else:
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.sgd(schedule, momentum=cfg.b1))
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
