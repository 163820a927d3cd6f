"""Routed-expert computation shared by every expert weight format (full precision, packed, int8)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# linear(x [n, in], which "w13" | "w2", expert e) -> [n, out]
ExpertLinear = Callable[[torch.Tensor, str, int], torch.Tensor]


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, intermediate: int,
    linear: ExpertLinear,
) -> torch.Tensor:
    """x [T, H]; weights/experts [T, k] -> Σ_k weights · Expert_k(x).

    Assignments are sorted by expert so each selected expert runs once over all of its tokens; experts
    nobody chose cost nothing (one host sync per layer reads the counts)."""
    T, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // k  # [T*k] token row of each sorted assignment
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start : start + n]
        rows = token_of[start : start + n]
        gate, up = linear(x[rows], "w13", e).split(intermediate, dim=-1)
        y = linear(F.silu(gate) * up, "w2", e)  # [n, H]
        out.index_add_(0, rows, y * weights.reshape(-1)[idx, None])
        start += n
    return out
