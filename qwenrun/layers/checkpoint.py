"""The tensor side of a model's checkpoint mapping, beside the parameter side (`WeightTarget`).

`weight_targets` says which parameter slice a checkpoint tensor fills. What a family's checkpoints
store differently from what its modules hold is said here, as data on the model class
(`checkpoint_rules`, mlx-lm's `sanitize`): prefixes to rename (VL and Qwen3.5 checkpoints keep the
text model under `model.language_model.`), tensors to transform on the way in (`1 + w` for
zero-centred norms, a conv1d layout) and tensors to drop (recomputed buffers, `mtp.*` heads a model
does not run). `Rank` and `split` narrow a checkpoint tensor to one tensor-parallel rank's part
(nano-vllm's per-parameter `weight_loader`); a single process is rank 0 of 1 and loads it whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from qwenrun.errors import CheckpointError

Transform = Callable[[torch.Tensor], torch.Tensor]
RankSlice = Callable[[torch.Tensor, "Rank"], torch.Tensor]


@dataclass(frozen=True)
class CheckpointRules:
    """How a model family's stored tensor names and values map onto its `weight_targets`.

    The loader applies them to each stored tensor in this order: the first `renames` entry whose
    stored prefix matches replaces it; a name matching an `ignore` pattern that the model has no
    parameter for is skipped (never "unexpected": `mtp.*` loads only into a model given its MTP
    head); the first `transforms` entry whose pattern matches maps the
    tensor, as stored (its dtype too), before the rank's slice is taken and it is cast to the model
    dtype. Patterns are `fnmatch` globs over the renamed name (`*` crosses dots).
    """

    renames: tuple[tuple[str, str], ...] = ()  # (stored prefix, model prefix)
    ignore: tuple[str, ...] = ()
    transforms: tuple[tuple[str, Transform], ...] = ()

    def rename(self, stored: str) -> str:
        for old, new in self.renames:
            if stored.startswith(old):
                return new + stored[len(old):]
        return stored

    def ignored(self, name: str) -> bool:
        return self.ignore_pattern(name) is not None

    def ignore_pattern(self, name: str) -> str | None:
        """The first `ignore` pattern `name` matches (the loader counts skipped tensors by it)."""
        return next((pattern for pattern in self.ignore if fnmatchcase(name, pattern)), None)

    def transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        for pattern, fn in self.transforms:
            if fnmatchcase(name, pattern):
                return fn(tensor)
        return tensor


@dataclass(frozen=True)
class Rank:
    """This process's place among the tensor-parallel ranks that share one model."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")


def replicated(tensor: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Every rank loads the whole tensor (norms, embeddings, anything not split)."""
    return tensor


def split(dim: int) -> RankSlice:
    """Rank r of `world` loads the r-th of `world` equal chunks along `dim` (a column-parallel
    weight splits dim 0, a row-parallel one dim 1)."""

    def part(tensor: torch.Tensor, rank: Rank) -> torch.Tensor:
        if rank.world == 1:
            return tensor
        size, rest = divmod(tensor.shape[dim], rank.world)
        if rest:
            raise CheckpointError(
                f"dimension {dim} of size {tensor.shape[dim]} does not split into {rank.world} equal parts"
            )
        return tensor.narrow(dim, rank.rank * size, size)

    return part
