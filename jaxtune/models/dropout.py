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

Attention probabilities (``(B, N, T, S)`` per layer, the largest masks by far) are dropped by
:func:`attention_keep` instead: a hash of each probability's position, so any block of the mask (a
query tile in a kernel, a shard of a mesh) is computed where it is used, nothing of size ``T x S`` is
drawn or kept for the backward, and the fused CPU kernel and the XLA attention drop the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_UNITS = 1 << 16  # the resolution of a keep decision


def drop_threshold(rate: float) -> int:
    """``rate`` in units of 2^-16: a 16-bit draw below it drops its element. Every dropout of jaxtune
    (these masks and the fused CPU attention kernel's) decides at this resolution."""
    return round(rate * _UNITS)


def drops_all(rate: float) -> bool:
    """Whether ``rate`` drops every element: it rounds to 2^16 (``rate >= 1 - 2^-17``), which no 16-bit
    draw is below. The fused CPU kernel's threshold stops at 2^16 - 1, so its caller handles this case."""
    return drop_threshold(rate) >= _UNITS


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


def _fmix(h: Array) -> Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def attention_seed(key: Array) -> Array:
    """The two ``uint32`` words ``(2,)`` drawn from ``key`` that :func:`attention_keep`'s hash starts
    from; the fused CPU kernel is handed the same words, so both paths drop the same probabilities."""
    return jax.random.bits(key, (2,), jnp.uint32)


def attention_keep(key: Array, rate: float, shape: tuple[int, int, int, int],
                   first: Sequence[Array | int] = (0, 0, 0, 0)) -> Array:
    """Which attention probabilities dropout keeps: booleans ``shape`` = ``(B, N, T, S)`` (batch row,
    query head, query, key), the block of the whole batch's mask that starts at ``first`` on those axes.

    Probability ``(b, n, i, j)`` is kept when the top 16 bits of ``fmix(j * 0x9E3779B9 ^ r)`` are at
    least :func:`drop_threshold` of ``rate``, where ``r`` mixes two words drawn from ``key`` with ``b``,
    ``n`` and ``i`` in turn (murmur3's finaliser ``fmix`` each time; the constants are the fused CPU
    kernel's, which computes this function in C++). Each probability is kept with chance ``1 - rate``
    (to 2^-16) independently of its neighbours (tested); the mask is the same on every path, block
    and shard, so a resumed run drops the same probabilities whichever attention runs."""
    seed = attention_seed(key)
    u32 = jnp.uint32

    def positions(axis: int) -> Array:  # (1, .., size, .., 1): the row hashes are computed once per row
        along = tuple(size if a == axis else 1 for a, size in enumerate(shape))
        return lax.broadcasted_iota(u32, along, axis) + jnp.asarray(first[axis]).astype(u32)

    rows, heads, queries, keys = (positions(axis) for axis in range(4))
    x = _fmix(seed[0] ^ _fmix(rows * u32(0x9E3779B9) + seed[1]))
    x = _fmix(x ^ (heads * u32(0x85EBCA6B) + u32(0x165667B1)))
    row = _fmix(x + queries * u32(0xC2B2AE35))
    return (_fmix((keys * u32(0x9E3779B9)) ^ row) >> 16) >= u32(drop_threshold(rate))


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
