"""The training runtime end to end: real data, real Ray Data and Ray Train (local, CPU), real torch, the
registry on the local filesystem. Two session-scoped runs (fraud, digits) are inspected by several tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _training_support import start_local_ray, wait_for

from conveyor.runtime.package.decision import decide, decision_threshold
from conveyor.runtime.package.registry import FORMAT_VERSION, Registry, open_package
from conveyor.runtime.spec import DataSource, RunConfig
from conveyor.runtime.training import data as data_mod
from conveyor.runtime.training.evaluate import softmax
from conveyor.runtime.training.prepare import _split
from conveyor.runtime.training.run import train_and_register
from conveyor.runtime.training.samples import quick_config

FRAUD_FEATURES = ["amount", "merchant", "hour", "foreign", "card_age_days", "distance_km", "txn_last_hour"]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray (2 CPUs) for the session; its GCS address lets a subprocess run join it."""
    import ray

    started_here = not ray.is_initialized()
    yield start_local_ray(num_cpus=2)
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def fraud_run(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, object]:
    config = quick_config("fraud", str(tmp_path_factory.mktemp("registry")), rows=8000)
    return config, open_package(train_and_register(config))


# digits_run (the sample digits run, shared with test_serving): tests/e2e/conftest.py


def _held_out(config: RunConfig):
    """The raw held-out rows, recomputed independently of the run from the seeded split."""
    frame = data_mod.builtin_frame(config.data.source.uri)
    y = frame["label"].to_numpy().astype(np.int64)
    train_idx, test_idx = _split(y, config, stratify=True)
    return frame, train_idx, test_idx


# ---------------------------------------------------------------- tabular: fraud


@pytest.mark.slow
def test_fraud_model_ranks_fraud_above_legitimate(fraud_run) -> None:
    config, pkg = fraud_run
    m = pkg.metrics
    assert m["rocAuc"] >= 0.8, m
    assert m["gate"] == {**m["gate"], "metric": "rocAuc", "passed": True}
    assert m["trainSamples"] + m["validationSamples"] + m["testSamples"] == 8000
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    assert m["history"][-1]["trainLoss"] < m["history"][0]["trainLoss"]
    assert all(h["samples"] == m["trainSamples"] and h["samplesPerSecond"] > 0 for h in m["history"])
    assert len(m["confusionMatrix"]) == 2 and sum(map(sum, m["confusionMatrix"])) == m["testSamples"]


@pytest.mark.slow
def test_serving_path_reproduces_the_held_out_metrics(fraud_run) -> None:
    # Raw rows as a client sends them -> the package's transforms -> the TorchScript model: no skew.
    config, pkg = fraud_run
    frame, _, test_idx = _held_out(config)
    rows = frame.iloc[test_idx][FRAUD_FEATURES].to_dict("records")
    x = pkg.transforms.apply(rows)
    import torch
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        logits = pkg.load_model()(torch.from_numpy(x)).numpy()
    y = frame["label"].to_numpy()[test_idx]
    assert roc_auc_score(y, softmax(logits)[:, 1]) == pytest.approx(pkg.metrics["rocAuc"], abs=1e-6)
    predicted = decide(softmax(logits), decision_threshold(pkg.schema))
    assert float((predicted == y).mean()) == pytest.approx(pkg.metrics["accuracy"])


# The demo's two requests (hack/demo.sh): an everyday purchase and an obviously fraudulent one.
EVERYDAY = {"amount": 24.5, "merchant": "grocery", "hour": 14, "foreign": False, "card_age_days": 900,
            "distance_km": 2.1, "txn_last_hour": 0}  # fmt: skip
OBVIOUS_FRAUD = {"amount": 2450.0, "merchant": "electronics", "hour": 3, "foreign": True, "card_age_days": 9,
                 "distance_km": 840.0, "txn_last_hour": 4}  # fmt: skip


