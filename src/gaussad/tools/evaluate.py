"""Evaluation harness: the paper's protocols on MVTec-layout data, image-level AUROC per category and level."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..detector import params as parameters, resolve
from .datasets import Category, find_categories, kfold_indices
from ..errors import GaussadError
from ..intake.features import AUTO_SETTINGS, ExtractorCache
from ..detector.model import GaussianAD
from .report import auto_text
from ..core.threshold import METHODS

PROTOCOLS = ("paper", "full")
ALPHAS = (0.01, 0.05, 0.1)
GALLERY = 4  # the report shows this many most anomalous good and least anomalous defective test images
FULL_CALIBRATION = 0.2  # fraction of train/good held out for conformal calibration under the full protocol


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the share of (positive, negative) pairs the scores order correctly, ties counting
    one half (Mann-Whitney U); labels 1 = positive.

    The larger class is sorted once and the other class's scores are placed in it (``searchsorted``), so the memory
    is about one copy of the scores in their own dtype: a pixel AUROC over tens of millions of map values needs no
    float64 ranks (ranking them took about 55 bytes per pixel, 1.6 GB for magnetic tile's test maps)."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    n_pos, n_neg = int(labels.sum()), labels.size - int(labels.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError(f"AUROC of NaN scores ({int(np.isnan(scores).sum())} of {scores.size})")
    few, many = (scores[labels], scores[~labels]) if n_pos <= n_neg else (scores[~labels], scores[labels])
    many.sort()
    below = np.searchsorted(many, few, "left").sum(dtype=np.int64)  # pairs with the larger class's score lower
    ties = np.searchsorted(many, few, "right").sum(dtype=np.int64) - below
    correct = below if n_pos <= n_neg else n_pos * n_neg - below - ties  # positive above negative
    return float((correct + 0.5 * ties) / (n_pos * n_neg))


def hit_rate(amaps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of defective images (``labels`` 1) whose map maximum (the first one, row-major) lies inside their
    defect mask; None when no defective image has a non-empty mask."""
    rows = [i for i in np.flatnonzero(labels == 1) if masks[i].any()]
    if not rows:
        return None
    flat = amaps[rows].reshape(len(rows), -1)
    peaks = flat.argmax(axis=1)
    return float(np.mean(masks[rows].reshape(len(rows), -1)[np.arange(len(rows)), peaks] > 0))


def load_masks(category: Category, size: int) -> np.ndarray:
    """Ground-truth masks of the test images at size x size (nearest neighbour); good images are all-zero."""
    from PIL import Image

    out = np.zeros((len(category.test_files), size, size), dtype=bool)
    for i, path in enumerate(category.mask_files):
        if path is not None:
            with Image.open(path) as m:
                out[i] = np.asarray(m.convert("L").resize((size, size), Image.NEAREST)) > 127
    return out


