"""ModernBERT against transformers, fp32, within 1e-4: token states and classifier logits on padded and
packed inputs (cls and mean pooling, global/local layer patterns, local windows that matter at the test
length), its classification head exported to ``ModernBertForSequenceClassification`` and back, LoRA on the
fused ``Wqkv``/``Wi`` loaded by peft, a ``ModernBertForMaskedLM`` checkpoint loading as the body, and a
two-step recipe run.

The tiny random models get weights far from HF's init (LayerNorm gains around 1 +- 0.5, every other
tensor of std 0.1), so that every norm, bias and head layer moves the outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from helpers import torch_logits
from test_tuning_lora import forward
from test_tuning_peft import trained

from jaxtune import config, tuning
from jaxtune.data.testing import tiny_tokenizer, write_jsonl
from jaxtune.models import hf
from jaxtune.models.modernbert import ModernBertConfig
from jaxtune.recipe import finetune
from jaxtune.tuning.plan import PlanError

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
CASES = {  # name: (architecture, config overrides); local_attention // 2 is the half-window of a local layer
    # layers: global, local (|i - j| <= 2), global; as released: no biases, GELU, cls pooling
    "cls-classifier": ("ModernBertForSequenceClassification",
                       dict(num_labels=3, global_attn_every_n_layers=2, local_attention=4, classifier_dropout=0.1)),
    # layers: global, local (<= 1), local; every bias on, other activations, RoPE bases of its own, mean pooling
    "mean-model-biases": ("ModernBertModel",
                          dict(classifier_pooling="mean", global_attn_every_n_layers=3, local_attention=2,
                               norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
                               hidden_activation="gelu_pytorch_tanh", classifier_activation="tanh",
                               global_rope_theta=1000.0, local_rope_theta=50.0)),
}


def tiny_modernbert(architecture: str, out_dir, seed: int = 0, **overrides):
    """A random transformers ModernBERT saved to ``out_dir``, weights moved off HF's init (see module doc)."""
    cfg = transformers.ModernBertConfig(**{**TINY, **overrides})
    cfg.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_gain = "norm" in name and name.endswith("weight")
            param.copy_(torch.rand_like(param) + 0.5 if is_norm_gain else 0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_modernbert(arch, path, **overrides)
    return ref, hf.load_pretrained(path), path


def _padded(left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids ``(2, 10)``: row 0 right-padded to 6 real tokens, row 1 with 8, on the left if ``left``."""
    ids = np.random.RandomState(1).randint(4, 128, (2, 10)).astype(np.int32)
    mask = np.array([[1] * 6 + [0] * 4, [0] * 2 + [1] * 8 if left else [1] * 8 + [0] * 2], np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, ids, segment_ids, positions):
    return module.apply({"params": params}, ids, segment_ids, positions)


def _ours(model: hf.Pretrained, ids, segment_ids=None, positions=None, module=None) -> np.ndarray:
    """The model's outputs, jitted (eager flax compiles every op on its own: much slower on CPU)."""
    return np.asarray(_apply(module or model.module, model.params, ids, segment_ids, positions))


def test_outputs_match_transformers_with_padding(pair):
    """Token states (bare model, left-padded) or logits (classifiers, right-padded: cls pooling reads the
    first token); and the local windows matter at this length (global attention everywhere differs)."""
    ref, model, _ = pair
    cfg = model.config
    assert cfg.layer_windows == tuple(None if t == "full_attention" else ref.config.local_attention // 2
                                      for t in ref.config.layer_types)
    ids, mask = _padded(left=hf.FAMILIES[model.architecture].body is None)
    ours = _ours(model, ids, mask)
    theirs = torch_logits(ref, ids, attention_mask=mask)
    real = mask.astype(bool) if ours.ndim == 3 else slice(None)
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)
    all_global = type(model.module)(dataclasses.replace(cfg, layer_windows=(None,) * cfg.num_layers))
    assert np.abs(_ours(model, ids, mask, module=all_global)[real] - theirs[real]).max() > 1e-3


def test_packed_documents_match_each_document_alone(pair):
    """Three documents and a padding slot in one row, with per-document positions and without (RoPE
    sees only position differences), each equal to the document run alone by transformers."""
    ids = np.random.RandomState(2).randint(4, 128, (1, 15)).astype(np.int32)
    bounds = [(0, 7), (7, 12), (12, 14)]
    segments, positions = np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32)
    for doc, (lo, hi) in enumerate(bounds, 1):
        segments[0, lo:hi], positions[0, lo:hi] = doc, np.arange(hi - lo)
    ref, model, path = pair
    classifier = hf.FAMILIES[model.architecture].body is not None
    with pytest.warns(UserWarning, match="not used by ModernBertModel") if classifier else contextlib.nullcontext():
        body = hf.load_pretrained(path, architecture="ModernBertModel")  # a classifier's body, its head unused
    for given in (positions, None):
        ours = _ours(body, ids, segments, given)
        for lo, hi in bounds:
            np.testing.assert_allclose(ours[0, lo:hi], torch_logits(ref.base_model, ids[:, lo:hi])[0], atol=TOL,
                                       rtol=0)


