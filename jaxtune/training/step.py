"""The pure train and eval steps.

``train_step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)``
differentiates only ``trainable``; ``frozen`` is an input that gets no gradient and no
optimizer state. Gradient accumulation runs inside the step as a ``lax.scan`` over micro-batches,
summing loss and weight (real tokens or examples) so k micro-batches equal one batch of k times
the rows. A non-finite loss or gradient leaves params and optimizer state untouched and is
reported in the metrics, and so does an update that would make the params or optimizer state
non-finite (a learning rate that overflows them), so no bad state ever reaches a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxtune.data.tokenize import AnswerChoices
from jaxtune.models.decoder import AUX
from jaxtune.models.layers import STATE_UPDATES
from jaxtune.training.losses import (
    answer_hidden,
    answer_rows,
    auxiliary_loss,
    causal_lm_loss,
    classification_loss,
    projected_columns,
    regression_loss,
)
from jaxtune.training.sharding import jit_on_mesh
from jaxtune.tuning.partition import combine
from jaxtune.tuning.tuned import TASKS

Array = jax.Array
Batch = dict[str, Array]
# (params, batch, rng, deterministic) -> (loss_sum, weight_sum, outputs); see make_loss_fn.
LossFn = Callable[[Any, Batch, Array, bool], tuple[Array, Array, Array]]


def make_loss_fn(module: nn.Module, task: str, *, chunk_tokens: int = 2048, regression: str = "mse",
                 choices: AnswerChoices | None = None) -> LossFn:
    """The task's loss as a function of the full params.

    Batches follow the data contract (``jaxtune.data``): LM batches carry ``input_ids``,
    ``targets``, ``loss_weights``, ``segment_ids``, ``positions``; classification/regression
    batches carry ``input_ids``, ``segment_ids``, ``positions``, ``token_type_ids``, ``labels`` (``(B,)``, or
    packed ``(B, S)`` with ``example_weights`` ``(B, S)``: outputs and losses per segment); image
    batches carry ``pixel_values`` ``(B, C, H, W)`` in place of the token fields, ``example_weights``
    (0 on fill rows) and ``labels``.
    The third output is per-example predictions for metrics (class logits, regression values)
    or, for LMs, the per-row token counts. With ``choices`` (LM only: the tokens that tell the
    allowed answers apart) it is instead :func:`answer_choices` of the batch, for choice accuracy. In
    training, a model that updates state from its batches (BatchNorm statistics the plan trains)
    makes it ``{"predictions": ..., "state": new values}`` (:func:`state_updates`).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}")

    def loss_fn(params: Any, batch: Batch, rng: Array, deterministic: bool) -> tuple[Array, Array, Array]:
        variables, rngs = {"params": params}, {"dropout": rng}
        if task == "lm":
            # The AUX collection is mutable so that a model may report auxiliary losses (auxiliary_loss).
            hidden, state = module.apply(variables, input_ids=batch["input_ids"], positions=batch.get("positions"),
                                         segment_ids=batch.get("segment_ids"), deterministic=deterministic,
                                         method="hidden", rngs=rngs, mutable=[AUX])

            def project(h: Array) -> Array:
                return module.apply(variables, h, method="logits")

            # The LM head and loss on the supervised positions alone, when the loader listed them.
            answers = answer_rows(batch)
            total, weight = causal_lm_loss(answer_hidden(hidden, batch), answers["targets"], answers["loss_weights"],
                                           project, chunk_tokens=chunk_tokens)
            if not deterministic:  # a router's balancing loss trains; an evaluation reports the model's loss
                total = total + auxiliary_loss(state) * weight
            if choices is not None:
                logits = projected_columns(hidden, project, choices.ids, chunk_tokens=chunk_tokens)
                return total, weight, answer_choices(logits, batch, choices)
            return total, weight, batch["loss_weights"].sum(-1)
        outputs, state = module.apply(variables, **model_inputs(batch), deterministic=deterministic,
                                      rngs=rngs, mutable=[AUX, STATE_UPDATES])
        weights = example_weights(batch)
        if task == "classification":
            total, weight = classification_loss(outputs, batch["labels"], weights)
        else:
            total, weight = regression_loss(outputs, batch["labels"], weights, kind=regression)
            outputs = outputs.reshape(batch["labels"].shape)
        if state.get(STATE_UPDATES):
            outputs = {"predictions": outputs, "state": state[STATE_UPDATES]}
        if not deterministic:
            total = total + auxiliary_loss(state) * weight
        return total, weight, outputs

    return loss_fn


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The keyword arguments of a classification/regression/image batch's forward pass: the token
    fields (None where absent), ``pixel_values`` for image models, ``segments`` for packed rows (a
    TunedModel's one output per segment)."""
    inputs = {name: batch.get(name) for name in ("input_ids", "segment_ids", "positions", "token_type_ids")}
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"]
    if segments := packed_segments(batch):
        inputs["segments"] = segments
    return inputs


def answer_choices(choice_logits: Array, batch: Batch, choices: AnswerChoices) -> dict[str, Array]:
    """Where each supervised span (an answer) starts, and which choice it is.

    Args:
      choice_logits: float ``(B, T, C)``, the logits of the choices' telling tokens (``choices.ids``).
      batch: an LM batch (``targets``, ``loss_weights``, ``segment_ids``).
      choices: each answer is ``choices.prefix`` (the template's opening, usually empty) and then
        one of ``choices.ids``.

    Returns:
      ``{"logits": (B, T, C), "start": bool (B, T), "choice": int32 (B, T)}``: ``start`` marks
      the first target of every supervised span (one per assistant turn or completion, also
      in packed rows); ``choice`` is the index among ``choices.ids`` of the span's target after the
      prefix, or -1 (also where the span does not start with the prefix); ``logits`` at a start are
      those of that target's position.
    """
    supervised = batch["loss_weights"] > 0
    segments = batch.get("segment_ids", jnp.ones_like(batch["targets"]))
    previous = jnp.pad(supervised[:, :-1], ((0, 0), (1, 0)))
    same_segment = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (1, 0)))
    start = supervised & ~(previous & same_segment)

    def ahead(x: Array, k: int, fill: Any) -> Array:  # x[:, t + k] at t
        return x if not k else jnp.pad(x[:, k:], ((0, 0), (0, k)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)

    # The k-th target of a span is k positions on when the k targets before it are the span's too.
    k = len(choices.prefix)
    opens = jnp.ones_like(start)
    for j, token in enumerate(choices.prefix):
        opens &= (ahead(batch["targets"], j, -1) == token) & ahead(supervised, j, False)
    opens &= ahead(supervised, k, False) & (ahead(segments, k, -1) == segments)
    target = ahead(batch["targets"], k, -1)
    matches = target[..., None] == jnp.asarray(choices.ids, batch["targets"].dtype)
    choice = jnp.where(opens & matches.any(-1), jnp.argmax(matches, axis=-1), -1).astype(jnp.int32)
    return {"logits": ahead(choice_logits, k, 0.0), "start": start, "choice": choice}


def packed_segments(batch: Batch) -> int | None:
    """``S``, the label slots per row of a packed classification/regression batch (``labels``
    ``(B, S)``), or None for one example per row (or a batch without labels)."""
    labels = batch.get("labels")
    return labels.shape[1] if labels is not None and labels.ndim == 2 else None


def example_weights(batch: Batch) -> Array:
    """1.0 for real rows, 0.0 for the empty rows that fill a last partial batch (no real tokens);
    a batch's own ``example_weights`` where it has them (images; packed rows: ``(B, S)``, 0 on empty slots)."""
    if "example_weights" in batch:
        return batch["example_weights"].astype(jnp.float32)
    return (batch["segment_ids"] != 0).any(axis=-1).astype(jnp.float32)


def _micro_batches(batch: Batch, k: int) -> Batch:
    """Split each ``(B, ...)`` leaf into ``(k, B/k, ...)`` taking every k-th row, so each
    micro-batch draws rows from every device's shard of the batch."""
    def split(x: Array) -> Array:
        if x.shape[0] % k:
            # a Loader's batches are whole (data.batch_size, checked first): this is a caller's batch, often the
            # last, partial one of an iterable
            raise ValueError(f"train.grad_accum_steps: a batch of {x.shape[0]} rows does not split into {k} "
                             f"micro-batches of equal rows; give batches whose rows are a multiple of {k} (drop a "
                             f"last, partial batch), or set train.grad_accum_steps to a divisor of {x.shape[0]}")
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def metric_sums(outputs: Any) -> dict[str, Array]:
    """The metric sums a loss fn reports beside its loss (``outputs["metrics"]``: float32 scalars
    that add up over micro-batches and hosts, e.g. the preference losses' reward sums), else {}.
    Decided when the step is traced, so a loss without them costs nothing."""
    return dict(outputs["metrics"]) if isinstance(outputs, dict) and "metrics" in outputs else {}


def state_updates(outputs: Any) -> dict[str, Any]:
    """The new values of model-state leaves (params paths, nested) that a loss fn reports in
    training (``outputs["state"]``), else {}. Like :func:`metric_sums`, decided at trace time."""
    return dict(outputs["state"]) if isinstance(outputs, dict) and "state" in outputs else {}


def with_state(params: Any, updates: dict[str, Any]) -> Any:
    """``params`` (nested dicts) with the leaves that ``updates`` names replaced by its values."""
    if not updates:
        return params
    out = dict(params)
    for key, value in updates.items():
        if key not in params:
            raise ValueError(f"the model updates state {key!r}, which is not among the trained params; "
                             "its statistics must be labelled 'state' by the plan")
        out[key] = with_state(params[key], value) if isinstance(value, dict) else value.astype(params[key].dtype)
    return out


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1
) -> Callable[[Any, Any, Any, Batch, Array], tuple[Any, Any, dict[str, Array]]]:
    """Build the (unjitted) train step; jit it with the trainable and optimizer state donated.

    Metrics: ``loss`` (mean over the batch's weight), ``weight`` (tokens or examples that
    counted), ``tokens`` (real, non-pad input tokens: the work done, for tokens/s and MFU),
    ``grad_norm`` (after averaging, before clipping), ``finite`` (False when the loss, the
    gradient, the new params or the new optimizer state is not finite), ``grad_finite`` (loss and
    gradient alone: ``finite`` False with this True means the update overflowed); and
    ``metric_sums``, the loss fn's own metric sums (:func:`metric_sums`) added over the
    micro-batches, when it reports any. Model state the loss fn updates (:func:`state_updates`)
    is written into the new trainable params, micro-batch after micro-batch as PyTorch's
    forward passes would update it.

    The update is applied whether ``finite`` or not: the caller stops at a non-finite step and
    never saves its state (the Trainer does). Keeping the old state instead holds the old and the
    new params and optimizer state at once: a Llama-3 1B shape's full fine-tuning step (AOT, fp32,
    1 x 512 tokens) needed 13.8 GiB of temporaries that way against 9.2 GiB now.
    """
    k = grad_accum_steps

    def grads_of(trainable: Any, frozen: Any, batch: Batch, rng: Array) -> tuple[tuple[Any, Array, Array, dict], dict]:
        def objective(tr: Any) -> tuple[Array, tuple[Array, dict, dict]]:
            total, weight, outputs = loss_fn(combine(tr, frozen), batch, rng, False)
            return total, (weight, metric_sums(outputs), state_updates(outputs))

        (total, (weight, sums, state)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        return (grads, total, weight, sums), state

    def step(trainable: Any, frozen: Any, opt_state: Any, batch: Batch,
             rng: Array) -> tuple[Any, Any, dict[str, Array]]:
        if k == 1:
            (grads, total, weight, sums), state = grads_of(trainable, frozen, batch, rng)
        else:
            micro, rngs = _micro_batches(batch, k), jax.random.split(rng, k)

            def accumulate(carry: tuple[tuple[Any, Array, Array, dict], dict],
                           xs: tuple[Batch, Array]) -> tuple[tuple[tuple[Any, Array, Array, dict], dict], None]:
                added, state = carry  # sums over the micro-batches so far; the state after the last one
                new, state = grads_of(with_state(trainable, state), frozen, *xs)
                return (jax.tree.map(jnp.add, added, new), state), None

            # The carry's shapes, from a trace of one micro-batch (no compute): grads in float32.
            shapes, state_shapes = jax.eval_shape(grads_of, trainable, frozen,
                                                  jax.tree.map(lambda x: x[0], micro), rngs[0])
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
            state0 = _select(trainable, state_shapes)
            ((grads, total, weight, sums), state), _ = jax.lax.scan(accumulate, (init, state0), (micro, rngs))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        grad_finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = with_state(optax.apply_updates(trainable, updates), state)
        # Finite loss and gradient do not make a finite update: a learning rate that overflows
        # the params does it alone, and so does Adam's g² in float16. Checked on the results.
        finite = grad_finite & all_finite((new_trainable, new_opt_state))
        if "segment_ids" in batch:
            real = (batch["segment_ids"] != 0).sum()
        elif "input_ids" in batch:
            real = jnp.asarray(batch["input_ids"].size)
        else:  # images: the work done is counted in real examples
            real = example_weights(batch).sum()
        metrics = {"loss": total / denom, "weight": weight, "tokens": real.astype(jnp.float32), "grad_norm": grad_norm,
                   "finite": finite, "grad_finite": grad_finite}
        if sums:
            metrics["metric_sums"] = sums
        return new_trainable, new_opt_state, metrics

    return step


def _select(params: Any, like: dict[str, Any]) -> dict[str, Any]:
    """The sub-tree of ``params`` with the keys of ``like`` (nested)."""
    return {k: _select(params[k], v) if isinstance(v, dict) else params[k] for k, v in like.items()}


def jit_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                   mesh: Mesh | None = None, trainable_shardings: Any = None, opt_shardings: Any = None) -> Any:
    """The train step jitted as the Trainer runs it: trainable params and optimizer state donated
    (their outputs reuse the buffers) and placed back on their shardings. Traced under ``mesh``
    (its abstract form: :func:`~jaxtune.training.sharding.jit_on_mesh`), so the model can keep its
    activations' rows split over the batch axes and run splash attention per shard. The one
    definition of the program, so a memory plan (:mod:`jaxtune.training.memory`) compiles what
    training runs."""
    step = make_train_step(loss_fn, optimizer, grad_accum_steps=grad_accum_steps)
    placement = {} if trainable_shardings is None else {"out_shardings": (trainable_shardings, opt_shardings, None)}
    return jit_on_mesh(step, mesh, donate_argnums=(0, 2), **placement)


