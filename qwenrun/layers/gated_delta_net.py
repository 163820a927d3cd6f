"""Gated DeltaNet (Qwen3-Next, Qwen3.5): the linear-attention token mixer of the hybrid block.

Per value head the layer keeps a state `S [dk, dv]` instead of a KV cache. For each token, after a
causal depthwise conv1d + SiLU over `[q | k | v]` and L2-normalised q, k:
`S ← exp(g)·S`, `S ← S + k ⊗ β(v − kᵀS)`, `o = Sᵀq` with `g = −exp(A_log)·softplus(a + dt_bias)`,
`β = sigmoid(b)`, then the gated RMSNorm `norm(o)·silu(z)` and `out_proj`. Key heads are shared by
`Hv / Hk` consecutive value heads.

Prefill chunks run the chunked (UT-transform) form with chunk 64, decodes the recurrent step, both
from the sequence's state slot (`layers.recurrent`); a speculative step's draft rows run the
recurrent step row by row after the rest of their chunk, batched across sequences, so the state
after each draft is kept for rollback (a kernel that ran a sequence's rows in one pass over its
state, writing it out after each row, would save re-reading it per row). Transformers' rounding
order throughout: the reference is `torch_chunk_gated_delta_rule` /
`torch_recurrent_gated_delta_rule` / `causal_conv1d_update`.
The whole single-token step (conv update, delta rule, gated norm) is one operation, `gdn_decode`,
so a C++ kernel can do it in one pass over the state; a sequence's prefill chunk is another,
`gdn_prefill` (conv + delta rule, before the gated norm).

Both checkpoint layouts load into one `in_proj` with rows `[q | k | v | z | b | a]`: Qwen3.5's
split projections as they are, Qwen3-Next's per-key-head-group `in_proj_qkvz` / `in_proj_ba`
un-interleaved at load (`next_qkvz_to_split`, `next_ba_to_split`), so the forward has one path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun import kernels
from qwenrun.layers.checkpoint import split
from qwenrun.layers.linear import MergedLinear
from qwenrun.layers.parallel import current, parts, row_parallel, sliced
from qwenrun.layers.recurrent import RecurrentMetadata, RecurrentStateSpec

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FLA's (and transformers') L2 normalisation: eps inside the rsqrt of the sum."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(o)·w·silu(z) over the last dim, rounded as `Qwen3NextRMSNormGated` (o, z in the model dtype)."""
    dtype = o.dtype
    h = o.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(z.float())).to(dtype)


