"""Prompt tuning and added heads: initialisation, padding/position handling, pooling closed forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_llama_and_bert

from jaxtune import tuning
from jaxtune.models.layers import pool

TEXT = np.random.RandomState(0).randint(1, 96, (1, 5)).astype(np.int32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_llama_and_bert(tmp_path_factory.mktemp("models"))


@functools.partial(jax.jit, static_argnames=("module", "method"))
def run(module, params, ids, positions, segments, method="__call__"):
    kwargs = dict(input_ids=ids, positions=positions, segment_ids=segments)
    return module.apply({"params": params}, **kwargs, method=None if method == "__call__" else method)


def left_padded(pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TEXT with ``pad`` pad tokens on the left: ids, positions (real tokens from 0), segment ids."""
    ids = np.concatenate([np.zeros((1, pad), np.int32), TEXT], axis=1)
    positions = np.concatenate([np.zeros((1, pad), np.int32), np.arange(5, dtype=np.int32)[None]], axis=1)
    segments = np.concatenate([np.zeros((1, pad), np.int32), np.ones((1, 5), np.int32)], axis=1)
    return ids, positions, segments


def right_padded(pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.concatenate([TEXT, np.zeros((1, pad), np.int32)], axis=1)
    positions = np.arange(5 + pad, dtype=np.int32)[None]
    segments = np.concatenate([np.ones((1, 5), np.int32), np.zeros((1, pad), np.int32)], axis=1)
    return ids, positions, segments


def test_prompt_init_from_vocabulary_and_from_text(models):
    llama = models["llama"]
    table = np.asarray(llama.params["embed_tokens"]["embedding"])
    vocab = tuning.apply_plan(llama, tuning.prompt_tuning(6), jax.random.key(3))
    rows = np.asarray(vocab.params["prompt_embeddings"])
    assert rows.shape == (6, 64) and all((table == row).all(axis=1).any() for row in rows)
    assert set(tuning.partition(vocab.params, vocab.labels)[0]) == {"prompt_embeddings"}
    # PEFT's TEXT init: the text's ids (a tokenizer's dict output), repeated and cut to n_tokens.
    text = tuning.apply_plan(llama, tuning.prompt_tuning(5, init="text", text="Rate:"),
                             tokenizer=lambda s: {"input_ids": [3, 7]})
    np.testing.assert_array_equal(np.asarray(text.params["prompt_embeddings"]), table[[3, 7, 3, 7, 3]])


def test_prompt_tuned_rows_ignore_padding_on_either_side(models):
    tuned = tuning.apply_plan(models["llama"], tuning.prompt_tuning(3))
    alone = np.asarray(run(tuned.module, tuned.params, TEXT, None, None, method="hidden"))
    assert alone.shape == (1, 5, 64)  # virtual tokens stripped
    ids, positions, segments = left_padded(2)
    left = np.asarray(run(tuned.module, tuned.params, ids, positions, segments, method="hidden"))
    np.testing.assert_allclose(left[:, 2:], alone, atol=1e-5, rtol=0)
    ids, positions, segments = right_padded(3)
    right = np.asarray(run(tuned.module, tuned.params, ids, positions, segments, method="hidden"))
    np.testing.assert_allclose(right[:, :5], alone, atol=1e-5, rtol=0)
    base = np.asarray(jax.jit(lambda p: models["llama"].module.apply({"params": p}, TEXT, method="hidden"))(
        models["llama"].params))
    assert not np.allclose(alone, base, atol=1e-3), "the prompt must change the states"


HEADS = {
    "decoder-mean-mlp-block": ("llama", dict(pooling="mean", hidden=[16], extra_blocks=1)),
    "decoder-last": ("llama", dict(pooling="last")),
    "encoder-cls-block": ("bert", dict(pooling="cls", extra_blocks=1, hidden=[8, 8])),
    "encoder-pooler": ("bert", dict()),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_output_does_not_depend_on_padding(name, models):
    model, options = HEADS[name]
    tuned = tuning.apply_plan(models[model], tuning.head("classification", num_labels=3, **options))
    ones = np.ones_like(TEXT)
    alone = np.asarray(run(tuned.module, tuned.params, TEXT, None, ones))
    assert alone.shape == (1, 3)
    ids, positions, segments = right_padded(4)
    np.testing.assert_allclose(np.asarray(run(tuned.module, tuned.params, ids, positions, segments)), alone,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_plain_head_is_pooling_then_linear(pooling, models):
    tuned = tuning.apply_plan(models["llama"], tuning.head("regression", num_labels=2, pooling=pooling, bias=True))
    ids, positions, segments = right_padded(2)
    hidden = run(tuned.module, tuned.params, ids, positions, segments, method="hidden")
    out = tuned.params["head"]["out"]
    expected = pool(hidden, jnp.asarray(segments), pooling) @ out["kernel"] + out["bias"]
    np.testing.assert_allclose(np.asarray(run(tuned.module, tuned.params, ids, positions, segments)),
                               np.asarray(expected), atol=1e-6, rtol=0)
    assert tuned.task == "regression" and tuned.num_outputs == 2 and tuned.hf_architecture is None


def labeled_examples(n: int, task: str, seed: int = 0) -> list[dict]:
    """``n`` tokenized classification/regression examples of 3..13 tokens (ids and token types random)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 14)
        label = np.int32(rng.randint(3)) if task == "classification" else np.float32(rng.randn())
        out.append({"input_ids": rng.randint(1, 96, length).astype(np.int32),
                    "token_type_ids": rng.randint(0, 2, length).astype(np.int32), "label": label})
    return out


@pytest.mark.parametrize(("name", "task"), [(name, "classification") for name in sorted(HEADS)]
                         + [("encoder-pooler", "regression")])
def test_packed_rows_give_the_loss_and_gradients_of_one_example_per_row(name, task, models):
    """Several examples per row (segments, restarting positions, per-segment pooling and labels)
    against the same examples one per row: the same summed loss, weight and LoRA/head gradients."""
    from jaxtune.data.packing import classifier_rows, pack_classifiers
    from jaxtune.training.step import make_loss_fn
    from jaxtune.tuning.partition import combine, partition

    model, options = HEADS[name]
    plan = tuning.lora(rank=4, alpha=8) + tuning.head(task, num_labels=3 if task == "classification" else 1,
                                                      **options)
    tuned = tuning.apply_plan(models[model], plan, jax.random.key(1))
    trainable, frozen = partition(tuned.params, tuned.labels)
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), trainable)
    examples = labeled_examples(11, task)
    packed, padded = pack_classifiers(examples, 32), classifier_rows(examples, 32)
    assert len(packed) < len(padded) and sorted(int(r["example_weights"].sum()) for r in packed)[-1] > 1
    loss_fn = make_loss_fn(tuned.module, tuned.task, regression="huber")

    def summed(rows):
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}

        def total(tr):
            loss, weight, _ = loss_fn(combine(tr, frozen), batch, jax.random.key(0), True)
            return loss, weight

        return jax.value_and_grad(total, has_aux=True)(trainable)

    (packed_total, packed_weight), packed_grads = summed(packed)
    (padded_total, padded_weight), padded_grads = summed(padded)
    assert float(packed_weight) == float(padded_weight) == len(examples)
    np.testing.assert_allclose(float(packed_total), float(padded_total), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(padded_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(np.abs(b).max()) + 1e-7)
