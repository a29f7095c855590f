"""Held-out evaluation and the pipeline's gate.

Classification: accuracy, macro F1, per-class precision, recall and F1 (``recall:<class>``), confusion
matrix (rows = true class, columns = predicted, in ``classes`` order); for a binary task also ROC AUC, PR
AUC (average precision) and the positive (second) class's ``precision``, ``recall`` and ``f1``, with
predictions made by the package's decision threshold (``choose_threshold``, on the validation split).
Regression: RMSE and MAE.

Every metric is folded batch by batch (``ClassificationTally``, ``RegressionTally``), so evaluating a
streamed split keeps a fixed amount in the driver whatever its rows: the confusion matrix (exact), and
for a binary task one histogram of the model's log-odds per class, SCORE_BINS_PER_UNIT bins per unit of
log-odds over [-SCORE_RANGE, SCORE_RANGE] (about 1.3 MB), and up to EXACT_ROWS rows every row's score
(at most 1.6 MB). The threshold search always, and ROC AUC and PR AUC past EXACT_ROWS rows, come from
the histograms: they are exact for the scores rounded down to their bin (rows of both classes in one
bin count as ties), and the largest possible difference from the unrounded scores' value, given which
rows share a bin, is recorded next to them (``rocAucMaxBinningError``, 0 when no bin holds both
classes; ``prAucMaxBinningError``, 0 when no positive row shares its bin). Candidate thresholds are the
bin edges, every 0.001 of log-odds (a probability step of at most 0.00025). The regression prediction
distribution is a mergeable sample (``runtime.package.summary``).

``evaluate_deployed`` scores the version deployed now on a run's own test split (raw rows, through that
version's own fitted transforms and decision rule, the shared scoring path of serving), so the gate's
``mustBeatDeployed`` compares the candidate and the deployed version on the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from conveyor.runtime.package.decision import decide
from conveyor.runtime.spec import LOWER_IS_BETTER, EvaluationSpec, meets

# Metrics that depend on the decision rule and can be maximised by choosing the threshold.
THRESHOLD_METRICS = ("accuracy", "f1Macro")
# The binary score histograms: bins per unit of log-odds, and the log-odds range they cover (scores
# beyond it fall in the first or last bin).
SCORE_BINS_PER_UNIT = 1000
SCORE_RANGE = 40.0
_N_BINS = int(2 * SCORE_RANGE * SCORE_BINS_PER_UNIT)
# Up to this many rows a binary tally also keeps every row's score (16 bytes a row), and its AUCs are
# exact (scikit-learn's), as for the in-memory path's small splits.
EXACT_ROWS = 100_000


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_odds(logits: np.ndarray) -> np.ndarray:
    """log p1/p0 of two-class logits (or log-probabilities)."""
    return np.asarray(logits[:, 1], dtype=np.float64) - np.asarray(logits[:, 0], dtype=np.float64)


def _bins(scores: np.ndarray) -> np.ndarray:
    j = np.floor((np.nan_to_num(scores, nan=0.0) + SCORE_RANGE) * SCORE_BINS_PER_UNIT)
    return np.clip(j, 0, _N_BINS - 1).astype(np.int64)


def _edge(j: int) -> float:
    """The lower edge (log-odds) of bin ``j``."""
    return j / SCORE_BINS_PER_UNIT - SCORE_RANGE


def _sigmoid(s: float) -> float:
    return float(1.0 / (1.0 + np.exp(-s)))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from counts, 0 where it is undefined (scikit-learn's ``zero_division=0``)."""
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