@pytest.mark.slow
def test_imbalanced_fraud_flags_the_obvious_fraud_by_default(fraud_run) -> None:
    # No tuning in the config: class weights, a threshold chosen on the validation split, served as is.
    import asyncio

    from conveyor.runtime.serving.predictor import PackagePredictor

    _, pkg = fraud_run
    m = pkg.metrics
    threshold = pkg.schema["decisionThreshold"]
    assert 0 < threshold < 1 and m["decisionThreshold"] == threshold
    assert m["recall"] > 0.2 and m["recall:1"] == m["recall"] and 0 < m["prAuc"] < 1
    assert {"precision:0", "recall:0", "precision:1", "f1:1"} <= set(m)
    assert pkg.lineage["training"]["classWeights"][1] > 10 * pkg.lineage["training"]["classWeights"][0]
    assert all("validationLoss" in h for h in m["history"]) and 1 <= m["bestEpoch"] <= 4

    predictor = PackagePredictor("fraud", pkg.uri, batching=False, with_metrics=False)
    predictor.load()

    async def ask() -> dict:
        decoded = await predictor.preprocess({"instances": [EVERYDAY, OBVIOUS_FRAUD]})
        return await predictor.postprocess(await predictor.predict(decoded))

    answers = asyncio.run(ask())["predictions"]
    assert [a["label"] for a in answers] == ["0", "1"], answers


@pytest.mark.slow
def test_must_beat_deployed_scores_both_versions_on_the_runs_own_split(fraud_run) -> None:
    """Run 2 is told v1 is deployed: it scores v1's package (v1's own transforms and decision rule) on
    run 2's raw test rows and records both figures; the operator's gate decides from that pair. The data
    and seed are v1's, so the split is the same rows v1 was tested on: v1 must score exactly its own
    figures, which it would not through another package's transforms or another decision threshold."""
    from conveyor.operator.mlpipeline.gate import judge_run
    from conveyor.runtime.spec import DeployedModel, EvaluationSpec
    from conveyor.runtime.training.evaluate import evaluate_deployed

    config, v1 = fraud_run
    second = config.model_copy(deep=True)
    second.run = 2
    second.training.hyperparameters.epochs = 2  # a weaker candidate, quickly
    second.deployed = DeployedModel(version=v1.version, package_uri=v1.uri)
    v2 = open_package(train_and_register(second))
    scored = v2.metrics["deployed"]
    assert (scored["version"], scored["packageUri"]) == (v1.version, v1.uri)
    assert scored["testSamples"] == v2.metrics["testSamples"] == v1.metrics["testSamples"]
    for metric in ("accuracy", "rocAuc", "f1Macro"):
        assert scored["metrics"][metric] == pytest.approx(v1.metrics[metric], abs=1e-9), metric
    registry = Registry(config.registry.uri, config.registry.model_name)
    record = registry.read_run_record(second.namespace, second.pipeline, 2)
    assert record is not None and record["metrics"]["deployed"] == scored  # the outcome record has both

    metric = config.evaluation.metric
    candidate, deployed = v2.metrics[metric], scored["metrics"][metric]
    for margin in (0.0, abs(candidate - deployed) + 0.01):
        evaluation = EvaluationSpec(metric=metric, threshold=0.0, must_beat_deployed=True, margin=margin)
        outcome = judge_run(
            registry,
            evaluation,
            pipeline=second.pipeline,
            namespace=second.namespace,
            run=2,
            deployed=(v1.version, registry),
        )
        assert outcome.version == v2.version and outcome.result is not None
        assert outcome.result.baseline_value == pytest.approx(deployed)
        assert outcome.result.passed == (candidate >= deployed + margin), outcome.result.message
        assert outcome.result.reason == ("Passed" if outcome.result.passed else "DidNotBeatDeployed")

    # A deployed package that cannot be read gives an error, which fails the gate (never a pass).
    broken = evaluate_deployed(
        "v9", f"{config.registry.uri}/fraud/v9", [], label="label", task="classification"
    )
    assert "cannot be read" in broken["error"] and "metrics" not in broken


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(ray_cluster: str, tmp_path: Path) -> None:
    config = quick_config("fraud", str(tmp_path), pipeline="early", rows=3000)
    hp = config.training.hyperparameters
    hp.epochs, hp.learning_rate, hp.early_stopping_patience = 60, 0.05, 2
    m = open_package(train_and_register(config)).metrics
    losses = [h["validationLoss"] for h in m["history"]]
    assert m["stoppedEarly"] is True and len(losses) < 60
    assert m["bestEpoch"] == 1 + int(np.argmin(losses)) == len(losses) - 2


