"""What the routes of `mlxvid serve` share: its configuration, the job store and worker, the checks a request
goes through before it is queued, and the job object the APIs return. A refused request is an `ApiError`: a
4xx whose message is the CLI's for the same input."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MlxVideoError
from . import bodies as req
from .checker import Checker, CheckFailed
from .store import JobRow, JobStore
from .worker import remove_outputs, worker_main

OPENAI_STATUS = {"queued": "queued", "in_progress": "in_progress", "completed": "completed", "failed": "failed",
                 "cancelled": "failed"}


@dataclass
class ServerConfig:
    data: Path
    models: dict = field(default_factory=dict)  # served id -> converted folder
    api_key: str | None = None
    max_queue: int = 100
    keep_models: int = 1
    max_upload_bytes: int = 512 << 20
    allowed_origins: tuple = ()
    check_memory: bool = True
    worker_nice: int = 0  # the worker's and the check process's niceness, added (os.nice)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code}}


class Server:
    """What the routes share: the store, the worker, the configuration, the prepared-check cache."""

    def __init__(self, config: ServerConfig):
        self.config = config
        config.data.mkdir(parents=True, exist_ok=True)
        for sub in ("uploads", "videos", "loras"):
            (config.data / sub).mkdir(exist_ok=True)
        req.LORA_FOLDER[:] = [config.data / "loras"]
        self.store = JobStore(config.data / "jobs.sqlite3")
        self.store.requeue_interrupted()
        self.worker = None  # the worker process, started with the app (start_worker)
        self.checker = Checker(config.worker_nice)  # the submission check's process, started with the app (start_worker)

    # ---- submitting ----

    def submit(self, api: str, options: dict, uploads: list) -> JobRow:
        model = str(options.get("model") or "")
        if model not in self.config.models:
            served = ", ".join(self.config.models) or "none"
            raise ApiError(400, f"unknown model {model!r}; this server has: {served}", "model_not_found")
        self.check(options)
        job = self.store.add(api, model, str(options.get("prompt", "")), to_json(options), self.config.max_queue)
        if job is None:
            raise ApiError(429, f"the queue holds {self.config.max_queue} jobs already (--max-queue); try later",
                           "queue_full")
        renamed = {}
        for upload in uploads:  # the job owns its uploads from now on: <job id>-<stored name>
            target = upload.path.with_name(f"{job.id}-{upload.path.name}")
            upload.path.rename(target)
            renamed[str(upload.path)] = str(target)
        moved = {}
        for key, value in options.items():
            if isinstance(value, (str, Path)) and str(value) in renamed:
                moved[key] = renamed[str(value)]
            elif isinstance(value, (list, tuple)) and any(str(v) in renamed for v in value):  # a repeatable upload
                moved[key] = [renamed.get(str(v), str(v)) for v in value]
        if moved:
            self.store.update(job.id, options=json.dumps(to_json({**options, **moved})))
        return self.store.get(job.id)

    def again(self, job_id: str, new_seed: bool) -> JobRow:
        """A job's settings submitted again, its uploads copied (the new job owns its own), with a random seed
        when asked."""
        import secrets
        import shutil

        options, uploads = dict(self.job_or_404(job_id).options), []
        for name in set(req.UPLOADS.values()) & set(options):
            repeated = isinstance(options[name], (list, tuple))  # a repeatable upload: each file copied
            copies = []
            for value in options[name] if repeated else [options[name]]:
                source = Path(value)
                if source.parent == self.uploads and source.is_file():
                    copy = self.uploads / req.stored_name(source.suffix)
                    shutil.copyfile(source, copy)
                    uploads.append(req.Upload(name, source.name, copy))
                    source = copy
                copies.append(str(source))
            options[name] = copies if repeated else copies[0]
        if new_seed:
            options["seed"] = secrets.randbelow(2**32)
        try:
            return self.submit(self.store.get(job_id).api, options, uploads)
        except BaseException:
            for upload in uploads:
                upload.path.unlink(missing_ok=True)
            raise

    @property
    def uploads(self) -> Path:
        return self.config.data / "uploads"

    def check(self, options: dict) -> None:
        """Everything `mlxvid generate` checks before reading weights, the memory preflight included (413); in
        the check process (mlx_video.server.checker), so that the HTTP side stays responsive."""
        probe = dict(options, model=self.config.models[str(options["model"])],
                     output=str(self.config.data / "videos" / "check.mp4"), overwrite=True, quiet=True)
        try:
            self.checker.check(probe, self.config.check_memory)
        except MlxVideoError as e:
            memory = "needs about" in str(e) and "available" in str(e)
            raise ApiError(413 if memory else 400, str(e), "insufficient_memory" if memory else "invalid_request")
        except CheckFailed as e:
            raise ApiError(500, f"the request could not be checked: {e}", "internal_error") from None

    # ---- the worker process ----

    def start_worker(self) -> None:
        import multiprocessing
        import os

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no MLX state shared with this one
        self.worker = context.Process(target=worker_main, name="mlxvid-worker", daemon=True,
                                      args=(str(self.config.data), dict(self.config.models), self.config.keep_models,
                                            os.getpid(), self.config.worker_nice))
        self.worker.start()
        self.checker.start()

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.is_alive():
            self.worker.terminate()  # a running job stays in_progress and is queued again at the next start
            self.worker.join(10)
        self.checker.stop()

    def worker_state(self) -> dict:
        return self.store.state("worker", {}) if self.worker is not None and self.worker.is_alive() else {}

    # ---- models ----

    @property
    def default_model(self) -> str | None:
        """The model a request without one gets: the server's only model, if it has one."""
        return next(iter(self.config.models)) if len(self.config.models) == 1 else None

    def spec(self, model: str):
        from ..model_folder import resolve_model

        return resolve_model(str(self.config.models[model])).spec

    def model_object(self, model: str) -> dict:
        spec = self.spec(model)
        folder = Path(self.config.models[model])
        return {"id": model, "object": "model", "created": int(folder.stat().st_mtime), "owned_by": "mlxvid",
                "mlxvid": {"family": spec.family, "task": spec.task, "takes_image": spec.task != "t2v",
                           "needs_image": spec.task in ("i2v", "s2v"), "takes_audio": spec.task == "s2v",
                           "sizes": [f"{w}x{h}" for w, h in spec.sizes], "fps": spec.default("fps"),
                           "frames": spec.default("frames"), "steps": spec.default("steps"),
                           "description": spec.description}}

    def s2v_request(self, fields: dict) -> dict:
        """The S2V job API's form: its model is the server's first audio-driven model unless one is named."""
        fields = req.s2v_fields(fields)
        if "model" not in fields:
            audio = [m for m in self.config.models if self.spec(m).task == "s2v"]
            if not audio:
                raise ApiError(400, "this server has no audio-driven model for /generate-video", "model_not_found")
            fields["model"] = audio[0]
        return fields

    def at_resolution(self, options: dict, resolution: str) -> dict:
        """The S2V job API's `resolution` as a size: the portrait's aspect ratio within that many pixels (480p:
        480x832, 720p: 720x1280), each side rounded down to the model's size step."""
        from PIL import Image, UnidentifiedImageError

        if options.get("size") or not options.get("image") or str(options.get("model")) not in self.config.models:
            return options
        try:
            with Image.open(options["image"]) as image:
                w, h = image.size
        except (OSError, UnidentifiedImageError):
            return options  # the preflight names the unreadable image
        step, area = self.spec(str(options["model"])).size_multiple, req.RESOLUTIONS[resolution]
        width = max(step, int((area * w / h) ** 0.5) // step * step)
        height = max(step, int((area * h / w) ** 0.5) // step * step)
        return {**options, "size": f"{width}x{height}"}

    def estimated_seconds(self, job: JobRow) -> float | None:
        """A rough wait: the jobs ahead times the last completed job's run time (None before any finished)."""
        done, _ = self.store.list(limit=1, status="completed")
        if not done or not done[0].started_at or not done[0].completed_at:
            return None
        ahead = self.store.count("queued") + (1 if self.worker_state().get("running") else 0)
        return round(ahead * (done[0].completed_at - done[0].started_at), 1)

    # ---- views ----

    def video_object(self, job: JobRow) -> dict:
        settings = job.options
        seconds = settings.get("duration")
        return {
            "id": job.id, "object": "video", "model": job.model, "status": OPENAI_STATUS[job.status],
            "progress": int(job.progress), "created_at": int(job.created_at),
            "completed_at": int(job.completed_at) if job.completed_at and job.status == "completed" else None,
            "expires_at": None, "prompt": job.prompt, "seconds": str(seconds if seconds is not None else ""),
            "size": settings.get("size") or self.rendered_size(job), "remixed_from_video_id": None,
            "error": {"code": job.error_code, "message": job.error_message} if job.status in ("failed", "cancelled")
            else None,
            # extensions (as vllm-omni and oMLX add theirs): what the page and scripts need
            "mlxvid": {"status": job.status, "stage": job.stage, "step": job.step, "steps": job.steps,
                       "eta_seconds": job.eta, "options": settings, "api": job.api,
                       "video_url": f"/v1/videos/{job.id}/content" if job.status == "completed" else None,
                       "preview_url": f"/api/jobs/{job.id}/preview" if job.preview else None,
                       "sidecar_url": f"/api/jobs/{job.id}/sidecar" if job.sidecar else None},
        }

    def rendered_size(self, job: JobRow) -> str:
        record = self.sidecar(job)
        size = (record or {}).get("delivery_size") or (record or {}).get("render_size")
        return f"{size[0]}x{size[1]}" if size else ""

    def sidecar(self, job: JobRow) -> dict | None:
        if not job.sidecar:
            return None
        try:
            return json.loads(Path(job.sidecar).read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError, AttributeError):
            return None

    def job_or_404(self, job_id: str) -> JobRow:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, f"no video {job_id!r}", "not_found")
        return job

    def delete(self, job_id: str) -> None:
        job = self.job_or_404(job_id)
        self.store.request_cancel(job_id)
        self.store.delete(job_id)
        remove_outputs(self.config.data / "videos" / f"{job.id}.mp4")
        for upload in self.uploads.glob(f"{job.id}-*"):
            upload.unlink(missing_ok=True)


def to_json(options: dict) -> dict:
    from ..io.sidecar import to_jsonable

    return to_jsonable({k: v for k, v in options.items() if v is not None})
