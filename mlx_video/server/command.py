"""`mlxvid serve`: the command that starts the server (uvicorn over mlx_video.server.app)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import click

from ..errors import MlxVideoError


def served_models(folders: tuple[str, ...]) -> dict:
    """id -> converted folder: every registry model converted in the models home, plus each --model folder
    (under its registry id, or its folder name when that id is taken or it has none)."""
    from ..registry import MODELS, models_home

    models = {}
    for model_id in MODELS:
        if (models_home() / model_id / "mlxvid.json").is_file():
            models[model_id] = str(models_home() / model_id)
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not (path / "mlxvid.json").is_file():
            raise MlxVideoError(f"--model {folder}: not a converted model folder (no mlxvid.json); convert it with "
                                "mlxvid convert")
        name = path.name if path.name not in models else f"{path.parent.name}-{path.name}"
        models[name] = str(path)
    return models


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key and api_key_file:
        raise MlxVideoError("give --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise MlxVideoError(f"cannot read --api-key-file {api_key_file}: {e.strerror or e}") from None
    api_key = api_key or os.environ.get("MLXVID_API_KEY") or None
    if api_key is not None and len(api_key) < 16:
        raise MlxVideoError("the API key must be at least 16 characters (e.g. `openssl rand -hex 16`)")
    return api_key


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs an API key.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--api-key", help="Require this key (Authorization: Bearer KEY or X-API-Key) on every route but "
              "/health. Also read from $MLXVID_API_KEY.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="Read the key from this file.")
@click.option("--data", type=click.Path(file_okay=False), help="Job store, uploads and videos [default: "
              "$MLXVID_HOME/serve].")
@click.option("--model", "folders", multiple=True, type=click.Path(file_okay=False),
              help="Also serve this converted folder (repeatable). Converted registry models in the models home are "
              "served anyway.")
@click.option("--max-queue", default=100, show_default=True, type=click.IntRange(1), help="Queued jobs at most; "
              "more are refused with 429.")
@click.option("--keep-models", default=1, show_default=True, type=click.IntRange(0),
              help="Models kept loaded between jobs (least recently used evicted first).")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(1), help="Largest request.")
@click.option("--allowed-origins", help="Comma-separated origins allowed by CORS (none by default).")
@click.option("--worker-nice", default=0, show_default=True, type=click.IntRange(0, 19),
              help="Run the generation worker and the submission checks at this lower CPU priority (os.nice): the "
              "API answers faster while a job runs on a busy machine, and jobs take longer when other programs "
              "compete for the CPU.")
def serve_command(host, port, api_key, api_key_file, data, folders, max_queue, keep_models, max_upload_mb,
                  allowed_origins, worker_nice):
    """Serve a local video studio: the OpenAI Videos API (/v1/videos), the S2V job API (/generate-video), live
    progress and a web page at http://HOST:PORT/. Jobs are kept in a SQLite store and survive a restart.

    \b
      mlxvid serve                                  # http://127.0.0.1:8080/
      mlxvid serve --host 0.0.0.0 --api-key-file ~/.mlxvid-key   # on the LAN, with a key
    """
    import uvicorn

    from ..registry import models_home
    from .app import ServerConfig, create_app

    key = read_key(api_key, api_key_file)
    if not is_loopback(host) and key is None:
        raise MlxVideoError(f"--host {host} is reachable from other machines: give --api-key or --api-key-file "
                            "(or serve on 127.0.0.1)")
    models = served_models(folders)
    if not models:
        raise MlxVideoError(f"no converted model to serve in {models_home()}; convert one (mlxvid download ...) or "
                            "pass --model FOLDER")
    folder = Path(data).expanduser() if data else models_home().parent / "serve"
    origins = tuple(o.strip() for o in (allowed_origins or "").split(",") if o.strip())
    config = ServerConfig(folder, models, key, max_queue, keep_models, max_upload_mb << 20, origins,
                          worker_nice=worker_nice)
    app = create_app(config)
    click.echo(f"serving {', '.join(models)} at http://{host}:{port}/ (data in {folder})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
