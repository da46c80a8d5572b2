"""Preference tuning through the library: paired loaders, DPO runs from Python and from a recipe
(the same run), exact resume, one-line errors for mismatched configs, one copy of the base for
LoRA-DPO, a frozen starting copy for full-DPO kept out of the model, and SFT then DPO."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import yaml
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune.config import ConfigError
from jaxtune.data import LoaderConfig, evaluation_loader, training_loader
from jaxtune.data.preference import PAIR_IDS
from jaxtune.data.testing import synthetic_chat_rows, synthetic_preference_rows, tiny_tokenizer, write_jsonl
from jaxtune.training import preference_losses as pref_losses
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preference_config import PreferenceConfig, unread_margins
from jaxtune.training.preference_logprobs import paired_rows, policy_token_logprobs, segment_sums
from jaxtune.training.preference_reference import REFERENCE_KEY, reference_logprobs
from jaxtune.training.sharding import MeshConfig, make_mesh
from jaxtune.training.step import make_loss_fn, make_train_step
from jaxtune.tuning import combine, partition
from jaxtune.tuning import tuned as tuned_lib

DPO = dict(method="dpo", beta=0.5)
STEPS, BATCH, LENGTH = 8, 8, 48
OPTIMIZER = dict(learning_rate=1e-2, schedule="constant")  # constant: a run cut at step 2 has the same lr


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    return {"model": root / "llama",
            "train": write_jsonl(root / "train.jsonl", synthetic_preference_rows(32, seed=0)),
            "valid": write_jsonl(root / "valid.jsonl", synthetic_preference_rows(16, seed=1)),
            "chat": write_jsonl(root / "chat.jsonl", synthetic_chat_rows(32, seed=2, max_words=4))}


def _python_run(files: dict[str, Path], run_dir: Path, steps: int = STEPS, **trainer: object) -> jt.FitResult:
    """The Python API's DPO run (the recipe below says the same)."""
    model = jt.load(str(files["model"]))
    train, _ = jt.read(files["train"], kind="preference")
    valid, _ = jt.read(files["valid"], kind="preference")
    tuned = jt.apply_plan(model, jt.lora(rank=4, alpha=8))
    return jt.Trainer(tuned, train, valid, run_dir=run_dir, config=jt.TrainConfig(steps=steps, log_every=2),
                      data=jt.DataConfig(batch_size=BATCH, max_length=LENGTH), preference=jt.PreferenceConfig(**DPO),
                      optimizer=jt.OptimizerConfig(**OPTIMIZER), **trainer).fit()


@pytest.fixture(scope="module")
def python_run(files, tmp_path_factory) -> tuple[jt.FitResult, Path]:
    """One Python DPO run that several tests compare against (each run compiles its steps)."""
    run_dir = tmp_path_factory.mktemp("python") / "run"
    return _python_run(files, run_dir), run_dir


def _recipe(files: dict[str, Path], run_dir: Path) -> dict:
    return {"model": {"path": str(files["model"])},
            "plan": [{"preset": "lora", "rank": 4, "alpha": 8}],
            "data": {"train": str(files["train"]), "validation": str(files["valid"]), "kind": "preference",
                     "batch_size": BATCH, "max_length": LENGTH},
            "preference": DPO, "optimizer": OPTIMIZER, "train": {"steps": STEPS, "log_every": 2},
            "output": {"dir": str(run_dir), "export": "peft"}}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- data


def test_loaders_build_paired_rows_and_trim_them(files):
    source, _ = jt.read(files["train"], kind="preference")
    tokenizer = tiny_tokenizer()
    loader = training_loader(source, tokenizer, LoaderConfig(batch_size=4, max_length=64, pad_to_multiple_of=16))
    batch = next(iter(loader))
    spec = loader.batch_spec()
    assert set(batch) == set(spec)
    for key, value in batch.items():
        (b, two, length), dtype = spec[key]
        assert value.shape[:2] == (b, two) == (4, 2) and value.dtype == dtype
        assert value.shape[2] % 16 == 0 and value.shape[2] <= length == 64
    seg = batch["segment_ids"]
    assert seg.max() > 1  # packing is on by default: several pairs per row
    assert np.array_equal(seg[:, 0].max(-1), seg[:, 1].max(-1))  # pair s is segment s on both sides
    assert (batch["loss_weights"][:, 0].sum() > 0) and (batch["loss_weights"][:, 1].sum() > 0)
    # Evaluation fills its last batch with empty pairs (all segments 0), shapes unchanged.
    batches = list(evaluation_loader(source, tokenizer, LoaderConfig(max_length=64, packing=False), 5))
    assert len(batches) == 7 and all(x["input_ids"].shape == (5, 2, 64) for x in batches)
    assert (batches[-1]["segment_ids"][2:] == 0).all() and (batches[-1]["segment_ids"][:2] > 0).any()
    with pytest.raises(ValueError, match="^data.truncation: 'split'"):
        training_loader(source, tokenizer, LoaderConfig(truncation="split"))


