"""Never lose a run, never restore garbage (issue 19).

Every damage to the latest checkpoint is caught (checksums catch what Orbax restores without
noticing: a flipped bit), the step is moved aside, reported and re-saved, and the run still ends
bitwise equal to one that was never damaged. A learning rate that overflows the params stops
training before non-finite state reaches disk. Killing a run during its saves never breaks the
resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_hf_model

from jaxtune import tuning
from jaxtune.data import LoaderConfig, make_loader, read_source
from jaxtune.data.testing import tiny_tokenizer
from jaxtune.models import hf
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.checkpoint_integrity import MANIFEST, SET_ASIDE, verify
from jaxtune.training.checkpoint_integrity import write_manifest as _original_write_manifest
from jaxtune.training.config import CheckpointConfig, TrainConfig
from jaxtune.training.sharding import MeshConfig, make_mesh
from jaxtune.training.step import make_train_step
from jaxtune.training.trainer import Trainer

SCRIPT = Path(__file__).with_name("train_script.py")
ITEMS = ("trainable", "opt_state", "meta", "data")
DAMAGES = ("truncated", "zeroed", "deleted", "garbled", "flipped_byte", "flipped_bit")
STEPS, SAVE_EVERY, CRASH_AT = 12, 4, 9  # checkpoints 4 and 8 on disk when the first attempt crashes


def _write_chat(path: Path, n: int) -> Path:
    rng = np.random.RandomState(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    with open(path, "w") as fh:
        for _ in range(n):
            q = " ".join(rng.choice(words, rng.randint(1, 5)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": q.upper()}]}) + "\n")
    return path


class _Crash(Exception):
    """Stands in for a process dying after the step-8 checkpoint was written."""


@dataclasses.dataclass
class _Run:
    """What every case shares: the model, the data, one compiled train step, a reference run."""

    model_dir: Path
    data: Path
    tuned: tuning.Tuned
    host_params: dict
    step_fn: Callable | None = None

    def trainer(self, run_dir: Path, *, steps: int = STEPS, optimizer=None, save_every: int = SAVE_EVERY,
                callbacks=(), keep: int = 3, log_every: int = 1) -> Trainer:
        # Fresh device buffers per trainer: the step donates them.
        tuned = dataclasses.replace(self.tuned, params=jax.tree.map(np.array, self.host_params))
        loader = make_loader(read_source(self.data, "chat"), tiny_tokenizer(),
                             LoaderConfig(batch_size=4, max_length=64, num_epochs=None, seed=0), scan_first=False)
        trainer = Trainer(tuned, train_data=loader, optimizer=optimizer or optax.adam(1e-2),
                          config=TrainConfig(steps=steps, log_every=log_every, progress=False),
                          checkpoint=CheckpointConfig(every=save_every, keep=keep),
                          run_dir=run_dir, mesh=make_mesh(MeshConfig(), jax.devices()[:1]), callbacks=list(callbacks))
        if optimizer is None:  # the same computation every time: compile it once for the whole file
            self.step_fn = self.step_fn or trainer.train_step
            trainer.train_step = self.step_fn
        return trainer


def _final(trainer: Trainer) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(trainer.trainable))


def _assert_bitwise_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path), strict=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> _Run:
    root = tmp_path_factory.mktemp("integrity")
    tiny_hf_model("LlamaForCausalLM", root / "model")
    # Rank 8: each LoRA factor (2 KiB) is above Orbax's 1 KiB inline limit, so it is stored in a
    # data file that no Orbax checksum covers (smaller values sit in CRC-32C-checked b-tree nodes).
    tuned = tuning.apply_plan(hf.load_pretrained(root / "model"), tuning.lora(rank=8, alpha=16))
    return _Run(root / "model", _write_chat(root / "train.jsonl", 64), tuned, jax.device_get(tuned.params))


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory) -> dict:
    """Final params of a run that was never interrupted."""
    trainer = run.trainer(tmp_path_factory.mktemp("straight"))
    assert trainer.fit().state == "finished"
    return _final(trainer)


@pytest.fixture(scope="module")
def crashed(run, tmp_path_factory) -> Path:
    """A run directory whose first attempt died at step 9: checkpoints 4 and 8, 8 the latest."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"

    def crash(trainer, step, metrics):
        if step == CRASH_AT:
            raise _Crash

    with pytest.raises(_Crash):
        run.trainer(run_dir, callbacks=[crash]).fit()
    assert Checkpointer(run_dir).steps() == [4, 8]
    return run_dir


