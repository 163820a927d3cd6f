"""Where a single-stream decode step goes: the model's linear layers alone (each weight streamed once with
a random one-row activation, as decode does) against whole engine steps at a 512..640-token context
(measured as `qwenrun bench` does).

    python benchmarks/decode_breakdown.py [--quantization int8|int4] [--model DIR]

The difference between the two is attention over the KV cache, norms, sampling and Python.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwenrun import LLM
from qwenrun.cli.bench import measure
from qwenrun.layers.packed import StreamingLinear
from qwenrun.quant.linear import Int4Linear, QuantizedLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/qwenrun-bench/qwen3-0.6b-28l", help="e.g. built by decode_bench.py")
    ap.add_argument("--quantization", choices=["int8", "int4"])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    llm = LLM(args.model, dtype="bfloat16", device="cpu", quantization=args.quantization, max_model_len=700,
              max_num_seqs=1, max_num_batched_tokens=512)
    linears = [m for m in llm.model.modules() if isinstance(m, (QuantizedLinear, StreamingLinear))]
    nbytes = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())

    def in_features(m: torch.nn.Module) -> int:
        w = next(m.buffers())
        return w.shape[1] * (2 if isinstance(m, Int4Linear) else 1)

    xs = [torch.randn(1, in_features(m), dtype=torch.bfloat16) for m in linears]

    def stream() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for m, x in zip(linears, xs):
                m(x)
        return time.perf_counter() - t

    stream()
    t_lin = statistics.median(stream() for _ in range(args.runs))
    step = 1 / statistics.median(measure(llm, args.runs, 512, 128)["decode"])  # `qwenrun bench`'s protocol
    print(f"linear layers: {nbytes / 1e6:.0f} MB per token in {t_lin * 1e3:.1f} ms ({nbytes / t_lin / 1e9:.1f} GB/s)")
    print(f"decode step:   {step * 1e3:.1f} ms ({1 / step:.1f} tok/s); everything else {1e3 * (step - t_lin):.1f} ms")


if __name__ == "__main__":
    main()
