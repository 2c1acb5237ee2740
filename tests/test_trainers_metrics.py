"""kd_trainers.metrics against scikit-learn and scipy (test oracles only), plus the edge cases."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from kd_trainers import metrics


def _labels(seed: int, n: int, pred_classes: int, gold_classes: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, pred_classes, n).tolist(), rng.integers(0, gold_classes, n).tolist()


# (seed, n, classes seen in pred, classes seen in gold): equal class sets, a class only in gold
# (recall 0 for it), a class only in pred, binary, a single item and a single class.
CLASSIFICATION_CASES = [
    (0, 50, 3, 3),
    (1, 200, 5, 5),
    (2, 40, 2, 4),
    (3, 40, 4, 2),
    (4, 7, 2, 2),
    (5, 1, 1, 1),
    (6, 30, 1, 3),
    (7, 1000, 10, 10),
]


@pytest.mark.parametrize(("seed", "n", "pc", "gc"), CLASSIFICATION_CASES)
def test_classification_matches_sklearn(seed, n, pc, gc):
    pred, gold = _labels(seed, n, pc, gc)
    assert metrics.accuracy(pred, gold) == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes with no predictions
        want = f1_score(gold, pred, average="macro", zero_division=0)
    assert metrics.macro_f1(pred, gold) == pytest.approx(want, abs=1e-12)
    assert metrics.macro_f1(pred, gold, num_labels=max(pc, gc)) == pytest.approx(want, abs=1e-12)
    got = metrics.classification_metrics(pred, gold)
    assert set(got) == {"accuracy", "macro_f1"}
    assert got["macro_f1"] == pytest.approx(want, abs=1e-12)


def test_classification_hand_values():
    # Class 0: tp 1, fp 0, fn 1 -> F1 2/3; class 1: tp 1, fp 1, fn 1 -> 1/2; class 2 only in
    # pred -> 0 (fp 1). Mean over the three present classes: 7/18.
    pred, gold = [0, 1, 1, 2], [0, 0, 1, 1]
    assert metrics.accuracy(pred, gold) == 0.5
    assert metrics.macro_f1(pred, gold) == pytest.approx(7 / 18)
    assert metrics.macro_f1([1, 1], [1, 1]) == 1.0


def test_classification_accepts_arrays_and_tensors():
    pred, gold = _labels(0, 20, 3, 3)
    want = metrics.macro_f1(pred, gold)
    assert metrics.macro_f1(np.array(pred), torch.tensor(gold)) == pytest.approx(want)
    assert metrics.accuracy(torch.tensor(pred), np.array(gold)) == metrics.accuracy(pred, gold)


def _scores(seed: int, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=n), rng.normal(size=n)
    if kind == "correlated":
        x = rng.normal(size=n)
        return x, 0.7 * x + 0.3 * rng.normal(size=n)
    if kind == "tied":  # few distinct values, as STS-B gold scores (0..5 in halves) have
        return rng.integers(0, 4, n).astype(float), rng.integers(0, 11, n) / 2.0
    if kind == "anti":
        x = rng.normal(size=n)
        return x, -(x**3)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random", "correlated", "tied", "anti"])
@pytest.mark.parametrize(("seed", "n"), [(0, 2), (1, 3), (2, 25), (3, 500)])
def test_regression_matches_scipy(kind, seed, n):
    x, y = _scores(seed, n, kind)
    if np.all(x == x[0]) or np.all(y == y[0]):
        pytest.skip("drew a constant input; covered by test_constant_input_is_nan")
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    got = metrics.regression_metrics(x.tolist(), y.tolist())
    assert set(got) == {"pearson", "spearman"}
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_spearman_ranks_ties_like_scipy():
    a = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(metrics._average_ranks(a), stats.rankdata(a))
    # Perfect monotone relation -> exactly +-1, Pearson of a non-linear one is not.
    x = np.arange(10.0)
    assert metrics.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert metrics.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert metrics.pearson(x, np.exp(x)) < 0.99
    assert metrics.pearson(x, 2 * x + 1) == 1.0


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]),  # 0.1 * 3 / 3 != 0.1 exactly: no spurious variance
        ([5.0, 5.0], [1.0, 2.0]),
        ([4.0], [7.0]),
    ],
)
def test_constant_input_is_nan(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning from a 0/0
        assert math.isnan(metrics.pearson(x, y))
        assert math.isnan(metrics.spearman(x, y))
        got = metrics.regression_metrics(x, y)
    assert math.isnan(got["pearson"]) and math.isnan(got["spearman"])


@pytest.mark.parametrize(
    "fn",
    [metrics.accuracy, metrics.macro_f1, metrics.pearson, metrics.spearman],
    ids=lambda f: f.__name__,
)
def test_bad_lengths_and_empty_raise(fn):
    with pytest.raises(ValueError, match=r"pred has 2 items but gold has 3") as info:
        fn([1, 0], [1, 0, 1])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="empty input"):
        fn([], [])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1, 0]], [[1, 0]])


def test_dict_helpers_validate():
    with pytest.raises(ValueError, match="empty input"):
        metrics.classification_metrics([], [])
    with pytest.raises(ValueError, match="items"):
        metrics.regression_metrics([1.0], [1.0, 2.0])


def test_macro_f1_num_labels_checks_range():
    with pytest.raises(ValueError, match=r"gold label 3 outside \[0, 3\)"):
        metrics.macro_f1([0, 1], [0, 3], num_labels=3)
    with pytest.raises(ValueError, match=r"pred label -1 outside"):
        metrics.macro_f1([-1, 1], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match="integers"):
        metrics.macro_f1([0.5, 1.0], [0, 1], num_labels=3)
    with pytest.raises(ValueError, match="num_labels must be >= 1"):
        metrics.macro_f1([0], [0], num_labels=0)
