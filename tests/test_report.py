"""The HTML evaluation report: the JSON figures do not change when it is made, and it opens from disk in Chromium with
its figures and thumbnails (skipped where Chromium is absent)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gaussad.cli import main
from gaussad.tools.evaluate import evaluate_category

from .test_cli import TINY_ARGS
from .test_evaluate import _synthetic
from .test_serve import CHROMIUM_ARGS, _chromium

pytest.importorskip("matplotlib")


def test_details_leave_the_figures_unchanged():
    cat, train, test, labels = _synthetic()
    details: dict = {"category": cat}
    for protocol in ("paper", "full"):
        plain = evaluate_category(cat, (train, test), {"backbone": None}, protocol)
        assert evaluate_category(cat, (train, test), {"backbone": None}, protocol, details=details) == plain
    assert len(details["fold_scores"]) == 6 and details["gallery"].tolist()[:4] == list(
        np.argsort(-details["fold_scores"][0][:30], kind="stable")[:4])


def test_roc_points_and_render_without_maps(tmp_path):
    from gaussad.tools.report import render_html, roc_points

    fpr, tpr = roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    cat, train, test, labels = _synthetic()
    details = {"category": cat}
    result = evaluate_category(cat, (train, test), {"backbone": None}, "paper", details=details)
    report = {"protocol": "paper", "preset": None, "backbone": None, "input_size": None, "estimator": "ledoit-wolf",
              "normalize": "imagenet", "levels": ["level0", "level1"], "n_categories": 1,
              "mean_image_auroc": result["image_auroc"], "categories": {"synthetic": result}}
    page = render_html(report, {"synthetic": details})
    assert page.count('class="roc"') == 1 and page.count('class="histogram"') == 1
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    assert page.count("t0.png: ") + page.count('class="tile"') >= 8  # files absent: named with the reason
    assert "mean over folds" in page and "(fold 1)" in page and "first fold's model" in page
    # the full protocol fits once on every training image: no word of folds (issue 35)
    details = {"category": cat}
    result = evaluate_category(cat, (train, test), {"backbone": None}, "full", details=details)
    page = render_html({**report, "protocol": "full", "categories": {"synthetic": result}}, {"synthetic": details})
    assert len(details["fold_scores"]) == 1 and "fold" not in page.lower().replace("protocol full", "")
    assert "Scores of the model;" in page and "realised FPR on good test images / TPR on defective ones (raised" in page


def check_report_in_chromium(path: Path, category: str, tmp_path: Path) -> dict:
    """Open the report from disk in Chromium; the figures and thumbnails of ``category`` must be decoded images."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                        headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_load_state("load")
            found = page.evaluate("""name => {
                const sec = document.getElementById(name);
                const ok = img => img.complete && img.naturalWidth > 0 && img.src.startsWith('data:image/png;base64,');
                const all = sel => sec ? [...sec.querySelectorAll(sel)] : [];
                return {roc: all('img.roc').filter(ok).length, histogram: all('img.histogram').filter(ok).length,
                        levels: all('img.levels').filter(ok).length, thumbnails: all('img.thumbnail').filter(ok).length,
                        heatmaps: all('img.thumbnail[alt^="heat map"]').filter(ok).length,
                        title: sec ? sec.querySelector('h2').textContent : null,
                        rows: all('.gallery-row').map(r => ({kind: r.dataset.kind, title: r.querySelector('h4').textContent,
                            kinds: [...r.querySelectorAll('.kind')].map(k => k.textContent),
                            scores: [...r.querySelectorAll('.meta')].map(m => m.textContent)})),
                        heatSizes: all('img.thumbnail[alt^="heat map"]').map(i => [i.naturalWidth, i.naturalHeight]),
                        imageSizes: all('img.thumbnail[alt^="image"]').map(i => [i.naturalWidth, i.naturalHeight])};
            }""", category)
        finally:
            browser.close()
    assert found["title"] == category
    assert found["roc"] == 1 and found["histogram"] == 1 and found["levels"] == 1
    assert found["thumbnails"] >= 4
    return found


def test_html_report_opens_in_chromium(tiny_root, tmp_path, capsys):
    out, json_out = tmp_path / "r.html", tmp_path / "r.json"
    assert main(["evaluate", str(tiny_root), "--quiet", "--html", str(out), "--json", str(json_out), *TINY_ARGS,
                 "--map-levels", "stage2,stage3", "--map-method", "nearest"]) == 0
    assert out.stat().st_size > 10_000 and json.loads(json_out.read_text())["categories"].keys() == {"brick", "gravel"}
    found = check_report_in_chromium(out, "brick", tmp_path)
    assert found["heatmaps"] == 8  # 4 good and 4 defective images, each with its heat map
    # two labelled rows: the good images, then the defective ones, each tile with its kind and score
    good, bad = found["rows"]
    assert (good["kind"], bad["kind"]) == ("good", "defective") and "good" in good["title"] and "defective" in bad["title"]
    assert good["kinds"] == ["good"] * 4 and len(bad["kinds"]) == 4 and "good" not in bad["kinds"]
    assert all("global score " in m and "flagged" in m for m in good["scores"] + bad["scores"])
    # each heat map is drawn at its thumbnail's size with the legend panel (decision, score, colour bar) under it
    for (hw, hh), (iw, ih) in zip(found["heatSizes"], found["imageSizes"]):
        assert hw == iw == 240 and hh > ih


@pytest.mark.skipif(not os.environ.get("GAUSSAD_REPORT_HTML"), reason="set GAUSSAD_REPORT_HTML to a report to check")
def test_a_given_report_opens_in_chromium(tmp_path):
    """``GAUSSAD_REPORT_HTML=r.html [GAUSSAD_REPORT_CATEGORY=bottle] pytest -k given_report -s``."""
    found = check_report_in_chromium(Path(os.environ["GAUSSAD_REPORT_HTML"]),
                                     os.environ.get("GAUSSAD_REPORT_CATEGORY", "bottle"), tmp_path)
    print(found)


def test_hostile_names_are_text_in_the_report_and_no_script_runs(tiny_root, tmp_path, capsys):
    """Issue 32, N6 and N7: a defect folder named like an HTML tag with a script, and a category whose name matplotlib
    would parse as mathtext. The report is written (so are --json and --report), the names show as text, and
    Chromium runs no script from them."""
    import shutil

    hostile = "<img src=x onerror=alert(document.title)>"
    category = "cat$\\foo$"
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "brick", root / category)
    for part in ("test", "ground_truth"):
        (root / category / part / "patch").rename(root / category / part / hostile)
    out, json_out, md_out = tmp_path / "r.html", tmp_path / "r.json", tmp_path / "r.md"
    assert main(["evaluate", str(root), "--quiet", "--html", str(out), "--json", str(json_out), "--report",
                 str(md_out), *TINY_ARGS, "--map-levels", "stage2,stage3", "--map-method", "nearest"]) == 0
    text = out.read_text()
    assert hostile not in text and "&lt;img src=x onerror=alert(document.title)&gt;" in text
    assert json_out.exists() and md_out.exists()
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                        headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(out.resolve().as_uri())
            page.wait_for_load_state("load")
            page.wait_for_timeout(500)
            shown = page.evaluate("() => [...document.querySelectorAll('.meta')].map(e => e.textContent).join(' ')")
            title = page.evaluate("() => document.querySelector('h2').textContent")
        finally:
            browser.close()
    assert dialogs == [] and hostile in shown and title == category
