"""Quantized frozen weights: a pytree node that stands where a ``kernel`` or ``embedding`` array
stood, and the arithmetic that reads it inside the matmul.

A :class:`QuantizedArray` holds integer (or fp8) ``codes`` and per-block ``scale`` (and an
optional per-block ``offset``); the value it stands for is::

    w = level(code) * scale + offset        (scale/offset repeated over `block` elements)

along one *block axis*: ``-2`` for a linear's ``kernel`` ``(..., in, out)`` (blocks run along
the input features, as bitsandbytes' and llama.cpp's blocks do along a PyTorch row), ``-1`` for
an ``embedding`` ``(..., vocab, features)``. ``scale`` and ``offset`` may themselves be
quantized (double quantisation; llama.cpp's K-quants keep 6/8-bit sub-block scales under one
fp16 super-block scale the same way). Every component keeps the weight's leading axes and
rank, so a stack of layers ``(L, in, out)`` slices and shards along axis 0 like an array, and a
sharding rule written for the kernel applies to each component.

Formats made here (``QUANTIZE``): ``int8`` (symmetric, one scale per output channel), ``fp8``
(float8 e4m3 codes, one scale per output channel), ``nf4`` (QLoRA's NormalFloat-4 levels,
absmax blocks of 64, two codes per byte) and ``nf4_dq`` (the same with the block scales
themselves quantized to int8 around their mean, groups of up to 256). ``jaxtune.models.gguf_quantized``
builds llama.cpp's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K blocks in the same form, bit for bit.

Why our own module rather than ``qwix`` (Google's JAX quantization library): qwix's ``QArray``
is close (codes shaped like the weight, sub-channel scales), but it has no double quantisation,
no exact affine blocks (llama.cpp's ``d * q + m`` is not qwix's ``(q - zero_point) * scale``),
and it stores 4-bit codes as ``jnp.uint4``, whose bytes on a device depend on the backend; here a
4-bit code is half a byte on every backend, so memory is what the arrays' ``nbytes`` say.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NF4 levels published with QLoRA (Dettmers et al. 2023, appendix E) and used by
# bitsandbytes: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_BLOCK = 64
DOUBLE_QUANT_GROUP = 256
FP8_MAX = 448.0  # largest finite float8_e4m3fn

QUANTIZE = ("int8", "fp8", "nf4", "nf4_dq")  # the formats a plan's ``quantize`` option names
KINDS = ("int", "nf4", "fp8")  # how a code maps to its level (see QuantizedArray)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("codes", "scale", "offset"),
                   meta_fields=("kind", "block", "pack", "zero", "axis", "dtype", "name"))
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized weight; see the module docstring for the value it stands for.

    Fields:
      codes: ``int8``/``uint8`` codes, one per element, or ``uint8`` bytes holding two 4-bit codes
        when ``pack`` is set; ``float8_e4m3fn`` for ``kind`` ``fp8``. Shape: the weight's, with the
        block axis halved when packed.
      scale: per-block scales, the weight's shape with the block axis divided by ``block``; an
        array (fp32/fp16) or a nested :class:`QuantizedArray` (double quantisation).
      offset: per-block offsets shaped like ``scale``, or None.
      kind: ``int`` (level = code - ``zero``), ``nf4`` (level = :data:`NF4_LEVELS` [code]) or ``fp8``.
      block: elements per scale along the block axis.
      pack: 0, or the group size ``P`` of packed 4-bit codes: in each group of ``P`` elements along
        the block axis, byte ``j`` holds element ``j`` in its low and ``j + P/2`` in its high nibble
        (llama.cpp's layout: ``P`` 32 for Q4_0/Q4_1, 64 for Q4_K; 64 for nf4).
      axis: the block axis, ``-2`` (kernels) or ``-1`` (embeddings).
      dtype: the dtype of the weight it replaces (what :func:`dequantize` returns by default).
      name: the format's name for reports (``nf4``, ``q4_k``, ...).
    """

    codes: Any
    scale: Any
    offset: Any = None
    kind: str = "int"
    block: int = 1
    pack: int = 0
    zero: int = 0
    axis: int = -2
    dtype: Any = jnp.float32
    name: str = "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (that of the weight it stands for)."""
        shape = list(self.codes.shape)
        if self.pack:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by all components (codes, scales, offsets, nested ones included)."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def nbytes(x: Any) -> int:
    """Bytes of an array or a :class:`QuantizedArray`."""
    return x.nbytes if is_quantized(x) else int(x.size) * jnp.dtype(x.dtype).itemsize


