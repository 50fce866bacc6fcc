"""research.objectives.task_metrics agrees with scikit-learn / scipy; degenerate inputs give 0.0."""

import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from research.objectives import task_metrics as metrics


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def random_classes(rng, k):
    n = int(rng.integers(1, 60))
    label = rng.integers(0, k, n)
    # Mix of correlated and random predictions.
    pred = np.where(rng.random(n) < rng.random(), label, rng.integers(0, k, n))
    return pred, label


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_match_sklearn(k):
    rng = np.random.default_rng(k)
    for _ in range(120):
        pred, label = random_classes(rng, k)
        assert metrics.accuracy(pred, label) == pytest.approx(skm.accuracy_score(label, pred))
        assert metrics.matthews_corrcoef(pred, label) == pytest.approx(
            _quiet(skm.matthews_corrcoef, label, pred), abs=1e-12)
        assert metrics.macro_f1(pred, label) == pytest.approx(
            _quiet(skm.f1_score, label, pred, average="macro"), abs=1e-12)
        if k == 2:
            assert metrics.f1(pred, label) == pytest.approx(
                _quiet(skm.f1_score, label, pred, zero_division=0.0), abs=1e-12)


def test_weights_drop_zero_weight_rows():
    rng = np.random.default_rng(0)
    for _ in range(100):
        pred, label = random_classes(rng, 3)
        w = (rng.random(len(pred)) < 0.7).astype(np.float32)
        if not w.any():
            w[0] = 1
        keep = w != 0
        for fn in (metrics.accuracy, metrics.macro_f1, metrics.matthews_corrcoef,
                   metrics.f1):
            assert fn(pred, label, weights=w) == fn(pred[keep], label[keep])
        x, y = rng.normal(size=len(pred)), rng.normal(size=len(pred))
        assert metrics.pearson(x, y, w) == metrics.pearson(x[keep], y[keep])
        assert metrics.spearman(x, y, w) == metrics.spearman(x[keep], y[keep])
        got = metrics.task_metrics("multiclass", pred, label, weights=w)
        assert got["accuracy"] == metrics.accuracy(pred[keep], label[keep])


def test_binary_degenerate_cases():
    label = np.array([0, 1, 1, 0])
    # Constant predictions: MCC 0 (sklearn agrees), F1 of all-negative predictions 0.
    assert metrics.matthews_corrcoef(np.zeros(4, int), label) == 0.0
    assert _quiet(skm.matthews_corrcoef, label, np.zeros(4, int)) == 0.0
    assert metrics.f1(np.zeros(4, int), label) == 0.0
    # No positives anywhere: F1 0 (sklearn's zero_division default), MCC 0.
    assert metrics.f1(np.zeros(4, int), np.zeros(4, int)) == 0.0
    assert metrics.matthews_corrcoef(np.ones(3, int), np.ones(3, int)) == 0.0
    assert metrics.macro_f1(np.ones(3, int), np.ones(3, int)) == 1.0
    assert metrics.matthews_corrcoef(label, label) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(1 - label, label) == pytest.approx(-1.0)


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(2, 80))
        if trial % 2:  # heavy ties, like STS-B scores on a 0..5 grid
            x = rng.integers(0, 6, n).astype(np.float64)
            y = np.round(x + rng.normal(scale=1.5, size=n))
        else:
            x = rng.normal(size=n)
            y = x * rng.normal() + rng.normal(size=n)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0],
                                                      abs=1e-10)
        assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0],
                                                       abs=1e-10)
        np.testing.assert_allclose(metrics.rankdata(x), scipy.stats.rankdata(x))


def test_constant_inputs_give_zero_correlation():
    x = np.array([1.0, 2.0, 3.0])
    c = np.full(3, 2.5)
    for fn in (metrics.pearson, metrics.spearman):
        assert fn(c, x) == 0.0 and fn(x, c) == 0.0 and fn(c, c) == 0.0
        assert fn(np.array([1.0]), np.array([2.0])) == 0.0
    got = metrics.task_metrics("regression", c, x)
    assert got["pearson"] == 0.0 and got["spearman"] == 0.0 and got["combined"] == 0.0
    assert got["mse"] == pytest.approx(np.mean((c - x) ** 2))


def test_task_metrics_sets():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 2, 50)
    logits = rng.normal(size=(50, 2))
    pred = logits.argmax(-1)
    got = metrics.task_metrics("binary", logits, label)
    assert set(got) == {"accuracy", "f1", "mcc"}
    assert got["f1"] == pytest.approx(skm.f1_score(label, pred))
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(label, pred))
    assert all(isinstance(v, float) for v in got.values())

    label3 = rng.integers(0, 3, 50)
    got = metrics.task_metrics("multiclass", rng.integers(0, 3, 50), label3)
    assert set(got) == {"accuracy", "macro_f1", "mcc"}

    y = rng.normal(size=40)
    x = y + rng.normal(size=40)
    got = metrics.task_metrics("regression", x[:, None], y)
    assert set(got) == {"pearson", "spearman", "combined", "mse"}
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    assert got["combined"] == pytest.approx((got["pearson"] + got["spearman"]) / 2)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, x))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown kind 'ranking'"):
        metrics.task_metrics("ranking", [1], [1])
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="every weight is 0"):
        metrics.accuracy([1, 0], [1, 0], weights=[0, 0])
    with pytest.raises(ValueError, match="integer class ids"):
        metrics.matthews_corrcoef([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="weights shape"):
        metrics.f1([1, 0], [1, 0], weights=[1, 1, 1])
