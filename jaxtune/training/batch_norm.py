"""Re-estimating the running statistics of the BatchNorms a plan trains, from training batches.

While a stage trains, its BatchNorms normalise with each batch's statistics and move their running
ones toward them by the model's momentum (EfficientNet's 0.99: ``running = 0.99 * running + 0.01 *
batch``). After a short run those running statistics still lean toward the pretrained ones and were
gathered from weights that have since moved, so evaluation normalises differently from training.
The standard fix (``torch.optim.swa_utils.update_bn``; Izmailov et al. 2018) re-estimates them with
the final weights: the cumulative average, with equal weight per batch, of the statistics of
``n`` training batches, the mean and the unbiased variance as ``torch.nn.BatchNorm2d(momentum=None)``
accumulates them.

Here the pass is deterministic (no dropout or stochastic depth, as evaluation runs the network)
and only the BatchNorms whose statistics the plan trains (labelled ``state``) are re-estimated;
the frozen stages' stay as pretrained, as they do in training. A model reports a batch's
statistics when the ``BATCH_STATISTICS`` collection is mutable (see
:class:`jaxtune.models.efficientnet.BatchNorm`).

``train.recalibrate_batch_norm: n`` turns it on in a run: the Trainer re-estimates before every
evaluation and before the final checkpoint, from the first ``n`` batches of a fresh pass over the
training data (the same batches each time, whatever the step: a resumed run re-estimates exactly as
an uninterrupted one, and the training data's own position is untouched). The running statistics do
not enter the gradient (training normalises with the batch's), so the trained weights are the same
with or without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.layers import BATCH_STATISTICS
from jaxtune.training.step import model_inputs, with_state

Batch = dict[str, jax.Array]
# (params, batch) -> the batch's statistics: float32 leaves under their params paths.
StatisticsFn = Callable[[Any, Batch], dict[str, Any]]


def make_statistics_fn(module: nn.Module) -> StatisticsFn:
    """The statistics of one batch of a classification/regression/image batch (the data contract of
    :func:`jaxtune.training.step.make_loss_fn`): ``{path...: {"running_mean": (C,), "running_var":
    (C,)}}`` float32 for each BatchNorm the plan trains (the unbiased variance), from a deterministic
    forward pass of the full params in which those BatchNorms normalise with the batch's statistics.
    The mean is over the whole (global) batch, also when it is sharded over a mesh."""

    def statistics(params: Any, batch: Batch) -> dict[str, Any]:
        _, state = module.apply({"params": params}, **model_inputs(batch), deterministic=True,
                                mutable=[BATCH_STATISTICS])
        return state.get(BATCH_STATISTICS, {})

    return statistics


def recalibrate(params: Any, batches: Iterable[Batch], statistics_fn: StatisticsFn,
                combine: Callable[[Any], Any] = lambda p: p) -> Any:
    """``params`` with the running statistics that ``statistics_fn`` reports replaced by their
    average over ``batches`` (each batch weighs the same, as ``update_bn``'s cumulative average).

    Args:
      params: the tree that holds the statistics (the trainable params in a run), nested dicts.
      batches: one or more batches (on device).
      statistics_fn: :func:`make_statistics_fn`'s function (jitted as the caller places it).
      combine: builds the full params the model reads from ``params`` (adds the frozen leaves).

    Returns:
      ``params`` with those leaves replaced (cast to each leaf's dtype); every other leaf is the same object.
    """
    total, count, full = None, 0, combine(params)
    for batch in batches:
        stats = statistics_fn(full, batch)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
    if count == 0:
        raise ValueError("train.recalibrate_batch_norm: the training data gave no batch to re-estimate "
                         "the BatchNorm statistics from")
    if not jax.tree.leaves(total):
        raise ValueError("train.recalibrate_batch_norm: the model reported no BatchNorm statistics; the plan "
                         "trains none (their BatchNorms are frozen, or a freeze rule names running_mean/var)")
    return with_state(params, jax.tree.map(lambda x: x / count, total))
