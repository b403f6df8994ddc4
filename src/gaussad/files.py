"""Opening input files safely: regular files only, with one clear error for every way that can fail."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from .errors import GaussadError

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

