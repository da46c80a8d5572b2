"""Memory policies, the compiled step's memory report, AOT capacity planning and per-layer FSDP.

Every policy is checked against ``remat: none`` (the same loss and gradients: rematerialisation
changes what is stored, never what is computed), ``block`` against ``none`` by the compiled
program's temporaries, the memory report against XLA's own count and the plan against the step
the Trainer compiles, and FSDP's gathering by the compiled HLO of a 32-layer scanned stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxtune import tuning
from jaxtune.models.decoder import Decoder, DecoderConfig
from jaxtune.models.layers import REMAT_POLICIES
from jaxtune.models.load import ModelConfig
from jaxtune.training import memory
from jaxtune.training.sharding import MeshConfig

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
            head_dim=8)


def _lm_loss(module, params, ids):
    logits = module.apply({"params": params}, ids[:, :-1]).astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()


@pytest.fixture(scope="module")
def reference():
    """A tiny scanned Llama, its params, a batch, and ``remat: none``'s loss and gradients."""
    cfg = DecoderConfig(**TINY)
    ids = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
    params = Decoder(cfg).init(jax.random.key(0), ids)["params"]
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _lm_loss(Decoder(cfg), p, ids)))(params)
    return cfg, params, ids, loss, grads


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_same_loss_and_gradients(reference, policy):
    cfg, params, ids, loss, grads = reference
    module = Decoder(dataclasses.replace(cfg, remat=policy))
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: _lm_loss(module, p, ids)))(params)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, grads)


def test_an_unknown_policy_names_the_choices(reference):
    cfg, params, ids, *_ = reference
    with pytest.raises(ValueError, match="remat 'all' is not a policy; choose one of none, block, dots, "
                                         "dots_no_batch, offload"):
        Decoder(dataclasses.replace(cfg, remat="all")).apply({"params": params}, ids)


def test_offload_on_cpu_is_reported_not_ignored():
    assert "nothing is offloaded" in memory.offload_note("offload", "cpu")
    assert memory.offload_note("offload", "gpu") is None and memory.offload_note("block", "cpu") is None


def test_block_remat_lowers_the_compiled_temporaries():
    """A deep, narrow model on long rows: activations dominate, and ``block`` keeps one input per
    layer where ``none`` keeps every intermediate (attention scores included) of every layer."""
    cfg = DecoderConfig(**{**TINY, "num_layers": 8})
    ids = jnp.zeros((2, 129), jnp.int32)
    params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), ids[:, :4])["params"])

    def temporaries(policy: str) -> int:
        module = Decoder(dataclasses.replace(cfg, remat=policy))
        compiled = jax.jit(jax.grad(lambda p: _lm_loss(module, p, ids))).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, block = temporaries("none"), temporaries("block")
    assert block < 0.5 * none, (block, none)


# ----------------------------------------------------------------------------- the report and the plan


