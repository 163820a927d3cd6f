"""DraftPolicy: the draft length follows each request's acceptance rate, probes when drafting does not
pay, stops for compute-bound steps, and counts drafts and acceptances per position."""

from __future__ import annotations

import pytest

from qwenrun.spec_decode import SpeculativeConfig
from qwenrun.spec_decode.policy import DraftPolicy


def test_an_unknown_request_drafts_the_most_and_batch_size_turns_drafting_off():
    policy = DraftPolicy(5, disable_by_batch_size=8)
    assert policy.draft_length("a", num_decoding=1) == 5
    assert policy.draft_length("a", num_decoding=7) == 5
    assert policy.draft_length("a", num_decoding=8) == 0
    assert DraftPolicy(5, disable_by_batch_size=None).draft_length("a", num_decoding=1000) == 5


def test_draft_length_follows_the_acceptance_rate_per_request():
    policy = DraftPolicy(6, row_cost=0.1)
    for _ in range(10):
        policy.observe("hit", 6, 6)  # everything accepted
        policy.observe("half", 4, 1)  # 1 accepted of 2 tested: a = 0.5
        policy.observe("miss", 3, 0)
    assert policy.draft_length("hit", 1) == 6
    # a = 0.5, row cost 0.1: 1.75 / 1.2 (k=2) beats 1.5 / 1.1 (k=1) and 1.875 / 1.3 (k=3)
    assert policy.draft_length("half", 1) == 2
    assert policy.draft_length("miss", 1) == 0
    assert policy.best_length(0.05) == 0 and policy.best_length(0.8) == 6 and policy.best_length(1.0) == 6
    # a costlier row asks for a higher rate
    assert DraftPolicy(6, row_cost=0.6).best_length(0.5) == 0


def test_a_request_that_stops_accepting_probes_and_recovers():
    policy = DraftPolicy(4, probe_every=3)
    policy.observe("r", 4, 4)
    for _ in range(20):
        policy.observe("r", 4, 0)  # its text stopped repeating: the decayed rate falls below the row cost
    lengths = [policy.draft_length("r", 1) for _ in range(6)]
    assert lengths == [0, 0, 1, 0, 0, 1]
    for _ in range(4):
        policy.observe("r", 1, 1)  # the probes are accepted: drafting comes back
    assert policy.draft_length("r", 1) == 3  # a ~ 0.6 after four accepted probes


def test_fixed_length_without_adaptation_and_counts_for_metrics():
    policy = DraftPolicy.from_config(SpeculativeConfig.parse(
        {"method": "ngram", "num_speculative_tokens": 3, "adaptive_draft_length": False}))
    assert policy.disable_by_batch_size == 8
    for drafted, accepted in ((3, 0), (3, 2), (2, 2), (0, 0)):
        policy.observe("r", drafted, accepted)
    assert policy.draft_length("r", 1) == 3
    assert policy.num_drafts == 3  # a step without drafts is no draft
    assert policy.accepted_per_position == [2, 2, 0]
    policy.forget("r")
    assert policy.requests == {}
    with pytest.raises(AssertionError):
        policy.observe("r", 2, 3)
