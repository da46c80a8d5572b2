"""Adapters and checkpoints that used to export or import silently wrong, or were refused (issue 14,
item 4): each test compares with what PEFT / transformers compute on the same tiny random model.
All fp32, within 1e-4."""

from __future__ import annotations

import json
import re

import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import tiny_hf_model
from test_tuning_lora import forward
from test_tuning_peft import IDS, MASK, TOL, assert_real_tokens_close, peft_out, torch_out, trained

from jaxtune import tuning
from jaxtune.models import hf
from jaxtune.tuning import ExportError, PlanError


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    # Weights drawn afresh (no norm gain at 1, no bias at 0: Qwen2's qkv biases count too).
    tiny_hf_model("Qwen2ForCausalLM", root / "tied", randomize=True, tie_word_embeddings=True)  # as SmolLM2 / Qwen2.5
    tiny_hf_model("LlamaForCausalLM", root / "untied", randomize=True)
    return root


def hf_base(sources, name: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(sources / name).eval()


def peft_adapter(sources, name: str, out, **lora) -> np.ndarray:
    """A PEFT-made LoRA adapter (random A and B, trained-looking modules_to_save) saved to ``out``;
    returns PEFT's logits for it."""
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_base(sources, name), peft.LoraConfig(r=4, init_lora_weights=False, **lora))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "modules_to_save" in param_name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out)
    return torch_out(model.eval(), input_ids=IDS, attention_mask=MASK)


def ours(tuned: tuning.Tuned, params=None) -> np.ndarray:
    return np.asarray(forward(tuned.module, tuned.params if params is None else params, IDS, MASK))


# ----------------------------------------------------------------------------- tied embeddings


def test_tied_embedding_trained_with_lora_exports_exactly_to_peft(sources, tmp_path):
    plan = tuning.lora(rank=4, targets=["q_proj", "v_proj"]) + tuning.train("^embed_tokens/")
    tuned, params = trained(sources, "tied", plan)
    assert tuned.config.tie_word_embeddings
    tuning.export_peft(tuned, tmp_path, params=params)
    assert_real_tokens_close(ours(tuned, params), peft_out(hf_base(sources, "tied"), tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] and config["modules_to_save"] == ["model.embed_tokens"]
    again = tuning.load_peft(hf.load_pretrained(sources / "tied"), tmp_path)  # and back: still one matrix
    assert again.config.tie_word_embeddings and "lm_head" not in again.params
    assert_real_tokens_close(ours(again), ours(tuned, params))


@pytest.mark.parametrize("saved, ensure", [("embed_tokens", False), ("embed_tokens", True), ("lm_head", False)],
                         ids=["embed-untied-by-peft", "embed-ensure_weight_tying", "lm_head-untied-by-peft"])
def test_tied_embedding_peft_adapter_imports_exactly(saved, ensure, sources, tmp_path):
    theirs = peft_adapter(sources, "tied", tmp_path / "peft", target_modules=["q_proj", "v_proj"],
                          modules_to_save=[saved], ensure_weight_tying=ensure)
    tuned = tuning.load_peft(hf.load_pretrained(sources / "tied"), tmp_path / "peft")
    assert_real_tokens_close(ours(tuned), theirs)
    # Without ensure_weight_tying PEFT trains one end alone: the other keeps the old matrix.
    assert tuned.config.tie_word_embeddings == ensure
    tuning.export_peft(tuned, tmp_path / "again")  # the same adapter meaning on the way back
    assert_real_tokens_close(peft_out(hf_base(sources, "tied"), tmp_path / "again"), theirs)
    merged = tuning.export_merged(tuned, tmp_path / "merged")  # untied: two matrices in transformers too
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert_real_tokens_close(torch_out(reloaded, input_ids=IDS, attention_mask=MASK), theirs)


# ----------------------------------------------------------------------------- initialisations


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_are_refused_and_their_conversion_imports(init, sources, tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_base(sources, "untied"), peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                                            init_lora_weights=init))
    model.save_pretrained(tmp_path / "init")  # the adapter right after initialisation
    with torch.no_grad():  # "training"
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "raw")
    with pytest.raises(ExportError, match=rf"init_lora_weights='{init}' changed the base weights.*"
                                          r"path_initial_model_for_weight_conversion"):
        tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path / "raw")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs = peft_out(hf_base(sources, "untied"), tmp_path / "plain")  # on the original base
    assert not np.allclose(theirs, torch_out(hf_base(sources, "untied"), input_ids=IDS, attention_mask=MASK), atol=1e-3)
    assert_real_tokens_close(ours(tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path / "plain")), theirs)


def test_unreproduced_init_is_refused(sources, tmp_path):
    peft_adapter(sources, "untied", tmp_path, target_modules=["q_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "loftq"}))
    with pytest.raises(ExportError, match=r"init_lora_weights='loftq' is not reproduced.*merge_and_unload"):
        tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path)


# ----------------------------------------------------------------------------- LoRA on the output / input layer


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_lora_on_lm_head_matches_peft_both_ways(name, sources, tmp_path):
    theirs = peft_adapter(sources, name, tmp_path / "peft", target_modules=["q_proj", "lm_head"])
    tuned = tuning.load_peft(hf.load_pretrained(sources / name), tmp_path / "peft")
    assert ("lm_head",) in tuned.adapters and not tuned.config.tie_word_embeddings
    assert_real_tokens_close(ours(tuned), theirs)
    tuning.export_peft(tuned, tmp_path / "ours")
    assert_real_tokens_close(peft_out(hf_base(sources, name), tmp_path / "ours"), theirs)


def test_lora_on_embedding_is_refused_clearly(sources, tmp_path):
    peft_adapter(sources, "untied", tmp_path, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ExportError, match=r"LoRA on embedding\(s\) \['model.embed_tokens'\].*linear layers only"):
        tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path)


# ----------------------------------------------------------------------------- decoder sequence classifiers


@pytest.mark.parametrize("arch", ["LlamaForSequenceClassification", "Qwen2ForSequenceClassification"])
def test_transformers_decoder_classifier_checkpoint_loads(arch, tmp_path):
    ref = tiny_hf_model(arch, tmp_path, randomize=True, num_labels=3, pad_token_id=0)
    pretrained = hf.load_pretrained(tmp_path)
    theirs = torch_out(ref, input_ids=IDS, attention_mask=MASK)
    np.testing.assert_allclose(np.asarray(pretrained.module.apply({"params": pretrained.params},
                                                                  IDS, segment_ids=MASK)),
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
    ref = tiny_hf_model("BertForMaskedLM", tmp_path, randomize=True)
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


# ----------------------------------------------------------------------------- pickle adapters


def test_bin_adapter_is_refused_on_purpose_with_conversion(sources, tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_base(sources, "untied"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ExportError, match=r"adapter_model\.bin: a pickle file; jaxtune refuses pickle on purpose.*"
                                          r"safetensors.torch import save_file") as err:
        tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path)
    exec(re.search(r'python -c "(.*)"$', str(err.value)).group(1))  # the conversion the message gives works
    assert len(tuning.load_peft(hf.load_pretrained(sources / "untied"), tmp_path).adapters) == 2
