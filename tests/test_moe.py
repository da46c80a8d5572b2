"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers, fp32, within 1e-4:
logits on padded and packed inputs, greedy KV-cache generation, the router's load-balancing loss in the
train loss, plans on the router and experts with their exports, a classification head's exports as the
family's ``*ForSequenceClassification``, and expert parallelism on 8 devices (the classifier checkpoints'
loading is in test_decoder_classifiers).

The tiny random models get weights far from HF's init (projections and routers of std 0.1, norm gains
1 +- 0.5), so that routing differs token by token and the top-k choice is never a tie.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import tiny_random_model, torch_logits
from test_train_engine import Planned, _run, lm_batch
from test_tuning_lora import forward, randomize_adapters
from test_tuning_peft import IDS, MASK, assert_real_tokens_close, trained

from jaxtune import config, tuning
from jaxtune.models import hf, moe
from jaxtune.models.decoder import AUX
from jaxtune.models.generate import generate
from jaxtune.models.load import LoadError, ModelConfig, load
from jaxtune.training.losses import auxiliary_loss
from jaxtune.training.memory import abstract_model
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.sharding import MeshConfig, make_mesh
from jaxtune.training.step import make_loss_fn
from jaxtune.tuning import ExportError

TOL = 1e-4
# pad_token_id 0, which test_tuning_peft's IDS pad with: transformers' classifiers pool on the last other token.
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
WINDOW = 4
CASES = {
    # Mistral attention with a sliding window, softmax -> top-2 -> renormalised.
    "mixtral-window": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    # Shared expert with its sigmoid gate, a dense layer (mlp_only_layers), top-k weights not renormalised.
    "qwen2moe-shared-dense": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                          mlp_only_layers=[1], norm_topk_prob=False)),
    # q/k norm, attention bias, MQA, tied embeddings, top-3 renormalised.
    "qwen3moe-mqa-tied": ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=24,
                                                      norm_topk_prob=True, num_key_value_heads=1,
                                                      tie_word_embeddings=True, attention_bias=True)),
}


def tiny_moe(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers MoE model saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    return tiny_random_model(architecture, out_dir, {**TINY, **overrides}, seed)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_moe(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


def _logits(model: hf.Pretrained, ids, segment_ids=None, positions=None) -> np.ndarray:
    return np.asarray(model.module.apply({"params": model.params}, ids, segment_ids, positions))


def _torch_logits(ref, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


def _ids(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 128, shape).astype(np.int32)


def test_loads_the_family_with_its_switches(pair):
    ref, model, _ = pair
    cfg, hf_cfg = model.config, ref.config
    assert isinstance(cfg, moe.MoeConfig) and isinstance(model.module, moe.MoeDecoder)
    assert cfg.num_experts == 4 and cfg.experts_per_token == hf_cfg.num_experts_per_tok
    dense = getattr(hf_cfg, "mlp_only_layers", [])
    assert cfg.sparse == tuple(i not in dense for i in range(2))
    assert len(cfg.layer_runs) == (2 if dense else 1)  # a dense layer is a scan apart
    run = model.params[f"layers_0-{0 if dense else 1}"]["mlp"]
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert run["experts"]["gate_proj"]["kernel"].shape[1:] == (e, d, i)
    assert run["experts"]["down_proj"]["kernel"].shape[1:] == (e, i, d)
    assert ("shared_expert" in run) == bool(cfg.shared_expert_intermediate_size)


def test_logits_match_transformers_padded_and_packed(pair):
    ref, model, _ = pair
    ids = _ids((2, 12), seed=1)
    # row 0 right-padded to 9 real tokens, row 1 left-padded by 3.
    mask = np.array([[1] * 9 + [0] * 3, [0] * 3 + [1] * 9], np.int32)
    positions = np.array([list(range(12)), [0, 0, 0] + list(range(9))], np.int32)
    ours = _logits(model, ids, mask, positions)
    for row, (lo, hi) in enumerate([(0, 9), (3, 12)]):
        np.testing.assert_allclose(ours[row, lo:hi], _torch_logits(ref, ids[row:row + 1, lo:hi])[0], atol=TOL, rtol=0)
    assert np.isfinite(ours).all()
    packed = _ids((1, 16), seed=2)
    bounds = [(0, 7), (7, 12), (12, 14)]  # three documents, then two padding slots
    segments, positions = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    ours = _logits(model, packed, segments, positions)
    for lo, hi in bounds:
        np.testing.assert_allclose(ours[0, lo:hi], _torch_logits(ref, packed[:, lo:hi])[0], atol=TOL, rtol=0)
    # Not vacuous: the experts matter (zeroing one expert everywhere moves the logits).
    flat = flatten_dict(model.params)
    for path in [p for p in flat if p[-3:] == ("experts", "down_proj", "kernel")]:
        flat[path] = flat[path].at[:, 0].set(0.0)
    cut = np.asarray(model.module.apply({"params": unflatten_dict(flat)}, packed))
    assert np.abs(cut - _logits(model, packed)).max() > 100 * TOL


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100]]
NEW = 8


def test_greedy_generation_matches_transformers(pair):
    ref, model, _ = pair
    ours = generate(model.module, model.params, PROMPTS, max_new_tokens=NEW, stop_token_ids=[], max_length=32)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == out


def _with_config(path: Path, out: Path, **fields) -> Path:
    """A copy of the model directory ``path`` at ``out`` with ``fields`` written into its config.json."""
    shutil.copytree(path, out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **fields}))
    return out