# ----------------------------------------------------------------------------- runs


def test_python_dpo_run_learns_and_reports(python_run):
    result, run_dir = python_run
    before, after = result.before, result.after
    assert before["loss"] == pytest.approx(np.log(2), abs=1e-5)  # fresh adapters: policy == reference
    assert before["rewards/accuracy"] == 0 and before["rewards/margin"] == 0
    assert after["rewards/accuracy"] > 0.8 and after["rewards/margin"] > 0.5 and after["loss"] < 0.5
    assert after["logps/chosen"] - after["logps/rejected"] > before["logps/chosen"] - before["logps/rejected"]
    train = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert train[-1]["rewards/accuracy"] > train[0]["rewards/accuracy"]  # reward accuracy up on train data
    assert all({"rewards/margin", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(r)
               for r in train)
    assert "| rewards/accuracy | 0.0000 |" in result.report
    assert "log 2" in result.report  # the report says why the base scores 0 there


def test_a_preference_recipe_is_the_same_run_as_the_python_code(files, python_run, tmp_path):
    python, python_dir = python_run
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(_recipe(files, tmp_path / "recipe")))
    recipe = jt.finetune(jt.load_config(tmp_path / "dpo.yaml"))
    assert recipe.steps == python.steps == STEPS
    assert recipe.before == pytest.approx(python.before, rel=1e-6, abs=1e-7)
    assert recipe.after == pytest.approx(python.after, rel=1e-6, abs=1e-7)
    ours = [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in _records(tmp_path / "recipe")]
    theirs = [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in _records(python_dir)]
    assert len(ours) == len(theirs) > 4  # train records every 2 steps, evaluations at the end
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7) for k in a)
    config = json.loads((recipe.export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # the DPO-trained adapter, as PEFT loads it


def test_a_stopped_preference_run_continues_exactly(files, python_run, tmp_path, caplog):
    """Stopped at step 2 (train.steps=2), then continued to the full run's steps: the same params,
    metrics and progress lines as the uninterrupted run."""
    straight, straight_dir = python_run
    assert _python_run(files, tmp_path / "cut", steps=2).step == 2
    resumed = _python_run(files, tmp_path / "cut")
    assert "resumed from" in caplog.text and "reward acc" in caplog.text  # the progress line shows rewards
    assert resumed.step == straight.step == STEPS
    assert resumed.after == pytest.approx(straight.after, rel=1e-6, abs=1e-7)
    for a, b in zip(jax.tree.leaves(resumed.model.params), jax.tree.leaves(straight.model.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    ours, theirs = ([r for r in _records(d) if "loss" in r][-1] for d in (tmp_path / "cut", straight_dir))
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), key


def test_margins_that_the_method_drops_are_warned_of_once(files, tmp_path, caplog):
    """A pair's ``margin`` (TRL's reward data column) moves only a reward model's loss: DPO trains as
    without it (as TRL's DPOTrainer), so a DPO run on rows with margins says so, once, naming the
    column and the one method that reads it; rows without margins (or all 0) say nothing."""
    rows = [{**row, "margin": 1.0 + i % 3} for i, row in enumerate(synthetic_preference_rows(32, seed=0))]
    with_margins = write_jsonl(tmp_path / "margins.jsonl", rows)
    warned = "the preference data's 'margin' column is ignored: only preference.method: reward reads it"
    caplog.set_level("WARNING", logger="jaxtune")
    result = _python_run({**files, "train": with_margins}, tmp_path / "margins", steps=2)
    assert result.step == 2
    assert [r.getMessage() for r in caplog.records].count(
        warned + ", and dpo has no margin term; drop the column, or train a reward model") == 1
    caplog.clear()
    _python_run(files, tmp_path / "plain", steps=2)
    assert warned not in caplog.text
    margins = {"margins": np.ones((2, 2, 8), np.float32)}
    assert unread_margins(margins, PreferenceConfig(method="reward")) is None  # its loss reads them
    assert "orpo has no margin term" in unread_margins(margins, PreferenceConfig(method="orpo"))


# ----------------------------------------------------------------------------- errors


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_mismatched_preference_configs_get_one_line_errors(files, tmp_path):
    model = jt.apply_plan(jt.load(str(files["model"])), jt.lora(rank=4, alpha=8))
    pairs, _ = jt.read(files["train"], kind="preference")
    chat, _ = jt.read(files["chat"], kind="chat")
    mesh = MeshConfig()
    with pytest.raises(ValueError) as err:
        jt.Trainer(model, pairs, run_dir=tmp_path, data=jt.DataConfig(batch_size=BATCH), mesh=mesh)
    assert _one_line(err).startswith("the data is preference pairs but no preference method is set")
    with pytest.raises(ValueError) as err:
        jt.Trainer(model, chat, run_dir=tmp_path, data=jt.DataConfig(batch_size=BATCH), mesh=mesh,
                   preference=jt.PreferenceConfig())
    assert _one_line(err).startswith("preference.method: dpo trains on preference pairs, but the data is chat")
    with pytest.raises(ValueError) as err:
        jt.PreferenceConfig("ipo", label_smoothing=0.1)
    assert _one_line(err).startswith("preference.label_smoothing: applies to dpo and simpo, not ipo")
    batches = list(itertools.islice(training_loader(pairs, model.tokenizer, jt.DataConfig(batch_size=BATCH)), 2))
    with pytest.raises(ValueError) as err:  # a cached pair is found by its index in a jaxtune.read source
        jt.Trainer(model, batches, run_dir=tmp_path, mesh=mesh, preference=jt.PreferenceConfig(reference="cached"),
                   config=jt.TrainConfig(steps=2))
    assert _one_line(err).startswith("preference.reference: cached finds each pair's reference log-probs by its "
                                     "index in the source, so the data must come from jaxtune.read")

    recipe = _recipe(files, tmp_path / "run")
    cases = [({"preference": {"method": "kto"}}, "preference.method: 'kto' is unknown; choose one of dpo, ipo"),
             ({"preference": {"method": "dpo", "betta": 0.1}}, "unknown key 'betta' in preference"),
             ({"preference": None}, "preference: data of kind preference needs a preference section"),
             ({"data": {**recipe["data"], "train": str(files["chat"]), "kind": "chat", "validation": None}},
              "preference: method dpo trains on preference pairs, but data.kind is chat"),
             ({"data": {**recipe["data"], "truncation": "split"}}, "data.truncation: 'split'")]
    for change, expected in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**recipe, **change}))
        with pytest.raises(ConfigError) as err:
            jt.finetune(jt.load_config(tmp_path / "bad.yaml"))
        assert expected in _one_line(err), (change, str(err.value))


