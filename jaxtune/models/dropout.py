"""Dropout from 16 random bits per element instead of 32: half the threefry work of a training step's masks.

``jax.random.bernoulli`` draws a float32 uniform per element, 32 random bits, and on XLA:CPU the
threefry counter hash that makes them is a visible part of a small model's step (MiniLM's hidden and
attention-probability dropout draw ~20M elements a step). A keep decision needs far fewer bits: here
each 32-bit word gives two elements, its low and high halves, compared with ``rate`` in units of
2^-16. The drop probability is ``round(rate * 65536) / 65536`` (0.1 -> 0.100006), within 8e-6 of
``rate`` for every rate; kept values are scaled by ``1 / (1 - rate)``, as ``torch.nn.functional.dropout``.

The bits stay threefry's, so a mask is a pure function of the key and the shape: the same on any
mesh and any number of devices (what exact resume and the sharding tests rely on). Halves go to
neighbouring elements of the last axis, so a mask sharded along any axis is drawn where it is used.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_UNITS = 1 << 16  # the resolution of a keep decision


def drop_threshold(rate: float) -> int:
    """``rate`` in units of 2^-16: a 16-bit draw below it drops its element. Every dropout of jaxtune
    (these masks and the fused CPU attention kernel's) decides at this resolution."""
    return round(rate * _UNITS)


def keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """Booleans of ``shape``, each True (kept) with probability ``1 - rate`` (to 2^-16), from
    ``ceil(last / 2)`` threefry words per row of the last axis.

    Args:
      key: a PRNG key.
      rate: the drop probability, in [0, 1).
      shape: the mask's shape; a scalar shape is treated as ``(1,)`` and reshaped back.
    """
    full = tuple(shape) or (1,)
    *lead, last = full
    words = jax.random.bits(key, (*lead, (last + 1) // 2), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(*lead, -1)[..., :last]
    return (halves >= jnp.uint32(drop_threshold(rate))).reshape(shape)


def dropout(x: Array, rate: float, key: Array, shape: tuple[int, ...] | None = None) -> Array:
    """``x`` with each element zeroed with probability ``rate`` and the rest scaled by ``1 / (1 - rate)``;
    ``shape`` (default ``x.shape``) is the mask's, broadcast against ``x`` (``(B, 1, 1, 1)``: whole examples)."""
    if rate == 0.0:
        return x
    keep = keep_mask(key, rate, x.shape if shape is None else shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dropout(nn.Module):
    """``flax.linen.Dropout``'s interface (``rate``; ``deterministic`` here or at the call; bits from
    the ``dropout`` RNG stream) with :func:`keep_mask`'s 16-bit draws."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))
