"""The Ray Train part of a run: ``fit`` starts a TorchTrainer on the prepared data, and
``train_loop_per_worker`` runs on every worker (DDP when there are several), reporting metrics and a
checkpoint a retried job resumes from.

Defaults that make the first model good without tuning: a class rarer than RARE_CLASS_FRACTION gets
"balanced" loss weights (n / (classes * count), as scikit-learn's ``class_weight="balanced"``); every
epoch is scored on the validation split, the best epoch's weights are kept, and training stops once the
validation loss has not improved for ``earlyStoppingPatience`` epochs (so ``epochs`` is a maximum)."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training.prepare import PreparedData

log = logging.getLogger("conveyor.train")

# Below this share of the training rows a class counts as rare and the loss is class-weighted.
RARE_CLASS_FRACTION = 0.2


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
    class_weights: Any = None,
) -> dict[str, float]:
    """One pass over ``batches`` ((x, y) tensors): the step both Ray Train and the plain loop run."""
    import torch

    loss_fn = _loss_fn(classification, class_weights, device)
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


def _loss_fn(classification: bool, class_weights: Any, device: Any) -> Any:
    import torch

    if not classification:
        return torch.nn.MSELoss()
    weight = (
        None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    )
    return torch.nn.CrossEntropyLoss(weight=weight)


def class_weights_for(y: np.ndarray, classes: int) -> list[float] | None:
    """Balanced loss weights when some class is rare in ``y`` (see the module docstring), else None."""
    return class_weights_from_counts(np.bincount(np.asarray(y, dtype=np.int64), minlength=classes))


def class_weights_from_counts(counts: np.ndarray) -> list[float] | None:
    """``class_weights_for`` from the rows per class (what a streamed split knows)."""
    counts = np.asarray(counts, dtype=np.float64)
    n, classes = float(counts.sum()), len(counts)
    if n == 0 or counts.min() / n >= RARE_CLASS_FRACTION:
        return None
    return (n / (classes * np.maximum(counts, 1.0))).tolist()


def validation_loss(
    model: Any, x: Any, y: Any, loss_fn: Any, classification: bool, batch_size: int = 4096
) -> float:
    """The mean loss over the validation split (eval mode, no gradients)."""
    import torch

    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            out = raw(xb).float()
            total += float(loss_fn(out, yb if classification else yb.view(-1, 1))) * len(xb)
    return total / max(len(x), 1)


def shard_validation_loss(
    model: Any, shard: Any, loss_fn: Any, classification: bool, world: int, device: Any, batch_size: int = 4096
) -> float:
    """The mean loss over the validation split when it is streamed: each worker scores its own shard, the
    sums are added across workers, so every rank reaches the same figure."""
    import torch

    raw = model.module if hasattr(model, "module") else model
    raw.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            xb, yb = batch["x"], batch["y"]
            out = raw(xb).float()
            total[0] += float(loss_fn(out, yb if classification else yb.view(-1, 1))) * len(xb)
            total[1] += len(xb)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


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

    from conveyor.runtime.training.models import build_model

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
        module=cfg["module"],
        schema=cfg["schema"],
    )
    start_epoch, history, opt_state, finished = 0, [], None, False
    best: dict[str, Any] | None = None  # the best epoch on the validation split: its weights and loss
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt_state = state["optimizer"]
        start_epoch = state["epoch"] + 1
        history = state["history"]
        history[-1]["resumedHere"] = True
        best, finished = state.get("best"), bool(state.get("finished"))
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    amp = bool(cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    shard = ray.train.get_dataset_shard("train")
    classification = cfg["task"] == "classification"
    val = None
    val_shard = ray.train.get_dataset_shard("validation") if cfg.get("validationShard") else None
    if cfg["validation"] is not None:
        xv, yv = ray.get(cfg["validation"])
        val = (
            torch.tensor(xv, device=device),
            torch.tensor(yv, device=device),
        )  # copies: ray.get is read-only
    val_loss_fn = _loss_fn(classification, cfg["classWeights"], device)

    # A shard that fits in memory is streamed from Ray Data once and then kept: later epochs shuffle it
    # in memory, as a plain PyTorch loop would, instead of paying Ray Data's per-batch cost again.
    cached: tuple[Any, Any] | None = None
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, cfg["epochs"] if not finished else start_epoch):
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
            class_weights=cfg["classWeights"],
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
        stop = False
        if val is not None or val_shard is not None:
            # Every rank scores the same weights on the same split, so all reach the same decision.
            if val is not None:
                loss = validation_loss(model, *val, val_loss_fn, classification)
            else:
                loss = shard_validation_loss(model, val_shard, val_loss_fn, classification, world, device)
            metrics["validationLoss"] = loss
            if best is None or loss < best["loss"] - 1e-6:
                raw = model.module if hasattr(model, "module") else model
                best = {"epoch": epoch + 1, "loss": loss, "model": _cpu_state(raw)}
            stop = cfg["patience"] > 0 and epoch + 1 - best["epoch"] >= cfg["patience"]
        history.append(metrics)
        last_epoch = stop or epoch == cfg["epochs"] - 1
        due = time.monotonic() - last_checkpoint >= cfg["checkpointIntervalS"]
        _report(
            model,
            optimizer,
            epoch,
            history,
            rank,
            checkpoint=last_epoch or due,
            best=best,
            finished=last_epoch,
        )
        if last_epoch or due:
            last_checkpoint = time.monotonic()
        if stop:
            break
    if checkpoint is not None and (finished or start_epoch >= cfg["epochs"]):
        # The previous attempt had finished: report its state again, marked as resumed.
        _report(model, optimizer, start_epoch - 1, history, rank, best=best, finished=True)


def _cpu_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _report(
    model: Any,
    optimizer: Any,
    epoch: int,
    history: list[dict[str, Any]],
    rank: int,
    *,
    checkpoint: bool = True,
    best: dict[str, Any] | None = None,
    finished: bool = False,
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
                "best": best,
                "finished": finished,
            }
            torch.save(state, Path(d) / "state.pt")
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(history[-1], checkpoint=ckpt)


def _parse_cpu(quantity: str) -> float:
    from kubernetes.utils import parse_quantity  # here, not at the top: Ray workers import this module

    try:
        cpu = float(parse_quantity(str(quantity).strip()))
    except ValueError as e:
        raise ValueError(
            f"training.workerGroups[0].cpu {quantity!r} is not a CPU quantity (e.g. 2, 500m)"
        ) from e
    if cpu <= 0:
        raise ValueError(f"training.workerGroups[0].cpu {quantity!r} must be positive")
    return cpu


def run_name(config: RunConfig) -> str:
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


def fit(config: RunConfig, prepared: PreparedData) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Train with Ray Train; returns the trained torch model (CPU), the epoch history and run facts."""
    import ray
    import ray.data
    import ray.train
    import torch
    from ray.data.dataset import MaterializedDataset
    from ray.train.torch import TorchTrainer

    from conveyor.runtime.training.models import build_model

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
    # Regression trains on standardized targets; the exported model maps back to the label's units.
    y_mean, y_std = prepared.target_stats() if prepared.classes is None else (0.0, 1.0)
    target_scale = (y_mean, y_std) if prepared.classes is None else None
    validation, datasets = None, {}
    if prepared.streamed:
        # Streamed splits: each worker reads its own shard of both (materialized in the object store
        # when they fit, see PreparedData.dataset); nothing passes through the driver.
        val_ds = prepared.dataset("validation", target_scale)
        if val_ds is not None:
            datasets["validation"] = val_ds
    elif prepared.x_val is not None and prepared.y_val is not None:
        y_val = prepared.y_val if prepared.classes is not None else ((prepared.y_val - y_mean) / y_std)
        validation = ray.put((prepared.x_val, y_val.astype(np.float32 if prepared.classes is None else np.int64)))
    class_weights = class_weights_from_counts(prepared.train_class_counts()) if prepared.classes else None
    train_ds = prepared.dataset("train", target_scale)
    datasets["train"] = train_ds
    # Leave room for Ray Data's tasks (a split read from the source while training needs a CPU of its
    # own); a worker's threads follow its CPU share.
    spare = 0.0 if isinstance(train_ds, MaterializedDataset) else 1.0
    cpu_per_worker = max(0.25, min(wanted_cpu, (cluster.get("CPU", 1.0) - spare) / tr.num_workers))
    threads = max(1, math.floor(cpu_per_worker))
    bytes_per_row = int(np.prod(prepared.input_shape)) * 4 + 8
    shard_bytes = prepared.rows("train") * bytes_per_row / tr.num_workers
    cache_limit = float(os.environ.get("CONVEYOR_SHARD_CACHE_BYTES", str(2**30)))
    loop_config = {
        "architecture": tr.model.architecture,
        "hiddenLayers": list(tr.model.hidden_layers),
        "dropout": tr.model.dropout,
        "pretrained": tr.model.pretrained,
        "module": tr.model.module,
        "schema": prepared.schema,
        "inputShape": prepared.input_shape,
        "outputs": prepared.outputs,
        "task": prepared.task,
        "epochs": hp.epochs,
        "batchSize": hp.batch_size,
        "learningRate": hp.learning_rate,
        "weightDecay": hp.weight_decay,
        "optimizer": hp.optimizer,
        "seed": hp.seed,
        "patience": hp.early_stopping_patience,
        "validation": validation,
        "validationShard": "validation" in datasets,
        "classWeights": class_weights,
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
    name = run_name(config)
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
        datasets=datasets,
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
        module=tr.model.module,
        schema=prepared.schema,
    )
    best = state.get("best")
    model.load_state_dict(best["model"] if best else state["model"])
    if prepared.classes is None:
        from conveyor.runtime.training.models import TargetScale

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
        "bestEpoch": best["epoch"] if best else None,
        "stoppedEarly": len(history) < hp.epochs,
        "classWeights": class_weights,
    }
    return model, history, facts
