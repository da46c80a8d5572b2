"""training/events.py's TensorBoard events against tensorboardX's own reader pieces: its ``Event``
proto parses every record, and its masked CRC-32C equals the one each record carries."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import tfrecords

from jaxtune.training.events import ScalarWriter, masked_crc32c

tensorboardX = pytest.importorskip("tensorboardX")  # a test dependency: the reference reader
from tensorboardX.proto.event_pb2 import Event  # noqa: E402
from tensorboardX.record_writer import masked_crc32c as reference_crc  # noqa: E402


def test_scalars_read_back_with_tensorboardx_protos_and_crcs(tmp_path):
    start = time.time()
    writer = ScalarWriter(tmp_path / "tb", suffix=".7.1")
    logged = [(1, {"loss": 2.5, "learning_rate": 3e-4}), (300, {"eval/accuracy": 0.8125, "tokens_per_s": 123456.0}),
              (2**40, {"loss": -1.25}), (5, {})]  # a step past 7 and 32 bits; an empty record writes nothing
    for step, scalars in logged:
        writer.add(step, scalars)
    writer.close()
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith(f"events.out.tfevents.{int(start)}") and path.name.endswith(".7.1")
    events = [Event.FromString(r) for r in tfrecords(path)]
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 1 + 3
    for (step, scalars), ev in zip(logged, events[1:], strict=False):
        assert ev.step == step and start - 1 <= ev.wall_time <= time.time() + 1
        got = {v.tag: v.simple_value for v in ev.summary.value}
        assert got == {k: float(np.float32(v)) for k, v in scalars.items()}


def test_masked_crc32c_equals_tensorboardx_on_every_length():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 255, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference_crc(data)