def _victim(item_dir: Path) -> Path:
    """The item's largest file: for params and optimizer state, the array data."""
    return max((p for p in item_dir.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, str(p)))


def damage(item_dir: Path, how: str) -> Path:
    """Damage one item of a checkpoint as disks and people do; returns the file (or dir) hit."""
    if how == "deleted":
        shutil.rmtree(item_dir)
        return item_dir
    victim = _victim(item_dir)
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    if how == "truncated":
        data = data[:middle]
    elif how == "zeroed":
        data = bytearray(len(data))
    elif how == "garbled":
        noise = np.random.RandomState(1).randint(0, 256, 64, dtype=np.uint8).tobytes()
        data[middle:middle + 64] = noise[: len(data) - middle]
    elif how == "flipped_byte":
        data[middle] ^= 0xFF
    elif how == "flipped_bit":
        data[middle] ^= 0x01
    else:
        raise ValueError(how)
    assert bytes(data) != victim.read_bytes()
    victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("item", ITEMS)
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_ends_bitwise_equal(run, reference, crashed, tmp_path,
                                                                               caplog, item, how):
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    hit = damage(run_dir / "checkpoints" / "8" / item, how)
    damaged_bytes = None if how == "deleted" else hit.read_bytes()
    caplog.clear()

    trainer = run.trainer(run_dir)
    result = trainer.fit()

    err = caplog.text
    reports = [line for line in err.splitlines() if "checkpoint is incomplete or corrupt" in line]
    assert len(reports) == 1, err  # one line, naming the step, why, where it went, and what comes next
    assert re.search(r"checkpoints/8: checkpoint is incomplete or corrupt \(.+\); moved to .*/checkpoints/"
                     + re.escape(SET_ASIDE) + r"/8-\d{8}T\d{6}; falling back to step 4$", reports[0]), reports[0]
    assert item in reports[0] or how == "deleted" and "missing" in reports[0]
    assert "checkpoints/4 at step 4" in err
    assert result.state == "finished" and result.step == STEPS
    # The damaged step is kept, as it was damaged, for inspection; its number was saved again.
    (moved,) = (run_dir / "checkpoints" / SET_ASIDE).glob("8-*[0-9]")
    assert "checkpoint is incomplete or corrupt" in moved.with_name(moved.name + ".why.txt").read_text()
    if damaged_bytes is not None:
        assert (moved / hit.relative_to(run_dir / "checkpoints" / "8")).read_bytes() == damaged_bytes
    else:
        assert not (moved / item).exists()
    with Checkpointer(run_dir) as checkpointer:
        assert checkpointer.steps() == [4, 8, 12]
        assert checkpointer.latest_good_step() == 12
    assert verify(run_dir / "checkpoints" / "8") is None
    _assert_bitwise_equal(_final(trainer), reference)
    assert run.step_fn._cache_size() == 1  # every trainer of this file ran the one compiled step


def test_orbax_restores_a_flipped_bit_without_noticing(run, crashed, tmp_path):
    """Why the checksums: Orbax 0.12.8 checks only its b-tree nodes (CRC-32C), not the array data."""
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    step_dir = run_dir / "checkpoints" / "8"
    clean = ocp.StandardCheckpointer().restore(step_dir / "trainable")
    damage(step_dir / "trainable", "flipped_bit")
    flipped = ocp.StandardCheckpointer().restore(step_dir / "trainable")  # no error from Orbax
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(flipped))]
    assert sum(changed) == 1
    assert "does not match its sha256" in verify(step_dir)


