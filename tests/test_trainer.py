"""The Trainer: logs, status, one compilation, best checkpoint, early stopping, NaN guard,
exact resume after SIGKILL, and two processes training together."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tensorboard_scalars, tiny_hf_model

from jaxtune import tuning
from jaxtune.data import DataConfig, LoaderConfig, make_loader, read_source
from jaxtune.data.testing import tiny_tokenizer, write_jsonl
from jaxtune.models import hf, stacking
from jaxtune.models.attention import splash_attention
from jaxtune.training import loop
from jaxtune.training.baselines import make_features_step
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.optim import OptimizerConfig
from jaxtune.training.sharding import MeshConfig, make_mesh
from jaxtune.training.trainer import Trainer

SCRIPT = Path(__file__).with_name("train_script.py")


def ONE_DEVICE():  # noqa: N802 - reads as a constant at call sites
    return make_mesh(MeshConfig(), jax.devices()[:1])


def write_chat(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    with open(path, "w") as fh:
        for _ in range(n):
            q = " ".join(rng.choice(words, rng.randint(1, 5)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": q.upper()}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    tiny_hf_model("LlamaForCausalLM", root / "model")
    return root / "model", write_chat(root / "train.jsonl", 64), write_chat(root / "valid.jsonl", 16, seed=1)


def _loader(path: Path, *, train: bool, batch: int = 4):
    cfg = LoaderConfig(batch_size=batch, max_length=64, num_epochs=None if train else 1, shuffle=train,
                       drop_remainder=train, seed=0)
    return make_loader(read_source(path, "chat"), tiny_tokenizer(), cfg, scan_first=False)


def test_the_final_evaluation_reaches_tensorboard(setup, tmp_path):
    """Without evaluations in the loop, the fine-tuned model is scored after it: that record is in
    metrics.jsonl and in the TensorBoard events, flushed when fit returns."""
    model_dir, train, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=4, alpha=8))
    result = Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                     config=TrainConfig(steps=2, log_every=1, progress=False), eval=EvalConfig(before=False),
                     run_dir=tmp_path, mesh=ONE_DEVICE()).fit()
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 2 and final["eval/loss"] == result.after["loss"]
    scalars = {(tag, step): value for tag, step, value in tensorboard_scalars(tmp_path / "tensorboard")}
    assert scalars[("eval/loss", 2)] == pytest.approx(result.after["loss"], rel=1e-6)
    assert {("loss", 1), ("loss", 2)} <= scalars.keys()


def test_fit_logs_evaluates_and_compiles_once(setup, tmp_path):
    model_dir, train, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=4, alpha=8))
    trainer = Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                      optimizer=OptimizerConfig(learning_rate=3e-2, warmup_steps=2),
                      config=TrainConfig(steps=12, log_every=4, progress=False),
                      eval=EvalConfig(every=6, best_metric="loss"),
                      run_dir=tmp_path, mesh=ONE_DEVICE())
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.state == "finished" and result.step == 12
    assert trainer.train_step._cache_size() == 1  # compiled once, reused for every step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [4, 8, 12]
    assert all(r["tokens_per_s"] > 0 and "learning_rate" in r for r in records if "loss" in r)
    # tokens/s counts real input tokens (the time cancels): at most the 4 x 64 slots of a packed batch,
    # far more than the supervised (upper-cased answer) tokens alone
    assert all(64 < r["tokens_per_s"] / r["steps_per_s"] <= 4 * 64 for r in records if "loss" in r)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval/loss"] < before["loss"]  # it learned something
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 12
    assert (tmp_path / "best").exists() and result.best["step"] in (6, 12)
    # TensorBoard has every number metrics.jsonl has (the final evaluation's included), at its step
    logged = [(k, r["step"], v) for r in records for k, v in r.items()
              if k != "step" and isinstance(v, int | float) and math.isfinite(v)]
    events = tensorboard_scalars(tmp_path / "tensorboard")
    assert [e[:2] for e in events] == [x[:2] for x in logged] and {"loss", "eval/loss"} <= {x[0] for x in logged}
    np.testing.assert_allclose([e[2] for e in events], [x[2] for x in logged], rtol=1e-6)
    assert trainer.checkpointer.steps() == [12]
    meta = json.loads((tmp_path / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert meta["config"]["base_model"] == str(model_dir)  # the frozen base is referenced, not copied
    assert not list((tmp_path / "checkpoints" / "12").glob("frozen*"))
    # the step donated the adapters it trained: a second run from the same object is refused, by name
    with pytest.raises(ValueError, match=r"model: parameter .*lora_a.* was consumed by an earlier fit .*result.model"):
        Trainer(tuned, train_data=_loader(train, train=True), run_dir=tmp_path / "again", mesh=ONE_DEVICE())
    with pytest.raises(ValueError, match=r"model: parameter .*lora_a.* was consumed by an earlier fit .*result.model"):
        tuning.export(tuned, tmp_path / "export")  # not JAX's "Array has been deleted", which names nothing
    Trainer(result.model, train_data=_loader(train, train=True), run_dir=tmp_path / "on", mesh=ONE_DEVICE())
    # a reader of the run (evaluation, export: open_run) leaves a save in flight, as a run still training has
    in_flight = tmp_path / "checkpoints" / "16.orbax-checkpoint-tmp-1"
    in_flight.mkdir()
    assert Trainer(result.model, run_dir=tmp_path, mesh=ONE_DEVICE()).restore() == 12 and in_flight.is_dir()


def test_throughput_leaves_out_checkpoint_saves_and_evaluations(setup, tmp_path, monkeypatch):
    """On a clock where a step takes 1 s and a save or an evaluation 100 s, every record's
    steps_per_s is exactly 1: only the steps are training throughput (and so the ETA and MFU)."""
    model_dir, train, valid = setup
    clock, calls = [0.0], []
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(seconds: float, f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock[0] += seconds
            calls.append(seconds)
            return f(*args, **kwargs)
        return timed

    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=4, alpha=8))
    trainer = Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                      config=TrainConfig(steps=8, log_every=2, progress=False),
                      eval=EvalConfig(every=4, before=False), checkpoint=CheckpointConfig(every=2),
                      run_dir=tmp_path, mesh=ONE_DEVICE())
    trainer.train_step = slow(1.0, trainer.train_step)
    monkeypatch.setattr(Checkpointer, "save", slow(100.0, Checkpointer.save))  # fit opens its own checkpointer
    monkeypatch.setattr(trainer, "_evaluate_and_track", slow(100.0, trainer._evaluate_and_track))
    assert trainer.fit().state == "finished"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    assert [r["steps_per_s"] for r in train_records] == pytest.approx([1.0] * 4)
    assert calls.count(100.0) == 4 + 2  # saves at steps 2, 4, 6 and 8 (the last after the loop), evaluations at 4 and 8


@pytest.mark.parametrize("template", ["plain", "qwen3"])
def test_choice_accuracy_matches_transformers_logits_packed_or_not(setup, tmp_path, template):
    """Choice accuracy = argmax over the choices' first-token logits at each answer start,
    checked against transformers' logits; packed rows (several conversations each) and
    one-per-row give the same result. Qwen3's template opens every reply with an empty think
    block: the choices are scored at their first content token, after it."""
    import torch
    from helpers import qwen3_tokenizer, tiny_hf_model

    from jaxtune.data import answer_first_token, encode_chat

    model_dir, _, _ = setup
    tok = tiny_tokenizer() if template == "plain" else qwen3_tokenizer()
    opening = len(tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]) if template == "qwen3" else 0
    rng = np.random.RandomState(3)
    convs = [[{"role": "user", "content": " ".join(rng.choice(["up", "down", "left"], 3))},
              {"role": "assistant", "content": str(rng.choice(["yes", "no", "maybe"]))}] for _ in range(24)]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    choices = ("yes", "no", "maybe")
    ids = tuple(tok.convert_tokens_to_ids(c[0]) for c in choices)
    if template == "plain":
        assert ids == tuple(answer_first_token(tok, "chat", c) for c in choices)

    torch_model = tiny_hf_model("LlamaForCausalLM")  # the same seed as the saved model
    want_logits, want_label = [], []
    for conv in convs:
        ex = encode_chat(tok, conv, [0, 1])
        start = int(np.argmax(ex["loss_mask"])) + opening  # the first content token; its logit comes from start - 1
        assert tok.convert_ids_to_tokens(int(ex["input_ids"][start])) == conv[1]["content"][0]
        with torch.no_grad():
            logits = torch_model(torch.as_tensor(ex["input_ids"][None, :start])).logits[0, -1].numpy()
        want_logits.append(logits[list(ids)])
        want_label.append(choices.index(conv[1]["content"]))
    want = float(np.mean(np.argmax(want_logits, -1) == np.asarray(want_label)))

    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2), tokenizer=tok)
    got = []
    for packing in (False, True):
        cfg = LoaderConfig(batch_size=4, max_length=64, num_epochs=1, shuffle=False, drop_remainder=False,
                           packing=packing, seed=0)
        loader = make_loader(read_source(path, "chat"), tok, cfg, scan_first=False)
        trainer = Trainer(tuned, train_data=(), eval_data=loader, optimizer=OptimizerConfig(learning_rate=1e-3),
                          config=TrainConfig(steps=1, progress=False), eval=EvalConfig(choices=choices),
                          run_dir=tmp_path / f"run{packing}", mesh=ONE_DEVICE())
        got.append(trainer.evaluate())
    assert 0 < want < 1  # a random model: not trivially all right or all wrong
    for metrics in got:
        assert metrics["choice_accuracy"] == pytest.approx(want, abs=1e-9)
    assert got[0]["choice_macro_f1"] == pytest.approx(got[1]["choice_macro_f1"], abs=1e-9)
    assert got[0]["loss"] == pytest.approx(got[1]["loss"], rel=1e-5)

    with pytest.raises(ValueError, match="expected two or more different answers"):
        EvalConfig(choices=("yes", "yes"))
    with pytest.raises(ValueError, match="begin with the same token"):
        Trainer(tuned, None, loader, run_dir=tmp_path / "same", eval=EvalConfig(choices=("yes", "yup")),
                mesh=ONE_DEVICE())


def _lora_trainer(setup, tmp_path, steps: int, **options) -> Trainer:
    """A LoRA trainer on the tiny model, logging every step."""
    model_dir, train, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    return Trainer(tuned, train_data=_loader(train, train=True), optimizer=OptimizerConfig(learning_rate=1e-3),
                   config=TrainConfig(steps=steps, log_every=1, progress=False), run_dir=tmp_path, mesh=ONE_DEVICE(),
                   **options)


def _sigint_in_step_3(trainer: Trainer) -> None:
    """Make the call that computes step 3 send SIGINT just as the jitted step returns."""
    import signal

    step = trainer.train_step

    def step_then_interrupt(*args):
        out = step(*args)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before this returns
        return out

    trainer.train_step = step_then_interrupt


def _non_finite_in_step_3(trainer: Trainer) -> None:
    step = trainer.train_step

    def step_then_not_finite(*args):
        trainable, opt_state, metrics = step(*args)
        return trainable, opt_state, {**metrics, "finite": jnp.asarray(trainer.step != 2)}

    trainer.train_step = step_then_not_finite


def _raise_in_the_first_step(trainer: Trainer) -> None:
    def step_then_break(*args):
        raise RuntimeError("the device went away")

    trainer.train_step = step_then_break


@pytest.mark.parametrize("outcome, end", [("stopped", _sigint_in_step_3), ("failed", _non_finite_in_step_3),
                                          ("raised", _raise_in_the_first_step)])
def test_every_way_out_of_fit_closes_the_training_iterator_and_the_events(setup, tmp_path, monkeypatch, outcome, end):
    """Else its prefetch threads (and worker processes) and the TensorBoard events file outlive the
    run; a stopped run still resumes from the data position it saved."""
    from jaxtune.data.pipeline import Loader

    opened = []
    read = Loader.__iter__
    monkeypatch.setattr(Loader, "__iter__", lambda self: opened.append(read(self)) or opened[-1])
    trainer = _lora_trainer(setup, tmp_path, steps=50)
    end(trainer)
    if outcome == "raised":
        with pytest.raises(RuntimeError, match="the device went away"):
            trainer.fit()
    else:
        assert trainer.fit().state == outcome
    assert opened and trainer.run._events is None
    for iterator in opened:
        with pytest.raises(ValueError, match="closed"):
            next(iterator)
    if outcome == "stopped":
        assert _lora_trainer(setup, tmp_path, steps=4).fit().step == 4


def test_data_that_runs_out_before_train_steps_is_read_again_as_transformers_takes_epochs(setup, tmp_path, caplog):
    """A list of 2 batches and ``train.steps: 5``: the run stopped at step 2 yet said "finished", and fitting
    the same directory again trained on (steps 3-4, replaying the batches), so a finished run was not a
    no-op. transformers' Trainer takes as many epochs as ``max_steps`` needs: now a new pass starts where
    one runs out, and the run equals one on the batches repeated by hand. A generator can be read once:
    the run ends where it runs out, with a warning naming ``train.steps``."""
    model_dir, train, _ = setup
    batches = list(itertools.islice(_loader(train, train=True), 2))

    def fit(data: Any, run: str) -> Any:
        tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
        trainer = Trainer(tuned, train_data=data, optimizer=OptimizerConfig(learning_rate=1e-2),
                          config=TrainConfig(steps=5, log_every=5, progress=False), eval=EvalConfig(before=False,
                          after=False), run_dir=tmp_path / run, mesh=ONE_DEVICE())
        return trainer.fit(), trainer

    (passes, trainer), (by_hand, reference) = fit(batches, "passes"), fit([*batches, *batches, batches[0]], "by_hand")
    assert (passes.state, passes.step, by_hand.step) == ("finished", 5, 5)
    for ours, theirs in zip(jax.tree.leaves(trainer.trainable), jax.tree.leaves(reference.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert fit(batches, "passes")[0].step == 5  # finished: nothing more to train
    with caplog.at_level("WARNING"):
        once = fit((batch for batch in batches), "generator")[0]
    assert (once.state, once.step) == ("finished", 2)
    assert "the training data ran out at step 2 of train.steps 5" in caplog.text


def test_another_processs_error_in_the_status_is_not_written_over_by_the_loop(setup, tmp_path):
    """On several processes a watcher thread writes another process's error to the status
    (``processes.stop_together``) while this process's loop may still log a step before the thread
    ends the process: its "running" replaced the error (1 two-process run in 4)."""
    trainer = _lora_trainer(setup, tmp_path, steps=3)
    trainer.run.create()
    trainer.status.stopped_by_another("process 1 failed after step 2 of 3: ValueError: boom", 2)
    trainer.status.write("running", 2)
    status = trainer.run.status()
    assert (status["state"], status["error"]) == ("failed", "process 1 failed after step 2 of 3: ValueError: boom")


def test_a_trainer_nobody_holds_frees_its_arrays_at_once(setup, tmp_path):
    """The run's status (``Trainer.status``) holds nothing of the trainer: with a reference back to
    it, a trainer a notebook drops kept its params and optimizer state on the device until the next
    cyclic garbage collection."""
    import gc
    import weakref

    trainer = _lora_trainer(setup, tmp_path, steps=2)
    trainer.run.create()
    trainer.status.write("running", 0)
    dropped = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert dropped() is None
    finally:
        gc.enable()


def _two_sigints_in_step_5(trainer: Trainer, before_the_second=lambda: None) -> None:
    """Make the call that computes step 5 consume its inputs, then get Ctrl-C twice (stop at once)."""
    import signal

    step = trainer.train_step

    def step_interrupted_twice(*args):
        out = step(*args)
        if trainer.step == 4:
            jax.tree.map(lambda x: x.is_deleted() or x.delete(), args[0])  # donated: the step's inputs are gone
            os.kill(os.getpid(), signal.SIGINT)
            before_the_second()
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here, mid-step
        return out

    trainer.train_step = step_interrupted_twice


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_ctrl_c_mid_step_names_the_checkpoint_to_resume_from(setup, tmp_path, caplog, monkeypatch, processes):
    """One process verifies the checkpoints and names the newest good one (step 4 damaged: 2). With
    several, verifying takes every process, and the others are still inside the step's collectives:
    the newest step is named unverified, with no collective (that one waited for ever)."""
    from jaxtune import processes as jt_processes
    from jaxtune.training import checkpoint

    trainer = _lora_trainer(setup, tmp_path, steps=8, checkpoint=CheckpointConfig(every=2, keep=3))
    step = trainer.train_step

    def damaging_step_4(*args):
        if trainer.step == 4:  # the save of step 4 is on disk: damage it
            trainer.checkpointer.wait()
            largest = max((p for p in (tmp_path / "checkpoints" / "4").rglob("*") if p.is_file()),
                          key=lambda p: p.stat().st_size)
            data = largest.read_bytes()
            largest.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        return step(*args)

    trainer.train_step = damaging_step_4

    def several_from_now():
        if processes > 1:
            monkeypatch.setattr(jt_processes, "several", lambda: True)
            monkeypatch.setattr(checkpoint.Checkpointer, "latest_good_step",
                                lambda self: pytest.fail("a collective on one interrupted process"))

    _two_sigints_in_step_5(trainer, several_from_now)
    result = trainer.fit()
    assert result.state == "stopped"
    expected = "2" if processes == 1 else "4 (if its files verify)"
    assert f"interrupted during step 5; nothing saved, resume from checkpoint {expected}" in caplog.text


def test_close_closes_the_events_when_the_checkpoint_manager_fails_to(setup, tmp_path):
    class Broken:
        def close(self):
            raise OSError("disk full")

    trainer = _lora_trainer(setup, tmp_path, steps=1)
    trainer.run.log({"step": 1, "loss": 1.0})  # opens the events file
    trainer._checkpointer = Broken()
    with pytest.raises(OSError, match="disk full"):
        trainer.close()
    assert trainer.run._events is None


def test_ctrl_c_right_after_a_step_stops_at_the_boundary_and_saves(setup, tmp_path, caplog):
    """SIGINT landing just as the jitted step returns (its inputs already donated) must not lose
    the params: the trainer finishes the step, stops, and saves a checkpoint that resumes."""
    import signal

    trainer = _lora_trainer(setup, tmp_path, steps=50)
    _sigint_in_step_3(trainer)
    # What the trainer must put back: default_int_handler, or SIG_IGN when pytest runs in the background.
    previous = signal.getsignal(signal.SIGINT)
    result = trainer.fit()
    assert result.state == "stopped" and result.step == 3
    assert trainer.checkpointer.steps() == [3]
    assert "stopping after this step" in caplog.text
    assert signal.getsignal(signal.SIGINT) is previous  # restored


def test_ctrl_c_just_after_a_periodic_checkpoint_stops_cleanly(setup, tmp_path):
    """SIGINT during the step that a periodic checkpoint then saves: the stop's own save finds that
    step already on disk (Orbax refuses a step twice), so it must keep it, not fail the run with
    its status left at "running" (what ``jaxtune serve``'s cancel test caught under load)."""
    from jaxtune.training.config import CheckpointConfig

    trainer = _lora_trainer(setup, tmp_path, steps=50, checkpoint=CheckpointConfig(every=3))
    _sigint_in_step_3(trainer)  # step 3 is also the periodic checkpoint's
    result = trainer.fit()
    assert result.state == "stopped" and result.step == 3
    assert trainer.checkpointer.steps() == [3]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "stopped"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_ctrl_c_after_a_non_finite_step_reports_it_and_saves_nothing(setup, tmp_path, caplog):
    """The host reads the steps' finite flags only every 10 steps here; SIGINT after step 3, whose
    update overflowed (an lr beyond float32's range), must fail the run naming step 3, not save that
    state as the stop's checkpoint."""
    model_dir, train, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    schedule = lambda count: jnp.where(count < 2, 1e-3, 1e39)  # noqa: E731
    trainer = Trainer(tuned, train_data=_loader(train, train=True), optimizer=optax.sgd(schedule),
                      config=TrainConfig(steps=50, log_every=10, progress=False), run_dir=tmp_path, mesh=ONE_DEVICE())
    _sigint_in_step_3(trainer)
    result = trainer.fit()
    assert result.state == "failed" and result.step == 3
    assert "step 3: the update made the params or optimizer state non-finite (nan/inf); training stopped" in caplog.text
    assert trainer.checkpointer.steps() == []
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_step_noticed_later_is_the_one_the_status_names(setup, tmp_path, caplog):
    """The update of step 3 overflows (an lr beyond float32's range) and the host reads the finite flags
    only at step 5 (log_every): status.json said step 5, the step it noticed at, so `jaxtune status`
    showed 5 steps trained. It names step 3 as failed and step 2 as the last good one; so does the result."""
    from jaxtune.cli.status import format_status
    from jaxtune.training.rundir import RunDir

    model_dir, train, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    schedule = lambda count: jnp.where(count < 2, 1e-3, 1e39)  # noqa: E731
    trainer = Trainer(tuned, train_data=_loader(train, train=True), optimizer=optax.sgd(schedule),
                      config=TrainConfig(steps=8, log_every=5, progress=False), run_dir=tmp_path, mesh=ONE_DEVICE())
    result = trainer.fit()
    assert (result.state, result.failed_step, result.step) == ("failed", 3, 5)  # step: where the host stopped
    assert "step 3: the update made the params or optimizer state non-finite" in caplog.text
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["state"], status["step"], status["failed_step"]) == ("failed", 2, 3)
    info = RunDir(tmp_path).summary()
    assert (info["step"], info["failed_step"]) == (2, 3)
    assert "step:        2/8 (25%), the last good step: step 3 was not finite" in format_status(info)