def _config_only_llama(path, layers: int, **fields) -> None:
    """A model directory with only a config.json (no weights): all memory planning reads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, **fields}))


def test_step_memory_splits_xla_arguments_by_what_they_are():
    trainable = {"w": jnp.ones((8, 4))}
    frozen = {"e": jnp.ones((16, 4), jnp.bfloat16)}
    opt_state = (jnp.zeros((8, 4)), jnp.zeros((8, 4)))
    batch = jnp.ones((2, 3), jnp.int32)

    def step(t, f, o, b):
        g = t["w"] * f["e"][:8].astype(jnp.float32).sum() * b.sum()
        return {"w": t["w"] - g}, (o[0] + g, o[1] + g * g)

    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(trainable, frozen, opt_state, batch).compile()
    report = memory.step_memory(compiled, trainable, frozen, opt_state)
    stats = compiled.memory_analysis()
    assert (report.params, report.optimizer, report.batch) == (8 * 4 * 4 + 16 * 4 * 2, 2 * 8 * 4 * 4, 2 * 3 * 4)
    assert report.params + report.optimizer + report.batch == stats.argument_size_in_bytes
    assert report.total == (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
                            - stats.alias_size_in_bytes)
    assert report.backend == "cpu" and report.devices == 1
    assert re.match(r"memory per device \(1 device\): params .* GiB, optimizer .* total .* \(cpu, a prediction",
                    report.line())


def test_fsdp_gathers_one_layer_at_a_time(tmp_path):
    """32 scanned layers, LoRA, fsdp over 8 devices, ``remat: block`` (as configs/fsdp8.yaml):
    every gather of a frozen kernel is one layer's (no layer axis) and sits in a while loop's
    body, never in the entry computation, and the step's temporaries hold about two layers'
    gathered kernels, not 32 (measured: 2.0 MB against 0.98 MB per layer; 110 MB when XLA was
    left to replicate the activations instead, see layers.shard_rows)."""
    _config_only_llama(tmp_path / "llama", 32)
    compiled, trainable, frozen, opt_state = memory.compile_planned_step(
        ModelConfig(path=str(tmp_path / "llama"), remat="block"), tuning.lora(4, targets=["q_proj"]), batch_size=8,
        seq_len=32, mesh=MeshConfig(data=1, fsdp=8))
    computations = [c for c in re.split(r"\n(?=\S)", compiled.as_text())  # one HLO computation per block
                    if re.match(r"(?:ENTRY )?%[\w.\-]+ ", c)]
    bodies = {m.group(1) for c in computations for m in re.finditer(r"body=%([\w.\-]+)", c)}

    @functools.cache
    def called(name: str) -> frozenset[str]:  # a loop body and the computations it calls (fusions, nested)
        text = next(c for c in computations if re.match(rf"(ENTRY )?%{re.escape(name)} ", c))
        return frozenset({name} | {n for callee in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", text)
                                   for n in called(callee)})

    in_loops = set().union(*(called(b) for b in bodies))
    kernel_gathers = []  # (computation, gathered shape) of every gather of a layer's weight
    for c in computations:
        name = re.match(r"(?:ENTRY )?%([\w.\-]+)", c).group(1)
        for shape in re.findall(r"= f32\[([\d,]+)\][^\n]* all-gather\(", c):
            dims = tuple(int(d) for d in shape.split(","))
            if sorted(dims[-2:]) in ([128, 128], [64, 128], [128, 512]):  # q/o, k/v, gate/up/down
                kernel_gathers.append((name, dims))
    assert kernel_gathers, "no layer weight is gathered: FSDP is not sharding the layers"
    assert all(len(dims) == 2 and name in in_loops for name, dims in kernel_gathers), kernel_gathers
    one_layer = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 512)  # bytes of a layer's gathered kernels
    report = memory.step_memory(compiled, trainable, frozen, opt_state)
    assert report.temporaries < 3 * one_layer, (report.temporaries, one_layer)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny LoRA chat recipe on a random Llama, trained for one step (no evaluation)."""
    from helpers import tiny_hf_model

    from jaxtune.data.testing import tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("memory")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("alpha", "beta", "gamma", "delta") * 8]
    write_jsonl(root / "train.jsonl", rows)
    config = {"model": {"path": str(root / "llama"), "remat": "block"},
              "plan": [{"preset": "lora", "rank": 4}],
              "data": {"train": str(root / "train.jsonl"), "kind": "chat", "max_length": 32, "batch_size": 8},
              "train": {"steps": 1, "log_every": 1, "progress": False, "compile_cache": False},
              "output": {"dir": str(root / "run"), "export": "none"}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    return root


def _cli(*argv) -> tuple[int, str, str]:
    from jaxtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_train_reports_the_step_memory_and_plan_memory_predicts_it(recipe):
    """``jaxtune train`` logs the compiled step's memory per device and keeps it in status.json;
    ``jaxtune plan-memory`` on the same recipe compiles the same program from config.json alone
    and reports the same bytes (the batch aside: the loader's batch has its own fields)."""
    code, _, err = _cli("train", recipe / "recipe.yaml")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("memory per device"))
    assert "params" in line and "optimizer" in line
    assert line.endswith("(cpu, a prediction of the CPU compiler, for rows of 32 tokens)")
    trained = json.loads((recipe / "run" / "status.json").read_text())["memory"]
    code, out, _ = _cli("status", recipe / "run")
    assert code == 0 and f"memory:      {trained['GiB']:.3g} GiB per device (8 cpu device(s); params" in out
    code, out, err = _cli("plan-memory", recipe / "recipe.yaml", "--json")
    assert code == 0, err
    planned = json.loads(out)
    for field in ("params", "optimizer", "temporaries", "devices", "backend"):
        assert planned[field] == trained[field], (field, planned, trained)
    code, out, _ = _cli("plan-memory", recipe / "recipe.yaml", "mesh.data=1", "mesh.fsdp=8")
    assert code == 0 and out.startswith("memory per device (8 devices)")
    code, _, err = _cli("plan-memory", recipe / "recipe.yaml", "data.batch_size=6")
    assert code == 2 and "jaxtune: error" in err


