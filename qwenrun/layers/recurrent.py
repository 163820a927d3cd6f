"""The contract between linear-attention (Gated DeltaNet) layers and the cache side.

A linear-attention layer keeps no per-token cache: each running sequence owns one fixed-size *state
slot* per layer — the last K-1 pre-conv inputs of its causal conv1d and the recurrent state
`[Hv, dk, dv]` (fp32: it accumulates over the whole context). A model lists a `RecurrentStateSpec`
for each such layer in `cache_specs()`, beside `KVCacheSpec` for attention layers; the cache side
allocates `[num_slots, ...]` tensors from them and hands out slot indices. A step's
`RecurrentMetadata` says, per sequence of the flat batch, which slot it reads and writes and whether
that slot already holds its state (a continuing prefill chunk or a decode) or it starts from zeros.

A step never overwrites the state it starts from: each sequence reads slot `slots[b]` and writes
the state after the step into `out_slots[b]`, a second slot it owns (SGLang's ping-pong buffers).
The scheduler swaps the two only once the step succeeded, so a step that raised (or whose sampling
failed) can be run again from the same state, request by request, exactly as attention reruns from
its untouched KV — at no copy cost.

Other slots hold *state checkpoints* (copies of a sequence's state at a block boundary, for prefix
reuse); the cache side makes those copies itself, between steps, so a model never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecurrentStateSpec:
    """One linear-attention layer's state per sequence: conv window `[conv_dim, conv_kernel - 1]` in
    `conv_dtype` (the model dtype), recurrent state `[num_heads, k_head_dim, v_head_dim]` in
    `state_dtype`."""

    conv_dim: int
    conv_kernel: int
    num_heads: int  # value heads
    k_head_dim: int
    v_head_dim: int
    conv_dtype: torch.dtype
    state_dtype: torch.dtype = torch.float32

    @property
    def conv_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.conv_kernel - 1)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.k_head_dim, self.v_head_dim)

    @property
    def bytes_per_slot(self) -> int:
        size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        conv = self.conv_dim * (self.conv_kernel - 1) * size(self.conv_dtype)
        return conv + self.num_heads * self.k_head_dim * self.v_head_dim * size(self.state_dtype)


@dataclass
class RecurrentMetadata:
    """Per sequence of the flat batch (batch order; its tokens are contiguous rows):

    - `query_lens[b]` new tokens start at row `query_starts[b]`;
    - `slots[b]` is the slot it reads its state from and `out_slots[b]` the one it writes the state
      after this step's tokens into (`None` for the whole batch when the step runs without a cache:
      every sequence then starts from zeros and no state is written back). They may be equal (in
      place), for callers that need no rerun;
    - `has_initial_state[b]`: `slots[b]` holds the state after its computed tokens; False means
      start from zeros (the slot's content is garbage) and ignore it.
    """

    query_lens: list[int]
    query_starts: list[int]
    slots: torch.Tensor | None  # [B] long
    out_slots: torch.Tensor | None  # [B] long
    has_initial_state: list[bool]

    @classmethod
    def build(cls, query_lens: list[int], slots: list[int] | None, out_slots: list[int] | None,
              has_initial_state: list[bool], device: torch.device) -> RecurrentMetadata:
        starts = [0]
        for n in query_lens[:-1]:
            starts.append(starts[-1] + n)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device) if xs is not None else None  # noqa: E731
        return cls(list(query_lens), starts, as_t(slots), as_t(out_slots), list(has_initial_state))

    @classmethod
    def without_cache(cls, seq_lens: list[int]) -> RecurrentMetadata:
        return cls.build(seq_lens, None, None, [False] * len(seq_lens), torch.device("cpu"))

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds one token to a state it already has (the recurrent step applies)."""
        return self.slots is not None and all(n == 1 for n in self.query_lens) and all(self.has_initial_state)