def test_another_process_reading_the_run_directory_never_sees_a_half_written_file(tmp_path, monkeypatch):
    """The main process writes config.yaml, run.json and status.json while the others check the
    directory (a restart on two processes read an empty config.yaml: "not a config"). A reader
    between the open and the last byte of a write sees the previous file whole, or none."""
    from jaxtune.training.rundir import RunDir

    main, other = RunDir(tmp_path, main=True), RunDir(tmp_path, main=False)
    main.create().write_config({"model": {"path": "a"}})
    main.write_identity({"params": 1})
    main.write_status("running", step=1)
    seen = []
    write_text = Path.write_text

    def interrupted(path, text, *args, **kwargs):  # the file opened (and truncated), another process reads
        write_text(path, "", *args, **kwargs)
        seen.append((other.config(), other.identity(), other.status(strict=True)))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    main.write_config({"model": {"path": "b"}})
    main.write_identity({"params": 2})
    main.write_status("finished", step=2)
    monkeypatch.undo()
    assert [(c, i, s["state"]) for c, i, s in seen] == [
        ({"model": {"path": "a"}}, {"params": 1}, "running"),
        ({"model": {"path": "b"}}, {"params": 1}, "running"),
        ({"model": {"path": "b"}}, {"params": 2}, "running")]
    assert (other.config(), other.identity(), other.status()["state"]) == ({"model": {"path": "b"}}, {"params": 2},
                                                                          "finished")


