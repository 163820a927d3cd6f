"""Hybrid (Gated DeltaNet) against attention-only: decode cost against context, and multi-turn reuse.

1. Decode tok/s at batch 1 and 16 with 1K / 8K / 32K tokens of context, for a Qwen3-Next-shaped model
   (real per-layer dims: 3 GDN layers + 1 gated attention layer per 4, the 80B's pattern) next to a
   Qwen3-30B-A3B-shaped one with the same layer count. The context is *seeded*: each request's KV
   blocks are allocated and its state slots taken as if its prompt had been prefilled, without
   computing them (decode reads the same bytes whatever they hold), so a 16 × 32K point costs
   seconds instead of the hours its prefill would take on two cores. Median step time of --steps
   all-decode steps after two warm-up steps.
2. TTFT of turn 2 of a chat whose turn 1 prompt is ~4K tokens (real Qwen3 tokenizer and template),
   with state checkpoints (prefix caching on) and without, on the Qwen3-Next-shaped model.

Both shapes keep their real expert width and top-k (Next: 10 of width 512 + a shared expert; 30B: 8 of
768) but only 64 experts per layer, so the checkpoints fit in RAM: at batch 1 a token reads the same
expert bytes as with 512 / 128 experts; at batch 16 more tokens share an expert than they would.

    python benchmarks/hybrid_bench.py                       # both parts, 4 layers
    python benchmarks/hybrid_bench.py --part decode --contexts 1024,8192 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import read_bandwidth  # noqa: E402

from qwenrun import LLM, SamplingParams  # noqa: E402
from qwenrun.engine.request import Status  # noqa: E402

COMMON = dict(vocab_size=151936, hidden_size=2048, max_position_embeddings=65536, rms_norm_eps=1e-6,
              tie_word_embeddings=False, eos_token_id=151645, num_experts=64)
SHAPES = {
    "qwen3-next": dict(
        COMMON, model_type="qwen3_next", intermediate_size=5120, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, norm_topk_prob=True, full_attention_interval=4,
    ),
    "qwen3-30b-a3b": dict(
        COMMON, model_type="qwen3_moe", intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, rope_theta=1e6, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    ),
}


def build_checkpoint(shape: str, layers: int, out: Path) -> Path:
    """Random bf16 weights with the real per-layer shapes, written by transformers (norm weights 1,
    everything else N(0, 0.02); attention outputs 0.002 so routing spreads, as decode_bench does)."""
    import transformers

    folder = out / f"{shape}-{layers}l-64e"
    if (folder / "config.json").is_file():
        return folder
    kw = dict(SHAPES[shape], num_hidden_layers=layers)
    cfg = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(0.0 if shape == "qwen3-next" and "linear_attn.norm" not in name else 1.0)  # zero-centred
            else:
                p.normal_(0, 0.002 if "o_proj" in name else 0.02, generator=gen)
    model.save_pretrained(folder)
    return folder


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def seed_context(llm: LLM, batch: int, context: int, new_tokens: int) -> None:
    """Queue `batch` requests whose first `context` - 1 tokens count as computed (see the docstring)."""
    engine, sched = llm.engine, llm.engine.scheduler
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        req = engine.add_request(_prompt(i, context), params)
        sched.waiting.remove(req)
        sched.cache.take(req, sched.cache.match(req))
        req.num_computed_tokens = context - 1
        sched.cache.allocate(req, 1)
        req.status = Status.RUNNING
        sched.running.append(req)


def decode_point(llm: LLM, batch: int, context: int, steps: int) -> float:
    """Aggregate decode tok/s: batch / median step time."""
    seed_context(llm, batch, context, steps + 2)
    times = []
    while llm.engine.has_unfinished_requests():
        t0 = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[2:])


def decode_part(args: argparse.Namespace, out: Path) -> dict:
    results: dict = {}
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for shape in ("qwen3-next", "qwen3-30b-a3b"):
        folder = build_checkpoint(shape, args.layers, out)
        llm = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=max(contexts) + args.steps + 16,
                  kv_cache_memory=args.cache_gib << 30, max_num_seqs=max(batches), enable_prefix_caching=False)
        for batch in batches:
            for context in contexts:
                tps = decode_point(llm, batch, context, args.steps)
                results[f"{shape} b{batch} ctx{context}"] = tps
                print(f"{shape:14s} batch {batch:2d}  context {context:6d}: {tps:7.2f} tok/s", flush=True)
        del llm
    return results


def tokenizer_dir() -> Path | None:
    """The real Qwen3 tokenizer, found as the tests find it ($QWENRUN_TOKENIZER_DIR, then ../shared/assets)."""
    env = os.environ.get("QWENRUN_TOKENIZER_DIR")
    cands = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "assets" / "qwen3-tokenizer"]
    return next((c for c in cands if (c / "tokenizer.json").is_file()), None)


def ttft_part(args: argparse.Namespace, out: Path) -> dict:
    import shutil

    folder = build_checkpoint("qwen3-next", args.layers, out)
    tok = tokenizer_dir()
    if tok is None:
        sys.exit("the real Qwen3 tokenizer is needed: set QWENRUN_TOKENIZER_DIR")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, folder / f)
    words = " ".join(f"item{i} is {i * 7 % 1000}" for i in range(450))  # ~4K tokens
    results: dict = {}
    for prefix in (False, True):  # the first run also pays the process warm-up
        llm = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=8192, kv_cache_memory=4 << 30,
                  enable_prefix_caching=prefix)
        first = [{"role": "system", "content": "You answer questions about a list."},
                 {"role": "user", "content": f"Here is a list: {words}. What is item12?"}]
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        t0 = time.perf_counter()
        out1 = llm.chat([first], params)[0]
        turn1 = time.perf_counter() - t0
        second = first + [{"role": "assistant", "content": out1.outputs[0].content or out1.outputs[0].text},
                          {"role": "user", "content": "And item13?"}]
        ids = llm.tokenizer.encode(llm.render_chat(second))
        engine = llm.engine
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        ttft = time.perf_counter() - t0
        key = "with checkpoints" if prefix else "without (prefix caching off)"
        hit = engine.scheduler.stats.prefix_hit_tokens
        results[key] = {"turn1_s": turn1, "turn2_ttft_s": ttft, "turn2_prompt_tokens": len(ids), "hit_tokens": hit}
        print(f"{key:30s} turn 1 {turn1:6.2f} s; turn 2 ({len(ids)} tokens, {hit} from cache) TTFT {ttft:6.3f} s",
              flush=True)
        del llm
    speedup = results["without (prefix caching off)"]["turn2_ttft_s"] / results["with checkpoints"]["turn2_ttft_s"]
    print(f"turn-2 TTFT speed-up from state checkpoints: {speedup:.1f}x")
    results["speedup"] = speedup
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("decode", "ttft", "all"), default="all")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cache-gib", type=int, default=6)
    ap.add_argument("--cache-dir", default=os.environ.get("QWENRUN_BENCH_DIR", "/tmp/qwenrun-bench"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    out = Path(args.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"read_bandwidth_gbs_before": read_bandwidth()}
    print(f"read bandwidth (2 threads): {results['read_bandwidth_gbs_before']:.1f} GB/s", flush=True)
    if args.part in ("decode", "all"):
        results["decode"] = decode_part(args, out)
    if args.part in ("ttft", "all"):
        results["ttft"] = ttft_part(args, out)
    results["read_bandwidth_gbs_after"] = read_bandwidth()
    print(f"read bandwidth after: {results['read_bandwidth_gbs_after']:.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
