"""A real Qwen3 checkpoint whose weights make greedy decoding follow a token -> next-token table.

Attention and MLP outputs are zero, so the residual stream at each position is the embedding of the
current token; the untied LM head maps that embedding to the chosen successor. Tests use it to drive
the engine into exact situations (endless reasoning, forced answers) through ordinary inference.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tiny import add_tokenizer

VOCAB = 151936  # the real Qwen3 embedding size, so the real tokenizer works with it


def make_steered_checkpoint(folder: Path, tokenizer_dir: Path, transitions: dict[int, int], hidden: int = 64,
                            kind: str = "Qwen3") -> Path:
    """transitions: current token id -> next token id (at most `hidden` entries); others go to id 0.

    `kind` "Qwen3Next" gives a hybrid model (Gated DeltaNet layers + one gated attention layer, MoE
    with a shared expert) following the same table, for the paths that only hybrid models take."""
    assert len(transitions) <= hidden
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, tie_word_embeddings=False, max_position_embeddings=4096, eos_token_id=151645)
    if kind == "Qwen3Next":
        cfg = transformers.Qwen3NextConfig(
            **common, intermediate_size=32, num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16,
        )
        model = transformers.Qwen3NextForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, intermediate_size=32, num_hidden_layers=1)
        model = transformers.Qwen3ForCausalLM(cfg)
    steer(model, transitions)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    add_tokenizer(folder, tokenizer_dir)
    return folder


@torch.no_grad()
def steer(model: transformers.PreTrainedModel, transitions: dict[int, int]) -> None:
    """Zero every weight, norms to one (zero-centred ones scale by two: the same argmax), then
    embedding dim i carries token src_i and the LM head maps it to dst_i."""
    for p in model.parameters():
        p.zero_()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
    for dim, (src, dst) in enumerate(transitions.items()):
        model.model.embed_tokens.weight[src, dim] = 1.0
        model.lm_head.weight[dst, dim] = 1.0
