"""The four services as real `churnguard serve` processes on loopback ports, configured by
environment like a deployment: start, stop, kill and restart any of them.

Used by the end-to-end tests, and by the fault-injection run (tests/chaos) to play the part of
a process supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.broker import free_port
from shared.settings import KafkaSettings

SERVICES = ("ingest", "scoring", "actions", "gateway")
REPO = Path(__file__).resolve().parents[1]


class ServiceFailed(RuntimeError):
    """A service exited or did not become ready in time; the message names its log."""


@dataclass
class ServiceStack:
    workdir: Path
    database_url: str
    kafka: KafkaSettings
    internal_token: str
    settings: dict[str, str] = field(default_factory=dict)
    """Extra CHURNGUARD_* environment for every service."""
    log_level: str | None = None
    """--log-level of every service (None: the service's default)."""
    ports: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in SERVICES})
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ, "PYTHONUNBUFFERED": "1",
            "CHURNGUARD_DATABASE_URL": self.database_url,
            "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "CHURNGUARD_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
            "CHURNGUARD_INTERNAL_TOKEN": self.internal_token,
            "CHURNGUARD_GATEWAY_INGEST_URL": self.url("ingest"),
            "CHURNGUARD_GATEWAY_SCORING_URL": self.url("scoring"),
            "CHURNGUARD_GATEWAY_ACTIONS_URL": self.url("actions"),
            **self.settings,
        }

    def create_topics(self) -> None:
        subprocess.run([sys.executable, "-m", "services.cli", "topics"], env=self.env(), cwd=REPO,
                       check=True, capture_output=True, timeout=120)

    def start(self, name: str) -> None:
        """Start one service (its log is appended to, so restarts keep the earlier output)."""
        command = [sys.executable, "-m", "services.cli", "serve", name, "--port", str(self.ports[name])]
        if self.log_level:
            command += ["--log-level", self.log_level]
        with open(self.log_path(name), "ab") as log:
            self.processes[name] = subprocess.Popen(command, env=self.env(), cwd=REPO, stdout=log,
                                                    stderr=subprocess.STDOUT)

    def start_all(self, timeout_s: float = 90, probes: dict[str, str] | None = None) -> None:
        """Start the four and wait until each answers its probe (default /readyz; scoring is not
        ready until a model is active, so a stack without one probes it at /healthz)."""
        for name in SERVICES:
            self.start(name)
        for name in SERVICES:
            self.wait_ready(name, timeout_s, (probes or {}).get(name, "/readyz"))

    def ready(self, name: str, probe: str = "/readyz") -> bool:
        try:
            return httpx.get(f"{self.url(name)}{probe}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, name: str, timeout_s: float = 90, probe: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive(name):
                raise ServiceFailed(f"{name} exited with {self.processes[name].returncode}; see {self.log_path(name)}")
            if self.ready(name, probe):
                return
            time.sleep(0.1)
        raise ServiceFailed(f"{name} not ready within {timeout_s:g} s; see {self.log_path(name)}")

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` and wait for the process to be gone (services run one process each)."""
        process = self.processes[name]
        if process.poll() is None:
            os.kill(process.pid, sig)
            process.wait(timeout=30)

    def stop_all(self, timeout_s: float = 30) -> dict[str, int | None]:
        """SIGTERM every service, wait; returns exit codes (None: had to be killed)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes[name] = None
        return codes