@pytest.fixture(scope="module")
def adapted(pair):
    """LoRA on every linear (the fused Wqkv and Wi each one module) plus the family's own classification
    head (its defaults: the config's pooling, head.dense, head.norm, classifier), trained norms."""
    _, model, path = pair
    plan = tuning.lora(rank=4, alpha=8) + tuning.train(kinds=["norms"])
    if hf.FAMILIES[model.architecture].body is None:
        plan = plan + tuning.head("classification", num_labels=3)
    tuned, params = trained(path.parent, path.name, plan)
    ids, mask = _padded()
    return tuned, params, np.asarray(forward(tuned.module, params, ids, mask)), (ids, mask)


def test_family_head_exports_to_transformers_and_back(pair, adapted, tmp_path):
    _, model, _ = pair
    tuned, params, ours, (ids, mask) = adapted
    assert tuned.hf_architecture == "ModernBertForSequenceClassification"
    out = tuning.export_merged(tuned, tmp_path, params=params)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["ModernBertForSequenceClassification"]
    assert written["classifier_pooling"] == model.config.classifier_pooling
    reloaded = transformers.ModernBertForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(ours, torch_logits(reloaded, ids, attention_mask=mask), atol=TOL, rtol=0)
    again = hf.load_pretrained(out)  # and back into jaxtune, tensor by tensor
    np.testing.assert_allclose(_ours(again, ids, mask), ours, atol=TOL, rtol=0)


def test_lora_adapter_with_head_loads_in_peft(pair, adapted, tmp_path):
    _, model, path = pair
    tuned, params, ours, (ids, mask) = adapted
    tuning.export_peft(tuned, tmp_path, params=params)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {t.split(".", 3)[-1] for t in adapter["target_modules"]} == {"attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"}
    assert {"head", "classifier"} <= set(adapter["modules_to_save"])
    base = transformers.ModernBertForSequenceClassification.from_pretrained(path, num_labels=tuned.num_outputs).eval()
    assert not np.allclose(ours, torch_logits(base, ids, attention_mask=mask), atol=1e-3)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    np.testing.assert_allclose(ours, torch_logits(theirs, ids, attention_mask=mask), atol=TOL, rtol=0)
    back = tuning.load_peft(model, tmp_path)  # and back into jaxtune, ready to train on
    np.testing.assert_allclose(np.asarray(forward(back.module, back.params, ids, mask)), ours, atol=TOL, rtol=0)


def test_adapter_made_by_peft_imports_exactly(pair, tmp_path):
    """PEFT's own SEQ_CLS adapter on the fused Wqkv and Wi (head and classifier saved whole) onto the
    bare checkpoint gives peft's logits."""
    _, model, path = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("a classifier checkpoint brings its own head; the bare checkpoint covers the import")
    base = transformers.ModernBertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    torch.manual_seed(0)
    made = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                     target_modules=["Wqkv", "Wi"], modules_to_save=["head"],
                                                     init_lora_weights=False))
    made.save_pretrained(tmp_path)
    ids, mask = _padded()
    tuned = tuning.load_peft(model, tmp_path)
    assert tuned.hf_architecture == "ModernBertForSequenceClassification"
    assert {m[-1] for m in tuned.adapters} == {"Wqkv", "Wi"}
    np.testing.assert_allclose(np.asarray(forward(tuned.module, tuned.params, ids, mask)),
                               torch_logits(made.eval(), ids, attention_mask=mask), atol=TOL, rtol=0)


