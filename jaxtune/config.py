"""The run config: one typed schema for a whole fine-tuning run, read from YAML plus overrides.

A config is a tree of frozen dataclasses (:class:`Config` at the root). :func:`from_data`
checks plain data (what YAML gives) against the type hints of those dataclasses with one
generic walker, so every section and field is validated the same way; errors name the field,
the value and what is allowed::

    config error: optimizer.learning_rate: expected a number, got 'fast'
    config error: unknown key 'optimizr' (allowed: model, plan, data, ...); did you mean 'optimizer'?

    cfg = load("configs/quickstart.yaml", ["train.steps=4", "optimizer.learning_rate=3e-4"])
    save(cfg, run_dir / "config.yaml")           # the resolved config, with every default

``optimizer`` is :class:`jaxtune.train.optim.OptimizerConfig` itself; ``plan`` is a list of
rules (see :mod:`jaxtune.tuning.plan`) or presets (``{"preset": "lora", "rank": 8}``), or one
preset name (``full``). Relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxtune.train.optim import OptimizerConfig

DTYPES = Literal["float32", "bfloat16", "float16"]
DATASETS = ("rotten_tomatoes", "rotten_tomatoes_chat", "rotten_tomatoes_text", "vader", "chatterbot")
# The source kind each packaged dataset reads as.
DATASET_KINDS = {"rotten_tomatoes": "classification", "rotten_tomatoes_chat": "chat", "rotten_tomatoes_text": "text",
                 "vader": "regression", "chatterbot": "chat"}
LM_KINDS = ("chat", "prompt_completion", "text")
PRESETS = ("full", "lora", "dora", "prompt_tuning", "head", "freeze_all_but", "train", "freeze")


class ConfigError(ValueError):
    """A config (file, override or value) is invalid; the message names the field and the fix."""


# ----------------------------------------------------------------------------- the schema


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The pretrained model and how it is held in memory.

    ``path``: an HF directory, a packaged model name (``jaxtune fetch`` lists them:
    ``all-MiniLM-L6-v2``, ``SmolLM2-135M-Instruct``) or a hub id. ``dtype``: storage of the
    frozen weights (trainable ones are always float32). ``compute_dtype``: activations
    (default: ``dtype``). ``remat``: recompute activations in the backward pass (decoders).
    """

    path: str
    dtype: DTYPES = "float32"
    compute_dtype: DTYPES | None = None
    remat: Literal["none", "block", "dots"] = "none"
    tokenizer: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training and validation data: a packaged ``dataset`` or files (``train`` + ``kind``).

    ``train_size``/``validation_size``: rows to use (for ``rotten_tomatoes*`` the size of the
    prepared split; otherwise a seeded random subset). ``validation_fraction`` splits it off
    ``train`` when there is no ``validation`` file. ``pad_to_multiple_of``: dynamic padding for
    unpacked rows (classification, regression, ``packing: false``): each batch is only as wide
    as its longest row, rounded up to this multiple; each width compiles once (see
    :class:`jaxtune.data.LoaderConfig`).
    """

    dataset: Literal["rotten_tomatoes", "rotten_tomatoes_chat", "rotten_tomatoes_text", "vader",
                     "chatterbot"] | None = None
    train: str | None = None
    validation: str | None = None
    validation_fraction: float | None = None
    kind: Literal["chat", "prompt_completion", "text", "classification", "regression"] | None = None
    train_size: int | None = None
    validation_size: int | None = None
    max_length: int = 128
    batch_size: int = 8
    eval_batch_size: int | None = None
    packing: bool = True
    pad_to_multiple_of: int | None = None
    truncation: Literal["right", "drop", "error", "split"] = "right"
    text_unit: Literal["file", "paragraph", "line"] = "file"
    skip_bad_rows: bool = False
    worker_count: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """How long to train: ``steps`` (optimizer updates) or ``epochs`` (default 1 epoch)."""

    steps: int | None = None
    epochs: float | None = None
    grad_accum_steps: int = 1
    log_every: int = 10
    seed: int = 0
    chunk_tokens: int = 2048
    regression_loss: Literal["mse", "huber"] = "mse"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation: ``every`` N steps during training (and at the end), the ``best_metric`` that
    picks ``best/`` and drives early stopping; ``before``/``after``: evaluate the base and the
    fine-tuned model for the comparison table. ``choices`` (chat / prompt-completion data whose
    answers come from a fixed set, e.g. ``[positive, negative]``): also report
    ``choice_accuracy``, the share of validation answers whose first token has the highest
    logit among the choices' first tokens (zero-shot classification of a generative model)."""

    every: int | None = None
    best_metric: str | None = None
    choices: list[str] | None = None
    early_stopping_patience: int | None = None
    before: bool = True
    after: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<output.dir>/checkpoints``: every N steps (and at the end), keep K."""

    every: int | None = None
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (see :class:`jaxtune.train.sharding.MeshConfig`); ``-1`` takes the rest.
    ``simulate_devices``: on CPU, pretend to have N devices (sets XLA_FLAGS before JAX starts)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    simulate_devices: int | None = None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runs (``jax.distributed.initialize``). ``auto``: initialize when a cluster
    is detected (TPU pod, SLURM, or ``coordinator_address`` set); the other fields are passed
    through (None lets JAX detect them)."""

    initialize: Literal["auto", "always", "never"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the run lives, and what ``jaxtune train`` exports at the end.

    ``export``: ``auto`` (a PEFT adapter when the plan has adapters, else a merged HF
    directory; skipped with a note when the model has no transformers equivalent), ``peft``,
    ``merged`` or ``none``. It is written to ``<dir>/export``.
    """

    dir: str = "runs/run"
    export: Literal["auto", "peft", "merged", "none"] = "auto"
    export_dtype: DTYPES | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. See the section classes for the fields."""

    model: ModelConfig
    plan: str | tuple[dict[str, Any], ...] = "full"
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainSection = TrainSection()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    output: OutputConfig = OutputConfig()


# ----------------------------------------------------------------------------- the generic walker


def _suggest(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(hint: Any) -> str:
    """What a type hint accepts, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and normalised: lists -> tuples, ints -> floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1 and not str(errors[0]).startswith(f"{where}: "):
            raise errors[0]  # X | None failing inside X (a list item, a nested field): name that spot
        literal = next((a for a in args if typing.get_origin(a) is Literal), None)
        if literal is not None and isinstance(value, str):
            raise errors[[a for a in args if a is not type(None)].index(literal)]
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {_show(value)}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(str(a) for a in args)}, got {_show(value)}"
                          + _suggest(value, args))
    if dataclasses.is_dataclass(hint):
        return from_data(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()) and float(value).is_integer():
            return int(float(value))  # YAML 1.1 reads 1e3 as a string
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {_show(value)} (YAML reads unquoted yes/no/on/off "
                              f"as booleans: quote the word, e.g. 'yes')")
    elif origin in (tuple, list, Sequence):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin in (dict, Mapping):
        if isinstance(value, Mapping):
            key_t, val_t = args if args else (Any, Any)
            return {_coerce(k, key_t, f"{where}"): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config schema: unsupported type {hint!r} at {where}")
    raise ConfigError(f"{where}: expected {_describe(hint)}, got {_show(value)}")


def from_data(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and value by type hint."""
    name = where or "config"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping with keys {', '.join(fields)}, got {_show(data)}")
    for key in data:
        if key not in fields:
            inside = f" in {where}" if where else ""
            raise ConfigError(f"unknown key {key!r}{inside} (allowed: {', '.join(fields)})"
                              + _suggest(key, list(fields)))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, f in fields.items():
        path = f"{where}.{key}" if where else key
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required ({_describe(hints[key])}), but missing")
            continue
        kwargs[key] = _coerce(data[key], hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # a dataclass's own checks (e.g. OptimizerConfig)
        message = str(err)
        raise ConfigError(message if where and message.startswith(where) else f"{name}: {message}") from None


def to_data(obj: Any) -> Any:
    """Plain YAML/JSON data (dicts, lists, scalars) of a config or any part of it."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- files and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, plan, data, ...)")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML: 3, 1e-4, true, null, [a, b])."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.path=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, here)]
            continue
        if node.get(part) is None or not isinstance(node[part], (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {override!r}: {'.'.join(parts[:-1])} is not a section")


def _index(part: str, node: list, where: str) -> int:
    if not re.fullmatch(r"-?\d+", part) or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {where}: expected an index 0..{len(node) - 1} into the list, got {part!r}")
    return int(part)


def load(path: str | Path | None, overrides: Sequence[str] = (), *, base: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML config (or start from ``base`` data), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    if base is not None:
        data = {**_deepcopy(base), **data}
    data = _deepcopy(data)
    for override in overrides:
        apply_override(data, override)
    if "output" not in data or not isinstance(data["output"], dict) or "dir" not in data["output"]:
        if path is not None and isinstance(data.get("output", {}), (dict, type(None))):
            data["output"] = {**(data.get("output") or {}), "dir": f"runs/{Path(path).stem}"}
    return validate(from_data(Config, data))


def _deepcopy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_deepcopy(v) for v in data]
    return data


def save(config: Config, path: str | Path) -> Path:
    """Write the resolved config (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_data(config), sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- plan and cross-field checks


def build_plan(plan: str | Sequence[Mapping[str, Any]]) -> Any:
    """A :class:`jaxtune.tuning.Plan` from the config's plan: a preset name, or a list of rule
    dicts (``{"action": ...}``) and preset dicts (``{"preset": "lora", "rank": 8}``)."""
    from jaxtune import tuning

    items = [{"preset": plan}] if isinstance(plan, str) else list(plan)
    if not items:
        raise ConfigError("plan: empty; give rules or a preset (e.g. plan: full)")
    result = tuning.Plan()
    for i, item in enumerate(items):
        where = f"plan[{i}]" if not isinstance(plan, str) else "plan"
        item = dict(item)
        if "preset" in item and "action" in item:
            raise ConfigError(f"{where}: give either 'action' (a rule) or 'preset', not both")
        if "preset" not in item:
            try:
                result = result + tuning.Plan.from_data([item])
            except tuning.PlanError as err:
                raise ConfigError(f"{where}: {str(err).removeprefix('plan rule #0 ')}") from None
            continue
        name = item.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{where}.preset: expected one of {', '.join(PRESETS)}, got {_show(name)}"
                              + _suggest(name, PRESETS))
        fn = getattr(tuning, name)
        params = [p for p in inspect.signature(fn).parameters if p not in ("kwargs",)]
        unknown = [k for k in item if k not in params]
        if unknown:
            raise ConfigError(f"{where}: preset {name!r} has no option {unknown[0]!r} (options: "
                              f"{', '.join(params) or 'none'})" + _suggest(unknown[0], params))
        try:
            result = result + fn(**{k: list(v) if isinstance(v, tuple) else v for k, v in item.items()})
        except (tuning.PlanError, ValueError, TypeError) as err:
            raise ConfigError(f"{where} (preset {name}): {str(err).removeprefix('rule ')}") from None
    return result


def data_kind(config: Config) -> str:
    """The source kind of the config's data (given, or that of the packaged dataset)."""
    data = config.data
    return data.kind or DATASET_KINDS[data.dataset]  # validate() guarantees one of them


def validate(config: Config) -> Config:
    """Checks that involve several fields; returns the config unchanged."""
    d, t, e = config.data, config.train, config.eval
    if d.dataset is None and d.train is None:
        raise ConfigError("data: give a packaged dataset (data.dataset: " + ", ".join(DATASETS)
                          + ") or a training file (data.train + data.kind)")
    if d.dataset is not None and d.train is not None:
        raise ConfigError(f"data: give data.dataset ({d.dataset}) or data.train ({d.train}), not both")
    if d.train is not None and d.kind is None:
        raise ConfigError("data.kind: required with data.train (one of chat, prompt_completion, text, "
                          "classification, regression)")
    if d.dataset is not None and d.kind not in (None, DATASET_KINDS[d.dataset]):
        raise ConfigError(f"data.kind: dataset {d.dataset} is {DATASET_KINDS[d.dataset]}, got {d.kind!r}")
    if d.validation is not None and d.validation_fraction is not None:
        raise ConfigError("data: give data.validation (a file) or data.validation_fraction, not both")
    if d.validation_fraction is not None and not 0 < d.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction: expected a number in (0, 1), got {d.validation_fraction}")
    for name in ("max_length", "batch_size", "eval_batch_size", "train_size", "validation_size", "pad_to_multiple_of"):
        value = getattr(d, name)
        if value is not None and value < 1:
            raise ConfigError(f"data.{name}: expected an integer >= 1, got {value}")
    if t.steps is not None and t.epochs is not None:
        raise ConfigError(f"train: give train.steps ({t.steps}) or train.epochs ({t.epochs}), not both")
    if t.steps is not None and t.steps < 1 or t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.{'steps' if t.steps is not None else 'epochs'}: expected a positive number, "
                          f"got {t.steps if t.steps is not None else t.epochs}")
    for name, value in (("train.grad_accum_steps", t.grad_accum_steps), ("train.log_every", t.log_every),
                        ("eval.every", e.every), ("checkpoint.every", config.checkpoint.every),
                        ("checkpoint.keep", config.checkpoint.keep), ("eval.early_stopping_patience",
                                                                      e.early_stopping_patience)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
    if e.early_stopping_patience is not None and not e.best_metric:
        raise ConfigError("eval.early_stopping_patience needs eval.best_metric (the metric to watch)")
    kind = data_kind(config)
    plan = build_plan(config.plan)
    heads = [r for r in plan.rules if r.action == "head"]
    if kind in ("classification", "regression"):
        if not heads:
            raise ConfigError(f"plan: data of kind {kind} needs a head, e.g. add "
                              f"{{action: head, task: {kind}}} to the plan")
        if heads[-1].task != kind:
            raise ConfigError(f"plan: the head's task is {heads[-1].task} but the data is {kind}")
    elif heads:
        raise ConfigError(f"plan: a head rule turns the model into a {heads[-1].task} model, but data of kind "
                          f"{kind} trains a language model; remove the head or change data.kind")
    if e.choices is not None:
        if kind not in ("chat", "prompt_completion"):
            raise ConfigError(f"eval.choices: scores the answers of chat or prompt_completion data, not {kind} data; "
                              "remove eval.choices")
        if len(e.choices) < 2 or len(set(e.choices)) != len(e.choices):
            raise ConfigError(f"eval.choices: expected two or more different answers, got {tuple(e.choices)}")
    if e.best_metric is not None:
        metrics = {"classification": ("loss", "accuracy", "macro_f1"), "regression": ("loss", "mae", "rmse", "pearson"),
                   }.get(kind, ("loss", "perplexity") + (("choice_accuracy", "choice_macro_f1") if e.choices else ()))
        if e.best_metric.removeprefix("eval/") not in metrics:
            raise ConfigError(f"eval.best_metric: expected one of {', '.join(metrics)} for {kind} data, got "
                              f"{e.best_metric!r}" + _suggest(e.best_metric, metrics))
    return config
