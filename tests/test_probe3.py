"""Issue 32, the third probe: keys, CSV cells, cursors, database URLs, outputs that are inputs, junk and newer
model files, damaged version histories. Each test fails on 157d632 (RELIABILITY.md, "Third probe")."""

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import gaussad
from gaussad import GaussianAD, ModelFormatError
from gaussad.cli import main
from gaussad.errors import DataError, GaussadError
from gaussad.intake.images import list_images
from gaussad.service.keys import KeyStore, is_loopback
from gaussad.detector.results import spreadsheet_safe
from gaussad.service.results_log import ResultsLog, sha256
from gaussad.service.app import create_app, load_models

from .conftest import TINY
from .test_operations import _upload, model_dir, served_dir  # noqa: F401 - fixtures

HOSTILE = ["=HYPERLINK(\"http://x.example\",\"click\")", "=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1+1)",
           "\t=1+1", "\r=1+1"]


# ----- keys: revocation at the next request, links written through, loose permissions refused (N3, N4, N22) ------
def test_a_removed_key_is_refused_at_the_next_request_and_an_added_one_works(model_dir, tmp_path):  # noqa: F811
    path = tmp_path / "keys.json"
    old = KeyStore.load(path, missing_ok=True)
    key = old.add("line1", "score")
    old.save()
    with TestClient(create_app(load_models(model_dir), keys=KeyStore.load(path), folder=model_dir)) as c:
        auth = {"Authorization": f"Bearer {key}"}
        assert c.get("/models", headers=auth).status_code == 200
        assert main(["keys", "remove", "line1", "--keys", str(path)]) == 0
        assert c.get("/models", headers=auth).status_code == 401
        store = KeyStore.load(path)
        new = store.add("line2", "score")
        store.save()
        assert c.get("/models", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        path.write_text("{ damaged")  # a file that cannot be read refuses every key, never the old ones
        os.chmod(path, 0o600)
        assert c.get("/models", headers={"Authorization": f"Bearer {new}"}).status_code == 401


def test_keys_through_a_symbolic_link_change_the_linked_file(tmp_path, capsys):
    real = tmp_path / "real" / "keys.json"
    real.parent.mkdir()
    link = tmp_path / "keys-link.json"
    link.symlink_to(real)
    assert main(["keys", "add", "a", "--keys", str(link)]) == 0
    assert main(["keys", "add", "b", "--keys", str(link)]) == 0
    assert main(["keys", "remove", "a", "--keys", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert [e.name for e in KeyStore.load(real).entries] == ["b"]  # the file serve reads


@pytest.mark.parametrize("mode", [0o666, 0o620])
def test_a_keys_file_others_may_write_is_refused(tmp_path, mode, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "a", "--keys", str(path)]) == 0
    os.chmod(path, mode)
    with pytest.raises(DataError, match=r"writable by (others|its group).*chmod 600"):
        KeyStore.load(path)
    assert main(["serve", str(tmp_path), "--keys", str(path), "--db", "none"]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_loopback_is_an_address_not_a_prefix():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("127.attacker.example", "127.0.0.1.nip.io", "0.0.0.0", "192.168.1.5", "::", ""):
        assert not is_loopback(host), host


# ----- CSV cells (N5) ---------------------------------------------------------------------------------------------
def test_spreadsheet_cells_never_start_a_formula():
    for text in HOSTILE:
        assert spreadsheet_safe(text) == "'" + text
    for text in ("good/000.png", "a=b.png", "", "001.png"):
        assert spreadsheet_safe(text) == text


def test_results_csv_escapes_hostile_upload_names(model_dir, tiny_category, tmp_path):  # noqa: F811
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    data = list_images(tiny_category / "test" / "good")[0].read_bytes()
    names = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(1+1)", "=HYPERLINK(1)"]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        files = [("files", (name, data, "image/png")) for name in names]
        assert c.post("/models/plain/score", files=files).status_code == 200
        log.flush()
        logged = [r["filename"] for r in c.get("/results").json()["results"]]
        text = c.get("/results.csv").text
    assert logged == names  # the upload names as sent
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["filename"] for r in rows] == ["'" + name for name in names]
    assert all(not r["score"].startswith("'") for r in rows)  # numbers stay numbers


def test_distributed_csv_escapes_hostile_names(tiny_category, tmp_path):
    from gaussad.tools import distributed

    model = GaussianAD(backbone="efficientnet-lite0", input_size=64, levels=["stem", "stage1"], preset="paper")
    model.fit(list_images(tiny_category / "train" / "good"))
    model.save(tmp_path / "m.gaussad")
    images = list_images(tiny_category / "test" / "good")[:3]
    names = ["=1+1", "@SUM(A1)", "ok.png"]
    out = tmp_path / "r.csv"
    with distributed.connect("local:1") as client:
        distributed.score(tmp_path / "m.gaussad", images, names, out, client)
        assert [r["path"] for r in distributed.read_results(out)] == ["'=1+1", "'@SUM(A1)", "ok.png"]
        # N17: a finished .jsonl/.csv of an earlier run is refused, as a .parquet folder of another run is
        with pytest.raises(GaussadError, match=r"r\.csv: exists \(the results of an earlier run\)"):
            distributed.score(tmp_path / "m.gaussad", images, names, out, client)


# ----- cursors and database URLs (N13, N15) ------------------------------------------------------------------------
def test_huge_cursors_are_422_not_500(model_dir, tmp_path):  # noqa: F811
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        for path in ("/results", "/results.csv"):
            for cursor in ("9223372036854775808", "1e30", "-1"):
                assert c.get(path, params={"cursor": cursor}).status_code == 422, (path, cursor)
            assert c.get(path, params={"cursor": "9223372036854775807"}).status_code == 200


def test_an_unparsable_database_url_never_shows_its_password(tmp_path, capsys):
    url = "postgresql+pg8000://u:p@ss:w0rd@127.0.0.1:1/db"
    with pytest.raises(DataError) as info:
        ResultsLog(url)
    assert "w0rd" not in str(info.value) and "p@ss" not in str(info.value) and "ss:" not in str(info.value)
    assert "percent-encode" in str(info.value)
    model = tmp_path / "models"
    model.mkdir()
    assert main(["serve", str(model), "--db", url]) == 2
    err = capsys.readouterr().err
    assert "w0rd" not in err and err.count("\n") == 1


# ----- outputs that are inputs (N18) -------------------------------------------------------------------------------
def test_an_output_that_is_an_input_is_refused_before_any_work(model_dir, tiny_category, tmp_path, capsys):  # noqa: F811
    model = model_dir / "plain.gaussad"
    before = model.read_bytes()
    assert main(["export", str(model), "-o", str(model), "--quiet"]) == 2
    assert "is an input of this command" in capsys.readouterr().err and model.read_bytes() == before
    link = tmp_path / "link.gaussad"
    link.symlink_to(model)
    assert main(["export", str(link), "-o", str(model), "--quiet"]) == 2
    assert model.read_bytes() == before
    images = tmp_path / "imgs"
    images.mkdir()
    for p in list_images(tiny_category / "train" / "good")[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    first = sorted(images.iterdir())[0]
    pixels = first.read_bytes()
    assert main(["fit", str(images), "-o", str(first), "--quiet", "--preset", "paper", "--input-size", "64"]) == 2
    assert "is an input of this command" in capsys.readouterr().err and first.read_bytes() == pixels
    assert main(["score", str(model), str(images), "--dask", "local:1", "--out", str(first)]) == 2


# ----- model files: junk read cheaply, newer formats named (N19, N21 in test_model_files) -------------------------
def test_a_large_junk_file_is_refused_from_its_first_bytes(tmp_path, monkeypatch):
    junk = tmp_path / "junk.gaussad"
    with open(junk, "wb") as fh:
        fh.write(b"\xff" * 64)
        fh.truncate(6 * 2**30)  # 6 GiB, sparse
    read = []
    real_open = os.fdopen

    def counting_fdopen(fd, *args, **kwargs):
        fh = real_open(fd, *args, **kwargs)
        original = fh.read

        def read_some(n=-1):
            data = original(n)
            read.append(len(data))
            return data

        fh.read = read_some
        return fh

    monkeypatch.setattr(os, "fdopen", counting_fdopen)
    with pytest.raises(ModelFormatError, match="not a gaussad model file"):
        gaussad.load(junk)
    assert sum(read) <= 8


# ----- version histories (N9, N10) ---------------------------------------------------------------------------------
def _history(model_dir) -> Path:  # noqa: F811
    return model_dir / "history" / "plain"


@pytest.mark.parametrize("damage", ['{"current": 1, "stack": [], "versions": {}}', "not json", '[1, 2]'])
def test_a_damaged_history_never_overwrites_a_kept_version(model_dir, tiny_category, tmp_path, damage):  # noqa: F811
    """An update, then a damaged versions.json: the service starts, the damaged file is kept aside, and numbering goes
    on after the versions on disk, so v1 and v2 keep their bytes and the next update is v4 (v3: the served model)."""
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2]

    def app():
        return create_app(load_models(model_dir), results_log=ResultsLog(str(tmp_path / "r.sqlite"),
                                                                        str(tmp_path / "kept")), folder=model_dir)

    def mark_good(c) -> None:
        for row in c.post("/models/plain/score", files=_upload(foreign)).json()["results"]:
            assert c.post(f"/results/{row['id']}/label", json={"label": "good"}).status_code == 200

    with TestClient(app()) as c:
        mark_good(c)
        assert c.post("/models/plain/update").json()["version"] == 2
    kept = {p.name: p.read_bytes() for p in _history(model_dir).glob("v*.gaussad")}
    (_history(model_dir) / "versions.json").write_text(damage)
    with TestClient(app()) as c:
        answer = c.get("/models/plain/versions").json()
        assert answer["version"] == 3, answer
        mark_good(c)
        assert c.post("/models/plain/update").json()["version"] == 4
        assert c.post("/models/plain/rollback").json()["version"] == 3
    for name, data in kept.items():
        assert (_history(model_dir) / name).read_bytes() == data
    assert [p.name.split("-")[0] for p in _history(model_dir).glob("versions.json.damaged-*")] == ["versions.json.damaged"]


# ----- cross-site requests and DNS rebinding (N8) -------------------------------------------------------------------
def test_state_changing_requests_from_another_sites_page_are_refused(model_dir, tiny_category, tmp_path):  # noqa: F811
    log = ResultsLog(str(tmp_path / "r.sqlite"))
    image = list_images(tiny_category / "test" / "good")[0]
    app = create_app(load_models(model_dir), results_log=log, folder=model_dir, loopback_only=True)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:8000"}):
            assert c.post("/models/plain/update", headers=headers).status_code == 403, headers
            assert c.post("/models/plain/score", files=_upload([image]), headers=headers).status_code == 403
        same = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
        assert c.post("/models/plain/score", files=_upload([image]), headers=same).status_code == 200
        assert c.post("/models/plain/score", files=_upload([image])).status_code == 200  # curl, scripts: no headers
        assert c.get("/results", headers={"Origin": "https://evil.example"}).status_code == 200  # reads: CORS guards
        log.flush()
        assert log.count() == 2
        # DNS rebinding: another site's name pointed at 127.0.0.1 reaches a loopback service with its own Host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            assert c.get("/results", headers={"Host": host}).status_code == 421, host
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host


def test_a_page_of_another_origin_cannot_update_or_score_in_chromium(served_dir, tiny_category, tmp_path):  # noqa: F811
    """The keyless loopback service of the probe: a page from another origin posts an update and a score with
    ``mode: 'no-cors'`` (no answer needed to do harm). Nothing changes: the version stays 1, no row is logged."""
    import shutil
    import urllib.request

    from bench.common import serving

    from .test_serve import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    from playwright.sync_api import sync_playwright

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(served_dir / "plain.gaussad", folder / "plain.gaussad")
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[0]
    with serving(folder, "--log-level", "warning", "--db", str(tmp_path / "r.sqlite"), "--keep-images",
                 str(tmp_path / "kept")) as url:
        import httpx

        row = httpx.post(url + "/models/plain/score", files=_upload([foreign])).json()["results"][0]
        assert httpx.post(f"{url}/results/{row['id']}/label", json={"label": "good"}).status_code == 200
        page_file = tmp_path / "evil.html"
        page_file.write_text(f"""<!DOCTYPE html><script>
            window.done = Promise.all([
              fetch('{url}/models/plain/update', {{method: 'POST', mode: 'no-cors'}}),
              fetch('{url}/models/plain/score', {{method: 'POST', mode: 'no-cors',
                    body: (() => {{ const f = new FormData(); f.append('files', new Blob(['x']), 'x.png'); return f; }})()}})
            ].map(p => p.catch(() => null))).then(() => 'sent');
            </script>""")
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                            headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(page_file.resolve().as_uri())
                assert page.evaluate("window.done") == "sent"
            finally:
                browser.close()
        with urllib.request.urlopen(url + "/models/plain/versions") as answer:
            assert json.loads(answer.read())["version"] == 1
        assert len(httpx.get(url + "/results").json()["results"]) == 1


def test_health_without_a_key_says_only_whether_the_service_is_up(model_dir, tmp_path):  # noqa: F811
    """N22: with keys, an unauthenticated /health gives its status, whether keys are needed and the upload limits
    (what the page needs before a key), never model names, drift or flag rates; with a key, everything."""
    store = KeyStore([], tmp_path / "keys.json")
    key = store.add("op", "score")
    with TestClient(create_app(load_models(model_dir), keys=store, folder=model_dir)) as c:
        bare = c.get("/health").json()
        assert set(bare) == {"status", "auth", "limits"} and bare["status"] == "ok" and bare["auth"] is True
        wrong = c.get("/health", headers={"Authorization": "Bearer nope"}).json()
        assert set(wrong) == set(bare)
        full = c.get("/health", headers={"Authorization": f"Bearer {key}"}).json()
        assert full["models"] == ["plain"] and "drift" in full and "version" in full
    with TestClient(create_app(load_models(model_dir), folder=model_dir)) as c:  # no keys: all, as before
        assert c.get("/health").json()["models"] == ["plain"]


# ----- distributed fit refused before a cluster starts (N20); updates that cannot be kept (N12) ---------------------
# (a fused image score, refused here before issue 30, is now fitted on the cluster: tests/test_distributed.py)
@pytest.mark.parametrize("flags", [["--calibration", "0.2", "--threshold", "conformal"]])
def test_a_distributed_fit_it_cannot_do_is_refused_before_the_cluster_starts(tiny_category, tmp_path, capsys,
                                                                              monkeypatch, flags):
    from gaussad.tools import distributed

    started = []
    monkeypatch.setattr(distributed, "connect", lambda *a, **k: started.append(a) or pytest.fail("cluster started"))
    code = main(["fit", str(tiny_category), "-o", str(tmp_path / "m.gaussad"), "--quiet", "--dask", "local:1",
                 "--preset", "paper", "--input-size", "64", "--levels", "stem,stage1,stage2", *flags])
    err = capsys.readouterr().err
    assert code == 2 and started == [] and "a distributed fit" in err and err.count("\n") == 1


def test_an_update_whose_history_cannot_be_kept_is_409_and_changes_nothing(model_dir, tiny_category, tmp_path):  # noqa: F811
    (model_dir / "history").mkdir()
    (model_dir / "history" / "plain").write_text("a file where the history folder goes")
    before = (model_dir / "plain.gaussad").read_bytes()
    log = ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept"))
    foreign = list_images(tiny_category.parent / "gravel" / "test" / "good")[:2]
    with TestClient(create_app(load_models(model_dir), results_log=log, folder=model_dir)) as c:
        for row in c.post("/models/plain/score", files=_upload(foreign)).json()["results"]:
            assert c.post(f"/results/{row['id']}/label", json={"label": "good"}).status_code == 200
        answer = c.post("/models/plain/update")
        assert answer.status_code == 409 and "cannot keep its versions" in answer.json()["detail"]
        assert c.get("/models/plain/versions").json()["version"] == 1
    assert (model_dir / "plain.gaussad").read_bytes() == before


# ----- updates: a model file replaced while served, a folder that refuses the new version (N11, N12) --------------
def _service(model_dir, tmp_path):  # noqa: F811
    return create_app(load_models(model_dir), results_log=ResultsLog(str(tmp_path / "r.sqlite"), str(tmp_path / "kept")),
                      folder=model_dir)


def _mark_good(c, tiny_category) -> None:
    for row in c.post("/models/plain/score", files=_upload(list_images(
            tiny_category.parent / "gravel" / "test" / "good")[:2])).json()["results"]:
        assert c.post(f"/results/{row['id']}/label", json={"label": "good"}).status_code == 200


def test_an_update_of_a_model_file_replaced_while_served_is_409(model_dir, tiny_category, tmp_path):  # noqa: F811
    """The file refitted in place while served: the update and a rollback are refused (was: built on the replaced
    file, recorded "from v1", and v1 kept with the replaced bytes, so rollback was 422 for good); the replaced file
    keeps its bytes, and a restart serves it."""
    with TestClient(_service(model_dir, tmp_path)) as c:
        _mark_good(c, tiny_category)
        GaussianAD(**{**TINY, "levels": ["stem", "stage1"]}).fit(
            list_images(tiny_category.parent / "gravel" / "train" / "good")).save(model_dir / "plain.gaussad")
        replaced = (model_dir / "plain.gaussad").read_bytes()
        answer = c.post("/models/plain/update")
        assert answer.status_code == 409, answer.text
        assert "no longer the served version 1" in answer.json()["detail"]
        assert c.post("/models/plain/rollback").status_code == 409
        assert c.get("/models/plain/versions").json()["version"] == 1
    assert (model_dir / "plain.gaussad").read_bytes() == replaced
    assert not list(_history(model_dir).glob("v2.gaussad"))
    with TestClient(_service(model_dir, tmp_path)) as c:
        assert c.get("/models/plain/versions").json()["sha256"] == sha256(replaced)


@pytest.mark.parametrize("refusing", ["plain.gaussad", "versions.json"])
def test_an_update_the_model_folder_refuses_is_409_and_changes_nothing(model_dir, tiny_category, tmp_path,  # noqa: F811
                                                                       monkeypatch, refusing):
    """A read-only moment at the model file's (or the history's) rename: 409 naming the reason (was 422 with a
    ``v2.gaussad`` left behind; for the history, version 2 in memory while version 1 was served), the model file
    and history as before, and the next update once the fault is lifted is version 2."""
    import errno

    import gaussad.intake.files as files

    real = os.replace

    def read_only(src, dst):
        if Path(dst).name == refusing:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    before = (model_dir / "plain.gaussad").read_bytes()
    with TestClient(_service(model_dir, tmp_path)) as c:
        _mark_good(c, tiny_category)
        monkeypatch.setattr(files.os, "replace", read_only)
        answer = c.post("/models/plain/update")
        assert answer.status_code == 409, answer.text
        assert "Read-only file system" in answer.json()["detail"] and "nothing was changed" in answer.json()["detail"]
        assert c.get("/models/plain/versions").json()["version"] == 1
        assert (model_dir / "plain.gaussad").read_bytes() == before
        assert not (_history(model_dir) / "v2.gaussad").exists() and not (_history(model_dir) / "versions.json").exists()
        monkeypatch.setattr(files.os, "replace", real)
        assert c.post("/models/plain/update").json()["version"] == 2


# ----- leftovers: parameters set anew on a fitted model, complex distances, empty ONNX input, tune's ties ------------
@pytest.mark.parametrize("name, value, needle", [("levels", ["stem", "stage1"], r"levels \(\[0, 1, 2, 3\] vs \[0, 1\]\)"),
                                                 ("input_size", 32, r"input size \(64 vs 32\)")])
def test_levels_or_input_size_set_on_a_fitted_model_are_refused_by_partial_fit(tiny_category, tmp_path, name, value,
                                                                                needle):
    """As a backbone set anew is: ``partial_fit`` names the difference (was: the new value silently ignored, the
    images added at the fitted levels and size)."""
    files = list_images(tiny_category / "train" / "good")[:5]
    GaussianAD(**TINY).fit(files[:3]).save(tmp_path / "m.gaussad")
    model = gaussad.load(tmp_path / "m.gaussad")
    setattr(model, name, value)
    with pytest.raises(gaussad.InvalidParameterError, match=needle):
        model.partial_fit(files[3:])
    assert model.n_samples_ == 3


@pytest.mark.parametrize("values, kind", [(np.array([[1 + 2j]]), "complex numbers"), (np.array([[1 + 0j]]), "complex numbers"),
                                          (np.array([[1 + 2j]], dtype=object), "complex numbers"), ([["1.5"]], "text")])
def test_decide_refuses_distances_that_are_not_real_numbers(values, kind):
    """Was: complex distances decided on their real part (a ComplexWarning at most), text parsed as numbers."""
    model = GaussianAD(backbone=None).fit_features([np.random.default_rng(0).normal(size=(30, 3))])
    with pytest.raises(DataError, match=f"level distances must be real numbers, got {kind}"):
        model.decide(values)
    assert model.decide([[1.0]])[0].tolist() == [0]
