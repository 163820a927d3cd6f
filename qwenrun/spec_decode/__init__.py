"""Speculative decoding: proposers that guess a request's next tokens, verified by the engine's step.

A proposer only guesses; `ModelRunner.execute` verifies the guesses against the target model in the
same forward that computes the next token, so a wrong guess costs compute, never correctness.
"""

from qwenrun.spec_decode.config import SpeculativeConfig
from qwenrun.spec_decode.ngram import NgramProposer, Proposer, make_proposer

__all__ = ["NgramProposer", "Proposer", "SpeculativeConfig", "make_proposer"]
