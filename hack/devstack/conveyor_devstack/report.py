"""make demo's report: one self-contained HTML file (plots as inline base64 PNGs, rendered by matplotlib)
from Prometheus range queries (/api/v1/query_range) and the objects' status.

``collect`` asks Prometheus; ``render`` is pure (series in, HTML out) so the screenshot test can render a
report without a cluster. The page's layout is fixed (a header of ``HEADER_PX``, then a grid of
``COLUMNS`` plots of ``CELL_PX``) so a screenshot's plot regions are known: ``plot_regions``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

HEADER_PX = 110
CELL_PX = (660, 340)
COLUMNS = 2
FIG_IN = (6.4, 3.2)  # at 100 dpi: 640x320 px, inside its cell

Series = dict[str, list[tuple[float, float]]]  # label -> [(seconds since start, value)]


@dataclass
class Plot:
    title: str
    ylabel: str
    series: Series
    threshold: float | None = None
    threshold_label: str = ""
    ylim: tuple[float, float] | None = None
    step: bool = False
    points: bool = False  # markers only (one per run), no line between them


@dataclass
class ReportData:
    title: str
    duration_s: float
    plots: list[Plot]
    runs: list[dict[str, Any]] = field(default_factory=list)  # MLPipeline status.runs
    markers: list[tuple[float, str]] = field(default_factory=list)  # (seconds, what): promoted, rolled back...
    lines: list[str] = field(default_factory=list)  # the progress lines
    batch: dict[str, Any] = field(default_factory=dict)  # the batch run: {"run", "predictions", "flagged", "rejects"}


# ---------------------------------------------------------------------------------------- Prometheus


def query_range(url: str, promql: str, start: float, end: float, step: float = 2.0) -> Series:
    """Each series of ``promql`` as [(seconds since ``start``, value)], labelled by its model_version."""
    q = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as resp:
        body = json.load(resp)
    out: Series = {}
    for r in body["data"]["result"]:
        label = r["metric"].get("model_version") or r["metric"].get("deployment") or promql[:20]
        points = [(float(t) - start, float(v)) for t, v in r["values"] if v not in ("NaN", "+Inf", "-Inf")]
        if points:
            out[label] = points
    return out


def prometheus_plots(url: str, namespace: str, deployment: str, start: float, end: float) -> list[Plot]:
    """The serving plots: traffic share, success rate, p99 latency per version; the canary weight; accuracy."""
    sel = f'namespace="{namespace}",model_name="{deployment}"'
    w = "[15s]"
    by = "sum by (model_version)"
    total = f"{by} (rate(conveyor_requests_total{{{sel}}}{w}))"
    share = f"100 * {total} / scalar(sum(rate(conveyor_requests_total{{{sel}}}{w})))"
    ok = f'{by} (rate(conveyor_requests_total{{{sel},code!~"5.."}}{w})) / {total}'
    p99 = f"1000 * histogram_quantile(0.99, sum by (le, model_version) (rate(conveyor_request_duration_seconds_bucket{{{sel}}}{w})))"
    weight = f'conveyor_canary_weight{{namespace="{namespace}",deployment="{deployment}"}}'
    accuracy = f"avg by (model_version) (conveyor_online_accuracy{{{sel}}})"
    traffic = query_range(url, share, start, end)
    canary = query_range(url, weight, start, end)
    if canary:
        traffic["canary weight (operator)"] = next(iter(canary.values()))
    return [
        Plot("Traffic per version (% of requests answered)", "%", traffic, ylim=(-2, 102)),
        Plot("Success rate per version (non-5xx)", "share", query_range(url, ok, start, end), ylim=(0, 1.05),
             threshold=0.9, threshold_label="analysis: min success rate"),
        Plot("p99 latency per version", "ms", query_range(url, p99, start, end)),
        Plot("Online accuracy (ground truth sent as feedback)", "accuracy", query_range(url, accuracy, start, end),
             ylim=(0, 1.05)),
    ]


# ---------------------------------------------------------------------------------------- rendering


def _color(label: str) -> str | None:
    """One colour per version across every plot (v1 blue, v2 orange, v3 green...); others matplotlib's."""
    m = re.fullmatch(r"v([0-9]+)", label)
    return f"C{(int(m[1]) - 1) % 10}" if m else ("0.3" if "weight" in label else None)