class ClassificationTally:
    """Classification metrics folded batch by batch (``add``), mergeable (``merge``): what the driver
    keeps while a split streams past it, a fixed size whatever the rows (see the module docstring)."""

    def __init__(self, classes: Sequence[str], threshold: float | None = None) -> None:
        self.classes = list(classes)
        self.threshold = threshold
        k = len(self.classes)
        self.confusion = np.zeros((k, k), dtype=np.int64)
        self.binary = k == 2
        # [class, bin]: rows of each true class by their log-odds bin (binary tasks)
        self.hist = np.zeros((2, _N_BINS), dtype=np.int64) if self.binary else None
        # The positive class's probability and the label of every row while there are at most
        # EXACT_ROWS (the AUCs are then exact); dropped past that.
        self._exact: list[tuple[np.ndarray, np.ndarray]] | None = [] if self.binary else None
        self._exact_rows = 0

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())

    def add(self, logits: np.ndarray, y_true: np.ndarray) -> ClassificationTally:
        logits = np.asarray(logits)
        y = np.asarray(y_true, dtype=np.int64).reshape(-1)
        if len(y) == 0:
            return self
        k = len(self.classes)
        probabilities = softmax(logits.astype(np.float64))
        pred = decide(probabilities, self.threshold)
        self.confusion += np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        if self.hist is not None:
            b = _bins(_log_odds(logits))
            self.hist += np.bincount(y * _N_BINS + b, minlength=2 * _N_BINS).reshape(2, _N_BINS)
            self._keep_exact([(probabilities[:, 1].copy(), y.copy())])
        return self

    def _keep_exact(self, parts: list[tuple[np.ndarray, np.ndarray]] | None) -> None:
        if self._exact is None:
            return
        if parts is None:
            self._exact = None
            return
        self._exact.extend(parts)
        self._exact_rows += sum(len(y) for _, y in parts)
        if self._exact_rows > EXACT_ROWS:
            self._exact = None

    def merge(self, other: ClassificationTally) -> ClassificationTally:
        self.confusion += other.confusion
        if self.hist is not None and other.hist is not None:
            self.hist += other.hist
            self._keep_exact(other._exact)
        return self

    def predicted_counts(self) -> np.ndarray:
        return self.confusion.sum(axis=0)

    def metrics(self) -> dict[str, Any]:
        cm = self.confusion.astype(np.float64)
        n = cm.sum()
        tp = np.diag(cm)
        predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(actual > 0, tp / np.maximum(actual, 1), 0.0)
        f1 = _f1(tp, predicted - tp, actual - tp)
        out: dict[str, Any] = {
            "accuracy": float(tp.sum() / n) if n else 0.0,
            "f1Macro": float(f1.mean()) if len(f1) else 0.0,
            "confusionMatrix": self.confusion.tolist(),
            "classes": list(self.classes),
        }
        for i, c in enumerate(self.classes):
            out[f"precision:{c}"] = float(precision[i])
            out[f"recall:{c}"] = float(recall[i])
            out[f"f1:{c}"] = float(f1[i])
        if self.binary:
            out.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
            if self.threshold is not None:
                out["decisionThreshold"] = self.threshold
            out.update(self._aucs())
        return out

    def _aucs(self) -> dict[str, Any]:
        assert self.hist is not None
        neg, pos = self.hist[0].astype(np.float64), self.hist[1].astype(np.float64)
        P, N = pos.sum(), neg.sum()
        if P == 0 or N == 0:  # undefined when the split holds one class only
            return {"rocAuc": None, "prAuc": None}
        if self._exact is not None:
            from sklearn.metrics import average_precision_score, roc_auc_score

            p = np.concatenate([s for s, _ in self._exact])
            y = np.concatenate([t for _, t in self._exact])
            return {"rocAuc": float(roc_auc_score(y, p)), "prAuc": float(average_precision_score(y, p))}
        # From the highest bin down: positives and negatives strictly above each bin.
        pos_above = np.cumsum(pos[::-1])[::-1] - pos
        neg_above = np.cumsum(neg[::-1])[::-1] - neg
        roc = float(np.sum(neg * (pos_above + 0.5 * pos)) / (P * N))
        roc_err = float(0.5 * np.sum(pos * neg) / (P * N))
        # Average precision: each bin's positives at the precision of the threshold at that bin's edge.
        tp, fp = pos_above + pos, neg_above + neg
        has = pos > 0
        ap = float(np.sum(pos[has] / P * tp[has] / (tp[has] + fp[has])))
        # Within a bin the rows may come in any order: its positives' precision lies between the
        # all-negatives-first and the all-positives-first orders.
        a, b = pos_above[has], neg_above[has]
        hi = (a + pos[has]) / (a + b + pos[has])
        lo = (a + 1) / (a + b + neg[has] + 1)
        ap_err = float(np.sum(pos[has] / P * np.maximum(hi - lo, 0.0)))
        return {
            "rocAuc": roc,
            "prAuc": ap,
            "rocAucMaxBinningError": roc_err,
            "prAucMaxBinningError": ap_err,
        }

    def best_threshold(self, objective: str) -> float | None:
        """The positive-class probability threshold that maximises ``objective`` (accuracy or f1Macro;
        F1 of the positive class for threshold-free metrics such as rocAuc) over these rows; None (argmax)
        for more than two classes or rows without both classes. Candidates are the bins' edges; 0.5
        wins ties, so a tie keeps the plain rule."""
        if self.hist is None:
            return None
        neg, pos = self.hist[0].astype(np.float64), self.hist[1].astype(np.float64)
        P, N = pos.sum(), neg.sum()
        if P == 0 or N == 0:
            return None
        # Predicting positive from bin j up: tp[j], fp[j].
        tp = np.cumsum(pos[::-1])[::-1]
        fp = np.cumsum(neg[::-1])[::-1]
        fn, tn = P - tp, N - fp
        if objective == "accuracy":
            score = (tp + tn) / (P + N)
        elif objective == "f1Macro":
            score = 0.5 * (_f1(tp, fp, fn) + _f1(tn, fn, fp))
        else:
            score = _f1(tp, fp, fn)
        half = int(SCORE_RANGE * SCORE_BINS_PER_UNIT)  # the bin whose lower edge is log-odds 0 (p = 0.5)
        j = int(np.argmax(score))
        if score[j] <= score[half] + 1e-12:
            return 0.5
        return _sigmoid(_edge(j))


