"""Host memory when JAX computes on the CPU: freed blocks stay in the process for the next step.

XLA:CPU mallocs each step's buffers (the activations kept for the backward pass, gradients, the
outputs) and frees them when the step ends. glibc gives large blocks straight back to the kernel:
a block over its mmap threshold (at most 32 MiB) is unmapped on ``free``, and a per-thread arena's
heap is unmapped as soon as it empties. The next step then faults the same memory back in, a page
at a time, and the kernel zeroes every page first. On the tiny-Llama LoRA step of
``benchmarks/throughput.py`` that is 240 MiB of page faults per step and about a fifth of the
step's CPU time spent in the kernel.

:func:`keep_freed_memory` sets three ``mallopt(3)`` options: one arena for every thread (the
main one, which grows with ``brk``), no mmap'd blocks, and no trimming of the heap's top. Freed
memory then stays in the process and the next step reuses it without a fault. The cost is that
the process's resident memory does not shrink after a peak.

An arena is bound to a thread at its first allocation, so the options must be set before XLA
starts its thread pools: ``import jaxtune`` calls :func:`configure`, which sets them where they
pay (Linux with glibc, and JAX computing on the CPU) unless ``JAXTUNE_HOST_MALLOC`` says
otherwise: ``auto`` (the default), ``keep`` (always) or ``system`` (never: glibc's defaults). On a
GPU or TPU the step's buffers live on the device, and a host that keeps freed memory would hold
on to what loading a large checkpoint freed, so ``auto`` leaves glibc alone there. Where the
options cannot help, a warning says so: ``keep`` off glibc (macOS, musl), and a program that ran
JAX before ``import jaxtune`` (XLA's threads already have arenas of their own: the grad step of
tests/test_host_memory.py then faults ~30,000 pages a call instead of none).

:func:`filled_in_place` is the loader's side of the same cost: a large array whose pages the kernel
maps at allocation, for weights written into it once.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: `import jaxtune` sets malloc before anything starts threads
    import numpy as np

log = logging.getLogger(__name__)
ENV = "JAXTUNE_HOST_MALLOC"
MODES = ("auto", "keep", "system")
# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Packages through which JAX finds a GPU or TPU: with one installed, JAX computes there by default.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin", "jax_rocm7_plugin", "libtpu")


def computes_on_cpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX will compute on the CPU, decided without importing it: ``JAX_PLATFORMS`` when
    set (its first entry), else whether no GPU or TPU plugin package is installed."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def _glibc() -> bool:
    # confstr answers from the running libc; platform.libc_ver() would read the interpreter's binary.
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module docstring); returns
    whether every option was accepted (False off glibc, where nothing is changed)."""
    if sys.platform != "linux" or not _glibc():
        return False
    libc = ctypes.CDLL(None)
    # A trim threshold of -1 turns trimming off (mallopt(3)); mallopt takes an int, so the largest
    # positive one, 2**31 - 1, would still trim a top of 2 GiB or more, which the MiniLM quickstart's
    # step frees every step, and the kernel would zero it all again.
    options = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in options)


def configure(env: Mapping[str, str] = os.environ) -> bool:
    """Apply ``JAXTUNE_HOST_MALLOC`` (``auto``, ``keep`` or ``system``); returns whether the
    options were set. ``auto`` keeps freed memory when :func:`computes_on_cpu`."""
    mode = env.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={env[ENV]!r}: expected one of {', '.join(MODES)} "
                         f"(auto keeps freed host memory when JAX computes on the CPU)")
    if mode == "system" or (mode == "auto" and not computes_on_cpu(env)):
        return False
    applied = keep_freed_memory()
    if not applied and mode == "keep":
        log.warning("%s=keep: not applied, glibc's malloc options need Linux with glibc (this is %s); "
                    "the allocator keeps its defaults", ENV, sys.platform)
    elif applied and _jax_started():
        log.warning("host memory: JAX computed before `import jaxtune`, so XLA's threads keep malloc arenas of "
                    "their own and still hand each step's freed memory back to the kernel; import jaxtune before "
                    "the first JAX computation (%s=system silences this)", ENV)
    return applied


def _jax_started() -> bool:
    """Whether JAX has started a backend (and so XLA its threads) in this process; JAX is not imported."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return bool(started and started())


# Below this many bytes an array comes from malloc as usual: populating a mapping pays from a few pages on.
_POPULATE_MIN_BYTES = 1 << 20


def filled_in_place(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised host array for a loader to fill once, whose pages the kernel maps at allocation.

    A new array's pages are otherwise mapped one fault at a time on first write: for a model's
    weights that is a quarter of a million faults per GiB, and on a virtual machine each costs
    microseconds (on this project's 2-core VM, writing 936 MiB into ``np.empty`` takes 1.7 s, 0.4 s
    into a populated mapping). Large arrays therefore come from an anonymous ``MAP_POPULATE``
    mapping (Linux), returned to the kernel when the array is freed; small ones, and every array
    where ``MAP_POPULATE`` does not exist, from ``np.empty``.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    flags = getattr(mmap, "MAP_POPULATE", None)
    if flags is None or count * dtype.itemsize < _POPULATE_MIN_BYTES:
        return np.empty(shape, dtype)
    mapping = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(mapping, dtype, count).reshape(shape)  # the array keeps the mapping alive
