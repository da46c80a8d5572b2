"""Dropout on attention probabilities in training, against transformers' eager attention: each
family reads its config's rate (BERT ``attention_probs_dropout_prob``, DistilBERT and the Llama
family ``attention_dropout``, GPT-2 ``attn_pdrop``), and with jaxtune's own dropout mask fed to
transformers' dropout a train-mode forward agrees within 1e-4, on both CPU paths: the fused kernel
and the grouped XLA attention, whose masks are one function of the layer's key
(``dropout.attention_keep``), so the two paths' train-mode forwards agree too. Evaluation and
cached decoding draw nothing, and a rate of 0 is the deterministic forward."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import torch_logits

from jaxtune.models import attention, cpu_attention, hf
from jaxtune.models.dropout import attention_keep

RATE = 0.3
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40)


def _reference(family: str):
    """A transformers config with hidden dropout 0 and attention dropout RATE, and its model class."""
    if family == "bert":
        return transformers.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=RATE), \
            transformers.BertModel
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=96, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                             max_position_embeddings=40, dropout=0.0, attention_dropout=RATE,
                                             pad_token_id=0), transformers.DistilBertModel
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=RATE), transformers.GPT2LMHeadModel
    # Llama with 2 query heads per KV head: the bits follow the query heads, as HF's repeated KV do.
    return transformers.LlamaConfig(**TINY, num_key_value_heads=2, attention_dropout=RATE, pad_token_id=0,
                                    tie_word_embeddings=False), transformers.LlamaForCausalLM


def _use(kernel: str, monkeypatch) -> None:
    """Run attention on ``kernel`` ("fused": the C++ kernel, "grouped": the XLA attention)."""
    if kernel == "grouped":
        monkeypatch.setenv("JAXTUNE_CPU_ATTENTION", "0")
    elif not cpu_attention.available() and not os.environ.get("CI"):
        pytest.skip("no C++ compiler here to build the fused CPU attention kernel")
    else:
        monkeypatch.setenv("JAXTUNE_CPU_ATTENTION", "1")


def _record_masks(drawn: list, monkeypatch) -> None:
    """Append each layer's keep mask (B, N, T, S), ``attention_keep`` of the key the layer passes to
    either attention path, to ``drawn`` as the forward runs. The decoders scan their layers, so the
    masks come out by callback."""
    def recording(attend):
        def run(q, k, v, *args, dropout_rate=0.0, dropout_rng=None, **kwargs):
            if dropout_rate and dropout_rng is not None:
                keep = attention_keep(dropout_rng, dropout_rate, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
                jax.debug.callback(lambda b: drawn.append(np.asarray(b)), keep, ordered=True)
            return attend(q, k, v, *args, dropout_rate=dropout_rate, dropout_rng=dropout_rng, **kwargs)

        return run

    monkeypatch.setattr(attention, "grouped_attention", recording(attention.grouped_attention))
    monkeypatch.setattr(cpu_attention, "attention", recording(cpu_attention.attention))


@pytest.mark.parametrize("kernel", ["fused", "grouped"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
def test_attention_dropout_is_transformers_in_training(family, kernel, tmp_path, monkeypatch):
    config, model_cls = _reference(family)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    ref = model_cls.from_pretrained(tmp_path, attn_implementation="eager").train()  # eager: torch's dropout
    model = hf.load_pretrained(tmp_path)
    assert model.config.attention_dropout == pytest.approx(RATE)

    ids = np.random.RandomState(1).randint(4, 96, (2, 9)).astype(np.int32)
    mask = np.array([[1] * 6 + [0] * 3, [1] * 7 + [0] * 2], np.int32)  # right-padded
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), ids.shape)

    def ours(m, deterministic):
        return np.asarray(m.module.apply({"params": m.params}, ids, mask, positions, deterministic=deterministic,
                                         rngs={"dropout": jax.random.key(3)}))

    drawn = []  # jaxtune's keep masks (B, N, T, S), in layer order
    _use(kernel, monkeypatch)
    _record_masks(drawn, monkeypatch)
    trained = ours(model, False)
    assert len(drawn) == 2 and drawn[0].shape == (2, 4, 9, 9) and 0.5 < drawn[0].mean() < 0.9
    fed = iter(drawn)

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        assert p == pytest.approx(RATE)
        return x * torch.from_numpy(next(fed).astype(np.float32)) / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    theirs = torch_logits(ref, ids, attention_mask=mask)
    assert next(fed, None) is None  # transformers dropped as many probabilities, layer for layer
    real = mask.astype(bool)
    np.testing.assert_allclose(trained[real], theirs[real], atol=1e-4, rtol=0)

    drawn.clear()
    evaluated = ours(model, True)
    assert not drawn and not np.allclose(trained[real], evaluated[real], atol=1e-3)
    off = hf.load_pretrained(tmp_path, attention_dropout=0.0)
    np.testing.assert_allclose(ours(off, False), evaluated, atol=1e-6)
    assert not drawn


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_both_cpu_paths_drop_the_same_probabilities(family, tmp_path, monkeypatch):
    """One dropout key, one mask: a train-mode forward on the fused kernel equals the grouped XLA
    attention's (what lets a run resume on the other path, or on a machine without a compiler)."""
    config, model_cls = _reference(family)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    model = hf.load_pretrained(tmp_path)
    ids = np.random.RandomState(2).randint(4, 96, (2, 9)).astype(np.int32)
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), ids.shape)
    outputs = {}
    for kernel in ("fused", "grouped"):
        _use(kernel, monkeypatch)
        outputs[kernel] = np.asarray(model.module.apply({"params": model.params}, ids, mask, positions,
                                                        deterministic=False, rngs={"dropout": jax.random.key(8)}))
    evaluated = np.asarray(model.module.apply({"params": model.params}, ids, mask, positions, deterministic=True))
    real = mask.astype(bool)
    np.testing.assert_allclose(outputs["fused"][real], outputs["grouped"][real], atol=1e-5, rtol=0)
    assert not np.allclose(outputs["fused"][real], evaluated[real], atol=1e-3)  # dropout did drop
