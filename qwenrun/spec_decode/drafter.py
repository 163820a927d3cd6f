"""Drafters: small models that propose a request's next tokens from K/V layers of their own.

A drafter owns no cache: its layers' specs are appended after the target model's in the one cache
plan, so its K/V live in the same blocks, under the same block tables, as the target's. Prefix
caching, preemption and rollback then cover it with no code of its own: a full block's drafter K/V
is valid because the runner runs the drafter over every position the target keeps (its catch-up
pass), in the step that keeps it.

`ModelRunner` drives a drafter after each step's acceptance: one catch-up forward over the kept
positions of every request in the batch, then one forward per further draft, a row per request
(see `ModelRunner._draft`). Drafts are the drafter's argmax, a point-mass proposal, so the
verification rule for prompt lookup stays exact for sampled requests too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import tokenizers
import torch
from torch import nn

from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import Checkpoint, load_model, open_checkpoint
from qwenrun.spec_decode.config import SpeculativeConfig


class Drafter(Protocol):
    """What the engine needs of a model that drafts.

    `token_shift` says which token a drafter row reads: 1 — the row at position i reads token
    x_{i+1} and the target's final-normed hidden h_i (an MTP head); 0 — the row at position i
    reads x_i and no hidden (a draft model, a whole language model of its own)."""

    token_shift: int

    def cache_specs(self, dtype: torch.dtype) -> list[KVCacheSpec]:
        """One spec per drafter layer, appended after the target's in the cache plan (attention only:
        a drafter keeps no recurrent state, and spec_decode need not import the engine's cache types)."""
        ...

    def forward(self, fb: ForwardBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        """The drafter's final-normed hidden [T, H] for the rows of `fb`, whose `caches` are the
        drafter's own layer views and whose attention runs over the requests' block tables.

        `hidden` [T, H_target]: the target's final-normed hidden at those rows (catch-up) or the
        drafter's own previous output (chained steps); None for a draft model."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] logits of hidden rows [N, H]."""
        ...


class ModelDrafter:
    """A separate, smaller language model of the target's tokenizer as the drafter (vLLM's
    "draft_model"): its own embedding, layers and head; it reads the same tokens at the same
    positions as the target."""

    token_shift = 0

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def cache_specs(self, dtype: torch.dtype) -> list[KVCacheSpec]:
        return self.model.cache_specs(dtype)

    def forward(self, fb: ForwardBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        return self.model(fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


def make_drafter(spec: SpeculativeConfig, target: nn.Module, ckpt: Checkpoint, dtype: torch.dtype,
                 device: torch.device) -> Drafter | None:
    """The drafter `spec` asks for (None for prompt lookup, which needs no model).

    "draft_model" loads `spec.model` with the target's loader, dtype and device; "mtp" takes the
    head that the target's loader attached as `target.mtp` when the checkpoint has `mtp.*` weights.

    Raises:
        InvalidRequestError: the draft model's vocabulary is not the target's (its token ids would
            mean other text), it is not an attention-only text model, or the target has no MTP head.
    """
    if spec.method == "draft_model":
        assert spec.model is not None, "SpeculativeConfig.parse requires a model for draft_model"
        draft = open_checkpoint(spec.model)
        _check_same_vocabulary(draft, ckpt)
        model = load_model(draft, dtype, device)
        if hasattr(model, "encode_vision") or not all(isinstance(s, KVCacheSpec) for s in model.cache_specs(dtype)):
            raise InvalidRequestError(f"the draft model {spec.model} ({draft.config.architecture}) must be a text "
                                      "model whose every layer is attention (Qwen3 dense or MoE)", param="model")
        return ModelDrafter(model)
    if spec.method == "mtp":
        head = getattr(target, "mtp", None)
        if head is None:
            raise InvalidRequestError(f"speculative method \"mtp\" is not available for this checkpoint "
                                      f"({ckpt.config.architecture} at {ckpt.path}): it has no MTP head (mtp.* "
                                      "weights) that qwenrun loads", param="method")
        return head
    return None


def _check_same_vocabulary(draft: Checkpoint, target: Checkpoint) -> None:
    """Token ids must mean the same text in both models: equal tokenizer vocabularies (added tokens
    included) when both checkpoints carry a tokenizer, else equal config vocabulary sizes."""
    vocabs = [_vocabulary(c.path) for c in (draft, target)]
    if None not in vocabs:
        same = vocabs[0] == vocabs[1]
    else:
        same = draft.config.vocab_size == target.config.vocab_size
    if not same:
        raise InvalidRequestError(f"the draft model {draft.path} does not share the target's tokenizer vocabulary "
                                  f"({target.path}); a draft model must use the same tokenizer", param="model")


def _vocabulary(path: Path) -> dict[str, int] | None:
    file = path / "tokenizer.json"
    return tokenizers.Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True) if file.is_file() else None
