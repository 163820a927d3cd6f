"""Routed experts: one base class for every expert weight format (full precision, packed, int8/int4).

`Experts` owns the computation, Σ_k weights · Expert_k(x): a lone decode token runs all its chosen
experts in one C++ call where a kernel reads the module's weights (`fused_format`), more tokens are
grouped by expert (`grouped_experts`) over `expert(x, e)`. A format says only how it stores the
weights and runs one expert. `Qwen3MoeExperts` is the loaded, full-precision form that the CPU
packing and quantization passes replace.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun import kernels
from qwenrun.layers.checkpoint import Rank, split
from qwenrun.layers.linear import WeightTarget, silu_mul
from qwenrun.layers.parallel import current

# expert(x [n, H], e) -> expert e's MLP output [n, H]
ExpertMLP = Callable[[torch.Tensor, int], torch.Tensor]


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, expert: ExpertMLP
) -> torch.Tensor:
    """x [T, H]; weights/experts [T, k] -> Σ_k weights · Expert_k(x).

    Assignments are sorted by expert so each selected expert runs once over all of its tokens; experts
    nobody chose cost nothing (one host sync per layer reads the counts). An id of `num_experts` is
    no expert: those assignments (another rank's experts, `local_assignments`) are skipped."""
    T, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // k  # [T*k] token row of each sorted assignment
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n == 0:
            continue
        idx = order[start : start + n]
        rows = token_of[start : start + n]
        y = expert(x[rows], e)  # [n, H]
        y = y * weights.reshape(-1)[idx, None]
        if out.dtype == torch.float32:
            out.index_add_(0, rows, y)
        else:  # torch's bf16 index_add_ on CPU takes milliseconds for a few rows (~1000x index_put_)
            out.index_put_((rows,), y, accumulate=True)  # same sums: a token reaches an expert once
        start += n
    return out


@kernels.op("routed_experts")
def routed_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, module: Experts) -> torch.Tensor:
    """x [T, H]; weights/experts [T, k] -> [T, H] through `module`'s experts."""
    return grouped_experts(x, weights, experts, module.num_experts, module.expert)


class Experts(nn.Module, ABC):
    """`num_experts` routed expert MLPs (SiLU(gate) · up, then down), in one weight format.

    Subclasses give `expert(x, e)`; those whose stacked weights the C++ MoE kernel reads set
    `fused_format` ("bf16", "int8", "int4", "int4_x16") and give `fused_weights()` for it."""

    num_experts: int
    fused_format: str | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights/experts [T, k] -> Σ_k weights · Expert_k(x) [T, H]."""
        return routed_experts(x, weights, experts, self)

    @abstractmethod
    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [n, H] -> expert e's output [n, H]."""

    def fused_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """(gate/up parts, down parts, int4 group size) stacked over experts, as the kernel takes them."""
        raise NotImplementedError(f"{type(self).__name__} has no fused decode format")


class Qwen3MoeExperts(Experts):
    """Experts as loaded, stacked (`w13 [E, 2I, H]`, `w2 [E, H, I]`) in the model dtype.

    A tensor-parallel rank holds I / world rows of every expert; with expert parallelism it holds
    experts `first_expert ..` whole instead (`num_experts` of `total_experts`), and its owner maps
    the router's global expert ids to them (`local_assignments`: this class is swapped by
    quantization and packing, the owner is not)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        tp = current()
        self.total_experts, self.rank = num_experts, tp.as_rank
        self.expert_parallel = tp.expert_parallel and tp.world > 1
        if self.expert_parallel:
            num_experts = tp.divide(num_experts, "num_experts")
        else:
            intermediate = tp.divide(intermediate, "moe_intermediate_size")
        self.first_expert = tp.rank * num_experts if self.expert_parallel else 0
        self.num_experts, self.intermediate = num_experts, intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [E, gate;up, H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x, self.w13[e])), self.w2[e])

    def weight_targets(self, parent: str, own: str) -> Iterator[WeightTarget]:
        I, first = self.intermediate, self.first_expert
        everything = tuple(f"{e}.{p}" for e in range(self.total_experts) for p in ("gate", "up", "down"))
        rows, cols = (_whole, _whole) if self.expert_parallel else (split(0), split(1))
        for e in range(self.total_experts):
            if not first <= e < first + self.num_experts:  # another rank's expert: not read
                for p, param in (("gate", "w13"), ("up", "w13"), ("down", "w2")):
                    yield WeightTarget(f"{own}.{e}.{p}_proj.weight", f"{own}.{param}", f"{e}.{p}", _nothing,
                                       rank_slice=_absent)
                continue
            yield WeightTarget(f"{own}.{e}.gate_proj.weight", f"{own}.w13", f"{e}.gate", _expert(e - first, 0, I),
                               rank_slice=rows)
            yield WeightTarget(f"{own}.{e}.up_proj.weight", f"{own}.w13", f"{e}.up", _expert(e - first, I, I),
                               rank_slice=rows)
            yield WeightTarget(f"{own}.{e}.down_proj.weight", f"{own}.w2", f"{e}.down", _expert(e - first, None, None),
                               rank_slice=cols)
        # transformers 5 may store the experts fused; either layout loads.
        gate_up = tuple(s for s in everything if not s.endswith("down"))
        down = tuple(s for s in everything if s.endswith("down"))
        yield WeightTarget(f"{own}.gate_up_proj", f"{own}.w13", "fused", lambda p: p, gate_up, self._fused(True))
        yield WeightTarget(f"{own}.down_proj", f"{own}.w2", "fused", lambda p: p, down, self._fused(False))

    def _fused(self, gate_up: bool):
        """The rank's part of a fused [E, 2I, H] (`gate_up`) or [E, H, I] tensor."""
        n, first = self.num_experts, self.first_expert

        def part(t: torch.Tensor, rank: Rank) -> torch.Tensor:
            if rank.world == 1:
                return t
            if self.expert_parallel:
                return t.narrow(0, first, n)
            if not gate_up:
                return split(2)(t, rank)
            E, two_i, H = t.shape
            return split(2)(t.reshape(E, 2, two_i // 2, H), rank).reshape(E, -1, H)

        return part


def local_assignments(weights: torch.Tensor, experts: torch.Tensor, first: int,
                      num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) over a rank's experts `first .. first + num_local`, so that the all-reduce over
    ranks adds each chosen expert's output once: a lone token keeps only its local assignments (the
    fused decode kernel then reads only their weights), more tokens give another rank's assignments
    the id `num_local`, which `grouped_experts` skips."""
    local = experts - first
    outside = (local < 0) | (local >= num_local)
    if experts.shape[0] == 1:
        keep = ~outside[0]
        return weights[:, keep], local[:, keep]
    return weights.masked_fill(outside, 0), local.masked_fill(outside, num_local)


def _whole(t: torch.Tensor, rank: Rank) -> torch.Tensor:
    return t


def _absent(t: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Another rank's expert: no row of it is read (its target, `_nothing`, is empty too)."""
    return t.narrow(0, 0, 0)


def _nothing(p: torch.Tensor) -> torch.Tensor:
    return p[0].narrow(0, 0, 0)


def _expert(e: int, offset: int | None, size: int | None):
    if offset is None:
        return lambda p: p[e]
    return lambda p: p[e].narrow(0, offset, size)