# Two rows, the second right-padded: the router statistics count only the real tokens.
LM_IDS = _ids((2, 10), seed=5)
LM_MASK = np.array([[1] * 10, [1] * 6 + [0] * 4], np.int32)


def _transformers_lm(directory: Path, **kwargs) -> Any:
    """transformers' causal-LM output (``loss``, ``aux_loss``) on LM_IDS with LM_MASK's real tokens as labels,
    the model loaded from ``directory`` with ``kwargs`` as config fields."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
    labels = np.where(LM_MASK == 1, LM_IDS, -100).astype(np.int64)  # torch's cross-entropy takes int64 targets
    with torch.no_grad():
        return ref(torch.as_tensor(LM_IDS), attention_mask=torch.as_tensor(LM_MASK), labels=torch.as_tensor(labels))


def _lm_losses(model, modes: tuple[bool, ...] = (False, True)) -> tuple[float, ...]:
    """The LM loss fn's (the train step's) mean loss on LM_IDS/LM_MASK for each of ``modes``
    (``deterministic``: False trains, True evaluates)."""
    targets = np.concatenate([LM_IDS[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    weights = (np.concatenate([LM_MASK[:, 1:], np.zeros((2, 1), np.int32)], axis=1) * LM_MASK).astype(np.float32)
    batch = {"input_ids": LM_IDS, "targets": targets, "loss_weights": weights, "segment_ids": LM_MASK,
             "positions": np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))}
    loss_fn = make_loss_fn(model.module, "lm")
    return tuple(float(total / weight) for total, weight, _ in
                 (loss_fn(model.params, batch, jax.random.key(0), deterministic) for deterministic in modes))


def test_train_loss_adds_the_router_loss_as_trl_does(pair, tmp_path):
    """The LM loss fn (the train step's) equals transformers' ``loss`` with ``output_router_logits=True`` on
    the same batch, CE + ``router_aux_loss_coef`` * ``aux_loss`` over the real tokens, whatever config.json's
    ``output_router_logits`` (false in the published Mixtral and Qwen-MoE configs): TRL's SFTTrainer turns it
    on for every MoE model at the config's coefficient. An evaluation reports the CE alone (it reported the
    sum: a perplexity ~4% high that moved with the batching)."""
    _, _, path = pair
    for flag in (False, True):
        directory = _with_config(path, tmp_path / f"router-{flag}", output_router_logits=flag)
        out, model = _transformers_lm(directory, output_router_logits=True), hf.load_pretrained(directory)
        coef = model.config.router_aux_loss_coef
        assert coef == json.loads((directory / "config.json").read_text())["router_aux_loss_coef"] > 0
        assert coef * out.aux_loss.item() > 100 * 1e-6  # not vacuous: the router term is above the tolerance
        _, state = model.module.apply({"params": model.params}, LM_IDS, LM_MASK, method="hidden", mutable=[AUX])
        np.testing.assert_allclose(float(auxiliary_loss(state)), coef * out.aux_loss.item(), rtol=1e-5)
        training, evaluating = _lm_losses(model)
        np.testing.assert_allclose(training, out.loss.item(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(evaluating, out.loss.item() - coef * out.aux_loss.item(), atol=1e-6, rtol=0)


def test_model_router_aux_loss_coef_sets_the_weight_both_ways(mixtral, tmp_path):
    """``model.router_aux_loss_coef`` (jaxtune.load's option, a recipe's field, a command-line override)
    weighs the router loss whatever the config.json says: 0.02 on a config whose output_router_logits is false
    trains transformers' loss with ``output_router_logits=True`` and that coefficient; 0 on one whose flag is
    true trains the cross-entropy alone."""
    _, root = mixtral
    off = _with_config(root / "mixtral", tmp_path / "off", output_router_logits=False)
    on = _with_config(root / "mixtral", tmp_path / "on", output_router_logits=True)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(off)}, "data": {"train": "t.jsonl", "kind": "chat"},
                                      "plan": "lora"}))
    from_recipe = config.load(recipe, ["model.router_aux_loss_coef=2e-2"]).model
    assert from_recipe.router_aux_loss_coef == 0.02
    want = _transformers_lm(off, output_router_logits=True, router_aux_loss_coef=0.02).loss.item()
    assert abs(want - _transformers_lm(off).loss.item()) > 1e-4  # the coefficient matters
    model = load(from_recipe)
    assert model.config == load(str(off), router_aux_loss_coef=0.02).config  # the Python API's option alike
    np.testing.assert_allclose(_lm_losses(model, (False,))[0], want, atol=1e-6, rtol=0)
    want = _transformers_lm(on, output_router_logits=False).loss.item()
    np.testing.assert_allclose(_lm_losses(load(str(on), router_aux_loss_coef=0), (False,))[0], want, atol=1e-6,
                               rtol=0)
    assert load(str(on)).config.router_aux_loss_coef > 0  # while by default the config's coefficient is added


def test_a_head_on_a_moe_body_adds_the_router_loss_only_when_set(mixtral, tmp_path):
    """A classification head on a MoE body trains its head loss alone, as transformers'
    ``*ForSequenceClassification`` (whose loss never adds ``aux_loss``), even from a config.json whose
    ``output_router_logits`` is true; a loaded ``*ForSequenceClassification`` config weighs it 0 too. Set by
    ``model.router_aux_loss_coef``, it adds that weight times transformers' ``aux_loss`` over the real tokens."""
    _, root = mixtral
    directory = _with_config(root / "mixtral", tmp_path / "on", output_router_logits=True)
    hf_config = json.loads((directory / "config.json").read_text())
    classifier = moe.MoeConfig.from_hf({**hf_config, "architectures": ["MixtralForSequenceClassification"]})
    assert classifier.router_aux_loss_coef == 0 and moe.MoeConfig.from_hf(hf_config).router_aux_loss_coef > 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        aux = ref(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).aux_loss.item()
    batch = {"input_ids": IDS, "segment_ids": MASK, "labels": np.array([0, 2], np.int32)}
    for coef in (None, 0.02):
        tuned = tuning.apply_plan(load(str(directory), router_aux_loss_coef=coef),
                                  tuning.head("classification", num_labels=3))
        loss_fn = make_loss_fn(tuned.module, "classification")
        (train, weight, _), (evaluated, _, _) = (loss_fn(tuned.params, batch, jax.random.key(0), deterministic)
                                                 for deterministic in (False, True))
        np.testing.assert_allclose(float((train - evaluated) / weight), (coef or 0) * aux, rtol=1e-5, atol=1e-9)


