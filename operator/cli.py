"""`kubectl conveyor`: manual control of a ModelDeployment's rollout (a kubectl plugin, installed with the
package as the `kubectl-conveyor` executable; like `kubectl argo rollouts`).

    kubectl conveyor status  NAME [-n NS]   the rollout: phase, weights, the last analyses, rejected versions
    kubectl conveyor promote NAME [-n NS]   skip the remaining steps: the canary takes all traffic now
    kubectl conveyor abort   NAME [-n NS]   roll the canary back now (recorded as rejected)
    kubectl conveyor pause   NAME [-n NS]   hold the canary at its weight (sets spec.rollout.paused)
    kubectl conveyor resume  NAME [-n NS]   continue a paused rollout (clears spec.rollout.paused, and
                                            leaves a pause the operator took after inconclusive
                                            analyses or analysis errors)
    kubectl conveyor retry   NAME [-n NS]   roll a rejected version out again, or a paused rollout
                                            afresh with its counters reset

promote, abort, resume and retry write the annotation `conveyor.dev/rollout-action: <action>@<time>`,
which the operator acts on once (Git or Argo CD can write the same annotation); pause and resume
write `spec.rollout.paused` (with Argo CD self-heal on, set it in Git instead).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from conveyor.operator.modeldeployment.plan import ANNOTATION_ROLLOUT_ACTION
from conveyor.runtime.spec import GROUP, VERSION

PLURAL = "modeldeployments"


def action_value(action: str, now: datetime) -> str:
    # The time makes each request a new value: the operator acts once per distinct value.
    return f"{action}@{now.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


def patches(command: str, now: datetime, paused: bool) -> list[dict[str, Any]]:
    """The merge patches one command writes (`paused`: whether spec.rollout.paused is set now)."""
    annotate = {"metadata": {"annotations": {ANNOTATION_ROLLOUT_ACTION: action_value(command, now)}}}
    if command == "pause":
        return [{"spec": {"rollout": {"paused": True}}}]
    if command == "resume":
        return ([{"spec": {"rollout": {"paused": False}}}] if paused else []) + [annotate]
    return [annotate]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_status(obj: dict[str, Any]) -> str:
    """The rollout as a person reads it."""
    st = obj.get("status") or {}
    meta = obj["metadata"]
    lines = [f"Name:        {meta['namespace']}/{meta['name']}"]
    lines.append(f"Phase:       {st.get('rolloutPhase', '-')}"
                 + (f" ({st['pauseReason']}: {st.get('pauseMessage', '')})" if st.get("pauseReason") else ""))
    lines.append(f"Stable:      {st.get('stableVersion', '-')}")
    if st.get("canaryVersion"):
        steps = ((obj.get("spec") or {}).get("rollout") or {}).get("steps") or []
        step = st.get("rolloutStep", 0)
        lines.append(f"Canary:      {st['canaryVersion']} at {st.get('canaryWeight', 0)}% "
                     f"(step {step + 1} of {len(steps) or '?'}; steps {steps})")
        lines.append(f"Next analysis: {st.get('nextAnalysisTime', 'when KServe reports the step’s traffic')}")
        lines.append(f"Failed: {st.get('failedAnalyses', 0)}  Inconclusive: {st.get('inconclusiveAnalyses', 0)}  "
                     f"Errors in a row: {st.get('analysisErrors', 0)}")
    for t in st.get("traffic") or []:
        lines.append(f"Traffic:     {t.get('version')} {t.get('percent')}% ({t.get('tag')})")
    for c in st.get("conditions") or []:
        lines.append(f"Condition:   {c['type']}={c['status']} ({c.get('reason', '')}) {c.get('message', '')}".rstrip())
    for a in st.get("analyses") or []:
        lines.append(f"Analysis {a.get('time')}: {a.get('version')} at {a.get('weight')}% {a.get('verdict')}: {a.get('message', '')}")
        for c in a.get("checks") or []:
            lines.append(f"    {c['name']:<16} {c['verdict']:<12} canary {_fmt(c.get('candidate')):>8}  "
                         f"stable {_fmt(c.get('stable')):>8}  want {c.get('threshold', '')}")
    for r in st.get("rejectedVersions") or []:
        lines.append(f"Rejected:    {r['version']} at {r.get('time')}: {r.get('check')} "
                     f"{_fmt(r.get('value'))} ({r.get('message', '')})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubectl conveyor", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["status", "promote", "abort", "pause", "resume", "retry"])
    p.add_argument("name", help="the ModelDeployment")
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")
    p.add_argument("--context", help="kubeconfig context")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    args = parse_args(argv)
    try:
        config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        _, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
        default_ns = ((active or {}).get("context") or {}).get("namespace") or "default"
    except config.ConfigException:
        config.load_incluster_config()
        default_ns = "default"
    namespace = args.namespace or default_ns
    api = client.CustomObjectsApi()
    try:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name)
        if args.command == "status":
            print(render_status(obj))
            return 0
        paused = bool(((obj.get("spec") or {}).get("rollout") or {}).get("paused"))
        for body in patches(args.command, datetime.now(UTC), paused):
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, args.name, body)
    except ApiException as e:
        print(f"kubectl conveyor {args.command} {namespace}/{args.name}: {e.status} {e.reason}", file=sys.stderr)
        return 1
    print(f"modeldeployment.{GROUP}/{args.name} {args.command} requested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
