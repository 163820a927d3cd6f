"""`--data-parallel-size 2` on a local Ray cluster (`ray.init(num_cpus=2)`), through the HTTP server,
with the bundled model: greedy answers equal one engine's, a repeated prefix goes back to its
replica (and hits its cache there), a client that hangs up aborts its request on the replica, and a
replica killed with `ray.kill` fails the request it was streaming with an OpenAI-style error while
the server keeps serving on the survivor, which holds no leaked blocks; a request sent to a replica
that died is retried on the other before anything streamed; with none left, requests fail and
/health says 503.

One Ray cluster for the module (starting Ray costs seconds); each class launches its own replicas.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'qwenrun[distributed]')")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import qwenrun  # noqa: E402
from serving import Server  # noqa: E402
from qwenrun.sampling.params import SamplingParams  # noqa: E402

BUNDLED = str(Path(qwenrun.__file__).parent / "assets" / "qwen3-tiny-thinker")
LLM_KWARGS = dict(dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)
# ignore_eos streams this long take the bundled model ~2.5 s on one thread: time to act after the first chunk
LONG = 1000
QUESTIONS = ["What is 12 + 34?", "What is 305 + 417?", "What is 23 * 41?", "What is 88 - 19?"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def launch():
    """(engine, server) for DP=2 of the bundled model."""
    from qwenrun.distributed.ray_data_parallel import RayDataParallelEngine
    from qwenrun.server.app import create_app

    dp = RayDataParallelEngine.launch(BUNDLED, 2, **LLM_KWARGS)
    assert [i.num_threads for i in dp.infos] == [1, 1]  # a CPU each, of the cluster's two
    assert {p.device.type for p in dp.frontend.model.parameters()} == {"meta"}  # no weights in the front end
    app = create_app(dp.frontend, served_model_name="tiny", engine=dp)
    app.state.qwenrun.metrics.registry.register(dp.collector())
    return dp, Server(app)


def chat(question: str, max_tokens: int = 96) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens}


@contextmanager
def running_stream(server: Server, dp, body: dict, attempts: int = 5):
    """(replica, first data line, the rest of the lines) of a stream caught while its replica still
    runs it. On a busy machine the server may send a whole stream of the bundled model before this
    thread reads its first chunk; the stream is then drained and asked for again."""
    for _ in range(attempts):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            busy = [i for i, n in enumerate(dp.router.load) if n == 1]
            if busy:
                yield busy[0], first, lines
                return
            for _ in lines:
                pass
    pytest.fail(f"every one of {attempts} streams had finished before its first chunk was read")


def wait_idle(dp, timeout: float = 20.0) -> dict:
    """Every live replica's cache report once none holds a request (blocks all free, integrity ok)."""
    deadline = time.time() + timeout
    while True:
        reports = dp.cache_reports()
        if all(r["integrity"] != "busy" and r["num_free"] == r["num_blocks"] for r in reports.values()):
            break
        assert time.time() < deadline, f"replicas did not go idle: {reports}"
        time.sleep(0.1)
    for r in reports.values():
        assert r["integrity"] == "ok" and r["num_live"] == 0 and r["unfinished"] == 0, reports
    return reports


@pytest.fixture(scope="class")
def served():
    """Replicas and a server for each test class (a class that kills a replica gets its own)."""
    dp, server = launch()
    with server:
        yield dp, server
    dp.shutdown()


