"""Prompt-lookup speculative decoding on the bundled model at batch 1: decode tok/s and acceptance
with and without `speculative_config={"method": "ngram", ...}`, greedy output checked identical.

python benchmarks/spec_bench.py [--k 4] [--max-n 3] [--n 8] [--threads N]

Two prompt sets: the eval's arithmetic questions (the reasoning trace restates digits of the
question) and an editing-style prompt whose answer repeats the input. Each prompt runs alone
(batch 1), greedy, once to warm up and then timed; tok/s = output tokens / generate wall time.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch

from qwenrun import LLM, SamplingParams
from qwenrun.demo.evaluate import HEADLINE, TASKS, _user, problems

MODEL = Path(__file__).resolve().parent.parent / "qwenrun" / "assets" / "qwen3-tiny-thinker"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def conversations(n: int) -> dict[str, list[list[dict]]]:
    rng = random.Random(0)
    arith = [_user(rng, p) for task in (HEADLINE, TASKS[1]) for p in problems(task, n // 2, seed=1)]
    items = [f"{rng.randint(100, 999)} apples" for _ in range(12)]
    edit = [[{"role": "user", "content": "Repeat this list exactly, then add one item: " + ", ".join(items)}]]
    return {"arithmetic": arith, "editing": edit}


def run(llm: LLM, convs: list[list[dict]], max_tokens: int) -> tuple[list[list[int]], float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.chat(convs[0], params)  # warm-up
    outs, seconds, tokens = [], 0.0, 0
    for conv in convs:
        t0 = time.perf_counter()
        [out] = llm.chat(conv, params)
        seconds += time.perf_counter() - t0
        outs.append(out.outputs[0].token_ids)
        tokens += len(out.outputs[0].token_ids)
    return outs, seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-n", type=int, default=3, help="prompt_lookup_max")
    ap.add_argument("--min-n", type=int, default=2, help="prompt_lookup_min")
    ap.add_argument("--n", type=int, default=8, help="arithmetic prompts")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.min_n,
            "prompt_lookup_max": args.max_n}
    print(f"# {_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {MODEL.name} fp32, "
          f"batch 1, greedy, max_tokens {args.max_tokens}; speculative_config={spec}")
    plain = LLM(MODEL, dtype="float32")
    fast = LLM(MODEL, dtype="float32", speculative_config=spec)
    for name, convs in conversations(args.n).items():
        base, t_base, n_base = run(plain, convs, args.max_tokens)
        stats = fast.engine.scheduler.stats
        drafted0, accepted0 = stats.draft_tokens, stats.accepted_tokens
        got, t_spec, n_spec = run(fast, convs, args.max_tokens)
        drafted, accepted = stats.draft_tokens - drafted0, stats.accepted_tokens - accepted0
        assert got == base, f"{name}: speculative greedy output differs from plain greedy"
        print(f"{name:10s} {len(convs)} prompts, {n_base} tokens: plain {n_base / t_base:7.1f} tok/s | ngram "
              f"{n_spec / t_spec:7.1f} tok/s ({t_base / t_spec:.2f}x); drafted {drafted}, accepted {accepted} "
              f"({accepted / max(drafted, 1):.0%}), {accepted / max(n_spec, 1):.2f} accepted per output token; "
              "outputs identical")


if __name__ == "__main__":
    main()
