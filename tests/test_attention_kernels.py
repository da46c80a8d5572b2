"""Attention kernels by backend: which kernel runs for which inputs (a table, checked on any
machine), the fallback notice, cuDNN's packed layout built from segment ids, the fused CPU kernel
(built here) and Pallas splash attention (the TPU kernel, run here in Pallas interpret mode) against
the reference attention on packed rows, forward and gradients, alone, per shard and inside a model."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention, cpu_attention, hf
from jaxtune.models.attention import (
    CPU_FUSED,
    CUDNN,
    GROUPED,
    SPLASH,
    XLA,
    attention_kernel,
    attention_mask,
    grouped_attention,
    packed_segments,
    splash_attention,
)
from jaxtune.models.decoder import Decoder, DecoderConfig
from jaxtune.models.dropout import attention_keep

BF16, F32 = jnp.bfloat16, jnp.float32
H100, A100 = (9, 0), (8, 0)
BASE = dict(causal=True, window=None, segments=True, softcap=None, dtype=BF16, head_dim=128, seq_len=4096,
            gpu_capability=H100)

# (backend, changes to BASE) -> (kernel, words of the notice, or None: the backend's own kernel, no notice)
SELECTION = [
    ("cpu", {}, GROUPED, None),  # the fused kernel not built
    ("cpu", dict(softcap=50.0, dtype=F32, dense_mask=True), GROUPED, None),
    ("cpu", dict(cpu_kernel=True), CPU_FUSED, None),
    ("cpu", dict(cpu_kernel=True, causal=False, dtype=F32, head_dim=24), CPU_FUSED, None),
    ("cpu", dict(cpu_kernel=True, dropout=True, causal=False), CPU_FUSED, None),  # BERT in training
    ("cpu", dict(cpu_kernel=True, softcap=50.0, window=4096), CPU_FUSED, None),  # Gemma 2
    ("cpu", dict(cpu_kernel=True, window=4096), CPU_FUSED, None),  # Mistral
    ("cpu", dict(cpu_kernel=True, causal=False, window=(64, 64), dropout=True), CPU_FUSED, None),  # ModernBERT
    ("cpu", dict(cpu_kernel=True, dense_mask=True), GROUPED, None),  # KV-cache decoding
    ("cpu", dict(cpu_kernel=True, head_dim=12), GROUPED, None),
    ("cpu", dict(cpu_kernel=True, self_attention=False), GROUPED, None),
    ("gpu", {}, CUDNN, None),  # packed causal bf16 on Hopper: cuDNN's packed layout
    ("gpu", dict(segments=False, window=4096), CUDNN, None),
    ("gpu", dict(causal=False), CUDNN, None),  # a padded / packed encoder
    ("gpu", dict(dtype=jnp.float16, head_dim=256), CUDNN, None),
    ("gpu", dict(segments=False, gpu_capability=A100), CUDNN, None),
    ("gpu", dict(gpu_capability=A100), XLA, "Hopper"),  # packed layout needs Hopper
    ("gpu", dict(dtype=F32), XLA, "bfloat16/float16"),
    ("gpu", dict(head_dim=80 + 4), XLA, "multiple of 8"),
    ("gpu", dict(head_dim=256, gpu_capability=A100, segments=False), XLA, "at most 128"),
    ("gpu", dict(causal=False, window=128), XLA, "only with causal"),
    ("gpu", dict(causal=False, window=(64, 64)), XLA, "only with causal"),
    ("gpu", dict(softcap=50.0), GROUPED, "soft-capping"),  # Gemma 2 on a GPU
    ("gpu", dict(gpu_capability=None), XLA, "CUDA GPU"),  # ROCm: no cuDNN
    ("gpu", dict(dense_mask=True, segments=False), XLA, "dense mask"),
    ("tpu", {}, SPLASH, None),
    ("tpu", dict(window=4096, softcap=50.0), SPLASH, None),  # Gemma 2 on a TPU: capped inside splash
    ("tpu", dict(causal=False, segments=True), SPLASH, None),
    ("tpu", dict(dtype=F32, head_dim=64), SPLASH, None),
    ("tpu", dict(seq_len=100), SPLASH, None),  # padded to 128 (a prompt-tuned row, a ViT's patches)
    ("tpu", dict(seq_len=100, self_attention=False), XLA, "multiple"),
    ("tpu", dict(seq_len=100, softcap=30.0, self_attention=False), GROUPED, "multiple"),
    ("tpu", dict(dense_mask=True), XLA, "dense mask"),
    ("tpu", dict(causal=False, window=(64, 64)), SPLASH, None),  # ModernBERT's local layers
    ("cpu", dict(dropout=True), GROUPED, None),
    ("gpu", dict(causal=False, dropout=True), GROUPED, "dropout"),  # BERT in training
    ("tpu", dict(causal=False, dropout=True), GROUPED, "dropout"),
]


@pytest.mark.parametrize(("backend", "changes", "kernel", "notice"), SELECTION)
def test_kernel_selection(backend, changes, kernel, notice):
    choice = attention_kernel(backend, **{**BASE, **changes})
    assert choice.kernel == kernel
    if notice is None:
        assert choice.notice is None
    else:
        assert notice in choice.notice and f"using the {kernel} attention" in choice.notice


def _qkv(key: int, b: int, t: int, n: int, kv: int, h: int, dtype=F32) -> tuple[jax.Array, ...]:
    ks = jax.random.split(jax.random.key(key), 3)
    return tuple(jax.random.normal(k, (b, t, heads, h), dtype) for k, heads in zip(ks, (n, kv, kv), strict=True))


def test_probability_dropout_with_grouped_query_heads_equals_the_closed_form():
    """Dropout on the probabilities with 2 query heads per KV head: softmax, then each probability
    kept as ``attention_keep`` of the key says (query-head order) and scaled by 1 / (1 - rate), against
    numpy with the KV heads repeated."""
    q, k, v = _qkv(0, 2, 6, 4, 2, 8)
    ids = jnp.array([[1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 0]], jnp.int32)
    mask = attention_mask(ids, causal=False)
    key, rate = jax.random.key(7), 0.25
    out = np.asarray(grouped_attention(q, k, v, mask, dropout_rate=rate, dropout_rng=key))
    keep = np.asarray(attention_keep(key, rate, (2, 4, 6, 6)))
    qn, kn, vn = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, T, H)
    kn, vn = np.repeat(kn, 2, axis=1), np.repeat(vn, 2, axis=1)
    scores = np.where(np.asarray(mask), qn @ kn.transpose(0, 1, 3, 2) / np.sqrt(8), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True) * keep / (1 - rate)
    expected = (probs @ vn).transpose(0, 2, 1, 3)
    real = np.asarray(ids != 0)
    np.testing.assert_allclose(out[real], expected[real], atol=1e-5)
    plain = np.asarray(grouped_attention(q, k, v, mask))
    assert not np.allclose(out[real], plain[real], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(grouped_attention(q, k, v, mask, dropout_rate=0.0, dropout_rng=key)),
                                  plain)


def _plain_attention(q, k, v, mask, *, cap=None, rate=0.0, rng=None, keep=None):
    """Softmax attention as plainly as it is written (KV heads repeated, jax.nn.softmax, autodiff): the
    reference for the CPU kernels' query blocks and recomputing backwards. Dropout keeps ``keep``
    ``(B, N, T, S)`` if given, else ``attention_keep`` of ``rng``."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    scores = attention.softcap(jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, g, 2)) * h ** -0.5, cap)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    if rate:
        keep = attention_keep(rng, rate, probs.shape) if keep is None else keep
        probs = jnp.where(keep, probs / (1 - rate), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, g, 2))


