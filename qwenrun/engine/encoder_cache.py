"""Images and videos in the engine: the preprocessed items of a prompt, and the cache of their encoder output.

A vision-language request carries `MultimodalItem`s: each item's pixels, grid, content hash and where its
placeholder tokens sit in the prompt. The vision tower runs once per item, when a step first needs
any of its placeholder rows, and its output stays in the `EncoderCache` under the item's content hash:
a prefill chunk that cuts through an image, a preempted request that comes back, or another request
with the same picture takes the rows from there instead of encoding again. Entries are pinned while a
running request holds the item and otherwise evicted least recently used past the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class MultimodalItem:
    """One image or video of a prompt, preprocessed. Its placeholder tokens form one run per image
    and one per temporal patch of a video (timestamp text sits between a video's runs); the
    encoder's output rows are those runs' tokens, in order."""

    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # [patches, channels * temporal * patch * patch]
    grid_thw: tuple[int, int, int]  # in patches
    content_hash: bytes  # of the pixels the encoder sees (equal hashes: equal encoder output)
    runs: tuple[tuple[int, int], ...]  # (offset in the prompt, length) of each placeholder run

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.runs)

    @property
    def offset(self) -> int:
        return self.runs[0][0]

    @property
    def end(self) -> int:
        return self.runs[-1][0] + self.runs[-1][1]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any of its placeholder tokens lies in [start, end)."""
        return any(o < end and o + n > start for o, n in self.runs)

    def rows_in(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(first prompt position, first output row, count) of its placeholder tokens in [start, end)."""
        out, row = [], 0
        for o, n in self.runs:
            lo, hi = max(start, o), min(end, o + n)
            if lo < hi:
                out.append((lo, row + lo - o, hi - lo))
            row += n
        return out


class EncoderCache:
    """Encoder output (`[1 + deepstack, tokens, hidden]` per item) by content hash.

    Invariants (`check_integrity`): reference counts are positive; the byte count equals the
    entries' sizes; past the budget, every entry is pinned (unpinned ones would have been evicted).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self._refs: dict[bytes, int] = {}
        self._bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def pins(self) -> dict[bytes, int]:
        """Content hash -> how many live requests pinned it."""
        return dict(self._refs)

    def acquire(self, keys: Iterable[bytes]) -> None:
        """Pin these items for a request that may need them (before or after they are encoded)."""
        for key in keys:
            self._refs[key] = self._refs.get(key, 0) + 1

    def release(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            n = self._refs[key] - 1
            if n:
                self._refs[key] = n
            else:
                del self._refs[key]
        self._evict()

    def get(self, key: bytes) -> torch.Tensor | None:
        out = self._entries.get(key)
        if out is not None:
            self._entries.move_to_end(key)
        return out

    def put(self, key: bytes, output: torch.Tensor) -> None:
        if key in self._entries:
            return
        self._entries[key] = output
        self._bytes += output.numel() * output.element_size()
        self._evict()

    def _evict(self) -> None:
        for key in [k for k in self._entries if k not in self._refs]:
            if self._bytes <= self.budget:
                break
            out = self._entries.pop(key)
            self._bytes -= out.numel() * out.element_size()

    def check_integrity(self) -> None:
        assert all(n > 0 for n in self._refs.values()), "an encoder entry has a non-positive pin count"
        assert self._bytes == sum(t.numel() * t.element_size() for t in self._entries.values()), \
            "encoder cache byte count is off"
        assert self._bytes <= self.budget or all(k in self._refs for k in self._entries), \
            "an unpinned encoder entry is kept past the budget"

