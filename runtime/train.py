"""The training run: ``python -m conveyor.runtime.train --config run.json``.

``run.json`` is a ``conveyor.runtime.spec.RunConfig`` (what the operator derives from an MLPipeline).
The run:

1. ingests the source with Ray Data (``data.load_dataset``);
2. validates it against the data contract (every violation reported; on failure the process exits 2
   with the report as its message and nothing is written to the registry);
3. splits it (seeded, stratified for classification), profiles the training split and fits the
   declared feature transforms on it only;
4. trains with Ray Train's TorchTrainer: DDP across ``training.numWorkers``, GPU with mixed precision
   when ``training.useGpu`` is set and the cluster has GPUs, CPU otherwise; seeded; metrics reported each
   epoch (a worker's shard that fits in ``CONVEYOR_SHARD_CACHE_BYTES``, default 1 GiB, is streamed
   once and then reshuffled in memory); a checkpoint under ``checkpointUri`` (default
   ``<registry>/<model>/.checkpoints``) after every epoch, or at most every
   ``CONVEYOR_CHECKPOINT_INTERVAL_S`` seconds when that is set (always after the last), so a retried
   job (same pipeline and run) resumes from its last checkpoint; a run that registered leaves a marker
   instead, and its retry returns that version;
5. evaluates the exported TorchScript model (what serving runs) on the held-out split;
6. registers the package atomically as the next version (``registry.Registry.register``).

It registers the model whether or not the evaluation gate passed: the gate's result is in
``metrics.json`` (``gate``), and the operator, which also knows the deployed version, decides. Exit codes:
0 registered, 2 data validation failed, 1 any other error. ``--result PATH`` writes the outcome as JSON.

For tests and samples, ``train_and_register(config)`` runs the same steps in-process and returns the
package URI (a local Ray is started when none is running).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.runtime import data as data_mod
from conveyor.runtime import evaluate, profile
from conveyor.runtime.features import (
    FeatureSchema,
    FittedTransforms,
    category_key,
    fit_image_transforms,
    fit_transforms,
)
from conveyor.runtime.registry import PackageError, Registry, StagingArea
from conveyor.runtime.spec import RunConfig
from conveyor.runtime.validation import DataValidationError, ValidationReport, validate_dataset

log = logging.getLogger("conveyor.train")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID_DATA = 2


# ---------------------------------------------------------------- data preparation


@dataclass
class PreparedData:
    """The split, transformed data and everything the package describes about it."""

    kind: str  # "tabular" | "image"
    task: str
    classes: list[str] | None
    transforms: FittedTransforms
    schema: dict[str, Any]
    profile: dict[str, Any]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    data_sha256: str
    validation: ValidationReport

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1


def _infer_type(values: Any) -> str:
    import pandas as pd

    s = pd.Series(values)
    present = s.dropna()
    if len(present) and isinstance(present.iloc[0], np.ndarray):
        return "image"
    if pd.api.types.is_bool_dtype(s) or (
        len(present) and present.map(lambda v: isinstance(v, bool | np.bool_)).all()
    ):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_numeric_dtype(s):
        return "float"
    return "string"


def _classes(labels: np.ndarray, config: RunConfig) -> list[str]:
    label_contract = config.data.contract.label
    if label_contract is not None and label_contract.allowed_values:
        return list(label_contract.allowed_values)
    keys = {category_key(v) for v in labels.tolist()}

    def order(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    return sorted(keys, key=order)


def _split(y: np.ndarray, config: RunConfig, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test row indices; stratified by class for classification."""
    frac = config.data.split.test_fraction
    if not 0.0 < frac < 1.0:
        raise ValueError(f"data.split.testFraction must be within (0, 1), got {frac}")
    rng = np.random.default_rng(config.data.split.seed)
    groups = [np.nonzero(y == c)[0] for c in np.unique(y)] if stratify else [np.arange(len(y))]
    train, test = [], []
    for idx in groups:
        idx = rng.permutation(idx)
        n_test = round(len(idx) * frac) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(
            f"data.split.testFraction {frac} leaves an empty train or test split of {len(y)} rows"
        )
    return tr, te


