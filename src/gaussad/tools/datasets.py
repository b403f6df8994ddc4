"""Data sets in MVTec AD layout: category discovery, test labels, masks and the paper's K-fold split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..intake.images import IMAGE_EXTENSIONS, list_images


@dataclass
class Category:
    """One category: sorted train/good files and the test files with labels (1 = defective)."""

    name: str
    root: Path
    train_files: list[Path]
    test_files: list[Path]
    test_labels: np.ndarray
    test_defects: list[str]
    mask_files: list[Path | None] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when every defective test image has a ground-truth mask."""
        return all(m is not None for m, y in zip(self.mask_files, self.test_labels) if y == 1)


def is_category(path: Path) -> bool:
    """A folder with train/good and test/ subfolders."""
    return (path / "train" / "good").is_dir() and (path / "test").is_dir()


def load_category(path: str | os.PathLike) -> Category:
    """Read one MVTec-layout category; test/good is label 0, every other test/<defect> label 1."""
    root = Path(path)
    if not is_category(root):
        raise DataError(f"{root}: not an MVTec-layout category (needs train/good/ and test/)")
    train = list_images(root / "train" / "good")
    files: list[Path] = []
    labels: list[int] = []
    defects: list[str] = []
    masks: list[Path | None] = []
    for sub in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        imgs = [p for p in sorted(sub.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        for img in imgs:
            files.append(img)
            labels.append(0 if sub.name == "good" else 1)
            defects.append(sub.name)
            mask = root / "ground_truth" / sub.name / f"{img.stem}_mask.png"
            masks.append(mask if mask.is_file() else None)
    labels_arr = np.asarray(labels, dtype=int)
    if not (labels_arr == 0).any() or not (labels_arr == 1).any():
        raise DataError(f"{root / 'test'}: need both good and defective test images to evaluate")
    return Category(root.name, root, train, files, labels_arr, defects, masks)


def find_categories(root: str | os.PathLike) -> list[Category]:
    """One category if ``root`` is one, else every category folder directly inside ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if is_category(root):
        return [load_category(root)]
    cats = [load_category(p) for p in sorted(root.iterdir()) if p.is_dir() and is_category(p)]
    if not cats:
        raise DataError(f"{root}: no MVTec-layout categories found (expected <category>/train/good and <category>/test)")
    return cats


def kfold_indices(n: int, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs identical to sklearn's KFold(n_splits, shuffle=True, random_state=seed)."""
    if n < n_splits:
        raise DataError(f"cannot split {n} training images into {n_splits} folds")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits)
    sizes[: n % n_splits] += 1
    out = []
    start = 0
    for size in sizes:
        held = order[start : start + size]
        keep = np.sort(np.setdiff1d(order, held))
        out.append((keep, np.sort(held)))
        start += size
    return out
