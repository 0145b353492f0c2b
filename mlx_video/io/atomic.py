"""Write files and folders so that a reader never sees a half-written result, and nothing is replaced unasked.

Every result is written under a hidden temporary name beside it, `.NAME.mlxvid-HOST-PID-XXXXXXXX.part[.SUFFIX]`,
then published:

- without `overwrite`, with a no-replace rename (`renameat2(RENAME_NOREPLACE)` on Linux, `renamex_np(RENAME_EXCL)`
  on macOS, else a hard link for files), so that of two runs writing the same output, the second fails instead of
  replacing the first's result;
- inside `publishing()`, the results made in the block (a video and its sidecar) are published together at its
  end, under a lock on their folders: all of them or none, the sidecar before the video, so that a video on disk
  always has its own sidecar beside it;
- with the permissions any file the user makes has (0666 / 0777 less the umask), not the temporary file's 0600.

A temporary file of a process that is gone (killed) is removed by the next write to that folder: its name records
the host and the process id.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from ..errors import MlxVideoError

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(r"^\..+\.mlxvid-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[a-z0-9_]{8}\.(part|old)(\.[^.]+)?$")


class OutputExists(MlxVideoError):
    """An output that appeared while this run was writing it (another run, or the user)."""


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked to; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MlxVideoError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def temp_prefix(path: Path) -> str:
    """The start of a temporary name of ours for `path` (the process id recorded in it)."""
    return f".{path.name}.mlxvid-{_HOST}-{os.getpid()}-"


def _process_started_after(pid: int, when: float) -> bool:
    """Whether process `pid` started after the time `when` (Linux's /proc; False where that cannot be told)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") > when + 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def is_stale(entry: Path) -> bool:
    """Whether `entry` is a temporary file or folder of ours whose process is gone (or is a newer one that
    reuses its process id)."""
    match = _TEMP_NAME.match(entry.name)
    if match is None or match["host"] != _HOST:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process runs under that id
        pass
    try:
        return _process_started_after(pid, entry.lstat().st_mtime)
    except OSError:
        return False


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary files of ours in `folder` left by processes that are gone; returns them."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and ".mlxvid-" in e.name]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if not is_stale(path):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, folder: bool) -> None:
    """Give a result the permissions the user's new files get (the umask), not mkstemp's 0600."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _rename_noreplace(src: Path, dst: Path, folder: bool) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists, even when it appears meanwhile."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            result = libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1)  # AT_FDCWD, RENAME_NOREPLACE
        elif sys.platform == "darwin":
            result = libc.renamex_np(os.fsencode(src), os.fsencode(dst), 0x4)  # RENAME_EXCL
        else:
            raise AttributeError
    except (AttributeError, OSError):
        result, code = -1, errno.ENOSYS
    else:
        code = ctypes.get_errno() if result != 0 else 0
    if result == 0:
        return
    if code == errno.EEXIST or (code == errno.ENOTEMPTY and folder):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        raise OSError(code, os.strerror(code), str(dst))
    if not folder:  # the file system has no such rename: a hard link never replaces either
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:
            pass
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):  # last resort (our folder lock is held): check, then rename
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _replace(src: Path, dst: Path, folder: bool) -> None:
    if folder and dst.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(dst), suffix=".old", dir=dst.parent)) / dst.name
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old.parent)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def _folder_locks(folders):
    """Exclusive locks on folders (flock on the folder itself, so no lock file is left), in a fixed order."""
    handles = []
    try:
        for folder in sorted({str(Path(f).resolve()) for f in folders}):
            fd = os.open(folder, os.O_RDONLY)
            handles.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: the no-replace rename still holds
                pass
        yield
    finally:
        for fd in handles:
            os.close(fd)


def publish(entries) -> None:
    """Publish (temporary, final, overwrite, is_folder) entries as one unit: each final that exists is refused
    before anything moves unless its entry says overwrite; sidecars (.json) go first, so that a result is never
    on disk without its record. If one cannot be placed, the ones placed are taken back."""
    entries = sorted(entries, key=lambda e: e[1].suffix.lower() != ".json")
    with _folder_locks(e[1].parent for e in entries):
        for _, final, overwrite, _ in entries:
            if not overwrite and os.path.lexists(final):
                raise OutputExists(f"{final} appeared while this run was writing it (another run writing the same "
                                   "output?); it was left as it is")
        placed = []
        try:
            for tmp, final, overwrite, folder in entries:
                if overwrite:
                    _replace(tmp, final, folder)
                else:
                    try:
                        _rename_noreplace(tmp, final, folder)
                    except FileExistsError:
                        raise OutputExists(f"{final} appeared while this run was writing it (another run writing "
                                           "the same output?); it was left as it is") from None
                    placed.append((final, folder))
        except BaseException:
            for final, folder in placed:  # new names of ours: nobody else's result is touched
                shutil.rmtree(final) if folder else final.unlink()
            raise


class _Unit:
    def __init__(self):
        self.entries = []

    def add(self, tmp: Path, final: Path, overwrite: bool, folder: bool) -> None:
        for entry in [e for e in self.entries if e[1] == final]:  # written again: the newer one counts
            self.entries.remove(entry)
            _remove(entry[0], entry[3])
        self.entries.append((tmp, final, overwrite, folder))

    def pending(self, final: Path) -> Path | None:
        return next((tmp for tmp, f, _, _ in self.entries if f == final), None)


_UNIT: contextvars.ContextVar[_Unit | None] = contextvars.ContextVar("mlxvid_publishing_unit", default=None)


def _remove(path: Path, folder: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path) if folder else path.unlink()


@contextlib.contextmanager
def publishing():
    """Publish every `atomic_file` / `atomic_dir` result made in the block together, at its end (see `publish`);
    on an error or an interruption, none of them. Nested blocks belong to the outermost one."""
    if _UNIT.get() is not None:
        yield
        return
    unit = _Unit()
    token = _UNIT.set(unit)
    try:
        yield
        publish(unit.entries)
    finally:
        _UNIT.reset(token)
        for tmp, _, _, folder in unit.entries:
            _remove(tmp, folder)


@contextlib.contextmanager
def detached():
    """Inside a `publishing()` block, publish what is written in this block at once (a scratch file that the
    result is made from, e.g. a silent video the audio is muxed into)."""
    token = _UNIT.set(None)
    try:
        yield
    finally:
        _UNIT.reset(token)


def pending(path: str | os.PathLike) -> Path:
    """Where the result for `path` is now: its temporary file while the `publishing()` block runs, else `path`."""
    unit = _UNIT.get()
    found = unit.pending(Path(path)) if unit is not None else None
    return found if found is not None else Path(path)


def _hand_over(tmp: Path, path: Path, overwrite: bool, folder: bool, now: bool = False) -> None:
    _normal_mode(tmp, folder)
    unit = _UNIT.get()
    if unit is not None and not now:
        unit.add(tmp, path, overwrite, folder)
    else:
        publish([(tmp, path, overwrite, folder)])


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, suffix: str | None = None, now: bool = False):
    """Yield a temporary path beside `path`; on success it is published as `path` (see the module docstring),
    on error removed.

    `suffix` defaults to the final file's suffix, so libraries that pick a format from the extension
    (PyAV, numpy) still see the right one. `now`: published at once even inside a `publishing()` block (a file
    that is no part of the result, e.g. a checkpoint a resumed run reads).
    """
    path = check_writable(path, overwrite)
    remove_stale(path.parent)
    suffix = path.suffix if suffix is None else suffix
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _hand_over(tmp, path, overwrite, folder=False, now=now)
    except BaseException:
        _remove(tmp, False)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it is published as `path` (replacing it only with
    `overwrite`), on error removed."""
    path = check_writable(path, overwrite)
    remove_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".part", dir=path.parent))
    try:
        yield tmp
        _hand_over(tmp, path, overwrite, folder=True)
    except BaseException:
        _remove(tmp, True)
        raise
