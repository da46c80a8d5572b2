"""EfficientNet-Lite: the real ImageNet weights against the reference PyTorch package on real
images, forward and train step for step (slow), what BatchNorm statistics do in each plan (tiny
random network), and a training BatchNorm against PyTorch's."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
from jaxtune.training.step import make_loss_fn, make_train_step, with_state
from jaxtune.tuning.labels import STATE


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
    # Jitted: op by op, the network's hundreds of ops each compiled alone took most of the test's time.
    features = np.asarray(jax.jit(body.apply)({"params": {k: v for k, v in model.params.items() if k != "fc"}}, x))
    logits = np.asarray(jax.jit(model.module.apply)({"params": model.params}, x))
    with torch.no_grad():
        theirs = ref.extract_features(torch.from_numpy(x)).numpy()  # (B, 1280, 7, 7)
        their_logits = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(features, theirs.transpose(0, 2, 3, 1).reshape(2, 49, 1280), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, their_logits, atol=1e-4, rtol=0)
    # The weights are TF's EfficientNet-Lite, whose inputs are (x - 127) / 128 (TF-Lite's "inception-style" mean
    # and stddev); they were fed ImageNet's mean/std, ~2.2x too large for the stem's pretrained statistics.
    raw = np.asarray(images[0]["image"], np.float32)  # 28x28x1, 0..255
    resized = ToPixels(dataclasses.replace(spec, size=28)).pixels(images[0])["pixel_values"]
    np.testing.assert_allclose(resized, np.broadcast_to(((raw - 127) / 128).transpose(2, 0, 1), (3, 28, 28)),
                               atol=1e-5)


@pytest.mark.slow
def test_real_train_step_equals_the_reference_package_step_for_step():
    """The quality benchmark's plan (last 6 blocks, head conv and a new head train; their
    BatchNorms use and update batch statistics) on the real weights and real images, against
    the reference PyTorch package trained as ``benchmarks/quality_images.py`` trains it: the same head
    init, batches and AdamW settings (decay on matrices, head lr x3, clip 1.0), dropout and
    drop-connect off. The first step's loss, gradients and running statistics agree; three more
    steps keep the losses together (Adam then amplifies float noise in near-zero gradients, so
    the params are not compared late)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from jaxtune.assets import ASSETS, package_path
    from jaxtune.data import read
    from jaxtune.data.images import ImageSpec, ToPixels
    from jaxtune.models.assets import fetch_model
    from jaxtune.models.efficientnet import hf_module
    from jaxtune.training.optim import OptimizerConfig, build_optimizer

    try:
        path = fetch_model("efficientnet-lite0")
        images, _ = read("fashion_mnist", train_size=100, validation_size=10)
    except FetchError as err:
        skip_or_fail(f"EfficientNet-Lite0 or Fashion-MNIST could not be fetched here: {err}")
    pretrained = hf.load_pretrained(path, hidden_dropout=0.0, drop_connect_rate=0.0)
    tuned = tuning.apply_plan(pretrained, tuning.freeze_all_but(6) + tuning.head("classification", 10))
    to_pixels = ToPixels(ImageSpec.from_model_dir(96, 3, path))  # 96x96 keeps the test cheap
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        idx = rng.choice(len(images), 8, replace=False)
        batches.append({"pixel_values": np.stack([to_pixels.pixels(images[int(i)])["pixel_values"] for i in idx]),
                        "labels": np.asarray([images[int(i)]["label"] for i in idx], np.int32),
                        "example_weights": np.ones(8, np.float32)})

    weights = str(package_path(ASSETS["efficientnet-lite0"]))
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    ref._global_params = ref._global_params._replace(drop_connect_rate=0.0)
    ref._dropout.p = 0.0
    for p in ref.parameters():
        p.requires_grad = False
    for module in (*ref._blocks[-6:], ref._conv_head, ref._bn1):
        for p in module.parameters():
            p.requires_grad = True
    flat, labels = flatten_dict(tuned.params), flatten_dict(tuned.labels)
    ref._fc = torch.nn.Linear(1280, 10)
    with torch.no_grad():
        ref._fc.weight.copy_(torch.from_numpy(np.asarray(flat[("head", "out", "kernel")]).T))
        ref._fc.bias.copy_(torch.from_numpy(np.asarray(flat[("head", "out", "bias")])))
    theirs = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}

    def torch_of(path):
        if path[0] == "head":
            return theirs["_fc.weight" if path[-1] == "kernel" else "_fc.bias"]
        return theirs[f"{hf_module(path[:-1])}.{ {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])}"]

    def ours(path, tensor):  # PyTorch's layout -> jaxtune's
        t = tensor.detach().numpy()
        return t.transpose(3, 2, 1, 0) if t.ndim == 4 else t.T if path[-1] == "kernel" else t

    trained = {p for p, label in labels.items() if label in ("train", "head")}
    assert {id(torch_of(p)) for p in trained} == {id(p) for p in ref.parameters() if p.requires_grad}
    for p in flat:
        np.testing.assert_array_equal(ours(p, torch_of(p)), np.asarray(flat[p]), err_msg=str(p))

    config = OptimizerConfig(learning_rate=1e-3, weight_decay=0.01, warmup_ratio=0.0, schedule="constant",
                             clip_grad_norm=1.0, group_lr={"head": 3.0})
    groups, _ = tuning.partition(tuned.labels, tuned.labels)
    optimizer, _ = build_optimizer(config, 4, groups)
    loss_fn = make_loss_fn(tuned.module, "classification")
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    grads = jax.jit(jax.grad(lambda tr, b: loss_fn(tuning.combine(tr, frozen), b, jax.random.key(0), False)[0] / 8))(
        trainable, batches[0])
    step = jax.jit(make_train_step(loss_fn, optimizer))
    opt_state = optimizer.init(trainable)

    head = {id(p) for p in ref._fc.parameters()}
    params = [p for p in ref.parameters() if p.requires_grad]
    torch_optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.01 if decay else 0.0, "lr": 1e-3 * (3.0 if is_head else 1.0)}
         for is_head in (False, True) for decay in (True, False)
         if (ps := [p for p in params if (id(p) in head) == is_head and (p.ndim >= 2) == decay])], lr=1e-3)
    ref.train()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad:
            m.eval()  # the frozen stages normalise with the pretrained statistics
    for i, batch in enumerate(batches):
        loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(batch["pixel_values"])),
                                                 torch.from_numpy(batch["labels"]).long())
        loss.backward()
        if i == 0:
            scale = max(float(p.grad.abs().max()) for p in params)
            for path, g in flatten_dict(grads).items():
                if path in trained:
                    # A pre-activation within float drift of ReLU6's kinks (0, 6) takes its gradient on one
                    # side on one implementation and on the other side on the other (here one position of
                    # block 10's depthwise output, channel 509, sits 3.5e-6 from 0), and the BatchNorm backward
                    # carries that into the channel's summed gradients. The rest must agree elementwise, and
                    # each leaf as a vector.
                    got, want = np.asarray(g), ours(path, torch_of(path).grad)
                    assert np.mean(np.abs(got - want) > 1e-4 * scale) <= 0.01, path
                    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want) + 1e-6 * scale, path
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=2e-3, err_msg=f"step {i}")
        if i == 0:
            new = flatten_dict(trainable)
            stats = [p for p, label in labels.items() if label == STATE]
            assert stats
            for path in stats:
                np.testing.assert_allclose(np.asarray(new[path]), ours(path, torch_of(path)), rtol=1e-3, atol=1e-4,
                                           err_msg=str(path))


