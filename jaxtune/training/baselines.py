"""Cheap, strong baselines beside a fine-tuned classifier or regressor, on the same split.

Fine-tuning is worth its cost only when it beats what costs seconds. For classification and
regression data the base report therefore also scores two baselines, fit on the training split
and scored on the held-out split the fine-tuned model is scored on:

- ``probe``: a linear probe on the frozen model's features: the mean over real tokens of the
  body's last hidden states (the sentence-embedding pooling), standardised, then logistic
  regression (classification) or ridge regression (regression).
- ``tfidf``: the text alone: word 1-2-gram TF-IDF (sublinear term frequency), then the same
  linear models. A sentence pair is one text, joined by a space.

scikit-learn fits both (:data:`CLASSIFIER` and :data:`REGRESSOR` are their settings). The
regularisation strength is chosen by 3-fold cross-validation on the training split: a fixed
one over-fits hundreds of features on a thousand rows (a weak baseline flatters fine-tuning). Metrics
are :mod:`jaxtune.training.evaluate`'s, under ``probe/<metric>`` and ``tfidf/<metric>``, with the
seconds each took (features included) under ``probe/seconds`` and ``tfidf/seconds``.
Classification also reports ``loss``: the mean cross-entropy of the predicted probabilities,
comparable to the fine-tuned model's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.data.pipeline import Loader, evaluation_loader
from jaxtune.models.layers import pool
from jaxtune.training.evaluate import classification_metrics, in_lockstep, regression_metrics
from jaxtune.training.sharding import jit_on_mesh
from jaxtune.training.step import packed_segments
from jaxtune.tuning.partition import combine
from jaxtune.tuning.tuned import Tuned, is_image

log = logging.getLogger(__name__)
# scikit-learn settings (the test's independent computation uses the same).
CLASSIFIER = {"C": [0.01, 0.1, 1.0, 10.0]}  # LogisticRegression's grid, searched by 3-fold log loss
FOLDS = 3
REGRESSOR = {"alphas": (0.1, 1.0, 10.0, 100.0)}  # RidgeCV (efficient leave-one-out)
TFIDF = {"ngram_range": (1, 2), "sublinear_tf": True}


def make_features_step(module: Any, mesh: Any) -> Callable[[Any, Any, dict[str, Any]], jax.Array]:
    """A jitted ``(trainable, frozen, batch) -> (B, D)`` float32 step: the body's last hidden
    states mean-pooled over real tokens (``segment_ids != 0``), or for packed rows (``labels``
    ``(B, S)``) over each segment, ``(B, S, D)``; replicated on ``mesh``."""

    def step(trainable: Any, frozen: Any, batch: dict[str, Any]) -> jax.Array:
        hidden = module.apply({"params": combine(trainable, frozen)}, input_ids=batch["input_ids"],
                              segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                              token_type_ids=batch.get("token_type_ids"), method="hidden")
        return pool(hidden, batch["segment_ids"], "mean", packed_segments(batch)).astype(jnp.float32)

    return jit_on_mesh(step, mesh, out_shardings=NamedSharding(mesh, PartitionSpec()))


def pooled_features(features_step: Callable[[Any, Any, dict[str, Any]], jax.Array], trainable: Any, frozen: Any,
                    batches: Iterable[dict[str, Any]], *,
                    to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, D)`` float32 and labels ``(N,)`` of every real example of ``batches`` (fill
    rows of a last partial batch and a packed row's empty label slots are left out)."""
    features, labels = [], []
    for batch in in_lockstep(batches):  # each process as many steps (empty rows fill: weight 0)
        keep = (np.asarray(batch["example_weights"]) > 0 if "example_weights" in batch
                else np.asarray(batch["segment_ids"]).any(axis=-1))
        out = np.asarray(jax.device_get(features_step(trainable, frozen, to_device(batch))))
        features.append(out[keep])
        labels.append(np.asarray(batch["labels"])[keep])
    return np.concatenate(features), np.concatenate(labels)


def texts(loader: Loader) -> tuple[list[str], np.ndarray]:
    """The texts (a pair joined by a space) and labels of the rows a labeled loader keeps: a row that
    ``data.truncation: drop`` leaves out is left out here too, so that the baselines are fit and
    scored on the rows the model is."""
    rows = [row for row in (loader.source[i] for i in range(len(loader.source))) if loader.tokenize(row)]
    joined = [r["text"] if r.get("text_pair") is None else f"{r['text']} {r['text_pair']}" for r in rows]
    return joined, np.asarray([r["label"] for r in rows])


