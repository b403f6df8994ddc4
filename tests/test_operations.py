"""The service on a production line: API keys, the results log (SQLite file, and PostgreSQL when a throwaway server
can be started), feedback updates and rollbacks, drift alarms and Prometheus metrics."""

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats

import gaussad
from gaussad import GaussianAD
from gaussad.cli import main
from gaussad.core.drift import drift
from gaussad.errors import DataError, GaussadError
from gaussad.intake.images import list_images
from gaussad.service.keys import KeyStore, bearer, key_hash
from gaussad.service.operations import required_role
from gaussad.service.results_log import ResultsLog
from gaussad.service.app import create_app, load_models

from .conftest import TINY


# ----- databases: a SQLite file always, PostgreSQL when a throwaway cluster starts --------------------------------
def _pg_tools() -> tuple[str, str] | None:
    for folder in ["/usr/lib/postgresql/" + v + "/bin" for v in sorted(os.listdir("/usr/lib/postgresql"), reverse=True)] \
            if os.path.isdir("/usr/lib/postgresql") else []:
        if os.path.exists(folder + "/initdb"):
            return folder + "/initdb", folder + "/pg_ctl"
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return (initdb, pg_ctl) if initdb and pg_ctl else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL cluster in a temporary folder, listening only on a unix socket there; its SQLAlchemy URL."""
    tools = _pg_tools()
    if tools is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    try:
        import pg8000  # noqa: F401
    except ImportError:
        pytest.skip("the pg8000 driver is not installed (pip install pg8000; in the dev extra)")
    initdb, pg_ctl = tools
    # Directly under the temporary folder: the server may run as another user, who must reach it.
    folder = Path(tempfile.mkdtemp(prefix="gaussad-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the PostgreSQL server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", 5432
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run(initdb, "-D", str(data), "-A", "trust", "-U", "gaussad", "--no-sync")
    if out.returncode != 0:
        pytest.skip(f"initdb failed: {out.stderr.strip()[-300:]}")
    out = run(pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
              f"-k {folder} -c listen_addresses='' -p {port} -c fsync=off", "start")
    if out.returncode != 0:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        pytest.skip(f"the PostgreSQL server did not start: {(out.stderr + log).strip()[-300:]}")
    try:
        yield f"postgresql+pg8000://gaussad@/postgres?unix_sock={folder}/.s.PGSQL.{port}"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh results database: a real SQLite file, or a new PostgreSQL database of the throwaway cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")
    return request.getfixturevalue("db_url_postgresql")


# ----- keys ----------------------------------------------------------------------------------------------------
def test_keys_file_keeps_only_hashes_and_checks_roles(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore.load(path, missing_ok=True)
    score, admin = store.add("line1", "score"), store.add("boss", "admin")
    store.save()
    text = path.read_text()
    assert score not in text and admin not in text and key_hash(score) in text and key_hash(admin) in text
    assert len(score) >= 40 and score != admin
    again = KeyStore.load(path)
    assert again.check(score).name == "line1" and again.check(admin).name == "boss"
    assert again.check(score + "x") is None and again.check("") is None and again.check(None) is None
    assert again.check(score).allows("score") and not again.check(score).allows("admin")
    assert again.check(admin).allows("score") and again.check(admin).allows("admin")
    with pytest.raises(GaussadError, match="exists already"):
        again.add("line1", "score")
    with pytest.raises(GaussadError, match="role must be"):
        again.add("x", "root")
    path.write_text('{"format": "other"}')
    with pytest.raises(DataError, match="keys.json: cannot read the keys file"):
        KeyStore.load(path)
    with pytest.raises(DataError, match="no such keys file"):
        KeyStore.load(tmp_path / "missing.json")
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc" and bearer("Basic abc") is None


def test_keys_cli_prints_the_key_once(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "op", "--role", "admin", "--keys", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore.load(path).check(key).role == "admin" and key not in path.read_text()
    assert main(["keys", "list", "--keys", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "op\tadmin" in listed and key not in listed
    assert main(["keys", "remove", "op", "--keys", str(path)]) == 0
    assert KeyStore.load(path).check(key) is None
    assert main(["keys", "add", "--keys", str(path)]) == 2
    assert "give the key's NAME" in capsys.readouterr().err


def test_roles_of_the_paths():
    assert required_role("GET", "/health") is None and required_role("GET", "/") is None
    assert required_role("GET", "/static/app.js") is None
    assert required_role("POST", "/models/a/score") == "score" and required_role("GET", "/results") == "score"
    assert required_role("GET", "/metrics") == "score"
    assert required_role("POST", "/models/a/update") == "admin" and required_role("POST", "/models/a/rollback") == "admin"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_serving_beyond_loopback_needs_keys_or_insecure(tmp_path, capsys, host):
    code = main(["serve", str(tmp_path), "--host", host, "--db", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"refusing to listen on {host} without access keys" in err and "--insecure" in err
    assert err.count("\n") == 1  # one line, no traceback
    # --insecure passes that check (and fails next on the empty folder, before anything listens)
    assert main(["serve", str(tmp_path), "--host", host, "--insecure", "--db", "none"]) == 2
    assert "no model files" in capsys.readouterr().err


# ----- the app with keys and the log ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_dir(tiny_category, tmp_path_factory):
    """A model file (chi2 rule, 4 levels at 64 px) fitted on the tiny set; copied per test that changes it."""
    folder = tmp_path_factory.mktemp("ops-models")
    GaussianAD(**TINY).fit(list_images(tiny_category / "train" / "good")).save(folder / "plain.gaussad")
    return folder


@pytest.fixture
def model_dir(served_dir, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(served_dir / "plain.gaussad", folder / "plain.gaussad")
    return folder


@pytest.fixture
def keys(tmp_path):
    store = KeyStore([], tmp_path / "keys.json")
    return store, {"Authorization": "Bearer " + store.add("op", "score")}, {"Authorization": "Bearer " + store.add("boss", "admin")}


def _upload(paths):
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def test_without_a_key_401_score_key_scores_admin_updates(model_dir, keys, tiny_category, tmp_path):
    store, score_key, admin_key = keys
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    images = list_images(tiny_category / "test" / "good")[:2]
    with TestClient(create_app(load_models(model_dir), keys=store, results_log=log, folder=model_dir)) as c:
        assert c.get("/health").status_code == 200 and c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        for path in ("/models", "/results", "/metrics", "/results.csv"):
            answer = c.get(path)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", path
        assert c.post("/models/plain/score", files=_upload(images)).status_code == 401
        assert c.post("/models/plain/score", files=_upload(images),
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
        scored = c.post("/models/plain/score", files=_upload(images), headers=score_key)
        assert scored.status_code == 200 and len(scored.json()["results"]) == 2
        rid = scored.json()["results"][0]["id"]
        assert c.post(f"/results/{rid}/label", json={"label": "good"}, headers=score_key).status_code == 200
        denied = c.post("/models/plain/update", headers=score_key)
        assert denied.status_code == 403 and "'op' has role 'score'" in denied.json()["detail"]
        assert c.post("/models/plain/rollback", headers=score_key).status_code == 403
        updated = c.post("/models/plain/update", headers=admin_key)
        assert updated.status_code == 200, updated.text
        assert updated.json()["version"] == 2 and updated.json()["added"] == 1
        assert c.get("/models", headers=score_key).json()[0]["version"] == 2


def test_results_log_on_a_database(db_url, tmp_path):
    log = ResultsLog(db_url, str(tmp_path / "kept"), batch=3)
    try:
        rows = [{"path": f"img{i}.png", "score": float(i), "levels": {"a": float(i), "b": 2.0 * i},
                 "pvalue": 1.0 / (i + 1), "anomalous": i % 3 == 0} for i in range(10)]
        ids = [log.record("m" if i < 7 else "n", 1, "f" * 64, r, f"image {i}".encode(), ".PNG")
               for i, r in enumerate(rows)]
        assert log.flush(30) and log.pending == 0
        got = log.query(limit=100)
        assert [r["id"] for r in got] == ids and [r["seq"] for r in got] == sorted(r["seq"] for r in got)
        first = got[0]
        assert first["levels"] == {"a": 0.0, "b": 0.0} and first["anomalous"] is True and first["model"] == "m"
        assert first["image_sha256"] == gaussad.service.results_log.sha256(b"image 0")
        assert (tmp_path / "kept" / first["image_file"]).read_bytes() == b"image 0"
        assert first["image_file"].endswith(".png")
        assert [r["filename"] for r in log.query(model="m", anomalous=True)] == ["img0.png", "img3.png", "img6.png"]
        page1 = log.query(model="m", limit=4)
        page2 = log.query(model="m", limit=4, cursor=page1[-1]["seq"])
        assert [r["id"] for r in page1 + page2] == ids[:7]
        assert log.query(since=time.time() + 60) == [] and len(log.query(since=0)) == 10
        assert log.count() == 10 and log.count("n") == 3
        log.label(ids[0], "good")
        log.label(ids[1], "defect")
        log.label(ids[3], "defect")
        with pytest.raises(GaussadError, match="label must be"):
            log.label(ids[2], "bad")
        with pytest.raises(KeyError):
            log.label("nope", "good")
        assert [r["id"] for r in log.to_apply("m")] == [ids[0]]
        log.mark_applied([log.get(ids[0])["seq"]], 2)
        assert log.to_apply("m") == [] and log.get(ids[0])["applied_in"] == 2
        log.unapply("m", 2)
        assert [r["id"] for r in log.to_apply("m")] == [ids[0]]
        (rate,) = log.rates()
        assert rate == {"model": "m", "version": 1, "good": 1, "good_flagged": 1, "defect": 2, "defect_flagged": 1,
                        "fpr": 1.0, "tpr": 0.5}
        csv = "".join(log.csv_stream(limit=100)).splitlines()
        assert csv[0].startswith("seq,id,time,model,version") and len(csv) == 11 and ids[4] in csv[5]
    finally:
        log.close()


def test_a_table_of_an_older_gaussad_gets_the_evidence_column_and_keeps_its_rows(db_url, caplog):
    """Issue 35: the log stores each row's evidence; a results table made before that column existed (the old
    columns, one old row) is opened, the column added (the old row's empty), and new rows carry their evidence."""
    import logging

    import sqlalchemy as sa

    engine = sa.create_engine(gaussad.service.results_log._url(db_url))
    old = [c for c in gaussad.service.results_log.COLUMNS if c not in gaussad.service.results_log.ADDED_COLUMNS]
    types = {"time": sa.Float, "score": sa.Float, "pvalue": sa.Float, "map_max": sa.Float, "version": sa.Integer,
             "anomalous": sa.Boolean, "labelled_at": sa.Float, "applied_in": sa.Integer}
    table = sa.Table("results", sa.MetaData(), sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                     *[sa.Column(c, types.get(c, sa.Text)) for c in old if c != "seq"])
    table.drop(engine, checkfirst=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(id="old", time=1.0, model="m", version=1, model_sha256="f",
                                           image_sha256="f", filename="a.png", score=2.0, levels='{"a": 2.0}',
                                           anomalous=False))
    engine.dispose()
    evidence = {"rule": "conformal", "text": "ok: p = 0.5 > target FPR 0.01"}
    with caplog.at_level(logging.INFO, logger="gaussad.service.results_log"):
        log = ResultsLog(db_url)
    try:
        assert "added the evidence column" in caplog.text
        rid = log.record("m", 1, "f" * 64, {"path": "b.png", "score": 1.0, "levels": {"a": 1.0}, "pvalue": 0.5,
                                            "anomalous": False, "evidence": evidence}, b"b")
        old_row, new_row = log.query(limit=10)
        assert (old_row["id"], old_row["evidence"], old_row["levels"]) == ("old", None, {"a": 2.0})
        assert (new_row["id"], new_row["evidence"]) == (rid, evidence)
        header, first, second = "".join(log.csv_stream()).splitlines()
        assert header.endswith(",evidence") and first.endswith(",") and "target FPR 0.01" in second
    finally:
        log.close()
    again = ResultsLog(db_url)  # opened once more: nothing left to add
    try:
        assert [r["evidence"] for r in again.query(limit=10)] == [None, evidence]
    finally:
        again.close()


def test_a_column_another_service_added_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two services opening one older table: the second one's ALTER fails (the column is there by then); it checks
    again and goes on instead of refusing the database."""
    import sqlalchemy as sa

    ResultsLog(str(tmp_path / "r.sqlite")).close()  # a table that has the column
    real, calls = sa.inspect, []

    def stale(engine):  # the first look misses the column, as it did before the other service added it
        inspector = real(engine)
        calls.append(1)
        if len(calls) == 1:
            get = inspector.get_columns
            inspector.get_columns = lambda table: [c for c in get(table) if c["name"] != "evidence"]
        return inspector

    monkeypatch.setattr(sa, "inspect", stale)
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    try:
        assert len(calls) == 2 and log.query() == []
    finally:
        log.close()


def test_unusable_database_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="missing/r.sqlite: cannot open the results database"):
        ResultsLog(str(tmp_path / "missing" / "r.sqlite"))
    assert main(["serve", str(tmp_path), "--db", str(tmp_path / "missing" / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "cannot open the results database" in err and err.count("\n") == 1
    with pytest.raises(DataError, match=r"postgresql\+pg8000://u:\*\*\*@127.0.0.1:1/x: cannot open") as info:
        ResultsLog("postgresql+pg8000://u:secret@127.0.0.1:1/x")
    assert "secret" not in str(info.value)


def test_closing_the_log_writes_everything_queued(tmp_path):
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    row = {"path": "a.png", "score": 1.0, "levels": {"a": 1.0}, "pvalue": 0.5, "anomalous": False}
    ids = [log.record("m", 1, "0" * 64, row, bytes([i % 256])) for i in range(2000)]
    log.close()
    again = ResultsLog(str(tmp_path / "r.sqlite"))
    try:
        assert [r["id"] for r in again.query(limit=5000)] == ids
    finally:
        again.close()


def test_results_endpoints_and_csv(model_dir, tiny_category, tmp_path):
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    images = list_images(tiny_category / "test" / "good")[:3] + list_images(tiny_category / "test" / "patch")[:3]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        body = c.post("/models/plain/score", files=_upload(images)).json()
        listed = c.get("/results", params={"model": "plain", "limit": 4}).json()
        rest = c.get("/results", params={"model": "plain", "cursor": listed["next_cursor"]}).json()
        rows = listed["results"] + rest["results"]
        assert rest["next_cursor"] is None
        assert [r["id"] for r in rows] == [r["id"] for r in body["results"]]
        for r, answer in zip(rows, body["results"]):
            assert (r["filename"], r["score"], r["anomalous"], r["levels"], r["evidence"]) == (
                answer["path"], answer["score"], answer["anomalous"], answer["levels"], answer["evidence"])
            assert r["evidence"]["text"].startswith("flagged" if r["anomalous"] else "ok")  # issue 35
            assert r["version"] == 1 and r["model_sha256"] == gaussad.service.results_log.sha256(
                (model_dir / "plain.gaussad").read_bytes())
            assert r["time_iso"].endswith("Z")
        flagged = c.get("/results", params={"anomalous": True}).json()["results"]
        assert [r["id"] for r in flagged] == [r["id"] for r in body["results"] if r["anomalous"]]
        assert c.get("/results", params={"since": "2999-01-01T00:00:00Z"}).json()["results"] == []
        assert c.get("/results", params={"since": "yesterday"}).status_code == 422
        csv = c.get("/results.csv", params={"model": "plain"})
        assert csv.headers["content-type"].startswith("text/csv") and len(csv.text.splitlines()) == 7
        assert c.post("/results/nope/label", json={"label": "good"}).status_code == 404
        assert c.post(f"/results/{rows[0]['id']}/label", json={"label": "maybe"}).status_code == 422
        # without --keep-images an update cannot get the images
        c.post(f"/results/{rows[0]['id']}/label", json={"label": "good"})
        answer = c.post("/models/plain/update")
        assert answer.status_code == 409 and "--keep-images" in answer.json()["detail"]
        assert c.post("/models/plain/rollback").status_code == 409


def test_metrics_count_requests_images_and_versions(model_dir, tiny_category):
    images = list_images(tiny_category / "test" / "patch")[:3]
    with TestClient(create_app(load_models(model_dir), folder=model_dir)) as c:
        body = c.post("/models/plain/score", files=_upload(images)).json()
        text = c.get("/metrics").text
    flagged = sum(r["anomalous"] for r in body["results"])
    assert 'gaussad_images_scored_total{model="plain"} 3.0' in text
    assert f'gaussad_images_flagged_total{{model="plain"}} {float(flagged)}' in text
    assert 'gaussad_model_version{model="plain"} 1.0' in text
    assert 'gaussad_requests_total{method="POST",route="/models/{name}/score",status="200"} 1.0' in text
    assert 'gaussad_request_seconds_count{method="POST",route="/models/{name}/score"} 1.0' in text


# ----- feedback --------------------------------------------------------------------------------------------------
def _score(c, images, headers=None):
    """Result rows of ``images``, sent 10 per request."""
    out = []
    for i in range(0, len(images), 10):
        answer = c.post("/models/plain/score", files=_upload(images[i:i + 10]), headers=headers)
        assert answer.status_code == 200, answer.text
        out += answer.json()["results"]
    return out


def _feedback_round(c, images, headers=None):
    """Score ``images``, mark the flagged ones good; returns (results, flagged names)."""
    results = _score(c, images, headers)
    flagged = [r for r in results if r["anomalous"]]
    for r in flagged:
        assert c.post(f"/results/{r['id']}/label", json={"label": "good"}, headers=headers).status_code == 200
    return results, flagged


def test_feedback_update_of_a_default_preset_model_keeps_its_fused_calibration(tiny_category, tmp_path):
    """The default preset (fused score, conformal law): an update adds the marked images exactly and keeps the
    calibration it was fitted with (out-of-fold global scores and map peaks, paired), so it still decides, at the
    same stated target FPR."""
    folder = tmp_path / "models"
    folder.mkdir()
    settings = {**TINY, "preset": "recommended", "map_levels": ["stage2", "stage3"]}
    original = GaussianAD(**settings).fit(list_images(tiny_category / "train" / "good"))
    assert original.setting("image_score") == "fused" and original.setting("threshold") == "conformal"
    original.save(folder / "plain.gaussad")  # the name the helpers above score with
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:4]
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    with TestClient(create_app(load_models(folder), results_log=log, folder=folder)) as c:
        _, flagged = _feedback_round(c, foreign)
        assert len(flagged) == 4
        stated = c.get("/models").json()[0]["threshold"]
        assert stated["image_score"] == "fused" and stated["fpr"] == pytest.approx(1 / 11)  # 10 images: 1/(n+1)
        assert stated["fpr_requested"] == 0.01 and "deciding at 0.09091" in stated["note"]
        assert c.post("/models/plain/update").json()["n_samples"] == 14
        assert c.get("/models").json()[0]["threshold"] == stated
        after = c.post("/models/plain/score", files=_upload(foreign)).json()["results"]
    updated = gaussad.load(folder / "plain.gaussad")
    np.testing.assert_array_equal(updated.calibration_scores_, original.calibration_scores_)
    np.testing.assert_array_equal(updated.map_calibration_, original.map_calibration_)
    levels, peaks, _ = updated.score_images(foreign)
    decisions, pvalues = updated.decide(levels, map_peaks=peaks)
    assert [r["pvalue"] for r in after] == pytest.approx(list(pvalues)) and [r["anomalous"] for r in after] == list(
        decisions)


def test_feedback_update_adds_images_exactly_and_rollback_restores(model_dir, tiny_category, tmp_path):
    """The updated model equals partial_fit of the original on the marked images; rollback gives its scores back."""
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    # the other texture's images: far from brick, every one is flagged
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:4]
    original = gaussad.load(model_dir / "plain.gaussad")
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        before, flagged = _feedback_round(c, foreign)
        assert len(flagged) == 4
        update = c.post("/models/plain/update").json()
        assert update["version"] == 2 and update["added"] == 4 and update["n_samples"] == 14
        after = c.post("/models/plain/score", files=_upload(foreign)).json()
        expected = original.partial_fit(foreign).score_samples(foreign)
        np.testing.assert_allclose([r["score"] for r in after["results"]], expected, rtol=1e-6)
        assert after["version"] == 2 and max(r["score"] for r in after["results"]) < min(r["score"] for r in before)
        assert c.post("/models/plain/update").status_code == 409  # nothing left to apply
        assert c.get("/feedback/rates").json() == [{"model": "plain", "version": 1, "good": 4, "good_flagged": 4,
                                                     "defect": 0, "defect_flagged": 0, "fpr": 1.0, "tpr": None}]
        history = model_dir / "history" / "plain"
        assert sorted(p.name for p in history.iterdir()) == ["v1.gaussad", "v2.gaussad", "versions.json"]
        assert gaussad.load(model_dir / "plain.gaussad").n_samples_ == 14

        back = c.post("/models/plain/rollback").json()
        assert back == {"model": "plain", "version": 1, "dropped": 2, "sha256": before and back["sha256"]}
        again = c.post("/models/plain/score", files=_upload(foreign)).json()
        assert [r["score"] for r in again["results"]] == [r["score"] for r in before]
        assert (model_dir / "plain.gaussad").read_bytes() == (history / "v1.gaussad").read_bytes()
        assert len(c.get("/results", params={"limit": 100}).json()["results"]) == 12
        # the rolled-back images are pending again; the next update is version 3
        assert c.post("/models/plain/update").json()["version"] == 3
        assert c.get("/models/plain/versions").json()["version"] == 3
        assert c.post("/models/plain/rollback").json()["version"] == 1
        assert c.post("/models/plain/rollback").status_code == 409
    # a restarted service finds the version in the history
    with TestClient(create_app(load_models(model_dir), folder=model_dir)) as c:
        assert c.get("/models").json()[0]["version"] == 1


def test_update_keeps_conformal_calibration(tiny_category, tmp_path):
    """A conformal model keeps its calibration scores and method; the Gaussians gain the added images."""
    folder = tmp_path / "models"
    folder.mkdir()
    train = list_images(tiny_category / "train" / "good")
    model = GaussianAD(**TINY, threshold="conformal", fpr=0.2).fit(train)
    model.save(folder / "plain.gaussad")
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2]
    with TestClient(create_app(load_models(folder), results_log=log, folder=folder)) as c:
        _feedback_round(c, foreign)
        assert c.post("/models/plain/update").status_code == 200
        calibration = c.get("/models").json()[0]["calibration"]
    updated = gaussad.load(folder / "plain.gaussad")
    np.testing.assert_array_equal(updated.calibration_scores_, model.calibration_scores_)
    assert updated.state_.calibration_method == "cv" == calibration["method"] and updated.n_samples_ == 12
    np.testing.assert_allclose(updated.score_samples(foreign),
                               GaussianAD(**TINY).fit(train).partial_fit(foreign).score_samples(foreign), rtol=1e-6)


def test_swap_does_not_fail_requests_in_flight(model_dir, tiny_category, tmp_path):
    """Score requests sent while updates and rollbacks run are all answered 200, by one version or the other."""
    import threading

    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2]
    good = list_images(tiny_category / "test" / "good")[:1]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir, workers=2)) as c:
        _feedback_round(c, foreign)
        statuses, versions, stop = [], set(), threading.Event()

        def hammer():
            while not stop.is_set():
                r = c.post("/models/plain/score", files=_upload(good))
                statuses.append(r.status_code)
                versions.add(r.json().get("version"))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        for _ in range(2):
            assert c.post("/models/plain/update").status_code == 200
            assert c.post("/models/plain/rollback").status_code == 200
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}


# ----- drift -------------------------------------------------------------------------------------------------------
def test_drift_tests_against_independent_figures():
    rng = np.random.default_rng(0)
    calm = drift(rng.random(200) < 0.01, rng.random(200), fpr=0.01)
    assert calm["alarm"] is False and calm["status"] == "ok"
    k = 12  # 12 of 200 flagged at a 1 % target: binomial tail P(X >= 12) for n=200, p=0.01
    flags = np.zeros(200, bool)
    flags[:k] = True
    alarm = drift(flags, rng.random(200), fpr=0.01)
    assert alarm["alarm"] and alarm["binomial_p"] == pytest.approx(stats.binom.sf(k - 1, 200, 0.01), rel=1e-9)
    assert "flag rate 12/200" in alarm["reasons"][0]
    shifted = drift(np.zeros(200, bool), rng.random(200) ** 2, fpr=0.01)  # p-values piled towards 0
    assert shifted["alarm"] and shifted["ks_p"] < 1e-3 and "Kolmogorov-Smirnov" in shifted["reasons"][0]
    conservative = drift(np.zeros(200, bool), np.sqrt(rng.random(200)), fpr=0.01)  # larger than uniform: fine
    assert not conservative["alarm"]
    few = drift([True] * 5, [0.0] * 5, fpr=0.01)
    assert not few["alarm"] and few["status"].startswith("too few images")


def test_drift_alarm_in_health_and_history(model_dir, tiny_category, tmp_path):
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    foreign = list_images(tiny_category.parent / "gravel" / "train" / "good")
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        assert c.get("/health").json()["drift"]["plain"]["alarm"] is False
        assert len(foreign) == 10
        for _ in range(2):
            c.post("/models/plain/score", files=_upload(foreign))
        assert log.flush(30)  # /health reads what is written, without waiting for the writer
        health = c.get("/health").json()
        history = c.get("/models/plain/history").json()
    d = health["drift"]["plain"]
    assert d["n"] == 20 and d["alarm"] is True and d["status"] == "drift"
    assert history["drift"] == d and len(history["points"]) == 20 and history["threshold"] > 0
    assert [p["time"] for p in history["points"]] == sorted(p["time"] for p in history["points"])


# ----- a real server under load with the log on --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_load_with_the_log_answers_everything_and_logs_each_image_once(backend, served_dir, tiny_category, tmp_path,
                                                                      request):
    from bench.common import serving
    from bench.speed.serve_load import check, log_check, run_load

    db = str(tmp_path / "results.sqlite") if backend == "sqlite" else request.getfixturevalue("db_url_postgresql")
    images = list_images(tiny_category / "test" / "good") + list_images(tiny_category / "test" / "patch")
    names = [f"{p.parent.name}-{p.name}" for p in images]
    expected = dict(zip(names, map(float, gaussad.load(served_dir / "plain.gaussad").score_samples(images))))
    payloads = [(n, p.read_bytes()) for n, p in zip(names, images)]
    with serving(served_dir, "--log-level", "warning", "--workers", "2", "--db", db,
                 "--keep-images", str(tmp_path / "kept")) as url:
        outcomes, _, _ = run_load(url, "plain", payloads, n=200, concurrency=200)
    summary = check(outcomes, expected)
    assert summary["correct"] == 200 and summary["server_errors"] == 0 and summary["no_answer"] == 0, summary
    log = ResultsLog(db)
    try:
        rows = log.query(limit=1000)
    finally:
        log.close()
    result = log_check(outcomes, [r["id"] for r in rows])
    assert result == {"rows": 200, "answered_images": 200, "distinct_rows": 200, "exact": True}
    by_id = {row["id"]: row for o in outcomes for row in o.body["results"]}
    for r in rows:
        assert r["score"] == by_id[r["id"]]["score"] and r["filename"] == by_id[r["id"]]["path"]
    assert len(list((tmp_path / "kept").iterdir())) == len(set(r["image_sha256"] for r in rows)) == len(images)


@pytest.fixture
def db_url_postgresql(postgres_url):
    import sqlalchemy as sa

    name = f"t{time.time_ns()}"
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return postgres_url.replace("@/postgres?", f"@/{name}?")


# ----- the page in Chromium ------------------------------------------------------------------------------------------
def test_page_in_chromium_key_feedback_and_new_version(served_dir, tiny_category, tmp_path):
    from .test_serve import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    from playwright.sync_api import sync_playwright

    from bench.common import serving

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(served_dir / "plain.gaussad", folder / "plain.gaussad")
    store = KeyStore([], tmp_path / "keys.json")
    admin = store.add("boss", "admin")
    store.save()
    upload = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2] \
        + list_images(tiny_category / "test" / "good")[:1]
    with serving(folder, "--log-level", "warning", "--keys", str(store.path), "--db", str(tmp_path / "r.sqlite"),
                 "--keep-images", str(tmp_path / "kept")) as url, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                        headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(url + "/")
            page.wait_for_selector("#key-form:not([hidden])")
            assert "needs an API key" in page.inner_text("#key-message")
            page.fill("#key", "wrong")
            page.click("#key-submit")
            page.wait_for_function("document.getElementById('key-message').textContent.includes('not accepted')")
            page.fill("#key", admin)
            page.click("#key-submit")
            page.wait_for_selector("#model option", state="attached")
            assert page.evaluate("sessionStorage.getItem('gaussad-key')") == admin
            assert page.inner_text("#version") == "version 1"
            page.set_input_files("#files", [str(p) for p in upload])
            page.wait_for_function("document.querySelectorAll('#results .card').length === 3")
            first = page.locator("#results .card").first  # the most anomalous
            assert first.locator(".decision").inner_text() == "ANOMALY"
            first.locator(".mark-good").click()
            first.locator(".label", has_text="marked good").wait_for()
            page.wait_for_selector("#rates:not([hidden])")
            cells = page.eval_on_selector_all("#rates tbody td", "ts => ts.map(t => t.textContent)")
            assert cells == ["plain", "1", "1", "1 (100.0 %)", "0", "0 (–)"]
            page.wait_for_selector("#history:not([hidden])")
            assert page.locator("#chart circle").count() == 3 and page.locator("#chart .threshold").count() == 1
            # round dots on screen (the chart is drawn in its own pixels) and labelled axes
            boxes = page.eval_on_selector_all("#chart circle", """cs => cs.map(c => {
                const b = c.getBoundingClientRect(); return [b.width, b.height]; })""")
            assert all(w > 0 and abs(w - h) < 0.01 for w, h in boxes), boxes
            assert page.text_content("#chart .ylabel") == "score"
            assert "scored images, oldest left" in page.text_content("#chart .xlabel")
            assert page.locator("#chart .ytick").count() == 3 and page.locator("#chart .axis").count() == 2
            page.set_viewport_size({"width": 500, "height": 700})  # redrawn at the new width: still round
            page.wait_for_function("""() => { const b = document.querySelector('#chart circle').getBoundingClientRect();
                return Math.abs(b.width - b.height) < 0.01; }""")
            assert page.is_visible("#apply")  # this service keeps the images (--keep-images): feedback can work
            page.click("#apply")
            page.wait_for_function("document.getElementById('version').textContent === 'version 2'")
            assert "trained on 11 images" in page.inner_text("#model-info")
            assert page.inner_text("#error") == ""
        finally:
            browser.close()
    assert gaussad.load(folder / "plain.gaussad").n_samples_ == 11


# ----- feedback on real data --------------------------------------------------------------------------------------
def test_feedback_on_bottle_clears_the_false_alarms_and_rollback_restores(tmp_path, capsys):
    """A bottle model fitted on 40 good images; the good test images it flags are marked good and applied: they
    then score below the threshold, the version went up, and rollback gives back the previous scores exactly."""
    from .conftest import needs_shared

    bottle = needs_shared("mvtec_ad", "bottle")
    folder = tmp_path / "models"
    folder.mkdir()
    # the recommended preset before issue 30 (global score, chi2): it flags good test images, the feedback's work
    # (today's default flags none of them: docs/guide/thresholds.md, "Which decision rule")
    GaussianAD(image_score="global", threshold="chi2", input_size="native").fit(
        list_images(bottle / "train" / "good")[:40]).save(folder / "plain.gaussad")
    good = list_images(bottle / "test" / "good")
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    with TestClient(create_app(load_models(folder), results_log=log, folder=folder)) as c:
        before, flagged = _feedback_round(c, good)
        assert flagged, "the 40-image model flags none of the good test images: nothing to correct"
        threshold = c.get("/models").json()[0]["threshold"]
        update = c.post("/models/plain/update").json()
        assert update["version"] == 2 and update["added"] == len(flagged) and update["n_samples"] == 40 + len(flagged)
        after = {r["path"]: r for r in _score(c, good)}
        for r in flagged:
            assert not after[r["path"]]["anomalous"], r["path"]
        new_threshold = c.get("/models").json()[0]["threshold"]
        assert c.post("/models/plain/rollback").json()["version"] == 1
        again = _score(c, good)
        assert [(r["score"], r["levels"], r["anomalous"]) for r in again] == \
            [(r["score"], r["levels"], r["anomalous"]) for r in before]
    with capsys.disabled():
        print(f"\nbottle feedback: {len(flagged)}/{len(good)} good test images flagged by the 40-image model "
              f"(score threshold {threshold.get('score_threshold')}); after the update "
              f"{sum(after[r['path']]['anomalous'] for r in flagged)} of them flagged, "
              f"{sum(r['anomalous'] for r in after.values())}/{len(good)} good flagged in all "
              f"(score threshold {new_threshold.get('score_threshold')}); max score of the marked images "
              f"{max(r['score'] for r in flagged):.2f} -> {max(after[r['path']]['score'] for r in flagged):.2f}")


def test_two_updates_at_once_add_the_images_once(model_dir, tiny_category, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir, workers=2)) as c:
        _feedback_round(c, foreign)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: c.post("/models/plain/update"), range(2)))
        assert sorted(a.status_code for a in answers) == [200, 409]
        assert c.get("/models").json()[0]["n_samples"] == 12
