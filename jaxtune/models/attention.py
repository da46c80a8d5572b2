"""Attention and its kernels by backend: one entry point, :func:`dot_product_attention`, that every
model family calls with its segment ids, causality, sliding window, score scale and soft-cap.

Which kernel runs is decided by :func:`attention_kernel` from static facts only (backend, shapes,
dtype, the mask's form), so the choice is testable anywhere:

==========  =================================================================================
backend     kernel
==========  =================================================================================
CPU         the fused kernel of :mod:`jaxtune.models.cpu_attention` (flash attention in C++ through
            XLA's FFI, built at first use; per shard on a mesh) for self-attention from segment ids,
            with or without a sliding window, soft-capping or dropout; otherwise :func:`grouped_attention`:
            rank-3 batched matmuls per (batch x KV head) group (XLA:CPU runs the rank-5 dots of the
            generic path about 2x slower); causal rows in query blocks that skip the masked keys,
            and flash attention's backward.
GPU         cuDNN fused (flash) attention. Packed rows reach it as per-segment lengths and
            offsets (cuDNN's packed layout: no ``T x T`` mask is built); causality and a causal
            sliding window are kernel flags.
TPU         Pallas splash attention with segment ids and a causal / local (sliding-window)
            mask; soft-capping inside the kernel; rows padded to its tiles of 128.
==========  =================================================================================

Where the backend's kernel cannot take the inputs (float32 on a GPU, a head dim cuDNN refuses,
soft-capping on a GPU, keys of another length than the queries' that splash cannot tile, a dense
mask given by the caller),
the XLA path with a dense mask runs instead and a one-line notice says why, once per reason.
Dropout on the attention probabilities (BERT's ``attention_probs_dropout_prob`` in training) runs
in the fused CPU kernel or else in :func:`grouped_attention`, both with one mask, a hash of the
caller's key and the positions (:func:`jaxtune.models.dropout.attention_keep`); the GPU and TPU
kernels take none, so there it runs the grouped attention.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import cpu_attention
from jaxtune.models.dropout import attention_keep

Array = jax.Array
# A sliding window: ``w`` is the query itself and the ``w - 1`` keys before it (Mistral, Gemma 2);
# ``(left, right)`` the keys at most ``left`` before and ``right`` after it (ModernBERT's local layers).
Window = int | tuple[int, int] | None

log = logging.getLogger(__name__)

GROUPED, XLA, CUDNN, SPLASH, CPU_FUSED = "grouped", "xla", "cudnn", "splash", "cpu-fused"
KERNELS = (GROUPED, XLA, CUDNN, SPLASH, CPU_FUSED)

# cuDNN flash attention (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention): 16-bit
# inputs; head dim a multiple of 8, at most 256 on Hopper and later, 128 before; the packed layout
# (per-segment offsets) needs Hopper.
CUDNN_DTYPES = ("bfloat16", "float16")
HOPPER = (9, 0)
# Splash attention tiles the sequence in blocks of a multiple of 128 (the TPU lane width).
SPLASH_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The kernel :func:`attention_kernel` picked and, when it is not the backend's own kernel,
    ``notice``: the one line that says why."""

    kernel: str
    notice: str | None = None