def prepare_data(config: RunConfig) -> PreparedData:
    """Ingest, validate, split, profile and fit transforms (raises DataValidationError on bad data)."""
    source = config.data.source
    ds = data_mod.load_dataset(source, label=config.data.label).materialize()
    report = validate_dataset(ds, config.data)
    if not report.ok:
        raise DataValidationError(report)
    log.info("data validated: %d rows of %s", report.rows, source.uri)
    frame = ds.to_pandas()
    del ds
    label = config.data.label
    contract_cols = list(config.data.contract.columns)
    feature_names = [c.name for c in contract_cols] or [c for c in frame.columns if c != label]
    declared = {c.name: c for c in contract_cols}
    types = {n: (declared[n].type if n in declared else _infer_type(frame[n])) for n in feature_names}
    images = [n for n, t in types.items() if t == "image"]
    if images and len(feature_names) > 1:
        raise ValueError(
            f"data: an image column ({images[0]!r}) must be the only feature, got {feature_names}"
        )

    raw_labels = frame[label].to_numpy()
    classification = config.data.task == "classification"
    if classification:
        classes = _classes(raw_labels, config)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[category_key(v)] for v in raw_labels], dtype=np.int64)
    else:
        classes = None
        try:
            y = raw_labels.astype(np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.label {label!r} must be numeric for task regression ({e})") from e
    train_idx, test_idx = _split(y, config, stratify=classification)
    train, test = frame.iloc[train_idx], frame.iloc[test_idx]
    sha = data_mod.content_sha256(source, frame if source.format == "builtin" else None)
    task_fields = {
        "task": config.data.task,
        "label": label,
        **({"classes": classes} if classes is not None else {}),
    }

    if images:
        col = images[0]
        x_all = np.stack(frame[col].to_numpy()).astype(np.float32)
        if x_all.ndim == 3:
            x_all = x_all[:, None]
        declared_max = declared[col].max if col in declared else None
        x_train_raw = x_all[train_idx]
        scale = float(declared_max) if declared_max else (255.0 if float(x_train_raw.max()) > 1.0 else 1.0)
        transforms = fit_image_transforms(x_train_raw, scale=scale, image_field=col)
        schema = {
            "kind": "image",
            "imageField": col,
            "channels": transforms.channels,
            "height": transforms.height,
            "width": transforms.width,
            "scale": scale,
            "mean": transforms.mean,
            "std": transforms.std,
            **task_fields,
        }
        prof = profile.image_profile(
            x_train_raw, scale=scale, labels=raw_labels[train_idx] if classes else None
        )
        x_train = transforms.apply_images(x_train_raw)
        x_test = transforms.apply_images(x_all[test_idx])
        return PreparedData(
            "image",
            config.data.task,
            classes,
            transforms,
            schema,
            prof,
            x_train,
            y[train_idx],
            x_test,
            y[test_idx],
            sha,
            report,
        )

    features = []
    for n in feature_names:
        if n in declared:
            c = declared[n]
            features.append(FeatureSchema(n, c.type, c.nullable, c.min, c.max, c.allowed_values))
        else:
            features.append(FeatureSchema(n, types[n], nullable=bool(frame[n].isna().any())))
    transforms = fit_transforms(train[feature_names], features, config.features.transforms)
    prof = profile.tabular_profile(
        {n: train[n].to_numpy() for n in feature_names},
        types,
        labels=raw_labels[train_idx] if classes else None,
    )
    if not classes:
        prof["target"] = profile.numeric_profile(y[train_idx])
    schema = {"kind": "tabular", "features": [f.to_json() for f in features], **task_fields}
    x_train = _apply_with_ray(transforms, train[feature_names])
    x_test = transforms.apply(test[feature_names])
    return PreparedData(
        "tabular",
        config.data.task,
        classes,
        transforms,
        schema,
        prof,
        x_train,
        y[train_idx],
        x_test,
        y[test_idx],
        sha,
        report,
    )


def _apply_with_ray(transforms: FittedTransforms, frame: Any) -> np.ndarray:
    """The fitted transforms applied to the training split by Ray Data, batch by batch (the same code
    serving runs), gathered back in row order (Ray Data may finish batches in any order)."""
    import ray.data

    row = "__conveyor_row__"

    def apply(batch: Any) -> dict[str, np.ndarray]:
        return {"x": transforms.apply(batch.drop(columns=[row])), row: batch[row].to_numpy()}

    indexed = frame.reset_index(drop=True).assign(**{row: np.arange(len(frame))})
    ds = ray.data.from_pandas(indexed).map_batches(apply, batch_format="pandas")
    xs, rows = [], []
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        xs.append(np.asarray(b["x"]))
        rows.append(np.asarray(b[row]))
    x = np.concatenate(xs)
    out = np.empty_like(x)
    out[np.concatenate(rows)] = x
    return out


# ---------------------------------------------------------------- the training loop


def tune_allocator() -> None:
    """Keep freed memory in the process (glibc): by default malloc hands large blocks back to the OS and
    adapts its thresholds, so a training step that reallocates the same activation buffers pays page
    faults every time, worst in a non-main thread, where Ray Train runs the loop (measured here: a small
    CNN's epoch ~30% faster). A no-op where that malloc is not in use."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # the largest glibc accepts; fixed, so no longer adaptive
    libc.mallopt(m_trim_threshold, 512 * 2**20)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model: Any, hp: dict[str, Any]) -> Any:
    import torch

    params = model.parameters()
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=hp["learningRate"], momentum=0.9, weight_decay=hp["weightDecay"])
    if hp["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=hp["learningRate"], weight_decay=hp["weightDecay"])
    return torch.optim.Adam(params, lr=hp["learningRate"], weight_decay=hp["weightDecay"])


def train_epoch(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    optimizer: Any,
    *,
    classification: bool,
    device: Any,
    amp: bool = False,
    scaler: Any = None,
) -> dict[str, float]:
    """One pass over ``batches`` ((x, y) tensors): the step both Ray Train and the plain loop run."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss() if classification else torch.nn.MSELoss()
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    amp_dtype = torch.bfloat16 if (amp and torch.cuda.is_bf16_supported()) else torch.float16
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            out = model(x)
            loss = loss_fn(out.float(), y if classification else y.view(-1, 1))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = x.shape[0]
        seen += n
        total_loss += loss.detach() * n
        if classification:
            correct += (out.detach().argmax(dim=1) == y).sum()
    return {"loss_sum": float(total_loss), "correct": float(correct), "samples": float(seen)}


def _ray_batches(shard: Any, batch_size: int, seed: int, device: Any) -> Iterator[tuple[Any, Any]]:
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=max(4 * batch_size, 1024),
        local_shuffle_seed=seed,
        drop_last=False,
        prefetch_batches=2,
    ):
        yield batch["x"], batch["y"]


