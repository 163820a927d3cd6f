"""The paged KV cache: preallocated per-layer slot arrays, and the pool of fixed-size blocks with
automatic prefix caching.

A full block is named by a hash chained over every token before it, so equal names mean equal
prefixes. Freed blocks keep their name and stay reusable until the pool needs them again, least
recently freed first; a request whose prompt starts with cached blocks shares them (ref counts)
and computes only the rest.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwenrun.layers.attention import KVCacheSpec, LayerKV, QuantizedKV


# Here, not in cache.py, so that Request can hold one without importing the manager that takes Requests.
@dataclass
class CacheHandle:
    """One request's share of the cache: what used to be spread over `Request` fields."""

    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # names of the full blocks of the token ids
    num_registered_blocks: int = 0  # leading blocks named in the prefix index
    # hybrid models: the state slots it owns, in the order CacheManager keeps them (`commit`)
    state_slots: list[int] = field(default_factory=list)
    state_rewind: int = 0  # hybrid models: tokens the state can still be rolled back by (`rollback`)
    # vision-language models: the content hashes of its items, pinned in the encoder cache
    encoder_keys: list[bytes] = field(default_factory=list)


class KVCache:
    """Per attention layer K and V of shape [kv_heads, num_blocks * block_size, head_dim] (head-major),
    allocated once from the model's per-layer specs and keyed by layer index (a hybrid model's other
    layers keep recurrent state instead: state_cache.py). An int8 spec's K and V are `QuantizedKV`
    (int8 values and their per-token scales)."""

    def __init__(self, specs: dict[int, KVCacheSpec], num_blocks: int, block_size: int, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        slots = num_blocks * block_size
        self.layers = {i: (self._zeros(s, slots, device), self._zeros(s, slots, device)) for i, s in specs.items()}

    @staticmethod
    def _zeros(s: KVCacheSpec, num_slots: int, device: torch.device) -> LayerKV:
        if s.dtype == torch.int8:
            return QuantizedKV.zeros(s.num_kv_heads, num_slots, s.head_dim, device)
        return torch.zeros((s.num_kv_heads, num_slots, s.head_dim), dtype=s.dtype, device=device)

    @staticmethod
    def bytes_per_block(specs: Sequence[KVCacheSpec], block_size: int) -> int:
        return block_size * sum(s.bytes_per_token for s in specs)


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """Name of a full block: a cryptographic hash, so one client cannot forge another's prefix.
    `extra` names what the token ids do not say (the content of the images whose placeholders the
    block holds)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    if extra:
        h.update(b"\x00media" + extra)
    return h.digest()


class BlockPool:
    """Blocks with reference counts; unreferenced blocks sit on an LRU free list, named ones stay cached.

    Invariants (`check_integrity`): a block is free iff its ref count is 0; every cached name maps
    to a block carrying that name; free + referenced == all blocks.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._name: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def ref_counts(self) -> list[int]:
        return list(self._ref)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            name = self._name[b]
            if name is not None:
                del self._cached[name]
                self._name[b] = None
            self._ref[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; the tail of a sequence is evicted first (least shared)."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            assert self._ref[b] >= 0, f"block {b} freed twice"
            if self._ref[b] == 0:
                self._free[b] = None

    def match(self, names: Sequence[bytes]) -> list[int]:
        """The cached blocks for the longest run of leading names (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for name in names:
            b = self._cached.get(name)
            if b is None:
                break
            found.append(b)
        return found

    def num_free_after_share(self, blocks: Sequence[int]) -> int:
        """Free blocks left once `blocks` are shared (sharing a free cached block takes it off the list)."""
        return len(self._free) - sum(1 for b in blocks if self._ref[b] == 0)

    def share(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def register(self, block: int, name: bytes) -> None:
        """Name a block that just became full; the first block with a given name wins."""
        if self.enable_prefix_caching and name not in self._cached and self._name[block] is None:
            self._cached[name] = block
            self._name[block] = name

    def check_integrity(self) -> None:
        free = set(self._free)
        assert all(r >= 0 for r in self._ref), "negative ref count"
        assert free == {b for b, r in enumerate(self._ref) if r == 0}, "free list and ref counts disagree"
        assert all(self._name[b] == n for n, b in self._cached.items()), "prefix index points at a renamed block"
        assert len(free) + sum(1 for r in self._ref if r > 0) == self.num_blocks, "blocks were lost"
