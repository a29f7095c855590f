"""A bounded load generator for the rollout tests and bench: N requests a second for a duration, to a URL.

Every answer is recorded with its status code, its latency and the version that answered (the
``model_version`` of the predictor's JSON body; ``x-conveyor-version`` from the local router when the body
has none, e.g. a planted 5xx). It runs in a background thread so a test can watch the cluster meanwhile::

    with Load(url, body, rate=20) as load:      # until the block ends (or duration, if given)
        ...
    load.by_version()  ->  {"v1": Counter({200: 80}), "v2": Counter({200: 18, 503: 2})}

Requests are paced open-loop (one every 1/rate s on a schedule, each in its own worker), so a slow
predictor does not slow the offered load, as with real callers.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when sent
    status: int  # HTTP status; 0 when no answer came (connection refused, timeout)
    latency: float  # seconds
    version: str | None


def send(url: str, body: bytes, timeout: float = 10) -> Answer:
    """One POST; never raises: a failure is an Answer with status 0."""
    sent = time.monotonic()
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, payload, header = resp.status, resp.read(), resp.headers.get("x-conveyor-version")
    except urllib.error.HTTPError as e:
        status, payload, header = e.code, e.read(), e.headers.get("x-conveyor-version")
    except OSError:
        return Answer(sent, 0, time.monotonic() - sent, None)
    latency = time.monotonic() - sent
    try:
        version = json.loads(payload).get("model_version") or header
    except (ValueError, AttributeError):
        version = header
    return Answer(sent, status, latency, version)


class Load:
    """``rate`` requests a second to ``url`` until stopped or ``duration`` s have passed."""

    def __init__(self, url: str, payload: Any, *, rate: float = 20, duration: float | None = None,
                 workers: int = 16) -> None:
        self.url, self.rate, self.duration = url, rate, duration
        self.body = json.dumps(payload).encode()
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
        self._thread = threading.Thread(target=self._run, name="load-pacer", daemon=True)

    def _one(self) -> None:
        answer = send(self.url, self.body)
        with self._lock:
            self.answers.append(answer)

    def _run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = start + n / self.rate
            if self.duration is not None and due - start >= self.duration:
                break
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            self._pool.submit(self._one)
            n += 1

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        return self

    def wait(self) -> Load:
        """Wait for a bounded load (``duration``) to finish."""
        self._thread.join()
        self._pool.shutdown(wait=True)
        return self

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what callers saw

    def snapshot(self, since: float = 0.0) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.sent >= since]

    def by_version(self, since: float = 0.0) -> dict[str | None, Counter[int]]:
        """Status codes per answering version (None: no version known)."""
        out: dict[str | None, Counter[int]] = {}
        for a in self.snapshot(since):
            out.setdefault(a.version, Counter())[a.status] += 1
        return out

    def share(self, version: str, since: float = 0.0) -> float:
        """The share of answered requests (any status) that ``version`` answered."""
        answers = [a for a in self.snapshot(since) if a.status]
        return sum(a.version == version for a in answers) / len(answers) if answers else 0.0

    def failures(self, version: str | None = None, since: float = 0.0) -> list[Answer]:
        """Answers that are not 2xx (optionally: from ``version``)."""
        return [a for a in self.snapshot(since)
                if not 200 <= a.status < 300 and (version is None or a.version == version)]