def _in_memory_batches(x: Any, y: Any, batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
    import torch

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        yield x[idx], y[idx]


def _collect(batches: Iterable[tuple[Any, Any]], sink: list[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    for x, y in batches:
        sink.append((x, y))
        yield x, y


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (DDP when there are several)."""
    import ray.train
    import ray.train.torch
    import torch

    from conveyor.runtime.models import build_model

    torch.set_num_threads(cfg["threads"])
    tune_allocator()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg["seed"])
    device = ray.train.torch.get_device()
    model = build_model(
        cfg["architecture"],
        input_shape=cfg["inputShape"],
        outputs=cfg["outputs"],
        hidden_layers=cfg["hiddenLayers"],
        dropout=cfg["dropout"],
        pretrained=cfg["pretrained"],
    )
    start_epoch, history, opt_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]
        start_epoch = state["epoch"] + 1
        history = state["history"]
        history[-1]["resumedHere"] = True
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    amp = bool(cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    shard = ray.train.get_dataset_shard("train")
    classification = cfg["task"] == "classification"

    # A shard that fits in memory is streamed from Ray Data once and then kept: later epochs shuffle it
    # in memory, as a plain PyTorch loop would, instead of paying Ray Data's per-batch cost again.
    cached: tuple[Any, Any] | None = None
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, cfg["epochs"]):
        started, cpu_started = time.perf_counter(), time.thread_time()
        epoch_seed = cfg["seed"] * 1000 + epoch * 10 + rank
        sink: list[tuple[Any, Any]] = []
        if cached is not None:
            batches = _in_memory_batches(*cached, cfg["batchSize"], epoch_seed)
        else:
            batches = _ray_batches(shard, cfg["batchSize"], epoch_seed, device)
            if cfg["cacheShard"]:
                batches = _collect(batches, sink)
        stats = train_epoch(
            model,
            batches,
            optimizer,
            classification=classification,
            device=device,
            amp=amp,
            scaler=scaler,
        )
        elapsed = time.perf_counter() - started
        cpu_seconds = time.thread_time() - cpu_started
        if sink:
            cached = (torch.cat([b[0] for b in sink]), torch.cat([b[1] for b in sink]))
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([stats["loss_sum"], stats["correct"], stats["samples"], elapsed], device=device)
            dist.all_reduce(t[:3])
            dist.all_reduce(t[3:], op=dist.ReduceOp.MAX)
            stats = {"loss_sum": float(t[0]), "correct": float(t[1]), "samples": float(t[2])}
            elapsed = float(t[3])
        samples = max(stats["samples"], 1.0)
        metrics = {
            "epoch": epoch + 1,
            "trainLoss": stats["loss_sum"] / samples,
            "samples": int(stats["samples"]),
            "seconds": elapsed,
            # CPU time of the training thread (rank 0's): far below `seconds` means it waited (for data,
            # or for a CPU busy with something else).
            "cpuSeconds": cpu_seconds,
            "samplesPerSecond": stats["samples"] / elapsed if elapsed > 0 else 0.0,
            "workers": world,
            "device": device.type,
        }
        if classification:
            metrics["trainAccuracy"] = stats["correct"] / samples
        history.append(metrics)
        last_epoch = epoch == cfg["epochs"] - 1
        due = time.monotonic() - last_checkpoint >= cfg["checkpointIntervalS"]
        _report(model, optimizer, epoch, history, rank, checkpoint=last_epoch or due)
        if last_epoch or due:
            last_checkpoint = time.monotonic()
    if checkpoint is not None and start_epoch >= cfg["epochs"]:
        # The previous attempt had finished every epoch: report its state again, marked as resumed.
        _report(model, optimizer, start_epoch - 1, history, rank)


def _report(
    model: Any,
    optimizer: Any,
    epoch: int,
    history: list[dict[str, Any]],
    rank: int,
    *,
    checkpoint: bool = True,
) -> None:
    """Per-epoch metrics to Ray Train, with a checkpoint (written by rank 0) a retry resumes from."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0 and checkpoint:
            raw = model.module if hasattr(model, "module") else model
            state = {
                "model": raw.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
            }
            torch.save(state, Path(d) / "state.pt")
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(history[-1], checkpoint=ckpt)


# ---------------------------------------------------------------- orchestration


def _parse_cpu(quantity: str) -> float:
    q = str(quantity).strip()
    try:
        cpu = float(q[:-1]) / 1000 if q.endswith("m") else float(q)
    except ValueError as e:
        raise ValueError(
            f"training.workerGroups[0].cpu {quantity!r} is not a CPU quantity (e.g. 2, 500m)"
        ) from e
    if cpu <= 0:
        raise ValueError(f"training.workerGroups[0].cpu {quantity!r} must be positive")
    return cpu


def _run_name(config: RunConfig) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{config.namespace}.{config.pipeline}-{config.run}")


def checkpoint_storage(config: RunConfig) -> str:
    uri = (
        config.checkpoint_uri
        or f"{config.registry.uri.rstrip('/')}/{config.registry.model_name}/.checkpoints"
    )
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    # Ray Train wants an absolute local path (or a URI it can reach from every node).
    return uri if "://" in uri else os.path.abspath(uri)


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (inside a RayJob) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    from ray.data import DataContext

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    DataContext.get_current().enable_progress_bars = False


def fit(config: RunConfig, prepared: PreparedData) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Train with Ray Train; returns the trained torch model (CPU), the epoch history and run facts."""
    import ray
    import ray.data
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from conveyor.runtime.models import build_model

    tr = config.training
    hp = tr.hyperparameters
    if hp.epochs < 1 or hp.batch_size < 1:
        raise ValueError("training.hyperparameters.epochs and batchSize must be at least 1")
    if tr.num_workers < 1:
        raise ValueError("training.numWorkers must be at least 1")
    cluster = ray.cluster_resources()
    use_gpu = bool(tr.use_gpu and cluster.get("GPU", 0) >= 1)
    if tr.use_gpu and not use_gpu:
        log.warning("training.useGpu is set but the Ray cluster has no GPU: training on CPU")
    wanted_cpu = _parse_cpu(tr.worker_groups[0].cpu) if tr.worker_groups else 1.0
    # Leave room for Ray Data's tasks; a worker's threads follow its CPU share.
    cpu_per_worker = max(0.25, min(wanted_cpu, (cluster.get("CPU", 1.0)) / tr.num_workers))
    threads = max(1, math.floor(cpu_per_worker))
    y_train = prepared.y_train
    if prepared.classes is None:
        # Regression trains on standardized targets; the exported model maps back to the label's units.
        y_mean, y_std = float(y_train.mean()), float(y_train.std()) or 1.0
        y_train = ((y_train - y_mean) / y_std).astype(np.float32)
    train_ds = ray.data.from_numpy(prepared.x_train).zip(ray.data.from_numpy(y_train))
    train_ds = train_ds.rename_columns({"data": "x", "data_1": "y"}).materialize()
    shard_bytes = (prepared.x_train.nbytes + y_train.nbytes) / tr.num_workers
    cache_limit = float(os.environ.get("CONVEYOR_SHARD_CACHE_BYTES", str(2**30)))
    loop_config = {
        "architecture": tr.model.architecture,
        "hiddenLayers": list(tr.model.hidden_layers),
        "dropout": tr.model.dropout,
        "pretrained": tr.model.pretrained,
        "inputShape": prepared.input_shape,
        "outputs": prepared.outputs,
        "task": prepared.task,
        "epochs": hp.epochs,
        "batchSize": hp.batch_size,
        "learningRate": hp.learning_rate,
        "weightDecay": hp.weight_decay,
        "optimizer": hp.optimizer,
        "seed": hp.seed,
        "threads": threads,
        "amp": use_gpu,
        "cacheShard": shard_bytes <= cache_limit,
        "checkpointIntervalS": float(os.environ.get("CONVEYOR_CHECKPOINT_INTERVAL_S", "0")),
    }
    resources = {"CPU": cpu_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Each report() waits until the Train controller polls the worker (every 2 s by default), which would
    # idle a worker after every short epoch.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    storage = checkpoint_storage(config)
    name = _run_name(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tr.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    model = build_model(
        tr.model.architecture,
        input_shape=prepared.input_shape,
        outputs=prepared.outputs,
        hidden_layers=tr.model.hidden_layers,
        dropout=tr.model.dropout,
        pretrained=False,
    )
    model.load_state_dict(state["model"])
    if prepared.classes is None:
        from conveyor.runtime.models import TargetScale

        model = TargetScale(model, y_mean, y_std)
    history = state["history"]
    facts = {
        "rayTrainRun": name,
        "checkpointStorage": storage,
        "workers": tr.num_workers,
        "device": "cuda" if use_gpu else "cpu",
        "amp": use_gpu,
        "threadsPerWorker": threads,
        "shardCachedInMemory": loop_config["cacheShard"],
        "resumedAfterEpoch": next((h["epoch"] for h in history if h.get("resumedHere")), None),
    }
    return model, history, facts


def _predict(module: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(module(torch.from_numpy(x[i : i + batch_size])).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 1), dtype=np.float32)


def _packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("conveyor", "torch", "torchvision", "ray", "numpy", "pandas", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name == "conveyor":  # run from a source tree rather than an installed distribution
                out[name] = "unknown (source tree)"
    return out


@dataclass
class RunResult:
    version: str
    package_uri: str
    metrics: dict[str, Any]
    gate: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": "Registered",
            "version": self.version,
            "packageUri": self.package_uri,
            "metrics": {k: v for k, v in self.metrics.items() if k not in ("history", "gate")},
            "gate": self.gate,
        }


def run(config: RunConfig) -> RunResult:
    """The whole run (see the module docstring); Ray must be initialised (``ensure_ray``)."""
    import torch

    from conveyor.runtime.models import export_torchscript

    registry = Registry(config.registry.uri, config.registry.model_name)  # bad names fail before any work
    done = _already_registered(config, registry)
    if done is not None:
        log.info("run %s already registered %s; nothing to do", _run_name(config), done.package_uri)
        return done
    started = time.time()
    prepared = prepare_data(config)
    prepared_at = time.time()
    model, history, facts = fit(config, prepared)
    trained_at = time.time()
    log.info("phases: data %.1fs, training %.1fs", prepared_at - started, trained_at - prepared_at)
    model_bytes = export_torchscript(model, prepared.input_shape)

    import io

    scripted = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu").eval()
    outputs = _predict(scripted, prepared.x_test)
    if prepared.classes is not None:
        metrics = evaluate.classification_metrics(outputs, prepared.y_test, prepared.classes)
        predicted = outputs.argmax(axis=1)
    else:
        metrics = evaluate.regression_metrics(outputs, prepared.y_test)
        predicted = outputs.reshape(-1)
    metrics.update(
        {
            "trainSamples": int(len(prepared.y_train)),
            "testSamples": int(len(prepared.y_test)),
            "history": history,
            **{k: v for k, v in facts.items() if k in ("resumedAfterEpoch",)},
        }
    )
    gate = evaluate.gate(metrics, config.evaluation)
    metrics["gate"] = gate
    prof = dict(prepared.profile)
    prof["predictionDistribution"] = profile.prediction_distribution(predicted, prepared.classes)
    lineage = {
        "pipeline": config.pipeline,
        "namespace": config.namespace,
        "run": config.run,
        "dataUri": config.data.source.uri,
        "dataSha256": prepared.data_sha256,
        "parameters": config.to_api(),
        "packages": _packages(),
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "training": {**facts, "wallSeconds": round(time.time() - started, 3)},
    }

    def write(area: StagingArea) -> dict[str, Any]:
        area.write_bytes("model.pt", model_bytes)
        area.write_json("transforms.json", prepared.transforms.to_json())
        area.write_json("schema.json", prepared.schema)
        area.write_json("profile.json", _finite(prof))
        area.write_json("metrics.json", _finite(metrics))
        area.write_json("lineage.json", _finite(lineage))
        return {
            "task": prepared.task,
            "architecture": config.training.model.architecture,
            "inputShape": prepared.input_shape,
        }

    version = registry.register(write)
    uri = registry.package_uri(version)
    log.info("registered %s (%s %s)", uri, gate["metric"], gate["value"])
    _mark_registered(config, version, uri)
    return RunResult(version, uri, metrics, gate)


def _run_storage(config: RunConfig) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(checkpoint_storage(config))
    return fs, f"{root.rstrip('/')}/{_run_name(config)}"


def _mark_registered(config: RunConfig, version: str, uri: str) -> None:
    """The run's checkpoints are no longer needed; the marker left in their place makes a retry of a run
    that already registered (its pod restarted after the commit) return that version, not add another."""
    fs, path = _run_storage(config)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/registered.json", json.dumps({"version": version, "packageUri": uri}).encode())


def _already_registered(config: RunConfig, registry: Registry) -> RunResult | None:
    fs, path = _run_storage(config)
    try:
        marker = json.loads(fs.cat_file(f"{path}/registered.json"))
        meta = registry.read_metadata(marker["version"])
    except (FileNotFoundError, KeyError, ValueError, PackageError):
        return None
    return RunResult(
        marker["version"],
        registry.package_uri(marker["version"]),
        meta["metrics"],
        meta["metrics"].get("gate", {}),
    )


def _finite(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null (a profile of an all-null column, an undefined metric)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def train_and_register(config: RunConfig) -> str:
    """Train, evaluate and register ``config`` in-process; return the package URI
    (``<registry.uri>/<modelName>/v<N>``).

    For tests and samples (e.g. the serving tests need a small real package quickly): starts a local Ray
    when none is running (tests start one first with ``ray.init(num_cpus=2, include_dashboard=False)``).
    ``quick_config("fraud" | "digits", registry_uri)`` gives a small real run (tabular or image) that
    trains in seconds on a CPU. Raises DataValidationError on bad data.
    """
    ensure_ray()
    return run(config).package_uri


FRAUD_TRANSFORMS = [
    {"type": "impute", "columns": ["distance_km"], "strategy": "median"},
    {"type": "clip", "columns": ["amount"], "min": 0, "max": 5000},
    {"type": "standardize", "columns": ["amount", "card_age_days", "distance_km", "txn_last_hour"]},
    {"type": "oneHot", "columns": ["merchant"]},
    {"type": "bucketize", "columns": ["hour"], "boundaries": [6, 12, 18]},
]


def quick_config(
    dataset: str,
    registry_uri: str,
    *,
    model_name: str | None = None,
    pipeline: str = "quick",
    run: int = 1,
    **data,
) -> RunConfig:
    """A small, real run of a built-in set that trains in seconds on a CPU: ``fraud`` (tabular MLP with
    every transform kind, ROC AUC ~0.85) or ``digits`` (8x8 images, small CNN, accuracy ~0.95).
    ``data`` overrides builtin query parameters (``rows=...``, ``seed=...``)."""
    if dataset == "fraud":
        params = {"rows": 8000, "seed": 7, **data}
        query = "&".join(f"{k}={v}" for k, v in params.items())
        raw: dict[str, Any] = {
            "data": {
                "source": {"uri": f"builtin://fraud?{query}", "format": "builtin"},
                "contract": {
                    "minRows": 1000,
                    "columns": [
                        {"name": "amount", "type": "float", "min": 0},
                        {"name": "merchant", "type": "string", "allowedValues": list(data_mod.MERCHANTS)},
                        {"name": "hour", "type": "int", "min": 0, "max": 23},
                        {"name": "foreign", "type": "bool"},
                        {"name": "card_age_days", "type": "int", "min": 0},
                        {
                            "name": "distance_km",
                            "type": "float",
                            "min": 0,
                            "nullable": True,
                            "maxNullFraction": 0.1,
                        },
                        {"name": "txn_last_hour", "type": "int", "min": 0},
                    ],
                    "label": {"name": "label", "allowedValues": ["0", "1"], "minClassFraction": 0.005},
                },
            },
            "features": {"transforms": FRAUD_TRANSFORMS},
            "training": {
                "model": {"architecture": "mlp", "hiddenLayers": [32, 16]},
                "hyperparameters": {"epochs": 4, "batchSize": 128, "learningRate": 0.01},
            },
            "evaluation": {"metric": "rocAuc", "threshold": 0.75},
        }
    elif dataset == "digits":
        raw = {
            "data": {
                "source": {"uri": "builtin://digits", "format": "builtin"},
                "contract": {
                    "minRows": 1000,
                    "columns": [{"name": "image", "type": "image", "min": 0, "max": 16}],
                    "label": {"name": "label", "minClassFraction": 0.05},
                },
            },
            "training": {
                "model": {"architecture": "cnn"},
                "hyperparameters": {"epochs": 10, "batchSize": 64, "learningRate": 0.005},
            },
            "evaluation": {"metric": "accuracy", "threshold": 0.9},
        }
    else:
        raise ValueError(f"quick_config: dataset must be 'fraud' or 'digits', got {dataset!r}")
    raw.update(
        {
            "pipeline": pipeline,
            "run": run,
            "registry": {"uri": registry_uri, "modelName": model_name or dataset},
        }
    )
    return RunConfig.model_validate(raw)


def load_config(path: str) -> RunConfig:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        raw = json.loads(text)
    except ValueError:
        import yaml

        raw = yaml.safe_load(text)
    return RunConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.runtime.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="run.json (a RunConfig), or - for stdin")
    parser.add_argument(
        "--result", help="write the outcome (registered version, metrics or the validation report) here"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    def write_result(obj: dict[str, Any]) -> None:
        if args.result:
            Path(args.result).write_text(json.dumps(_finite(obj), indent=2))

    try:
        config = load_config(args.config)
    except Exception as e:
        print(f"invalid run config {args.config}: {e}", file=sys.stderr)
        write_result({"outcome": "InvalidConfig", "message": str(e)})
        return EXIT_ERROR
    try:
        ensure_ray()
        result = run(config)
    except DataValidationError as e:
        print(str(e), file=sys.stderr)
        write_result({"outcome": "DataValidationFailed", "message": str(e), "report": e.report.to_json()})
        return EXIT_INVALID_DATA
    except Exception as e:
        log.exception("training run failed")
        write_result({"outcome": "Failed", "message": f"{type(e).__name__}: {e}"})
        return EXIT_ERROR
    write_result(result.to_json())
    print(json.dumps(_finite(result.to_json())))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
