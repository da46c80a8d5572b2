"""Jobs the multi-process tests (tests/test_processes.py) run as several JAX processes on one machine.

python tests/processes_script.py COORDINATOR PROCESS_ID NUM_PROCESSES JOBS_JSON

JOBS_JSON maps each job to its ARGS, the jobs run in that order by the same processes (each
launch imports JAX and jaxtune and connects, seconds the tests pay once for several jobs):

export   {"model", "out"}: the tiny Llama's LoRA plan, its params (drawn with key 0, then scaled by
         1.01 and shifted by 0.001, so that the adapters are not zero) split over the processes' devices
         (an fsdp mesh), exported as a PEFT adapter to OUT/peft and merged to OUT/merged.
predict  {"run", "data", "out"}: ``jaxtune.predict`` of the run directory on the file, packed as the run
         trained (to OUT/predictions.jsonl) and one row per sequence; then one row per sequence by the
         run's model in memory, its params on the run's mesh ("on_mesh") and whole on each process ("held").
restart  {"recipe", "out", "delay"}: ``jaxtune.finetune(recipe, restart=True)``, process 0 moving the old
         run aside ``delay`` seconds late.
dpo      {"model", "train", "out"}: :func:`dpo_run` in OUT/run.
dpo_fails {"model", "train", "out"}: :func:`dpo_fails`, which raises on process 1 computing the reference.
base_fails {"model", "train", "out"}: :func:`base_fails`, which raises on process 1.
export_fails {"model", "out"}: export's PEFT export, process 0 raising MemoryError in the second gather.
predict_fails {"run", "data", "out"}: ``jaxtune.predict`` of the run directory on the file's rows, row 3
         (process 1's second) raising when process 1 reads it (as a corrupt image file would).
evaluate_fails {"run", "data", "out"}: the run's ``Trainer.evaluate`` (``jaxtune eval``) on those rows.
setup_fails {"model", "train", "out"}: :func:`setup_fails`, the run directory unreadable on process 1 alone.
optimizer_fails {"model", "train", "out"}: :func:`optimizer_fails`, the optimizer state failing on process 1 alone.
read_fails {"model", "train", "out"}: :func:`read_fails`, the recipe's training file missing on process 1's host.
restore_fails {"model", "train", "out", "failing"}: :func:`restore_fails`, a checkpoint unreadable on one process
         alone (``failing``, 1 unless given).
score_fails {"model", "train", "out", "when", "failing"}: :func:`score_fails`, the base model's score ("before") or
         the trained model's ("after") raising on process ``failing`` alone.
late_fails {"out"}: :func:`late_fails`, process 0 raising in a block the other process has left.
open_fails {"model", "train", "out"}: :func:`open_fails`, ``jaxtune.open_run`` of a run whose checkpoint
         process 1 alone cannot read, then an evaluation.

After each job, each process writes OUT/<job>-<process>.json: what the job returned on it, and the
weights and prediction files it wrote (``written``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def export(args: dict[str, Any]) -> dict[str, Any]:
    import jaxtune as jt

    model, out = _split_model(args), Path(args["out"])
    return {"peft": str(jt.export(model, out / "peft")),
            "merged": str(jt.export(model, out / "merged", format="merged"))}


def export_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`export`'s PEFT export, process 0 running out of host memory gathering the second split param."""
    import jax
    from jax.experimental import multihost_utils

    import jaxtune as jt

    model = _split_model(args)
    gather, calls = multihost_utils.process_allgather, []

    def short_of_memory(*a: Any, **k: Any) -> Any:
        calls.append(None)
        if len(calls) == 2 and jax.process_index() == 0:
            raise MemoryError("gathering a param on process 0")
        return gather(*a, **k)

    multihost_utils.process_allgather = short_of_memory
    return {"peft": str(jt.export(model, Path(args["out"]) / "peft"))}


def _split_model(args: dict[str, Any]) -> Any:
    """The tiny Llama's LoRA model of :func:`export`, its params split over the processes' devices."""
    import jax
    import numpy as np

    from jaxtune import tuning
    from jaxtune.models import hf
    from jaxtune.training.sharding import MeshConfig, make_mesh, param_shardings, shard

    tuned = tuning.apply_plan(hf.load_pretrained(args["model"]), tuning.lora(rank=4, alpha=8), jax.random.key(0))
    params = jax.tree.map(lambda x: np.asarray(x) * np.asarray(1.01, x.dtype) + np.asarray(0.001, x.dtype),
                          tuned.params)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    params = shard(params, param_shardings(params, mesh, tuned.partition_rules))
    split = [x for x in jax.tree.leaves(params) if not x.is_fully_addressable and not x.is_fully_replicated]
    assert split, "no param is split over the processes: the job would not test gathering them"
    return dataclasses.replace(tuned, params=params, step=1)