def test_every_checkpoint_damaged_starts_fresh_and_saves_over_every_step(run, reference, crashed, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    damage(run_dir / "checkpoints" / "8" / "meta", "flipped_bit")
    damage(run_dir / "checkpoints" / "4" / "trainable", "truncated")
    trainer = run.trainer(run_dir)
    assert trainer.fit().state == "finished"
    err = caplog.text
    assert "checkpoints/8: checkpoint is incomplete or corrupt" in err and "falling back to step 4" in err
    assert "checkpoints/4: checkpoint is incomplete or corrupt" in err and "starting fresh" in err
    assert sorted(p.name.split("-")[0] for p in (run_dir / "checkpoints" / SET_ASIDE).glob("*[0-9]")) == ["4", "8"]
    assert Checkpointer(run_dir).steps() == [4, 8, 12]
    _assert_bitwise_equal(_final(trainer), reference)


def test_a_save_without_its_manifest_is_not_trusted(run, crashed, tmp_path, capsys):
    """A manifest is written inside Orbax's temporary directory, just before the rename that
    makes the step appear: a step without one did not finish saving."""
    run_dir = tmp_path / "run"
    shutil.copytree(crashed, run_dir)
    (run_dir / "checkpoints" / "8" / MANIFEST).unlink()
    with Checkpointer(run_dir, report=print) as checkpointer:
        assert checkpointer.latest_good_step() == 4
        assert [(s.step, s.moved_to.parent.name) for s in checkpointer.set_aside] == [(8, SET_ASIDE)]
    assert f"no {MANIFEST}" in capsys.readouterr().out


def test_damaged_best_checkpoint_is_set_aside(run, tmp_path, capsys):
    trainable = {"w": jnp.arange(64.0)}
    with Checkpointer(tmp_path, with_data=False, report=print) as checkpointer:
        checkpointer.save_best(3, trainable, {"loss": 1.0})
    with Checkpointer(tmp_path, with_data=False) as checkpointer:
        got, meta = checkpointer.restore_best(trainable)
        np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(64.0))
        assert meta["step"] == 3
    damage(tmp_path / "best" / "3" / "trainable", "flipped_bit")
    with Checkpointer(tmp_path, with_data=False, report=print) as checkpointer:
        assert checkpointer.restore_best(trainable) is None
        checkpointer.save_best(3, trainable, {"loss": 1.0})  # the number is free again
    assert re.search(r"best/3: checkpoint is incomplete or corrupt \(.*sha256.*\); moved to .*best/\.set_aside/3-",
                     capsys.readouterr().out)
    with Checkpointer(tmp_path, with_data=False) as checkpointer:
        assert checkpointer.restore_best(trainable) is not None