def all_finite(tree: Any) -> Array:
    """True when every float element of ``tree`` is finite: each leaf's largest magnitude is finite
    (XLA's ``max`` propagates NaN, and |-inf| is inf). One reduction per leaf, which XLA fuses with
    the values' producer. Not ``isfinite(x).all()``: XLA:CPU materialises its boolean mask, and the
    check took twice as long (11 vs 5.6 ms over 7M float32 params, next to AdamW's 15-18 ms); not a
    sum of the values, which overflows on large but finite ones; not ``x * 0``, which fast-math may
    fold away."""
    peaks = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    return jnp.isfinite(jnp.stack(peaks)).all() if peaks else jnp.asarray(True)


def make_eval_step(loss_fn: LossFn) -> Callable[[Any, Any, Batch], dict[str, Array]]:
    """``eval_step(trainable, frozen, batch) -> {"loss_sum", "weight", "outputs"[, "labels", "keep"]}``
    (deterministic). Classification/regression steps also return the batch's ``labels`` and
    ``keep`` (real rows, not fill), so the host reduces from the step's (global) outputs alone,
    never mixing them with its own process-local batch."""

    def step(trainable: Any, frozen: Any, batch: Batch) -> dict[str, Array]:
        total, weight, outputs = loss_fn(combine(trainable, frozen), batch, jax.random.key(0), True)
        result = {"loss_sum": total, "weight": weight, "outputs": outputs}
        if "labels" in batch:
            result.update(labels=batch["labels"], keep=example_weights(batch) > 0)
        return result

    return step
