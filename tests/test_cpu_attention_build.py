"""Building the fused CPU attention kernel where it cannot be built: a ``$CXX`` that is not a program
here or is a wrapper's two words, a compiler that fails, hangs or writes no library that loads, a cache
that cannot be written. Each falls back to the XLA attention with one warning (or builds privately),
and no attention call raises, however many are traced."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import attention, cpu_attention
from jaxtune.models.attention import attention_mask, grouped_attention

Q = jax.random.normal(jax.random.key(0), (1, 8, 2, 8))
IDS = jnp.ones((1, 8), jnp.int32)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no built kernel for the test; the real one again after it."""
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    cpu_attention._library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_attention._library.cache_clear()


def _fake_compiler(folder: Path, body: str) -> Path:
    """An executable shell script standing in for the compiler; ``$out`` is its ``-o`` argument."""
    script = folder / "fake-c++"
    script.write_text(f'#!/bin/sh\nfor out; do :; done\necho "$out" >> "{folder}/outputs"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def _assert_attention_falls_back(caplog, words: str) -> None:
    """Two traced attention calls (two layers) run the XLA path and give its outputs; the kernel is
    unavailable and one warning, containing ``words``, said so."""
    expected = grouped_attention(Q, Q, Q, attention_mask(IDS, causal=True))
    with caplog.at_level(logging.WARNING, logger="jaxtune"):
        for _ in range(2):
            out = jax.jit(lambda q: attention.dot_product_attention(q, q, q, segment_ids=IDS, causal=True))(Q)
            np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
        assert not cpu_attention.available()
    lines = [r.getMessage() for r in caplog.records if "using the XLA attention" in r.getMessage()]
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize("cxx", ["/nonexistent/g++", "no-such-ccache g++", '"g++'])
def test_a_compiler_that_is_not_here_falls_back_once(fresh_build, caplog, cxx):
    """``$CXX`` naming no program here (a missing path, a missing wrapper, unbalanced quotes) is no
    compiler: one warning naming it, and the XLA path, instead of an error on every attention call."""
    fresh_build.setenv("CXX", cxx)
    _assert_attention_falls_back(caplog, f"$CXX={cxx!r}")


def test_cxx_is_split_as_a_shell_splits_it(fresh_build, caplog, tmp_path):
    """``$CXX="sh fake-c++"`` (as ``ccache g++``) runs ``sh`` with the script as its first argument."""
    script = _fake_compiler(tmp_path, "echo 'x.cc:1: error: fake' >&2; exit 1")
    fresh_build.setenv("CXX", f"sh {script}")
    _assert_attention_falls_back(caplog, f"with sh {script} failed (x.cc:1: error: fake)")


def test_a_failed_build_names_the_compilers_first_error(fresh_build, caplog, tmp_path):
    """The warning quotes the compiler's first error, not its last line ("compilation terminated.")."""
    script = _fake_compiler(tmp_path, "printf 'In file included from x.cc:1:\\nx.cc:3:10: fatal error: "
                                      "xla/ffi/api/ffi.h: No such file or directory\\ncompilation terminated.\\n' >&2; "
                                      "exit 1")
    fresh_build.setenv("CXX", str(script))
    _assert_attention_falls_back(caplog, "fatal error: xla/ffi/api/ffi.h: No such file or directory")


def test_a_hung_compiler_is_stopped(fresh_build, caplog, tmp_path):
    """A compiler that does not finish is stopped after ``COMPILE_TIMEOUT`` (it would hold the cache's
    lock, and every process that waits on it, for ever)."""
    fresh_build.setattr(cpu_attention, "COMPILE_TIMEOUT", 1, raising=False)
    fresh_build.setenv("CXX", str(_fake_compiler(tmp_path, "exec sleep 20")))
    _assert_attention_falls_back(caplog, "took over 1 s and was stopped")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the compiler's processes in /proc")
def test_a_hung_compilers_own_processes_are_stopped_with_it(fresh_build, caplog, tmp_path):
    """A compiler driver (g++) that hangs in a process of its own (cc1plus): that process is stopped
    too, not left running, reparented, after the build gave up."""
    fresh_build.setattr(cpu_attention, "COMPILE_TIMEOUT", 1, raising=False)
    pid_file = tmp_path / "cc1plus.pid"
    fresh_build.setenv("CXX", str(_fake_compiler(tmp_path, f'sleep 600 & echo $! > "{pid_file}"; wait')))
    _assert_attention_falls_back(caplog, "took over 1 s and was stopped")
    pid = int(pid_file.read_text())
    for _ in range(100):  # its new parent (init, or a subreaper) reaps it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state in "ZX":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail(f"the compiler's process {pid} outlived the build")


def test_a_read_only_cache_builds_privately_and_a_library_that_does_not_load_falls_back(
        fresh_build, caplog, tmp_path):
    """A cache that cannot be written (here a file where the folder should be, which even root cannot
    write into) sends the build to a private temporary folder; a library there that does not load
    (the fake compiler writes text) is one warning and the XLA path, not an OSError per call."""
    (tmp_path / "cache").write_text("not a folder")
    fresh_build.setenv("CXX", str(_fake_compiler(tmp_path, 'echo "not a library" > "$out"')))
    _assert_attention_falls_back(caplog, "could not be built or loaded (OSError")
    [built] = (tmp_path / "outputs").read_text().split()
    assert Path(built).parent.parent.name.startswith("jaxtune-kernels-")
    assert any("the kernel cache cannot be written" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not cpu_attention._compiler(), reason="no C++ compiler here")
def test_targets_xla_refuses_fall_back(monkeypatch, caplog):
    """XLA refusing the kernel's FFI targets (it does for a second copy of the library) is the XLA path
    with one warning, not an error on every attention call."""
    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: Duplicate FFI handler registration")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    cpu_attention._library.cache_clear()
    try:
        _assert_attention_falls_back(caplog, "could not be built or loaded (JaxRuntimeError")
    finally:
        monkeypatch.undo()
        cpu_attention._library.cache_clear()


@pytest.mark.skipif(not cpu_attention._compiler(), reason="no C++ compiler here")
def test_a_read_only_cache_still_gets_the_kernel(tmp_path):
    """With a real compiler, the kernel built into the private folder loads and attention runs it; the
    folder is gone after the process. In a fresh process: XLA keeps the first library's FFI targets,
    and refuses another copy's (this test process registered the cache's already)."""
    (tmp_path / "cache").write_text("not a folder")
    program = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jaxtune.models import attention, cpu_attention
        q = jax.random.normal(jax.random.key(0), (1, 8, 2, 8))
        fn = jax.jit(lambda q: attention.dot_product_attention(q, q, q, causal=True))
        assert cpu_attention.available() and "jaxtune_cpu_attention_forward" in fn.lower(q).as_text()
        expected = attention.grouped_attention(q, q, q, attention.attention_mask(jnp.ones((1, 8)), causal=True))
        assert float(jnp.max(jnp.abs(fn(q) - expected))) < 2e-6
        print(cpu_attention._library()._name)
    """)
    env = {**os.environ, "JAXTUNE_CACHE": str(tmp_path / "cache"), "JAXTUNE_CPU_ATTENTION": "1"}
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    library = Path(done.stdout.split()[-1])
    assert library.parent.name.startswith("jaxtune-kernels-") and not library.parent.exists()
