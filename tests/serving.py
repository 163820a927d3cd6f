"""Servers for tests: an app on a free local port in a uvicorn thread, and the wait for a `qwenrun
serve` subprocess to answer /health — shared by tests/server and tests/distributed."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

import httpx


class Server:
    """A real uvicorn server on a free local port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path | None = None, timeout: float = 180) -> None:
    """Until the `qwenrun serve` process `proc` answers 200 on /health; fails with its log's tail
    (`log`, else its stdout) if it exits or is still not up after `timeout` seconds."""

    def tail() -> str:
        return log.read_text()[-3000:] if log is not None else (proc.stdout.read() if proc.stdout else "")

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"qwenrun serve exited: {tail()}"
        assert time.time() < deadline, f"qwenrun serve did not become healthy: {tail()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
