"""The scanned layer stack: runs of identically planned layers are scans apart, frozen runs stay
free (no gradient, no optimizer state), and the scanned model computes what the unrolled one does."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import tuning
from jaxtune.models import stacking
from jaxtune.models.decoder import UNROLL_AUTO_LAYERS, Decoder, DecoderConfig
from jaxtune.models.hf import FAMILIES, Pretrained
from jaxtune.models.kv_cache import init_cache
from jaxtune.training.optim import OptimizerConfig, build_optimizer
from jaxtune.training.sharding import MeshConfig, make_mesh, param_shardings, param_specs
from jaxtune.training.step import make_loss_fn, make_train_step

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=8, unroll_layers=False)
RANK = 4
IDS = np.random.RandomState(0).randint(1, 64, (2, 8)).astype(np.int32)
BATCH = {"input_ids": IDS, "targets": np.roll(IDS, -1, axis=1), "loss_weights": np.ones((2, 8), np.float32),
         "segment_ids": np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)}


@pytest.fixture(scope="module")
def unrolled_and_scanned():
    """The same random weights as an unrolled (per-layer) and a scanned model."""
    cfg = dataclasses.replace(CFG, scan_layers=False)
    module = Decoder(cfg)
    logical = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    scanned = Decoder(CFG)
    return (Pretrained(cfg, module, logical, {}, "random", "LlamaForCausalLM"),
            Pretrained(CFG, scanned, stacking.stack(logical, CFG.layer_runs), {}, "random", "LlamaForCausalLM"))


def _grads(tuned: tuning.Tuned) -> tuple[jax.Array, dict]:
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    loss = make_loss_fn(tuned.module, "lm")

    def mean_loss(t: dict) -> jax.Array:
        total, weight, _ = loss(tuning.combine(t, frozen), BATCH, jax.random.key(0), True)
        return total / weight

    return jax.value_and_grad(mean_loss)(trainable)


def test_partly_frozen_stack_keeps_frozen_layers_free(unrolled_and_scanned):
    unrolled, scanned = unrolled_and_scanned
    plan = tuning.lora(rank=RANK, blocks="last:2") + tuning.train(kinds=["norms"], blocks=[3])
    tuned = tuning.apply_plan(scanned, plan)
    # Three runs: frozen layers 0-1, LoRA layer 2, LoRA + trained norms layer 3.
    assert tuned.config.layer_groups == (2, 1, 1)
    assert {k for k in tuned.params if k.startswith("layers")} == {"layers_0-1", "layers_2-2", "layers_3-3"}
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    assert "layers_0-1" not in trainable and "layers_0-1" in frozen

    # Optimizer state (AdamW: two float32 moments per trainable scalar) counted against the closed form.
    c = CFG
    linears = [(c.hidden_size, c.num_heads * c.head_dim), (c.hidden_size, c.num_kv_heads * c.head_dim),
               (c.hidden_size, c.num_kv_heads * c.head_dim), (c.num_heads * c.head_dim, c.hidden_size),
               (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
               (c.intermediate_size, c.hidden_size)]
    n_trainable = 2 * sum(RANK * (i + o) for i, o in linears) + 2 * c.hidden_size  # + layer 3's two norms
    assert tuning.count(trainable) == n_trainable
    optimizer, _ = build_optimizer(OptimizerConfig(), 10)
    state = jax.eval_shape(optimizer.init, trainable)
    moment_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)
    assert moment_bytes == 2 * 4 * n_trainable

    # Gradients of the scanned model equal the unrolled model's, layer by layer.
    loss, grads = _grads(tuned)
    ref_loss, ref_grads = _grads(tuning.apply_plan(unrolled, plan))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert set(stacking.unstack(grads)) == set(ref_grads) == {"layers_2", "layers_3"}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 stacking.unstack(grads), ref_grads)


def test_unrolled_program_computes_what_the_loop_does(unrolled_and_scanned):
    """``unroll_layers``: the same stacked params run as a loop or unrolled give the same loss and
    gradients (a partly planned stack of three runs) and the same cached decoding; only the loop
    compiles to a while loop, and "auto" unrolls a shallow stack on a single CPU device only."""
    _, scanned = unrolled_and_scanned
    plan = tuning.lora(rank=RANK, blocks="last:2") + tuning.train(kinds=["norms"], blocks=[3])
    out = {}
    for unroll in (False, True):
        cfg = dataclasses.replace(CFG, unroll_layers=unroll)
        whole = Pretrained(cfg, Decoder(cfg), scanned.params, {}, "random", "LlamaForCausalLM")  # one run of 4
        hlo = jax.jit(whole.module.apply).lower({"params": whole.params}, IDS).as_text()
        tuned = tuning.apply_plan(whole, plan)
        assert tuned.config.unrolls() is unroll and tuned.config.layer_groups == (2, 1, 1)
        trainable, frozen = tuning.partition(tuned.params, tuned.labels)
        module = Decoder(tuned.config)
        variables = {"params": tuning.combine(trainable, frozen)}
        cache = init_cache(tuned.config, 2, 12)
        positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
        prefill, cache = module.apply(variables, IDS, positions, cache, method=Decoder.decode)
        step, _ = module.apply(variables, IDS[:, :1], positions[:, :1] + 8, cache, method=Decoder.decode)
        out[unroll] = (_grads(tuned), prefill, step, hlo.count("stablehlo.while"))
    (loss, grads), prefill, step, loops = out[False]
    (loss_u, grads_u), prefill_u, step_u, loops_u = out[True]
    assert (loops, loops_u) == (1, 0)
    np.testing.assert_allclose(float(loss_u), float(loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 grads_u, grads)
    np.testing.assert_allclose(np.asarray(prefill_u), np.asarray(prefill), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step_u), np.asarray(step), atol=1e-5)

    auto = dataclasses.replace(CFG, unroll_layers="auto")
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert auto.unrolls() is single_cpu  # the suite simulates 8 devices: a mesh keeps the loop
    assert not dataclasses.replace(auto, num_layers=UNROLL_AUTO_LAYERS + 1).unrolls()
    with pytest.raises(ValueError, match=r"model.unroll_layers: expected true, false or auto, got 'yes'"):
        dataclasses.replace(CFG, unroll_layers="yes")


def test_stacking_round_trip_and_mismatched_runs():
    logical = {"layers_0": {"w": np.ones((2, 3))}, "layers_1": {"w": np.zeros((2, 3))}, "norm": {"scale": np.ones(2)}}
    physical = stacking.stack(logical, ((0, 2),))
    assert physical["layers_0-1"]["w"].shape == (2, 2, 3) and physical["norm"] is logical["norm"]
    back = stacking.unstack(physical)
    assert set(back) == set(logical) and all(np.array_equal(back[k]["w"], logical[k]["w"]) for k in ("layers_0",
                                                                                                     "layers_1"))
    labels = {"layers_0": {"w": "train"}, "layers_1": {"w": "freeze"}}
    with pytest.raises(ValueError, match=r"layers_0-1/w: layers of one run have different labels"):
        stacking.stack(labels, ((0, 2),))
    with pytest.raises(ValueError, match=r"layer_groups \(1, 2\) must be positive run lengths adding up to "
                                         r"num_layers 4"):
        dataclasses.replace(CFG, layer_groups=(1, 2))


def test_fsdp_never_gathers_a_whole_run_of_layers():
    """With params and Adam state sharded over 8 simulated devices (fsdp), the compiled step of a
    scanned model holds no all-gathered stacked weight: a layer's weights are gathered (if at all)
    inside the loop, one layer at a time, and the optimizer state stays sharded."""
    cfg = dataclasses.replace(CFG, num_layers=2)
    module = Decoder(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    tuned = tuning.apply_plan(Pretrained(cfg, module, params, {}, "random", "LlamaForCausalLM"), tuning.full())
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    rules = FAMILIES["LlamaForCausalLM"].partition_rules
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    shardings = param_shardings(trainable, mesh, rules)
    optimizer, _ = build_optimizer(OptimizerConfig(), 10)
    state = jax.eval_shape(optimizer.init, trainable)
    state_specs = param_specs(state, mesh, rules)
    # Adam's moments of a stacked kernel keep the layer axis whole and split the weight like the param.
    flat = jax.tree_util.tree_flatten_with_path(state_specs, is_leaf=lambda x: isinstance(x, P))[0]
    moments = [spec for path, spec in flat if jax.tree_util.keystr(path).endswith(
        "['layers_0-1']['mlp']['up_proj']['kernel']")]
    assert len(moments) == 2 and set(moments) == {P(None, "fsdp", "tensor")}  # mu and nu
    step = jax.jit(make_train_step(make_loss_fn(tuned.module, "lm"), optimizer))
    rows = {k: np.tile(v, (4, 1)) for k, v in BATCH.items()}
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("fsdp"))),
                         rows)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable, shardings)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), state,
                         state_specs)
    hlo = step.lower(abstract, frozen, state, batch, jax.random.key(0)).compile().as_text()
    stacked = [tuple(x.shape) for x in jax.tree.leaves(trainable) if x.ndim == 3]
    gathered = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather", hlo)
    assert stacked and not {tuple(int(d) for d in g.split(",")) for g in gathered} & set(stacked)


def test_layers_that_come_back_unchanged_rejoin_the_array_they_were_sliced_from():
    """Layers a lazy unstack gives (stacking.Layer: shape and dtype, no slice) that come back in order
    rejoin their stacked array: the array itself for a whole run, its rows for part of one (a view on
    the host), so a plan that keeps a run copies nothing; layers in another order, or eager slices, are
    stacked anew, as values. A Layer is refused as an array (no silent copy) and slices on request."""
    host = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    for whole in (host, jnp.asarray(host)):
        logical = stacking.unstack({"layers_0-3": {"w": whole}}, lazy=True)
        layer = logical["layers_2"]["w"]
        assert isinstance(layer, stacking.Layer) and (layer.shape, layer.dtype, layer.ndim, layer.size) == (
            (2, 3), np.float32, 2, 6)
        np.testing.assert_array_equal(stacking.materialize({"w": layer})["w"], host[2])
        np.testing.assert_array_equal(layer.astype(jnp.bfloat16), host[2].astype(jnp.bfloat16))
        with pytest.raises(TypeError, match="stacking.materialize"):
            np.asarray(layer)
        assert stacking.stack(logical, ((0, 4),))["layers_0-3"]["w"] is whole
        parts = stacking.stack(logical, ((0, 1), (1, 4)))
        for key, rows in ((stacking.stack_key(0, 1), [0]), (stacking.stack_key(1, 4), [1, 2, 3])):
            np.testing.assert_array_equal(parts[key]["w"], host[rows])
            assert np.shares_memory(parts[key]["w"], host) == (whole is host)
        swapped = {**logical, "layers_1": logical["layers_2"], "layers_2": logical["layers_1"]}
        eager = stacking.unstack({"layers_0-3": {"w": whole}})
        for stacked in (stacking.stack(swapped, ((0, 4),)), stacking.stack(eager, ((0, 4),))):
            assert stacked["layers_0-3"]["w"] is not whole
            assert type(stacked["layers_0-3"]["w"]) is type(whole)  # on the host, or on the device, as it was
        np.testing.assert_array_equal(stacking.stack(swapped, ((0, 4),))["layers_0-3"]["w"], host[[0, 2, 1, 3]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from helpers import tiny_hf_model

    from jaxtune.data.testing import tiny_tokenizer

    path = tmp_path_factory.mktemp("llama") / "model"
    tiny_hf_model("LlamaForCausalLM", path, num_hidden_layers=4, vocab_size=112)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_a_model_loaded_on_the_host_plans_there_and_reaches_the_device_once(llama_dir, tmp_path, monkeypatch):
    """``jaxtune.load(on_host=True)`` keeps the weights off the device; apply_plan then plans them
    there, the frozen weights of each scanned run staying views of what was loaded, to the same
    params as a plan of the model loaded on the device; and ``jaxtune train`` loads so: when its
    Trainer is made, the device holds only what the plan added (before, the base model and its
    planned copy: twice the model), and nothing at all (the adapters and the quantized weights the plan
    made were device arrays: a handful of small programs compiled per kernel shape, most of the plan's
    time on a large model)."""
    import jaxtune as jt
    from jaxtune import recipe
    from jaxtune.data.testing import write_jsonl
    from jaxtune.tuning import labels as labels_lib

    plan = jt.lora(rank=2, blocks=[2]) + jt.dora(rank=2, blocks=[3]) + jt.freeze(quantize="int8", blocks=[3])
    host = jt.load(llama_dir, on_host=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host.params))
    on_host = tuning.apply_plan(host, plan, jax.random.key(0))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host.params))
    on_device = tuning.apply_plan(jt.load(llama_dir), plan, jax.random.key(0))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device.params))  # what it added joined it there
    assert jax.tree.structure(on_host.params) == jax.tree.structure(on_device.params)
    for a, b in zip(jax.tree.leaves(on_host.params), jax.tree.leaves(on_device.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded = host.params[stacking.stack_key(0, 4)]["mlp"]["down_proj"]["kernel"]
    assert [stacking.stack_range(k) for k in on_host.params if stacking.stack_range(k)] == [
        range(0, 2), range(2, 3), range(3, 4)]
    frozen = on_host.params[stacking.stack_key(0, 2)]["mlp"]["down_proj"]["kernel"]
    adapted = on_host.params[stacking.stack_key(2, 3)]["mlp"]["down_proj"]["kernel"]
    assert on_host.labels[stacking.stack_key(0, 2)]["mlp"]["down_proj"]["kernel"] == labels_lib.FROZEN
    assert np.shares_memory(frozen, loaded) and np.shares_memory(adapted, loaded)

    held = []
    real = recipe.Trainer

    def trainer(tuned, *args, **kwargs):  # what the device holds once the model is loaded and planned
        held.append((sum(x.nbytes for x in jax.live_arrays()) - before, tuning.nbytes(tuned.params)))
        return real(tuned, *args, **kwargs)

    monkeypatch.setattr(recipe, "Trainer", trainer)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": f"a tiny text {i}"} for i in range(8)])
    del host, on_host, on_device, loaded, frozen, adapted
    before = sum(x.nbytes for x in jax.live_arrays())  # other tests' arrays
    made = recipe.trainer_for(jt.load_config(None, base={
        "model": {"path": str(llama_dir)}, "plan": [{"preset": "lora", "rank": 2}],
        "data": {"train": str(data), "kind": "text", "batch_size": 8, "max_length": 16}, "train": {"steps": 1},
        "output": {"dir": str(tmp_path / "run")}}))
    [(device_bytes, model_bytes)] = held
    adapters = tuning.nbytes(made.trainable)
    assert adapters < model_bytes / 10 and device_bytes <= 256, (device_bytes, adapters)


def test_a_plan_of_a_model_on_the_device_slices_only_what_it_changes(llama_dir, tmp_path, monkeypatch):
    """``apply_plan`` of a model loaded on the device (``jaxtune.load``'s default, the README's Python
    example) sliced every layer of each scanned run into a device copy while it planned: the device held
    the base model twice (an 8B model in bf16 would not fit a 24 GB card then). Now the layers stay
    unsliced (stacking.Layer) unless the plan computes from them, so the device holds the base once plus
    what the plan adds. A model that starts from a PEFT adapter (``model.adapter``, SFT before DPO) was
    restacked into a copy of its base after planning; now its frozen layers are the loaded arrays."""
    import dataclasses

    import jaxtune as jt

    def live() -> int:
        return sum(x.nbytes for x in jax.live_arrays())

    held, real = [], stacking.stack

    def stack(tree, runs, *old):  # where a plan's layers are all alive at once, before they are stacked back
        held.append(live())
        return real(tree, runs, *old)

    monkeypatch.setattr(stacking, "stack", stack)
    base = jt.load(llama_dir)
    key = stacking.stack_key(0, 4)
    loaded = base.params[key]["mlp"]["down_proj"]["kernel"]
    for plan in (jt.lora(rank=2), jt.lora(rank=2, blocks=[2, 3]) + jt.freeze(quantize="int8", blocks=[3])):
        held.clear()
        before = live()
        tuned = jt.apply_plan(base, plan, jax.random.key(0))
        added = tuning.nbytes(tuned.params) - tuning.nbytes(base.params)  # adapters (int8: less than none)
        # held[0]: stacking the params (then the labels); a run the plan splits is copied as it stacks, on a device
        assert held[0] - before <= max(added, 0) + tuning.nbytes(base.params) // 4 + 4096, (held[0] - before, added)
    planned = jt.apply_plan(base, jt.lora(rank=2), jax.random.key(0))
    assert planned.params[key]["mlp"]["down_proj"]["kernel"] is loaded  # the loaded array, not a copy of it

    adapter = jt.export(dataclasses.replace(planned, step=1), tmp_path / "adapter")
    with_adapter = jt.load(llama_dir, adapter=adapter)
    started = jt.apply_plan(with_adapter, jt.lora(rank=2), jax.random.key(1))
    assert started.params[key]["mlp"]["down_proj"]["kernel"] is with_adapter.params[key]["mlp"]["down_proj"]["kernel"]
    for name in ("lora_a", "lora_b"):  # and the adapter's values, from its file
        np.testing.assert_allclose(started.params[key]["mlp"]["down_proj"][name],
                                   planned.params[key]["mlp"]["down_proj"][name], rtol=1e-6)


def test_a_merged_export_computes_one_tensor_at_a_time(llama_dir, tmp_path, monkeypatch):
    """A merged export (``export: merged``, GGUF) of a model on the device sliced every layer into a device
    copy, dequantized a quantized base whole, on the device, and merged every adapted kernel before writing
    a tensor: an 8B QLoRA run's export at the end of training needed its full-precision model beside the
    trained state. Now each tensor is sliced, dequantized or merged as it is written; the files are the same
    (checked against the dequantized model's own export)."""
    import dataclasses

    from safetensors.numpy import load_file

    import jaxtune as jt
    from jaxtune.models import hf
    from jaxtune.models.quant import dequantize_tree

    tuned = dataclasses.replace(jt.apply_plan(jt.load(llama_dir), jt.freeze(quantize="int8") + jt.lora(
        rank=2, targets="all-linear"), jax.random.key(0)), step=1)
    full = tuning.nbytes(dequantize_tree(tuned.params))  # the model in full precision, adapters aside
    held, real = [], hf._host_tensor

    def host_tensor(leaf, *args):
        held.append(sum(x.nbytes for x in jax.live_arrays()) - before)
        return real(leaf, *args)

    monkeypatch.setattr(hf, "_host_tensor", host_tensor)
    before = sum(x.nbytes for x in jax.live_arrays())
    out = jt.export(tuned, tmp_path / "merged", format="merged")
    assert held and max(held) < full / 4, (max(held), full)
    monkeypatch.setattr(hf, "_host_tensor", real)
    reference = dataclasses.replace(tuned, params=dequantize_tree(tuned.params))
    ours, theirs = (load_file(d / "model.safetensors")
                    for d in (out, jt.export(reference, tmp_path / "reference", format="merged")))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
