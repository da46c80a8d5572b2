"""The service's state in one SQLite file: API keys, files, jobs and their events.

SQLite (standard library) because the service must run anywhere with nothing to install or
administer; WAL mode lets the request threads read while a job's monitor writes. Every row
belongs to the key (``owner``) that made it, and every read here takes the owner, so one key's
objects are invisible to another by construction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, kind TEXT NOT NULL,
    rows INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at INTEGER NOT NULL,
    data TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, pid INTEGER,
    started_at INTEGER, finished_at INTEGER, error TEXT, fine_tuned_model TEXT, trained_tokens INTEGER,
    metrics_offset INTEGER NOT NULL DEFAULT 0, checkpoints TEXT NOT NULL DEFAULT '[]', log_offset INTEGER NOT NULL
    DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    type TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
"""
KEY_PREFIX = "sk-jt-"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    """The SQLite database of a data directory (``<data_dir>/serve.sqlite``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ keys

    def create_key(self, name: str) -> tuple[str, str]:
        """A new API key; returns ``(key_id, secret)``. Only the secret's hash is stored."""
        key_id, secret = new_id("key"), KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, 0)", (key_id, name, _hash(secret), int(time.time())))
        return key_id, secret

    def key_owner(self, secret: str) -> str | None:
        """The key id of a live secret, or None."""
        row = self._one("SELECT id FROM keys WHERE hash = ? AND revoked = 0", (_hash(secret),))
        return row["id"] if row else None

    def keys(self) -> list[dict[str, Any]]:
        return self._all("SELECT id, name, created_at, revoked FROM keys ORDER BY created_at")

    def revoke_key(self, key_id: str) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE keys SET revoked = 1 WHERE id = ?", (key_id,)).rowcount > 0

    # ------------------------------------------------------------------ files

    def add_file(self, owner: str, file_id: str, filename: str, purpose: str, size: int, kind: str,
                 rows: int) -> dict[str, Any]:
        with self._tx() as db:
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                       (file_id, owner, filename, purpose, size, int(time.time()), kind, rows))
        return self.file(owner, file_id)  # type: ignore[return-value]

    def file(self, owner: str, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ? AND owner = ? AND deleted = 0", (file_id, owner))

    def files(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        if purpose:
            return self._all("SELECT * FROM files WHERE owner = ? AND purpose = ? AND deleted = 0 "
                             "ORDER BY created_at, rowid", (owner, purpose))
        return self._all("SELECT * FROM files WHERE owner = ? AND deleted = 0 ORDER BY created_at, rowid", (owner,))

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE files SET deleted = 1 WHERE id = ? AND owner = ? AND deleted = 0",
                              (file_id, owner)).rowcount > 0

    # ------------------------------------------------------------------ jobs

    def add_job(self, owner: str, job_id: str, data: dict[str, Any], status: str = "queued") -> dict[str, Any]:
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, owner, created_at, data, status) VALUES (?, ?, ?, ?, ?)",
                       (job_id, owner, int(time.time()), json.dumps(data), status))
        return self.job(job_id, owner)  # type: ignore[return-value]

    def job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """A job row (``data`` decoded); ``owner=None`` only for the runner, never for a request."""
        row = (self._one("SELECT * FROM jobs WHERE id = ?", (job_id,)) if owner is None else
               self._one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)))
        return _decode_job(row) if row else None

    def jobs(self, owner: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first (an owner's, or with ``owner=None`` every job in a status)."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?"), args.append(owner)
        if status is not None:
            where.append("status = ?"), args.append(status)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return [_decode_job(r) for r in self._all(sql + " ORDER BY created_at DESC, rowid DESC", tuple(args))]

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set columns of a job (``only_if``: only while its status is one of these); True if it changed."""
        with self._tx() as db:
            return _update_job(db, job_id, only_if, fields)

    def end_process(self, job_id: str, if_running: dict[str, Any]) -> dict[str, Any] | None:
        """Record that a job's process has ended, in one transaction: clear its ``pid`` and, if it is
        still ``running``, set the ``if_running`` columns (its outcome). Returns the row as it was
        before (None for an unknown job). One transaction, because the moment ``pid`` is clear a
        job resumed meanwhile may be claimed and started again by another device set: a status read
        after that would be the new process's, not the ended one's."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            _update_job(db, job_id, None, {"pid": None})
            if if_running:
                _update_job(db, job_id, ("running",), dict(if_running))
        return _decode_job(dict(row))

    def record(self, job_id: str, events: list[dict[str, Any]], **fields: Any) -> None:
        """Add events (:meth:`add_event`'s arguments) and set a job's columns in one transaction:
        a write that fails (a full disk) leaves neither, so the runner's next poll retries both
        without duplicating events."""
        with self._tx() as db:
            for event in events:
                _insert_event(db, job_id, **event)
            _update_job(db, job_id, None, fields)

    def claim_next(self) -> dict[str, Any] | None:
        """Atomically take the next queued job (resumed ones first, then oldest) and mark it running.

        Only a job without a process: one resumed while its paused process still saves its
        checkpoint waits for that process to end (the runner clears ``pid`` then), or two processes
        would train one run directory. The claimed job's ``pid`` is 0 until its process starts, so
        a pause and resume in between cannot hand it to a second device set either."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' AND pid IS NULL "
                             "ORDER BY priority DESC, created_at, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', pid = 0, started_at = COALESCE(started_at, ?) "
                       "WHERE id = ?", (int(time.time()), row["id"]))
        return self.job(row["id"])

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            _insert_event(db, job_id, message, level=level, type=type, data=data)

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None,
               type: str | None = None) -> list[dict[str, Any]]:
        """A job's events, newest first (as OpenAI lists them): with ``after`` (an event id) only
        those older than it, at most ``limit`` of them, only of ``type``; read as a page of the
        table, so a long job's thousands of events are not all loaded to answer for a few.
        Raises :class:`KeyError` when ``after`` is not one of this job's events."""
        where, args = ["job_id = ?"], [job_id]
        if after is not None:
            mark = self._one("SELECT seq FROM events WHERE id = ? AND job_id = ?", (after, job_id))
            if mark is None:
                raise KeyError(after)
            where.append("seq < ?"), args.append(mark["seq"])
        if type is not None:
            where.append("type = ?"), args.append(type)
        sql = f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._all(sql, tuple(args))
        for row in rows:
            row["data"] = json.loads(row["data"]) if row["data"] else None
        return rows


def _decode_job(row: dict[str, Any]) -> dict[str, Any]:
    row["data"] = json.loads(row["data"])
    row["error"] = json.loads(row["error"]) if row["error"] else None
    row["checkpoints"] = json.loads(row["checkpoints"])
    return row


def _update_job(db: sqlite3.Connection, job_id: str, only_if: tuple[str, ...] | None, fields: dict[str, Any]) -> bool:
    if "error" in fields and fields["error"] is not None:
        fields["error"] = json.dumps(fields["error"])
    if "checkpoints" in fields:
        fields["checkpoints"] = json.dumps(fields["checkpoints"])
    sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
    args: tuple = (*fields.values(), job_id)
    if only_if:
        sql += f" AND status IN ({', '.join('?' * len(only_if))})"
        args += only_if
    return db.execute(sql, args).rowcount > 0


def _insert_event(db: sqlite3.Connection, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> None:
    db.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (new_id("ftevent"), job_id, int(time.time()), level, message, type,
                json.dumps(data) if data is not None else None))