def test_optimizer_state_is_sharded_like_the_params(setup, tmp_path):
    """Under FSDP, Adam's moments are split like their params, not replicated on every device
    (jit left them replicated: a full copy of the optimizer state per device)."""
    from jax.sharding import NamedSharding

    model_dir, _, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.full())
    trainer = Trainer(tuned, train_data=(), optimizer=OptimizerConfig(learning_rate=1e-3),
                      config=TrainConfig(steps=1, progress=False), run_dir=tmp_path,
                      mesh=make_mesh(MeshConfig(data=1, fsdp=8)))
    specs = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(trainer.trainable)}
    leaves = jax.tree_util.tree_leaves_with_path(trainer.opt_state)

    def is_matrix(path, leaf) -> bool:  # per layer: a scanned run's leaves carry a layer axis too
        return leaf.ndim - any(stacking.stack_range(str(getattr(k, "key", ""))) for k in path) >= 2

    matrices = 0
    for path, leaf in leaves:
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == trainer.mesh
        if is_matrix(path, leaf):
            name = next(k for k in specs if jax.tree_util.keystr(path).endswith(k))
            assert leaf.sharding.spec == specs[name] and "fsdp" in leaf.sharding.spec, name
            matrices += 1
    assert matrices == 2 * sum(is_matrix(p, x) for p, x in jax.tree_util.tree_leaves_with_path(trainer.trainable))
    total = sum(x.nbytes for _, x in leaves)
    on_one_device = sum(x.addressable_shards[0].data.nbytes for _, x in leaves)
    assert on_one_device < total / 6


