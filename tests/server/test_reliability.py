"""`qwenrun serve` as users' clients hit it: a real server process under 32 concurrent streams, half of
whose clients hang up at random points, with hostile requests mixed in.

The contract checked: every healthy request that stays connected ends with its proper final event;
every hostile one gets an OpenAI- or Anthropic-style error (never a 5xx) or, where the server
documents a repair (lone surrogates become U+FFFD, explicit fields win over `chat_template_kwargs`),
a complete answer; afterwards every KV block is idle, nothing is queued, and the same process still
serves. Counts are printed (`pytest -s tests/server/test_reliability.py`) for the closing note's figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families
from serving import wait_healthy
from tiny import add_tokenizer, make_checkpoint

VOCAB = 151936
HEALTHY = 32
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen3_tokenizer_dir):
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("rel"), vocab_size=VOCAB,
                                max_position_embeddings=4096)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    port = _free_port()
    log = tmp_path_factory.mktemp("rel-log") / "serve.log"
    cmd = [sys.executable, "-m", "qwenrun", "serve", str(folder), "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--kv-cache-memory", "32MiB", "--max-model-len", "4096", "--max-num-seqs", "12",
           "--max-num-batched-tokens", "96", "--served-model-name", "tiny", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout=240)
        yield proc, url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------ requests


@dataclass
class Job:
    kind: str  # "healthy" or the hostile class
    path: str
    body: bytes
    stream: bool
    expect: str  # "complete" (a full answer), "4xx", or "any-non-5xx"
    hang_up_after: int | None = None  # events read before the client leaves
    param: str | None = None  # the field a 400 must name


def _healthy(rng: random.Random, i: int) -> Job:
    path = ("/v1/chat/completions", "/v1/completions", "/v1/messages")[i % 3]
    common = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": rng.choice((0, 0.7)), "stream": True}
    if path == "/v1/completions":
        body = {**common, "prompt": f"Story {i}: " + "once upon a time " * rng.randrange(1, 40),
                "ignore_eos": True}
    elif path == "/v1/chat/completions":
        body = {**common, "messages": [{"role": "user", "content": f"hi {i} " * rng.randrange(1, 30)}],
                "ignore_eos": True, "stream_options": {"include_usage": True}}
    else:
        body = {**common, "messages": [{"role": "user", "content": f"hello {i} " * rng.randrange(1, 30)}],
                "ignore_eos": True}
    hang_up = rng.randrange(1, 10) if i % 2 else None  # half the clients leave mid-stream
    return Job("healthy", path, json.dumps(body).encode(), True, "complete", hang_up)


def _hostile(rng: random.Random) -> list[Job]:
    chat = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}

    def js(body) -> bytes:
        return json.dumps(body).encode()

    jobs = []
    for field, value in [("temperature", 1e39), ("repetition_penalty", 5e-324), ("presence_penalty", -1e308),
                         ("frequency_penalty", 1e300), ("min_p", 1.5), ("max_tokens", 10**30), ("seed", 2**70)]:
        for stream in (False, True):
            jobs.append(Job("float-extreme", "/v1/chat/completions", js({**chat, field: value, "stream": stream}),
                            stream, "4xx", param=field))
    # in range, so answered: top_p that is 0 in float32 keeps the likeliest token; top_k past the vocabulary is off
    for field, value in [("top_p", 1e-300), ("top_k", 2**63)]:
        for stream in (False, True):
            jobs.append(Job("float-extreme", "/v1/chat/completions",
                            js({**chat, field: value, "temperature": 1.0, "stream": stream}), stream, "complete"))
    # NaN and Infinity are not JSON (Python's parser would take them): the body is refused
    jobs.append(Job("float-extreme", "/v1/chat/completions",
                    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                    False, "4xx"))
    jobs.append(Job("float-extreme", "/v1/completions",
                    b'{"model": "tiny", "prompt": "hi", "top_p": Infinity, "stream": true}', True, "4xx"))
    for raw in (r'"\ud800 lone high"', r'"lone low \udfff"', r'"pair \ud83d\ude00 ok"'):
        for path in ("/v1/chat/completions", "/v1/messages"):
            body = ('{"model": "tiny", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": '
                    + raw + "}]}").encode()
            jobs.append(Job("surrogate", path, body, True, "complete"))
    jobs.append(Job("surrogate", "/v1/completions",
                    b'{"model": "tiny", "max_tokens": 4, "prompt": "\\udc80\\ud800x", "stream": true}', True,
                    "complete"))
    jobs.append(Job("cesu-bytes", "/v1/chat/completions",
                    b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                    False, "any-non-5xx"))
    for key, value in [("tools", [{"bogus": 1}]), ("add_generation_prompt", False), ("messages", "x"),
                       ("tokenize", True), ("enable_thinking", {"deep": [1]}), ("continue_final_message", True)]:
        jobs.append(Job("colliding-kwargs", "/v1/chat/completions",
                        js({**chat, "stream": True, "chat_template_kwargs": {key: value}}), True, "any-non-5xx"))
    for depth in (200, 5000, 100_000):
        nested = "[" * depth + "]" * depth
        body = ('{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ' + nested + "}").encode()
        jobs.append(Job("deep-nesting", "/v1/chat/completions", body, False, "4xx"))
        jobs.append(Job("deep-nesting", "/v1/messages",
                        ('{"model": "tiny", "max_tokens": 4, "messages": ' + nested + "}").encode(), False, "4xx"))
    big = "a" * (64 << 20)
    jobs.append(Job("oversize", "/v1/completions", js({"model": "tiny", "prompt": big, "max_tokens": 1}), False,
                    "4xx"))
    jobs.append(Job("oversize", "/v1/chat/completions",
                    js({**chat, "messages": [{"role": "user", "content": big}]}), False, "4xx"))
    jobs.append(Job("malformed", "/v1/chat/completions", b'{"model": "tiny", "messages": [', False, "4xx"))
    jobs.append(Job("malformed", "/v1/messages", b"\xff\xfe\x00garbage", False, "4xx"))
    rng.shuffle(jobs)
    return jobs


# --------------------------------------------------------------------------------------- client


def _is_error_object(path: str, payload: object) -> bool:
    if not isinstance(payload, dict):
        return False
    error = payload.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" not in error:
        return False
    return payload.get("type") == "error" if path.startswith("/v1/messages") else "param" in error


def _finished_properly(path: str, events: list[tuple[str | None, str]]) -> bool:
    """The stream ended the way each API ends a whole answer (a final chunk with its reason)."""
    if path.startswith("/v1/messages"):
        names = [e for e, _ in events]
        if not names or names[0] != "message_start" or names[-1] != "message_stop":
            return False
        deltas = [json.loads(d) for e, d in events if e == "message_delta"]
        return len(deltas) == 1 and deltas[0]["delta"]["stop_reason"] in ("max_tokens", "end_turn")
    if len(events) < 2 or events[-1][1] != "[DONE]":
        return False
    chunks = [json.loads(d) for _, d in events[:-1]]
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    if not reasons or reasons[-1] not in ("length", "stop") or any(reasons[:-1]):
        return False
    objects = {c.get("object") for c in chunks}
    return objects == {"chat.completion.chunk" if "chat" in path else "text_completion"}


async def _run(client: httpx.AsyncClient, job: Job) -> tuple[str, str]:
    """(outcome, detail): outcome is "ok", "hung-up" or a failure class."""
    headers = {"content-type": "application/json"}
    async with client.stream("POST", job.path, content=job.body, headers=headers) as r:
        if r.status_code >= 500:
            return "5xx", f"{r.status_code} {(await r.aread())[:300]!r}"
        if r.status_code != 200:
            raw = await r.aread()
            try:
                payload = json.loads(raw)
            except ValueError:
                return "bad-error-body", raw[:300].decode(errors="replace")
            if not _is_error_object(job.path, payload):
                return "bad-error-body", json.dumps(payload)[:300]
            if job.expect == "complete":
                return "unexpected-4xx", json.dumps(payload)[:300]
            if job.param is not None and r.status_code == 400 and payload["error"].get("param") != job.param \
                    and not job.path.startswith("/v1/messages"):
                return "param-not-named", json.dumps(payload)[:300]
            return "ok", str(r.status_code)
        if job.expect == "4xx":
            return "accepted-hostile", (await r.aread())[:300].decode(errors="replace")
        if not job.stream:
            payload = json.loads(await r.aread())
            return ("ok", "200") if "error" not in payload else ("error-in-200", json.dumps(payload)[:300])
        events, event = [], None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, line[len("data: "):]))
                event = None
                if job.hang_up_after is not None and len(events) >= job.hang_up_after:
                    return "hung-up", str(len(events))
        if any(e == "error" or '"error"' in d[:20] for e, d in events):
            return "error-event", str(events[-3:])[:300]
        if not _finished_properly(job.path, events):
            return "unfinished", str(events[-3:])[:300]
        return "ok", str(len(events))


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


def test_32_streams_with_disconnects_and_hostile_requests(server):
    proc, url, log = server
    rng = random.Random(7)
    healthy = [_healthy(rng, i) for i in range(HEALTHY)]
    hostile = _hostile(rng)
    jobs = healthy + hostile
    order = list(range(len(jobs)))
    rng.shuffle(order)

    async def main():
        limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def one(i: int):
                await asyncio.sleep(rng.random() * 2)  # arrivals spread over two seconds
                return await _run(client, jobs[i])

            results = await asyncio.gather(*(one(i) for i in order))
        return {i: res for i, res in zip(order, results)}

    results = asyncio.run(main())
    failures = [(jobs[i].kind, jobs[i].path, outcome, detail) for i, (outcome, detail) in results.items()
                if outcome not in ("ok", "hung-up")]
    tally = Counter((jobs[i].kind, outcome) for i, (outcome, _) in results.items())
    print(f"\nreliability: {len(jobs)} requests ({HEALTHY} healthy streams, {len(hostile)} hostile); "
          + ", ".join(f"{k}/{o}: {n}" for (k, o), n in sorted(tally.items())))
    assert not failures, "\n".join(map(str, failures)) + f"\nserver log:\n{log.read_text()[-3000:]}"
    hung_up = sum(outcome == "hung-up" for outcome, _ in results.values())
    assert hung_up == HEALTHY // 2

    # every block idle again, nothing running or queued, the same process still serving
    deadline = time.time() + 30
    while time.time() < deadline:
        if (_metric(url, "qwenrun_kv_cache_usage_perc") == 0 and _metric(url, "qwenrun_num_requests_running") == 0
                and _metric(url, "qwenrun_num_requests_waiting") == 0):
            break
        time.sleep(0.2)
    assert _metric(url, "qwenrun_kv_cache_usage_perc") == 0
    assert _metric(url, "qwenrun_num_requests_running") == 0 == _metric(url, "qwenrun_num_requests_waiting")
    assert proc.poll() is None
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                   "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counted = [s for f in text_string_to_metric_families(text) if f.name == "qwenrun_http_requests"
               for s in f.samples if s.name.endswith("_total")]
    assert sum(s.value for s in counted) >= len(jobs)
    assert not [s for s in counted if s.labels["status"].startswith("5") and s.value]
