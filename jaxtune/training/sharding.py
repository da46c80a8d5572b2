"""Meshes, partition rules and batch placement: one code path from 1 device to a pod.

The mesh has four named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with params and optimizer state sharded), ``expert`` (expert parallelism: a mixture-of-experts
layer's stacked experts split over it, everything else data-parallel over it) and ``tensor``
(Megatron-style: attention heads and MLP columns split). The batch is split over ``data`` x
``fsdp`` x ``expert``. Parameters are placed by rules on
their paths; an axis that does not divide a dimension is dropped for that leaf (tiny models on
many devices still work), never silently for big ones: :func:`param_specs` reports it. The
leading layer axis of a scanned run of layers (:mod:`jaxtune.models.stacking`) is never split.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.models import stacking
from jaxtune.models.attention import batch_axes
from jaxtune.models.attention import data_parallel_size as data_parallel_size  # training's name for it too
from jaxtune.models.layers import QUANTIZED_PARTS

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "expert", "tensor")
Rules = tuple[tuple[str, tuple[str | None, ...]], ...]

# Placement of what no model family names (each family's own rules come first, see
# jaxtune.models.layers.partition_rules): embeddings split vocab rows over "tensor" and
# features over "fsdp"; any other matrix (heads, fresh layers) splits its input over "fsdp".
# A quantized matrix's codes and scales (same rank, same axes) follow it.
DEFAULT_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (rf"embedding{QUANTIZED_PARTS}$", ("tensor", "fsdp")),
    (rf"kernel{QUANTIZED_PARTS}$", ("fsdp", None)),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device counts per axis; ``-1`` on one axis takes all remaining devices.

    ``simulate_devices`` (CPU only): pretend to have N devices, to try a mesh on a laptop. It
    must take effect before JAX starts (``jaxtune.finetune`` and the CLI set ``XLA_FLAGS``
    first, and refuse a count that the environment or a started backend contradicts);
    :func:`make_mesh` itself ignores it.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    simulate_devices: int | None = None

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            name, value = next(iter(bad.items()))
            raise ValueError(f"mesh.{name}: expected a device count >= 1, or -1 for all remaining devices, got {value}")
        if self.simulate_devices is not None and self.simulate_devices < 1:
            raise ValueError(f"mesh.simulate_devices: expected an integer >= 1 or null, got {self.simulate_devices}")

    def shape(self, n_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ValueError(f"mesh: {dict(zip(AXES, sizes))} does not divide the {n_devices} devices")
        sizes = [n_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh: {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, but {n_devices} are "
                             "available; set one axis to -1 to take the rest")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: list[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh over ``devices`` (default: all, across processes).

    ``jax.sharding.Mesh`` uses automatic axis types, so XLA propagates shardings through the step
    (``jax.make_mesh`` would default to explicit axes, which need every sharding spelled out).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - topology-aware layout is an optimisation only
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def _fit(spec: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    dims = list(spec[: len(shape)]) + [None] * (len(shape) - len(spec))
    # An axis the mesh lacks (a hand-made mesh without ``expert``) is dropped like one that does not divide.
    fitted = [axis if axis in mesh.shape and shape[i] % mesh.shape[axis] == 0 else None for i, axis in enumerate(dims)]
    return PartitionSpec(*fitted)


# A leaf this large whose rule's mesh axis does not divide it is reported: it is held whole on that axis.
REPORT_UNSPLIT_ELEMENTS = 1 << 20
_reported: set[tuple[Any, ...]] = set()


def param_specs(params: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """A tree of ``PartitionSpec`` for ``params`` (or any tree of arrays / ShapeDtypeStructs):
    the model family's ``rules`` first, then :data:`DEFAULT_RULES`. A leaf of at least
    :data:`REPORT_UNSPLIT_ELEMENTS` whose rule names a mesh axis (of more than one device) that
    does not divide its dimension keeps that dimension whole: logged once as a warning."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in (*rules, *DEFAULT_RULES)]

    def spec_for(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        keys = [str(getattr(k, "key", k)) for k in path]
        name = "/".join(keys)
        # A scanned run's leaves carry a leading layer axis, never split: the scan slices it, and
        # FSDP then gathers one layer's weights per iteration. Optimizer state nests the param
        # paths (``0/mu/layers_0-31/...``), so the run's key may sit anywhere in the path.
        lead = 1 if any(stacking.stack_range(k) is not None for k in keys) else 0
        shape = tuple(getattr(leaf, "shape", ()))[lead:]
        if len(shape) < 2:
            return PartitionSpec()
        for pattern, spec in compiled:
            if pattern.search(name):
                fitted = _fit(spec, shape, mesh)
                dropped = [(axis, shape[i]) for i, (axis, got) in enumerate(zip(spec, fitted))
                           if axis is not None and got is None and mesh.shape.get(axis, 1) > 1]
                if dropped and math.prod(shape) >= REPORT_UNSPLIT_ELEMENTS and (shape, tuple(dropped)) not in _reported:
                    _reported.add((shape, tuple(dropped)))
                    log.warning("%s %s is not split over mesh axis %s: %s; it is held whole there (pick a mesh "
                                "axis size that divides it)", name, list(shape), ", ".join(a for a, _ in dropped),
                                ", ".join(f"{n} is not a multiple of {a}={mesh.shape[a]}" for a, n in dropped))
                return PartitionSpec(*(None,) * lead, *fitted)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, params)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """``NamedSharding`` per leaf of ``params`` (see :func:`param_specs`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(tree: Any, shardings: Any) -> Any:
    """Place every leaf of ``tree`` on its sharding. A host (numpy) leaf goes straight to the slices
    each device holds: ``device_put`` of a host array first compares it across processes (a gather
    of the whole array), and a leaf loaded on the host is the same on each by construction."""
    def place(leaf: Any, sharding: jax.sharding.Sharding) -> Any:
        if isinstance(leaf, np.ndarray):
            return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
        return jax.device_put(leaf, sharding)

    return jax.tree.map(place, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over ``data`` x ``fsdp`` x ``expert``, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the batch axes.

    ``local`` holds this process's ``B / process_count`` rows (what a per-process data loader
    yields); on one process this is simply a sharded ``device_put``. Refused when the global rows do
    not split evenly over the mesh's data parallelism.
    """
    rows = len(next(iter(local.values()))) * jax.process_count()
    if rows % data_parallel_size(mesh):
        raise ValueError(f"the global batch has {rows} rows, which the mesh's {data_parallel_size(mesh)}-way "
                         "data parallelism (data x fsdp) cannot split evenly; make data.batch_size a multiple "
                         "of it or change the mesh")
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def jit_on_mesh(fn: Callable[..., Any], mesh: Mesh | None, **jit_kwargs: Any) -> Any:
    """``jax.jit(fn, **jit_kwargs)`` with ``fn`` traced under ``mesh``'s abstract form
    (``jax.sharding.use_abstract_mesh``), for every program that runs the model on the run's mesh
    (the train and evaluation steps, the baselines' features, a preference run's reference pass).
    The model's mesh-aware pieces read it while tracing: splash attention runs per shard in a
    ``shard_map`` (XLA cannot partition a Pallas call: without the mesh it gathers the whole batch
    onto every device), and ``layers.shard_rows`` keeps the activations' rows split over the batch
    axes. ``mesh`` None: plain ``jax.jit``."""
    if mesh is None:
        return jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)
