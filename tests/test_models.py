"""Logit parity of the JAX model families with the PyTorch reference (transformers), fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model, torch_logits

from jaxtune.models import hf
from jaxtune.models.layers import pool

TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

DECODER_CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha": ("LlamaForCausalLM", {"num_key_value_heads": 4}),
    "llama-mqa-tied": ("LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-attention-bias": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": ("LlamaForCausalLM",
                          {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
    "llama-rope-llama3": ("LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-head-dim": ("LlamaForCausalLM", {"head_dim": 32}),
    "mistral-sliding-window": ("MistralForCausalLM", {"sliding_window": 5}),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", {}),
    "qwen3-bias-tied": ("Qwen3ForCausalLM", {"attention_bias": True, "tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=sorted(DECODER_CASES))
def decoder_pair(request, tmp_path_factory):
    arch, overrides = DECODER_CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_hf_model(arch, path, randomize=True, **overrides)  # no gain 1, no bias 0
    return ref, hf.load_pretrained(path), path


def _ids(shape: tuple[int, int], vocab: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def test_decoder_logits_match_transformers(decoder_pair):
    ref, model, _ = decoder_pair
    ids = _ids((2, 12))
    ours = model.module.apply({"params": model.params}, ids)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_decoder_right_and_left_padding(decoder_pair):
    ref, model, _ = decoder_pair
    ids = _ids((2, 10), seed=1)
    # row 0 right-padded to 7 real tokens, row 1 left-padded with 3 pad tokens.
    mask = np.array([[1] * 7 + [0] * 3, [0] * 3 + [1] * 7], np.int32)
    positions = np.array([list(range(10)), [0, 0, 0] + list(range(7))], np.int32)
    ours = np.asarray(model.module.apply({"params": model.params}, ids, mask, positions))
    for row, (lo, hi) in enumerate([(0, 7), (3, 10)]):
        alone = torch_logits(ref, ids[row:row + 1, lo:hi])[0]
        np.testing.assert_allclose(ours[row, lo:hi], alone, atol=TOL, rtol=0)
    assert np.isfinite(ours).all(), "padding rows must not produce NaN"


def test_decoder_packed_documents_do_not_attend_across(decoder_pair):
    ref, model, _ = decoder_pair
    ids = _ids((1, 14), seed=2)
    segments = np.array([[1] * 8 + [2] * 4 + [0] * 2], np.int32)
    positions = np.array([list(range(8)) + list(range(4)) + [0, 0]], np.int32)
    ours = np.asarray(model.module.apply({"params": model.params}, ids, segments, positions))
    np.testing.assert_allclose(ours[0, :8], torch_logits(ref, ids[:, :8])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[0, 8:12], torch_logits(ref, ids[:, 8:12])[0], atol=TOL, rtol=0)


def test_decoder_hidden_and_logits_split_the_forward(decoder_pair):
    _, model, _ = decoder_pair
    ids = _ids((1, 6))
    variables = {"params": model.params}
    hidden = model.module.apply(variables, ids, method="hidden")
    split = model.module.apply(variables, hidden, method="logits")
    embeds = model.module.apply(variables, ids, method="embed")
    from_embeds = model.module.apply(variables, inputs_embeds=embeds, method="hidden")
    np.testing.assert_array_equal(np.asarray(split), np.asarray(model.module.apply(variables, ids)))
    np.testing.assert_array_equal(np.asarray(from_embeds), np.asarray(hidden))


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_policies_give_same_logits_and_grads(remat, tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path)
    plain = hf.load_pretrained(tmp_path)
    rematted = hf.load_pretrained(tmp_path, remat=remat)
    ids = _ids((2, 8))

    def loss(params, module):
        return jnp.mean(module.apply({"params": params}, ids) ** 2)

    g_plain = jax.grad(loss)(plain.params, plain.module)
    g_remat = jax.grad(loss)(plain.params, rematted.module)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_plain, g_remat)


def test_unroll_layers_reaches_a_decoder_and_is_refused_by_an_encoder(tmp_path):
    """``model.unroll_layers`` from a recipe or ``load()``: a decoder's config carries it; a family
    without a scanned stack (BERT) gets a one-line error naming the field, not a TypeError."""
    from jaxtune.data.testing import tiny_tokenizer
    from jaxtune.models.load import LoadError, load

    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    tiny_hf_model("BertModel", tmp_path / "bert")
    assert load(str(tmp_path / "llama"), unroll_layers=True).config.unrolls()
    assert not load(str(tmp_path / "llama"), unroll_layers=False).config.unrolls()
    with pytest.raises(LoadError, match=r"model.unroll_layers: False is not supported by the model in .*bert.*; "
                                        r"leave model.unroll_layers out"):
        load(str(tmp_path / "bert"), unroll_layers=False)


# ----------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    ref = tiny_hf_model("BertModel", path, randomize=True)  # LayerNorm gains and every bias drawn
    return ref, hf.load_pretrained(path)


def test_encoder_hidden_states_with_mask_and_token_types(bert_pair):
    ref, model = bert_pair
    ids = _ids((2, 9), vocab=96)
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)
    types = np.array([[0] * 4 + [1] * 5, [0] * 9], np.int32)
    ours = np.asarray(model.module.apply({"params": model.params}, ids, mask, token_type_ids=types))
    theirs = torch_logits(ref, ids, attention_mask=mask, token_type_ids=types)
    np.testing.assert_allclose(ours[0], theirs[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1, :5], theirs[1, :5], atol=TOL, rtol=0)
    # Pooling: mean over real tokens only, and CLS, as sentence-transformers computes them.
    mean = np.asarray(pool(jnp.asarray(ours), jnp.asarray(mask), "mean"))
    ref_mean = (theirs * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(mean, ref_mean, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(pool(jnp.asarray(ours), jnp.asarray(mask), "cls")), ours[:, 0])
    last = np.asarray(pool(jnp.asarray(ours), jnp.asarray(mask), "last"))
    np.testing.assert_array_equal(last, ours[[0, 1], [8, 4]])


def test_encoder_pooler_matches(bert_pair):
    ref, model = bert_pair
    import torch

    ids = _ids((2, 7), vocab=96)
    hidden = model.module.apply({"params": model.params}, ids)
    pooled = model.module.apply({"params": model.params}, hidden[:, 0], method="pooled")  # the [CLS] states
    with torch.no_grad():
        theirs = ref(torch.as_tensor(ids)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(pooled), theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classifier_matches(num_labels, tmp_path):
    ref = tiny_hf_model("BertForSequenceClassification", tmp_path, randomize=True, num_labels=num_labels)
    model = hf.load_pretrained(tmp_path)
    ids = _ids((3, 8), vocab=96)
    mask = np.array([[1] * 8, [1] * 6 + [0] * 2, [1] * 3 + [0] * 5], np.int32)
    ours = model.module.apply({"params": model.params}, ids, mask)
    assert ours.shape == (3, num_labels)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(ref, ids, attention_mask=mask), atol=TOL, rtol=0)


def test_encoder_dropout_is_active_only_when_training(bert_pair):
    _, model = bert_pair
    ids = _ids((1, 6), vocab=96)
    variables = {"params": model.params}
    eval_out = model.module.apply(variables, ids)
    train_out = model.module.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(np.asarray(eval_out), np.asarray(train_out))


def test_every_family_names_a_config_it_cannot_read_and_what_it_supports():
    """Each family's ``config_from_hf`` reads its own architectures (a sequence classifier as the model
    it wraps, or by ``model_type`` alone) and refuses another family's config in one line that names
    the declared architecture and the supported ones."""
    from jaxtune.models.decoder import DecoderConfig

    alien = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}
    refused = set()
    for name, family in hf.FAMILIES.items():
        name = family.lm or name  # a bare decoder body is read as its causal LM (hf.build)
        with pytest.raises(ValueError, match=r"^config\.json: architecture \['WhisperForConditionalGeneration'\] "
                                             r"is not .*; supported: .*" + name) as error:
            family.config_from_hf(alien)
        assert "\n" not in str(error.value)
        refused.add(family.config_from_hf)
    assert len(refused) >= 10  # every family's reader, not one shared by all
    minimal = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    wrapped = DecoderConfig.from_hf({**minimal, "architectures": ["Qwen2ForSequenceClassification"]})
    by_type = DecoderConfig.from_hf({**minimal, "model_type": "qwen2"})
    assert wrapped.architecture == by_type.architecture == "Qwen2ForCausalLM"


TINY_WINDOWED = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                     use_sliding_window=True, sliding_window=4)
LAYER_TYPES_CASES = {  # config.json without layer_types (as transformers v4 wrote them): each class's own rule
    "qwen2-default-max-window-layers": ("Qwen2ForCausalLM", dict(num_hidden_layers=30), "max_window_layers"),
    "qwen2moe-every-other-layer": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=4, max_window_layers=2, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=24,
                                                              shared_expert_intermediate_size=40), None),
    "smollm3-nope-layers-slide": ("SmolLM3ForCausalLM", dict(num_hidden_layers=4, no_rope_layer_interval=2,
                                                             pad_token_id=0), None),
}


@pytest.mark.parametrize("case", sorted(LAYER_TYPES_CASES))
def test_sliding_layers_without_layer_types_follow_transformers(case, tmp_path):
    """Which layers slide, when config.json has no layer_types, is each config class's rule: Qwen2's
    max_window_layers defaults to 28 (jaxtune: every layer full), Qwen2-MoE slides every other layer
    below it (jaxtune used Qwen2's rule), SmolLM3 slides its NoPE layers (jaxtune: none)."""
    import json

    from helpers import tiny_random_model

    arch, config, drop = LAYER_TYPES_CASES[case]
    tiny_random_model(arch, tmp_path, {**TINY_WINDOWED, **config})
    saved = json.loads((tmp_path / "config.json").read_text())
    kept = {k: v for k, v in saved.items() if k not in ("layer_types", drop)}
    (tmp_path / "config.json").write_text(json.dumps(kept))
    import transformers

    ref = getattr(transformers, arch).from_pretrained(tmp_path).eval()
    assert any(t == "sliding_attention" for t in ref.config.layer_types)
    ids = np.random.default_rng(1).integers(3, 128, (1, 24)).astype(np.int32)
    ours = hf.load_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(ours.module.apply({"params": ours.params}, jnp.asarray(ids))),
                               torch_logits(ref, ids), atol=TOL, rtol=0)


