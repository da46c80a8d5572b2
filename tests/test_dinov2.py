"""DINOv2: features and logits equal transformers' Dinov2Model / Dinov2ForImageClassification, at the
config's image size and at others (interpolated positions), with the MLP and with SwiGLU; gradients
equal torch's; plans on a DINOv2 train and export to transformers and PEFT."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import fit_steps, is_norm_gain, randomize_weights
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
)

from jaxtune.models import dinov2, hf
from jaxtune.models.hf_files import CheckpointError

TOL = 1e-4
SIZE, CHANNELS = 16, 3
# The config's 16 x 16 (a 4 x 4 patch grid: no interpolation), and a non-square 2 x 5 grid whose sides are
# no multiple of the patch (transformers' convolution drops the rest): one axis shrinks (the registers'
# antialiased filter stretches), the other grows. The resize is separable, one matrix an axis, so this one
# shape covers every case of each axis that a larger and a smaller grid would (bicubic_matrix's own test
# covers the sizes).
SHAPES = [(16, 16), (10, 23)]


def _config(registers: bool = False, **overrides) -> Dinov2Config:
    fields = dict(image_size=SIZE, patch_size=4, num_channels=CHANNELS, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, mlp_ratio=4, num_labels=3, layerscale_value=0.5)
    if registers:
        return Dinov2WithRegistersConfig(**{**fields, "num_register_tokens": 3, **overrides})
    return Dinov2Config(**{**fields, **overrides})


# directory -> (its transformers class, its classifier class): MLP, SwiGLU, and with registers.
MODELS = {"model": Dinov2Model, "model_swiglu": Dinov2Model, "model_registers": Dinov2WithRegistersModel}
CLASSIFIERS = {"classifier": Dinov2ForImageClassification, "classifier_swiglu": Dinov2ForImageClassification,
               "classifier_registers": Dinov2WithRegistersForImageClassification}


@pytest.fixture(scope="module")
def dino_dirs(tmp_path_factory):
    """Tiny random DINOv2 body and classifier directories: with the MLP, with SwiGLU, with registers."""
    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    for name, cls in {**MODELS, **CLASSIFIERS}.items():
        model = cls(_config(registers="registers" in name, use_swiglu_ffn="swiglu" in name,
                            hidden_act="gelu_new" if name == "model" else "gelu"))
        # Every weight drawn afresh (LayerScale's lambda1 and the registers too): transformers' init leaves
        # gains at 1 and biases at 0, which a dropped gain or bias would still match.
        randomize_weights(model, is_norm=is_norm_gain)
        model.save_pretrained(root / name)
    return root


def pixels(n: int = 2, seed: int = 0, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CHANNELS, *shape)).astype(np.float32)


@pytest.mark.parametrize("name", list(MODELS))
def test_dinov2_model_matches_transformers_at_every_size(dino_dirs, name):
    ours = hf.load_pretrained(dino_dirs / name)
    theirs = MODELS[name].from_pretrained(dino_dirs / name).eval()
    for i, shape in enumerate(SHAPES):
        x = pixels(2, seed=i, shape=shape)
        hidden = np.asarray(ours.module.apply({"params": ours.params}, x))
        with torch.no_grad():
            expected = theirs(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        assert hidden.shape == expected.shape, shape
        np.testing.assert_allclose(hidden, expected, atol=TOL, rtol=0, err_msg=str(shape))


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_dinov2_classifier_matches_transformers_and_saves_back(dino_dirs, name, tmp_path):
    ours = hf.load_pretrained(dino_dirs / name)
    theirs = CLASSIFIERS[name].from_pretrained(dino_dirs / name).eval()
    for i, shape in enumerate(SHAPES):
        x = pixels(3, seed=10 + i, shape=shape)
        logits = np.asarray(ours.module.apply({"params": ours.params}, x))
        with torch.no_grad():
            expected = theirs(pixel_values=torch.from_numpy(x)).logits.numpy()
        assert logits.shape == (3, 3)
        np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0, err_msg=str(shape))
    # Written back under module names (SwiGLU's gate_proj/up_proj apart), transformers reads the same model.
    hf.save_pretrained(ours.params, ours.hf_config, tmp_path)
    with torch.no_grad():
        again = CLASSIFIERS[name].from_pretrained(tmp_path).eval()(pixel_values=torch.from_numpy(x)).logits
    np.testing.assert_allclose(again.numpy(), expected, atol=1e-6, rtol=0)


def test_mask_token_replaces_the_marked_patches_as_transformers(dino_dirs):
    ours = hf.load_pretrained(dino_dirs / "model")
    x = pixels(2, seed=3)
    masked = np.random.default_rng(4).random((2, 16)) < 0.5
    hidden = ours.module.apply({"params": ours.params}, x, True, masked)
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(dino_dirs / "model").eval()(
            pixel_values=torch.from_numpy(x), bool_masked_pos=torch.from_numpy(masked)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize(("size_in", "size_out"), [(4, 6), (4, 3), (5, 11), (37, 16), (4, 4), (16, 3)])
def test_bicubic_matrix_is_torchs_bicubic_interpolation(size_in, size_out, antialias):
    """torch's cubic kernel (a=-0.75, edge indices clamped; antialiased: a=-0.5 stretched when shrinking),
    not jax.image.resize's (a=-0.5, antialiased in its own way)."""
    grid = np.random.default_rng(size_in * size_out).normal(size=(size_in, size_in)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(size_out, size_in + 1),
                                               mode="bicubic", align_corners=False, antialias=antialias)[0, 0].numpy()
    ours = (dinov2.bicubic_matrix(size_in, size_out, antialias) @ grid
            @ dinov2.bicubic_matrix(size_in, size_in + 1, antialias).T)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_gradients_match_torch(dino_dirs):
    """d(sum(logits * w)) by each of a few params, at an interpolated size: the position table's
    gradient flows back through the bicubic resize."""
    from flax.traverse_util import flatten_dict

    ours = hf.load_pretrained(dino_dirs / "classifier_swiglu")
    x = pixels(2, seed=5, shape=(20, 24))
    w = np.random.default_rng(6).normal(size=(2, 3)).astype(np.float32)

    def loss(params):
        return jnp.sum(ours.module.apply({"params": params}, x) * w)

    grads = flatten_dict(jax.jit(jax.grad(loss))(ours.params))  # one program (eagerly, each op compiles apart)
    theirs = Dinov2ForImageClassification.from_pretrained(dino_dirs / "classifier_swiglu").eval()
    (theirs(pixel_values=torch.from_numpy(x)).logits * torch.from_numpy(w)).sum().backward()
    torch_grads = dict(theirs.named_parameters())
    checks = {
        ("dinov2", "embeddings", "position_embeddings", "tensor"): ("dinov2.embeddings.position_embeddings", False),
        ("dinov2", "embeddings", "cls_token", "tensor"): ("dinov2.embeddings.cls_token", False),
        ("dinov2", "layers_0", "layer_scale1", "lambda1", "tensor"): ("dinov2.encoder.layer.0.layer_scale1.lambda1",
                                                                      False),
        ("dinov2", "layers_0", "attention", "q_proj", "kernel"): ("dinov2.encoder.layer.0.attention.q_proj.weight",
                                                                  True),
        ("dinov2", "layers_1", "mlp", "gate_proj", "kernel"): ("dinov2.encoder.layer.1.mlp.gate_proj.weight", True),
        ("head", "out", "kernel"): ("classifier.weight", True),
    }
    for path, (name, transposed) in checks.items():
        expected = torch_grads[name].grad.numpy()
        got = np.asarray(grads[path])
        np.testing.assert_allclose(got.T if transposed else got, expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_drop_path_drops_whole_samples_in_training_only():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 3, 4)).astype(np.float32))
    rate = 0.25

    class Probe(dinov2.nn.Module):
        @dinov2.nn.compact
        def __call__(self, x, deterministic):
            return dinov2.drop_path(self, x, rate, deterministic)

    out = np.asarray(Probe().apply({}, x, False, rngs={"dropout": jax.random.key(1)}))
    kept = np.all(out != 0, axis=(1, 2))
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert np.all(out[~kept] == 0) and 0.15 < 1 - kept.mean() < 0.35
    np.testing.assert_array_equal(np.asarray(Probe().apply({}, x, True)), np.asarray(x))