def evaluate_category(category: Category, features: tuple[list[np.ndarray], list[np.ndarray]], params: dict[str, Any],
                      protocol: str = "paper", seed: int = 0,
                      feature_maps: tuple[list, list, np.ndarray] | None = None,
                      level_names: list[str] | None = None, details: dict[str, Any] | None = None,
                      map_size: int = 224) -> dict[str, Any]:
    """Fit per fold on train features, score the test features, and collect AUROCs and threshold rates.

    With ``feature_maps`` (train maps, test maps, test masks or None) each fold also fits the anomaly maps (at
    ``map_size`` without masks), the image AUROC of the maps' maxima and the fused score are reported, and with
    masks the pixel AUROC over all test pixels.  Conformal thresholds: with the paper protocol each
    fold's held-out 20 % of train/good calibrates the model fitted on the other 80 %; with the full protocol
    the model holds out ``FULL_CALIBRATION`` of train/good for calibration and then refits on all of it.

    ``details`` (a dict, for the HTML report) receives the test scores of every fold (``fold_scores``), and the
    indices of the first fold's :data:`GALLERY` most anomalous good and least anomalous defective test images
    (``gallery``) with their anomaly maps (``gallery_maps``, when maps are fitted), the map model's calibration peaks
    (``gallery_map_calibration``, None without) and its decisions on them (``gallery_flags``); the returned figures do
    not change.
    """
    train, test = features
    n = train[0].shape[0]
    params = {**params, "verbose": False, "image_score": "global", "threshold": "chi2", "calibration": None}
    folds = kfold_indices(n, 5, seed) if protocol == "paper" else [(np.arange(n), np.arange(0))]
    fold_aurocs, level_aurocs, pixel_aurocs, max_map_aurocs, rates, n_cal, hits, fused = [], [], [], [], [], [], [], []
    for keep, held in folds:
        if protocol == "paper":
            model = GaussianAD(**params).fit_features([f[keep] for f in train], level_names)
            model.calibrate_features([f[held] for f in train])
        else:
            model = GaussianAD(**{**params, "calibration": FULL_CALIBRATION, "random_state": seed}).fit_features(
                train, level_names)
        n_cal.append(int(model.calibration_scores_.size))
        level = model.level_scores_features(test)
        fold_aurocs.append(roc_auc(category.test_labels, level.mean(axis=1)))
        gallery = _gallery(details, level.mean(axis=1), category.test_labels)
        level_aurocs.append([roc_auc(category.test_labels, level[:, i]) for i in range(level.shape[1])])
        rates.append(_threshold_rates(model, level, category.test_labels))
        if feature_maps is not None:
            train_maps, test_maps, masks = feature_maps
            fusable = model.setting("map_method") == "nearest"
            if fusable:  # the model's fused score, calibrated as fit calibrates it (cross-conformal, 5 folds)
                model = GaussianAD(**{**model.get_params(), "image_score": "fused", "threshold": "conformal",
                                      "calibration": "cv"}).fit_features([f[keep] for f in train], level_names)
            model.fit_map_features([train_maps[i] for i in keep])
            amaps = model.anomaly_map_features(test_maps, map_size if masks is None else masks.shape[-1])
            if gallery is not None:  # what the report's heat maps need: the maps, their scale, the decisions
                details["gallery_maps"] = amaps[gallery]
                details["gallery_map_calibration"] = model.state_.map_calibration
                peaks = model.state_.map_peaks_of([test_maps[i] for i in gallery]) if fusable else None
                details["gallery_flags"] = model.decide(level[gallery], map_peaks=peaks)[0].astype(bool)
            if masks is not None:  # pixel figures where the category has ground-truth masks
                pixel_aurocs.append(roc_auc(masks.ravel(), amaps.ravel()))
                hits.append(hit_rate(amaps, masks, category.test_labels))
            max_map_aurocs.append(roc_auc(category.test_labels, amaps.reshape(len(amaps), -1).max(axis=1)))
            if fusable:
                fused.append(_fused(model, level, test_maps, category.test_labels))
    result = {
        "image_auroc": float(np.mean(fold_aurocs)),
        "fold_aurocs": [float(a) for a in fold_aurocs],
        "level_aurocs": [float(a) for a in np.mean(level_aurocs, axis=0)],
        "thresholds": _average_rates(rates),
        "n_calibration_folds": n_cal,
        "n_train": n,
        "n_test_good": int((category.test_labels == 0).sum()),
        "n_test_defective": int((category.test_labels == 1).sum()),
    }
    if max_map_aurocs:
        result["max_map_auroc"] = float(np.mean(max_map_aurocs))
    if pixel_aurocs:
        result["pixel_auroc"] = float(np.mean(pixel_aurocs))
        result["pixel_fold_aurocs"] = [float(a) for a in pixel_aurocs]
        if all(h is not None for h in hits):
            result["hit_rate"] = float(np.mean(hits))
    if fused:
        result["fused_auroc"] = float(np.mean([f["auroc"] for f in fused]))
        result["fused_fisher_auroc"] = float(np.mean([f["fisher_auroc"] for f in fused]))
        result["thresholds"]["fused"] = _average_rates([{"fused": f["rates"]} for f in fused])["fused"]
    return result


def _fused(model: GaussianAD, level: np.ndarray, test_maps: list, labels: np.ndarray) -> dict[str, Any]:
    """The fused score of one fold, from a model fitted with ``image_score='fused'`` (:mod:`gaussad.core.fusion`): AUROC
    of its ranking by Bonferroni's and by Fisher's combination, and the realised rates of its decision at each
    alpha."""
    peaks = model.state_.map_peaks_of(test_maps)
    rule = model.rule()
    rates = {}
    for alpha in ALPHAS:
        flagged = model.decide(level, alpha, map_peaks=peaks)[0].astype(bool)
        rates[str(alpha)] = {"fpr": float(flagged[labels == 0].mean()), "tpr": float(flagged[labels == 1].mean()),
                             "score_threshold": None, "target": model.rule(alpha).target_fpr(model.state_)}
    return {"auroc": roc_auc(labels, rule.scores(model.state_, level, peaks, "bonferroni")),
            "fisher_auroc": roc_auc(labels, rule.scores(model.state_, level, peaks, "fisher")), "rates": rates}


