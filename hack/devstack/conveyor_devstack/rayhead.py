"""A long-lived local Ray cluster for the local executor's jobs: the stand-in for the Ray cluster KubeRay
brings up for a RayJob, so a job's entrypoint joins a running cluster (RAY_ADDRESS) as it does on
Kubernetes, instead of starting and stopping a Ray of its own (on two busy cores that was about a
minute a run: ~20 s to start, ~50 s to shut down after the model was registered).

    python -m conveyor_devstack.rayhead up DIR     # prints the address (host:port); DIR holds its state
    python -m conveyor_devstack.rayhead down DIR   # stops that head (its process group), nothing else

``ray start --head --block`` runs in its own process group, so stopping it ends exactly the processes
it started (never ``ray stop``, which ends every Ray on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CPUS = 2
OBJECT_STORE_BYTES = 1_000_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(state: Path, timeout: float = 180, attempts: int = 3) -> str:
    """Start a head (2 CPUs, 1 GB object store) and wait until it accepts a driver; its address. Ray gives
    its raylet a fixed 30 s to register, which a loaded machine can miss: then it is started again."""
    for attempt in range(1, attempts + 1):
        try:
            return _up(state, timeout)
        except _StartFailed:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class _StartFailed(RuntimeError):
    pass


def _up(state: Path, timeout: float) -> str:
    state.mkdir(parents=True, exist_ok=True)
    # Ray's session folder holds unix sockets: a short path (the socket path limit is 107 bytes).
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    log = open(state / "rayhead.log", "ab")  # noqa: SIM115 - the head outlives this call
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={CPUS}", "--num-gpus=0",
         f"--object-store-memory={OBJECT_STORE_BYTES}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    (state / "rayhead.pid").write_text(str(proc.pid))
    (state / "rayhead.tmp").write_text(temp)
    address = f"{_host()}:{port}"
    deadline = time.monotonic() + timeout
    while not (Path(temp) / "ray_current_cluster").exists() or not _ready(address):
        if proc.poll() is not None:
            down(state)  # what it started before giving up, and its session folder
            raise _StartFailed(f"ray start exited {proc.returncode}: see {state / 'rayhead.log'}")
        if time.monotonic() > deadline:
            down(state)
            raise RuntimeError(
                f"the Ray head did not come up within {timeout:.0f}s: see {state / 'rayhead.log'}"
            )
        time.sleep(0.5)
    (state / "rayhead.address").write_text(address)
    return address


def _host() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _ready(address: str) -> bool:
    """The head's GCS answers a driver (``ray status`` would start a whole CLI; a TCP connect is enough
    once ray_current_cluster is written, which the head does after its GCS and raylet are up)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def down(state: Path) -> None:
    """Stop the head started by ``up`` in ``state``: SIGTERM to its process group, then SIGKILL."""
    pid_file = state / "rayhead.pid"
    if not pid_file.exists():
        return
    pgid = int(pid_file.read_text())
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    pid_file.unlink(missing_ok=True)
    temp = state / "rayhead.tmp"
    if temp.exists():
        shutil.rmtree(temp.read_text(), ignore_errors=True)
        temp.unlink()


def _reap(pid: int) -> None:
    """Collect ``ray start`` if it exited and is this process's child (``up`` in this process started it):
    an unreaped child stays a zombie in its process group, which then never looks gone, and ``down``
    would wait out both of its graces (25 s) for nothing."""
    # (ChildProcessError: not this process's child, ``down`` run from another process; its parent reaps it.)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("state", type=Path, help="a folder for its pid, address and log")
    args = p.parse_args(argv)
    if args.action == "up":
        print(up(args.state))
    else:
        down(args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
