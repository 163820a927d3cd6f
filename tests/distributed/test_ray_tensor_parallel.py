"""`--tensor-parallel-size 2 --distributed-executor-backend ray` on a local Ray cluster
(`ray.init(num_cpus=2)`), through the HTTP server, with the bundled model: greedy answers and
teacher-forced logits equal one process's, and a rank killed with `ray.kill` fails the next
requests with an OpenAI-style error instead of hanging the server."""

from __future__ import annotations

import threading
import socket
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'qwenrun[distributed]')")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import qwenrun  # noqa: E402
from qwenrun.sampling.params import SamplingParams  # noqa: E402

BUNDLED = str(Path(qwenrun.__file__).parent / "assets" / "qwen3-tiny-thinker")
LLM_KWARGS = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_model_len=512)
QUESTIONS = ["What is 12 + 34?", "What is 23 * 41?", "What is 88 - 19?"]


@pytest.fixture(scope="module")
def llms():
    from qwenrun.llm import LLM

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tp = LLM(BUNDLED, tensor_parallel_size=2, distributed_executor_backend="ray", **LLM_KWARGS)
    yield tp, LLM(BUNDLED, **LLM_KWARGS)
    tp.model.executor.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(llms):
    from qwenrun.server.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(llms[0], served_model_name="tiny"), log_level="warning",
                                        lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()


def chat(url: str, question: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 96})


def test_ranks_are_ray_actors_and_logits_match(llms):
    from qwenrun.distributed.ray_executor import RayExecutor

    tp, one = llms
    executor = tp.model.executor
    assert isinstance(executor, RayExecutor) and len(executor.workers) == 1
    ids = one.tokenizer.encode("12 + 34 = 46 and 5 * 6 = 30, so 23 * 41 = 943")
    a, b = tp.logits(ids), one.logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_moe_with_expert_parallelism_on_ray(llms, tmp_path):
    """A second model's ranks beside the first's (the cluster's other CPU): MoE experts spread whole."""
    import torch

    from qwenrun.llm import LLM
    from tiny import make_checkpoint

    folder, ref = make_checkpoint("moe-norm-topk", tmp_path / "moe")
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    tp = LLM(folder, tensor_parallel_size=2, enable_expert_parallel=True, distributed_executor_backend="ray", **kw)
    try:
        ids = list(range(3, 40))
        a, b = tp.logits(ids), LLM(folder, **kw).logits(ids)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
        assert ((a - want).abs().max() / want.abs().max()).item() <= 1e-4
    finally:
        tp.model.executor.close()


def test_greedy_through_the_server_equals_one_process(llms, server):
    _, one = llms
    params = SamplingParams(temperature=0, max_tokens=96)
    for q in QUESTIONS:
        r = chat(server, q)
        assert r.status_code == 200, r.text
        [out] = one.chat([{"role": "user", "content": q}], params)
        message = r.json()["choices"][0]["message"]
        assert (message["content"], message.get("reasoning_content")) == (out.outputs[0].content,
                                                                          out.outputs[0].reasoning_content)
        assert r.json()["usage"]["completion_tokens"] == len(out.outputs[0].token_ids)


def test_killed_rank_fails_requests_with_a_clear_error(llms, server):
    tp, _ = llms
    ray.kill(tp.model.executor.workers[0])
    time.sleep(1.0)
    for _ in range(2):  # the step that meets the dead rank, and every one after it
        start = time.time()
        r = chat(server, QUESTIONS[0])
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "tensor-parallel rank 1" in error["message"], error
        assert time.time() - start < 30  # an answer, not a wait for the group's timeout
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 200
    health = httpx.get(f"{server}/health", timeout=10)  # no step can run any more: say so to probes
    assert health.status_code == 503 and health.json()["status"] == "engine stopped", health.text
