"""GPT-2 against transformers, fp32, within 1e-4: logits on padded and packed inputs, greedy KV-cache
generation equal to ``transformers.generate``, a LoRA adapter on the fused ``c_attn`` loaded by peft, a
merged export loaded by transformers and back, and the ``GPT2ForSequenceClassification`` head.

The tiny random models get weights far from HF's init (LayerNorm gains around 1 +- 0.5, the rest of std
0.1), so that positions, the fused projection's split and the norms all move the logits.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import randomize_weights, torch_logits
from test_tuning_lora import forward
from test_tuning_peft import IDS, MASK, assert_real_tokens_close, trained

from jaxtune import tuning
from jaxtune.models import hf, stacking
from jaxtune.models.generate import generate
from jaxtune.models.gpt2 import GPT2, GPT2Config

TOL = 1e-4
TINY = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
CASES = {
    "tied-gelu-new": dict(),
    "untied-relu-inner": dict(tie_word_embeddings=False, activation_function="relu", n_inner=48,
                              scale_attn_weights=False),
}


def tiny_gpt2(out_dir, seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A random ``GPT2LMHeadModel`` saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    config = transformers.GPT2Config(**{**TINY, **overrides}, pad_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize_weights(model, is_norm=lambda name: ".ln_" in name and name.endswith("weight"))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_gpt2(path, **CASES[request.param])
    return ref, hf.load_pretrained(path), path


def _ours(model, ids, segment_ids=None, positions=None) -> np.ndarray:
    return np.asarray(model.module.apply({"params": model.params}, ids, segment_ids, positions))


def test_loads_as_a_decoder(pair):
    ref, model, _ = pair
    assert isinstance(model.module, GPT2) and isinstance(model.config, GPT2Config)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert ("lm_head" in model.params) != model.config.tie_word_embeddings
    # Conv1D's (in, out), as stored
    assert stacking.unstack(model.params)["layers_0"]["attn"]["c_attn"]["kernel"].shape == (32, 96)


def test_logits_match_transformers_with_padding(pair):
    ref, model, _ = pair
    ids = np.random.RandomState(1).randint(1, 128, (2, 12)).astype(np.int32)
    mask = np.array([[1] * 9 + [0] * 3, [0] * 3 + [1] * 9], np.int32)  # right-padded, left-padded
    positions = np.array([list(range(12)), [0, 0, 0] + list(range(9))], np.int32)
    ours = _ours(model, ids, mask, positions)
    for row, (lo, hi) in enumerate([(0, 9), (3, 12)]):
        np.testing.assert_allclose(ours[row, lo:hi], torch_logits(ref, ids[row:row + 1, lo:hi])[0], atol=TOL, rtol=0)
    assert np.isfinite(ours).all()


def test_packed_documents_match_each_document_alone(pair):
    ref, model, _ = pair
    ids = np.random.RandomState(2).randint(1, 128, (1, 16)).astype(np.int32)
    bounds = [(0, 7), (7, 12), (12, 14)]
    segments, positions = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    ours = _ours(model, ids, segments, positions)
    for lo, hi in bounds:
        np.testing.assert_allclose(ours[0, lo:hi], torch_logits(ref, ids[:, lo:hi])[0], atol=TOL, rtol=0)


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100]]
NEW = 8


def test_greedy_generation_matches_transformers(pair):
    ref, model, _ = pair
    ours = generate(model.module, model.params, PROMPTS, max_new_tokens=NEW, max_length=32)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_generation_past_the_learned_positions_is_refused(pair):
    """GPT-2 has a row of position embeddings per position and no more (transformers raises an
    IndexError past them; the cache would otherwise read NaN logits and emit token 0)."""
    _, model, _ = pair
    assert len(generate(model.module, model.params, [[5] * 54], max_new_tokens=10)[0]) == 10  # 64: the last slot
    with pytest.raises(ValueError, match="prompt of 55 tokens plus max_new_tokens 10 passes the model's 64 positions"):
        generate(model.module, model.params, [[5] * 55], max_new_tokens=10)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """GPT-2 as published (tied embeddings): the exports are checked on this one only, to keep CI short."""
    path = tmp_path_factory.mktemp("gpt2-tied")
    return tiny_gpt2(path), path


@pytest.fixture(scope="module")
def adapted(tied):
    """LoRA on the fused c_attn (one adapter, as PEFT's) and the MLP, a trained final norm."""
    _, path = tied
    tuned, params = trained(path.parent, path.name,
                            tuning.lora(rank=4, alpha=8, targets=["c_attn", "c_fc"]) + tuning.train("^norm/"))
    return tuned, params, np.asarray(forward(tuned.module, params, IDS, MASK))


def _hf_logits(model) -> np.ndarray:
    return torch_logits(model, IDS, attention_mask=MASK)


def test_lora_on_fused_c_attn_loads_in_peft(tied, adapted, tmp_path):
    _, path = tied
    tuned, params, ours = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                                        "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert config["fan_in_fan_out"] and config["modules_to_save"] == ["transformer.ln_f"]
    base = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    assert not np.allclose(ours, _hf_logits(base), atol=1e-2)
    assert_real_tokens_close(ours, _hf_logits(peft.PeftModel.from_pretrained(base, tmp_path).eval()))
    back = tuning.load_peft(hf.load_pretrained(path), tmp_path)  # and back into jaxtune
    assert_real_tokens_close(np.asarray(forward(back.module, back.params, IDS, MASK)), ours)


def test_merged_export_loads_in_transformers_and_back(adapted, tmp_path):
    tuned, params, ours = adapted
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert_real_tokens_close(ours, _hf_logits(transformers.GPT2LMHeadModel.from_pretrained(out).eval()))
    again = hf.load_pretrained(out)
    assert_real_tokens_close(_ours(again, IDS, MASK), ours)


def test_sequence_classifier_round_trips(tied, tmp_path):
    """A new head on GPT-2 is transformers' GPT2ForSequenceClassification (score on the last real token):
    the merged export runs in transformers on a padded batch and loads back into jaxtune."""
    _, path = tied
    tuned, params = trained(path.parent, path.name, tuning.lora(rank=2, targets=["c_proj"])
                            + tuning.head("classification", num_labels=3))
    assert tuned.hf_architecture == "GPT2ForSequenceClassification"
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    out = tuning.export_merged(tuned, tmp_path, params=params)
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(ours, _hf_logits(theirs), atol=TOL, rtol=0)
    np.testing.assert_allclose(_ours(hf.load_pretrained(out), IDS, MASK), ours, atol=TOL, rtol=0)


def test_refuses_what_it_does_not_implement(tmp_path):
    config = transformers.GPT2Config(**TINY, scale_attn_by_inverse_layer_idx=True).to_dict()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx is set"):
        GPT2Config.from_hf({**config, "architectures": ["GPT2LMHeadModel"]})
