"""How many tokens to draft for a request this step: as many as its acceptance rate pays for, and none
when the step is already compute-bound.

A verified draft costs a row of the step whether or not it is accepted. On CPU a decode step reads
every weight once whatever its row count, so a row costs a small fraction `row_cost` of a one-token
step (the issue's target, 4 drafts verified in <= 1.3x one step, is 0.075 a row; `benchmarks/
spec_bench.py` measures it) while the step's decode rows stay few; once they are many, the step is compute-bound and a draft
costs about what a whole decode row does, so drafting stops (`disable_by_batch_size`).

With per-token acceptance rate `a`, k drafts yield `1 + a + ... + a^k` tokens for `1 + row_cost * k`
of the cost; the policy drafts the k that maximises the ratio. `a` is estimated per request as the
decayed ratio of accepted drafts to drafts tested (accepted ones, plus the first rejected one: the
drafts after a rejection were never tested), so a request whose text stopped repeating soon drafts
less. When no k pays (`a` below about `row_cost`), it drafts one token every `probe_every` steps so
that a request whose text starts repeating again is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenrun.spec_decode.config import SpeculativeConfig

ROW_COST = 0.1  # a verified row / a one-token step: a little above the 0.075 the 1.3x target allows
DECAY = 0.8  # weight of the history per observation: the estimate follows the last ~5 drafts
PROBE_EVERY = 8  # steps between one-token probes once drafting does not pay


@dataclass
class _Acceptance:
    tested: float = 0.0  # decayed count of drafts the target model checked
    accepted: float = 0.0
    idle_steps: int = 0  # steps without drafting since the last probe


class DraftPolicy:
    """Per-request draft lengths and the counts Prometheus exports (`num_drafts`,
    `accepted_per_position`). The scheduler asks `draft_length` for each decoding request, reports
    each verified draft to `observe`, and calls `forget` when the request leaves."""

    def __init__(self, num_speculative_tokens: int, disable_by_batch_size: int | None = None,
                 adaptive: bool = True, row_cost: float = ROW_COST, decay: float = DECAY,
                 probe_every: int = PROBE_EVERY) -> None:
        self.max_k, self.disable_by_batch_size, self.adaptive = num_speculative_tokens, disable_by_batch_size, adaptive
        self.row_cost, self.decay, self.probe_every = row_cost, decay, probe_every
        self.requests: dict[str, _Acceptance] = {}
        self.num_drafts = 0  # steps in which a request had drafts verified
        self.accepted_per_position = [0] * num_speculative_tokens  # [i]: drafts accepted at position i

    @classmethod
    def from_config(cls, config: SpeculativeConfig) -> DraftPolicy:
        return cls(config.num_speculative_tokens, config.disable_by_batch_size, config.adaptive_draft_length)

    def draft_length(self, request_id: str, num_decoding: int) -> int:
        """Drafts to ask for this step, 0 to `num_speculative_tokens`; `num_decoding`: the requests
        decoding in this step (each a row even without drafts)."""
        if self.disable_by_batch_size is not None and num_decoding >= self.disable_by_batch_size:
            return 0
        state = self.requests.get(request_id)
        if not self.adaptive or state is None or state.tested == 0:
            return self.max_k  # nothing known yet: the first draft measures
        k = self.best_length(state.accepted / state.tested)
        if k:
            return k
        state.idle_steps += 1
        if state.idle_steps >= self.probe_every:
            state.idle_steps = 0
            return 1
        return 0

    def best_length(self, rate: float) -> int:
        """The k in 0..num_speculative_tokens with the most expected tokens per unit of step cost."""
        best, best_value, expected = 0, 1.0, 1.0
        for k in range(1, self.max_k + 1):
            expected += rate**k
            value = expected / (1 + self.row_cost * k)
            if value > best_value:
                best, best_value = k, value
        return best

    def observe(self, request_id: str, drafted: int, accepted: int) -> None:
        """A step verified `drafted` drafts of the request and kept the first `accepted`."""
        assert 0 <= accepted <= drafted <= self.max_k, (accepted, drafted)
        if drafted == 0:
            return
        self.num_drafts += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        state = self.requests.setdefault(request_id, _Acceptance())
        state.tested = self.decay * state.tested + accepted + (accepted < drafted)
        state.accepted = self.decay * state.accepted + accepted
        state.idle_steps = 0

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