def test_evaluation_and_training_trace_the_model_under_the_run_mesh(setup, tmp_path, monkeypatch):
    """On a multi-device mesh, the evaluation step traces the model under the run's mesh as the train
    step does: what splash attention (a TPU's kernel, run here in Pallas' interpreter) needs to run
    per shard in a shard_map, instead of XLA gathering the whole batch onto every device's Pallas
    call; likewise the linear-probe baseline's feature pass. Evaluated on splash, the loss is the CPU
    kernel's."""
    from jaxtune.models import attention

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    model_dir, train, valid = setup
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

    def loader(path: Path, *, train: bool):  # rows of 128 tokens: splash tiles by 128
        cfg = LoaderConfig(batch_size=4, max_length=128, num_epochs=None if train else 1, shuffle=train,
                           drop_remainder=train, seed=0)
        return make_loader(read_source(path, "chat"), tiny_tokenizer(), cfg, scan_first=False)

    def trainer(run_dir: Path) -> Trainer:
        tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=4, alpha=8))
        return Trainer(tuned, train_data=loader(train, train=True), eval_data=loader(valid, train=False),
                       config=TrainConfig(steps=1, progress=False), eval=EvalConfig(before=False, after=False),
                       run_dir=run_dir, mesh=mesh)

    expected = trainer(tmp_path / "grouped").evaluate()
    under_mesh = []
    monkeypatch.setattr(attention, "_backend", lambda: "tpu")  # the kernel then runs uninterpreted: interpret it
    monkeypatch.setattr(attention, "splash_attention", lambda *a, **kw: under_mesh.append(
        not jax.sharding.get_abstract_mesh().empty) or splash_attention(*a, **kw, interpret=True))
    on_splash = trainer(tmp_path / "splash")
    under_mesh.clear()  # the load's shape-only trace of the model (no program runs it) is on no mesh
    got = on_splash.evaluate()
    assert under_mesh and all(under_mesh), under_mesh
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    for program in ("the linear probe's features", "training"):
        under_mesh.clear()
        if program == "training":
            assert on_splash.fit().state == "finished"
        else:
            rows = next(iter(loader(valid, train=False)))  # as a classifier's rows: one label each
            batch = on_splash.to_device({**rows, "labels": np.zeros(len(rows["input_ids"]), np.int32)})
            make_features_step(on_splash.tuned.module, mesh)(on_splash.trainable, on_splash.frozen, batch)
        assert under_mesh and all(under_mesh), (program, under_mesh)


