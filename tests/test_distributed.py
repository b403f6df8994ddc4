"""Fitting and scoring on a Dask cluster: the suite starts its own LocalCluster of 2 worker processes, checks that a
distributed fit gives one process's Gaussians (and cross-conformal scores), that scoring writes every input exactly
once in the rows of ``score --json``, that a rerun skips finished parts, and that a worker killed mid-run changes
nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, record_coresets

dd = pytest.importorskip("dask.distributed")
pytest.importorskip("pyarrow")

from gaussad import GaussianAD  # noqa: E402
from gaussad.tools import distributed  # noqa: E402
from gaussad.errors import InvalidParameterError  # noqa: E402
from gaussad.cli import main  # noqa: E402
from gaussad.intake.images import find_images  # noqa: E402


@pytest.fixture(scope="module")
def client(onnx_cache):
    """2 worker processes of 1 thread each, started here and stopped (bounded) at the end of the module."""
    import logging

    cluster = dd.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                              silence_logs=logging.ERROR)
    c = dd.Client(cluster, timeout=60)
    yield c
    c.close(timeout=30)
    cluster.close(timeout=30)


def _train(category: Path) -> list[Path]:
    return sorted((category / "train" / "good").glob("*.png"))


def _test(category: Path) -> list[Path]:
    return sorted((category / "test").rglob("*.png"))


def _kill_busy_worker(client, done: threading.Event) -> int | None:
    """SIGKILL the process of a worker that is running a task (the nanny restarts it); its pid, or None when the
    run ended before any task was seen running."""
    pids = client.run(os.getpid)
    while not done.is_set():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy and busy[0] in pids:
            time.sleep(0.3)  # inside the task
            os.kill(pids[busy[0]], signal.SIGKILL)
            return pids[busy[0]]
        time.sleep(0.02)
    return None


def test_partitions_and_addresses():
    assert distributed.partitions(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert distributed.partitions(0, 4) == []
    assert distributed.parse_address("local:3") == ("local", 3)
    assert distributed.parse_address("local") == ("local", None)
    assert distributed.parse_address("tcp://10.0.0.1:8786") == ("remote", None)
    for bad in ("local:0", "local:x", "local:", " "):
        with pytest.raises(distributed.GaussadError):
            distributed.parse_address(bad)


def test_fit_paper_matches_one_process(client, tiny_category):
    """The Gaussians of 4 partitions merged by the tree reduction are one process's (scores to 1e-6 relative)."""
    one = GaussianAD(**TINY).fit(_train(tiny_category))
    dist = distributed.fit(GaussianAD(**TINY), _train(tiny_category), client, partition_size=3)
    assert dist.n_samples_ == one.n_samples_ == 10
    test = _test(tiny_category)
    np.testing.assert_allclose(dist.score_samples(test), one.score_samples(test), rtol=1e-6)
    for a, b in zip(dist.stats_, one.stats_):
        np.testing.assert_allclose(a.mean(), b.mean(), rtol=1e-9, atol=1e-12)


def test_fit_cross_conformal_and_banks(client, tiny_category):
    """Cross-conformal out-of-fold scores (of features with the map levels' spread) are one process's; each bank keeps ceil(coreset * locations) members of
    every image's locations, and scores the training images' maps near 1."""
    settings = dict(TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_pool=3, map_coreset=0.5,
                    threshold="conformal", calibration="cv", pool="avg+std")
    one = GaussianAD(**settings).fit(_train(tiny_category))
    dist = distributed.fit(GaussianAD(**settings), _train(tiny_category), client, partition_size=4)
    assert dist.feature_dims_ == one.feature_dims_ == [32, 16, 48, 80]  # the map levels' spread pooled on the workers
    np.testing.assert_allclose(dist.calibration_scores_, one.calibration_scores_, rtol=1e-6)
    for a, b in zip(dist.map_banks_, one.map_banks_):
        assert a.seen == b.seen
        assert len(a.vectors) == math.ceil(0.5 * a.seen) == len(b.vectors)
        assert set(np.unique(a.ids)) == set(range(10))
    test = _test(tiny_category)
    m_one, m_dist = one.anomaly_map(test), dist.anomaly_map(test)
    assert np.corrcoef(m_one.ravel(), m_dist.ravel())[0, 1] > 0.95