def test_a_best_checkpoint_damaged_before_the_end_leaves_the_run_its_latest_params(run, tmp_path, caplog):
    """eval.use_best ends a run with its best checkpoint; one damaged on disk is set aside, and the
    run still finishes, with its latest params (it must not fail at its last line, nor again on resume)."""
    tuned = dataclasses.replace(run.tuned, params=jax.tree.map(np.array, run.host_params))
    config = LoaderConfig(batch_size=4, max_length=64, num_epochs=None, seed=0)
    loader = make_loader(read_source(run.data, "chat"), tiny_tokenizer(), config, scan_first=False)
    valid = make_loader(read_source(run.data, "chat"), tiny_tokenizer(),
                        dataclasses.replace(config, num_epochs=1, shuffle=False), scan_first=False)

    from jaxtune.training.config import EvalConfig

    trainer = Trainer(tuned, loader, valid, run_dir=tmp_path, config=TrainConfig(steps=4, log_every=1, progress=False),
                      optimizer=optax.adam(1e-2), eval=EvalConfig(every=2, best_metric="loss", use_best=True),
                      checkpoint=CheckpointConfig(every=2), mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    finish = trainer._finish

    def damage_best_then_finish(result):  # after the loop, before the run restores its best
        trainer.checkpointer.wait()
        for step_dir in (tmp_path / "best").iterdir():
            if step_dir.name.isdigit():
                damage(step_dir / "trainable", "flipped_bit")
        finish(result)

    trainer._finish = damage_best_then_finish
    with caplog.at_level("WARNING", logger="jaxtune"):
        result = trainer.fit()
    assert result.state == "finished" and result.model.step == 4, caplog.text
    assert "was damaged and set aside; the run ends with its latest params (step 4)" in caplog.text


def test_a_best_checkpoint_from_beyond_the_resume_point_makes_way(tmp_path, capsys):
    """A run that kept step 8 as best, died, and resumed from 4 must be able to keep 6 (or 8) as
    best: Orbax would refuse 8 (exists) and, keeping one, drop 6 for the stale 8."""
    trainable = {"w": jnp.zeros(4)}
    with Checkpointer(tmp_path, with_data=False) as checkpointer:
        checkpointer.save_best(8, trainable, {"loss": 1.0})
    with Checkpointer(tmp_path, with_data=False, report=print) as checkpointer:
        checkpointer.save_best(6, {"w": jnp.ones(4)}, {"loss": 0.5})
        got, meta = checkpointer.restore_best(trainable)
    assert meta["step"] == 6 and np.asarray(got["w"]).tolist() == [1.0] * 4
    assert "best/8: best checkpoint of an earlier attempt" in capsys.readouterr().out


def test_checkpointer_closes_and_refuses_use_after(tmp_path):
    trainable = {"w": jnp.zeros(4)}
    with Checkpointer(tmp_path, with_data=False) as checkpointer:
        checkpointer.save(1, trainable, {}, jax.random.key(0))
    checkpointer.close()  # twice is fine
    assert checkpointer.steps() == [1] and checkpointer.latest_good_step() == 1  # read from disk
    with pytest.raises(RuntimeError, match="is closed; open a new one"):
        checkpointer.save(2, trainable, {}, jax.random.key(0))


@pytest.mark.parametrize("async_save", [True, False])
def test_the_manifest_is_written_before_the_step_appears(tmp_path, monkeypatch, async_save):
    """Asynchronous saves write it into Orbax's temporary directory, so the rename that makes the
    step appear also publishes its manifest: a kill can never leave a step without one. (A
    synchronous save writes it just after; a step left without one is then set aside.)"""
    from jaxtune.training import checkpoint

    written = []

    def recording(step_dir: Path) -> None:
        written.append(step_dir.name)
        _original_write_manifest(step_dir)

    monkeypatch.setattr(checkpoint, "write_manifest", recording)
    with Checkpointer(tmp_path, with_data=False, async_save=async_save) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, {"w": jnp.full(300, float(step))}, {}, jax.random.key(0))
    assert written == (["1.orbax-checkpoint-tmp", "2.orbax-checkpoint-tmp"] if async_save else ["1", "2"])
    assert all(verify(tmp_path / "checkpoints" / str(step)) is None for step in (1, 2))


