"""Ingest: Parquet and CSV from any fsspec URI, image folders (one folder per class), and built-in sets.

Built-ins need no download, for samples and tests:

- ``builtin://digits``: scikit-learn's bundled handwritten digits (real data: 1,797 8x8 grey images,
  pixels 0..16, 10 classes). Columns ``image`` ([1, 8, 8] float32) and ``label`` (0..9).
- ``builtin://fraud?rows=20000&seed=7&fraudRate=0.02``: seeded synthetic card transactions with a
  skewed fraud label. Columns ``amount`` (float), ``merchant`` (string), ``hour`` (int 0..23),
  ``foreign`` (bool), ``card_age_days`` (int), ``distance_km`` (float, ~3% null: missing geolocation),
  ``txn_last_hour`` (int) and ``label`` (1 = fraud).

Everything returns a Ray Dataset; ``content_sha256`` is the lineage hash of what was read.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from conveyor.runtime.spec import DataSource

BUILTINS = ("digits", "fraud")
MERCHANTS = ("grocery", "restaurant", "fuel", "online", "travel", "electronics")
IMAGE_COLUMN = "image"


def parse_builtin(uri: str) -> tuple[str, dict[str, str]]:
    parsed = urlparse(uri)
    if parsed.scheme != "builtin":
        raise ValueError(
            f"data.source.uri {uri!r}: a builtin source looks like builtin://digits or builtin://fraud"
        )
    name = parsed.netloc or parsed.path.lstrip("/")
    if name not in BUILTINS:
        raise ValueError(f"data.source.uri {uri!r}: unknown builtin {name!r}; choose one of {list(BUILTINS)}")
    params = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    return name, params


def _int_param(params: dict[str, str], key: str, default: int, uri: str) -> int:
    try:
        return int(params.get(key, default))
    except ValueError as e:
        raise ValueError(f"data.source.uri {uri!r}: {key} must be a whole number, got {params[key]!r}") from e


def digits_frame() -> Any:
    import pandas as pd
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32).reshape(-1, 1, 8, 8)
    return pd.DataFrame({IMAGE_COLUMN: list(images), "label": bunch.target.astype(np.int64)})


def fraud_frame(rows: int = 20000, seed: int = 7, fraud_rate: float = 0.02) -> Any:
    """Synthetic card transactions: fraud is likelier for large, foreign, night-time, online/electronics
    purchases on new cards with many recent transactions; the intercept is solved for ``fraud_rate``."""
    import pandas as pd

    if rows < 1:
        raise ValueError("builtin://fraud: rows must be at least 1")
    if not 0.0 < fraud_rate < 0.5:
        raise ValueError("builtin://fraud: fraudRate must be within (0, 0.5)")
    rng = np.random.default_rng(seed)
    merchant = rng.choice(MERCHANTS, size=rows, p=[0.3, 0.2, 0.15, 0.2, 0.08, 0.07])
    log_mean = (
        pd.Series(merchant)
        .map(
            {"grocery": 3.4, "restaurant": 3.2, "fuel": 3.7, "online": 3.9, "travel": 5.3, "electronics": 5.0}
        )
        .to_numpy()
    )
    amount = np.round(rng.lognormal(log_mean, 0.8), 2)
    hourly = np.array([1, 1, 1, 1, 1, 2, 3, 5, 6, 6, 7, 8, 9, 8, 7, 7, 8, 9, 9, 8, 6, 4, 3, 2], dtype=float)
    hour = rng.choice(24, size=rows, p=hourly / hourly.sum())
    foreign = rng.random(rows) < 0.07
    card_age = np.clip(rng.gamma(1.2, 500, rows), 1, 3650).astype(np.int64)
    distance = np.round(rng.lognormal(2.0, 1.2, rows), 1)
    txn_last_hour = rng.poisson(0.3, rows)

    score = (
        1.1 * (np.log(amount) - 4.0)
        + 1.5 * foreign
        + 1.2 * (hour < 6)
        + 1.0 * np.isin(merchant, ("online", "electronics"))
        + 1.2 * (card_age < 60)
        + 0.7 * txn_last_hour
        + 0.4 * (np.log1p(distance) - 2.0)
    )
    # Solve the intercept so the expected fraud rate is what was asked (bisection on the mean).
    lo, hi = -20.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(score + mid)))).mean() > fraud_rate:
            hi = mid
        else:
            lo = mid
    label = (rng.random(rows) < 1 / (1 + np.exp(-(score + lo)))).astype(np.int64)

    distance_with_gaps = distance.astype(np.float64)
    distance_with_gaps[rng.random(rows) < 0.03] = np.nan
    return pd.DataFrame(
        {
            "amount": amount,
            "merchant": merchant.astype(object),
            "hour": hour.astype(np.int64),
            "foreign": foreign,
            "card_age_days": card_age,
            "distance_km": distance_with_gaps,
            "txn_last_hour": txn_last_hour.astype(np.int64),
            "label": label,
        }
    )


def with_feedback(ds: Any, registry_uri: str, model_name: str, label: str) -> tuple[Any, int]:
    """``ds`` followed by the model's feedback dataset (each labelled row's inputs and its true label), cast
    to the source's column types (read from its first rows: the source is not collected); and how many
    rows were added. The caller validates the result."""
    import pandas as pd
    import ray.data

    from conveyor.runtime.package.registry import Registry

    rows = Registry(registry_uri, model_name).read_feedback()
    if not rows:
        return ds, 0
    head = ds.take_batch(1024, batch_format="pandas")
    extra = pd.DataFrame([{**(r.get("inputs") or {}), label: r.get("label")} for r in rows])
    extra = extra.reindex(columns=head.columns)
    for column, dtype in head.dtypes.items():
        with contextlib.suppress(TypeError, ValueError):  # e.g. nulls in an int column: the contract reports them
            extra[column] = extra[column].astype(dtype)
    return ds.union(ray.data.from_pandas(extra)), len(extra)


def builtin_frame(uri: str) -> Any:
    name, params = parse_builtin(uri)
    if name == "digits":
        return digits_frame()
    try:
        fraud_rate = float(params.get("fraudRate", 0.02))
    except ValueError as e:
        raise ValueError(f"data.source.uri {uri!r}: fraudRate must be a number") from e
    return fraud_frame(
        rows=_int_param(params, "rows", 20000, uri),
        seed=_int_param(params, "seed", 7, uri),
        fraud_rate=fraud_rate,
    )


def _arrow_fs_and_path(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem over fsspec for ``uri`` (local paths stay plain)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return None, path
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs)), path


def _check_exists(uri: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"data.source.uri {uri!r}: nothing exists at {path!r}")


def load_dataset(source: DataSource, *, label: str = "label") -> Any:
    """The source as a Ray Dataset (images as ``image`` [C, H, W] float32 plus ``label``)."""
    import ray.data

    uri = source.uri
    if source.format == "builtin" or uri.startswith("builtin://"):
        return ray.data.from_pandas(builtin_frame(uri))
    _check_exists(uri)
    filesystem, path = _arrow_fs_and_path(uri)
    if source.format == "parquet":
        return ray.data.read_parquet(path, filesystem=filesystem)
    if source.format == "csv":
        return ray.data.read_csv(path, filesystem=filesystem)
    if source.format == "imagefolder":
        return _read_image_folder(path, filesystem, label)
    raise ValueError(f"data.source.format {source.format!r} is not supported")


def _read_image_folder(path: str, filesystem: Any, label: str) -> Any:
    import ray.data
    from ray.data.datasource.partitioning import Partitioning

    first = _first_image(path, filesystem)
    from PIL import Image

    with Image.open(first) as img:
        mode = "L" if img.mode in ("L", "1", "I;16", "I", "F") else "RGB"
        size = (img.height, img.width)
    ds = ray.data.read_images(
        path,
        filesystem=filesystem,
        mode=mode,
        size=size,  # images are resized to the first one's size so they stack
        partitioning=Partitioning("dir", field_names=[label], base_dir=path, filesystem=filesystem),
    )

    def to_chw(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch[IMAGE_COLUMN], dtype=np.float32)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return {IMAGE_COLUMN: images, label: np.asarray(batch[label])}

    return ds.map_batches(to_chw, batch_format="numpy")


def _first_image(path: str, filesystem: Any) -> Any:
    import fsspec

    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
    fs, root = fsspec.core.url_to_fs(path) if filesystem is None else (None, path)
    if fs is None:
        raise ValueError("image folders are supported on local paths and fsspec filesystems")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(exts))
    if not files:
        raise ValueError(f"data.source.uri {path!r}: no images (png/jpg/bmp/gif/tif) in class folders")
    return fs.open(files[0], "rb")


def content_sha256(source: DataSource, frame: Any = None) -> str:
    """sha256 of the data: the bytes of every file under the URI, or of the generated frame (builtins)."""
    h = hashlib.sha256()
    if source.format == "builtin" or source.uri.startswith("builtin://"):
        import pandas as pd

        frame = builtin_frame(source.uri) if frame is None else frame
        for col in frame.columns:
            h.update(col.encode())
            values = frame[col]
            if values.dtype == object and len(values) and isinstance(values.iloc[0], np.ndarray):
                h.update(np.ascontiguousarray(np.stack(values.to_numpy())).tobytes())
            else:
                h.update(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
        return h.hexdigest()
    import fsspec

    fs, path = fsspec.core.url_to_fs(source.uri)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for f in files:
        h.update(f[len(path) :].encode())
        with fs.open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
