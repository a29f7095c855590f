"""Gradient-boosted trees (``architecture: xgboost``) through Ray Train's own XGBoostTrainer.

The same prepared data as the torch path (the fitted transforms' output, so serving applies exactly the
same transforms), the same distribution: ``training.numWorkers`` Ray Train workers, each building its
DMatrix from its own shard of the training and validation datasets (``get_dataset_shard``); XGBoost's
collective (set up by the trainer) reduces the histograms and the evaluation across workers. With a
validation split, boosting stops once
its loss has not improved for EARLY_STOPPING_ROUNDS rounds and the best round's trees are kept.

Binary classification with at most CROSS_FIT_MAX_ROWS training rows is cross-fitted instead: the
training and validation rows together are split into CROSS_FIT_FOLDS stratified folds, one booster per
fold is trained on the other folds (early-stopped on its own fold), the decision threshold is chosen on
every row's out-of-fold score (``evaluate.ClassificationTally.best_threshold``) rather than on the
validation split alone, and the package's model is the fold boosters' average log-odds, merged into one
booster (``average_boosters``), so the package format and serving are unchanged. Why: with a rare class
the validation split holds a few dozen of its rows, too few to place a threshold (at 1% positives the
threshold it picked moved one or two rows of the test split); the out-of-fold scores hold all of them, and
the average of the fold boosters varies less than one booster. Measured with tests/bench/bench_quality.py
and an offline check over eleven make_classification seeds (docs/benchmarks/quality-2cpu.json, note).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.runtime.package.booster import BoosterModel, objective_for
from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training.loop import _parse_cpu, checkpoint_storage, run_name
from conveyor.runtime.training.prepare import PreparedData

log = logging.getLogger("conveyor.train")

EARLY_STOPPING_ROUNDS = 20
MODEL_FILE = "model.ubj"
# Cross-fitting (module docstring): the folds, and the most training rows it is used for (past that the
# validation split alone holds enough rows of every class, and k boosters would cost k times the time).
CROSS_FIT_FOLDS = 5
CROSS_FIT_MAX_ROWS = 1_000_000


def _shard_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """This worker's shard of dataset ``name`` as (x, y) arrays."""
    import ray.train

    xs, ys = [], []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_format="numpy", batch_size=None):
        xs.append(np.asarray(batch["x"], dtype=np.float32))
        ys.append(np.asarray(batch["y"]))
    if not xs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def trees_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: one xgboost.train over its shards, the result reported once."""
    import ray.train
    import xgboost

    rank = ray.train.get_context().get_world_rank()
    x, y = _shard_arrays("train")
    if cfg["crossFit"]:
        _cross_fit(cfg, rank, x, y)
        return
    weights = (
        np.asarray(cfg["classWeights"], dtype=np.float32)[y.astype(np.int64)] if cfg["classWeights"] else None
    )
    dtrain = xgboost.DMatrix(x, label=y, weight=weights)
    evals = [(dtrain, "train")]
    if cfg["validation"]:
        xv, yv = _shard_arrays("validation")
        wv = (
            np.asarray(cfg["classWeights"], dtype=np.float32)[yv.astype(np.int64)]
            if cfg["classWeights"]
            else None
        )
        evals.append((xgboost.DMatrix(xv, label=yv, weight=wv), "validation"))
    evals_result: dict[str, dict[str, list[float]]] = {}
    booster = xgboost.train(
        cfg["params"],
        dtrain,
        num_boost_round=cfg["maxRounds"],
        evals=evals,
        evals_result=evals_result,
        early_stopping_rounds=cfg["earlyStoppingRounds"] if cfg["validation"] else None,
        verbose_eval=False,
    )
    best = getattr(booster, "best_iteration", None)
    if best is not None and cfg["validation"]:
        booster = booster[: best + 1]  # the best round's trees, not the rounds that only waited
    metric = cfg["params"]["eval_metric"]
    train_loss = evals_result["train"][metric]
    val_loss = evals_result.get("validation", {}).get(metric)
    history = [
        {"epoch": i + 1, "trainLoss": train_loss[i], **({"validationLoss": val_loss[i]} if val_loss else {})}
        for i in range(len(train_loss))
    ]
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            booster.save_model(str(Path(d) / MODEL_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(
            {
                "rounds": len(train_loss),
                "bestRound": (best + 1) if best is not None and cfg["validation"] else len(train_loss),
                "history": history,
                "samples": int(len(y)),
            },
            checkpoint=checkpoint,
        )


def stratified_folds(y: np.ndarray, folds: int, seed: int, offset: int = 0) -> np.ndarray:
    """A fold index in [0, folds) for every row, each class dealt evenly over the folds in a seeded
    order; ``offset`` (a worker's rank) starts each worker's deal on another fold, so the folds stay even
    when every worker holds only a few rows of a rare class."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.nonzero(y == c)[0])
        out[rows] = (np.arange(len(rows)) + offset) % folds
    return out


def _cross_fit(cfg: dict[str, Any], rank: int, x: np.ndarray, y: np.ndarray) -> None:
    """Cross-fitting on one worker (module docstring): its training and validation shards are dealt into
    folds; each fold's booster is trained by every worker together (XGBoost's collective); the
    out-of-fold score histograms are summed over the workers, so every worker picks the same threshold."""
    import ray.train
    import xgboost
    import xgboost.collective

    from conveyor.runtime.training.evaluate import ClassificationTally

    xv, yv = _shard_arrays("validation")
    if len(yv):
        x, y = (np.concatenate([x, xv]), np.concatenate([y, yv])) if len(y) else (xv, yv)
    k = cfg["folds"]
    fold = stratified_folds(y, k, cfg["params"]["seed"], offset=rank)
    oof = ClassificationTally(["0", "1"])
    metric = cfg["params"]["eval_metric"]
    boosters, best_rounds, curves = [], [], []
    for f in range(k):
        fit_rows, held = fold != f, fold == f
        dfit = xgboost.DMatrix(x[fit_rows], label=y[fit_rows])
        dheld = xgboost.DMatrix(x[held], label=y[held])
        evals_result: dict[str, dict[str, list[float]]] = {}
        booster = xgboost.train(
            cfg["params"],
            dfit,
            num_boost_round=cfg["maxRounds"],
            evals=[(dfit, "train"), (dheld, "validation")],
            evals_result=evals_result,
            early_stopping_rounds=cfg["earlyStoppingRounds"],
            verbose_eval=False,
        )
        rounds = len(evals_result["train"][metric])
        best = booster.best_iteration + 1 if cfg["earlyStoppingRounds"] else rounds
        booster = booster[:best]
        margin = np.asarray(booster.predict(dheld, output_margin=True), dtype=np.float64).reshape(-1)
        oof.add(np.stack([np.zeros_like(margin), margin], axis=1), y[held])
        boosters.append(booster)
        best_rounds.append(best)
        curves.append((evals_result["train"][metric], evals_result["validation"][metric]))
    assert oof.hist is not None
    # Every worker's out-of-fold scores (a no-op on one worker; across workers the sum comes back flat).
    summed = xgboost.collective.allreduce(oof.hist.astype(np.float64), xgboost.collective.Op.SUM)
    oof.hist = np.rint(np.asarray(summed)).astype(np.int64).reshape(oof.hist.shape)
    threshold = oof.best_threshold(cfg["thresholdObjective"])
    history = []
    for i in range(max(len(t) for t, _ in curves)):
        at = [(t[i], v[i]) for t, v in curves if i < len(t)]  # the folds still boosting at round i + 1
        history.append(
            {
                "epoch": i + 1,
                "trainLoss": float(np.mean([t for t, _ in at])),
                "validationLoss": float(np.mean([v for _, v in at])),
            }
        )
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            average_boosters(boosters).save_model(str(Path(d) / MODEL_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(
            {
                "rounds": len(history),
                "bestRound": round(float(np.mean(best_rounds))),
                "foldBestRounds": best_rounds,
                "decisionThreshold": threshold,
                "history": history,
                "samples": int(len(y)),
            },
            checkpoint=checkpoint,
        )


def average_boosters(boosters: list[Any]) -> Any:
    """One booster whose log-odds are the mean of ``boosters``' (binary boosters sharing one
    ``base_score``): every tree of each, its leaf values divided by their number. XGBoost has no merge of
    its own; its JSON model format is documented and versioned, and the result loads and predicts as any
    booster (serving sees one model)."""
    import xgboost

    k = len(boosters)
    docs = [json.loads(bytes(b.save_raw(raw_format="json"))) for b in boosters]
    merged = docs[0]
    model = merged["learner"]["gradient_booster"]["model"]
    base = {d["learner"]["learner_model_param"]["base_score"] for d in docs}
    if len(base) != 1 or model["gbtree_model_param"]["num_parallel_tree"] != "1":
        raise ValueError(f"average_boosters: boosters differ in base_score ({sorted(base)}) or are forests")
    trees, tree_info = [], []
    for d in docs:
        m = d["learner"]["gradient_booster"]["model"]
        for tree, group in zip(m["trees"], m["tree_info"], strict=True):
            leaf = [c == -1 for c in tree["left_children"]]
            tree["split_conditions"] = [
                v / k if is_leaf else v for v, is_leaf in zip(tree["split_conditions"], leaf, strict=True)
            ]
            tree["base_weights"] = [v / k for v in tree["base_weights"]]
            tree["id"] = len(trees)
            trees.append(tree)
            tree_info.append(group)
    model["trees"] = trees
    model["tree_info"] = tree_info
    model["iteration_indptr"] = list(range(len(trees) + 1))  # one tree per round (binary, no forests)
    model["gbtree_model_param"]["num_trees"] = str(len(trees))
    out = xgboost.Booster()
    out.load_model(bytearray(json.dumps(merged).encode()))
    return out


def fit_trees(
    config: RunConfig, prepared: PreparedData
) -> tuple[BoosterModel, list[dict[str, Any]], dict[str, Any]]:
    """Train gradient-boosted trees with XGBoostTrainer; returns the model, per-round history, run facts."""
    import ray
    import ray.data
    import ray.train
    from ray.train.xgboost import XGBoostTrainer

    if prepared.kind != "tabular":
        raise ValueError(
            "training.model.architecture 'xgboost' needs tabular data; images use cnn or a torchvision model"
        )
    tr = config.training
    trees = tr.model.trees
    cluster = ray.cluster_resources()
    wanted_cpu = _parse_cpu(tr.worker_groups[0].cpu) if tr.worker_groups else 1.0
    cpu_per_worker = max(0.25, min(wanted_cpu, cluster.get("CPU", 1.0) / tr.num_workers))
    classification = prepared.classes is not None
    params = {
        **objective_for(prepared.task, prepared.outputs),
        "tree_method": "hist",
        "max_depth": trees.max_depth,
        "eta": trees.learning_rate,
        "seed": tr.hyperparameters.seed,
        "nthread": max(1, math.floor(cpu_per_worker)),
    }
    # Trees are not class-weighted (measured on the fraud set: 50x weights overfit the rare class within a
    # dozen rounds: ROC AUC 0.832 against 0.886 unweighted, 20k rows); the threshold chosen on validation handles
    # the imbalance. Torch models, which weights help, keep them.
    class_weights = None

    # The prepared splits as Ray Datasets (x, y), in memory or streamed (PreparedData.dataset):
    # materialized when they fit, since the workers hold every CPU once they start, leaving none for Ray
    # Data tasks; each worker builds its DMatrix from its own shard.
    datasets = {"train": prepared.dataset("train")}
    has_validation = prepared.rows("validation") > 0
    if has_validation:
        datasets["validation"] = prepared.dataset("validation")
    patience = tr.hyperparameters.early_stopping_patience
    train_rows = prepared.rows("train") + prepared.rows("validation")
    cross_fit = prepared.outputs == 2 and has_validation and train_rows <= CROSS_FIT_MAX_ROWS
    if cross_fit:
        # One intercept for every fold's booster (the training rows' positive share), so that their
        # average is one booster with that intercept.
        counts = np.asarray(prepared.train_class_counts(), dtype=np.float64)
        params["base_score"] = float(min(max(counts[1] / max(counts.sum(), 1.0), 1e-6), 1 - 1e-6))
    name = run_name(config)
    storage = checkpoint_storage(config)
    trainer = XGBoostTrainer(
        trees_loop_per_worker,
        train_loop_config={
            "params": params,
            "maxRounds": trees.max_rounds,
            "earlyStoppingRounds": EARLY_STOPPING_ROUNDS if patience > 0 else None,
            "validation": has_validation,
            "classWeights": class_weights,
            "crossFit": cross_fit,
            "folds": CROSS_FIT_FOLDS,
            "thresholdObjective": config.evaluation.metric,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tr.num_workers, resources_per_worker={"CPU": cpu_per_worker}
        ),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        data = (Path(d) / MODEL_FILE).read_bytes()
    model = BoosterModel.from_bytes(
        data, task=prepared.task, classes=prepared.outputs if classification else 0
    )
    reported = result.metrics
    facts = {
        "rayTrainRun": name,
        "checkpointStorage": storage,
        "workers": tr.num_workers,
        "device": "cpu",
        "threadsPerWorker": params["nthread"],
        "resumedAfterEpoch": None,
        "bestEpoch": reported["bestRound"],
        "stoppedEarly": reported["rounds"] < trees.max_rounds,
        "classWeights": class_weights,
    }
    if cross_fit:
        facts["crossFitting"] = {"folds": CROSS_FIT_FOLDS, "bestRounds": reported["foldBestRounds"]}
        # Chosen on the out-of-fold scores; run.py ships it instead of choosing one on the validation split.
        facts["decisionThreshold"] = reported["decisionThreshold"]
    return model, reported["history"], facts
