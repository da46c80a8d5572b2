"""Parity with the PyTorch ecosystem: PEFT loads jaxtune's adapters (LoRA, DoRA, prompt tuning,
heads via modules_to_save) and computes jaxtune's outputs; transformers loads merged exports;
jaxtune loads PEFT's own adapters. All fp32, within 1e-4."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import tiny_hf_model
from safetensors import safe_open
from test_tuning_lora import forward, randomize_adapters

from jaxtune import tuning
from jaxtune.models import hf, stacking
from jaxtune.tuning import ExportError

TOL = 1e-4
# Right padding with pad id 0 (and no 0 inside the text), so that HF's sequence classifiers find
# the last real token from the ids exactly as jaxtune does from the segment ids.
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3], np.int32)
IDS = np.random.RandomState(0).randint(1, 96, MASK.shape).astype(np.int32) * MASK


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    tiny_hf_model("LlamaForCausalLM", root / "llama", pad_token_id=0)
    # Drawn afresh: nonzero biases (PEFT's DoRA takes the bias out before its magnitude rescale) and
    # q_norm / k_norm gains other than 1.
    tiny_hf_model("Qwen3ForCausalLM", root / "qwen3", randomize=True, attention_bias=True, tie_word_embeddings=True,
                  head_dim=16)
    tiny_hf_model("BertModel", root / "bert")
    return root


def load(sources, name: str) -> hf.Pretrained:
    return hf.load_pretrained(sources / name)


def torch_out(model: torch.nn.Module, **inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.float().numpy()


def peft_out(base: torch.nn.Module, adapter_dir) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    return torch_out(model, input_ids=IDS, attention_mask=MASK)


def assert_real_tokens_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Compare LM logits on real tokens (padding positions are don't-care on both sides)."""
    real = MASK.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def trained(sources, name: str, plan: tuning.Plan, seed: int = 1) -> tuple[tuning.Tuned, dict]:
    tuned = tuning.apply_plan(load(sources, name), plan)
    params = randomize_adapters(tuned.params, seed)
    # Trained norms too, so that modules_to_save carries a real change.
    flat = flatten_dict(params)
    for path, label in flatten_dict(tuned.labels).items():
        if label == "train":
            flat[path] = flat[path] * 1.1 + 0.01
    return tuned, unflatten_dict(flat)


def test_lora_with_rank_pattern_and_modules_to_save_matches_peft(sources, tmp_path):
    plan = (tuning.lora(rank=4, alpha=8, dropout=0.1) + tuning.lora(rank=2, alpha=3, match="layers_1/mlp/down_proj",
                                                                    dropout=0.1)
            + tuning.train("^norm/"))
    tuned, params = trained(sources, "llama", plan)
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 2}
    assert config["modules_to_save"] == ["model.norm"] and config["lora_dropout"] == 0.1
    base = transformers.LlamaForCausalLM.from_pretrained(sources / "llama").eval()
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    assert not np.allclose(ours, torch_out(base, input_ids=IDS, attention_mask=MASK), atol=1e-2)
    assert_real_tokens_close(ours, peft_out(base, tmp_path))


class _Unread:
    """A frozen weight a PEFT adapter does not hold: the export must not read it (on the device, each
    frozen layer's slice was an op of its own)."""

    def __getitem__(self, index):
        raise AssertionError("the PEFT export read a frozen weight it does not write")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the PEFT export read a frozen weight it does not write")


def test_peft_export_reads_only_the_leaves_the_adapter_holds(sources, tmp_path):
    tuned, params = trained(sources, "llama", tuning.lora(rank=4, alpha=8) + tuning.train("^norm/"))
    assert stacking.is_stacked(params)
    tuning.export_peft(tuned, tmp_path / "all", params=params)
    flat = flatten_dict(params)
    for path, label in flatten_dict(tuned.labels).items():
        if label == "freeze" and path[0] != "norm":  # the trained final norm is saved whole, its module with it
            flat[path] = _Unread()
    tuning.export_peft(tuned, tmp_path / "held", params=unflatten_dict(flat))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "held" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