class RegressionTally:
    """RMSE and MAE folded batch by batch, with a mergeable sample of the predictions (their profile)."""

    def __init__(self, seed: int = 0) -> None:
        from conveyor.runtime.package.summary import ColumnSummary

        self.n, self.sq, self.abs = 0, 0.0, 0.0
        self.predictions = ColumnSummary(False)
        self._rng = np.random.default_rng(seed)

    @property
    def rows(self) -> int:
        return self.n

    def add(self, predictions: np.ndarray, y_true: np.ndarray) -> RegressionTally:
        p = np.asarray(predictions, dtype=np.float64).reshape(-1)
        err = p - np.asarray(y_true, dtype=np.float64).reshape(-1)
        self.n += len(err)
        self.sq += float(np.sum(err**2))
        self.abs += float(np.sum(np.abs(err)))
        self.predictions.add(p, self._rng.random(len(p)))
        return self

    def metrics(self) -> dict[str, Any]:
        n = max(self.n, 1)
        return {"rmse": float(np.sqrt(self.sq / n)), "mae": float(self.abs / n)}


def classification_metrics(
    logits: np.ndarray, y_true: np.ndarray, classes: Sequence[str], threshold: float | None = None
) -> dict[str, Any]:
    """``ClassificationTally`` over one batch of rows."""
    return ClassificationTally(classes, threshold).add(logits, y_true).metrics()


