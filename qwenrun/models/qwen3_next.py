"""Qwen3-Next (`Qwen3NextForCausalLM`): the hybrid block, Gated DeltaNet layers with gated full attention
every few layers, over Qwen3-MoE experts plus a shared expert.

What differs from Qwen3 / Qwen3-MoE:
- `config.linear.layer_types` picks each layer's token mixer: `linear_attn` (`layers.gated_delta_net`,
  a state slot per sequence instead of KV) or `self_attn`, whose `q_proj` yields query and gate per
  head; the output is multiplied by sigmoid(gate) before `o_proj`. Rotary covers `partial_rotary_factor`
  of each head.
- every RMSNorm except the DeltaNet's gated one is zero-centred, `x̂·(1 + w)`: the `1 + w` is folded in
  at load, so the plain norm runs.
- sparse layers add a shared expert, scaled by sigmoid(`shared_expert_gate`), to the routed ones.

The checkpoint mapping depends on head counts (Next's grouped `in_proj_qkvz`, the per-head
query/gate interleave of `q_proj`), so `checkpoint_rules` is built per model from its config.
`mtp.*` (the multi-token-prediction head, `make_mtp`) loads when the loader is asked for it, and is
skipped with a count otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from qwenrun.config import FULL, HYBRID_MODEL_TYPES, ModelConfig
from qwenrun.errors import CheckpointError
from qwenrun.layers.attention import AttentionMetadata, KVCacheSpec, attend, qk_norm_rope_store
from qwenrun.layers.checkpoint import CheckpointRules, Transform
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.gated_delta_net import GatedDeltaNet, next_ba_to_split, next_qkvz_to_split
from qwenrun.layers.linear import MergedLinear
from qwenrun.layers.mtp import MtpHead
from qwenrun.layers.norm import RMSNorm, zero_centred
from qwenrun.layers.parallel import current, kv_heads, lm_head, local_kv_heads, parts, row_parallel
from qwenrun.layers.recurrent import RecurrentStateSpec
from qwenrun.models.qwen3 import Qwen3MLP, Qwen3Model
from qwenrun.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock

ZERO_CENTRED_NORMS = ("*.input_layernorm.weight", "*.post_attention_layernorm.weight", "model.norm.weight",
                      "*.self_attn.q_norm.weight", "*.self_attn.k_norm.weight", "mtp.norm.weight",
                      "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight")


class Qwen3NextAttention(nn.Module):
    """Qwen3 attention whose query projection also yields a per-head output gate. The merged projection
    holds `[q | gate | k | v]` (the checkpoint's per-head `[q_h | gate_h]` rows are split at load)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tp = tp = current()  # this rank's heads, as Qwen3Attention
        self.head_dim = d = cfg.head_dim
        self.num_heads = tp.divide(cfg.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = local_kv_heads(tp, cfg.num_attention_heads, cfg.num_key_value_heads)
        self.q_size = self.num_heads * d
        kv = self.num_kv_heads * d
        q_all = cfg.num_attention_heads * d
        kv_part = kv_heads(cfg.num_key_value_heads, d)
        self.qkv_proj = MergedLinear(cfg.hidden_size, (2 * self.q_size, kv, kv), ("q_proj", "k_proj", "v_proj"),
                                     cfg.attention_bias, (parts((q_all, q_all)), kv_part, kv_part))
        self.o_proj = row_parallel(nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias), tp)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        y = self.qkv_proj(x)  # [T, (2 nh + 2 nkv) d]
        q = self.q_size
        gate = y[:, q : 2 * q]
        qkv = torch.cat((y[:, :q], y[:, 2 * q :]), dim=-1)  # [T, (nh + 2 nkv) d], the layout the op reads
        q_rot, k_cache, v_cache = qk_norm_rope_store(qkv, self.q_norm.weight, self.k_norm.weight, *rope,
                                                     self.q_norm.eps, self.num_heads, self.num_kv_heads, kv[0], kv[1],
                                                     meta.slot_mapping)
        out = self.o_proj(attend(q_rot, k_cache, v_cache, meta, self.scale) * torch.sigmoid(gate))
        return out if self.tp.world == 1 else self.tp.all_reduce(out)


class Qwen3NextSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    """Routed experts plus one shared expert behind a sigmoid gate (the same for every token's mix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        assert cfg.moe is not None
        # tensor-parallel: the shared expert's partial sum joins the routed one's in one all-reduce
        self.shared_expert = Qwen3MLP(cfg.hidden_size, cfg.moe.shared_expert_intermediate_size, reduce=False)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x)
        out = self.routed(x) + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out if self.tp is None else self.tp.all_reduce(out)


class Qwen3NextDecoderLayer(nn.Module):
    """Pre-norm residual block around one token mixer (`linear_attn` or `self_attn`) and one MLP."""

    def __init__(self, cfg: ModelConfig, index: int, mlp: nn.Module,
                 gdn_sources: tuple[tuple[str, int], ...] | None) -> None:
        super().__init__()
        lin = cfg.linear
        assert lin is not None
        self.is_linear = lin.is_linear(index)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg.hidden_size, lin.num_key_heads, lin.num_value_heads, lin.key_head_dim,
                                             lin.value_head_dim, lin.conv_kernel, cfg.rms_norm_eps, gdn_sources)
        else:
            self.self_attn = Qwen3NextAttention(cfg)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, rope, batch: ForwardBatch, cache) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        if self.is_linear:
            assert batch.recurrent is not None, "a hybrid model's ForwardBatch needs RecurrentMetadata"
            h = self.linear_attn(h, batch.recurrent, cache)
        else:
            h = self.self_attn(h, rope, batch.attention, cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Qwen3NextModel(Qwen3Model):
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, H]
        rope = self.rotary_emb(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, batch, batch.layer_cache(i))
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class Qwen3NextForCausalLM(Qwen3MoeForCausalLM):
    """The Qwen3 model contract; `cache_specs` gives a `RecurrentStateSpec` for each linear-attention
    layer. `quant_predicate` (inherited) keeps routers and shared-expert gates in the model dtype."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        if cfg.linear is None:
            raise CheckpointError(f"config.json model_type {cfg.model_type!r} is not a hybrid (Gated DeltaNet) "
                                  f"type, but {cfg.architecture} needs one; expected one of "
                                  f"{', '.join(HYBRID_MODEL_TYPES)}")
        self.config = cfg
        self.model = Qwen3NextModel(cfg, [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.tp = current()
        self.lm_head = None if cfg.tie_word_embeddings else lm_head(cfg.hidden_size, cfg.vocab_size)
        self.checkpoint_rules = self.rules(cfg)

    @classmethod
    def gdn_sources(cls, cfg: ModelConfig) -> tuple[tuple[str, int], ...] | None:
        """Checkpoint tensors of `in_proj` (rows [q | k | v | z | b | a]), with their row counts."""
        lin = cfg.linear
        assert lin is not None
        qkvz = 2 * lin.num_key_heads * lin.key_head_dim + 2 * lin.num_value_heads * lin.value_head_dim
        return (("in_proj_qkvz", qkvz), ("in_proj_ba", 2 * lin.num_value_heads))

    @classmethod
    def make_layer(cls, cfg: ModelConfig, index: int) -> nn.Module:
        if cfg.moe is not None and cfg.moe.is_sparse(index):
            mlp: nn.Module = Qwen3NextSparseMoeBlock(cfg) if cfg.moe.shared_expert_intermediate_size \
                else Qwen3MoeSparseMoeBlock(cfg)
        else:
            mlp = Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)
        return Qwen3NextDecoderLayer(cfg, index, mlp, cls.gdn_sources(cfg))

    def make_mtp(self) -> MtpHead:
        """The MTP head: one full-attention layer of this family (gated attention, the MLP layer 0
        would have, as vLLM builds `mtp.layers.0`)."""
        lin = self.config.linear
        assert lin is not None
        cfg = replace(self.config, linear=replace(lin, layer_types=(FULL,)))
        return MtpHead(cfg, self.make_layer(cfg, 0), True, self.model.embed_tokens.forward, self.compute_logits)

    @classmethod
    def rules(cls, cfg: ModelConfig) -> CheckpointRules:
        """Qwen3-Next's checkpoint: grouped GDN projections, interleaved query/gate, zero-centred norms."""
        lin = cfg.linear
        assert lin is not None
        transforms: list[tuple[str, Transform]] = [
            ("*.linear_attn.in_proj_qkvz.weight", next_qkvz_to_split(lin.num_key_heads, lin.key_head_dim)),
            ("*.linear_attn.in_proj_ba.weight", next_ba_to_split(lin.num_key_heads)),
        ]
        return CheckpointRules(ignore=("*rotary_emb.inv_freq", "mtp.*"),
                               transforms=tuple(transforms) + cls.shared_transforms(cfg))

    @staticmethod
    def shared_transforms(cfg: ModelConfig) -> tuple[tuple[str, Transform], ...]:
        """What Qwen3-Next and Qwen3.5 checkpoints share: query/gate split and zero-centred norms."""
        split = query_gate_to_split(cfg.num_attention_heads, cfg.head_dim)
        return (("*.self_attn.q_proj.weight", split), ("*.self_attn.q_proj.bias", split),
                *((pattern, zero_centred) for pattern in ZERO_CENTRED_NORMS))

    def cache_specs(self, dtype: torch.dtype) -> list[KVCacheSpec | RecurrentStateSpec]:
        """Per layer: a state slot spec for linear attention, paged KV for full attention."""
        return [layer.linear_attn.state_spec(dtype) if layer.is_linear
                else KVCacheSpec(layer.self_attn.num_kv_heads, layer.self_attn.head_dim, dtype)
                for layer in self.model.layers]


def query_gate_to_split(num_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`q_proj` rows `[q_h | gate_h]` per head -> `[q (all heads) | gate (all heads)]` (weight or bias)."""

    def transform(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(num_heads, 2, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    return transform
