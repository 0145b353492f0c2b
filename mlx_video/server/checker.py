"""The submission check (`mlx_video.run.prepare`: every option, the model's capabilities and the memory preflight,
before any weights are read) in a process of its own.

A check is 10-20 ms of Python. Run in the HTTP process, a burst of submissions kept the GIL busy, and every
other request waited its turn for it: `GET /v1/videos/{id}` went from a median of 2 ms to 39 ms and a 99th
percentile of 0.3-0.6 s in a burst of 100 submissions on two cores (benchmarks/RESULTS.md, "`mlxvid serve` under
load"). Here the HTTP process only sends the options and waits on a pipe (no GIL held), so its other requests go
on being answered. One check runs at a time; the process stops when the server that started it is gone.
"""

from __future__ import annotations

import os
import threading

from ..errors import MlxVideoError

PARENT_POLL = 1.0  # seconds between looks at whether the server still runs, while no check comes
READY_TIMEOUT = 120.0  # seconds the first check waits for the check process to have imported what it runs


class CheckFailed(Exception):
    """A check that broke for a reason other than the request (the check process died, or a bug): HTTP 500."""


class Checker:
    """The check process and the pipe to it; `check` is called from any thread, one check at a time."""

    def __init__(self, nice: int = 0):
        self.nice = nice  # added to the process's niceness (`mlxvid serve --worker-nice`)
        self.lock = threading.Lock()
        self.process = None
        self.conn = None
        self.ready = False  # the process has said it imported the engine

    def start(self) -> None:
        """Start the process; it imports the engine (a few seconds) while the server starts and answers."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no MLX state shared with this one
        self.conn, child = context.Pipe()
        self.process = context.Process(target=checker_main, name="mlxvid-checker", daemon=True,
                                       args=(child, os.getpid(), self.nice))
        self.process.start()
        child.close()
        self.ready = False

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.process = None

    def check(self, options: dict, check_memory: bool) -> None:
        """Raise MlxVideoError with the CLI's message where `mlxvid generate` would refuse `options`."""
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self.start()
            try:
                if not self.ready:
                    if not self.conn.poll(READY_TIMEOUT):
                        raise OSError(f"not ready after {READY_TIMEOUT:.0f} s")
                    self.ready = self.conn.recv() == "ready"
                self.conn.send((options, check_memory))
                outcome = self.conn.recv()
            except (EOFError, OSError) as e:  # the process died (or never started): a new one takes the next
                self.stop()
                raise CheckFailed(f"the check process stopped ({type(e).__name__}: {e})") from None
        if outcome is None:
            return
        kind, message = outcome
        if kind == "refused":
            raise MlxVideoError(message)
        raise CheckFailed(message)


def check_options(options: dict, check_memory: bool, pipelines: dict) -> tuple[str, str] | None:
    """None where `prepare` takes the options; ("refused", the CLI's message) or ("error", what broke)."""
    from ..run import prepare

    try:
        prepare(options, pipelines=pipelines, check_memory=check_memory)
    except MlxVideoError as e:
        return "refused", str(e)
    except Exception as e:  # a bug, not the request: the server answers 500 and stays up
        return "error", f"{type(e).__name__}: {e}"
    return None


def checker_main(conn, server_pid: int, nice: int = 0) -> None:
    """The check process's entry (multiprocessing, spawn): answer checks until the server is gone."""
    pipelines: dict = {}  # the prepared models' pipelines (no weights), kept between checks
    if nice:
        os.nice(nice)
    from ..run import prepare  # noqa: F401  (what every check runs, imported before the server answers)

    conn.send("ready")
    while os.getppid() == server_pid:
        if not conn.poll(PARENT_POLL):
            continue
        try:
            options, check_memory = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(check_options(options, check_memory, pipelines))
