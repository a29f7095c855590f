"""Benchmark: the quality of the default pipeline against simple scikit-learn baselines, in one run.

For each data set the default pipeline (a data contract that only names the task and label: no
transforms, no hyperparameters, so every default applies: standardized numeric inputs, class weights for
rare classes, a validation split with early stopping, a decision threshold chosen on it, or for trees on
a binary task cross-fitting and a threshold chosen on the out-of-fold scores) trains through the real run
(Ray Data, Ray Train, the registry): ``default`` names no architecture (the CRD's default, ``auto``,
which picks by the data: trees for a table with a rare class, the MLP for other tables;
``training.run.resolve_architecture``; the architecture it picked is recorded as ``trained``), and
``mlp`` and ``xgboost`` name theirs. The baselines (logistic regression and SVC on standardized inputs,
HistGradientBoosting; their regression counterparts Ridge, SVR and HistGradientBoostingRegressor; every
one with scikit-learn's defaults) train on exactly the rows of the run's training split (the 80/20
split, stratified for classification, seed 42) and are scored on exactly its test rows.

Data: scikit-learn's bundled iris, digits (as a 64-column table) and diabetes (regression), and
``make_classification`` (20 000 rows, 20 features, seed 42; ``--data-seeds`` adds other random_states,
since one seed's test split holds a few dozen positives and one row moves the minority F1 by ~0.01)
with 1% and 5% positives.
Goals: accuracy within 1 point of the best baseline (RMSE within 5% for regression); on the imbalanced
sets, F1 of the minority class at least the best baseline's.

Run: ``python tests/bench/bench_quality.py`` (or ``make bench``). Writes tests/bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results" / "quality.json"


def _datasets(data_seeds: tuple[int, ...] = (42,)) -> list[dict[str, Any]]:
    from sklearn.datasets import load_diabetes, load_digits, load_iris, make_classification

    out = []
    for name, loader in (("iris", load_iris), ("digits", load_digits)):
        d = loader()
        out.append({"name": name, "task": "classification", "x": d.data, "y": d.target, "minority": False})
    d = load_diabetes()
    out.append({"name": "diabetes", "task": "regression", "x": d.data, "y": d.target, "minority": False})
    for pct in (1, 5):
        for seed in data_seeds:
            x, y = make_classification(
                n_samples=20000, n_features=20, weights=[1 - pct / 100], random_state=seed
            )
            out.append(
                {
                    "name": f"make_classification-{pct}pct" + ("" if seed == 42 else f"-seed{seed}"),
                    "task": "classification",
                    "x": x,
                    "y": y,
                    "minority": True,
                }
            )
    return out


def _config(case: dict[str, Any], uri: str, registry: str, architecture: str) -> Any:
    from conveyor.runtime.spec import RunConfig

    classification = case["task"] == "classification"
    return RunConfig.model_validate(
        {
            "pipeline": f"quality-{case['name']}-{architecture}",
            "run": 1,
            "data": {"source": {"uri": uri, "format": "parquet"}, "label": "label", "task": case["task"]},
            # "default" names none: what a pipeline that leaves the architecture out gets.
            **({} if architecture == "default" else {"training": {"model": {"architecture": architecture}}}),
            "evaluation": {
                "metric": "accuracy" if classification else "rmse",
                "threshold": 0 if classification else 1e9,
            },
            "registry": {"uri": registry, "modelName": f"{case['name']}-{architecture}".replace("_", "-")},
        }
    )


def _baselines(case: dict[str, Any], train: np.ndarray, test: np.ndarray) -> dict[str, dict[str, float]]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    x, y = case["x"], case["y"]
    if case["task"] == "classification":
        models = {
            "logisticRegression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
            "svc": make_pipeline(StandardScaler(), SVC()),
            "histGradientBoosting": HistGradientBoostingClassifier(random_state=42),
        }
    else:
        models = {
            "ridge": make_pipeline(StandardScaler(), Ridge()),
            "svr": make_pipeline(StandardScaler(), SVR()),
            "histGradientBoosting": HistGradientBoostingRegressor(random_state=42),
        }
    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(x[train], y[train])
        pred = model.predict(x[test])
        out[name] = {**_scores(case, y[test], pred), "seconds": round(time.perf_counter() - started, 3)}
    return out


def _scores(case: dict[str, Any], y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    if case["task"] == "regression":
        return {"rmse": float(np.sqrt(np.mean((np.asarray(pred, float) - y_true) ** 2)))}
    scores = {"accuracy": float((np.asarray(pred).astype(int) == y_true).mean())}
    if case["minority"]:
        scores["minorityF1"] = float(f1_score(y_true, np.asarray(pred).astype(int), pos_label=1))
    return scores


def _ours(case: dict[str, Any], config: Any, test: np.ndarray) -> dict[str, Any]:
    from conveyor.runtime.package.registry import open_package
    from conveyor.runtime.training.run import train_and_register

    started = time.perf_counter()
    pkg = open_package(train_and_register(config))
    m = pkg.metrics
    out: dict[str, Any] = {
        "seconds": round(time.perf_counter() - started, 1),
        "testSamples": m["testSamples"],
    }
    assert m["testSamples"] == len(test)
    if case["task"] == "regression":
        out["rmse"] = m["rmse"]
    else:
        out["accuracy"] = m["accuracy"]
        if case["minority"]:
            out["minorityF1"] = m["f1:1"]
            out["decisionThreshold"] = m.get("decisionThreshold")
            cm = m["confusionMatrix"]  # rows: true class, columns: predicted
            out.update(testPositives=sum(cm[1]), positivesFound=cm[1][1], falseAlarms=cm[0][1])
            out["crossFitting"] = pkg.lineage.get("training", {}).get("crossFitting")
    out["trained"] = pkg.manifest.get("architecture")
    out["epochsOrRounds"] = len(m["history"])
    out["bestEpoch"] = m.get("bestEpoch")
    return out


def _verdict(
    case: dict[str, Any], ours: dict[str, Any], baselines: dict[str, dict[str, float]]
) -> dict[str, Any]:
    if case["task"] == "regression":
        best = min(b["rmse"] for b in baselines.values())
        return {
            "bestBaselineRmse": best,
            "rmseRatio": ours["rmse"] / best,
            "goalMet": ours["rmse"] <= 1.05 * best,
        }
    best_acc = max(b["accuracy"] for b in baselines.values())
    verdict: dict[str, Any] = {
        "bestBaselineAccuracy": best_acc,
        "accuracyGapPoints": round(100 * (best_acc - ours["accuracy"]), 2),
    }
    met = ours["accuracy"] >= best_acc - 0.01
    if case["minority"]:
        best_f1 = max(b["minorityF1"] for b in baselines.values())
        verdict["bestBaselineMinorityF1"] = best_f1
        met = met and ours["minorityF1"] >= best_f1
    verdict["goalMet"] = met
    return verdict


def _loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def run_benchmark(
    architectures: tuple[str, ...] = ("default", "mlp", "xgboost"),
    out: Path = RESULTS,
    note: str = "",
    only: tuple[str, ...] = (),
    data_seeds: tuple[int, ...] = (42,),
) -> dict[str, Any]:
    """Every data set (or those named in ``only``) with each of ``architectures``."""
    import pandas as pd
    import ray

    from conveyor.runtime.training.prepare import _split

    if not ray.is_initialized():
        ray.init(num_cpus=int(os.environ.get("BENCH_RAY_CPUS", "2")), include_dashboard=False)
    cases = []
    load_start = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c for c in _datasets(data_seeds) if not only or c["name"] in only]:
            frame = pd.DataFrame(case["x"], columns=[f"f{i}" for i in range(case["x"].shape[1])])
            frame["label"] = case["y"]
            uri = str(Path(tmp) / f"{case['name']}.parquet")
            frame.to_parquet(uri)
            config = _config(case, uri, str(Path(tmp) / "registry"), "mlp")
            train, test = _split(np.asarray(case["y"]), config, stratify=case["task"] == "classification")
            baselines = _baselines(case, train, test)
            entry: dict[str, Any] = {
                "name": case["name"],
                "task": case["task"],
                "rows": len(frame),
                "baselines": baselines,
            }
            for arch in architectures:
                ours = _ours(case, _config(case, uri, str(Path(tmp) / "registry"), arch), test)
                entry[arch] = {**ours, **_verdict(case, ours, baselines)}
            print(json.dumps(entry), flush=True)
            cases.append(entry)
    doc = {
        "benchmark": "quality",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "split": "80/20, stratified for classification, seed 42 (the run's own split; baselines use its rows)",
        "architectures": list(architectures),
        "loadavgStart": load_start,
        "loadavgEnd": _loadavg(),
        "note": note,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return doc


@pytest.mark.bench
def test_bench_quality() -> None:
    doc = run_benchmark()
    # A benchmark records figures; it only checks that every path trained and was scored.
    for case in doc["cases"]:
        assert case["baselines"] and all("goalMet" in case[a] for a in ("default", "mlp", "xgboost"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--architectures", default="default,mlp,xgboost", help="default (none named), or names such as auto"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="e.g. the machine's load while it ran")
    parser.add_argument("--cases", default="", help="only these data sets (comma-separated names)")
    parser.add_argument(
        "--data-seeds",
        default="42",
        help="make_classification random_state(s); a seed other than 42 names its cases -seed<N>",
    )
    args = parser.parse_args()
    only = tuple(c for c in args.cases.split(",") if c)
    seeds = tuple(int(v) for v in args.data_seeds.split(",") if v)
    run_benchmark(tuple(args.architectures.split(",")), args.out, args.note, only, seeds)
