"""Gradient-boosted trees (``architecture: xgboost``) through Ray Train's own XGBoostTrainer.

The same prepared data as the torch path (the fitted transforms' output, so serving applies exactly the
same transforms), the same distribution: ``training.numWorkers`` Ray Train workers, each building its
DMatrix from its own shard of the training and validation datasets (``get_dataset_shard``); XGBoost's
collective (set up by the trainer) reduces the histograms and the evaluation across workers. With a
validation split, boosting stops once
its loss has not improved for EARLY_STOPPING_ROUNDS rounds and the best round's trees are kept.
"""

from __future__ import annotations

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
    return model, reported["history"], facts
