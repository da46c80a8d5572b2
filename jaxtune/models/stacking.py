"""The layer stack's two param layouts: logical (one subtree per layer) and physical (stacked runs).

A decoder's *logical* tree has one subtree per block, ``layers_3/self_attn/q_proj/kernel``: the
names Hugging Face checkpoints, tuning plans, labels and PEFT adapters use. The *physical* tree
that the model runs on holds each run of consecutive layers as one subtree whose leaves carry a
leading layer axis, keyed by the run's first and last layer: ``layers_0-31/self_attn/q_proj/kernel``
``(32, D, N*H)``. The model scans each run (``nn.scan``), so compile time and program size do not
grow with depth, and FSDP can gather one layer at a time.

A run is a maximal stretch of layers that a scan can treat alike: the same attention window (a
static flag of the attention kernel), and, once a plan is applied, the same leaves with the same
labels, shapes and dtypes, so a frozen run is its own scan and gets no gradient and no optimizer
state while its neighbours train. The config carries the run lengths (``layer_groups``).

Everything here is pure tree manipulation on nested dicts, applied where a tree crosses the
boundary (loading, applying a plan, export, merge), never inside a step. Leaves may be arrays,
:class:`Layer` (a layer of a stacked array, not yet sliced), ``jax.ShapeDtypeStruct``, or strings
(labels: one label per run, checked to agree), and any pytree node whose array components carry the
weight's leading axes (they stack component by component).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
PREFIX = "layers"
_LAYER = re.compile(r"^layers_(\d+)$")
_STACK = re.compile(r"^layers_(\d+)-(\d+)$")


def stack_key(start: int, stop: int) -> str:
    """The physical key of layers ``start..stop-1``, e.g. ``layers_0-31``."""
    return f"{PREFIX}_{start}-{stop - 1}"


def stack_range(key: str) -> range | None:
    """The layers a physical key holds (``layers_4-7`` -> ``range(4, 8)``), or None for any other key."""
    m = _STACK.match(key)
    return range(int(m.group(1)), int(m.group(2)) + 1) if m else None


def runs(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of consecutive runs of the given lengths: ``(2, 3)`` -> ``((0, 2), (2, 5))``."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return tuple(out)


def run_lengths(signatures: Sequence[Hashable]) -> tuple[int, ...]:
    """Lengths of the maximal runs of equal consecutive values: ``(a, a, b, a)`` -> ``(2, 1, 1)``."""
    sizes: list[int] = []
    for i, sig in enumerate(signatures):
        if i and sig == signatures[i - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return tuple(sizes)


def layer_runs(num_layers: int, layer_groups: Sequence[int], kinds: Sequence[Hashable]) -> tuple[
        tuple[int, int], ...]:
    """The runs a model scans: ``layer_groups`` (run lengths) if given, else the runs of equal
    ``kinds`` (each layer's static attention shape: its window, or a decoder's ``(window, rope)``).
    Raises ValueError when the lengths do not cover the layers or a run mixes kinds."""
    kinds = tuple(kinds) or (None,) * num_layers
    sizes = tuple(layer_groups) or run_lengths(kinds)
    if sum(sizes) != num_layers or any(s <= 0 for s in sizes):
        raise ValueError(f"layer_groups {tuple(layer_groups)} must be positive run lengths adding up to "
                         f"num_layers {num_layers}")
    for start, stop in runs(sizes):
        if len(set(kinds[start:stop])) > 1:
            raise ValueError(f"layer_groups: layers {start}..{stop - 1} mix attention kinds "
                             f"{sorted(set(kinds[start:stop]), key=str)}; split the run where the kind changes")
    return runs(sizes)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, str) or x is None


class Deferred:
    """A leaf whose array is computed only when :func:`materialize` (or ``value()``) asks for it; it has
    the array's ``shape`` and ``dtype``. :class:`Layer` defers a slice; a merged export defers each merged
    kernel (:func:`jaxtune.tuning.lora.merge` with ``deferred=True``)."""

    __slots__ = ()
    shape: tuple[int, ...]
    dtype: Any

    def value(self) -> Any:
        raise NotImplementedError

    def astype(self, dtype: Any) -> Any:
        return self.value().astype(dtype)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(f"a {type(self).__name__} is not computed yet; take jaxtune.models.stacking.materialize(x) "
                        "(or x.value()) where its values are needed")


class Layer(Deferred):
    """Layer ``index`` of the stacked array ``whole``, not yet sliced out of it: what
    ``unstack(..., lazy=True)`` gives for each layer of a run. It has the slice's ``shape``, ``dtype``,
    ``ndim`` and ``size``; :meth:`value` (or :func:`materialize`) slices it, ``astype`` slices and casts.

    Why: a plan reads most layers' weights only for their shapes and keeps them as loaded, and on a
    device every slice is a copy, so slicing all of them held the base model twice while a plan was
    applied. Layers that come back unchanged and in order go back into ``whole`` itself (:func:`stack`);
    only what a plan computes from (a quantized or DoRA kernel) is sliced. Not an array: ``np.asarray`` of
    one is refused rather than copied in silence."""

    __slots__ = ("whole", "index")

    def __init__(self, whole: Any, index: int):
        self.whole, self.index = whole, index

    shape = property(lambda self: tuple(self.whole.shape[1:]))
    dtype = property(lambda self: self.whole.dtype)
    ndim = property(lambda self: self.whole.ndim - 1)
    size = property(lambda self: int(np.prod(self.whole.shape[1:], dtype=np.int64)))

    def value(self) -> Any:
        """The layer's array (a view on the host, a copy on a device)."""
        return self.whole[self.index]

    def __repr__(self) -> str:
        return f"Layer({self.index} of {type(self.whole).__name__}{tuple(self.whole.shape)} {self.dtype})"