def test_leftover_temporary_dirs_are_removed_once_and_never_raced(tmp_path):
    """Orbax's own clean-up of a killed save's temporary directory runs in a background thread per
    manager; two managers opened on one directory (as a run did) raced on it (FileNotFoundError).
    Ours runs synchronously at open and tolerates files vanishing under it."""
    leftover = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"
    for i in range(3000):  # enough files for two clean-ups to overlap (Orbax's raced 5 times in 5)
        (leftover / f"d{i % 30}").mkdir(parents=True, exist_ok=True)
        (leftover / f"d{i % 30}" / f"f{i}").write_bytes(b"x")
    trainable = {"w": jnp.zeros(4)}
    Checkpointer(tmp_path, with_data=False).steps()  # as run.py does before training: never closed
    first, second = Checkpointer(tmp_path, with_data=False), Checkpointer(tmp_path, with_data=False)
    with first, second:
        first._open_latest(), second._open_latest()  # the worst case: two managers at once
        assert second.restore(trainable, {}) is None
        first.save(1, trainable, {}, jax.random.key(0))
        first.wait()
    assert not leftover.exists()
    assert first.steps() == [1] and verify(tmp_path / "checkpoints" / "1") is None


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("log_every", [1, 3])
def test_overflowing_learning_rate_stops_before_non_finite_params_reach_disk(run, tmp_path, caplog, log_every):
    """Loss and gradient stay finite; the update alone overflows (an lr beyond float32's range
    from step 4 on). The run stops at that step, names it, and every checkpoint holds finite
    values, also when the host reads the steps' metrics only every 3 steps (saves every step)."""
    schedule = lambda count: jnp.where(count < 3, 1e-3, 1e39)
    trainer = run.trainer(tmp_path, steps=8, save_every=1, keep=10, optimizer=optax.sgd(schedule),
                          log_every=log_every)
    result = trainer.fit()
    err = caplog.text
    assert result.state == "failed" and result.step == 4
    assert ("step 4: the update made the params or optimizer state non-finite (nan/inf); training stopped, and no "
            "state from that step on was saved or evaluated. Last good checkpoint: 3.") in err
    steps = Checkpointer(tmp_path).steps()
    assert steps == [1, 2, 3]
    for step in steps:
        for item in ("trainable", "opt_state"):
            tree = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / item)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)), (step, item)


def test_an_optimizer_state_that_overflows_is_reported():
    """float16 params: Adam's second moment g² overflows (g = 300 > sqrt(65504)) while the loss,
    the gradient (its norm is taken in float32) and the update (m / sqrt(inf) = 0) stay finite.
    A guard on the loss and gradient alone let that state through, and it silently stopped all
    learning; the step's ``finite`` covers the new optimizer state."""
    def loss_fn(params, batch, rng, deterministic):
        return jnp.sum(params["w"].astype(jnp.float32) * 300.0), jnp.asarray(1.0), jnp.zeros(())

    optimizer = optax.adam(1e-3)
    params = {"w": jnp.ones(3, jnp.float16)}
    opt_state = optimizer.init(params)
    batch = {"input_ids": jnp.zeros((1, 1), jnp.int32)}
    unguarded = optimizer.update({"w": jnp.full(3, 300.0, jnp.float16)}, opt_state, params)
    assert not np.isfinite(np.asarray(unguarded[1][0].nu["w"])).all()  # what the check is for
    _, new_opt, metrics = jax.jit(make_train_step(loss_fn, optimizer))(params, {}, opt_state, batch,
                                                                     jax.random.key(0))
    assert not np.isfinite(np.asarray(new_opt[0].nu["w"])).all()
    assert bool(metrics["grad_finite"]) and not bool(metrics["finite"])


# ------------------------------------------------------------------ SIGKILL during saves


def _script(run: _Run, run_dir: Path, out: Path, cache: Path, then_run: Path | None) -> subprocess.Popen:
    """train_script.py: 6 steps in ``run_dir`` (resumed if it has a checkpoint), saved to ``out``; then,
    in the same process, a fresh run in ``then_run``."""
    args = ["--model", str(run.model_dir), "--data", str(run.data), "--steps", "6", "--save-every", "1",
            "--run", str(run_dir), "--out", str(out), *(["--then-run", str(then_run)] if then_run else [])]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           # compile once for all the runs below (bitwise the same program)
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stderr=subprocess.PIPE, text=True)


