"""LoRA and DoRA adapters as extra leaves next to a linear's ``kernel``: creation, merge, unmerge.

A :class:`jaxtune.models.layers.Linear` with kernel ``(in, out)`` evaluates
``x @ kernel + s * (x @ lora_a) @ lora_b`` when the leaves below are present, and for DoRA
rescales each output feature to ``magnitude / ||kernel + s * lora_a @ lora_b||`` (norm over
the input axis, as PEFT's ``lora_magnitude_vector``):

==============  ==========  ========  ===========================================================
leaf            shape       dtype     initial value
==============  ==========  ========  ===========================================================
``lora_a``      (in, r)     float32   U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt 5)
``lora_b``      (r, out)    float32   zeros, so the adapted model starts equal to the base
``lora_scale``  ()          float32   alpha / r, or alpha / sqrt(r) for rsLoRA (never trained)
``magnitude``   (out,)      float32   DoRA only: the column norms of the kernel
==============  ==========  ========  ===========================================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune.models import stacking
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, MAGNITUDE
from jaxtune.models.quant import as_float

Array = jax.Array
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One module's adapter: ``kind`` (lora | dora), ``rank``, ``alpha`` and rsLoRA scaling."""

    kind: str
    rank: int
    alpha: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def init_adapter(kernel: Array, spec: AdapterSpec, unit: np.ndarray) -> dict[str, Array]:
    """Adapter leaves for one linear with ``kernel`` ``(in, out)`` (any float dtype), from
    ``unit`` ``(in, r)`` float32 uniform samples in [-1, 1). A stack of linears ``(E, in, out)`` (a MoE
    layer's experts) gets one adapter per linear: ``lora_a`` ``(E, in, r)``, ``lora_b`` ``(E, r, out)``.
    The leaves are numpy arrays (DoRA's ``magnitude`` is computed where the kernel is): a plan places
    what it adds where the model is, once its runs are stacked (:func:`jaxtune.tuning.tuned.apply_plan`)."""
    *lead, fan_in, fan_out = kernel.shape
    if spec.kind == "dora" and lead:
        raise ValueError(f"DoRA on a stack of {lead[0]} linears (MoE experts) is not supported; use LoRA there "
                         "(a lora rule on the experts, dora elsewhere)")
    # Computed by numpy: as jax ops, each kernel shape compiled its own small programs (a divide, a zeros,
    # and a stack per run), most of a LoRA plan's time.
    # A multiply by the float32 reciprocal, as XLA evaluated the divide: the same bits as before.
    leaves = {
        LORA_A: np.asarray(unit, np.float32) * (np.float32(1) / np.float32(math.sqrt(fan_in))),
        LORA_B: np.zeros((*lead, spec.rank, fan_out), np.float32),
        LORA_SCALE: np.asarray(spec.scale, np.float32),
    }
    if spec.kind == "dora":
        leaves[MAGNITUDE] = _magnitude(kernel)
    return leaves


def _magnitude(kernel: Any) -> Array:
    """DoRA's initial magnitude: the column norms of ``kernel`` (dequantized), where the kernel is."""
    return stacking.beside(column_norm(as_float(stacking.materialize(kernel), jnp.float32)), kernel)


def quantized_magnitudes(params: Params, quantized: Any) -> Params:
    """``params`` with each DoRA magnitude beside a kernel at a path in ``quantized`` set to the
    quantized kernel's column norms: the adapted model starts equal to the base it trains on, as
    PEFT's DoRA on a bitsandbytes base (which takes the norm of the dequantized weight)."""
    flat = flatten_dict(params)
    for path in quantized:
        module = path[:-1]
        if path[-1] == "kernel" and module + (MAGNITUDE,) in flat:
            flat[module + (MAGNITUDE,)] = _magnitude(flat[path])
    return unflatten_dict(flat)


def column_norm(kernel: Array) -> Array:
    """L2 norm of each output feature's weights: ``(in, out) -> (out,)`` (PyTorch's row norm)."""
    return jnp.linalg.norm(kernel, axis=0)


def add_adapters(params: Params, adapters: dict[tuple[str, ...], AdapterSpec], rng: jax.Array) -> Params:
    """``params`` with adapter leaves added to each module path in ``adapters`` (one key per module)."""
    flat = flatten_dict(params)
    modules = sorted(adapters.items())
    sizes = [math.prod(flat[m + ("kernel",)].shape[:-1]) * spec.rank for m, spec in modules]
    # One draw for all A matrices: a random op compiles once instead of once per kernel shape.
    unit = np.asarray(jax.random.uniform(rng, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0))
    offsets = np.cumsum([0] + sizes)
    for (module, spec), start, size in zip(modules, offsets, sizes):
        kernel = flat[module + ("kernel",)]
        a = unit[start:start + size].reshape(*kernel.shape[:-1], spec.rank)
        flat.update({module + (name,): leaf for name, leaf in init_adapter(kernel, spec, a).items()})
    return unflatten_dict(flat)


def adapter_delta(leaves: dict[str, Array]) -> Array:
    """The LoRA update ``s * lora_a @ lora_b`` ``(in, out)`` float32 (``(E, in, out)`` for stacked experts)."""
    return (leaves[LORA_A].astype(jnp.float32) @ leaves[LORA_B].astype(jnp.float32)) * leaves[LORA_SCALE]


