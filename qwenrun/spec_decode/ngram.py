"""Prompt lookup: the tokens that followed the latest earlier occurrence of a request's last n tokens.

No extra model: output that repeats its input (edits, quotes, code, lists) is drafted for free.
"""

from __future__ import annotations

from typing import Protocol

from qwenrun.spec_decode.config import SpeculativeConfig


class Proposer(Protocol):
    """Guesses up to `k` tokens to follow `token_ids` (prompt + output so far); fewer, or none, is
    always allowed. Drafters (drafter.py) propose inside the runner's step instead: they need the
    step's K/V."""

    def propose(self, token_ids: list[int], k: int) -> list[int]: ...


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Longest suffix first (n = max_n down to min_n); its latest earlier match wins, since
        recent text predicts the next tokens best.

        Walks the earlier occurrences of the last token, latest first, hopping with `list.index`
        over the reversed ids: 0.03 ms at 4K tokens, where comparing a slice per start took 1.2 ms."""
        length = len(token_ids)
        if k < 1 or length < 2:
            return []
        rev = token_ids[::-1]  # rev[j] is token_ids[length - 1 - j]
        best_n, best_end = 0, -1
        j = 0
        while True:
            try:
                j = rev.index(rev[0], j + 1)
            except ValueError:
                break
            end = length - 1 - j  # an earlier occurrence of the last token: token_ids[end]
            n = 1
            while n < self.max_n and n <= end and rev[n] == rev[j + n]:
                n += 1
            if n > best_n:
                best_n, best_end = n, end
                if n == self.max_n:
                    break
        if best_n < self.min_n:
            return []
        return token_ids[best_end + 1 : best_end + 1 + k]


def make_proposer(config: SpeculativeConfig) -> Proposer:
    assert config.method == "ngram", config.method
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
