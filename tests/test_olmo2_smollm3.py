"""OLMo 2 and SmolLM3 against transformers, fp32, within 1e-4: logits on padded and packed inputs,
greedy KV-cache generation, a LoRA adapter in peft, a merged export in transformers (and back).

The family-generic checks are test_gemma's, imported and run on these families' ``pair`` fixture;
this module adds what is specific to them: OLMo 2's post-branch norms and whole-projection q/k
norm, SmolLM3's NoPE layers (with and without sliding windows), and the configs they read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers import tiny_random_model
from test_gemma import (  # noqa: F401 - the family-generic tests and their fixture, run on this module's pair
    _ids,
    _logits,
    _torch_logits,
    adapted,
    test_greedy_generation_matches_transformers,
    test_logits_match_transformers_with_padding,
    test_lora_adapter_loads_in_peft_with_equal_logits,
    test_merged_export_loads_in_transformers_with_equal_logits,
    test_packed_documents_match_each_document_alone,
)

from jaxtune.models import hf, olmo2
from jaxtune.models.decoder import DecoderConfig

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 4
CASES = {
    "olmo2-gqa-untied": ("Olmo2ForCausalLM", dict()),
    "olmo2-mqa-bias-tied": ("Olmo2ForCausalLM", dict(num_key_value_heads=1, attention_bias=True,
                                                     tie_word_embeddings=True, head_dim=32)),
    # Layer 1 is NoPE (every 2nd layer), embeddings tied (SmolLM3's default).
    "smollm3-nope-tied": ("SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),
    # Layer 0 NoPE with a sliding window (transformers slides only NoPE layers by default), bias, untied.
    "smollm3-nope-sliding-bias": ("SmolLM3ForCausalLM", dict(no_rope_layers=[0, 1], use_sliding_window=True,
                                                            sliding_window=WINDOW, attention_bias=True,
                                                            tie_word_embeddings=False)),
}


def tiny_model(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers model saved to ``out_dir``, norm gains in [0.5, 1.5) and projections of std
    0.1, so that every norm and the NoPE/RoPE split change the outputs."""
    return tiny_random_model(architecture, out_dir, {**TINY, **overrides}, seed)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_model(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


def test_reads_the_family_and_its_switches(pair):
    ref, model, _ = pair
    cfg, hf_cfg = model.config, ref.config
    assert isinstance(cfg, DecoderConfig) and cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert ("lm_head" in model.params) != cfg.tie_word_embeddings
    if isinstance(ref, transformers.Olmo2ForCausalLM):
        assert type(model.module) is olmo2.Olmo2 and cfg.qk_norm == "projection"
        norm = jax.tree.leaves(model.params["layers_0-1"]["self_attn"]["k_norm"])[0]
        assert norm.shape == (2, cfg.num_kv_heads * cfg.head_dim)  # one gain over the whole projection
    else:
        assert cfg.layer_rope == tuple(bool(f) for f in hf_cfg.no_rope_layers)
        assert [k for k in model.params if k.startswith("layers_")] == ["layers_0-0", "layers_1-1"]  # a run per kind
        windows = [WINDOW if t == "sliding_attention" else None for t in hf_cfg.layer_types]
        assert list(cfg.windows) == windows


def test_each_feature_changes_the_logits(pair):
    """The parity checks are not vacuous: without each feature of this configuration, the logits move
    far beyond the tolerance."""
    ref, model, _ = pair
    cfg = model.config
    ids = _ids((1, 12), seed=3)
    theirs = _torch_logits(ref, ids)
    runs = tuple(b - a for a, b in cfg.layer_runs)
    variants = {}
    if cfg.layer_rope:
        variants["NoPE layers"] = dataclasses.replace(cfg, layer_rope=(), layer_groups=runs)
    if any(cfg.windows):
        variants["sliding windows"] = dataclasses.replace(cfg, layer_windows=(), layer_groups=runs)
    for feature, variant in variants.items():
        assert np.abs(_logits(model, ids, cfg=variant) - theirs).max() > 100 * TOL, feature
    if cfg.qk_norm:  # unit q/k gains: the norm over the whole projection (not per head) is what matches
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x * 0 + 1 if "q_norm" in jax.tree_util.keystr(p) else x, model.params)
        ours = np.asarray(model.module.apply({"params": params}, ids, None, None))
        assert np.abs(ours - theirs).max() > 100 * TOL, "q/k norm"


def test_config_defaults_without_the_optional_keys():
    """A SmolLM3 config.json without no_rope_layers (older writers) puts NoPE on every
    no_rope_layer_interval-th layer (default 4) and ties embeddings by default, as transformers does;
    one that lists too few flags fails naming the key."""
    base = {**TINY, "architectures": ["SmolLM3ForCausalLM"], "num_hidden_layers": 8}
    cfg = DecoderConfig.from_hf(base)
    assert cfg.layer_rope == (True, True, True, False) * 2 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 2_000_000.0 and cfg.layer_runs == ((0, 3), (3, 4), (4, 7), (7, 8))
    with pytest.raises(ValueError, match="no_rope_layers has 2 entries for 8 layers"):
        DecoderConfig.from_hf({**base, "no_rope_layers": [1, 0]})
    with pytest.raises(ValueError, match=r"layers 0\.\.3 mix attention kinds"):
        dataclasses.replace(cfg, layer_groups=(4, 4))
    assert not olmo2.config_from_hf({**TINY, "model_type": "olmo2"}).tie_word_embeddings


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_bf16_rms_norm_rounds_as_its_family_does(family):
    """Llama's norm rounds the normalised input to bf16 and then the product (``weight * x.to(dtype)``);
    OLMo 2's multiplies in float32 and rounds once (``(weight * x).to(dtype)``): bitwise transformers'."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm as Reference

    from jaxtune.models.layers import RMSNorm

    rng = np.random.RandomState(0)
    x, gain = rng.normal(size=(8, 64)).astype(np.float32), rng.normal(1, 0.3, 64).astype(np.float32)
    reference = (LlamaRMSNorm if family == "llama" else Reference)(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(gain))
        theirs = reference(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    norm = olmo2.Olmo2RMSNorm if family == "olmo2" else RMSNorm
    ours = norm(1e-6, jnp.bfloat16, jnp.bfloat16).apply(
        {"params": {"scale": jnp.asarray(gain, jnp.bfloat16)}}, jnp.asarray(x, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(ours, np.float32), theirs)
