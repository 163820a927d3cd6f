"""Serving throughput and prefix-cache TTFT of the engine (continuous batching, paged KV cache).

Aggregate decode tokens/s with 1, 4, 16 and 32 concurrent streams (prompts of 128 random tokens,
64 new tokens each; only steps in which every scheduled request decodes are timed), and the time to
first token of a 2k-token prompt cold and again with a prefix hit (same 2048-token prefix, new
16-token question). The engine is driven directly, the same loop `qwenrun serve` runs, so HTTP and
JSON costs are not in the figures.

    python benchmarks/serve_bench.py                    # Qwen3-0.6B shape, random bf16 weights
    python benchmarks/serve_bench.py --model DIR --streams 1,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from decode_bench import build_checkpoint  # same random-weight checkpoints as the decode benchmark
from qwenrun import LLM, SamplingParams


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_throughput(llm: LLM, streams: int, prompt_len: int, new_tokens: int, seed: int) -> float:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(_prompt(seed + i, prompt_len), params)
    tokens, seconds = 0, 0.0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        batch_is_decode = not engine.scheduler.waiting and all(
            r.num_new_tokens == 1 for r in engine.scheduler.running
        )
        deltas = engine.step()
        if batch_is_decode:
            seconds += time.perf_counter() - t0
            tokens += len(deltas)
    return tokens / seconds


def ttft(llm: LLM, prompt: list[int]) -> float:
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the Qwen3-0.6B shape with random weights)")
    ap.add_argument("--cache-dir", default="/tmp/qwenrun-bench")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    model = args.model or str(build_checkpoint("qwen3-0.6b", None, Path(args.cache_dir)))
    llm = LLM(model, dtype="bfloat16", device="cpu", max_model_len=4096, max_num_seqs=64,
              max_num_batched_tokens=2048)
    decode_throughput(llm, 2, 16, 4, seed=999)  # warm-up
    results: dict = {"decode": {}, "ttft": {}}
    for s in [int(x) for x in args.streams.split(",")]:
        runs = [decode_throughput(llm, s, args.prompt_len, args.new_tokens, seed=1000 * s + r) for r in range(args.runs)]
        results["decode"][s] = runs
        print(f"{s:3d} streams: {statistics.median(runs):7.1f} tok/s aggregate "
              f"({min(runs):.1f} / {max(runs):.1f})", flush=True)
    base = statistics.median(results["decode"].get(1, [float("nan")]))
    for s, runs in results["decode"].items():
        print(f"{s:3d} streams: {statistics.median(runs) / base:5.2f}x single-stream")
    cold, warm = [], []
    for r in range(args.runs):
        prefix = _prompt(50_000 + r, args.prefix_len)
        cold.append(ttft(llm, prefix + _prompt(60_000 + r, 16)))
        warm.append(ttft(llm, prefix + _prompt(70_000 + r, 16)))
    results["ttft"] = {"cold": cold, "prefix_hit": warm}
    print(f"TTFT {args.prefix_len}+16-token prompt: cold {statistics.median(cold):.2f} s, "
          f"prefix hit {statistics.median(warm):.3f} s ({statistics.median(cold) / statistics.median(warm):.0f}x)")
    llm.engine.pool.check_integrity()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
