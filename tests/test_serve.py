"""The HTTP service: API through FastAPI's test client, concurrency, a real server under load, the page in Chromium."""

import asyncio
import base64
import contextlib
import io
import logging
import shutil
import threading
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy import stats

import gaussad
from bench.common import serving
from bench.speed.serve_load import check, run_load
from gaussad import GaussianAD
from gaussad.cli import build_parser
from gaussad.errors import DataError
from gaussad.detector.heatmap import heat_scale, render
from gaussad.intake.images import list_images, load_image
from gaussad.service.app import Limits, create_app, load_models

from .conftest import TINY

MAP_LEVELS = ["stage2", "stage3"]


@pytest.fixture(scope="module")
def model_dir(tiny_category, tmp_path_factory):
    """A folder with two tiny models: ``maps`` (with anomaly maps) and ``plain`` (without)."""
    folder = tmp_path_factory.mktemp("models")
    train = list_images(tiny_category / "train" / "good")
    GaussianAD(**TINY, map_levels=MAP_LEVELS).fit(train).save(folder / "maps.gaussad")
    GaussianAD(**TINY).fit(train).save(folder / "plain.gaussad")
    return folder


@pytest.fixture(scope="module")
def models(model_dir):
    return load_models(model_dir)


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models)) as c:
        yield c


@pytest.fixture(scope="module")
def test_images(tiny_category, tmp_path_factory):
    """Good and defective test images under distinct names, plus one non-square crop."""
    folder = tmp_path_factory.mktemp("upload")
    out = []
    for kind in ("good", "patch"):
        for src in list_images(tiny_category / "test" / kind)[:2]:
            out.append(folder / f"{kind}-{src.name}")
            shutil.copyfile(src, out[-1])
    Image.open(out[-1]).crop((0, 8, 60, 48)).save(folder / "crop.png")
    return out + [folder / "crop.png"]


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _expected(model_file, paths, fpr=0.01):
    """Scores, level distances, p-values and decisions computed apart from the service (scipy's chi-square)."""
    model = gaussad.load(model_file)
    levels = model.level_scores(paths)
    dofs, n_levels = model.feature_dims_, levels.shape[1]
    pvalue = np.minimum(n_levels * np.min([stats.chi2.sf(levels[:, i] ** 2, k) for i, k in enumerate(dofs)], axis=0), 1)
    limits = np.array([np.sqrt(stats.chi2.isf(fpr / n_levels, k)) for k in dofs])
    return levels, levels.mean(axis=1), pvalue, (levels > limits).any(axis=1)


# ----- model folder ------------------------------------------------------------------------------------------
def test_load_models_names_by_stem_and_skips_bad_files(model_dir, tmp_path, caplog):
    for f in model_dir.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
    (tmp_path / "junk.gaussad").write_bytes(b"not a model")
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="gaussad.service.catalog"):
        loaded = load_models(tmp_path)
    assert sorted(loaded) == ["maps", "plain"]
    assert any("junk.gaussad" in r.getMessage() for r in caplog.records)
    assert loaded["maps"].map_level_names_ == MAP_LEVELS and not loaded["plain"].map_gaussians_

    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    (only_junk / "a.gaussad").write_bytes(b"x")
    with pytest.raises(DataError, match="none of the 1 model files"):
        load_models(only_junk)


