"""make demo's report as a browser shows it: the HTML has every plot, titled, and Debian's headless
chromium draws each one with data in it (coloured pixels in each plot's region of the screenshot, not
just axes and text)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conveyor_devstack import report

TITLES = ["Traffic per version", "Success rate per version", "p99 latency per version", "Drift score per feature",
          "Online accuracy", "Training runs"]


def _data() -> report.ReportData:
    ts = [float(t) for t in range(0, 300, 2)]
    plots = [
        report.Plot("Traffic per version (% of requests answered)", "%",
                    {"v1": [(t, 100.0 if t < 100 else 0.0) for t in ts], "v2": [(t, 0.0 if t < 100 else 100.0) for t in ts]}),
        report.Plot("Success rate per version (non-5xx)", "share",
                    {"v2": [(t, 1.0) for t in ts], "v3": [(t, 0.5) for t in ts[60:70]]}, threshold=0.9),
        report.Plot("p99 latency per version", "ms", {"v2": [(t, 20 + 5 * math.sin(t / 10)) for t in ts]}),
        report.Plot("Drift score per feature (PSI)", "PSI",
                    {"amount": [(t, 0.01 if t < 200 else 1.5) for t in ts], "hour": [(t, 0.01) for t in ts]}, threshold=0.2),
        report.Plot("Online accuracy (ground truth sent as feedback)", "accuracy", {"v2": [(t, 0.97) for t in ts[10:]]}),
        report.runs_plot([{"run": 1, "trigger": "Created", "outcome": "Succeeded", "metrics": {"rocAuc": 0.9}, "_finished_s": 60},
                          {"run": 2, "trigger": "SpecChange", "outcome": "Succeeded", "metrics": {"rocAuc": 0.93}, "_finished_s": 120}],
                         "rocAuc", 0.7),
    ]
    return report.ReportData("conveyor: make demo", 300, plots, runs=[{"run": 1, "trigger": "Created", "outcome": "Succeeded",
                             "metrics": {"rocAuc": 0.9}}], markers=[(100, "v2 stable")], lines=["[ 0m01s] run 1 started"],
                             batch=BATCH)


BATCH = {"run": {"run": 1, "outcome": "Succeeded", "modelVersion": "v2", "rowsScored": 19997, "rowsRejected": 3,
                 "durationSeconds": 4.2, "output": "file:///x/run-1", "drift": {"features": [{"name": "hour", "score": 0.01}]}},
         "flagged": 412, "predictions": [{"txn_id": "t00000", "prediction": "0", "probabilities": np.array([0.9, 0.1]),
                                          "model_version": "v2"}],
         "rejects": [{"txn_id": "t00017", "reason": "feature 'hour' expects a int value; 1 value is not: 'noon'"}]}


def test_the_report_has_every_plot_titled() -> None:
    page = report.render(_data())
    imgs = re.findall(r'<img class=plot alt="([^"]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [t for t, _ in imgs] and all(any(t.startswith(x) for t, _ in imgs) for x in TITLES), [t for t, _ in imgs]
    assert all(len(b) > 5000 for _, b in imgs)  # a drawn plot, not an empty canvas
    assert "run 1 started" in page and "<table class=runs>" in page
    # The batch run: its figures, an output row (probabilities as numbers) and a reject with its reason.
    assert "Batch scoring" in page and "19997 rows scored, 3 rejected, 412 flagged" in page
    assert "[0.900, 0.100]" in page and "t00017" in page and "&#x27;noon&#x27;" in page


def test_the_screenshot_shows_data_in_every_plot(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (hack/install-deps.sh installs it)")
        pytest.skip("chromium is missing (hack/install-deps.sh installs it)")
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(report.render(_data()))
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--window-size=1340,1300", f"--screenshot={shot}",
                    f"file://{page}"], check=True, capture_output=True, timeout=120, cwd=tmp_path)
    image = Image.open(shot).convert("RGB")
    regions = report.plot_regions(6)
    for title, box in zip(TITLES, regions, strict=True):
        pixels = np.asarray(image.crop(box)).astype(int)
        # Coloured pixels: the series and threshold lines (axes, ticks and text are grey or black).
        coloured = int((pixels.max(axis=2) - pixels.min(axis=2) > 60).sum())
        non_white = int((pixels.min(axis=2) < 240).sum())
        assert coloured > 300, f"{title}: {coloured} coloured pixels in {box}"
        assert non_white > 3000, f"{title}: blank ({non_white} non-white pixels)"
    # The header above the plots is not plot: a check that the regions are where the plots are.
    header = np.asarray(image.crop((700, 5, 1300, report.HEADER_PX - 5))).astype(int)
    assert int((header.max(axis=2) - header.min(axis=2) > 60).sum()) < 50
