"""``*ForSequenceClassification`` of every decoder family beside Llama/Qwen2 (tested in
test_adapter_exactness), the mixture-of-experts ones included: a transformers checkpoint loads into
jaxtune with equal logits, and after a LoRA is merged it goes back to transformers, which runs it on a
padded batch of 2 with equal logits, and back into jaxtune again. fp32, within 1e-4.

The checkpoints have no ``pad_token_id`` (transformers then cannot pool a padded batch), so the
export must add one (the eos id, as for Llama): the padded batch in transformers checks that too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import randomize_weights
from test_tuning_lora import forward, randomize_adapters
from test_tuning_peft import IDS, MASK, torch_out

from jaxtune import tuning
from jaxtune.models import hf

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None,
            num_labels=3)
WINDOW = 4  # shorter than the inputs, so the sliding layers matter
MOE = dict(hidden_size=32, intermediate_size=48, num_experts_per_tok=2)  # with 4 experts
# classifier -> (its config class, config overrides)
CASES = {
    "GemmaForSequenceClassification": ("GemmaConfig", dict(num_key_value_heads=1)),
    "Gemma2ForSequenceClassification": ("Gemma2Config", dict(sliding_window=WINDOW, attn_logit_softcapping=1.0,
                                                            final_logit_softcapping=2.0)),
    "Gemma3TextForSequenceClassification": ("Gemma3TextConfig", dict(
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=100.0)),
    "Qwen3ForSequenceClassification": ("Qwen3Config", dict(attention_bias=True, head_dim=32)),
    "MistralForSequenceClassification": ("MistralConfig", dict(sliding_window=WINDOW)),
    "Olmo2ForSequenceClassification": ("Olmo2Config", dict()),
    "SmolLM3ForSequenceClassification": ("SmolLM3Config", dict(no_rope_layer_interval=2)),
    # One MoE classifier, the one with most parts (a shared expert and a dense layer): the three share
    # MoeClassifier, and test_moe.py exports a head on each MoE body to its classifier class and back.
    "Qwen2MoeForSequenceClassification": ("Qwen2MoeConfig", dict(
        MOE, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1])),
}


def tiny_classifier(architecture: str, out_dir) -> torch.nn.Module:
    """A random transformers classifier saved to ``out_dir``; norm weights and projections moved off
    HF's init so that every part of the body changes the output."""
    config_name, overrides = CASES[architecture]
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    randomize_weights(model, norm_offset=-0.5 if "Gemma" in architecture else 0.5)  # Gemma's gain is 1 + w
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, tiny_classifier(request.param, path), path


def test_checkpoint_round_trips_through_transformers(checkpoint, tmp_path):
    arch, ref, path = checkpoint
    pretrained = hf.load_pretrained(path)
    assert pretrained.architecture == arch and "score" in pretrained.params
    ours = np.asarray(pretrained.module.apply({"params": pretrained.params}, IDS, segment_ids=MASK))
    # Without pad_token_id transformers pools only a batch of one: each row alone, its real tokens only.
    for row, n in enumerate(MASK.sum(axis=1)):
        np.testing.assert_allclose(ours[row], torch_out(ref, input_ids=IDS[row:row + 1, :n])[0], atol=TOL, rtol=0)

    tuned = tuning.apply_plan(pretrained, tuning.lora(rank=2))  # the body + the checkpoint's own score head
    assert tuned.head.pooling == "last" and tuned.hf_architecture == arch
    params = randomize_adapters(tuned.params, seed=1)
    out = tuning.export_merged(tuned, tmp_path, params=params)
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    assert pad == 2  # the eos id: without one transformers refuses a padded batch
    ids = np.where(MASK == 1, np.maximum(IDS, pad + 1), pad)  # padded with pad, no pad among the real tokens
    expected = np.asarray(forward(tuned.module, params, ids, MASK))
    assert not np.allclose(expected, ours, atol=1e-2)  # the merged LoRA changes the model
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded).__name__ == arch
    np.testing.assert_allclose(torch_out(reloaded, input_ids=ids, attention_mask=MASK), expected, atol=TOL, rtol=0)
    back = hf.load_pretrained(out)
    assert back.architecture == arch
    np.testing.assert_allclose(np.asarray(back.module.apply({"params": back.params}, ids, segment_ids=MASK)),
                               expected, atol=TOL, rtol=0)