@pytest.mark.slow
def test_xgboost_trains_on_two_workers_and_serves_from_the_same_package_format(
    ray_cluster: str, tmp_path: Path
) -> None:
    import asyncio

    from conveyor.runtime.serving.predictor import PackagePredictor

    config = quick_config("fraud", str(tmp_path), pipeline="trees", rows=6000)
    config.training.model.architecture = "xgboost"
    config.training.model.trees.max_rounds = 60
    config.training.num_workers = 2
    pkg = open_package(train_and_register(config))
    m = pkg.metrics
    assert pkg.manifest["modelKind"] == "xgboost" and pkg.manifest["formatVersion"] == FORMAT_VERSION
    assert pkg.lineage["training"]["workers"] == 2 and 1 <= m["bestEpoch"] <= 60
    assert m["rocAuc"] >= 0.75 and 0 < pkg.schema["decisionThreshold"] < 1
    # A binary task's trees are cross-fitted: five fold boosters (trained by both workers together),
    # merged into the one model the package holds, the threshold chosen on their out-of-fold scores.
    cross_fit = pkg.lineage["training"]["crossFitting"]
    assert cross_fit["folds"] == 5 and all(1 <= r <= 60 for r in cross_fit["bestRounds"])
    assert pkg.load_model().booster.num_boosted_rounds() == sum(cross_fit["bestRounds"])
    # The held-out metrics are what the package's model and decision rule give on the raw test rows.
    frame, _, test_idx = _held_out(config)
    rows = frame.iloc[test_idx][FRAUD_FEATURES].to_dict("records")
    probabilities = pkg.load_model().predict(pkg.transforms.apply(rows))
    y = frame["label"].to_numpy()[test_idx]
    predicted = decide(probabilities, decision_threshold(pkg.schema))
    assert float((predicted == y).mean()) == pytest.approx(m["accuracy"])

    predictor = PackagePredictor("fraud", pkg.uri, batching=True, with_metrics=False)
    predictor.load()

    async def ask() -> dict:
        decoded = await predictor.preprocess({"instances": [EVERYDAY, OBVIOUS_FRAUD]})
        return await predictor.postprocess(await predictor.predict(decoded))

    answers = asyncio.run(ask())["predictions"]
    assert answers[0]["label"] == "0" and sum(answers[1]["probabilities"].values()) == pytest.approx(1.0)
    assert answers[1]["probabilities"]["1"] > answers[0]["probabilities"]["1"]


@pytest.mark.slow
def test_custom_architecture_trains_the_users_module(ray_cluster: str, tmp_path: Path) -> None:
    config = quick_config("fraud", str(tmp_path), pipeline="custom", rows=3000)
    config.training.model.architecture = "custom"
    config.training.model.module = "conveyor.runtime.training.custom_example:residual_mlp"
    config.training.hyperparameters.epochs = 3
    pkg = open_package(train_and_register(config))
    assert pkg.manifest["architecture"] == "custom" and pkg.manifest["modelKind"] == "torch-export"
    assert pkg.metrics["rocAuc"] >= 0.7
    # The packaged weights are the user's residual blocks, not the built-in MLP's.
    assert any(".body." in name for name in pkg.load_model().state_dict())


@pytest.mark.slow
def test_transforms_were_fitted_on_the_training_split_only(fraud_run) -> None:
    config, pkg = fraud_run
    frame, train_idx, _ = _held_out(config)
    steps = {(s.type, s.column): s.params for s in pkg.transforms.steps}
    train, everything = frame.iloc[train_idx], frame

    assert steps[("impute", "distance_km")]["value"] == pytest.approx(train["distance_km"].median())
    amount_train = train["amount"].clip(0, 5000)
    assert steps[("standardize", "amount")]["mean"] == pytest.approx(amount_train.mean())
    assert steps[("standardize", "amount")]["std"] == pytest.approx(amount_train.std(ddof=0))
    # The same statistic over all rows is different: the held-out rows did not leak in.
    assert steps[("standardize", "amount")]["mean"] != pytest.approx(
        everything["amount"].clip(0, 5000).mean(), rel=1e-9
    )
    assert steps[("oneHot", "merchant")]["categories"][0] == train["merchant"].value_counts().index[0]
    assert (
        pkg.transforms.output_columns[:1] == ["amount"]
        and "merchant=__other__" in pkg.transforms.output_columns
    )


