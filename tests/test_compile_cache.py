"""Compile once per machine: a second process training the same shapes loads the compiled step
from the persistent cache instead of compiling it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from helpers import tiny_hf_model

from jaxtune.data.testing import synthetic_chat_rows, tiny_tokenizer, write_jsonl
from jaxtune.training import base_cache, compile_cache

# Compiles x -> sin(x) @ x.T at each size given, with the cache in argv[1] turned on as jaxtune does;
# prints how many executables came from the cache. Every program is kept (no minimum compile time).
PROGRAMS = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from jaxtune.training import compile_cache
    compile_cache.enable(sys.argv[1])
    for n in sys.argv[2:]:
        jax.jit(lambda x: jnp.sin(x) @ x.T)(np.ones((int(n), 8), np.float32)).block_until_ready()
    print(json.dumps({"hits": compile_cache.hits()}))
""")

SCRIPT = textwrap.dedent("""
    import json, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jaxtune as jt
    model_dir, data, run_dir = sys.argv[1:4]
    model = jt.apply_plan(jt.load(model_dir), jt.lora(rank=4))
    train, _ = jt.read(data, kind="chat")
    trainer = jt.Trainer(model, train, run_dir=run_dir, config=jt.TrainConfig(steps=2, progress=False),
                         data=jt.DataConfig(batch_size=4, max_length=64))
    trainer.fit()
    print(json.dumps({"hit": trainer.compile_cache_hit}))
""")


