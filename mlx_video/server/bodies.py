"""Request bodies as generate's options.

Every route's fields end up as a dict of `mlx_video.options` names, checked by the same `validate` as the
command line and batch manifests, so a bad value gets the CLI's words. The OpenAI Videos API's own fields are
mapped (`seconds` -> duration, `input_reference` -> image); our extensions are flat fields named as generate's
options (`negative_prompt`, `frames`, `steps`, `seed`, ...). Nothing a client sends becomes a path: files come
only as uploads, stored under names the server chooses, and options that name files on the server
(outputs, latents, sidecars, fonts) are refused.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import MlxVideoError
from ..options import OPTIONS, validate

# Options a client may not set: they name files or folders of the server, or the server's own limits.
SERVER_ONLY = frozenset({"output", "save_latents", "init_latents", "from_sidecar", "overwrite", "quiet",
                         "preview_every", "max_memory", "font", "rife_weights", "upscale_model"})
# Upload fields -> the option they fill, and the file kinds each takes.
UPLOADS = {"input_reference": "image", "image": "image", "audio": "audio", "pose_video": "pose_video",
           "watermark_image": "watermark", "last_image": "last_image", "video": "video",
           "control_video": "control_video", "mask": "mask", "mask_video": "mask_video",
           "reference_image": "reference_image",
           "face_video": "face_video", "background_video": "background_video"}
UPLOAD_SUFFIXES = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "audio": (".wav", ".mp3", ".m4a", ".flac", ".ogg", ".aac"),
    "pose_video": (".mp4", ".mov", ".webm", ".mkv"),
    "watermark": (".png", ".jpg", ".jpeg", ".webp"),
    "last_image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "video": (".mp4", ".mov", ".webm", ".mkv"),
    "control_video": (".mp4", ".mov", ".webm", ".mkv"),
    "mask_video": (".mp4", ".mov", ".webm", ".mkv"),
    "mask": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"),
    "reference_image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "face_video": (".mp4", ".mov", ".webm", ".mkv"),
    "background_video": (".mp4", ".mov", ".webm", ".mkv"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OPENAI_FIELDS = {"seconds": "duration"}
S2V_EXTRAS = ("prompt", "model", "seed", "steps", "guidance", "negative_prompt", "frames", "size")  # generate's names
RESOLUTIONS = {"480p": 480 * 832, "720p": 720 * 1280}  # the S2V job API's names -> a max area (official sizes)


@dataclass
class Upload:
    """A file a client sent: its field, the name it gave (shown, never used as a path) and its bytes on disk."""

    field: str
    filename: str
    path: Path


def flag_value(name: str, value):
    """A form field's text as a flag: true/false/1/0/yes/no/on/off."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
    return value


def from_fields(fields: dict, uploads: list[Upload], default_model: str | None) -> dict:
    """Generate's options from a request's fields (JSON values, or form text) and its uploaded files."""
    options = {}
    for key, value in fields.items():
        name = OPENAI_FIELDS.get(key, key)
        if name in SERVER_ONLY:
            raise MlxVideoError(f"{key} is set by the server, not by a request")
        option = OPTIONS.get(name)
        if option is not None and option.kind == "path":
            raise MlxVideoError(f"{key} takes an uploaded file (multipart/form-data), not a path")
        if option is not None and option.kind == "flag":
            value = flag_value(name, value)
        if name == "watermark" and str(value).lower().endswith(IMAGE_SUFFIXES):
            raise MlxVideoError("watermark: send an image watermark as the file field watermark_image")
        if name == "lora":
            value = [lora_in_folder(v) for v in (value if isinstance(value, list) else [value])]
        options[name] = value
    for upload in uploads:
        name = UPLOADS[upload.field]
        if OPTIONS[name].multiple:  # a repeatable option: one upload per value (several reference images)
            options[name] = [*options.get(name, []), str(upload.path)]
        else:
            options[name] = str(upload.path)
    if "model" not in options and default_model is not None:
        options["model"] = default_model
    return validate(options)


LORA_FOLDER: list[Path] = []  # set by the app: the server's loras/ folder


def lora_in_folder(value) -> str:
    """`NAME[:SCALE]` naming a LoRA file in the server's loras/ folder (a bare file name, never a path)."""
    text = str(value)
    name, _, scale = text.partition(":")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise MlxVideoError(f"lora {text!r}: name a file of the server's loras/ folder, e.g. style.safetensors:0.8")
    path = (LORA_FOLDER[0] if LORA_FOLDER else Path("loras")) / name
    if not path.is_file():
        raise MlxVideoError(f"lora {name}: no such LoRA in the server's loras/ folder")
    return f"{path}:{scale}" if scale else str(path)


def check_upload(field: str, filename: str) -> str:
    """The suffix to store an upload under (from the client's file name, checked), or an error."""
    if field not in UPLOADS:
        raise MlxVideoError(f"unexpected file field {field!r}; files go in {', '.join(UPLOADS)}")
    suffix = Path(filename or "").suffix.lower()
    allowed = UPLOAD_SUFFIXES[UPLOADS[field]]
    if suffix not in allowed:
        raise MlxVideoError(f"{field}: {filename!r} is not one of {', '.join(allowed)}")
    return suffix


def stored_name(suffix: str) -> str:
    return secrets.token_hex(16) + suffix


def json_fields(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise MlxVideoError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise MlxVideoError("the request body is a JSON object of option names")
    return fields


def s2v_fields(fields: dict) -> dict:
    """The S2V job API's form (image, audio, prompt, resolution, num_clips) as generate's fields."""
    out = {}
    for key, value in fields.items():
        if key == "resolution":
            if value not in RESOLUTIONS:
                raise MlxVideoError(f"resolution must be one of {', '.join(RESOLUTIONS)}, not {value!r}")
            out["resolution"] = value
        elif key == "num_clips":
            out["clips"] = value
        elif key in S2V_EXTRAS:
            out[key] = value
        else:
            raise MlxVideoError(f"unknown field {key!r}; /generate-video takes image, audio, prompt, resolution, "
                                f"num_clips (and {', '.join(S2V_EXTRAS[1:])})")
    return out
