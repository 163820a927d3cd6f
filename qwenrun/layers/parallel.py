"""Tensor and expert parallelism as the layers see it: the rank's place, its collectives, its shards.

A model is built for one rank: inside `building(tp)` every layer reads `current()` once and sizes its
parameters to its own shard (heads, intermediate rows, vocabulary rows, experts), and says in its
`weight_targets` / `tp_slices` how a checkpoint tensor narrows to that shard (`RankSlice`). So the
shard is a property of the parameter and of its loading targets, not of the module's class: the
quantization and CPU-packing passes, which swap classes, quantize and pack the shard they find and
keep its targets. The one collective a row-parallel layer needs (an all-reduce of its partial sums)
is called by the block that owns the layer, after it, only when the world has more than one rank,
so a single process runs exactly the code it ran before (no extra copy, no call).

Layout (vLLM's): q heads and MLP / expert intermediate rows split evenly; KV heads split when the
world divides them, else each rank keeps one (replicated `world / num_kv_heads` times); o_proj and
down_proj split their input dim; the embedding and the LM head split the vocabulary; Gated DeltaNet
splits by key-head group (a key head and its value heads stay together). With expert parallelism
each rank holds `num_experts / world` whole experts instead of a slice of every expert.

The collectives go through a process group object (`torch.distributed.ProcessGroupGloo` /
`ProcessGroupNCCL`) held here, not torch's default group, so several engines can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.errors import CheckpointError
from qwenrun.layers.checkpoint import Rank, RankSlice, split


@dataclass(frozen=True)
class TensorParallel:
    """One rank's view of its tensor-parallel group; `group` is None for a single process."""

    rank: int = 0
    world: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # a torch.distributed ProcessGroup
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    @property
    def as_rank(self) -> Rank:
        return Rank(self.rank, self.world)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `x`, in place (every rank gets it)."""
        if self.world > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] side by side along the last dim: [..., world * n]."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.group.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def divide(self, n: int, what: str) -> int:
        """n / world, or a CheckpointError saying which count does not split."""
        if n % self.world:
            raise CheckpointError(f"{what} ({n}) is not divisible by tensor_parallel_size {self.world}")
        return n // self.world


SINGLE = TensorParallel()
_current = SINGLE


def current() -> TensorParallel:
    """The rank a model is being built for (`SINGLE` outside `building`)."""
    return _current


@contextmanager
def building(tp: TensorParallel) -> Iterator[None]:
    """Layers constructed inside size themselves for `tp`'s rank."""
    global _current
    before, _current = _current, tp
    try:
        yield
    finally:
        _current = before


# -------------------------------------------------------------------------------- rank slices
def parts(sizes: Sequence[int]) -> RankSlice:
    """A tensor whose dim 0 is several pieces of `sizes` rows (a fused [q | k | v]): the rank's
    equal chunk of each piece, concatenated in order."""

    def part(t: torch.Tensor, rank: Rank) -> torch.Tensor:
        if rank.world == 1:
            return t
        if sum(sizes) != t.shape[0]:
            raise CheckpointError(f"dimension 0 has {t.shape[0]} rows, expected {sum(sizes)} ({list(sizes)})")
        pieces, start = [], 0
        for n in sizes:
            pieces.append(split(0)(t.narrow(0, start, n), rank))
            start += n
        return torch.cat(pieces)

    return part


def kv_heads(num_kv_heads: int, head_dim: int) -> RankSlice:
    """K or V rows [nkv * d, ...]: the rank's share of the heads, or, when the world is larger than
    the head count, the one head its query heads attend with."""

    def part(t: torch.Tensor, rank: Rank) -> torch.Tensor:
        if rank.world <= num_kv_heads:
            return split(0)(t, rank)
        return t.narrow(0, rank.rank * num_kv_heads // rank.world * head_dim, head_dim)

    return part


def first_rank_only(t: torch.Tensor, rank: Rank) -> torch.Tensor:
    """A row-parallel layer's bias: added once, by rank 0, before the all-reduce sums the ranks."""
    return t if rank.rank == 0 else torch.zeros_like(t)


def local_kv_heads(tp: TensorParallel, num_heads: int, num_kv_heads: int) -> int:
    """KV heads a rank holds (see `kv_heads`)."""
    tp.divide(num_heads, "num_attention_heads")
    if tp.world <= num_kv_heads:
        return tp.divide(num_kv_heads, "num_key_value_heads")
    if tp.world % num_kv_heads:
        raise CheckpointError(f"tensor_parallel_size {tp.world} is neither a divisor nor a multiple of "
                              f"num_key_value_heads ({num_kv_heads})")
    return 1


def row_parallel(linear: nn.Module, tp: TensorParallel) -> nn.Module:
    """Mark an `nn.Linear` [out, in / world] as row-parallel: it loads its columns of the weight
    (and the bias on rank 0 only); its owner all-reduces the output."""
    if tp.world > 1:
        linear.tp_slices = {"weight": split(1), "bias": first_rank_only}
    return linear


def sliced(module: nn.Module, tp: TensorParallel, **slices: RankSlice) -> nn.Module:
    """Give `module`'s own parameters (by name) their rank slices; nothing for a single process."""
    if tp.world > 1:
        module.tp_slices = slices
    return module


# ------------------------------------------------------------------------------- vocabulary
class VocabParallelEmbedding(nn.Module):
    """The embedding's rows [V / world, H] of this rank: ids outside them give zeros, and the
    all-reduce puts each id's one non-zero row together (exact: the other terms are 0)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.num_local = tp.divide(vocab_size, "vocab_size")
        self.start = tp.rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden))
        self.tp_slices = {"weight": split(0)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill_(outside[:, None], 0))


def embedding(vocab_size: int, hidden: int) -> nn.Module:
    """`nn.Embedding` in a single process (unchanged), the rank's vocabulary rows otherwise."""
    tp = current()
    return nn.Embedding(vocab_size, hidden) if tp.world == 1 else VocabParallelEmbedding(vocab_size, hidden, tp)


def lm_head(hidden: int, vocab_size: int) -> nn.Linear:
    """The untied LM head: the rank's vocabulary rows; `TensorParallel.all_gather` joins the logits."""
    tp = current()
    head = nn.Linear(hidden, tp.divide(vocab_size, "vocab_size"), bias=False)
    return sliced(head, tp, weight=split(0))