def _random_efficientnet(**config: float) -> hf.Pretrained:
    """A randomly initialised EfficientNet-Lite (``config``: its EfficientNetConfig fields beyond these) on
    32x32 inputs with random BatchNorm statistics."""
    cfg = EfficientNetConfig(image_size=32, num_labels=3, hidden_dropout=0.0, drop_connect_rate=0.0, **config)
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
                 "num_labels": 3, "dropout_rate": 0.0, "drop_connect_rate": 0.0, **config}
    return hf.Pretrained(cfg, module, unflatten_dict(flat), hf_config, "tiny", cfg.architecture)


@pytest.fixture(scope="module")
def tiny() -> hf.Pretrained:
    """EfficientNet-Lite0's shapes (the reference package's), random weights and statistics, 32x32 inputs."""
    return _random_efficientnet()


@pytest.fixture(scope="module")
def shallow() -> hf.Pretrained:
    """As ``tiny``, half as deep (10 blocks, not 16; every stage kept, stages 4-6 with a residual block):
    for the tests of the BatchNorms' labels, updates and recalibration that compare with no reference
    package, whose time is most in compiling the network."""
    return _random_efficientnet(depth_coefficient=0.5)


def _jit_loss(loss_fn: Callable) -> Callable:
    """``loss_fn(params, batch, rng, deterministic)`` compiled whole, ``deterministic`` static: run op by
    op, the network's hundreds of ops each compiled alone (~20 s of CPU a call on CI's 2 cores)."""
    return jax.jit(loss_fn, static_argnums=3)


