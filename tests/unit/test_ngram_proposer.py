"""Prompt lookup's choice of draft: the longest suffix that recurs, its latest occurrence, at most k."""

from __future__ import annotations

import pytest

from qwenrun.errors import InvalidRequestError
from qwenrun.spec_decode import NgramProposer, SpeculativeConfig


def test_longest_suffix_first_then_latest_occurrence():
    p = NgramProposer(1, 3)
    # suffix [1, 2, 3] occurs once earlier (followed by 9, 9); [3] alone occurs later, followed by 7
    assert p.propose([1, 2, 3, 9, 9, 3, 7, 5, 1, 2, 3], 2) == [9, 9]
    assert p.propose([3, 4, 5, 3, 6, 3], 3) == [6, 3]  # latest [3] -> 6, 3 (stops at the end)
    assert p.propose([1, 2, 3, 4], 3) == []  # nothing recurs
    assert p.propose([5, 5], 4) == [5]
    assert p.propose([1, 2, 1], 0) == []


def test_min_n_ignores_shorter_matches():
    assert NgramProposer(2, 3).propose([7, 1, 8, 2, 1], 2) == []
    assert NgramProposer(2, 3).propose([2, 1, 8, 2, 1], 2) == [8, 2]


def test_config_defaults_and_errors():
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (1, 3)
    with pytest.raises(InvalidRequestError) as err:
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": True})
    assert err.value.param == "num_speculative_tokens"
    with pytest.raises(InvalidRequestError):
        SpeculativeConfig.parse(["ngram"])
