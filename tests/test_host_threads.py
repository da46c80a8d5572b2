"""jaxtune.host_threads: the thread pool is sized for the CPU devices JAX will make, read from the
environment the way JAX and XLA read it (checked against jax.device_count() in fresh processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxtune.host_threads import THREADS_PER_SIMULATED_DEVICE

REPORT = "import json, os, jaxtune, jax; print(json.dumps([os.environ.get('PJRT_NPROC'), jax.device_count()]))"
FLAG = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize("setting", [
    {"XLA_FLAGS": f"{FLAG}=1 {FLAG}=4"},  # XLA's flag parser: the last value wins
    {"XLA_FLAGS": f"{FLAG}=4 --xla_cpu_enable_fast_math=false {FLAG}=1"},
    {"XLA_FLAGS": f'{FLAG}="4"'},  # XLA strips the quotes
    {"JAX_NUM_CPU_DEVICES": "4"},  # jax.config's jax_num_cpu_devices, from the environment
    {"JAX_NUM_CPU_DEVICES": "1", "XLA_FLAGS": f"{FLAG}=4"},  # and it overrides the flag
], ids=["flag-twice", "flag-twice-last-one", "quoted", "jax-num-cpu-devices", "jax-num-cpu-devices-wins"])
def test_the_pool_is_sized_for_the_devices_jax_makes(setting):
    """Where JAX makes several CPU devices, PJRT_NPROC gives each four threads (two collectives of one
    step can then run at once without a rendezvous abort); where it makes one, PJRT_NPROC stays unset
    (a 16-thread pool for one device faults a step's freed buffers back in)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PJRT_NPROC", "JAXTUNE_PJRT_NPROC")}
    env.update(setting, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    threads, devices = json.loads(out.stdout.strip().splitlines()[-1])
    if devices > 1:
        assert threads == str(max(os.cpu_count() or 1, devices * THREADS_PER_SIMULATED_DEVICE))
    else:
        assert threads is None


@pytest.fixture
def environment(monkeypatch):
    """os.environ restored after the test (setup_runtime writes XLA_FLAGS and PJRT_NPROC)."""
    for name in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PJRT_NPROC", "JAXTUNE_PJRT_NPROC"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("setting", [{"XLA_FLAGS": f"{FLAG}=2"}, {"JAX_NUM_CPU_DEVICES": "2"}],
                         ids=["xla-flags", "jax-num-cpu-devices"])
def test_simulate_devices_against_another_count_in_the_environment_is_refused(environment, setting):
    from jaxtune.config import ConfigError, DistributedConfig
    from jaxtune.recipe import setup_runtime
    from jaxtune.training.sharding import MeshConfig

    environment.delenv("XLA_FLAGS", raising=False)
    for name, value in setting.items():
        environment.setenv(name, value)
    with pytest.raises(ConfigError, match=r"mesh.simulate_devices: 8, but the environment asks for 2 CPU devices"):
        setup_runtime(MeshConfig(simulate_devices=8), DistributedConfig(initialize="never"))


def test_simulate_devices_after_jax_started_with_another_count_is_refused(environment):
    """The test process's backend runs with conftest's 8 devices: a recipe asking for 4 (the
    environment agreeing, as a notebook user might set it too late) cannot have them."""
    import jax

    from jaxtune.config import ConfigError, DistributedConfig
    from jaxtune.recipe import setup_runtime
    from jaxtune.training.sharding import MeshConfig

    assert jax.local_device_count() == 8
    setup_runtime(MeshConfig(simulate_devices=8), DistributedConfig(initialize="never"))  # what it has: fine
    environment.setenv("XLA_FLAGS", f"{FLAG}=4")
    with pytest.raises(ConfigError, match=r"JAX's CPU backend started earlier in this process with 8 devices"):
        setup_runtime(MeshConfig(simulate_devices=4), DistributedConfig(initialize="never"))
