"""`qwenrun bench MODEL`: single-stream prefill and decode speed of this machine, the protocol of
`benchmarks/decode_bench.py` (which also runs transformers for the ratio)."""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    import torch

    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(llm, runs: int, prompt_len: int, new_tokens: int) -> dict[str, list[float]]:
    """Prefill and decode tok/s per run (one untimed warm-up first); fresh random prompts, so the
    prefix cache never helps."""
    from qwenrun.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    vocab = min(llm.config.vocab_size, llm.tokenizer.vocab_size if llm.tokenizer else llm.config.vocab_size)
    prefill, decode = [], []
    for i in range(runs + 1):
        req = llm.engine.add_request(_prompt(i, prompt_len, vocab), params)
        t0 = time.perf_counter()
        t_first = None
        while llm.engine.has_unfinished_requests():
            if llm.engine.step() and t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        assert t_first is not None and req.num_output_tokens == new_tokens
        if i:
            prefill.append(prompt_len / (t_first - t0))
            decode.append((new_tokens - 1) / (t_end - t_first))
    return {"prefill": prefill, "decode": decode}


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f} / {max(xs):.1f})"


def run(args: argparse.Namespace) -> int:
    from qwenrun.cli.common import console, load_llm

    args.max_model_len = args.max_model_len or (args.prompt_len + args.new_tokens + 16)
    llm = load_llm(args, max_num_seqs=1)
    llm.engine.scheduler.max_num_batched_tokens = max(args.prompt_len, 1)  # one-chunk prefill
    res = measure(llm, args.runs, args.prompt_len, args.new_tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(
        f"{args.model} ({args.quantization or str(llm.dtype).removeprefix('torch.')}, {llm.device}): "
        f"prefill {fmt(res['prefill'])} tok/s ({args.prompt_len}-token prompt), "
        f"decode {fmt(res['decode'])} tok/s ({args.new_tokens} tokens), peak RSS {rss:.0f} MiB "
        f"— median (min / max) of {args.runs} runs"
    )
    return 0
