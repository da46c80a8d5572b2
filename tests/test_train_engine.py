"""The train step and sharding: accumulation, 1 vs 8 devices, non-finite guard, one compile."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model

from jaxtune.host_threads import SET_BY_JAXTUNE, threads_for_simulated_devices
from jaxtune.models import decoder, encoder, hf
from jaxtune.training.optim import READS, OptimizerConfig, build_optimizer
from jaxtune.training.sharding import MeshConfig, global_batch, make_mesh, param_shardings, param_specs, shard
from jaxtune.training.step import all_finite, make_loss_fn, make_train_step
from jaxtune.tuning.partition import partition


@dataclasses.dataclass
class Planned:
    """The fields of a planned model the engine uses (tuning.Tuned provides the same)."""

    module: Any
    params: Any
    labels: Any
    task: str = "lm"


def lm_batch(rows: int, length: int, vocab: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Packed LM rows with two documents and padding, per the data contract."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (rows, length)).astype(np.int32)
    cut, end = length // 2, length - 2
    segment = np.zeros((rows, length), np.int32)
    segment[:, :cut], segment[:, cut:end] = 1, 2
    positions = np.concatenate([np.arange(cut), np.arange(end - cut), np.zeros(2)]).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    weights = (segment != 0).astype(np.float32)
    weights[:, cut - 1] = weights[:, end - 1] = 0  # segment ends predict nothing
    weights[:, : length // 4] *= rng.rand(rows, length // 4) > 0.5  # some prompt tokens
    return {"input_ids": ids, "targets": targets.astype(np.int32), "loss_weights": weights, "segment_ids": segment,
            "positions": np.broadcast_to(positions, (rows, length)).copy()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model("LlamaForCausalLM", path)
    return hf.load_pretrained(path)


def _planned(model, freeze: str = "embed_tokens") -> Planned:
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "freeze" if freeze in jax.tree_util.keystr(path) else "train", model.params)
    return Planned(model.module, model.params, labels)


def _run(planned: Planned, batches, *, accum: int = 1, mesh=None, lr: float = 1e-2, name: str = "adamw",
         rules=decoder.PARTITION_RULES + encoder.PARTITION_RULES):  # default: whichever family the test uses
    trainable, frozen = partition(planned.params, planned.labels)
    betas = {"b1": 0.0} if "b1" in READS[name] else {}  # Adam without momentum
    optimizer, _ = build_optimizer(OptimizerConfig(name=name, learning_rate=lr, schedule="constant", **betas), 10)
    step = jax.jit(make_train_step(make_loss_fn(planned.module, planned.task), optimizer, grad_accum_steps=accum))
    if mesh is not None:
        trainable = shard(trainable, param_shardings(trainable, mesh, rules))
        frozen = shard(frozen, param_shardings(frozen, mesh, rules))
    opt_state = optimizer.init(trainable)
    losses = []
    for i, batch in enumerate(batches):
        batch = global_batch(batch, mesh) if mesh is not None else batch
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return trainable, losses, step


def test_gradient_accumulation_equals_one_big_batch(llama):
    planned = _planned(llama)
    batch = lm_batch(8, 16)
    # Plain SGD, so the parameter change is lr * gradient and compares the gradients themselves
    # (Adam's first step is sign-like and would amplify fp32 noise in near-zero gradients).
    one, loss_one, _ = _run(planned, [batch], name="sgd", lr=1.0)
    accumulated, loss_acc, _ = _run(planned, [batch], accum=4, name="sgd", lr=1.0)
    np.testing.assert_allclose(loss_acc, loss_one, rtol=1e-6)
    # fp32 with a different summation order: gradients agree to 1e-6 absolute.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                 accumulated, one)


def test_a_partial_batch_that_micro_batches_cannot_split_names_the_field_and_the_fix(llama):
    """A caller's iterable may end in a partial batch (a Loader's batches are whole): with gradient
    accumulation its rows must split into equal micro-batches, and the error said only "batch size 6 is
    not divisible by grad_accum_steps=4", naming neither the recipe field nor what to do."""
    with pytest.raises(ValueError, match=r"^train\.grad_accum_steps: a batch of 6 rows does not split into 4 "
                                         r"micro-batches of equal rows; .*\(drop a last, partial batch\), or set "
                                         r"train\.grad_accum_steps to a divisor of 6"):
        _run(_planned(llama), [lm_batch(6, 16)], accum=4)


