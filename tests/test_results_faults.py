"""The results log under faults (issue 32, N1 and N2): a folder that refuses a kept image, a database that refuses
rows for a while. Nothing accepted is lost: the writer never dies, refused rows are retried until written, the
service says it is degraded and answers 503, never 200 without a row, when too many rows wait."""

import errno
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import gaussad.service.results_log as results_log_mod
from gaussad.errors import GaussadError
from gaussad.intake.files import write_atomic
from gaussad.intake.images import list_images
from gaussad.service.results_log import Backlogged, ResultsLog
from gaussad.service.app import create_app, load_models

from .test_operations import (_upload, db_url, db_url_postgresql, model_dir, postgres_url,  # noqa: F401 - fixtures
                              served_dir)


def _row(i: int) -> dict:
    return {"path": f"img{i}.png", "score": float(i), "levels": [float(i)], "anomalous": False}


class Refusing:
    """Makes the log's engine.begin() raise, like a locked or full database, while ``on`` is set."""

    def __init__(self, log: ResultsLog):
        import sqlalchemy as sa

        self.on, self.calls, self.real, self.sa = True, 0, log.engine.begin, sa

    def __call__(self):
        if self.on:
            self.calls += 1
            raise self.sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return self.real()


def test_write_atomic_says_what_failed_even_when_the_clean_up_fails_too(tmp_path, monkeypatch):
    """A read-only moment: the rename and then the removal of the temporary both fail (EROFS). The caller gets one
    GaussadError naming the file, not the clean-up's OSError."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("os.replace", refuse)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: refuse())
    with pytest.raises(GaussadError, match=r"kept\.png: cannot write kept image \(Read-only file system\)"):
        write_atomic(tmp_path / "kept.png", b"data", "kept image")


def test_a_kept_image_that_cannot_be_written_leaves_its_row_and_the_writer_alive(tmp_path, monkeypatch):
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    real = results_log_mod.write_atomic
    fail = {"n": 1}

    def flaky(path, data, what):
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(errno.EROFS, "Read-only file system")  # any error, not only GaussadError
        return real(path, data, what)

    monkeypatch.setattr(results_log_mod, "write_atomic", flaky)
    try:
        ids = [log.record("m", 1, "0" * 64, _row(i), b"image %d" % i, ".png") for i in range(3)]
        assert log.flush(10)
        ids.append(log.record("m", 1, "0" * 64, _row(3), b"image 3", ".png"))  # the writer still runs
        assert log.flush(10)
        rows = {r["id"]: r for r in log.query(limit=10)}
        assert list(rows) == ids
        assert rows[ids[0]]["image_file"] is None
        assert all((tmp_path / "kept" / rows[i]["image_file"]).read_bytes() == b"image %d" % n
                   for n, i in enumerate(ids) if n)
        assert log.image_failures == 1 and log.pending == 0
    finally:
        log.close()


def test_refused_rows_are_retried_until_the_database_takes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(results_log_mod, "RETRY_SECONDS", (0.01, 0.02))
    log = ResultsLog(str(tmp_path / "r.sqlite"), batch=2)
    refusing = Refusing(log)
    monkeypatch.setattr(log.engine, "begin", refusing)
    try:
        ids = [log.record("m", 1, "0" * 64, _row(i), b"x") for i in range(5)]
        assert not log.flush(0.5)  # refused for now: the rows wait, they are not dropped
        assert refusing.calls >= 8 and log.failures == refusing.calls  # more attempts than the old five
        assert log.failing_since is not None and "database is locked" in log.status_line() and log.pending == 5
        refusing.on = False
        assert log.flush(10)
        assert [r["id"] for r in log.query(limit=10)] == ids
        assert log.failing_since is None and log.lost == 0
    finally:
        log.close()


def test_close_gives_up_after_its_deadline_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(results_log_mod, "RETRY_SECONDS", (0.01,))
    monkeypatch.setattr(results_log_mod, "CLOSE_SECONDS", 0.2)
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    monkeypatch.setattr(log.engine, "begin", Refusing(log))
    log.record("m", 1, "0" * 64, _row(0), b"x")
    log.close()
    assert log.lost == 1 and "1 rows the database refused" in caplog.text


def test_a_full_backlog_refuses_new_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(results_log_mod, "RETRY_SECONDS", (0.01,))
    log = ResultsLog(str(tmp_path / "r.sqlite"), max_pending=3)
    refusing = Refusing(log)
    monkeypatch.setattr(log.engine, "begin", refusing)
    try:
        for i in range(3):
            log.record("m", 1, "0" * 64, _row(i), b"x")
        with pytest.raises(Backlogged, match="3 rows wait"):
            log.record("m", 1, "0" * 64, _row(3), b"x")
        refusing.on = False
        assert log.flush(10) and log.count() == 3
        log.record("m", 1, "0" * 64, _row(4), b"x")  # taken again once written
    finally:
        log.close()


def test_service_under_a_refusing_database_answers_200_with_a_row_or_503(model_dir, tiny_category, tmp_path,  # noqa: F811
                                                                          monkeypatch, db_url):  # noqa: F811
    """200 concurrent score requests while the database refuses every row: each is answered 200 or 503 (the log's
    bound is 40 rows), /health is degraded and /metrics counts the failures; once the database takes rows again,
    every result answered 200 is in the log, once. On a SQLite file and on PostgreSQL (a throwaway cluster)."""
    monkeypatch.setattr(results_log_mod, "RETRY_SECONDS", (0.05,))
    log = ResultsLog(db_url, str(tmp_path / "kept"), max_pending=40)
    refusing = Refusing(log)
    monkeypatch.setattr(log.engine, "begin", refusing)
    image = list_images(tiny_category / "test" / "good")[0]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir, workers=2)) as client:
        def post(i: int):
            return client.post("/models/plain/score", files=_upload([image]))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(200)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes.count(200) == 40 and codes.count(503) == 160
        assert "results log" in answers[codes.index(503)].json()["detail"]
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "database is locked" in health["results_log"]
        metrics = client.get("/metrics").text
        assert "gaussad_results_log_pending 40.0" in metrics
        counted = float(next(line.split()[1] for line in metrics.splitlines()
                             if line.startswith("gaussad_results_log_failures ")))
        assert 1 <= counted <= log.failures  # the writer keeps retrying meanwhile
        refusing.on = False
        assert log.flush(20)
        assert client.get("/health").json()["status"] == "ok"
        logged = [r["id"] for r in log.query(limit=1000)]
        answered = [a.json()["results"][0]["id"] for a in answers if a.status_code == 200]
        assert sorted(logged) == sorted(answered) and len(set(logged)) == len(logged)
        assert client.post("/models/plain/score", files=_upload([image])).status_code == 200


def test_a_closed_log_refuses_rows_instead_of_queueing_them_for_nobody(tmp_path):
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    log.record("m", 1, "0" * 64, _row(0), b"x")
    log.close()
    with pytest.raises(GaussadError, match="the results log is closed"):
        log.record("m", 1, "0" * 64, _row(1), b"x")
    assert log.pending == 0 and log.flush(1)


# ----- a large CSV download (N14) -------------------------------------------------------------------------------
def test_results_csv_is_read_in_pages_and_formatted_off_the_event_loop(tmp_path, monkeypatch):
    """``GET /results.csv`` reads ``CSV_PAGE`` rows at a time after the last one's ``seq`` and formats them in a worker
    thread (was: every row in one query, the whole CSV built on the event loop: 1.83 GB and /health blocked 13.5 s
    at 300,000 rows); the rows are the same, in order, up to ``limit``."""
    import asyncio

    log = ResultsLog(str(tmp_path / "r.sqlite"))
    ids = [log.record("m", 1, "0" * 64, _row(i), b"img%d" % i) for i in range(30)]
    assert log.flush(10)
    monkeypatch.setattr(results_log_mod, "CSV_PAGE", 8, raising=False)
    pages, on_loop = [], []
    real_query, real_safe = ResultsLog.query, results_log_mod.spreadsheet_safe

    def query(self, *args, **kwargs):
        out = real_query(self, *args, **kwargs)
        pages.append(len(out))
        return out

    def safe(text: str) -> str:
        try:
            asyncio.get_running_loop()
            on_loop.append(text)
        except RuntimeError:  # a worker thread: no event loop runs there
            pass
        return real_safe(text)

    monkeypatch.setattr(ResultsLog, "query", query)
    monkeypatch.setattr(results_log_mod, "spreadsheet_safe", safe)
    with TestClient(create_app({}, results_log=log)) as client:
        answer = client.get("/results.csv?limit=25")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    lines = answer.text.splitlines()
    assert lines[0].startswith("seq,id,time,") and [line.split(",")[1] for line in lines[1:]] == ids[:25]
    assert pages == [8, 8, 8, 1] and not on_loop


# ----- the SQLite file deleted while the service runs (N23) ----------------------------------------------------
@pytest.mark.parametrize("deleted", [[""], ["", "-wal", "-shm"]], ids=["file", "file-and-wal"])
def test_a_results_file_deleted_while_in_use_is_put_back_with_its_rows(tmp_path, monkeypatch, caplog, deleted):
    """``rm r.sqlite`` (with or without its -wal and -shm) while the log runs: the writer finds it within a second
    (idle) or before its next write, puts a new file there with every row the deleted one held, says so in one line,
    and the rows after it are written there too; a restart finds them all (was: rows written into the deleted file,
    every one gone at restart)."""
    monkeypatch.setattr(results_log_mod, "FILE_CHECK_SECONDS", 0.05)
    db = tmp_path / "r.sqlite"
    log = ResultsLog(str(db))
    try:
        ids = [log.record("m", 1, "0" * 64, _row(i), b"x") for i in range(5)]
        assert log.flush(10)
        for suffix in deleted:
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        ids += [log.record("m", 1, "0" * 64, _row(i), b"x") for i in range(5, 8)]
        assert log.flush(10)
        assert [r["id"] for r in log.query(limit=100)] == ids
    finally:
        log.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"results log: {db} was deleted while in use; a new file there holds its 5 rows and the log goes on in it"]
    again = ResultsLog(str(db))
    try:
        assert [r["id"] for r in again.query(limit=100)] == ids
    finally:
        again.close()


def test_service_with_its_results_folder_deleted_answers_200_with_a_row_or_503(model_dir, tiny_category,  # noqa: F811
                                                                                tmp_path, monkeypatch):
    """The results database's whole folder deleted while serving, then 200 concurrent score requests: the file
    cannot be put back, so rows wait, /health is degraded naming the deleted file, and past 40 waiting rows requests
    get 503; once the folder is back, the file is put back with every row, and each answer 200 has its row once,
    also after a restart (was: every row written into the deleted file, /health ok)."""
    import shutil

    monkeypatch.setattr(results_log_mod, "RETRY_SECONDS", (0.05,))
    monkeypatch.setattr(results_log_mod, "FILE_CHECK_SECONDS", 0.05)
    folder = tmp_path / "db"
    folder.mkdir()
    log = ResultsLog(str(folder / "r.sqlite"), max_pending=40)
    image = list_images(tiny_category / "test" / "good")[0]
    with TestClient(create_app(load_models(model_dir), results_log=log, workers=2)) as client:
        first = client.post("/models/plain/score", files=_upload([image])).json()["results"][0]["id"]
        assert log.flush(10)
        shutil.rmtree(folder)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/models/plain/score", files=_upload([image])), range(200)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes.count(200) == 40, codes
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "r.sqlite: the results database file was deleted" in health["results_log"]
        folder.mkdir()
        assert log.flush(20)
        assert client.get("/health").json()["status"] == "ok"
    answered = [first] + [a.json()["results"][0]["id"] for a in answers if a.status_code == 200]
    again = ResultsLog(str(folder / "r.sqlite"))
    try:
        logged = [r["id"] for r in again.query(limit=1000)]
    finally:
        again.close()
    assert sorted(logged) == sorted(answered) and len(set(logged)) == len(logged)