def _assert_same_attention(ours, reference, qkv, ids, weights, *, out_atol: float, grad_atol: float) -> None:
    """``ours(q, k, v)`` equals ``reference(q, k, v)`` on real tokens (padding outputs are undefined), and so
    do the gradients of ``sum(out * weights)`` (weights zero on padding, as the losses read it)."""
    def loss(fn):
        def value(*x):
            out = fn(*x)
            return jnp.sum(out * weights), out

        return jax.jit(jax.value_and_grad(value, (0, 1, 2), has_aux=True))

    (_, out), grads = loss(ours)(*qkv)
    (_, expected), expected_grads = loss(reference)(*qkv)
    real = np.asarray(ids != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=out_atol)
    for name, a, b in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=grad_atol, err_msg=f"d{name}")


# (causal, window, soft-cap, dropout rate): decoders (full, sliding window, Gemma 2's cap) and encoders
BLOCK_CASES = [(True, None, None, 0.0), (True, 21, None, 0.0), (True, None, 5.0, 0.0), (True, None, None, 0.2),
               (False, None, None, 0.1), (False, (9, 12), 3.0, 0.0)]


@pytest.mark.parametrize(("causal", "window", "cap", "rate"), BLOCK_CASES)
def test_cpu_attention_blocks_and_backward_equal_plain_attention(monkeypatch, causal, window, cap, rate):
    """The CPU kernel in query blocks of 16 (a row of 70: four full blocks and a short one; each block
    reads only the keys it can see) with its own backward (probabilities recomputed from each row's
    maximum and sum) gives plain softmax attention's outputs and gradients, on packed rows with padding."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    q, k, v = _qkv(5, 2, 70, 4, 2, 8)
    ids = jnp.asarray(np.stack([np.r_[np.ones(25), 2 * np.ones(35), np.zeros(10)], np.ones(70)]), jnp.int32)
    mask = attention_mask(ids, causal=causal, window=window)
    weights = jax.random.normal(jax.random.key(6), q.shape) * (ids != 0)[:, :, None, None]  # padding is not read
    rng = jax.random.key(7)

    def ours(q, k, v):
        return grouped_attention(q, k, v, mask, logit_cap=cap, dropout_rate=rate, dropout_rng=rng, causal=causal,
                                 window=window if causal else None)

    _assert_same_attention(ours, lambda q, k, v: _plain_attention(q, k, v, mask, cap=cap, rate=rate, rng=rng),
                           (q, k, v), ids, weights, out_atol=1e-5, grad_atol=1e-5)


needs_cpu_kernel = pytest.mark.skipif(not cpu_attention.available() and not __import__("os").environ.get("CI"),
                                      reason="no C++ compiler here to build the fused CPU attention kernel")

# (batch, tokens, query heads, KV heads, head dim, causal, rows): rows "packed" = two documents then
# padding in row 0, one document in the others; "padded" = padding at the end of row 0; "one" = no ids;
# "split" = a segment on both sides of padding (prompt tuning's virtual tokens before a left-padded text).
FUSED_CASES = [(2, 70, 4, 2, 8, True, "packed"), (3, 45, 6, 3, 24, False, "padded"), (1, 100, 4, 1, 64, True, "one"),
               (2, 33, 2, 2, 16, False, "packed"), (1, 96, 8, 4, 32, True, "packed"), (2, 50, 4, 2, 8, True, "split"),
               (2, 70, 2, 1, 16, False, "split")]


def _rows(kind: str, b: int, t: int) -> jax.Array:
    ids = np.ones((b, t), np.int32)
    if kind == "packed":
        ids[0, t // 3:] = 2
        ids[0, t - t // 5:] = 0
    elif kind == "padded":
        ids[0, t - t // 4:] = 0
    elif kind == "split":
        ids[:, 3:40] = 0
        ids[1, 45:] = 2
    return jnp.asarray(ids)


@needs_cpu_kernel
@pytest.mark.parametrize(("b", "t", "n", "kv", "h", "causal", "rows"), FUSED_CASES)
def test_fused_cpu_attention_equals_plain_attention(b, t, n, kv, h, causal, rows):
    """The C++ kernel (query tiles and key blocks that do not divide the row, grouped query heads, MQA,
    head dims with and without a 16-wide remainder, packed documents whose other blocks it skips) gives
    plain softmax attention's outputs and gradients on real tokens."""
    q, k, v = _qkv(t, b, t, n, kv, h)
    ids = _rows(rows, b, t)
    mask = attention_mask(ids, causal=causal)
    weights = jax.random.normal(jax.random.key(1), q.shape) * (ids != 0)[:, :, None, None]

    def ours(q, k, v):
        return cpu_attention.attention(q, k, v, None if rows == "one" else ids, causal=causal)

    _assert_same_attention(ours, lambda q, k, v: _plain_attention(q, k, v, mask), (q, k, v), ids, weights,
                           out_atol=2e-6, grad_atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize(("b", "t", "n", "kv", "h", "causal", "rows"), [FUSED_CASES[i] for i in (0, 1, 3, 5)])
def test_fused_cpu_attention_with_dropout_equals_plain_attention_with_its_mask(b, t, n, kv, h, causal, rows):
    """Dropout inside the kernel (BERT's attention dropout, 0.1; 0.3 here): outputs and gradients equal
    plain softmax attention whose probabilities are dropped with ``attention_keep``'s mask after the
    softmax and scaled by 1 / (1 - rate); the backward recomputes the same mask."""
    q, k, v = _qkv(t + 1, b, t, n, kv, h)
    ids = _rows(rows, b, t)
    mask = attention_mask(ids, causal=causal)
    weights = jax.random.normal(jax.random.key(2), q.shape) * (ids != 0)[:, :, None, None]
    rng, rate = jax.random.key(11), 0.3
    keep = attention_keep(rng, rate, (b, n, t, t))

    def ours(q, k, v):
        return cpu_attention.attention(q, k, v, ids, causal=causal, dropout_rate=rate, dropout_rng=rng)

    _assert_same_attention(ours, lambda q, k, v: _plain_attention(q, k, v, mask, rate=rate, keep=keep),
                           (q, k, v), ids, weights, out_atol=2e-6, grad_atol=1e-5)


# (tokens, causal, window, rows, dropout rate, soft-cap): Mistral's causal window, ModernBERT's two-sided
# local layers, a one-sided window without causality, windows across packed and split segments; then
# Gemma 2's capped scores (caps small enough here that tanh bends most scores), alone and with its
# sliding window, dropout and padding.
WINDOW_AND_CAP_CASES = [(70, True, 21, "packed", 0.0, None), (90, False, (9, 12), "padded", 0.0, None),
                        (64, False, 8, "one", 0.0, None), (50, False, (5, 5), "split", 0.2, None),
                        (100, True, 40, "packed", 0.1, None), (70, True, None, "packed", 0.0, 2.0),
                        (100, True, 40, "packed", 0.0, 1.0), (90, False, None, "padded", 0.1, 0.5),
                        (50, False, (5, 5), "split", 0.2, 3.0)]


@needs_cpu_kernel
@pytest.mark.parametrize(("t", "causal", "window", "rows", "rate", "cap"), WINDOW_AND_CAP_CASES)
def test_fused_cpu_attention_with_a_window_or_soft_cap_equals_plain_attention(t, causal, window, rows, rate, cap):
    """A sliding window inside the kernel (each query's keys cut to its window; key blocks outside every
    window of a tile skipped) and soft-capping (cap * tanh(score / cap) before masking; the backward
    through the cap's derivative): plain softmax attention's outputs and gradients under the same window
    mask and cap, with dropout too, through the dispatch (which sends Mistral, ModernBERT and Gemma 2 here)."""
    q, k, v = _qkv(t + 2, 2, t, 4, 2, 16)
    q = q * 3.0  # scores of a few units, so that a cap bends them
    ids = _rows(rows, 2, t)
    mask = attention_mask(ids, causal=causal, window=window)
    weights = jax.random.normal(jax.random.key(3), q.shape) * (ids != 0)[:, :, None, None]
    rng = jax.random.key(4)
    keep = attention_keep(rng, rate, (2, 4, t, t)) if rate else None

    def ours(q, k, v):
        return attention.dot_product_attention(q, k, v, segment_ids=None if rows == "one" else ids, causal=causal,
                                               window=window, logit_cap=cap, dropout_rate=rate, dropout_rng=rng)

    def reference(q, k, v, cap=cap):
        return _plain_attention(q, k, v, mask, cap=cap, rate=rate, keep=keep)

    assert "jaxtune_cpu_attention_forward" in jax.jit(ours).lower(q, k, v).as_text()
    _assert_same_attention(ours, reference, (q, k, v), ids, weights, out_atol=2e-6, grad_atol=1e-5)
    if cap is not None:  # the cap does bend these scores
        real = np.asarray(ids != 0)
        assert not np.allclose(np.asarray(jax.jit(ours)(q, k, v))[real], np.asarray(reference(q, k, v, None))[real],
                               atol=1e-2)


@needs_cpu_kernel
def test_fused_cpu_attention_is_finite_on_padding_and_keeps_the_dtype():
    """A row of padding sees no key: its outputs are zeros and no gradient reaches it (plain softmax
    over all-masked scores would average the values instead). bfloat16 inputs come back bfloat16, computed
    in float32: within bfloat16 rounding of the float32 result."""
    q, k, v = _qkv(3, 2, 40, 4, 2, 16)
    ids = jnp.asarray(np.stack([np.ones(40), np.zeros(40)]), jnp.int32)
    out, grads = jax.value_and_grad(lambda q, k, v: cpu_attention.attention(q, k, v, ids, causal=True).sum(),
                                    (0, 1, 2))(q, k, v)
    assert np.all(np.isfinite(np.asarray(out)))
    full = cpu_attention.attention(q, k, v, ids, causal=True)
    np.testing.assert_array_equal(np.asarray(full[1]), 0.0)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    half = cpu_attention.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), ids, causal=True)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half[0], np.float32), np.asarray(full[0]), atol=3e-2)


