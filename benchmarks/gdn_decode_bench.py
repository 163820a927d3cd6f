"""Gated DeltaNet at Qwen3-Next-80B dims: the C++ decode (and prefill) kernels against the torch path.

Real per-layer dims (Hk 16, Hv 32, dk = dv 128, conv_dim 8192, K 4), batch 1 and 16, the model dtype bf16
(the state is fp32 either way). Each call reads and writes the next sequences' slots of a state pool of
about 1 GiB, so, as in a model with 36 such layers, no call finds its state in cache. Per call: median
(min / max) over --runs timed runs of --calls calls each, after one warm-up run.

Achieved bandwidth counts the bytes a step must move: the state read and written (2 MiB each per
sequence), the conv window read and written, the inputs, the weights and the output. The machine's
bandwidth is measured in the same run: read (a sum over 1 GiB of fp32, as decode_bench.py) and read +
write (an in-place scale of the same tensor, both directions counted), sampled before and after.

Prefill (one sequence, --prefill chunk lengths, from a carried window and state): the C++ token loop
against the op's torch reference, the chunked form (`gdn_prefill.reference`), median (min / max) of --runs.

    python benchmarks/gdn_decode_bench.py
    python benchmarks/gdn_decode_bench.py --batch 1 4 16 --dtype fp32 --runs 7 --prefill 16 64 512
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from qwenrun import kernels
from qwenrun.layers.gated_delta_net import GatedDeltaNet, gdn_decode, gdn_prefill

HK, HV, DK, DV, K = 16, 32, 128, 128, 4
CONV_DIM = 2 * HK * DK + HV * DV  # 8192
POOL_BYTES = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def bandwidth() -> tuple[float, float]:
    """(read, read + write) GB/s now: medians of 5 passes over 1 GiB of fp32."""
    x = torch.ones(2**28)
    reads, writes = [], []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        x.mul_(1.0)
        writes.append(time.perf_counter() - t)
    n = x.numel() * 4
    return n / statistics.median(reads) / 1e9, 2 * n / statistics.median(writes) / 1e9


def step_bytes(B: int, dtype: torch.dtype) -> int:
    """What one step must move: state and conv window in and out, inputs, weights, output."""
    es = torch.empty((), dtype=dtype).element_size()
    state = 2 * B * HV * DK * DV * 4
    conv = 2 * B * CONV_DIM * (K - 1) * es
    inputs = B * (CONV_DIM + 2 * HV + HV * DV) * es  # mixed_qkv, a, b, z
    weights = CONV_DIM * K * es + DV * es + 2 * HV * es  # conv weight, norm weight, A_log, dt_bias
    return state + conv + inputs + weights + B * HV * DV * es


def make_pool(B: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    slots = max(B, POOL_BYTES // (HV * DK * DV * 4)) // B * B  # whole batches
    return dict(
        conv_states=torch.randn(slots, CONV_DIM, K - 1, generator=gen).to(dtype),
        states=torch.randn(slots, HV, DK, DV, generator=gen) * 0.05,
        conv_weight=(torch.randn(CONV_DIM, K, generator=gen) * 0.5).to(dtype),
        A_log=torch.randn(HV, generator=gen).to(dtype),
        dt_bias=torch.randn(HV, generator=gen).to(dtype),
        norm_weight=(1 + 0.1 * torch.randn(DV, generator=gen)).to(dtype),
    )


def time_calls(fn, pool: dict, B: int, dtype: torch.dtype, calls: int, runs: int, gen: torch.Generator) -> list[float]:
    """Seconds per call of each timed run; call i works on the i-th batch of slots of the pool."""
    num_slots = pool["states"].shape[0]
    inputs = [dict(x=torch.randn(B, CONV_DIM, generator=gen).to(dtype), a=torch.randn(B, HV, generator=gen).to(dtype),
                   b=torch.randn(B, HV, generator=gen).to(dtype), z=torch.randn(B, HV, DV, generator=gen).to(dtype))
              for _ in range(4)]
    batches = [torch.arange(i * B, (i + 1) * B) for i in range(num_slots // B)]
    out, n = [], 0
    for run in range(runs + 1):
        t = time.perf_counter()
        for _ in range(calls):
            s, inp = batches[n % len(batches)], inputs[n % len(inputs)]
            fn(inp["x"], pool["conv_states"], pool["conv_weight"], s, s, inp["a"], inp["b"], pool["A_log"],
               pool["dt_bias"], pool["states"], inp["z"], pool["norm_weight"], 1e-6, HK)
            n += 1
        if run:  # the first is the warm-up
            out.append((time.perf_counter() - t) / calls)
    return out


def time_prefill(n: int, dtype: torch.dtype, runs: int, gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Seconds per n-token chunk of one layer: (C++ token loop, torch chunked form)."""
    layer = GatedDeltaNet(64, HK, HV, DK, DV, K, 1e-6)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    layer = layer.to(dtype)
    weight = layer.conv1d.weight[:, 0, :]
    x, a, b = (torch.randn(n, d, generator=gen).to(dtype) for d in (CONV_DIM, HV, HV))
    window, state = torch.randn(CONV_DIM, K - 1, generator=gen).to(dtype), torch.randn(HV, DK, DV, generator=gen) * 0.05
    args = (x, window, weight, a, b, layer.A_log, layer.dt_bias, state, HV, DK, HK)
    assert kernels.uses_kernel("gdn_prefill", *args)
    out = {}
    for name, fn in (("kernel", gdn_prefill), ("torch", gdn_prefill.reference)):
        times = []
        for run in range(runs + 1):
            t = time.perf_counter()
            fn(*args)
            if run:
                times.append(time.perf_counter() - t)
        out[name] = times
    return out["kernel"], out["torch"]