def _gallery(details: dict[str, Any] | None, scores: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Record a fold's test scores in ``details``; on the first fold, pick the gallery of the report (indices of
    the most anomalous good and least anomalous defective images, in that order) and return it."""
    if details is None:
        return None
    details.setdefault("fold_scores", []).append(scores)
    if len(details["fold_scores"]) > 1:
        return None
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    details["gallery"] = np.r_[good[np.argsort(-scores[good], kind="stable")][:GALLERY],
                               bad[np.argsort(scores[bad], kind="stable")][:GALLERY]].astype(np.int64)
    return details["gallery"]


def _threshold_rates(model: GaussianAD, level: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, dict]]:
    """Per method and alpha: realised FPR on good and TPR on defective test images, or why it is unavailable."""
    out: dict[str, dict[str, dict]] = {}
    for method in METHODS:
        out[method] = {}
        for alpha in ALPHAS:
            try:
                flagged = model.decide(level, alpha, method)[0].astype(bool)
                limit = model.score_threshold(alpha, method)
            except GaussadError as exc:
                out[method][str(alpha)] = {"unavailable": str(exc)}
                continue
            out[method][str(alpha)] = {"fpr": float(flagged[labels == 0].mean()),
                                       "tpr": float(flagged[labels == 1].mean()),
                                       "score_threshold": float(limit) if np.isfinite(limit) else None,
                                       "target": model.rule(alpha, method).target_fpr(model.state_)}
    return out


def _average_rates(folds: list[dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict]]:
    """Mean over folds with the per-fold figures; a method unavailable in any fold is reported as such."""
    out: dict[str, dict[str, dict]] = {}
    for method, by_alpha in folds[0].items():
        out[method] = {}
        for alpha in by_alpha:
            cells = [f[method][alpha] for f in folds]
            missing = [c["unavailable"] for c in cells if "unavailable" in c]
            if missing:
                out[method][alpha] = {"fpr": None, "tpr": None, "fpr_folds": [], "tpr_folds": [],
                                      "unavailable": missing[0]}
                continue
            out[method][alpha] = {
                "fpr": float(np.mean([c["fpr"] for c in cells])),
                "tpr": float(np.mean([c["tpr"] for c in cells])),
                "fpr_folds": [c["fpr"] for c in cells],
                "tpr_folds": [c["tpr"] for c in cells],
                "score_threshold_folds": [c["score_threshold"] for c in cells],
                "target_folds": [c["target"] for c in cells],
            }
    return out


def evaluate(root: str | os.PathLike, protocol: str = "paper", verbose: bool = False,
             details: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """Evaluate every category under ``root`` with the given GaussianAD parameters; returns the JSON report.
    ``details`` (a dict) receives per category name the category and what :func:`evaluate_category` records for the
    HTML report (:mod:`gaussad.tools.report`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    categories = find_categories(root)
    given = {**parameters.defaults(), **params}
    parameters.validate(given)
    auto = {k for k in AUTO_SETTINGS if parameters.effective(given, k) == "auto"}  # decided per category
    cache = ExtractorCache()
    results: dict[str, Any] = {}
    for cat in categories:
        # input_size and map_tiles 'auto' decided per category from its training images, as fit decides them
        settings = resolve.resolve(given, cat.train_files)
        extractor = resolve.extractor(settings, cache)
        with_maps = bool(extractor.map_levels)  # the fused score needs map peaks, masks or not
        # adapt: the network fine-tuned on this category's training images (never its test images); int8: quantized
        extractor.fit_network(cat.train_files, settings, verbose=verbose)
        train, train_maps = resolve.features(extractor, cat.train_files, f"{cat.name} train", with_maps, verbose)
        test, test_maps = resolve.features(extractor, cat.test_files, f"{cat.name} test", with_maps, verbose)
        masks = load_masks(cat, extractor.input_size) if with_maps and cat.has_masks else None
        fmaps = (train_maps, test_maps, masks) if with_maps else None
        extra = None if details is None else details.setdefault(cat.name, {"category": cat})
        results[cat.name] = {**evaluate_category(cat, (train, test), params, protocol, feature_maps=fmaps,
                                                 level_names=extractor.level_names, details=extra,
                                                 map_size=extractor.input_size),
                             "input_size": extractor.input_size, "map_tiles": extractor.map_tiles,
                             **({"adaptation": extractor.adaptation} if settings.get("adapt") else {})}
    aurocs = [r["image_auroc"] for r in results.values()]
    setting = lambda name: parameters.effective(given, name)  # noqa: E731
    sem = float(np.std(aurocs, ddof=1) / math.sqrt(len(aurocs))) if len(aurocs) > 1 else 0.0
    fitted = {"input_size": "auto" if "input_size" in auto else extractor.input_size, "levels": extractor.level_names,
              "map_levels": extractor.map_level_names,
              "map_tiles": "auto" if "map_tiles" in auto else extractor.map_tiles}  # 'auto': per category
    report = {
        "protocol": protocol,
        **parameters.reported(given, fitted),
        # the decision a model of these parameters makes: its rows of "thresholds" ("fused" for a fused score)
        "decision": {"rule": "fused" if setting("image_score") == "fused" else setting("threshold"),
                     "fpr": given["fpr"]},
        "categories": results,
        "n_categories": len(results),
        "mean_image_auroc": float(np.mean(aurocs)),
        "sem": sem,
    }
    pixel = [r["pixel_auroc"] for r in results.values() if "pixel_auroc" in r]
    if pixel:
        report["mean_pixel_auroc"] = float(np.mean(pixel))
    return report


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: per category the combined and per-level AUROC, then mean +/- SEM."""
    levels = report["levels"]
    pix = any("max_map_auroc" in r for r in report["categories"].values())  # maps: their columns
    head = ["category", "AUROC"] + (["pixel", "map-max", "hit", "fused"] if pix else []) + levels
    rows = [[name, f"{r['image_auroc']:.4f}"]
            + ([f"{r[k]:.4f}" if k in r else "-" for k in ("pixel_auroc", "max_map_auroc", "hit_rate", "fused_auroc")]
               if pix else [])
            + [f"{a:.3f}" for a in r["level_aurocs"]] for name, r in report["categories"].items()]
    several = report["n_categories"] > 1  # a mean and its SEM say something only over several categories
    rows.append([f"mean +/- SEM ({report['n_categories']})" if several else "mean",
                 f"{report['mean_image_auroc']:.4f}" + (f" +/- {report['sem']:.4f}" if several else "")]
                + ([f"{report['mean_pixel_auroc']:.4f}" if "mean_pixel_auroc" in report else "-", "", "", ""]
                   if pix else []) + [""] * len(levels))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = (f"protocol={report['protocol']} preset={report['preset'] or 'paper'} backbone={report['backbone']} size={auto_text(report, 'input_size')} "
             f"estimator={report['estimator']} reduction={report['reduction'] or 'none'} normalize={report['normalize']} "
             f"resize={report.get('resize', 'square')} pool={report.get('pool', 'avg')}"
             + (f" maps={report['map_method']}:{','.join(report['map_levels'])} map_pool={report['map_pool']}"
                f" grid={report.get('map_grid') or 'coarsest'} tiles={auto_text(report, 'map_tiles')}"
                if report.get("map_levels") else ""))
    out = [title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out + [""] + _threshold_table(report))


def _threshold_notes(name: str, r: dict[str, Any]) -> list[str]:
    """Why cells of one category are unavailable, and where a conformal rule decided at a larger rate than alpha."""
    notes = []
    for method, by_alpha in r["thresholds"].items():
        reasons = {c["unavailable"] for c in by_alpha.values() if c["fpr"] is None}
        notes += [f"{name} {method} n/a: {reason}" for reason in sorted(reasons)]
        where = [f"alpha={a} in {len(raised)} of {len(c['target_folds'])} folds (at {max(raised):.3g})"
                 for a, c in by_alpha.items() if c["fpr"] is not None
                 for raised in [[t for t in c.get("target_folds", []) if t > float(a)]] if raised]
        if where:
            notes.append(f"{name} {method}: decided at the smallest rate its calibration supports, 1/(n + 1), at "
                         f"{'; '.join(where)} (alpha needs at least 1/alpha - 1 calibration scores; calibration "
                         f"scores per fold: {', '.join(map(str, r['n_calibration_folds']))})")
    return notes


def _threshold_table(report: dict[str, Any]) -> list[str]:
    """Realised FPR / TPR per category, method and alpha, with the reasons for unavailable or infinite cells."""
    head = ["category", "method"] + [f"alpha={a}" for a in ALPHAS]
    rows, notes = [], []
    default = report.get("decision", {}).get("rule")
    for name, r in report["categories"].items():
        for method, by_alpha in r["thresholds"].items():
            label = f"{method} (the model's)" if method == default else method
            rows.append([name, label] + ["n/a" if c["fpr"] is None else f"{c['fpr']:.3f}/{c['tpr']:.3f}"
                                         for c in by_alpha.values()])
        notes += _threshold_notes(name, r)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    over = "mean over folds" if report.get("protocol") != "full" else "one fit on all of train/good"
    title = f"thresholds: realised FPR on test/good / TPR on defective at target FPR alpha ({over})"
    return [title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + notes


def format_markdown(report: dict[str, Any]) -> str:
    """The same table as Markdown, for --report."""
    levels = report["levels"]
    out = ["# gaussad evaluation", "",
           f"protocol `{report['protocol']}`, backbone `{report['backbone']}` at {auto_text(report, 'input_size')} px, "
           f"estimator `{report['estimator']}`, reduction `{report['reduction'] or 'none'}`, "
           f"normalisation `{report['normalize']}`, resize `{report.get('resize', 'square')}`"
           + (f", anomaly maps `{report['map_method']}` from {', '.join(report['map_levels'])} (pool {report['map_pool']})"
              if report.get("map_levels") else ""), "",
           "| category | image AUROC | folds | pixel AUROC | image AUROC of map maxima | localisation hit rate | "
           "fused score AUROC | " + " | ".join(levels) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(levels)]
    for name, r in report["categories"].items():
        folds = ", ".join(f"{a:.4f}" for a in r["fold_aurocs"])
        pixel = f"{r['pixel_auroc']:.4f}" if "pixel_auroc" in r else "-"
        peak = f"{r['max_map_auroc']:.4f}" if "max_map_auroc" in r else "-"
        hit = f"{r['hit_rate']:.3f}" if "hit_rate" in r else "-"
        fz = f"{r['fused_auroc']:.4f}" if "fused_auroc" in r else "-"
        out.append(f"| {name} | {r['image_auroc']:.4f} | {folds} | {pixel} | {peak} | {hit} | {fz} | "
                   + " | ".join(f"{a:.3f}" for a in r["level_aurocs"]) + " |")
    if report["n_categories"] > 1:
        out += ["", f"Mean over {report['n_categories']} categories: {report['mean_image_auroc']:.4f} +/- "
                    f"{report['sem']:.4f} (SEM)"]
    out += [""]
    out += ["## Thresholds", "",
            "Realised false-positive rate on test/good and true-positive rate on defective test images at target "
            "FPR alpha (mean over folds, then per fold; with the full protocol one fit; `(at x)`: the calibration "
            "cannot support alpha and the rule decided at x = 1/(n + 1)).", "",
            "| category | method | alpha | FPR | FPR per fold | TPR | TPR per fold |", "|---|---|---|---|---|---|---|"]
    for name, r in report["categories"].items():
        for method, by_alpha in r["thresholds"].items():
            for alpha, c in by_alpha.items():
                if c["fpr"] is None:
                    out.append(f"| {name} | {method} | {alpha} | n/a | | | |")
                    continue
                fpr = ", ".join(f"{v:.3f}" + ("" if t <= float(alpha) else f" (at {t:.3g})")
                                for v, t in zip(c["fpr_folds"], c["target_folds"]))
                tpr = ", ".join(f"{v:.3f}" for v in c["tpr_folds"])
                out.append(f"| {name} | {method} | {alpha} | {c['fpr']:.3f} | {fpr} | {c['tpr']:.3f} | {tpr} |")
    notes = [n for name, r in report["categories"].items() for n in _threshold_notes(name, r)]
    out += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
