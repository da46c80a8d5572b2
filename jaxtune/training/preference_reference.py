"""The reference model of DPO/IPO: the run's starting model, in the step (:func:`reference_params`
and :func:`starting_weights`) or its log-probs computed once ahead of training (:class:`ReferenceCache`).

The reference is the policy's own module evaluated on :func:`reference_params`, the same param tree
without adapter leaves (LoRA/DoRA off), with the starting values of whatever started trained laid
over it (full or partial plans; adapters a run starts from, e.g. SFT's). Dropping leaves builds a
new dict of the *same* arrays, so for adapter plans the reference costs no memory beyond
activations: one copy of the base weights serves both passes. (Zeroing ``lora_scale`` would also
share the base, but still runs the adapter matmuls and leaves DoRA's magnitude rescaling on, so it
is not the base for DoRA.) For full or partial fine-tuning the reference needs the starting values
of the trained leaves (:func:`starting_weights`, one extra copy of those leaves, matrices in the
compute dtype), or reference log-probs computed once ahead of training and carried in the batch as
``reference_logps`` (:class:`ReferenceCache`, ``PreferenceConfig(reference="cached")``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune.data.pipeline import Loader, evaluation_loader
from jaxtune.data.preference import PAIR_IDS
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_B, VECTOR_LEAVES
from jaxtune.training.losses import answer_rows
from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.preference_logprobs import paired_rows, policy_token_logprobs, segment_sums
from jaxtune.training.preference_tables import pair_table, segment_pair_ids
from jaxtune.training.sharding import jit_on_mesh
from jaxtune.tuning.partition import combine

Array = jax.Array
Batch = dict[str, Array]
Params = dict[str, Any]
log = logging.getLogger(__name__)


# Where a loss function finds the starting values of trained non-adapter leaves inside ``params``
# (the trainer puts them in the frozen part; the loss pops them before applying the module).
REFERENCE_KEY = "reference_start"


def reference_params(params: Params, starting: Params | None = None) -> Params:
    """The reference model's params: ``params`` without adapter leaves (LoRA/DoRA switched off),
    with ``starting`` (the starting values of trained leaves, if any) laid over them. Modules whose
    adapters ``starting`` holds (a run that starts from trained adapters) keep their other adapter
    leaves (``lora_scale``): their reference is the starting adapter, not the bare base.

    Builds a new nested dict of the same leaf arrays: nothing is copied, so the reference shares
    every base weight with the policy, inside or outside ``jit``.
    """
    start = flatten_dict(starting or {})
    restarted = {path[:-1] for path in start if path[-1] in ADAPTER_LEAVES}
    flat = {path: leaf for path, leaf in flatten_dict(params).items()
            if path[-1] not in ADAPTER_LEAVES or path[:-1] in restarted}
    flat.update(start)
    return unflatten_dict(flat)


def adapters_trained(trainable: Params) -> bool:
    """Whether any adapter has left its initial state: ``lora_b`` starts at zero (LoRA and DoRA), so
    an adapter with an all-zero ``lora_b`` adds nothing and the model is its base there."""
    return any(bool(jnp.any(leaf != 0)) for path, leaf in flatten_dict(trainable).items() if path[-1] == LORA_B)


def starting_weights(trainable: Params, dtype: Any | None = None, *, keep_adapters: bool | None = None) -> Params:
    """What the reference model (the starting model) needs besides the frozen part: a copy of the
    trainable leaves, the weight matrices in ``dtype`` (e.g. the compute dtype, which every layer rounds
    them to before use) or their own, the :data:`~jaxtune.models.layers.VECTOR_LEAVES` (gains, biases)
    in their own: norms read their float32 gain (GPT-2's LayerNorm, Gemma's ``1 + w``), so a rounded
    gain would make the reference another model than the starting policy. Adapter leaves are copied
    only when the adapters are trained (``keep_adapters``, default :func:`adapters_trained`, which
    reads values, so pass it inside ``jit``: a run that starts from SFT adapters); fresh ones are the
    base itself, which the frozen part already is. Empty for a plan of fresh LoRA/DoRA adapters only."""
    keep_adapters = adapters_trained(trainable) if keep_adapters is None else keep_adapters

    def copy(path: tuple[str, ...], leaf: Array) -> Array:
        return jnp.array(leaf, dtype=leaf.dtype if path[-1] in VECTOR_LEAVES else dtype or leaf.dtype, copy=True)

    flat = {path: copy(path, leaf) for path, leaf in flatten_dict(trainable).items()
            if keep_adapters or path[-1] not in ADAPTER_LEAVES}
    return unflatten_dict(flat)


def with_reference_start(trainable: Params, frozen: Params, dtype: Any = None) -> Params:
    """``frozen`` plus, under :data:`REFERENCE_KEY`, :func:`starting_weights` in ``dtype``: the
    DPO/IPO reference model is the starting model. Fresh adapter plans add nothing (the reference is
    the frozen base with adapters off); full or partial plans add their trained leaves, and a run
    that starts from trained adapters (SFT) adds those adapters. It rides with the frozen part, so
    checkpoints (trainable + optimizer state) never hold it, and the Trainer's params leave it out
    of exports."""
    start = starting_weights(trainable, dtype=dtype)
    if not start:
        return frozen
    log.info("preference: the reference model keeps a copy of the %d starting trained leaves (%.1f MB)",
             len(jax.tree.leaves(start)), sum(x.nbytes for x in jax.tree.leaves(start)) / 1e6)
    return {**frozen, REFERENCE_KEY: start}


def reference_logprobs(module: nn.Module, params: Params, batch: Batch, *, starting: Params | None = None,
                       max_segments: int | None = None, chunk_tokens: int = 2048) -> Array:
    """The reference model's summed answer log-probs of a paired batch, float32 ``(B, 2, S)``
    (no gradient). ``params`` are the policy's; see :func:`reference_params`. Computed once ahead of
    training, the result can ride in the batch as ``reference_logps``."""
    rows = paired_rows(batch)
    lp = policy_token_logprobs(module, reference_params(params, starting), rows, chunk_tokens=chunk_tokens,
                               answers=True)
    s = rows["targets"].shape[1] // 2 if max_segments is None else max_segments
    answers = answer_rows(rows)
    sums = segment_sums(lp * answers["loss_weights"].astype(jnp.float32), answers["segment_ids"], s)
    return jax.lax.stop_gradient(sums.reshape(batch["targets"].shape[0], 2, s))


@dataclasses.dataclass
class ReferenceCache:
    """The reference model's log-probs of every pair of one source, computed once before training.

    ``table`` float32 ``(N, 2)``: row ``i`` holds source example ``i``'s summed answer log-probs
    (chosen, rejected) under the reference model, NaN if the pre-pass did not see it (a pair
    dropped by truncation is in no batch either). Batches find their pairs by ``pair_ids``, so
    shuffling, packing and resuming change nothing. :meth:`lookup` gives a host batch the
    ``reference_logps`` ``(B, 2, S)`` the loss reads instead of running the reference model: the
    step then holds no frozen copy of the starting weights and does one forward pass less.
    """

    table: np.ndarray
    max_segments: int | None = None

    @classmethod
    def build(cls, module: nn.Module, trainable: Params, frozen: Params, batches: Iterable[Batch], size: int,
              to_device: Callable[[Batch], Batch], *, sharding: Any = None, dtype: Any = None,
              max_segments: int | None = None, chunk_tokens: int = 2048) -> ReferenceCache:
        """One pass over ``batches`` (host paired batches of a source of ``size`` examples, with
        ``pair_ids``) with the starting model ``trainable`` + ``frozen`` as the reference (the same
        :func:`starting_weights` in ``dtype`` as the in-step reference, so both give the same
        numbers). ``to_device`` places a batch on the mesh (without its ``pair_ids``); ``sharding``
        is the batch's (the result is laid out like it, so each process reads back its own rows)."""

        keep_adapters = adapters_trained(trainable)

        def compute(trainable: Params, frozen: Params, batch: Batch) -> Array:
            starting = starting_weights(trainable, dtype, keep_adapters=keep_adapters)
            # S = L // 2: every pair of any row, whatever max_segments the loss takes
            return reference_logprobs(module, combine(trainable, frozen), batch, starting=starting,
                                      chunk_tokens=chunk_tokens)

        compute = jit_on_mesh(compute, getattr(sharding, "mesh", None), out_shardings=sharding)
        table = pair_table(lambda batch: compute(trainable, frozen, to_device(batch)), batches, size,
                           "computing the reference log-probs (preference.reference: cached)")
        return cls(table, max_segments)

    def lookup(self, batch: Batch) -> np.ndarray:
        """float32 ``(B, 2, S)`` reference log-probs for the host batch ``batch`` (``S`` as the
        loss takes it: ``max_segments`` or ``L // 2``); 0 where a row has no pair."""
        segments = batch["segment_ids"]
        b, length = segments.shape[0], segments.shape[-1]
        s = length // 2 if self.max_segments is None else self.max_segments
        ids = segment_pair_ids(batch[PAIR_IDS], segments, s)[:, 0]
        present = segment_pair_ids(np.ones_like(segments), segments, s)[:, 0] > 0
        if (present & (ids == 0)).any():
            raise ValueError("preference.reference: cached needs pair_ids in every batch (paired rows from "
                             "jaxtune.read data); use reference: model for other data")
        values = self.table[ids[present] - 1]
        if np.isnan(values).any():
            raise ValueError("preference.reference: cached: a batch holds a pair the pre-pass did not score (its "
                             "data differs from the data the cache was built from); use reference: model")
        out = np.zeros((b, s, 2), np.float32)
        out[present] = values
        return out.transpose(0, 2, 1)