def test_load_models_refuses_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no model files"):
        load_models(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_models(tmp_path / "missing")


def test_serve_cli_defaults_are_the_service_defaults():
    args = build_parser().parse_args(["serve", "models"])
    limits = Limits(max_file_bytes=int(args.max_file_mb * 2**20), max_files=args.max_files, max_pixels=args.max_pixels)
    assert limits == Limits()
    assert (args.host, args.port, args.fpr) == ("127.0.0.1", 8000, None)


# ----- API -----------------------------------------------------------------------------------------------------
def test_health_and_models(client, models):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["maps", "plain"]
    assert health["limits"]["max_files"] == Limits().max_files
    listed = {m["name"]: m for m in client.get("/models").json()}
    assert set(listed) == {"maps", "plain"}
    for name, info in listed.items():
        model = models[name]
        assert info["backbone"] == "efficientnet-lite0" and info["n_samples"] == 10 == model.n_samples_
        assert info["levels"] == TINY["levels"] and info["input_size"] == TINY["input_size"]
        rule = info["threshold"]
        assert rule["method"] == "chi2" == model.threshold and rule["fpr"] == 0.01 == model.fpr
        expected = [np.sqrt(stats.chi2.isf(0.01 / 4, d)) for d in model.feature_dims_]
        np.testing.assert_allclose(list(rule["level_thresholds"].values()), expected, rtol=1e-9)
    assert listed["maps"]["maps"] and listed["maps"]["map_levels"] == MAP_LEVELS
    assert not listed["plain"]["maps"]


def test_models_report_their_own_conformal_rule(tiny_category):
    """A calibrated model is served with its saved method and FPR; the score threshold is the conformal quantile."""
    train = list_images(tiny_category / "train" / "good")
    model = GaussianAD(**TINY, threshold="conformal", fpr=0.3, calibration=0.4).fit(train)
    cal = np.sort(model.calibration_scores_)
    rank = int(np.ceil((cal.size + 1) * (1 - 0.3)))
    with TestClient(create_app({"cal": model})) as c:
        rule = c.get("/models").json()[0]["threshold"]
        assert rule["method"] == "conformal" and rule["fpr"] == 0.3
        assert rule["score_threshold"] == pytest.approx(cal[rank - 1]) and "level_thresholds" not in rule
        calibration = c.get("/models").json()[0]["calibration"]
        assert calibration == {"method": "split", "n_scores": 4, "min_fpr": pytest.approx(0.2), "fpr": 0.3,
                               "score_threshold": pytest.approx(cal[rank - 1])}
        good = list_images(tiny_category / "test" / "good")[:2]
        body = c.post("/models/cal/score", files=_files(good)).json()
    assert body["fpr"] == 0.3
    scores = model.score_samples(good)
    expected_p = [(1 + (cal >= s).sum()) / (cal.size + 1) for s in scores]
    np.testing.assert_allclose([r["pvalue"] for r in body["results"]], expected_p, rtol=1e-9)


@pytest.mark.parametrize("fpr", [None, 0.4])
def test_score_matches_the_library(client, model_dir, test_images, fpr):
    params = {} if fpr is None else {"fpr": fpr}
    resp = client.post("/models/plain/score", files=_files(test_images), params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "plain" and body["fpr"] == (fpr or 0.01)
    rows = body["results"]
    levels, scores, pvalues, decisions = _expected(model_dir / "plain.gaussad", test_images, fpr or 0.01)
    assert [r["path"] for r in rows] == [p.name for p in test_images]
    np.testing.assert_allclose([r["score"] for r in rows], scores, rtol=1e-5)
    np.testing.assert_allclose([list(r["levels"].values()) for r in rows], levels, rtol=1e-5)
    assert all(list(r["levels"]) == TINY["levels"] for r in rows)
    np.testing.assert_allclose([r["pvalue"] for r in rows], pvalues, rtol=1e-3, atol=1e-12)
    assert [r["anomalous"] for r in rows] == list(decisions)
    assert all("overlay" not in r for r in rows)


def test_uploads_keep_their_relative_paths(client, test_images):
    """The page sends a folder's files by their path inside it (webkitRelativePath); rows keep that name."""
    data = test_images[0].read_bytes()
    files = [("files", (name, data, "image/png")) for name in ("test/good/000.png", "test/crack/000.png")]
    resp = client.post("/models/plain/score", files=files)
    assert resp.status_code == 200, resp.text
    assert [r["path"] for r in resp.json()["results"]] == ["test/good/000.png", "test/crack/000.png"]


def test_score_with_maps_gives_overlays_at_the_image_size(client, model_dir, test_images):
    crop = test_images[-1]
    resp = client.post("/models/maps/score", files=_files([test_images[0], crop]), params={"maps": "true"})
    assert resp.status_code == 200, resp.text
    row = resp.json()["results"][1]
    assert row["overlay"].startswith("data:image/png;base64,")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["overlay"].split(",", 1)[1]))))
    model = gaussad.load(model_dir / "maps.gaussad")
    amap = model.anomaly_map([crop])[0]
    # the upload with its heat on the model's scale, and the legend panel under it on a canvas as wide as the panel
    want = np.asarray(render(load_image(crop), amap, heat_scale(model.state_.map_calibration), row["score"],
                             row["anomalous"]))
    assert got.shape == want.shape and got.shape[1] == 240 and got.shape[0] > 40
    assert np.abs(got.astype(int) - want).max() <= 2
    assert row["map_max"] == pytest.approx(float(amap.max()), rel=1e-4)


