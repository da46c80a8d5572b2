"""Losses against closed forms / torch, and optimizer pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtune.training.losses import causal_lm_loss, classification_loss, regression_loss
from jaxtune.training.optim import OptimizerConfig, build_optimizer, decay_mask, make_schedule


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_lm_loss_equals_torch_cross_entropy(chunk):
    rng = np.random.RandomState(0)
    hidden = rng.randn(3, 11, 16).astype(np.float32)
    head = rng.randn(16, 50).astype(np.float32)
    targets = rng.randint(0, 50, (3, 11))
    weights = (rng.rand(3, 11) > 0.3).astype(np.float32)
    total, count = causal_lm_loss(jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(weights),
                                  lambda h: h @ head, chunk_tokens=chunk)
    logits = torch.as_tensor(hidden @ head).reshape(-1, 50)
    ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(targets).reshape(-1), reduction="none")
    expected = float((ce * torch.as_tensor(weights).reshape(-1)).sum())
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(count) == weights.sum()


def test_chunked_lm_loss_gradient_matches_unchunked():
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 9, 8), jnp.float32)
    head = jnp.asarray(rng.randn(8, 30), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 30, (2, 9)))
    weights = jnp.ones((2, 9))

    def loss(h, w, chunk):
        return causal_lm_loss(h, targets, weights, lambda x: x @ w, chunk_tokens=chunk)[0]

    g_small = jax.grad(loss, argnums=(0, 1))(hidden, head, 4)
    g_full = jax.grad(loss, argnums=(0, 1))(hidden, head, 1000)
    for a, b in zip(g_small, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_classification_and_regression_losses():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 1])
    total, n = classification_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(torch.as_tensor(np.asarray(logits)), torch.tensor([0, 1]),
                                                 reduction="sum")
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(n) == 2
    pred, target = jnp.array([[1.0], [3.0], [0.0]]), jnp.array([1.5, 0.0, 0.0])
    assert float(regression_loss(pred, target)[0]) == pytest.approx(0.25 + 9.0)
    huber = torch.nn.functional.huber_loss(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.5, 0.0, 0.0]),
                                           reduction="sum", delta=1.0)
    assert float(regression_loss(pred, target, kind="huber")[0]) == pytest.approx(float(huber))
    weighted, w = regression_loss(pred, target, jnp.array([1.0, 0.0, 1.0]))
    assert float(weighted) == pytest.approx(0.25) and float(w) == 2.0


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lr = make_schedule(cfg, total_steps=20)
    assert float(lr(0)) == pytest.approx(0.25)
    assert float(lr(3)) == pytest.approx(1.0)
    assert float(lr(4)) == pytest.approx(1.0)
    assert float(lr(20)) == pytest.approx(0.1)
    linear = make_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear"), total_steps=10)
    assert float(linear(5)) == pytest.approx(1.0)


def test_a_warmup_ratio_rounds_up_as_transformers_does():
    """transformers' warmup of ``ratio * steps`` steps rounds up (ceil); jaxtune rounded down, one step short."""
    import transformers

    for ratio, steps in ((0.1, 25), (0.05, 30), (0.2, 10)):
        expected = transformers.TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(steps)
        lr = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_ratio=ratio, schedule="constant"), steps)
        # the peak comes on the warmup's last step and not before
        assert float(lr(expected - 1)) == pytest.approx(1.0) and float(lr(expected - 2)) < 1.0, (ratio, steps)