def _image_batch(n: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(n, 3, 32, 32)).astype(np.float32),
            "labels": rng.integers(0, 3, n).astype(np.int32), "example_weights": np.ones(n, np.float32)}


def test_batchnorm_statistics_follow_the_plan(shallow):
    """Frozen stages keep the pretrained statistics and normalise with them in training too; a
    stage that trains has its statistics labelled ``state`` and the step writes the batch-updated
    values (the model's own STATE_UPDATES) into the new params."""
    full = flatten_dict(tuning.apply_plan(shallow, tuning.full()).labels)
    assert {p[-1] for p, label in full.items() if label == STATE} == set(STATE_LEAVES)
    assert tuning.FROZEN not in full.values()
    tuned = tuning.apply_plan(shallow, tuning.freeze_all_but(1) + tuning.head("classification", 3))
    last = f"layers_{shallow.config.num_layers - 1}"
    labels = flatten_dict(tuned.labels)
    stats = {p: label for p, label in labels.items() if p[-1] in STATE_LEAVES}
    assert {p[0] for p, label in stats.items() if label == STATE} == {last, "bn1"}
    assert tuned.config.training_batch_norms == ("bn1", f"{last}/bn0", f"{last}/bn1", f"{last}/bn2")
    # A freeze rule that names the statistics keeps them frozen where their BatchNorm trains.
    pinned = tuning.apply_plan(shallow, tuning.freeze_all_but(1) + tuning.freeze("running_(mean|var)$")
                               + tuning.head("classification", 3))
    assert STATE not in flatten_dict(pinned.labels).values() and pinned.config.training_batch_norms == ()
    assert flatten_dict(pinned.labels)[(last, "bn1", "scale")] == "train"
    again = tuning.apply_plan(shallow, tuning.freeze("running_(mean|var)$") + tuning.full())  # a later rule wins
    assert {p[-1] for p, label in flatten_dict(again.labels).items() if label == STATE} == set(STATE_LEAVES)
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    batch = _image_batch(4)
    loss_fn = make_loss_fn(tuned.module, "classification")
    _, _, outputs = _jit_loss(loss_fn)(tuned.params, batch, jax.random.key(0), False)
    updates = flatten_dict(outputs["state"])
    assert {p[0] for p in updates} == {last, "bn1"}
    step = jax.jit(make_train_step(loss_fn, optimizer))
    new_trainable, _, metrics = step(trainable, frozen, optimizer.init(trainable), batch, jax.random.key(1))
    assert bool(metrics["finite"])
    new, old = flatten_dict(tuning.combine(new_trainable, frozen)), flatten_dict(tuned.params)
    for path, label in stats.items():
        if label == STATE:  # the batch-updated statistics, not an optimizer update
            np.testing.assert_allclose(np.asarray(new[path]), np.asarray(updates[path]), rtol=1e-4, atol=1e-5)
            assert not np.allclose(np.asarray(new[path]), np.asarray(old[path]))
        else:  # exactly the pretrained ones
            np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(old[path]))
    changed = {p[0] for p in new if p[-1] == "scale" and not np.array_equal(np.asarray(new[p]), np.asarray(old[p]))}
    assert changed == {last, "bn1"}  # earlier stages stay frozen, BatchNorm scale/bias included

    # A frozen body normalises with the stored statistics in training: without dropout, it equals evaluation.
    frozen_body = tuning.apply_plan(shallow, tuning.head("classification", 3))
    assert frozen_body.config.training_batch_norms == ()
    frozen_loss = _jit_loss(make_loss_fn(frozen_body.module, "classification"))
    train_out, eval_out = (np.asarray(frozen_loss(frozen_body.params, batch, jax.random.key(0), d)[2])
                           for d in (False, True))
    np.testing.assert_allclose(train_out, eval_out, atol=1e-5)


