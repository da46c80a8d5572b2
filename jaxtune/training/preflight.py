"""What a Trainer settles before its first step: loaders for its data, the number of steps, and
the checks that refuse a mismatch of data, model, mesh and evaluation with a one-line error.

Each function is pure over its arguments (no trainer state), so the Trainer's constructor reads as
a list of calls and every refusal can be tested on its own. Everything here runs before any
compute: a bad run fails in seconds, naming the config field to change.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Protocol, runtime_checkable

from jax.sharding import Mesh

from jaxtune.data.config import DataConfig, source_fields
from jaxtune.data.image_pixels import ImageSpec
from jaxtune.data.image_sources import ImageSource
from jaxtune.data.images import image_loader
from jaxtune.data.pipeline import LM_KINDS, Loader, LoaderConfig, evaluation_loader, training_loader
from jaxtune.data.source_types import PREFERENCE, DataError, Source
from jaxtune.data.tokenize import AnswerChoices, choice_token_ids
from jaxtune.models.load import tokenizer_of
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.evaluate import METRICS, REWARD_SCORES
from jaxtune.training.optim import OptimizerConfig
from jaxtune.training.preference_config import REWARD, PreferenceConfig, check_preference
from jaxtune.training.sharding import MeshConfig, data_parallel_size
from jaxtune.tuning.tuned import Tuned

log = logging.getLogger("jaxtune.training.trainer")


@runtime_checkable
class Transformation(Protocol):
    """What the Trainer uses of an optax optimizer: a GradientTransformation, or any object with its
    ``init`` and ``update`` (optax.MultiSteps)."""

    def init(self, params: Any) -> Any: ...

    def update(self, updates: Any, state: Any, params: Any = None) -> Any: ...


# Trainer's keyword arguments: the types each accepts (None where the argument is optional), what to
# call them in an error, and the constructor a dict of fields goes through. Without this check a dict
# (a recipe section read by hand) fails deep inside, on its first attribute.
ARGUMENTS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "config": ((TrainConfig,), "jt.TrainConfig", "jt.TrainConfig"),
    "data": ((LoaderConfig, type(None)), "jt.DataConfig (or a LoaderConfig) or None", "jt.DataConfig"),
    "optimizer": ((OptimizerConfig, Transformation),
                  "jt.OptimizerConfig or an optax GradientTransformation", "jt.OptimizerConfig"),
    "eval": ((EvalConfig,), "jt.EvalConfig", "jt.EvalConfig"),
    "checkpoint": ((CheckpointConfig,), "jt.CheckpointConfig", "jt.CheckpointConfig"),
    "mesh": ((Mesh, MeshConfig, type(None)), "jt.MeshConfig, a jax Mesh or None", "jt.MeshConfig"),
    "preference": ((PreferenceConfig, type(None)), "jt.PreferenceConfig or None", "jt.PreferenceConfig"),
}


def check_arguments(model: Any, **arguments: Any) -> None:
    """Refuse a model that is not planned, a Trainer argument of the wrong type (see ``ARGUMENTS``), a
    ``DataConfig`` that sets a field choosing or reading the examples (``train``, ``train_size``...) and a
    reward model's ``eval.best_metric`` that its evaluation does not report (a ``logps/`` one)."""
    if not isinstance(model, Tuned):
        raise TypeError(f"model: expected a planned model (jt.Tuned), got {type(model).__name__}; apply a plan "
                        "first: jt.apply_plan(model, plan)")
    for name, value in arguments.items():
        types, expected, make = ARGUMENTS[name]
        if not isinstance(value, types):
            fix = f"; use {make}(**{{...}})" if isinstance(value, dict) else ""
            raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}{fix}")
    data = arguments.get("data")
    if isinstance(data, DataConfig) and (unread := source_fields(data)):
        raise ValueError(f"data.{unread[0]}: the Trainer is handed the examples already read and would ignore it; "
                         "pass it to jaxtune.read, which reads them, and give the Trainer the sources it returns")
    preference, evaluation = arguments.get("preference"), arguments.get("eval")
    if preference is not None and preference.method == REWARD and evaluation is not None:
        # the preference task's metrics but the log-probs, which a reward model has not: never compared otherwise
        check_best_metric(evaluation, REWARD, False)


