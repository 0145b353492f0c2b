"""The job store: one SQLite database (WAL journal) under the server's data folder.

A job is written once when it is accepted and updated as it runs; the worker claims the oldest queued job in
one transaction, so no job runs twice at once. A job left `in_progress` by a killed server is queued again at
the next start (`requeue_interrupted`); a job is marked completed only after its outputs were published
(mlx_video.io.atomic), so none completes twice.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TERMINAL = ("completed", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    stage TEXT,
    step INTEGER,
    steps INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    eta REAL,
    error_code TEXT,
    error_message TEXT,
    video TEXT,
    sidecar TEXT,
    thumbnail TEXT,
    preview TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    event INTEGER NOT NULL DEFAULT 0,
    summary TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class JobRow:
    """One job as stored."""

    seq: int
    id: str
    api: str
    model: str
    prompt: str
    options: dict
    status: str
    created_at: float
    started_at: float | None
    completed_at: float | None
    stage: str | None
    step: int | None
    steps: int | None
    progress: int
    eta: float | None
    error_code: str | None
    error_message: str | None
    video: str | None
    sidecar: str | None
    thumbnail: str | None
    preview: str | None
    runs: int
    cancel_requested: int
    event: int
    summary: str | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> "JobRow":
        values = dict(row)
        values["options"] = json.loads(values["options"])
        return cls(**values)


class JobStore:
    """Thread-safe access to the jobs table (one connection, one lock: the server's traffic is small)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a committed job survives the server being killed (SIGKILL, a crash), which
        # is what the store promises; only a power cut can lose the last commits (https://sqlite.org/wal.html).
        # No commit syncs the disk (only a checkpoint does), so a progress write costs no fsync.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.readers = threading.local()
        self.reader_list: list[sqlite3.Connection] = []

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection. In WAL mode a reader never waits for a writer, so `get` takes
        neither the lock nor a write lock: a job's status is answered while the worker process, or a submission,
        writes (a write waits for another in SQLite's busy handler, with the lock held)."""
        conn = getattr(self.readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only=ON")
            self.readers.conn = conn
            with self.lock:
                self.reader_list.append(conn)
        return conn

    def close(self) -> None:
        with self.lock:
            self.db.close()
            for conn in self.reader_list:
                conn.close()

    def add(self, api: str, model: str, prompt: str, options: dict, max_queued: int | None = None) -> JobRow | None:
        """Queue a job; None when `max_queued` jobs are queued already (checked in the same lock)."""
        job_id = new_job_id()
        with self.lock:
            if max_queued is not None:
                queued = self.db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    return None
            self.db.execute(
                "INSERT INTO jobs (id, api, model, prompt, options, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, api, model, prompt, json.dumps(options), "queued", time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRow | None:
        row = self.reader().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()  # one short read
        return None if row is None else JobRow.of(row)

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc", query: str | None = None,
             status: str | None = None) -> tuple[list[JobRow], bool]:
        """A page of jobs, newest first (desc) or oldest first (asc), after the job `after`; and whether more
        follow. `query` keeps jobs whose prompt contains it (any case)."""
        direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
        where, args = [], []
        if after is not None:
            where.append(f"seq {compare} (SELECT seq FROM jobs WHERE id = ?)")
            args.append(after)
        if query:
            where.append("instr(lower(prompt), lower(?)) > 0")
            args.append(query)
        if status:
            where.append("status = ?")
            args.append(status)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY seq {direction} LIMIT ?"
        with self.lock:
            rows = self.db.execute(sql, (*args, limit + 1)).fetchall()
        return [JobRow.of(r) for r in rows[:limit]], len(rows) > limit

    def count(self, status: str) -> int:
        with self.lock:
            return self.db.execute("SELECT count(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def set_state(self, name: str, value) -> None:
        """A small JSON record shared between the server and its worker process (what runs, what is loaded)."""
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def state(self, name: str, default=None):
        with self.lock:
            row = self.db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def claim_next(self) -> JobRow | None:
        """The oldest queued job, marked in_progress in the same transaction."""
        with self.lock:
            if self.db.execute("SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1").fetchone() is None:
                return None  # the idle worker's frequent look takes no write lock
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    self.db.execute(
                        "UPDATE jobs SET status = 'in_progress', started_at = ?, runs = runs + 1, stage = 'starting', "
                        "event = event + 1 WHERE id = ?", (time.time(), row["id"]))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row["id"])

    def update(self, job_id: str, **fields) -> None:
        """Set fields of a job and count one more event (what the progress stream sends)."""
        if not fields:
            return
        unknown = set(fields) - set(JobRow.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        names = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {names}, event = event + 1 WHERE id = ?", (*fields.values(), job_id))

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one at once, a running one at its next step. Returns its status after."""
        with self.lock:
            self.db.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = ?, error_code = 'cancelled', "
                "error_message = 'cancelled before it started', event = event + 1 WHERE id = ? AND status = 'queued'",
                (time.time(), job_id))
            self.db.execute("UPDATE jobs SET cancel_requested = 1, event = event + 1 WHERE id = ? AND "
                            "status = 'in_progress'", (job_id,))
            row = self.db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row["status"]

    def cancel_requested(self, job_id: str) -> bool:
        with self.lock:
            row = self.db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def delete(self, job_id: str) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def requeue_interrupted(self) -> list[str]:
        """Jobs a killed server left in_progress go back to the queue (their chains resume from kept segments)."""
        with self.lock:
            ids = [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE status = 'in_progress'").fetchall()]
            self.db.execute("UPDATE jobs SET status = 'queued', stage = 'interrupted; queued again', "
                            "event = event + 1 WHERE status = 'in_progress'")
        return ids



def new_job_id() -> str:
    """`video_` and 24 hex digits, as OpenAI's ids look; random, so one cannot guess another's."""
    return "video_" + secrets.token_hex(12)