# (change to k's shape for v, or segment ids' shape, words of the error): each v here is at least k's size,
# so that the unchecked kernel (before this check) read garbage but nothing past an array's end.
SHAPE_MISMATCHES = [(dict(v=(2, 45, 2, 16)), "k (2, 40, 2, 16), v (2, 45, 2, 16)"),  # another length
                    (dict(v=(2, 40, 2, 24)), "k (2, 40, 2, 16), v (2, 40, 2, 24)"),  # another head dim
                    (dict(v=(2, 40, 4, 16)), "k (2, 40, 2, 16), v (2, 40, 4, 16)"),  # other KV heads
                    (dict(k=(2, 40, 2, 24), v=(2, 40, 2, 24)), "share q's (2, 40, 4, 16) batch, length and head dim"),
                    (dict(ids=(2, 41)), "segment_ids must be (B, T) = (2, 40)")]


@needs_cpu_kernel
@pytest.mark.parametrize(("shapes", "words"), SHAPE_MISMATCHES)
def test_fused_cpu_attention_rejects_shapes_that_do_not_fit(shapes, words):
    """The kernel reads v with k's shape and segment ids with q's: any other shape is a ValueError that
    names the shapes, before the kernel runs."""
    q = jnp.ones((2, 40, 4, 16))
    k, v = jnp.ones(shapes.get("k", (2, 40, 2, 16))), jnp.ones(shapes.get("v", (2, 40, 2, 16)))
    ids = jnp.ones(shapes.get("ids", (2, 40)), jnp.int32)
    with pytest.raises(ValueError, match=re.escape(words)):
        cpu_attention.attention(q, k, v, ids, causal=True)