def _kill_during_a_save(proc: subprocess.Popen, checkpoints: Path, rng: random.Random) -> bool:
    """SIGKILL ``proc`` a random moment after one of its saves begins (a random one of the
    first few); True when the save was still unfinished (its temporary directory left behind)."""
    target, seen, last = rng.randint(1, 4), 0, None
    while proc.poll() is None:
        tmp = next(iter(checkpoints.glob("*.orbax-checkpoint-tmp")), None) if checkpoints.is_dir() else None
        if tmp is not None and tmp.name != last:
            seen, last = seen + 1, tmp.name
            if seen == target:
                time.sleep(rng.uniform(0, 0.05))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return any(checkpoints.glob("*.orbax-checkpoint-tmp"))
        time.sleep(0.0005)
    raise AssertionError(f"the run ended before its save number {target}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_sigkill_during_saves_never_breaks_a_resume(run, tmp_path):
    """Ten runs SIGKILLed a random moment into a save each resume to the uninterrupted run's params,
    bitwise. A process finishes one run (the uninterrupted one, or the previous trial's resume: the
    first thing it does, as a fresh process would) and then starts the next trial's run, the one
    killed: 11 process starts, not 21 (each is seconds of imports)."""
    cache = tmp_path / "jax_cache"
    rng = random.Random(19)
    mid_save, trials, want = 0, 10, None
    for trial in range(trials + 1):
        finished = "straight" if trial == 0 else f"trial{trial - 1}"
        killed = tmp_path / f"trial{trial}" if trial < trials else None
        proc = _script(run, tmp_path / finished, tmp_path / f"{finished}.npz", cache, then_run=killed)
        if killed is not None:
            mid_save += _kill_during_a_save(proc, killed / "checkpoints", rng)
        err = proc.stderr.read()
        assert proc.wait(timeout=600) == (0 if killed is None else -9), err[-3000:]
        assert "Traceback" not in err and "done step=6 state=finished" in err, err[-3000:]
        got = np.load(tmp_path / f"{finished}.npz")
        if want is None:
            want = got
            continue
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{finished}: {key}")
    print(f"{mid_save} of {trials} kills left a save unfinished; every resume finished bitwise equal")
    assert mid_save >= 5, f"only {mid_save} of {trials} kills landed inside a save; the test no longer tests that"


def test_a_reader_changes_nothing_on_disk_of_a_run_that_may_be_training(tmp_path, capsys):
    """Evaluation, export and generation read a run that may be training in another process: its
    save in flight (a temporary directory) stays, a damaged step is skipped, not moved (the trainer
    sets it aside itself), and the next older step is read; a reader cannot save."""
    trainable = {"w": jnp.arange(8.0)}
    with Checkpointer(tmp_path, with_data=False) as writer:
        for step in (4, 8):
            writer.save(step, jax.tree.map(lambda x, s=step: x + s, trainable), {}, jax.random.key(0))
        writer.save_best(4, trainable, {"loss": 1.0})
    in_flight = tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1733"
    (in_flight / "trainable").mkdir(parents=True)
    damage(tmp_path / "checkpoints" / "8" / "trainable", "flipped_bit")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with Checkpointer(tmp_path, with_data=False, report=print, read_only=True) as reader:
        step, got, *_ = reader.restore(trainable, {})
        assert step == 4 and np.asarray(got["w"]).tolist() == (np.arange(8.0) + 4).tolist()
        assert reader.restore_best(trainable) is not None
        with pytest.raises(RuntimeError, match="reads only"):
            reader.save(9, trainable, {}, jax.random.key(0))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert re.search(r"checkpoints/8: checkpoint is incomplete or corrupt .*; skipped, left in place \(read-only\); "
                     "falling back to step 4", capsys.readouterr().out)


def test_a_restore_hashes_each_file_of_the_step_it_restores_once(run, crashed, tmp_path, monkeypatch):
    """Verifying reads every byte of a step: a reader (evaluation, export, serving) verified the
    newest step to find it, then again to restore it. Each file of step 8 is hashed once; step 4,
    older and not needed, not at all."""
    from jaxtune.training import checkpoint_integrity

    shutil.copytree(crashed, tmp_path / "run")
    hashed: list[Path] = []
    sha256 = checkpoint_integrity._sha256

    def counted(path: Path) -> str:
        hashed.append(path.relative_to(tmp_path / "run" / "checkpoints"))
        return sha256(path)

    monkeypatch.setattr(checkpoint_integrity, "_sha256", counted)
    trainer = run.trainer(tmp_path / "run")
    try:
        assert trainer.restore() == 8
        with pytest.raises(ValueError, match=r"restore\(best=True, step=4\): the best checkpoint and step 4 are two "
                                             "checkpoints; give one"):
            trainer.restore(best=True, step=4)
    finally:
        trainer.close()
    in_manifest = json.loads((tmp_path / "run" / "checkpoints" / "8" / MANIFEST).read_text())["files"]
    assert sorted(map(str, hashed)) == sorted(f"8/{rel}" for rel in in_manifest)


def _two_steps(tmp_path: Path) -> dict:
    trainable = {"w": jnp.arange(8.0)}
    with Checkpointer(tmp_path, with_data=False) as writer:
        for step in (4, 8):
            writer.save(step, jax.tree.map(lambda x, s=step: x + s, trainable), {}, jax.random.key(0))
    return trainable


@pytest.mark.parametrize("when", ["verified", "read"])
def test_a_step_the_runs_rotation_removes_while_a_reader_has_it_is_skipped(tmp_path, monkeypatch, capsys, when):
    """A training run's rotation (checkpoint.keep) deletes its oldest step whenever it saves: a
    reader verifying or reading that step saw a raw FileNotFoundError, or was told the intact step
    "does not restore into this run's params". It skips it, says so, and reads the next older one."""
    from jaxtune.training import checkpoint_integrity

    trainable = _two_steps(tmp_path)
    name, owner = ("_sha256", checkpoint_integrity) if when == "verified" else ("_restore_step", Checkpointer)
    real = getattr(owner, name)

    def rotated_then(*args, **kwargs):
        if (tmp_path / "checkpoints" / "8").is_dir():
            shutil.rmtree(tmp_path / "checkpoints" / "8")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, rotated_then)
    with Checkpointer(tmp_path, with_data=False, report=print, read_only=True) as reader:
        step, got, *_ = reader.restore(trainable, {})
    assert step == 4 and np.asarray(got["w"]).tolist() == (np.arange(8.0) + 4).tolist()
    assert re.search(r"checkpoints/8: checkpoint removed while it was read \(the run's rotation, checkpoint.keep, "
                     r"removes old ones\); skipped; falling back to step 4", capsys.readouterr().out)
    assert not (tmp_path / "checkpoints" / SET_ASIDE).exists()