class TestServed:
    def test_greedy_equals_one_engine(self, served):
        from qwenrun.llm import LLM

        dp, server = served
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # together: both replicas take some
            answers = list(pool.map(lambda q: server.post("/v1/chat/completions", chat(q)), QUESTIONS))
        assert min(dp.router.routed) >= 1, dp.router.routed
        one = LLM(BUNDLED, **LLM_KWARGS)
        params = SamplingParams(temperature=0, max_tokens=96)
        for q, r in zip(QUESTIONS, answers):
            assert r.status_code == 200, r.text
            message = r.json()["choices"][0]["message"]
            [out] = one.chat([{"role": "user", "content": q}], params)
            ref = out.outputs[0]
            assert (message["content"], message.get("reasoning_content")) == (ref.content, ref.reasoning_content)
            assert r.json()["usage"]["completion_tokens"] == len(ref.token_ids)
        # streamed through the replicas: the same text, delta by delta
        body = {**chat(QUESTIONS[2]), "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as s:
            datas = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        chunks = [json.loads(d)["choices"][0]["delta"] for d in datas[:-1] if json.loads(d)["choices"]]
        [out] = one.chat([{"role": "user", "content": QUESTIONS[2]}], params)
        assert "".join(c.get("content") or "" for c in chunks) == out.outputs[0].content
        wait_idle(dp)

    def test_same_prefix_goes_to_the_same_replica(self, served):
        dp, server = served
        stats = lambda: ray.get([r.stats.remote() for r in dp.replicas])  # noqa: E731
        complete = lambda prompt: server.post("/v1/completions", {  # noqa: E731
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0})
        while dp.router.routed[0] != dp.router.routed[1]:  # unique prompts even the counts out
            assert complete(f"{sum(dp.router.routed)} + 1 =").status_code == 200
        long = "Please answer carefully and show each column of the sum. " * 3  # > 2 blocks
        p1, p2 = long + "What is 111 + 222?", "Tell me: " + long + "What is 333 + 444?"
        before = stats()
        placed = []
        for prompt in (p1, p2, p2 + " Thanks.", p1 + " Thanks."):
            seen = [s.prompt_tokens_seen for s in stats()]
            assert complete(prompt).status_code == 200
            [i] = [i for i, s in enumerate(stats()) if s.prompt_tokens_seen != seen[i]]  # who ran it
            placed.append(i)
        # least loaded alone would alternate; affinity sends each follow-up to its prefix's replica
        assert placed[0] != placed[1] and placed[2] == placed[1] and placed[3] == placed[0], placed
        hits = [a.prefix_hit_tokens - b.prefix_hit_tokens for a, b in zip(stats(), before)]
        assert min(hits) >= 2 * dp.infos[0].block_size, hits  # and each found its prefix cached there
        metrics = httpx.get(server.url + "/metrics").text
        assert f"qwenrun_router_affinity_hits_total {float(dp.router.affinity_hits)}" in metrics
        assert dp.router.affinity_hits >= 2
        wait_idle(dp)

    def test_client_gone_aborts_on_the_replica(self, served):
        dp, server = served
        body = {"model": "tiny", "prompt": "1 + 1 =", "max_tokens": LONG, "ignore_eos": True,
                "temperature": 0, "stream": True}
        aborted = sum(r["aborted"] for r in dp.cache_reports().values())
        with running_stream(server, dp, body) as (home, _, _):
            pass
        # the connection is closed: the replica cancels the stream and frees the blocks
        reports = wait_idle(dp)
        assert sum(r["aborted"] for r in reports.values()) == aborted + 1
        assert ray.get(dp.replicas[home].stats.remote()).running == 0

    def test_killed_replica_fails_its_stream_and_the_server_carries_on(self, served):
        dp, server = served
        body = {"model": "tiny", "prompt": "1 + 1 =", "max_tokens": LONG, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with running_stream(server, dp, body) as (victim, first, lines):
            ray.kill(dp.replicas[victim])
            events = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and f"replica {victim} died" in error["message"], error
        assert sum(len(json.loads(e)["choices"][0]["text"]) for e in events[:-2]) > 0  # some came first
        assert dp.router.live_replicas == [1 - victim]
        for q in QUESTIONS[:2]:
            r = server.post("/v1/chat/completions", chat(q, max_tokens=16))
            assert r.status_code == 200, r.text
        assert httpx.get(server.url + "/health").status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert "qwenrun_num_requests_running 0.0" in metrics
        assert f'qwenrun_replica_up{{replica="{victim}"}} 0.0' in metrics
        assert f'qwenrun_replica_up{{replica="{1 - victim}"}} 1.0' in metrics
        assert f'qwenrun_replica_num_requests_running{{replica="{1 - victim}"}} 0.0' in metrics
        assert f'replica="{victim}"' not in metrics.split("qwenrun_replica_num_requests_running")[-1]
        assert list(wait_idle(dp)) == [1 - victim]


class TestRetry:
    def test_request_on_a_dead_replica_is_retried_before_streaming(self, served):
        import asyncio

        dp, server = served
        prompt = "What is 45 + 45? " * 4
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        first = server.post("/v1/completions", body)
        assert first.status_code == 200
        [home] = [i for i, n in enumerate(dp.router.routed) if n == 1]
        ray.kill(dp.replicas[home])
        time.sleep(0.5)
        # Straight to the engine: the server's queue check (stats()) would notice the death first;
        # here the request goes where its prefix lives, to the dead replica, and must come back.
        req = dp.frontend.engine.make_request(dp.frontend.tokenizer.encode(prompt),
                                              SamplingParams(temperature=0, max_tokens=8), "retry-me")

        async def run() -> None:
            async for _ in dp.generate(req):
                pass

        asyncio.run(run())
        assert dp.retries == 1 and dp.router.live_replicas == [1 - home]
        assert req.finished and req.text == first.json()["choices"][0]["text"]
        r = server.post("/v1/completions", body)  # and the server goes on with the survivor
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == req.text
        assert list(wait_idle(dp)) == [1 - home]

    def test_no_replica_left(self, served):
        dp, server = served
        for i in dp.router.live_replicas:
            ray.kill(dp.replicas[i])
        time.sleep(0.5)
        r = server.post("/v1/completions", {"model": "tiny", "prompt": "1 + 1 =", "max_tokens": 4})
        assert r.status_code == 500 and "every data-parallel replica has died" in r.json()["error"]["message"], r.text
        assert httpx.get(server.url + "/health").status_code == 503
