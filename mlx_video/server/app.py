"""The HTTP side of `mlxvid serve` (FastAPI on uvicorn, as the S2V plan names): the app, its key check and body
limit; the routes are in routes.py, the shared state in state.py."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import MlxVideoError
from .routes import add_routes
from .state import ApiError, Server, ServerConfig, error_body

__all__ = ["ServerConfig", "create_app"]


def create_app(config: ServerConfig) -> FastAPI:
    from contextlib import asynccontextmanager

    server = Server(config)

    @asynccontextmanager
    async def lifespan(app):
        server.start_worker()
        yield
        server.stop_worker()

    app = FastAPI(title="mlxvid", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            authorize(request, config.api_key)
            limit_body(request, config.max_upload_bytes)
            return await call_next(request)
        except ApiError as e:
            return JSONResponse(error_body(e.message, e.code), status_code=e.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.code), status_code=e.status)

    @app.exception_handler(MlxVideoError)
    async def user_error(request: Request, e: MlxVideoError):
        return JSONResponse(error_body(str(e), "invalid_request"), status_code=400)

    add_routes(app, server)
    return app


def authorize(request: Request, key: str | None) -> None:
    """With a key, every route but /health needs it: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or the web
    page's `mlxvid_key` cookie; compared in constant time."""
    if key is None or request.url.path == "/health":
        return
    given = request.headers.get("x-api-key") or request.cookies.get("mlxvid_key") or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        if request.url.path in ("/", "/static/app.js", "/static/style.css"):
            return  # the page itself holds nothing; it asks for the key and sends it with every call
        raise ApiError(401, "this server needs an API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                       "unauthorized")


def limit_body(request: Request, limit: int) -> None:
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    length = request.headers.get("content-length")
    if length is None:
        if request.headers.get("transfer-encoding"):
            raise ApiError(411, "send a Content-Length (chunked uploads are not taken)", "length_required")
        return
    if not length.isdigit() or int(length) > limit:
        raise ApiError(413, f"the request is {length} bytes, more than the {limit} this server takes "
                       "(--max-upload-mb)", "request_too_large")
