"""One bad request must not take everyone down.

A fault injected for one request (a SamplingParams that bypassed validation, a forward that
raises when the request's tokens are in the batch, sampling that fails after the draws, a
detokenizer that raises) fails that request alone: the healthy requests beside it finish with
the tokens they get alone, the engine keeps serving, and every KV block comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.engine.async_engine import AsyncEngine
from qwenrun.engine.engine import LLMEngine
from qwenrun.engine.request import Request
from qwenrun.errors import RequestFailedError
from qwenrun.layers.forward_batch import ForwardBatch
from tiny import make_checkpoint

HEALTHY, MAX_TOKENS = 16, 32


@pytest.fixture(scope="module", params=["dense-untied-gqa2", "next-interval4-moe"])
def checkpoint(request, tmp_path_factory):
    """A dense model and a hybrid one, whose recurrent state a failed step must leave as it was."""
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp("isolation"))
    return folder, ref.config.vocab_size


def _llm(folder) -> LLM:
    return LLM(folder, dtype="float32", kv_cache_memory=32 << 20, block_size=8)


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _seeded() -> SamplingParams:
    return SamplingParams(temperature=0.9, top_k=40, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(checkpoint) -> list[list[int]]:
    """Healthy prompts; none contains the marker token (the vocabulary's last id)."""
    _, vocab = checkpoint
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (HEALTHY + 1,), generator=gen).tolist()
    return [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def solo(checkpoint) -> Callable[[list[int], SamplingParams], list[int]]:
    """Reference: each prompt alone in its own engine."""
    folder, _ = checkpoint
    llm = _llm(folder)
    cache: dict[tuple, list[int]] = {}

    def run(prompt: list[int], params: SamplingParams) -> list[int]:
        key = (tuple(prompt), params.seed)
        if key not in cache:
            cache[key] = llm.generate([prompt], params)[0].outputs[0].token_ids
        return cache[key]

    return run


def _assert_idle_and_whole(engine: LLMEngine) -> None:
    engine.cache.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks
    slots = engine.cache.slots
    assert slots is None or slots.num_free + slots.num_checkpoints == slots.num_slots
    assert not engine.has_unfinished_requests() and not engine.unfinished_requests()


# ---------------------------------------------------------------------------- fault injection

class FaultyForward:
    """Wraps the model: the forward raises whenever the batch holds the poisoned prompt (eight
    marker tokens in a row; a healthy request may sample the marker, but not eight times over)."""

    def __init__(self, model: torch.nn.Module, marker: int, after: bool = False) -> None:
        self.model, self.marker, self.after = model, marker, after
        self.failed_batch_tokens: list[int] = []

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        hits = (batch.input_ids == self.marker).int()
        if hits.numel() >= 8 and bool((hits.unfold(0, 8, 1).sum(1) == 8).any()):
            self.failed_batch_tokens.append(batch.num_tokens)
            if self.after:  # every layer has written its cache: K/V, and a hybrid model's new state
                self.model(batch)
            raise RuntimeError("injected forward fault")
        return self.model(batch)

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)


class ExplodingDetokenizer:
    def add(self, ids: list[int]) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")

    def flush(self) -> str:
        return ""


def _poison(kind: str, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch,
            vocab: int) -> tuple[list[int], SamplingParams, Callable[[Request], None]]:
    """(prompt, params, request hook) of a poisoned request, with its fault installed."""
    prompt, params, hook = [3, 1, 4, 1, 5, 9, 2, 6], _greedy(), (lambda req: None)
    if kind == "overflowing value past validation":
        params.temperature = 10**400  # type: ignore[assignment]  # float32 cannot hold it
    elif kind in ("forward raises", "forward raises after every layer ran"):
        prompt = [vocab - 1] * 8
        monkeypatch.setattr(engine.runner, "model",
                            FaultyForward(engine.runner.model, vocab - 1, after=kind != "forward raises"))
    elif kind == "sampling raises after the draws":
        from qwenrun.engine import runner

        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=7)
        real = runner.compute_logprobs

        def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
            if k == 7:  # only the poisoned request asks for logprobs
                raise RuntimeError("injected logprobs fault")
            return real(logits, tokens, k)

        monkeypatch.setattr(runner, "compute_logprobs", compute_logprobs)
    elif kind == "detokenizer raises":
        def hook(req: Request) -> None:
            req.detokenizer = ExplodingDetokenizer()  # type: ignore[assignment]
    else:
        raise AssertionError(kind)
    return prompt, params, hook


FAULTS = ["overflowing value past validation", "forward raises", "forward raises after every layer ran",
          "sampling raises after the draws", "detokenizer raises"]