def test_drop_path_rate_is_read_and_stays_out_of_evaluation(dino_dirs, tmp_path):
    """With drop_path_rate a training forward differs from key to key; evaluation is transformers' forward."""
    config = json.loads((dino_dirs / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "drop_path_rate": 0.5}))
    (tmp_path / "model.safetensors").symlink_to(dino_dirs / "model" / "model.safetensors")
    ours = hf.load_pretrained(tmp_path)
    assert ours.config.drop_path_rate == 0.5
    x = pixels(4, seed=8)
    train = [np.asarray(ours.module.apply({"params": ours.params}, x, False, rngs={"dropout": jax.random.key(k)}))
             for k in range(2)]
    assert not np.allclose(train[0], train[1])
    with torch.no_grad():
        expected = Dinov2Model.from_pretrained(tmp_path).eval()(pixel_values=torch.from_numpy(x)).last_hidden_state
    np.testing.assert_allclose(np.asarray(ours.module.apply({"params": ours.params}, x)), expected.numpy(), atol=TOL,
                               rtol=0)


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["Dinov2Backbone"], "model_type": "dinov2_backbone"},
     r"architecture \['Dinov2Backbone'\] is not supported"),
    ({"image_size": [16, 20]}, r"config.json: non-square image_size/patch_size is not supported"),
    ({"hidden_act": "swish"}, r"config.json: hidden_act 'swish' is not supported"),
])
def test_unsupported_configs_are_refused_in_one_line(dino_dirs, tmp_path, change, message):
    config = json.loads((dino_dirs / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "model.safetensors").symlink_to(dino_dirs / "model" / "model.safetensors")
    with pytest.raises((ValueError, CheckpointError), match=message):
        hf.load_pretrained(tmp_path)


def test_an_image_smaller_than_a_patch_is_one_line(dino_dirs):
    ours = hf.load_pretrained(dino_dirs / "model")
    with pytest.raises(ValueError, match=r"pixel_values: shape \(1, 3, 3, 8\).*H, W >= patch_size 4"):
        ours.module.apply({"params": ours.params}, np.zeros((1, 3, 3, 8), np.float32))


# ----------------------------------------------------------------------------- plans on a DINOv2


def _image_batch(n: int = 4, task: str = "classification") -> dict:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, n).astype(np.int32) if task == "classification" else rng.normal(size=n).astype(
        np.float32)
    return {"pixel_values": pixels(n, seed=4), "labels": labels, "example_weights": np.ones(n, np.float32)}


