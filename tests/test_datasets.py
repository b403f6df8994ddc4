import numpy as np
import pytest
from sklearn.model_selection import KFold

from gaussad.tools.datasets import find_categories, kfold_indices, load_category
from gaussad.errors import DataError

from .conftest import needs_shared


@pytest.mark.parametrize("n", [5, 17, 209])
def test_kfold_matches_sklearn(n):
    ours = kfold_indices(n, 5, 0)
    theirs = list(KFold(n_splits=5, shuffle=True, random_state=0).split(np.arange(n)))
    for (keep, held), (tr, te) in zip(ours, theirs):
        assert np.array_equal(keep, tr)
        assert np.array_equal(np.sort(held), np.sort(te))


def test_synthetic_root_has_categories(tiny_root):
    cats = find_categories(tiny_root)
    assert [c.name for c in cats] == ["brick", "gravel"]
    c = cats[0]
    assert len(c.train_files) == 10
    assert (c.test_labels == 0).sum() > 0 and (c.test_labels == 1).sum() > 0
    assert c.has_masks


def test_not_a_category(tmp_path):
    with pytest.raises(DataError, match="no MVTec-layout categories"):
        find_categories(tmp_path)
    with pytest.raises(DataError, match="not an MVTec-layout category"):
        load_category(tmp_path)


def test_shared_bottle_layout():
    bottle = needs_shared("mvtec_ad", "bottle")
    c = load_category(bottle)
    assert len(c.train_files) == 209
    assert (c.test_labels == 0).sum() == 20 and (c.test_labels == 1).sum() == 63
    assert c.has_masks