def test_gradient_accumulation_updates_statistics_micro_batch_after_micro_batch(shallow):
    """k micro-batches update the statistics as k forward passes in a row would (PyTorch's
    accumulation): the step with grad_accum_steps=2 against two sequential applications."""
    tuned = tuning.apply_plan(shallow, tuning.freeze_all_but(1) + tuning.head("classification", 3))
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    optimizer = optax.sgd(0.0)  # only the statistics move
    batch = _image_batch(4, seed=2)
    loss_fn = make_loss_fn(tuned.module, "classification")
    step = jax.jit(make_train_step(loss_fn, optimizer, grad_accum_steps=2))
    new_trainable, _, _ = step(trainable, frozen, optimizer.init(trainable), batch, jax.random.key(1))
    params = tuned.params
    for rows in (slice(0, None, 2), slice(1, None, 2)):  # the step's micro-batches take every k-th row
        micro = {k: v[rows] for k, v in batch.items()}
        params = with_state(params, _jit_loss(loss_fn)(params, micro, jax.random.key(0), False)[2]["state"])
    expected, got = flatten_dict(params), flatten_dict(new_trainable)
    for path, label in flatten_dict(tuned.labels).items():
        if label == STATE:
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(expected[path]), rtol=1e-4, atol=1e-5)


