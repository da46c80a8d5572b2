"""Host threads for simulated CPU devices (``--xla_force_host_platform_device_count``).

XLA:CPU runs the programs of all simulated devices on one thread pool, the PjRt CPU client's, of
``max(cores, devices)`` threads (``PJRT_NPROC`` overrides the core count), and a collective holds
its thread until every device has joined it. XLA's thunk executor starts independent collectives
of one program at once, so with one thread a device, the devices can hold every thread in some
collective while one device waits for a thread to reach it: the process aborts after 40 s
("only 1 of 8 arrived"). jaxtune's train step has such a pair (the gradient's all-reduce and the
finiteness check of the update); it aborted the 8-device chat recipe test on 2 cores. Four
threads a device leave room, cost nothing measurable (idle threads), and are set by
``import jaxtune`` (and by the recipe runner once it has set ``mesh.simulate_devices``) before JAX
starts its CPU backend. The device count is read as JAX reads it: ``JAX_NUM_CPU_DEVICES`` when
set, else the last ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` (XLA's flag parser
lets a later value override an earlier one). A ``PJRT_NPROC`` set by the user stands; one that
jaxtune set for a parent process's devices is dropped in a child that asks for one device
(``import jaxtune`` there): with 32 threads for one device, a step under load faulted its freed
buffers back in (6,200 page faults a call against none), which :mod:`jaxtune.host_memory` exists
to prevent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

THREADS_PER_SIMULATED_DEVICE = 4
# XLA's flag parser strips the quotes of a quoted value (--flag="8").
_DEVICE_COUNT = re.compile(r"xla_force_host_platform_device_count=\"?(\d+)")
# The PJRT_NPROC value jaxtune set, so that a child process can tell it from the user's.
SET_BY_JAXTUNE = "JAXTUNE_PJRT_NPROC"


def simulated_devices(environ: Mapping[str, str] = os.environ) -> int:
    """The CPU devices JAX will make, read from the environment: ``JAX_NUM_CPU_DEVICES`` when it
    is set (it overrides the flag), else the last ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``, else 1."""
    try:
        count = int(environ.get("JAX_NUM_CPU_DEVICES", "-1"))
    except ValueError:  # JAX refuses it at import, naming the variable
        count = -1
    if count >= 0:  # -1, JAX's default, leaves the choice to the flag
        return max(count, 1)
    found = _DEVICE_COUNT.findall(environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def threads_for_simulated_devices(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``PJRT_NPROC`` to :data:`THREADS_PER_SIMULATED_DEVICE` threads a simulated device (at
    least the core count) when the environment asks for more than one CPU device
    (:func:`simulated_devices`) and ``PJRT_NPROC`` is unset or was set by jaxtune (for a parent
    process); drop a jaxtune-set one otherwise. Takes effect only before JAX starts its CPU
    backend."""
    ours = environ.pop(SET_BY_JAXTUNE, None)
    if ours is not None and environ.get("PJRT_NPROC") == ours:
        del environ["PJRT_NPROC"]
    devices = simulated_devices(environ)
    if devices > 1 and not environ.get("PJRT_NPROC"):
        environ["PJRT_NPROC"] = environ[SET_BY_JAXTUNE] = str(max(os.cpu_count() or 1,
                                                                  devices * THREADS_PER_SIMULATED_DEVICE))
