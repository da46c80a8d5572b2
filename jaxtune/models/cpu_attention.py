"""Fused attention for XLA:CPU: ``cpu_attention.cc`` built at first use, called through XLA's FFI.

XLA:CPU has no fused attention: :func:`~jaxtune.models.attention.grouped_attention` runs the scores,
softmax and their gradients as separate ops over whole score arrays, and its backward's
query-contracting products as slow generic dots. The kernel here does flash attention per (batch,
KV head) group instead: query tiles against key blocks whose scores stay in the cache, an online
softmax that keeps each row's log-sum-exp, a backward that recomputes the probabilities from it,
and no work on the key blocks a tile cannot see (after a causal tile, in other packed documents,
outside a sliding window). It soft-caps the scores where the model does (Gemma 2). Its groups run
on XLA's own CPU thread pool. Dropout on the probabilities (BERT's ``attention_probs_dropout_prob``
in training) happens inside it, its mask a hash of the key and the position
(:func:`jaxtune.models.dropout.attention_keep`, the XLA path's mask too), not an array of random
bits: nothing of size ``T x T`` is drawn, stored or read.

No PyPI package ships a CPU attention kernel for JAX, so this one is ours; it is built with the
machine's C++ compiler (``$CXX``, split as a shell splits it, else ``c++``/``g++``) for the machine's
CPU (``-march=native``) into ``$JAXTUNE_CACHE/kernels``, once per source, compiler, jaxlib and CPU,
and loaded from there afterwards (into a private temporary folder where that cache cannot be
written). Without a compiler, or with ``JAXTUNE_CPU_ATTENTION=0``, :func:`available` is False and
attention takes the XLA path (``grouped_attention``); a build or load that fails (or a compiler
that hangs) says so once, and is not retried in that process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.dropout import attention_seed, drop_threshold, drops_all

Array = jax.Array
log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
_FORWARD, _BACKWARD = "jaxtune_cpu_attention_forward", "jaxtune_cpu_attention_backward"
COMPILE_TIMEOUT = 600  # seconds: the kernel builds in ~10 s; far more means a hung compiler


def enabled() -> bool:
    """False when ``JAXTUNE_CPU_ATTENTION`` is ``0`` (or ``false``/``no``/``off``): use the XLA path."""
    return os.environ.get("JAXTUNE_CPU_ATTENTION", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the kernel is enabled, built and registered with XLA (builds it on the first call)."""
    return enabled() and _library() is not None


def supports(*, head_dim: int, self_attention: bool, dense_mask: bool) -> bool:
    """Whether the kernel computes this attention: self-attention from segment ids (or none), with or
    without a sliding window, soft-capping or dropout, a head dim that is a multiple of 8."""
    return self_attention and not dense_mask and head_dim % 8 == 0


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))


def _compiler() -> list[str] | None:
    """The C++ compiler's command: ``$CXX`` split as a shell splits it (``ccache g++`` is two words), else
    the first of ``c++``, ``g++``, ``clang++`` on the PATH; None where its program is not found here."""
    try:
        words = shlex.split(os.environ.get("CXX", ""))
    except ValueError:  # unbalanced quotes: no command a shell would run either
        return None
    if words:
        return words if shutil.which(words[0]) else None
    found = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return [found] if found else None


