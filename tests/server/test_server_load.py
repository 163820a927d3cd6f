"""The server under load, on a tiny random Qwen3 with the real vocabulary: concurrent streams give
exactly the outputs of each request run alone, and clients that leave mid-way free their KV blocks."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_server import serve, sse_events, wait_idle
from tiny import add_tokenizer, make_checkpoint

from qwenrun import LLM, SamplingParams
from qwenrun.tokenizer.reasoning import split_reasoning

VOCAB = 151936
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory, qwen3_tokenizer_dir):
    path, _ = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("random"), vocab_size=VOCAB,
                              max_position_embeddings=4096)
    add_tokenizer(path, qwen3_tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def server_llm(folder):
    # few sequences and small steps: requests queue, prefill in chunks and join mid-flight
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=32 << 20, max_model_len=4096,
               max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def server(server_llm):
    with serve(server_llm, name="tiny") as s:
        yield s


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 151643) for _ in range(rng.choice((3, 17, 64, 150, 300)))] for _ in range(n)]


def test_32_concurrent_streams_equal_each_request_alone(server, server_llm, folder):
    prompts = _prompts(24)
    chats = [[{"role": "user", "content": f"Tell me about {i} cats and {'dogs ' * i}"}] for i in range(8)]

    async def completion(client, prompt):
        stream = await client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def chat(client, messages):
        stream = await client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True,
            extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
        reasoning, content = "", ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        return reasoning or None, content or None

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        try:
            jobs = [completion(client, p) for p in prompts] + [chat(client, m) for m in chats]
            order = list(range(len(jobs)))
            random.Random(1).shuffle(order)  # long and short prompts interleaved
            results = await asyncio.gather(*(jobs[i] for i in order))
            return [results[order.index(i)] for i in range(len(jobs))]
        finally:
            await client.close()

    results = asyncio.run(run_all())
    wait_idle(server_llm)

    alone = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_model_len=4096,
                enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for prompt, (text, finish) in zip(prompts, results[: len(prompts)]):
        [ref] = alone.generate([prompt], params)
        assert text == ref.outputs[0].text and finish == "length"
    for messages, got in zip(chats, results[len(prompts):]):
        prompt = alone.render_chat(messages, enable_thinking=False)
        [ref] = alone.generate([prompt], params)
        # no tools were sent, so the server splits reasoning but parses no tool calls
        assert got == split_reasoning(ref.outputs[0].text, think_open_in_prompt=False)


def _counters(server) -> tuple[float, float]:
    """(generated tokens, aborted requests) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    totals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return totals["qwenrun_generation_tokens_total"], totals["qwenrun_requests_aborted_total"]


def _wait_aborted(server, server_llm, before: tuple[float, float], n: int = 1) -> tuple[float, float]:
    """Idle with every block free, long before the 3000 tokens asked for, and `n` more requests
    counted as aborted: the request was cancelled."""
    wait_idle(server_llm, timeout=15)
    after = _counters(server)
    assert after[0] - before[0] < 1000
    assert after[1] == before[1] + n, (before, after)
    return after


def test_clients_leaving_mid_stream_free_their_blocks(server, server_llm):
    long = {"temperature": 0, "max_tokens": 3000, "ignore_eos": True}
    prompt = _prompts(1, seed=5)[0]
    count = _counters(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        bodies = [
            ("/v1/completions", {"model": "tiny", "prompt": prompt, "stream": True, **long}),
            ("/v1/completions", {"model": "tiny", "prompt": [prompt, prompt[:5]], "n": 2, "stream": True, **long}),
            ("/v1/chat/completions", {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                                      **long}),
            ("/v1/messages", {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}], **long}),
        ]
        for path, body in bodies:
            with http.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 4:
                        break  # leaving the block closes the connection mid-stream
            assert seen >= 4
            count = _wait_aborted(server, server_llm, count, n=4 if body.get("n") else 1)  # 2 prompts x n=2

    # the official client, closing its stream object
    client = server.client()
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            **{k: v for k, v in long.items() if k != "ignore_eos"},
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    count = _wait_aborted(server, server_llm, count)

    # a non-streaming client that gives up (timeout) is a disconnect too
    with httpx.Client(base_url=server.url, timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, **long})
    _wait_aborted(server, server_llm, count)

    # and the server still answers
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").json() == {"status": "ok"}
        with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                          "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1][1] == "[DONE]" and json.loads(events[-2][1])["choices"][0]["finish_reason"] == "length"
