"""Splitting a labelled param tree into its trainable and frozen parts, and describing the split.

Labels are a pytree of strings shaped like the params; a leaf is trainable iff its label is not
``"freeze"``. Both parts are nested dicts holding only their own leaves (empty subtrees pruned),
so gradients and optimizer state are built for the trainable part alone. All functions here
are pure dict manipulation and safe to call inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune.models import quant, stacking
from jaxtune.models.layers import LORA_SCALE
from jaxtune.tuning.labels import FROZEN, GROUPS

Params = dict[str, Any]
Labels = dict[str, Any]


def _flat_pairs(params: Params, labels: Labels) -> list[tuple[tuple[str, ...], Any, str]]:
    flat_p, flat_l = flatten_dict(params), flatten_dict(labels)
    if flat_p.keys() != flat_l.keys():
        missing = sorted("/".join(p) for p in flat_p.keys() - flat_l.keys())
        extra = sorted("/".join(p) for p in flat_l.keys() - flat_p.keys())
        raise ValueError(f"labels do not match params: unlabelled {missing[:5]}, labels without a param {extra[:5]}")
    return [(path, leaf, flat_l[path]) for path, leaf in flat_p.items()]


def partition(params: Params, labels: Labels) -> tuple[Params, Params]:
    """``(trainable, frozen)``: two nested dicts with only their leaves (no empty subtrees)."""
    trainable, frozen = {}, {}
    for path, leaf, label in _flat_pairs(params, labels):
        (frozen if label == FROZEN else trainable)[path] = leaf
    return unflatten_dict(trainable), unflatten_dict(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
    """Deep-merge the two parts back into one param tree (inverse of :func:`partition`)."""
    flat = flatten_dict(frozen)
    overlap = flat.keys() & flatten_dict(trainable).keys()
    if overlap:
        raise ValueError(f"combine: leaves in both parts: {sorted('/'.join(p) for p in overlap)[:5]}")
    flat.update(flatten_dict(trainable))
    return unflatten_dict(flat)


def cast_by_label(params: Params, labels: Labels, frozen_dtype: Any | None) -> Params:
    """Trainable float leaves in float32 (master weights); frozen float leaves in ``frozen_dtype``
    (e.g. bf16, the compute dtype) when given. ``lora_scale`` stays float32: it is a constant
    whose rounding would change the model."""
    out = {}
    for path, leaf, label in _flat_pairs(params, labels):
        if quant.is_quantized(leaf):  # stored as loaded (a GGUF base); never trainable
            out[path] = leaf
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            want = leaf.dtype
        elif label != FROZEN or path[-1] == LORA_SCALE:
            want = jnp.dtype(jnp.float32)
        else:
            want = leaf.dtype if frozen_dtype is None else jnp.dtype(frozen_dtype)
        out[path] = leaf if leaf.dtype == want else leaf.astype(want)  # no copy when nothing changes
    return unflatten_dict(out)


def count(params: Params) -> int:
    """Number of scalars in a param tree (a quantized weight counts the scalars it stands for)."""
    return sum(int(x.size) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))


def quantize_leaves(params: Params, formats: dict[tuple[str, ...], str]) -> Params:
    """``params`` with the leaf at each path of ``formats`` quantized in that format
    (:func:`jaxtune.models.quant.quantize`; blocks along the input features of a ``kernel``, the
    features of an ``embedding``). Errors name the param path."""
    flat = flatten_dict(params)
    for path, fmt in formats.items():
        try:
            quantized = quant.quantize(stacking.materialize(flat[path]), fmt, quant.block_axis(path[-1]))
        except ValueError as err:
            raise ValueError(f"quantize {'/'.join(path)}: {err}") from None
        flat[path] = stacking.beside(quantized, flat[path])
        # the full-precision leaf is dropped here, so only one weight is held twice at a time
    return unflatten_dict(flat)


def nbytes(params: Params) -> int:
    """Bytes held by a param tree (quantized weights count their codes and scales)."""
    return sum(quant.nbytes(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _human(n: float, units: tuple[str, ...], base: float = 1000.0) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.1f}{unit}" if unit != units[0] else f"{int(n)}{unit}"
        n /= base
    return f"{n:.1f}{units[-1]}"


def _dtypes(leaves: list[Any]) -> str:
    names = sorted({x.name if quant.is_quantized(x) else _DTYPE_NAMES.get(str(x.dtype), str(x.dtype))
                    for x in leaves})
    return "/".join(names) if names else "-"


def summary(params: Params, labels: Labels) -> str:
    """One line for the user before training, e.g.
    ``trainable 1.2M (4.6 MB fp32) [lora 1.1M, head 0.1M] | frozen 22.6M (45.2 MB bf16)``."""
    groups: dict[str, list[Any]] = {}
    for _, leaf, label in _flat_pairs(params, labels):
        groups.setdefault(label, []).append(leaf)
    frozen = groups.pop(FROZEN, [])
    trainable = [x for g in groups.values() for x in g]
    order = [g for g in GROUPS if g in groups] + sorted(set(groups) - set(GROUPS))

    def part(leaves: list[Any]) -> str:
        n = sum(int(x.size) for x in leaves)
        size = _human(sum(quant.nbytes(x) for x in leaves), (" B", " KB", " MB", " GB", " TB"))
        return f"{_human(n, ('', 'K', 'M', 'B'))} ({size} {_dtypes(leaves)})"

    per_group = ", ".join(f"{g} {_human(sum(int(x.size) for x in groups[g]), ('', 'K', 'M', 'B'))}" for g in order)
    return f"trainable {part(trainable)} [{per_group}] | frozen {part(frozen)}"
