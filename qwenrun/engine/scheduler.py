"""Continuous batching: which requests run each step, with how many tokens, in which blocks.

Policy (nano-vllm's): admit waiting requests as one prefill step whenever their prompts fit the
token budget and free blocks; otherwise run one decode step over every running request. Blocks are
allocated as sequences grow; when the pool runs dry, the most recently admitted request is preempted
(its blocks freed, its tokens recomputed later), so a full cache delays work but never corrupts it.
"""

from __future__ import annotations

from collections import deque

from qwenrun.engine.kv_cache import BlockPool
from qwenrun.engine.request import Request, ScheduledBatch, Status


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool, self.block_size = pool, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        total = req.num_computed_tokens + num_tokens
        return -(-total // self.block_size) - len(req.block_table)

    def schedule(self) -> ScheduledBatch | None:
        prefill: list[Request] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_new_tokens
            if prefill and n > budget:
                break
            need = self._blocks_needed(req, n)
            if need > self.pool.num_free:
                break
            req.block_table += self.pool.allocate(need)
            req.status = Status.RUNNING
            self.waiting.popleft()
            prefill.append(req)
            budget -= n
        if prefill:
            self.running += prefill
            return ScheduledBatch(prefill, [r.num_new_tokens for r in prefill])
        return self._schedule_decode()

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Request] = []
        for req in list(self.running):
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while self._blocks_needed(req, 1) > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                req.block_table += self.pool.allocate(self._blocks_needed(req, 1))
                scheduled.append(req)
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def finish(self, req: Request) -> None:
        """Frees the request's blocks at once (finished or aborted)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.free(req.block_table)
        req.block_table = []
        req.status = Status.FINISHED
