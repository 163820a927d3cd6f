"""Continuous batching: which requests run each step, with how many tokens, in which blocks.

Each step spends a token budget: first one token for every running request that is decoding (or the
next chunk of one still prefilling), then chunks of waiting prompts, so a long prompt is prefilled a
chunk per step while the others keep decoding. A prompt starting with cached blocks (same system
prompt, same history) shares them and computes only the rest. Blocks are allocated as sequences
grow; when the pool runs dry, the most recently admitted request is preempted (blocks freed, tokens
recomputed later — mostly from the prefix cache), so a full cache delays work but never corrupts it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwenrun.engine.cache import CacheManager
from qwenrun.engine.request import Request, ScheduledBatch, Status, StepResult
from qwenrun.spec_decode.ngram import Proposer
from qwenrun.spec_decode.policy import DraftPolicy


@dataclass
class SchedulerStats:
    preemptions: int = 0
    prompt_tokens_seen: int = 0  # prompt (or recomputed) tokens of admitted requests
    prefix_hit_tokens: int = 0  # of those, tokens served from the prefix cache
    draft_tokens: int = 0  # speculative tokens verified (each one a scheduled position)
    accepted_tokens: int = 0  # of those, the ones the target model agreed with


class Scheduler:
    """Owns the request queues and the `CacheManager`; checks the cache's integrity whenever the
    last request leaves (nothing running or waiting)."""

    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: DraftPolicy | None = None, proposer: Proposer | None = None, lookahead: int = 0) -> None:
        """With a `policy`, drafts for each decoding request as many as it says, verified in the
        request's step (`ModelRunner.execute`): the `proposer`'s, or else a drafter's
        (`Request.drafts`, made by the runner in the step before), whose chain runs into `lookahead`
        positions past a sampling chunk, allocated when blocks are free after everything else is
        scheduled."""
        self.cache = cache
        self.policy, self.proposer, self.lookahead = policy, proposer, lookahead
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        reqs: list[Request] = []
        counts: list[int] = []
        drafts: list[list[int]] = []
        num_decoding = sum(r.num_new_tokens == 1 for r in self.running)
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            draft = self._propose(req, budget - 1, num_decoding)
            n = self.cache.chunk(req, min(req.num_new_tokens, budget)) + len(draft)
            if self._grow(req, n):
                reqs.append(req)
                counts.append(n)
                drafts.append(draft)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(req)
            reqs.append(req)
            counts.append(n)
            drafts.append([])
            budget -= n
        if not reqs:
            return None
        batch = ScheduledBatch(reqs, counts, drafts)
        for req, n, samples in zip(reqs, counts, batch.samples):
            # no slot past the request's last possible position
            extra = min(self.lookahead, req.num_prompt_tokens + req.max_new_tokens - req.num_computed_tokens - n)
            if samples and extra > 0 and self.cache.can_allocate(req, n + extra):
                self.cache.allocate(req, n + extra)
        return batch

    def _propose(self, req: Request, budget: int, num_decoding: int) -> list[int]:
        """Drafts for a decoding request: no more than fit the token budget and its max_tokens (so no
        position passes the context window), none while a forced thinking close is queued (those
        tokens replace whatever the step samples), and none when their blocks are not free (a
        draft never preempts anyone); the policy's length first (the request's acceptance rate, and
        none in a step of `num_decoding` requests that is compute-bound already)."""
        if self.policy is None or req.num_new_tokens != 1 or req.thinking.forced:
            return []
        k = min(self.policy.draft_length(req.request_id, num_decoding), budget,
                req.max_new_tokens - req.num_output_tokens - 1)
        if k < 1:
            return []
        draft = self.proposer.propose(req.token_ids, k) if self.proposer is not None else req.drafts[:k]
        if draft and not self.cache.can_allocate(req, 1 + len(draft)):
            return []
        return draft

    def _grow(self, req: Request, n: int) -> bool:
        """Blocks for n more tokens of a running request, preempting from the back; False if req itself went."""
        while not self.cache.can_allocate(req, n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self.cache.allocate(req, n)
        return True

    def _admit(self, req: Request, budget: int) -> int:
        """Share cached prefix blocks (and a hybrid model's state checkpoint) and allocate the first
        chunk; 0 if it does not fit yet (blocks, or state slots for a hybrid model)."""
        hit = self.cache.match(req)
        n = min(len(req.token_ids) - hit.num_tokens, budget)
        if not self.cache.can_admit(hit, n):
            return 0
        self.cache.take(req, hit)
        req.num_computed_tokens = hit.num_tokens
        n = self.cache.chunk(req, n)
        self.cache.allocate(req, n)
        req.status = Status.RUNNING
        self.stats.prompt_tokens_seen += len(req.token_ids)
        self.stats.prefix_hit_tokens += hit.num_tokens
        return n

    def update(self, batch: ScheduledBatch, result: StepResult) -> None:
        """Count each request's scheduled chunk as computed once its step succeeded, and commit it
        (the blocks that became full, a hybrid model's new state).

        The one place request progress advances (the runner changes nothing): a request whose step
        failed (`result.errors`) stays as it was scheduled, so it can be run again or failed. What
        the sampled tokens mean (forced text, stops) is the engine's part; it appends them after.
        """
        for req, n, drafts, tokens, error, proposal in zip(batch.requests, batch.num_tokens, batch.drafts,
                                                            result.token_ids, result.errors, result.drafts):
            if error is None:
                req.num_computed_tokens += n
                req.drafts = proposal
                accepted = len(tokens) - 1 if drafts else 0
                if drafts:
                    self.stats.draft_tokens += len(drafts)
                    self.stats.accepted_tokens += accepted
                    self.policy.observe(req.request_id, len(drafts), accepted)  # type: ignore[union-attr]
                    req.num_computed_tokens -= len(drafts) - accepted
                self.cache.commit(req, len(drafts), accepted)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget the K/V of `req`'s last `num_tokens` computed tokens: rejected drafts, or accepted
        ones the engine did not keep (a forced thinking close replaces them)."""
        self.cache.rollback(req, num_tokens)
        req.num_computed_tokens -= num_tokens

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _release(self, req: Request) -> None:
        self.cache.free(req)
        req.num_computed_tokens = 0

    def finish(self, req: Request) -> None:
        """Frees the request's blocks at once (finished or aborted); the last one out checks the cache."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        if self.policy is not None:
            self.policy.forget(req.request_id)
        if not self.has_unfinished():
            self.cache.check_integrity()
