"""DINOv2: features and logits equal transformers' Dinov2Model / Dinov2ForImageClassification, at the
config's image size and at others (interpolated positions), with the MLP and with SwiGLU; gradients
equal torch's; plans on a DINOv2 train and export to transformers and PEFT."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import is_norm_gain, randomize_weights
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

from jaxtune.models import dinov2, hf
from jaxtune.models.hf_files import CheckpointError

TOL = 1e-4
SIZE, CHANNELS = 16, 3
# The config's 16 x 16 (a 4 x 4 patch grid), a larger non-square grid, a smaller one, and sides that
# are no multiple of the patch (transformers' convolution drops the rest).
SHAPES = [(16, 16), (24, 20), (8, 12), (18, 23)]


def _config(**overrides) -> Dinov2Config:
    fields = dict(image_size=SIZE, patch_size=4, num_channels=CHANNELS, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, mlp_ratio=4, num_labels=3, layerscale_value=0.5)
    return Dinov2Config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def dino_dirs(tmp_path_factory):
    """Tiny random Dinov2Model and Dinov2ForImageClassification directories, with the MLP and with SwiGLU."""
    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    for swiglu in (False, True):
        for cls, name in ((Dinov2Model, "model"), (Dinov2ForImageClassification, "classifier")):
            model = cls(_config(use_swiglu_ffn=swiglu, hidden_act="gelu_new" if name == "model" else "gelu"))
            # Every weight drawn afresh (LayerScale's lambda1 too): transformers' init leaves gains at
            # 1 and biases at 0, which a dropped gain or bias would still match.
            randomize_weights(model, is_norm=is_norm_gain)
            model.save_pretrained(root / f"{name}{'_swiglu' if swiglu else ''}")
    return root


def pixels(n: int = 2, seed: int = 0, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CHANNELS, *shape)).astype(np.float32)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov2_model_matches_transformers_at_every_size(dino_dirs, swiglu):
    name = "model_swiglu" if swiglu else "model"
    ours = hf.load_pretrained(dino_dirs / name)
    theirs = Dinov2Model.from_pretrained(dino_dirs / name).eval()
    for i, shape in enumerate(SHAPES):
        x = pixels(2, seed=i, shape=shape)
        hidden = np.asarray(ours.module.apply({"params": ours.params}, x))
        with torch.no_grad():
            expected = theirs(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        assert hidden.shape == expected.shape, shape
        np.testing.assert_allclose(hidden, expected, atol=TOL, rtol=0, err_msg=str(shape))


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov2_classifier_matches_transformers_and_saves_back(dino_dirs, swiglu, tmp_path):
    name = "classifier_swiglu" if swiglu else "classifier"
    ours = hf.load_pretrained(dino_dirs / name)
    theirs = Dinov2ForImageClassification.from_pretrained(dino_dirs / name).eval()
    for i, shape in enumerate(SHAPES[:2]):
        x = pixels(3, seed=10 + i, shape=shape)
        logits = np.asarray(ours.module.apply({"params": ours.params}, x))
        with torch.no_grad():
            expected = theirs(pixel_values=torch.from_numpy(x)).logits.numpy()
        assert logits.shape == (3, 3)
        np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0, err_msg=str(shape))
    # Written back under module names (SwiGLU's gate_proj/up_proj apart), transformers reads the same model.
    hf.save_pretrained(ours.params, ours.hf_config, tmp_path)
    with torch.no_grad():
        again = Dinov2ForImageClassification.from_pretrained(tmp_path).eval()(pixel_values=torch.from_numpy(x)).logits
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


@pytest.mark.parametrize(("size_in", "size_out"), [(4, 6), (4, 3), (5, 11), (37, 16), (4, 4)])
def test_bicubic_matrix_is_torchs_bicubic_interpolation(size_in, size_out):
    """torch's cubic kernel (a=-0.75, edge indices clamped), not jax.image.resize's (a=-0.5, antialiased)."""
    grid = np.random.default_rng(size_in * size_out).normal(size=(size_in, size_in)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(size_out, size_in + 1),
                                               mode="bicubic", align_corners=False)[0, 0].numpy()
    ours = dinov2.bicubic_matrix(size_in, size_out) @ grid @ dinov2.bicubic_matrix(size_in, size_in + 1).T
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

    grads = flatten_dict(jax.grad(loss)(ours.params))
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
    ({"architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers"},
     r"architecture \['Dinov2WithRegistersModel'\] is not supported"),
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
