"""The working folder `DST.part/` of a conversion: whose it is, what may be removed from it, the lock that keeps
two conversions out of one destination, and the free-space check before writing.

`DST.part/.conversion.json` (the stamp) records the conversion's settings and sources and every path it may
write. A later run with the same stamp resumes the folder; a run with another removes exactly the files the
old stamp lists, and refuses if anything else is there (files the user put in it) or if there is no stamp.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from mlx_video.errors import MlxVideoError

STAMP = ".conversion.json"


def _read_stamp(work: Path) -> dict | None:
    try:
        data = json.loads((work / STAMP).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _listed_files(work: Path, stamp: dict) -> list[Path] | None:
    """The files a stamp says its conversion may write, as paths inside `work`; None when it lists none."""
    files = stamp.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    out = []
    for f in files:
        parts = Path(f).parts
        if not parts or Path(f).is_absolute() or ".." in parts:
            return None
        out.append(work / f)
    return out


def _remove_listed(work: Path, listed: list[Path]) -> list[Path]:
    """Remove the listed regular files and then the folders they leave empty; return what is left in `work`."""
    for p in listed:
        if p.is_file() and not p.is_symlink():
            p.unlink()
    for folder in sorted({p.parent for p in listed if p.parent != work}, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return _files_in(work)


def _files_in(work: Path) -> list[Path]:
    """Everything in `work` but folders (empty folders are nobody's work)."""
    return sorted(p for p in work.rglob("*") if p.is_symlink() or not p.is_dir())


def prepare_part(work: Path, fingerprint: dict) -> bool:
    """Make `work` ready for this conversion. True when it holds an interrupted run of the same conversion (to
    resume); removes an earlier run's files only as its stamp lists them, and refuses to touch anything else."""
    if os.path.lexists(work) and (work.is_symlink() or not work.is_dir()):
        raise MlxVideoError(
            f"{work} exists and is not a folder of an interrupted conversion (it is a "
            f"{'symlink' if work.is_symlink() else 'file'}); move it away or choose another destination"
        )
    if not work.exists():
        work.mkdir(parents=True)
        return False
    stamp = _read_stamp(work)
    if stamp == fingerprint:
        return True
    listed = _listed_files(work, stamp) if stamp is not None else None
    if listed is None:
        if _files_in(work):
            raise MlxVideoError(
                f"{work} exists and holds files that no mlxvid conversion recorded (no valid {STAMP}); mlxvid removes "
                "only what it wrote: move the folder away or choose another destination"
            )
        return False
    (work / STAMP).unlink(missing_ok=True)
    left = _remove_listed(work, listed)
    if left:
        shown = ", ".join(str(p.relative_to(work)) for p in left[:3]) + (" ..." if len(left) > 3 else "")
        raise MlxVideoError(
            f"{work} holds an earlier conversion with other settings and files it did not write ({shown}); its own "
            "files were removed, the others kept: move them away and re-run"
        )
    return False


def check_free_space(work: Path, planned_bytes: int, files: list[str]) -> None:
    """Refuse before writing when the disk holding `work` lacks room for what is not written yet."""
    have = 0
    for f in files:
        p = work / f
        if not p.is_symlink() and p.is_file() and not f.endswith(".tmp"):
            have += p.stat().st_size
    needed = max(planned_bytes - have, 0)
    folder = work
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise MlxVideoError(
            f"not enough free space for the conversion: it writes {needed / 1e9:.2f} GB more into {work}, the disk "
            f"has {free / 1e9:.2f} GB free"
        )


@contextmanager
def destination_lock(dst: Path):
    """Hold `.DST.convert.lock` beside DST while converting; a second conversion to DST is refused at once."""
    lock = dst.with_name(f".{dst.name}.convert.lock")
    made = [p for p in reversed(dst.parents) if not p.exists()]  # made here for the lock; removed after if empty
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxVideoError(f"cannot make the folder {dst.parent} ({e.strerror or e})") from None
    try:
        with _held(lock, dst):
            yield
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def _held(lock: Path, dst: Path):
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MlxVideoError(f"cannot create {lock} ({e.strerror}): is {dst.parent} writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise MlxVideoError(
                f"another `mlxvid convert` is writing {dst} (it holds {lock}); wait for it to finish"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the lock file as we opened it: take the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