def _first_error(stderr: str) -> str:
    """The compiler's first error lines (at most two), not its last line, which is usually only
    "compilation terminated."; its first line where none says "error"."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[:1]
    return "; ".join(line[:300] for line in errors[:2]) or "no output"


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, theirs, ...), read from ``/proc``; none where it is missing."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            parent = int(text[text.rindex(")") + 2:].split()[1])  # the name in parentheses may hold spaces
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_compiler(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the compiler, stopped past :data:`COMPILE_TIMEOUT` (:class:`subprocess.TimeoutExpired`)
    with the processes it started: a driver (``g++``) runs ``cc1plus``, ``as`` and ``ld`` as its
    children, and killing the driver alone left a hung ``cc1plus`` running, a core busy, after
    the build had given up."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            below = _descendants(proc.pid)  # before the driver dies: then they are no longer its
            proc.kill()
            for pid in below:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _compile(compiler: list[str], target: Path) -> Path | None:
    """Compile the kernel into ``target`` (through a temporary file beside it, so that no other process
    loads half a library); None, with a warning naming the compiler's first error, where it fails."""
    command = [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:  # a timeout: a hung compiler would otherwise hold the cache's lock, and every other process
            done = _run_compiler([*command, str(built)])
        except subprocess.TimeoutExpired:
            log.warning("attention: building the fused CPU attention kernel with %s took over %d s and was "
                        "stopped; using the XLA attention", shlex.join(compiler), COMPILE_TIMEOUT)
            return None
        if done.returncode != 0:
            log.warning("attention: building the fused CPU attention kernel with %s failed (%s); "
                        "using the XLA attention", shlex.join(compiler), _first_error(done.stderr))
            return None
        os.replace(built, target)
    return target


def _build(compiler: list[str], name: str) -> Path | None:
    """The kernel library ``name``: from the cache, else compiled into it under its lock; compiled into a
    private temporary folder (removed at exit) where the cache cannot be written, e.g. read-only."""
    from jaxtune.assets import cache_dir, cache_lock

    with contextlib.ExitStack() as held:
        try:
            target = cache_dir() / "kernels" / name
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(cache_lock(target))  # another process may be building the same library
        except OSError as error:
            private = Path(tempfile.mkdtemp(prefix="jaxtune-kernels-"))
            atexit.register(shutil.rmtree, private, ignore_errors=True)
            log.warning("attention: the kernel cache cannot be written (%s); building the fused CPU attention "
                        "kernel into %s for this process only (set $JAXTUNE_CACHE to a writable folder)",
                        error, private)
            target = private / name
        return target if target.exists() else _compile(compiler, target)


def _load(target: Path) -> ctypes.CDLL:
    """Load the built kernel and register its two FFI targets with XLA."""
    library = ctypes.cdll.LoadLibrary(str(target))
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.JaxtuneAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.JaxtuneAttentionBackward), platform="cpu")
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Build (once per machine) and load the kernel, and register its two FFI targets; None, with one
    warning, where it cannot be built or loaded here. Every failure is caught and the None cached:
    :func:`available` runs while tracing each attention call, and an exception is not cached."""
    compiler = _compiler()
    if compiler is None:
        log.warning("attention: no C++ compiler to build the fused CPU attention kernel ($CXX=%r, else c++, g++, "
                    "clang++ on the PATH); using the XLA attention (install g++, or set $CXX to a compiler "
                    "found here)", os.environ.get("CXX", ""))
        return None
    try:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), shlex.join(compiler), *FLAGS,
                                        importlib.metadata.version("jaxlib"), _cpu_signature()]).encode())
        target = _build(compiler, f"cpu_attention-{key.hexdigest()[:16]}.so")
        return None if target is None else _load(target)
    except (OSError, AttributeError, subprocess.SubprocessError, jax.errors.JaxRuntimeError) as error:
        # a compiler that cannot start, a library that does not load or lacks the entry points, or
        # XLA refusing the targets (another copy of the library registered them already)
        log.warning("attention: the fused CPU attention kernel could not be built or loaded (%s: %s); using the "
                    "XLA attention", type(error).__name__, error)
        return None


def attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *, causal: bool,
              scale: float | None = None, window: tuple[int, int | None] | None = None, logit_cap: float | None = None,
              dropout_rate: float = 0.0, dropout_rng: Array | None = None, first_row: Array | int = 0,
              first_head: Array | int = 0) -> Array:
    """Softmax self-attention on the fused CPU kernel (:func:`available` must be True).

    Shapes: ``q`` ``(B, T, N, H)``, ``k``/``v`` ``(B, T, K, H)`` with ``N % K == 0`` and ``H % 8 == 0``
    (other shapes: a ValueError) -> ``(B, T, N, H)`` in ``q``'s dtype (computed in float32).
    ``segment_ids`` ``(B, T)`` int, as
    :func:`~jaxtune.models.attention.attention_mask` reads them (a query sees its own segment's keys;
    0 is padding, which no query sees), or None (one segment). Scores are ``q . k * scale`` (default ``H ** -0.5``). A
    query that sees no key (padding) gets zeros. Differentiable in ``q``, ``k`` and ``v``. ``window``
    ``(left, right)``: a query sees keys at most ``left`` before and ``right`` after it (None: no
    bound on that side), as :func:`~jaxtune.models.attention.window_bounds` gives a sliding window.
    ``logit_cap``: scores are soft-capped, ``cap * tanh(score / cap)`` (Gemma 2), before masking, as
    :func:`~jaxtune.models.attention.softcap`.

    ``dropout_rate`` > 0 with a ``dropout_rng`` key drops each probability with that chance (to
    2^-16, :func:`jaxtune.models.dropout.drop_threshold`) and scales the rest by ``1 / (1 - rate)``,
    after the softmax, as ``torch.nn.functional.dropout`` on BERT's probabilities; which are kept is
    :func:`~jaxtune.models.dropout.attention_keep` of the key. ``first_row``, ``first_head``: the batch row and query
    head this call's first ones are in the whole batch (a shard of a mesh), so that every shard
    draws its part of one mask, the same on any mesh.
    """
    if not available():
        raise RuntimeError("cpu_attention.attention: the fused CPU attention kernel is not available here "
                           "(JAXTUNE_CPU_ATTENTION=0, or no C++ compiler); use grouped_attention")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"cpu_attention.attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    left, right = window or (None, None)
    if any(x is not None and x < 0 for x in (left, right)):
        raise ValueError(f"cpu_attention.attention: window bounds must be >= 0 or None, got {window}")
    if logit_cap is not None and not logit_cap > 0:
        raise ValueError(f"cpu_attention.attention: logit_cap must be > 0 or None, got {logit_cap}")
    _check_shapes(q, k, v, segment_ids)
    if dropout_rng is not None and drops_all(dropout_rate):  # the kernel's threshold cannot say "every one"
        return jnp.zeros(q.shape, q.dtype)  # what the XLA path gives: no probability kept, no gradient
    b, t, _, h = q.shape
    ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    drop = drop_threshold(dropout_rate) if dropout_rng is not None else 0
    seed = attention_seed(dropout_rng) if drop else jnp.zeros((2,), jnp.uint32)
    rng = jnp.concatenate([seed, jnp.stack([jnp.asarray(first_row), jnp.asarray(first_head)]).astype(jnp.uint32)])
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    kept = 1.0 / (1.0 - dropout_rate) if drop else 1.0  # the nominal rate's, as torch and jaxtune's other dropout
    bounds = (-1 if left is None else int(left), -1 if right is None else int(right))
    return _attention(*f32, ids, rng, h ** -0.5 if scale is None else float(scale), bool(causal),
                      (*bounds, drop, kept, float(logit_cap or 0.0))).astype(q.dtype)


def _check_shapes(q: Array, k: Array, v: Array, segment_ids: Array | None) -> None:
    """A ValueError naming the shapes where they do not fit: the kernel reads ``v`` with ``k``'s strides
    and the segment ids with ``q``'s, so another shape would read past an array's end or mix its axes."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"cpu_attention.attention: q must be (B, T, N, H) and k, v both (B, T, K, H); "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2] or h % 8:
        raise ValueError(f"cpu_attention.attention: k and v {k.shape} must share q's {q.shape} batch, length and "
                         "head dim (a multiple of 8), with KV heads that divide its heads")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"cpu_attention.attention: segment_ids must be (B, T) = {(b, t)} for q {q.shape}, "
                         f"got {segment_ids.shape}")


