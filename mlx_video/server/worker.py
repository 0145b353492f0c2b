"""The worker: one process that runs the queued jobs in order through `mlx_video.run.prepare` / `execute`, the
code `mlxvid generate` and `mlxvid batch` run. It reports progress into the job store at every denoising step,
stops a job at its next step when it is cancelled, and keeps the most recently used models loaded.

It is a process of its own, not a thread of the server, so that building a step's graph (Python, holding the
GIL) never delays the HTTP side's answers. It talks to the server only through the job store. It stops when
the server that started it is gone (checked between jobs and at every step), and a lock file makes sure that
one worker at a time runs a data folder's jobs, also right after a killed server is started again.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import OrderedDict
from pathlib import Path

from ..errors import MlxVideoError
from .store import JobRow, JobStore

log = logging.getLogger("mlxvid.serve")


class ServerGone(Exception):
    """The server process that started the worker has exited: the job stops where it is and stays in_progress,
    to be queued again when a server starts on the folder."""


class JobCancelled(Exception):
    """Raised by the progress hook at the step after a cancel request (not an MlxVideoError: nothing may catch it
    as a user error)."""


class ModelCache(OrderedDict):
    """Loaded pipelines by model, the most recently used last; holds at most `keep` of them (a dict that
    `run.prepare(pipelines=...)` fills)."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = max(0, keep)

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def evict(self, keep: int | None = None) -> None:
        from ..pipelines.base import release

        limit = self.keep if keep is None else keep
        evicted = False
        while len(self) > limit:
            self.popitem(last=False)
            evicted = True
        if evicted:
            release()


IDLE_POLL = 0.25  # seconds between looks at the queue when it is empty
REPORT_EVERY = 0.2  # seconds between progress writes (a real step takes seconds; a tiny test model's, less)


class ProgressReporter:
    """A step hook: stage, step, progress (0-90 while denoising; decoding and writing take the rest), ETA, and the
    cancel check (one store read per step: the loop already syncs once per step). `stages`: (name, steps) of each
    denoising stage of the job in order (the run's, then a super-resolution stage's); the run tells the hook when a
    later one begins (`begin_stage`), so a stage read back rather than run is counted as done."""

    def __init__(self, store: JobStore, job_id: str, stages: list[tuple[str, int]], preview: Path | None,
                 alive=lambda: True):
        self.store, self.job_id, self.stages, self.alive = store, job_id, stages, alive
        self.total, self.stage = max(1, sum(steps for _, steps in stages)), stages[0][0]
        self.preview, self.calls, self.ran, self.start, self.reported = preview, 0, 0, time.monotonic(), 0.0

    def begin_stage(self, name: str) -> None:
        """The stage `name` starts: the steps of the stages before it are done."""
        names = [n for n, _ in self.stages]
        self.calls = sum(steps for _, steps in self.stages[: names.index(name)]) if name in names else self.calls
        self.stage = name

    def __call__(self, i, t, latents):
        if not self.alive():
            raise ServerGone
        if self.store.cancel_requested(self.job_id):
            raise JobCancelled
        self.calls, self.ran = self.calls + 1, self.ran + 1
        done = min(self.calls, self.total)
        eta = (time.monotonic() - self.start) / self.ran * (self.total - done)
        last = done >= self.total
        now = time.monotonic()
        if not last and now - self.reported < REPORT_EVERY:
            return None
        self.reported = now
        self.store.update(self.job_id, stage="decoding" if last else self.stage, step=done, steps=self.total,
                          progress=min(90, int(90 * done / self.total)), eta=eta,
                          preview=str(self.preview) if self.preview is not None and self.preview.exists() else None)
        return None


def stage_steps(job) -> list[tuple[str, int]]:
    """(stage, denoising steps) of a prepared job: the run's (a chain's segments and an audio-driven model's clips
    each run them), then its super-resolution stage's, if any (`upscale_steps`)."""
    base = getattr(job, "base", job)
    steps = int(base.settings.steps)
    segments = len(getattr(job, "segments", ()) or ()) or 1
    clip_count = getattr(base.pipe, "clip_count", None)
    clips = clip_count(base.settings) if callable(clip_count) and getattr(base.pipe, "takes_audio", False) else 1
    upscale = int(getattr(job, "upscale_steps", 0))
    return [("denoising", steps * segments * clips)] + ([("upscaling", upscale)] if upscale else [])


