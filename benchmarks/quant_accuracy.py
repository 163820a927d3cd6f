"""Accuracy cost of weight-only quantization on a real (trained) model: the bundled qwen3-tiny-thinker.

Perplexity of the reference completions of held-out demo problems (teacher-forced, completion tokens
only) and greedy next-token agreement with bf16, for int8 and int4 at several group sizes, through both
paths a quantized matmul can take: the prefill path (weights expanded, activations exact) and the C++
decode kernels, which also quantize activations per block (run here at every position).

    python benchmarks/quant_accuracy.py [--n 60]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from qwenrun import LLM, kernels
from qwenrun.demo.data import make_example, sample_problem
from qwenrun.tokenizer.chat import ChatTemplate

BUNDLED = Path(__file__).resolve().parents[1] / "qwenrun" / "assets" / "qwen3-tiny-thinker"
VARIANTS = [("bf16", None, 128), ("int8", "int8", 128), ("int4 g32", "int4", 32), ("int4 g64", "int4", 64),
            ("int4 g128", "int4", 128)]


def held_out_texts(llm: LLM, n: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion, prompt length) for n held-out problems, all modes mixed."""
    rng = random.Random(4321)
    template = ChatTemplate.from_tokenizer(llm.tokenizer)
    out = []
    for i in range(n):
        p = sample_problem(rng, ["add", "sub", "mul"][i % 3], heldout=True)
        ex = make_example(rng, template, ["think", "no_think", "tool_call"][i % 3], p)
        prompt = llm.tokenizer.encode(ex.prompt)
        out.append((prompt + llm.tokenizer.encode(ex.completion), len(prompt)))
    return out


def evaluate(llm: LLM, texts: list[tuple[list[int], int]]) -> tuple[float, list[torch.Tensor]]:
    nll, count, argmaxes = 0.0, 0, []
    for ids, plen in texts:
        logits = llm.logits(ids)  # [T, V]
        logp = torch.log_softmax(logits[plen - 1 : -1].float(), dim=-1)
        target = torch.tensor(ids[plen:])
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += len(target)
        argmaxes.append(logits[plen - 1 : -1].argmax(-1))
    return math.exp(nll / count), argmaxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED))
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    base = LLM(args.model, dtype="bfloat16", kv_cache_memory=64 << 20)
    texts = held_out_texts(base, args.n)
    ref_ppl, ref_arg = evaluate(base, texts)
    default = dict(kernels.GEMV_MAX_ROWS)
    paths = [("prefill", default)] + ([("decode", {k: 1 << 30 for k in default})] if kernels.cpu_ops() else [])
    print(f"{'variant':10s} {'path':8s} {'perplexity':>10s} {'delta':>8s} {'argmax agreement':>17s}")
    for name, method, group in VARIANTS:
        llm = base if method is None else LLM(args.model, dtype="bfloat16", kv_cache_memory=64 << 20,
                                              quantization=method, quant_group_size=group)
        for path, max_rows in paths:
            kernels.GEMV_MAX_ROWS = max_rows  # every matmul through the decode kernels, or the usual split
            ppl, arg = evaluate(llm, texts)
            agree = sum((a == b).sum().item() for a, b in zip(arg, ref_arg)) / sum(len(a) for a in arg)
            print(f"{name:10s} {path:8s} {ppl:10.4f} {100 * (ppl / ref_ppl - 1):+7.2f}% {100 * agree:16.1f}%")
        kernels.GEMV_MAX_ROWS = default


if __name__ == "__main__":
    main()