def predict(args: dict[str, Any]) -> dict[str, Any]:
    import jaxtune as jt
    from jaxtune import prediction, processes

    shares = []
    loader = prediction.evaluation_loader

    def spy(*a: Any, **k: Any) -> Any:
        made = loader(*a, **k)
        shares.append([made.shard_index, made.shard_count])
        return made

    prediction.evaluation_loader = spy
    packed = jt.predict(args["run"], args["data"], out=Path(args["out"]) / "predictions.jsonl")
    unpacked = jt.predict(args["run"], args["data"], packing=False)
    model = jt.open_run(args["run"]).model  # in memory, its params on the run's mesh (as fit().model's are)
    on_mesh = jt.predict(model, args["data"], packing=False)
    held = jt.predict(dataclasses.replace(model, params=processes.on_host(model.params)), args["data"], packing=False)
    return {"packed": packed, "unpacked": unpacked, "on_mesh": on_mesh, "held": held, "shares": shares}


def dpo(args: dict[str, Any]) -> dict[str, Any]:
    from jaxtune.data.packing import ANSWER_INDEX

    trainer = dpo_trainer(args)
    shape, _ = trainer.train_data.batch_spec()[ANSWER_INDEX]
    return {"state": trainer.fit().state, "answer_width": shape[-1]}


def dpo_trainer(args: dict[str, Any], mesh: Any = None) -> Any:
    """3 steps of LoRA-DPO with the reference log-probs computed before training (`reference: cached`),
    4 pairs a batch, one a row (packing packs each process's share apart); the test runs it on one process too."""
    import jaxtune as jt

    train, _ = jt.read(args["train"], kind="preference")
    tuned = jt.apply_plan(jt.load(args["model"]), jt.lora(rank=4, alpha=8))
    return jt.Trainer(tuned, train, run_dir=Path(args["out"]) / "run", mesh=mesh,
                      config=jt.TrainConfig(steps=3, log_every=1, progress=False),
                      data=jt.DataConfig(batch_size=4, max_length=48, packing=False),
                      preference=jt.PreferenceConfig(method="dpo", beta=0.5, reference="cached"),
                      optimizer=jt.OptimizerConfig(learning_rate=1e-2, schedule="constant"))


def dpo_run(args: dict[str, Any], mesh: Any = None) -> Any:
    """:func:`dpo_trainer`'s run."""
    return dpo_trainer(args, mesh).fit()