def test_weight_decay_skips_biases_norms_and_magnitudes():
    params = {"q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "lora_a": jnp.ones((2, 1)),
                    "magnitude": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2)}}
    mask = decay_mask(params)
    assert mask == {"q": {"kernel": True, "bias": False, "lora_a": True, "magnitude": False}, "norm": {"scale": False}}
    opt, _ = build_optimizer(OptimizerConfig(learning_rate=0.1, weight_decay=0.5, clip_grad_norm=None,
                                             schedule="constant"), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert float(updates["q"]["kernel"][0, 0]) == pytest.approx(-0.05)
    assert float(updates["q"]["bias"][0]) == 0.0


def test_adam_weight_decay_is_torch_adams_l2_and_no_optimizer_changes_state_with_it():
    """``adam`` with ``weight_decay`` steps as ``torch.optim.Adam(weight_decay=)`` (L2 added to the
    gradient before the moments; it was silently ignored); for every optimizer a weight decay changed
    on resume fits the saved state (adafactor's state lost a chain element at 0)."""
    w0 = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    grads = [np.array([[0.1, 0.2], [-0.3, 0.05]], np.float32), np.array([[-0.2, 0.1], [0.4, 0.0]], np.float32)]
    opt, _ = build_optimizer(OptimizerConfig(name="adam", learning_rate=0.1, weight_decay=0.5, clip_grad_norm=None,
                                             schedule="constant"), 10)
    params = {"w": {"kernel": jnp.asarray(w0)}}
    state = opt.init(params)
    ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    torch_opt = torch.optim.Adam([ref], lr=0.1, weight_decay=0.5)
    for g in grads:
        updates, state = opt.update({"w": {"kernel": jnp.asarray(g)}}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        ref.grad = torch.from_numpy(g.copy())
        torch_opt.step()
    # (optax computes Adam's bias correction 1 - b2**t in float32, torch in Python floats: ~1e-5 apart)
    np.testing.assert_allclose(np.asarray(params["w"]["kernel"]), ref.detach().numpy(), rtol=1e-4)
    for name in ("adamw", "adam", "sgd", "lion", "adafactor"):
        states = [jax.tree.structure(build_optimizer(OptimizerConfig(name=name, weight_decay=wd), 10)[0].init(params))
                  for wd in (0.0, 0.1)]
        assert states[0] == states[1], name


def test_a_warmup_as_long_as_the_run_is_cut_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        lr = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10), total_steps=4)
    assert "optimizer.warmup_steps 10 is not shorter than the run's 4 steps" in caplog.text
    assert [float(lr(i)) for i in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


@pytest.mark.parametrize(("ratio", "warned"), [(0.95, True), (0.85, False)])
def test_a_warmup_ratio_that_rounds_up_to_the_whole_run_is_cut_with_the_same_warning(caplog, ratio, warned):
    """0.95 of 10 steps rounds up (as transformers' get_warmup_steps) to all 10: cut to 9 as
    warmup_steps 10 is, and said so (it was cut silently); 0.85 rounds to 9 and fits."""
    import transformers

    asked = transformers.TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(10)
    with caplog.at_level("WARNING"):
        lr = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_ratio=ratio), total_steps=10)
    message = f"optimizer.warmup_ratio {ratio} ({asked} steps) is not shorter than the run's 10 steps"
    assert (message in caplog.text) == warned and asked == (10 if warned else 9), caplog.text
    # either way the peak comes on step 9 (index 8) and not before
    assert float(lr(8)) == pytest.approx(1.0) and float(lr(7)) == pytest.approx(8 / 9)


@pytest.mark.parametrize("warmup", [{"warmup_steps": 3}, {"warmup_steps": 1}, {"warmup_ratio": 0.5}])
def test_a_one_step_run_drops_its_warmup_with_the_warning_of_every_cut(caplog, warmup):
    """``train.steps: 1`` with a warmup: transformers' get_warmup_steps asks for at least one warmup
    step (a ratio rounds up) and its schedule takes the run's only step at a learning rate of 0; here,
    as for every warmup of the whole run, the warmup is cut to one step less (none), and the step is at
    the peak. The cut was silent for one step alone."""
    import transformers

    field = next(iter(warmup))
    asked = transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup[field]).get_warmup_steps(1)
    param = torch.nn.Parameter(torch.zeros(1))
    torch_schedule = transformers.get_scheduler("linear", torch.optim.SGD([param], lr=1.0), num_warmup_steps=asked,
                                                num_training_steps=1)
    assert asked >= 1 and torch_schedule.get_last_lr() == [0.0]  # where jaxtune differs (docs/cli.md)
    with caplog.at_level("WARNING"):
        lr = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear", **warmup), total_steps=1)
    assert float(lr(0)) == 1.0
    shown = f"warmup_steps {asked}" if field == "warmup_steps" else f"warmup_ratio 0.5 ({asked} steps)"
    assert f"optimizer.{shown} is not shorter than the run's 1 steps: the warmup is cut to 0 steps" in caplog.text


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 1}, {"warmup_steps": 2}, {"warmup_ratio": 0.01},
                                    {"warmup_ratio": 0.05}, {"warmup_ratio": 0.1}])
