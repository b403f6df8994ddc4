"""The evaluation report as one self-contained HTML file: per category the ROC curves, score histograms with the
thresholds, per-level AUROC, and the most anomalous good and least anomalous defective test images (heat maps when the
model has maps). Figures are drawn with matplotlib (Agg backend) and embedded as base64 PNG: the file opens from disk
with no server and no network."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .datasets import Category
    from ..detector.heatmap import HeatScale

METHOD_STYLES = {"conformal": "-", "chi2": "--", "hotelling": ":"}
ALPHA_COLOURS = {"0.01": "#b2182b", "0.05": "#ef8a62", "0.1": "#67a9cf"}
THUMBNAIL = 240  # the heat map's panel needs this width (heatmap.MIN_PANEL_WIDTH) for its text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
figcaption { font-size: .85em; color: #555; max-width: 420px; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; } th { background: #f3f3f3; }
.gallery { display: flex; flex-wrap: wrap; gap: .8em; } .tile { font-size: .8em; text-align: center; width: 500px; }
.tile img { width: 240px; height: auto; display: inline-block; vertical-align: top; margin: 0 2px; }
.meta { color: #555; } .kind { font-weight: 600; } h4 { margin: .8em 0 .3em; }
"""


def _png(fig) -> str:
    """A matplotlib figure as a data URL (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (ties kept together), from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, y = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max((~labels).sum(), 1)], np.r_[0.0, tp / max(labels.sum(), 1)]


def _roc_figure(name: str, labels: np.ndarray, fold_scores: list[np.ndarray], aurocs: list[float]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for i, (scores, auc) in enumerate(zip(fold_scores, aurocs)):
        fpr, tpr = roc_points(labels, scores)
        ax.step(fpr, tpr, where="post", lw=1.2, label=f"fold {i + 1}: AUROC {auc:.4f}" if len(aurocs) > 1
                else f"AUROC {auc:.4f}")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlabel="false-positive rate (good test images)", ylabel="true-positive rate (defective)",
           title=f"{name}: ROC", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def _histogram_figure(name: str, labels: np.ndarray, scores: np.ndarray, thresholds: dict[str, dict],
                      one_fit: bool) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    good, bad = scores[labels == 0], scores[labels == 1]
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(good, bins=bins, alpha=0.6, color="#4daf4a", label=f"good ({good.size})")
    ax.hist(bad, bins=bins, alpha=0.6, color="#984ea3", label=f"defective ({bad.size})")
    top = ax.get_ylim()[1]
    for method, by_alpha in thresholds.items():
        # only a rule that thresholds this score draws a line: fused decides on p-values, chi2 and hotelling on each
        # level (Bonferroni), so no single line on the mean score is theirs (issue 35)
        if method != "conformal":
            continue
        for alpha, cell in by_alpha.items():
            limit = (cell.get("score_threshold_folds") or [None])[0]
            if limit is None or not np.isfinite(limit):
                continue
            ax.axvline(limit, color=ALPHA_COLOURS.get(alpha, "k"), ls=METHOD_STYLES.get(method, "-"), lw=1.3,
                       label=f"{method} at alpha {alpha}")
    ax.set_ylim(0, top)
    ax.set(xlabel="image score (mean Mahalanobis distance over levels)", ylabel="test images",
           title=f"{name}: test scores and thresholds{'' if one_fit else ' (fold 1)'}")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _levels_figure(name: str, level_names: list[str], aurocs: list[float], combined: float) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.bar(range(len(aurocs)), aurocs, color="#377eb8")
    ax.axhline(combined, color="#e41a1c", lw=1, label=f"combined score {combined:.4f}")
    ax.set_xticks(range(len(aurocs)), level_names, rotation=45, ha="right")
    ax.set(ylabel="image AUROC", ylim=(min(0.5, min(aurocs) - 0.05), 1.0), title=f"{name}: AUROC per level")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _tile(cat: "Category", idx: int, score: float, amap: np.ndarray | None, scale: "HeatScale",
          flagged: bool | None) -> str:
    """One gallery image: its thumbnail, beside it the heat-map overlay (:func:`gaussad.detector.heatmap.render`, drawn at the
    thumbnail's size so that its panel stays legible), and its kind (good or the defect), path, global score (the
    mean level distance the report ranks by) and the model's decision (its own rule: the fused score's for the
    default preset, which is why a flagged image can have a lower global score than one not flagged)."""
    from ..detector.heatmap import render
    from ..intake.images import load_image

    path = cat.test_files[idx]
    try:
        image = load_image(path)
    except Exception as exc:  # an unreadable file must not stop the report
        return f'<div class="tile">{html.escape(path.name)}: {html.escape(str(exc))}</div>'
    scale_by = THUMBNAIL / max(image.size)
    thumb = image.resize((max(1, round(image.size[0] * scale_by)), max(1, round(image.size[1] * scale_by))))
    shown = [("image", thumb)] + ([] if amap is None else [("heat map", render(thumb, amap, scale, score, flagged))])
    kind = "good" if cat.test_labels[idx] == 0 else cat.test_defects[idx]
    imgs = "".join(f'<img class="thumbnail" alt="{label}: {html.escape(path.name)}" src="{_image_url(im)}">'
                   for label, im in shown)
    map_max = "" if amap is None else f", map max {float(amap.max()):.2f}"
    return (f'<div class="tile">{imgs}<div>{html.escape(path.parent.name)}/{html.escape(path.name)}</div>'
            f'<div class="meta"><span class="kind">{html.escape(kind)}</span>, global score {score:.3f}{map_max}'
            f'{"" if flagged is None else ", flagged" if flagged else ", not flagged"}</div></div>')


def _gallery(detail: dict[str, Any], scores: np.ndarray) -> str:
    """Two labelled rows of gallery images (the most anomalous good ones, the least anomalous defective ones), with
    their heat maps beside them when the model has maps."""
    from ..detector.heatmap import heat_scale

    cat = detail["category"]
    maps = detail.get("gallery_maps")
    flags = detail.get("gallery_flags")
    scale = heat_scale(detail.get("gallery_map_calibration"))
    rows: dict[str, list[str]] = {"good": [], "defective": []}
    for k, idx in enumerate(detail.get("gallery", [])):
        tile = _tile(cat, idx, float(scores[idx]), None if maps is None else maps[k], scale,
                     None if flags is None else bool(flags[k]))
        rows["good" if cat.test_labels[idx] == 0 else "defective"].append(tile)
    titles = {"good": "good test images, most anomalous first", "defective": "defective test images, least anomalous "
              "first"}
    return "".join(f'<div class="gallery-row" data-kind="{kind}"><h4>{html.escape(titles[kind])}</h4>'
                   f'<div class="gallery">{"".join(tiles)}</div></div>' for kind, tiles in rows.items() if tiles)


def _threshold_table(result: dict[str, Any], one_fit: bool) -> str:
    rows = []
    for method, by_alpha in result["thresholds"].items():
        cells = []
        for alpha, cell in by_alpha.items():
            if cell["fpr"] is None:
                cells.append("<td>n/a</td>")
                continue
            raised = sum(t > float(alpha) for t in cell.get("target_folds", []))
            cells.append(f"<td>{cell['fpr']:.3f} / {cell['tpr']:.3f}" + (f" ({raised} raised)" if raised else "")
                         + "</td>")
        rows.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>alpha {a}</th>" for a in next(iter(result["thresholds"].values())))
    return (f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"
            "<p class=meta>realised FPR on good test images / TPR on defective ones"
            + (" (raised: the calibration cannot support alpha, decided at 1/(n + 1) instead)</p>" if one_fit else
               ", mean over folds (raised: folds whose calibration cannot support alpha, decided at 1/(n + 1) "
               "instead)</p>"))


def render_html(report: dict[str, Any], details: dict[str, Any]) -> str:
    """The report as one HTML page (:func:`gaussad.tools.evaluate.evaluate` with ``details``)."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context({"text.parse_math": False}):  # names are text: a "$" is never parsed as mathtext
        return _render_html(report, details)