def test_router_aux_loss_coef_refusals(tmp_path):
    """A negative, infinite or non-number weight, and any weight for a model without a router (loaded, or
    read for memory planning), are refused in one line naming model.router_aux_loss_coef and the fix."""
    for value in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^model.router_aux_loss_coef: expected a number >= 0 \(0: no router "
                                             r"loss\), got .*; give the weight, or leave it out \(null\)"):
            ModelConfig(path="m", router_aux_loss_coef=value)
    for value in ("lots", True):
        with pytest.raises(ValueError, match=r"^model.router_aux_loss_coef: expected a number or null, got"):
            ModelConfig(path="m", router_aux_loss_coef=value)
    tiny_random_model("LlamaForCausalLM", tmp_path, dict(TINY))
    for value in (0.01, 0.0):
        with pytest.raises(LoadError, match=rf"^model.router_aux_loss_coef: {value} weighs a mixture-of-experts "
                                            r"model's router loss .* has no router; leave model.router_aux_loss_coef "
                                            r"out$"):
            load(str(tmp_path), router_aux_loss_coef=value)
    with pytest.raises(LoadError, match=r"^model.router_aux_loss_coef: 0.01 weighs .* has no router; leave"):
        abstract_model(ModelConfig(path=str(tmp_path), router_aux_loss_coef=0.01))