def test_masked_lm_checkpoint_loads_as_the_body(tmp_path):
    ref = tiny_modernbert("ModernBertForMaskedLM", tmp_path, num_hidden_layers=2, local_attention=4)
    with pytest.warns(UserWarning, match=r"not used by ModernBertModel: .*head\.dense\.weight"):
        model = hf.load_pretrained(tmp_path)
    assert model.architecture == "ModernBertModel"
    ids, mask = _padded()
    real = mask.astype(bool)
    np.testing.assert_allclose(_ours(model, ids, mask)[real], torch_logits(ref.model, ids, attention_mask=mask)[real],
                               atol=TOL, rtol=0)


def test_config_reads_hub_v4_keys_as_transformers_does():
    """Hub configs (transformers v4) give ``global_attn_every_n_layers`` and ``global/local_rope_theta``
    instead of ``layer_types`` and ``rope_parameters``; both read to the same model."""
    v4 = dict(TINY, model_type="modernbert", num_hidden_layers=5, global_attn_every_n_layers=3, local_attention=8,
              global_rope_theta=123.0, local_rope_theta=45.0)
    v5 = transformers.ModernBertConfig(**v4).to_dict()
    assert "global_rope_theta" not in v5 and "layer_types" in v5
    ours_v4, ours_v5 = ModernBertConfig.from_hf(v4), ModernBertConfig.from_hf(v5)
    assert ours_v4 == ours_v5
    assert ours_v4.layer_windows == (None, 4, 4, None, 4)
    assert (ours_v4.global_rope_theta, ours_v4.local_rope_theta) == (123.0, 45.0)


@pytest.mark.parametrize("field, value, message", [
    ("classifier_pooling", "max", "classifier_pooling 'max' is not supported"),
    ("layer_types", ["full_attention"], "layer_types must list 3 entries"),
    ("hidden_activation", "swish", "hidden_activation 'swish' is not supported"),
    ("rope_parameters", {"full_attention": {"rope_type": "made_up"}}, "rope_type 'made_up' is not supported"),
])
def test_bad_config_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        ModernBertConfig.from_hf({**TINY, "model_type": "modernbert", field: value})


def test_extra_blocks_are_refused_with_the_fix(pair):
    _, model, _ = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("one body is enough")
    with pytest.raises(PlanError, match="extra_blocks is not supported on ModernBERT"):
        tuning.apply_plan(model, tuning.head("classification", extra_blocks=1))


def test_a_partial_plan_trains_the_final_norm_after_the_last_blocks(pair):
    _, model, _ = pair
    labels = flatten_dict(tuning.apply_plan(model, tuning.freeze_all_but(1) + tuning.head("classification", 2)).labels)
    assert {p[0] for p, label in labels.items() if label != tuning.FROZEN} == {
        f"layers_{model.config.num_layers - 1}", "final_norm", "head"}


def test_recipe_trains_and_exports_a_classifier(pair, tmp_path):
    """The user's path: a recipe with LoRA and a classification head on a ModernBERT directory, two
    steps, exported as a PEFT adapter for ModernBertForSequenceClassification."""
    _, model, path = pair
    if hf.FAMILIES[model.architecture].body is not None:
        pytest.skip("one body is enough")
    tiny_tokenizer(bos=True).save_pretrained(path)
    words = "good bad great awful plot actor scene story".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8)):
        texts = [" ".join(rng.choice(words, 3)) for _ in range(n)]
        write_jsonl(tmp_path / f"{split}.jsonl",
                    [{"text": t, "label": "positive" if "good" in t else "negative"} for t in texts])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{path: {path}}}
plan:
  - {{preset: lora, rank: 4, alpha: 8}}
  - {{action: head, task: classification}}
data: {{kind: classification, train: {tmp_path / 'train.jsonl'}, validation: {tmp_path / 'valid.jsonl'},
        max_length: 24, batch_size: 8}}
train: {{steps: 2, progress: false}}
eval: {{baselines: false}}
output: {{dir: {tmp_path / 'run'}}}
""")
    result = finetune(config.load(recipe))
    assert result.state == "finished" and result.step == 2 and np.isfinite(result.after["loss"])
    exported = json.loads((Path(result.export) / "adapter_config.json").read_text())
    assert any(t.endswith("attn.Wqkv") for t in exported["target_modules"])