def test_dora_rslora_matches_peft(sources, tmp_path):
    tuned, params = trained(sources, "qwen3", tuning.dora(rank=4, alpha=8, rslora=True, kinds=["attention"]))
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and len(config["target_modules"]) == 8
    base = transformers.Qwen3ForCausalLM.from_pretrained(sources / "qwen3").eval()
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    assert not np.allclose(ours, torch_out(base, input_ids=IDS, attention_mask=MASK), atol=1e-2)
    assert_real_tokens_close(ours, peft_out(base, tmp_path))


def test_prompt_tuning_matches_peft(sources, tmp_path):
    tuned, params = trained(sources, "llama", tuning.prompt_tuning(5))
    assert params["prompt_embeddings"].shape == (5, 64)
    tuning.export_peft(tuned, tmp_path, params=params)
    base = transformers.LlamaForCausalLM.from_pretrained(sources / "llama").eval()
    theirs = peft_out(base, tmp_path)
    assert theirs.shape[1] == 5 + IDS.shape[1]  # PEFT returns the virtual positions too
    assert_real_tokens_close(np.asarray(forward(tuned.module, params, IDS, MASK)), theirs[:, 5:])


def test_prompt_tuning_with_saved_modules_matches_peft_both_ways(sources, tmp_path):
    """A prompt-learning PeftModel wraps the transformers model directly, so its saved modules are keyed
    ``base_model.<module>`` (a LoRA one's ``base_model.model.<module>``): jaxtune's export of prompt
    tuning + head + trained norm loads in PEFT (KeyError before), and PEFT's own prompt-tuning
    classifier adapter imports (refused before), each with PEFT's logits. (Rows without padding: PEFT
    feeds a prompt-tuned classifier inputs_embeds, so transformers cannot find the padding and pools
    the last position, where jaxtune pools the last real token.)"""
    ids, mask = IDS[:1], MASK[:1]
    plan = tuning.prompt_tuning(4) + tuning.head("classification", num_labels=3) + tuning.train("^norm/")
    tuned, params = trained(sources, "llama", plan)
    tuning.export_peft(tuned, tmp_path / "ours", params=params)
    base = transformers.LlamaForSequenceClassification.from_pretrained(sources / "llama", num_labels=3).eval()
    theirs = torch_out(peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval(), input_ids=ids,
                       attention_mask=mask)
    np.testing.assert_allclose(np.asarray(forward(tuned.module, params, ids, mask)), theirs, atol=TOL, rtol=0)
    torch.manual_seed(0)
    base = transformers.LlamaForSequenceClassification.from_pretrained(sources / "llama", num_labels=3).eval()
    made = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    made.save_pretrained(tmp_path / "theirs")
    imported = tuning.load_peft(load(sources, "llama"), tmp_path / "theirs")
    assert imported.prompt_tokens == 3 and imported.head is not None
    np.testing.assert_allclose(np.asarray(forward(imported.module, imported.params, ids, mask)),
                               torch_out(made.eval(), input_ids=ids, attention_mask=mask), atol=TOL, rtol=0)


def test_decoder_classification_head_matches_peft_modules_to_save(sources, tmp_path):
    plan = tuning.lora(rank=4, targets=["q_proj", "v_proj"]) + tuning.head("classification", num_labels=3)
    tuned, params = trained(sources, "llama", plan)
    assert tuned.hf_architecture == "LlamaForSequenceClassification"
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.LlamaForSequenceClassification.from_pretrained(sources / "llama", num_labels=3).eval()
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(ours, peft_out(base, tmp_path), atol=TOL, rtol=0)