def loader_for(data: Any, model: Tuned, config: LoaderConfig, *, train: bool, max_pairs: int | None = None,
               name: str | None = None) -> Any:
    """A loader for a :class:`~jaxtune.data.Source` (batched by ``config``: training order and
    packing with ``train``, the evaluation pass without; at most ``max_pairs`` preference pairs a
    packed row), anything else (a Loader, an iterable of batches, None) as it is. Text is tokenized
    once here, so bad rows and over-long examples fail before any compute; images are decoded once
    (the same check), sized and normalised as ``model`` expects. ``name`` is the argument errors
    name (default: ``train_data`` or ``eval_data``)."""
    name = name or ("train_data" if train else "eval_data")
    # Both iterate, but not as batches: a pair of sources as two "batches", a path as its characters.
    if isinstance(data, tuple) and data and all(isinstance(d, Source | None) for d in data):
        raise TypeError(f"{name}: a (train, validation) pair; pass them apart: Trainer(model, train, val)")
    if isinstance(data, str | os.PathLike):
        raise TypeError(f"{name}: a path: read it first with jt.read(path, kind=...)")
    if not isinstance(data, Source):
        return data
    if isinstance(data, ImageSource):
        loader = image_loader(data, ImageSpec.for_model(model.config, model.source), config, train=train)
        if getattr(config, "verify_images", True):
            loader.scan()  # every image file decodes: a corrupt one fails here, not at its batch
        return loader
    if getattr(config, "images", False):  # would be ignored: the data says what it is
        raise ValueError(f"data.images: true, but {name} is {data.kind} text, not images; remove data.images (and "
                         "the image options augment, verify_images)")
    tokenizer = tokenizer_of(model)
    if train:
        loader = training_loader(data, tokenizer, config, max_pairs=max_pairs)
    else:
        loader = evaluation_loader(data, tokenizer, config, getattr(config, "eval_batch_size", None),
                                   max_pairs=max_pairs)
    log.info("data: %s %s; %s", "train" if train else "validation", data.report.summary(), loader.scan().summary())
    return loader


def data_kinds(*datas: Any) -> set[str]:
    """The ``data.kind`` of each loader among ``datas`` (other iterables have none to read)."""
    return {d.source.kind for d in datas if isinstance(d, Loader)}


def check_data(model: Tuned, train_data: Any, eval_data: Any, mesh: Mesh,
               preference: PreferenceConfig | None) -> None:
    """Refuse data that does not fit the model, the plan or the mesh: its kind against the model's
    task (and the preference loss), batch rows against the data parallelism, ``max_length``
    against the position embeddings, packing with prompt tuning, token ids against the
    vocabulary, and more labels than the classification head has outputs."""
    task = model.task
    kinds = data_kinds(train_data, eval_data)
    check_preference(preference, kinds, task, model.num_outputs, model=model)
    cap = preference.max_segments if preference is not None else None
    for data in (train_data, eval_data):
        if (cap and isinstance(data, Loader) and data.pairs and data.packs
                and (data.max_pairs is None or data.max_pairs > cap)):
            raise ValueError(f"preference.max_segments: the loss sees {cap} pairs a row, but the loader packs "
                             f"{data.max_pairs or 'as many as fit'}; build it with max_pairs={cap} (or pass the "
                             "source and let the Trainer build it)")
    for kind in kinds - {PREFERENCE}:
        if (kind in LM_KINDS) != (task == "lm") or (task != "lm" and kind != task):
            fix = "remove the head rule from the plan" if kind in LM_KINDS else f"add a {kind} head to the plan"
            raise ValueError(f"the data is {kind} but the model is a {task} model; {fix}")
    loaders = [d for d in (train_data, eval_data) if isinstance(d, Loader)]
    ways = data_parallel_size(mesh)
    for data in loaders:
        if (data.batch_size * data.shard_count) % ways:
            raise ValueError(f"data.batch_size: {data.batch_size * data.shard_count} rows do not split over the "
                             f"mesh's {ways}-way data parallelism (mesh data x fsdp); use a multiple of {ways}")
    check_rows_fit(model, loaders)
    check_token_ids(model, loaders)
    labels = getattr(train_data, "source", None) and train_data.source.label_names
    if task == "classification" and labels and len(labels) > model.num_outputs:
        raise ValueError(f"the data has {len(labels)} labels but the head has {model.num_outputs} outputs; "
                         "pass data=train to apply_plan to size the head from the data")


