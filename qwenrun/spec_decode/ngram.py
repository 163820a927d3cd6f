"""Prompt lookup: the tokens that followed the latest earlier occurrence of a request's last n tokens.

No extra model: output that repeats its input (edits, quotes, code, lists) is drafted for free.
"""

from __future__ import annotations

from typing import Protocol

from qwenrun.spec_decode.config import SpeculativeConfig


class Proposer(Protocol):
    """Guesses up to `k` tokens to follow `token_ids` (prompt + output so far); fewer, or none, is
    always allowed. Draft-model and MTP proposers will implement the same call."""

    def propose(self, token_ids: list[int], k: int) -> list[int]: ...


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Longest suffix first (n = max_n down to min_n); its latest earlier match wins, since
        recent text predicts the next tokens best."""
        length = len(token_ids)
        if k < 1:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = token_ids[length - n :]
            for start in range(length - n - 1, -1, -1):
                if token_ids[start : start + n] == suffix:
                    return token_ids[start + n : start + n + k]
        return []


def make_proposer(config: SpeculativeConfig) -> Proposer:
    assert config.method == "ngram", config.method
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