def _png(plot: Plot, markers: list[tuple[float, str]], duration: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIG_IN, dpi=100)
    for label, points in sorted(plot.series.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        dashed = "weight" in label
        color = _color(label)
        if plot.points:
            ax.plot(xs, ys, label=label, linestyle="none", marker="o", markersize=6, color=color)
        elif plot.step:
            ax.step(xs, ys, where="post", label=label, linewidth=1.8, color=color)
        else:
            ax.plot(xs, ys, label=label, linewidth=1.2 if dashed else 1.8, linestyle="--" if dashed else "-",
                    marker="." if len(xs) < 40 else None, color=color)
    if plot.threshold is not None:
        ax.axhline(plot.threshold, color="crimson", linestyle=":", linewidth=1.5, label=plot.threshold_label)
    for t, what in markers:
        ax.axvline(t, color="0.6", linewidth=0.8)
        ax.annotate(what, (t, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6, color="0.35",
                    va="top", ha="right")
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel("seconds since the demo started", fontsize=8)
    ax.set_ylabel(plot.ylabel, fontsize=8)
    ax.set_xlim(0, max(duration, 1))
    if plot.ylim:
        ax.set_ylim(*plot.ylim)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if plot.series or plot.threshold is not None:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _runs_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in sorted((r.get("metrics") or {}).items()))
        cells = [r.get("run"), r.get("trigger"), r.get("outcome"), r.get("modelVersion") or "",
                 "yes" if r.get("deployed") else "", metrics, r.get("reason") or ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("run", "trigger", "outcome", "version", "deployed", "metrics", "reason"))
    return f"<table class=runs><tr>{head}</tr>{''.join(rows)}</table>"


def _batch_section(batch: dict[str, Any]) -> str:
    """The batch run's status figures and the first rows of its output (predictions, rejects)."""
    if not batch:
        return ""
    run = batch.get("run") or {}
    drift = ", ".join(f"{f['name']} {f['score']:.3f}" for f in ((run.get("drift") or {}).get("features") or [])[:3])
    facts = (f"run {run.get('run')} {run.get('outcome')} with {run.get('modelVersion')}: {run.get('rowsScored')} rows "
             f"scored, {run.get('rowsRejected')} rejected, {batch.get('flagged')} flagged as fraud, in "
             f"{run.get('durationSeconds')} s; output {run.get('output')}; input drift (PSI) {drift or '-'}")

    def table(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return ""
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
        return f"<table class=runs><tr>{head}</tr>{body}</table>"

    return (f'<h2 style="margin: 16px">Batch scoring</h2><div style="margin: 16px">{html.escape(facts)}</div>'
            f"{table(batch.get('predictions') or [])}{table(batch.get('rejects') or [])}")


def _cell(v: Any) -> str:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v) + "]"
    return str(v)


def runs_plot(runs: list[dict[str, Any]], metric: str, threshold: float | None) -> Plot:
    """Each run's gate metric at the second it finished (a point per run, labelled by its trigger)."""
    series: Series = {}
    for r in runs:
        value = (r.get("metrics") or {}).get(metric)
        if isinstance(value, (int, float)):
            label = f"{r.get('modelVersion') or 'run ' + str(r['run'])} ({r.get('trigger')})"
            series.setdefault(label, []).append((float(r.get("_finished_s", r["run"])), value))
    return Plot(f"Training runs: held-out {metric} (gate {threshold})", metric, series, threshold=threshold,
                threshold_label="gate threshold", points=True)


def plot_regions(n: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) in CSS pixels of each plot image on the page."""
    w, h = CELL_PX
    out = []
    for i in range(n):
        col, row = i % COLUMNS, i // COLUMNS
        left, top = col * w + 10, HEADER_PX + row * h + 10
        out.append((left, top, left + 640, top + 320))
    return out


def render(data: ReportData) -> str:
    images = "".join(
        f'<div class=cell><img class=plot alt="{html.escape(p.title)}" title="{html.escape(p.title)}" '
        f'width=640 height=320 src="data:image/png;base64,{_png(p, data.markers, data.duration_s)}"></div>'
        for p in data.plots)
    lines = html.escape("\n".join(data.lines))
    w, h = CELL_PX
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>
body {{ margin: 0; font-family: sans-serif; background: #fff; color: #222; }}
header {{ height: {HEADER_PX}px; box-sizing: border-box; padding: 12px 16px; overflow: hidden; background: #f4f6fa; }}
header h1 {{ margin: 0 0 6px; font-size: 22px; }}
.grid {{ display: grid; grid-template-columns: repeat({COLUMNS}, {w}px); grid-auto-rows: {h}px; }}
.cell {{ padding: 10px; box-sizing: border-box; }}
.plot {{ display: block; }}
table.runs {{ border-collapse: collapse; margin: 16px; font-size: 13px; }}
table.runs td, table.runs th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
pre {{ margin: 16px; font-size: 12px; }}
</style></head>
<body><header><h1>{html.escape(data.title)}</h1>
<div>{len(data.runs)} training runs, {data.duration_s:.0f} s. Plots from Prometheus range queries
(traffic, success rate, p99 latency, online accuracy) and the ModelDeployment's status (drift).</div></header>
<div class=grid>{images}</div>
<h2 style="margin: 16px">Runs</h2>{_runs_table(data.runs)}
{_batch_section(data.batch)}
<h2 style="margin: 16px">Progress</h2><pre>{lines}</pre>
</body></html>
"""