@pytest.mark.slow
def test_package_describes_inputs_profile_and_lineage(fraud_run) -> None:
    config, pkg = fraud_run
    frame, train_idx, _ = _held_out(config)
    assert [f["name"] for f in pkg.schema["features"]] == FRAUD_FEATURES
    types = {f["name"]: (f["type"], f["nullable"]) for f in pkg.schema["features"]}
    assert types["merchant"] == ("string", False) and types["distance_km"] == ("float", True)
    assert pkg.schema["task"] == "classification" and pkg.classes == ["0", "1"]

    prof = pkg.profile
    assert prof["rows"] == len(train_idx) and set(prof["features"]) == set(FRAUD_FEATURES)
    assert len(prof["features"]["amount"]["binEdges"]) == 11
    assert sum(prof["features"]["amount"]["binFractions"]) == pytest.approx(1.0)
    assert set(prof["features"]["merchant"]["frequencies"]) == set(data_mod.MERCHANTS)
    assert prof["features"]["distance_km"]["nullFraction"] > 0
    assert prof["classBalance"]["1"] == pytest.approx(frame["label"].to_numpy()[train_idx].mean())
    assert sum(prof["predictionDistribution"].values()) == pytest.approx(1.0)

    lin = pkg.lineage
    assert lin["pipeline"] == config.pipeline and lin["run"] == config.run
    assert lin["dataSha256"] == data_mod.content_sha256(config.data.source)
    assert lin["parameters"] == json.loads(json.dumps(config.to_api()))
    assert {"torch", "ray", "conveyor"} <= set(lin["packages"])
    assert pkg.manifest["architecture"] == "mlp" and pkg.manifest["inputShape"] == [
        len(pkg.transforms.output_columns)
    ]


@pytest.mark.slow
def test_regression_predicts_amount_in_its_own_units(ray_cluster: str, tmp_path: Path) -> None:
    # No contract columns: every column but the label is a feature, with types inferred from the data.
    config = RunConfig.model_validate(
        {
            "pipeline": "spend",
            "run": 1,
            "data": {
                "source": {"uri": "builtin://fraud?rows=6000&seed=5", "format": "builtin"},
                "label": "amount",
                "task": "regression",
            },
            "features": {
                "transforms": [
                    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
                    {"type": "standardize", "columns": ["card_age_days", "distance_km"]},
                    {"type": "oneHot", "columns": ["merchant"]},
                ]
            },
            "training": {"hyperparameters": {"epochs": 4, "batchSize": 128, "learningRate": 0.01}},
            "evaluation": {"metric": "rmse", "threshold": 1e6},
            "registry": {"uri": str(tmp_path), "modelName": "spend"},
        }
    )
    pkg = open_package(train_and_register(config))
    m = pkg.metrics
    assert {"rmse", "mae"} <= set(m) and "accuracy" not in m
    assert m["gate"]["lowerIsBetter"] is True and m["gate"]["passed"] is True
    assert pkg.schema["task"] == "regression" and "classes" not in pkg.schema
    types = {f["name"]: f["type"] for f in pkg.schema["features"]}
    assert types == {
        "merchant": "string",
        "hour": "int",
        "foreign": "bool",
        "card_age_days": "int",
        "distance_km": "float",
        "txn_last_hour": "int",
        "label": "int",
    }

    frame = data_mod.builtin_frame(config.data.source.uri)
    train_idx, test_idx = _split(frame["amount"].to_numpy(), config, stratify=False)
    y_test = frame["amount"].to_numpy()[test_idx]
    import torch

    x = pkg.transforms.apply(frame.iloc[test_idx].drop(columns=["amount"]).to_dict("records"))
    with torch.no_grad():
        pred = pkg.load_model()(torch.from_numpy(x)).numpy().reshape(-1)
    rmse = float(np.sqrt(np.mean((pred - y_test) ** 2)))
    assert rmse == pytest.approx(m["rmse"], rel=1e-4)
    # Better than always answering the training mean (the model learned the merchant effect), in dollars.
    baseline = float(np.sqrt(np.mean((frame["amount"].to_numpy()[train_idx].mean() - y_test) ** 2)))
    assert m["rmse"] < 0.95 * baseline, (m["rmse"], baseline)
    assert (
        pkg.profile["target"]["kind"] == "numeric"
        and pkg.profile["predictionDistribution"]["kind"] == "numeric"
    )


# ---------------------------------------------------------------- images: digits