def fmt(xs: list[float], scale: float, digits: int) -> str:
    return f"{statistics.median(xs) * scale:.{digits}f} ({min(xs) * scale:.{digits}f} / {max(xs) * scale:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calls", type=int, default=200, help="kernel calls per timed run (the reference: 1/10 of it)")
    p.add_argument("--prefill", type=int, nargs="*", default=[16, 64, 512], help="prefill chunk lengths")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    if kernels.cpu_ops() is None:
        raise SystemExit("the C++ kernels are not available on this machine")
    gen = torch.Generator().manual_seed(0)
    bw = [bandwidth()]
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} threads, {args.dtype}; bandwidth read "
          f"{bw[0][0]:.1f} GB/s, read+write {bw[0][1]:.1f} GB/s", flush=True)
    rows = []
    with torch.no_grad():
        for B in args.batch:
            pool = make_pool(B, dtype, gen)
            zeros = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
            probe = (zeros(B, CONV_DIM), pool["conv_states"], pool["conv_weight"], torch.arange(B), torch.arange(B),
                     zeros(B, HV), zeros(B, HV), pool["A_log"], pool["dt_bias"], pool["states"], zeros(B, HV, DV),
                     pool["norm_weight"], 1e-6, HK)
            assert kernels.uses_kernel("gdn_decode", *probe)
            kern = time_calls(gdn_decode, pool, B, dtype, args.calls, args.runs, gen)
            ref = time_calls(gdn_decode.reference, pool, B, dtype, max(1, args.calls // 10), args.runs, gen)
            nbytes = step_bytes(B, dtype)
            gbs = [nbytes / t / 1e9 for t in kern]
            rows.append((B, kern, ref, gbs))
            print(f"batch {B:3d}: kernel {fmt(kern, 1e6, 0)} µs/layer, {fmt(gbs, 1, 1)} GB/s of "
                  f"{nbytes / 2**20:.1f} MiB; torch reference {fmt(ref, 1e6, 0)} µs/layer; "
                  f"speedup {statistics.median(ref) / statistics.median(kern):.1f}x", flush=True)
            del pool
        prefill = [(n, *time_prefill(n, dtype, args.runs, gen)) for n in args.prefill]
    bw.append(bandwidth())
    print(f"bandwidth after: read {bw[1][0]:.1f} GB/s, read+write {bw[1][1]:.1f} GB/s\n")
    print("| batch | kernel µs/layer | torch reference µs/layer | speedup | kernel GB/s | of read bandwidth |")
    print("|---:|---:|---:|---:|---:|---:|")
    read = statistics.mean(b[0] for b in bw)
    for B, kern, ref, gbs in rows:
        speedup = statistics.median(ref) / statistics.median(kern)
        print(f"| {B} | {fmt(kern, 1e6, 0)} | {fmt(ref, 1e6, 0)} | {speedup:.1f}× | {fmt(gbs, 1, 1)} "
              f"| {statistics.median(gbs) / read:.0%} |")
    if prefill:
        print("\n| prefill tokens | C++ token loop ms/layer | torch chunked ms/layer | speedup |")
        print("|---:|---:|---:|---:|")
    for n, kern, ref in prefill:
        speedup = statistics.median(ref) / statistics.median(kern)
        print(f"| {n} | {fmt(kern, 1e3, 2)} | {fmt(ref, 1e3, 2)} | {speedup:.1f}× |")


if __name__ == "__main__":
    main()
