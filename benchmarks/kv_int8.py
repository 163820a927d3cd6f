"""int8 KV cache (`--kv-cache-dtype int8`) against the model-dtype cache: accuracy and decode speed.

1. Accuracy, on the bundled qwen3-tiny-thinker (trained, so K/V have real statistics), bf16 weights:
   perplexity of the reference completions of held-out demo problems (teacher-forced, completion tokens
   only; the problems of benchmarks/quant_accuracy.py) and next-token argmax agreement, through both
   attention paths: prefill (SDPA over the dequantized blocks) and decode rows (the C++ kernel reading
   int8), the latter forced at every position; then greedy generation on the held-out prompts of
   `qwenrun eval-demo`'s modes (thinking, non-thinking, tool call): outputs identical to the auto cache,
   mean position of the first difference, and answer accuracy of each.
2. Decode tok/s at batch 1 with 8K and 32K tokens of context, for the Qwen3-0.6B shape (random bf16
   weights, decode_bench.py's builder). The context is seeded (hybrid_bench.py's way): the request's
   blocks are allocated as if its prompt had been prefilled, with random K/V written into the cache,
   since prefilling 32K tokens takes tens of minutes on two cores and decode reads the same bytes
   whatever they hold. Per run: the median time of --steps decode steps after two warm-up steps; auto
   and int8 runs interleaved (the same load for both); the median of --runs runs, and the fastest single
   step of all runs beside it (a shared host stretches it least).

    python benchmarks/kv_int8.py                       # both parts
    python benchmarks/kv_int8.py --part accuracy --n 60
    python benchmarks/kv_int8.py --part speed --contexts 8192,32768 --runs 3 --steps 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from qwenrun import LLM, SamplingParams
from qwenrun.layers import attention
from qwenrun.layers.attention import KVCacheSpec, QuantizedKV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import build_checkpoint  # noqa: E402
from hybrid_bench import seed_context  # noqa: E402
from quant_accuracy import BUNDLED, evaluate, held_out_texts  # noqa: E402

DTYPES = ("auto", "int8")


# ---------------------------------------------------------------------------------------------- accuracy
def greedy_prompts(llm: LLM, n: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, expected answer) of n held-out problems, thinking / non-thinking / tool call (whose
    turn ends in the call, so None: it counts in the identical outputs, not in the answers)."""
    from qwenrun.demo.data import make_example, sample_problem
    from qwenrun.tokenizer.chat import ChatTemplate

    rng = random.Random(8765)
    template = ChatTemplate.from_tokenizer(llm.tokenizer)
    out = []
    for i in range(n):
        p = sample_problem(rng, ["add", "sub", "mul"][i % 3], heldout=True)
        ex = make_example(rng, template, ["think", "no_think", "tool_call"][i % 3], p)
        out.append((llm.tokenizer.encode(ex.prompt), p.answer if i % 3 != 2 else None))  # a tool call: no answer
    return out


def accuracy_part(args: argparse.Namespace) -> dict:
    from qwenrun.demo.evaluate import final_int

    llms = {dt: LLM(args.model, dtype="bfloat16", kv_cache_memory=64 << 20, kv_cache_dtype=dt) for dt in DTYPES}
    texts = held_out_texts(llms["auto"], args.n)
    results: dict = {}
    print(f"{'cache':6s} {'path':8s} {'perplexity':>10s} {'delta':>8s} {'argmax agreement':>17s}")
    default = attention.DECODE_CHUNK_MAX
    ref_ppl, ref_arg = None, None
    for path, chunk_max in (("prefill", default), ("decode", 1 << 30)):
        attention.DECODE_CHUNK_MAX = chunk_max  # every position a decode row (the C++ kernel), or the usual split
        for dt in DTYPES:
            ppl, arg = evaluate(llms[dt], texts)
            if ref_ppl is None:
                ref_ppl, ref_arg = ppl, arg  # auto cache, prefill path
            agree = sum((a == b).sum().item() for a, b in zip(arg, ref_arg)) / sum(len(a) for a in arg)
            results[f"{dt} {path}"] = {"perplexity": ppl, "delta": ppl / ref_ppl - 1, "argmax_agreement": agree}
            print(f"{dt:6s} {path:8s} {ppl:10.4f} {100 * (ppl / ref_ppl - 1):+7.3f}% {100 * agree:16.2f}%", flush=True)
    attention.DECODE_CHUNK_MAX = default
    prompts = greedy_prompts(llms["auto"], args.n)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    outs = {dt: [o.outputs[0] for o in llms[dt].generate([p for p, _ in prompts], params)] for dt in DTYPES}
    same, first_diff, correct = 0, [], {dt: 0 for dt in DTYPES}
    for i, (_, answer) in enumerate(prompts):
        a, b = outs["auto"][i].token_ids, outs["int8"][i].token_ids
        if a == b:
            same += 1
        else:
            first_diff.append(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        for dt in DTYPES:
            correct[dt] += answer is not None and final_int(outs[dt][i].text) == answer
    answered = sum(a is not None for _, a in prompts)
    results["greedy"] = {"prompts": len(prompts), "identical": same, "first_difference_mean": (
        statistics.mean(first_diff) if first_diff else None), "answered": answered, "correct": correct}
    print(f"greedy, {len(prompts)} held-out prompts (max {args.max_tokens} tokens): {same} identical to the auto "
          f"cache" + (f", the others differ from token {statistics.mean(first_diff):.0f} on average" if first_diff
                      else "") + f"; answers correct (of the {answered} without a tool): auto {correct['auto']}, int8 {correct['int8']}",
          flush=True)
    return results


# ------------------------------------------------------------------------------------------------- speed
def fill_random(llm: LLM) -> None:
    """Random K/V in every cache slot (and positive scales), as a prefilled context would leave them."""
    gen = torch.Generator().manual_seed(0)
    for layer in llm.engine.cache.kv.layers.values():
        for kv in layer:
            if isinstance(kv, QuantizedKV):
                kv.data.random_(-127, 128, generator=gen)
                kv.scale.uniform_(0.001, 0.02, generator=gen)
            else:
                kv.normal_(0, 1, generator=gen)


def decode_run(llm: LLM, context: int, steps: int) -> tuple[float, float]:
    """tok/s of one request at `context`: 1 / the median step time after two warm-up steps, and 1 / the
    fastest step (what a shared host stretches least)."""
    seed_context(llm, 1, context, steps + 2)
    times = []
    while llm.engine.has_unfinished_requests():
        t0 = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times[2:]), 1 / min(times[2:])