@pytest.mark.slow
def test_a_second_run_loads_the_compiled_step(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", synthetic_chat_rows(32, seed=0, max_words=6))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}

    def run(name: str) -> bool:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model"), str(data), str(tmp_path / name)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["hit"]

    assert run("first") is False  # an empty cache: the step compiles
    assert list((tmp_path / "xla").iterdir())  # and is written to disk
    assert run("second") is True  # another process, another run directory: loaded, not compiled
    [entry] = (tmp_path / "xla").glob("jit_step-*-cache")
    entry.write_bytes(entry.read_bytes()[:1000])  # as a process killed while writing it leaves it
    assert run("third") is False  # compiled again, and the entry written whole
    assert run("fourth") is True


def test_a_cache_that_cannot_be_created_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """A cache root that cannot be created (a read-only or missing home; here a file in its way): the
    compile cache stays off and the base report is not kept, each with one warning naming the folder
    and the fix, where the Trainer used to stop with NotADirectoryError / PermissionError."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("JAXTUNE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(compile_cache, "_warned", False, raising=False)
    configured = jax.config.jax_compilation_cache_dir  # an earlier Trainer in this process may have set it
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        with caplog.at_level(logging.WARNING, logger="jaxtune"):
            assert compile_cache.enable() is None
            assert compile_cache.enable() is None  # each Trainer asks again; one warning a process
            assert jax.config.jax_compilation_cache_dir is None
            base_cache.store("0" * 64, {"accuracy": 0.5})
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
    lines = [record.getMessage() for record in caplog.records]
    assert len([line for line in lines if line.startswith("compile cache: off")]) == 1, lines
    assert len([line for line in lines if line.startswith("base report not kept")]) == 1, lines
    assert all(str(blocker) in line and "JAXTUNE_CACHE" in line for line in lines), lines
    assert base_cache.load("0" * 64) is None


@pytest.mark.parametrize("chosen", [None, 5.0])
def test_the_applications_minimum_compile_time_stands(tmp_path, monkeypatch, chosen):
    """jaxtune lowers JAX's default threshold (1 s) to 0.5 s when it turns the cache on; a threshold the
    application chose (here through jax.config; JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is read into
    it) is its own, as a directory it chose is."""
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
             jax.config.jax_compilation_cache_max_size)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0 if chosen is None else chosen)
    try:
        assert compile_cache.enable(tmp_path / "xla") == tmp_path / "xla"
        assert jax.config.jax_persistent_cache_min_compile_time_secs == (0.5 if chosen is None else chosen)
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        jax.config.update("jax_compilation_cache_max_size", saved[2])


def _programs(cache, sizes: list[int], **env: str) -> tuple[int, str]:
    """Run :data:`PROGRAMS` in a fresh process (JAX sets its cache up once a process): ``(hits, stderr)``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    proc = subprocess.run([sys.executable, "-c", PROGRAMS, str(cache), *map(str, sizes)], capture_output=True,
                          text=True, env={**environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["hits"], proc.stderr


def _executable(entry) -> bytes:
    """An entry's compiled program, without the compile time JAX stores beside it."""
    from jax._src.compilation_cache import decompress_executable, extract_executable_and_time

    return extract_executable_and_time(decompress_executable(entry.read_bytes()))[0]


def test_an_entry_cut_short_by_a_killed_writer_is_rewritten_whole(tmp_path):
    """JAX writes an entry in place and never overwrites one: an entry left short (its writer
    killed) failed to decompress in every later run, which compiled again with JAX's warning and
    left it short. The run that reads it removes it, saying so, and its compile writes the entry
    the uninterrupted run wrote; the run after loads it."""
    cache = tmp_path / "xla"
    assert _programs(cache, [16])[0] == 0
    [entry] = cache.glob("*-cache")
    whole = _executable(entry)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    hits, err = _programs(cache, [16])
    assert hits == 0 and _executable(entry) == whole
    assert f"compile cache: removed {entry}, which does not decompress" in err, err[-3000:]
    hits, err = _programs(cache, [16])
    assert hits == 1 and "Error reading persistent compilation cache" not in err, err[-3000:]


def test_jaxtunes_folder_is_bounded_unless_the_application_chose(tmp_path, monkeypatch):
    """The folder jaxtune picks is bounded (MAX_BYTES, least recently used entries evicted), where
    it grew by every new jaxlib, device and shape; a bound the application set stands."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    try:
        for chosen, expected in ((-1, compile_cache.MAX_BYTES), (2**20, 2**20)):
            jax.config.update("jax_compilation_cache_dir", None)
            jax.config.update("jax_compilation_cache_max_size", chosen)
            compile_cache.enable(tmp_path / "xla")
            assert jax.config.jax_compilation_cache_max_size == expected
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_a_bound_holds_over_a_folder_filled_while_unbounded(tmp_path):
    """JAX's eviction reads each entry's last use (``<key>-atime``), which an unbounded cache (every
    cache before the bound) never wrote: every later write failed with FileNotFoundError and the
    folder stayed over the bound. Entries without one get their write time: the least recently
    used are evicted and the new program is written, the folder within the bound."""
    cache = tmp_path / "xla"
    _programs(cache, [16], JAX_COMPILATION_CACHE_MAX_SIZE="-1")
    [first] = [p.name for p in cache.glob("*-cache")]
    _programs(cache, [32, 48], JAX_COMPILATION_CACHE_MAX_SIZE="-1")
    sizes = {p.name: p.stat().st_size for p in cache.glob("*-cache")}
    assert len(sizes) == 3
    bound = sum(sizes.values()) * 3 // 4  # room for two of them, not three
    hits, err = _programs(cache, [16, 64], JAX_COMPILATION_CACHE_MAX_SIZE=str(bound))
    assert hits == 1 and "Error writing persistent compilation cache" not in err, err[-3000:]
    after = {p.name: p.stat().st_size for p in cache.glob("*-cache")}
    assert sum(after.values()) <= bound, (after, bound)
    [new] = set(after) - set(sizes)  # the new program was written
    assert set(after) == {first, new}  # beside the one just used; the two unused since were evicted


def test_a_folder_this_user_may_only_read_is_read_unbounded(tmp_path):
    """A bounded cache locks its folder to read an entry (and dates its use): in a folder this
    user cannot write (a shared $JAXTUNE_CACHE others filled) every read failed, where unbounded
    it loads. Made read-only with ``chattr +i``, which holds for root too."""
    cache = tmp_path / "xla"
    _programs(cache, [16])
    paths = [cache, *cache.iterdir()]
    if subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        hits, err = _programs(cache, [16])
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
    assert hits == 1 and "Error reading persistent compilation cache" not in err, err[-3000:]
