"""RoPE scalings against transformers: each type's inverse frequencies and attention scaling against
``ROPE_INIT_FUNCTIONS`` (and the dynamic/longrope choice by sequence length), and tiny Llama models with
``yarn`` and ``dynamic`` RoPE against transformers on padded and packed batches and in greedy generation
(``longrope`` runs in Phi-3's tests, the family that uses it).

The reference sees the same batch, positions included: ``dynamic`` and ``longrope`` pick their
frequencies from the batch's largest position (transformers' ``max(position_ids) + 1``), so a row
alone may rotate differently from the same row in a batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from helpers import TINY_DECODER, randomize_weights
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxtune.models import hf
from jaxtune.models.decoder import DecoderConfig
from jaxtune.models.generate import generate
from jaxtune.models.phi3 import Phi3Config
from jaxtune.models.rope import rope_inverse_frequencies

TOL = 1e-4
HEADS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16: 8 frequencies


def _factors(n: int, top: float) -> list[float]:
    return [float(x) for x in np.linspace(1.0, top, n)]


# name -> (config class, config fields, sequence lengths the frequencies are compared at)
FREQ_CASES = {
    "default": ("LlamaConfig", {}, [None]),
    "linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}, [None]),
    "llama3": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
               [None]),
    "yarn": ("LlamaConfig", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16}}, [None]),
    "yarn-options": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
        "beta_slow": 2.0, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}}, [None]),
    "yarn-attention-factor": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "attention_factor": 0.9}}, [None]),
    "dynamic": ("LlamaConfig", {"max_position_embeddings": 16, "rope_parameters": {"rope_type": "dynamic",
                                                                                    "factor": 4.0}},
                [None, 10, 16, 17, 40]),
    "longrope": ("Phi3Config", {"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                                "rope_parameters": {"rope_type": "longrope", "short_factor": _factors(8, 2.0),
                                                    "long_factor": _factors(8, 8.0)}}, [None, 16, 17, 40]),
    "longrope-partial-factor": ("Phi3Config", {
        "max_position_embeddings": 64, "original_max_position_embeddings": 16, "rope_parameters": {
            "rope_type": "longrope", "partial_rotary_factor": 0.5, "short_factor": _factors(4, 1.5),
            "long_factor": _factors(4, 6.0), "factor": 3.0, "attention_factor": 1.3}}, [None, 40]),
    "default-partial": ("Phi3Config", {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}},
                        [None]),
}


@pytest.mark.parametrize("case", sorted(FREQ_CASES))
def test_frequencies_and_attention_scaling_match_transformers(case):
    """From a saved config.json, as jaxtune loads it, to transformers' own rope init, at each length."""
    cls, fields, lengths = FREQ_CASES[case]
    config = getattr(transformers, cls)(vocab_size=32, intermediate_size=32, num_hidden_layers=1,
                                        **{**HEADS, **fields})
    ours_cfg = (Phi3Config if cls == "Phi3Config" else DecoderConfig).from_hf(config.to_dict())
    ours = rope_inverse_frequencies(ours_cfg.head_dim, ours_cfg.rope_theta, dict(ours_cfg.rope_scaling or ()))
    kind = config.rope_parameters["rope_type"]
    for seq_len in lengths:
        if kind == "default":
            inv, scale = _default(config)
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
        np.testing.assert_allclose(np.asarray(ours.inverse(seq_len)), inv.numpy(), rtol=1e-6, atol=0,
                                   err_msg=f"seq_len {seq_len}")
        assert ours.attention_scaling == pytest.approx(scale, rel=1e-12)
    if kind in ("dynamic", "longrope"):  # the length matters for these two (else the loop above is vacuous)
        assert not np.allclose(np.asarray(ours.inverse(None)), np.asarray(ours.inverse(40)))


def _default(config):
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return Phi3RotaryEmbedding.compute_default_rope_parameters(config)