def test_bert_pooler_head_matches_peft_on_sequence_classifier(sources, tmp_path):
    plan = tuning.lora(rank=4, targets=["query", "value"]) + tuning.head("classification", num_labels=2)
    tuned, params = trained(sources, "bert", plan)
    assert tuned.head.pooling == "pooler" and tuned.hf_architecture == "BertForSequenceClassification"
    tuning.export_peft(tuned, tmp_path, params=params)
    base = transformers.BertForSequenceClassification.from_pretrained(sources / "bert", num_labels=2).eval()
    np.testing.assert_allclose(np.asarray(forward(tuned.module, params, IDS, MASK)), peft_out(base, tmp_path),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("task", ["lm", "regression"])
def test_merged_export_loads_in_transformers(task, sources, tmp_path):
    plan = tuning.lora(rank=4, kinds=["attention"]) + tuning.dora(rank=2, kinds=["mlp"]) + tuning.train(kinds=["norms"])
    if task == "regression":
        plan = plan + tuning.head("regression")
    tuned, params = trained(sources, "llama", plan)
    out = tuning.export_merged(tuned, tmp_path, params=params)
    cls = transformers.LlamaForCausalLM if task == "lm" else transformers.LlamaForSequenceClassification
    reloaded = cls.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    theirs = torch_out(reloaded, input_ids=IDS, attention_mask=MASK)
    if task == "lm":
        assert_real_tokens_close(ours, theirs)
    else:
        assert reloaded.config.problem_type == "regression" and theirs.shape == (2, 1)
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


ROUND_TRIPS = {
    "lora-norm": ("llama", tuning.lora(rank=4, targets=["q_proj", "o_proj"], rslora=True) + tuning.train("^norm/")),
    "prompt": ("llama", tuning.prompt_tuning(4)),
    "bert-dora-head": ("bert", tuning.dora(rank=2, targets=["value"]) + tuning.head("classification", num_labels=3)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_load_peft_round_trip_continues_training(case, sources, tmp_path):
    name, plan = ROUND_TRIPS[case]
    tuned, params = trained(sources, name, plan)
    tuning.export_peft(tuned, tmp_path, params=params)
    again = tuning.load_peft(load(sources, name), tmp_path)
    assert flatten_dict(again.labels) == flatten_dict(tuned.labels)
    assert again.adapters == tuned.adapters and again.head == tuned.head and again.prompt_tokens == tuned.prompt_tokens
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.params, params)


def test_load_peft_reads_adapters_made_by_peft(sources, tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(sources / "llama").eval()
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["k_proj", "up_proj"], use_dora=True,
                             init_lora_weights=False, modules_to_save=["model.norm"],
                             rank_pattern={"up_proj": 2})
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    theirs = torch_out(model.eval(), input_ids=IDS, attention_mask=MASK)
    tuned = tuning.load_peft(load(sources, "llama"), tmp_path)
    assert {spec.rank for spec in tuned.adapters.values()} == {2, 4} and len(tuned.adapters) == 4
    assert set(stacking.unstack(tuning.partition(tuned.params, tuned.labels)[0])) == {"layers_0", "layers_1", "norm"}
    assert_real_tokens_close(np.asarray(forward(tuned.module, tuned.params, IDS, MASK)), theirs)


def test_export_errors(sources, tmp_path):
    llama = load(sources, "llama")
    mean_head = tuning.apply_plan(llama, tuning.lora(rank=2) + tuning.head("regression", pooling="mean"))
    with pytest.raises(ExportError, match=r"head/out: the regression head \(pooling mean\) has no transformers class.*"
                       r"the head that exports is pooling last into a bias-free layer"):
        tuning.export_peft(mean_head, tmp_path)
    with pytest.raises(ExportError, match="either LoRA/DoRA or prompt tuning"):
        tuning.export_peft(tuning.apply_plan(llama, tuning.lora(rank=2) + tuning.prompt_tuning(2)), tmp_path)
    both = tuning.apply_plan(llama, tuning.lora(rank=2) + tuning.train("layers_0/self_attn/q_proj/kernel"))
    with pytest.raises(ExportError, match=r"\['layers_0/self_attn/q_proj'\] are trained directly and carry an adapter"):
        tuning.export_peft(both, tmp_path)
    # Decided from the plan, so that a run fails (peft) or picks merged (auto) before it trains.
    with pytest.raises(ExportError, match="trained directly and carry an adapter"):
        tuning.export_format(both, "peft")
    assert tuning.export_format(both, "auto") == "merged"
    assert tuning.export_format(tuning.apply_plan(llama, tuning.lora(rank=2)), "auto") == "peft"
    with pytest.raises(ExportError, match="prompt tuning has no merged form"):
        tuning.export_merged(tuning.apply_plan(llama, tuning.prompt_tuning(2)), tmp_path)
    with pytest.raises(ExportError, match="no LoRA, DoRA or prompt adapter"):
        tuning.export_peft(tuning.apply_plan(llama, tuning.full()), tmp_path)


@pytest.mark.parametrize("text, error", [
    ('{"peft_type": "LORA",', r"adapter_config.json:1: not valid JSON \("),
    ('["LORA"]', r"adapter_config.json: expected a JSON object \(PEFT's adapter config\), got a list$"),
    ('{"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": {"q_proj(": 2}}',
     r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    ('{"peft_type": "PROMPT_TUNING"}', r"num_virtual_tokens must be a positive integer .*got None$"),
])
def test_a_malformed_adapter_config_is_one_line_naming_it(sources, tmp_path, text, error):
    """(Each was a bare JSONDecodeError, AttributeError, re.error or KeyError.)"""
    tuned, params = trained(sources, "llama", tuning.lora(rank=2, targets=["q_proj"]))
    tuning.export_peft(tuned, tmp_path, params=params)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ExportError, match=error):
        tuning.load_peft(load(sources, "llama"), tmp_path)


def test_an_adapter_config_without_rank_or_alpha_reads_peft_defaults(sources, tmp_path):
    """PEFT's LoraConfig defaults r and lora_alpha to 8 where a file leaves them out; so does the import."""
    tuned, params = trained(sources, "llama", tuning.lora(rank=8, alpha=8, targets=["q_proj"]))
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                              if k not in ("r", "lora_alpha")}))
    base = transformers.LlamaForCausalLM.from_pretrained(sources / "llama").eval()
    again = tuning.load_peft(load(sources, "llama"), tmp_path)
    assert {(s.rank, s.alpha) for s in again.adapters.values()} == {(8, 8.0)}
    assert_real_tokens_close(np.asarray(forward(again.module, again.params, IDS, MASK)), peft_out(base, tmp_path))