class Worker:
    """Runs the store's queued jobs one after the other while the server process `server_pid` lives."""

    def __init__(self, store: JobStore, data: Path, models: dict, keep_models: int = 1, server_pid: int | None = None):
        self.store, self.data, self.models = store, Path(data), models
        self.pipelines = ModelCache(keep_models)
        self.server_pid = server_pid
        self.current: str | None = None

    def alive(self) -> bool:
        """Whether the server that started this worker still runs (a killed server's worker is re-parented)."""
        return self.server_pid is None or os.getppid() == self.server_pid

    def run(self) -> None:
        while self.alive():
            row = self.store.claim_next()
            if row is None:
                time.sleep(IDLE_POLL)
                continue
            self.current = row.id
            self.report_state()
            try:
                self.run_job(row)
            except ServerGone:
                return
            finally:
                self.current = None
                self.report_state()

    def report_state(self) -> None:
        names = {str(folder): model for model, folder in self.models.items()}
        self.store.set_state("worker", {"running": self.current, "pid": os.getpid(),
                                        "loaded": [names.get(str(f), Path(f).name) for f in self.pipelines]})

    def outputs(self, job_id: str) -> tuple[Path, Path]:
        video = self.data / "videos" / f"{job_id}.mp4"
        return video, video.with_suffix(".json")

    def run_job(self, row: JobRow) -> None:
        from ..run import execute, prepare

        video, sidecar = self.outputs(row.id)
        if video.is_file() and sidecar.is_file():  # published before a kill, not yet marked: done, not re-run
            self.finish(row.id, video, sidecar)
            return
        options = dict(row.options, model=self.models.get(row.model, row.model), output=str(video), overwrite=True,
                       quiet=True, preview_every=1)
        try:
            job = prepare(options, pipelines=self.pipelines)
            self.pipelines.evict()
            stages = stage_steps(job)
            self.store.update(row.id, stage="denoising", step=0, steps=sum(n for _, n in stages), progress=0)
            from ..preview import preview_path

            reporter = ProgressReporter(self.store, row.id, stages, preview_path(video), self.alive)
            execute(job, echo=lambda *a, **k: None, hooks=[reporter])
        except JobCancelled:
            self.store.update(row.id, status="cancelled", completed_at=time.time(), stage="cancelled",
                              error_code="cancelled", error_message="cancelled while it ran")
            self.pipelines.evict(0)  # free the memory the run held
            return
        except MlxVideoError as e:
            self.fail(row.id, "invalid_request" if self.store.get(row.id).step is None else "generation_failed", str(e))
            return
        except ServerGone:
            raise
        except Exception as e:  # the server stays up; the job says what broke, the log has the traceback
            log.error("job %s failed:\n%s", row.id, traceback.format_exc())
            self.fail(row.id, "internal_error", f"{type(e).__name__}: {e}")
            return
        self.finish(row.id, video, sidecar)

    def fail(self, job_id: str, code: str, message: str) -> None:
        self.store.update(job_id, status="failed", completed_at=time.time(), stage="failed", error_code=code,
                          error_message=message)

    def finish(self, job_id: str, video: Path, sidecar: Path) -> None:
        thumbnail = write_thumbnail(video)
        self.store.update(job_id, status="completed", completed_at=time.time(), stage="completed", progress=100,
                          eta=0.0, video=str(video), sidecar=str(sidecar) if sidecar.is_file() else None,
                          thumbnail=str(thumbnail) if thumbnail else None)
        if self.store.get(job_id) is None:  # deleted while it ran
            remove_outputs(video)


def write_thumbnail(video: Path) -> Path | None:
    """The video's first frame as a WebP image beside it (what the content route's `thumbnail` variant sends)."""
    import av
    from PIL import Image

    target = video.with_suffix(".webp")
    try:
        with av.open(str(video)) as container:
            frame = next(container.decode(container.streams.video[0])).to_ndarray(format="rgb24")
        part = target.with_name("." + target.name + ".part")
        Image.fromarray(frame).save(part, format="WEBP", quality=85)
        part.replace(target)
        return target
    except (OSError, StopIteration, av.FFmpegError, KeyError, ValueError):
        return None


def remove_outputs(video: Path) -> None:
    from ..preview import preview_path

    for path in (video, video.with_suffix(".json"), video.with_suffix(".webp"), preview_path(video)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def worker_main(data: str, models: dict, keep_models: int, server_pid: int, nice: int = 0) -> None:
    """The worker process's entry (multiprocessing, spawn): wait for the folder's worker lock (a killed server's
    worker may still be finishing a step), then run jobs until the server is gone. `nice`: added to the process's
    niceness (`mlxvid serve --worker-nice`)."""
    import fcntl

    data_path = Path(data)
    if nice:
        os.nice(nice)
    with open(data_path / "worker.lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if os.getppid() != server_pid:
                    return
                time.sleep(IDLE_POLL)
        store = JobStore(data_path / "jobs.sqlite3")
        Worker(store, data_path, models, keep_models, server_pid).run()
