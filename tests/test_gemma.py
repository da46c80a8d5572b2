"""The Gemma family (Gemma, Gemma 2, Gemma 3 text) against transformers, fp32, within 1e-4: logits on
padded and packed inputs, greedy KV-cache generation, a LoRA adapter in peft, a merged export in
transformers.

The tiny random models get weights far from HF's init (norm gains around 1 +- 0.5 instead of exactly
1, projections of std 0.1), so that the ``1 + weight`` norms, the soft-caps and the sliding windows
all change the outputs; :func:`test_each_feature_changes_the_logits` checks that they do.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import tiny_random_model
from test_tuning_lora import randomize_adapters
from test_tuning_peft import IDS, MASK, assert_real_tokens_close, trained

from jaxtune import tuning
from jaxtune.models import hf
from jaxtune.models.gemma import GemmaConfig
from jaxtune.models.generate import generate

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256)  # head_dim != 64 / 4 on purpose
WINDOW = 4  # shorter than every document below, so sliding layers see less than global ones
SLIDING, FULL = "sliding_attention", "full_attention"
CASES = {
    "gemma-mqa-tied": ("GemmaForCausalLM", dict(num_key_value_heads=1)),
    "gemma-untied-bias": ("GemmaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True)),
    "gemma2-softcap-gqa": ("Gemma2ForCausalLM", dict(sliding_window=WINDOW, attn_logit_softcapping=1.0,
                                                     final_logit_softcapping=2.0, query_pre_attn_scalar=24)),
    "gemma2-nocap-mha": ("Gemma2ForCausalLM", dict(sliding_window=WINDOW, num_key_value_heads=4,
                                                   attn_logit_softcapping=None, final_logit_softcapping=None)),
    # Linear RoPE scaling on the global layer, another base on the sliding ones. attn_logit_softcapping is
    # set to pin transformers' behaviour: Gemma 3 attention ignores it.
    "gemma3-linear-rope-tied": ("Gemma3ForCausalLM", dict(
        sliding_window=WINDOW, layer_types=[SLIDING, FULL], rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, final_logit_softcapping=2.0,
        attn_logit_softcapping=1.0)),
    "gemma3-mqa-untied": ("Gemma3ForCausalLM", dict(sliding_window=WINDOW, layer_types=[FULL, SLIDING],
                                                    num_key_value_heads=1, tie_word_embeddings=False,
                                                    query_pre_attn_scalar=16)),
}
CONFIGS = {"GemmaForCausalLM": "GemmaConfig", "Gemma2ForCausalLM": "Gemma2Config",
           "Gemma3ForCausalLM": "Gemma3TextConfig"}


def tiny_gemma(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers Gemma model saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    return tiny_random_model(architecture, out_dir, {**TINY, **overrides}, seed, config_class=CONFIGS[architecture],
                             norm_offset=-0.5)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_gemma(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


def _logits(model: hf.Pretrained, ids, segment_ids=None, positions=None, cfg=None) -> np.ndarray:
    """Eager ``apply``: its per-op executables are cached across the cases and config variants of this
    module, which on 2 CPU cores is several times faster than compiling each whole forward."""
    module = model.module if cfg is None else type(model.module)(cfg)
    return np.asarray(module.apply({"params": model.params}, ids, segment_ids, positions))


def _torch_logits(ref, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


def _ids(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 128, shape).astype(np.int32)


def test_loads_the_family_and_its_switches(pair):
    ref, model, _ = pair
    cfg, hf_cfg = model.config, ref.config
    assert isinstance(cfg, GemmaConfig) and type(model.module).__name__ == "Gemma"
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert ("lm_head" in model.params) != cfg.tie_word_embeddings
    windows = [WINDOW if t == SLIDING else None for t in getattr(hf_cfg, "layer_types", None) or [FULL] * 2]
    assert list(cfg.layer_windows) == windows


def test_logits_match_transformers_with_padding(pair):
    ref, model, _ = pair
    ids = _ids((2, 12), seed=1)
    # row 0 right-padded to 9 real tokens, row 1 left-padded by 3.
    mask = np.array([[1] * 9 + [0] * 3, [0] * 3 + [1] * 9], np.int32)
    positions = np.array([list(range(12)), [0, 0, 0] + list(range(9))], np.int32)
    ours = _logits(model, ids, mask, positions)
    for row, (lo, hi) in enumerate([(0, 9), (3, 12)]):
        np.testing.assert_allclose(ours[row, lo:hi], _torch_logits(ref, ids[row:row + 1, lo:hi])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(_logits(model, ids[:1]), _torch_logits(ref, ids[:1]), atol=TOL, rtol=0)
    assert np.isfinite(ours).all(), "padding rows must not produce NaN"


def test_packed_documents_match_each_document_alone(pair):
    ref, model, _ = pair
    ids = _ids((1, 16), seed=2)
    bounds = [(0, 7), (7, 12), (12, 14)]  # three documents, then two padding slots
    segments = np.zeros((1, 16), np.int32)
    positions = np.zeros((1, 16), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    ours = _logits(model, ids, segments, positions)
    for lo, hi in bounds:
        np.testing.assert_allclose(ours[0, lo:hi], _torch_logits(ref, ids[:, lo:hi])[0], atol=TOL, rtol=0)


def test_each_feature_changes_the_logits(pair):
    """The parity checks above are not vacuous: without each Gemma feature this config has, the logits
    move far beyond the tolerance."""
    ref, model, _ = pair
    cfg = model.config
    ids = _ids((1, 12), seed=3)
    theirs = _torch_logits(ref, ids)
    variants = {"norm (1 + w)": None}
    if any(cfg.layer_windows):
        # The same runs of scanned layers (the params' layout), all with full attention.
        variants["sliding windows"] = dataclasses.replace(cfg, layer_windows=(None,) * cfg.num_layers,
                                                          layer_groups=tuple(b - a for a, b in cfg.layer_runs))
    if cfg.attn_logit_softcapping:
        variants["attention soft-cap"] = dataclasses.replace(cfg, attn_logit_softcapping=None)
    if cfg.final_logit_softcapping:
        variants["final soft-cap"] = dataclasses.replace(cfg, final_logit_softcapping=None)
    if cfg.local_rope_theta is not None:
        variants["local RoPE base"] = dataclasses.replace(cfg, local_rope_theta=None)
    if cfg.rope_scaling:
        variants["RoPE scaling"] = dataclasses.replace(cfg, rope_scaling=None)
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        variants["query_pre_attn_scalar"] = dataclasses.replace(cfg, query_pre_attn_scalar=None)
    for feature, variant in variants.items():
        if variant is None:  # Llama's norm semantics: the stored weight as the gain
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: x - 1 if "norm" in jax.tree_util.keystr(p) else x, model.params)
            ours = np.asarray(model.module.apply({"params": params}, ids, None, None))
        else:
            ours = _logits(model, ids, cfg=variant)
        assert np.abs(ours - theirs).max() > 100 * TOL, f"{feature} does not matter in this configuration"


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100]]
NEW = 10


def test_greedy_generation_matches_transformers(pair):
    ref, model, _ = pair
    eos = [ref.generation_config.eos_token_id] if ref.generation_config.eos_token_id is not None else []
    ours = generate(model.module, model.params, PROMPTS, max_new_tokens=NEW, stop_token_ids=eos, max_length=32)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=eos or None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == next((out[:i] for i, t in enumerate(out) if t in eos), out)
    assert any(len(row) == NEW for row in ours)  # the comparison is not vacuous (and runs past the window)


@pytest.fixture(scope="module")
def adapted(pair):
    """LoRA on every linear (and DoRA nowhere: PEFT's DoRA is covered elsewhere), trained final norm and,
    on a tied model, a trained embedding: the tied path that PEFT needs ensure_weight_tying for."""
    _, model, path = pair
    plan = tuning.lora(rank=4, alpha=8) + tuning.train("^norm/")
    if model.config.tie_word_embeddings:
        plan = plan + tuning.train("^embed_tokens/")
    tuned, params = trained(path.parent, path.name, plan)
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    return tuned, params, ours


def _hf(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _hf_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.float().numpy()


def test_lora_adapter_loads_in_peft_with_equal_logits(pair, adapted, tmp_path):
    _, model, path = pair
    tuned, params, ours = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 7 * model.config.num_layers
    base = _hf(path)
    assert not np.allclose(ours, _hf_logits(base), atol=1e-2)  # the adapter changes the model
    assert_real_tokens_close(ours, _hf_logits(peft.PeftModel.from_pretrained(base, tmp_path).eval()))


def test_merged_export_loads_in_transformers_with_equal_logits(pair, adapted, tmp_path):
    tuned, params, ours = adapted
    out = tuning.export_merged(tuned, tmp_path, params=params)
    assert json.loads((out / "config.json").read_text())["architectures"] == [tuned.architecture]
    assert_real_tokens_close(ours, _hf_logits(_hf(out)))
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    np.testing.assert_allclose(_logits(again, IDS, MASK), ours, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3-one")
    arch, overrides = CASES["gemma3-linear-rope-tied"]
    return tiny_gemma(arch, path, **overrides), path


def test_prompt_tuning_matches_peft(gemma3, tmp_path):
    """Virtual tokens are not scaled by sqrt(hidden_size): PEFT concatenates them after the scaled
    embedding lookup, as :meth:`Gemma.embed` and the tuned wrapper do."""
    ref, path = gemma3
    tuned, params = trained(path.parent, path.name, tuning.prompt_tuning(3))
    tuning.export_peft(tuned, tmp_path, params=params)
    theirs = _hf_logits(peft.PeftModel.from_pretrained(ref, tmp_path).eval())
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, theirs[:, 3:])


def test_prompt_tuning_starts_from_the_embeddings_as_peft_reads_them(gemma3):
    """PEFT initialises virtual tokens from text through Gemma's embedding module, which scales the rows by
    sqrt(hidden_size); jaxtune took the raw rows, 16x (here; 48x at hidden 2304) smaller than the tokens the
    model sees."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from jaxtune.data.testing import tiny_tokenizer
    from jaxtune.tuning.labels import PROMPT_LEAF

    _, path = gemma3
    tokenizer = tiny_tokenizer()
    tuned = tuning.apply_plan(hf.load_pretrained(path), tuning.prompt_tuning(4, init="text", text="alpha beta"),
                              tokenizer=tokenizer)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text="alpha beta", tokenizer_name_or_path="tiny")
    import unittest.mock

    with unittest.mock.patch("transformers.AutoTokenizer.from_pretrained", return_value=tokenizer):
        theirs = get_peft_model(_hf(path), config).prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(tuned.params[PROMPT_LEAF]), theirs, rtol=1e-6, atol=1e-6)


