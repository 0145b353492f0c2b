"""Start and stop `mlxvid serve` for the server tests (a real process on a free loopback port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`mlxvid serve` in a subprocess; `url` once /health answers."""

    def __init__(self, data: Path, models: list[Path], *extra: str, home: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-c", "from mlx_video.cli import main; main()", "serve", "--port", str(self.port),
                     "--data", str(data), *[a for m in models for a in ("--model", str(m))], *extra]
        self.env = {**os.environ, "MLXVID_HOME": str(home or data.parent / "home")}
        self.log = data.parent / f"serve-{self.port}.log"
        self.proc = None

    def start(self, timeout: float = 60) -> "ServeProcess":
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlxvid serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"mlxvid serve did not answer in {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(client: httpx.Client, job_id: str, done, timeout: float = 120, every: float = 0.05) -> dict:
    """Poll a job until `done(job)` holds; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/videos/{job_id}").json()
        if done(job):
            return job
        time.sleep(every)
    raise AssertionError(f"job {job_id} never reached the state asked for: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("completed", "failed")
