"""Checks a command makes on where it will write, before any long work starts."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MlxVideoError


def check_destination(path: str | os.PathLike, what: str = "the output") -> None:
    """`path` can be created: its nearest existing folder is a folder we may write into (folders missing
    below it are made later). Refuses with a message naming the folder otherwise."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MlxVideoError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MlxVideoError(f"cannot write {what} {path}: the folder {parent} is not writable")
