"""`qwenrun serve --tensor-parallel-size 2` in a real process: greedy completions through the OpenAI
API equal the single-process model's, prompts as token ids and as a chat."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serving import wait_healthy
from tiny import add_tokenizer, make_checkpoint

from qwenrun import LLM, SamplingParams

_REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,flags", [("dense-untied-gqa2", []), ("moe-norm-topk", ["--enable-expert-parallel"])])
def test_served_tp2_greedy_equals_tp1(name, flags, tmp_path, qwen3_tokenizer_dir):
    folder, _ = make_checkpoint(name, tmp_path / "ckpt", vocab_size=151936)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenrun", "serve", str(folder), "--port", str(port), "--served-model-name", "tiny",
         "--kv-cache-memory", "8MiB", "--max-model-len", "512", "--dtype", "float32", "--device", "cpu",
         "--log-level", "warning", "--tensor-parallel-size", "2", *flags],
        cwd=_REPO, env={**os.environ, "PYTHONPATH": str(_REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        one = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_model_len=512)
        prompts = [[9707, 11, 1879, 374], [785, 6722, 315, 9625, 374, 12095, 13, 576]]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        want = [o.outputs[0].text for o in one.generate(prompts, params)]
        chat = [{"role": "user", "content": "What is 2 + 3?"}]
        want_chat = one.chat(chat, SamplingParams(temperature=0, max_tokens=12), enable_thinking=False)[0].outputs[0]
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, timeout=120)
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 12, "ignore_eos": True})
        assert r.status_code == 200, r.text
        got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert got == want
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": chat, "temperature": 0, "max_tokens": 12,
            "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == want_chat.content.strip()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
