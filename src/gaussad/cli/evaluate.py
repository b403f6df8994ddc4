"""``gaussad evaluate``: image AUROC and threshold error rates on MVTec-layout data, with reports."""

from __future__ import annotations

import argparse
import json

from ..errors import GaussadError
from .options import model_options, model_params


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="image AUROC and threshold error rates on MVTec-layout data",
                       description="Evaluate on ROOT, one category in MVTec layout or a folder of categories: image "
                                   "AUROC, and per threshold method (chi2, hotelling, conformal) and target FPR "
                                   "(0.01, 0.05, 0.1) the realised FPR on test/good and TPR on defective images.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--protocol", choices=("paper", "full"), default="paper",
                   help="paper: 5-fold KFold(shuffle, seed 0) of train/good, fit on 80%% and calibrate conformal "
                        "thresholds on the held-out 20%%, mean over folds; full: fit on all of train/good, conformal "
                        "calibration from 20%% of it held out before the refit")
    model_options(p)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--report", metavar="OUT.md", help="write a Markdown report to OUT.md")
    p.add_argument("--html", metavar="OUT.html",
                   help="write a self-contained HTML report (ROC curves, score histograms with the thresholds, AUROC per "
                        "level, the most anomalous good and least anomalous defective images; needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..detector import params
    from ..intake.files import check_output, write_atomic

    for path, what in ((args.json, "JSON report"), (args.report, "report"), (args.html, "HTML report")):
        if path:
            check_output(path, what)
    params.validate({**params.defaults(), **model_params(args)})
    from ..tools.evaluate import evaluate, format_markdown, format_table

    if args.html:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GaussadError("--html needs matplotlib: pip install 'gaussad[report]'") from None
    details: dict | None = {} if args.html else None
    report = evaluate(args.root, protocol=args.protocol, verbose=not args.quiet, details=details, **model_params(args))
    # Each output on its own, the plain ones first: a failure drawing the HTML report loses no other output.
    if args.json:
        write_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode(), "JSON report")
    if args.report:
        write_atomic(args.report, format_markdown(report).encode(), "report")
    if args.html:
        from ..tools.report import render_html

        write_atomic(args.html, render_html(report, details).encode(), "HTML report")
    print(format_table(report))
    return 0