def auto_text(report: dict[str, Any], name: str) -> str:
    """A setting of an evaluation report that 'auto' may decide per category (input_size, map_tiles): its value, or
    'auto' with each category's decision."""
    value = report.get(name, 1)
    if value != "auto":
        return str(value)
    return "auto (" + ", ".join(f"{cat} {r.get(name)}" for cat, r in report["categories"].items()) + ")"


def _render_html(report: dict[str, Any], details: dict[str, Any]) -> str:
    head = (f"protocol {report['protocol']}, preset {report['preset'] or 'paper'}, backbone {report['backbone']} at "
            f"{auto_text(report, 'input_size')} px, estimator {report['estimator']}, normalisation {report['normalize']}, "
            f"resize {report.get('resize', 'square')}"
            + (f", anomaly maps {report['map_method']} from {', '.join(report['map_levels'])}" if report.get("map_levels")
               else ""))
    out = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>gaussad evaluation</title>",
           f"<style>{STYLE}</style></head><body><h1>gaussad evaluation</h1><p>{html.escape(head)}</p>",
           f"<p>Mean image AUROC over {report['n_categories']} categories: {report['mean_image_auroc']:.4f}</p>"]
    for name, result in report["categories"].items():
        detail = details[name]
        labels = detail["category"].test_labels
        fold_scores = detail["fold_scores"]
        pixel = f", pixel AUROC {result['pixel_auroc']:.4f}" if "pixel_auroc" in result else ""
        maps = "gallery_maps" in detail
        one = len(fold_scores) == 1  # the full protocol: one fit on every training image, no folds to speak of
        whose = "the model" if one else "the first fold's model"
        out += [f'<section class="category" id="{html.escape(name)}"><h2>{html.escape(name)}</h2>',
                f"<p>image AUROC {result['image_auroc']:.4f}{pixel}; {result['n_train']} training images, "
                f"{result['n_test_good']} good and {result['n_test_defective']} defective test images</p>",
                '<div class="figures">',
                f'<figure><img class="roc" alt="ROC curve of {html.escape(name)}" '
                f'src="{_roc_figure(name, labels, fold_scores, result["fold_aurocs"])}">'
                f"<figcaption>ROC curve of the image score{'' if one else ', one per fold'}</figcaption></figure>",
                f'<figure><img class="histogram" alt="score histogram of {html.escape(name)}" '
                f'src="{_histogram_figure(name, labels, fold_scores[0], result["thresholds"], one)}">'
                f"<figcaption>Scores of {whose}; vertical lines: the conformal rule's score "
                "thresholds per alpha (colour); chi2, hotelling and the fused score have no single threshold on this "
                "score (they decide per level or on p-values): their rates are in the table</figcaption></figure>",
                f'<figure><img class="levels" alt="AUROC per level of {html.escape(name)}" '
                f'src="{_levels_figure(name, report["levels"], result["level_aurocs"], result["image_auroc"])}">'
                f"<figcaption>Image AUROC of each level's distance alone{'' if one else ' (mean over folds)'}"
                "</figcaption></figure>",
                "</div>", _threshold_table(result, one),
                f"<h3>Most anomalous good and least anomalous defective test images{'' if one else ' (fold 1)'}"
                f"{', with heat maps' if maps else ''}</h3>", _gallery(detail, fold_scores[0]), "</section>"]
    out.append("</body></html>")
    return "\n".join(out)
