"""ViT: logits and features equal transformers' ViTModel / ViTForImageClassification; plans on a ViT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
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
    ViTModel(_config(hidden_act="gelu_new")).save_pretrained(root / "model")
    ViTForImageClassification(_config()).save_pretrained(root / "classifier")
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
