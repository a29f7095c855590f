"""make demo's story, on a running local stack (hack/demo.sh brings it up: control plane, the operator with
--prometheus-url, the executor with its router and a faults file, the real Prometheus).

    python -m conveyor_devstack.demo --kubeconfig K --namespace NS --registry URI --faults FILE \
        --prometheus-url URL --report report.html --logs DIR

1. the pipeline trains v1 on Ray (a first cut on a sample of the data), passes the gate, v1 serves;
2. v2 (the full data) goes through every canary step, each judged by Prometheus, is promoted, and beats
v1 on the gate metric (the demo fails if it does not);  3. v3, with a planted fault (503 on half its
requests), is rolled back at its first step while callers keep getting v2;  4. the traffic shifts:
Drifted turns True, a Drift-triggered run trains v4 with the feedback collected, and v4 goes through the
canary;  5. a BatchPrediction scores a table of unseen transactions (three unreadable) with the stable
version: rows scored and rejected, a few output rows shown. Load runs throughout (one transaction a
request, its ground truth sent back as feedback). Every line printed comes from the objects' status and events, never from log text.
Exit status 1 names the step that did not happen in time and the log paths.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from conveyor_devstack import faults, report

GROUP, VERSION = "conveyor.dev", "v1alpha1"
NAME = "fraud"
RATE = 10.0  # requests a second, one transaction each
SPINNER = "|/-\\"
BATCH_ROWS = 20000
BATCH_BAD_ROWS = (17, 4242, 15001)
HEADLINE_METRICS = {"rocAuc", "prAuc", "recall", "accuracy", "rmse", "mae"}  # the run's line; the report has all


class StepFailed(Exception):
    pass


class Traffic:
    """A bounded, paced load of card transactions (shifted on demand); half their ground truth sent back."""

    def __init__(self, rate: float = RATE) -> None:
        from conveyor.runtime.training.data import fraud_frame

        frame = fraud_frame(rows=4000, seed=99)
        self.labels = frame.pop("label").tolist()
        self.rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                     for r in frame.to_dict(orient="records")]
        self.rate, self.url, self.shifted = rate, "", False
        self.answers: Counter[tuple[str | None, int]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _one(self, i: int) -> None:
        row, label = dict(self.rows[i % len(self.rows)]), self.labels[i % len(self.rows)]
        if self.shifted:  # big, far-away purchases: the inputs the model was not trained on
            row["amount"] = row["amount"] * 25
            row["distance_km"] = None if row["distance_km"] is None else row["distance_km"] * 40
        rid = uuid.uuid4().hex
        status, version = _post(f"{self.url}:predict", {"id": rid, "instances": [row]})
        with self._lock:
            self.answers[(version, status)] += 1
        if status == 200 and i % 2 == 0:
            _post(self.url.removesuffix(f"/{NAME}") + f"/{NAME}/feedback", {"id": rid, "label": int(label)})

    def _run(self) -> None:
        start, n = time.monotonic(), 0
        while not self._stop.wait(max(0.0, start + n / self.rate - time.monotonic())):
            threading.Thread(target=self._one, args=(n,), daemon=True).start()
            n += 1

    def start(self, url: str) -> None:
        self.url = url
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> Counter[tuple[str | None, int]]:
        with self._lock:
            out, self.answers = self.answers, Counter()
        return out


def _post(url: str, body: dict[str, Any]) -> tuple[int, str | None]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()).get("model_version") or resp.headers.get("x-conveyor-version")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-conveyor-version")
    except (OSError, ValueError):
        return 0, None


class Story:
    def __init__(self, args: argparse.Namespace) -> None:
        from kubernetes import client, config

        config.load_kube_config(args.kubeconfig)
        self.api, self.core = client.CustomObjectsApi(), client.CoreV1Api()
        self.ns, self.args = args.namespace, args
        self.t0 = time.time()
        self.lines: list[str] = []
        self.markers: list[tuple[float, str]] = []
        self.drift: dict[str, list[tuple[float, float]]] = {}
        self.seen_events: set[str] = set()
        self.seen_runs: dict[int, str] = {}
        self.seen_analyses: set[str] = set()
        self.seen_rejected: set[str] = set()
        self.last: dict[str, Any] = {}
        self.run_finished: dict[int, float] = {}
        self.traffic = Traffic()
        self.reruns = 3
        self.batch_rows: dict[str, Any] = {}
        self._spin = 0

    # ------------------------------------------------------------------ objects

    def get(self, plural: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, NAME)

    def patch(self, plural: str, body: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural, NAME, body)

    def say(self, line: str) -> None:
        elapsed = time.time() - self.t0
        text = f"[{int(elapsed) // 60:2d}m{int(elapsed) % 60:02d}s] {line}"
        self.lines.append(text)
        print(("\r\033[K" if sys.stdout.isatty() else "") + text, flush=True)

    def mark(self, what: str) -> None:
        self.markers.append((time.time() - self.t0, what))

    # ------------------------------------------------------------------ what happened, from status and events

    def observe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        mlp = self.get("mlpipelines").get("status") or {}
        mdep = self.get("modeldeployments").get("status") or {}
        self._runs(mlp)
        self._rollout(mdep)
        self._drift(mdep)
        self._events()
        return mlp, mdep

    def _runs(self, mlp: dict[str, Any]) -> None:
        for r in mlp.get("runs") or []:
            n, outcome = r["run"], r.get("outcome") or "Pending"
            if self.seen_runs.get(n) == outcome:
                continue
            if n not in self.seen_runs:
                self.say(f"run {n} started (trigger {r.get('trigger')}): RayJob {r.get('rayJob') or '-'}")
            if outcome not in ("Pending", "Running"):
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted((r.get("metrics") or {}).items())
                                    if k in HEADLINE_METRICS and isinstance(v, (int, float)))
                self.say(f"run {n} {outcome}{': ' + r['reason'] if r.get('reason') else ''}"
                         f"{'; ' + metrics if metrics else ''}"
                         f"{'; registered ' + r['modelVersion'] if r.get('modelVersion') else ''}"
                         f"{'; ' + _first_line(r.get('message'), 100) if outcome != 'Succeeded' and r.get('message') else ''}")
                self.run_finished[n] = time.time() - self.t0
                if outcome == "Failed" and r.get("reason") == "AppFailed" and self.reruns > 0:
                    # The job itself failed (on two busy cores, typically Ray's node start timing out):
                    # what a user does, ask for the run again.
                    self.reruns -= 1
                    self.api.patch_namespaced_custom_object(GROUP, VERSION, self.ns, "mlpipelines", NAME, {
                        "metadata": {"annotations": {"conveyor.dev/rerun": uuid.uuid4().hex[:8]}}})
                    self.say(f"run {n}'s job failed ({_first_line(r.get('message'))}): rerun requested (conveyor.dev/rerun)")
            self.seen_runs[n] = outcome

    def _rollout(self, s: dict[str, Any]) -> None:
        for a in s.get("analyses") or []:
            # The status keeps the last few analyses: each is known by its time, version and step.
            key = f"{a.get('time')}/{a.get('version')}/{a.get('step')}"
            if key in self.seen_analyses:
                continue
            self.seen_analyses.add(key)
            checks = ", ".join(f"{c['name']} {_fmt(c.get('candidate'))} (stable {_fmt(c.get('stable'))}) {c.get('verdict')}"
                               for c in a.get("checks") or [])
            self.say(f"canary {a.get('version')} at {a.get('weight')}%: analysis {a.get('verdict')}: {checks}")
        for key in ("stableVersion", "canaryVersion", "canaryWeight"):
            if s.get(key) != self.last.get(key):
                if key == "stableVersion" and s.get(key):
                    self.say(f"{s[key]} serves all traffic (stable)")
                    self.mark(f"{s[key]} stable")
                elif key == "canaryWeight" and s.get("canaryVersion") and s.get(key):
                    self.say(f"canary {s.get('canaryVersion')} takes {s[key]}% of the traffic")
                self.last[key] = s.get(key)
        for r in s.get("rejectedVersions") or []:
            if r["version"] not in self.seen_rejected:
                self.seen_rejected.add(r["version"])
                self.say(f"{r['version']} rolled back: {r.get('check')} {_fmt(r.get('value'))}: {r.get('message')}")
                self.mark(f"{r['version']} rolled back")
        drifted = _condition(s, "Drifted")
        if drifted.get("status") != self.last.get("Drifted"):
            self.last["Drifted"] = drifted.get("status")
            if drifted.get("status") in ("True", "False"):
                self.say(f"Drifted={drifted['status']}: {drifted.get('message')}")
                if drifted["status"] == "True":
                    self.mark("drift detected")

    def _drift(self, s: dict[str, Any]) -> None:
        d = s.get("drift") or {}
        if not d.get("time") or d.get("time") == self.last.get("drift_time"):
            return
        self.last["drift_time"] = d["time"]
        now = time.time() - self.t0
        for f in d.get("features") or []:
            self.drift.setdefault(f["name"], []).append((now, f["score"]))

    def _events(self) -> None:
        for e in self.core.list_namespaced_event(self.ns).items:
            if e.metadata.uid in self.seen_events:
                continue
            self.seen_events.add(e.metadata.uid)
            if e.reason in ("DriftDetected", "RetrainTriggered", "RolledBack", "Promoted", "GateFailed",
                            "DataValidated", "Trained", "Registered", "RunFailed"):
                self.say(f"event {e.involved_object.kind}/{e.involved_object.name} {e.reason}: {_first_line(e.message)}")

    # ------------------------------------------------------------------ waiting

    def wait(self, step: str, pred: Callable[[dict[str, Any], dict[str, Any]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            mlp, mdep = self.observe()
            if pred(mlp, mdep):
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{step}: not within {timeout:.0f}s (pipeline phase {mlp.get('phase')}, "
                                 f"deployment stable {mdep.get('stableVersion')} canary {mdep.get('canaryVersion')})")
            if sys.stdout.isatty():
                self._spin += 1
                print(f"\r\033[K{SPINNER[self._spin % 4]} {step} ({time.time() - self.t0:.0f}s)", end="", flush=True)
            time.sleep(1)

    def callers(self, what: str) -> Counter[tuple[str | None, int]]:
        seen = self.traffic.take()
        summary = ", ".join(f"{v or '?'} HTTP {c}: {n}" for (v, c), n in sorted(seen.items(), key=str))
        self.say(f"callers {what}: {summary or 'none'}")
        return seen

    # ------------------------------------------------------------------ the story

    def run(self) -> None:
        a = self.args
        docs = list(yaml.safe_load_all(Path(a.manifest).read_text().replace("REGISTRY", a.registry)))
        pod = json.loads(a.pod_settings)
        pipeline = next(d for d in docs if d["kind"] == "MLPipeline")
        sample_uri = pipeline["spec"]["data"]["source"]["uri"]  # v1's: a first cut on a sample
        full_uri = f"builtin://fraud?rows={a.rows}&seed=7"
        for d in docs:
            if pod:  # e.g. REGISTRY=s3: the pods name the credentials Secret
                (d["spec"]["training"] if d["kind"] == "MLPipeline" else d["spec"]["predictor"])["pod"] = pod
            plural = "mlpipelines" if d["kind"] == "MLPipeline" else "modeldeployments"
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, d)
        self.say(f"applied MLPipeline/{NAME} and ModelDeployment/{NAME} (registry {a.registry})")

        self.wait("1. run 1 trains v1 and v1 serves", lambda p, m: m.get("stableVersion") == "v1" and bool(m.get("url"))
                  and _condition(m, "Ready").get("status") == "True", 420)
        url = self.get("modeldeployments")["status"]["url"]
        self.traffic.start(f"{url}/v1/models/{NAME}")
        self.say(f"traffic: {RATE:.0f} transactions/s to {url}/v1/models/{NAME}:predict, ground truth sent for half")

        self.patch("mlpipelines", {"spec": {"data": {"source": {"uri": full_uri}}}})
        self.say(f"2. spec change: the full data ({a.rows:,} rows; v1 saw a sample, {_rows(sample_uri):,}): run 2 trains v2")
        self.wait("2. v2 promoted through every canary step", lambda p, m: m.get("stableVersion") == "v2", 420)
        self.callers("during v2's rollout")
        self.better()

        faults.plant(Path(a.faults), faults.fault_key(self.ns, NAME, "v3"), error_rate=0.5)
        self.patch("mlpipelines", {"spec": {"training": {"hyperparameters": {"seed": 3}}}})
        self.say("3. v3 will carry a planted fault (503 on half its requests); run 3 trains it")
        self.wait("3. v3 rolled back", lambda p, m: any(r["version"] == "v3" for r in m.get("rejectedVersions") or [])
                  and not m.get("canaryVersion"), 420)
        seen = self.callers("during v3's canary")
        if any(v == "v2" and not 200 <= c < 300 for v, c in seen):
            raise StepFailed("3. v2's callers saw failures during v3's canary")

        self.traffic.shifted = True
        shifted_at = time.time()
        self.say("4. the traffic shifts: purchases 25x bigger, 40x farther away")
        # Drifted=True set since the shift (a True from before it, on in-distribution noise, does not count).
        self.wait("4. Drifted=True", lambda p, m: _became_true_since(m, "Drifted", shifted_at), 300)
        self.wait("4. a Drift-triggered run", lambda p, m: any(r.get("trigger") == "Drift" for r in p.get("runs") or []), 300)
        self.wait("4. v4 in the canary", lambda p, m: m.get("canaryVersion") == "v4" or m.get("stableVersion") == "v4", 420)
        self.wait("4. v4's canary judged", lambda p, m: m.get("stableVersion") == "v4" or "v4" in self.seen_rejected, 240)
        self.callers("since the shift")
        self.batch()

    def better(self) -> None:
        """v2 against v1 on the pipeline's gate metric, each from its run's held-out split."""
        runs = {r.get("modelVersion"): r for r in self.get("mlpipelines")["status"].get("runs") or []}
        metric = self.get("mlpipelines")["spec"]["evaluation"]["metric"]
        v1, v2 = ((runs.get(v) or {}).get("metrics", {}).get(metric) for v in ("v1", "v2"))
        if not isinstance(v1, (int, float)) or not isinstance(v2, (int, float)):
            raise StepFailed(f"2. no {metric} recorded for v1 ({v1}) or v2 ({v2})")
        self.say(f"v2 is better: {metric} {v2:.3f} against v1's {v1:.3f} ({v2 - v1:+.3f})")
        if v2 <= v1:
            raise StepFailed(f"2. v2 ({metric} {v2:.3f}) is not better than v1 ({v1:.3f})")

    # ------------------------------------------------------------------ 5. batch scoring

    def batch(self) -> None:
        """A BatchPrediction scores a table of unseen transactions (three with an unreadable hour) with the
        ModelDeployment's stable version; its status and its output are shown."""
        from conveyor.runtime.training.data import fraud_frame

        folder = Path(self.args.report).resolve().parent / "batch"
        folder.mkdir(parents=True, exist_ok=True)
        table = fraud_frame(rows=BATCH_ROWS, seed=2026).drop(columns=["label"])
        table.insert(0, "txn_id", [f"t{i:05d}" for i in range(len(table))])
        table["hour"] = table["hour"].astype(str)  # a text column, as an export gives it
        table.loc[list(BATCH_BAD_ROWS), "hour"] = "noon"
        table.to_parquet(folder / "transactions.parquet")
        stable = self.get("modeldeployments")["status"].get("stableVersion")
        bp = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BatchPrediction", "metadata": {"name": "fraud-scores"},
              "spec": {"model": {"modelDeployment": NAME},
                       "input": {"uri": f"file://{folder / 'transactions.parquet'}", "format": "parquet",
                                 "idColumns": ["txn_id"]},
                       "output": {"uri": f"file://{folder / 'scores'}"}, "batchSize": 4096}}
        pod = json.loads(self.args.pod_settings)
        if pod:
            bp["spec"]["ray"] = {"pod": pod}
        self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, "batchpredictions", bp)
        self.say(f"5. BatchPrediction/fraud-scores: {len(table):,} unseen transactions ({len(BATCH_BAD_ROWS)} with "
                 f"hour 'noon') scored with the stable version ({stable})")

        def done(_p: dict[str, Any], _m: dict[str, Any]) -> bool:
            runs = (self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, "batchpredictions", "fraud-scores")
                    .get("status") or {}).get("runs") or []
            self.last["batch"] = runs[-1] if runs else {}
            return bool(runs) and runs[-1].get("outcome") in ("Succeeded", "Failed")

        self.wait("5. the batch run", done, 300)
        run = self.last["batch"]
        if run.get("outcome") != "Succeeded":
            raise StepFailed(f"5. the batch run {run.get('outcome')}: {run.get('message')}")
        drift = (run.get("drift") or {}).get("features") or []
        self.say(f"batch run {run['run']} Succeeded with {run.get('modelVersion')} in {run.get('durationSeconds', 0):.1f}s: "
                 f"{_first_line(run.get('message'), 160)}; input drift (PSI) "
                 + (", ".join(f"{f['name']} {f['score']:.3f}" for f in drift[:2]) or "-"))
        self.show_output(run)

    def show_output(self, run: dict[str, Any]) -> None:
        import pandas as pd

        output = str(run.get("output") or "").removeprefix("file://")
        scores = pd.read_parquet(f"{output}/predictions")
        rejects = pd.read_parquet(f"{output}/rejects")
        flagged = scores[scores["prediction"] == "1"]
        self.say(f"output {run.get('output')}: predictions ({len(scores):,} rows, {len(flagged):,} flagged as fraud), "
                 f"rejects ({len(rejects)} rows)")
        for _, r in pd.concat([flagged.head(2), scores.head(1)]).iterrows():
            self.say(f"  {r['txn_id']}  prediction {r['prediction']}  p(fraud) {float(r['probabilities'][-1]):.3f}  "
                     f"{r['model_version']}")
        for _, r in rejects.head(1).iterrows():
            self.say(f"  rejected {r['txn_id']}: {_first_line(r['reason'], 100)}")
        self.batch_rows = {"run": run, "predictions": scores.head(5).to_dict(orient="records"),
                           "flagged": len(flagged), "rejects": rejects[["txn_id", "reason"]].head(5).to_dict(orient="records")}