def test_router_loss_in_the_preference_loss_equals_transformers(pair):
    """A preference loss on a MoE policy adds router_aux_loss_coef * transformers' ``aux_loss`` over the
    pair's chosen and rejected rows (padding masked), as TRL's DPOTrainer does; the reference pass adds none.
    With the weight 0 (``model.router_aux_loss_coef: 0``) the loss is the plain DPO loss."""
    import dataclasses

    ref, model, _ = pair
    length = 10
    ids = _ids((2, length), seed=7)  # chosen, rejected
    mask = np.array([[1] * length, [1] * 7 + [0] * 3], np.int32)
    with torch.no_grad():
        aux = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True).aux_loss
    prompt = 4  # the answers' tokens (targets after the prompt) carry the loss
    weights = np.zeros((2, length), np.float32)
    weights[0, prompt - 1:length - 1] = 1
    weights[1, prompt - 1:6] = 1
    batch = {"input_ids": ids, "targets": np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1),
             "loss_weights": weights, "segment_ids": mask,
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))}
    batch = {k: v[None] for k, v in batch.items()}  # (B=1, 2, L): one pair
    dpo = PreferenceConfig(method="dpo")
    coef = ref.config.router_aux_loss_coef
    assert model.config.router_aux_loss_coef == coef > 0  # config.json's, though its output_router_logits is false
    policy, without = model.module, type(model.module)(dataclasses.replace(model.config, router_aux_loss_coef=0.0))
    args = (model.params, batch, jax.random.key(0), False)  # a training step (the policy runs without dropout)
    total, pairs, _ = make_preference_loss_fn(policy, dpo)(*args)
    plain, _, _ = make_preference_loss_fn(without, dpo)(*args)
    evaluated, _, _ = make_preference_loss_fn(policy, dpo)(*args[:-1], True)
    assert float(evaluated) == float(plain)  # an evaluation reports the preference loss alone
    assert float(pairs) == 1
    np.testing.assert_allclose(float(plain), np.log(2), rtol=1e-6)  # policy == reference at the start
    np.testing.assert_allclose(float(total - plain), coef * aux.item(), rtol=1e-5)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans")
    arch, overrides = CASES["mixtral-window"]
    return tiny_moe(arch, path / "mixtral", **overrides), path


def _hf_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.float().numpy()