@needs_cpu_kernel
def test_the_kernel_itself_rejects_a_v_that_is_not_ks_shape():
    """The C++ kernel checks v against k too (a caller past :func:`cpu_attention.attention`'s checks):
    an error, not a read past v's end."""
    q, k, _ = _qkv(0, 1, 16, 2, 1, 8)
    v = jnp.ones((1, 24, 1, 8))
    rng = jnp.zeros((4,), jnp.uint32)
    with pytest.raises(Exception, match="shapes do not fit"):
        jax.block_until_ready(cpu_attention._attention(q, k, v, jnp.ones((1, 16), jnp.int32), rng, 0.5, True,
                                                       (-1, -1, 0, 1.0, 0.0)))


@needs_cpu_kernel
@pytest.mark.parametrize("rate", [0.99999, 1 - 2 ** -17, 0.999995, 1 - 1e-9])
def test_fused_cpu_attention_with_dropout_near_one_equals_the_xla_path(rate):
    """A rate within 2^-17 of 1 rounds to dropping every probability (the kernel's 16-bit threshold has
    no such value): zeros and zero gradients, as the grouped XLA path gives, through the dispatch too;
    just below that the kernel runs and still matches."""
    q, k, v = _qkv(8, 2, 30, 4, 2, 8)
    ids = _rows("packed", 2, 30)
    rng = jax.random.key(12)
    weights = jax.random.normal(jax.random.key(13), q.shape) * (ids != 0)[:, :, None, None]

    def grouped(q, k, v):
        return grouped_attention(q, k, v, attention_mask(ids, causal=False), dropout_rate=rate, dropout_rng=rng)

    def kernel(q, k, v):
        return cpu_attention.attention(q, k, v, ids, causal=False, dropout_rate=rate, dropout_rng=rng)

    def dispatched(q, k, v):
        return attention.dot_product_attention(q, k, v, segment_ids=ids, causal=False, dropout_rate=rate,
                                               dropout_rng=rng)

    for ours in (kernel, dispatched):
        _assert_same_attention(ours, grouped, (q, k, v), ids, weights, out_atol=2e-6, grad_atol=1e-5)


