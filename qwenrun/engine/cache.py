"""The cache side of the engine: sized from the model's per-layer specs, owned by the scheduler.

`CacheManager` is the one place that hands out cache memory, from two pools under one budget: the
paged KV `BlockPool` for attention layers and, for hybrid models (Gated DeltaNet layers), the
`SlotPool` of fixed-size recurrent state slots (state_cache.py). Each request holds one `CacheHandle`
(its block table, the names of its full blocks, how many are in the prefix index, its state slots).
The scheduler admits, grows, commits and frees through the manager, never through the pools, so
`check_integrity` can compare every handle with the pools; the scheduler runs it whenever it goes
idle (mini-sglang's scheduler does the same).

Prefix reuse for hybrid models needs the recurrent state at the reuse point, which KV blocks cannot
give back. The manager keeps state checkpoints at block boundaries of each prompt: at the end of every
prefill chunk, which it aligns to blocks (`chunk`), and at the last block boundary of the prompt —
the junction where the next turn of a chat diverges, since the template drops the reasoning the model
wrote after it. A hit resumes at the latest checkpoint whose blocks are all cached.

Speculative decoding rolls rejected draft tokens back. K/V is paged, so that is dropping blocks; the
recurrent state is not, so a hybrid model's running sequence owns 2 + k state slots (k: the most
drafts a step verifies) instead of two, the step writes the state after each draft into its own slot
(layers/recurrent.py), and `commit` keeps the one after the last accepted token by relabelling.
Rejected tokens never reach a checkpoint or a named block: `commit` drops them before naming or
checkpointing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwenrun.engine.encoder_cache import EncoderCache
from qwenrun.engine.kv_cache import BlockPool, CacheHandle, KVCache, block_hash
from qwenrun.engine.state_cache import SlotPool, StateCache
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.forward_batch import LayerCache
from qwenrun.layers.recurrent import RecurrentStateSpec

CacheSpec = KVCacheSpec | RecurrentStateSpec

if TYPE_CHECKING:
    from qwenrun.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixHit:
    """Cached leading blocks of a waiting request, found by `match` and not yet shared."""

    blocks: list[int]
    num_tokens: int
    checkpoint: int | None = None  # hybrid models: the state slot to resume from


@dataclass(frozen=True)
class CachePlan:
    """How a memory budget is split between KV blocks and state slots (also what `qwenrun info`
    reports, without allocating anything)."""

    num_blocks: int
    num_state_slots: int
    max_running: int  # sequences that can run at once (max_num_seqs for attention-only models)
    context: int  # the context window the blocks allow
    state_bytes_per_sequence: int  # one state slot, all linear-attention layers (0: none)
    state_slots_per_sequence: int = 0  # what a running sequence owns: 2 + the drafts a step verifies

    @property
    def num_checkpoint_slots(self) -> int:
        return self.num_state_slots - self.state_slots_per_sequence * self.max_running

    @classmethod
    def make(cls, specs: Sequence[CacheSpec], budget: int, block_size: int, context: int, max_num_seqs: int,
             enable_prefix_caching: bool = True, context_required: bool = False,
             num_speculative_tokens: int = 0) -> CachePlan:
        """At most `budget` bytes, and no more KV blocks than `max_num_seqs` full contexts.

        A hybrid model's state slots come first: 2 + `num_speculative_tokens` per running sequence
        (the state it reads, the one after its step, one before each draft) for up to half the
        budget (so fewer than `max_num_seqs` may fit: the scheduler admits by free slots), and, with
        prefix caching, checkpoint slots for up to a quarter more (at most four per running
        sequence); the KV blocks get the rest.

        Raises:
            InvalidRequestError: the blocks hold fewer tokens than `context` while the context was
                asked for (`context_required`), or fewer than min(context, 256) tokens, or the
                budget holds not even one sequence's state.
        """
        per_slot = StateCache.bytes_per_slot(s for s in specs if isinstance(s, RecurrentStateSpec))
        num_slots, running, per_seq = 0, max_num_seqs, 0
        if per_slot:
            per_seq = 2 + num_speculative_tokens
            running = min(max_num_seqs, budget // 2 // (per_seq * per_slot))
            if running < 1:
                raise InvalidRequestError(
                    f"the cache memory ({budget / 2**20:.0f} MiB) cannot hold the recurrent state of one sequence "
                    f"({per_seq * per_slot / 2**20:.1f} MiB with its step buffers, at most half the budget); "
                    "raise kv_cache_memory"
                )
            checkpoints = min(budget // 4 // per_slot, 4 * running) if enable_prefix_caching else 0
            num_slots = per_seq * running + checkpoints
            budget -= num_slots * per_slot
        per_block = KVCache.bytes_per_block([s for s in specs if isinstance(s, KVCacheSpec)], block_size)
        full = -(-context // block_size) * running  # every running sequence's whole context
        num_blocks = min(budget // per_block, full) if per_block else full  # no attention layer: blocks cost nothing
        capacity = num_blocks * block_size
        if capacity < context and (context_required or capacity < min(context, 256)):
            raise InvalidRequestError(
                f"the KV cache ({budget / 2**20:.0f} MiB) holds {capacity} tokens, fewer than "
                f"max_model_len {context}; raise kv_cache_memory or lower max_model_len"
            )
        return cls(num_blocks, num_slots, running, min(context, capacity), per_slot, per_seq)


class CacheManager:
    """Admission, allocation, prefix reuse and rollback over the paged KV cache and the state slots.

    Invariants (`check_integrity`): each pool's own; every block's ref count equals the number of
    live handles whose table holds it; a handle's registered blocks are named and in its table; a
    hybrid model's live requests own 2 + k distinct state slots each and can roll their state back
    by at most k tokens (k: `num_speculative_tokens`).
    """

    def __init__(self, specs: Sequence[CacheSpec], num_blocks: int, block_size: int, device: torch.device,
                 enable_prefix_caching: bool = True, num_state_slots: int = 0, encoder_cache_bytes: int = 0,
                 num_speculative_tokens: int = 0) -> None:
        self.specs, self.block_size = list(specs), block_size
        self.num_speculative_tokens = num_speculative_tokens
        self.enable_prefix_caching = enable_prefix_caching
        attention = {i: s for i, s in enumerate(self.specs) if isinstance(s, KVCacheSpec)}
        recurrent = {i: s for i, s in enumerate(self.specs) if isinstance(s, RecurrentStateSpec)}
        self.kv = KVCache(attention, num_blocks, block_size, device)
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.state = StateCache(recurrent, num_state_slots, device) if recurrent else None
        self.slots = SlotPool(num_state_slots) if recurrent else None
        self.encoder = EncoderCache(encoder_cache_bytes) if encoder_cache_bytes else None
        # one view per model layer, in layer order: what ForwardBatch.caches carries
        self.layers: list[LayerCache] = [self.kv.layers[i] if i in attention else self.state.layers[i]  # type: ignore[union-attr]
                                         for i in range(len(self.specs))]
        self._live: dict[int, CacheHandle] = {}  # id(handle) -> handle, for every handle holding blocks or slots

    @property
    def is_hybrid(self) -> bool:
        return self.state is not None

    @property
    def slots_per_sequence(self) -> int:
        """State slots a running request owns (0 without linear-attention layers)."""
        return 2 + self.num_speculative_tokens if self.slots is not None else 0

    @classmethod
    def from_budget(cls, specs: Sequence[CacheSpec], budget: int, block_size: int, context: int,
                    max_num_seqs: int, device: torch.device, enable_prefix_caching: bool = True,
                    context_required: bool = False, encoder_cache_bytes: int = 0,
                    num_speculative_tokens: int = 0) -> tuple[CacheManager, int]:
        """A cache laid out by `CachePlan.make` (which raises when the budget is too small), and the
        context window it allows; a smaller cache than `context` shrinks the window, with a warning.
        `encoder_cache_bytes` (vision-language models) come out of the budget first."""
        budget -= encoder_cache_bytes
        plan = CachePlan.make(specs, budget, block_size, context, max_num_seqs, enable_prefix_caching,
                              context_required, num_speculative_tokens)
        if plan.context < context:
            logger.warning("context window limited to %d tokens by the KV cache memory", plan.context)
        manager = cls(specs, plan.num_blocks, block_size, device, enable_prefix_caching, plan.num_state_slots,
                      encoder_cache_bytes, num_speculative_tokens)
        if plan.num_state_slots:
            logger.info("recurrent state: %.1f MiB per slot, %d slots per running sequence; %d sequences can run "
                        "at once, %d state checkpoints for prefix reuse", plan.state_bytes_per_sequence / 2**20,
                        plan.state_slots_per_sequence, plan.max_running, plan.num_checkpoint_slots)
        return manager, plan.context

    # ------------------------------------------------------------------------------ admission
    def match(self, req: Request) -> PrefixHit:
        """The cached blocks that `req`'s tokens start with (at least one token is left to compute:
        it yields the logits). For a hybrid model, only up to the latest block with a state checkpoint."""
        full = (len(req.token_ids) - 1) // self.block_size
        self._name_blocks(req, full)
        hashes = req.cache.block_hashes
        blocks = self.pool.match(hashes[:full])
        if self.slots is None:
            return PrefixHit(blocks, len(blocks) * self.block_size)
        for n in range(len(blocks), 0, -1):
            if self.slots.has(hashes[n - 1]):
                return PrefixHit(blocks[:n], n * self.block_size, self.slots.find(hashes[n - 1]))
        return PrefixHit([], 0)

    def can_admit(self, hit: PrefixHit, num_tokens: int) -> bool:
        """Whether a request starting with `hit` can have `num_tokens` more tokens in blocks (and,
        for a hybrid model, its state slots) now."""
        if self.slots is not None and self.slots.num_available(keep=hit.checkpoint) < self.slots_per_sequence:
            return False
        need = -(-(hit.num_tokens + num_tokens) // self.block_size) - len(hit.blocks)
        return need <= self.pool.num_free_after_share(hit.blocks)

    def take(self, req: Request, hit: PrefixHit) -> None:
        """Share the hit's blocks as the start of `req`'s (empty) block table; a hybrid model's
        request also gets its state slots, the first holding the hit's checkpoint."""
        h = req.cache
        assert not h.block_table and not h.state_slots, "take() starts a handle"
        self.pool.share(hit.blocks)
        h.block_table = list(hit.blocks)
        if self.slots is not None:
            h.state_slots = self.slots.allocate(self.slots_per_sequence, keep=hit.checkpoint)
            if hit.checkpoint is not None:
                self.state.copy(hit.checkpoint, h.state_slots[0])  # type: ignore[union-attr]
        if self.encoder is not None and req.mm_items:
            h.encoder_keys = [it.content_hash for it in req.mm_items if it.end > hit.num_tokens]
            self.encoder.acquire(h.encoder_keys)
        if h.block_table or h.state_slots or h.encoder_keys:
            self._live[id(h)] = h

    def chunk(self, req: Request, num_tokens: int) -> int:
        """How many of the next `num_tokens` tokens to schedule now. A hybrid model's prefill chunks
        end on block boundaries, where `commit` checkpoints the state, and stop once at the block
        boundary before the request's junction (the next chat turn resumes there); otherwise all."""
        if self.slots is None or not self.enable_prefix_caching:
            return num_tokens
        bs, start = self.block_size, req.num_computed_tokens
        end, total = start + num_tokens, len(req.token_ids)
        junction = req.junction // bs * bs
        if start < junction < end:
            end = junction
        elif end < total and end // bs * bs > start:
            end = end // bs * bs
        return end - start

    # ----------------------------------------------------------------------------- allocation
    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` tokens past the computed ones have slots."""
        return -(-(req.num_computed_tokens + num_tokens) // self.block_size) - len(req.cache.block_table)

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= self.pool.num_free

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Slots for `num_tokens` tokens past `req`'s computed ones (RuntimeError if the pool is short)."""
        self._extend(req.cache, self.blocks_needed(req, num_tokens))

    def free(self, req: Request) -> None:
        """Return `req`'s blocks (named ones stay cached for later prompts) and state slots; its
        names are kept, as they describe its tokens, not its blocks."""
        self._free(req.cache)

    @contextmanager
    def scratch(self, num_tokens: int) -> Iterator[CacheHandle]:
        """Blocks for one sequence outside any request (teacher-forced scoring), freed on exit."""
        handle = CacheHandle()
        self._extend(handle, -(-num_tokens // self.block_size))
        try:
            yield handle
        finally:
            self._free(handle)

    def _extend(self, handle: CacheHandle, n: int) -> None:
        if n > 0:
            handle.block_table += self.pool.allocate(n)
        if handle.block_table:
            self._live[id(handle)] = handle

    def _free(self, handle: CacheHandle) -> None:
        self.pool.free(handle.block_table)
        if handle.state_slots:
            self.slots.free(handle.state_slots)  # type: ignore[union-attr]
        if handle.encoder_keys:
            self.encoder.release(handle.encoder_keys)  # type: ignore[union-attr]
        handle.block_table, handle.state_slots, handle.encoder_keys = [], [], []
        handle.num_registered_blocks = handle.state_rewind = 0
        self._live.pop(id(handle), None)

    # ------------------------------------------------------------------------- prefix index
    def commit(self, req: Request, num_drafts: int = 0, num_accepted: int = 0) -> None:
        """After a step of `req` succeeded: drop what it computed for rejected drafts, name the
        blocks its computed tokens filled, so later prompts can reuse them, and, for a hybrid model,
        make the state after its last kept token current and checkpoint it when it ends a block of
        the prompt.

        The step verified `num_drafts` drafts and kept `num_accepted`; the caller has already taken
        the rejected ones off `num_computed_tokens`, so nothing here sees them. Slots: the step read
        `state_slots[0]` and wrote the state after its chunk into [1] and the state j tokens before
        that into [1 + j] (`RecurrentMetadata.rewind_slots`); rotating the list left by one plus the
        rejected count puts the kept state first, and leaves in [j] the state j tokens before it,
        for j up to `num_accepted` (`rollback`). A plain step is the ping-pong swap.

        Call it only for tokens that are final: a committed block may be shared and is never written
        again. Accepted draft tokens are computed before the engine appends them, so only blocks
        within the request's tokens are named; the next commit names the rest."""
        h = req.cache
        rejected = num_drafts - num_accepted
        assert 0 <= num_accepted <= num_drafts
        assert self.slots is None or num_drafts <= self.num_speculative_tokens, "more drafts than state slots"
        if rejected:
            self._truncate(req, req.num_computed_tokens)
        full = min(req.num_computed_tokens, len(req.token_ids)) // self.block_size
        self._name_blocks(req, full)
        for i in range(h.num_registered_blocks, full):
            self.pool.register(h.block_table[i], h.block_hashes[i])
        h.num_registered_blocks = max(h.num_registered_blocks, full)
        if self.slots is None:
            return
        h.state_slots[:] = h.state_slots[1 + rejected :] + h.state_slots[: 1 + rejected]
        h.state_rewind = num_accepted
        computed = req.num_computed_tokens
        if self.enable_prefix_caching and computed % self.block_size == 0 and 0 < computed <= req.num_prompt_tokens:
            slot = self.slots.checkpoint_slot(h.block_hashes[full - 1])
            if slot is not None:
                self.state.copy(h.state_slots[0], slot)  # type: ignore[union-attr]

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget `req`'s last `num_tokens` computed tokens (accepted drafts the engine does not
        keep, e.g. where a forced thinking close takes their positions), after their `commit`.

        Paged KV makes this cheap: blocks wholly past the new length go back to the pool and the
        names past it are dropped; slots left in a kept block are simply overwritten later. Only
        uncommitted tokens can go (committed blocks may be shared). A hybrid model's state goes
        back to the one `commit` left j tokens back, by rotating the slot list, up to the accepted
        drafts of the last step (the next step overwrites those states). The caller (the
        scheduler) then lowers `num_computed_tokens` by `num_tokens`: it alone changes request state.
        """
        h = req.cache
        if self.slots is not None and num_tokens:
            assert num_tokens <= h.state_rewind, "the state cannot roll back past the last step's drafts"
            h.state_slots[:] = h.state_slots[num_tokens:] + h.state_slots[:num_tokens]
            h.state_rewind -= num_tokens
        self._truncate(req, req.num_computed_tokens - num_tokens)

    def _truncate(self, req: Request, keep: int) -> None:
        """Drop the K/V blocks and names of `req`'s tokens past the first `keep`."""
        h = req.cache
        assert 0 <= keep <= req.num_computed_tokens and keep >= h.num_registered_blocks * self.block_size, \
            "rollback past committed blocks"
        kept = -(-keep // self.block_size)
        self.pool.free(h.block_table[kept:])
        del h.block_table[kept:]
        del h.block_hashes[keep // self.block_size :]
        if not h.block_table and not h.state_slots and not h.encoder_keys:
            self._live.pop(id(h), None)

    def _name_blocks(self, req: Request, full: int) -> None:
        """Extend the request's hash chain over its first `full` blocks of tokens."""
        bs, hashes = self.block_size, req.cache.block_hashes
        while len(hashes) < full:
            i = len(hashes)
            extra = b"".join(it.content_hash for it in req.mm_items if it.overlaps(i * bs, (i + 1) * bs))
            hashes.append(block_hash(hashes[-1] if hashes else None, req.token_ids[i * bs : (i + 1) * bs], extra))

    # ------------------------------------------------------------------------------- checking
    @property
    def num_live(self) -> int:
        """Handles holding blocks (requests admitted and not yet freed, scratch sequences)."""
        return len(self._live)

    def check_integrity(self) -> None:
        """Assert the invariants in the class docstring (AssertionError names the broken one)."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        slots: list[int] = []
        for h in self._live.values():
            assert h.block_table or h.state_slots or h.encoder_keys, "a live handle holds nothing"
            assert h.num_registered_blocks <= min(len(h.block_table), len(h.block_hashes)), \
                "a handle registered blocks it does not hold"
            for b in h.block_table:
                refs[b] += 1
            assert len(h.state_slots) == self.slots_per_sequence, "a handle without its state slots"
            assert 0 <= h.state_rewind <= self.num_speculative_tokens, "a state rolls back past its slots"
            slots += h.state_slots
        assert refs == self.pool.ref_counts, "block ref counts disagree with the requests' block tables"
        if self.encoder is not None:
            self.encoder.check_integrity()
            pins: dict[bytes, int] = {}
            for h in self._live.values():
                for key in h.encoder_keys:
                    pins[key] = pins.get(key, 0) + 1
            assert pins == self.encoder.pins, "encoder cache pins disagree with the requests' items"
        if self.slots is not None:
            self.slots.check_integrity()
            assert len(set(slots)) == len(slots), "two requests share a state slot"
            assert len(slots) == self.slots.num_slots - self.slots.num_free - self.slots.num_checkpoints, \
                "owned state slots disagree with the requests' handles"