def test_plan_memory_builds_the_model_and_batch_that_train_runs(recipe, tmp_path):
    """plan-memory compiled another program than train's for ``model.unroll_layers`` (19% fewer
    temporaries with the loop kept) and for packed classification (a label per row, not per segment):
    its model config is jaxtune.load's, and its batch the loader's."""
    from jaxtune.data import make_loader, read_source
    from jaxtune.data.pipeline import LoaderConfig
    from jaxtune.data.testing import tiny_tokenizer, write_jsonl
    from jaxtune.models.load import load

    for unroll in (False, True):
        config = ModelConfig(path=str(recipe / "llama"), unroll_layers=unroll, remat="block")
        assert memory.abstract_model(config).config == load(config).config
    rows = [{"text": f"t{i} " + "x" * (i % 9), "label": ["neg", "pos"][i % 2]} for i in range(16)]
    source = read_source(write_jsonl(tmp_path / "l.jsonl", rows), "classification")
    for packing in (False, True):
        data = make_loader(source, tiny_tokenizer(), LoaderConfig(batch_size=4, max_length=64, packing=packing,
                                                                  shard_index=0, shard_count=1), scan_first=False)
        planned = memory.batch_spec("classification", 4, 64, packing=packing)
        assert {k: (v.shape, np.dtype(v.dtype)) for k, v in planned.items()} == data.batch_spec()


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    """A tiny random Llama and preference pairs (a margin on every other pair: only reward reads it)."""
    from helpers import tiny_hf_model

    from jaxtune.data.testing import synthetic_preference_rows, tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("preference_memory")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    rows = [{**row, "margin": float(i % 2)} for i, row in enumerate(synthetic_preference_rows(32, seed=0))]
    write_jsonl(root / "pairs.jsonl", rows)
    return root


PREFERENCE_RECIPES = {  # name: (plan, preference section)
    "dpo_lora": ([{"preset": "lora", "rank": 4}], {"method": "dpo"}),
    "dpo_cached": ([{"preset": "lora", "rank": 4}], {"method": "dpo", "reference": "cached", "max_segments": 3}),
    "ipo_full": ([{"match": ".*", "action": "train"}], {"method": "ipo"}),  # the reference holds a starting copy
    "reward": ([{"preset": "lora", "rank": 4}, {"action": "head", "task": "regression"}], {"method": "reward"}),
}


@pytest.mark.parametrize("name", PREFERENCE_RECIPES)
def test_plan_memory_predicts_the_preference_step_that_train_compiles(preference_files, tmp_path, name):
    """A preference recipe's plan compiles the step its Trainer runs: pairs of rows, the reference
    model's forward (adapters off, or a starting copy of a full plan's leaves) or its cached
    log-probs in the batch, a reward model's head and margins. Every figure equals the trained
    step's, the batch included (the Trainer's device batch drops the host's pair bookkeeping), or
    bounds it where the step projects the answers alone (:func:`_assert_plan_equals_train`)."""
    plan, preference = PREFERENCE_RECIPES[name]
    _assert_plan_equals_train(_preference_recipe(preference_files, tmp_path, plan, preference))


def _preference_recipe(files, tmp_path, plan: list, preference: dict, **model) -> dict:
    """A one-step preference recipe on ``files``' pairs, its run in ``tmp_path / "run"``."""
    return {"model": {"path": str(files / "llama"), **model}, "plan": plan,
            "data": {"train": str(files / "pairs.jsonl"), "kind": "preference", "max_length": 32, "batch_size": 8},
            "preference": preference,
            "train": {"steps": 1, "log_every": 1, "progress": False, "compile_cache": False},
            "output": {"dir": str(tmp_path / "run"), "export": "none"}}


def _train(config: dict) -> Path:
    """``jaxtune train`` the recipe ``config`` (written beside its run directory, returned)."""
    run = Path(config["output"]["dir"])
    run.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = run.parent / f"{run.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(config))
    code, _, err = _cli("train", recipe_file)
    assert code == 0, err
    return recipe_file