@needs_cpu_kernel
def test_the_dispatch_runs_the_fused_kernel_and_can_be_turned_off(monkeypatch):
    """On a CPU, :func:`dot_product_attention` of a packed causal row runs the FFI kernel (its call is in
    the compiled program); ``JAXTUNE_CPU_ATTENTION=0`` gives the XLA path, with the same outputs."""
    q, k, v = _qkv(0, 2, 50, 4, 2, 16)
    ids = _rows("packed", 2, 50)

    def run():
        fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids=ids, causal=True))
        return fn(q, k, v), fn.lower(q, k, v).as_text()

    fused, program = run()
    assert "jaxtune_cpu_attention_forward" in program
    monkeypatch.setenv("JAXTUNE_CPU_ATTENTION", "0")
    plain, program = run()
    assert "jaxtune_cpu_attention" not in program
    real = np.asarray(ids != 0)
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(plain)[real], atol=2e-6)
    # An encoder in training (attention dropout) runs the kernel too, with the kernel's mask.
    monkeypatch.delenv("JAXTUNE_CPU_ATTENTION")
    rng = jax.random.key(3)
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids=ids, causal=False,
                                                                 dropout_rate=0.1, dropout_rng=rng))
    assert "jaxtune_cpu_attention_forward" in fn.lower(q, k, v).as_text()
    keep = attention_keep(rng, 0.1, (2, 4, 50, 50))
    expected = _plain_attention(q, k, v, attention_mask(ids, causal=False), rate=0.1, keep=keep)
    np.testing.assert_allclose(np.asarray(fn(q, k, v))[real], np.asarray(expected)[real], atol=2e-6)