def materialize(tree: Any) -> Any:
    """``tree`` (a leaf, a quantized weight, any pytree) with every :class:`Deferred` leaf (a
    :class:`Layer`: sliced) computed."""
    return jax.tree.map(lambda x: x.value() if isinstance(x, Deferred) else x, tree)


def is_on_host(tree: Any) -> bool:
    """Whether ``tree`` (an array, a quantized weight, a :class:`Layer` of either, a param tree) holds
    numpy arrays only, as a model loaded with ``jaxtune.load(..., on_host=True)`` does."""
    return all(isinstance(x.whole if isinstance(x, Layer) else x, np.ndarray) for x in jax.tree.leaves(tree))


def beside(value: Any, leaf: Any) -> Any:
    """``value`` (computed from ``leaf``) as numpy arrays where ``leaf`` is on the host (:func:`is_on_host`),
    else as it is: what a plan makes of a host model stays on the host, and a run of its layers restacks
    with numpy, not a program per shape."""
    return jax.tree.map(np.asarray, value) if is_on_host(leaf) else value


def _rejoined(leaves: Sequence[Any]) -> Any | None:
    """The stacked array ``leaves`` are layers of (all of it, or the rows they are), when they are
    :class:`Layer` s of one array, consecutive and in order; None otherwise. Why: restacking them would
    copy the run for nothing, and a plan keeps most of a model's layers as they were loaded."""
    if not all(isinstance(x, Layer) for x in leaves):
        return None
    whole, first = leaves[0].whole, leaves[0].index
    if any(x.whole is not whole or x.index != first + j for j, x in enumerate(leaves)):
        return None
    return whole if len(leaves) == whole.shape[0] else whole[first:first + len(leaves)]


