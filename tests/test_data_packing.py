"""Packing: row layout (targets, weights, segments, positions), first fit, and the same summed
loss packed or padded with a real decoder."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune.data import Tokenize, first_fit, lm_row, pack, packing, pad
from jaxtune.data.packing import classifier_row, max_segments, next_fit, pack_classifiers, packed_classifier_row
from jaxtune.data.testing import synthetic_chat_rows, tiny_tokenizer


def example(ids, mask):
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, bool)}


def test_lm_row_layout():
    row = lm_row([example([5, 6, 7], [0, 1, 1]), example([8, 9], [1, 1])], 8, pad_id=99)
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9, 99, 99, 99]
    assert row["targets"].tolist() == [6, 7, 0, 9, 0, 0, 0, 0]  # never across a segment boundary
    assert row["loss_weights"].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert {k: v.dtype for k, v in row.items()} == {"input_ids": np.int32, "targets": np.int32,
                                                   "loss_weights": np.float32, "segment_ids": np.int32,
                                                   "positions": np.int32}
    # A prompt token's target is unsupervised: weight follows the *target* token's mask.
    assert lm_row([example([1, 2, 3, 4], [0, 0, 1, 0])], 4)["loss_weights"].tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="more than max_length"):
        lm_row([example([1] * 5, [1] * 5), example([1] * 4, [1] * 4)], 8)


def test_first_fit():
    assert first_fit([5, 4, 3, 2, 6, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit([], 8) == []
    assert first_fit([1, 1, 1, 1, 1], 8, max_items=2) == [[0, 1], [2, 3], [4]]  # full of items, not of tokens
    assert next_fit([5, 4, 3, 2, 6, 1], 8) == [[0], [1, 2], [3, 4], [5]]  # in order, less full
    assert next_fit([1, 1, 1, 1, 1], 8, max_items=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="truncate first"):
        first_fit([9], 8)


def test_pack_and_pad_keep_every_example_once():
    rng = np.random.default_rng(0)
    examples = [example(rng.integers(10, 100, n), rng.random(n) < 0.5) for n in rng.integers(2, 33, 50)]
    for rows in (pack(examples, 32), pad(examples, 32)):
        segments = []
        for row in rows:
            for s in range(1, row["segment_ids"].max() + 1):
                at = row["segment_ids"] == s
                segments.append(row["input_ids"][at].tolist())
                assert row["positions"][at].tolist() == list(range(at.sum()))
        assert sorted(segments) == sorted(e["input_ids"].tolist() for e in examples)
        assert sum(r["loss_weights"].sum() for r in rows) == sum(e["loss_mask"][1:].sum() for e in examples)
    assert len(pack(examples, 32)) < len(pad(examples, 32)) == 50


def test_classifier_row():
    row = classifier_row({"input_ids": np.array([4, 5, 6], np.int32), "token_type_ids": np.array([0, 1, 1], np.int32),
                          "label": np.int32(2)}, 5, pad_id=0)
    assert row["input_ids"].tolist() == [4, 5, 6, 0, 0] and row["segment_ids"].tolist() == [1, 1, 1, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 0] and row["token_type_ids"].tolist() == [0, 1, 1, 0, 0]
    assert row["labels"] == 2


def labeled(ids, label):
    return {"input_ids": np.asarray(ids, np.int32), "token_type_ids": np.zeros(len(ids), np.int32), "label": label}


def test_packed_classifier_row():
    row = packed_classifier_row([labeled([4, 5, 6], np.int32(2)), labeled([7, 8], np.int32(0))], 16, pad_id=1)
    assert row["input_ids"].tolist() == [4, 5, 6, 7, 8] + [1] * 11
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2] + [0] * 11
    assert row["positions"].tolist() == [0, 1, 2, 0, 1] + [0] * 11
    assert max_segments(16) == 2 and row["labels"].tolist() == [2, 0] and row["example_weights"].tolist() == [1, 1]
    assert row["labels"].dtype == np.int32 and row["example_weights"].dtype == np.float32
    regression = packed_classifier_row([labeled([4], np.float32(0.5))], 64)
    assert regression["labels"].dtype == np.float32 and regression["labels"].tolist() == [0.5] + [0.0] * 7
    assert regression["example_weights"].tolist() == [1] + [0] * 7


def test_pack_classifiers_keeps_every_example_and_label_once():
    rng = np.random.RandomState(0)
    examples = [labeled(rng.randint(1, 50, rng.randint(1, 12)), np.int32(i)) for i in range(40)]
    rows = pack_classifiers(examples, 32)
    assert len(rows) < 40 and all(r["example_weights"].sum() <= max_segments(32) == 4 for r in rows)
    seen = {}
    for row in rows:
        for s in range(int(row["example_weights"].sum())):
            seen[int(row["labels"][s])] = row["input_ids"][row["segment_ids"] == s + 1].tolist()
    assert seen == {i: e["input_ids"].tolist() for i, e in enumerate(examples)}
    in_order = pack_classifiers(examples, 32, in_order=True)
    assert [int(label) for r in in_order for label in r["labels"][:int(r["example_weights"].sum())]] == list(range(40))
    # Many one-token examples: the label slots, not the tokens, bound a row.
    assert [int(r["example_weights"].sum()) for r in pack_classifiers([labeled([3], np.int32(0))] * 9, 32)] == [4, 4, 1]


def summed_loss(apply, params, rows) -> float:
    import jax
    import jax.numpy as jnp

    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    logits = apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"]).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
    # where(): padding queries attend to nothing, so their logits are not meaningful.
    return float(jnp.sum(jnp.where(batch["loss_weights"] > 0, nll * batch["loss_weights"], 0.0)))


def test_packed_and_padded_rows_give_the_same_summed_loss():
    import jax
    import transformers

    decoder = pytest.importorskip("jaxtune.models.decoder")
    hf = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = decoder.Decoder(decoder.DecoderConfig.from_hf(hf.to_dict()))
    tokenize = Tokenize(tiny_tokenizer(), "chat", 96)
    records = [{**r, "weights": [int(m["role"] == "assistant") for m in r["messages"]]}
               for r in synthetic_chat_rows(12, seed=1, max_turns=2, max_words=3)]
    examples = [e for r in records for e in tokenize(r)]
    packed, padded = pack(examples, 96), pad(examples, 96)
    assert len(packed) < len(padded) == len(examples)
    packed += [lm_row([], 96)] * (len(padded) - len(packed))  # same shape: one compile
    params = jax.jit(model.init)(jax.random.key(0), packed[0]["input_ids"][None])["params"]
    apply = jax.jit(model.apply)
    packed_loss, padded_loss = summed_loss(apply, params, packed), summed_loss(apply, params, padded)
    assert np.isfinite(packed_loss) and packed_loss > 0
    np.testing.assert_allclose(packed_loss, padded_loss, rtol=2e-5)


def test_the_answer_index_lists_each_rows_supervised_positions_in_a_few_widths():
    rng = np.random.RandomState(0)
    for t, answers, width in ((160, 3, 16), (160, 20, 24), (160, 75, 80), (160, 81, 160), (64, 0, 8), (7, 5, 8)):
        weights = np.zeros((3, 2, t), np.float32)
        for row in weights.reshape(-1, t):
            row[np.sort(rng.choice(t, size=rng.randint(0, answers + 1), replace=False))] = 1
        weights[1, 0] = 0
        weights[1, 0, :answers] = 1  # the row with the most supervised positions sets the width
        index = packing.answer_index(weights)
        assert index.dtype == np.int32 and index.shape == (3, 2, min(width, t))
        for row, listed in zip(weights.reshape(-1, t), index.reshape(-1, index.shape[-1])):
            real = np.flatnonzero(row > 0)
            assert listed.tolist() == real.tolist() + [-1] * (index.shape[-1] - len(real))
    # A bound (several processes' one width): the width holds it, and a row above it is refused.
    weights = np.zeros((2, 160), np.float32)
    weights[0, 5:9] = 1
    index = packing.answer_index(weights, most=20)
    assert index.shape == (2, 24) and index[0, :5].tolist() == [5, 6, 7, 8, -1]
    with pytest.raises(ValueError, match="a row has 4 supervised positions, more than the bound of 3"):
        packing.answer_index(weights, most=3)