def test_early_stopping_on_a_metric_that_stops_improving(setup, tmp_path):
    model_dir, train, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    trainer = Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                      optimizer=optax.set_to_zero(),  # nothing changes, so no evaluation improves
                      config=TrainConfig(steps=50, log_every=1, progress=False),
                      eval=EvalConfig(every=1, best_metric="loss", early_stopping_patience=2),
                      run_dir=tmp_path, mesh=ONE_DEVICE())
    result = trainer.fit()
    assert result.state == "early_stopped" and result.step == 3  # best at 1, then 2 evaluations without gain
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "early_stopped"

    def again(patience: int):
        tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
        return Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                       optimizer=optax.set_to_zero(), config=TrainConfig(steps=50, log_every=1, progress=False),
                       eval=EvalConfig(every=1, best_metric="loss", early_stopping_patience=patience),
                       run_dir=tmp_path, mesh=ONE_DEVICE()).fit()

    # The same run again stays stopped (it trained 2 more steps and stopped anew); more patience trains on.
    assert (again(2).state, again(2).step) == ("early_stopped", 3)
    assert (again(3).state, again(3).step) == ("early_stopped", 4)


def test_best_tracking_skips_undefined_values_and_restarts_for_another_metric():
    """A NaN (Pearson's r of constant targets) was stored as the best, after which no evaluation could
    beat it and early stopping ended a run whose loss still fell; a best metric changed on resume was
    compared with the old metric's best value."""
    from jaxtune.training.loop import Best

    best = Best("pearson")
    assert not best.update(math.nan, 1, higher_is_better=True) and (best.value, best.bad_evals) == (None, 0)
    assert best.update(0.3, 2, higher_is_better=True) and (best.value, best.step) == (0.3, 2)
    assert not best.update(math.nan, 3, higher_is_better=True) and best.bad_evals == 0
    assert not best.update(0.2, 4, higher_is_better=True) and best.bad_evals == 1 and best.out_of_patience(1)
    assert not Best("pearson").out_of_patience(0)  # nothing tracked yet: no best to be patient about
    saved = {"best_metric": "loss", "best_value": 2.06, "best_step": 2, "bad_evals": 1}
    assert Best.restored(saved, "pearson") == Best("pearson")
    assert Best.restored(saved, "loss") == Best("loss", 2.06, 2, 1)
    assert Best.restored({k: v for k, v in saved.items() if k != "best_metric"}, "loss") == Best("loss", 2.06, 2, 1)
    assert Best.restored({**saved, "best_value": math.nan}, "loss") == Best("loss")


def test_config_sections_built_in_python_are_checked_like_a_recipe():
    """A bare string of choices became its characters, numbers failed only when the answers were
    tokenized; TrainConfig(steps=2.5) trained 3 steps, DataConfig(packing="yes") packed."""
    for bad, message in (("yes", "eval.choices: expected a list or null, got 'yes'"),
                         ([1, 2], "eval.choices[0]: expected a string, got 1"),
                         (["yes", ""], "eval.choices: expected non-empty answers")):
        with pytest.raises(ValueError, match=rf"^{re.escape(message)}"):
            EvalConfig(choices=bad)
    assert EvalConfig(choices=["yes", "no"]).choices == ("yes", "no")
    for build, message in ((lambda: TrainConfig(steps=2.5), "train.steps: expected an integer or null, got 2.5"),
                           (lambda: TrainConfig(regression_loss="l1"), "train.regression_loss: expected one of mse, "
                                                                       "huber, got 'l1'"),
                           (lambda: CheckpointConfig(keep=None), "checkpoint.keep: expected an integer, got null"),
                           (lambda: DataConfig(packing="yes"), "data.packing: expected true or false or null, got "
                                                               "'yes'"),
                           (lambda: LoaderConfig(batch_size="8"), None)):
        if message is None:
            assert build().batch_size == 8  # numbers written as strings are numbers, as YAML 1.1 reads 1e3
            continue
        with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
            build()
    assert TrainConfig(epochs=1, seed=np.int64(3)) == TrainConfig(epochs=1.0, seed=3)