def attention_kernel(
    backend: str, *, causal: bool, window: Window, segments: bool, softcap: float | None, dtype: Any,
    head_dim: int, seq_len: int, dense_mask: bool = False, gpu_capability: tuple[int, int] | None = None,
    dropout: bool = False, self_attention: bool = True, cpu_kernel: bool = False,
) -> KernelChoice:
    """Which attention kernel runs for these inputs; pure, so it can be tested on any machine.

    ``backend`` is ``jax.default_backend()`` (``cpu``, ``gpu``, ``tpu``); ``segments`` says the rows
    carry segment ids (packing or padding); ``dense_mask`` that the caller passes a ready mask
    (KV-cache decoding); ``seq_len`` is the key length; ``gpu_capability`` the CUDA compute
    capability (None: not a CUDA GPU, so no cuDNN); ``dropout`` that the probabilities get dropout;
    ``self_attention`` that queries and keys are the same tokens; ``cpu_kernel`` that the fused CPU
    kernel is built here (:func:`jaxtune.models.cpu_attention.available`).
    """
    if backend == "cpu":
        fused = cpu_kernel and cpu_attention.supports(head_dim=head_dim, self_attention=self_attention,
                                                      dense_mask=dense_mask)
        return KernelChoice(CPU_FUSED if fused else GROUPED)
    if dropout:
        return KernelChoice(GROUPED, "attention: dropout on the attention probabilities (training) has no fused "
                                     "kernel here; using the grouped attention with a dense mask")
    if dense_mask:
        return _fallback(softcap, "the caller gave a dense mask (KV-cache decoding; otherwise pass segment_ids)")
    if backend == "gpu":
        return _gpu_kernel(causal, window, segments, softcap, jnp.dtype(dtype), head_dim, gpu_capability)
    if backend == "tpu":
        if seq_len % SPLASH_BLOCK and not self_attention:  # self-attention is padded to splash's tiles
            return _fallback(softcap, f"splash attention tiles by {SPLASH_BLOCK}; key length {seq_len} is "
                                      f"not a multiple")
        return KernelChoice(SPLASH)
    return _fallback(softcap, f"no fused kernel for backend {backend!r}")


def _gpu_kernel(causal: bool, window: Window, segments: bool, softcap: float | None, dtype: np.dtype,
                head_dim: int, capability: tuple[int, int] | None) -> KernelChoice:
    if capability is None:
        return _fallback(softcap, "cuDNN attention needs a CUDA GPU")
    if softcap is not None:
        return _fallback(softcap, "cuDNN attention has no logit soft-capping")
    if dtype.name not in CUDNN_DTYPES:
        return _fallback(softcap, f"cuDNN attention needs bfloat16/float16 inputs, not {dtype.name} "
                                  "(model.dtype: bfloat16)")
    limit = 256 if capability >= HOPPER else 128
    if head_dim % 8 or head_dim > limit:
        return _fallback(softcap, f"cuDNN attention needs a head dim that is a multiple of 8 and at most {limit}, "
                                  f"not {head_dim}")
    if window is not None and not causal:
        return _fallback(softcap, "cuDNN attention takes a sliding window only with causal attention")
    if segments and capability < HOPPER:
        return _fallback(softcap, "cuDNN's packed layout (segment ids) needs a Hopper or later GPU, "
                                  f"not compute capability {capability[0]}.{capability[1]}")
    return KernelChoice(CUDNN)


def _fallback(softcap: float | None, why: str) -> KernelChoice:
    # Soft-capping needs the capped scores, which jax.nn.dot_product_attention cannot give.
    kernel = GROUPED if softcap is not None else XLA
    return KernelChoice(kernel, f"attention: {why}; using the {kernel} attention with a dense mask")


_NOTICED: set[str] = set()


def _notice(line: str) -> None:
    """Log ``line`` the first time it comes up in this process (it comes up once per traced layer)."""
    if line not in _NOTICED:
        _NOTICED.add(line)
        log.warning(line)


def _backend() -> str:
    return jax.default_backend()


