"""Routed-expert computation shared by every expert weight format (full precision, packed, int8)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# expert(x [n, H], e) -> expert e's MLP output [n, H]
ExpertMLP = Callable[[torch.Tensor, int], torch.Tensor]


def grouped_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, num_experts: int, expert: ExpertMLP
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
        y = expert(x[rows], e)  # [n, H]
        out.index_add_(0, rows, y * weights.reshape(-1)[idx, None])
        start += n
    return out