def speed_part(args: argparse.Namespace) -> dict:
    folder = Path(args.speed_model) if args.speed_model else build_checkpoint("qwen3-0.6b", None, Path(args.cache_dir))
    contexts = [int(c) for c in args.contexts.split(",")]
    longest = max(contexts) + args.steps + 16
    llms = {}
    for dt in DTYPES:
        stored = torch.int8 if dt == "int8" else torch.bfloat16
        cfg = json.loads((folder / "config.json").read_text())
        spec = KVCacheSpec(cfg["num_key_value_heads"], cfg["head_dim"], stored)
        budget = spec.bytes_per_token * cfg["num_hidden_layers"] * (longest + 32)  # one context and a block
        llms[dt] = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=longest, kv_cache_memory=budget,
                       max_num_seqs=1, enable_prefix_caching=False, kv_cache_dtype=dt)
        fill_random(llms[dt])
        print(f"{dt}: {budget / 2**30:.2f} GiB of KV cache for {longest} tokens", flush=True)
    results: dict = {}
    for context in contexts:
        runs: dict[str, list[tuple[float, float]]] = {dt: [] for dt in DTYPES}
        for _ in range(args.runs):
            for dt in DTYPES:  # interleaved: both see alike load
                runs[dt].append(decode_run(llms[dt], context, args.steps))
        med = {dt: statistics.median(m for m, _ in runs[dt]) for dt in DTYPES}
        best = {dt: max(b for _, b in runs[dt]) for dt in DTYPES}
        for dt in DTYPES:
            results[f"{dt} ctx{context}"] = {"median_tok_s": med[dt], "runs": [m for m, _ in runs[dt]],
                                             "fastest_step_tok_s": best[dt]}
        print(f"context {context:6d}: auto (bf16) {med['auto']:6.2f} tok/s, int8 {med['int8']:6.2f} tok/s "
              f"({med['int8'] / med['auto']:.2f}x), medians of {args.runs} runs (auto "
              f"{', '.join(f'{m:.2f}' for m, _ in runs['auto'])}; int8 {', '.join(f'{m:.2f}' for m, _ in runs['int8'])}); "
              f"fastest step {best['auto']:.2f} / {best['int8']:.2f} tok/s ({best['int8'] / best['auto']:.2f}x)",
              flush=True)
    del llms
    gc.collect()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("accuracy", "speed", "both"), default="both")
    ap.add_argument("--model", default=str(BUNDLED), help="accuracy: a trained checkpoint (default: the bundled one)")
    ap.add_argument("--n", type=int, default=60, help="accuracy: held-out problems")
    ap.add_argument("--max-tokens", type=int, default=384, help="accuracy: greedy tokens per prompt")
    ap.add_argument("--speed-model", help="speed: checkpoint folder (default: the 0.6B shape, built once)")
    ap.add_argument("--cache-dir", default=os.environ.get("QWENRUN_BENCH_DIR", "/tmp/qwenrun-bench"))
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {}
    if args.part in ("accuracy", "both"):
        results["accuracy"] = accuracy_part(args)
    if args.part in ("speed", "both"):
        results["speed"] = speed_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
