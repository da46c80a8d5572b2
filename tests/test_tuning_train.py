"""The memory contract under real optimizer steps: frozen leaves get no gradient and no optimizer
state, stay bitwise unchanged and stay in the compute dtype; trainable leaves are float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from helpers import tiny_llama_and_bert

from jaxtune import tuning

IDS = np.random.RandomState(0).randint(1, 96, (2, 8)).astype(np.int32)
SEGMENTS = np.array([[1] * 8, [1] * 6 + [0] * 2], np.int32)
LABELS = np.array([1, 0], np.int32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_llama_and_bert(tmp_path_factory.mktemp("models"))


PLANS = {
    "last-block": ("llama", tuning.freeze_all_but(last_n_blocks=1)),
    "lora-norms-head": ("llama", tuning.lora(rank=2, targets=["q_proj", "v_proj"], dropout=0.1)
                        + tuning.train(kinds=["norms"]) + tuning.head("regression")),
    "dora-and-prompt": ("llama", tuning.dora(rank=2, kinds=["mlp"]) + tuning.prompt_tuning(3)),
    "bert-lora-head": ("bert", tuning.lora(rank=2, targets=["query", "value"]) + tuning.head("classification")),
}


def loss_fn(tuned: tuning.Tuned, trainable: dict, frozen: dict, key: jax.Array) -> jax.Array:
    """The call convention the training engine uses, with a plain loss per task."""
    variables = {"params": tuning.combine(trainable, frozen)}
    rngs = {"dropout": key}
    if tuned.task == "lm":
        hidden = tuned.module.apply(variables, input_ids=IDS, positions=None, segment_ids=SEGMENTS,
                                    deterministic=False, rngs=rngs, method="hidden")
        logits = tuned.module.apply(variables, hidden, method="logits").astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:])
        return jnp.sum(losses * SEGMENTS[:, 1:]) / SEGMENTS[:, 1:].sum()
    out = tuned.module.apply(variables, input_ids=IDS, segment_ids=SEGMENTS, positions=None, token_type_ids=None,
                             deterministic=False, rngs=rngs).astype(jnp.float32)
    if tuned.task == "regression":
        return jnp.mean((out[:, 0] - LABELS) ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(out, LABELS).mean()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_steps_touch_only_trainable_leaves(name, models):
    model, plan = PLANS[name]
    tuned = tuning.apply_plan(models[model], plan, frozen_dtype=jnp.bfloat16)
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert all(x.dtype == jnp.bfloat16 for p, x in flatten_dict(frozen).items() if p[-1] != "lora_scale")

    optimizer = optax.adam(1e-2)
    state = optimizer.init(trainable)
    # Optimizer state exists for trainable leaves only: Adam's mu and nu mirror the trainable tree.
    n_trainable = len(jax.tree.leaves(trainable))
    assert len(jax.tree.leaves(state)) == 2 * n_trainable + 1  # + the step count
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(trainable)

    @jax.jit
    def step(trainable, state, frozen, key):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(tuned, t, frozen, key))(trainable)
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    start_trainable, start_frozen = trainable, jax.tree.map(np.asarray, frozen)
    key = jax.random.key(0)
    for _ in range(3):
        key, sub = jax.random.split(key)
        trainable, state, loss = step(trainable, state, frozen, sub)
        assert np.isfinite(float(loss))

    final = flatten_dict(tuning.combine(trainable, frozen))
    for path, before in flatten_dict(start_frozen).items():
        assert final[path].dtype == before.dtype and np.array_equal(np.asarray(final[path]), before), path
    moved = [p for p, before in flatten_dict(start_trainable).items()
             if not np.array_equal(np.asarray(final[p]), np.asarray(before))]
    assert len(moved) == n_trainable, "every trainable leaf should have been updated"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
