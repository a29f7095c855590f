"""The served-request log: what this predictor process answered, in registry storage, so that ground truth
sent to ANY replica or process of the version (or after a restart) finds the request it labels.

Answers are buffered in memory (``record``: a list append under a lock, nothing on the response path
waits for storage) and written by a background thread as one atomic part per flush
(``Registry.append_served``): every ``flush_interval`` seconds, sooner when ``max_buffered`` requests
wait, and on ``close`` (the server's shutdown). ``lookup`` reads the newest parts of the version's log
into a bounded index (the ``max_parts`` newest parts, 4,096 by default; an id older than those counts as
never served) and re-lists storage only when the id is not in it yet. Requests answered by another
version's predictors (a canary's route) are looked up by readers of those versions' logs (``write=False``).
The layout is in ``registry.py``'s docstring.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("conveyor.serving.served_log")

FLUSH_INTERVAL_ENV = "CONVEYOR_SERVED_LOG_FLUSH_S"


def flush_interval_from_env(default: float = 1.0) -> float:
    try:
        value = float(os.environ.get(FLUSH_INTERVAL_ENV, default))
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(frozen=True)
class ServedRequest:
    """One request as served: its answers, and the raw rows behind them (None for images)."""

    predictions: list[Any]
    inputs: list[dict[str, Any]] | None


class ServedLog:
    """One process's writer into, and reader of, a version's served-request log."""

    def __init__(
        self,
        registry: Any,
        version: str,
        *,
        flush_interval: float = 1.0,
        max_buffered: int = 2000,
        max_parts: int = 4096,
        max_indexed: int = 200_000,
        write: bool = True,
    ) -> None:
        """``write=False``: a reader only (another version's log), no writer thread."""
        self.registry = registry
        self.version = version
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.max_parts = max_parts
        self.max_indexed = max_indexed
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._flush_lock = threading.Lock()  # one part at a time (the thread, close, a test's flush)
        # Parts read, newest last, each with the ids it holds; the ids' requests.
        self._parts: OrderedDict[str, list[str]] = OrderedDict()
        self._index: dict[str, ServedRequest] = {}
        self._horizon = ""  # the newest part evicted from the index: it and older ones are not read again
        self._read_lock = threading.Lock()
        self.flushed_parts = 0
        self.failed_flushes = 0
        self._thread: threading.Thread | None = None
        if write:
            self._thread = threading.Thread(target=self._run, name="conveyor-served-log", daemon=True)
            self._thread.start()
            atexit.register(
                self.close
            )  # a process that exits without the server's shutdown hook still flushes

    @property
    def uri(self) -> str:
        return f"{self.registry.uri}/{self.registry.model_name}/.served/{self.version}"

    # ------------------------------------------------------------ writing

    def record(self, request_id: str, predictions: list[Any], inputs: list[dict[str, Any]] | None) -> None:
        """Buffer one served request (cheap; written by the background thread)."""
        entry = {
            "id": request_id,
            "predictions": predictions,
            "inputs": inputs,
            "version": self.version,
            "time": time.time(),
        }
        with self._lock:
            self._buffer.append(entry)
            full = len(self._buffer) >= self.max_buffered
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write what is buffered as one part now; returns the number of requests written. A failed write
        keeps the records buffered for the next flush (storage may be back by then)."""
        with self._flush_lock:
            with self._lock:
                records, self._buffer = self._buffer, []
            if not records:
                return 0
            try:
                self.registry.append_served(self.version, self.writer, records)
            except Exception:
                self.failed_flushes += 1
                log.exception(
                    "served-request log: could not write %d request(s) to %s", len(records), self.uri
                )
                with self._lock:
                    self._buffer[:0] = records[-self.max_buffered * 10 :]  # bounded: never grow without end
                return 0
            self.flushed_parts += 1
            return len(records)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Stop the thread and write what is still buffered (the server's shutdown)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.flush_interval))
        self.flush()

    # ------------------------------------------------------------ reading

    def lookup(self, request_id: str) -> ServedRequest | None:
        """The request as any process of this version served it, or None (never served, older than the
        newest ``max_parts`` parts, or too recent to be flushed yet). Blocking storage reads."""
        with self._read_lock:
            found = self._index.get(request_id)
            if found is not None:
                return found
            self._read_new_parts()
            return self._index.get(request_id)

    def _read_new_parts(self) -> None:
        for part in self.registry.served_parts(self.version, self.max_parts):
            if part in self._parts or part <= self._horizon:  # read already, or evicted (older)
                continue
            try:
                records = self.registry.read_served_part(part)
            except (FileNotFoundError, ValueError) as e:  # removed by a retention job, or not JSON lines
                log.warning("served-request log: skipping %s (%s)", part, e)
                continue
            ids = []
            for r in records:
                rid = r.get("id")
                if isinstance(rid, str) and isinstance(r.get("predictions"), list):
                    self._index[rid] = ServedRequest(r["predictions"], r.get("inputs"))
                    ids.append(rid)
            self._parts[part] = ids
        while self._parts and (len(self._parts) > self.max_parts or len(self._index) > self.max_indexed):
            oldest, ids = self._parts.popitem(last=False)
            self._horizon = max(self._horizon, oldest)
            for rid in ids:
                self._index.pop(rid, None)
