"""A real S3 API for the local stack: versitygw (github.com/versity/versitygw) over a local directory.

    python -m conveyor_devstack.s3 up|down|status|env [--state-dir DIR]

(``hack/s3.sh`` calls this with ``~/.cache/conveyor/s3``.) The server is built from its published Go
module at the version pinned in ``hack/tools/versitygw/go.mod`` (``hack/build-tool.sh versitygw``,
cached under ``~/.cache/conveyor``) and serves the S3 protocol with its posix backend: buckets are
directories under ``<state>/data``. It is a real S3 implementation (SigV4 authentication, multipart
uploads, listings), so the registry's ``s3://`` path (s3fs) runs exactly as against AWS S3, with the
credentials and endpoint a cluster would hand a pod::

    server = S3Server.start(tmp_path / "s3")
    server.create_bucket("models")
    server.env()   # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION
    server.stop()

Its root credentials are made once per state directory (``<state>/credentials.json``) and never logged.
A development stand-in for a cloud's object storage, never shipped in an image.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
HEALTH_PATH = "/health"
ROOT = Path(__file__).resolve().parents[3]


class S3Error(RuntimeError):
    """The S3 server could not be built, started or reached."""


def binary() -> str:
    """The pinned versitygw binary (``$CONVEYOR_S3_BIN``, or built once by hack/build-tool.sh)."""
    if os.environ.get("CONVEYOR_S3_BIN"):
        return os.environ["CONVEYOR_S3_BIN"]
    proc = subprocess.run([str(ROOT / "hack" / "build-tool.sh"), "versitygw"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise S3Error(f"could not build versitygw (hack/build-tool.sh versitygw): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_runs_versitygw(pid: int) -> bool:
    """A recorded pid only counts while it still runs versitygw (pids get reused)."""
    try:
        return b"versitygw" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _credentials(state_dir: Path) -> dict[str, str]:
    path = state_dir / "credentials.json"
    if not path.exists():
        creds = {"access": f"conveyor{secrets.token_hex(6)}", "secret": secrets.token_urlsafe(30)}
        path.write_text(json.dumps(creds))
        path.chmod(0o600)
    return json.loads(path.read_text())


@dataclass
class S3Server:
    """One versitygw process over ``state_dir`` (data/, credentials.json, s3.log, pid, port)."""

    state_dir: Path
    port: int
    pid: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a pod gets from its Secret: the standard AWS variables (botocore, s3fs and KServe's
        storage initializer read them; AWS_ENDPOINT_URL points the SDKs at this server)."""
        creds = _credentials(self.state_dir)
        return {
            "AWS_ACCESS_KEY_ID": creds["access"],
            "AWS_SECRET_ACCESS_KEY": creds["secret"],
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, state_dir: Path, *, port: int | None = None, timeout: float = 30) -> S3Server:
        """Start versitygw on ``port`` (default: a free loopback port) and wait for its health check."""
        exe = binary()
        state_dir = Path(state_dir)
        (state_dir / "data").mkdir(parents=True, exist_ok=True)
        creds = _credentials(state_dir)
        port = port or _free_port()
        log = (state_dir / "s3.log").open("ab")
        # The root credentials go through the environment, not argv (ps would show them).
        env = {**os.environ, "ROOT_ACCESS_KEY_ID": creds["access"], "ROOT_SECRET_ACCESS_KEY": creds["secret"]}
        proc = subprocess.Popen(
            [exe, "--port", f"127.0.0.1:{port}", "--region", REGION, "--health", HEALTH_PATH,
             "posix", str(state_dir / "data")],
            cwd=state_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        (state_dir / "pid").write_text(str(proc.pid))
        (state_dir / "port").write_text(str(port))
        server = cls(state_dir, port, proc.pid, proc)
        try:
            server.wait_ready(timeout)
        except S3Error:
            server.stop()
            raise
        return server

    @classmethod
    def attach(cls, state_dir: Path) -> S3Server | None:
        """The server a previous ``start`` left running over ``state_dir``, or None."""
        state_dir = Path(state_dir)
        try:
            pid = int((state_dir / "pid").read_text())
            port = int((state_dir / "port").read_text())
        except (OSError, ValueError):
            return None
        if not _pid_runs_versitygw(pid):
            return None
        return cls(state_dir, port, pid)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}{HEALTH_PATH}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.state_dir / "s3.log").read_text(errors="replace")[-2000:]
                raise S3Error(f"versitygw exited with {self.proc.returncode}: {tail}")
            if self.ready():
                return
            time.sleep(0.2)
        raise S3Error(f"versitygw not healthy at {self.endpoint} after {timeout:.0f}s")

    def stop(self) -> None:
        if not _pid_runs_versitygw(self.pid):
            return
        os.killpg(self.pid, signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        (self.state_dir / "pid").unlink(missing_ok=True)

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the S3 API (CreateBucket), as one would on a cloud; idempotent."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.env()["AWS_ACCESS_KEY_ID"], secret=self.env()["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=self.endpoint, client_kwargs={"region_name": REGION},
        )
        if not fs.exists(name):
            # The plain CreateBucket call: s3fs's mkdir adds a LocationConstraint, which S3 refuses for us-east-1.
            fs.call_s3("create_bucket", Bucket=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor_devstack.s3", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conveyor" / "s3")
    parser.add_argument("--bucket", default="conveyor", help="bucket `up` makes sure exists (default: conveyor)")
    args = parser.parse_args(argv)
    server = S3Server.attach(args.state_dir)
    if args.command == "up":
        if server is None or not server.ready():
            server = S3Server.start(args.state_dir)
        server.create_bucket(args.bucket)
        print(server.endpoint)
    elif args.command == "down":
        if server is not None:
            server.stop()
    elif args.command == "status":
        if server is None:
            print("s3: not running")
            return 1
        print(f"s3: versitygw pid {server.pid} at {server.endpoint}, {'healthy' if server.ready() else 'NOT healthy'}")
        print(f"data: {args.state_dir / 'data'}\nlog: {args.state_dir / 's3.log'}")
    else:
        if server is None:
            print("s3: not running (hack/s3.sh up)", file=sys.stderr)
            return 1
        for k, v in server.env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
