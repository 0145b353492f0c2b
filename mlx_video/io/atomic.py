"""Write files and folders so that a reader never sees a half-written result."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import MlxVideoError


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked to; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MlxVideoError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = None):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed.

    `suffix` defaults to the final file's suffix, so libraries that pick a format from the extension
    (PyAV, numpy) still see the right one.
    """
    path = check_writable(path, overwrite)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = check_writable(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)) / path.name
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old.parent)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