def _gpu_capability() -> tuple[int, int] | None:
    """The first device's CUDA compute capability, None when it is not a CUDA GPU."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "").lower():
        return None
    major, minor = str(getattr(device, "compute_capability", "0.0")).split(".")[:2]
    return int(major), int(minor)


# ----------------------------------------------------------------------------- entry point


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Array | None = None, *, segment_ids: Array | None = None,
    causal: bool, window: Window = None, scale: float | None = None, logit_cap: float | None = None,
    dropout_rate: float = 0.0, dropout_rng: Array | None = None,
) -> Array:
    """Multi-head attention with grouped-query heads, on the backend's kernel.

    Shapes: ``q`` ``(B, T, N, H)``, ``k``/``v`` ``(B, S, K, H)`` with ``N % K == 0`` (GQA) ->
    ``(B, T, N, H)``. Either ``segment_ids`` ``(B, T)`` int (packed documents, 0 on padding: no
    query attends to a padding key; self-attention, so ``S == T``) or a ready boolean ``mask``
    broadcastable to ``(B, 1, T, S)`` (KV-cache decoding), or neither. ``window`` (:data:`Window`) restricts the keys
    a query sees around itself. Scores are ``q . k * scale`` (default ``H ** -0.5``),
    soft-capped by ``logit_cap`` (:func:`softcap`) before masking. Outputs at padding queries are not
    defined (no loss or pooling reads them). Segments must be contiguous runs, as packing writes them.
    ``dropout_rate`` > 0 with a ``dropout_rng`` key drops attention probabilities (training), as
    :func:`grouped_attention` does.
    """
    if mask is not None and segment_ids is not None:
        raise ValueError("dot_product_attention: pass segment_ids or a dense mask, not both")
    dropout = dropout_rate > 0 and dropout_rng is not None
    backend = _backend()
    choice = attention_kernel(
        backend, causal=causal, window=window, segments=segment_ids is not None, softcap=logit_cap,
        dtype=q.dtype, head_dim=q.shape[-1], seq_len=k.shape[1], dense_mask=mask is not None,
        gpu_capability=_gpu_capability() if backend == "gpu" else None, dropout=dropout,
        self_attention=q.shape[1] == k.shape[1], cpu_kernel=backend == "cpu" and cpu_attention.available())
    if choice.notice:
        _notice(choice.notice)
    if choice.kernel == CUDNN:
        try:
            return cudnn_attention(q, k, v, segment_ids, causal=causal, window=window, scale=scale)
        except (NotImplementedError, RuntimeError) as refusal:  # jax's own checks, raised while tracing
            _notice(f"attention: cuDNN refused these inputs ({refusal}); using the xla attention with a dense mask")
            choice = KernelChoice(XLA)
    if choice.kernel == CPU_FUSED:
        ids = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        rows = functools.partial(cpu_attention.attention, causal=causal, scale=scale,
                                 window=None if window is None else window_bounds(window, causal),
                                 logit_cap=logit_cap, dropout_rate=dropout_rate if dropout else 0.0,
                                 dropout_rng=dropout_rng)
        return _per_shard(rows, q.shape[0], k.shape[2], heads_axis=2, offsets=True)(q, k, v, ids)
    if choice.kernel == SPLASH:
        return splash_attention(q, k, v, segment_ids, causal=causal, window=window, scale=scale, logit_cap=logit_cap)
    own_mask = mask is None  # built here from segment ids, causality and window: self-attention
    if mask is None and (segment_ids is not None or (choice.kernel == GROUPED and (causal or window is not None))):
        ids = segment_ids if segment_ids is not None else jnp.ones((1, q.shape[1]), jnp.int32)
        mask = attention_mask(ids, causal=causal, window=window)
    if choice.kernel == GROUPED:
        blocks = own_mask and causal  # a caller's mask (KV-cache decoding) has no causal structure to skip
        return grouped_attention(q, k, v, mask, scale=scale, logit_cap=logit_cap,
                                 dropout_rate=dropout_rate if dropout else 0.0, dropout_rng=dropout_rng,
                                 causal=blocks, window=window if blocks else None)
    if mask is None:  # plain causality and windows as flags
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            local_window_size=_local_window(window, causal, k.shape[1]),
                                            implementation="xla")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


# ----------------------------------------------------------------------------- reference (CPU) kernel


def softcap(x: Array, cap: float | None) -> Array:
    """Soft-capping ``cap * tanh(x / cap)`` (Gemma 2's attention scores and final logits): smooth,
    and bounded to ``(-cap, cap)``. ``cap`` None returns ``x`` unchanged; shape and dtype are kept."""
    if cap is None:
        return x
    return (jnp.tanh(x / cap) * cap).astype(x.dtype)


def attention_mask(segment_ids: Array | None, *, causal: bool, window: Window = None) -> Array | None:
    """Boolean mask ``(B, 1, T, T)``: True where a query may attend to a key.

    ``segment_ids`` ``(B, T)`` int: tokens attend only within their own segment (packed
    documents), and segment 0 marks padding, which no query attends to. ``window`` (:data:`Window`)
    restricts the keys a query sees around itself (sliding-window attention). Returns None
    when there are no segment ids.
    """
    if segment_ids is None:
        return None
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = mask & (segment_ids[:, None, None, :] != 0)
    t = segment_ids.shape[1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    if causal:
        mask = mask & (k <= q)[None, None]
    if window is not None:
        left, right = window_bounds(window, causal)
        mask = mask & (q - k <= left)[None, None]
        if right is not None:
            mask = mask & (k - q <= right)[None, None]
    return mask


def window_bounds(window: Window, causal: bool) -> tuple[int, int | None]:
    """A window as ``(left, right)``: how many keys before and after a query it sees (right None: all)."""
    left, right = window if isinstance(window, tuple) else (window - 1, None)
    return left, 0 if causal else right


def _local_window(window: Window, causal: bool, length: int) -> tuple[int, int] | None:
    """``window`` as ``jax.nn.dot_product_attention``'s ``local_window_size``."""
    if window is None:
        return None
    left, right = window_bounds(window, causal)
    return left, length if right is None else right


def grouped_attention(q: Array, k: Array, v: Array, mask: Array | None, *, scale: float | None = None,
                      logit_cap: float | None = None, dropout_rate: float = 0.0,
                      dropout_rng: Array | None = None, causal: bool = False, window: Window = None) -> Array:
    """Softmax attention as rank-3 batched matmuls over ``B*K`` (batch x KV head) groups.

    The ``G = N / K`` query heads that share a KV head are stacked along the query axis, so
    keys and values are never repeated. Scores and softmax are float32 (whatever the input
    dtype); masked scores get the float32 minimum, so a fully masked row (padding) averages
    the values instead of producing NaN. Shapes, ``scale`` and ``logit_cap`` as
    :func:`dot_product_attention`; ``mask`` broadcastable to ``(B, 1, T, S)``.

    ``causal`` (self-attention whose ``mask`` is already causal, ``window`` its causal sliding
    window): queries go in blocks of :data:`QUERY_BLOCK`, and each block reads only the keys it can
    see (up to its last query; from its first query's window start), so the masked triangle is
    not computed: at 1,024 tokens that is ~45 % of the scores. The gradient is flash attention's
    (:func:`_attend`): the probabilities are recomputed from each row's saved maximum and sum
    instead of being kept for the backward pass, which halves the step's temporaries.

    ``dropout_rate`` > 0 (with ``dropout_rng``) zeroes each probability with that chance and
    scales the rest by ``1 / (1 - rate)``, as ``torch.nn.functional.dropout`` on BERT's
    attention probabilities; which are kept is :func:`~jaxtune.models.dropout.attention_keep` of
    the positions (heads in query-head order), computed per block, so it does not depend on how the
    heads are grouped or the queries blocked, and equals the fused CPU kernel's.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    scale = h ** -0.5 if scale is None else scale
    if causal and s != t:
        raise ValueError(f"grouped_attention: causal blocks need self-attention (T == S), got T={t}, S={s}")
    left = window_bounds(window, True)[0] if causal and window is not None else None
    outs = []
    for start in range(0, t, QUERY_BLOCK if causal else t):
        stop = min(t, start + QUERY_BLOCK) if causal else t
        first, last = (max(0, start - left) if left is not None else 0, stop) if causal else (0, s)
        rows, keys = slice(start, stop), slice(first, last)
        qg = q[:, rows].reshape(b, stop - start, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b * kv, -1, h)
        kf, vf = (x[:, keys].transpose(0, 2, 1, 3).reshape(b * kv, last - first, h) for x in (k, v))
        block_mask = None if mask is None else _rows_and_keys(mask, rows, keys)[:, :, None]  # (B|1, 1, 1, Tb, Sb)
        block_keep = None if not dropout_rate > 0 else attention_keep(
            dropout_rng, dropout_rate, (b, n, stop - start, last - first), first=(0, 0, start, first)
        ).reshape(b * kv, g * (stop - start), -1)
        out = _attend(qg, kf, vf, block_mask, block_keep, scale, logit_cap, dropout_rate, (b, kv, g))
        outs.append(out.reshape(b, kv, g, stop - start, h).transpose(0, 3, 1, 2, 4).reshape(b, stop - start, n, h))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


# Queries per block of the causal CPU attention. The tiny-Llama LoRA step (2 cores, rows of 1,024 tokens)
# took 0.71x the unblocked step's time with blocks of 128, 0.73x with 256, 0.80x with 64.
QUERY_BLOCK = 128


def _rows_and_keys(mask: Array, rows: slice, keys: slice) -> Array:
    """``mask[:, :, rows, keys]`` where those axes are full size; a broadcast (size-1) axis stays."""
    return mask[:, :, rows if mask.shape[2] > 1 else slice(None), keys if mask.shape[3] > 1 else slice(None)]


def _scores(qg: Array, kf: Array, mask: Array | None, scale: float, cap: float | None,
            groups: tuple[int, int, int]) -> tuple[Array, Array]:
    """Masked float32 scores ``(B*K, G*T, S)``, and the scaled ones before capping (for its gradient)."""
    raw = jnp.einsum("xqh,xsh->xqs", qg, kf, preferred_element_type=jnp.float32) * scale
    scores = softcap(raw, cap)
    if mask is not None:
        x, q, s = scores.shape
        scores = jnp.where(mask, scores.reshape(*groups, q // groups[2], s), jnp.finfo(jnp.float32).min)
        scores = scores.reshape(x, q, s)
    return scores, raw


def _dropped(p: Array, keep: Array | None, rate: float) -> Array:
    return p if keep is None else jnp.where(keep, p / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attend(qg: Array, kf: Array, vf: Array, mask: Array | None, keep: Array | None, scale: float,
            cap: float | None, rate: float, groups: tuple[int, int, int]) -> Array:
    """One block of grouped attention: ``qg`` ``(B*K, G*Tb, H)``, ``kf``/``vf`` ``(B*K, Sb, H)``, ``mask``
    broadcastable to ``(B, K, G, Tb, Sb)``, ``keep`` ``(B*K, G*Tb, Sb)`` bool or None -> ``(B*K, G*Tb, H)``
    in ``vf``'s dtype; ``groups`` is ``(B, K, G)``."""
    return _attend_forward(qg, kf, vf, mask, keep, scale, cap, rate, groups)[0]


def _attend_forward(qg: Array, kf: Array, vf: Array, mask: Array | None, keep: Array | None, scale: float,
                    cap: float | None, rate: float, groups: tuple[int, int, int]) -> tuple[Array, tuple]:
    scores, _ = _scores(qg, kf, mask, scale, cap, groups)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("xqs,xsh->xqh", _dropped(e, keep, rate).astype(vf.dtype), vf,
                     preferred_element_type=jnp.float32) / total
    out = out.astype(vf.dtype)
    return out, (qg, kf, vf, mask, keep, out, top, total)


def _attend_backward(scale: float, cap: float | None, rate: float, groups: tuple[int, int, int],
                     residuals: tuple, d_out: Array) -> tuple[Array, Array, Array, None, None]:
    qg, kf, vf, mask, keep, out, top, total = residuals
    scores, raw = _scores(qg, kf, mask, scale, cap, groups)
    p = jnp.exp(scores - top) / total  # the forward's probabilities, recomputed
    dv = jnp.einsum("xqs,xqh->xsh", _dropped(p, keep, rate).astype(vf.dtype), d_out.astype(vf.dtype))
    dp = _dropped(jnp.einsum("xqh,xsh->xqs", d_out, vf, preferred_element_type=jnp.float32), keep, rate)
    # Softmax's backward: sum_j p_j dp_j is the row's d_out . out (dropout included).
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = p * (dp - row) * scale
    if cap is not None:  # d/dx cap * tanh(x / cap); from the uncapped scores (masked entries have p = 0)
        ds = ds * (1.0 - jnp.square(jnp.tanh(raw / cap)))
    ds = ds.astype(qg.dtype)
    dq = jnp.einsum("xqs,xsh->xqh", ds, kf).astype(qg.dtype)
    dk = jnp.einsum("xqs,xqh->xsh", ds, qg)
    return dq, dk.astype(kf.dtype), dv.astype(vf.dtype), None, None


_attend.defvjp(_attend_forward, _attend_backward)


# ----------------------------------------------------------------------------- GPU: cuDNN


def packed_segments(segment_ids: Array, max_segments: int | None = None) -> tuple[Array, Array]:
    """Segment ids ``(B, T)`` as cuDNN's packed layout: ``(lengths (B, M), offsets (B, M + 1))`` int32.

    Each maximal run of one nonzero id is a segment: ``offsets[b, j]`` is where row ``b``'s ``j``-th
    segment starts and ``lengths[b, j]`` its length; unused entries are -1 (padding, id 0, is in no
    segment). ``M`` defaults to ``T``, the most a row can hold, so no segment is ever dropped.
    """
    b, t = segment_ids.shape
    m = t if max_segments is None else max_segments
    real = segment_ids != 0
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = real & (segment_ids != previous)
    run = jnp.where(real, jnp.cumsum(starts, axis=1) - 1, m)  # a token's segment index; m: none (dropped)

    def row(starts_row: Array, run_row: Array) -> tuple[Array, Array]:
        offsets = jnp.nonzero(starts_row, size=m, fill_value=-1)[0].astype(jnp.int32)
        lengths = jnp.zeros((m,), jnp.int32).at[run_row].add(1, mode="drop")
        return jnp.where(offsets >= 0, lengths, -1), offsets

    lengths, offsets = jax.vmap(row)(starts, run)
    return lengths, jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1)


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
                    window: Window, scale: float | None) -> Array:
    """cuDNN fused attention (GPU only; shapes and arguments as :func:`dot_product_attention`).

    Without segment ids this is ``jax.nn.dot_product_attention(implementation="cudnn")``. With them,
    the rows go to cuDNN's packed layout through jax's cuDNN module (the public function takes
    only one length per row): each segment attends within itself, causally when ``causal``, and
    padding is in no segment. Outputs at padding queries are zeroed, since cuDNN does not write them.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            local_window_size=_local_window(window, causal, k.shape[1]),
                                            implementation="cudnn")
    # Private (jax 0.10): the only entry that takes per-segment offsets; pinned by its tests.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_sdpa

    lengths, offsets = packed_segments(segment_ids)
    out = cudnn_sdpa(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                     scale=scale, mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING,
                     sliding_window_length=None if window is None else window_bounds(window, causal)[0] + 1)
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------- TPU: splash


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
                     window: Window, scale: float | None, logit_cap: float | None = None,
                     interpret: bool | None = None) -> Array:
    """Pallas splash attention (arguments and shapes as :func:`dot_product_attention`; ``T`` and ``S``
    multiples of 128, or ``T == S``: self-attention of any length runs padded to a multiple of 128,
    the padding keys in segment 0, which no real query sees). Segment ids and the causal /
    sliding-window mask are applied inside the kernel block by block, skipping fully masked blocks;
    GQA heads share their KV head without copies. ``interpret`` (default: when :func:`_backend` is
    not a TPU's) runs the kernel in Pallas' interpreter, on any backend.

    Padding queries (id 0) attend to other padding keys here; their outputs are not defined.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    length = q.shape[1]
    ids = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    if length % SPLASH_BLOCK and length == k.shape[1]:
        # A prompt-tuned row (virtual tokens + a multiple of 128) or a ViT's patches + [CLS]: a few
        # padding keys cost far less than the dense-mask attention the kernel's tiles would otherwise force.
        extra = ((0, 0), (0, -length % SPLASH_BLOCK))
        q, k, v = (jnp.pad(x, (*extra, (0, 0), (0, 0))) for x in (q, k, v))
        ids = jnp.pad(ids, extra)
    b, t, n, h = q.shape
    s = k.shape[1]
    if t % SPLASH_BLOCK or s % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs sequence lengths that are multiples of {SPLASH_BLOCK}, or "
                         f"self-attention, not {t} (queries) and {s} (keys)")
    shape = (t, s)
    if window is not None:
        head_mask = splash.LocalMask(shape, window_bounds(window, causal), offset=0)
    elif causal:
        head_mask = splash.CausalMask(shape)
    else:
        head_mask = splash.FullMask(shape)
    block_q, block_kv = _splash_block(t), _splash_block(s)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    interpret = _backend() != "tpu" if interpret is None else interpret
    scale = h ** -0.5 if scale is None else scale
    # The kernel takes one row, heads first: (N, T, H) queries over (K, S, H) keys and values.
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def rows(qh: Array, kh: Array, vh: Array, ids: Array) -> Array:
        # Built here, for the heads this device holds (all of them unless a mesh splits the heads).
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([head_mask] * qh.shape[1]), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            attn_logits_soft_cap=logit_cap, interpret=interpret)
        return jax.vmap(lambda q_, k_, v_, i: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(i, i)))(qh, kh, vh, ids)

    return _per_shard(rows, b, k.shape[2])(qh, kh, vh, ids).transpose(0, 2, 1, 3)[:, :length]


