"""What every benchmark shares: this checkout's jaxtune on the path (for the driver and its
worker processes), and what each record holds beside its numbers (versions, machine, date)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark this checkout, whichever jaxtune is installed
    sys.path.insert(0, str(ROOT))


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's worker processes: this checkout first on PYTHONPATH,
    one CPU device (the test suite's simulated device count is dropped; a caller's other
    ``XLA_FLAGS`` pass through), quiet tokenizers, no GPU memory preallocation."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TOKENIZERS_PARALLELISM": "false", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, **extra}

PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "tokenizers")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages both sides use ("missing" if absent)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine() -> str:
    """Host name, architecture and CPU count, e.g. ``"box x86_64, 2 CPU cores"``."""
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores"


def now() -> str:
    """The UTC date and time a record was made."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a busy machine skews timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
