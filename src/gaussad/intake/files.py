"""Files in and out: opening input files safely (regular files only, one clear error for every way that can fail)
and writing outputs atomically (model files, the engine cache, CLI outputs)."""

from __future__ import annotations

import errno
import glob
import os
import secrets
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from ..errors import GaussadError

_ERRNO_REASONS = {
    errno.ENOENT: "no such file",
    errno.ENOTDIR: "no such file (a part of the path is not a folder)",
    errno.ELOOP: "symbolic link loop",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
}


def open_regular_file(path: str | os.PathLike, error: type[GaussadError], kind: str) -> BinaryIO:
    """Open a regular, non-empty file for binary reading, or raise ``error`` naming the file and the problem.

    ``kind`` completes "is a folder, not {kind}". O_NONBLOCK keeps a named pipe from blocking the open; it
    has no effect on regular files. The type checks use the opened descriptor, so nothing can swap the file.
    """
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise error(f"{name}: broken symbolic link (its target does not exist)") from None
        if exc.errno == errno.EISDIR:
            raise error(f"{name}: is a folder, not {kind}") from None
        reason = _ERRNO_REASONS.get(exc.errno, exc.strerror or str(exc))
        raise error(f"{name}: cannot open ({reason})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{name}: is a folder, not {kind}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: not a regular file (a device, pipe or socket)")
        if st.st_size == 0:
            raise error(f"{name}: empty file (0 bytes)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise



def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to the descriptor ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_TEMP_SECONDS = 3600.0  # a temporary of ours this old is left from a killed run: removed on the next write


def _limit(folder: Path, name: str, fallback: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no such limit
        return fallback


def check_output(path: str | os.PathLike, what: str = "file", folder: bool = False) -> Path:
    """Refuse, before any work is done, an output that could not be written: a folder where a file is wanted (or a
    file where a folder is), a name or path too long, a path through a file, a folder nobody may write into or a
    read-only file system. Folders that do not exist yet are fine (the writers create them). Returns the path."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    existing = absolute  # os.path's tests answer False rather than raise, even for names too long
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent

    def fail(reason: str) -> GaussadError:
        return GaussadError(f"{path}: cannot write {what} ({reason})")

    if any(len(os.fsencode(part)) > _limit(existing, "PC_NAME_MAX", 255) for part in absolute.parts):
        raise fail("file name too long")
    if len(os.fsencode(str(absolute))) >= _limit(existing, "PC_PATH_MAX", 4096):
        raise fail("path too long")
    if os.path.isdir(path) and not folder:
        raise GaussadError(f"{path}: is a folder; give the {what}'s name")
    if os.path.lexists(path) and not os.path.isdir(path) and folder:
        raise GaussadError(f"{path}: not a folder; give a folder for the {what}")
    where = existing if existing != absolute else absolute if folder else absolute.parent
    if not os.path.isdir(where):
        raise fail(f"{where} is not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise fail(f"permission denied in {where}")
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    if read_only:
        raise fail(f"{where} is on a read-only file system")
    return path


def refuse_input_as_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "file") -> None:
    """Refuse, before any work, an output that is one of the command's inputs (the same file by its resolved path,
    links followed): writing it would destroy the input, as ``export m.gaussad -o m.gaussad`` did."""
    target = os.path.realpath(output)
    for source in inputs:
        if os.path.realpath(source) == target:
            raise GaussadError(f"{output}: is an input of this command ({source}); give another {what}")


def _temp_name(path: Path) -> str:
    """A hidden temporary beside ``path``, within the file system's name limit whatever the target's length."""
    return f".{path.name[:200]}.{secrets.token_hex(6)}.tmp"


def _remove_stale_temps(path: Path) -> None:
    """Remove temporaries of ``path`` that a killed run left behind (ours by name, older than an hour)."""
    try:
        leftovers = list(path.parent.glob(f".{glob.escape(path.name[:200])}.????????????.tmp"))
    except OSError:
        return
    for old in leftovers:
        try:
            if time.time() - old.lstat().st_mtime > STALE_TEMP_SECONDS and old.is_file():
                old.unlink()
        except OSError:
            pass


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], what: str = "file") -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically; returns the path.

    The bytes go to a hidden temporary file in the same folder, are flushed to disk, get the usual permissions
    (0666 less the umask) and are renamed over ``path``; the folder is synced so the rename survives a crash.
    An interruption at any point leaves either the previous file or the complete new one, and no temporary
    (a kill that allows no clean-up leaves one, which the next write to ``path`` removes once an hour old).
    Failures raise :class:`GaussadError` naming ``path`` and saying what could not be written.
    """
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise GaussadError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
    if is_dir:
        raise GaussadError(f"{path}: is a folder; give the {what}'s name")
    tmp = path.with_name(_temp_name(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
    except OSError as exc:
        raise GaussadError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
    try:  # the temporary is created inside: an interruption right after its creation still removes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            if callable(data):
                with os.fdopen(os.dup(fd), "wb") as fh:
                    data(fh)
            else:
                write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder refuses even that (read-only, gone): the write's own error is the one to tell
            pass
        if isinstance(exc, OSError):
            raise GaussadError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
        raise
    fsync_folder(path.parent)
    return path