@pytest.fixture(scope="module")
def single_device_losses(llama):
    batches = [lm_batch(8, 16, seed=s) for s in range(2)]
    _, losses, _ = _run(_planned(llama), batches, mesh=make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    return batches, losses


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_run_equals_single_device(llama, single_device_losses, axes):
    planned = _planned(llama)
    batches, reference = single_device_losses
    mesh = make_mesh(MeshConfig(**axes))
    trainable, losses, _ = _run(planned, batches, mesh=mesh)
    np.testing.assert_allclose(losses, reference, rtol=2e-5)  # fp32 all-reduce order differs
    if axes.get("tensor", 1) > 1:
        kernel = trainable["layers_0-1"]["mlp"]["up_proj"]["kernel"]  # a scanned run: the layer axis stays whole
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert len({str(s.index) for s in kernel.addressable_shards}) == axes["fsdp"] * axes["tensor"]


def test_partition_rules_cover_every_family(llama, tmp_path):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = hf.FAMILIES["LlamaForCausalLM"].partition_rules  # each family declares its own
    specs = param_specs(llama.params, mesh, rules)
    P = jax.sharding.PartitionSpec
    assert specs["layers_0-1"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers_0-1"]["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers_0-1"]["input_layernorm"]["scale"] == P()
    assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["scale"] == P()
    lora = {"q_proj": {"lora_a": jnp.zeros((64, 8)), "lora_b": jnp.zeros((8, 64))},
            "head": {"kernel": jnp.zeros((64, 3))}}
    lora_specs = param_specs(lora, mesh, rules)
    assert lora_specs["q_proj"]["lora_a"] == P("fsdp", None) and lora_specs["q_proj"]["lora_b"] == P(None, "tensor")
    assert lora_specs["head"]["kernel"] == P("fsdp", None)
    # A dimension the axis does not divide stays unsplit on that axis.
    assert param_specs({"x": {"kernel": jnp.zeros((63, 64))}}, mesh)["x"]["kernel"] == P(None, None)
    tiny_hf_model("BertModel", tmp_path)
    bert_specs = param_specs(hf.load_pretrained(tmp_path).params, mesh, hf.FAMILIES["BertModel"].partition_rules)
    assert bert_specs["layer_0"]["attention"]["self"]["query"]["kernel"] == P("fsdp", "tensor")
    assert bert_specs["layer_0"]["output"]["dense"]["kernel"] == P("tensor", "fsdp")


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="only one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        MeshConfig(data=-1, tensor=3).shape(8)
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 1, 2)


def test_a_batch_the_mesh_cannot_split_is_refused_naming_the_fix():
    """global_batch (what Trainer.to_device places every batch with) refuses rows that the data
    parallelism does not divide, in one line saying what to change (jax's own error named neither)."""
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    with pytest.raises(ValueError, match=r"^the global batch has 6 rows, which the mesh's 8-way data parallelism "
                                         r"\(data x fsdp\) cannot split evenly; make data.batch_size a multiple"):
        global_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)
    assert global_batch({"input_ids": np.zeros((8, 4), np.int32)}, mesh)["input_ids"].shape == (8, 4)


