"""One timed job of bench/speed/peers/run.py, in its own process (so that its peak RSS is its own): fit one detector on a
list of training images, score a list of test images, print one JSON line.

    python bench/speed/peers/worker.py TOOL TRAIN_LIST TEST_LIST WORKDIR

TOOL: ``gaussad:PRESET`` (run with gaussad's own environment), ``anomalib:padim``, ``anomalib:patchcore``,
``anomavision:padim`` (run with the throwaway environment of bench/speed/peers/setup.sh). The lists hold one image path a
line; WORKDIR holds the symlink folders the peers' datasets read (``train/``, ``test/``) and their scratch output.
Each timing starts with the detector's construction (its network built) and ends with the last score; decoding is
inside both. The peers' backbones start from random weights: this machine cannot download their ImageNet weights
(timing is the same; their scores mean nothing).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path


def gaussad(preset: str, train: list[str], test: list[str], workdir: Path) -> dict:
    """gaussad's preset: ``GaussianAD(preset=...).fit`` then ``score_samples`` (what ``gaussad score`` computes)."""
    from gaussad import GaussianAD

    t0 = time.perf_counter()
    model = GaussianAD(preset=preset).fit(train)
    t1 = time.perf_counter()
    scores = model.score_samples(test)
    t2 = time.perf_counter()
    extractor = model.feature_extractor()
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "n_scores": len(scores), "engine": extractor.runner.name,
            "input_size": extractor.input_size}


def anomalib(name: str, train: list[str], test: list[str], workdir: Path) -> dict:
    """anomalib's model ``name`` at its defaults (backbone, layers, coreset ratio), untrained weights, trained and
    run by anomalib's Engine (Lightning) on CPU; no evaluator or visualizer (no metrics, no images written)."""
    from torch.utils.data import DataLoader

    from anomalib.data import PredictDataset
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore

    def loader(folder: str) -> DataLoader:
        dataset = PredictDataset(workdir / folder)
        return DataLoader(dataset, batch_size=32, collate_fn=dataset.collate_fn, num_workers=0)

    t0 = time.perf_counter()
    model = {"padim": Padim, "patchcore": Patchcore}[name](pre_trained=False, evaluator=False, visualizer=False)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=workdir / "anomalib",
                    enable_progress_bar=False, enable_model_summary=False)
    engine.fit(model=model, train_dataloaders=loader("train"))
    t1 = time.perf_counter()
    predictions = engine.predict(model=model, dataloaders=loader("test"))
    t2 = time.perf_counter()
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "n_scores": sum(len(p.pred_score) for p in predictions)}


def anomavision(name: str, train: list[str], test: list[str], workdir: Path) -> dict:
    """AnomaVision's PaDiM at its defaults (resnet18, layers 0-1, 50 features) on its own dataset class (resize and
    crop 224), untrained weights (its ImageNet weights cannot be downloaded here: the backbone table is pointed at
    no weights)."""
    import torch
    from torch.utils.data import DataLoader

    import anomavision
    from anomavision.algorithm.common import feature_extraction

    builder, _ = feature_extraction.BACKBONES["resnet18"]
    feature_extraction.BACKBONES["resnet18"] = (builder, None)  # random weights: no download
    t0 = time.perf_counter()
    model = anomavision.Padim(backbone="resnet18", device=torch.device("cpu"))
    model.fit(DataLoader(anomavision.AnodetDataset(str(workdir / "train")), batch_size=32))
    t1 = time.perf_counter()
    n = 0
    for batch in DataLoader(anomavision.AnodetDataset(str(workdir / "test")), batch_size=32):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        scores, _ = model.predict(images)
        n += len(scores)
    t2 = time.perf_counter()
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "n_scores": n}


def main() -> None:
    tool, train_list, test_list, workdir = sys.argv[1:]
    train = Path(train_list).read_text().split("\n")
    test = Path(test_list).read_text().split("\n")
    family, _, name = tool.partition(":")
    warnings.filterwarnings("ignore")
    tools = {"gaussad": gaussad, "anomalib": anomalib, "anomavision": anomavision}
    out = tools[family](name, train, test, Path(workdir))
    out.update(tool=tool, train_images=len(train), test_images=len(test),
               fit_img_s=len(train) / out["fit_s"], score_img_s=len(test) / out["score_s"])
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