def test_plans_on_router_and_experts_and_their_exports(mixtral, tmp_path):
    """LoRA on attention + router trained + per-expert LoRA: the labels say so, the merged export loads in
    transformers with equal logits; a PEFT adapter of attention LoRA + trained router loads in peft with equal
    logits, and expert LoRA, which PEFT cannot express for transformers' fused experts, is refused."""
    ref, root = mixtral
    plan = tuning.lora(rank=2, kinds=["attention"]) + tuning.train(r"mlp/gate/") + tuning.lora(rank=2, match="experts")
    tuned, params = trained(root, "mixtral", plan)
    labels = flatten_dict(tuned.labels)
    by_leaf = {"/".join(p): v for p, v in labels.items()}
    run = next(iter(k for k in tuned.params if k.startswith("layers_")))
    assert by_leaf[f"{run}/mlp/gate/kernel"] == "train"
    assert by_leaf[f"{run}/mlp/experts/gate_proj/kernel"] == "freeze"
    assert by_leaf[f"{run}/mlp/experts/gate_proj/lora_a"] == "lora"
    assert tuned.params[run]["mlp"]["experts"]["up_proj"]["lora_a"].shape[1:] == (4, 32, 2)  # one A per expert
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    assert not np.allclose(ours, _hf_logits(ref), atol=1e-2)  # the adapters change the model
    out = tuning.export_merged(tuned, tmp_path / "merged", params=params)
    assert_real_tokens_close(ours, _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval()))
    again = hf.load_pretrained(out)
    np.testing.assert_allclose(_logits(again, IDS, MASK)[MASK == 1], ours[MASK == 1], atol=TOL, rtol=0)
    with pytest.raises(ExportError, match="experts or router.*export_merged"):
        tuning.export_peft(tuned, tmp_path / "refused", params=params)

    tuned, params = trained(root, "mixtral", tuning.lora(rank=2, kinds=["attention"]) + tuning.train(r"mlp/gate/"))
    adapter = tuning.export_peft(tuned, tmp_path / "peft", params=params)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [f"model.layers.{i}.mlp.gate" for i in range(2)]
    ours = np.asarray(tuned.module.apply({"params": params}, input_ids=IDS, segment_ids=MASK))
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "mixtral").eval()
    assert_real_tokens_close(ours, _hf_logits(peft.PeftModel.from_pretrained(base, adapter).eval()))


def test_classification_head_exports_as_the_family_classifier(pair, tmp_path):
    """A MoE body with the default classification head (a bias-free score on the last real token) and attention
    LoRA exports as its family's *ForSequenceClassification: a merged directory that transformers and jaxtune
    load, and a PEFT adapter that peft loads onto that class and jaxtune back onto the body, each with jaxtune's
    logits on a padded batch."""
    ref, model, path = pair
    classifier = type(ref).__name__.replace("ForCausalLM", "ForSequenceClassification")
    plan = tuning.lora(rank=2, kinds=["attention"]) + tuning.head("classification", num_labels=3)
    tuned, params = trained(path.parent, path.name, plan)
    assert tuned.hf_architecture == classifier
    ours = np.asarray(forward(tuned.module, params, IDS, MASK))
    merged = tuning.export_merged(tuned, tmp_path / "merged", params=params)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert type(reloaded).__name__ == classifier
    np.testing.assert_allclose(torch_logits(reloaded, IDS, attention_mask=MASK), ours, atol=TOL, rtol=0)
    back = hf.load_pretrained(merged)
    assert back.architecture == classifier
    np.testing.assert_allclose(np.asarray(forward(back.module, back.params, IDS, MASK)), ours, atol=TOL, rtol=0)

    adapter = tuning.export_peft(tuned, tmp_path / "peft", params=params)
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    base = getattr(transformers, classifier).from_pretrained(path, num_labels=3).eval()
    made = peft.PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(torch_logits(made, IDS, attention_mask=MASK), ours, atol=TOL, rtol=0)
    imported = tuning.load_peft(model, adapter)  # and back, to train on
    assert imported.hf_architecture == classifier
    np.testing.assert_allclose(np.asarray(forward(imported.module, imported.params, IDS, MASK)), ours, atol=TOL, rtol=0)