def test_a_step_asked_for_by_number_is_that_step_or_a_clear_error(tmp_path):
    """Serving a job's checkpoint restores exactly that step, not the newest; one not (or no longer)
    there, or damaged, is an error naming it, and nothing is moved, even by a writer."""
    from jaxtune.training.checkpoint import CheckpointDamagedError, CheckpointGoneError

    trainable = _two_steps(tmp_path)
    for read_only in (True, False):
        with Checkpointer(tmp_path, with_data=False, read_only=read_only) as reader:
            step, got, *_ = reader.restore(trainable, {}, step=4)
            assert step == 4 and np.asarray(got["w"]).tolist() == (np.arange(8.0) + 4).tolist()
            with pytest.raises(CheckpointGoneError, match=r"checkpoints/6: no such checkpoint .*checkpoint.keep.*"
                                                          r"those there: \[4, 8\]"):
                reader.restore(trainable, {}, step=6)
    damage(tmp_path / "checkpoints" / "8" / "trainable", "flipped_bit")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for read_only in (True, False):
        with Checkpointer(tmp_path, with_data=False, read_only=read_only) as reader:
            with pytest.raises(CheckpointDamagedError, match=r"checkpoints/8: the checkpoint does not verify "
                                                             r"\(trainable/.* does not match its sha256"):
                reader.restore(trainable, {}, step=8)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
