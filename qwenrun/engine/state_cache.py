"""Fixed-size recurrent state for linear-attention layers: slot tensors and the pool that hands them out.

A hybrid model's linear-attention layers keep, per sequence, one conv window and one recurrent state
per layer, whatever the context length (`RecurrentStateSpec`). `StateCache` holds them for
`num_slots` slots, all layers at once; a slot index names the same row in every layer's tensors.

`SlotPool` says what each slot is for:
- *running*: a running sequence owns two (ping-pong: a step reads one and writes the other, and
  the scheduler swaps them once the step succeeded — see layers/recurrent.py), and one more per
  draft token with speculative decoding (the state before each draft, to roll back to);
- *checkpoint*: a copy of some sequence's state right after a full block of tokens, named like the
  KV block that ends there (`block_hash`), so a later prompt that starts with the same blocks
  resumes from it instead of recomputing the whole prefix. Recurrent state cannot be rebuilt from
  KV blocks, so without these a hybrid model could reuse nothing;
- *free*.
Checkpoints are a cache: kept LRU in whatever the running sequences leave, and evicted when a
sequence needs slots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from qwenrun.layers.recurrent import RecurrentStateSpec


class StateCache:
    """Per linear-attention layer `(conv [S, conv_dim, K-1], state [S, Hv, dk, dv])`, keyed by layer index."""

    def __init__(self, specs: dict[int, RecurrentStateSpec], num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.layers = {
            i: (torch.zeros((num_slots, *s.conv_shape), dtype=s.conv_dtype, device=device),
                torch.zeros((num_slots, *s.state_shape), dtype=s.state_dtype, device=device))
            for i, s in specs.items()
        }
        # set to a list when tensor-parallel workers hold the same slots: `copy` records (src, dst) for them
        self.copies: list[tuple[int, int]] | None = None

    @staticmethod
    def bytes_per_slot(specs: Iterable[RecurrentStateSpec]) -> int:
        return sum(s.bytes_per_slot for s in specs)

    def copy(self, src: int, dst: int) -> None:
        """Slot `dst` becomes a copy of slot `src`, in every layer."""
        if self.copies is not None:
            self.copies.append((src, dst))
        for conv, state in self.layers.values():
            conv[dst].copy_(conv[src])
            state[dst].copy_(state[src])


class SlotPool:
    """Which slots are free, owned by running sequences, or named checkpoints (LRU).

    Invariants (`check_integrity`): every slot is exactly one of free, owned, checkpoint; the
    checkpoint index and the slots' names agree; no slot is lost.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self._owned: set[int] = set()
        self._checkpoints: OrderedDict[bytes, int] = OrderedDict()  # name -> slot, least recently used first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    def num_available(self, keep: int | None = None) -> int:
        """Slots `allocate` can hand out: free ones and checkpoints it may evict (all but `keep`)."""
        return len(self._free) + len(self._checkpoints) - (keep is not None and keep in self._checkpoints.values())

    def allocate(self, n: int, keep: int | None = None) -> list[int]:
        """n slots for a running sequence, evicting least recently used checkpoints (never `keep`)
        when too few are free."""
        if n > self.num_available(keep):
            raise RuntimeError(f"state slots exhausted: need {n}, {self.num_available(keep)} available")
        out = []
        for _ in range(n):
            if not self._free:
                name = next(k for k, s in self._checkpoints.items() if s != keep)
                self._free.append(self._checkpoints.pop(name))
            slot = self._free.pop()
            self._owned.add(slot)
            out.append(slot)
        return out

    def free(self, slots: Sequence[int]) -> None:
        for slot in slots:
            assert slot in self._owned, f"slot {slot} freed but not owned"
            self._owned.remove(slot)
            self._free.append(slot)

    def find(self, name: bytes) -> int | None:
        """The checkpoint slot named `name` (marked recently used), or None."""
        slot = self._checkpoints.get(name)
        if slot is not None:
            self._checkpoints.move_to_end(name)
        return slot

    def has(self, name: bytes) -> bool:
        return name in self._checkpoints

    def checkpoint_slot(self, name: bytes) -> int | None:
        """A slot to store the checkpoint `name` in: a free one, else the least recently used
        checkpoint's; None when the name is already stored or every slot is owned."""
        if name in self._checkpoints:
            self._checkpoints.move_to_end(name)
            return None
        if self._free:
            slot = self._free.pop()
        elif self._checkpoints:
            _, slot = self._checkpoints.popitem(last=False)
        else:
            return None
        self._checkpoints[name] = slot
        return slot

    def check_integrity(self) -> None:
        free, ckpt = set(self._free), set(self._checkpoints.values())
        assert len(free) == len(self._free), "a slot is on the free list twice"
        assert len(ckpt) == len(self._checkpoints), "two checkpoints share a slot"
        assert not (free & self._owned or free & ckpt or ckpt & self._owned), "a slot has two uses"
        assert len(free) + len(ckpt) + len(self._owned) == self.num_slots, "state slots were lost"