def dpo_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`dpo_run`, pair 3 raising on process 1 when the reference pre-pass reads it (its second
    read: the data check before reads every pair), as a flaky file system could."""
    import jax

    from jaxtune.data.preference import PreferenceSource

    read, reads = PreferenceSource.__getitem__, []

    def flaky(self: PreferenceSource, index: int) -> dict:
        if index == 3 and jax.process_index() == 1:
            reads.append(index)
            if len(reads) == 2:
                raise OSError("pair 3: a read that failed on process 1")
        return read(self, index)

    PreferenceSource.__getitem__ = flaky
    return {"state": dpo_run(args).state}


def base_fails(args: dict[str, Any]) -> dict[str, Any]:
    """LoRA on the tiny Llama in OUT/run, scoring the base model first on rows whose second batch raises
    on process 1 alone (as a corrupt file could)."""
    import jax

    import jaxtune as jt
    from jaxtune.data import LoaderConfig, make_loader, read_source
    from jaxtune.data.testing import tiny_tokenizer

    rows = make_loader(read_source(args["train"], "chat"), tiny_tokenizer(),
                       LoaderConfig(batch_size=4, max_length=48, num_epochs=1, shuffle=False, drop_remainder=False),
                       scan_first=False)

    class Failing:
        def __iter__(self) -> Any:
            for i, batch in enumerate(rows):
                if i == 1 and jax.process_index() == 1:
                    raise OSError("rows.jsonl: a row process 1 cannot read")
                yield batch

    tuned = jt.apply_plan(jt.load(args["model"]), jt.lora(rank=4, alpha=8))
    result = jt.Trainer(tuned, rows, Failing(), run_dir=Path(args["out"]) / "run",
                        config=jt.TrainConfig(steps=2, progress=False),
                        eval=jt.EvalConfig(before=True, cache_base=False)).fit()
    return {"state": result.state}


def _lora_run(args: dict[str, Any], steps: int, **trainer: Any) -> Any:
    """``steps`` steps of LoRA on the tiny Llama in OUT/run, 4 chat rows a batch, without the base and final
    scores unless ``trainer`` (more of the Trainer's arguments) names an ``eval``."""
    import jaxtune as jt

    train, _ = jt.read(args["train"], kind="chat")
    tuned = jt.apply_plan(jt.load(args["model"]), jt.lora(rank=4, alpha=8))
    return jt.Trainer(tuned, train, run_dir=Path(args["out"]) / "run",
                      **{"eval": jt.EvalConfig(before=False, after=False), **trainer},
                      config=jt.TrainConfig(steps=steps, log_every=1, progress=False),
                      data=jt.DataConfig(batch_size=4, max_length=48, packing=False)).fit()


def _fails_on(process: int, owner: Any, name: str, error: BaseException) -> None:
    """``owner.name`` raises ``error`` on ``process`` alone (as its host's file system could)."""
    import jax

    real = getattr(owner, name)

    def failing(*a: Any, **k: Any) -> Any:
        if jax.process_index() == process:
            raise error
        return real(*a, **k)

    setattr(owner, name, failing)


def setup_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_lora_run`, its run directory unreadable on process 1 alone (checked in the Trainer's constructor)."""
    from jaxtune.training.rundir import RunDir

    _fails_on(1, RunDir, "check", PermissionError("run: a directory process 1 cannot read"))
    return {"state": _lora_run(args, 2).state}


def optimizer_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_lora_run` with AdamW whose state process 1 alone cannot make (its host out of memory, say)."""
    import jax
    import optax

    adamw = optax.adamw(1e-4)

    def init(params: Any) -> Any:
        if jax.process_index() == 1:
            raise MemoryError("the optimizer state: out of memory on process 1")
        return adamw.init(params)

    return {"state": _lora_run(args, 2, optimizer=optax.GradientTransformation(init, adamw.update)).state}


def _recipe(args: dict[str, Any], train: str) -> dict[str, Any]:
    """2 steps of a LoRA recipe on the tiny Llama and the chat rows of ``train``, in OUT/run, exporting nothing."""
    return {"model": {"path": args["model"]}, "plan": [{"preset": "lora", "rank": 4, "alpha": 8}],
            "data": {"train": train, "kind": "chat", "max_length": 48, "batch_size": 4, "packing": False},
            "train": {"steps": 2, "progress": False}, "eval": {"before": False, "after": False},
            "output": {"dir": str(Path(args["out"]) / "run"), "export": "none"}}


def read_fails(args: dict[str, Any]) -> dict[str, Any]:
    """``jaxtune.finetune`` of :func:`_recipe`, its training file missing on process 1's host."""
    import jax

    import jaxtune as jt

    train = args["train"] if jax.process_index() == 0 else str(Path(args["train"]).with_name("missing.jsonl"))
    return {"state": jt.finetune(_recipe(args, train)).state}


def open_fails(args: dict[str, Any]) -> dict[str, Any]:
    """``jaxtune.finetune`` of :func:`_recipe`, then ``jaxtune.open_run`` of its run (whose checkpoint process 1
    alone cannot read) and an evaluation on the training rows, as ``jaxtune eval`` runs one."""
    import jaxtune as jt
    from jaxtune.training.checkpoint import Checkpointer

    jt.finetune(_recipe(args, args["train"]))
    _fails_on(1, Checkpointer, "restore", PermissionError("checkpoints/2: a file process 1 cannot read"))
    trainer = jt.open_run(Path(args["out"]) / "run", evaluation=False)
    return trainer.evaluate(jt.read(args["train"], kind="chat")[0])


def restore_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_lora_run` for 2 steps (its status copied to OUT/status-2.json), then on to 4 from its checkpoint,
    which process ``failing`` (1 unless given) alone cannot read."""
    import shutil

    import jax

    from jaxtune.training.checkpoint import Checkpointer

    _lora_run(args, 2)
    if jax.process_index() == 0:
        shutil.copy(Path(args["out"]) / "run" / "status.json", Path(args["out"]) / "status-2.json")
    failing = args.get("failing", 1)
    _fails_on(failing, Checkpointer, "restore", PermissionError(f"checkpoints/2: a file process {failing} cannot read"))
    return {"state": _lora_run(args, 4).state}


def score_fails(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_lora_run` for 2 steps (its status copied to OUT/status-2.json), then again: on to 4 steps scoring the
    base model first (``when``: "before"), or to the same 2 scoring the trained model (``when``: "after"), that
    score raising on process ``failing`` alone."""
    import shutil

    import jax

    import jaxtune as jt
    from jaxtune.training import scores

    _lora_run(args, 2)
    if jax.process_index() == 0:
        shutil.copy(Path(args["out"]) / "run" / "status.json", Path(args["out"]) / "status-2.json")
    before = args["when"] == "before"
    _fails_on(args["failing"], scores, "score_base" if before else "score_final",
              OSError(f"rows.jsonl: a row process {args['failing']} cannot read"))
    return {"state": _lora_run(args, 4 if before else 2, eval=jt.EvalConfig(before=before, after=not before)).state}


def predict_fails(args: dict[str, Any]) -> dict[str, Any]:
    import jaxtune as jt

    return {"rows": len(jt.predict(args["run"], _failing_rows(args["data"]), packing=False, batch_size=2))}


def evaluate_fails(args: dict[str, Any]) -> dict[str, Any]:
    import jaxtune as jt

    return jt.open_run(args["run"]).evaluate(_failing_rows(args["data"]))


def _failing_rows(path: str) -> Any:
    """The labeled rows of ``path``, row 3 raising when process 1 reads it (each process reads every other row)."""
    import jax

    import jaxtune as jt
    from jaxtune.data.source_types import ListSource

    class Failing(ListSource):
        def __getitem__(self, index: int) -> dict:
            if index == 3 and jax.process_index() == 1:
                raise OSError("row 3: a file process 1 cannot read")
            return super().__getitem__(index)

    read = jt.read(path, kind="classification")[0]
    return Failing(read.kind, read.records, read.report, read.label_names)


def late_fails(args: dict[str, Any]) -> dict[str, Any]:
    """Two blocks: in the first, process 0 raises a second late (after its share of the work), when process 1,
    with nothing to wait for there, is already in the next one, waiting for process 0 at its closing barrier."""
    import time

    import jax

    from jaxtune import processes

    with processes.stop_together(lambda: "in the first block"):
        if jax.process_index() == 0:
            time.sleep(1)
            raise OSError("a report process 0 cannot write")
    with processes.ready_together(lambda: "in the second block"):
        pass
    return {}


def restart(args: dict[str, Any]) -> dict[str, Any]:
    import time

    import jax

    import jaxtune as jt
    from jaxtune.training.rundir import RunDir

    move_aside = RunDir.move_aside

    def late(self: RunDir) -> Path | None:
        if jax.process_index() == 0:
            time.sleep(args["delay"])
        return move_aside(self)

    RunDir.move_aside = late
    result = jt.finetune(args["recipe"], restart=True)
    return {"state": result.state, "step": result.step}


def main() -> None:
    address, process, count, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    import jax

    jax.distributed.initialize(address, num_processes=count, process_id=process)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from jaxtune import prediction
    from jaxtune.models import hf
    from jaxtune.tuning import peft_io

    written: list[str] = []  # the weights and prediction files this process wrote in the job running

    def record(module: Any, name: str) -> None:
        real = getattr(module, name)

        def spy(*a: Any, **k: Any) -> Any:
            written.append(str(a[1]))  # save_file(tensors, path), write(rows, out)
            return real(*a, **k)

        setattr(module, name, spy)

    for module, name in ((peft_io, "save_file"), (hf, "save_file"), (prediction, "write")):
        record(module, name)
    known = {"export": export, "export_fails": export_fails, "predict": predict, "predict_fails": predict_fails,
             "evaluate_fails": evaluate_fails, "restart": restart, "dpo": dpo, "dpo_fails": dpo_fails,
             "base_fails": base_fails, "setup_fails": setup_fails, "optimizer_fails": optimizer_fails,
             "read_fails": read_fails, "restore_fails": restore_fails, "open_fails": open_fails,
             "score_fails": score_fails, "late_fails": late_fails}
    for job, args in jobs.items():
        written.clear()
        result = known[job](args)
        (Path(args["out"]) / f"{job}-{process}.json").write_text(json.dumps({**result, "written": written}))

if __name__ == "__main__":
    main()
