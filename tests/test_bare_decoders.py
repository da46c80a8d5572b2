"""A bare decoder body (``LlamaModel``, ``MistralModel``...: how decoder embedding models such as e5-mistral
and gte-Qwen2 are saved) loads as a body without an output layer: its token states equal transformers'
``last_hidden_state``, it saves back as the same bare class, a head plan trains it and exports as the family's
sequence classifier (merged, or a PEFT adapter that peft loads onto that class built from the bare checkpoint),
and what needs vocabulary logits is refused in one line. A tied bare body (Gemma's) keeps its tied logits, as
transformers' ``AutoModelForCausalLM`` gives them. fp32, within 1e-4.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import fit_steps, tiny_random_model
from test_tuning_lora import forward, randomize_adapters

from jaxtune import tuning
from jaxtune.models import generate, hf

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(hidden_size=32, intermediate_size=48, num_experts_per_tok=2, num_local_experts=4)
# bare class -> (config class, config overrides): one per module jaxtune builds a causal LM with
CASES = {
    "LlamaModel": ("LlamaConfig", {}),
    "MistralModel": ("MistralConfig", dict(sliding_window=4)),
    "Qwen2Model": ("Qwen2Config", {}),
    "Qwen3Model": ("Qwen3Config", dict(head_dim=16)),
    "Phi3Model": ("Phi3Config", {}),
    "Olmo2Model": ("Olmo2Config", {}),
    "GPTNeoXModel": ("GPTNeoXConfig", dict(num_key_value_heads=None)),
    "MixtralModel": ("MixtralConfig", MOE),
    "SmolLM3Model": ("SmolLM3Config", dict(no_rope_layer_interval=2)),
    "Gemma2Model": ("Gemma2Config", dict(head_dim=16)),  # tied: keeps its logits
    "GPT2Model": ("GPT2Config", dict(n_inner=96, num_key_value_heads=None)),  # tied, its own module and prefix
}
# Right padding with pad id 0 (none inside the text): HF's classifiers find the last real token from the ids.
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)
IDS = np.random.RandomState(0).randint(3, 128, MASK.shape).astype(np.int32) * MASK


def bare_model(architecture: str, out_dir) -> torch.nn.Module:
    """A random transformers bare body, every weight drawn afresh, saved to ``out_dir``."""
    config_name, overrides = CASES[architecture]
    fields = {k: v for k, v in {**TINY, **overrides}.items() if v is not None}
    return tiny_random_model(architecture, out_dir, fields, config_class=config_name,
                             norm_offset=-0.5 if "Gemma" in architecture else 0.5)  # Gemma's gain is 1 + w


def states(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK))
    return out.last_hidden_state.float().numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, bare_model(request.param, path), path


def test_a_bare_body_loads_with_transformers_token_states_and_saves_back(checkpoint, tmp_path):
    arch, ref, path = checkpoint
    pretrained = hf.load_pretrained(path)
    tied = pretrained.config.tie_word_embeddings
    assert pretrained.architecture == arch and "lm_head" not in pretrained.params
    assert pretrained.config.makes_logits == tied
    ours = np.asarray(pretrained.module.apply({"params": pretrained.params}, IDS, segment_ids=MASK, method="hidden"))
    real = MASK.astype(bool)
    np.testing.assert_allclose(ours[real], states(ref)[real], atol=TOL, rtol=0)

    out = hf.save_pretrained(pretrained.params, pretrained.hf_config, tmp_path)
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    reloaded = getattr(transformers, arch).from_pretrained(out).eval()
    np.testing.assert_allclose(states(reloaded)[real], ours[real], atol=TOL, rtol=0)


def test_a_tied_bare_body_keeps_the_logits_transformers_gives_it(tmp_path):
    bare_model("Gemma2Model", tmp_path)
    pretrained = hf.load_pretrained(tmp_path)
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # ties lm_head to the embedding
    with torch.no_grad():
        theirs = lm(input_ids=torch.as_tensor(IDS[:1])).logits.float().numpy()
    ours = np.asarray(pretrained.module.apply({"params": pretrained.params}, IDS[:1]))
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    untied = hf.untie_embeddings(pretrained)  # as a PEFT adapter that trained the embedding apart leaves it
    assert "lm_head" in untied.params
    np.testing.assert_allclose(np.asarray(untied.module.apply({"params": untied.params}, IDS[:1])), theirs,
                               atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("bare-llama")
    bare_model("LlamaModel", path)
    return path


def test_a_head_on_a_bare_body_trains_and_exports_as_the_family_classifier(llama, tmp_path):
    plan = tuning.lora(rank=4) + tuning.head("classification", num_labels=3)
    tuned = tuning.apply_plan(hf.load_pretrained(llama), plan)
    assert tuned.hf_architecture == "LlamaForSequenceClassification" and "lm_head" not in tuned.params
    batch = {"input_ids": IDS, "segment_ids": MASK, "labels": np.array([0, 2], np.int32)}
    _, history = fit_steps(tuned, batch, steps=4)
    assert history[-1]["loss"] < history[0]["loss"]

    params = randomize_adapters(tuned.params, seed=1)
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    merged = tuning.export_merged(tuned, tmp_path / "merged", params=params)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        theirs = classifier(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)

    adapter = tuning.export_peft(tuned, tmp_path / "peft", params=params)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(llama)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=3).eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(
            input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def test_what_needs_vocabulary_logits_is_refused_in_one_line(llama):
    pretrained = hf.load_pretrained(llama)
    with pytest.raises(tuning.PlanError, match="LlamaModel is a bare decoder body: it stores no lm_head.*add a head"):
        tuning.apply_plan(pretrained, tuning.lora(rank=4))
    for call in (lambda: generate.generate(pretrained.module, pretrained.params, [[1, 5]], max_new_tokens=2),
                 lambda: pretrained.module.apply({"params": pretrained.params}, jnp.asarray(IDS))):
        with pytest.raises(ValueError, match="the bare body of a LlamaForCausalLM: it stores no lm_head") as err:
            call()
        assert "\n" not in str(err.value)


def test_a_causal_lm_config_over_a_bare_body_checkpoint_loads_as_the_body_with_a_warning(llama, tmp_path):
    """Some embedding models (gte-Qwen2) declare the causal LM but store the bare body's tensors alone:
    transformers would give them a random lm_head; jaxtune loads the body and says so."""
    for file in llama.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.warns(UserWarning, match="says LlamaForCausalLM, but the checkpoint stores no lm_head.*loaded as "
                                         "LlamaModel"):
        pretrained = hf.load_pretrained(tmp_path)
    assert pretrained.architecture == "LlamaModel" and not pretrained.config.makes_logits
    expected = hf.load_pretrained(llama)
    np.testing.assert_array_equal(pretrained.params["norm"]["scale"], expected.params["norm"]["scale"])