# The mesh axes jaxtune shards the batch and the heads over (jaxtune.training.sharding, layers.partition_rules).
BATCH_AXES, HEAD_AXIS = ("data", "fsdp", "expert"), "tensor"


def batch_axes(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The axes of ``mesh`` (concrete or abstract) a batch's rows split over, in :data:`BATCH_AXES` order."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """How many ways ``mesh`` splits a batch's rows (the product of :func:`batch_axes`' sizes); a
    global batch must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _per_shard(rows: Any, batch: int, kv_heads: int, heads_axis: int = 1, offsets: bool = False) -> Any:
    """``rows`` run on each device's shard of a multi-device mesh in context (``jax.set_mesh``): a
    Pallas kernel or an FFI call is opaque to XLA's partitioner, which would otherwise gather the whole
    batch onto every device. Rows (axis 0) split over the batch axes and heads (``heads_axis`` of q, k,
    v and the output) over the tensor axis, where they divide. With ``offsets``, ``rows`` is also
    called with ``first_row=`` and ``first_head=``: where its shard's rows and query heads start in
    the whole batch (0 and 0 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return rows
    sizes = dict(mesh.shape)
    rows_over = () if batch % data_parallel_size(mesh) else tuple(a for a in batch_axes(mesh) if sizes[a] > 1)
    heads = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 and kv_heads % sizes[HEAD_AXIS] == 0 else None
    qkv = jax.sharding.PartitionSpec(rows_over or None, *[None] * (heads_axis - 1), heads)
    ids = jax.sharding.PartitionSpec(rows_over or None)
    body = rows
    if offsets:
        def body(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
            # axis_index over several axes is the shard's index in the row-major order that
            # PartitionSpec((a, b)) splits a dimension in.
            row = jax.lax.axis_index(rows_over) * q.shape[0] if rows_over else 0
            head = jax.lax.axis_index(heads) * q.shape[heads_axis] if heads else 0
            return rows(q, k, v, segment_ids, first_row=row, first_head=head)
    mapped = jax.shard_map(body, in_specs=(qkv, qkv, qkv, ids), out_specs=qkv, check_vma=False)
    explicit = {a for a, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if kind == jax.sharding.AxisType.Explicit}
    if not explicit:
        return mapped

    def resharded(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
        # Explicit axes (jax.make_mesh's default): shard_map takes inputs only as its in_specs shard
        # them, so they move there first; the output goes back to q's sharding, as the XLA path leaves it.
        inputs = (jax.sharding.reshard(x, _only_axes(spec, explicit))
                  for x, spec in zip((q, k, v, segment_ids), (qkv, qkv, qkv, ids), strict=True))
        return jax.sharding.reshard(mapped(*inputs), jax.typeof(q).sharding.spec)

    return resharded


def _only_axes(spec: jax.sharding.PartitionSpec, axes: set[str]) -> jax.sharding.PartitionSpec:
    """``spec`` naming only the mesh axes in ``axes`` (``reshard`` takes no Auto axis of a mixed mesh)."""
    def kept(entry: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        names = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in axes)
        return names[0] if len(names) == 1 else names or None

    return jax.sharding.PartitionSpec(*(kept(entry) for entry in spec))


def _splash_block(length: int) -> int:
    """The largest of 512, 256 and 128 that divides ``length`` (larger blocks: fewer grid steps)."""
    return next(size for size in (512, 256, SPLASH_BLOCK) if length % size == 0)
