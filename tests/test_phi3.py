"""Phi-3 against transformers, fp32, within 1e-4: logits on padded and packed batches (LongRoPE's short
and long factors both), greedy KV-cache generation, LoRA on the fused ``qkv_proj``/``gate_up_proj`` both
ways with peft, a merged export in transformers, and the sequence classifier.

Two tiny configurations: GQA with a sliding window on every layer and untied embeddings; and Phi-4-mini's
shape (tied embeddings, 3/4 of each head rotated), with multi-head attention. Both use LongRoPE with
``original_max_position_embeddings`` 16, so 12-token inputs take the short factors and 24-token inputs
the long ones (and the attention factor ``sqrt(1 + ln 4 / ln 16)``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import peft
import pytest
import torch
import transformers
from test_rope import apply, hf_logits, ids_of, packed_row, padded_batch, randomized
from test_tuning_peft import IDS, MASK, assert_real_tokens_close, trained

from jaxtune import tuning
from jaxtune.models import hf
from jaxtune.models.generate import generate
from jaxtune.models.phi3 import Phi3Config

TOL = 1e-4
WINDOW = 5
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0)


def longrope(n: int, partial: float = 1.0) -> dict:
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [float(x) for x in np.linspace(1.0, 2.0, n)],
            "long_factor": [float(x) for x in np.linspace(1.0, 8.0, n)]}


CASES = {
    "gqa-window-untied": dict(num_key_value_heads=2, sliding_window=WINDOW, rope_parameters=longrope(8)),
    "mha-tied-partial-rotary": dict(num_key_value_heads=4, tie_word_embeddings=True,
                                    rope_parameters=longrope(6, partial=0.75)),
}


def tiny_phi3(path, architecture: str = "Phi3ForCausalLM", **overrides) -> torch.nn.Module:
    config = transformers.Phi3Config(**{**BASE, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(0)
    ref = randomized(getattr(transformers, architecture)(config))
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module", params=sorted(CASES))
def phi3(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_phi3(path, **CASES[request.param])
    return ref, hf.load_pretrained(path), path


def test_loads_fused_projections_and_switches(phi3):
    ref, model, _ = phi3
    cfg, layer = model.config, model.params["layers_0-1"]
    assert isinstance(cfg, Phi3Config) and type(model.module).__name__ == "Phi3"
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert layer["self_attn"]["qkv_proj"]["kernel"].shape == (2, 64, (n + 2 * kv) * h)
    assert layer["mlp"]["gate_up_proj"]["kernel"].shape == (2, 64, 2 * 96)
    assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"}
    assert cfg.layer_windows == (ref.config.sliding_window,) * 2
    assert ("lm_head" in model.params) != cfg.tie_word_embeddings == ref.config.tie_word_embeddings


def test_padded_batch_matches_transformers(phi3):
    ref, model, _ = phi3
    for length in (12, 24):  # LongRoPE's short factors, then its long ones
        ids, mask, positions = padded_batch(length)
        ours, theirs = apply(model, ids, mask, positions), hf_logits(ref, ids, mask, positions)
        np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=TOL, rtol=0, err_msg=f"length {length}")
    assert np.isfinite(ours).all(), "padding rows must not produce NaN"
    plain = dataclasses.replace(model.config, rope_scaling=None)  # LongRoPE (and partial rotation) matter here
    assert np.abs(apply(model, ids, mask, positions, cfg=plain)[mask == 1] - theirs[mask == 1]).max() > 100 * TOL


def test_packed_row_matches_transformers(phi3):
    """Documents of 20, 5 and 3 tokens in one row: the longest document (20 > 16) picks the long factors
    for the whole batch, in both; no token attends across documents."""
    ref, model, _ = phi3
    ids, segments, positions = packed_row((20, 5, 3), fill=2)
    ours, theirs = apply(model, ids, segments, positions), hf_logits(ref, ids, positions=positions)
    real = segments > 0
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100]]


def _hf_generate(ref: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(phi3):
    """Batched prompts that stay within 16 tokens (short factors), then a 18-token prompt (long factors
    throughout). A generation that crosses 16 differs by design: see rope.RopeFrequencies."""
    ref, model, _ = phi3
    ours = generate(model.module, model.params, PROMPTS, max_new_tokens=5, stop_token_ids=[], max_length=32)
    assert ours == [_hf_generate(ref, p, 5) for p in PROMPTS]
    long_prompt = ids_of((1, 18), seed=5)[0].tolist()
    ours = generate(model.module, model.params, [long_prompt], max_new_tokens=5, stop_token_ids=[], max_length=32)
    assert ours == [_hf_generate(ref, long_prompt, 5)]


@pytest.fixture(scope="module")
def adapted(phi3):
    """LoRA on every linear (the fused ones included), a trained final norm and, when tied, a trained
    embedding (the tied path that PEFT needs ensure_weight_tying for)."""
    _, model, path = phi3
    plan = tuning.lora(rank=4, alpha=8) + tuning.train("^norm/")
    if model.config.tie_word_embeddings:
        plan = plan + tuning.train("^embed_tokens/")
    tuned, params = trained(path.parent, path.name, plan)
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    return tuned, params, ours


def _hf_masked_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.float().numpy()


def test_lora_adapter_loads_in_peft_with_equal_logits(phi3, adapted, tmp_path):
    _, model, path = phi3
    tuned, params, ours = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted({t.rsplit(".", 1)[1] for t in targets}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(targets) == 4 * model.config.num_layers
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert not np.allclose(ours, _hf_masked_logits(base), atol=1e-2)  # the adapter changes the model
    assert_real_tokens_close(ours, _hf_masked_logits(peft.PeftModel.from_pretrained(base, tmp_path).eval()))


def test_merged_export_loads_in_transformers_with_equal_logits(adapted, tmp_path):
    tuned, params, ours = adapted
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    assert_real_tokens_close(ours, _hf_masked_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval()))
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    np.testing.assert_allclose(apply(again, IDS, MASK), ours, atol=TOL, rtol=0)


def test_peft_adapter_on_the_fused_modules_imports_exactly(phi3, tmp_path):
    """PEFT's own Phi-3 targets (``qkv_proj``, ``gate_up_proj``) become jaxtune LoRA on the same modules."""
    _, model, path = phi3
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=["qkv_proj", "gate_up_proj"])).eval()
    theirs.save_pretrained(tmp_path)
    tuned = tuning.load_peft(model, tmp_path)
    assert sorted({m[-1] for m in tuned.adapters}) == ["gate_up_proj", "qkv_proj"]
    ours = np.asarray(tuned.module.apply({"params": tuned.params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, _hf_masked_logits(theirs))


def test_sequence_classifier_matches_transformers(tmp_path):
    """``Phi3ForSequenceClassification`` loads as body + ``score`` on the last real token."""
    ref = tiny_phi3(tmp_path, "Phi3ForSequenceClassification", num_labels=3, **CASES["gqa-window-untied"])
    model = hf.load_pretrained(tmp_path)
    ids, mask, _ = padded_batch(12)
    ids, mask = ids[:1] * mask[:1], mask[:1]  # right padding with pad_token_id, where transformers pools
    with torch.no_grad():
        theirs = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(apply(model, ids, mask), theirs, atol=TOL, rtol=0)


def test_config_layouts_and_refusals():
    """transformers v4 configs (``rope_scaling`` of type ``su``, top-level theta and partial factor) read
    as v5's; RoPE types Phi-3 does not use and other activations are refused naming the field."""
    v5 = transformers.Phi3Config(**{**BASE, **CASES["mha-tied-partial-rotary"]}).to_dict()
    rope = v5["rope_parameters"]
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
              rope_scaling={"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    assert Phi3Config.from_hf(v4) == Phi3Config.from_hf(v5)
    assert dict(Phi3Config.from_hf(v5).rope_scaling)["rope_type"] == "longrope"
    with pytest.raises(ValueError, match="rope type 'linear' is not one Phi-3 uses"):
        Phi3Config.from_hf({**v5, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported by Phi-3"):
        Phi3Config.from_hf({**v5, "hidden_act": "gelu"})
    # Overrides are checked as config.json's values are: longrope's 6 factors fit head_dim 16 at 0.75, not 32.
    with pytest.raises(ValueError, match="short_factor"):
        Phi3Config.from_hf(v5, head_dim=32)


def test_a_head_dim_set_in_config_json_is_read(tmp_path):
    """Phi3Config has no head_dim field, but transformers' attention reads one a config.json sets (here
    32, not 64 / 4); jaxtune assumed hidden / heads and failed on the fused projection's shape."""
    ref = tiny_phi3(tmp_path, num_key_value_heads=2, head_dim=32)
    model = hf.load_pretrained(tmp_path)
    assert model.config.head_dim == 32
    ids = np.random.default_rng(3).integers(3, 128, (1, 12)).astype(np.int32)
    np.testing.assert_allclose(apply(model, ids), hf_logits(ref, ids), atol=TOL, rtol=0)
