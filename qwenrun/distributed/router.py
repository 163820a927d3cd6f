"""Which data-parallel replica serves a request: the one that holds its prefix, else the least loaded.

Each replica keeps its own prefix cache, so a request whose prompt starts with blocks another request
already ran is cheapest on the replica that ran them. The router names a prompt's full KV blocks with
the engine's own hash chain (`kv_cache.block_hash`, as `CacheManager` names them, image content
included), remembers which replica each name was sent to, and sends a request to the replica of its
longest remembered prefix. The map is a hint, bounded and least-recently-used: a replica may have
evicted the blocks since, which costs a recompute there, never a wrong answer.

Affinity yields to balance as in SGLang's cache-aware router (`balance_abs_threshold`): when the
affine replica has that many more requests in flight than the least loaded one, the request goes
to the least loaded instead, so one hot prefix cannot pile every request on one replica.
Load is the number of requests the router has in flight on each replica (no round trip to ask);
among equally loaded replicas the one sent fewest requests so far wins, so requests that come one
at a time still spread over the replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qwenrun.engine.kv_cache import block_hash

if TYPE_CHECKING:
    from qwenrun.engine.encoder_cache import MultimodalItem


def prefix_block_hashes(token_ids: Sequence[int], block_size: int,
                        mm_items: Sequence[MultimodalItem] = ()) -> list[bytes]:
    """The names the engine's prefix cache gives a prompt's full blocks, first to last.

    Only the blocks `CacheManager.match` looks up: the last prompt token is always computed, so a
    prompt of exactly k blocks shares at most k - 1 of them."""
    hashes: list[bytes] = []
    for i in range((len(token_ids) - 1) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        extra = b"".join(it.content_hash for it in mm_items if it.overlaps(lo, hi))
        hashes.append(block_hash(hashes[-1] if hashes else None, token_ids[lo:hi], extra))
    return hashes


class PrefixAffinityRouter:
    """Replica choice and in-flight counts for `num_replicas` replicas (indices 0..n-1).

    Invariant: `load[i]` is the number of `start(i)` calls not yet matched by `finish(i)`.
    Not thread-safe: one event loop calls it.
    """

    def __init__(self, num_replicas: int, block_size: int, *, balance_abs_threshold: int = 32,
                 max_entries: int = 1 << 18) -> None:
        if num_replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.block_size = block_size
        self.balance_abs_threshold = balance_abs_threshold
        self.max_entries = max_entries
        self.load = [0] * num_replicas
        self.routed = [0] * num_replicas  # requests sent to each replica so far
        self.alive = [True] * num_replicas
        self._owner: OrderedDict[bytes, int] = OrderedDict()  # block name -> replica it was sent to
        self.affinity_hits = 0  # requests sent to the replica of their prefix

    @property
    def live_replicas(self) -> list[int]:
        return [i for i, up in enumerate(self.alive) if up]

    def route(self, token_ids: Sequence[int], mm_items: Sequence[MultimodalItem] = ()) -> int:
        """The replica for a prompt (its block names are remembered for it).

        Raises:
            RuntimeError: no replica is alive.
        """
        live = self.live_replicas
        if not live:
            raise RuntimeError("no data-parallel replica is alive")
        hashes = prefix_block_hashes(token_ids, self.block_size, mm_items)
        least = min(live, key=lambda i: (self.load[i], self.routed[i]))
        chosen = least
        for name in reversed(hashes):  # a name stands for its whole prefix: the longest match wins
            owner = self._owner.get(name)
            if owner is not None and self.alive[owner]:
                if self.load[owner] - self.load[least] < self.balance_abs_threshold:
                    chosen = owner
                    self.affinity_hits += 1
                break
        self._remember(hashes, chosen)
        self.routed[chosen] += 1
        return chosen

    def _remember(self, hashes: list[bytes], replica: int) -> None:
        for name in hashes:
            self._owner[name] = replica
            self._owner.move_to_end(name)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def start(self, replica: int) -> None:
        self.load[replica] += 1

    def finish(self, replica: int) -> None:
        self.load[replica] -= 1
        assert self.load[replica] >= 0, "finish() without start()"

    def remove(self, replica: int) -> None:
        """A replica died: route nothing more to it and forget the prefixes it held."""
        self.alive[replica] = False
        for name in [n for n, r in self._owner.items() if r == replica]:
            del self._owner[name]
