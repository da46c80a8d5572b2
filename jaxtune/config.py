"""Recipes: a YAML file (plus ``key.path=value`` overrides) read into the API's own dataclasses.

A recipe's sections *are* the Python API's configs, so a field is declared once, where the
code that uses it lives:

===============  =======================================================  ======================
section          dataclass                                                used by
===============  =======================================================  ======================
``model``        :class:`jaxtune.models.load.ModelConfig`                 ``jaxtune.load``
``plan``         a preset name or rules (:meth:`jaxtune.tuning.Plan.from_data`)  ``jaxtune.apply_plan``
``data``         :class:`jaxtune.data.DataConfig`                         ``jaxtune.read``, ``Trainer(data=)``
``optimizer``    :class:`jaxtune.training.optim.OptimizerConfig`             ``Trainer(optimizer=)``
``train``        :class:`jaxtune.training.config.TrainConfig`                ``Trainer(config=)``
``eval``         :class:`jaxtune.training.config.EvalConfig`                 ``Trainer(eval=)``
``checkpoint``   :class:`jaxtune.training.config.CheckpointConfig`           ``Trainer(checkpoint=)``
``mesh``         :class:`jaxtune.training.sharding.MeshConfig`               ``Trainer(mesh=)``
``preference``   :class:`jaxtune.training.preference_config.PreferenceConfig`  ``Trainer(preference=)``
``distributed``  :class:`DistributedConfig`                               ``jaxtune.finetune``
``output``       :class:`OutputConfig`                                    ``jaxtune.finetune``
===============  =======================================================  ======================

:func:`from_data` (:mod:`jaxtune.schema`) checks plain data (what YAML gives) against the type hints
of those dataclasses with one generic walker (the one their ``__post_init__`` runs for Python
callers); errors name the field, the value and what is allowed::

    config error: optimizer.learning_rate: expected a number, got 'fast'
    config error: unknown key 'optimizr' (allowed: model, plan, data, ...); did you mean 'optimizer'?
    config error: my_recipe.yaml:12: unknown key 'learnig_rate' in optimizer (...); did you mean 'learning_rate'?

(a mistake a recipe file wrote is reported at its file and line, the recipe's own or its base's;
``train.steps=4`` below replaces the quickstart's ``epochs: 1``, see :data:`ALTERNATIVES`)::

    cfg = load("configs/quickstart.yaml", ["train.steps=4", "optimizer.learning_rate=3e-4"])
    save(cfg, run_dir / "config.yaml")           # the resolved config, with every default

A recipe may start from another with ``base: other.yaml`` (a path relative to the recipe's own
file): the other recipe's sections are read first and this one's are laid over them, key by key
inside a section; a list (the plan, ``eval.choices``) or a value replaces the base's whole. Only
``output.dir`` is never inherited: a recipe's runs go to its own directory (``runs/<its name>``
unless it sets one), so a variant never resumes or overwrites its base's run (a recipe given as
data, with no file name, must set ``output.dir``)::

    base: chat_sentiment.yaml          # configs/chat_sentiment_qlora.yaml: only what differs
    plan:
      - {action: freeze, quantize: nf4}
      - {preset: lora, rank: 8, alpha: 16, targets: [q_proj, k_proj, v_proj, o_proj]}

Other relative paths (data files, model directories) are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxtune.data.config import DataConfig
from jaxtune.dtypes import GGUF_DTYPES
from jaxtune.models.load import ModelConfig, dtype_name
from jaxtune.schema import ConfigError, coerce, from_data
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.optim import OptimizerConfig
from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.sharding import MeshConfig
from jaxtune.tuning.plan import Plan, PlanError

BASE = "base"  # the recipe key naming the recipe a recipe starts from


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host runs (``jax.distributed.initialize``). ``auto``: initialize when a cluster
    is detected (TPU pod, SLURM, or ``coordinator_address`` set); the other fields are passed
    through (None lets JAX detect them, or keeps JAX's default).

    ``heartbeat_timeout_s``: how long a process may go without a heartbeat before JAX's distributed
    service declares it dead and ends every other process. A process that dies without a Python
    error (SIGKILL, the kernel's out-of-memory killer) is noticed only this way, so the others
    wait this long (in a collective, or leaving ``jax.distributed``). None keeps JAX's default
    (100 s): heartbeats come from a thread of their own, so a busy process (compiling, writing a
    checkpoint) still sends them, but a short timeout ends the whole run for a live process whose
    heartbeats are late (a loaded coordinator host, a network hiccup, a paused VM)."""

    initialize: Literal["auto", "always", "never"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int | None = None

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes: expected an integer >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 2**31):
            raise ValueError(f"distributed.process_id: expected an integer in [0, num_processes), got "
                             f"{self.process_id}")
        if self.heartbeat_timeout_s is not None and self.heartbeat_timeout_s < 1:
            raise ValueError(f"distributed.heartbeat_timeout_s: expected whole seconds >= 1, got "
                             f"{self.heartbeat_timeout_s}; null keeps JAX's default (100 s)")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the run lives, and what ``jaxtune train`` exports at the end.

    ``dir``: the run directory; a recipe file without one runs in ``runs/<file name>``, and a recipe
    given as data (a dict or Config, which has no file name) must set it.

    ``export``: ``auto`` (a PEFT adapter when the plan has adapters that PEFT can express, else a
    merged HF directory; skipped with a note when the model has no transformers equivalent), ``peft``,
    ``merged``, ``gguf`` (one ``model.gguf`` file for llama.cpp/Ollama) or ``none``. It is written to
    ``<dir>/export``; ``export_dtype``: dtype of merged or GGUF weights (``q8_0``: GGUF only).
    """

    dir: str | None = None  # load() fills in runs/<file name> for a recipe file; finetune refuses None
    export: Literal["auto", "peft", "merged", "gguf", "none"] = "auto"
    export_dtype: GGUF_DTYPES | None = None

    def __post_init__(self) -> None:
        if self.dir is not None and not self.dir.strip():
            raise ValueError("output.dir: empty; give the run directory's path, e.g. runs/my-run")
        if self.export_dtype is not None:  # from Python, else checked only by the export after training
            where, dtype = "output.export_dtype", self.export_dtype
            name = dtype if isinstance(dtype, str) else dtype_name(dtype, where)  # jnp.bfloat16 -> its name
            object.__setattr__(self, "export_dtype", coerce(name, GGUF_DTYPES, where))  # the YAML path's message
        if self.export_dtype == "q8_0" and self.export != "gguf":  # GGUF's own format: refused before training
            raise ValueError(f"output.export_dtype: q8_0 (llama.cpp's 8-bit blocks) applies to output.export: gguf, "
                             f"and this run exports {self.export}; set output.export: gguf, or a float dtype")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run; each section is the API's own dataclass (see the module docstring)."""

    model: ModelConfig
    plan: str | tuple[dict[str, Any], ...] = "full"
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    preference: PreferenceConfig | None = None  # DPO/IPO/SimPO/ORPO on data.kind: preference
    distributed: DistributedConfig = DistributedConfig()
    output: OutputConfig = OutputConfig()

    def build_plan(self) -> Plan:
        return build_plan(self.plan)