def _rows(uri: str) -> int:
    from urllib.parse import parse_qs, urlparse

    return int(parse_qs(urlparse(uri).query).get("rows", ["0"])[0])


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _first_line(text: str | None, limit: int = 160) -> str:
    line = (text or "").strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _became_true_since(status: dict[str, Any], kind: str, since: float) -> bool:
    """The condition is True and turned True at or after ``since`` (its lastTransitionTime: seconds)."""
    c = _condition(status, kind)
    if c.get("status") != "True" or not c.get("lastTransitionTime"):
        return False
    from datetime import datetime

    turned = datetime.fromisoformat(c["lastTransitionTime"].replace("Z", "+00:00")).timestamp()
    return turned >= int(since)


def write_report(story: Story, path: Path) -> None:
    a, end = story.args, time.time()
    plots = report.prometheus_plots(a.prometheus_url, story.ns, NAME, story.t0, end)
    mdep = story.get("modeldeployments")
    threshold = (mdep["spec"].get("monitoring") or {}).get("drift", {}).get("threshold")
    plots.insert(3, report.Plot("Drift score per feature (PSI)", "PSI", story.drift, threshold=threshold,
                                threshold_label="drift threshold"))
    mlp = story.get("mlpipelines")
    runs = [dict(r, _finished_s=story.run_finished.get(r["run"], 0.0)) for r in mlp["status"].get("runs") or []]
    ev = mlp["spec"]["evaluation"]
    plots.append(report.runs_plot(runs, ev["metric"], ev.get("threshold")))
    data = report.ReportData("conveyor: make demo", end - story.t0, plots, runs, story.markers, story.lines,
                             story.batch_rows)
    path.write_text(report.render(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--kubeconfig", "--namespace", "--registry", "--faults", "--prometheus-url", "--report", "--logs"):
        p.add_argument(flag, required=True)
    p.add_argument("--rows", type=int, default=20000, help="rows of the full data v2 onwards train on (v1: the manifest's sample)")
    p.add_argument("--pod-settings", default="{}", help="pod settings (JSON) for training and serving pods")
    p.add_argument("--manifest", default=str(Path(__file__).resolve().parents[2] / "demo" / "fraud.yaml"))
    args = p.parse_args(argv)
    random.seed(7)
    story = Story(args)
    failed: str | None = None
    try:
        story.run()
    except StepFailed as e:
        failed = str(e)
    finally:
        story.traffic.stop()
    try:
        write_report(story, Path(args.report))
        story.say(f"report: {args.report}")
    except Exception as e:  # noqa: BLE001 - the story's outcome matters more than its pictures
        story.say(f"no report: {e!r}")
        failed = failed or f"the report: {e!r}"
    if failed:
        print(f"\ndemo failed at step {failed}\nlogs: {args.logs}", file=sys.stderr)
        return 1
    story.say(f"the whole story in {time.time() - story.t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
