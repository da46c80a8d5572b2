"""The KV cache of the decoder families and the attention step that reads and writes it.

Generation (:mod:`jaxtune.models.generate`) prefills a :class:`KVCache` with the prompts and then
adds one token per step; each layer sees its :class:`LayerCache` slice. :func:`attend` is the
causal self-attention every decoder family's attention module calls, with a cache (decoding: the
new keys and values written at the cache's index, a mask in cache coordinates) or without one
(training and scoring: packed segment ids, the backend's fused kernel); :func:`rope_attend` is the
RoPE + attention-dropout + :func:`attend` sequence between a family's projections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.layers import (
    Array,
    attention_dropout_key,
    dot_product_attention,
)
from jaxtune.models.rope import apply_rope, rope_inverse_frequencies

if TYPE_CHECKING:  # the config's module imports this one
    from jaxtune.models.decoder import DecoderConfig


class LayerCache(NamedTuple):
    """One layer's slice of a :class:`KVCache`, as the families' attention modules read it."""

    k: Array  # (B, S, num_kv_heads, head_dim)
    v: Array  # (B, S, num_kv_heads, head_dim)
    index: Array  # () int32
    start: Array  # (B,) int32


class KVCache(NamedTuple):
    """Keys and values of every layer for incremental decoding with :meth:`~jaxtune.models.decoder.Decoder.decode`
    (a pytree).

    ``k``/``v``: one ``(L, B, S, num_kv_heads, head_dim)`` array per run of layers the model scans
    (``cfg.layer_runs``, ``L`` layers each), in the compute dtype, ``S`` the maximum total length;
    keys are stored after RoPE. ``index`` ``()`` int32: the slot the next token goes to, the same
    for every row because batched prompts are left-padded. ``start`` ``(B,)`` int32: each row's
    first real slot; the left padding before it is never attended to.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    index: Array
    start: Array

    @property
    def max_length(self) -> int:
        """Cache slots per row (``S``)."""
        return self.k[0].shape[2]


def init_cache(cfg: DecoderConfig, batch: int, max_length: int, start: Array | None = None) -> KVCache:
    """An empty cache of ``max_length`` slots per row; ``start`` ``(B,)`` is each row's left-padding length."""

    def zeros() -> tuple[Array, ...]:  # distinct buffers, so that a jitted step may donate them
        return tuple(jnp.zeros((stop - first, batch, max_length, cfg.num_kv_heads, cfg.head_dim), cfg.compute_dtype)
                     for first, stop in cfg.layer_runs)

    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32), start)


def cache_attention_mask(index: Array, start: Array, t: int, s: int, window: int | None) -> Array:
    """Boolean mask ``(B, 1, T, S)`` for ``T`` new tokens at slots ``index..index+T-1`` over ``S`` cache slots.

    A query sees the real slots (``>= start``) up to its own, which also excludes slots not
    written yet, and with a ``window`` only the last ``window`` of them: left padding is
    contiguous, so slot distance is position distance. A padding query sees itself, so no softmax
    row is empty (its output is never read).
    """
    query = index + jnp.arange(t)[:, None]
    key = jnp.arange(s)[None, :]
    mask = ((key <= query)[None] & (key >= start[:, None, None])) | (key == query)[None]
    if window is not None:
        mask = mask & (query - key < window)[None]
    return mask[:, None]


def attend(
    q: Array, k: Array, v: Array, segment_ids: Array | None, window: int | None, cache: LayerCache | None, *,
    scale: float | None = None, logit_cap: float | None = None, dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, tuple[Array, Array] | None]:
    """Causal self-attention of RoPE'd ``q`` ``(B, T, N, H)`` over ``k``/``v`` ``(B, T, K, H)``, with or
    without a KV cache: the step every decoder family's attention shares.

    Without a cache, ``segment_ids`` (or None) give the packing/padding mask; returns ``(out, None)``.
    With one, the new keys/values are written at ``cache.index`` and the queries attend to the whole
    cache; returns ``(out, (k, v))`` with the updated cache arrays. ``out`` is ``(B, T, N, H)``;
    ``scale``/``logit_cap``/``dropout_rate``/``dropout_rng`` as
    :func:`~jaxtune.models.layers.dot_product_attention` (dropout only without a cache: training).
    """
    if cache is None:
        return dot_product_attention(q, k, v, segment_ids=segment_ids, causal=True, window=window, scale=scale,
                                     logit_cap=logit_cap, dropout_rate=dropout_rate, dropout_rng=dropout_rng), None
    at = (0, cache.index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
    v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
    mask = cache_attention_mask(cache.index, cache.start, q.shape[1], k.shape[1], window)
    # The mask carries causality (and the window) in cache coordinates.
    out = dot_product_attention(q, k, v, mask, causal=False, scale=scale, logit_cap=logit_cap)
    return out, (k, v)


def rope_attend(
    module: nn.Module, cfg: DecoderConfig, q: Array, k: Array, v: Array, positions: Array,
    segment_ids: Array | None, window: int | None, cache: LayerCache | None, deterministic: bool, *,
    rope: tuple[float, tuple[tuple[str, Any], ...] | None] | None = None, scale: float | None = None,
    logit_cap: float | None = None,
) -> tuple[Array, tuple[Array, Array] | None]:
    """What a decoder family's attention does between its q/k/v projections and its output projection:
    RoPE on ``q`` ``(B, T, N, H)`` and ``k`` ``(B, T, K, H)`` at ``positions`` ``(B, T)`` (unless
    ``cfg.rope`` is off: SmolLM3's NoPE layers), then :func:`attend` with ``cfg.attention_dropout``
    (its key drawn from ``module``'s ``dropout`` stream in training, never with a cache).

    ``rope`` ``(theta, scaling)`` replaces ``cfg.rope_theta``/``cfg.rope_scaling`` (Gemma 3's local
    layers); ``scale``/``logit_cap`` as :func:`attend`. Returns the heads merged, ``(B, T, N * H)``,
    and :func:`attend`'s updated cache arrays (None without a cache).
    """
    if cfg.rope:
        theta, scaling = (cfg.rope_theta, cfg.rope_scaling) if rope is None else rope
        inv_freq = rope_inverse_frequencies(cfg.head_dim, theta, dict(scaling or ()))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    key = attention_dropout_key(module, cfg.attention_dropout, deterministic or cache is not None)
    out, kv = attend(q, k, v, segment_ids, window, cache, scale=scale, logit_cap=logit_cap,
                     dropout_rate=cfg.attention_dropout, dropout_rng=key)
    return out.reshape(*out.shape[:2], -1), kv