def test_arguments_of_the_wrong_type_are_named(setup, tmp_path):
    """A dict for a config section (or a model without a plan) failed deep inside, on an attribute."""
    model_dir, train, _ = setup
    pretrained = hf.load_pretrained(model_dir)
    with pytest.raises(TypeError, match=r"^model: expected a planned model \(jt.Tuned\), got Pretrained; apply a plan "
                                        r"first: jt.apply_plan\(model, plan\)$"):
        Trainer(pretrained, run_dir=tmp_path)
    tuned = tuning.apply_plan(pretrained, tuning.lora(rank=2, alpha=2))
    for name in ("config", "data", "optimizer", "eval", "checkpoint", "mesh", "preference"):
        with pytest.raises(TypeError, match=rf"^{name}: expected .*, got dict; use jt\.\w+Config\(\*\*\{{\.\.\.\}}\)$"):
            Trainer(tuned, run_dir=tmp_path, **{name: {"steps": 2}})
    with pytest.raises(TypeError, match=r"^optimizer: expected jt.OptimizerConfig or an optax GradientTransformation, "
                                        r"got str$"):
        Trainer(tuned, run_dir=tmp_path, optimizer="adamw")


def test_data_fields_that_read_the_examples_are_refused(setup, tmp_path):
    """DataConfig(train=..., train_size=...) given to the Trainer chose nothing: the Trainer is handed
    the examples already read, and it ignored the fields that choose and read them without a word."""
    model_dir, train, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2), tokenizer=tiny_tokenizer())
    source = read_source(train, "chat")
    for fields in ({"train_size": 8}, {"train": str(train), "kind": "chat"}, {"validation_fraction": 0.1},
                   {"skip_bad_rows": True}, {"messages_field": "turns"}, {"text_unit": "line"}):
        name = next(iter(fields))
        with pytest.raises(ValueError, match=rf"^data\.{name}: the Trainer .* pass it to jaxtune\.read"):
            Trainer(tuned, source, run_dir=tmp_path, data=DataConfig(**fields))
    with pytest.raises(ValueError, match="^data.images: true, but train_data is chat text, not images; remove"):
        Trainer(tuned, source, run_dir=tmp_path, mesh=ONE_DEVICE(), data=DataConfig(batch_size=4, images=True))
    # the fields that batch the examples (and eval_batch_size) are the Trainer's own
    trainer = Trainer(tuned, source, run_dir=tmp_path, mesh=ONE_DEVICE(),
                      data=DataConfig(batch_size=4, max_length=64, eval_batch_size=2))
    assert trainer.train_data.config.batch_size == 4


def test_data_that_is_not_batches_is_refused_before_it_is_iterated(setup, tmp_path):
    """jt.read's (train, val) pair was iterated as two batches, a path as its characters; evaluate(data=)
    skipped the checks of eval_data, so classification rows reached a language model (KeyError 'labels')."""
    model_dir, train, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2), tokenizer=tiny_tokenizer())
    pair = read_source(train, "chat"), read_source(valid, "chat")
    with pytest.raises(TypeError, match=r"^train_data: a \(train, validation\) pair; pass them apart: "
                                        r"Trainer\(model, train, val\)$"):
        Trainer(tuned, pair, run_dir=tmp_path)
    for path in (str(valid), valid):
        with pytest.raises(TypeError, match=r"^eval_data: a path: read it first with jt.read\(path, kind=...\)$"):
            Trainer(tuned, None, path, run_dir=tmp_path)
    trainer = Trainer(tuned, _loader(train, train=True), config=TrainConfig(steps=1, progress=False),
                      run_dir=tmp_path, mesh=ONE_DEVICE())
    with pytest.raises(TypeError, match=r"^data: a \(train, validation\) pair"):
        trainer.evaluate(data=pair)
    rows = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a b", "label": "pos"}, {"text": "c", "label": "neg"}])
    with pytest.raises(ValueError, match="the data is classification but the model is a lm model"):
        trainer.evaluate(data=read_source(rows, "classification"))


def test_fit_without_train_data_is_refused(setup, tmp_path):
    """It reported "finished" at step 0 of train.steps; such a trainer still evaluates."""
    model_dir, _, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    with pytest.raises(ValueError, match=r"^train_data: the Trainer has no train_data and no eval_data, so fit\(\) "):
        Trainer(tuned, run_dir=tmp_path / "a", mesh=ONE_DEVICE()).fit()
    trainer = Trainer(tuned, None, _loader(valid, train=False), config=TrainConfig(steps=3, progress=False),
                      run_dir=tmp_path / "b", mesh=ONE_DEVICE())
    with pytest.raises(ValueError, match=r"^train.steps: there is no train_data to train on; evaluate\(\) scores "):
        trainer.fit()
    assert not (tmp_path / "b").exists()  # refused before the run directory is made


def test_epochs_count_batches_of_the_batch_size_whatever_the_accumulation(setup, tmp_path):
    """``grad_accum_steps`` splits each batch into micro-batches, so an epoch of N rows in batches of 4
    is N // 4 updates with any accumulation (it was N // (4 x k): 1/k of the epoch)."""
    from jaxtune.training import preflight

    model_dir, train, _ = setup
    loader = _loader(train, train=True)
    rows = loader.rows_per_epoch()[0]
    assert [preflight.count_steps(TrainConfig(epochs=1, grad_accum_steps=k), loader) for k in (1, 2, 4)] == [
        rows // 4] * 3
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2))
    with pytest.raises(ValueError, match=r"^train.grad_accum_steps: 3 does not divide data.batch_size 4; "):
        Trainer(tuned, train_data=loader, config=TrainConfig(steps=2, grad_accum_steps=3), run_dir=tmp_path,
                mesh=ONE_DEVICE())


