"""The routes of `mlxvid serve` (see mlx_video/server/app.py for the shared state and errors)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from . import bodies as req
from .state import ApiError, Server
from .store import TERMINAL, JobRow

WEB = Path(__file__).resolve().parent / "web"
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}

MAX_FORM_FIELDS = 200
MAX_FIELD_BYTES = 1 << 20


async def read_request(request: Request, server: Server) -> tuple[dict, list[req.Upload]]:
    """The fields (JSON values or form text; a repeated form field is a list) and uploaded files of a request."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        return req.json_fields(await request.body()), []
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "send multipart/form-data or application/json", "unsupported_media_type")
    try:
        form = await request.form(max_files=len(req.UPLOADS), max_fields=MAX_FORM_FIELDS,
                                  max_part_size=MAX_FIELD_BYTES)
    except Exception as e:  # the multipart parser's own errors: malformed bodies, too many parts
        raise ApiError(400, f"cannot read the form: {getattr(e, 'detail', e)}")
    fields, uploads = {}, []
    for key in form.keys():
        values = form.getlist(key)
        files = [v for v in values if hasattr(v, "filename") and not isinstance(v, str)]
        if files:
            for f in files:
                uploads.append(store_upload(server, key, f))
            continue
        fields[key] = values if len(values) > 1 or key in ("lora", "overlay", "segment_prompt") else values[0]
    return fields, uploads


def store_upload(server: Server, field: str, upload) -> req.Upload:
    suffix = req.check_upload(field, upload.filename)
    path = server.uploads / req.stored_name(suffix)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    return req.Upload(field, upload.filename or "", path)


def discard(uploads: list[req.Upload]) -> None:
    for upload in uploads:
        upload.path.unlink(missing_ok=True)


async def submit(request: Request, server: Server, api: str, convert=lambda f: f) -> JobRow:
    fields, uploads = await read_request(request, server)
    try:
        fields = convert(fields)
        resolution = fields.pop("resolution", None)
        options = req.from_fields(fields, uploads, server.default_model)
        if resolution is not None:
            options = server.at_resolution(options, resolution)
        return await asyncio.to_thread(server.submit, api, options, uploads)
    except BaseException:
        discard(uploads)
        raise


def add_routes(app: FastAPI, server: Server) -> None:
    add_openai_routes(app, server)
    add_s2v_routes(app, server)
    add_native_routes(app, server)


def add_openai_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/videos")
    async def create_video(request: Request):
        job = await submit(request, server, "openai")
        return JSONResponse(server.video_object(job), headers={"openai-poll-after-ms": "500"})

    @app.get("/v1/videos/{job_id}")
    async def retrieve_video(job_id: str):  # answered on the event loop: one short read, no thread hand-off
        return JSONResponse(server.video_object(server.job_or_404(job_id)), headers={"openai-poll-after-ms": "500"})

    @app.get("/v1/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc", q: str | None = None):
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc, not {order!r}")
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be from 1 to 100, got {limit}")
        jobs, more = server.store.list(after, limit, order, q)
        data = [server.video_object(j) for j in jobs]
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.delete("/v1/videos/{job_id}")
    def delete_video(job_id: str):
        server.delete(job_id)
        return {"id": job_id, "deleted": True, "object": "video.deleted"}

    @app.get("/v1/videos/{job_id}/content")
    def video_content(job_id: str, variant: str = "video"):
        job = server.job_or_404(job_id)
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"variant must be video or thumbnail, not {variant!r}")
        if job.status != "completed":
            raise ApiError(409, f"video {job_id} is {job.status}, not completed", "not_ready")
        path = job.video if variant == "video" else job.thumbnail
        if not path or not Path(path).is_file():
            raise ApiError(404, f"the {variant} of {job_id} is gone", "not_found")
        kind = "video/mp4" if variant == "video" else "image/webp"
        return FileResponse(path, media_type=kind, filename=f"{job_id}{Path(path).suffix}")

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [server.model_object(m) for m in server.config.models]}


def add_s2v_routes(app: FastAPI, server: Server) -> None:
    @app.post("/generate-video")
    async def generate_video(request: Request):
        job = await submit(request, server, "s2v", lambda f: server.s2v_request(f))
        return {"job_id": job.id, "status": "processing", "estimated_time": server.estimated_seconds(job)}

    @app.get("/status/{job_id}")
    def status(job_id: str):
        job = server.job_or_404(job_id)
        record = server.sidecar(job) or {}
        state = {"queued": "queued", "in_progress": "processing"}.get(job.status, job.status)
        body = {"job_id": job.id, "status": state, "progress": job.progress,
                "video_url": f"/v1/videos/{job.id}/content" if job.status == "completed" else None,
                "duration": record.get("duration_seconds"), "resolution": server.rendered_size(job) or None}
        if job.status in ("failed", "cancelled"):
            body["error"] = job.error_message
        return body


def add_native_routes(app: FastAPI, server: Server) -> None:
    add_page_routes(app, server)
    add_job_routes(app, server)


def add_page_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/api/system")
    def system():
        from ..pipelines.base import available_memory_bytes

        worker = server.worker_state()
        return {"available_memory_bytes": available_memory_bytes(), "loaded_models": worker.get("loaded", []),
                "queued": server.store.count("queued"), "running": worker.get("running"),
                "max_queue": server.config.max_queue}

    @app.get("/")
    def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in WEB_FILES:
            raise ApiError(404, f"no file {name!r}", "not_found")
        return FileResponse(WEB / name, media_type=WEB_FILES[name])


def add_job_routes(app: FastAPI, server: Server) -> None:
    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        server.job_or_404(job_id)
        status = server.store.request_cancel(job_id)
        return {"id": job_id, "status": status, "cancel_requested": True}

    @app.post("/api/jobs/{job_id}/again")
    async def again(job_id: str, request: Request):
        """The job's settings submitted again (its uploads copied), with a new random seed if asked."""
        body = req.json_fields(await request.body() or b"{}")
        job = await asyncio.to_thread(server.again, job_id, bool(body.get("new_seed")))
        return JSONResponse(server.video_object(job))

    @app.get("/api/jobs/{job_id}/preview")
    def preview(job_id: str):
        job = server.job_or_404(job_id)
        if not job.preview or not Path(job.preview).is_file():
            raise ApiError(404, f"no preview of {job_id} yet", "not_found")
        return Response(Path(job.preview).read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/jobs/{job_id}/sidecar")
    def sidecar(job_id: str):
        job = server.job_or_404(job_id)
        if not job.sidecar or not Path(job.sidecar).is_file():
            raise ApiError(404, f"no sidecar of {job_id}", "not_found")
        return FileResponse(job.sidecar, media_type="application/json")

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        server.job_or_404(job_id)
        last = request.headers.get("last-event-id", "")
        return StreamingResponse(event_stream(server, job_id, int(last) if last.isdigit() else -1, request),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def event_stream(server: Server, job_id: str, last: int, request: Request):
    """Server-Sent Events: one `progress` event per change of the job (its event counter is the id, so a client
    that reconnects with Last-Event-ID gets only what it missed), a comment every 15 s, the end after a final
    state."""
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        job = server.store.get(job_id)
        if job is None:
            yield "event: deleted\ndata: {}\n\n"
            return
        if job.event > last:
            last, quiet_since = job.event, time.monotonic()
            yield f"id: {job.event}\nevent: progress\ndata: {json.dumps(server.video_object(job))}\n\n"
            if job.status in TERMINAL:
                return
        elif job.status in TERMINAL:  # a client that saw the final state reconnects: nothing more will come
            return
        elif time.monotonic() - quiet_since > 15:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.25)