@pytest.mark.parametrize(("base", "kind"), [("model", "lora"), ("model_swiglu", "dora"), ("model_registers", "lora")])
def test_adapters_on_dinov2_export_a_peft_adapter_with_equal_logits(dino_dirs, base, kind, tmp_path):
    """LoRA/DoRA on every linear PEFT users target on HF's Dinov2 (q/k/v/o_proj, fc1/fc2 or SwiGLU's
    gate/up/down_proj) with a new head, which pools as Dinov2ForImageClassification: [CLS] ++ mean."""
    import peft

    from jaxtune import tuning

    targets = ["q_proj", "k_proj", "v_proj", "o_proj",
               *(["gate_proj", "up_proj", "down_proj"] if "swiglu" in base else ["fc1", "fc2"])]
    adapter = tuning.dora if kind == "dora" else tuning.lora
    classifier = Dinov2WithRegistersForImageClassification if "registers" in base else Dinov2ForImageClassification
    tuned = tuning.apply_plan(hf.load_pretrained(dino_dirs / base),
                              adapter(rank=4, alpha=8, targets=targets) + tuning.head("classification", 3))
    assert tuned.head.pooling == "cls_mean" and tuned.hf_architecture == classifier.__name__
    assert {m[-1] for m in tuned.adapters} == set(targets) and len(tuned.adapters) == 2 * len(targets)
    params, history = fit_steps(tuned, _image_batch())
    assert all(h["finite"] for h in history) and history[-1]["loss"] < history[0]["loss"]
    tuning.export_peft(tuned, tmp_path, params=params)
    x = pixels(3, seed=5, shape=(20, 24))  # at another size too: the positions interpolate under PEFT as here
    ours = np.asarray(tuned.module.apply({"params": params}, pixel_values=x))
    start = classifier.from_pretrained(dino_dirs / base, num_labels=3)
    model = peft.PeftModel.from_pretrained(start, tmp_path).eval()
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("base", ["model", "classifier_swiglu", "classifier_registers"])
def test_trained_dinov2_exports_merged_and_as_peft_with_equal_logits(dino_dirs, base, tmp_path):
    """A Dinov2Model with a new head, and a Dinov2ForImageClassification with its own classifier
    (read back as a head on [CLS] ++ mean): merged, transformers has jaxtune's logits; as an adapter,
    PEFT and jaxtune do."""
    import peft

    from jaxtune import tuning

    plan = tuning.lora(rank=4, alpha=8) + (tuning.head("classification", 3) if base == "model" else tuning.Plan(()))
    tuned = tuning.apply_plan(hf.load_pretrained(dino_dirs / base), plan)
    classifier = CLASSIFIERS.get(base, Dinov2ForImageClassification)
    assert tuned.hf_architecture == classifier.__name__ and tuned.head.pooling == "cls_mean"
    params, _ = fit_steps(tuned, _image_batch())
    x = pixels(3, seed=6)
    ours = np.asarray(tuned.module.apply({"params": params}, pixel_values=x))
    tuning.export_merged(tuned, tmp_path / "merged", params=params)
    tuning.export_peft(tuned, tmp_path / "peft", params=params)
    with torch.no_grad():
        merged = classifier.from_pretrained(tmp_path / "merged").eval()
        np.testing.assert_allclose(merged(pixel_values=torch.from_numpy(x)).logits.numpy(), ours, atol=TOL, rtol=0)
        start = classifier.from_pretrained(dino_dirs / base, num_labels=3)
        adapted = peft.PeftModel.from_pretrained(start, tmp_path / "peft").eval()
        np.testing.assert_allclose(adapted(pixel_values=torch.from_numpy(x)).logits.numpy(), ours, atol=TOL, rtol=0)
    back = tuning.load_peft(hf.load_pretrained(dino_dirs / base), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(back.module.apply({"params": back.params}, pixel_values=x)), ours,
                               atol=TOL, rtol=0)


