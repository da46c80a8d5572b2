"""Shared test set-up: 8 simulated CPU devices and absl flags for grain workers."""
import os

# Must happen before jax is imported anywhere: sharding tests need 8 devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# glibc's malloc, so that a test worker's memory shrinks after its big tests (two workers share the
# machine); tests/test_host_memory.py runs the default in processes of its own.
os.environ.setdefault("JAXTUNE_HOST_MALLOC", "system")

from absl import flags  # noqa: E402

# At import, sizes the CPU thread pool for the 8 devices (jaxtune.host_threads); the `jaxtune`
# processes the tests start inherit it.
import jaxtune  # noqa: E402,F401

# grain worker processes read absl flags; unparsed flags crash them.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

_NOTES = pytest.StashKey[list]()


@pytest.fixture
def note(request):
    """``note(line)``: a line printed in the test run's summary (e.g. the size of a test corpus)."""
    return request.config.stash.setdefault(_NOTES, []).append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(_NOTES, []):
        terminalreporter.write_line(line)