def decay_and_beta(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
                   dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g fp32, β in the model dtype) as transformers computes them (β's sigmoid in the model dtype)."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid()


@kernels.op("gdn_decode")
def gdn_decode(
    mixed_qkv: torch.Tensor,  # [B, conv_dim] pre-conv, channels [q (Hk*dk) | k (Hk*dk) | v (Hv*dv)]
    conv_states: torch.Tensor,  # [S, conv_dim, K-1] model dtype, updated in place
    conv_weight: torch.Tensor,  # [conv_dim, K]
    slots: torch.Tensor,  # [B] long, read
    out_slots: torch.Tensor,  # [B] long, written (may equal slots)
    a: torch.Tensor,  # [B, Hv]
    b: torch.Tensor,  # [B, Hv]
    A_log: torch.Tensor,  # [Hv]
    dt_bias: torch.Tensor,  # [Hv]
    states: torch.Tensor,  # [S, Hv, dk, dv] fp32, updated in place
    z: torch.Tensor,  # [B, Hv, dv]
    norm_weight: torch.Tensor,  # [dv]
    eps: float,
    num_k_heads: int,
) -> torch.Tensor:
    """One token of each of B sequences that already have a state: conv update + SiLU, l2norm q, k
    (q scaled by dk^-0.5), decay, kᵀS, rank-1 update, Sᵀq, gated RMSNorm. Returns [B, Hv, dv] in the
    model dtype (before `out_proj`); reads the conv window and state of `slots`, writes the new ones
    into `out_slots` (no other slot changes)."""
    B, conv_dim = mixed_qkv.shape
    Hv, dk, dv = states.shape[1:]
    dtype = mixed_qkv.dtype
    window = torch.cat((conv_states[slots], mixed_qkv[:, :, None]), dim=-1).to(conv_weight.dtype)  # [B, C, K]
    conv_states.index_copy_(0, out_slots, window[:, :, 1:].to(conv_states.dtype))
    x = F.silu(F.conv1d(window, conv_weight[:, None, :], groups=conv_dim)[:, :, 0]).to(dtype)  # [B, C]
    key_dim = num_k_heads * dk
    q, k, v = x.split((key_dim, key_dim, Hv * dv), dim=-1)
    rep = Hv // num_k_heads
    q = l2norm(q.view(B, num_k_heads, dk).repeat_interleave(rep, dim=1).float())
    k = l2norm(k.view(B, num_k_heads, dk).repeat_interleave(rep, dim=1).float())
    q = q / dk**0.5
    v = v.reshape(B, Hv, dv).float()
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    state = states[slots] * g.exp()[..., None, None]  # [B, Hv, dk, dv]
    kv_mem = (state * k[..., None]).sum(dim=-2)  # [B, Hv, dv]
    delta = (v - kv_mem) * beta.float()[..., None]
    state = state + k[..., None] * delta[..., None, :]
    out = (state * q[..., None]).sum(dim=-2).to(dtype)  # [B, Hv, dv]
    states.index_copy_(0, out_slots, state)
    return gated_rms_norm(out, z, norm_weight, eps)


def causal_conv(x: torch.Tensor, window: torch.Tensor | None,
                weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, C] new inputs after `window` [C, K-1] earlier ones (None: zeros) -> (SiLU(conv) [n, C],
    the last K-1 inputs [C, K-1])."""
    n, C = x.shape
    K = weight.shape[-1]
    if window is None:
        window = x.new_zeros(C, K - 1)
    seq = torch.cat((window.to(x.dtype), x.t()), dim=-1).to(weight.dtype)  # [C, K-1+n]
    out = F.silu(F.conv1d(seq[None], weight[:, None, :], groups=C)[0]).to(x.dtype)  # [C, n]
    return out.t(), seq[:, -(K - 1):]


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q, k [n, Hv, dk] (already repeated to the value heads), v [n, Hv, dv], g [n, Hv]
    fp32, β [n, Hv]; `state` [Hv, dk, dv] fp32 or None (zeros) -> (o [n, Hv, dv] in v's dtype, final
    state fp32). `torch_chunk_gated_delta_rule`'s algorithm and rounding, so a chunk continues exactly
    from the state another chunk left."""
    dtype = v.dtype
    n, Hv, dk = k.shape
    dv = v.shape[-1]
    q, k, v, beta, g = (x.transpose(0, 1).float().contiguous() for x in (q, k, v, beta, g))  # heads first
    q, k = l2norm(q), l2norm(k)
    q = q * dk**-0.5
    pad = (CHUNK - n % CHUNK) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    chunks = (n + pad) // CHUNK
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(Hv, chunks, CHUNK, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(Hv, chunks, CHUNK).cumsum(dim=-1)  # [Hv, N, C] cumulative log decay in each chunk
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    pair = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [Hv, N, C, C]
    ut = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * g.exp()[..., None]
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut, decayed_k_beta, upper=False, unitriangular=True)
    S = q.new_zeros(Hv, dk, dv) if state is None else state.to(new_v)
    out = torch.zeros_like(new_v)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [Hv, N, 1, 1]
    for i in range(chunks):
        v_i = new_v[:, i] - k_cumdecay[:, i] @ S
        out[:, i] = q[:, i] @ S + intra[:, i] @ v_i
        S = S * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_i
    out = out.reshape(Hv, -1, dv)[:, :n].transpose(0, 1).to(dtype)
    return out, S


@kernels.op("gdn_prefill")
def gdn_prefill(
    mixed: torch.Tensor,  # [n, conv_dim] pre-conv
    window: torch.Tensor | None,  # [conv_dim, K-1] the inputs before these; None: zeros
    conv_weight: torch.Tensor,  # [conv_dim, K]
    a: torch.Tensor,  # [n, Hv]
    b: torch.Tensor,  # [n, Hv]
    A_log: torch.Tensor,  # [Hv]
    dt_bias: torch.Tensor,  # [Hv]
    state: torch.Tensor | None,  # [Hv, dk, dv] fp32; None: zeros
    num_v_heads: int,
    k_head_dim: int,
    num_k_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's n new tokens from (conv window, state) -> (delta-rule output [n, Hv, dv] in the
    model dtype, before the gated norm; the conv window and the state after them). The reference is
    the chunked form; the C++ kernel runs the token loop with the state kept in cache."""
    n = mixed.shape[0]
    Hv, Hk, dk = num_v_heads, num_k_heads, k_head_dim
    x, new_window = causal_conv(mixed, window, conv_weight)
    q, k, v = x.split((Hk * dk, Hk * dk, x.shape[-1] - 2 * Hk * dk), dim=-1)
    q = q.reshape(n, Hk, dk).repeat_interleave(Hv // Hk, dim=1)
    k = k.reshape(n, Hk, dk).repeat_interleave(Hv // Hk, dim=1)
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    o, new_state = chunk_gated_delta_rule(q, k, v.reshape(n, Hv, -1), g, beta, state)
    return o, new_window, new_state


class GatedDeltaNet(nn.Module):
    """The linear-attention mixer. `in_proj` rows `[q | k | v | z | b | a]`; `sources` names the
    checkpoint tensors that fill them, in that order, with their row counts (see the module
    docstring). A tensor-parallel rank holds num_k_heads / world key heads with their value heads
    (every row group, the conv channels, the per-head decay parameters and state slots split alike);
    its owner all-reduces the output (`tp`)."""

    def __init__(self, hidden: int, num_k_heads: int, num_v_heads: int, k_head_dim: int, v_head_dim: int,
                 conv_kernel: int, eps: float, sources: tuple[tuple[str, int], ...] | None = None) -> None:
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"linear_num_value_heads ({num_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({num_k_heads})")
        tp = current()
        self.tp = tp if tp.world > 1 else None
        kd, vd = num_k_heads * k_head_dim, num_v_heads * v_head_dim  # the whole layer's
        # each checkpoint tensor's row groups, whole-layer sizes (a rank takes its part of each)
        groups = {"in_proj_qkv": (kd, kd, vd), "in_proj_z": (vd,), "in_proj_b": (num_v_heads,),
                  "in_proj_a": (num_v_heads,), "in_proj_qkvz": (kd, kd, vd, vd), "in_proj_ba": (num_v_heads,) * 2}
        num_k_heads = tp.divide(num_k_heads, "linear_num_key_heads")
        num_v_heads //= tp.world
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.k_head_dim, self.v_head_dim, self.eps = k_head_dim, v_head_dim, eps
        self.key_dim, self.value_dim = num_k_heads * k_head_dim, num_v_heads * v_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        if sources is None:  # Qwen3.5's split projections
            sources = (("in_proj_qkv", 2 * kd + vd), ("in_proj_z", vd), ("in_proj_b", groups["in_proj_b"][0]),
                       ("in_proj_a", groups["in_proj_a"][0]))
        self.in_proj = MergedLinear(hidden, [n // tp.world for _, n in sources], [s for s, _ in sources], False,
                                    [parts(groups[s]) for s, _ in sources])
        self.conv1d = sliced(nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False),
                             tp, weight=parts((kd, kd, vd)))
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads))
        self.A_log = nn.Parameter(torch.empty(num_v_heads))
        sliced(self, tp, dt_bias=split(0), A_log=split(0))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(v_head_dim))  # gated RMSNorm: a plain weight, not 1 + w
        self.out_proj = row_parallel(nn.Linear(self.value_dim, hidden, bias=False), tp)

    def state_spec(self, dtype: torch.dtype) -> RecurrentStateSpec:
        return RecurrentStateSpec(self.conv_dim, self.conv1d.kernel_size[0], self.num_v_heads, self.k_head_dim,
                                  self.v_head_dim, dtype)

    def forward(self, x: torch.Tensor, meta: RecurrentMetadata,
                cache: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        """x [T, H] (each sequence's rows contiguous, as `meta` says) -> [T, H]."""
        T = x.shape[0]
        Hv, dv = self.num_v_heads, self.v_head_dim
        mixed, z, b, a = self.in_proj(x).split((self.conv_dim, self.value_dim, Hv, Hv), dim=-1)
        z = z.reshape(T, Hv, dv)
        conv_states, states = cache
        cached = conv_states is not None and states is not None and meta.slots is not None
        weight = self.conv1d.weight[:, 0, :]  # [C, K]

        def decode(rows: torch.Tensor | slice, slots: torch.Tensor, out_slots: torch.Tensor) -> torch.Tensor:
            """The recurrent step for one row of each of some sequences."""
            return gdn_decode(mixed[rows], conv_states, weight, slots, out_slots, a[rows], b[rows], self.A_log,
                              self.dt_bias, states, z[rows], self.norm.weight, self.eps, self.num_k_heads)

        if cached and meta.is_decode_only:  # rows are the sequences, no gather
            return self._out(decode(slice(None), meta.slots, meta.out_slots).reshape(T, Hv * dv))
        out = x.new_empty(T, Hv, dv)
        heads = meta.head_lens()
        decodes = [i for i, n in enumerate(heads) if cached and n == 1 and meta.has_initial_state[i]]
        if decodes:
            rows = torch.tensor([meta.query_starts[i] for i in decodes], device=x.device)
            out[rows] = decode(rows, meta.slots[decodes], meta.head_out_slots[decodes])
        done = set(decodes)
        for i, (start, n) in enumerate(zip(meta.query_starts, heads)):
            if i in done:
                continue
            rows = slice(start, start + n)
            resume = cached and meta.has_initial_state[i]
            src = int(meta.slots[i]) if resume else None
            o, window, state = gdn_prefill(mixed[rows], conv_states[src] if resume else None, weight, a[rows], b[rows],
                                           self.A_log, self.dt_bias, states[src] if resume else None, Hv,
                                           self.k_head_dim, self.num_k_heads)
            out[rows] = gated_rms_norm(o, z[rows], self.norm.weight, self.eps)
            if cached:
                dst = int(meta.head_out_slots[i])
                conv_states[dst].copy_(window)
                states[dst].copy_(state)
        for r in meta.draft_rounds:  # each round reads the states the one before wrote
            out[r.rows] = decode(r.rows, r.slots, r.out_slots)
        return self._out(out.reshape(T, Hv * dv))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        out = self.out_proj(o)
        return out if self.tp is None else self.tp.all_reduce(out)


def next_qkvz_to_split(num_k_heads: int, k_head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Qwen3-Next's `in_proj_qkvz` [Hk·(2dk + 2r·dv), H], grouped per key head as
    `[q_g | k_g | v_g (r heads) | z_g]`, -> rows `[q | k | v | z]` (r = Hv / Hk)."""

    def transform(t: torch.Tensor) -> torch.Tensor:
        per_group = t.shape[0] // num_k_heads
        vz = (per_group - 2 * k_head_dim) // 2
        g = t.reshape(num_k_heads, per_group, *t.shape[1:])
        q, k, v, z = g.split((k_head_dim, k_head_dim, vz, vz), dim=1)
        return torch.cat([p.reshape(-1, *t.shape[1:]) for p in (q, k, v, z)])

    return transform


def next_ba_to_split(num_k_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Qwen3-Next's `in_proj_ba` [2·Hv, H], `[b_g | a_g]` per key-head group, -> rows `[b | a]`."""

    def transform(t: torch.Tensor) -> torch.Tensor:
        g = t.reshape(num_k_heads, 2, -1, *t.shape[1:])
        return torch.cat((g[:, 0].reshape(-1, *t.shape[1:]), g[:, 1].reshape(-1, *t.shape[1:])))

    return transform
