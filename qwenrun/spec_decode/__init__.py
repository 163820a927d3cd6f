"""Speculative decoding: proposers that guess a request's next tokens, verified by the engine's step.

A proposer (prompt lookup) or a drafter (a draft model, an MTP head: drafter.py) only guesses;
`ModelRunner.execute` verifies the guesses against the target model in the same forward that
computes the next token, so a wrong guess costs compute, never correctness.
"""

from qwenrun.spec_decode.config import SpeculativeConfig
from qwenrun.spec_decode.drafter import Drafter, ModelDrafter, make_drafter
from qwenrun.spec_decode.ngram import NgramProposer, Proposer, make_proposer

__all__ = ["Drafter", "ModelDrafter", "NgramProposer", "Proposer", "SpeculativeConfig", "make_drafter", "make_proposer"]
