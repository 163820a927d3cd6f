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

A speculative step verifies a sequence's last token and m drafts in one chunk of 1 + m rows; the
drafts the target model rejects must leave no trace in the state, and which ones it rejects is known
only after the step. So the last m rows of such a chunk run the decode recurrence one token at a
time and the state after each row is kept: the state j tokens before the chunk's end goes into
`rewind_slots[b][j - 1]` (more slots of that sequence), and the cache side keeps the one after the
last accepted token by relabelling slots, without a copy. The drafts run through the very
operation a plain decode uses, so an accepted token's state is the one decoding it alone gives.
(A snapshot and a replay of the accepted rows would keep fewer slots, but cost a second forward of
those rows in every step with a rejection.)

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
      start from zeros (the slot's content is garbage) and ignore it;
    - `rewind_slots[b]`: the chunk's last `len(rewind_slots[b])` rows are drafts a speculative step
      may reject; `rewind_slots[b][j - 1]` receives the state j tokens before the chunk's end (the
      module docstring says why). Empty for every other sequence.

    `draft_rounds` is derived from these once per step (every linear-attention layer runs the same
    schedule): round i holds, for each sequence with at least i drafts, its i-th draft row, the
    slot holding the state before it and the slot receiving the state after it; `head_out_slots[b]`
    receives the state after the rows before the drafts (`out_slots[b]` when there are none).
    """

    query_lens: list[int]
    query_starts: list[int]
    slots: torch.Tensor | None  # [B] long
    out_slots: torch.Tensor | None  # [B] long
    has_initial_state: list[bool]
    rewind_slots: list[list[int]]
    head_out_slots: torch.Tensor | None  # [B] long
    draft_rounds: list[DraftRound]

    @classmethod
    def build(cls, query_lens: list[int], slots: list[int] | None, out_slots: list[int] | None,
              has_initial_state: list[bool], device: torch.device,
              rewind_slots: list[list[int]] | None = None) -> RecurrentMetadata:
        starts = [0]
        for n in query_lens[:-1]:
            starts.append(starts[-1] + n)
        rewind = [list(r) for r in rewind_slots] if rewind_slots is not None else [[] for _ in query_lens]
        assert slots is not None or not any(rewind), "drafts need state slots to roll back in"
        assert all(len(r) < n for r, n in zip(rewind, query_lens)), "a chunk is more than its drafts"
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device) if xs is not None else None  # noqa: E731
        out_t, head_out, rounds = as_t(out_slots), None, []
        if out_slots is not None:
            # after(b, i): the slot that receives sequence b's state after its first i drafts
            after = lambda b, i: out_slots[b] if i == len(rewind[b]) else rewind[b][-1 - i]  # noqa: E731
            head_out = as_t([after(b, 0) for b in range(len(query_lens))]) if any(rewind) else out_t
            for i in range(1, max(map(len, rewind), default=0) + 1):
                seqs = [b for b, r in enumerate(rewind) if len(r) >= i]
                rows = [starts[b] + query_lens[b] - len(rewind[b]) + i - 1 for b in seqs]
                rounds.append(DraftRound(as_t(rows), as_t([after(b, i - 1) for b in seqs]),
                                         as_t([after(b, i) for b in seqs])))
        return cls(list(query_lens), starts, as_t(slots), out_t, list(has_initial_state), rewind, head_out, rounds)

    @classmethod
    def without_cache(cls, seq_lens: list[int]) -> RecurrentMetadata:
        return cls.build(seq_lens, None, None, [False] * len(seq_lens), torch.device("cpu"))

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds one token to a state it already has (the recurrent step applies)."""
        return self.slots is not None and all(n == 1 for n in self.query_lens) and all(self.has_initial_state)

    def head_lens(self) -> list[int]:
        """Per sequence, the rows of its chunk before its drafts (all of them when it has none)."""
        return [n - len(r) for n, r in zip(self.query_lens, self.rewind_slots)]


@dataclass(frozen=True)
class DraftRound:
    """One draft row of each of some sequences, run as one batched decode step (`RecurrentMetadata`)."""

    rows: torch.Tensor  # [n] long, rows of the flat batch
    slots: torch.Tensor  # [n] long, read: the state before the row
    out_slots: torch.Tensor  # [n] long, written: the state after it