def test_batchnorm_in_training_equals_torch_batchnorm2d():
    """A training BatchNorm against ``torch.nn.BatchNorm2d(momentum=0.01)`` in train mode: output,
    gradients, and the running statistics after the step; evaluation uses the running ones."""
    import flax.linen as nn
    import torch

    from jaxtune.models.efficientnet import BatchNorm
    from jaxtune.models.layers import STATE_UPDATES

    cfg = EfficientNetConfig(training_batch_norms=("bn",))

    class Holder(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic):
            return BatchNorm(cfg, name="bn")(x, deterministic)

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 5, 6, 7)).astype(np.float32)  # NHWC
    params = {"bn": {"scale": rng.uniform(0.5, 1.5, 7).astype(np.float32),
                     "bias": rng.normal(size=7).astype(np.float32),
                     "running_mean": rng.normal(size=7).astype(np.float32),
                     "running_var": rng.uniform(0.5, 2.0, 7).astype(np.float32)}}
    probe = rng.normal(size=x.shape).astype(np.float32)
    reference = torch.nn.BatchNorm2d(7, eps=cfg.batch_norm_epsilon, momentum=1 - cfg.batch_norm_momentum)
    with torch.no_grad():
        for name, theirs in (("scale", "weight"), ("bias", "bias"), ("running_mean", "running_mean"),
                             ("running_var", "running_var")):
            getattr(reference, theirs).copy_(torch.from_numpy(params["bn"][name]))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    ty = reference.train()(tx)
    (ty * torch.from_numpy(probe.transpose(0, 3, 1, 2))).sum().backward()

    def loss(p, x):
        y, state = Holder().apply({"params": p}, x, False, mutable=[STATE_UPDATES])
        return (y * probe).sum(), (y, state[STATE_UPDATES])

    (_, (y, state)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_x), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_params["bn"]["scale"]), reference.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_params["bn"]["bias"]), reference.bias.grad.numpy(), rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(np.asarray(state["bn"][name]), getattr(reference, name).numpy(), rtol=1e-5,
                                   atol=1e-6)
        assert not np.any(np.asarray(g_params["bn"][name]))  # state: no gradient
    updated = {"bn": {**params["bn"], **state["bn"]}}
    with torch.no_grad():
        evaluated = reference.eval()(tx).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(Holder().apply({"params": updated}, x, True)), evaluated, rtol=1e-5,
                               atol=1e-5)


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

    # Jitted (as the model runs them): op by op, each of the shifts' many small ops compiled alone.
    shifts, grouped = jax.jit(shifts), jax.jit(grouped)
    np.testing.assert_allclose(shifts(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(jax.random.key(2), grouped(x, w).shape)
    grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * probe), argnums=(0, 1)))(x, w)
             for f in (shifts, grouped)]
    for ours, reference in zip(*grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_trained_statistics_resume_exactly_on_a_batch_sharded_mesh(tiny, tmp_path):
    """The statistics a stage trains travel with the trainable params: on 8 data-parallel devices
    (one row of the batch each, the statistics reduced over all of them), 2 + 2 resumed steps equal
    4 uninterrupted ones bit for bit, and the statistics have moved from the pretrained ones."""
    from jaxtune.data import LoaderConfig
    from jaxtune.data.images import ImageSpec, image_loader, read_images
    from jaxtune.training.config import CheckpointConfig, TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.sharding import MeshConfig, make_mesh
    from jaxtune.training.trainer import Trainer

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 255, (16, 20, 20)).astype(np.uint8),
             labels=np.arange(16) % 3)
    source = read_images(tmp_path / "train.npz", "classification")

    def run(run_dir, steps):
        tuned = tuning.apply_plan(tiny, tuning.freeze_all_but(1) + tuning.head("classification", 3))
        loader = image_loader(source, ImageSpec(size=32), LoaderConfig(batch_size=8, seed=0), train=True)
        trainer = Trainer(tuned, train_data=loader, optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                          config=TrainConfig(steps=steps, progress=False, log_every=1), run_dir=run_dir,
                          checkpoint=CheckpointConfig(every=2), mesh=make_mesh(MeshConfig(data=8)))
        return trainer.fit()

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert resumed.step == whole.step == 4
    ours, theirs = flatten_dict(whole.model.params), flatten_dict(resumed.model.params)
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(theirs[path]), err_msg="/".join(path))
    pretrained = flatten_dict(tiny.params)
    last = f"layers_{tiny.config.num_layers - 1}"
    assert not np.allclose(np.asarray(ours[(last, "bn1", "running_var")]), pretrained[(last, "bn1", "running_var")])
    np.testing.assert_array_equal(np.asarray(ours[("layers_0", "bn1", "running_var")]),
                                  pretrained[("layers_0", "bn1", "running_var")])


