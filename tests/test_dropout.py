"""jaxtune's dropout masks (16 random bits per element): rate, scaling, independence, mesh independence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.models.dropout import Dropout, dropout, keep_mask


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