def _assert_plan_equals_train(config: dict) -> None:
    """``jaxtune train`` the recipe ``config`` for its steps, then ``jaxtune plan-memory`` it: every
    figure of the plan equals the trained step's report in ``status.json``, but where the loss reads
    the loader's answer index (DPO, IPO; the pairs' answers here are shorter than half a row). The
    trained step's LM heads then project the answers alone: it takes the index as an argument and
    needs fewer temporaries, and the plan, made for rows supervised at every position (an index as
    wide as a row, which the step leaves unread), bounds it."""
    recipe_file = _train(config)
    trained = json.loads((Path(config["output"]["dir"]) / "status.json").read_text())["memory"]
    code, out, err = _cli("plan-memory", recipe_file, "--json")
    assert code == 0, err
    planned = json.loads(out)
    for field in ("params", "optimizer", "outputs", "devices", "backend", "tokens"):
        assert planned[field] == trained[field], (field, planned, trained)
    index_bytes = trained["batch"] - planned["batch"]
    if config["preference"]["method"] in ("dpo", "ipo"):
        pairs, width = config["data"]["batch_size"], trained["tokens"]
        assert 0 < index_bytes < pairs * 2 * width * 4 // trained["devices"], (planned, trained)  # int32 (B, 2, K < T)
        assert planned["temporaries"] >= trained["temporaries"], (planned, trained)
    else:
        assert index_bytes == 0 and planned["temporaries"] == trained["temporaries"], (planned, trained)


def test_plan_memory_of_dpo_from_trained_adapters_holds_their_starting_copy(preference_files, tmp_path):
    """DPO from ``model.adapter`` (trained adapters, e.g. SFT's PEFT export): the reference is that
    model, so the step holds a frozen copy of the starting adapters (the Trainer finds them trained
    by their values; the plan, which reads no weights, by ``model.adapter`` being set)."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(preference_files / "llama")
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    lora = [{"preset": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}]
    _assert_plan_equals_train(_preference_recipe(preference_files, tmp_path, lora, {"method": "dpo"},
                                                 adapter=str(tmp_path / "adapter")))



def test_the_preference_step_holds_the_lm_steps_temporaries_for_its_rows_in_unpadded_chunks(tmp_path):
    """A DPO step on B pairs is an LM step on 2B rows plus a reference forward that nothing keeps for
    the backward pass: its compiled temporaries (one device) are the LM step's on 2B rows, give or take
    the pairs' bookkeeping. 3 pairs of 30 tokens are 180 tokens: at 100 tokens a chunk the
    LM head runs two chunks of 90 (their (chunk, V) float32 logits), not two of 100 (20 padding rows)."""
    import optax

    from jaxtune.training.preference import make_preference_loss_fn
    from jaxtune.training.preference_config import PreferenceConfig
    from jaxtune.training.step import make_loss_fn, make_train_step
    from jaxtune.tuning.partition import partition

    _config_only_llama(tmp_path / "llama", 1, vocab_size=4096, hidden_size=32, intermediate_size=64)  # V >> D
    tuned = memory.abstract_plan(memory.abstract_model(ModelConfig(path=str(tmp_path / "llama"))), tuning.lora(4))
    trainable, frozen = partition(tuned.params, tuned.labels)
    optimizer = optax.sgd(0.1)
    opt_state = jax.eval_shape(optimizer.init, trainable)

    def compiled(preference, rows: int, chunk: int):
        if preference is None:
            loss_fn = make_loss_fn(tuned.module, "lm", chunk_tokens=chunk)
            batch = memory.batch_spec("lm", rows, 30)
        else:
            loss_fn = make_preference_loss_fn(tuned.module, preference, chunk_tokens=chunk)
            batch = memory.paired_batch_spec(preference, rows, 30)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        step = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=(0, 2))
        return step.lower(trainable, frozen, opt_state, batch, rng).compile()

    dpo = PreferenceConfig(method="dpo")
    step = compiled(dpo, 3, 100)
    temporaries = step.memory_analysis().temp_size_in_bytes
    assert "f32[90,4096]" in step.as_text() and "f32[100,4096]" not in step.as_text()
    # The pairs' bookkeeping (segment sums, per-pair terms) is a few floats a token; one kept hidden state of
    # the reference's forward alone would be 32 a token.
    bookkeeping = 4 * 4 * 180
    lm = compiled(None, 6, 100).memory_analysis().temp_size_in_bytes
    assert abs(temporaries - lm) <= bookkeeping, (temporaries, lm)
