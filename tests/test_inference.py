"""The one inference pipeline (issue 31): batch by batch or all at once, the same rows; skipped images keep their
input positions; how a model decides, in brief, agrees with the decisions it makes."""

from __future__ import annotations

import numpy as np
import pytest

from gaussad import GaussianAD
from gaussad.detector import inference

from .conftest import TINY


@pytest.fixture(scope="module")
def fitted(tiny_category):
    files = sorted((tiny_category / "train" / "good").iterdir())
    model = GaussianAD(**{**TINY, "preset": "recommended", "input_size": 64, "map_levels": ["stage2", "stage3"]})
    return model.fit(files)


def test_predict_in_batches_gives_the_rows_of_one_pass(fitted, tiny_category):
    test = sorted(p for p in (tiny_category / "test").rglob("*.png"))
    images = [*test[:1], b"not an image", *test[1:]]
    names = [str(p) for p in images[:1]] + ["junk"] + [str(p) for p in images[2:]]
    whole = inference.score(fitted, images, names, on_error="skip")
    batches = list(inference.predict(fitted, images, names, on_error="skip", batch=3))
    assert len(batches) == -(-len(images) // 3)
    rows = [r for b in batches for r in b.rows]
    assert [(r["path"], r["anomalous"], r["pvalue"]) for r in rows] == [
        (r["path"], r["anomalous"], r["pvalue"]) for r in whole.rows]
    # the distances of a batch of 3 against those of all at once: the same to the last bits (BLAS sums a matrix of
    # another height in another order)
    np.testing.assert_allclose([list(r["levels"].values()) + [r["score"]] for r in rows],
                               [list(r["levels"].values()) + [r["score"]] for r in whole.rows], rtol=1e-12)
    assert [i for b in batches for i in b.indices] == whole.read == [i for i in range(len(images)) if i != 1]
    assert [s for b in batches for s in b.skipped] == whole.skipped and [i for i, _ in whole.skipped] == [1]


def test_the_decision_in_brief_agrees_with_the_rows(fitted, tiny_category):
    test = sorted(p for p in (tiny_category / "test").rglob("*.png"))
    for fpr in (0.2, 0.5):
        brief = inference.decision(fitted, fpr)
        rows = inference.score(fitted, test, fpr=fpr).rows
        assert brief["fpr"] == inference.target_fpr(fitted, fpr) >= fpr
        assert brief["image_score"] == "fused" and brief["pvalue_threshold"] == brief["fpr"]
        assert [r["anomalous"] for r in rows] == [r["pvalue"] <= brief["fpr"] for r in rows]
    chi2 = inference.decision(fitted, 0.1, "chi2")
    assert "error" in chi2  # the fused score decides by conformal p-values only: said, not raised
    with pytest.raises(Exception, match="m.gaussad: "):
        inference.decision(fitted, 0.1, "chi2", where="m.gaussad: ")
    assert np.isfinite(inference.calibration(fitted, 0.1)["min_fpr"])
