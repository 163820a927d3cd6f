"""The cache side of the engine: sized from the model's per-layer specs, owned by the scheduler.

`CacheManager` is the one place that hands out cache memory. Its first (and today only) pool is the
paged KV `BlockPool`; each request holds one `CacheHandle` (its block table, the names of its full
blocks, how many of them are in the prefix index). The scheduler admits, grows, commits and frees
through the manager, never through the pool, so `check_integrity` can compare every handle with the
pool's reference counts; the scheduler runs it whenever it goes idle (mini-sglang's scheduler does
the same).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwenrun.engine.kv_cache import BlockPool, CacheHandle, KVCache, block_hash
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec

if TYPE_CHECKING:
    from qwenrun.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixHit:
    """Cached leading blocks of a waiting request, found by `match` and not yet shared."""

    blocks: list[int]
    num_tokens: int


class CacheManager:
    """Admission, allocation, prefix reuse and rollback over the paged KV cache.

    Invariants (`check_integrity`): the pool's own (free list, ref counts, prefix index); every
    block's ref count equals the number of live handles whose table holds it; a handle's
    registered blocks are named and in its table.
    """

    def __init__(self, specs: Sequence[KVCacheSpec], num_blocks: int, block_size: int, device: torch.device,
                 enable_prefix_caching: bool = True) -> None:
        self.specs, self.block_size = list(specs), block_size
        self.kv = KVCache(specs, num_blocks, block_size, device)
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._live: dict[int, CacheHandle] = {}  # id(handle) -> handle, for every handle holding blocks

    @classmethod
    def from_budget(cls, specs: Sequence[KVCacheSpec], budget: int, block_size: int, context: int,
                    max_num_seqs: int, device: torch.device, enable_prefix_caching: bool = True,
                    context_required: bool = False) -> tuple[CacheManager, int]:
        """A cache of at most `budget` bytes (and no more than `max_num_seqs` full contexts), and the
        context window it allows.

        Raises:
            InvalidRequestError: it holds fewer tokens than `context` while the context was asked
                for (`context_required`), or fewer than min(context, 256) tokens. Otherwise a
                smaller cache shrinks the context window, with a warning.
        """
        per_block = KVCache.bytes_per_block(specs, block_size)
        num_blocks = min(budget // per_block, -(-context // block_size) * max_num_seqs)
        capacity = num_blocks * block_size
        if capacity < context:
            if context_required or capacity < min(context, 256):
                raise InvalidRequestError(
                    f"the KV cache ({budget / 2**20:.0f} MiB) holds {capacity} tokens, fewer than "
                    f"max_model_len {context}; raise kv_cache_memory or lower max_model_len"
                )
            logger.warning("context window limited to %d tokens by the KV cache memory", capacity)
            context = capacity
        return cls(specs, num_blocks, block_size, device, enable_prefix_caching), context

    # ------------------------------------------------------------------------------ admission
    def match(self, req: Request) -> PrefixHit:
        """The cached blocks that `req`'s tokens start with (at least one token is left to compute:
        it yields the logits)."""
        full = (len(req.token_ids) - 1) // self.block_size
        self._name_blocks(req, full)
        blocks = self.pool.match(req.cache.block_hashes[:full])
        return PrefixHit(blocks, len(blocks) * self.block_size)

    def can_admit(self, hit: PrefixHit, num_tokens: int) -> bool:
        """Whether a request starting with `hit` can have `num_tokens` more tokens in blocks now."""
        need = -(-(hit.num_tokens + num_tokens) // self.block_size) - len(hit.blocks)
        return need <= self.pool.num_free_after_share(hit.blocks)

    def take(self, req: Request, hit: PrefixHit) -> None:
        """Share the hit's blocks as the start of `req`'s (empty) block table."""
        assert not req.cache.block_table, "take() starts a block table"
        self.pool.share(hit.blocks)
        req.cache.block_table = list(hit.blocks)
        if hit.blocks:
            self._live[id(req.cache)] = req.cache

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
        """Return `req`'s blocks (named ones stay cached for later prompts); its names are kept, as
        they describe its tokens, not its blocks."""
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
        handle.block_table = []
        handle.num_registered_blocks = 0
        self._live.pop(id(handle), None)

    # ------------------------------------------------------------------------- prefix index
    def commit(self, req: Request) -> None:
        """Name the blocks that `req`'s computed tokens filled, so later prompts can reuse them.

        Call it only for tokens that are final (after acceptance): a committed block may be shared
        and is never written again."""
        full = req.num_computed_tokens // self.block_size
        self._name_blocks(req, full)
        h = req.cache
        for i in range(h.num_registered_blocks, full):
            self.pool.register(h.block_table[i], h.block_hashes[i])
        h.num_registered_blocks = max(h.num_registered_blocks, full)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget the K/V of `req`'s last `num_tokens` computed tokens (rejected draft tokens).

        Paged KV makes this cheap: blocks wholly past the new length go back to the pool and the
        names past it are dropped; slots left in a kept block are simply overwritten later. Only
        uncommitted tokens can go (committed blocks may be shared). The caller (the scheduler)
        then lowers `num_computed_tokens` by `num_tokens`: it alone changes request state.
        """
        keep = req.num_computed_tokens - num_tokens
        h = req.cache
        assert 0 <= num_tokens and keep >= h.num_registered_blocks * self.block_size, \
            "rollback past committed blocks"
        kept = -(-keep // self.block_size)
        self.pool.free(h.block_table[kept:])
        del h.block_table[kept:]
        del h.block_hashes[keep // self.block_size :]
        if not h.block_table:
            self._live.pop(id(h), None)

    def _name_blocks(self, req: Request, full: int) -> None:
        """Extend the request's hash chain over its first `full` blocks of tokens."""
        bs, hashes = self.block_size, req.cache.block_hashes
        while len(hashes) < full:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, req.token_ids[i * bs : (i + 1) * bs]))

    # ------------------------------------------------------------------------------- checking
    @property
    def num_live(self) -> int:
        """Handles holding blocks (requests admitted and not yet freed, scratch sequences)."""
        return len(self._live)

    def check_integrity(self) -> None:
        """Assert the invariants in the class docstring (AssertionError names the broken one)."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for h in self._live.values():
            assert h.block_table, "a live handle holds no blocks"
            assert h.num_registered_blocks <= min(len(h.block_table), len(h.block_hashes)), \
                "a handle registered blocks it does not hold"
            for b in h.block_table:
                refs[b] += 1
        assert refs == self.pool.ref_counts, "block ref counts disagree with the requests' block tables"
