"""`qwenrun info`: what a checkpoint is and what it will cost, from its JSON files alone.

Memory figures come from the shapes: weights are parameters × bytes per element; the cache figures
from the model's own per-layer cache specs (built on the meta device, so nothing is allocated): K and V
per token for attention layers, a fixed state per sequence for linear-attention layers, and how the
default cache memory splits between them (`CachePlan`, what the engine will do). A hybrid model's
running sequence holds that state 2 + k times with k speculative tokens (one slot per draft to roll
back to), so speculation lowers how many sequences fit: shown for `SPECULATIVE_TOKENS` drafts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.text import Text

import torch

from qwenrun.cli.common import console, human, human_bytes
from qwenrun.engine.cache import CachePlan
from qwenrun.engine.engine import default_kv_cache_memory
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.recurrent import RecurrentStateSpec
from qwenrun.loading.loader import open_checkpoint
from qwenrun.loading.source import read_json
from qwenrun.quant.checkpoint import own_quantization
from qwenrun.quant.formats import stored_format
from qwenrun.models import create_model

# generation_config.json keys worth showing: the sampling defaults qwenrun reads, plus do_sample.
GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)
SPECULATIVE_TOKENS = 4  # the draft length `info` shows the cost of (a common num_speculative_tokens)


def describe(model: str, revision: str | None, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """Everything `info` prints, as JSON-ready values (bytes and counts as plain integers);
    `tensor_parallel_size` > 1 adds what one rank holds (`per_rank`)."""
    ckpt = open_checkpoint(model, revision, weights=False)
    cfg = ckpt.config
    rope: dict[str, Any] = {"type": cfg.rope.rope_type, "theta": cfg.rope.theta}
    if cfg.rope.rope_type == "yarn":
        rope |= {
            "factor": cfg.rope.factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
        }
    moe = None
    if cfg.moe is not None:
        moe = {
            "num_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe.moe_intermediate_size,
            "norm_topk_prob": cfg.moe.norm_topk_prob,
            "shared_expert_intermediate_size": cfg.moe.shared_expert_intermediate_size,
            "num_sparse_layers": sum(cfg.moe.is_sparse(i) for i in range(cfg.num_hidden_layers)),
        }
    params = cfg.num_parameters()
    with torch.device("meta"):
        specs = create_model(cfg).cache_specs(torch.bfloat16)
    kv_elems = sum(2 * s.num_kv_heads * s.head_dim for s in specs if isinstance(s, KVCacheSpec))
    int8_specs = [dataclasses.replace(s, dtype=torch.int8) if isinstance(s, KVCacheSpec) else s for s in specs]
    kv_int8 = sum(s.bytes_per_token for s in int8_specs if isinstance(s, KVCacheSpec))  # with the scales
    state = [s for s in specs if isinstance(s, RecurrentStateSpec)]
    budget = default_kv_cache_memory(torch.device("cpu"))
    try:
        plan = CachePlan.make(specs, budget, 16, cfg.max_position_embeddings, 64)
        fits: dict[str, Any] | str = {
            "cache_memory": budget, "kv_tokens": plan.num_blocks * 16, "context": plan.context,
            "max_running_sequences": plan.max_running,  # max_num_seqs 64 unless state slots allow fewer
            "state_checkpoints": plan.num_checkpoint_slots,
            "kv_tokens_int8": CachePlan.make(int8_specs, budget, 16, cfg.max_position_embeddings, 64).num_blocks * 16,
        }
    except InvalidRequestError as e:
        fits = str(e)
    speculative: dict[str, Any] | str | None = None
    if state:
        try:
            plan = CachePlan.make(specs, budget, 16, cfg.max_position_embeddings, 64,
                                  num_speculative_tokens=SPECULATIVE_TOKENS)
            speculative = {"num_speculative_tokens": SPECULATIVE_TOKENS,
                           "state_slots_per_sequence": plan.state_slots_per_sequence,
                           "max_running_sequences": plan.max_running}
        except InvalidRequestError as e:
            speculative = str(e)
    gen = ckpt.generation_config
    per_rank = _per_rank(cfg, tensor_parallel_size) if tensor_parallel_size > 1 else None
    return {
        **_described(ckpt.path),
        "model": model,
        "path": str(ckpt.path),
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope": rope,
        "moe": moe,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_parameters": params,
        "num_active_parameters": cfg.num_active_parameters(),
        "vision_parameters": cfg.vision.num_parameters() if cfg.vision is not None else 0,  # not in the totals above
        "weight_bytes": {"bfloat16": 2 * params, "float32": 4 * params},
        "kv_cache_bytes_per_token": {"bfloat16": 2 * kv_elems, "float32": 4 * kv_elems, "int8": kv_int8},
        "num_linear_attention_layers": len(state),
        "recurrent_state_bytes_per_sequence": sum(s.bytes_per_slot for s in state),  # bf16 conv, fp32 state
        "default_cache": fits,
        "default_cache_speculative": speculative,  # hybrid models: the same budget with draft slots
        "per_rank": per_rank,
        "checkpoint_dtype": cfg.torch_dtype,
        "generation_defaults": {k: gen[k] for k in GENERATION_KEYS if k in gen},
    }


def _per_rank(cfg: Any, world: int) -> dict[str, Any] | str:
    """Rank 0's shard, built on meta as `load_model(tp=...)` builds it (every rank holds as much):
    its parameters (replicated norms and routers included) and its KV heads' bytes per token; or
    why the model does not split into `world` ranks."""
    from qwenrun.errors import CheckpointError
    from qwenrun.layers.parallel import TensorParallel, building

    try:
        with torch.device("meta"), building(TensorParallel(0, world)):
            shard = create_model(cfg)
    except CheckpointError as e:
        return str(e)
    n = sum(p.numel() for p in shard.parameters())
    specs = shard.cache_specs(torch.bfloat16)
    kv = sum(2 * s.num_kv_heads * s.head_dim for s in specs if isinstance(s, KVCacheSpec))
    return {"tensor_parallel_size": world, "num_parameters": n, "weight_bytes": {"bfloat16": 2 * n, "float32": 4 * n},
            "kv_cache_bytes_per_token": {"bfloat16": 2 * kv, "float32": 4 * kv},
            "recurrent_state_bytes_per_sequence": sum(s.bytes_per_slot for s in specs
                                                      if isinstance(s, RecurrentStateSpec))}


def _described(path: Path) -> dict[str, Any]:
    """How the weights are stored: `quantization` (None for plain weights) and the weight files' bytes
    (a hub model described from its JSON alone: its index's total, if it has one)."""
    raw = read_json(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    index = read_json(path / "model.safetensors.index.json", required=False)
    size = sum(f.stat().st_size for f in files) if files else index.get("metadata", {}).get("total_size")
    own = own_quantization(raw)
    try:
        stored = stored_format(raw)
    except InvalidRequestError as e:
        return {"quantization": {"format": f"unsupported ({e})", "weight_file_bytes": size}, "weight_file_bytes": size}
    if own is not None:
        q, dtype = own
        text = f"qwenrun {q.method}, " + (f"group {q.group_size}" if q.method == "int4" else "per output channel")
        text += f", from {dtype}" + ("" if q.quantize_lm_head else ", LM head not quantized")
    elif stored is not None and stored.method == "fp8":
        text = f"fp8 e4m3, {stored.block[0]}x{stored.block[1]} blocks (dequantized at load)"
    elif stored is not None:
        group = "per channel" if stored.group_size == -1 else f"group {stored.group_size}"
        runs = "act order, dequantized at load" if stored.int4_group() is None else "runs as qwenrun int4"
        text = f"{stored.method} 4-bit, {group} ({runs})"
    else:
        return {"quantization": None, "weight_file_bytes": size}
    return {"quantization": {"format": text, "weight_file_bytes": size}, "weight_file_bytes": size}


def _lines(d: dict[str, Any]) -> list[tuple[str, str]]:
    rope = d["rope"]
    rope_text = f"{rope['type']}, theta {rope['theta']:g}"
    if rope["type"] == "yarn":
        rope_text += (
            f", yarn factor {rope['factor']:g} over {rope['original_max_position_embeddings']}"
        )
    params = f"{d['num_parameters']:,} ({human(d['num_parameters'])})"
    if d["moe"] is not None:
        params += f", active {d['num_active_parameters']:,} ({human(d['num_active_parameters'])})"
    if d["vision_parameters"]:
        params += f"; vision tower {d['vision_parameters']:,} ({human(d['vision_parameters'])}) more"
    kv = d["kv_cache_bytes_per_token"]["bfloat16"]
    context = d["max_position_embeddings"]
    rows = [
        ("model", d["path"] if d["path"] == d["model"] else f"{d['model']} ({d['path']})"),
        ("architecture", f"{d['architecture']} ({d['model_type']})"),
        ("parameters", params),
        ("layers", str(d["num_hidden_layers"]) + (
            f" ({d['num_linear_attention_layers']} linear-attention, "
            f"{d['num_hidden_layers'] - d['num_linear_attention_layers']} full attention)"
            if d["num_linear_attention_layers"] else "")),
        ("hidden size", f"{d['hidden_size']}" + (
            "" if d["moe"] is not None and d["moe"]["num_sparse_layers"] == d["num_hidden_layers"]
            else f" (MLP {d['intermediate_size']})")),
        (
            "attention heads",
            f"{d['num_attention_heads']} q / {d['num_key_value_heads']} kv, "
            f"head_dim {d['head_dim']}",
        ),
        ("vocab size", str(d["vocab_size"])),
        ("context length", str(context)),
        ("rope", rope_text),
    ]
    if d["moe"] is not None:
        moe = d["moe"]
        rows.append(
            (
                "experts",
                f"{moe['num_experts']}, top-{moe['num_experts_per_tok']}, "
                f"expert MLP {moe['moe_intermediate_size']}, "
                + (f"shared expert {moe['shared_expert_intermediate_size']}, "
                   if moe["shared_expert_intermediate_size"] else "")
                + f"norm_topk_prob {str(moe['norm_topk_prob']).lower()}",
            )
        )
    gen = ", ".join(f"{k} {v}" for k, v in d["generation_defaults"].items())
    rows += [
        ("tied embeddings", "yes" if d["tie_word_embeddings"] else "no"),
        ("checkpoint dtype", d["checkpoint_dtype"] or "unknown"),
        *([("quantization", d["quantization"]["format"])] if d["quantization"] else []),
        *([("weight files", human_bytes(d["weight_file_bytes"]))] if d["weight_file_bytes"] else []),
        (
            "weights memory",
            f"{human_bytes(d['weight_bytes']['bfloat16'])} bf16, "
            f"{human_bytes(d['weight_bytes']['float32'])} fp32",
        ),
        (
            "KV cache",
            f"{kv:,} bytes per token bf16 ({human_bytes(kv * context)} for {context} tokens); "
            f"{d['kv_cache_bytes_per_token']['int8']:,} with --kv-cache-dtype int8 (scales included)",
        ),
    ]
    rank = d["per_rank"]
    if isinstance(rank, str):
        rows.append(("per rank", f"does not split: {rank}"))
    elif rank is not None:
        rows.append((f"per rank (TP={rank['tensor_parallel_size']})",
                     f"{rank['num_parameters']:,} parameters: {human_bytes(rank['weight_bytes']['bfloat16'])} bf16, "
                     f"{human_bytes(rank['weight_bytes']['float32'])} fp32; KV cache "
                     f"{rank['kv_cache_bytes_per_token']['bfloat16']:,} bytes per token bf16"
                     + (f"; recurrent state {human_bytes(rank['recurrent_state_bytes_per_sequence'])} per sequence"
                        if rank["recurrent_state_bytes_per_sequence"] else "")))
    if d["num_linear_attention_layers"]:
        rows.append((
            "recurrent state",
            f"{human_bytes(d['recurrent_state_bytes_per_sequence'])} per sequence, any context "
            f"({d['num_linear_attention_layers']} linear-attention layers of {d['num_hidden_layers']})",
        ))
    fits = d["default_cache"]
    if isinstance(fits, str):
        fits_text = f"does not fit the default cache memory: {fits}"
    else:
        fits_text = (f"{human_bytes(fits['cache_memory'])} (default on this machine): {fits['kv_tokens']:,} tokens "
                     f"of KV ({fits['kv_tokens'] / fits['context']:.1f} full {fits['context']}-token contexts), "
                     f"up to {fits['max_running_sequences']} sequences at once; "
                     f"{fits['kv_tokens_int8']:,} tokens with an int8 KV cache")
        if d["num_linear_attention_layers"]:
            fits_text += f" (by state slots), {fits['state_checkpoints']} state checkpoints for prefix reuse"
    spec = d["default_cache_speculative"]
    if isinstance(spec, dict):
        fits_text += (f"; with {spec['num_speculative_tokens']} speculative tokens a sequence holds "
                      f"{spec['state_slots_per_sequence']} states (one per draft to roll back to): up to "
                      f"{spec['max_running_sequences']} at once")
    elif spec is not None:
        fits_text += f"; speculative decoding with {SPECULATIVE_TOKENS} tokens does not fit: {spec}"
    rows += [
        ("cache memory", fits_text),
        ("generation defaults", gen or "none (generation_config.json sets no sampling values)"),
    ]
    return rows


def run(args: argparse.Namespace) -> int:
    d = describe(args.model, args.revision, getattr(args, "tensor_parallel_size", 1))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = _lines(d)
    width = max(len(key) for key, _ in rows) + 2
    for key, value in rows:
        console.print(Text.assemble((key.ljust(width), "bold cyan"), value), soft_wrap=True)
    return 0
