"""The training loop: the Python API a GPU workstation user calls.

``Trainer(tuned, train_data=..., optimizer=..., run_dir=...).fit()`` shards the model on a mesh,
jits the step once (buffers donated), and runs: next batch -> step -> every ``log_every`` steps
read the metrics (the only time the host waits on the device) -> evaluate, keep the best,
stop early -> checkpoint. A run directory that already holds checkpoints is resumed.
Everything it writes lives in ``run_dir``: ``metrics.jsonl``, TensorBoard events,
``status.json`` (what ``jaxtune status`` shows), ``checkpoints/`` and ``best/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.train import flops
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.evaluate import HIGHER_IS_BETTER, evaluate
from jaxtune.train.optim import OptimizerConfig, build_optimizer
from jaxtune.train.sharding import data_parallel_size, global_batch, make_mesh, param_shardings, shard
from jaxtune.train.step import make_eval_step, make_loss_fn, make_train_step
from jaxtune.tuning.partition import combine, partition

Callback = Callable[["Trainer", int, dict[str, float]], None]


class _StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``; the loop stops at the
    next step boundary. A KeyboardInterrupt raised mid-step could land after the jitted step
    consumed (donated) the params but before its results were stored, leaving nothing to save.
    A second Ctrl-C interrupts at once. Outside the main thread, signals are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (press again to stop at once)",
              file=sys.stderr)

    def install(self) -> "_StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to run. ``steps`` counts optimizer updates (each of ``grad_accum_steps``
    micro-batches); ``best_metric`` (e.g. ``"accuracy"``) picks the best checkpoint and drives
    early stopping after ``early_stopping_patience`` evaluations without improvement.
    ``choice_token_ids`` (LM tasks): the first tokens of the allowed answers; evaluation then
    also reports ``choice_accuracy`` (see :func:`jaxtune.train.evaluate.evaluate`)."""

    steps: int
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 3
    best_metric: str | None = None
    early_stopping_patience: int | None = None
    seed: int = 0
    chunk_tokens: int = 2048
    regression_loss: str = "mse"
    choice_token_ids: tuple[int, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.early_stopping_patience is not None and not self.best_metric:
            raise ValueError("train.early_stopping_patience needs train.best_metric (the metric to watch)")
        if len(set(self.choice_token_ids)) != len(self.choice_token_ids):
            raise ValueError(f"choice_token_ids {self.choice_token_ids} repeat a token: choices must start differently")


@dataclasses.dataclass
class FitResult:
    """What ``fit`` ended with: the step reached, why it stopped, the last metrics."""

    step: int
    state: str  # finished | stopped | early_stopped | failed
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    best: dict[str, Any] | None


class Trainer:
    """Fine-tune a planned model (``jaxtune.tuning.Tuned``).

    Args:
      tuned: the model after a plan: ``module``, ``params``, ``labels``, ``task``.
      train_data: an iterable whose ``iter()`` yields per-process numpy batches (the data
        contract) and has grain's ``get_state``/``set_state`` for exact resume.
      optimizer: an :class:`OptimizerConfig`, or any optax ``GradientTransformation`` (used as is).
      config: a :class:`TrainConfig`.
      run_dir: where checkpoints, metrics and status go; existing checkpoints are resumed.
      eval_data: an iterable of batches re-iterated for each evaluation (one pass = the eval set).
      mesh: a ``(data, fsdp, tensor)`` mesh (default: every device on ``data``).
      resolved_config: the full run config, saved in each checkpoint and in ``run_dir``.
      callbacks: ``f(trainer, step, metrics)`` called after each logged step.
    """

    def __init__(
        self,
        tuned: Any,
        *,
        train_data: Iterable[dict[str, np.ndarray]],
        optimizer: OptimizerConfig | optax.GradientTransformation,
        config: TrainConfig,
        run_dir: str | Path,
        eval_data: Iterable[dict[str, np.ndarray]] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        resolved_config: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
    ):
        self.tuned, self.config = tuned, config
        self.train_data, self.eval_data = train_data, eval_data
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh or make_mesh()
        self.resolved_config = resolved_config or {}
        self.callbacks = list(callbacks or [])
        trainable, frozen = partition(tuned.params, tuned.labels)
        groups, _ = partition(tuned.labels, tuned.labels)
        if config.choice_token_ids and tuned.task != "lm":
            raise ValueError(f"choice_token_ids score LM answers; this model's task is {tuned.task!r}")
        if not jax.tree.leaves(trainable):
            raise ValueError("the plan leaves nothing trainable; add a train/lora/head rule")
        if isinstance(optimizer, OptimizerConfig):
            self.optimizer, self.schedule = build_optimizer(optimizer, config.steps, groups)
        else:
            self.optimizer, self.schedule = optimizer, None
        self._trainable_shardings = param_shardings(trainable, self.mesh)
        self._frozen_shardings = param_shardings(frozen, self.mesh)
        self.trainable = shard(trainable, self._trainable_shardings)
        self.frozen = shard(frozen, self._frozen_shardings)
        # The optimizer state is placed by the same path rules as the params (Adam's mu/nu paths
        # end in the param's path), scalars replicated on the mesh. Left to jit, moments built by
        # zeros_like come out replicated: a full copy of Adam's state on every FSDP device.
        # Off-mesh scalars (step counters) would also make the step compile a second time.
        opt_shardings = param_shardings(jax.eval_shape(self.optimizer.init, self.trainable), self.mesh)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(self.trainable)
        loss_fn = make_loss_fn(tuned.module, tuned.task, chunk_tokens=config.chunk_tokens,
                               regression=config.regression_loss)
        eval_loss_fn = make_loss_fn(tuned.module, tuned.task, chunk_tokens=config.chunk_tokens,
                                    regression=config.regression_loss, choice_ids=config.choice_token_ids)
        opt_shardings = jax.tree.map(lambda x: x.sharding, self.opt_state)
        self.train_step = jax.jit(make_train_step(loss_fn, self.optimizer, grad_accum_steps=config.grad_accum_steps),
                                  donate_argnums=(0, 2),
                                  out_shardings=(self._trainable_shardings, opt_shardings, None))
        # Replicated outputs: every process can read the whole global batch's predictions.
        self.eval_step = jax.jit(make_eval_step(eval_loss_fn), out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        self.rng = jax.random.key(config.seed)
        self.step = 0
        self.checkpointer: Checkpointer | None = None
        self._matmul_params = flops.matmul_params(tuned.params, tuned.labels)
        model_cfg = getattr(tuned, "config", None) or getattr(tuned.module, "cfg", None)
        self._model_cfg = model_cfg
        self._main = jax.process_index() == 0  # only one process writes logs and status
        self._peak_flops = flops.peak_flops(dtype=getattr(model_cfg, "dtype", "float32"))
        self._flops_per_token: float | None = None

    @property
    def params(self) -> Any:
        """The full current param tree (trained leaves combined with the frozen ones), for export."""
        return combine(self.trainable, self.frozen)

    # ------------------------------------------------------------------ helpers

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        rows = len(batch["input_ids"]) * jax.process_count()
        if rows % data_parallel_size(self.mesh):
            raise ValueError(f"the global batch has {rows} rows, which the mesh's {data_parallel_size(self.mesh)}-way "
                             "data parallelism (data x fsdp) cannot split evenly; make data.batch_size a multiple "
                             "of it or change the mesh")
        return global_batch(batch, self.mesh)

    def evaluate(self, data: Iterable[dict[str, np.ndarray]] | None = None, trainable: Any = None) -> dict[str, float]:
        """Metrics of the current (or given) trainable params on ``data`` (default: eval_data)."""
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation data: pass eval_data to the Trainer or data to evaluate()")
        return evaluate(self.eval_step, self.trainable if trainable is None else trainable, self.frozen, data,
                        self.tuned.task, to_device=self._to_device)

    def _write_status(self, state: str, **extra: Any) -> None:
        if not self._main:
            return
        status = {"state": state, "step": self.step, "total_steps": self.config.steps, "updated": time.time(), **extra}
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.run_dir / "status.json")

    def _log(self, record: dict[str, Any]) -> None:
        if not self._main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def _improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        higher = HIGHER_IS_BETTER.get(self.config.best_metric.split("/")[-1], False)
        return value > best if higher else value < best

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train to ``config.steps`` (resuming from ``run_dir`` if it has checkpoints)."""
        cfg = self.config
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard")) if self._main else None
        if self._main:
            (self.run_dir / "config.json").write_text(json.dumps(self.resolved_config, indent=2, default=str))
        iterator = iter(self.train_data)
        self.checkpointer = Checkpointer(self.run_dir, max_to_keep=cfg.keep_checkpoints,
                                         with_data=hasattr(iterator, "get_state"))
        restored = self.checkpointer.restore(self.trainable, self.opt_state, data_iterator=iterator)
        best_value, best_step, bad_evals = None, None, 0
        if restored is not None:
            self.step, self.trainable, self.opt_state, self.rng, meta = restored
            best_value, best_step = meta.get("metrics", {}).get("best_value"), meta.get("metrics", {}).get("best_step")
            bad_evals = int(meta.get("metrics", {}).get("bad_evals", 0))
            print(f"resumed from {self.run_dir / 'checkpoints' / str(self.step)} at step {self.step}", file=sys.stderr)
        state, train_metrics, eval_metrics, pending = "finished", {}, {}, []
        # The throughput window: tokens and steps since window_start. The first step (which
        # compiles) is timed on its own and kept out, so tok/s, MFU and ETA are the steady state.
        window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
        first_step_s, first_tokens = None, 0.0
        self._write_status("running")

        def save(metrics: dict[str, Any]) -> None:
            # The frozen base is not in the checkpoint: its source is, so resuming re-reads it.
            config = {"base_model": getattr(self.tuned, "source", None), **self.resolved_config}
            self.checkpointer.save(self.step, self.trainable, self.opt_state, self.rng, data_iterator=iterator,
                                   config=config,
                                   metrics={"best_value": best_value, "best_step": best_step, "bad_evals": bad_evals,
                                            **metrics})

        interrupt = _StopOnInterrupt().install()
        try:
            while self.step < cfg.steps:
                if interrupt.requested:
                    raise KeyboardInterrupt
                try:
                    batch = next(iterator)
                except StopIteration:
                    print(f"training data exhausted at step {self.step}", file=sys.stderr)
                    break
                if self._flops_per_token is None:
                    self._flops_per_token = self._flops(batch["input_ids"].shape[-1])
                step_rng = jax.random.fold_in(self.rng, self.step)
                self.trainable, self.opt_state, metrics = self.train_step(
                    self.trainable, self.frozen, self.opt_state, self._to_device(batch), step_rng)
                self.step += 1
                pending.append(metrics)
                if first_step_s is None:
                    first_tokens = float(jax.device_get(metrics["tokens"]))  # waits for the step
                    first_step_s = time.perf_counter() - window_start
                    window_start, window_tokens, window_steps = time.perf_counter(), -first_tokens, -1
                    if cfg.progress and self._main:
                        print(f"step {self.step} took {first_step_s:.1f} s (compilation included)", file=sys.stderr)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    host = jax.device_get(pending)  # the one place the host waits for the device
                    pending = []
                    bad = next((self.step - len(host) + i + 1 for i, m in enumerate(host) if not m["finite"]), None)
                    if bad is not None:
                        state = "failed"
                        good = self.checkpointer.steps()
                        msg = (f"step {bad}: loss or gradient is not finite (nan/inf); the update was skipped and "
                               f"training stopped. Last good checkpoint: "
                               f"{good[-1] if good else 'none'}. Lower the learning rate or check the data.")
                        print(msg, file=sys.stderr)
                        self._write_status("failed", error=msg)
                        break
                    window_tokens += sum(float(m["tokens"]) for m in host)
                    window_steps += len(host)
                    elapsed = time.perf_counter() - window_start
                    if window_steps <= 0:  # nothing but the compiling first step yet
                        window_tokens, window_steps, elapsed = first_tokens, 1, first_step_s
                    train_metrics = self._train_record(host, window_tokens, window_steps, elapsed)
                    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
                    self._log(train_metrics)
                    self._progress(train_metrics)
                    self._write_status("running", train=train_metrics, eval=eval_metrics, best_step=best_step)
                    for callback in self.callbacks:
                        callback(self, self.step, train_metrics)
                if self.eval_data is not None and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    eval_start = time.perf_counter()
                    eval_metrics = {f"eval/{k}": v for k, v in self.evaluate().items()}
                    self._log({"step": self.step, **eval_metrics})
                    if cfg.best_metric:
                        value = eval_metrics.get(cfg.best_metric) or eval_metrics.get(f"eval/{cfg.best_metric}")
                        if value is None:
                            raise ValueError(f"train.best_metric {cfg.best_metric!r} is not among the eval metrics "
                                             f"{sorted(eval_metrics)}")
                        if self._improved(value, best_value):
                            best_value, best_step, bad_evals = value, self.step, 0
                            self.checkpointer.save_best(self.step, self.trainable, eval_metrics)
                        else:
                            bad_evals += 1
                    window_start += time.perf_counter() - eval_start  # evaluation is not training throughput
                    if cfg.early_stopping_patience is not None and bad_evals >= cfg.early_stopping_patience:
                        print(f"early stopping at step {self.step}: {cfg.best_metric} has not improved for "
                              f"{bad_evals} evaluations (best {best_value:.4f} at step {best_step})", file=sys.stderr)
                        state = "early_stopped"
                        save(eval_metrics)
                        break
                if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                    save(eval_metrics)
            if state == "finished":
                save(eval_metrics)
        except KeyboardInterrupt:
            state = "stopped"
            if any(x.is_deleted() for x in jax.tree.leaves(self.trainable)):  # a second Ctrl-C, mid-step
                good = self.checkpointer.steps()
                print(f"\ninterrupted during step {self.step + 1}; nothing saved, resume from checkpoint "
                      f"{good[-1] if good else '(none: starts over)'}", file=sys.stderr)
            else:
                print(f"\ninterrupted at step {self.step}; saving a checkpoint to resume from", file=sys.stderr)
                save(eval_metrics)
        finally:
            interrupt.restore()
            self.checkpointer.wait()
            if self._tb is not None:
                self._tb.close()
        if state != "failed":
            self._write_status(state, train=train_metrics, eval=eval_metrics, best_step=best_step,
                               best_value=best_value)
        best = {"step": best_step, "value": best_value, "metric": cfg.best_metric} if best_step is not None else None
        return FitResult(self.step, state, train_metrics, eval_metrics, best)

    def _flops(self, seq_len: int) -> float:
        cfg = self._model_cfg
        layers = getattr(cfg, "num_layers", 0)
        width = getattr(cfg, "num_heads", 0) * getattr(cfg, "head_dim", 0) or getattr(cfg, "hidden_size", 0)
        return flops.train_flops_per_token(*self._matmul_params, layers=layers, attn_width=width, seq_len=seq_len)

    def _train_record(self, host: list[dict[str, Any]], tokens: float, steps: int, elapsed: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "loss": float(np.mean([float(m["loss"]) for m in host])),
            "grad_norm": float(np.mean([float(m["grad_norm"]) for m in host])),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "steps_per_s": steps / max(elapsed, 1e-9),
        }
        if self.schedule is not None:
            record["learning_rate"] = float(self.schedule(self.step - 1))
        if self.tuned.task == "lm" and self._flops_per_token and self._peak_flops:
            record["mfu"] = record["tokens_per_s"] * self._flops_per_token / (self._peak_flops * jax.device_count())
        return record

    def _progress(self, record: dict[str, Any]) -> None:
        if not self.config.progress or not self._main:
            return
        remaining = (self.config.steps - self.step) / max(record["steps_per_s"], 1e-9)
        parts = [f"step {self.step}/{self.config.steps}", f"loss {record['loss']:.4f}"]
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(remaining))}")
        end = "\n" if self.step == self.config.steps or not sys.stderr.isatty() else ""
        print("\r" + " | ".join(parts), end=end, file=sys.stderr, flush=True)