@pytest.mark.slow
def test_digits_cnn_reaches_90_percent_held_out(digits_run) -> None:
    config, pkg = digits_run
    frame, _, test_idx = _held_out(config)
    m = pkg.metrics
    assert m["accuracy"] >= 0.9, m["history"]
    assert m["f1Macro"] >= 0.85 and "rocAuc" not in m
    cm = np.array(m["confusionMatrix"])
    assert cm.shape == (10, 10) and cm.sum() == m["testSamples"] == len(test_idx)
    assert pkg.schema | {"kind": "image", "channels": 1, "height": 8, "width": 8} == pkg.schema
    assert pkg.classes == [str(d) for d in range(10)]
    assert set(pkg.profile["imageStats"]) == {"mean", "std", "brightness"}

    # Serving path on raw pixels (0..16) reproduces the recorded accuracy.
    import torch

    images = np.stack(frame["image"].to_numpy()[test_idx])
    with torch.no_grad():
        logits = pkg.load_model()(torch.from_numpy(pkg.transforms.apply(images))).numpy()
    assert logits.shape == (len(test_idx), 10)
    assert float((logits.argmax(1) == frame["label"].to_numpy()[test_idx]).mean()) == pytest.approx(
        m["accuracy"]
    )


# ---------------------------------------------------------------- distributed, retries, bad data


@pytest.mark.slow
def test_two_workers_train_with_ddp_on_disjoint_shards(ray_cluster: str, tmp_path: Path) -> None:
    config = quick_config("fraud", str(tmp_path), pipeline="ddp", rows=6000)
    config.training.num_workers = 2
    config.training.hyperparameters.epochs = 3
    pkg = open_package(train_and_register(config))
    m = pkg.metrics
    # Each epoch the two workers together saw the training split exactly once.
    assert [(h["workers"], h["samples"]) for h in m["history"]] == [(2, m["trainSamples"])] * 3
    assert m["rocAuc"] >= 0.75
    assert pkg.lineage["training"]["workers"] == 2