def choose_threshold(logits: np.ndarray, y_true: np.ndarray, objective: str) -> float | None:
    """``ClassificationTally.best_threshold`` over one batch of rows (a validation split)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != 2:
        return None
    return ClassificationTally(["0", "1"]).add(logits, y_true).best_threshold(objective)


def regression_metrics(predictions: np.ndarray, y_true: np.ndarray) -> dict[str, Any]:
    return RegressionTally().add(predictions, y_true).metrics()


def gate(metrics: dict[str, Any], spec: EvaluationSpec) -> dict[str, Any]:
    """Whether the held-out ``spec.metric`` passes ``spec.threshold`` and every ``spec.metrics[]``
    requirement passes its own (the operator adds the comparison with the deployed version, which only
    it knows)."""
    checks = [(spec.metric, spec.metric, spec.threshold)] + [
        (r.key, r.metric, r.threshold) for r in spec.metrics
    ]
    reasons, passed = [], True
    for key, metric, threshold in checks:
        value = metrics.get(key)
        cmp = "<=" if metric in LOWER_IS_BETTER else ">="
        if value is None:
            passed = False
            reasons.append(f"metric {key!r} is not available for this task/data")
            continue
        ok = meets(metric, value, threshold)
        passed = passed and ok
        reasons.append(f"{key} {value:.4f} {'' if ok else 'not '}{cmp} threshold {threshold}")
    return {
        "metric": spec.metric,
        "value": metrics.get(spec.metric),
        "threshold": spec.threshold,
        "lowerIsBetter": spec.metric in LOWER_IS_BETTER,
        "passed": passed,
        "reason": "; ".join(reasons),
    }


def evaluate_deployed(
    version: str, package_uri: str, batches: Iterable[Any], *, label: str, task: str
) -> dict[str, Any]:
    """The deployed ``version`` (its package at ``package_uri``) scored on raw test rows: ``batches`` is an
    iterable of pandas DataFrames holding the features and ``label``, scored batch by batch through the
    package's own transforms, model and decision rule (``serving.model.ScoringModel``).

    Returns ``{"version", "packageUri", "testSamples", "metrics"}`` (scalar metrics only), or with
    ``"error"`` instead of metrics when the package cannot be read or cannot score these rows: the gate
    then fails (not knowing how good the deployed version is, is no reason to pass).
    """
    from conveyor.runtime.package.features import category_key
    from conveyor.runtime.serving.model import ScoringModel

    out: dict[str, Any] = {"version": version, "packageUri": package_uri}
    try:
        model = ScoringModel.open(package_uri, device="cpu")
    except Exception as e:  # PackageError, a storage error, a model that does not load: all "unreadable"
        return {**out, "error": f"the deployed package cannot be read: {type(e).__name__}: {e}"[:1000]}
    if (model.task == "classification") != (task == "classification"):
        return {**out, "error": f"the deployed package is a {model.task} model, this run trains {task}"}
    index = {c: i for i, c in enumerate(model.classes or [])}
    classification = model.task == "classification"
    tally: ClassificationTally | RegressionTally = (
        ClassificationTally(model.classes or [], model.threshold) if classification else RegressionTally()
    )
    n = 0
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            if model.kind == "image":
                raw = np.stack(batch[model.package.schema.get("imageField", "image")].to_numpy()).astype(
                    np.float32
                )
                x = model.transform(raw[:, None] if raw.ndim == 3 else raw)
            else:
                x = model.transform(batch[[f.name for f in model.package.transforms.features]])
            scores = model.forward(x)
            y_raw = batch[label].to_numpy()
            if classification:
                y = np.array([index.get(category_key(v), -1) for v in y_raw.tolist()], dtype=np.int64)
                if (y < 0).any():
                    unknown = sorted(
                        {category_key(v) for v, i in zip(y_raw.tolist(), y.tolist(), strict=True) if i < 0}
                    )
                    return {
                        **out,
                        "error": f"the run's test split holds label(s) {unknown[:5]} the deployed "
                        f"version does not know (its classes: {model.classes}): they cannot be compared"[
                            :1000
                        ],
                    }
                tally.add(np.log(np.clip(scores, 1e-12, None)), y)
            else:
                tally.add(scores, y_raw.astype(np.float64))
            n += len(batch)
    except (KeyError, ValueError, TypeError) as e:
        return {**out, "error": f"the deployed package cannot score this run's test rows: {e}"[:1000]}
    if n == 0:
        return {**out, "error": "the run's test split is empty"}
    metrics = tally.metrics()
    scalars = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }
    return {**out, "testSamples": int(n), "metrics": scalars}