@needs_cpu_kernel
def test_fused_cpu_attention_runs_per_shard_under_a_mesh():
    """Under a data 4 x tensor 2 mesh (8 simulated devices) the kernel runs on each device's rows and KV
    heads (a ``shard_map``: XLA cannot split an FFI call) and gives the single-device outputs and
    gradients, attention dropout included (each shard is told where its rows and heads start)."""
    q, k, v = _qkv(2, 4, 40, 4, 2, 16)
    ids = jnp.asarray(np.stack([np.r_[np.ones(15), 2 * np.ones(20), np.zeros(5)]] * 4), jnp.int32)
    rng = jax.random.key(5)

    def loss(q, k, v):  # with attention dropout: each shard draws its part of the whole batch's mask
        return jnp.sum(attention.dot_product_attention(q, k, v, segment_ids=ids, causal=True, dropout_rate=0.2,
                                                       dropout_rng=rng) * q)

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    expected = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(loss)(q, k, v))
        got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):  # the loss: a sum of ~100
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-6)


EXPLICIT, AUTO = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto


@needs_cpu_kernel
@pytest.mark.parametrize("types", [(EXPLICIT, EXPLICIT), (AUTO, EXPLICIT), (EXPLICIT, AUTO)])
@pytest.mark.parametrize("placed", [True, False])
def test_fused_cpu_attention_runs_under_a_mesh_with_explicit_axes(monkeypatch, types, placed):
    """``jax.make_mesh``'s default axes are Explicit, and shard_map takes such inputs only as its specs
    shard them: the kernel's inputs are resharded to its specs (Explicit axes only, on a mixed mesh),
    rows already split over data or not (``placed``), and the output comes back in q's sharding. Outputs
    and gradients, attention dropout included, equal the single-device XLA path's."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    q, k, v = _qkv(2, 4, 40, 4, 2, 16)
    ids = jnp.asarray(np.stack([np.r_[np.ones(15), 2 * np.ones(20), np.zeros(5)]] * 4), jnp.int32)
    rng = jax.random.key(5)
    real = (ids != 0)[:, :, None, None]  # outputs at padding are not defined, and differ between paths

    def loss(q, k, v, ids):
        out = attention.dot_product_attention(q, k, v, segment_ids=ids, causal=True, dropout_rate=0.2,
                                              dropout_rng=rng)
        return jnp.sum(out * q * real), jnp.where(real, out, 0.0)

    run = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    with monkeypatch.context() as plain:
        plain.setenv("JAXTUNE_CPU_ATTENTION", "0")
        expected = run(q, k, v, ids)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=types, devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        if placed and types[0] == EXPLICIT:
            q, k, v, ids = (jax.device_put(x, jax.sharding.PartitionSpec("data")) for x in (q, k, v, ids))
        assert "jaxtune_cpu_attention_forward" in run.lower(q, k, v, ids).as_text()
        got = run(q, k, v, ids)
        assert jax.typeof(got[0][1]).sharding.spec == jax.typeof(q).sharding.spec
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-6)


@needs_cpu_kernel
def test_a_failed_build_falls_back_to_the_xla_path_and_says_so(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves the kernel unbuilt: ``available()`` is False with one warning naming
    the compiler, and attention runs the grouped XLA path."""
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    cpu_attention._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="jaxtune"):
            assert not cpu_attention.available()
        assert any("building the fused CPU attention kernel with false failed" in r.getMessage()
                   for r in caplog.records)
        assert attention_kernel("cpu", **{**BASE, "cpu_kernel": cpu_attention.available()}).kernel == GROUPED
        assert not list(tmp_path.glob("kernels/*.so"))
    finally:
        monkeypatch.undo()
        cpu_attention._library.cache_clear()
    assert cpu_attention.available()


def test_cpu_attention_backward_keeps_no_probabilities():
    """What causal attention over 1,024 tokens keeps for its backward pass (the residuals ``jax.vjp``
    closes over) is each block's queries, keys, values and mask, the output and each row's maximum and
    sum: under a fifth of one ``(B, N, T, T)`` float32 probability array, which plain autodiff keeps."""
    q, k, v = _qkv(0, 1, 1024, 4, 2, 16)
    mask = attention_mask(jnp.ones((1, 1024), jnp.int32), causal=True)
    probabilities = 4 * 1024 * 1024 * 4

    def kept_bytes(fn):
        return sum(x.nbytes for x in jax.tree.leaves(jax.vjp(fn, q, k, v)[1]))

    assert kept_bytes(lambda q, k, v: grouped_attention(q, k, v, mask, causal=True)) < 0.2 * probabilities
    assert kept_bytes(lambda q, k, v: _plain_attention(q, k, v, mask)) > probabilities


