"""`qwenrun serve`: the parser the CLI mounts, and `run` in a real process answering HTTP."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from steered import make_steered_checkpoint

from qwenrun.server.cli import add_serve_parser, parse_size

_REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenrun")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser


def test_serve_flags():
    args = _parser().parse_args([
        "serve", "Qwen/Qwen3-0.6B", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
        "--max-model-len", "4096", "--kv-cache-memory", "2GiB", "--max-num-seqs", "8", "--max-queue", "16",
        "--served-model-name", "qwen", "qwen3", "--dtype", "bfloat16", "--device", "cpu"])
    assert (args.command, args.model, args.host, args.port, args.api_key) == ("serve", "Qwen/Qwen3-0.6B", "0.0.0.0", 9000, "k")
    assert (args.max_model_len, args.kv_cache_memory, args.max_num_seqs, args.max_queue) == (4096, 2 << 30, 8, 16)
    assert args.served_model_name == ["qwen", "qwen3"] and (args.dtype, args.device) == ("bfloat16", "cpu")
    defaults = _parser().parse_args(["serve", "m"])
    assert (defaults.host, defaults.port, defaults.max_queue, defaults.served_model_name) == ("127.0.0.1", 8000, 256, None)
    assert parse_size("512M") == 512 << 20 and parse_size("1048576") == 1 << 20 and parse_size("1.5GiB") == 3 << 29
    assert _parser().parse_args(["serve"]).model is None  # the CLI then serves the bundled model
    for bad in (["serve", "m", "--port", "0"], ["serve", "m", "--kv-cache-memory", "lots"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)


def test_run_serve_in_a_process(tmp_path, qwen3_tokenizer_dir):
    folder = make_steered_checkpoint(tmp_path / "ckpt", qwen3_tokenizer_dir, {271: 59604, 59604: 151645})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from tests.test_server_cli import _parser; from qwenrun.server.cli import run; "
            "sys.exit(run(_parser().parse_args(sys.argv[1:])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), str(_REPO / "tests")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(folder), "--port", str(port), "--served-model-name", "tiny",
         "--api-key", "k", "--kv-cache-memory", "4MiB", "--max-model-len", "512", "--dtype", "float32",
         "--device", "cpu", "--log-level", "warning"],
        cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                             "chat_template_kwargs": {"enable_thinking": False}}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/v1" in out
    assert proc.returncode == 0, out
