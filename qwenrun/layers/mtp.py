"""`MtpHead`: the multi-token-prediction head of Qwen3-Next and Qwen3.5 (`mtp.*` in their checkpoints), the
speculative drafter that needs no second model.

Row i reads the token x_{i+1} and the target's final-normed hidden h_i and proposes x_{i+2}:
`fc(cat[norm_e(embed(x_{i+1})), norm_h(h_i)])` -> one full-attention decoder layer of the family ->
`norm` -> the target's LM head (qwen3-text-spec §4.9, vLLM's `Qwen3NextMultiTokenPredictor`). The head
shares the target's embedding and LM head: it holds the target's bound methods, not the modules, so
they are neither copied nor registered twice, and a head quantized after loading is still the one it
calls. Chained draft steps feed the head its own output as the next row's hidden, as vLLM does with
its one MTP layer. The layer's K/V lives in the engine's cache after the target's layers
(`cache_specs`); `ForwardBatch.without_cache` runs it over whole sequences for training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.norm import RMSNorm
from qwenrun.layers.rotary import RotaryEmbedding

TensorFn = Callable[[torch.Tensor], torch.Tensor]


class MtpHead(nn.Module):
    """The drafter contract (`qwenrun.spec_decode.drafter`): `token_shift`, `cache_specs`, `forward`,
    `compute_logits`.

    `layer` is one decoder layer of the target's family, called as the target calls its own:
    `layer(h, residual, rope, meta_or_batch, kv) -> (h, residual)`, where a hybrid family's layer
    reads the whole `ForwardBatch` (`layer_reads_batch`) and a Qwen3 one its `AttentionMetadata`.
    Norm weights are plain `RMSNorm` ones: a family with zero-centred norms folds `1 + w` in at load.
    """

    token_shift = 1

    def __init__(self, cfg: ModelConfig, layer: nn.Module, layer_reads_batch: bool, embed: TensorFn,
                 logits: TensorFn) -> None:
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(H, eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList([layer])
        self.norm = RMSNorm(H, eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.layer_reads_batch = layer_reads_batch
        self.kv_spec = (cfg.num_key_value_heads, cfg.head_dim)
        self.embed, self.logits = embed, logits

    def cache_specs(self, dtype: torch.dtype) -> list[KVCacheSpec]:
        """The one attention layer's paged K/V."""
        return [KVCacheSpec(*self.kv_spec, dtype)]

    def forward(self, fb: ForwardBatch, hidden: torch.Tensor) -> torch.Tensor:
        """fb's rows carry x_{i+1} at position i; hidden [T, H] is h_i (the target's, or this head's
        previous output in a chained step). Returns the head's final-normed hidden [T, H]."""
        e = self.pre_fc_norm_embedding(self.embed(fb.input_ids))
        h = self.fc(torch.cat((e, self.pre_fc_norm_hidden(hidden)), dim=-1))
        rope = self.rotary_emb(fb.positions, h.dtype)
        h, residual = self.layers[0](h, None, rope, fb if self.layer_reads_batch else fb.attention,
                                     fb.layer_cache(0))
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)
