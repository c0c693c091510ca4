"""Fixtures of the serving tests: the text tests' tiny build (a random checkpoint with a Llama 4-style
tokenizer), and real `l4compile serve` processes on free localhost ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.text.conftest import text_build, text_checkpoint, tokenizer_dir  # noqa: F401  (shared fixtures)

STARTUP_SECONDS = 120   # a loaded CI machine imports onnxruntime and fastapi slowly
STOP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m l4compile.cli serve BUILD --port P ...` in a child process."""

    def __init__(self, build: Path, *args: str, log: Path) -> None:
        self.build, self.args, self.log = build, args, log
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        import httpx
        for _ in range(3):   # another process may take the free port first
            self.port = free_port()
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "l4compile.cli", "serve", str(self.build), "--port", str(self.port),
                     *self.args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            deadline = time.monotonic() + STARTUP_SECONDS
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"the server did not start: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_SECONDS)
            raise

    def client(self, **kwargs):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kwargs)


@pytest.fixture
def start_server(text_build, tmp_path):
    """start_server(*args) -> a running ServerProcess of the text build; stopped at the end of the test."""
    servers: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(text_build, *args, log=tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server.start()
    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(text_build, tmp_path_factory):
    """One server for a module's tests: 4 rows, small body limit."""
    process = ServerProcess(text_build, "--max-batch", "4", "--max-body-bytes", "65536",
                            log=tmp_path_factory.mktemp("serve") / "server.log")
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def engine(text_build):
    from l4compile.runtime import Engine
    return Engine.load(text_build)