@pytest.mark.parametrize("dora", [False, True])
def test_merged_float32_export_of_a_bfloat16_base_keeps_the_whole_update(sources, tmp_path, dora):
    """``export(format="merged", dtype="float32")`` of a base loaded in bfloat16 writes W + s A B (DoRA:
    rescaled) rounded once, to float32: 46% of a small update's entries used to vanish in a rounding to
    the kernel's bfloat16 first. The reference is the closed form over the bfloat16 kernel, in float64
    numpy from the plan's rank and alpha (s = alpha / rank; the DoRA case is rsLoRA: alpha / sqrt(rank))."""
    rank, alpha, rslora = 4, 8.0, dora
    plan = (tuning.dora if dora else tuning.lora)(rank=rank, alpha=alpha, rslora=rslora, targets=["q_proj"])
    tuned = tuning.apply_plan(hf.load_pretrained(sources / "llama", dtype=jnp.bfloat16), plan)
    params = randomize_adapters(tuned.params, scale=1e-3)
    out = tuning.export_merged(tuned, tmp_path / "merged", params=params, dtype="float32")
    with safe_open(out / "model.safetensors", framework="np") as f:
        written = f.get_tensor("model.layers.0.self_attn.q_proj.weight").T
    leaves = {k[-1]: np.asarray(v, np.float64) for k, v in flatten_dict(stacking.unstack(params)).items()
              if k[:-1] == ("layers_0", "self_attn", "q_proj")}
    scale = alpha / (np.sqrt(rank) if rslora else rank)
    adapted = leaves["kernel"] + leaves["lora_a"] @ leaves["lora_b"] * scale
    if dora:  # W' = m * (W + s A B) / ||W + s A B||, the norm per output feature (a column here)
        adapted = adapted * leaves["magnitude"] / np.linalg.norm(adapted, axis=0)
    assert written.dtype == np.float32
    np.testing.assert_allclose(written, adapted, rtol=1e-6, atol=1e-7)
