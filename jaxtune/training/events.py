"""TensorBoard scalars: an events file TensorBoard reads, written without tensorboardX.

Ours because tensorboardX's writer module imports torch wherever torch is installed (to accept
torch tensors), which costs a run about 1 s and 200 MB of host memory at its first log line (an
idle 2-core CPU); scalars need none of it. The file is what TensorBoard's readers expect:
TFRecords (a little-endian uint64 length and its masked CRC-32C, the data and its masked CRC-32C)
holding ``Event`` protos, the first of them the ``brain.Event:2`` version mark; each log record is
one event, at its step, with one ``simple_value`` per scalar. The two protos are small enough to
encode by hand (field numbers from TensorFlow's ``event.proto`` and ``summary.proto``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli's polynomial, reflected
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """CRC-32C of ``data``, masked as TFRecord stores it (rotated right by 15, plus a constant)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields are varints of their two's complement
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, nested messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, *, step: int = 0, scalars: dict[str, float] | None = None,
          file_version: str | None = None, session_start: bool = False) -> bytes:
    """One serialized ``Event``: ``wall_time`` (seconds), ``step``, and either a ``Summary`` of
    ``scalars`` (tag -> float32 ``simple_value``), the ``file_version`` mark, or a ``SessionLog``
    ``START`` (``session_start``: TensorBoard then drops the events at this step and after that
    earlier files hold, as it does for a restarted TensorFlow program)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)  # fields 1 (double), 2 (int64)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if session_start:
        out += _field(7, b"\x08\x01")  # session_log = 7: SessionLog{status = 1: START}
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))  # Value
                          for tag, value in scalars.items())
        out += _field(5, values)  # Summary: repeated Value value = 1
    return out


def record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class ScalarWriter:
    """Appends scalars to a new events file in ``folder``, named as TensorFlow names them
    (``events.out.tfevents.<seconds>.<host><suffix>``; TensorBoard finds files by ``tfevents``).
    Each :meth:`add` is written and flushed at once, so a killed run keeps every logged step."""

    def __init__(self, folder: str | os.PathLike[str], suffix: str = ""):
        Path(folder).mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = Path(folder) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}{suffix}"
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the writer's life, closed by close()
        self._write(event(now, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        self._file.write(record(data))
        self._file.flush()

    def add(self, step: int, scalars: dict[str, float]) -> None:
        """One event at ``step`` holding every scalar of ``scalars`` (tag -> value)."""
        if scalars:
            self._write(event(time.time(), step=step, scalars=scalars))

    def restart(self, step: int) -> None:
        """Mark a resumed run: TensorBoard forgets the earlier files' events from ``step`` on."""
        self._write(event(time.time(), step=step, session_start=True))

    def close(self) -> None:
        self._file.close()