def test_full_plan_trains_layer_scale_and_exports_merged(dino_dirs, tmp_path):
    """Every leaf trains (LayerScale's gains and the position table, bare tensors, too); the export is
    the merged model, with jaxtune's logits at another size."""
    from flax.traverse_util import flatten_dict

    import jaxtune as jt
    from jaxtune import tuning

    tuned = tuning.apply_plan(hf.load_pretrained(dino_dirs / "classifier"), tuning.full())
    params, history = fit_steps(tuned, _image_batch(), lr=1e-3)
    assert history[-1]["loss"] < history[0]["loss"]
    gain = ("layers_0", "layer_scale2", "lambda1", "tensor")
    assert flatten_dict(tuned.labels)[gain] == "train"
    assert not np.array_equal(np.asarray(flatten_dict(params)[gain]), np.asarray(flatten_dict(tuned.params)[gain]))
    out = jt.export(dataclasses.replace(tuned, params=params, step=3), tmp_path / "auto")
    x = pixels(2, seed=7, shape=(12, 20))
    with torch.no_grad():
        theirs = Dinov2ForImageClassification.from_pretrained(out).eval()(pixel_values=torch.from_numpy(x)).logits
    np.testing.assert_allclose(theirs.numpy(), np.asarray(tuned.module.apply({"params": params}, pixel_values=x)),
                               atol=TOL, rtol=0)