# ------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", FAULTS)
def test_poisoned_request_among_16_streams_fails_alone(kind, checkpoint, prompts, solo,
                                                       monkeypatch) -> None:
    folder, vocab = checkpoint
    llm = _llm(folder)
    engine = llm.engine
    bad_prompt, bad_params, hook = _poison(kind, engine, monkeypatch, vocab)
    params = [_greedy() for _ in range(HEALTHY - 1)] + [_seeded()]
    aengine = AsyncEngine(engine)
    finished_when_poison_failed: list[int] = []

    async def stream(req: Request, first: asyncio.Event | None = None) -> list[int]:
        tokens: list[int] = []
        async for d in aengine.generate(req):
            tokens += d.new_token_ids
            if first is not None:
                first.set()
        return tokens

    async def main() -> tuple[list[list[int]], BaseException | None, list[int]]:
        firsts = [asyncio.Event() for _ in range(HEALTHY)]
        reqs = [engine.make_request(p, sp, f"healthy-{i}")
                for i, (p, sp) in enumerate(zip(prompts, params))]
        tasks = [asyncio.create_task(stream(r, e)) for r, e in zip(reqs, firsts)]
        await asyncio.gather(*(e.wait() for e in firsts))  # every stream is mid-answer
        poisoned = engine.make_request(bad_prompt, bad_params, "poisoned")
        hook(poisoned)
        error: BaseException | None = None
        try:
            await stream(poisoned)
        except RequestFailedError as e:
            error = e
        finished_when_poison_failed.append(sum(t.done() for t in tasks))
        outputs = await asyncio.gather(*tasks)
        later = await stream(engine.make_request(prompts[-1], _greedy(), "later"))
        return outputs, error, later

    try:
        outputs, error, later = asyncio.run(asyncio.wait_for(main(), timeout=300))
    finally:
        aengine.shutdown()
    assert isinstance(error, RequestFailedError), f"the poisoned request got {error!r}"
    assert "other requests are unaffected" in str(error)
    assert finished_when_poison_failed[0] < HEALTHY  # it failed while the others were streaming
    for prompt, sp, out in zip(prompts, params, outputs):
        assert out == solo(prompt, sp)
    assert later == solo(prompts[-1], _greedy())  # the engine is alive and still exact
    if kind == "forward raises":
        faulty = engine.runner.model
        assert isinstance(faulty, FaultyForward)
        assert max(faulty.failed_batch_tokens) > len(bad_prompt)  # batched with healthy ones
    _assert_idle_and_whole(engine)


@pytest.mark.parametrize("kind", ["overflowing value past validation", "forward raises",
                                  "sampling raises after the draws"])
def test_offline_generate_keeps_the_other_prompts_results(kind, checkpoint, prompts, solo,
                                                          monkeypatch) -> None:
    """LLM.generate: the failing prompt ends with finish_reason "error", the rest as alone
    (the seeded one too: a failed step leaves its generator where it was)."""
    folder, vocab = checkpoint
    llm = _llm(folder)
    bad_prompt, bad_params, _ = _poison(kind, llm.engine, monkeypatch, vocab)
    healthy = prompts[:4]
    params = [_greedy(), _seeded(), _greedy(), _greedy()]
    outs = llm.generate(healthy[:2] + [bad_prompt] + healthy[2:],
                        params[:2] + [bad_params] + params[2:])
    bad = outs.pop(2).outputs[0]
    assert bad.finish_reason == "error" and bad.error
    for prompt, sp, out in zip(healthy, params, outs):
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == solo(prompt, sp)
    _assert_idle_and_whole(llm.engine)


def test_engine_loop_survives_a_failure_outside_any_request(checkpoint, prompts, solo,
                                                            monkeypatch) -> None:
    """A bug in scheduling fails the requests the engine holds; the loop keeps serving."""
    folder, _ = checkpoint
    llm = _llm(folder)
    engine = llm.engine
    real = engine.scheduler.schedule
    calls = {"n": 0}

    def schedule():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected scheduler fault")
        return real()

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    aengine = AsyncEngine(engine)

    async def stream(req: Request) -> list[int] | BaseException:
        tokens: list[int] = []
        try:
            async for d in aengine.generate(req):
                tokens += d.new_token_ids
        except RequestFailedError as e:
            return e
        return tokens

    async def main():
        first = await asyncio.gather(*(stream(engine.make_request(p, _greedy(), f"r{i}"))
                                       for i, p in enumerate(prompts[:4])))
        later = await stream(engine.make_request(prompts[5], _greedy(), "later"))
        return first, later

    try:
        first, later = asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        aengine.shutdown()
    assert all(isinstance(r, RequestFailedError) for r in first)
    assert later == solo(prompts[5], _greedy())
    _assert_idle_and_whole(engine)


def test_extreme_accepted_values_finish_normally(checkpoint, prompts) -> None:
    """Values at the edge of every range run end to end: top_p 1e-300 (0 in float32) on the
    top-k path once raised "index -1 is out of bounds" and took the batch down."""
    folder, vocab = checkpoint
    llm = _llm(folder)
    def edge(**kwargs: object) -> SamplingParams:
        return SamplingParams(max_tokens=12, ignore_eos=True, **kwargs)  # type: ignore[arg-type]

    extremes = [
        edge(top_p=1e-300, top_k=20, seed=1),
        edge(temperature=1e-5, repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=2),
        edge(temperature=2, min_p=1, top_k=2**40, seed=2**64 - 1),
        edge(logprobs=10**6, min_tokens=12, stop_token_ids=[2**31 - 1]),
    ]
    outs = llm.generate(prompts[:4], extremes)
    for out in outs:
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
    assert all(0 <= t < vocab for o in outs for t in o.outputs[0].token_ids)
    assert len(outs[3].outputs[0].logprobs[0]) == vocab  # more than the vocabulary: all of it
    _assert_idle_and_whole(llm.engine)


def test_chat_stream_raises_the_failure_of_its_conversation(monkeypatch) -> None:
    """One conversation has no bystanders: its failure reaches the caller (the CLI's red line)."""
    from qwenrun.tokenizer.tokenizer import IncrementalDetokenizer
    from qwenrun.train.recipe import BUNDLED

    llm = LLM(str(BUNDLED), dtype="float32", kv_cache_memory=8 << 20)

    def add(self, ids):
        raise RuntimeError("injected detokenizer fault")

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    with pytest.raises(RequestFailedError, match="injected detokenizer fault"):
        for _ in llm.chat_stream([{"role": "user", "content": "What is 2 + 3?"}],
                                 SamplingParams(temperature=0, max_tokens=8)):
            pass
    _assert_idle_and_whole(llm.engine)