def test_simulated_devices_get_threads_for_concurrent_collectives():
    """Eight simulated devices on a small machine: the CPU client's pool gets four threads a device
    (with one a device, a step running two all-reduces at once aborted the 8-device chat recipe
    test in a rendezvous); a user's PJRT_NPROC, one device or no flag leave the environment alone."""
    env = {"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=8"}
    threads_for_simulated_devices(env)
    assert env["PJRT_NPROC"] == str(max(os.cpu_count() or 1, 32))
    mine = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"}
    threads_for_simulated_devices(mine)
    assert mine["PJRT_NPROC"] == "12"
    for flags in ("--xla_force_host_platform_device_count=1", "", None):
        env = {} if flags is None else {"XLA_FLAGS": flags}
        threads_for_simulated_devices(env)
        assert "PJRT_NPROC" not in env
    # A child of an 8-device process that asks for one device: jaxtune's value goes, the user's stays.
    parent = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    threads_for_simulated_devices(parent)
    child = {**parent, "XLA_FLAGS": ""}
    threads_for_simulated_devices(child)
    assert "PJRT_NPROC" not in child and SET_BY_JAXTUNE not in child
    child = {**parent, "XLA_FLAGS": "", "PJRT_NPROC": "3"}
    threads_for_simulated_devices(child)
    assert child["PJRT_NPROC"] == "3"
    grandchild = dict(parent)  # the same 8 devices: sized again, as for the parent
    threads_for_simulated_devices(grandchild)
    assert grandchild == parent
    assert int(os.environ["PJRT_NPROC"]) >= 4 * jax.device_count()  # this test process (conftest)


def test_frozen_leaves_get_no_update_and_no_optimizer_state(llama):
    planned = _planned(llama)
    trainable, frozen = partition(planned.params, planned.labels)
    assert "embed_tokens" not in trainable and "embed_tokens" in frozen
    optimizer, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2), 10)
    state = [x for x in jax.tree.leaves(optimizer.init(trainable)) if x.ndim > 0]  # scalars are step counters
    assert len(state) == 2 * len(jax.tree.leaves(trainable))  # Adam's mu and nu, per trainable leaf only
    assert sum(x.size for x in state) == 2 * sum(x.size for x in jax.tree.leaves(trainable))


def test_non_finite_loss_is_reported(llama):
    planned = _planned(llama, freeze="nothing-frozen")
    params = jax.tree.map(lambda x: x, planned.params)
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(jnp.nan)
    planned = Planned(planned.module, params, planned.labels)
    trainable, frozen = partition(planned.params, planned.labels)
    optimizer, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2), 10)
    step = jax.jit(make_train_step(make_loss_fn(planned.module, "lm"), optimizer))
    _, _, metrics = step(trainable, frozen, optimizer.init(trainable), lm_batch(2, 8), jax.random.key(0))
    assert not bool(metrics["finite"]) and not bool(metrics["grad_finite"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_all_finite_finds_every_non_finite_value_and_nothing_else(dtype):
    """The update guard's check (max magnitude per leaf), against numpy's isfinite on each element."""
    big = float(jnp.finfo(dtype).max)
    ok = {"w": jnp.full((3, 5), big, dtype), "b": -jnp.full((7,), big, dtype), "steps": jnp.arange(4),
          "empty": jnp.zeros((0, 3), dtype), "tiny": jnp.full((2,), jnp.finfo(dtype).tiny, dtype)}
    check = jax.jit(all_finite)
    assert bool(check(ok)) and bool(check({})) and bool(check({"n": jnp.arange(3)}))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for leaf, at in (("w", (2, 4)), ("b", (0,)), ("tiny", (1,))):
            tree = {**ok, leaf: ok[leaf].at[at].set(bad)}
            assert not np.isfinite(np.asarray(tree[leaf], np.float32)).all()
            assert not bool(check(tree)), (bad, leaf)


def test_classification_loss_ignores_fill_rows(tmp_path):
    tiny_hf_model("BertForSequenceClassification", tmp_path, num_labels=3)
    model = hf.load_pretrained(tmp_path)
    loss_fn = make_loss_fn(model.module, "classification")
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 96, (4, 6)).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": np.ones((4, 6), np.int32), "positions": np.tile(np.arange(6), (4, 1)),
             "token_type_ids": np.zeros((4, 6), np.int32), "labels": np.array([0, 2, 1, 0], np.int32)}
    filled = {k: v.copy() for k, v in batch.items()}
    filled["segment_ids"][2:] = 0
    total, weight, _ = loss_fn(model.params, filled, jax.random.key(0), True)
    head = {k: v[:2] for k, v in batch.items()}
    total2, weight2, _ = loss_fn(model.params, head, jax.random.key(0), True)
    assert float(weight) == 2.0 == float(weight2)
    np.testing.assert_allclose(float(total), float(total2), rtol=1e-6)