def test_partial_plan_trains_only_the_last_block_and_the_final_norm(dino_dirs):
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning

    tuned = tuning.apply_plan(hf.load_pretrained(dino_dirs / "classifier"), tuning.freeze_all_but(1))
    assert tuned.task == "classification" and tuned.num_outputs == 3  # the checkpoint's own classifier
    params, _ = fit_steps(tuned, _image_batch(), steps=1)
    changed = {"/".join(p) for p, v in flatten_dict(params).items()
               if not np.array_equal(np.asarray(v), np.asarray(flatten_dict(tuned.params)[p]))}
    assert changed and all(p.startswith(("layers_1/", "layernorm/")) for p in changed), sorted(changed)
    assert any("layer_scale" in p for p in changed)


@pytest.mark.parametrize(("base", "pooling"), [("model", "cls_mean"), ("model", "cls"), ("model", "mean"),
                                                ("model_registers", "cls_mean"), ("model_registers", "mean")])
def test_head_poolings_read_the_body_states_as_named(dino_dirs, base, pooling, tmp_path):
    """A new head's output is its ``out`` layer on the pooled final states: [CLS] ++ mean of the
    patches (the default, HF's), [CLS], or the mean of [CLS] and the patches (register tokens are
    left out, as transformers' classifier leaves them); only the first has a transformers class."""
    from jaxtune import tuning

    pretrained = hf.load_pretrained(dino_dirs / base)
    registers = pretrained.config.num_register_tokens
    tuned = tuning.apply_plan(pretrained, tuning.lora(rank=2) + tuning.head("regression", pooling=pooling))
    x = pixels(2, seed=9, shape=(12, 16))
    hidden = np.asarray(pretrained.module.apply({"params": pretrained.params}, x))
    patches = hidden[:, 1 + registers:]
    assert patches.shape[1] == 12  # (12 / 4) x (16 / 4)
    features = {"cls_mean": np.concatenate([hidden[:, 0], patches.mean(1)], -1), "cls": hidden[:, 0],
                "mean": np.concatenate([hidden[:, :1], patches], 1).mean(1)}[pooling]
    out = tuned.params["head"]["out"]
    expected = features @ np.asarray(out["kernel"]) + np.asarray(out["bias"])
    got = np.asarray(tuned.module.apply({"params": tuned.params}, pixel_values=x))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    if pooling == "cls_mean":
        assert tuned.hf_architecture == base.replace("model", "Dinov2ForImageClassification").replace(
            "Dinov2ForImageClassification_registers", "Dinov2WithRegistersForImageClassification")
    else:
        assert tuned.hf_architecture is None
        with pytest.raises(tuning.ExportError, match=rf"pooling {pooling}\).*ImageClassification: the first "
                           r"token \+\+ the mean of the others into classifier\)"):
            tuning.export_peft(tuned, tmp_path, params=tuned.params)