def test_evaluation_settings_without_validation_data_are_refused_or_warned(setup, tmp_path, caplog):
    """Without validation data, best_metric (with use_best and early stopping) was dropped without a word."""
    with pytest.raises(ValueError, match=r"^eval.best_metric: 'loss' is chosen from evaluations, but the run has "
                                         r"no validation data; give validation data \(data.validation"):
        _lora_trainer(setup, tmp_path / "a", 2, eval=EvalConfig(every=1, best_metric="loss", use_best=True))
    with caplog.at_level("WARNING"):
        _lora_trainer(setup, tmp_path / "b", 2, eval=EvalConfig(every=1))
    assert "eval.every: 1, but the run has no validation data, so it evaluates nothing" in caplog.text


def test_non_finite_loss_stops_with_the_step_named(setup, tmp_path, caplog):
    model_dir, train, _ = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.train("norm"))
    tuned.params["norm"]["scale"] = tuned.params["norm"]["scale"].at[0].set(jnp.nan)
    trainer = Trainer(tuned, train_data=_loader(train, train=True), optimizer=OptimizerConfig(),
                      config=TrainConfig(steps=5, log_every=1, progress=False), run_dir=tmp_path,
                      mesh=ONE_DEVICE())
    result = trainer.fit()
    assert result.state == "failed" and result.step == 1
    assert "step 1: the loss or gradient is not finite" in caplog.text
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and "step 1" in status["error"]


def test_an_error_mid_training_leaves_the_run_marked_failed(setup, tmp_path):
    """An exception out of the step loop (a data or device error) propagates, and status.json says
    "failed" with the error, not "running" (which `jaxtune status` and the job server would show for a
    run that is gone)."""
    trainer = _lora_trainer(setup, tmp_path, steps=5)
    step = trainer.train_step

    def step_then_break(*args):
        if trainer.step == 2:
            raise RuntimeError("the device went away")
        return step(*args)

    trainer.train_step = step_then_break
    with pytest.raises(RuntimeError, match="the device went away"):
        trainer.fit()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 2
    assert status["error"] == "RuntimeError: the device went away"
    # Run again: it starts over from step 0 (no checkpoint yet), and the records of the failed attempt's
    # steps are forgotten, in metrics.jsonl and for TensorBoard (a SessionLog START at step 1), not doubled.
    assert _lora_trainer(setup, tmp_path, steps=5).fit().state == "finished"
    steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    from helpers import tfrecords
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    events = [Event.FromString(r) for path in sorted((tmp_path / "tensorboard").iterdir()) for r in tfrecords(path)]
    assert [e.step for e in events if e.session_log.status == SessionLog.START] == [1]