def reference_caches(module: nn.Module, trainable: Params, frozen: Params, splits: dict[str, Any],
                     to_device: Callable[[Batch], Batch], config: PreferenceConfig, *, sharding: Any = None,
                     dtype: Any = None, chunk_tokens: int = 2048) -> dict[str, ReferenceCache]:
    """``preference.reference: cached``: a :class:`ReferenceCache` of the starting model's log-probs of
    every pair of each split (``{"train": loader, "eval": loader}``, None for a split the run lacks), one
    pre-pass each. Each split must be a :class:`~jaxtune.data.Loader` (the cache finds a pair by its
    index in the loader's source)."""
    caches = {}
    for name, data in splits.items():
        if data is None:
            continue
        if not isinstance(data, Loader):
            raise ValueError("preference.reference: cached finds each pair's reference log-probs by its index in "
                             "the source, so the data must come from jaxtune.read; use reference: model")
        log.info("preference: reference log-probs of the %s data (%d pairs), computed once", name, len(data.source))
        passes = evaluation_loader(data.source, data.tokenizer, data.config, stats=data.scan())
        caches[name] = ReferenceCache.build(module, trainable, frozen, passes, len(data.source), to_device,
                                            sharding=sharding, dtype=dtype, max_segments=config.max_segments,
                                            chunk_tokens=chunk_tokens)
    return caches

