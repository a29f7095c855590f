"""Classification defaults: the shipped decision threshold, class weights for rare classes, the
per-class and PR AUC metrics, and the runtime gate over evaluation.metrics[]."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.runtime.package.decision import decide, decision_threshold
from conveyor.runtime.spec import EvaluationSpec
from conveyor.runtime.training import evaluate
from conveyor.runtime.training.loop import class_weights_for


def logits_for(p_positive: np.ndarray) -> np.ndarray:
    """Two-class logits whose softmax gives ``p_positive`` for class 1."""
    p = np.clip(p_positive, 1e-6, 1 - 1e-6)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_decision_threshold_applies_to_binary_packages_only() -> None:
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    assert decide(probs, None).tolist() == [0, 0, 1]
    assert decide(probs, 0.25).tolist() == [0, 1, 1]
    assert decision_threshold({"classes": ["0", "1"], "decisionThreshold": 0.25}) == 0.25
    assert decision_threshold({"classes": ["a", "b", "c"], "decisionThreshold": 0.25}) is None
    assert decision_threshold({"classes": ["0", "1"]}) is None
    three = np.array([[0.2, 0.3, 0.5]])
    assert decide(three, 0.1).tolist() == [2]


def test_threshold_chosen_on_validation_finds_the_rare_class() -> None:
    # A rare positive class whose scores are low but well ranked: 0.5 never predicts it.
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.03).astype(np.int64)
    p = np.where(y == 1, rng.uniform(0.15, 0.4, len(y)), rng.uniform(0.0, 0.2, len(y)))
    logits = logits_for(p)
    plain = evaluate.classification_metrics(logits, y, ["0", "1"])
    assert plain["recall"] == 0.0
    t = evaluate.choose_threshold(logits, y, "rocAuc")
    assert t is not None and 0.1 < t < 0.4
    tuned = evaluate.classification_metrics(logits, y, ["0", "1"], t)
    assert tuned["f1"] > 0.7 and tuned["recall:1"] == tuned["recall"] and tuned["decisionThreshold"] == t
    assert tuned["rocAuc"] == plain["rocAuc"] and 0 < tuned["prAuc"] <= 1
    assert {"precision:0", "recall:0", "f1:0", "precision:1"} <= set(tuned)
    # Accuracy as the gate's metric: the threshold maximises accuracy, never below 0.5's.
    t_acc = evaluate.choose_threshold(logits, y, "accuracy")
    assert evaluate.classification_metrics(logits, y, ["0", "1"], t_acc)["accuracy"] >= plain["accuracy"]
    # More than two classes, or one class only in the split: the plain argmax rule.
    assert evaluate.choose_threshold(np.zeros((5, 3)), np.arange(5) % 3, "accuracy") is None
    assert evaluate.choose_threshold(logits[:10], np.zeros(10, dtype=np.int64), "rocAuc") is None


def test_rare_classes_get_balanced_weights() -> None:
    y = np.array([0] * 95 + [1] * 5)
    w = class_weights_for(y, 2)
    assert w == pytest.approx([100 / (2 * 95), 100 / (2 * 5)])
    assert class_weights_for(np.array([0, 1] * 50), 2) is None
    assert class_weights_for(np.array([0] * 90 + [1] * 10), 3)[2] == pytest.approx(100 / 3)  # absent class


def test_runtime_gate_requires_every_listed_metric() -> None:
    spec = EvaluationSpec.model_validate(
        {"metric": "rocAuc", "threshold": 0.85, "metrics": [{"metric": "recall", "threshold": 0.5}]}
    )
    ok = evaluate.gate({"rocAuc": 0.9, "recall": 0.6}, spec)
    assert ok["passed"] and "recall 0.6000 >= threshold 0.5" in ok["reason"]
    low = evaluate.gate({"rocAuc": 0.9, "recall": 0.2}, spec)
    assert not low["passed"] and "recall 0.2000 not >= threshold 0.5" in low["reason"]
    missing = evaluate.gate({"rocAuc": 0.9}, spec)
    assert not missing["passed"] and "'recall' is not available" in missing["reason"]
    named = EvaluationSpec.model_validate(
        {"metric": "accuracy", "metrics": [{"metric": "precision", "class": "fraud", "threshold": 0.3}]}
    )
    assert named.metrics[0].key == "precision:fraud"
    assert named.to_api()["metrics"] == [{"metric": "precision", "threshold": 0.3, "class": "fraud"}]