def test_expert_parallel_run_equals_one_device(mixtral):
    """Two train steps (experts LoRA'd, router trained) on 8 devices as data x expert = 2 x 4, the expert
    stacks split over the expert axis, equal the same steps on one device."""
    _, root = mixtral
    tuned = tuning.apply_plan(hf.load_pretrained(root / "mixtral"), tuning.lora(rank=2, match="experts")
                              + tuning.train(r"mlp/gate/|self_attn"))
    planned = Planned(tuned.module, tuned.params, tuned.labels)
    batches = [lm_batch(8, 16, seed=s) for s in range(2)]
    _, reference, _ = _run(planned, batches, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]),
                           rules=moe.PARTITION_RULES)
    trainable, losses, _ = _run(planned, batches, mesh=make_mesh(MeshConfig(data=2, expert=4)),
                                rules=moe.PARTITION_RULES)
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    lora_b = trainable["layers_0-1"]["mlp"]["experts"]["down_proj"]["lora_b"]
    assert tuple(lora_b.sharding.spec)[:2] == (None, "expert")  # the layer axis whole, the experts split
    assert len({str(s.index) for s in lora_b.addressable_shards}) == 4


def test_nf4_expert_stacks_read_like_their_dequantized_weights(tmp_path):
    """QLoRA on a MoE: the plan quantizes every expert stack (NF4 codes packed two a byte, so the leaf's
    arrays are not the kernel's shape) and the forward equals the dequantized weights' within 1e-5."""
    from jaxtune.models import quant

    tiny_moe("Qwen3MoeForCausalLM", tmp_path, hidden_size=64, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=64)
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path), tuning.freeze(quantize="nf4") + tuning.lora(4))
    experts = {path: leaf for path, leaf in flatten_dict(tuned.params).items()
               if "experts" in path and path[-1] == "kernel"}
    assert experts and all(quant.is_quantized(leaf) for leaf in experts.values())
    apply = jax.jit(lambda p: tuned.module.apply({"params": p}, IDS))
    got, want = np.asarray(apply(tuned.params)), np.asarray(apply(quant.dequantize_tree(tuned.params)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    # The backward pass keeps the quantized stacks, not float copies (the residuals of jax.vjp), with the
    # dequantized weights' gradient: the experts are most of a MoE's bytes.
    trainable, frozen = tuning.partition(randomize_adapters(tuned.params), tuned.labels)

    def loss(t, f):
        return tuned.module.apply({"params": tuning.combine(t, f)}, IDS).astype(jnp.float32).std()

    # The residuals' shapes and dtypes, traced as jit traces them, computed not at all; the gradients in one
    # program each (eagerly every op compiles apart).
    backward = jax.eval_shape(lambda t: jax.vjp(lambda t: loss(t, frozen), t)[1], trainable)
    expert_shapes = {leaf.shape[-3:] for leaf in experts.values()}  # (E, in, out), scanned or not
    assert not [x for x in jax.tree.leaves(backward) if x.shape[-3:] in expert_shapes
                and jnp.issubdtype(x.dtype, jnp.floating)]
    grads = jax.jit(jax.grad(loss))
    got, want = (grads(trainable, f) for f in (frozen, quant.dequantize_tree(frozen)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6 * float(np.abs(w).max()))


def test_peft_adapter_with_the_usual_mlp_targets_imports(pair, tmp_path):
    """PEFT's LoRA with the usual target list (q, k, v, o, gate_proj, up_proj, down_proj) on a
    transformers MoE model adapts only what are nn.Linear there (attention, a shared expert), not
    the fused experts: jaxtune reads that adapter with PEFT's logits (it mapped the names onto the
    experts and refused the file for lacking their tensors)."""
    ref, model, path = pair
    torch.manual_seed(0)
    made = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    made.save_pretrained(tmp_path)
    if json.loads((tmp_path / "adapter_config.json").read_text()).get("target_parameters"):
        # PEFT adapts Qwen3-MoE's fused experts as parameters (one A per fused pair): refused, saying so
        with pytest.raises(ExportError, match=r"option\(s\) \['target_parameters'\] are not supported"):
            tuning.load_peft(model, tmp_path)
        return
    tuned = tuning.load_peft(model, tmp_path)
    assert tuned.adapters and not any("experts" in m for module in tuned.adapters for m in module)
    ours = np.asarray(tuned.module.apply({"params": tuned.params}, input_ids=IDS, segment_ids=MASK))
    assert_real_tokens_close(ours, _hf_logits(made.eval()))