# ----------------------------------------------------------------------------- the reference model


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_lora_dpo_holds_one_copy_of_the_base_and_full_dpo_a_starting_copy(files, tmp_path):
    """Counts the bytes the compiled train step takes as arguments, as tests/test_preference.py does
    for the bare step: with LoRA the base enters once (the frozen part), with full fine-tuning the
    reference adds one starting copy of the trained weights, which the model and checkpoints lack."""
    model = jt.load(str(files["model"]))
    pairs, _ = jt.read(files["train"], kind="preference")
    one = make_mesh(MeshConfig(), jax.devices()[:1])
    data = jt.DataConfig(batch_size=4, max_length=LENGTH)
    batch = next(iter(training_loader(pairs, model.tokenizer, data)))
    sizes = {}
    for name, plan in (("lora", jt.lora(rank=4, alpha=8)), ("full", jt.full())):
        trainer = jt.Trainer(jt.apply_plan(model, plan), pairs, run_dir=tmp_path / name, data=data, mesh=one,
                             preference=jt.PreferenceConfig(**DPO), config=jt.TrainConfig(steps=1, progress=False),
                             optimizer=optax.sgd(0.1))
        step_args = (trainer.trainable, trainer.frozen, trainer.opt_state, trainer.to_device(batch),
                     jax.random.key(0))
        memory = trainer.train_step.lower(*step_args).compile().memory_analysis()
        assert memory.argument_size_in_bytes == _nbytes(step_args[:4])
        sizes[name] = (memory.argument_size_in_bytes, _nbytes(trainer.trainable), _nbytes(trainer.frozen))
        assert REFERENCE_KEY not in trainer.params  # the model (what export writes) has no reference copy
        if name == "full":
            trainer.fit()
            saved = {p.name for p in (tmp_path / name / "checkpoints" / "1").iterdir()}
            assert not any("frozen" in s or "reference" in s for s in saved)
    base = _nbytes(model.params)
    lora_args, lora_trainable, lora_frozen = sizes["lora"]
    assert lora_frozen < base + lora_trainable  # the base once (plus the scalar lora_scale leaves)
    assert lora_args < 1.5 * base  # no second copy of the base anywhere in the step's inputs
    full_args, full_trainable, full_frozen = sizes["full"]
    assert full_trainable == base and full_frozen == base  # the frozen part is the starting copy alone
    assert full_args >= 2 * base  # trainable + the reference's starting copy