def _reference_of(pretrained):
    """The reference package's EfficientNet-Lite0 holding ``pretrained``'s params and statistics
    (no stochastic depth: the statistics pass is deterministic), and its module name of a path."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from jaxtune.models.efficientnet import hf_module

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=32, num_classes=3, drop_connect_rate=0.0)
    theirs = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}

    def name(path):
        return f"{hf_module(path[:-1])}.{ {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])}"

    with torch.no_grad():
        for path, value in flatten_dict(pretrained.params).items():
            v = np.asarray(value)
            theirs[name(path)].copy_(torch.from_numpy(v.transpose(3, 2, 1, 0) if v.ndim == 4 else v.T.copy()
                                                      if path[-1] == "kernel" else v))
    return ref, theirs, name


def test_recalibration_equals_torch_cumulative_batch_norm_statistics(tiny):
    """Re-estimating the trained BatchNorms' statistics over three batches equals PyTorch's
    ``BatchNorm2d(momentum=None)`` cumulative average (what ``torch.optim.swa_utils.update_bn``
    runs) on the reference package holding the same params, with only those BatchNorms in train
    mode; the frozen stages' statistics and every other leaf stay exactly as they were."""
    import torch

    from jaxtune.training.batch_norm import make_statistics_fn, recalibrate

    tuned = tuning.apply_plan(tiny, tuning.freeze_all_but(2) + tuning.head("classification", 3))
    # 64x64 (the last stages see 2x2 pixels) and unequal batch sizes, which still weigh the same.
    batches = [{"pixel_values": np.random.default_rng(seed).normal(size=(n, 3, 64, 64)).astype(np.float32)}
               for n, seed in ((8, 3), (12, 4), (8, 5))]
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    new = recalibrate(trainable, batches, jax.jit(make_statistics_fn(tuned.module)),
                      lambda tr: tuning.combine(tr, frozen))

    ref, theirs, name = _reference_of(tiny)
    trained = set(tuned.config.training_batch_norms)
    assert len(trained) == 7  # two blocks' three BatchNorms and the head conv's
    ref.eval()
    for path in trained:
        bn = ref.get_submodule(name(tuple(path.split("/")) + ("scale",)).removesuffix(".weight"))
        bn.reset_running_stats()
        bn.momentum = None  # the cumulative average
        bn.train()
    with torch.no_grad():
        for batch in batches:
            ref(torch.from_numpy(batch["pixel_values"]))
    ours, before = flatten_dict(tuning.combine(new, frozen)), flatten_dict(tuned.params)
    for path, value in ours.items():
        if "/".join(path[:-1]) in trained and path[-1] in STATE_LEAVES:
            # A biased variance (n = 32 values at 2x2 pixels: 3% off), a weight per row instead of per
            # batch, or a running average instead of the plain one are far outside 1e-4.
            expected = theirs[name(path)].numpy()
            np.testing.assert_allclose(np.asarray(value), expected, rtol=0, atol=1e-4 * np.abs(expected).max(),
                                       err_msg=str(path))
            assert not np.allclose(np.asarray(value), np.asarray(before[path]))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(before[path]), err_msg=str(path))
    # Evaluation then reads the re-estimated statistics: the reference in eval mode gives the same features.
    body = {k: v for k, v in tuning.combine(new, frozen).items() if k != "head"}
    features = jax.jit(EfficientNetLite(dataclasses.replace(tiny.config, include_top=False)).apply)(
        {"params": body}, batches[0]["pixel_values"])
    ref.eval()
    with torch.no_grad():
        expected = ref.extract_features(torch.from_numpy(batches[0]["pixel_values"])).numpy()
    expected = expected.transpose(0, 2, 3, 1).reshape(expected.shape[0], -1)
    np.testing.assert_allclose(np.asarray(features).reshape(expected.shape), expected, rtol=0,
                               atol=1e-4 * np.abs(expected).max())