def _recorded_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train has committed (listed in its run snapshot); a checkpoint directory alone is
    not yet one a retry can resume from."""
    count = 0
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            count += len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
        except ValueError:  # being rewritten
            continue
    return count


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(ray_cluster: str, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    config = quick_config("fraud", str(registry), pipeline="retry", rows=20000)
    config.training.hyperparameters.epochs = 8
    config.training.hyperparameters.batch_size = 32
    config.training.hyperparameters.early_stopping_patience = 0  # every epoch, to have one to kill
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(config.to_api()))
    checkpoints = registry / "fraud" / ".checkpoints"

    # First attempt: the RayJob's entrypoint, killed (as a node loss would) after its first checkpoint.
    # Streaming every epoch from Ray Data (no in-memory shard) keeps epochs long enough to kill mid-run.
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster,
        "PYTHONUNBUFFERED": "1",
        "CONVEYOR_SHARD_CACHE_BYTES": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.runtime.train", "--config", str(run_json)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: _recorded_checkpoints(checkpoints) or proc.poll() is not None,
            timeout=240,
            what="the first attempt's first recorded checkpoint",
        )
        assert proc.poll() is None, "the first attempt ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert Registry(str(registry), "fraud").versions() == []  # nothing registered by the killed attempt

    # The retry (same pipeline and run) picks up where the checkpoint left off.
    uri = train_and_register(config)
    m = open_package(uri).metrics
    # Resumed, not retrained: the killed driver's Ray actors may outlive it for a moment and finish more
    # epochs (on a fast machine, all of them), which the retry then builds on.
    assert m["resumedAfterEpoch"] is not None and 1 <= m["resumedAfterEpoch"] <= 8
    assert [h["epoch"] for h in m["history"]] == list(range(1, 9))
    assert Registry(str(registry), "fraud").versions() == ["v1"]
    assert m["rocAuc"] >= 0.8

    # Registered: the checkpoints are gone, and a retry of the finished run adds no second version.
    assert not list(checkpoints.glob("*/checkpoint_*"))
    assert train_and_register(config) == uri
    assert Registry(str(registry), "fraud").versions() == ["v1"]


@pytest.mark.slow
def test_contract_violations_fail_the_run_and_register_nothing(ray_cluster: str, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    config = quick_config("fraud", str(registry), pipeline="bad", rows=3000)
    api = config.to_api()
    columns = {c["name"]: c for c in api["data"]["contract"]["columns"]}
    columns["amount"]["max"] = 500  # travel and electronics purchases exceed it
    columns["merchant"]["allowedValues"] = ["grocery", "restaurant", "fuel", "online"]
    columns["distance_km"]["nullable"] = False
    api["data"]["contract"]["minRows"] = 5000
    run_json, result = tmp_path / "run.json", tmp_path / "result.json"
    run_json.write_text(json.dumps(api))

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.runtime.train", "--config", str(run_json), "--result", str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["outcome"] == "DataValidationFailed"
    found = {(v["column"], v["rule"]) for v in report["report"]["violations"]}
    assert found == {
        ("amount", "max"),
        ("merchant", "allowedValues"),
        ("distance_km", "nullable"),
        ("*", "minRows"),
    }
    by_rule = {v["rule"]: v for v in report["report"]["violations"]}
    assert set(by_rule["allowedValues"]["examples"]) <= {"travel", "electronics"}
    assert all(x > 500 for x in by_rule["max"]["examples"])
    # The process's message is the whole report, one line per violation.
    assert "data validation failed: 4 violation(s) in 3000 rows of builtin://fraud" in proc.stderr
    for column, rule in found:
        assert any(line.split()[:2] == [column, rule] for line in proc.stderr.splitlines()), (column, rule)
    # No version and no checkpoints: the only thing written is the run's outcome record (runs report
    # through storage, so the operator can tell a contract violation from other failures).
    written = [p for p in registry.rglob("*") if p.is_file()] if registry.exists() else []
    assert all(".runs" in p.parts for p in written), written


# ---------------------------------------------------------------- ingestion


@pytest.mark.slow
def test_ingests_parquet_csv_and_image_folders(ray_cluster: str, tmp_path: Path) -> None:
    from PIL import Image

    frame = data_mod.fraud_frame(rows=500, seed=3)
    frame.to_parquet(tmp_path / "tx.parquet")
    (tmp_path / "csv").mkdir()
    frame.to_csv(tmp_path / "csv" / "part-0.csv", index=False)

    pq = data_mod.load_dataset(DataSource(uri=f"file://{tmp_path}/tx.parquet", format="parquet")).to_pandas()
    assert pq.shape == (500, 8) and pq["amount"].sum() == pytest.approx(frame["amount"].sum())
    assert int(pq["distance_km"].isna().sum()) == int(frame["distance_km"].isna().sum())
    csv = data_mod.load_dataset(DataSource(uri=str(tmp_path / "csv"), format="csv")).to_pandas()
    assert len(csv) == 500 and list(csv.columns) == list(frame.columns)

    digits = data_mod.digits_frame()
    for cls in ("0", "1", "7"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i, img in enumerate(digits[digits["label"] == int(cls)]["image"].iloc[:5]):
            Image.fromarray((img[0] * 255 / 16).astype(np.uint8), mode="L").save(
                tmp_path / "images" / cls / f"{i}.png"
            )
    images = data_mod.load_dataset(DataSource(uri=str(tmp_path / "images"), format="imagefolder")).to_pandas()
    assert len(images) == 15 and sorted(images["label"].unique()) == ["0", "1", "7"]
    assert {np.asarray(v).shape for v in images["image"]} == {(1, 8, 8)}

    with pytest.raises(FileNotFoundError, match="nothing exists"):
        data_mod.load_dataset(DataSource(uri=str(tmp_path / "nope.parquet"), format="parquet"))


def test_builtin_fraud_is_seeded_and_skewed() -> None:
    a, b = data_mod.fraud_frame(rows=5000, seed=1), data_mod.fraud_frame(rows=5000, seed=1)
    assert a.equals(b)
    assert not a.equals(data_mod.fraud_frame(rows=5000, seed=2))
    assert 0.01 < a["label"].mean() < 0.03
    # Fraud concentrates where the generator says it does (large foreign purchases).
    foreign = a[a["foreign"]]["label"].mean()
    assert foreign > 2 * a[~a["foreign"]]["label"].mean()
    assert data_mod.builtin_frame("builtin://fraud?rows=100&seed=4").shape == (100, 8)
    with pytest.raises(ValueError, match="unknown builtin 'mnist'"):
        data_mod.builtin_frame("builtin://mnist")
    with pytest.raises(ValueError, match="rows must be a whole number"):
        data_mod.builtin_frame("builtin://fraud?rows=many")


# ---------------------------------------------------------------- architectures (no Ray)


@pytest.mark.parametrize(
    ("arch", "shape", "classes"),
    [
        ("resnet18", [1, 8, 8], 10),
        ("mobilenet_v3_small", [1, 8, 8], 3),
        ("cnn", [3, 16, 16], 4),
        ("mlp", [1, 8, 8], 10),
        ("mlp", [12], 2),
    ],
)
def test_architectures_adapt_to_input_and_classes_and_export(
    arch: str, shape: list[int], classes: int
) -> None:
    import io

    import torch

    from conveyor.runtime.training.models import build_model, export_torchscript

    torch.manual_seed(0)
    model = build_model(arch, input_shape=shape, outputs=classes).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (3, classes)
    scripted = torch.jit.load(io.BytesIO(export_torchscript(model, shape)))
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_unknown_or_mismatched_architecture_names_the_field() -> None:
    from conveyor.runtime.training.models import build_model

    with pytest.raises(ValueError, match="training.model.architecture 'resnet1000'"):
        build_model("resnet1000", input_shape=[3, 32, 32], outputs=2)
    with pytest.raises(ValueError, match="needs image data"):
        build_model("resnet18", input_shape=[12], outputs=2)


# ---------------------------------------------------------------- run configuration (no Ray)


def test_split_is_seeded_stratified_and_disjoint() -> None:
    config = quick_config("fraud", "/tmp/unused")
    y = np.array([0] * 950 + [1] * 50)
    train, test = _split(y, config, stratify=True)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1000
    assert y[test].sum() == 10 and len(test) == 200  # each class split 80/20
    again = _split(y, config, stratify=True)
    assert np.array_equal(again[1], test)
    config.data.split.seed = 1
    assert not np.array_equal(_split(y, config, stratify=True)[1], test)
    config.data.split.test_fraction = 1.0
    with pytest.raises(ValueError, match=r"data.split.testFraction must be within \(0, 1\)"):
        _split(y, config, stratify=True)


def test_bad_run_config_fails_naming_the_field(tmp_path: Path) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        "pipeline: p\nrun: one\ndata: {source: {uri: 'builtin://digits'}}\nregistry: {uri: /tmp/r, modelName: m}\n"
    )
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.runtime.train", "--config", str(run_yaml), "--result", str(result)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "run" in proc.stderr and "integer" in proc.stderr
    assert json.loads(result.read_text())["outcome"] == "InvalidConfig"


# ---------------------------------------------------------------- feedback as training data


@pytest.mark.slow
def test_feedback_rows_join_the_training_data_under_the_same_contract(
    ray_cluster: str, tmp_path: Path
) -> None:
    """data.feedback: the ground truth predictors persisted (inputs and true label) is added to the source's
    rows, typed as the source, and the data contract checks it like any other row."""
    from conveyor.runtime.package.validation import validate_dataset
    from conveyor.runtime.spec import DataSpec

    registry = str(tmp_path / "registry")
    source = DataSource(uri="builtin://fraud?rows=300&seed=7", format="builtin")
    live = data_mod.fraud_frame(rows=3, seed=11).drop(columns=["label"]).to_dict(orient="records")
    live[2]["amount"] = -5.0  # a producer's bug: the contract must catch it in feedback too
    Registry(registry, "fraud").append_feedback(
        "v1",
        [
            {
                "id": "r1",
                "row": i,
                "inputs": {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()},
                "prediction": "0",
                "label": "1",
            }
            for i, row in enumerate(live)
        ],
    )
    ds, added = data_mod.with_feedback(data_mod.load_dataset(source), registry, "fraud", "label")
    frame = ds.to_pandas()
    assert added == 3 and len(frame) == 303
    assert frame["label"].dtype == data_mod.builtin_frame(source.uri)["label"].dtype
    assert list(frame["label"].iloc[-3:]) == [1, 1, 1] and frame["amount"].iloc[-3] == pytest.approx(
        live[0]["amount"]
    )
    spec = DataSpec.model_validate(
        {
            "source": source.model_dump(),
            "contract": {"columns": [{"name": "amount", "type": "float", "min": 0}]},
        }
    )
    report = validate_dataset(ds, spec)
    assert [(v.column, v.rule, v.count) for v in report.violations] == [("amount", "min", 1)]