def test_mixed_precision_keeps_trainable_fp32_and_frozen_bf16(tmp_path):
    from jaxtune import tuning

    tiny_hf_model("LlamaForCausalLM", tmp_path)
    batch = lm_batch(4, 16)
    losses = {}
    for compute in ("float32", "bfloat16"):
        base = hf.load_pretrained(tmp_path, compute_dtype=compute)
        tuned = tuning.apply_plan(base, tuning.lora(rank=4, alpha=8),
                                  frozen_dtype=jnp.bfloat16 if compute == "bfloat16" else None)
        trainable, losses[compute], _ = _run(Planned(tuned.module, tuned.params, tuned.labels), [batch] * 3, lr=1e-2)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))  # master weights stay fp32
        _, frozen = partition(tuned.params, tuned.labels)
        kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(frozen) if "kernel" in jax.tree_util.keystr(p)]
        assert all(x.dtype == (jnp.bfloat16 if compute == "bfloat16" else jnp.float32) for x in kernels)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]  # it trains
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)  # bf16 matmuls: ~1% of fp32


def test_a_large_leaf_a_mesh_axis_does_not_divide_is_reported(caplog):
    """The module promised that an axis dropped for a big leaf is reported, not done silently: GPT-2's
    50257-row embedding on tensor=8 was held whole on every device without a word."""
    from jaxtune.training import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, tensor=8))
    params = {"wte": {"embedding": jax.ShapeDtypeStruct((50257, 768), jnp.float32)},
              "small": {"embedding": jax.ShapeDtypeStruct((129, 64), jnp.float32)}}
    with caplog.at_level("WARNING"):
        specs = sharding.param_specs(params, mesh)
    assert specs["wte"]["embedding"] == jax.sharding.PartitionSpec(None, "fsdp")  # fsdp=1 here: whole
    assert "wte/embedding [50257, 768] is not split over mesh axis tensor: 50257 is not a multiple of tensor=8" \
        in caplog.text
    assert "small" not in caplog.text  # tiny leaves on many devices are expected


def test_the_lm_head_projects_only_the_positions_the_answer_index_lists(llama):
    """With the loader's answer index (each row's supervised positions) the LM loss projects those
    alone: the same loss and gradients as over every position, for fewer flops."""
    from jaxtune.data.packing import ANSWER_INDEX, answer_index

    batch = lm_batch(4, 64, seed=3)
    batch["loss_weights"][:, : 3 * 64 // 4] = 0  # a prompt: a quarter of each row is answer
    indexed = {**batch, ANSWER_INDEX: answer_index(batch["loss_weights"])}
    assert indexed[ANSWER_INDEX].shape == (4, 16)
    loss_fn = make_loss_fn(llama.module, "lm")

    def mean_loss(params, b):
        total, weight, _ = loss_fn(params, b, jax.random.key(0), True)
        return total / weight

    grad = jax.jit(jax.value_and_grad(mean_loss))
    (full, full_grads), (answers, answer_grads) = grad(llama.params, batch), grad(llama.params, indexed)
    np.testing.assert_allclose(float(answers), float(full), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), answer_grads, full_grads)

    flops = {name: jax.jit(mean_loss).lower(llama.params, b).compile().cost_analysis()["flops"]
             for name, b in (("full", batch), ("answers", indexed))}
    # The head's forward alone over the 48 positions a row the index skips, 4 rows, at 2 * D * V flops each.
    cfg = llama.module.cfg
    assert flops["full"] - flops["answers"] >= 4 * 48 * 2 * cfg.hidden_size * cfg.vocab_size
