"""The grammar engine's seam: compile a constraint once, then one matcher per request.

A matcher is the request's position in its grammar. The engine advances it with every token it
keeps (`accept`), takes back rejected speculative drafts (`rollback`), and before each sampling step
asks it for the allowed next tokens as a packed bitmask row (`fill_bitmask`: bit j of int32 word
j // 32 set = token j allowed, the layout xgrammar and llguidance share), which the sampler
applies to that row alone.

Thinking: with reasoning on, a constraint applies to the answer, not the thoughts. `free_until`
(the `</think>` id) leaves the matcher free until that token is accepted, and a rollback across
it makes it free again; `after_free` (the "\n\n" Qwen3 writes after `</think>`) may follow it
before the constraint starts, so the model's own answer opening is not masked away. Free does not mean unmasked: the stop tokens stay banned, so a request
can only finish after its constraint has been satisfied. `free_if_first` (the `<think>` id) is
for a prompt after which the model may open its reasoning itself (Qwen3 with thinking on renders
no `<think>`): the first token may be that one, and opens the free region; any other first token
is the constraint's, which then holds from the start, so a model that never reasons is never
left unconstrained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from qwenrun.structured.params import StructuredOutputsParams


class EngineMatcher(Protocol):
    """What the grammar engine's own matcher offers (xgrammar's GrammarMatcher)."""

    def accept_token(self, token_id: int) -> bool: ...

    def rollback(self, num_tokens: int) -> None: ...

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> Any: ...

    def is_terminated(self) -> bool: ...


class GrammarMatcher:
    """One request's constraint state, over the tokens it has kept.

    Phases: "undecided" (before the first token of a `free_if_first` matcher), "free" (the
    reasoning), "gap" (just after `free_until`: the one `after_free` token the template writes
    there, "\n\n" for Qwen3, may come before the constraint, and counts as free) and
    "constrained". Invariants: `num_accepted` counts every accepted token; the free tokens
    (`_free_tokens`) are a prefix of them, and the engine matcher holds exactly the ones after it.
    """

    def __init__(self, matcher: EngineMatcher, free_mask: torch.Tensor, stop_token_ids: Sequence[int],
                 free_until: int | None = None, free_if_first: int | None = None,
                 after_free: int | None = None) -> None:
        if free_if_first is not None and free_until is None:
            raise ValueError("free_if_first needs the free_until token that ends the free region")
        self._matcher = matcher
        self._free_mask = free_mask  # [W] int32: every token but the stop tokens
        self._stop = frozenset(stop_token_ids)
        self._free_until = free_until
        self._free_if_first = free_if_first
        self._after_free = after_free if free_until is not None else None
        self._free_tokens: list[int] = []
        self.num_accepted = 0
        self._phase = self._phase_after_free()

    def _phase_after_free(self) -> str:
        """The phase when no constrained token has been accepted, from the free tokens alone."""
        free = self._free_tokens
        if not free:
            if self._free_if_first is not None:
                return "undecided"
            return "free" if self._free_until is not None else "constrained"
        if free[-1] == self._free_until:
            return "gap" if self._after_free is not None else "constrained"
        if len(free) > 1 and free[-2] == self._free_until:  # the gap token was taken
            return "constrained"
        return "free"

    @property
    def is_free(self) -> bool:
        """True while the output is still before `free_until` (the reasoning)."""
        return self._phase == "free"

    @property
    def is_terminated(self) -> bool:
        """True once the constraint accepted a stop token: the request must finish."""
        return self._phase != "free" and self._matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance by one kept token; False (and no change) when the constraint forbids it."""
        phase = self._phase
        if phase == "free" and token_id in self._stop:
            return False
        if phase == "free" or (phase == "undecided" and token_id == self._free_if_first) or (
                phase == "gap" and token_id == self._after_free):
            self._free_tokens.append(token_id)
            self._phase = self._phase_after_free()
        elif self._matcher.accept_token(token_id):
            self._phase = "constrained"
        else:
            return False
        self.num_accepted += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected drafts).

        Raises:
            ValueError: more than were accepted.
        """
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted} accepted tokens")
        constrained = self.num_accepted - len(self._free_tokens)
        if min(num_tokens, constrained):
            self._matcher.rollback(min(num_tokens, constrained))
        if num_tokens > constrained:
            del self._free_tokens[len(self._free_tokens) - (num_tokens - constrained):]
        self.num_accepted -= num_tokens
        if self.num_accepted == len(self._free_tokens):
            self._phase = self._phase_after_free()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` ([B, W] int32 on the host)."""
        if self._phase == "free":
            bitmask[row].copy_(self._free_mask)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)
        extra = {"undecided": self._free_if_first, "gap": self._after_free}.get(self._phase)
        if extra is not None:
            word, bit = divmod(extra, 32)
            bitmask[row, word] |= _int32_bit(bit)

    def is_dead_end(self) -> bool:
        """True when no token may come next: a constraint with an unsatisfiable part that compile
        could not see (a pattern of no characters), reached only now."""
        if self._phase == "free" or self.is_terminated:
            return False
        bitmask = torch.empty((1, self._free_mask.shape[0]), dtype=torch.int32)
        self.fill_bitmask(bitmask, 0)
        return not bitmask.any()

    def fill_with_drafts(self, bitmask: torch.Tensor, row: int, drafts: Sequence[int]) -> None:
        """Rows row .. row + len(drafts) of `bitmask`: row j as if drafts[:j] were accepted, what
        the target samples row j of a speculative step under. Leaves the matcher as it was, even
        when the grammar engine raises.

        A draft the constraint rejects can never be kept (its own row forbids it), and nothing
        follows a stop token, so the rows after either repeat the row before: their samples are
        discarded with the draft. Not for a terminated matcher (the request is finished).
        """
        valid = 0  # leading drafts accepted
        try:
            for j in range(len(drafts) + 1):
                if valid < j or (j and self.is_terminated):
                    bitmask[row + j].copy_(bitmask[row + j - 1])
                    continue
                self.fill_bitmask(bitmask, row + j)
                if j < len(drafts) and self.accept(drafts[j]):
                    valid += 1
        finally:
            self.rollback(valid)


def _int32_bit(bit: int) -> int:
    """1 << bit as a signed int32 value (bit 31 is the sign)."""
    return 1 << bit if bit < 31 else -(1 << 31)


def stop_free_mask(vocab_size: int, stop_token_ids: Sequence[int]) -> torch.Tensor:
    """[ceil(V / 32)] int32 with every token's bit set but the stop tokens'."""
    mask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
    for token in stop_token_ids:
        word = int(mask[token // 32]) & 0xFFFFFFFF & ~(1 << token % 32)
        mask[token // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return mask


class StructuredBackend(ABC):
    """A grammar engine for one tokenizer and one logits width.

    `compile` is thread-safe and is meant to run off the engine thread (the server's request
    validation), so a slow schema delays only its own request; equal constraints compile once.
    """

    vocab_size: int  # the logits width V; bitmasks are [B, ceil(V / 32)] int32

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled constraint, shared by every request that asks for the same one.

        Raises:
            InvalidRequestError: the constraint does not compile, naming its field.
        """

    @abstractmethod
    def matcher(self, compiled: Any, free_until: int | None = None,
                free_if_first: int | None = None, after_free: int | None = None) -> GrammarMatcher:
        """A fresh matcher at the start of `compiled`: free until `free_until` when given, from
        the start, or only once a first token `free_if_first` opened the free region; then
        `after_free` may come once before the constraint."""

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(V / 32)] int32 host buffer for `GrammarMatcher.fill_bitmask`."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