def test_fit_and_score_with_the_default_preset_match_one_process(client, tiny_category, tmp_path):
    """The default preset's fused score (issue 30): a distributed fit calibrates it as one process does (out-of-fold
    global scores; leave-one-image-out map peaks against the final banks, a second pass on the workers), and a
    distributed score gives one process's scores, p-values and decisions. Every location kept (map_coreset 1), so
    that the banks, and with them the peaks, are one process's exactly."""
    settings = dict(TINY, preset="recommended", map_levels=["stage2", "stage3"], map_coreset=1.0, fpr=0.2)
    one = GaussianAD(**settings).fit(_train(tiny_category))
    dist = distributed.fit(GaussianAD(**settings), _train(tiny_category), client, partition_size=3)
    assert dist.setting("image_score") == "fused" and dist.setting("threshold") == "conformal"
    np.testing.assert_allclose(dist.calibration_scores_, one.calibration_scores_, rtol=1e-6)
    np.testing.assert_allclose(dist.map_calibration_, one.map_calibration_, rtol=1e-6)
    path = tmp_path / "d.gaussad"
    dist.save(path)
    files, names = find_images([str(tiny_category / "test")], True)
    summary = distributed.score(path, files, names, tmp_path / "r.jsonl", client, partition_size=4)
    assert summary["fpr"] == 0.2
    rows = {r["path"]: r for r in distributed.read_results(tmp_path / "r.jsonl")}
    levels, peaks, _ = dist.score_images(files)
    decisions, pvalues = dist.decide(levels, map_peaks=peaks)
    np.testing.assert_allclose([rows[n]["score"] for n in names], dist.scores(levels, peaks), rtol=1e-6)
    np.testing.assert_allclose([rows[n]["pvalue"] for n in names], pvalues, rtol=1e-6)
    assert [rows[n]["anomalous"] for n in names] == list(decisions) and 0 < sum(decisions) < len(names)


def test_fit_adapts_once_then_takes_every_partition_with_the_adapted_network(client, tiny_category, tmp_path):
    """adapt (issue 33): one worker adapts the network on every image, the partitions' statistics are taken with
    it; the adapted tensors, the record and the scores are one process's. The worker's torch runs 1 thread (Dask
    sets OMP_NUM_THREADS=1), so this process adapts on 1 thread too: with other thread counts float sums differ in
    their last bits, which Adam's normalised steps make visible in parameters whose gradients are near zero."""
    import torch

    settings = dict(TINY, levels=["stage2", "stage4", "head"], adapt=2, adapt_stop="last")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = GaussianAD(**settings).fit(_train(tiny_category))
    finally:
        torch.set_num_threads(threads)
    dist = distributed.fit(GaussianAD(**settings), _train(tiny_category), client, partition_size=3)
    assert dist.adaptation_["kept_epoch"] == one.adaptation_["kept_epoch"] == 2
    assert set(dist.state_.adapted) == set(one.state_.adapted)
    for k, v in one.state_.adapted.items():
        np.testing.assert_allclose(dist.state_.adapted[k], v, rtol=1e-5, atol=1e-8, err_msg=k)
    test = _test(tiny_category)
    np.testing.assert_allclose(dist.score_samples(test), one.score_samples(test), rtol=1e-5)
    pretrained = GaussianAD(**{**settings, "adapt": 0}).fit(_train(tiny_category))
    assert np.abs(pretrained.score_samples(test) - one.score_samples(test)).max() > 1e-3


def test_client_streams_the_bank_candidates_through_a_bounded_buffer(client, tiny_category, monkeypatch):
    """The client feeds the partitions' candidates to streaming coresets as they arrive: their buffers stay within
    CHUNK rows (here fewer than the candidates, so that they fill and select several times), and each bank keeps
    ceil(map_coreset * locations) members."""
    made = record_coresets(monkeypatch, 64)
    settings = dict(TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_pool=3, map_coreset=0.2)
    dist = distributed.fit(GaussianAD(**settings), _train(tiny_category), client, partition_size=3)
    assert len(made) == 2
    for coreset, bank in zip(made, dist.map_banks_):
        assert coreset.added > 64 and coreset.max_pending <= 64
        assert len(bank.vectors) == math.ceil(0.2 * bank.seen) and set(np.unique(bank.ids)) == set(range(10))