def test_map_endpoint_returns_a_png_overlay(client, model_dir, test_images):
    crop = test_images[-1]
    resp = client.post("/models/maps/map", files={"file": (crop.name, crop.read_bytes(), "image/png")})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(resp.content)))
    model = gaussad.load(model_dir / "maps.gaussad")
    _, scores, _, decisions = _expected(model_dir / "maps.gaussad", [crop])
    want = np.asarray(render(load_image(crop), model.anomaly_map([crop])[0], heat_scale(model.state_.map_calibration),
                             float(resp.headers["x-gaussad-score"]), bool(decisions[0])))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 2
    assert float(resp.headers["x-gaussad-score"]) == pytest.approx(scores[0], rel=1e-5)
    assert resp.headers["x-gaussad-anomalous"] == str(bool(decisions[0])).lower()


def test_openapi_schema_lists_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/models", "/models/{name}/score", "/models/{name}/map"} <= set(schema["paths"])
    assert "image/png" in schema["paths"]["/models/{name}/map"]["post"]["responses"]["200"]["content"]


def test_page_and_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="files"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize(
    "path, files, params, status, needle",
    [
        ("/models/nope/score", [("files", ("a.png", b"x", "image/png"))], {}, 404, "no model named 'nope'"),
        ("/models/plain/score", [("files", ("notes.txt", b"hello", "text/plain"))], {}, 415, "notes.txt: not a PNG"),
        ("/models/plain/score", [("files", ("empty.png", b"", "image/png"))], {}, 415, "empty.png: empty file"),
        ("/models/plain/score", "truncated", {}, 422, "cut.png: cannot decode PNG"),
        ("/models/plain/score", None, {}, 422, "files"),
        ("/models/plain/score", "one", {"fpr": "0"}, 422, "fpr"),
        ("/models/plain/score", "one", {"fpr": "1.5"}, 422, "fpr"),
        ("/models/plain/score", "one", {"maps": "true"}, 422, "no anomaly maps"),
    ],
)
def test_bad_requests_get_a_clear_4xx(client, test_images, path, files, params, status, needle):
    data = test_images[0].read_bytes()
    if files == "truncated":
        files = [("files", ("cut.png", data[: len(data) // 2], "image/png"))]
    elif files == "one":
        files = [("files", ("a.png", data, "image/png"))]
    resp = client.post(path, files=files, params=params)
    assert resp.status_code == status
    assert needle in str(resp.json()["detail"])


def test_map_of_a_model_without_maps_is_refused(client, test_images):
    resp = client.post("/models/plain/map", files={"file": ("a.png", test_images[0].read_bytes(), "image/png")})
    assert resp.status_code == 422 and "no anomaly maps" in resp.json()["detail"]


def test_upload_limits(models, test_images):
    data = test_images[0].read_bytes()
    limits = Limits(max_file_bytes=len(data) + 10, max_files=2, max_pixels=63 * 64)
    with TestClient(create_app(models, limits=limits)) as c:
        big = c.post("/models/plain/score", files=[("files", ("big.png", data + b"\0" * 20, "image/png"))])
        assert big.status_code == 413 and "big.png" in big.json()["detail"] and "bytes per file" in big.json()["detail"]
        many = c.post("/models/plain/score", files=_files(test_images[:3]))
        assert many.status_code == 413 and "3 files exceeds the limit of 2" in many.json()["detail"]
        wide = c.post("/models/plain/score", files=_files(test_images[:1]))
        assert wide.status_code == 413 and "64x64 = 4096 pixels exceeds the limit of 4032" in wide.json()["detail"]
        small = _png_bytes(Image.open(test_images[0]).crop((0, 0, 63, 64)))
        assert c.post("/models/plain/score", files=[("files", ("ok.png", small, "image/png"))]).status_code == 200

        over = limits.max_request_bytes + 1
        declared = c.post("/models/plain/score", content=b"x" * over,
                          headers={"content-type": "multipart/form-data; boundary=b"})
        assert declared.status_code == 413 and "request body exceeds" in declared.json()["detail"]

        def stream():  # no Content-Length: the limit applies to the bytes as they arrive
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="s.png"\r\n\r\n'
            for _ in range(over // 65536 + 1):
                yield b"\0" * 65536

        streamed = c.post("/models/plain/score", content=stream(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413 and "request body exceeds" in streamed.json()["detail"]
    with pytest.raises(gaussad.GaussadError, match="max_files"):
        Limits(max_files=0)


def test_concurrent_requests_do_not_block_each_other(model_dir, test_images):
    """Two score requests run their models at the same time in two threads, and /health answers meanwhile.

    Each model call waits at a barrier that only opens once both calls and the test have arrived: if the model
    ran on the event loop, or requests were served one at a time, the barrier would never fill.
    """
    models = load_models(model_dir)
    model = models["plain"]
    barrier = threading.Barrier(3, timeout=60)
    real = model.extract_features

    def extract_features(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    model.extract_features = extract_features
    app = create_app(models, workers=2)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
            calls = [asyncio.create_task(c.post("/models/plain/score", files=_files([p]))) for p in test_images[:2]]
            for _ in range(3000):
                if barrier.n_waiting == 2:
                    break
                await asyncio.sleep(0.01)
            assert barrier.n_waiting == 2, "the two model calls did not run at the same time"
            health = await c.get("/health")
            await asyncio.to_thread(barrier.wait)
            return health, await asyncio.gather(*calls)

    health, answers = asyncio.run(scenario())
    assert health.status_code == 200
    _, scores, _, _ = _expected(model_dir / "plain.gaussad", test_images[:2])
    assert [a.status_code for a in answers] == [200, 200]
    np.testing.assert_allclose([a.json()["results"][0]["score"] for a in answers], scores, rtol=1e-5)


# ----- a real server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(model_dir):
    """`gaussad serve` in a child process on a free loopback port."""
    with serving(model_dir, "--log-level", "warning", "--workers", "2") as url:
        yield url


def test_served_under_concurrent_load_answers_every_request(served, model_dir, test_images):
    names = [p.name for p in test_images]
    _, scores, _, _ = _expected(model_dir / "plain.gaussad", test_images)
    payloads = [(n, p.read_bytes()) for n, p in zip(names, test_images)]
    outcomes, probes, _ = run_load(served, "plain", payloads, n=30, concurrency=30)
    summary = check(outcomes, dict(zip(names, scores)))
    assert summary["correct"] == 30, summary
    assert summary["server_errors"] == 0 and summary["no_answer"] == 0
    assert probes, "no /health answer came back while the load ran"
    assert all(p.status == 200 and p.health == "ok" for p in probes), [p for p in probes if p.status != 200][:5]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium_page(tmp_path: Path) -> Iterator:
    """A page of a headless Chromium (Debian's binary; the test is skipped where it is absent), profile under
    ``tmp_path``, closed on exit."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                        headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()


def test_page_in_chromium_shows_scores_decisions_and_maps_sorted(served, model_dir, test_images, tmp_path):
    upload = [test_images[0], test_images[2], test_images[3]]
    _, scores, _, decisions = _expected(model_dir / "maps.gaussad", upload)
    expected = {p.name: (s, d) for p, s, d in zip(upload, scores, decisions)}
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with chromium_page(tmp_path) as page:
        page.goto(served + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["maps", "plain"]
        page.select_option("#model", "maps")
        assert "trained on 10 images" in page.inner_text("#model-info")
        page.set_input_files("#files", [str(p) for p in upload])
        page.wait_for_function("document.querySelectorAll('#results .card').length === 3")
        cards = page.eval_on_selector_all("#results .card", """cs => cs.map(c => ({
            name: c.querySelector('.filename').textContent, score: c.querySelector('.score').textContent,
            decision: c.querySelector('.decision').textContent, src: c.querySelector('img').src,
            why: c.querySelector('.evidence').textContent}))""")
        assert [c["name"] for c in cards] == sorted(expected, key=lambda n: -expected[n][0])
        for c in cards:
            score, anomalous = expected[c["name"]]
            assert float(c["score"]) == pytest.approx(score, abs=6e-4)
            assert c["decision"] == ("ANOMALY" if anomalous else "ok")
            # what decided, in words (issue 35): the levels over their thresholds for this chi2 model
            assert c["why"].startswith("flagged" if anomalous else "ok") and "target FPR" in c["why"]
            assert ("(every level below its threshold)" in c["why"]) == (not anomalous)
            assert c["src"].startswith("data:image/png;base64,")
        page.uncheck("#show-maps")
        assert all(s.startswith("blob:") for s in page.eval_on_selector_all("#results img", "is => is.map(i => i.src)"))

        page.set_input_files("#files", [str(not_image)])
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "notes.png: not a PNG" in page.inner_text("#error")
        assert page.locator("#results .card").count() == 3

        # A folder picked with its sub-folders: the cards show each file's path inside it.
        for sub, image in (("a", test_images[0]), ("b", test_images[1])):
            (tmp_path / "pick" / sub).mkdir(parents=True)
            (tmp_path / "pick" / sub / "x.png").write_bytes(image.read_bytes())
        page.set_input_files("#folder", str(tmp_path / "pick"))
        page.wait_for_function("document.querySelectorAll('#results .card').length === 5")
        names = page.eval_on_selector_all("#results .filename", "ns => ns.map(n => n.textContent)")
        assert {"pick/a/x.png", "pick/b/x.png"} <= set(names)


def _plain(p: float) -> str:
    """The page's words for a p-value, written out apart from it."""
    if p < 1e-6:
        return "below 1e-6: fewer than 1 in a million good images score this high"
    if p >= 0.1:
        return f"{round(100 * p)} % of good images score this high"
    return f"1 in {int(float(f'{1 / p:.2g}')):,} good images score this high"


def test_page_in_chromium_names_apart_plain_pvalues_favicon_and_no_apply(served, model_dir, test_images, tmp_path):
    """Issue 35, item 4: two files named 000.png picked one after the other from different folders are told apart;
    p-values read in words; the page loads with no 404 (the favicon); "apply feedback" is hidden where the service
    keeps no images, "roll back" where the model has no earlier version."""
    picks = []
    for sub, image in (("one", test_images[0]), ("two", test_images[2])):
        (tmp_path / sub).mkdir()
        picks.append(tmp_path / sub / "000.png")
        shutil.copyfile(image, picks[-1])
    _, _, pvalues, _ = _expected(model_dir / "plain.gaussad", picks)
    with chromium_page(tmp_path) as page:
        missing = []
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        page.goto(served + "/")
        page.wait_for_selector("#model option", state="attached")
        page.select_option("#model", "plain")
        for n, pick in enumerate(picks, 1):
            page.set_input_files("#files", [str(pick)])
            page.wait_for_function(f"document.querySelectorAll('#results .card').length === {n}")
        cards = page.eval_on_selector_all("#results .card", """cs => cs.map(c => ({
            name: c.querySelector('.filename').textContent, p: c.querySelector('.pvalue').textContent}))""")
        assert sorted(c["name"] for c in cards) == ["000 (2).png", "000.png"]
        by_name = {c["name"]: c["p"] for c in cards}
        assert [by_name["000.png"], by_name["000 (2).png"]] == [_plain(p) for p in pvalues]
        assert not page.is_visible("#apply") and not page.is_visible("#rollback")  # version 1: nothing to go back to
        icon = page.request.get(served + "/favicon.ico")
        assert icon.status == 200 and icon.headers["content-type"] == "image/svg+xml" and b"<svg" in icon.body()
        assert page.request.get(served + page.get_attribute("link[rel=icon]", "href")).status == 200
        assert missing == []


def test_page_walks_a_dropped_folder_and_names_its_files_by_their_path(served, test_images, tmp_path):
    """A folder dropped on the page (issue 35, noticed at its first round): every image under it, sub-folders
    included, is scored and named by its path from the folder, so two 000.png stay apart. Chromium gives a dropped
    folder as a FileSystemDirectoryEntry, which a test cannot make: the page's walker is given entries of the same
    interface (a reader that answers in batches, then an empty one) holding real image bytes."""
    import base64

    data = [base64.b64encode(p.read_bytes()).decode() for p in test_images[:2]]
    with chromium_page(tmp_path) as page:
        page.goto(served + "/")
        page.wait_for_selector("#model option", state="attached")
        page.select_option("#model", "plain")
        names = page.evaluate("""async ([a, b]) => {
            const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
            const file = (name, s) => ({isFile: true, isDirectory: false, name,
                                        file: (ok) => ok(new File([bytes(s)], name, {type: "image/png"}))});
            const folder = (name, batches) => ({isFile: false, isDirectory: true, name, createReader: () => {
                let i = 0;
                return {readEntries: (ok) => ok(i < batches.length ? batches[i++] : [])};
            }});
            const good = folder("good", [[file("000.png", a)], [file("001.png", b)]]);
            const root = folder("lot7", [[good, folder("bad", [[file("000.png", b)]])]]);
            const files = await walkEntries([root]);
            await scoreFiles(files);
            return files.map(fileName);
        }""", data)
        assert names == ["lot7/bad/000.png", "lot7/good/000.png", "lot7/good/001.png"]
        page.wait_for_function("document.querySelectorAll('#results .card').length === 3")
        shown = page.eval_on_selector_all("#results .card .filename", "els => els.map(e => e.textContent)")
        assert sorted(shown) == names


def test_serve_says_where_it_writes_the_results_log(model_dir, tmp_path, monkeypatch, caplog):
    import uvicorn

    from gaussad.service.app import run

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="gaussad.service.app"):
        run(model_dir, db="results.sqlite", keep_images="kept")
        run(model_dir, db=None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("results log:")]
    assert lines == [f"results log: {tmp_path.resolve() / 'results.sqlite'}, images kept in {tmp_path.resolve() / 'kept'}",
                     "results log: off (--db none)"]
