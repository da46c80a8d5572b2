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


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (--dist loadfile) queues the files with the most tests first: the files of a few slow tests
    # (real models, several processes; minutes each) came last, and one worker ran them while the other idled.
    # The queue follows the collection's order instead (pytest_collection_modifyitems below).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with the most ``slow`` tests first, then the most tests (xdist's own order), each file's tests in
    their order: the longest files start first and the workers end together (longest-first scheduling)."""
    def file_of(item: pytest.Item) -> str:  # xdist's unit of work under --dist loadfile
        return item.nodeid.split("::", 1)[0]

    slow: dict[str, int] = {}
    count: dict[str, int] = {}
    for item in items:
        path = file_of(item)
        count[path] = count.get(path, 0) + 1
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    first = {path: at for at, path in enumerate(count)}
    items.sort(key=lambda item: (-slow[file_of(item)], -count[file_of(item)], first[file_of(item)]))


@pytest.fixture
def note(request):
    """``note(line)``: a line printed in the test run's summary (e.g. the size of a test corpus)."""
    return request.config.stash.setdefault(_NOTES, []).append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(_NOTES, []):
        terminalreporter.write_line(line)
