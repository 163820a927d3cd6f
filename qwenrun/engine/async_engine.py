"""AsyncEngine: the engine loop on its own thread, with per-request asyncio streams for the server.

The engine itself is single-threaded. Callers hand it requests and aborts through an inbox that
the loop drains between steps, and receive each step's deltas through their asyncio queue, so the
event loop never blocks on a forward pass and a disconnecting client frees its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qwenrun.engine.engine import LLMEngine
from qwenrun.engine.request import Request, StepDelta
from qwenrun.errors import InvalidRequestError, QwenrunError, RequestFailedError

logger = logging.getLogger(__name__)


class EngineOverloadedError(QwenrunError):
    """The waiting queue is full; the server answers 429 instead of queueing without limit."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    prompt_tokens_seen: int
    prefix_hit_tokens: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens_seen if self.prompt_tokens_seen else 0.0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[StepDelta | BaseException]]] = {}
        self._pending = 0  # submitted but not yet taken by the loop
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="qwenrun-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side (event loop)
    async def generate(self, req: Request) -> AsyncIterator[StepDelta]:
        """Yields the request's deltas until it finishes; leaving early (client gone) aborts it."""
        with self._lock:
            if len(self.engine.scheduler.waiting) + self._pending >= self.max_waiting:
                raise EngineOverloadedError(f"too many queued requests ({self.max_waiting}); retry later")
            self._pending += 1
        q: asyncio.Queue[StepDelta | BaseException] = asyncio.Queue()
        self._streams[req.request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", req))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._inbox.put(("abort", req.request_id))

    def stats(self) -> EngineStats:
        pool = self.engine.pool
        return EngineStats(
            running=len(self.engine.scheduler.running),
            waiting=len(self.engine.scheduler.waiting) + self._pending,
            kv_blocks_used=pool.num_blocks - pool.num_free,
            kv_blocks_total=pool.num_blocks,
            preemptions=self.engine.scheduler.stats.preemptions,
            prompt_tokens_seen=self.engine.scheduler.stats.prompt_tokens_seen,
            prefix_hit_tokens=self.engine.scheduler.stats.prefix_hit_tokens,
        )

    @property
    def alive(self) -> bool:
        """The engine loop is running and accepting work, and the model can still run a step (a
        tensor-parallel model whose rank has died cannot): what /health reports."""
        return self._thread.is_alive() and not self._stopped and getattr(self.engine.model, "healthy", True)

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    # ----------------------------------------------------------------------- engine thread
    def _drain(self, block: bool) -> None:
        try:
            kind, item = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if kind == "add":
                assert isinstance(item, Request)
                with self._lock:
                    self._pending -= 1
                if item.request_id in self._streams:
                    self._add(item)
            elif kind == "abort":
                assert isinstance(item, str)
                self.engine.abort(item)
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, req: Request) -> None:
        try:
            self.engine.add(req)
        except QwenrunError as e:
            self._send(req.request_id, e)
        except Exception as e:  # a bug, but this request's alone
            logger.exception("adding request %s failed", req.request_id)
            self._send(req.request_id, RequestFailedError(f"the engine could not start this request: "
                                                          f"{type(e).__name__}: {e}"))

    def _send(self, request_id: str, item: StepDelta | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, q = stream
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is left to read it
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def _deliver(self, delta: StepDelta) -> None:
        req = delta.request
        if req.finish_reason == "error" and isinstance(req.failure, InvalidRequestError):
            self._send(req.request_id, req.failure)  # the client's to fix: a 400, not a 500
        elif req.finish_reason == "error":
            self._send(req.request_id, RequestFailedError(
                f"the engine failed while serving this request ({req.error}); "
                "other requests are unaffected"))
        else:
            self._send(req.request_id, delta)

    def _loop(self) -> None:
        """Never exits but on shutdown: `LLMEngine.step` fails a failing request alone, and any
        other exception (a bug outside the step's per-request guards) fails only the requests
        the engine holds, which it then drops."""
        while not self._stopped:
            try:
                self._drain(block=not self.engine.has_unfinished_requests())
                if not self.engine.has_unfinished_requests():
                    continue
                for d in self.engine.step():
                    self._deliver(d)
            except Exception as e:
                logger.exception("the engine loop failed; failing the requests it holds")
                for req in self.engine.unfinished_requests():
                    try:
                        self._deliver(self.engine.fail(req, e))
                    except Exception:
                        logger.exception("could not fail request %s", req.request_id)
