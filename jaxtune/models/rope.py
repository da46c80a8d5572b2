"""Rotary position embeddings: the rope dict of a Hugging Face ``config.json`` (every
``rope_type`` transformers has for these families: :data:`SUPPORTED_ROPE_TYPES`), its inverse
frequencies, and their rotation of queries and keys (:func:`apply_rope`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# Types whose frequencies depend on the length of the sequence a forward sees (its largest position + 1).
_LENGTH_DEPENDENT = ("dynamic", "longrope")
# The rope dict's fields each type cannot do without (yarn and longrope also need a factor or both lengths).
_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings",),
             "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def rope_parameters(hf: dict[str, Any], entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The RoPE dict of a ``config.json`` (``entry``, default: v5 ``rope_parameters`` or v4 ``rope_scaling``)
    with the config-level fields that transformers' RoPE reads folded in, so that
    :func:`rope_inverse_frequencies` needs nothing else: ``max_position_embeddings`` (``dynamic``; ``yarn``
    and ``longrope`` without a ``factor``), ``original_max_position_embeddings`` (``llama3``/``yarn``/
    ``longrope``: a top-level value wins, as in transformers' ``standardize_rope_params``; else the dict's;
    else ``max_position_embeddings``) and a top-level ``partial_rotary_factor``. ``rope_theta`` stays in it.
    """
    rope = dict(entry if entry is not None else (hf.get("rope_parameters") or hf.get("rope_scaling") or {}))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    longest = hf.get("max_position_embeddings")
    if kind in ("dynamic", "yarn", "longrope") and longest is not None:
        rope.setdefault("max_position_embeddings", longest)
    if kind in ("llama3", "yarn", "longrope"):
        if hf.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        elif longest is not None:
            rope.setdefault("original_max_position_embeddings", longest)
    # Lists (longrope's factors) as tuples, so that a config holding the dict's items stays hashable.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in rope.items()}