def format_name(x: Any) -> str:
    """``nf4``, ``q4_k``, ... for a quantized leaf; the dtype's name for an array."""
    return x.name if is_quantized(x) else str(jnp.dtype(x.dtype))


# ----------------------------------------------------------------------------- reading


def _levels(q: QuantizedArray, codes: Array) -> Array:
    if q.kind == "nf4":
        # A sum of (codes == code) * level: elementwise, it fuses into the dequantization (a gather
        # on XLA:CPU materialises int32 indices and its float output, 8 bytes per weight). Not
        # where(codes == code, level, ...): its levels broadcast to the weight's shape depend on
        # nothing, and under a layer scan JAX hoists them out of the loop as 16 float copies of
        # every kernel's shape.
        hits = [(codes == code).astype(jnp.float32) * level for code, level in enumerate(NF4_LEVELS.tolist())]
        return functools.reduce(jnp.add, hits)
    values = codes.astype(jnp.float32)
    return values - q.zero if q.zero else values


def _unpack(packed: Array, group: int) -> Array:
    """Two 4-bit codes per byte along axis -2 -> one uint8 code per element (see ``pack``)."""
    *lead, half, m = packed.shape
    b = packed.reshape(*lead, half * 2 // group, 1, group // 2, m)
    return jnp.concatenate([b & 0xF, b >> 4], axis=-3).reshape(*lead, half * 2, m)


def pack_nibbles(codes: Array, group: int) -> Array:
    """Inverse of unpacking: codes ``< 16`` along axis -2 (a multiple of ``group``) -> bytes."""
    *lead, n, m = codes.shape
    c = codes.astype(jnp.uint8).reshape(*lead, n // group, 2, group // 2, m)
    return (c[..., 0, :, :] | (c[..., 1, :, :] << 4)).reshape(*lead, n // 2, m)


def _float(x: Any) -> Array:
    return dequantize(x, jnp.float32) if is_quantized(x) else x.astype(jnp.float32)


def dequantize(q: QuantizedArray, dtype: Any = None) -> Array:
    """The weight ``q`` stands for, in ``dtype`` (default: ``q.dtype``); computed in float32.

    Only this weight is materialised: called inside a step, XLA keeps it as a temporary of the
    matmul that reads it (see :func:`dot`), never a second copy of the whole model.
    """
    dtype = q.dtype if dtype is None else dtype
    codes = jnp.moveaxis(q.codes, q.axis, -2)
    if q.pack:
        codes = _unpack(codes, q.pack)
    values = _levels(q, codes)
    *lead, n, m = values.shape
    values = values.reshape(*lead, n // q.block, q.block, m)
    values = values * jnp.moveaxis(_float(q.scale), q.axis, -2)[..., None, :]
    if q.offset is not None:
        values = values + jnp.moveaxis(_float(q.offset), q.axis, -2)[..., None, :]
    return jnp.moveaxis(values.reshape(*lead, n, m), -2, q.axis).astype(dtype)


def as_float(w: Any, dtype: Any) -> Array:
    """``w`` in ``dtype``: an array cast, a :class:`QuantizedArray` dequantized."""
    return dequantize(w, dtype) if is_quantized(w) else w.astype(dtype)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every :class:`QuantizedArray` dequantized (to ``dtype``, default its own)."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def transpose(q: QuantizedArray) -> QuantizedArray:
    """The transpose of a 2-D quantized weight (every component, nested ones too): ``(out, in)``
    with blocks along -1 becomes a kernel ``(in, out)`` with blocks along -2, and back."""
    def swap(x: Any) -> Any:
        if is_quantized(x):
            return transpose(x)
        return None if x is None else x.swapaxes(-1, -2)

    return dataclasses.replace(q, codes=swap(q.codes), scale=swap(q.scale), offset=swap(q.offset),
                               axis=-1 if q.axis == -2 else -2)


def take(w: Any, ids: Array, dtype: Any) -> Array:
    """Rows ``ids`` of an embedding table ``(V, D)`` in ``dtype`` -> ``ids.shape + (D,)``; a
    quantized table (block axis -1) is gathered quantized, so only the rows are dequantized."""
    if not is_quantized(w):
        return jnp.take(w, ids, axis=0).astype(dtype)
    if w.axis != -1:
        raise ValueError("a quantized embedding needs its blocks along the feature axis (axis -1)")
    rows = jax.tree.map(lambda a: jnp.take(a, ids.reshape(-1), axis=0), w)
    return dequantize(rows, dtype).reshape(*ids.shape, w.shape[-1])


def dot(x: Array, w: Any, dtype: Any, transpose: bool = False) -> Array:
    """``x @ w`` (or ``x @ w.T``) in ``dtype`` for ``x`` ``(N, in)`` and a kernel ``(in, out)``
    (``(out, in)`` with ``transpose``), plain or quantized.

    A quantized kernel is dequantized inside the product and again in the backward pass
    (a custom VJP whose residual is the quantized weight itself), so autodiff never saves a
    full-precision copy of a frozen weight between the forward and backward passes; each
    dequantization depends on the matmul's input (:func:`_tied`), so it runs next to its matmul
    (checked by the compiled program's temporaries in tests/test_quant.py).
    """
    if not is_quantized(w):
        w = w.astype(dtype)
        return x @ (w.T if transpose else w)
    return _qdot(x.astype(dtype), w, transpose)


def _tied(q: QuantizedArray, x: Array) -> QuantizedArray:
    """``q`` with its codes made to depend on ``x`` (``+ int(0 * x[0, 0])``; XLA does not fold a
    float times zero). Without a data dependency XLA computes every dequantization as soon as the
    params exist (they depend on nothing else), holding all of them at once, and merges (CSE) the
    backward pass's dequantization with the forward's, keeping it alive in between: a float copy of
    the model. ``jax.lax.optimization_barrier`` prevents neither on XLA:CPU (it is expanded away
    before CSE)."""
    first = x.reshape(-1)[0]
    # 0 * inf is NaN: a non-finite first input would make every float8 code NaN (every row), not its own row
    tie = (jnp.where(jnp.isfinite(first), first, 0) * 0).astype(q.codes.dtype)
    return dataclasses.replace(q, codes=q.codes + tie)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qdot(x: Array, q: QuantizedArray, transpose: bool) -> Array:
    return _qdot_value(x, q, transpose)


def _qdot_value(x: Array, q: QuantizedArray, transpose: bool) -> Array:
    w = dequantize(_tied(q, x), x.dtype)
    return x @ (w.T if transpose else w)


def _qdot_fwd(x: Array, q: QuantizedArray, transpose: bool) -> tuple[Array, QuantizedArray]:
    return _qdot_value(x, q, transpose), q


def _qdot_bwd(transpose: bool, q: QuantizedArray, g: Array) -> tuple[Array, QuantizedArray]:
    w = dequantize(_tied(q, g), g.dtype)
    dx = g @ (w if transpose else w.T)
    return dx, _frozen_cotangent(q)


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def ragged_dot(x: Array, w: Any, group_sizes: Array, dtype: Any) -> Array:
    """``jax.lax.ragged_dot`` of rows ``x`` ``(N, in)`` sorted by group and a stack of kernels
    ``(E, in, out)`` (a mixture-of-experts layer's), plain or quantized, in ``dtype``: a quantized
    stack is dequantized inside the product and again in the backward pass, as :func:`dot`, so the
    experts (most of such a model's bytes) are not held in full precision between the passes."""
    if not is_quantized(w):
        return jax.lax.ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes)
    return _qragged(x.astype(dtype), w, group_sizes)


@jax.custom_vjp
def _qragged(x: Array, q: QuantizedArray, group_sizes: Array) -> Array:
    return jax.lax.ragged_dot(x, dequantize(_tied(q, x), x.dtype), group_sizes)


def _qragged_fwd(x: Array, q: QuantizedArray, group_sizes: Array) -> tuple[Array, tuple[QuantizedArray, Array]]:
    return _qragged(x, q, group_sizes), (q, group_sizes)


def _qragged_bwd(res: tuple[QuantizedArray, Array], g: Array) -> tuple[Array, QuantizedArray, np.ndarray]:
    q, group_sizes = res
    w = dequantize(_tied(q, g), g.dtype)
    dx = jax.lax.ragged_dot(g, jnp.swapaxes(w, -1, -2), group_sizes)
    return dx, _frozen_cotangent(q), np.zeros(group_sizes.shape, jax.dtypes.float0)


_qragged.defvjp(_qragged_fwd, _qragged_bwd)


def _frozen_cotangent(q: QuantizedArray) -> QuantizedArray:
    """A quantized weight is frozen: its cotangent is zero (float0 for integer codes)."""
    return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
                        else jnp.zeros_like(a), q)


# ----------------------------------------------------------------------------- making


def _blocks(x: Array, block: int) -> Array:
    """``(..., n, m)`` -> ``(..., n / block, block, m)``."""
    *lead, n, m = x.shape
    return x.reshape(*lead, n // block, block, m)


def _group(n: int, want: int) -> int:
    """The largest divisor of ``n`` that is at most ``want``."""
    return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _absmax_scale(x: Array, block: int, top: float) -> tuple[Array, Array]:
    """(scale ``(..., n/block, m)`` = absmax / top, x divided by it blockwise); all-zero blocks get
    scale 0 and codes 0."""
    absmax = jnp.max(jnp.abs(_blocks(x, block)), axis=-2)
    scale = absmax / top
    safe = jnp.where(scale == 0, 1.0, scale)
    return scale, (_blocks(x, block) / safe[..., None, :]).reshape(x.shape)


def _int8(x: Array, block: int) -> QuantizedArray:
    scale, normed = _absmax_scale(x, block, 127.0)
    codes = jnp.clip(jnp.round(normed), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes, scale, kind="int", block=block, name="int8")


def _fp8(x: Array, block: int) -> QuantizedArray:
    scale, normed = _absmax_scale(x, block, FP8_MAX)
    return QuantizedArray(normed.astype(jnp.float8_e4m3fn), scale, kind="fp8", block=block, name="fp8")


def nf4_codes(normed: Array) -> Array:
    """Nearest NF4 level index (uint8) of values in [-1, 1]; a value exactly between two levels
    takes the lower one, as bitsandbytes' comparisons do."""
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = jnp.zeros(normed.shape, jnp.uint8)
    for mid in midpoints:  # 15 comparisons: no (size x 16) distance table
        codes = codes + (normed > mid).astype(jnp.uint8)
    return codes


def _nf4(x: Array, block: int) -> QuantizedArray:
    scale, normed = _absmax_scale(x, block, 1.0)
    return QuantizedArray(pack_nibbles(nf4_codes(normed), block), scale, kind="nf4", block=block, pack=block,
                          name="nf4")


def _double(scale: Array) -> QuantizedArray:
    """Block scales ``(..., nb, m)`` as int8 around their group mean (QLoRA's double quantisation:
    groups of up to 256 scales, each with a float32 scale and mean)."""
    group = _group(scale.shape[-2], DOUBLE_QUANT_GROUP)
    mean = jnp.mean(_blocks(scale, group), axis=-2)
    centred = (_blocks(scale, group) - mean[..., None, :]).reshape(scale.shape)
    inner = _int8(centred, group)
    return dataclasses.replace(inner, offset=mean)


@functools.partial(jax.jit, static_argnames=("fmt", "axis"))
def _quantize(w: Array, fmt: str, axis: int) -> QuantizedArray:
    x = jnp.moveaxis(w.astype(jnp.float32), axis, -2)
    n = x.shape[-2]
    if fmt == "int8":
        q = _int8(x, n)
    elif fmt == "fp8":
        q = _fp8(x, n)
    else:
        q = _nf4(x, NF4_BLOCK)
        if fmt == "nf4_dq":
            q = dataclasses.replace(q, scale=_double(q.scale), name="nf4_dq")
    moved = _with_axis(jax.tree.map(lambda a: jnp.moveaxis(a, -2, axis), q), axis)
    return dataclasses.replace(moved, dtype=jnp.dtype(w.dtype))


def _with_axis(q: Any, axis: int) -> Any:
    """``q`` (and its nested scale/offset) marked with block axis ``axis``."""
    if not is_quantized(q):
        return q
    return dataclasses.replace(q, scale=_with_axis(q.scale, axis), offset=_with_axis(q.offset, axis), axis=axis)


def quantize(w: Array, fmt: str, axis: int = -2) -> QuantizedArray:
    """``w`` quantized in format ``fmt`` (one of :data:`QUANTIZE`) with blocks along ``axis``.

    ``int8``/``fp8``: one absmax scale per output channel (the whole block axis). ``nf4``: absmax
    blocks of 64; ``nf4_dq`` quantizes those scales again. Leading axes (a layer stack) are kept.
    Raises ValueError when the block axis is not a multiple of the nf4 block.
    """
    if fmt not in QUANTIZE:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {', '.join(QUANTIZE)}")
    if w.ndim < 2:
        raise ValueError(f"only matrices are quantized, got shape {tuple(w.shape)}")
    if fmt.startswith("nf4") and w.shape[axis] % NF4_BLOCK:
        raise ValueError(f"{w.shape[axis]} features along the block axis are not a multiple of the nf4 block "
                         f"{NF4_BLOCK}; quantize this weight as int8 or fp8, or leave it unquantized")
    return _quantize(w, fmt, axis % w.ndim - w.ndim)


def block_axis(leaf_name: str) -> int:
    """The block axis of a quantized leaf: ``-1`` for an ``embedding`` (rows are gathered),
    ``-2`` for a ``kernel`` (blocks along the input features)."""
    return -1 if leaf_name == "embedding" else -2
