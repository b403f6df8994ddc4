"""The SQLite file under a results log: opened so that a deleted file is never re-created empty behind the log's
back, and put back with every row it held when it is deleted while the service runs (issue 32, N23).

A SQLite connection keeps writing into a file that was deleted (unlinked) while it was open: requests succeed, the
rows go nowhere that survives a restart. The log records the file's identity (device and inode) when it opens it and
compares before every write and every second when idle; :func:`restore` then copies the database, as a connection
still open on the deleted file sees it (write-ahead log included), into a new file at the same path. New connections
open the path read-write without creating it (``mode=rw``), so none of them makes an empty database there meanwhile
(or opens the deleted file's write-ahead log as its own).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

Identity = tuple[int, int]


def sqlite_file(url: str) -> Path | None:
    """The database file of a plain SQLite URL (``sqlite:///PATH``); None for other databases and memory ones."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.query or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def engine_url(path: Path) -> str:
    """A SQLAlchemy URL opening ``path`` read-write only: a missing file is an error, never a new empty database."""
    return f"sqlite:///file:{quote(str(path))}?mode=rw&uri=true"


def create(path: Path) -> None:
    """Make an empty SQLite database at ``path`` unless one is there (raises ``sqlite3.Error``, ``OSError``)."""
    sqlite3.connect(path).close()


def identity(path: Path) -> Identity | None:
    """The file's device and inode, or None when no file is at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def restore(engine, path: Path) -> int | None:
    """Copy the database that a connection of ``engine``'s pool still holds open (the deleted file) into a new file
    at ``path``; the number of result rows copied, or None when no connection to the deleted file was left (a new
    one cannot reach it). Call with no connection in use; the caller disposes of ``engine`` afterwards."""
    if engine.pool.checkedin() == 0:
        return None
    tmp = path.with_name(f".{path.name}.restore-{os.getpid()}")
    with contextlib.closing(engine.raw_connection()) as fairy:
        source = fairy.driver_connection
        with contextlib.closing(sqlite3.connect(tmp)) as target:
            source.backup(target)
        (rows,) = source.execute("SELECT count(*) FROM results").fetchone()
    engine.dispose()  # the last connection to the deleted file closes: its write-ahead log goes with it
    for stale in (f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    os.replace(tmp, path)
    return int(rows)
