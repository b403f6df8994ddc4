"""The service's results log: every scored image as one row of an SQL table (SQLAlchemy Core: SQLite by default,
PostgreSQL or any other URL), written by one background thread so that logging never holds up scoring.

Rows are queued in memory and written in batches; ``flush`` waits until everything queued so far is written and
``close`` flushes and stops the writer. Nothing is dropped: a batch the database refuses (locked, full disk, gone)
stays queued and is retried with a bounded back-off until it is written, while ``failing_since`` says since when
(the service's ``/health`` is then degraded); past ``max_pending`` rows waiting, :meth:`ResultsLog.record` refuses
new ones (the service answers 503) rather than hold an unbounded backlog. Only ``close`` gives up, after
``CLOSE_SECONDS`` of failures, and says how many rows it could not write. Each row has a
random ``id`` given when it is queued (returned to the client at once) and a ``seq`` the database assigns in
write order (the cursor of ``GET /results``). With ``keep_dir`` the image bytes are kept too, content-addressed
as ``<sha256>.<ext>``, written atomically by the writer thread. A SQLite file deleted while the log is open is
put back with its rows (:mod:`gaussad.service.results_file`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import DataError, GaussadError
from . import results_file
from ..intake.files import write_atomic
from ..detector.results import spreadsheet_safe

log = logging.getLogger(__name__)

LABELS = ("good", "defect")
COLUMNS = ("seq", "id", "time", "model", "version", "model_sha256", "image_sha256", "filename", "score", "levels",
           "pvalue", "anomalous", "map_max", "image_file", "label", "labelled_at", "applied_in", "evidence")
JSON_COLUMNS = ("levels", "evidence")  # stored as JSON text
# Columns added after the first release, with their SQL type: a table made by an older gaussad gets them (empty for
# its old rows) when the log opens it.
ADDED_COLUMNS = {"evidence": "TEXT"}
_STOP = object()
MAX_PENDING = 10_000  # rows queued or waiting for a retry before new ones are refused
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)  # waits between attempts at a refused batch (the last one repeats)
CLOSE_SECONDS = 30.0  # how long close() keeps retrying a refused batch before giving it up
FILE_CHECK_SECONDS = 1.0  # how often an idle writer checks that the SQLite file is still the one it writes
CSV_PAGE = 2_000  # rows read and formatted at a time for a CSV download (ResultsLog.csv_stream)


class Backlogged(GaussadError):
    """The results log holds ``max_pending`` rows it could not write yet: no new row is taken."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL as it is, else a SQLite file path."""
    return db if "://" in db else f"sqlite:///{Path(db).resolve()}"


def _shown(db: str) -> str:
    """``db`` for messages, without a password."""
    if "://" not in db:
        return db
    try:
        from sqlalchemy.engine import make_url

        return make_url(db).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without its credentials part
        return db.split("://", 1)[0] + "://..."