def test_a_fallback_is_never_silent(monkeypatch, caplog):
    """On a GPU, float32 inputs leave cuDNN: the XLA path runs (matching the reference) and says so,
    once per reason however many layers trace it."""
    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_gpu_capability", lambda: H100)
    monkeypatch.setattr(attention, "_NOTICED", set())
    q, k, v = _qkv(0, 2, 8, 4, 2, 8)
    ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8], jnp.int32)
    with caplog.at_level(logging.WARNING, logger="jaxtune"):  # two traces, as two layers would give
        outs = [jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids=ids, causal=True))(q, k, v)
                for _ in range(2)]
    lines = [r.getMessage() for r in caplog.records if "bfloat16/float16" in r.getMessage()]
    assert len(lines) == 1 and "using the xla attention with a dense mask" in lines[0]
    expected = grouped_attention(q, k, v, attention_mask(ids, causal=True))
    real = np.asarray(ids != 0)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=1e-5)


def test_a_model_on_a_tpu_runs_splash_on_rows_of_any_length_without_a_notice(monkeypatch, caplog):
    """On a TPU, the two-token row that finds a model's param shapes (every load, and plan-memory) and
    rows of 100 tokens run splash, padded to its tiles: no warning that the rows are not a multiple of
    128 (which a load gave every TPU user, about a row they never wrote)."""
    monkeypatch.setattr(attention, "_backend", lambda: "tpu")  # the kernel then runs uninterpreted: interpret it
    monkeypatch.setattr(attention, "_NOTICED", set())
    lengths = []
    monkeypatch.setattr(attention, "splash_attention",
                        lambda q, *a, **kw: lengths.append(q.shape[1]) or splash_attention(q, *a, **kw, interpret=True))
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    module = Decoder(cfg)
    ids = jnp.ones((1, 100), jnp.int32)
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        shapes = hf.abstract_params(module, cfg)
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        jax.jit(module.apply)({"params": params}, ids, ids)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert set(lengths) == {2, 100}