@pytest.mark.parametrize("steps", [7, 30])
def test_short_warmups_follow_transformers_step_by_step(schedule, warmup, steps):
    """Each step's learning rate against transformers' get_scheduler (its LambdaLR, stepped as its Trainer
    steps it) for one- and two-step warmups and small ratios, which round up (0.01 of 7 steps is one
    step). The one documented difference (docs/cli.md): a warmup step here is at
    ``learning_rate * (i + 1) / warmup``, where transformers' first is at 0, its next at ``1 / warmup``."""
    import transformers

    value = next(iter(warmup.values()))
    warmup_steps = transformers.TrainingArguments(output_dir="unused", warmup_steps=value).get_warmup_steps(steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    lambda_lr = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    theirs = []
    for _ in range(steps):
        theirs.append(lambda_lr.get_last_lr()[0])
        optimizer.step()
        lambda_lr.step()
    expected = [(i + 1) / warmup_steps if i < warmup_steps else lr for i, lr in enumerate(theirs)]
    lr = make_schedule(OptimizerConfig(learning_rate=1.0, schedule=schedule, **warmup), total_steps=steps)
    np.testing.assert_allclose([float(lr(i)) for i in range(steps)], expected, rtol=1e-6, atol=1e-7)


def test_no_warning_of_a_cut_warmup_where_no_schedule_is_followed(caplog):
    """A trainer without training data (evaluating, exporting) counts one step: its schedule is never
    followed, so its warmup is not warned of (``warn=False``); a training run's is."""
    with caplog.at_level("WARNING"):
        build_optimizer(OptimizerConfig(warmup_ratio=0.1), 1, warn=False)
    assert "warmup" not in caplog.text
    with caplog.at_level("WARNING"):
        build_optimizer(OptimizerConfig(warmup_ratio=0.1), 1)
    assert "optimizer.warmup_ratio 0.1 (1 steps) is not shorter than the run's 1 steps" in caplog.text


def test_group_learning_rates_scale_updates_and_reject_unknown_groups():
    params = {"body": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
    groups = {"body": {"kernel": "train"}, "head": {"kernel": "head"}}
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, clip_grad_norm=None, schedule="constant",
                          group_lr={"head": 10.0})
    opt, _ = build_optimizer(cfg, 10, groups)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert float(updates["body"]["kernel"][0, 0]) == pytest.approx(-0.1)
    assert float(updates["head"]["kernel"][0, 0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"group\(s\) \['hed'\] are not in the plan; groups: \['head', 'train'\]"):
        build_optimizer(OptimizerConfig(group_lr={"hed": 2.0}), 10, groups)


def test_bad_optimizer_config_is_named():
    with pytest.raises(ValueError, match="optimizer.name 'adamx' is unknown; choose one of adamw"):
        OptimizerConfig(name="adamx")
    with pytest.raises(ValueError, match="optimizer.schedule"):
        OptimizerConfig(schedule="exp")
    with pytest.raises(ValueError, match=r"^optimizer.group_lr: expected a mapping, got \[\('head', 5.0\)\]$"):
        OptimizerConfig(group_lr=[("head", 5.0)])


@pytest.mark.parametrize("fields, field", [
    (dict(name="sgd", b1=0.95), "b1"),  # sgd took b1 as its momentum once: now silently none
    (dict(name="lion", eps=1e-6), "eps"),
    (dict(name="adamw", momentum=0.9), "momentum"),
    (dict(name="adafactor", b2=0.99), "b2"),
    (dict(schedule="constant", min_lr_ratio=0.1), "min_lr_ratio"),
])
def test_a_hyperparameter_the_optimizer_does_not_read_is_refused(fields, field):
    """A value set for a field the chosen optimizer or schedule never reads was dropped without a word."""
    with pytest.raises(ValueError, match=rf"^optimizer.{field}=\S+ is not used by (optimizer|schedule) '\w+' .*; "
                                         "remove it or choose"):
        OptimizerConfig(**fields)
    # each optimizer takes the fields it reads, and the defaults of those it ignores
    for name, reads in (("adamw", dict(b1=0.5, b2=0.5, eps=1e-6)), ("adam", dict(b1=0.5, b2=0.5, eps=1e-6)),
                        ("lion", dict(b1=0.5, b2=0.5)), ("sgd", dict(momentum=0.5)), ("adafactor", {})):
        OptimizerConfig(name=name, **reads)
    OptimizerConfig(schedule="linear", min_lr_ratio=0.1)


def test_every_reported_metric_has_a_direction_for_the_best_checkpoint():
    """A best_metric without a known direction was taken as lower-is-better: eval.best_metric
    rewards/chosen or logps/chosen kept the checkpoint whose chosen answers scored lowest. Only a
    reward model's scores' level (its min/mean/max) has none, and best_metric refuses it there."""
    from jaxtune.training.evaluate import HIGHER_IS_BETTER, METRICS, REWARD_SCORES

    assert [(task, m) for task, names in METRICS.items() for m in names
            if m not in HIGHER_IS_BETTER and not (task == "reward" and m in REWARD_SCORES)] == []
    assert HIGHER_IS_BETTER["rewards/chosen"] and HIGHER_IS_BETTER["logps/chosen"]
    assert not HIGHER_IS_BETTER["rewards/rejected"] and not HIGHER_IS_BETTER["logps/rejected"]


def test_adafactor_steps_as_transformers_adafactor_layer_by_layer():
    """``adafactor`` is transformers' ``Adafactor(scale_parameter=False, relative_step=False, weight_decay=)``
    (what its Trainer builds): optax's multiplied each step by the weight's RMS (a zero LoRA B barely moved),
    added the decay after the learning rate (1/lr times too strong), and clipped a scanned run of layers as
    one tensor. A stacked leaf here steps as its layers do, each a torch parameter of its own."""
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    w0 = {"layers_0-1": {"kernel": (0.02 * rng.standard_normal((2, 8, 16))).astype(np.float32)},
          "lora_b": {"kernel": np.zeros((4, 16), np.float32)}, "norm": {"bias": np.ones(16, np.float32)}}
    grads = [jax.tree.map(lambda w: (0.01 * rng.standard_normal(w.shape)).astype(np.float32), w0) for _ in range(4)]
    grads[1]["layers_0-1"]["kernel"][0, 0, 0] = 5.0  # a spike in layer 0 must not shrink layer 1's step
    opt, _ = build_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-3, weight_decay=0.1,
                                             schedule="constant", clip_grad_norm=None), 10)
    params = jax.tree.map(jnp.asarray, w0)
    state = opt.init(params)
    torch_params = {"layer0": torch.nn.Parameter(torch.from_numpy(w0["layers_0-1"]["kernel"][0].copy())),
                    "layer1": torch.nn.Parameter(torch.from_numpy(w0["layers_0-1"]["kernel"][1].copy())),
                    "lora_b": torch.nn.Parameter(torch.from_numpy(w0["lora_b"]["kernel"].copy())),
                    "bias": torch.nn.Parameter(torch.from_numpy(w0["norm"]["bias"].copy()))}
    decayed = [torch_params[k] for k in ("layer0", "layer1", "lora_b")]
    torch_opt = Adafactor([{"params": decayed, "weight_decay": 0.1}, {"params": [torch_params["bias"]],
                          "weight_decay": 0.0}], lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    for g in grads:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        for name, grad in (("layer0", g["layers_0-1"]["kernel"][0]), ("layer1", g["layers_0-1"]["kernel"][1]),
                           ("lora_b", g["lora_b"]["kernel"]), ("bias", g["norm"]["bias"])):
            torch_params[name].grad = torch.from_numpy(grad.copy())
        torch_opt.step()
    ours = {"layer0": params["layers_0-1"]["kernel"][0], "layer1": params["layers_0-1"]["kernel"][1],
            "lora_b": params["lora_b"]["kernel"], "bias": params["norm"]["bias"]}
    for name, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(ours[name]), p.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


def test_adafactor_factors_a_convolution_kernel_over_height_and_width_as_transformers():
    """transformers factors a torch ``Conv2d.weight`` ``(out, in, kh, kw)`` over its last two axes, the
    kernel's height and width; ours are the first two of the stored transpose ``(kw, kh, in, out)``.
    Factored over the channels instead, a conv step was half a step away from transformers'."""
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    torch_shapes = {"conv": (8, 4, 3, 3), "depthwise": (6, 1, 3, 3)}  # (out, in / groups, kh, kw)
    w0 = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in torch_shapes.items()}
    # each input channel and kernel row its own gradient scale, so every factorisation gives another step
    grads = [{name: (0.01 * rng.standard_normal(w.shape) * rng.uniform(0.1, 10, w.shape[1:3] + (1,))).astype(
        np.float32) for name, w in w0.items()} for _ in range(4)]
    opt, _ = build_optimizer(OptimizerConfig(name="adafactor", learning_rate=1e-2, schedule="constant",
                                             clip_grad_norm=None), 10)
    params = {name: {"kernel": jnp.asarray(w.T)} for name, w in w0.items()}
    state = opt.init(params)
    torch_params = {name: torch.nn.Parameter(torch.from_numpy(w.copy())) for name, w in w0.items()}
    torch_opt = Adafactor(list(torch_params.values()), lr=1e-2, scale_parameter=False, relative_step=False,
                          warmup_init=False)
    for g in grads:
        updates, state = opt.update({name: {"kernel": jnp.asarray(x.T)} for name, x in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for name, p in torch_params.items():
            p.grad = torch.from_numpy(g[name].copy())
        torch_opt.step()
    for name, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(params[name]["kernel"]), p.detach().numpy().T, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_steps_as_torch_sgd(momentum):
    """``sgd`` took ``b1`` (0.9 by default) as its momentum, where torch.optim.SGD (and transformers' Trainer)
    use none unless asked; ``momentum`` is its own field now, 0 by default."""
    w0, grads = np.array([0.5, -1.0], np.float32), [np.array([1.0, -0.5], np.float32)] * 3
    config = {"momentum": momentum} if momentum else {}
    opt, _ = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, clip_grad_norm=None, schedule="constant",
                                             **config), 10)
    params = {"w": jnp.asarray(w0)}
    state = opt.init(params)
    ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    torch_opt = torch.optim.SGD([ref], lr=0.1, momentum=momentum)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        ref.grad = torch.from_numpy(g.copy())
        torch_opt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), ref.detach().numpy(), rtol=1e-6)
