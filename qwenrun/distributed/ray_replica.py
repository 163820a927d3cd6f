"""One data-parallel replica: a whole engine (`LLM` plus its `AsyncEngine` loop) inside a Ray actor.

The actor is async: `generate` streams a request's deltas back (a Ray streaming generator, one
object per step that produced tokens) while `abort`, `stats` and `cache_report` answer at once,
since they all share the actor's event loop and the engine steps on its own thread.

What travels: the request as (id, prompt ids, `SamplingParams`, images and videos), rebuilt here by
the replica's own `make_request` (its tokenizer, its grammar compile), and back only what the
front end's mirror of the request needs (`ReplicaDelta`). Detokenizers, generators and grammar
matchers never cross the wire. Errors come back as `ReplicaFailure` items, not raised exceptions:
a pickled `QwenrunError` loses its `param` and Ray would wrap it in a `RayTaskError`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun import errors
from qwenrun.engine import async_engine
from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.errors import QwenrunError
from qwenrun.sampling.params import SamplingParams


@dataclass(frozen=True)
class ReplicaInfo:
    index: int
    max_model_len: int
    block_size: int
    enable_prefix_caching: bool
    device: str
    num_threads: int
    pid: int
    node: str


@dataclass(frozen=True)
class ReplicaDelta:
    """One step of a request on a replica. `text` (the whole output text) comes with the last one,
    where a stop string may have cut text the replica still held back."""

    new_token_ids: list[int]
    text_delta: str
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None


@dataclass(frozen=True)
class ReplicaFailure:
    """A `QwenrunError` the replica's engine raised for a request, by class name."""

    kind: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, exc: QwenrunError) -> ReplicaFailure:
        return cls(type(exc).__name__, str(exc), getattr(exc, "param", None))

    def error(self) -> QwenrunError:
        """The error as the front end raises it (the server maps it to its HTTP answer)."""
        kind = getattr(errors, self.kind, None) or getattr(async_engine, self.kind, None)
        if kind is errors.InvalidRequestError:
            return errors.InvalidRequestError(self.message, param=self.param)
        if isinstance(kind, type) and issubclass(kind, QwenrunError):
            return kind(self.message)
        return errors.RequestFailedError(self.message)


class EngineReplica:
    """The actor's class (`ray.remote(...)(EngineReplica)`; see `ray_data_parallel.launch_replicas`).

    Args:
        index: the replica's number (names it in errors and metrics).
        model: checkpoint folder or hub id, as `LLM` takes it.
        llm_kwargs: the rest of `LLM`'s arguments.
        max_waiting: the replica's queue bound (its `AsyncEngine` answers 429 past it).
        num_threads: torch's intra-op threads: the CPUs the replica's placement bundle holds.
    """

    def __init__(self, index: int, model: str, llm_kwargs: dict[str, Any], max_waiting: int,
                 num_threads: int) -> None:
        import torch

        from qwenrun.llm import LLM

        torch.set_num_threads(num_threads)  # the bundle's CPUs, not the whole machine's
        self.index = index
        self.llm = LLM(model, **llm_kwargs)
        self.engine = async_engine.AsyncEngine(self.llm.engine, max_waiting=max_waiting)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.aborted = 0  # requests ended by `abort` (their clients went away)

    def info(self) -> ReplicaInfo:
        import torch

        engine = self.llm.engine
        return ReplicaInfo(self.index, engine.max_model_len, engine.cache.block_size,
                           engine.cache.enable_prefix_caching, str(self.llm.device),
                           torch.get_num_threads(), os.getpid(), socket.gethostname())

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       mm_items: Sequence[MultimodalItem] = ()) -> AsyncIterator[ReplicaDelta | ReplicaFailure]:
        """The request's deltas until it finishes; `abort(request_id)` ends it early (its blocks
        are freed at the engine's next step)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks[request_id] = task
        try:
            # a grammar's first compile may take a while: not on the actor's event loop
            req = await asyncio.to_thread(self.llm.engine.make_request, prompt_token_ids, params,
                                          request_id, mm_items)
            sent_logprobs = 0
            async for d in self.engine.generate(req):
                r = d.request
                logprobs = None
                if r.logprobs is not None:
                    logprobs, sent_logprobs = r.logprobs[sent_logprobs:], len(r.logprobs)
                if d.finished:
                    yield ReplicaDelta(d.new_token_ids, d.text_delta, logprobs, True, r.finish_reason,
                                       r.stop_reason, r.text)
                    return
                yield ReplicaDelta(d.new_token_ids, d.text_delta, logprobs, False)
        except QwenrunError as e:
            yield ReplicaFailure.of(e)
        finally:
            self._tasks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop streaming `request_id`: the cancelled stream aborts it in the engine."""
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()
            self.aborted += 1

    def stats(self) -> async_engine.EngineStats:
        return self.engine.stats()

    def cache_report(self) -> dict[str, Any]:
        """Block counts, requests aborted so far, and `CacheManager.check_integrity` run when the
        replica is idle ("busy" otherwise: the engine thread may be changing the cache under it)."""
        engine = self.llm.engine
        pool = engine.pool
        report: dict[str, Any] = {"num_blocks": pool.num_blocks, "num_free": pool.num_free,
                                  "num_live": engine.cache.num_live,
                                  "unfinished": len(engine.unfinished_requests()), "aborted": self.aborted}
        if engine.has_unfinished_requests() or self._tasks:
            report["integrity"] = "busy"
            return report
        try:
            engine.cache.check_integrity()
            report["integrity"] = "ok"
        except AssertionError as e:
            report["integrity"] = f"broken: {e}"
        return report

    def shutdown(self) -> None:
        self.engine.shutdown()