def test_a_tied_config_with_another_stored_output_layer_is_refused(tmp_path):
    """tie_word_embeddings: true beside an lm_head.weight that is not the embedding: transformers uses the
    stored matrix, jaxtune silently used the embedding (other logits); now it says which field to change."""
    import json

    tiny_hf_model("Qwen2ForCausalLM", tmp_path)  # untied: lm_head.weight stored, another matrix
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(hf.CheckpointError, match=r"config.json says tie_word_embeddings: true, but the checkpoint "
                                                 r"stores an lm_head.weight other than the embedding; set "
                                                 r"tie_word_embeddings: false"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("arch, extra", [
    ("Olmo2ForCausalLM", {}),
    ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
])
def test_fields_a_config_leaves_out_take_the_architectures_defaults(arch, extra, tmp_path):
    """Without rms_norm_eps (and rope_theta), transformers uses each class's own default (OLMo 2: 1e-5;
    Mixtral: 1e-5 and 1e6); jaxtune used Llama's (1e-6, 1e4), Mixtral being read as Mistral."""
    import json

    import transformers
    from helpers import tiny_random_model

    config = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, **extra)
    tiny_random_model(arch, tmp_path, config)
    saved = json.loads((tmp_path / "config.json").read_text())
    trimmed = {k: v for k, v in saved.items() if k not in ("rms_norm_eps", "rope_theta", "rope_parameters")}
    (tmp_path / "config.json").write_text(json.dumps(trimmed))
    ref = getattr(transformers, arch).from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(2).integers(3, 128, (1, 12)).astype(np.int32)
    ours = hf.load_pretrained(tmp_path)
    assert ours.config.rms_norm_eps == ref.config.rms_norm_eps
    np.testing.assert_allclose(np.asarray(ours.module.apply({"params": ours.params}, jnp.asarray(ids))),
                               torch_logits(ref, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Olmo2ForCausalLM"])
def test_mlp_bias_is_read_only_where_the_architecture_reads_it(arch, tmp_path):
    """transformers' Mistral, Qwen2, Qwen3 and OLMo 2 MLPs are bias-free whatever ``mlp_bias`` says (Llama's
    and SmolLM3's read it); jaxtune expected the biases and refused the checkpoint as missing tensors."""
    from helpers import tiny_random_model

    config = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mlp_bias=True)
    ref = tiny_random_model(arch, tmp_path, config)
    ids = np.random.default_rng(3).integers(3, 128, (1, 10)).astype(np.int32)
    ours = hf.load_pretrained(tmp_path)
    assert not ours.config.mlp_bias
    np.testing.assert_allclose(np.asarray(ours.module.apply({"params": ours.params}, jnp.asarray(ids))),
                               torch_logits(ref, ids), atol=TOL, rtol=0)
