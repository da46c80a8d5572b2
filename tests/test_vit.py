"""ViT: logits and features equal transformers' ViTModel / ViTForImageClassification; plans on a ViT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fit_steps as _fit
from helpers import is_norm_gain, randomize_weights
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from jaxtune.models import hf

TOL = 1e-4
SIZE, CHANNELS = 16, 3


def _config(**overrides) -> ViTConfig:
    fields = dict(image_size=SIZE, patch_size=4, num_channels=CHANNELS, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_labels=3, qkv_bias=True)
    return ViTConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def vit_dirs(tmp_path_factory):
    """Tiny random ViTModel (with pooler) and ViTForImageClassification directories."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    for model, name in ((ViTModel(_config(hidden_act="gelu_new")), "model"), (ViTForImageClassification(_config()),
                                                                                "classifier")):
        # Every weight drawn afresh: transformers' init leaves LayerNorm gains at 1 and every bias
        # (the patch projection's too) at 0, which a dropped gain or bias would still match.
        randomize_weights(model, is_norm=is_norm_gain)
        model.save_pretrained(root / name)
    return root


def pixels(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CHANNELS, SIZE, SIZE)).astype(np.float32)


def test_vit_model_matches_transformers(vit_dirs):
    x = pixels()
    ours = hf.load_pretrained(vit_dirs / "model")
    hidden = ours.module.apply({"params": ours.params}, x)
    pooled = ours.module.apply({"params": ours.params}, hidden, method="pooled")
    with torch.no_grad():
        theirs = ViTModel.from_pretrained(vit_dirs / "model").eval()(pixel_values=torch.from_numpy(x))
    np.testing.assert_allclose(np.asarray(hidden), theirs.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), theirs.pooler_output.numpy(), atol=TOL, rtol=0)


def test_vit_classifier_matches_transformers_and_saves_back(vit_dirs, tmp_path):
    x = pixels(3, seed=1)
    ours = hf.load_pretrained(vit_dirs / "classifier")
    logits = np.asarray(ours.module.apply({"params": ours.params}, x))
    with torch.no_grad():
        theirs = ViTForImageClassification.from_pretrained(vit_dirs / "classifier").eval()(
            pixel_values=torch.from_numpy(x)).logits.numpy()
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits, theirs, atol=TOL, rtol=0)
    # Written back under module names, transformers reads the same model.
    hf.save_pretrained(ours.params, ours.hf_config, tmp_path)
    with torch.no_grad():
        again = ViTForImageClassification.from_pretrained(tmp_path).eval()(pixel_values=torch.from_numpy(x)).logits
    np.testing.assert_allclose(again.numpy(), theirs, atol=1e-6, rtol=0)


def test_wrong_image_size_is_one_line(vit_dirs):
    ours = hf.load_pretrained(vit_dirs / "classifier")
    with pytest.raises(ValueError, match=r"pixel_values: shape \(1, 3, 8, 8\).*resize the images to image_size 16"):
        ours.module.apply({"params": ours.params}, np.zeros((1, 3, 8, 8), np.float32))


# ----------------------------------------------------------------------------- plans on a ViT


def _image_batch(n: int = 4, task: str = "classification") -> dict:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, n).astype(np.int32) if task == "classification" else rng.normal(size=n).astype(
        np.float32)
    return {"pixel_values": pixels(n, seed=4), "labels": labels, "example_weights": np.ones(n, np.float32)}


def test_lora_on_vit_exports_a_peft_adapter_with_equal_logits(vit_dirs, tmp_path):
    import peft

    from jaxtune import tuning

    tuned = tuning.apply_plan(hf.load_pretrained(vit_dirs / "model"),
                              tuning.lora(rank=4, alpha=8) + tuning.head("classification", 3))
    assert tuned.head.pooling == "cls" and tuned.hf_architecture == "ViTForImageClassification"
    params, history = _fit(tuned, _image_batch())
    assert all(h["finite"] for h in history) and history[-1]["loss"] < history[0]["loss"]
    tuning.export_peft(tuned, tmp_path, params=params)
    x = pixels(3, seed=5)
    ours = np.asarray(tuned.module.apply({"params": params}, pixel_values=x))
    base = ViTForImageClassification.from_pretrained(vit_dirs / "model", num_labels=3)
    model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("base", ["model", "classifier"])