def test_a_run_recalibrates_before_it_evaluates_and_saves_and_resumes_exactly(shallow, tmp_path):
    """``train.recalibrate_batch_norm``: the trained weights are those of the same run without it
    (the running statistics never enter a gradient), the final statistics are the re-estimate from
    the training data's first batches with those weights, a run stopped at an evaluation and
    resumed ends bit for bit where the uninterrupted one does, and the final checkpoint holds the
    re-estimated statistics (a finished run reopened returns them)."""
    import itertools

    from jaxtune.data import LoaderConfig
    from jaxtune.data.images import ImageSpec, image_loader, read_images
    from jaxtune.training.batch_norm import make_statistics_fn, recalibrate
    from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.trainer import Trainer

    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8)):
        np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 255, (n, 20, 20)).astype(np.uint8),
                 labels=np.arange(n) % 3)
    train, val = (read_images(tmp_path / f"{split}.npz", "classification") for split in ("train", "val"))
    spec, data = ImageSpec(size=64), LoaderConfig(batch_size=8, seed=0)
    plan = tuning.freeze_all_but(2) + tuning.head("classification", 3)

    def run(run_dir, steps, recalibrate_batches=2, plan=plan, train_data=None):
        trainer = Trainer(tuning.apply_plan(shallow, plan),
                          train_data=train_data or image_loader(train, spec, data, train=True),
                          eval_data=image_loader(val, spec, data, train=False),
                          optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                          config=TrainConfig(steps=steps, progress=False, recalibrate_batch_norm=recalibrate_batches),
                          eval=EvalConfig(every=2, before=False), checkpoint=CheckpointConfig(every=2), run_dir=run_dir)
        return trainer.fit()

    whole = run(tmp_path / "whole", 4)
    plain = run(tmp_path / "plain", 4, recalibrate_batches=0)
    tuned = tuning.apply_plan(shallow, plan)
    trainable, frozen = tuning.partition(plain.model.params, tuned.labels)
    first = list(itertools.islice(iter(image_loader(train, spec, data, train=True)), 2))
    expected = flatten_dict(tuning.combine(recalibrate(trainable, first, jax.jit(make_statistics_fn(tuned.module)),
                                                       lambda tr: tuning.combine(tr, frozen)), frozen))
    ours, theirs = flatten_dict(whole.model.params), flatten_dict(plain.model.params)
    stats = {p for p, label in flatten_dict(tuned.labels).items() if label == STATE}
    assert stats
    for path in ours:
        if path in stats:  # re-estimated, not the running averages of the run without it
            np.testing.assert_allclose(np.asarray(ours[path]), np.asarray(expected[path]), rtol=1e-5,
                                       atol=1e-6 * np.abs(expected[path]).max(), err_msg=str(path))
            assert not np.allclose(np.asarray(ours[path]), np.asarray(theirs[path]))
        else:
            np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(theirs[path]), err_msg=str(path))
    assert whole.after["loss"] != plain.after["loss"]  # evaluation read the re-estimated statistics

    run(tmp_path / "resumed", 2)
    for result in (run(tmp_path / "resumed", 4), run(tmp_path / "whole", 4)):  # resumed; reopened when finished
        again = flatten_dict(result.model.params)
        for path in ours:
            np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(ours[path]), err_msg=str(path))

    frozen_statistics = (tuning.freeze_all_but(2) + tuning.freeze("running_(mean|var)$")
                         + tuning.head("classification", 3))
    with pytest.raises(ValueError, match=r"^train.recalibrate_batch_norm: 2, but the plan trains no BatchNorm"):
        run(tmp_path / "refused", 4, plan=frozen_statistics)
    one_pass = iter(list(itertools.islice(iter(image_loader(train, spec, data, train=True)), 4)))
    with pytest.raises(ValueError, match=r"^train.recalibrate_batch_norm re-reads .* not a one-pass iterable"):
        run(tmp_path / "refused", 4, train_data=one_pass)


def test_lora_dropout_on_the_head_drops_the_adapters_input_in_training(tiny):
    """LoRA with ``dropout`` on a head's layer (here the loaded ImageNet classifier, the head's ``out``): the
    head's Linears were built without the body config's ``adapter_dropout`` and called without ``deterministic``,
    so the dropout was silently not applied, in every family. Now training drops the adapter's input, and only
    that: with the adapter's B zero, training equals evaluation again."""
    tuned = tuning.apply_plan(tiny, tuning.lora(rank=2, dropout=0.5, targets=["out"]))
    assert tuned.config.adapter_dropout == 0.5
    flat = flatten_dict(tuned.params)
    (b_path,) = [p for p in flat if p[-1] == "lora_b"]
    pixels = _image_batch(2)["pixel_values"]

    # one compiled program per mode: op by op, the network's hundreds of ops each compile alone
    forward = jax.jit(lambda params, d: tuned.module.apply({"params": params}, pixel_values=pixels, deterministic=d,
                                                           rngs={"dropout": jax.random.key(0)}), static_argnums=1)

    def outputs(params: dict) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(forward(params, False)), np.asarray(forward(params, True))

    flat[b_path] = np.random.default_rng(0).normal(size=flat[b_path].shape).astype(np.float32)
    train, evaluate = outputs(unflatten_dict(flat))
    assert np.abs(train - evaluate).max() > 1e-3
    flat[b_path] = np.zeros_like(flat[b_path])
    train, evaluate = outputs(unflatten_dict(flat))
    np.testing.assert_allclose(train, evaluate, atol=1e-6)
