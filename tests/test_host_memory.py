"""jaxtune.host_memory: which processes keep freed host memory, and that the step then stops
faulting its buffers back in (page faults counted by the kernel, in fresh processes)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from jaxtune import host_memory

# A scanned two-layer grad step whose saved activations (~40 MiB a call) are malloc'd and freed
# by XLA:CPU each call: the minor page faults a call, over the quietest of three windows of 5 calls
# after 15 warm-up calls (the heap's layout settles in the first few), with the mode chosen by the
# environment at `import jaxtune`. The quietest, because on a loaded machine one window in a few
# took ~6,200 faults a call with either pool size (kept memory or not, something outside the
# process, e.g. page compaction); glibc's defaults fault in every window, kept memory in almost none.
STEP = """
import json, resource
import jaxtune
import jax, jax.numpy as jnp

def loss(ws, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return jnp.sum(h ** 2)

grad = jax.jit(jax.grad(loss))
ws, x = jnp.full((4, 256, 256), 0.01), jnp.ones((8192, 256))
for _ in range(15):
    grad(ws, x).block_until_ready()
windows = []
for _ in range(3):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        grad(ws, x).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
print(json.dumps({"faults_per_call": min(windows)}))
"""


def _report(script: str, env: dict[str, str]) -> dict:
    """Run ``script`` in a fresh process; the JSON object of its last output line."""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _faults_per_call(mode: str) -> float:
    env = {**os.environ, host_memory.ENV: mode, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's process
    return _report(STEP, env)["faults_per_call"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc options")
def test_kept_memory_ends_the_steps_page_faults():
    kept, system = _faults_per_call("auto"), _faults_per_call("system")
    # glibc's defaults fault the step's ~40 MiB back in on every call (4 KiB pages); kept, none.
    assert system > 5000, system
    assert kept < 100, kept


def test_auto_applies_only_where_jax_computes_on_the_cpu(monkeypatch):
    assert host_memory.computes_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not host_memory.computes_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_memory.computes_on_cpu({"JAX_PLATFORMS": "tpu"})
    monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                        lambda name: object() if name == "jax_cuda12_plugin" else None)
    assert not host_memory.computes_on_cpu({})
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
    assert host_memory.computes_on_cpu({})
    applied = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: applied.append(True) or True)
    assert not host_memory.configure({host_memory.ENV: "system"})
    assert not host_memory.configure({host_memory.ENV: "auto", "JAX_PLATFORMS": "cuda"})
    assert host_memory.configure({host_memory.ENV: "keep", "JAX_PLATFORMS": "cuda"})
    assert host_memory.configure({"JAX_PLATFORMS": "cpu"})  # auto is the default
    assert len(applied) == 2


def test_a_bad_mode_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"JAXTUNE_HOST_MALLOC='always': expected one of auto, keep, system"):
        host_memory.configure({host_memory.ENV: "always"})


def test_a_bad_mode_in_the_environment_is_one_line_not_a_traceback():
    """`import jaxtune` (here by the CLI) warns in one line naming the variable and the choices, and
    goes on with glibc's defaults; it used to stop every command with a traceback."""
    env = {**os.environ, host_memory.ENV: "always"}
    out = subprocess.run([sys.executable, "-m", "jaxtune", "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: "), out.stderr[-2000:]
    assert out.stderr.splitlines() == ["JAXTUNE_HOST_MALLOC='always': expected one of auto, keep, system (auto keeps "
                                       "freed host memory when JAX computes on the CPU); glibc's malloc is left as "
                                       "it is"]


# A block of 2.25 GiB from the heap (brk; its pages are never touched, so nothing is resident),
# freed: kept memory must leave it in the process. mallopt's trim threshold is an int, and its
# largest positive value (2 GiB - 1) would still trim this top; -1 turns trimming off.
TRIM = """
import ctypes, json
import jaxtune
libc = ctypes.CDLL(None)
libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
libc.sbrk.argtypes, libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_long], [ctypes.c_size_t], [ctypes.c_void_p]
before = libc.sbrk(0)
block = libc.malloc(9 << 28)
assert block, "malloc failed"
libc.free(block)
print(json.dumps({"kept_bytes": libc.sbrk(0) - before}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc options")
def test_kept_memory_keeps_a_top_over_two_gib():
    assert _report(TRIM, {**os.environ, host_memory.ENV: "keep"})["kept_bytes"] >= 1 << 31


def test_keep_where_glibc_is_missing_says_it_is_not_applied(monkeypatch, caplog):
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        assert not host_memory.configure({host_memory.ENV: "keep"})
    assert [r.getMessage() for r in caplog.records] == [
        "JAXTUNE_HOST_MALLOC=keep: not applied, glibc's malloc options need Linux with glibc (this is darwin); "
        "the allocator keeps its defaults"]


# JAX computes, then jaxtune is imported: XLA's threads already have arenas of their own, and the
# grad step of STEP faults ~30,000 pages a call (none with jaxtune imported first).
LATE = """
import jax, jax.numpy as jnp
{first}
jax.jit(lambda a: a @ a)(jnp.ones((64, 64))).block_until_ready()
{then}
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc options")
def test_jax_computing_before_import_jaxtune_is_named():
    env = {**os.environ, host_memory.ENV: "keep", "JAX_PLATFORMS": "cpu"}
    late = subprocess.run([sys.executable, "-c", LATE.format(first="", then="import jaxtune")], env=env,
                          capture_output=True, text=True, timeout=120)
    early = subprocess.run([sys.executable, "-c", LATE.format(first="import jaxtune", then="")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert late.returncode == early.returncode == 0, late.stderr[-2000:] + early.stderr[-2000:]
    assert "host memory: JAX computed before `import jaxtune`" in late.stderr
    assert "host memory" not in early.stderr


def test_a_large_array_for_a_loader_is_held_by_a_populated_mapping():
    """A large leaf's pages are mapped when it is allocated (``filled_in_place``), not on first write; the
    array holds the mapping."""
    import mmap

    import numpy as np

    big = owner = host_memory.filled_in_place((1024, 512), np.float32)
    assert big.shape == (1024, 512) and big.flags.writeable and big.flags.c_contiguous
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner.obj if isinstance(owner, memoryview) else owner, mmap.mmap)