def adapted_modules(params: Params) -> dict[tuple[str, ...], dict[str, Array]]:
    """Module path -> that module's leaves, for every module carrying an adapter."""
    flat = flatten_dict(params)
    modules: dict[tuple[str, ...], dict[str, Array]] = {}
    for path, leaf in flat.items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return {m: leaves for m, leaves in modules.items() if LORA_A in leaves}


@functools.partial(jax.jit, static_argnames="dtype")
def _merge_one(leaves: dict[str, Array], dtype: Any = None) -> tuple[Array, Array | None]:
    """(merged kernel in ``dtype``, default the kernel's, DoRA column norm or None) for one module's leaves."""
    kernel = leaves["kernel"]
    dtype = kernel.dtype if dtype is None else dtype
    adapted = as_float(kernel, jnp.float32) + adapter_delta(leaves)  # a quantized base is dequantized
    if MAGNITUDE not in leaves:
        return adapted.astype(dtype), None
    norm = column_norm(adapted)
    return (adapted * (leaves[MAGNITUDE].astype(jnp.float32) / norm)).astype(dtype), norm


@jax.jit
def _unmerge_one(kernel: Array, record: dict[str, Array]) -> Array:
    weight = kernel.astype(jnp.float32)
    if MAGNITUDE in record:
        weight = weight * (record["weight_norm"] / record[MAGNITUDE].astype(jnp.float32))
    return (weight - adapter_delta(record)).astype(kernel.dtype)


def merge(params: Params, dtype: Any = None, *, deferred: bool = False) -> tuple[
        Params, dict[tuple[str, ...], dict[str, Array]]]:
    """Fold every adapter into its kernel; returns ``(merged params without adapter leaves, saved)``.

    LoRA: ``W' = W + s A B``. DoRA: ``W' = m / ||W + s A B|| * (W + s A B)`` per output column.
    Arithmetic is float32; the merged kernel is rounded once, to ``dtype`` (default: the kernel's
    own, as PEFT's merge; an export to float32 of a bfloat16 base keeps the whole update). Works on either layout
    (:mod:`jaxtune.models.stacking`): a scanned run's modules merge layer by layer; of a lazy unstack's
    layers (``stacking.Layer``) only the adapted modules' are sliced, the others come back as they were.
    ``saved`` holds each module's adapter leaves (and, for DoRA, the column norm ``weight_norm`` that the
    merge used, which :func:`unmerge` needs: it cannot be recovered from the merged weight, as PEFT notes).

    ``deferred``: each merged kernel is a :class:`MergedKernel` (``stacking.materialize`` computes it), so
    a writer holds one merged kernel at a time, not every adapted module's (nearly the whole model for
    LoRA on every linear); ``saved`` then holds no ``weight_norm``, so a deferred DoRA merge has no unmerge.
    """
    flat = flatten_dict(params)
    saved = {}
    for module, leaves in adapted_modules(params).items():
        scanned = stacking.stack_range(module[0]) is not None  # a scanned run: merged layer by layer
        merged = MergedKernel({k: v for k, v in leaves.items() if k != "bias"}, dtype, scanned)
        record = {name: leaves[name] for name in ADAPTER_LEAVES if name in leaves}
        if deferred:
            flat[module + ("kernel",)] = merged
        else:
            flat[module + ("kernel",)], norm = merged.compute()
            if norm is not None:
                record["weight_norm"] = norm
        for name in ADAPTER_LEAVES:
            flat.pop(module + (name,), None)
        saved[module] = record if deferred else stacking.materialize(record)
    return unflatten_dict(flat), saved


class MergedKernel(stacking.Deferred):
    """One module's merged kernel, computed when asked (:meth:`value`); its shape and dtype without computing.
    ``leaves``: the module's kernel and adapter leaves (``stacking.Layer`` s of a lazy unstack are sliced
    only then); ``scanned``: the leaves carry a scanned run's layer axis (the merge maps over it)."""

    __slots__ = ("leaves", "merged_dtype", "scanned")

    def __init__(self, leaves: dict[str, Any], dtype: Any, scanned: bool):
        self.leaves, self.merged_dtype, self.scanned = leaves, None if dtype is None else jnp.dtype(dtype), scanned

    shape = property(lambda self: tuple(self.leaves["kernel"].shape))
    dtype = property(lambda self: self.leaves["kernel"].dtype if self.merged_dtype is None else self.merged_dtype)

    def compute(self) -> tuple[Array, Array | None]:
        """(the merged kernel, DoRA's column norm or None)."""
        merge_one = functools.partial(_merge_one, dtype=self.merged_dtype)
        return (jax.vmap(merge_one) if self.scanned else merge_one)(stacking.materialize(self.leaves))

    def value(self) -> Array:
        return self.compute()[0]


def unmerge(merged: Params, saved: dict[tuple[str, ...], dict[str, Array]]) -> Params:
    """Inverse of :func:`merge`: subtract the folded update and restore the adapter leaves."""
    flat = flatten_dict(merged)
    for module, record in saved.items():
        unmerge_one = jax.vmap(_unmerge_one) if stacking.stack_range(module[0]) else _unmerge_one
        flat[module + ("kernel",)] = unmerge_one(flat[module + ("kernel",)], record)
        flat.update({module + (name,): record[name] for name in ADAPTER_LEAVES if name in record})
    return unflatten_dict(flat)
