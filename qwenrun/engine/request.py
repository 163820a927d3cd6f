"""The engine's data: requests as they move through the scheduler, and what each step hands back."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.engine.kv_cache import CacheHandle
from qwenrun.sampling.params import SamplingParams
from qwenrun.structured.backend import GrammarMatcher
from qwenrun.tokenizer.tokenizer import IncrementalDetokenizer

# Qwen's documented early-stop text for a spent thinking budget (Qwen3 quickstart, "Thinking Budget").
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now."
    "\n</think>\n\n"
)


def think_open_in_prompt(prompt_ids: list[int], start_id: int | None, end_id: int | None) -> bool:
    """True when the prompt ends inside an open <think> (templates like Thinking-2507 open it themselves)."""
    for t in reversed(prompt_ids):
        if t in (start_id, end_id):
            return t == start_id
    return False


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Thinking:
    """Reasoning bookkeeping of one request, and the tokens the engine forces to close it.

    `close_at` caps the output length at which an open reasoning block is closed, so that a request
    limited by max_tokens still gets the early-stop text, `</think>` and room for an answer.
    """

    start_id: int | None
    end_id: int | None
    early_stop_ids: tuple[int, ...]
    budget: int | None
    close_at: int | None
    open: bool = False
    tokens: int = 0
    forced: deque[int] = field(default_factory=deque)

    def observe(self, token: int, num_output: int) -> None:
        """Account for one appended output token; queue the early-stop text when a limit is hit."""
        if token == self.start_id and not self.open:
            self.open, self.tokens = True, 0
        elif token == self.end_id:
            self.open = False  # forced tokens after </think> (the "\n\n") still follow
            return
        elif self.open:
            self.tokens += 1
        self.check_limits(num_output)

    def check_limits(self, num_output: int) -> None:
        """Queue the close once the budget or the max_tokens reserve is reached (a budget of 0
        closes right after <think>, or before the first token when the prompt opened it)."""
        if not self.open or self.forced:
            return
        over_budget = self.budget is not None and self.tokens >= self.budget
        if over_budget or (self.close_at is not None and num_output >= self.close_at):
            self.forced.extend(self.early_stop_ids)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    thinking: Thinking
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    # Where the next turn of a chat may diverge from this prompt: the last `<|im_start|>` (the
    # header the model answers under), else the prompt's end. Hybrid models checkpoint their state
    # at the block boundary before it, so the next turn resumes there.
    junction: int | None = None
    # vision-language models: the prompt's images and videos, its 3-row rotary positions [3, prompt]
    # and the offset of every later position (each row of output token i is prompt_len + i + delta)
    mm_items: tuple[MultimodalItem, ...] = ()
    mrope: tuple[torch.Tensor, int] | None = None
    # params.structured_outputs compiled, at the start of the output: advanced by every kept token
    # (sampled, accepted drafts, forced), never by recomputation; constrains each sampled row
    grammar: GrammarMatcher | None = None
    token_ids: list[int] = field(init=False)  # prompt + output, appended in place
    num_computed_tokens: int = field(default=0, init=False)  # tokens whose K/V are in the cache
    cache: CacheHandle = field(default_factory=CacheHandle, init=False)  # its blocks, their names
    status: Status = field(default=Status.WAITING, init=False)
    text: str = field(default="", init=False)
    sent_text_len: int = field(default=0, init=False)
    finish_reason: str | None = field(default=None, init=False)
    stop_reason: str | int | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)  # why, when finish_reason is "error"
    failure: BaseException | None = field(default=None, init=False)  # that error, as raised
    logprobs: list[dict[int, float]] | None = field(default=None, init=False)
    # a drafter's proposal to follow token_ids, made in the step that sampled its last token
    drafts: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.junction is None:
            self.junction = len(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_new_tokens(self) -> int:
        """Tokens to run through the model next step: the prompt (after preemption, prompt+output) or 1."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledBatch:
    """One step's plan: run `num_tokens[i]` new tokens of `requests[i]` (their blocks are allocated).

    A request samples a token only when its chunk reaches the end of its tokens (`samples`).
    `drafts[i]`: proposed tokens that follow request i's last token, verified in the same step; they
    are the last `len(drafts[i])` of its `num_tokens[i]` (a decoding request only)."""

    requests: list[Request]
    num_tokens: list[int]
    drafts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.drafts:
            self.drafts = [[] for _ in self.requests]
        assert len(self.requests) == len(self.num_tokens) == len(self.drafts) and self.requests

    @property
    def samples(self) -> list[bool]:
        return [r.num_computed_tokens + n - len(d) == len(r.token_ids)
                for r, n, d in zip(self.requests, self.num_tokens, self.drafts)]


@dataclass
class StepResult:
    """What one step computed, per request of its `ScheduledBatch` in order.

    A request gets a list of tokens: empty while its prompt is still prefilling, one when decoding,
    several once a step verifies draft tokens. `errors[i]` is why request i failed (the batch failed
    and so did its rerun alone); its tokens are then empty and its state must not advance.
    `drafts[i]`: a drafter's proposal to follow request i's tokens once they are appended.
    """

    token_ids: list[list[int]]
    logprobs: list[list[dict[int, float] | None]]
    errors: list[Exception | None] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.errors:
            self.errors = [None] * len(self.token_ids)
        if not self.drafts:
            self.drafts = [[] for _ in self.token_ids]
        assert len(self.token_ids) == len(self.logprobs) == len(self.errors) == len(self.drafts)


@dataclass
class CompletionOutput:
    """One generated sequence (vLLM's name). Chat requests also carry the parsed fields."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list | None = None
    tool_call_errors: list[str] | None = None
    reasoning_tokens: int = 0
    error: str | None = None  # why the engine failed this sequence (finish_reason "error")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class StepDelta:
    """What one request produced in one step (for streaming)."""

    request: Request
    new_token_ids: list[int]
    text_delta: str
    finished: bool
