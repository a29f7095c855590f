"""The streaming data path end to end (real Ray Data, Ray Train and torch; the registry on local disk):
a source over the in-memory limit (lowered here, so the sets stay small) is split by a hash of the row,
fitted by streamed aggregations and trained from shards, into the same package format the predictor
serves. Tabular Parquet in several files, and an image folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _training_support import start_local_ray

from conveyor.runtime.package.registry import open_package
from conveyor.runtime.spec import DataSource
from conveyor.runtime.training import data as data_mod
from conveyor.runtime.training import streaming
from conveyor.runtime.training.evaluate import softmax
from conveyor.runtime.training.run import train_and_register
from conveyor.runtime.training.samples import quick_config

FEATURES = ["amount", "merchant", "hour", "foreign", "card_age_days", "distance_km", "txn_last_hour"]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    yield start_local_ray(num_cpus=2)


@pytest.mark.slow
def test_a_source_over_the_limit_streams_and_serves_like_a_small_one(
    ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_IN_MEMORY_MAX_ROWS", "1000")
    frame = data_mod.fraud_frame(rows=6000, seed=7)
    (tmp_path / "tx").mkdir()
    for i, part in enumerate(np.array_split(frame, 4)):
        part.to_parquet(tmp_path / "tx" / f"part-{i}.parquet")
    config = quick_config("fraud", str(tmp_path / "registry"), pipeline="streamed")
    config.data.source = DataSource(uri=str(tmp_path / "tx"), format="parquet")
    config.training.hyperparameters.epochs = 3
    pkg = open_package(train_and_register(config))
    m = pkg.metrics

    # The streamed path ran: its split is the row's hash, every row in exactly one split.
    assert pkg.profile["streamed"]["split"] == "hash of the row"
    codes, _ = streaming.SplitRule(42, 0.2, 0.15).codes_and_priority(frame)
    assert [m["trainSamples"], m["validationSamples"], m["testSamples"]] == np.bincount(codes).tolist()
    assert pkg.profile["rows"] == m["trainSamples"] and pkg.profile["features"]["amount"]["count"] == m["trainSamples"]
    # Each epoch trained on the whole training split and was scored on the (streamed) validation split.
    assert all(h["samples"] == m["trainSamples"] and "validationLoss" in h for h in m["history"])
    assert m["rocAuc"] >= 0.75, m

    # The package serves the held-out rows (recomputed from the rule alone) to the metrics it recorded.
    import torch
    from sklearn.metrics import roc_auc_score

    test = frame[codes == streaming.TEST]
    x = pkg.transforms.apply(test[FEATURES].to_dict("records"))
    with torch.no_grad():
        logits = pkg.load_model()(torch.from_numpy(x)).numpy()
    assert roc_auc_score(test["label"], softmax(logits)[:, 1]) == pytest.approx(m["rocAuc"], abs=1e-5)
    # Fitted on the training split only: its mean, not the whole set's.
    standardize = next(s for s in pkg.transforms.steps if s.type == "standardize" and s.column == "card_age_days")
    train = frame[codes == streaming.TRAIN]
    assert standardize.params["mean"] == pytest.approx(train["card_age_days"].mean())


@pytest.mark.slow
def test_an_image_folder_streams_decoded_batch_by_batch(
    ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    monkeypatch.setenv("CONVEYOR_IN_MEMORY_MAX_ROWS", "10")
    digits = data_mod.digits_frame()
    for cls in (0, 1, 7):
        (tmp_path / "images" / str(cls)).mkdir(parents=True)
        for i, img in enumerate(digits[digits["label"] == cls]["image"].iloc[:40]):
            Image.fromarray((img[0] * 255 / 16).astype(np.uint8), mode="L").save(
                tmp_path / "images" / str(cls) / f"{i}.png"
            )
    config = quick_config("digits", str(tmp_path / "registry"), pipeline="streamed-images")
    config.data.source = DataSource(uri=str(tmp_path / "images"), format="imagefolder")
    config.data.contract.min_rows = 100
    config.data.contract.columns[0].max = 255
    config.training.hyperparameters.epochs = 2
    config.training.hyperparameters.batch_size = 16
    pkg = open_package(train_and_register(config))
    m = pkg.metrics

    assert pkg.schema["kind"] == "image" and pkg.schema["classes"] == ["0", "1", "7"]
    assert pkg.transforms.input_shape == [1, 8, 8] and pkg.transforms.scale == 255.0
    assert m["trainSamples"] + m["validationSamples"] + m["testSamples"] == 120
    assert set(pkg.profile["imageStats"]) == {"mean", "std", "brightness"}
    # The per-channel normalization was fitted on the decoded training images: recomputed here.
    images = data_mod.load_dataset(config.data.source).to_pandas()
    codes, _ = streaming.SplitRule(42, 0.2, 0.15).codes_and_priority(images)
    train = np.stack(images["image"][codes == streaming.TRAIN].to_numpy()).astype(np.float64) / 255.0
    assert pkg.transforms.mean[0] == pytest.approx(train.mean(), rel=1e-6)
    assert pkg.transforms.std[0] == pytest.approx(train.std(), rel=1e-5)
    assert pkg.profile["imageStats"]["mean"]["count"] == m["trainSamples"]
    # The package, given the held-out images as a client sends them, reproduces the recorded accuracy.
    import torch

    test = images[codes == streaming.TEST]
    x = pkg.transforms.apply_images(np.stack(test["image"].to_numpy()))
    with torch.no_grad():
        predicted = pkg.load_model()(torch.from_numpy(x)).numpy().argmax(axis=1)
    truth = np.array([pkg.schema["classes"].index(str(v)) for v in test["label"]])
    assert float((predicted == truth).mean()) == pytest.approx(m["accuracy"])
