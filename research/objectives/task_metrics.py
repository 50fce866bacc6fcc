"""Classification and regression metrics in numpy (GLUE's metric set).

    accuracy(pred, label)           f1(pred, label)          macro_f1(pred, label)
    matthews_corrcoef(pred, label)  pearson(x, y)            spearman(x, y)
    task_metrics('binary', predictions, labels, weights=batch_weights)

Every function takes an optional `weights` array of the same length: rows whose weight is
0 (padding rows of an eval batch) are dropped; other weights are not used as multipliers.
Values agree with scikit-learn / scipy, except on degenerate inputs: where those return
NaN (a constant input to a correlation, an all-one-class MCC) these return 0.0, as
scikit-learn already does for MCC and for an F1 with no positives. Empty inputs (no row
with nonzero weight) raise ValueError.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "f1", "macro_f1", "matthews_corrcoef", "pearson", "spearman",
           "rankdata", "task_metrics", "TASK_KINDS"]

TASK_KINDS = ("binary", "multiclass", "regression")


def _select(a, b, weights, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattens two aligned 1-D arrays and drops rows whose weight is 0."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two 1-D arrays of the same length, got shapes "
                         f"{a.shape} and {b.shape}. Flatten the batch dimension first (and "
                         "take argmax of logits for class predictions).")
    if weights is not None:
        weights = np.asarray(weights)
        if weights.shape != a.shape:
            raise ValueError(f"{name}: weights shape {weights.shape} does not match the "
                             f"inputs' {a.shape}.")
        keep = weights != 0
        a, b = a[keep], b[keep]
    if a.size == 0:
        raise ValueError(f"{name}: no rows to score (empty input, or every weight is 0).")
    return a, b


def _class_ids(pred, label, weights, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred, label = _select(pred, label, weights, name)
    for arr, what in ((pred, "predictions"), (label, "labels")):
        if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
            if not np.all(np.mod(arr, 1) == 0):
                raise ValueError(f"{name}: {what} must be integer class ids, got non-integer "
                                 f"values (dtype {arr.dtype}). Take argmax of logits first.")
    return pred.astype(np.int64), label.astype(np.int64)


def _confusion(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """int64[K, K] counts, rows = true class, columns = predicted class, over the union of
    classes present (in sorted order)."""
    classes, inverse = np.unique(np.concatenate([label, pred]), return_inverse=True)
    k = len(classes)
    true_i, pred_i = inverse[:len(label)], inverse[len(label):]
    return np.bincount(true_i * k + pred_i, minlength=k * k).reshape(k, k)


def accuracy(pred, label, weights=None) -> float:
    """Fraction of rows where pred == label. pred, label: [n]."""
    pred, label = _select(pred, label, weights, "accuracy")
    return float(np.mean(pred == label))


def f1(pred, label, weights=None) -> float:
    """Binary F1 of the positive class 1: 2tp / (2tp + fp + fn); 0.0 if tp+fp+fn == 0."""
    pred, label = _class_ids(pred, label, weights, "f1")
    tp = np.sum((pred == 1) & (label == 1))
    fp = np.sum((pred == 1) & (label != 1))
    fn = np.sum((pred != 1) & (label == 1))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def macro_f1(pred, label, weights=None) -> float:
    """Unweighted mean of per-class F1 over the classes present in pred or label."""
    pred, label = _class_ids(pred, label, weights, "macro_f1")
    cm = _confusion(pred, label)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # (tp + fp) + (tp + fn)
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class.mean())


def matthews_corrcoef(pred, label, weights=None) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K; equals binary MCC for 2 classes).

    With confusion matrix C, t = C.sum(1), p = C.sum(0), c = trace(C), s = C.sum():
    (c*s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)); 0.0 when the denominator is 0 (constant
    predictions or labels).
    """
    pred, label = _class_ids(pred, label, weights, "matthews_corrcoef")
    cm = _confusion(pred, label).astype(np.float64)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    cov_pt = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    denom = cov_pp * cov_tt
    return float(cov_pt / np.sqrt(denom)) if denom > 0 else 0.0


def pearson(x, y, weights=None) -> float:
    """Pearson correlation of x, y: [n]; 0.0 if either is constant (or n < 2)."""
    x, y = _select(x, y, weights, "pearson")
    return _pearson(x.astype(np.float64), y.astype(np.float64))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    sxx, syy = xc @ xc, yc @ yc
    if sxx <= 0 or syy <= 0:
        return 0.0
    r = (xc @ yc) / np.sqrt(sxx * syy)
    return float(np.clip(r, -1.0, 1.0))


def rankdata(a) -> np.ndarray:
    """float64[n]: 1-based ranks of a: [n], ties get the average of their ranks."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values in sorted order.
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], len(a))  # exclusive
    avg_rank = (starts + ends + 1) / 2.0   # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a), np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def spearman(x, y, weights=None) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0.0 if either is constant."""
    x, y = _select(x, y, weights, "spearman")
    return _pearson(rankdata(x), rankdata(y))


def task_metrics(kind: str, predictions, labels, weights=None) -> dict[str, float]:
    """The metric set of a task.

    Args:
      kind: 'binary' -> accuracy, f1 (class 1), mcc; 'multiclass' -> accuracy, macro_f1,
        mcc; 'regression' -> pearson, spearman, combined (their mean), mse.
      predictions: [n] class ids, or [n, K] scores/logits (argmax taken) for
        classification; [n] or [n, 1] values for regression.
      labels: [n] class ids or target values.
      weights: optional [n]; rows with weight 0 are ignored.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if kind in ("binary", "multiclass"):
        if predictions.ndim == 2:
            predictions = predictions.argmax(axis=-1)
        out = {"accuracy": accuracy(predictions, labels, weights)}
        if kind == "binary":
            out["f1"] = f1(predictions, labels, weights)
        else:
            out["macro_f1"] = macro_f1(predictions, labels, weights)
        out["mcc"] = matthews_corrcoef(predictions, labels, weights)
        return out
    if kind == "regression":
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        x, y = _select(predictions, labels, weights, "task_metrics")
        x, y = x.astype(np.float64), y.astype(np.float64)
        p, s = _pearson(x, y), _pearson(rankdata(x), rankdata(y))
        return {"pearson": p, "spearman": s, "combined": (p + s) / 2,
                "mse": float(np.mean((x - y) ** 2))}
    raise ValueError(f"task_metrics: unknown kind {kind!r}; use one of {TASK_KINDS}.")