def test_trained_vit_exports_merged_and_as_peft_with_equal_logits(vit_dirs, base, tmp_path):
    """A ViTModel with a new head, and a ViTForImageClassification with its own classifier: the
    merged export is a ViTForImageClassification with jaxtune's logits (its head was written as
    ``head.out.*``, so transformers loaded a random classifier), and the checkpoint's own classifier
    exports at all (its head was taken for one with no transformers class) and PEFT reads it back."""
    import peft

    from jaxtune import tuning

    plan = tuning.lora(rank=4, alpha=8) + (tuning.head("classification", 3) if base == "model" else tuning.Plan(()))
    tuned = tuning.apply_plan(hf.load_pretrained(vit_dirs / base), plan)
    assert tuned.hf_architecture == "ViTForImageClassification"
    params, _ = _fit(tuned, _image_batch())
    x = pixels(3, seed=6)
    ours = np.asarray(tuned.module.apply({"params": params}, pixel_values=x))
    tuning.export_merged(tuned, tmp_path / "merged", params=params)
    tuning.export_peft(tuned, tmp_path / "peft", params=params)
    with torch.no_grad():
        merged = ViTForImageClassification.from_pretrained(tmp_path / "merged").eval()
        np.testing.assert_allclose(merged(pixel_values=torch.from_numpy(x)).logits.numpy(), ours, atol=TOL, rtol=0)
        start = ViTForImageClassification.from_pretrained(vit_dirs / base, num_labels=3)
        adapted = peft.PeftModel.from_pretrained(start, tmp_path / "peft").eval()
        np.testing.assert_allclose(adapted(pixel_values=torch.from_numpy(x)).logits.numpy(), ours, atol=TOL, rtol=0)
    back = tuning.load_peft(hf.load_pretrained(vit_dirs / base), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(back.module.apply({"params": back.params}, pixel_values=x)), ours,
                               atol=TOL, rtol=0)


def test_trained_class_token_and_positions_are_refused_as_peft_and_export_merged(vit_dirs, tmp_path):
    """transformers keeps ViT's cls_token and position_embeddings as bare parameters, which PEFT's
    modules_to_save cannot hold (the adapter named them and PEFT dropped them without a word: other
    logits); ``auto`` writes the merged model, with jaxtune's logits."""
    import dataclasses

    import jaxtune as jt
    from jaxtune import tuning

    plan = (tuning.lora(rank=4, alpha=8, targets=["q_proj"]) + tuning.train("cls_token|position_embeddings")
            + tuning.head("classification", 3))
    tuned = tuning.apply_plan(hf.load_pretrained(vit_dirs / "model"), plan)
    params, _ = _fit(tuned, _image_batch())
    with pytest.raises(tuning.ExportError, match=r"^embeddings/cls_token \(and 1 more\) trains as a bare tensor"):
        tuning.export_peft(tuned, tmp_path / "peft", params=params)
    out = jt.export(dataclasses.replace(tuned, params=params, step=3), tmp_path / "auto")
    x = pixels(3, seed=7)
    with torch.no_grad():
        theirs = ViTForImageClassification.from_pretrained(out).eval()(pixel_values=torch.from_numpy(x)).logits
    np.testing.assert_allclose(theirs.numpy(), np.asarray(tuned.module.apply({"params": params}, pixel_values=x)),
                               atol=TOL, rtol=0)


def test_partial_plan_trains_only_the_last_block_and_the_final_norm(vit_dirs):
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning

    tuned = tuning.apply_plan(hf.load_pretrained(vit_dirs / "classifier"), tuning.freeze_all_but(1))
    assert tuned.task == "classification" and tuned.num_outputs == 3  # the checkpoint's own classifier
    params, history = _fit(tuned, _image_batch(), steps=1)
    changed = {"/".join(p) for p, v in flatten_dict(params).items()
               if not np.array_equal(np.asarray(v), np.asarray(flatten_dict(tuned.params)[p]))}
    assert changed and all(p.startswith(("layers_1/", "layernorm/")) for p in changed), sorted(changed)


def test_a_plan_over_every_kernel_leaves_the_patch_convolution_alone(vit_dirs):
    """The patch projection is a convolution: no adapter, no quantized matmul reads it, so a
    quantize rule or a lora rule over every module leaves it as the rest of the plan says."""
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning
    from jaxtune.models.quant import is_quantized

    pretrained = hf.load_pretrained(vit_dirs / "model")
    conv = ("embeddings", "patch_embeddings", "projection", "kernel")
    tuned = tuning.apply_plan(pretrained, tuning.full() + tuning.lora(rank=2) + tuning.head("classification", 3))
    assert flatten_dict(tuned.labels)[conv] == "train" and conv[:-1] not in tuned.adapters
    tuned = tuning.apply_plan(pretrained, tuning.freeze(quantize="int8") + tuning.lora(rank=2)
                              + tuning.head("classification", 3))
    flat = flatten_dict(tuned.params, is_leaf=lambda _, x: is_quantized(x))
    assert not is_quantized(flat[conv]) and any(is_quantized(v) for v in flat.values())
    x = pixels(2, seed=1)
    assert np.isfinite(np.asarray(tuned.module.apply({"params": tuned.params}, pixel_values=x))).all()


def test_regression_head_loss_is_the_mean_squared_error(vit_dirs):
    import jax

    from jaxtune import tuning
    from jaxtune.training.step import make_loss_fn

    tuned = tuning.apply_plan(hf.load_pretrained(vit_dirs / "model"), tuning.head("regression"))
    batch = _image_batch(task="regression")
    total, weight, outputs = make_loss_fn(tuned.module, "regression")(tuned.params, batch, jax.random.key(0), True)
    expected = np.square(np.asarray(outputs) - batch["labels"]).sum()
    assert outputs.shape == (4,) and float(weight) == 4.0
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