# options: (left, right, drop, kept, cap): the window's bounds (-1: none), the dropout threshold in
# 2^-16 and the kept probabilities' scale (0 and 1: no dropout), the scores' soft-cap (0: none).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q: Array, k: Array, v: Array, ids: Array, rng: Array, scale: float, causal: bool,
               options: tuple[int, int, int, float, float]) -> Array:
    return _forward(q, k, v, ids, rng, scale, causal, options)[0]


def _call(target: str, outputs: tuple[jax.ShapeDtypeStruct, ...], *args: Array, scale: float,
          causal: bool, options: tuple[int, int, int, float, float]) -> tuple[Array, ...]:
    left, right, drop, kept, cap = options
    return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(
        *args, scale=np.float32(scale), causal=np.int32(causal), left=np.int32(left), right=np.int32(right),
        drop=np.int32(drop), kept=np.float32(kept), softcap=np.float32(cap))


def _forward(q: Array, k: Array, v: Array, ids: Array, rng: Array, scale: float, causal: bool,
             options: tuple[int, int, int, float, float]) -> tuple[Array, tuple]:
    b, t, n, _ = q.shape
    out, lse = _call(_FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
                     q, k, v, ids, rng, scale=scale, causal=causal, options=options)
    return out, (q, k, v, ids, rng, out, lse)


def _backward(scale: float, causal: bool, options: tuple[int, int, int, float, float], residuals: tuple,
              d_out: Array) -> tuple[Array, Array, Array, None, None]:
    q, k, v, ids, rng, out, lse = residuals
    dq, dk, dv = _call(_BACKWARD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                       q, k, v, ids, rng, out, lse, d_out.astype(jnp.float32), scale=scale, causal=causal,
                       options=options)
    return dq, dk, dv, None, None


_attention.defvjp(_forward, _backward)