@dataclasses.dataclass(frozen=True)
class RopeFrequencies:
    """One layer's RoPE as :func:`apply_rope` reads it: the inverse frequencies for a forward of a
    given length, and the scale of cos/sin (``attention_scaling``, 1 except ``yarn``/``longrope``).

    ``scaling`` is the HF rope dict (:func:`rope_parameters`); each type computes exactly what
    ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` computes, in float32:

    - ``linear`` divides every frequency by ``factor``; ``llama3`` divides only the low frequencies and
      interpolates smoothly between; ``yarn`` blends interpolated and original frequencies by a linear
      ramp over the dimensions (``beta_fast``/``beta_slow``) and scales cos/sin by its attention factor.
    - ``longrope`` (Phi-3's "su") divides the frequencies by ``short_factor`` for a sequence no longer
      than ``original_max_position_embeddings`` and by ``long_factor`` beyond it, and scales cos/sin.
    - ``dynamic`` (NTK) raises the base once the sequence is longer than ``max_position_embeddings``.

    The *length* of a forward is its largest position + 1 over the whole batch, as transformers takes
    ``max(position_ids) + 1``. Under packing that is the longest document's length, not the packed row's,
    since positions restart at each document; with a KV cache it is the current total length, so keys
    cached earlier keep the rotation they were written with (as in transformers' cache). Two
    differences from transformers' stateful rotary module, which only ``dynamic`` and ``longrope``
    can show: transformers keeps ``dynamic`` frequencies it grew for a longer call until a call is
    shorter than ``max_position_embeddings``, where these depend on each call alone; and Phi-3's
    ``generate`` drops its cache and re-runs the whole sequence with the long factors once the length
    first exceeds ``original_max_position_embeddings``, where jaxtune's generation keeps its cache.
    """

    head_dim: int
    theta: float
    scaling: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        """Fail at the door, naming the field: an unsupported type, a missing field, factors of the wrong length."""
        kind = self.kind
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"config.json: rope type {kind!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        for name in _REQUIRED[kind]:
            self._get(name)
        if kind in ("yarn", "longrope") and self._get("factor", None) is None:
            self._get("max_position_embeddings")
        for name in ("short_factor", "long_factor") if kind == "longrope" else ():
            if len(self._get(name)) != self.rotary_dim // 2:
                raise ValueError(f"config.json: rope_parameters.{name} has {len(self._get(name))} entries; the rotary "
                                 f"dimension {self.rotary_dim} needs {self.rotary_dim // 2} (one per frequency)")

    @property
    def kind(self) -> str:
        params = dict(self.scaling)
        return params.get("rope_type", params.get("type", "default"))

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head rotate (``partial_rotary_factor`` of ``head_dim``)."""
        return int(self.head_dim * dict(self.scaling).get("partial_rotary_factor", 1.0))

    @property
    def length_dependent(self) -> bool:
        return self.kind in _LENGTH_DEPENDENT

    def _get(self, name: str, default: Any = ...) -> Any:
        value = dict(self.scaling).get(name, default)
        if value is ...:
            raise ValueError(f"config.json: rope type {self.kind!r} needs {name!r} in rope_parameters (or the config); "
                             "add it as transformers writes it")
        return value

    def _base(self) -> Array:
        """``theta ** (2i / d)`` for ``i < d / 2`` (``d`` the rotary dimension), float32."""
        dim = self.rotary_dim
        return self.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)

    def _max_factor(self) -> float:
        factor = self._get("factor", None)
        if factor is None:  # Phi-3 and DeepSeek give the ratio of the two lengths instead
            factor = self._get("max_position_embeddings") / self._get("original_max_position_embeddings")
        return float(factor)

    @property
    def attention_scaling(self) -> float:
        """The factor on cos and sin (transformers' ``attention_scaling``): both q and k are scaled by it."""
        kind = self.kind
        given = self._get("attention_factor", None)
        if kind == "yarn":
            if given is not None:
                return float(given)
            factor = self._max_factor()
            mscale, mscale_all = self._get("mscale", None), self._get("mscale_all_dim", None)

            def get_mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if mscale and mscale_all:
                return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
            return get_mscale(factor)
        if kind == "longrope":
            if given is not None:
                return float(given)
            factor, original = self._max_factor(), self._get("original_max_position_embeddings")
            return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return 1.0

    def inverse(self, seq_len: int | Array | None = None) -> Array:
        """Inverse frequencies ``(rotary_dim // 2,)`` float32 for a forward of ``seq_len`` tokens (an int or
        a traced scalar; None: a sequence of at most the original length, transformers' frequencies at init)."""
        kind = self.kind
        inv = 1.0 / self._base()
        if kind == "default":
            return inv
        if kind == "linear":
            return inv / self._get("factor")
        if kind == "llama3":
            factor = self._get("factor")
            low, high = self._get("low_freq_factor"), self._get("high_freq_factor")
            old_len = self._get("original_max_position_embeddings")
            wavelen = 2 * math.pi / inv
            scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            return jnp.where(medium, smoothed, scaled)
        if kind == "yarn":
            return self._yarn()
        if kind == "longrope":
            short = 1.0 / (jnp.asarray(self._get("short_factor"), jnp.float32) * self._base())
            long = 1.0 / (jnp.asarray(self._get("long_factor"), jnp.float32) * self._base())
            if seq_len is None:
                return short
            return jnp.where(seq_len > self._get("original_max_position_embeddings"), long, short)
        # dynamic: the base grows with the length beyond max_position_embeddings (None: that length).
        longest, factor, dim = self._get("max_position_embeddings"), self._get("factor"), self.rotary_dim
        length = longest if seq_len is None else jnp.maximum(jnp.asarray(seq_len, jnp.float32), longest)
        base = self.theta * ((factor * length / longest) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))

    def _yarn(self) -> Array:
        dim, base = self.rotary_dim, self.theta
        factor, original = self._max_factor(), self._get("original_max_position_embeddings")
        beta_fast, beta_slow = self._get("beta_fast", None) or 32, self._get("beta_slow", None) or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self._get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency; 0: interpolate (divide by factor)
        pos_freqs = self._base()
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> RopeFrequencies:
    """The RoPE of a layer with ``head_dim``-wide heads, base ``theta`` and HF's rope dict ``scaling``
    (:func:`rope_parameters`, or None) as a :class:`RopeFrequencies` that :func:`apply_rope` rotates by;
    its frequencies may depend on the call's positions (``dynamic``, ``longrope``). Raises ValueError
    naming the config field for an unsupported type or a missing field."""
    items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in (scaling or {}).items())
    return RopeFrequencies(head_dim, float(theta), tuple(sorted(items, key=lambda kv: kv[0])))


def apply_rope(x: Array, positions: Array, freqs: RopeFrequencies | Array) -> Array:
    """Rotate ``x`` ``(B, T, heads, head_dim)`` by ``positions`` ``(B, T)`` int (HF's half-split layout).

    ``freqs`` is a :class:`RopeFrequencies` (or plain inverse frequencies ``(rotary_dim // 2,)``); only the
    first ``rotary_dim`` dimensions of each head rotate (``partial_rotary_factor``), the rest pass through.
    """
    if not isinstance(freqs, RopeFrequencies):
        inv_freq, scale = freqs, 1.0
    else:
        seq_len = jnp.max(positions) + 1 if freqs.length_dependent else None
        inv_freq, scale = freqs.inverse(seq_len), freqs.attention_scaling
    rot = 2 * inv_freq.shape[-1]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, rot/2)
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32[..., :rot], 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x32[..., rot:]], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------- pooling