def test_regression_head_loss_is_the_mean_squared_error(dino_dirs):
    from jaxtune import tuning
    from jaxtune.training.step import make_loss_fn

    tuned = tuning.apply_plan(hf.load_pretrained(dino_dirs / "model"), tuning.head("regression"))
    batch = _image_batch(task="regression")
    total, weight, outputs = make_loss_fn(tuned.module, "regression")(tuned.params, batch, jax.random.key(0), True)
    expected = np.square(np.asarray(outputs) - batch["labels"]).sum()
    assert outputs.shape == (4,) and float(weight) == 4.0
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_a_lora_run_through_finetune_lowers_the_loss(dino_dirs, tmp_path):
    """The whole path a user's run takes: the recipe reads image files, resizes and normalises them for
    the model, trains LoRA and the new [CLS] ++ mean head, and evaluates before and after."""
    from jaxtune import config
    from jaxtune.recipe import finetune

    rng = np.random.default_rng(0)
    labels = np.arange(8) % 2
    # Two classes a tiny model separates in a few steps: dark and bright images.
    images = (rng.integers(0, 100, (8, 20, 20)) + 150 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=labels)
    (tmp_path / "run.yaml").write_text(f"""
model: {{path: {dino_dirs / 'model'}}}
plan: [{{action: lora, rank: 4, alpha: 8}}, {{action: head, task: classification}}]
data: {{kind: classification, images: true, train: {tmp_path / 'train.npz'}, validation: {tmp_path / 'train.npz'},
        batch_size: 8}}
optimizer: {{learning_rate: 1.0e-2}}
train: {{steps: 6, progress: false}}
eval: {{every: 6}}
output: {{dir: {tmp_path / 'run'}, export: none}}
""")
    result = finetune(config.load(tmp_path / "run.yaml"))
    assert result.state == "finished" and result.step == 6
    assert result.model.head.pooling == "cls_mean"
    assert result.after["loss"] < result.before["loss"]


def test_images_are_resized_and_cropped_as_dinov2s_image_processor(dino_dirs, tmp_path):
    """DINOv2's BitImageProcessor resizes the shortest edge (256), crops the centre (224) and normalises
    with ImageNet's mean/std; the model's input is that crop, whatever the config's image_size."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    from jaxtune.data.image_pixels import ImageSpec, ToPixels

    processor = BitImageProcessorPil(size={"shortest_edge": 22}, crop_size={"height": 12, "width": 12},
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(tmp_path)
    spec = ImageSpec.for_model(hf.load_pretrained(dino_dirs / "model").config, tmp_path)
    assert (spec.size, spec.shortest_edge, spec.resample) == (12, 22, 3)
    rng = np.random.default_rng(0)
    for shape in ((31, 45, 3), (40, 27, 3), (30, 30, 3)):
        image = rng.integers(0, 256, shape).astype(np.uint8)
        ours = ToPixels(spec).pixels({"image": image, "label": 0})["pixel_values"]
        theirs = processor(image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 12, 12)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=str(shape))


def test_cls_mean_pools_each_packed_segment_apart():
    """[CLS] ++ mean of the others, per segment of a packed row (segments 1..S; 0 is padding)."""
    from jaxtune.models.layers import pool

    hidden = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2, 0]], np.int32)
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(segment_ids), "cls_mean", segments=2))
    for b in range(2):
        for s in (1, 2):
            tokens = hidden[b, segment_ids[b] == s]
            rest = tokens[1:].mean(0) if len(tokens) > 1 else np.zeros(3, np.float32)
            np.testing.assert_allclose(got[b, s - 1], np.concatenate([tokens[0], rest]), atol=1e-6)
    unpacked = np.asarray(pool(jnp.asarray(hidden), jnp.asarray((segment_ids > 0).astype(np.int32)), "cls_mean"))
    real = hidden[0, :5]
    np.testing.assert_allclose(unpacked[0], np.concatenate([real[0], real[1:].mean(0)]), atol=1e-6)


def test_with_registers_is_told_by_its_architecture_even_with_no_registers(tmp_path):
    """num_register_tokens 0 leaves Dinov2WithRegisters what it is: its body prefix, its empty register
    tensor and its antialiased interpolation (here upsampling a 4 x 4 grid to 6 x 5)."""
    torch.manual_seed(1)
    model = Dinov2WithRegistersForImageClassification(_config(registers=True, num_register_tokens=0))
    randomize_weights(model, is_norm=is_norm_gain)
    model.save_pretrained(tmp_path)
    ours = hf.load_pretrained(tmp_path)
    x = pixels(2, seed=11, shape=(24, 20))
    with torch.no_grad():
        expected = model.eval()(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.module.apply({"params": ours.params}, x)), expected, atol=TOL, rtol=0)
