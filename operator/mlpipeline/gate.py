"""The evaluation gate: may a freshly trained model version be deployed?

A version passes when its held-out `spec.evaluation.metric` reaches `threshold` (at least it, or at most
it for error metrics such as rmse and mae), every `spec.evaluation.metrics[]` requirement reaches its
own threshold (for example recall of the positive class beside ROC AUC) and, with `mustBeatDeployed`,
beats the version the deployment serves now by `margin` (higher by margin, or lower by margin for error
metrics). With nothing deployed yet the second test passes: there is nothing to beat.

The comparison is fair: both figures come from the run, measured on the run's own test split. The
operator names the deployed version in the run's config (`RunConfig.deployed`), the run scores that
version's package on its raw test rows through the package's own transforms and decision rule and
records the result beside its own metrics (`metrics.json` `deployed`: version, packageUri, testSamples,
metrics, or error). The deployed version's own metrics.json (measured on another split) is never
compared. Reasons (CamelCase): Passed, BelowThreshold, MetricMissing, DidNotBeatDeployed,
DeployedUnreadable (the deployed package cannot be read or score the run's rows: never a pass),
DeployedNotEvaluated (the run scored another version, or none: the deployed version changed after the
run started; a rerun compares them).

`find_run_version` finds the version a run registered by its lineage (pipeline, namespace, run), so
the operator needs nothing from the training job but the package it commits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.runtime.spec import LOWER_IS_BETTER, EvaluationSpec, meets


class MetadataSource(Protocol):
    def versions(self) -> list[str]: ...

    def read_metadata(self, version: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str  # CamelCase, see the module docstring
    message: str
    metric: str
    value: float | None
    baseline_version: str | None = None
    baseline_value: float | None = None


def _metric_value(metadata: dict[str, Any], metric: str) -> float | None:
    value = (metadata.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def evaluate_gate(
    evaluation: EvaluationSpec, candidate: dict[str, Any], *, deployed_version: str | None = None
) -> GateResult:
    """Judge a candidate's metadata (Registry.read_metadata); with mustBeatDeployed and a deployed version,
    against the figures the run recorded for that version on the same test split (`metrics.deployed`)."""
    metric = evaluation.metric
    lower = metric in LOWER_IS_BETTER
    value = _metric_value(candidate, metric)
    if value is None:
        return GateResult(
            False, "MetricMissing", f"the model package has no numeric {metric!r} in metrics.json", metric, None
        )
    ok = value <= evaluation.threshold if lower else value >= evaluation.threshold
    if not ok:
        cmp = "above" if lower else "below"
        return GateResult(
            False,
            "BelowThreshold",
            f"{metric}={value:.4g} is {cmp} the threshold {evaluation.threshold:.4g}",
            metric,
            value,
        )
    unmet = unmet_requirement(evaluation, candidate)
    if unmet is not None:
        return unmet
    if evaluation.must_beat_deployed and deployed_version is not None:
        return _beats_deployed(evaluation, candidate, value, deployed_version)
    return GateResult(True, "Passed", f"{metric}={value:.4g} reaches the threshold {evaluation.threshold:.4g}", metric, value)


def _beats_deployed(evaluation: EvaluationSpec, candidate: dict[str, Any], value: float, deployed_version: str) -> GateResult:
    metric, lower = evaluation.metric, evaluation.metric in LOWER_IS_BETTER
    pair = (candidate.get("metrics") or {}).get("deployed")
    pair = pair if isinstance(pair, dict) else {}
    if pair.get("version") != deployed_version:
        scored = f"scored {pair['version']}" if pair.get("version") else "scored no deployed version"
        return GateResult(
            False,
            "DeployedNotEvaluated",
            f"mustBeatDeployed: the run {scored} on its test split, but {deployed_version} is deployed now "
            "(it changed after the run started); rerun the pipeline to compare them on the same rows",
            metric,
            value,
            deployed_version,
        )
    if pair.get("error"):
        return GateResult(
            False,
            "DeployedUnreadable",
            f"mustBeatDeployed: {pair['error']} ({deployed_version}, {pair.get('packageUri')})"[:1000],
            metric,
            value,
            deployed_version,
        )
    base = _metric_value({"metrics": pair.get("metrics") or {}}, metric)
    if base is None:
        return GateResult(
            False,
            "DeployedUnreadable",
            f"mustBeatDeployed: the run's scoring of the deployed {deployed_version} gave no numeric {metric!r}",
            metric,
            value,
            deployed_version,
        )
    rows = f"this run's test split ({pair.get('testSamples', '?')} rows)"
    beats = value <= base - evaluation.margin if lower else value >= base + evaluation.margin
    if not beats:
        how = "lower" if lower else "higher"
        return GateResult(
            False,
            "DidNotBeatDeployed",
            f"{metric}={value:.4g} does not beat the deployed {deployed_version} ({base:.4g}) on {rows} "
            f"by the margin {evaluation.margin:.4g} ({how} is better)",
            metric,
            value,
            deployed_version,
            base,
        )
    return GateResult(
        True,
        "Passed",
        f"{metric}={value:.4g} reaches {evaluation.threshold:.4g} and beats the deployed "
        f"{deployed_version} ({base:.4g}) on {rows} by at least {evaluation.margin:.4g}",
        metric,
        value,
        deployed_version,
        base,
    )


def unmet_requirement(evaluation: EvaluationSpec, candidate: dict[str, Any]) -> GateResult | None:
    """The first of `evaluation.metrics[]` the candidate misses (MetricMissing or BelowThreshold)."""
    for i, req in enumerate(evaluation.metrics):
        where = f"evaluation.metrics[{i}]"
        value = _metric_value(candidate, req.key)
        if value is None:
            return GateResult(
                False, "MetricMissing", f"the model package has no numeric {req.key!r} ({where})", req.key, None
            )
        if not meets(req.metric, value, req.threshold):
            cmp = "above" if req.metric in LOWER_IS_BETTER else "below"
            return GateResult(
                False,
                "BelowThreshold",
                f"{req.key}={value:.4g} is {cmp} the threshold {req.threshold:.4g} ({where})",
                req.key,
                value,
            )
    return None


@dataclass(frozen=True)
class GateOutcome:
    """What the registry says of a run whose RayJob succeeded: its version, metrics and the verdict."""

    version: str | None  # None: the run committed no package
    metrics: dict[str, float]
    result: GateResult | None


def judge_run(
    registry: MetadataSource,
    evaluation: EvaluationSpec,
    *,
    pipeline: str,
    namespace: str,
    run: int,
    deployed: tuple[str, MetadataSource | None] | None = None,
) -> GateOutcome:
    """Blocking registry reads (run it in a thread): the run's package, the deployed one, the verdict.

    `deployed` is (version, its registry) of what the target ModelDeployment serves, for mustBeatDeployed:
    the verdict compares the figures the run recorded for that version on its own test split.
    """
    from conveyor.runtime.package.registry import PackageError

    found = find_run_version(registry, pipeline=pipeline, namespace=namespace, run=run)
    if found is None:
        return GateOutcome(None, {}, None)
    version, metadata = found
    deployed_version = None
    if deployed is not None:
        deployed_version, deployed_registry = deployed
        try:
            if deployed_registry is not None:
                deployed_registry.read_metadata(deployed_version)  # verified (sha256) even if the run read it
        except (PackageError, OSError) as e:
            # Not knowing what is deployed is no reason to pass: mustBeatDeployed fails, saying why.
            unreadable = GateResult(
                False,
                "DeployedUnreadable",
                f"mustBeatDeployed: the deployed {deployed_version} cannot be read ({e})"[:1000],
                evaluation.metric,
                _metric_value(metadata, evaluation.metric),
                deployed_version,
            )
            return GateOutcome(version, numeric_metrics(metadata), unreadable)
    result = evaluate_gate(evaluation, metadata, deployed_version=deployed_version)
    return GateOutcome(version, numeric_metrics(metadata), result)


def find_run_version(
    registry: MetadataSource, *, pipeline: str, namespace: str, run: int, scan: int = 50
) -> tuple[str, dict[str, Any]] | None:
    """The committed version whose lineage names this pipeline run (newest first), with its metadata."""
    for version in reversed(registry.versions()[-scan:]):
        metadata = registry.read_metadata(version)
        lineage = metadata.get("lineage") or {}
        if (
            lineage.get("pipeline") == pipeline
            and lineage.get("namespace", namespace) == namespace
            and _as_int(lineage.get("run")) == run
        ):
            return version, metadata
    return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def numeric_metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (status.runs[].metrics holds numbers only: no confusion matrix, no history)."""
    out: dict[str, float] = {}
    for k, v in (metadata.get("metrics") or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out