# ----------------------------------------------------------------------------- plain data (the walker: jaxtune.schema)


def to_data(obj: Any) -> Any:
    """Plain YAML/JSON data (dicts, lists, scalars) of a config or any part of it."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj) if "config" not in f.metadata}
    if isinstance(obj, Mapping):
        return {str(k): to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- files and overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps
    the last one, silently dropping the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start}); "
                          "save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
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
    value = _value(raw)
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


def _value(raw: str) -> Any:
    """An override's value: YAML (3, 1e-4, true, null, [a, b]); empty is null, and text that is not
    YAML is itself."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _index(part: str, node: list, where: str) -> int:
    if not re.fullmatch(r"-?\d+", part) or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {where}: expected an index 0..{len(node) - 1} into the list, got {part!r}")
    return int(part)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: mappings merge key by key, at any depth; anything else in ``over``
    (a list such as the plan, a value, ``null``) replaces what ``base`` has there."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merge(out[key], value) if both else value
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file's data with its ``base:`` chain resolved (see the module docstring); errors
    name the file and the line of its ``base:``."""
    return _read_recipe(Path(path), ())


def _read_recipe(path: Path, children: tuple[Path, ...]) -> dict[str, Any]:
    data = read_yaml(path)
    if BASE not in data:
        return data
    base = data.pop(BASE)
    where = f"{path}:{_line_of(path, (BASE,)) or '?'}: {BASE}"
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{where}: expected the path of the recipe this one starts from, relative to "
                          f"{path.parent} (e.g. base: quickstart.yaml), got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{where}: no recipe {base_path}; give a path relative to this file's directory")
    chain = (*children, path)
    if base_path.resolve() in {p.resolve() for p in chain}:
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{where}: the recipes start from each other in a circle ({cycle}); remove one base")
    inherited = _read_recipe(base_path, chain)
    if isinstance(inherited.get("output"), Mapping):  # a run directory belongs to one recipe
        inherited["output"] = {k: v for k, v in inherited["output"].items() if k != "dir"}
    return merge(_without_replaced(inherited, data), data)


def _line_of(path: Path, field: Sequence[str | int]) -> int | None:
    """The line on which the YAML file ``path`` writes the key ``field`` (``("optimizer", "lr")``;
    an int indexes a list: ``("plan", 0)`` is the plan's first rule), or None where it does not."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for part in field:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                         None)
            if found is None:
                return None
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None
    return line


def located(err: ConfigError, path: Path, overrides: Sequence[str] = ()) -> ConfigError:
    """``err`` led by the file and line that write the key at fault (``err.field``): the recipe's own
    file, else the nearest of its bases that does. An error in what an override wrote is left as it
    is (the override names the key), and so is one that no single key of a file caused."""
    field = tuple(str(part) for part in err.field or ())
    if not field:
        return err
    for override in overrides:
        key = tuple(override.partition("=")[0].strip().split("."))
        if key[: len(field)] == field[: len(key)]:  # the override wrote the key, or what holds it
            return err
    for file in (path, *_bases(path)):
        line = _line_of(file, err.field)
        if line is not None:
            return ConfigError(f"{file}:{line}: {err}", err.field)
    return err


# Fields that are each other's alternative (a section refuses both set): an override, or a recipe laid
# over a base, that gives one a value replaces the other, so that ``train.steps=8`` on a recipe of
# ``epochs: 1`` trains 8 steps.
ALTERNATIVES = ((("train", "steps"), ("train", "epochs")), (("data", "validation"), ("data", "validation_fraction")))


def _without_replaced(base: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` without each field of :data:`ALTERNATIVES` whose other ``data`` gives a value (and
    that ``data`` leaves alone), for ``data`` to be merged over it."""
    for pair in ALTERNATIVES:
        for (section, name), (_, other) in (pair, pair[::-1]):
            ours, theirs = data.get(section), base.get(section)
            if (isinstance(ours, Mapping) and ours.get(name) is not None and other not in ours
                    and isinstance(theirs, Mapping) and other in theirs):
                base = {**base, section: {k: v for k, v in theirs.items() if k != other}}
    return base


def with_alternatives(overrides: Sequence[str]) -> list[str]:
    """``overrides``, then ``OTHER=null`` for each of :data:`ALTERNATIVES` that they give a value and
    whose other they leave alone."""
    given = {key.strip(): raw for key, _, raw in (o.partition("=") for o in overrides)}
    names = [tuple(".".join(field) for field in pair) for pair in ALTERNATIVES]
    implied = [f"{other}=null" for pair in names for name, other in (pair, pair[::-1])
               if name in given and other not in given and _value(given[name]) is not None]
    return [*overrides, *implied]


def load(path: str | Path | None, overrides: Sequence[str] = (), *, base: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML recipe (its ``base:`` chain resolved) or start from ``base`` data, lay the
    recipe over ``base`` when both are given, apply overrides, validate. An override that gives
    one of :data:`ALTERNATIVES` a value replaces the other. Errors in what a recipe file wrote name
    the file and line."""
    data = read_recipe(path) if path is not None else {}
    if base is not None:
        data = merge(_without_replaced(_deepcopy(base), data), data)
    data = _deepcopy(data)
    for override in with_alternatives(overrides):
        apply_override(data, override)
    if "output" not in data or not isinstance(data["output"], dict) or data["output"].get("dir") is None:
        if path is not None and isinstance(data.get("output", {}), (dict, type(None))):
            default = f"runs/{Path(path).stem}"
            for base_path in _bases(Path(path)):
                if _own_dir(base_path) == default:
                    raise ConfigError(f"{path}: its run directory would be {default}, which is also that of its base "
                                      f"{base_path} (the same file name); set output.dir")
            data["output"] = {**(data.get("output") or {}), "dir": default}
    try:
        return validate(from_data(Config, data))
    except ConfigError as err:
        if path is None:
            raise
        raise located(err, Path(path), overrides) from None


def _bases(path: Path) -> list[Path]:
    """The recipes ``path`` starts from, nearest first (the chain :func:`read_recipe` checked)."""
    out = []
    while isinstance(base := read_yaml(path).get(BASE), str):
        path = path.parent / base
        out.append(path)
    return out


def _own_dir(path: Path) -> str:
    """The run directory a recipe file runs in by itself: its ``output.dir``, else ``runs/<file name>``."""
    output = read_yaml(path).get("output")
    return output["dir"] if isinstance(output, dict) and isinstance(output.get("dir"), str) else f"runs/{path.stem}"


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


def build_plan(plan: str | Sequence[Mapping[str, Any]]) -> Plan:
    """The :class:`~jaxtune.tuning.Plan` of a config's ``plan`` section (errors as config errors)."""
    try:
        return Plan.from_data(plan if isinstance(plan, str) else list(plan))
    except PlanError as err:
        message = str(err)
        rule = re.match(r"plan rule #(\d+)\b", message)  # Plan.from_data's name for the item at fault
        raise ConfigError(message if message.startswith("plan") else f"plan: {message}",
                          ("plan", int(rule[1])) if rule else ("plan",)) from None


def validate(config: Config) -> Config:
    """Checks that involve several sections; returns the config unchanged. (Checks that need
    the model, such as ``eval.best_metric`` against its task, are the Trainer's.)"""
    try:
        kind = config.data.source_kind
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if (kind == "preference") != (config.preference is not None):
        raise ConfigError("preference: data of kind preference needs a preference section (e.g. preference: {method: "
                          "dpo})" if kind == "preference" else f"preference: method {config.preference.method} trains "
                          f"on preference pairs, but data.kind is {kind}; use preference data or remove the section")
    heads = [r for r in build_plan(config.plan).rules if r.action == "head"]
    if config.preference is not None and config.preference.method == "reward":
        # A reward model is the pairs' one regression head (a decoder's last token into ``score``).
        if not heads or heads[-1].task != "regression":
            raise ConfigError("plan: preference.method reward trains a scalar head; add {action: head, task: "
                              "regression} to the plan" + (f" (its head's task is {heads[-1].task})" if heads else ""))
        return config
    if kind in ("classification", "regression") and not heads:
        raise ConfigError(f"plan: data of kind {kind} needs a head, "
                          f"e.g. add {{action: head, task: {kind}}} to the plan")
    if heads and heads[-1].task != kind:
        raise ConfigError(f"plan: the head's task is {heads[-1].task} but the data is {kind}" if kind in
                          ("classification", "regression") else
                          f"plan: a head rule turns the model into a {heads[-1].task} model, but data of kind {kind} "
                          "trains a language model; remove the head or change data.kind")
    return config