def test_fit_keeps_the_finest_map_grid(client, tiny_category):
    """A distributed fit with map_grid='finest' gives a model on that grid, whose maps score as one process's do
    (before, the merged state fell back to the coarsest grid and its maps could not be computed)."""
    settings = dict(TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_grid="finest", map_coreset=1.0)
    one = GaussianAD(**settings).fit(_train(tiny_category))
    dist = distributed.fit(GaussianAD(**settings), _train(tiny_category), client, partition_size=4)
    assert dist.state_.map_grid == one.state_.map_grid == "finest"
    test = _test(tiny_category)
    np.testing.assert_allclose(dist.anomaly_map(test), one.anomaly_map(test), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiles", [2, "auto"])
def test_fit_tiled_maps(client, tiny_category, tmp_path, tiles):
    """map_tiles: the workers' extractors tile as one process's does, so the distributed model's maps are one
    process's (full banks); 'auto' is decided on a worker from the files as one process decides it (2 tiles for
    these 128 px copies at S = 64)."""
    from PIL import Image

    train = []
    for path in _train(tiny_category):
        train.append(tmp_path / Path(path).name)
        Image.open(path).convert("RGB").resize((128, 128)).save(train[-1])
    settings = dict(TINY, map_levels=["stage2", "stage7"], map_method="nearest", map_coreset=1.0, map_tiles=tiles)
    one = GaussianAD(**settings).fit(train)
    dist = distributed.fit(GaussianAD(**settings), train, client, partition_size=4)
    assert dist.state_.layout.settings["map_tiles"] == one.map_tiles_ == 2
    test = _test(tiny_category)
    np.testing.assert_allclose(dist.anomaly_map(test), one.anomaly_map(test), rtol=1e-4, atol=1e-4)


def test_fit_refuses_split_calibration(client, tiny_category):
    with pytest.raises(distributed.GaussadError, match="calibration 'cv'"):
        distributed.fit(GaussianAD(**TINY, calibration=0.2), _train(tiny_category), client, partition_size=5)


def test_fit_survives_a_killed_worker(client, tiny_category):
    """A worker process killed while it runs a partition: the fit finishes with the same Gaussians."""
    expected = distributed.fit(GaussianAD(**TINY), _train(tiny_category), client, partition_size=1)
    done, result = threading.Event(), {}

    def run():
        try:
            result["model"] = distributed.fit(GaussianAD(**TINY, batch_size=1), _train(tiny_category) * 3, client,
                                              partition_size=1)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    killed = _kill_busy_worker(client, done)
    thread.join(timeout=300)
    assert killed is not None and not thread.is_alive()
    client.wait_for_workers(2, timeout=60)
    # three copies of the same images: the same mean, and the images' scores as those of the single copy
    model = result["model"]
    assert model.n_samples_ == 30
    for a, b in zip(model.stats_, expected.stats_):
        np.testing.assert_allclose(a.mean(), b.mean(), rtol=1e-6, atol=1e-9)


def _json_rows(model_path: Path, images: list[str], capsys) -> list[dict]:
    assert main(["score", str(model_path), *images, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)["results"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_category) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.gaussad"
    GaussianAD(**TINY).fit(_train(tiny_category)).save(path)
    return path


@pytest.mark.parametrize("fmt", [".parquet", ".jsonl", ".csv"])
def test_score_parts_hold_every_input_once(client, fitted, tiny_category, tmp_path, capsys, fmt):
    folder = str(tiny_category / "test")
    files, names = find_images([folder], True)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files, names = files + [tmp_path / "broken.png"], names + ["broken.png"]
    out = tmp_path / f"results{fmt}"
    summary = distributed.score(fitted, files, names, out, client, partition_size=5)
    assert summary["parts"] == math.ceil(len(files) / 5) == summary["parts_written"]
    rows = distributed.read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(names)
    expected = {r["path"]: r for r in _json_rows(fitted, [folder], capsys)}
    for r in rows:
        if r["path"] == "broken.png":
            assert r["error"] and not r["score"] and not r["evidence"]
            continue
        e = expected["test/" + r["path"] if "test/" + r["path"] in expected else r["path"]]
        assert math.isclose(float(r["score"]), e["score"], rel_tol=1e-6)
        # the evidence of every decision, as score --json gives it (JSON text in CSV and Parquet; issue 35)
        evidence = r["evidence"] if fmt == ".jsonl" else json.loads(r["evidence"])
        assert evidence["rule"] == e["evidence"]["rule"] and evidence["text"].split(":")[0] == \
            e["evidence"]["text"].split(":")[0]
        if fmt == ".csv":
            assert r["anomalous"] == str(e["anomalous"]).lower()
            assert math.isclose(float(r["levels.stem"]), e["levels"]["stem"], rel_tol=1e-6)
        else:
            assert r["anomalous"] == e["anomalous"] and r["error"] is None
            assert set(r["levels"]) == set(e["levels"])
            assert math.isclose(r["pvalue"], e["pvalue"], rel_tol=1e-6, abs_tol=1e-300)


def test_score_rerun_skips_finished_parts(client, fitted, tiny_category, tmp_path):
    files, names = find_images([str(tiny_category / "test")], True)
    out = tmp_path / "r.parquet"
    distributed.score(fitted, files, names, out, client, partition_size=4)
    written = sorted(out.glob("part-*.parquet"))
    written[1].unlink()  # as a crash before that part was written
    stamp = written[0].stat().st_mtime_ns
    again = distributed.score(fitted, files, names, out, client, partition_size=4)
    assert again["parts_written"] == 1 and again["parts_reused"] == len(written) - 1
    assert written[0].stat().st_mtime_ns == stamp
    assert sorted(r["path"] for r in distributed.read_results(out)) == sorted(names)
    with pytest.raises(distributed.GaussadError, match="another run"):
        distributed.score(fitted, files[:3], names[:3], out, client, partition_size=4)


def test_score_rerun_scores_again_a_part_whose_input_was_replaced(client, fitted, tiny_category, tmp_path):
    """Issue 32, N16: a good image replaced by a defective one under the same name after its part was written; the
    rerun scores that part again (the row has the defect's score) and reuses the other (was: the old score kept)."""
    import shutil

    from gaussad.detector.model import load

    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((tiny_category / "test" / "good").glob("*.png"))[:4]:
        shutil.copyfile(p, inputs / p.name)
    files, names = find_images([str(inputs)], True)
    out = tmp_path / "r.parquet"
    distributed.score(fitted, files, names, out, client, partition_size=2)
    kept = out / distributed.part_name(1, ".parquet")
    stamp = kept.stat().st_mtime_ns
    defect = sorted(p for p in (tiny_category / "test").rglob("*.png") if p.parent.name != "good")[0]
    shutil.copyfile(defect, files[0])
    again = distributed.score(fitted, files, names, out, client, partition_size=2)
    assert again["parts_written"] == 1 and again["parts_reused"] == 1 and kept.stat().st_mtime_ns == stamp
    scores = {r["path"]: float(r["score"]) for r in distributed.read_results(out)}
    assert math.isclose(scores[names[0]], float(load(fitted).score_samples([defect])[0]), rel_tol=1e-6)


def test_score_survives_a_killed_worker(client, fitted, tiny_category, tmp_path):
    files, names = find_images([str(tiny_category / "test")], True)
    files, names = files * 3, [f"{k}/{n}" for k in range(3) for n in names]
    out = tmp_path / "r.jsonl"
    done, result = threading.Event(), {}

    def run():
        try:
            result["summary"] = distributed.score(fitted, files, names, out, client, partition_size=1)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    killed = _kill_busy_worker(client, done)
    thread.join(timeout=300)
    assert killed is not None and not thread.is_alive() and "summary" in result
    client.wait_for_workers(2, timeout=60)
    rows = distributed.read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(names)  # every input exactly once
    assert all(r["error"] is None for r in rows)


def test_cli_fit_and_score_on_a_local_cluster(tiny_category, tmp_path, capsys):
    model = tmp_path / "m.gaussad"
    tiny = ["--backbone", TINY["backbone"], "--input-size", str(TINY["input_size"]),
            "--levels", ",".join(TINY["levels"])]
    assert main(["fit", str(tiny_category), "-o", str(model), "--dask", "local:1", "--partition-size", "4",
                 "--quiet", *tiny]) == 0
    out = tmp_path / "r.csv"
    assert main(["score", str(model), str(tiny_category / "test"), "--dask", "local:1", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == len(_test(tiny_category)) and out.exists()
    assert not Path(str(out) + ".parts").exists()
    assert main(["score", str(model), str(tiny_category / "test"), "--out", str(out)]) == 2
    assert main(["score", str(model), str(tiny_category / "test"), "--dask", "local:1", "--out",
                 str(tmp_path / "r.txt")]) == 2
    assert "--dask and --out go together" in capsys.readouterr().err


def test_unreachable_scheduler_is_one_clear_error():
    with pytest.raises(distributed.GaussadError, match="cannot reach the scheduler"):
        with distributed.connect("tcp://127.0.0.1:9", timeout=2):
            pass


def test_default_conformal_calibration_is_cross_conformal_at_any_size(tiny_category, monkeypatch):
    """From CV_BELOW images on, one process holds out a fraction by default; a distributed fit, which cannot score a
    held-out part without a second pass, calibrates cross-conformally instead (its partitions run in-process here),
    with the out-of-fold scores of a one-process calibration='cv' fit; an explicit fraction is still refused."""
    from gaussad.detector import params

    monkeypatch.setattr(params, "CV_BELOW", 4)
    files = _train(tiny_category)
    settings = dict(TINY, threshold="conformal")
    assert GaussianAD(**settings).fit(files).state_.calibration_method == "split"
    trainer = GaussianAD(**settings)._trainer()
    state = trainer.fit_parts(trainer.fit_part(files, range(len(files)), len(files)))
    assert state.calibration_method == "cv"
    one = GaussianAD(**settings, calibration="cv").fit(files)
    np.testing.assert_allclose(state.calibration_scores, one.calibration_scores_, rtol=1e-6)
    with pytest.raises(InvalidParameterError, match="held-out"):
        GaussianAD(**settings, calibration=0.2)._trainer().fit_part(files, range(len(files)), len(files))


class _Eager:
    """A stand-in client whose ``submit`` runs the function at once (values stand for futures)."""

    def submit(self, fn, *args, pure=True):
        return fn(*args)


@pytest.mark.parametrize("levels", [1, 2, distributed.TREE_LEVELS, 64])
def test_tree_reduction_merges_in_order_of_addition_holding_a_bounded_number_of_values(levels):
    for n in list(range(1, 40)) + [1000]:
        tree = distributed.TreeReduction(_Eager(), lambda a, b: f"({a}{b})", levels)
        worst = 0
        for i in range(n):
            tree.add(str(i % 10))
            worst = max(worst, tree.pending)
        merged = tree.result()
        assert merged.replace("(", "").replace(")", "") == "".join(str(i % 10) for i in range(n))
        assert merged.count("(") == n - 1 and tree.pending == 0  # every value merged once, nothing left
        # pairs up to blocks of 2**levels, then a running total: at most levels + 1 values held whatever n
        assert worst <= min(levels + 1, math.floor(math.log2(n)) + 1)
        if n >= 2 ** levels:
            assert merged.startswith("(" * (n // 2 ** levels))  # the blocks were folded into a running total
    with pytest.raises(ValueError, match="nothing to reduce"):
        distributed.TreeReduction(_Eager(), str.__add__).result()
    with pytest.raises(ValueError, match="levels"):
        distributed.TreeReduction(_Eager(), str.__add__, 0)


def test_bounded_keeps_at_most_a_window_submitted_and_not_taken():
    submitted, taken, worst = [], [], []

    def submit(item):
        submitted.append(item)
        worst.append(len(submitted) - len(taken))
        return item * 10

    for value in distributed.bounded(range(23), 4, submit):
        taken.append(value)
    assert taken == [10 * i for i in range(23)] and submitted == list(range(23)) and max(worst) == 4
    assert list(distributed.bounded([], 3, submit)) == []
    with pytest.raises(ValueError):
        next(distributed.bounded(range(3), 0, submit))