def _script(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=full_env, stderr=subprocess.PIPE, text=True)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]  # a step logged twice (before a kill) keeps the resumed value
    return out


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(setup, tmp_path):
    model_dir, train, _ = setup
    common = ["--model", str(model_dir), "--data", str(train), "--steps", "8", "--save-every", "4"]
    straight = _script(*common, "--run", str(tmp_path / "a"), "--out", str(tmp_path / "a.npz"))
    killed = _script(*common, "--run", str(tmp_path / "b"), "--kill-at", "6")
    assert killed.wait(timeout=600) == -9, killed.stderr.read()[-2000:]
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    resumed = _script(*common, "--run", str(tmp_path / "b"), "--out", str(tmp_path / "b.npz"))
    err = resumed.stderr.read()
    assert resumed.wait(timeout=600) == 0, err[-2000:]
    assert "resumed from" in err and "at step 4" in err
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 0
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bitwise
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_like_one(setup, tmp_path):
    model_dir, train, _ = setup
    # One example per row: a global batch of 4 is then the same 4 records whether one process
    # reads them or two processes read alternate ones (packing would pack each shard apart).
    # 9 evaluation rows, 2 a process a batch: one process has 3 batches, the other 2 (each step a collective:
    # the one with fewer used to leave the other waiting forever)
    valid = write_chat(tmp_path / "valid9.jsonl", 9, seed=3)
    common = ["--model", str(model_dir), "--data", str(train), "--steps", "4", "--batch", "4", "--no-packing",
              "--eval-data", str(valid)]
    single = _script(*common, "--run", str(tmp_path / "one"), "--out", str(tmp_path / "one.npz"),
                     "--eval-out", str(tmp_path / "one.json"), "--generate-out", str(tmp_path / "one-new.json"),
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert single.wait(timeout=600) == 0, single.stderr.read()[-2000:]
    address = f"127.0.0.1:{_free_port()}"
    procs = [_script(*common, "--run", str(tmp_path / "two"), "--out", str(tmp_path / "two.npz"),
                     "--eval-out", str(tmp_path / "two.json"), "--generate-out", str(tmp_path / "two-new.json"),
                     "--coordinator", address,
                     "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([two[k] for k in sorted(two)], [one[k] for k in sorted(one)], rtol=1e-5)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    # fp32, cross-process all-reduce order differs; Adam's normalised updates (lr 1e-2 each) carry
    # those last-bit gradient differences into params at ~1e-5 after 4 steps, 1e-3 of one update
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], atol=3e-5, rtol=0, err_msg=key)
    # Evaluation gathers every process's rows: the same metrics as one process reading them all.
    m1, m2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert m1["tokens"] == m2["tokens"] and 0 < m1["choice_accuracy"] <= 1
    assert m2["choice_accuracy"] == pytest.approx(m1["choice_accuracy"], abs=1e-9)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    # Generation splits the prompts' rows over both processes' devices (3 prompts: a filler row)
    # and gathers them: each process gets every row, the tokens one process generates.
    g1, g2 = (json.loads((tmp_path / f"{n}-new.json").read_text()) for n in ("one", "two"))
    assert [len(row) for row in g1["greedy"]] == [6, 6, 6] and g1["sampled"] != g1["greedy"]
    assert "different_requests" not in g1  # one process: nothing to compare
    assert "passed other prompts or settings than the rest" in g2.pop("different_requests")
    assert g2 == g1


def test_a_resumed_run_with_other_validation_data_scores_its_base_on_that_data(setup, tmp_path):
    """The report compared the base scored on the first validation set with the fine-tuned model scored
    on the new one (data.validation may change on resume): the base is scored again on the new data."""
    other = write_chat(tmp_path / "other.jsonl", 8, seed=5)
    eval_off_cache = EvalConfig(cache_base=False)
    first = _lora_trainer(setup, tmp_path / "run", 2, eval_data=_loader(setup[2], train=False), eval=eval_off_cache)
    scored_first = first.fit().before
    resumed = _lora_trainer(setup, tmp_path / "run", 4, eval_data=_loader(other, train=False), eval=eval_off_cache)
    fresh = _lora_trainer(setup, tmp_path / "fresh", 1, eval_data=_loader(other, train=False), eval=eval_off_cache)
    result = resumed.fit()
    assert result.before == fresh.fit().before != scored_first
    assert json.loads((tmp_path / "run" / "report.json").read_text())["evaluated_on"]["rows"] == 8


def test_rows_longer_than_the_trained_context_of_a_rotary_model_are_warned_of(setup, tmp_path, caplog):
    """A rotary model has no position table to run out of (transformers trains past its context without a
    word), but positions past its config's max_position_embeddings (256 here) are new to it: said once."""
    model_dir, train, valid = setup
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=2), tokenizer=tiny_tokenizer())
    for max_length, warned in ((256, False), (512, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="jaxtune"):
            Trainer(tuned, read_source(train, "chat"), read_source(valid, "chat"), run_dir=tmp_path / str(max_length),
                    mesh=ONE_DEVICE(), data=LoaderConfig(batch_size=4, max_length=max_length))
        said = [r.getMessage() for r in caplog.records if "trained for" in r.getMessage()]
        assert len(said) == warned, said
    assert said[0] == ("data.max_length: rows of 512 positions are longer than the 256 the model was trained for "
                       "(max_position_embeddings in its config.json): rotary positions past it are new to it; set "
                       "data.max_length to 256 or less, or extend the context with rope_scaling in its config.json")


def test_prompt_tuning_rows_must_fit_the_positions_and_stay_unpacked_in_evaluation(tmp_path):
    """Prompt tuning puts its virtual tokens before every row, so a row of data.max_length takes that many
    positions more (GPT-2's learned table read NaN past its end), and a packed row's later examples would be
    scored without them: both were refused for training data only, or not at all."""
    import torch
    import transformers

    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "gpt2")
    rows = "".join(json.dumps({"prompt": "x" * 20, "completion": "y" * n}) + "\n" for n in (4, 6, 8, 10))
    (tmp_path / "val.jsonl").write_text(rows)
    valid = read_source(tmp_path / "val.jsonl", "prompt_completion")
    tuned = tuning.apply_plan(hf.load_pretrained(tmp_path / "gpt2"), tuning.prompt_tuning(4),
                              tokenizer=tiny_tokenizer())

    def trainer(**data):
        return Trainer(tuned, None, valid, run_dir=tmp_path / "run", mesh=ONE_DEVICE(),
                       data=LoaderConfig(batch_size=2, **data), config=TrainConfig(steps=1, progress=False))

    with pytest.raises(ValueError, match=r"^data.max_length: 32 \+ 4 virtual tokens is more than the model's 32 "
                                         r"position embeddings .*; set data.max_length to 28 or less \(the plan's 4"):
        trainer(max_length=32, packing=False)
    with pytest.raises(ValueError, match="^data.packing: prompt tuning prepends its virtual tokens"):
        trainer(max_length=28)  # an LM source packs by default, in evaluation too
    fits = trainer(max_length=28, packing=False)
    assert math.isfinite(fits.evaluate()["loss"])
    with pytest.raises(ValueError, match="^data.packing: prompt tuning"):
        Trainer(tuned, None, None, run_dir=tmp_path / "run2", mesh=ONE_DEVICE(), config=TrainConfig(steps=1),
                data=LoaderConfig(batch_size=2, max_length=28)).evaluate(valid)


def test_a_resumed_run_does_not_end_with_a_best_checkpoint_it_never_made(setup, tmp_path):
    """An attempt killed after saving best/4 but before its step-4 checkpoint resumes from step 2. Only one best
    is kept, so best/4 had replaced best/2; the resumed run (here: nothing left to train, or another eval.every
    that never scores step 4) ended with best/4's weights under step 2's name. Now later bests are set aside and
    the resumed step's own best is saved again: the result equals the uninterrupted 2-step run's."""
    import shutil

    from flax.traverse_util import flatten_dict

    from jaxtune.training.config import CheckpointConfig

    model_dir, train, valid = setup

    def run(run_dir, steps):
        tuned = tuning.apply_plan(hf.load_pretrained(model_dir), tuning.lora(rank=2, alpha=4))
        return Trainer(tuned, train_data=_loader(train, train=True), eval_data=_loader(valid, train=False),
                       optimizer=OptimizerConfig(learning_rate=3e-2, warmup_steps=1, schedule="constant"),
                       config=TrainConfig(steps=steps, log_every=1, progress=False, compile_cache=False),
                       eval=EvalConfig(every=1, best_metric="loss", use_best=True, before=False),
                       checkpoint=CheckpointConfig(every=2), run_dir=run_dir, mesh=ONE_DEVICE()).fit()

    attempt = run(tmp_path / "run", 4)
    assert attempt.best["step"] > 2 and [p.name for p in (tmp_path / "run" / "best").iterdir() if p.name.isdigit()] \
        == [str(attempt.best["step"])]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # killed before the step-4 checkpoint
    reference = run(tmp_path / "reference", 2)
    resumed = run(tmp_path / "run", 2)
    assert resumed.best["step"] == reference.best["step"] == 2
    ours, theirs = flatten_dict(resumed.model.params), flatten_dict(reference.model.params)
    assert all(np.array_equal(np.asarray(ours[k]), np.asarray(theirs[k])) for k in theirs)
