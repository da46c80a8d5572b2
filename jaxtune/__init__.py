"""jaxtune: fine-tune pretrained models in JAX.

::

    import jaxtune as jt

    model = jt.load("all-MiniLM-L6-v2")                           # HF dir, packaged name, GGUF or hub id
    train, val = jt.read("rotten_tomatoes", train_size=1024, validation_size=500)
    model = jt.apply_plan(model, jt.lora(rank=8) + jt.head("classification"), data=train)
    result = jt.Trainer(model, train, val, run_dir="runs/reviews", config=jt.TrainConfig(epochs=1)).fit()
    print(result.report)                                          # base vs fine-tuned
    jt.export(result.model, "out/adapter")                        # PEFT adapter; format="merged"/"gguf"

A recipe (``jaxtune train configs/quickstart.yaml``) is the same calls with the choices read
from YAML: ``jt.finetune(jt.load_config("configs/quickstart.yaml"))``.

Layers (an arrow means "may import"): cli -> recipe/config -> train -> tuning -> models -> assets;
train -> data -> assets. Names below load on first use, so ``import jaxtune`` is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from jaxtune import host_memory, host_threads

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    # models
    "load": "jaxtune.models.load", "ModelConfig": "jaxtune.models.load", "complete": "jaxtune.models.generate",
    # the plan
    "apply_plan": "jaxtune.tuning", "Plan": "jaxtune.tuning", "Tuned": "jaxtune.tuning", "full": "jaxtune.tuning",
    "train": "jaxtune.tuning", "freeze": "jaxtune.tuning", "freeze_all_but": "jaxtune.tuning",
    "lora": "jaxtune.tuning", "dora": "jaxtune.tuning", "prompt_tuning": "jaxtune.tuning", "head": "jaxtune.tuning",
    "summary": "jaxtune.tuning", "export": "jaxtune.tuning",
    # data
    "read": "jaxtune.data.config", "DataConfig": "jaxtune.data.config",
    # training
    "Trainer": "jaxtune.training.trainer", "FitResult": "jaxtune.training.result",
    "TrainConfig": "jaxtune.training.config", "EvalConfig": "jaxtune.training.config",
    "CheckpointConfig": "jaxtune.training.config",
    "OptimizerConfig": "jaxtune.training.optim", "MeshConfig": "jaxtune.training.sharding",
    "PreferenceConfig": "jaxtune.training.preference_config",
    # recipes
    "Config": "jaxtune.config", "ConfigError": "jaxtune.config", "finetune": "jaxtune.recipe",
    "open_run": "jaxtune.recipe", "fetch": "jaxtune.recipe", "predict": "jaxtune.prediction",
}
_RENAMED = {"load_config": ("jaxtune.config", "load")}
__all__ = sorted([*_API, *_RENAMED])


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment, not as it was at import:
    notebooks and test runners replace (and close) their streams after jaxtune is imported."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _default_logging() -> None:
    """Progress and notes as plain lines on stderr, unless the application configures the
    ``jaxtune`` logger itself (any handler of its own replaces this one). Records still
    propagate, so an application's own logging (and pytest's caplog) sees them too; when the root
    logger has handlers, they print the records and this handler does not."""
    logger = logging.getLogger("jaxtune")
    if logger.handlers:
        return
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    # Once the application logs through the root logger (basicConfig, absl...), records reach it by
    # propagation: this handler then stays quiet, so no line is printed twice.
    handler.addFilter(lambda record: not logging.getLogger().handlers)
    handler._jaxtune_default = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_default_logging()
# Before JAX starts its thread pools (a thread's malloc arena is fixed at its first allocation).
try:
    host_memory.configure()
except ValueError as err:  # a typo in a speed setting must not stop `import jaxtune` (and the CLI) with a traceback
    logging.getLogger("jaxtune").warning("%s; glibc's malloc is left as it is", err)
host_threads.threads_for_simulated_devices()
