"""ScheduledBatch -> tensors -> one forward -> sampled token ids. Owns the model and the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.engine.kv_cache import KVCache
from qwenrun.engine.request import Request, ScheduledBatch
from qwenrun.layers.attention import AttentionMetadata
from qwenrun.sampling.sampler import SamplingBatch, compute_logprobs, mask_vocab, sample


@dataclass
class StepResult:
    token_ids: list[int | None]  # one per scheduled request; None while its prompt is still prefilling
    logprobs: list[dict[int, float] | None]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        kv_cache: KVCache,
        valid_vocab_size: int,
        eos_token_ids: tuple[int, ...],
        device: torch.device,
    ) -> None:
        self.model, self.config, self.kv = model, config, kv_cache
        self.valid_vocab_size = min(valid_vocab_size, config.vocab_size)
        self.eos_token_ids = eos_token_ids
        self.device = device

    def _inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        for req, n in zip(batch.requests, batch.num_tokens):
            start = req.num_computed_tokens
            ids += req.token_ids[start : start + n]
            positions += range(start, start + n)
        meta = AttentionMetadata.build(
            batch.num_tokens,
            [r.num_computed_tokens + n for r, n in zip(batch.requests, batch.num_tokens)],
            [r.cache.block_table for r in batch.requests],
            self.kv.block_size,
            self.device,
        )
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), meta

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        """One forward; a token for each request whose chunk reached its end (None for the others).

        Changes no request: the scheduler advances `num_computed_tokens` when the engine applies
        the result. When it raises, seeded generators are back where they were and the K/V it
        wrote lie past every request's computed tokens, so the engine can rerun the batch's
        requests one at a time to find the one that failed.
        """
        samples = batch.samples
        ids, positions, meta = self._inputs(batch)
        hidden = self.model(ids, positions, meta, self.kv.layers)  # [T, H]
        reqs = [r for r, s in zip(batch.requests, samples) if s]
        if not reqs:
            return StepResult([None] * len(samples), [None] * len(samples))
        ends = torch.tensor(batch.num_tokens).cumsum(0).sub_(1)
        last = ends[torch.tensor(samples)].to(self.device)
        logits = mask_vocab(self.model.compute_logits(hidden[last]), self.valid_vocab_size)  # [B, V]
        generators = [r.generator for r in reqs if r.generator is not None]
        states = [g.get_state() for g in generators]
        try:
            tokens, logprobs = self._sample(reqs, logits)
        except Exception:
            for g, state in zip(generators, states):
                g.set_state(state)
            raise
        sampled = iter(zip(tokens, logprobs))
        per_req = [next(sampled) if s else (None, None) for s in samples]
        return StepResult([t for t, _ in per_req], [lp for _, lp in per_req])

    def _sample(self, reqs: list[Request],
                logits: torch.Tensor) -> tuple[list[int], list[dict[int, float] | None]]:
        sbatch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.generator for r in reqs],
            logits.shape[-1],
            self.device,
            eos_token_ids=self.eos_token_ids,
        )
        tokens = sample(logits, sbatch)
        logprobs: list[dict[int, float] | None] = [None] * len(reqs)
        k = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        if k is not None:
            # SamplingParams cannot know the vocabulary: asking for more returns all of it.
            k = min(k, self.valid_vocab_size)
            chosen, top_ids, top_lp = compute_logprobs(logits, tokens, k)
            for i, r in enumerate(reqs):
                if r.params.logprobs is not None:
                    kk = r.params.logprobs
                    entry = dict(zip(top_ids[i, :kk].tolist(), top_lp[i, :kk].tolist()))
                    entry[int(tokens[i])] = float(chosen[i])
                    logprobs[i] = entry
        return tokens.tolist(), logprobs

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] of one sequence, through the same attention path."""
        T = len(token_ids)
        meta = AttentionMetadata.build([T], [T], [block_table], self.kv.block_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(T, device=self.device), meta, self.kv.layers)
        return self.model.compute_logits(hidden)