def _score(model: Any, x_train: Any, y_train: np.ndarray, x_val: Any, y_val: np.ndarray, task: str,
           num_classes: int) -> dict[str, float]:
    model.fit(x_train, y_train)
    if task == "regression":
        return regression_metrics(model.predict(x_val), y_val)
    probs = np.full((len(y_val), num_classes), 1e-12)
    probs[:, model.classes_.astype(np.int64)] = np.clip(model.predict_proba(x_val), 1e-12, 1.0)
    loss = float(-np.mean(np.log(probs[np.arange(len(y_val)), y_val.astype(np.int64)])))
    return {"loss": loss, **classification_metrics(probs, y_val, num_classes)}


def _linear(task: str, y_train: np.ndarray, *, scale: bool) -> Any:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "regression":
        model = RidgeCV(**REGRESSOR)
    elif np.unique(y_train, return_counts=True)[1].min() >= FOLDS:
        model = GridSearchCV(LogisticRegression(max_iter=2000), CLASSIFIER, cv=FOLDS, scoring="neg_log_loss")
    else:  # a class too rare to appear in every fold: the default strength
        model = LogisticRegression(max_iter=2000)
    return make_pipeline(StandardScaler(), model) if scale else model


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, task: str,
                 num_classes: int = 0) -> dict[str, float]:
    """A linear probe on features ``(N, D)``: standardised, then logistic or ridge regression."""
    return _score(_linear(task, y_train, scale=True), x_train, y_train, x_val, y_val, task, num_classes)


def tfidf_scores(train_texts: list[str], y_train: np.ndarray, val_texts: list[str], y_val: np.ndarray, task: str,
                 num_classes: int = 0) -> dict[str, float]:
    """Word 1-2-gram TF-IDF, then logistic or ridge regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(**TFIDF), _linear(task, y_train, scale=False))
    return _score(model, train_texts, y_train, val_texts, y_val, task, num_classes)


def applies(model: Tuned, train: Any, validation: Any) -> bool:
    """Whether :func:`baseline_metrics` fits anything for this model and data."""
    return isinstance(train, Loader) and isinstance(validation, Loader) and not is_image(model.config)


def training_pass(train: Loader, validation: Loader) -> Loader:
    """The training split once, in order, in evaluation-sized batches (packed as training packs it,
    a row giving each of its examples' features): what the probe's features come from."""
    return evaluation_loader(train.source, train.tokenizer, train.config, validation.config.batch_size)


def baseline_metrics(model: Tuned, trainable: Any, frozen: Any, train: Any, validation: Any, *, mesh: Any,
                     to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b) -> dict[str, float]:
    """Both baselines as flat metrics (``probe/accuracy``, ``tfidf/seconds``...).

    Args:
      model: the planned model (its module and task; ``num_outputs`` is the classifier's width).
      trainable, frozen: its params before training (fresh adapters leave the body as it was).
      train, validation: the run's training and evaluation loaders (anything else: no
        baselines); the training split is read once more, in order, for its features.
      mesh, to_device: where the features step runs, and how a host batch gets there.
    """
    if not (isinstance(train, Loader) and isinstance(validation, Loader)):
        return {}  # batches without their rows (an iterable of arrays): no texts to fit on
    if is_image(model.config):
        log.info("baselines: text models only so far (benchmarks/quality.py fits the image baseline)")
        return {}
    log.info("fitting the baselines (linear probe, TF-IDF) on the training split ...")
    step = make_features_step(model.module, mesh)

    def features(loader: Loader) -> tuple[np.ndarray, np.ndarray]:
        return pooled_features(step, trainable, frozen, loader, to_device=to_device)

    task, num_classes = model.task, model.num_outputs
    out: dict[str, float] = {}
    start = time.perf_counter()
    x_train, y_train = features(training_pass(train, validation))
    x_val, y_val = features(validation)
    scores = probe_scores(x_train, y_train, x_val, y_val, task, num_classes)
    out.update({f"probe/{k}": v for k, v in scores.items()}, **{"probe/seconds": time.perf_counter() - start})
    start = time.perf_counter()
    (t_train, y_train), (t_val, y_val) = texts(train), texts(validation)
    scores = tfidf_scores(t_train, y_train, t_val, y_val, task, num_classes)
    out.update({f"tfidf/{k}": v for k, v in scores.items()}, **{"tfidf/seconds": time.perf_counter() - start})
    return out