def check_rows_fit(model: Tuned, loaders: list[Loader]) -> None:
    """A row, with prompt tuning's virtual tokens before it, must fit the model's position embeddings
    (past them a learned table reads nothing: NaN), and prompt tuning takes one example a row (it
    prepends its tokens to a row's first example only), in evaluation as in training."""
    positions = getattr(model.config, "max_position_embeddings", None)
    virtual = model.prompt_tokens
    # Rotary and relative positions have no table to run out of, but past the context the checkpoint was
    # trained for (its config.json's max_position_embeddings, any rope_scaling included) the model has seen none.
    trained = None if positions else model.hf_config.get("max_position_embeddings")
    longest = max((data.config.max_length + virtual for data in loaders), default=0)
    if isinstance(trained, int) and longest > trained:
        meets, extend = _past_the_context(model.config)
        log.warning("data.max_length: rows of %d positions are longer than the %d the model was trained for "
                    "(max_position_embeddings in its config.json): %s; set data.max_length to %d or less%s",
                    longest, trained, meets, trained - virtual, extend)
    for data in loaders:
        if positions and data.config.max_length + virtual > positions:
            room = f"{positions - virtual} or less (the plan's {virtual} virtual tokens come first)" if virtual else \
                f"{positions} or less"
            raise ValueError(f"data.max_length: {data.config.max_length}"
                             + (f" + {virtual} virtual tokens" if virtual else "")
                             + f" is more than the model's {positions} position embeddings (max_position_embeddings "
                             f"in its config.json); set data.max_length to {room}")
        if virtual and data.packs:
            raise ValueError("data.packing: prompt tuning prepends its virtual tokens to a row's first example only; "
                             "set data.packing: false (one example per row) with a prompt rule in the plan")


def _past_the_context(config: Any) -> tuple[str, str]:
    """What rows past the trained context meet in a family without a position table, and the way to
    extend the context where there is one: only RoPE's ``rope_scaling`` (decoders, ModernBERT) stretches
    it; DeBERTa-v3's relative positions clip far distances to the farthest it learned, with nothing to set."""
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if any(name.endswith("rope_scaling") for name in fields):
        return "rotary positions past it are new to it", ", or extend the context with rope_scaling in its config.json"
    if "max_relative_positions" in fields:
        return "its relative positions go past it, but it has seen no rows this long", ""
    return "positions past it are new to it", ""


def check_token_ids(model: Tuned, loaders: list[Loader]) -> None:
    """Every token id of the data must have an embedding row: out of range, a gather would clamp it
    to the last row (or fill it) without a word, and the run would train on nonsense."""
    vocab = getattr(model.config, "vocab_size", None)
    if not vocab:
        return
    for data in loaders:
        stats = data.scan()
        if stats.largest_id >= vocab:
            raise DataError(stats.largest_id_where or "data",
                            f"the tokenizer gives token id {stats.largest_id}, but the model has only {vocab} "
                            "embedding rows (vocab_size in its config.json)",
                            "use the tokenizer saved with the model, or one whose ids stay below vocab_size")


def count_steps(config: TrainConfig, train_data: Any) -> int:
    """``config.steps``, or ``epochs x rows // batch_size`` (1 with no train data: a trainer that only
    evaluates). Each step reads one batch of ``data.batch_size`` rows, whatever ``grad_accum_steps``
    (which splits that batch into micro-batches, see :func:`check_accumulation`)."""
    if config.steps is not None:
        return config.steps
    if train_data is None:
        return 1
    if not isinstance(train_data, Loader):
        raise ValueError("train.epochs needs train data from jaxtune.read (a source) or a Loader; give "
                         "train.steps for other iterables")
    rows, how = train_data.rows_per_epoch()
    epochs = config.epochs or 1.0
    batch = train_data.config.batch_size
    steps = int(rows * epochs) // batch
    if steps < 1:
        raise ValueError(f"train.epochs: {epochs:g} epoch(s) of {how} is less than one batch of {batch} rows; use "
                         "more data or a smaller data.batch_size")
    log.info("steps: %d (%g epoch(s) of %s / batch %d)", steps, epochs, how, batch)
    return steps


