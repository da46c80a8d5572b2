"""Adapters and checkpoints that used to export or import silently wrong, or were refused (issue 14,
item 4): each test compares with what PEFT / transformers compute on the same tiny random model.
All fp32, within 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model
from test_tuning_lora import forward
from test_tuning_peft import IDS, MASK, TOL, torch_out, trained

from jaxtune import tuning
from jaxtune.models import hf
from jaxtune.tuning import PlanError


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    tiny_hf_model("Qwen2ForCausalLM", root / "tied", tie_word_embeddings=True)  # SmolLM2 / Qwen2.5 are tied
    tiny_hf_model("LlamaForCausalLM", root / "untied")
    return root


def ours(tuned: tuning.Tuned, params=None) -> np.ndarray:
    return np.asarray(forward(tuned.module, tuned.params if params is None else params, IDS, MASK))


# ----------------------------------------------------------------------------- decoder sequence classifiers


@pytest.mark.parametrize("arch", ["LlamaForSequenceClassification", "Qwen2ForSequenceClassification"])
def test_transformers_decoder_classifier_checkpoint_loads(arch, tmp_path):
    ref = tiny_hf_model(arch, tmp_path, num_labels=3, pad_token_id=0)
    pretrained = hf.load_pretrained(tmp_path)
    theirs = torch_out(ref, input_ids=IDS, attention_mask=MASK)
    np.testing.assert_allclose(np.asarray(pretrained.module.apply({"params": pretrained.params}, IDS, segment_ids=MASK)),
                               theirs, atol=TOL, rtol=0)
    tuned = tuning.apply_plan(pretrained, tuning.lora(rank=2))  # body + the checkpoint's own score head
    assert tuned.head.pooling == "last" and tuned.hf_architecture == arch
    np.testing.assert_allclose(ours(tuned), theirs, atol=TOL, rtol=0)


def test_merged_classifier_round_trips_and_runs_padded_in_transformers(sources, tmp_path):
    tuned, params = trained(sources, "untied", tuning.lora(rank=4) + tuning.head("classification", num_labels=3))
    assert tuned.hf_config.get("pad_token_id") is None  # transformers refuses batches > 1 without it
    out = tuning.export_merged(tuned, tmp_path, params=params)
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    assert pad == tuned.hf_config["eos_token_id"]
    ids = np.where(MASK == 1, np.maximum(IDS, pad + 1), pad)  # padded with pad, no pad among real tokens
    expected = np.asarray(forward(tuned.module, params, ids, MASK))
    reloaded = transformers.LlamaForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_out(reloaded, input_ids=ids, attention_mask=MASK), expected, atol=TOL, rtol=0)
    back = hf.load_pretrained(out)
    assert back.architecture == "LlamaForSequenceClassification"
    np.testing.assert_allclose(np.asarray(back.module.apply({"params": back.params}, ids, segment_ids=MASK)),
                               expected, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- encoders without a pooler


def test_bert_for_masked_lm_loads_without_pooler(tmp_path):
    ref = tiny_hf_model("BertForMaskedLM", tmp_path)
    with pytest.warns(UserWarning, match="no pooler tensors.*'cls' .*or 'mean'"):
        body = hf.load_pretrained(tmp_path)
    assert "pooler" not in body.params and not body.config.use_pooler
    with torch.no_grad():
        theirs = ref.bert(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).last_hidden_state.numpy()
    hidden = np.asarray(body.module.apply({"params": body.params}, IDS, MASK))
    np.testing.assert_allclose(hidden[MASK == 1], theirs[MASK == 1], atol=TOL, rtol=0)
    assert tuning.apply_plan(body, tuning.head("classification")).head.pooling == "cls"
    with pytest.raises(PlanError, match="pooling 'pooler' needs a BERT pooler.*use mean, cls"):
        tuning.apply_plan(body, tuning.head("classification", pooling="pooler"))