def _stack_leaves(path: str, *leaves: Any) -> Any:
    first = leaves[0]
    if first is None:  # an absent optional component (a quantized weight without offsets): absent in all
        return None
    if isinstance(first, str):
        if any(x != first for x in leaves):
            raise ValueError(f"{path}: layers of one run have different labels {sorted(set(leaves))}; "
                             "split the run (layer_groups) where the plan changes")
        return first
    if any(x.shape != first.shape or x.dtype != first.dtype for x in leaves):
        raise ValueError(f"{path}: layers of one run have different shapes/dtypes "
                         f"{sorted({(tuple(x.shape), str(x.dtype)) for x in leaves})}; split the run (layer_groups)")
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    whole = _rejoined(leaves)
    if whole is not None:
        return whole
    leaves = [materialize(x) for x in leaves]
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack(tree: Params, layer_runs_: Sequence[tuple[int, int]]) -> Params:
    """Logical -> physical: the subtrees ``layers_i`` of each run become one ``layers_a-b`` subtree whose
    leaves have a leading layer axis. Other keys are kept as they are. :class:`Layer` s of one stacked
    array that come back in order rejoin it (the array itself for a whole run; for part of one its rows:
    a view on the host, a copy of just those rows on a device) instead of being stacked anew; any other
    leaves are stacked as values (a Layer sliced first). A tree without layer keys
    (e.g. an optimizer's empty part) comes back unchanged. Raises ValueError naming the layer and
    leaf when the layers of a run differ in structure, shape, dtype or label."""
    if not any(_LAYER.match(k) for k in tree):
        return dict(tree)
    out = {k: v for k, v in tree.items() if not _LAYER.match(k)}
    for start, stop in layer_runs_:
        layers = [tree.get(f"{PREFIX}_{i}") for i in range(start, stop)]
        present = [x is not None for x in layers]
        if not any(present):
            continue  # this run has no leaves in this tree (e.g. a frozen run in the trainable part)
        if not all(present):
            missing = [start + i for i, p in enumerate(present) if not p]
            raise ValueError(f"layers {missing} have no leaves in this tree while layers {start}..{stop - 1} form "
                             "one run; split the run (layer_groups) where the plan changes")
        structure = jax.tree.structure(layers[0], is_leaf=_is_leaf)
        for i, layer in enumerate(layers[1:], start + 1):
            if jax.tree.structure(layer, is_leaf=_is_leaf) != structure:
                raise ValueError(f"layers_{i} has other leaves than layers_{start} ({_leaf_names(layer)} vs "
                                 f"{_leaf_names(layers[0])}); split the run (layer_groups) where the plan changes")
        key = stack_key(start, stop)
        out[key] = jax.tree_util.tree_map_with_path(
            lambda p, *xs, key=key: _stack_leaves(f"{key}/{jax.tree_util.keystr(p, simple=True, separator='/')}",
                                                  *xs),
            *layers, is_leaf=_is_leaf)
    return out


def _leaf_names(tree: Any) -> list[str]:
    return sorted(jax.tree_util.keystr(p, simple=True, separator="/")
                  for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0])


def _unstack_leaf(leaf: Any, i: int, lazy: bool) -> Any:
    if isinstance(leaf, str) or leaf is None:
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return Layer(leaf, i) if lazy else leaf[i]


def unstack(tree: Params, lazy: bool = False) -> Params:
    """Physical -> logical: each ``layers_a-b`` subtree becomes ``layers_a`` .. ``layers_b``.
    A logical tree comes back unchanged (as a new top-level dict). ``lazy``: each layer's array leaf
    is a :class:`Layer` (sliced only where its values are read; :func:`stack` puts unchanged ones back
    into their array) instead of a slice (a view on the host, a copy on a device)."""
    out = {}
    for key, value in tree.items():
        layers = stack_range(key)
        if layers is None:
            out[key] = value
            continue
        for j, i in enumerate(layers):
            out[f"{PREFIX}_{i}"] = jax.tree.map(lambda x, j=j: _unstack_leaf(x, j, lazy), value, is_leaf=_is_leaf)
    return out


def is_stacked(tree: Params) -> bool:
    """Whether ``tree`` holds any physical (stacked) run."""
    return any(stack_range(k) is not None for k in tree)


def logical_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """The logical path of ``layer`` within a physical ``path`` (``layers_0-3/mlp/...``, 2 -> ``layers_2/mlp/...``)."""
    return (f"{PREFIX}_{layer}", *path[1:])


def to_physical(tree: Params, cfg: Any) -> Params:
    """``tree`` in the layout ``cfg``'s model runs on: stacked runs when it scans its layers (a
    decoder with ``scan_layers``), else unchanged. A tree that is already physical is returned as is."""
    if not getattr(cfg, "scan_layers", False) or is_stacked(tree):
        return tree
    return stack(tree, cfg.layer_runs)


def plan_groups(cfg: Any, labels: Params, params: Params) -> tuple[int, ...]:
    """Run lengths for a logical tree with a plan applied: maximal runs of layers with the same
    attention kind (window, RoPE) and the same leaves, labels, shapes and dtypes, so that each run stacks and
    a frozen run is a scan apart from its trained neighbours."""
    def signature(i: int) -> Hashable:
        key = f"{PREFIX}_{i}"
        leaves = jax.tree_util.tree_flatten_with_path(params.get(key, {}))[0]
        flat_labels = dict(jax.tree_util.tree_flatten_with_path(labels.get(key, {}), is_leaf=_is_leaf)[0])
        return cfg.layer_kinds[i], tuple((jax.tree_util.keystr(p), flat_labels.get(p), tuple(x.shape), str(x.dtype))
                                     for p, x in leaves)

    return run_lengths([signature(i) for i in range(cfg.num_layers)])
