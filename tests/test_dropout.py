"""jaxtune's dropout masks (16 random bits per element; attention probabilities: a hash of the
position): rate, scaling, independence, blocks and mesh independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.models.dropout import Dropout, attention_keep, dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_masks_drop_at_the_rate_and_their_elements_are_independent(rate):
    keep = np.asarray(keep_mask(jax.random.key(0), rate, (400, 1001)))  # an odd last axis: a half word left over
    n = keep.size
    assert abs(1 - keep.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)  # four standard errors
    # The two halves of one word land on neighbours: they must not be correlated (nor any neighbours).
    a, b = keep[:, :-1].astype(np.float64), keep[:, 1:].astype(np.float64)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 4 / np.sqrt(a.size)
    evens, odds = keep[:, 0:-1:2], keep[:, 1::2]  # low and high halves of the same words
    assert abs(np.corrcoef(evens.ravel(), odds.ravel())[0, 1]) < 4 / np.sqrt(evens.size)
    other = np.asarray(keep_mask(jax.random.key(1), rate, (400, 1001)))
    assert (keep != other).mean() == pytest.approx(2 * rate * (1 - rate), abs=0.01)


def test_the_drop_probability_is_the_rate_to_two_to_the_minus_16():
    """Closed form: the mask is ``16-bit uniform >= round(rate * 2^16)``; over all 2^16 values
    exactly ``round(rate * 2^16)`` are dropped."""
    key = jax.random.key(3)
    words = np.asarray(jax.random.bits(key, (5, 4), jnp.uint32))
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(5, 8)
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.3, (5, 8))), halves >= round(0.3 * 65536))
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.3, (5, 7))), halves[:, :7] >= round(0.3 * 65536))
    assert np.asarray(keep_mask(key, 0.0, (64, 64))).all()


def test_dropout_scales_the_kept_values_and_the_module_follows_deterministic():
    x = jnp.arange(1.0, 41.0).reshape(4, 10)
    key = jax.random.key(5)
    y = np.asarray(dropout(x, 0.5, key))
    keep = np.asarray(keep_mask(key, 0.5, (4, 10)))
    np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / 0.5, 0.0))
    module = Dropout(0.5)
    np.testing.assert_array_equal(np.asarray(module.apply({}, x, deterministic=True)), np.asarray(x))
    dropped = np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": key}))
    assert set(np.unique(dropped / np.asarray(x))) == {0.0, 2.0}  # its own key (flax folds in the module path)
    np.testing.assert_array_equal(np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": key})), dropped)
    assert dropout(x, 0.0, key) is x


def test_a_mask_is_the_same_on_any_mesh():
    """Exact resume and the sharding tests need the same bits however the step is sharded."""
    devices = np.array(jax.devices())
    if devices.size < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.sharding.Mesh(devices.reshape(2, -1), ("data", "model"))
    key, shape = jax.random.key(11), (8, 6, 16)
    plain = np.asarray(keep_mask(key, 0.1, shape))
    for spec in (PartitionSpec("data"), PartitionSpec(None, None, "model"), PartitionSpec("data", None, "model")):
        sharded = jax.jit(lambda k: keep_mask(k, 0.1, shape), out_shardings=NamedSharding(mesh, spec))(key)
        np.testing.assert_array_equal(np.asarray(sharded), plain)


def _fmix(h: int) -> int:
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * factor) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_the_attention_mask_is_the_documented_hash():
    """Probability (b, n, i, j) is kept when fmix(j * 0x9E3779B9 ^ r) >> 16 >= round(rate * 2^16), with r
    the key's two words mixed with b, n and i in turn: Python integers against the jax function."""
    key, rate = jax.random.key(4), 0.3
    s0, s1 = (int(w) for w in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    mask = np.asarray(attention_keep(key, rate, (2, 3, 5, 7)))
    for b, n, i, j in np.ndindex(mask.shape):  # all 210: a wrong formula cannot agree by chance
        x = _fmix(s0 ^ _fmix((b * 0x9E3779B9 + s1) & 0xFFFFFFFF))
        x = _fmix(x ^ ((n * 0x85EBCA6B + 0x165667B1) & 0xFFFFFFFF))
        r = _fmix((x + i * 0xC2B2AE35) & 0xFFFFFFFF)
        bits = _fmix(((j * 0x9E3779B9) & 0xFFFFFFFF) ^ r) >> 16
        assert mask[b, n, i, j] == (bits >= round(rate * 65536)), (b, n, i, j)


def test_attention_masks_drop_at_the_rate_and_differ_by_key_and_position():
    """The hash mask as dropout needs it: each probability dropped with the rate's chance (to 2^-16),
    independently of its neighbours along every axis, and another key, batch row, head, query or key
    gives another draw. MiniLM's packed quickstart rows: 4 x 12 heads x 64 x 64, 196,608 draws."""
    key, shape = jax.random.key(12), (4, 12, 64, 64)
    for rate in (0.1, 0.5):
        keep = np.asarray(attention_keep(key, rate, shape))
        p = round(rate * 65536) / 65536
        assert abs((1 - keep.mean()) - p) < 4 * np.sqrt(p * (1 - p) / keep.size)
        for axis in range(4):  # neighbours agree as often as independent draws would
            a, b = np.moveaxis(keep, axis, 0)[:-1], np.moveaxis(keep, axis, 0)[1:]
            assert abs((a & b).mean() - (1 - p) ** 2) < 4 * np.sqrt((1 - p) ** 2 / a.size) + 1e-3, (rate, axis)
    base = np.asarray(attention_keep(key, 0.5, shape))
    others = [attention_keep(jax.random.key(13), 0.5, shape)]
    others += [attention_keep(key, 0.5, shape, first=tuple(64 if a == axis else 0 for a in range(4)))
               for axis in range(4)]
    for other in others:
        assert abs((base == np.asarray(other)).mean() - 0.5) < 0.01


def test_an_attention_mask_block_is_that_block_of_the_whole_mask():
    """``first`` places a block in the whole batch's mask: what a query block of the XLA attention, a
    tile of the fused kernel or a shard of a mesh computes is the whole mask's part, traced offsets too."""
    key = jax.random.key(5)
    whole = np.asarray(attention_keep(key, 0.2, (3, 4, 40, 50)))
    block = attention_keep(key, 0.2, (2, 3, 16, 20), first=(1, 1, 24, 30))
    np.testing.assert_array_equal(np.asarray(block), whole[1:3, 1:4, 24:40, 30:50])
    traced = jax.jit(lambda row: attention_keep(key, 0.2, (1, 4, 40, 50), first=(row, 0, 0, 0)))(jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(traced), whole[2:3])