def test_a_cached_reference_run_equals_the_in_step_reference_run_without_its_frozen_copy(files, tmp_path):
    """Full-parameter DPO with the reference log-probs computed once before training (by example,
    found again through pair_ids in shuffled, packed batches) trains exactly as the run whose step
    runs the reference model, and its step holds no starting copy of the weights."""
    model = jt.load(str(files["model"]))
    train, _ = jt.read(files["train"], kind="preference")
    valid, _ = jt.read(files["valid"], kind="preference")
    one = make_mesh(MeshConfig(), jax.devices()[:1])
    data = jt.DataConfig(batch_size=4, max_length=LENGTH)
    batch = next(iter(training_loader(train, model.tokenizer, data)))
    args, trainers = {}, {}
    for reference in ("model", "cached"):
        start = jt.apply_plan(jt.load(str(files["model"])), jt.full())  # its own arrays: fit donates them
        trainer = jt.Trainer(start, train, valid, run_dir=tmp_path / reference, data=data,
                             mesh=one, preference=jt.PreferenceConfig(**DPO, reference=reference),
                             config=jt.TrainConfig(steps=3, log_every=1, progress=False),
                             optimizer=jt.OptimizerConfig(learning_rate=1e-3, schedule="constant"))
        step_args = (trainer.trainable, trainer.frozen, trainer.opt_state,
                     trainer.to_device(batch, "train"), jax.random.key(0))
        memory = trainer.train_step.lower(*step_args).compile().memory_analysis()
        assert memory.argument_size_in_bytes == _nbytes(step_args[:4])
        args[reference], trainers[reference] = step_args, trainer
    assert "reference_logps" in args["cached"][3] and PAIR_IDS not in args["cached"][3]
    assert REFERENCE_KEY not in trainers["cached"].frozen  # no starting copy in the step ...
    assert _nbytes(trainers["model"].frozen[REFERENCE_KEY]) == _nbytes(model.params)  # ... which the other has
    # The cache's numbers are the in-step reference's (here at the start, where the policy is the reference).
    np.testing.assert_allclose(np.asarray(args["cached"][3]["reference_logps"]),
                               _answer_logps(model.module, model.params, batch), rtol=1e-6, atol=1e-5)
    results = {name: trainer.fit() for name, trainer in trainers.items()}
    steps = {name: [r for r in _records(tmp_path / name) if "loss" in r] for name in results}
    assert [r["step"] for r in steps["cached"]] == [r["step"] for r in steps["model"]] == [1, 2, 3]
    for ours, theirs in zip(steps["cached"], steps["model"], strict=True):
        for key in ("loss", "rewards/margin", "rewards/chosen", "logps/chosen"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (ours["step"], key)
    assert steps["model"][-1]["loss"] < steps["model"][0]["loss"]  # it trains, so the reference matters
    assert results["cached"].after == pytest.approx(results["model"].after, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError) as err:
        trainers["cached"].evaluate(valid)
    assert _one_line(err).startswith("preference.reference: cached holds reference log-probs of the training")
    with pytest.raises(ValueError) as err:
        jt.PreferenceConfig("simpo", reference="cached")
    assert _one_line(err).startswith("preference.reference: simpo needs no reference model")


# ----------------------------------------------------------------------------- SFT then DPO


def _answer_logps(module, params, batch) -> np.ndarray:
    """Summed answer log-probs per pair and side, ``(B, 2, S)``, of the model ``module``/``params``."""
    rows = paired_rows(batch)
    lp = policy_token_logprobs(module, params, rows)
    sums = segment_sums(lp * rows["loss_weights"], rows["segment_ids"], LENGTH // 2)
    return np.asarray(sums).reshape(batch["targets"].shape[0], 2, -1)


def test_sft_then_dpo_as_two_recipes_with_the_sft_model_as_reference(files, tmp_path):
    """SFT (chat, LoRA, PEFT export), then DPO from ``model.adapter: <the SFT run>``: DPO starts
    from the SFT adapters and its reference model is the SFT model (base + SFT adapters, frozen):
    the reference log-probs equal the SFT model's own, so the DPO loss starts at exactly log 2."""
    sft_recipe = {**_recipe(files, tmp_path / "sft"), "preference": None, "train": {"steps": 2},
                  "data": {"train": str(files["chat"]), "kind": "chat", "batch_size": BATCH, "max_length": LENGTH}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_recipe))
    sft = jt.finetune(jt.load_config(tmp_path / "sft.yaml"))
    assert sft.export == tmp_path / "sft" / "export"
    dpo_recipe = _recipe(files, tmp_path / "dpo")
    dpo_recipe.update(model={"path": str(files["model"]), "adapter": str(tmp_path / "sft")},
                      train={"steps": 2, "log_every": 1})
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo_recipe))
    trainer = jt.open_run(tmp_path / "dpo.yaml", restore=False)  # the DPO run's trainer, before training
    # It starts from the SFT adapters ...
    sft_adapters, _ = partition(sft.model.params, sft.model.labels)
    for a, b in zip(jax.tree.leaves(trainer.trainable), jax.tree.leaves(sft_adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and its reference is the SFT model: the frozen starting adapters over the shared base.
    pairs, _ = jt.read(files["train"], kind="preference")
    data = jt.DataConfig(batch_size=BATCH, max_length=LENGTH)
    batch = jax.tree.map(jax.numpy.asarray, next(iter(evaluation_loader(pairs, sft.model.tokenizer, data))))
    policy = combine(trainer.trainable, {k: v for k, v in trainer.frozen.items() if k != REFERENCE_KEY})
    starting = trainer.frozen[REFERENCE_KEY]
    reference = reference_logprobs(trainer.tuned.module, policy, batch, starting=starting)
    np.testing.assert_allclose(np.asarray(reference), _answer_logps(sft.model.module, sft.model.params, batch),
                               rtol=1e-6, atol=1e-5)
    base = jt.load(str(files["model"]))
    assert np.abs(_answer_logps(base.module, base.params, batch) - np.asarray(reference)).max() > 1e-3
    assert _nbytes(starting) == _nbytes(trainer.trainable) < _nbytes(base.params) / 10  # adapters only, no base copy
    trainer.close()
    dpo = jt.finetune(jt.load_config(tmp_path / "dpo.yaml"))
    assert dpo.before["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at the start
    assert dpo.state == "finished" and _records(tmp_path / "dpo")[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    # Python says the same: a trained model passed on, or jt.load(..., adapter=) with the SFT plan.
    python = jt.Trainer(sft.model, pairs, run_dir=tmp_path / "py", data=data, preference=jt.PreferenceConfig(**DPO))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(python.frozen[REFERENCE_KEY])[0]),
                                  np.asarray(jax.tree.leaves(trainer.frozen[REFERENCE_KEY])[0]))
    loaded = jt.apply_plan(jt.load(str(files["model"]), adapter=tmp_path / "sft" / "export"), jt.lora(rank=4, alpha=8))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(sft.model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_starting_adapter_that_the_plan_cannot_hold_gets_a_one_line_error(files, tmp_path):
    model = jt.load(str(files["model"]))
    jt.export(dataclasses.replace(jt.apply_plan(model, jt.lora(rank=4, alpha=8, targets=["q_proj"])), step=1),
              tmp_path / "adapter")
    cases = [(jt.lora(rank=8, alpha=16, targets=["q_proj"]), "as lora rank 4 alpha 8, but the plan gives it lora "
              "rank 8 alpha 16; give the plan the adapter was trained with"),
             (jt.full(), "as lora rank 4 alpha 8, but the plan gives it no adapter"),
             (jt.lora(rank=4, alpha=8, targets=["v_proj"]), "but the plan gives it no adapter")]
    for plan, expected in cases:
        with pytest.raises(ValueError) as err:
            jt.apply_plan(jt.load(str(files["model"]), adapter=tmp_path / "adapter"), plan)
        assert expected in _one_line(err) and "model.adapter: " in str(err.value), str(err.value)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    for where, expected in ((tmp_path, "has no adapter_config.json"), (tmp_path / "run", "without a PEFT adapter")):
        with pytest.raises(ValueError) as err:
            jt.load(str(files["model"]), adapter=where)
        assert _one_line(err).startswith(f"model.adapter: {where}") and expected in str(err.value)
    with pytest.raises(ValueError, match="apply the plan with jaxtune.apply_plan"):
        tuned_lib.apply_plan(jt.load(str(files["model"]), adapter=tmp_path / "adapter"), jt.lora())


def test_metric_sums_add_up_over_micro_batches(files):
    """The step carries the loss's metric sums out; k micro-batches give one batch's sums; an LM
    loss has none, so its step's outputs are unchanged."""
    model = jt.apply_plan(jt.load(str(files["model"])), jt.lora(rank=4, alpha=8))
    pairs, _ = jt.read(files["train"], kind="preference")
    batch = next(iter(training_loader(pairs, model.tokenizer, LoaderConfig(batch_size=4, max_length=LENGTH,
                                                                            packing=False))))
    trainable, frozen = partition(model.params, model.labels)
    loss_fn = make_preference_loss_fn(model.module, PreferenceConfig("simpo"))
    optimizer = optax.sgd(0.1)
    out = [jax.jit(make_train_step(loss_fn, optimizer, grad_accum_steps=k))(
        trainable, frozen, optimizer.init(trainable), batch, jax.random.key(0))[2] for k in (1, 2)]
    assert set(out[0]["metric_sums"]) == set(pref_losses.mean_metrics(out[0]["metric_sums"]))
    assert float(out[0]["metric_sums"]["pairs"]) == 4
    for key, value in out[0]["metric_sums"].items():
        np.testing.assert_allclose(float(out[1]["metric_sums"][key]), float(value), rtol=1e-5, err_msg=key)
    chat, _ = jt.read(files["chat"], kind="chat")
    lm_batch = next(iter(training_loader(chat, model.tokenizer, LoaderConfig(batch_size=4, max_length=LENGTH))))
    lm_step = jax.jit(make_train_step(make_loss_fn(model.module, "lm"), optimizer, grad_accum_steps=2))
    lm_metrics = lm_step(trainable, frozen, optimizer.init(trainable), lm_batch, jax.random.key(0))[2]
    assert set(lm_metrics) == {"loss", "weight", "tokens", "grad_norm", "finite", "grad_finite"}


def test_max_segments_caps_the_pairs_a_row_packs_and_every_pair_counts(files, tmp_path):
    """``preference.max_segments`` is how many pairs of a row the loss sees; the loader packed as many as fit,
    and the pairs beyond it were left out of the loss and the metrics without a word. Now a row packs at most
    that many, and the evaluation equals the uncapped one (every pair counted)."""
    model = jt.load(str(files["model"]))
    valid, _ = jt.read(files["valid"], kind="preference")
    scores = {}
    for cap in (None, 2):
        tuned = jt.apply_plan(model, jt.lora(rank=4, alpha=8))
        trainer = jt.Trainer(tuned, None, valid, run_dir=tmp_path / str(cap), config=jt.TrainConfig(steps=1),
                             data=jt.DataConfig(batch_size=8, max_length=128),
                             preference=jt.PreferenceConfig(**DPO, max_segments=cap))
        most = max(int(b["segment_ids"].max()) for b in trainer.eval_data)
        assert most > 2 if cap is None else most == 2  # uncapped, rows hold more pairs than the cap
        scores[cap] = trainer.evaluate()
    assert scores[2] == pytest.approx(scores[None], rel=1e-5)
    packed = evaluation_loader(valid, tiny_tokenizer(), LoaderConfig(batch_size=8, max_length=128))
    with pytest.raises(ValueError, match="^preference.max_segments: the loss sees 2 pairs a row, but the loader packs "
                                         "as many as fit; build it with max_pairs=2"):
        jt.Trainer(jt.apply_plan(model, jt.lora(rank=4, alpha=8)), None, packed, run_dir=tmp_path / "own",
                   preference=jt.PreferenceConfig(**DPO, max_segments=2))