def check_fit(config: TrainConfig, train_data: Any, eval_data: Any) -> None:
    """Refuse a ``fit`` with nothing to train: it reported "finished" at step 0 of ``train.steps``.
    Checked by ``fit``, not the constructor: a trainer without data still evaluates data passed to
    ``evaluate`` and exports (``jaxtune.open_run`` rebuilds a run without its training data)."""
    if train_data is not None:
        return
    if eval_data is None:
        raise ValueError("train_data: the Trainer has no train_data and no eval_data, so fit() has nothing to do; "
                         "pass train_data to the Trainer (or call evaluate(data=...) to score data)")
    if config.steps is not None:
        raise ValueError("train.steps: there is no train_data to train on; evaluate() scores eval_data")


def check_accumulation(config: TrainConfig, train_data: Any) -> None:
    """``grad_accum_steps`` splits each batch of ``data.batch_size`` rows into that many micro-batches
    (one update per batch, a micro-batch's activations in memory at a time), so it must divide the batch."""
    k = config.grad_accum_steps
    if k > 1 and isinstance(train_data, Loader) and train_data.config.batch_size % k:
        raise ValueError(f"train.grad_accum_steps: {k} does not divide data.batch_size {train_data.config.batch_size}; "
                         "each update splits its batch into that many micro-batches: choose a divisor of the batch "
                         "size (raise data.batch_size for a larger update)")


def check_recalibration(config: TrainConfig, model: Tuned, train_data: Any) -> None:
    """``train.recalibrate_batch_norm`` needs BatchNorm statistics that the plan trains and training
    data that can be read again from its start (a source or a Loader, not a one-pass iterable)."""
    if not config.recalibrate_batch_norm:
        return
    if not getattr(model.config, "training_batch_norms", ()):
        raise ValueError(f"train.recalibrate_batch_norm: {config.recalibrate_batch_norm}, but the plan trains no "
                         "BatchNorm statistics (the model has none, its BatchNorms are frozen, or a freeze rule "
                         "names running_mean/var); remove it or train a stage with BatchNorms")
    if not isinstance(train_data, Loader):
        raise ValueError("train.recalibrate_batch_norm re-reads the first training batches, so it needs train data "
                         "from jaxtune.read (a source) or a Loader, not a one-pass iterable")


def choice_ids(model: Tuned, config: EvalConfig, kinds: set[str]) -> AnswerChoices | None:
    """The tokens that tell the ``eval.choices`` answers apart, as the training data encodes them
    (None without choices)."""
    choices = config.choices or ()
    if not choices:
        return None
    if model.task != "lm" or not kinds <= {"chat", "prompt_completion"}:
        raise ValueError(f"eval.choices: scores the answers of chat or prompt_completion data, not "
                         f"{', '.join(sorted(kinds)) or model.task} data; remove eval.choices")
    return choice_token_ids(tokenizer_of(model), next(iter(kinds), "chat"), choices)


def check_best_metric(config: EvalConfig, task: str, with_choices: bool) -> None:
    """``eval.best_metric`` must be one that evaluation reports for ``task`` (the choice metrics
    only with ``eval.choices``) and that has a better direction: a reward model's scores' level
    (:data:`~jaxtune.training.evaluate.REWARD_SCORES`) has none."""
    metric = config.best_metric
    if metric is None:
        return
    reported = METRICS[task] + (("choice_accuracy", "choice_macro_f1") if with_choices else ())
    allowed = tuple(m for m in reported if not (task == REWARD and m in REWARD_SCORES))
    if metric.removeprefix("eval/") not in allowed:
        why = " (its scores' level is neither better nor worse)" if task == REWARD else ""
        raise ValueError(f"eval.best_metric: expected one of {', '.join(allowed)} for a {task} model{why}, "
                         f"got {metric!r}")


def check_evaluation(config: EvalConfig, train_data: Any, eval_data: Any) -> None:
    """A training run's evaluation settings need validation data: without it ``best_metric`` (and
    ``use_best``, early stopping) would be dropped without a word; ``every`` alone is warned about."""
    if train_data is None or eval_data is not None:
        return
    fix = ("give validation data (data.validation, data.validation_fraction, or a packaged dataset's test "
           "split; eval_data= for the Trainer)")
    if config.best_metric:
        raise ValueError(f"eval.best_metric: {config.best_metric!r} is chosen from evaluations, but the run has no "
                         f"validation data; {fix}, or remove eval.best_metric")
    if config.every:
        log.warning("eval.every: %d, but the run has no validation data, so it evaluates nothing; %s",
                    config.every, fix)