def test_packed_segments_give_cudnn_the_same_mask():
    """Segment ids -> per-segment (lengths, offsets), cuDNN's packed layout: a closed-form row, and
    the mask those segments define equals the dense segment mask on real tokens."""
    ids = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    lengths, offsets = map(np.asarray, jax.jit(packed_segments)(jnp.asarray(ids)))
    assert lengths.shape == (3, 8) and offsets.shape == (3, 9)
    np.testing.assert_array_equal(lengths[0], [3, 2, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(offsets[0], [0, 3, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(lengths[1, :2], [8, -1])
    np.testing.assert_array_equal(offsets[2, :8], np.arange(8))

    rng = np.random.RandomState(0)
    rows = []
    for _ in range(6):  # random packings: segment lengths, then padding
        cuts = np.sort(rng.choice(np.arange(1, 32), rng.randint(0, 5), replace=False))
        row = np.zeros(32, np.int32)
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, rng.randint(max([0, *cuts]) + 1, 33)], strict=True)):
            row[a:b] = i + 1
        rows.append(row)
    ids = np.stack(rows)
    lengths, offsets = map(np.asarray, jax.jit(packed_segments)(jnp.asarray(ids)))
    segment_of = np.full(ids.shape, -1)
    for b in range(len(ids)):
        for j in range(ids.shape[1]):
            if offsets[b, j] >= 0:
                segment_of[b, offsets[b, j]:offsets[b, j] + lengths[b, j]] = j
    ours = (segment_of[:, :, None] == segment_of[:, None, :]) & (segment_of[:, None, :] >= 0)
    dense = np.asarray(attention_mask(jnp.asarray(ids), causal=False))[:, 0]
    np.testing.assert_array_equal(ours, dense)


T = 128  # splash tiles by 128; interpret mode is slow, so one block
PACKED = np.array([[1] * 40 + [2] * 50 + [3] * 20 + [0] * 18, [1] * 128], np.int32)

# causal, window, softcap, (heads, kv heads): a packed decoder with GQA, a sliding window and Gemma 2's
# soft-cap; a bidirectional encoder (padding and packing) with ModernBERT's two-sided local window. Plain
# causal attention: the model test below.
SPLASH_CASES = {
    "causal-window-softcap-gqa": (True, 24, 5.0, (4, 2)),
    "bidirectional-local": (False, (20, 12), None, (2, 2)),
}


@pytest.mark.parametrize("case", SPLASH_CASES)
def test_splash_matches_reference_forward_and_gradients(case):
    causal, window, cap, (n, kv) = SPLASH_CASES[case]
    q, k, v = _qkv(1, 2, T, n, kv, 16)
    ids = jnp.asarray(PACKED)
    # A loss that reads real tokens only (as the LM and pooling losses do): padding outputs are undefined.
    weights = jax.random.normal(jax.random.key(2), q.shape) * (ids != 0)[:, :, None, None]

    def reference(q, k, v):
        return grouped_attention(q, k, v, attention_mask(ids, causal=causal, window=window), scale=0.3, logit_cap=cap)

    def splash(q, k, v):
        return splash_attention(q, k, v, ids, causal=causal, window=window, scale=0.3, logit_cap=cap)

    _assert_same_attention(splash, reference, (q, k, v), ids, weights, out_atol=2e-5, grad_atol=1e-4)


@pytest.mark.parametrize("rows", ["packed", "unsegmented"])
def test_splash_pads_rows_that_are_not_a_multiple_of_its_tiles(rows):
    """Rows of 100 tokens (a prompt-tuned row: 80 tokens and 20 virtual ones; a ViT's patches) run
    splash padded to 128 with keys no real query sees: forward and gradients equal the reference's,
    causal and packed, or bidirectional without segment ids."""
    causal = rows == "packed"
    q, k, v = _qkv(3, 2, 100, 4, 2, 16)
    ids = jnp.asarray(PACKED[:, :100]) if causal else None
    real = ids if ids is not None else jnp.ones((2, 100), jnp.int32)
    weights = jax.random.normal(jax.random.key(4), q.shape) * (real != 0)[:, :, None, None]

    def reference(q, k, v):
        mask = attention_mask(ids, causal=causal) if ids is not None else None
        return grouped_attention(q, k, v, mask, scale=0.3)

    def splash(q, k, v):
        return splash_attention(q, k, v, ids, causal=causal, window=None, scale=0.3)

    _assert_same_attention(splash, reference, (q, k, v), real, weights, out_atol=2e-5, grad_atol=1e-4)


def test_a_model_runs_splash_through_the_dispatch(monkeypatch):
    """A packed decoder with a full and a sliding-window layer, with the backend reported as a TPU: its
    attention goes to splash (interpreted here) and its logits match the CPU run on real tokens."""
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, layer_windows=(None, 20))
    module = Decoder(cfg)
    ids = jnp.asarray(np.random.RandomState(3).randint(1, 64, PACKED.shape), jnp.int32)
    segments = jnp.asarray(PACKED)
    positions = jnp.asarray(np.stack([np.concatenate([np.arange(40), np.arange(50), np.arange(20), np.zeros(18)]),
                                      np.arange(128)]), jnp.int32)  # restarting in each segment
    params = module.init(jax.random.key(0), ids[:, :2])["params"]
    expected = jax.jit(module.apply)({"params": params}, ids, segments, positions)
    called = []
    monkeypatch.setattr(attention, "_backend", lambda: "tpu")  # the kernel then runs uninterpreted: interpret it
    monkeypatch.setattr(attention, "splash_attention",
                        lambda *a, **kw: called.append(kw["window"]) or splash_attention(*a, **kw, interpret=True))
    ours = jax.jit(lambda p, *batch: module.apply(p, *batch))({"params": params}, ids, segments, positions)
    assert set(called) == {20, None}  # each run of layers (a full one, a windowed one) went to splash
    real = np.asarray(segments != 0)
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(expected)[real], atol=2e-5)


def test_splash_runs_per_shard_under_a_mesh():
    """Under a (data, fsdp, tensor) mesh in context, splash runs in a shard_map (rows over the batch
    axes, heads over tensor: XLA cannot split a Pallas call itself) and still matches the reference."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    q, k, v = _qkv(4, 4, T, 4, 2, 16)
    ids = jnp.asarray(np.concatenate([PACKED, PACKED[::-1]]))
    weights = jax.random.normal(jax.random.key(5), q.shape) * (ids != 0)[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(splash_attention(q, k, v, ids, causal=True, window=None, scale=None) * weights)

    def reference(q, k, v):
        return jnp.sum(grouped_attention(q, k, v, attention_mask(ids, causal=True)) * weights)

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(loss)(q, k, v))
        value, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    expected, expected_grads = jax.jit(jax.value_and_grad(reference, (0, 1, 2)))(q, k, v)
    # A float32 sum of ~4k terms of order 1, added in another order per shard: 6e-5 apart on some CPUs.
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=2e-4)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4)
