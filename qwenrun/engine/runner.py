"""ScheduledBatch -> ForwardBatch -> one forward -> sampled token ids (a StepResult), and, with a
drafter, the drafts for each request's next step. Owns the model and the KV cache tensors; changes
no request (the scheduler does, in `update`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.engine.encoder_cache import EncoderCache, MultimodalItem
from qwenrun.engine.request import Request, ScheduledBatch, StepResult
from qwenrun.layers.attention import AttentionMetadata
from qwenrun.layers.forward_batch import ForwardBatch, LayerCache
from qwenrun.layers.recurrent import RecurrentMetadata
from qwenrun.layers.visual import VisualEmbeds
from qwenrun.sampling.sampler import SamplingBatch, argmax, compute_logprobs, mask_vocab, sample
from qwenrun.spec_decode.drafter import Drafter
from qwenrun.structured.backend import GrammarMatcher

# Models with fewer weights than this run each step on one thread. Their ops are a few microseconds
# of work each (width 256: a 256x768 matmul row is ~0.2M multiply-adds), about what an OpenMP
# parallel region's fork/join costs, and when another process holds a core torch's threads wait on
# each other at every op: on the 2-core Zen 4, under load, the bundled 3.3M-weight model decoded at
# 24 tok/s on 2 threads and 130 on one (and its MTP step, with twice the ops, ran 0.38x plain
# instead of 1.61x). The smallest released Qwen3 (0.6B) has 20x this many weights, and its steps
# read weights at the memory bandwidth that both cores' threads share, so it keeps torch's threads.
SERIAL_MAX_WEIGHTS = 1 << 25


class ModelRunner:
    """Turns a `ScheduledBatch` into a `ForwardBatch` (`prepare`) and runs it (`execute`)."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        layers: list[LayerCache],
        block_size: int,
        hybrid: bool,
        encoder: EncoderCache | None,
        valid_vocab_size: int,
        eos_token_ids: tuple[int, ...],
        device: torch.device,
        drafter: Drafter | None = None,
        drafter_layers: list[LayerCache] | None = None,
        num_speculative_tokens: int = 0,
    ) -> None:
        """`layers`: the cache's view per model layer; `hybrid`: some layers keep recurrent state, so
        each step also says which state slots each sequence reads and writes; `encoder`: a
        vision-language model's encoder cache (its steps also get 3-row positions and the encoder
        output at placeholder rows); `drafter`, over its own views `drafter_layers` of the same
        blocks: drafts up to `num_speculative_tokens` tokens per request after each step (`_draft`)."""
        self.model, self.config = model, config
        self.layers, self.block_size, self.hybrid = layers, block_size, hybrid
        self.encoder = encoder
        self.valid_vocab_size = min(valid_vocab_size, config.vocab_size)
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.drafter, self.drafter_layers = drafter, drafter_layers or []
        self.num_speculative_tokens = num_speculative_tokens
        self._mask_worker: ThreadPoolExecutor | None = None  # started by the first constrained step
        weights = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))
        self.serial = weights < SERIAL_MAX_WEIGHTS

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        """The step's tensors: each request's next chunk, and its last row for logits when the chunk
        reaches the end of its tokens (`ScheduledBatch.samples`), followed by a row per draft token."""
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for req, n, samples, drafts in zip(batch.requests, batch.num_tokens, batch.samples, batch.drafts):
            start = req.num_computed_tokens
            ids += req.token_ids[start : start + n - len(drafts)] + drafts
            positions += range(start, start + n)
            if samples:
                rows += range(len(ids) - 1 - len(drafts), len(ids))
        meta = AttentionMetadata.build(
            batch.num_tokens,
            [r.num_computed_tokens + n for r, n in zip(batch.requests, batch.num_tokens)],
            [r.cache.block_table for r in batch.requests],
            self.block_size,
            self.device,
        )
        recurrent = None
        if self.hybrid:
            recurrent = RecurrentMetadata.build(
                batch.num_tokens, [r.cache.state_slots[0] for r in batch.requests],
                [r.cache.state_slots[1] for r in batch.requests],
                [r.num_computed_tokens > 0 for r in batch.requests], self.device,
                [r.cache.state_slots[2 : 2 + len(d)] for r, d in zip(batch.requests, batch.drafts)],
            )
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        pos, visual = as_tensor(positions), None
        if self.encoder is not None:
            pos = torch.cat([_mrope_rows(r, r.num_computed_tokens, n) for r, n in zip(batch.requests, batch.num_tokens)],
                            dim=1).to(self.device)
            visual = self._visual(batch)
        return ForwardBatch(as_tensor(ids), pos, meta, self.layers, as_tensor(rows),
                            [(1 + len(d)) * s for s, d in zip(batch.samples, batch.drafts)], recurrent, visual)

    @torch.inference_mode()
    def _visual(self, batch: ScheduledBatch) -> VisualEmbeds | None:
        """The encoder output at this step's placeholder rows; items not yet in the encoder cache are
        encoded first, all in one call."""
        assert self.encoder is not None
        wanted: list[tuple[MultimodalItem, int, int]] = []  # (item, first output row, count) in the step
        rows: list[int] = []
        row0 = 0
        for req, n in zip(batch.requests, batch.num_tokens):
            start = req.num_computed_tokens
            for item in req.mm_items:
                for pos, first, count in item.rows_in(start, start + n):
                    wanted.append((item, first, count))
                    rows += range(row0 + pos - start, row0 + pos - start + count)
            row0 += n
        if not wanted:
            return None
        missing = list({it.content_hash: it for it, _, _ in wanted if it.content_hash not in self.encoder}.values())
        if missing:
            dtype = self.model.model.embed_tokens.weight.dtype
            pixels = torch.cat([it.pixel_values for it in missing]).to(self.device, dtype)
            grids = torch.tensor([it.grid_thw for it in missing], dtype=torch.long, device=self.device)
            for it, out in zip(missing, self.model.encode_vision(pixels, grids)):
                assert out.shape[1] == it.num_tokens, "the encoder's output does not match the placeholders"
                self.encoder.put(it.content_hash, out)
        outs = [self.encoder.get(it.content_hash)[:, a : a + k] for it, a, k in wanted]  # type: ignore[index]
        joined = torch.cat(outs, dim=1)  # [1 + deepstack, N, H]
        return VisualEmbeds(torch.tensor(rows, dtype=torch.long, device=self.device), joined[0],
                            joined[1:] if joined.shape[0] > 1 else None)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, fb: ForwardBatch) -> StepResult:
        """One forward, then a token sampled from each logits row, for the request owning the row.

        Changes no request: `Scheduler.update` advances them. When it raises, seeded generators
        are back where they were and the K/V it wrote lie past every request's computed tokens,
        so the engine can rerun the batch's requests one at a time to find the one that failed.
        """
        with self._threads():
            return self._execute(batch, fb)

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """One thread for a small model's step (`SERIAL_MAX_WEIGHTS`), the caller's count restored
        after it, so that code outside the engine keeps its own setting."""
        if not self.serial:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _execute(self, batch: ScheduledBatch, fb: ForwardBatch) -> StepResult:
        masks = self._start_masks(batch, fb)
        try:
            hidden = self.model(fb)  # [T, H]
        finally:
            grammar_masks = masks.result() if masks is not None else None  # re-raises a fill's error
        owners = [r for r, c in zip(batch.requests, fb.logits_counts) for _ in range(c)]
        # Row j of a request with drafts samples as if drafts[:j] were already its output (penalties, min_tokens).
        prefixes = [d[:j] for d, c in zip(batch.drafts, fb.logits_counts) for j in range(c)]
        generators = [r.generator for r in owners if r.generator is not None]
        states = [g.get_state() for g in generators]
        try:
            out_tokens, out_logprobs = self._verify(batch, fb, hidden, owners, prefixes, generators, states,
                                                    grammar_masks)
            drafts = self._draft(batch, fb, hidden, out_tokens) if self.drafter is not None else []
        except Exception:
            for g, state in zip(generators, states):
                g.set_state(state)
            raise
        return StepResult(out_tokens, out_logprobs, drafts=drafts)

    def _start_masks(self, batch: ScheduledBatch, fb: ForwardBatch) -> Future[GrammarMasks] | None:
        """The constrained rows' bitmasks, filled on a worker thread while the forward runs (the
        matchers do not change during the step, and xgrammar releases the GIL), or None when no
        sampled row has a grammar: then nothing is paid."""
        work, row = [], 0
        for req, c, drafts in zip(batch.requests, fb.logits_counts, batch.drafts):
            if c and req.grammar is not None:
                work.append((req.grammar, row, drafts))
            row += c
        if not work:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        backend_words = (self.config.vocab_size + 31) // 32
        return self._mask_worker.submit(_fill_masks, work, row, backend_words)

    def _verify(self, batch: ScheduledBatch, fb: ForwardBatch, hidden: torch.Tensor, owners: list[Request],
                prefixes: list[list[int]], generators: list[torch.Generator], states: list[torch.Tensor],
                grammar_masks: GrammarMasks | None) -> tuple[list[list[int]], list[list[dict[int, float] | None]]]:
        """Each request's kept tokens (its sampled token, after the drafts the target agreed with)
        and their logprobs."""
        if not owners:
            return [[] for _ in batch.requests], [[] for _ in batch.requests]
        logits = mask_vocab(self.model.compute_logits(hidden[fb.logits_rows]), self.valid_vocab_size)  # [N, V]
        tokens, logprobs = self._sample(owners, prefixes, logits, grammar_masks)
        out_tokens, out_logprobs, i = [], [], 0
        for req, c, drafts in zip(batch.requests, fb.logits_counts, batch.drafts):
            row = tokens[i : i + c]
            kept = c and 1 + _num_accepted(drafts, row)
            out_tokens.append(row[:kept])
            out_logprobs.append(logprobs[i : i + kept])
            if kept < c and req.generator is not None and not req.params.greedy:
                self._rewind(req.generator, states[generators.index(req.generator)], kept, logits.shape[-1])
            i += c
        return out_tokens, out_logprobs

    def _draft(self, batch: ScheduledBatch, fb: ForwardBatch, hidden: torch.Tensor,
               out_tokens: list[list[int]]) -> list[list[int]]:
        """The drafter's proposals for each request's next step ([] for one still prefilling).

        Catch-up: one drafter forward over every position the target kept this step, which writes
        the drafter's K/V there, so that every block the target fills has the drafter's K/V too
        (a prefix hit shares both). Row i reads token x_{i + token_shift}; the token sampled this
        step is the one after the last kept position, so a draft model (shift 0) also runs that
        position: its row predicts the first draft. Then one forward per further draft, a row per
        request still drafting, reading the previous draft. Those rows write K/V past the kept
        positions; each is rewritten by the catch-up of the step that keeps its position, before
        anything attends it as kept. A request's chain ends with its allocated blocks (the
        scheduler's lookahead) and with its max_tokens: its drafts never need a block of their own.

        When the catch-up covers exactly the step's rows (every draft accepted, or a prefill chunk),
        it attends like the step did and reuses `fb`'s attention metadata and positions: building
        them is a good part of a small model's drafter forward.
        """
        assert self.drafter is not None
        shift = self.drafter.token_shift
        starts, counts, lengths = [], [], []  # per request: catch-up rows from starts[i], drafts it may get
        ids, hidden_rows = [], []  # per catch-up row
        offset = 0
        for req, n, samples, drafts, out in zip(batch.requests, batch.num_tokens, batch.samples, batch.drafts,
                                                out_tokens):
            start = req.num_computed_tokens
            kept = n - len(drafts) + len(out) - 1 if samples else n
            # the token at position start + j is tokens[j]
            tokens = req.token_ids[start : start + n - len(drafts)] + out if samples else \
                req.token_ids[start : start + n + shift]
            capacity = len(req.cache.block_table) * self.block_size
            rows = min(kept + 1 - shift if samples else kept, capacity - start)
            length = 0
            if samples and rows == kept + 1 - shift:
                remaining = req.max_new_tokens - req.num_output_tokens - len(out) - 1
                length = max(0, min(self.num_speculative_tokens, remaining, capacity - (start + rows - 1)))
            starts.append(start)
            counts.append(rows)
            ids += tokens[shift : shift + rows]
            hidden_rows += range(offset, offset + rows)
            lengths.append(length)
            offset += n
        same_rows = counts == batch.num_tokens
        h = self._drafter_forward(batch.requests, starts, counts, ids,
                                  (hidden if same_rows else hidden[hidden_rows]) if shift else None,
                                  fb if same_rows else None)
        drafting = [i for i, k in enumerate(lengths) if k > 0]
        ends = torch.tensor(counts).cumsum(0) - 1
        h = h[ends[drafting].to(h.device)]  # each drafting request's last catch-up row
        drafts: list[list[int]] = [[] for _ in batch.requests]
        while drafting:
            logits = mask_vocab(self.drafter.compute_logits(h), self.valid_vocab_size)
            for i, t in zip(drafting, argmax(logits).tolist()):  # the C++ kernel where it applies
                drafts[i].append(t)
            going = [j for j, i in enumerate(drafting) if len(drafts[i]) < lengths[i]]
            if not going:
                break
            drafting = [drafting[j] for j in going]
            h = self._drafter_forward([batch.requests[i] for i in drafting],
                                      [starts[i] + counts[i] - 1 + len(drafts[i]) for i in drafting],
                                      [1] * len(drafting), [drafts[i][-1] for i in drafting],
                                      h[going] if shift else None)
        return drafts

    def _drafter_forward(self, reqs: list[Request], starts: list[int], counts: list[int], ids: list[int],
                         hidden: torch.Tensor | None, same_as: ForwardBatch | None = None) -> torch.Tensor:
        """The drafter's hidden [T, H] for `counts[b]` rows of request b from position `starts[b]`;
        `same_as`: the target's batch over exactly these rows, whose metadata then serves.

        An MTP head (token_shift 1) is part of the target and shares its rotary positions (3-row
        for a vision-language target); a draft model is a text model of its own and counts 1-D."""
        assert self.drafter is not None
        ends = [s + c for s, c in zip(starts, counts)]
        if same_as is not None:
            meta = same_as.attention
        else:
            meta = AttentionMetadata.build(counts, ends, [r.cache.block_table for r in reqs], self.block_size,
                                           self.device)
        if same_as is not None and (self.encoder is None or self.drafter.token_shift):
            pos = same_as.positions
        elif self.encoder is not None and self.drafter.token_shift:
            pos = torch.cat([_mrope_rows(r, s, c) for r, s, c in zip(reqs, starts, counts)], dim=1)
        else:
            pos = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends)])
        fb = ForwardBatch(torch.tensor(ids, dtype=torch.long).to(self.device), pos.to(self.device), meta,
                          self.drafter_layers, torch.empty(0, dtype=torch.long, device=self.device), [0] * len(reqs))
        return self.drafter.forward(fb, hidden)

    def _rewind(self, generator: torch.Generator, state: torch.Tensor, draws: int, vocab: int) -> None:
        """Leave a seeded request's generator as if it had drawn only for its kept tokens.

        Each sampled row draws one [V] exponential vector (`_draw`), so the i-th output token of a
        seeded request always comes from the generator's i-th draw: its tokens do not depend on how
        many drafts a step verified (the batch, the token budget), and equal non-speculative
        sampling with the same seed."""
        generator.set_state(state)
        for _ in range(draws):
            torch.empty(vocab, dtype=torch.float32, device=self.device).exponential_(generator=generator)

    def _sample(self, reqs: list[Request], prefixes: list[list[int]], logits: torch.Tensor,
                grammar_masks: GrammarMasks | None = None) -> tuple[list[int], list[dict[int, float] | None]]:
        bitmask, bitmask_rows = grammar_masks if grammar_masks is not None else (None, [])
        sbatch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.output_token_ids + p for r, p in zip(reqs, prefixes)],
            [r.prompt_token_ids for r in reqs],
            [r.generator for r in reqs],
            logits.shape[-1],
            self.device,
            eos_token_ids=self.eos_token_ids,
            bitmask=bitmask,
            bitmask_rows=bitmask_rows,
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
        """Teacher-forced logits [T, vocab] of one sequence, through the same attention path (a
        hybrid model's recurrent layers start from zeros and keep no state: no slot is touched)."""
        T = len(token_ids)
        meta = AttentionMetadata.build([T], [T], [block_table], self.block_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        rows = torch.arange(T, device=self.device)
        recurrent = RecurrentMetadata.build([T], None, None, [False], self.device) if self.hybrid else None
        fb = ForwardBatch(ids, rows, meta, self.layers, rows, [T], recurrent)
        return self.model.compute_logits(self.model(fb))


GrammarMasks = tuple[torch.Tensor, list[int]]  # ([N, W] int32 host bitmask, the rows it constrains)


def _fill_masks(work: list[tuple[GrammarMatcher, int, list[int]]], rows: int, words: int) -> GrammarMasks:
    """Each constrained request's rows of one step's bitmask: its sampled row, and with drafts one
    row per draft as if the drafts before it were kept (`GrammarMatcher.fill_with_drafts`)."""
    bitmask = torch.empty(rows, words, dtype=torch.int32)  # rows without a grammar are never read
    constrained: list[int] = []
    for grammar, row, drafts in work:
        grammar.fill_with_drafts(bitmask, row, drafts)
        constrained += range(row, row + 1 + len(drafts))
    return bitmask, constrained


def _num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts stand: the leading ones equal to the token the target sampled after the
    tokens before them.

    This is speculative sampling's rule for a point-mass proposal (prompt lookup proposes one
    token, not a distribution): accepting draft d with probability p(d) and, on rejection,
    drawing from p without d renormalised, is exactly drawing t ~ p and accepting iff t == d
    (then t itself is the replacement). Greedy rows are the case p = one-hot argmax. So output
    is distributed as the target's, and greedy output equals non-speculative greedy.
    """
    n = 0
    while n < len(drafts) and drafts[n] == sampled[n]:
        n += 1
    return n


def _mrope_rows(req: Request, start: int, n: int) -> torch.Tensor:
    """3-row rotary positions of `req`'s tokens [start, start + n): the prompt's own (computed when
    the request was made), then one more per token, shifted by the prompt's delta."""
    if req.mrope is None:
        return torch.arange(start, start + n).expand(3, n)
    prompt_pos, delta = req.mrope
    p = prompt_pos.shape[1]
    head = prompt_pos[:, start : min(start + n, p)]
    tail = torch.arange(max(start, p), max(start + n, p)) + delta
    return torch.cat([head, tail.expand(3, -1)], dim=1)
