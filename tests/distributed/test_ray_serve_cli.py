"""`qwenrun serve` on Ray as a user starts it, with a local Ray cluster of its own: two data-parallel
replicas behind one API, or tensor-parallel rank 1 as a Ray actor; SIGTERM stops the server, and
Ray is started once (a call after its shutdown at exit would start another, left running)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'qwenrun[distributed]')")
httpx = pytest.importorskip("httpx")

import qwenrun  # noqa: E402
from serving import wait_healthy  # noqa: E402

BUNDLED = str(Path(qwenrun.__file__).parent / "assets" / "qwen3-tiny-thinker")


@pytest.mark.parametrize("flags", [["--data-parallel-size", "2"],
                                   ["--tensor-parallel-size", "2", "--distributed-executor", "ray"]])
def test_serve_on_ray(tmp_path, flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "qwenrun", "serve", BUNDLED, *flags, "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-model-len", "512",
           "--no-webui", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout=180)
        if "--data-parallel-size" in flags:
            assert "2 data-parallel replicas on Ray (cpu 1 threads" in log.read_text()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "qwen3-tiny-thinker", "messages": [{"role": "user", "content": "What is 12 + 34?"}],
            "temperature": 0, "max_tokens": 96})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "12 + 34 = 46", r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert log.read_text().count("Started a local Ray instance") == 1
    finally:
        if proc.poll() is None:  # SIGTERM first: a killed server leaves its Ray cluster behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
