"""`qwenrun serve`: the parser the CLI mounts, and `run` in a real process answering HTTP."""

from __future__ import annotations

import argparse
import json
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

from qwenrun.cli.serve import add_serve_parser, model_names, parse_size

_REPO = Path(__file__).resolve().parents[2]


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
    code = ("import sys; from test_server_cli import _parser; from qwenrun.cli.serve import run; "
            "sys.exit(run(_parser().parse_args(sys.argv[1:])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), str(_REPO / "tests"), str(_REPO / "tests" / "server")])}
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


# ---------------------------------------------------------------------------------- model names

BUNDLED = _REPO / "qwenrun" / "assets" / "qwen3-tiny-thinker"


def test_model_names(tmp_path, monkeypatch):
    from qwenrun.cli.main import DEFAULT_MODEL

    assert model_names(DEFAULT_MODEL) == (["qwen3-tiny-thinker"], [DEFAULT_MODEL])
    assert model_names("Qwen/Qwen3-0.6B") == (["Qwen/Qwen3-0.6B"], [])  # not a local folder: hub id
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert model_names("./ckpt/") == (["ckpt"], ["./ckpt/", str(tmp_path / "ckpt")])
    assert model_names("link") == (["link"], [str(tmp_path / "link"), str(tmp_path / "ckpt")])
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert model_names(str(snapshot)) == (["Qwen/Qwen3-0.6B"], [str(snapshot)])
    # --served-model-name: exactly those names (vLLM), duplicates dropped, the first reported back
    assert model_names("./ckpt", ["qwen", "qwen3", "qwen"]) == (["qwen", "qwen3"], [])


# ------------------------------------------------------------- serve --mcp-config, end to end


def _descendants(pid: int) -> set[int]:
    """Live (non-zombie) descendants of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _serve(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qwenrun", "serve", *argv, "--dtype", "float32",
                             "--device", "cpu", "--kv-cache-memory", "64MiB", "--log-level", "warning"],
                            cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, sig: int) -> str:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled demo model not present")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_mcp_config_end_to_end(tmp_path, sig):
    """The documented `qwenrun serve --mcp-config FILE` (bundled model): it starts, names the model
    `qwen3-tiny-thinker`, the agent route calls the MCP calculator, and a signal stops the server
    and its MCP child processes. It used to die with TypeError once the MCP servers had started."""
    pytest.importorskip("mcp")
    from mcp_servers.harness import free_port, stdio_server

    from qwenrun.agent.server import AGENT_PATH

    config = tmp_path / "servers.json"
    config.write_text(json.dumps({"mcpServers": {"calc": stdio_server("demo_calculator.py")}}))
    port = free_port()
    proc = _serve("--mcp-config", str(config), "--port", str(port))
    mcp_children: set[int] = set()
    try:
        _wait_healthy(proc, port)
        mcp_children = _descendants(proc.pid)
        assert mcp_children, "the stdio MCP server runs as a child process"
        url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["qwen3-tiny-thinker"]
        question = [{"role": "user", "content": "What is 347 * 86?"}]
        r = httpx.post(url + AGENT_PATH, timeout=120, json={
            "model": "qwen3-tiny-thinker", "messages": question, "temperature": 0, "max_tokens": 400})
        assert r.status_code == 200, r.text
        data = r.json()
        [result] = data["qwenrun_agent"]["tool_results"]
        assert (result["name"], result["content"], result["kind"]) == ("calculator", "29842", "ok")
        assert "29842" in data["choices"][0]["message"]["content"]
        assert data["model"] == "qwen3-tiny-thinker"
        # the install path, the only name before, is still accepted (not listed)
        chat = {"messages": question, "max_tokens": 2, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": str(BUNDLED)}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": "other"}, timeout=60)
        assert r.status_code == 404 and "qwen3-tiny-thinker" in r.json()["error"]["message"]
        # colliding chat_template_kwargs: the request's own fields win; `tokenize` is a 400
        kwargs = {"tools": [{"bogus": 1}], "add_generation_prompt": False, "messages": "x"}
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "chat_template_kwargs": kwargs},
                       timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/chat/completions",
                       json={**chat, "chat_template_kwargs": {"tokenize": True}}, timeout=60)
        assert r.status_code == 400 and "tokenize" in r.json()["error"]["message"]
    finally:
        out = _stop(proc, sig)
    assert proc.returncode == 0, out
    assert "serving 'qwen3-tiny-thinker'" in out and "server-side tools at" in out, out
    deadline = time.time() + 10
    while (left := {p for p in mcp_children if _alive(p)}) and time.time() < deadline:
        time.sleep(0.1)
    assert not left, f"MCP server processes outlived `qwenrun serve`: {left}\n{out}"


def test_serve_mcp_server_that_does_not_start(tmp_path):
    """A failed MCP start ends `serve` with one error line and stops the servers already started."""
    pytest.importorskip("mcp")
    from mcp_servers.harness import free_port, stdio_server

    config = tmp_path / "servers.json"
    config.write_text(json.dumps({"mcpServers": {
        "ok": stdio_server("calculator.py"), "broken": {"command": "/nonexistent/mcp-server"}}}))
    proc = _serve(str(BUNDLED), "--mcp-config", str(config), "--port", str(free_port()))
    children: set[int] = set()
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        children |= _descendants(proc.pid)
        time.sleep(0.05)
    out = _stop(proc, signal.SIGTERM) if proc.poll() is None else proc.communicate()[0]
    assert proc.returncode == 1 and "error: " in out and "'broken' failed to start" in out, out
    assert not {p for p in children if _alive(p)}