class ResultsLog:
    """Append-only results table with labels; thread-safe. ``db``: a SQLAlchemy URL or a SQLite file path."""

    def __init__(self, db: str, keep_dir: str | None = None, batch: int = 256, max_pending: int = MAX_PENDING):
        try:
            import sqlalchemy as sa
        except ImportError as exc:  # pragma: no cover - an extra of the service
            raise GaussadError(f"the results log needs SQLAlchemy ({exc}): pip install 'gaussad[serve]'") from None
        self.sa, self.url, self.batch = sa, _url(db), batch
        self.keep_dir = Path(keep_dir) if keep_dir else None
        if self.keep_dir is not None:
            try:
                self.keep_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"{self.keep_dir}: cannot create the image folder: {exc}") from None
        try:
            self.file = results_file.sqlite_file(self.url)  # a SQLite file: checked for deletion while in use
            if self.file is not None:
                results_file.create(self.file)
            meta = sa.MetaData()
            self.table = sa.Table(
                "results", meta,
                sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                sa.Column("id", sa.String(32), unique=True, nullable=False),
                sa.Column("time", sa.Float, nullable=False, index=True),
                sa.Column("model", sa.String(200), nullable=False, index=True),
                sa.Column("version", sa.Integer, nullable=False),
                sa.Column("model_sha256", sa.String(64), nullable=False),
                sa.Column("image_sha256", sa.String(64), nullable=False),
                sa.Column("filename", sa.Text, nullable=False),
                sa.Column("score", sa.Float, nullable=False),
                sa.Column("levels", sa.Text, nullable=False),
                sa.Column("pvalue", sa.Float),
                sa.Column("anomalous", sa.Boolean, nullable=False),
                sa.Column("map_max", sa.Float),
                sa.Column("image_file", sa.Text),
                sa.Column("label", sa.String(16)),
                sa.Column("labelled_at", sa.Float),
                sa.Column("applied_in", sa.Integer),
                sa.Column("evidence", sa.Text),  # what the decision rule decided on (DecisionRule.evidence), JSON
            )
            self.meta = meta
            self.engine = self._open()
        except (sa.exc.SQLAlchemyError, ImportError, OSError, sqlite3.Error) as exc:  # ImportError: the URL's driver is not installed
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise DataError(f"{_shown(db)}: cannot open the results database: {reason}") from None
        except ValueError:  # an unparsable URL; the parser's message may quote part of the password: never shown
            raise DataError(f"{_shown(db)}: cannot parse the results database URL (dialect+driver://user:password@"
                            "host:port/database; percent-encode @, : and / inside the password)") from None
        self._identity = None if self.file is None else results_file.identity(self.file)
        self._gate = threading.Condition()  # connections in use, and a new file being put in place (none then)
        self._users, self._reopening = 0, False
        self._queue: queue.Queue = queue.Queue()
        self._written = threading.Condition()
        self._queued = self._done = 0
        self.max_pending = max_pending
        self.failures = 0  # refused attempts at writing a batch (each batch is retried until written)
        self.image_failures = 0  # kept images that could not be written (their rows are logged without them)
        self.lost = 0  # rows given up at close after CLOSE_SECONDS of failures
        self.failing_since: float | None = None  # set while a refused batch waits for its retry
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._writer, name="gaussad-results-log", daemon=True)
        self._thread.start()

    def _open(self):
        """An engine on the log's database, its table made; a SQLite file is opened read-write without creating it."""
        sa = self.sa
        engine = sa.create_engine(self.url if self.file is None else results_file.engine_url(self.file))
        if engine.dialect.name == "sqlite":  # readers do not wait for the writer's commits (write-ahead log)
            sa.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA journal_mode=WAL"))
        self.meta.create_all(engine)
        present = {c["name"] for c in sa.inspect(engine).get_columns("results")}
        for name, kind in ADDED_COLUMNS.items():
            if name in present:
                continue
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE results ADD COLUMN {name} {kind}"))
            except sa.exc.SQLAlchemyError:  # another service opening the same table may have added it meanwhile
                if name not in {c["name"] for c in sa.inspect(engine).get_columns("results")}:
                    raise
                continue
            log.info("results log: added the %s column to the table of an older gaussad (empty for its rows)", name)
        return engine

    @contextmanager
    def _connect(self, begin: bool = False):
        """A connection (in a transaction with ``begin``); waits while a deleted SQLite file is being put back."""
        with self._gate:
            self._gate.wait_for(lambda: not self._reopening)
            self._users += 1
            engine = self.engine
        try:
            with engine.begin() if begin else engine.connect() as conn:
                yield conn
        finally:
            with self._gate:
                self._users -= 1
                self._gate.notify_all()

    def _check_file(self) -> None:
        """Before a write (and every second when idle): a SQLite file deleted or replaced since it was opened is
        found here. Deleted: the rows it held are copied into a new file at its path (from a connection still open on
        it) and the log goes on there; replaced (moved away, another file put there): the log goes on in the file
        now at the path. One error line says which; a failure raises, so the rows wait and /health is degraded."""
        if self.file is None or results_file.identity(self.file) == self._identity:
            return
        deleted = results_file.identity(self.file) is None
        with self._gate:
            self._reopening = True
            self._gate.wait_for(lambda: self._users == 0)
        try:
            copied = results_file.restore(self.engine, self.file) if deleted else None
            self.engine.dispose()
            if deleted and copied is None:
                results_file.create(self.file)
            self.engine = self._open()
            self._identity = results_file.identity(self.file)
        except Exception as exc:  # noqa: BLE001 - the rows stay queued and the check runs again at the next attempt
            raise GaussadError(f"{self.file}: the results database file was {'deleted' if deleted else 'replaced'} "
                               f"while in use and cannot be put back ({exc})") from None
        finally:
            with self._gate:
                self._reopening = False
                self._gate.notify_all()
        log.error("results log: %s was %s while in use; %s", self.file, "deleted" if deleted else "replaced",
                  f"a new file there holds its {copied} rows and the log goes on in it" if copied is not None else
                  "the rows it held could not be read back (no connection to it was left); new rows go to a new file"
                  if deleted else "the log goes on in the file now there")

    # ----- writing ---------------------------------------------------------------------------------------------
    def record(self, model: str, version: int, model_sha256: str, row: dict, image: bytes, suffix: str = "") -> str:
        """Queue one scored image (a result row of :mod:`gaussad.detector.results`); returns its id. Never blocks; raises
        :class:`Backlogged` while :attr:`backlogged`."""
        rid = uuid.uuid4().hex
        digest = sha256(image)
        entry = {"id": rid, "time": time.time(), "model": model, "version": int(version), "model_sha256": model_sha256,
                 "image_sha256": digest, "filename": str(row["path"]), "score": float(row["score"]),
                 "levels": json.dumps(row["levels"]), "pvalue": row.get("pvalue"), "anomalous": bool(row["anomalous"]),
                 "map_max": row.get("map_max"), "image_file": None,
                 "evidence": None if row.get("evidence") is None else json.dumps(row["evidence"])}
        image_data = None
        if self.keep_dir is not None:
            entry["image_file"] = digest + (suffix.lower() if suffix.lower() in (
                ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp") else "")
            image_data = image
        with self._written:  # checked and counted together: concurrent requests cannot overfill the bound
            if not self._thread.is_alive():
                raise GaussadError("the results log is closed: no row is taken")
            if self.backlogged:
                raise Backlogged(self.status_line())
            self._queued += 1
        self._queue.put((entry, image_data))
        return rid

    def _writer(self) -> None:
        """Write queued rows in batches; a refused batch is kept and retried (first, with more rows behind it) after
        a growing wait, so a fault of the database delays rows but loses none."""
        rows: list = []
        stop, attempts, stop_deadline, idle = False, 0, None, False
        while True:
            if not rows and not stop:
                try:
                    rows.append(self._queue.get(timeout=FILE_CHECK_SECONDS))
                except queue.Empty:
                    idle = True  # nothing to write: only the file check runs
            while len(rows) < self.batch:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(r is _STOP for r in rows):
                stop, stop_deadline = True, time.monotonic() + CLOSE_SECONDS
                rows = [r for r in rows if r is not _STOP]
            if rows or idle:
                idle = False
                try:
                    self._write(rows)
                except Exception as exc:  # noqa: BLE001 - any failure keeps the rows for the next attempt
                    attempts += 1
                    self._failed(exc, len(rows))
                    if stop and time.monotonic() >= stop_deadline:
                        self._give_up(rows)
                        return
                    time.sleep(RETRY_SECONDS[min(attempts, len(RETRY_SECONDS)) - 1])
                    continue
                with self._written:
                    self._done += len(rows)
                    if self.failing_since is not None:
                        log.warning("results log: writing again after %.0f s of failures", time.time() - self.failing_since)
                    self.failing_since, attempts, rows = None, 0, []
                    self._written.notify_all()
            if stop and self._queue.empty():
                return

    def _failed(self, exc: Exception, n: int) -> None:
        self.failures += 1
        self.last_error = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if self.failing_since is None:
            self.failing_since = time.time()
            log.error("results log: %d rows wait, the database refused them (%s); retrying", n, self.last_error)

    def _give_up(self, rows: list) -> None:
        with self._written:
            self.lost += len(rows)
            self._done += len(rows)
            self._written.notify_all()
        log.error("results log: closing with %d rows the database refused for %.0f s; they are not logged (%s)",
                  len(rows), CLOSE_SECONDS, self.last_error)

    def _write(self, rows: list) -> None:
        """Keep the rows' images (once each; a failure leaves that row without its image) and insert the rows in
        one transaction (raises on failure: the caller retries them). Checks the SQLite file first."""
        self._check_file()
        if not rows:
            return
        for i, (entry, image) in enumerate(rows):
            if image is not None and entry["image_file"]:
                path = self.keep_dir / entry["image_file"]
                try:
                    if not path.exists():
                        write_atomic(path, image, "kept image")
                except Exception as exc:  # noqa: BLE001 - the row is logged without its image, never lost
                    self.image_failures += 1
                    log.error("results log: row %s is logged without its image: %s", entry["id"], exc)
                    entry["image_file"] = None
                rows[i] = (entry, None)  # a retry of the batch does not write the image again
        with self._connect(begin=True) as conn:
            conn.execute(self.table.insert(), [entry for entry, _ in rows])

    def where(self) -> str:
        """Where rows (and kept images) go, in one line for the service's start: the SQLite file's absolute path or
        the database URL with its password hidden."""
        place = str(self.file) if self.file is not None else \
            self.sa.engine.make_url(self.url).render_as_string(hide_password=True)
        return place + (f", images kept in {self.keep_dir.resolve()}" if self.keep_dir is not None else "")

    @property
    def backlogged(self) -> bool:
        """Whether ``max_pending`` rows wait: new ones are refused until the database takes them."""
        return self.pending >= self.max_pending

    def status_line(self) -> str:
        """One line on the rows waiting and why (for 503 answers and /health)."""
        line = f"results log: {self.pending} rows wait to be written ({self.max_pending} at most)"
        if self.failing_since is None:
            return line
        return f"{line}; the database has refused them for {time.time() - self.failing_since:.0f} s: {self.last_error}"

    @property
    def pending(self) -> int:
        """Rows queued and not yet written."""
        return self._queued - self._done

    def flush(self, timeout: float | None = 60) -> bool:
        """Wait until every row queued so far is written; False on timeout."""
        with self._written:
            target = self._queued
            return self._written.wait_for(lambda: self._done >= target, timeout)

    def close(self) -> None:
        """Write what is queued (retrying a refused batch for up to ``CLOSE_SECONDS``) and stop the writer."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self.engine.dispose()

    # ----- reading ---------------------------------------------------------------------------------------------
    def _row(self, r) -> dict:
        d = dict(r._mapping)
        for c in JSON_COLUMNS:
            d[c] = None if d[c] is None else json.loads(d[c])
        d["anomalous"] = bool(d["anomalous"])
        return d

    def query(self, model: str | None = None, since: float | None = None, anomalous: bool | None = None,
              limit: int = 100, cursor: int | None = None, label: str | None = None, version: int | None = None,
              newest_first: bool = False, wait: bool = True) -> list[dict]:
        """Rows in write order after ``cursor`` (a ``seq``), filtered; at most ``limit``. With ``wait`` rows queued
        before the call are included (it waits for the writer, at most 10 s)."""
        if wait:
            self.flush(10)
        sa, t = self.sa, self.table
        q = sa.select(t)
        if model is not None:
            q = q.where(t.c.model == model)
        if since is not None:
            q = q.where(t.c.time >= since)
        if anomalous is not None:
            q = q.where(t.c.anomalous == anomalous)
        if label is not None:
            q = q.where(t.c.label == label)
        if version is not None:
            q = q.where(t.c.version == version)
        if cursor is not None:
            q = q.where(t.c.seq < cursor if newest_first else t.c.seq > cursor)
        q = q.order_by(t.c.seq.desc() if newest_first else t.c.seq).limit(limit)
        with self._connect() as conn:
            return [self._row(r) for r in conn.execute(q)]

    def get(self, rid: str) -> dict | None:
        self.flush()
        with self._connect() as conn:
            r = conn.execute(self.sa.select(self.table).where(self.table.c.id == rid)).first()
        return None if r is None else self._row(r)

    def count(self, model: str | None = None) -> int:
        q = self.sa.select(self.sa.func.count()).select_from(self.table)
        if model is not None:
            q = q.where(self.table.c.model == model)
        with self._connect() as conn:
            return int(conn.execute(q).scalar_one())

    def label(self, rid: str, label: str | None) -> dict:
        """Mark a logged result ``good`` (a false alarm, or a confirmed good image) or ``defect`` (None: unmark)."""
        if label is not None and label not in LABELS:
            raise GaussadError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if self.get(rid) is None:
            raise KeyError(rid)
        with self._connect(begin=True) as conn:
            conn.execute(self.table.update().where(self.table.c.id == rid).values(
                label=label, labelled_at=None if label is None else time.time()))
        return self.get(rid)

    def to_apply(self, model: str) -> list[dict]:
        """Good-marked results of ``model`` not yet added to it."""
        t = self.table
        self.flush()
        with self._connect() as conn:
            rows = conn.execute(self.sa.select(t).where(t.c.model == model, t.c.label == "good",
                                                        t.c.applied_in.is_(None)).order_by(t.c.seq))
            return [self._row(r) for r in rows]

    def mark_applied(self, seqs: Iterable[int], version: int | None) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        with self._connect(begin=True) as conn:
            conn.execute(self.table.update().where(self.table.c.seq.in_(seqs)).values(applied_in=version))

    def unapply(self, model: str, version: int) -> None:
        """Rows added in ``version`` (rolled back) become pending again."""
        t = self.table
        with self._connect(begin=True) as conn:
            conn.execute(t.update().where(t.c.model == model, t.c.applied_in == version).values(applied_in=None))

    def rates(self) -> list[dict]:
        """Realised rates per model and version from the labels: FPR = flagged among good-marked, TPR = flagged
        among defect-marked."""
        sa, t = self.sa, self.table
        q = sa.select(t.c.model, t.c.version, t.c.label, t.c.anomalous, sa.func.count()).where(
            t.c.label.is_not(None)).group_by(t.c.model, t.c.version, t.c.label, t.c.anomalous)
        table: dict = {}
        self.flush()
        with self._connect() as conn:
            for model, version, label, anomalous, n in conn.execute(q):
                e = table.setdefault((model, version), {"model": model, "version": version, "good": 0,
                                                         "good_flagged": 0, "defect": 0, "defect_flagged": 0})
                e[label] += n
                if anomalous:
                    e[f"{label}_flagged"] += n
        out = []
        for e in sorted(table.values(), key=lambda e: (e["model"], e["version"])):
            e["fpr"] = e["good_flagged"] / e["good"] if e["good"] else None
            e["tpr"] = e["defect_flagged"] / e["defect"] if e["defect"] else None
            out.append(e)
        return out

    def csv_stream(self, model: str | None = None, since: float | None = None, anomalous: bool | None = None,
                   limit: int = 100_000, cursor: int | None = None) -> Iterator[str]:
        """The rows :meth:`query` gives, as CSV text: the header, then ``CSV_PAGE`` rows at a time, each page read
        after the last ``seq`` of the one before (its own short query) and formatted only when the consumer asks
        for it. Memory stays one page at any ``limit`` (one page whole was 1.83 GB at 300,000 rows), and the
        service runs this generator in a worker thread, never on its event loop."""
        yield _csv_text([COLUMNS])
        left, wait = limit, True
        while left > 0:
            page = self.query(model, since, anomalous, min(CSV_PAGE, left), cursor, wait=wait)
            if not page:
                return
            yield _csv_text([[json.dumps(r[c]) if c in JSON_COLUMNS and r[c] is not None else "" if r[c] is None
                              else spreadsheet_safe(r[c]) if isinstance(r[c], str) else r[c] for c in COLUMNS]
                             for r in page])
            left, cursor, wait = left - len(page), page[-1]["seq"], False
            if len(page) < CSV_PAGE:
                return


def _csv_text(rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()