def test_peft_adapter_training_a_tied_embedding_imports_exactly(gemma3, tmp_path):
    """Without ensure_weight_tying PEFT trains a tied Gemma's embed_tokens alone and lm_head keeps the old
    matrix: load_peft must untie Gemma too (it used to untie the Llama-family decoders only)."""
    ref, path = gemma3
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf(path), peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"],
                                                            modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    tuned = tuning.load_peft(hf.load_pretrained(path), tmp_path)
    assert not tuned.config.tie_word_embeddings and "lm_head" in tuned.params
    ours = np.asarray(tuned.module.apply({"params": tuned.params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, _hf_logits(model.eval()))


def test_chunked_lm_loss_equals_transformers_loss(gemma3):
    """The training loss projects hidden states chunk by chunk through :meth:`Gemma.logits`, so the final
    soft-cap is in it: jaxtune's chunked loss equals transformers' ``labels=`` loss."""
    from jaxtune.training.losses import causal_lm_loss

    ref, path = gemma3
    model = hf.load_pretrained(path)
    ids = _ids((2, 11), seed=4)
    variables = {"params": model.params}
    hidden = model.module.apply(variables, ids, method="hidden")
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    weights = np.ones(ids.shape, np.float32)
    weights[:, -1] = 0
    total, count = causal_lm_loss(hidden, targets, weights, lambda h: model.module.apply(variables, h, method="logits"),
                                  chunk_tokens=6)
    with torch.no_grad():
        theirs = ref(torch.as_tensor(ids), labels=torch.as_tensor(ids).long()).loss.item()
    np.testing.assert_allclose(float(total / count), theirs, atol=TOL, rtol=0)


def test_remat_keeps_lora_gradients(gemma3):
    """Gemma's blocks under rematerialisation: same LoRA gradients of the LM loss as without."""
    _, path = gemma3
    grads = []
    for remat in ("none", "block"):
        tuned = tuning.apply_plan(hf.load_pretrained(path, remat=remat), tuning.lora(rank=2, kinds=["attention"]))
        params = tuning.partition(tuned.params, tuned.labels)[0]
        frozen = tuning.partition(tuned.params, tuned.labels)[1]

        def loss(trainable, module=tuned.module, frozen=frozen):
            logits = module.apply({"params": tuning.combine(trainable, frozen)}, input_ids=IDS, segment_ids=MASK)
            return (logits.astype("float32") ** 2).mean()

        grads.append(jax.jit(jax.grad(loss))(randomize_adapters(params)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[0]))


def test_transformers_v4_config_layout_reads_the_same(tmp_path):
    """Gemma 3 checkpoints on the hub carry v4's rope_theta / rope_scaling / rope_local_base_freq /
    sliding_window_pattern instead of v5's per-layer-type rope_parameters and layer_types."""
    arch, overrides = CASES["gemma3-linear-rope-tied"]
    tiny_gemma(arch, tmp_path, **overrides)
    v5 = json.loads((tmp_path / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1_000_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=100.0,
              sliding_window_pattern=2)
    assert GemmaConfig.from_hf(v4) == GemmaConfig.from_hf(v5)
    cfg = GemmaConfig.from_hf(v5)
    assert cfg.local_rope_theta == 100.0 and dict(cfg.rope_scaling)["factor"] == 8
    assert cfg.layer_windows == (WINDOW, None)
    with pytest.raises(ValueError, match="use_bidirectional_attention .* load a \\*ForCausalLM checkpoint"):
        GemmaConfig.from_hf({**v5, "use_bidirectional_attention": True})