def test_bad_rope_parameters_fail_naming_the_field():
    base = {"num_hidden_layers": 1, "vocab_size": 32, "intermediate_size": 32, **HEADS}
    _, cfg, module = hf.build({**base, "model_type": "llama", "rope_parameters": {
        "rope_type": "longrope", "long_factor": [1.0] * 8, "original_max_position_embeddings": 4}})
    with pytest.raises(ValueError, match="rope type 'longrope' needs 'short_factor'"):
        hf.abstract_params(module, cfg)  # what loading does before it reads a tensor
    with pytest.raises(ValueError, match="rope_parameters.long_factor has 3 entries; .* needs 8"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "longrope", "long_factor": [1.0] * 3,
                                               "short_factor": [1.0] * 8, "original_max_position_embeddings": 4,
                                               "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'dynamic' needs 'max_position_embeddings'"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'mrope' is not supported"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "mrope"})


# ----------------------------------------------------------------------------- tiny Llama models


LLAMA_CASES = {
    # yarn: interpolated low frequencies and cos/sin scaled by 0.1 ln(4) + 1, at every length.
    "yarn": dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 8}),
    # dynamic: the base grows once a forward is longer than 16 tokens.
    "dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
}
LONG = 22  # longer than both models' scaling threshold


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights moved far off transformers' init (norm gains 0.5..1.5, projections of std 0.1), so that the
    rotation's details move the logits well beyond the tolerance."""
    torch.manual_seed(1)
    randomize_weights(model)
    return model.eval()


def hf_logits(ref: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None,
              positions: np.ndarray | None = None) -> np.ndarray:
    """transformers' logits for this batch, from a fresh rotary module (``dynamic`` keeps frequencies it
    grew in an earlier, longer call). Without a mask, ``positions`` that restart mark packed documents."""
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)
    inputs = {"input_ids": torch.as_tensor(ids)}
    if mask is not None:
        inputs["attention_mask"] = torch.as_tensor(mask)
    if positions is not None:
        inputs["position_ids"] = torch.as_tensor(positions).long()
    with torch.no_grad():
        return ref(**inputs, use_cache=False).logits.float().numpy()


def ids_of(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(1, 128, shape).astype(np.int32)


def padded_batch(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows of ``length``: row 0 right-padded by 3, row 1 left-padded by 5 (ids, mask, positions)."""
    ids = ids_of((2, length), seed=1)
    mask = np.ones((2, length), np.int32)
    mask[0, -3:], mask[1, :5] = 0, 0
    positions = np.stack([np.arange(length), np.maximum(np.arange(length) - 5, 0)]).astype(np.int32)
    return ids, mask, positions


def packed_row(lengths: tuple[int, ...], fill: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row of documents of ``lengths`` then ``fill`` padding slots (ids, segment ids, positions)."""
    ids = ids_of((1, sum(lengths) + fill), seed=2)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(fill)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(fill)])[None]
    return ids, segments.astype(np.int32), positions.astype(np.int32)


def apply(model: hf.Pretrained, ids, segment_ids=None, positions=None, cfg=None) -> np.ndarray:
    module = model.module if cfg is None else type(model.module)(cfg)
    return np.asarray(module.apply({"params": model.params}, ids, segment_ids, positions))


@pytest.fixture(scope="module", params=sorted(LLAMA_CASES))
def llama(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"llama-{request.param}")
    config = transformers.LlamaConfig(**{**TINY_DECODER, **LLAMA_CASES[request.param]})
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    ref = randomized(transformers.LlamaForCausalLM(config))
    ref.save_pretrained(path)
    return ref, hf.load_pretrained(path)


def test_llama_padded_batch_matches_transformers(llama):
    ref, model = llama
    for length in (12, LONG):  # below and above the threshold (dynamic changes only above it)
        ids, mask, positions = padded_batch(length)
        ours, theirs = apply(model, ids, mask, positions), hf_logits(ref, ids, mask, positions)
        np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=TOL, rtol=0, err_msg=f"length {length}")
    unscaled = dataclasses.replace(model.config, rope_scaling=None)  # the scaling is not vacuous here
    assert np.abs(apply(model, ids, mask, positions, cfg=unscaled)[mask == 1] - theirs[mask == 1]).max() > 100 * TOL


def test_llama_packed_row_matches_transformers(llama):
    """Documents of 20, 5 and 3 tokens: the longest document, not the 30-slot row, sets the length that
    dynamic RoPE scales by, in both (transformers reads packing from the restarting positions)."""
    ref, model = llama
    ids, segments, positions = packed_row((20, 5, 3), fill=2)
    ours, theirs = apply(model, ids, segments, positions), hf_logits(ref, ids, positions=positions)
    real = segments > 0
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def test_llama_greedy_generation_matches_transformers(llama):
    """A 12-token prompt and 10 new tokens: dynamic RoPE grows its base from the 17th token on, and keys
    already cached keep the rotation they were written with, in both."""
    ref, model = llama
    prompt = ids_of((1, 12), seed=3)[0].tolist()
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = generate(model.module, model.params, [prompt], max_new_tokens=10, stop_token_ids=[], max_length=32)
    assert ours[0] == theirs and len(theirs) == 10
