"""EfficientNet-Lite: the real ImageNet weights against the reference PyTorch package on real
images (slow), and what BatchNorm statistics do in each plan (tiny random network)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import skip_or_fail

from jaxtune import tuning
from jaxtune.assets import FetchError
from jaxtune.models import hf
from jaxtune.models.efficientnet import STATE_LEAVES, EfficientNetConfig, EfficientNetLite
from jaxtune.train.step import make_loss_fn, make_train_step


@pytest.mark.slow
def test_real_efficientnet_lite0_features_and_logits_match_the_reference_package():
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from jaxtune.assets import ASSETS, package_path
    from jaxtune.data import read
    from jaxtune.data.images import ImageSpec, ToPixels
    from jaxtune.models.assets import fetch_model

    try:
        path = fetch_model("efficientnet-lite0")
        images, _ = read("fashion_mnist", train_size=100, validation_size=10)
    except FetchError as err:
        skip_or_fail(f"EfficientNet-Lite0 or Fashion-MNIST could not be fetched here: {err}")
    model = hf.load_pretrained(path)
    spec = ImageSpec.for_model(model.config, path)
    x = np.stack([ToPixels(spec).pixels(images[i])["pixel_values"] for i in (0, 1)])  # real images, 224x224
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(package_path(
        ASSETS["efficientnet-lite0"]))).eval()
    body = EfficientNetLite(dataclasses.replace(model.config, include_top=False))
    features = np.asarray(body.apply({"params": {k: v for k, v in model.params.items() if k != "fc"}}, x))
    logits = np.asarray(model.module.apply({"params": model.params}, x))
    with torch.no_grad():
        theirs = ref.extract_features(torch.from_numpy(x)).numpy()  # (B, 1280, 7, 7)
        their_logits = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(features, theirs.transpose(0, 2, 3, 1).reshape(2, 49, 1280), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, their_logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised EfficientNet-Lite0 on 32x32 inputs with random BatchNorm statistics."""
    cfg = EfficientNetConfig(image_size=32, num_labels=3, hidden_dropout=0.0, drop_connect_rate=0.0)
    module = EfficientNetLite(cfg)
    # Random values of the right shapes, without compiling the network's init (seconds on CI).
    shapes = flatten_dict(jax.eval_shape(module.init, jax.random.key(0), *cfg.init_inputs())["params"])
    rng = np.random.default_rng(0)
    flat = {}
    for path, spec in shapes.items():
        if path[-1] == "running_var":
            flat[path] = rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
        elif path[-1] == "scale":
            flat[path] = np.ones(spec.shape, np.float32)
        elif path[-1] == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            flat[path] = (rng.normal(size=spec.shape) / np.sqrt(fan_in)).astype(np.float32)
        else:  # bias, running_mean
            flat[path] = (rng.normal(size=spec.shape) * 0.1).astype(np.float32)
    hf_config = {"architectures": [cfg.architecture], "model_type": "efficientnet_lite", "image_size": 32,
                 "num_labels": 3, "dropout_rate": 0.0, "drop_connect_rate": 0.0}
    return hf.Pretrained(cfg, module, unflatten_dict(flat), hf_config, "tiny", cfg.architecture)


def test_batchnorm_statistics_are_frozen_state_in_every_plan(tiny):
    full = flatten_dict(tuning.apply_plan(tiny, tuning.full()).labels)
    assert {p[-1] for p, label in full.items() if label == tuning.FROZEN} == set(STATE_LEAVES)
    tuned = tuning.apply_plan(tiny, tuning.freeze_all_but(1) + tuning.head("classification", 3))
    stats = [p for p in flatten_dict(tuned.labels) if p[-1] in STATE_LEAVES]
    assert stats and all(flatten_dict(tuned.labels)[p] == tuning.FROZEN for p in stats)
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    assert not any(p[-1] in STATE_LEAVES for p in flatten_dict(trainable))  # no gradient, no optimizer state
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    batch = {"pixel_values": x, "labels": np.array([0, 1, 2, 0], np.int32), "example_weights": np.ones(4, np.float32)}
    loss_fn = make_loss_fn(tuned.module, "classification")
    # Training mode normalises with the stored statistics too: without dropout it equals evaluation.
    outputs = jax.jit(lambda p, train: loss_fn(p, batch, jax.random.key(0), not train)[2], static_argnums=1)
    np.testing.assert_allclose(np.asarray(outputs(tuned.params, True)), np.asarray(outputs(tuned.params, False)),
                               atol=1e-5)
    step = jax.jit(make_train_step(loss_fn, optimizer))
    new_trainable, _, metrics = step(trainable, frozen, optimizer.init(trainable), batch, jax.random.key(1))
    assert bool(metrics["finite"])
    new, old = flatten_dict(tuning.combine(new_trainable, frozen)), flatten_dict(tuned.params)
    for path in stats:  # the statistics are exactly the pretrained ones after a step
        np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(old[path]))
    changed = {p[0] for p in new if p[-1] == "scale" and not np.array_equal(np.asarray(new[p]), np.asarray(old[p]))}
    # The last block and what follows it train (BatchNorm scale/bias included); earlier stages stay frozen.
    assert changed == {f"layers_{tiny.config.num_layers - 1}", "bn1"}


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (5, 2, 11), (3, 2, 8)])
def test_depthwise_by_shifts_equals_the_grouped_convolution_forward_and_backward(kernel, stride, size):
    """The CPU depthwise path against XLA's grouped convolution (``feature_group_count = C``)."""
    import jax.numpy as jnp

    from jaxtune.models.efficientnet import depthwise_by_shifts

    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 6))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 6))
    pads = [(kernel // 2, kernel // 2 - (size % stride == 0)), (kernel // 2 - 1, kernel // 2)]

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)

    def shifts(x, w):
        return depthwise_by_shifts(x, w, stride, pads)

    np.testing.assert_allclose(shifts(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(jax.random.key(2), grouped(x, w).shape)
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * probe), argnums=(0, 1))(x, w) for f in (shifts, grouped)]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
