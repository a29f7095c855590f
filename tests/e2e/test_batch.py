"""Batch inference on the local stack: a BatchPrediction becomes a real RayJob run (the local executor runs
`python -m conveyor.runtime.batch` on local Ray) scoring a data set the training never saw; its answers
are the online predictor's for the same rows, a row with a bad value lands in the rejects with the
reason, and a re-run writes a new output without touching the old one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _serving_support import ServerProcess, post_json, rows_of
from _training_support import get_object, wait_with_logs
from test_loop import loop  # noqa: F401 - the operator and executor fixture

from conveyor.runtime.training.data import fraud_frame

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BAD_ROW = 3


def unseen_input(path: Path) -> pd.DataFrame:
    """Transactions from another seed than training's (7), keyed by txn_id; one row's hour is 'noon'."""
    frame = fraud_frame(rows=400, seed=1234, fraud_rate=0.1).drop(columns=["label"])
    frame.insert(0, "txn_id", [f"t{i:04d}" for i in range(len(frame))])
    frame["hour"] = frame["hour"].astype(str)  # a text column, as a CSV export would give it
    frame.loc[BAD_ROW, "hour"] = "noon"
    frame.to_parquet(path)
    return frame


def batch(registry: str, input_path: Path, output: Path) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "BatchPrediction",
        "metadata": {"name": "scores"},
        "spec": {
            "model": {"registryUri": registry, "name": "fraud", "version": "v1"},
            "input": {"uri": str(input_path), "format": "parquet", "idColumns": ["txn_id"]},
            "output": {"uri": f"file://{output}"},
            "batchSize": 128,
        },
    }


def run_done(kubectl, namespace: str, n: int):
    def probe():
        bp = get_object(kubectl, namespace, "batchprediction/scores")
        runs = bp.get("status", {}).get("runs") or []
        run = next((r for r in runs if r["run"] == n), None)
        return run if run and run["outcome"] in ("Succeeded", "Failed") else None

    return probe


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def test_batch_scores_like_the_predictor_rejects_bad_rows_and_reruns_safely(loop, kubectl, fraud_versions, tmp_path) -> None:  # noqa: F811
    namespace, _, logs = loop
    registry, (package_uri, _) = fraud_versions  # the session's real fraud packages (tests/e2e/conftest.py)
    frame = unseen_input(tmp_path / "input.parquet")
    output = tmp_path / "scores"
    kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(batch(registry, tmp_path / "input.parquet", output)))

    run = wait_with_logs("batch run 1 to end", 600, run_done(kubectl, namespace, 1), logs)
    assert run["outcome"] == "Succeeded", json.dumps(run, indent=1)
    assert (run["rowsScored"], run["rowsRejected"], run["modelVersion"]) == (len(frame) - 1, 1, "v1")
    assert run["output"] == f"file://{output}/run-1" and run["durationSeconds"] > 0
    assert run["drift"]["method"] == "psi" and run["drift"]["features"]
    rayjob = get_object(kubectl, namespace, f"rayjob/{run['rayJob']}")
    assert "conveyor.runtime.batch" in rayjob["spec"]["entrypoint"]
    assert (output / "run-1" / "_SUCCESS").exists() and not list((output / "_staging").iterdir())

    predictions = pd.read_parquet(output / "run-1" / "predictions").set_index("txn_id").sort_index()
    assert set(predictions.columns) == {"prediction", "probabilities", "model_version"}
    assert (predictions["model_version"] == "v1").all()
    rejects = pd.read_parquet(output / "run-1" / "rejects")
    assert rejects["txn_id"].tolist() == [frame["txn_id"][BAD_ROW]]
    assert "hour" in rejects["reason"][0] and "noon" in rejects["reason"][0]

    # The online predictor answers the same rows the same way (the same transform, forward and decision).
    good = frame.drop(index=BAD_ROW).set_index("txn_id").sort_index()
    good["hour"] = good["hour"].astype(int)
    with ServerProcess(package_uri, "fraud", tmp_path) as server:
        code, answer = post_json(f"{server.url}/v1/models/fraud:predict", {"instances": rows_of(good)})
    assert code == 200, answer
    online = answer["predictions"]
    assert [p["label"] for p in online] == predictions["prediction"].tolist()
    classes = list(online[0]["probabilities"])
    online_probs = np.array([[p["probabilities"][c] for c in classes] for p in online])
    np.testing.assert_allclose(np.stack(predictions["probabilities"].to_numpy()), online_probs, atol=1e-6)

    # A re-run writes run-2 and leaves run-1 as it was.
    before = folder_digest(output / "run-1")
    kubectl("annotate", "-n", namespace, "batchprediction/scores", "conveyor.dev/rerun=again", "--overwrite")
    run2 = wait_with_logs("batch run 2 to end", 600, run_done(kubectl, namespace, 2), logs)
    assert run2["outcome"] == "Succeeded" and run2["trigger"] == "Rerun", json.dumps(run2, indent=1)
    assert (output / "run-2" / "_SUCCESS").exists()
    assert folder_digest(output / "run-1") == before
    again = pd.read_parquet(output / "run-2" / "predictions").set_index("txn_id").sort_index()
    assert again["prediction"].tolist() == predictions["prediction"].tolist()
    status = get_object(kubectl, namespace, "batchprediction/scores")["status"]
    assert status["lastOutput"] == f"file://{output}/run-2" and status["phase"] == "Succeeded"
