"""Tensor parallelism, measured: decode tokens/s and the all-reduce time per step, TP=1 against TP=N.

CPU (gloo, ranks as processes on this host; the default):

    python benchmarks/tp_bench.py [--shape qwen3-0.6b] [--layers 4] [--tp 1 2] [--batch 1 8] [--dtype bfloat16]

GPU (NCCL, one GPU per rank; a real checkpoint or a random one of a real shape):

    python benchmarks/tp_bench.py --device cuda --tp 1 2 4 --batch 1 32 --model Qwen/Qwen3-8B
    python benchmarks/tp_bench.py --device cuda --tp 1 2 --shape qwen3-30b-a3b --layers 8 [--expert-parallel]

For each TP size and batch B: B greedy sequences of `--new` tokens after a `--prompt`-token prompt;
decode tok/s counts the generated tokens over the steps after the first (prefill excluded), and
the all-reduce line is what rank 0 spends inside `TensorParallel.all_reduce` / `all_gather` per step
(on CUDA each call is synchronised first, so the figure is the collective's, not the queue's). It
includes waiting for the slower rank, so an isolated figure follows: the same all-reduce of a
[B, hidden] tensor in a loop between the ranks alone (`--collective-only` runs just that). On a
2-core CPU, TP=2 splits the same cores and only adds the collectives, so it is expected slower
there: the point is that it is right and that each rank holds half the weights.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from decode_bench import SHAPES, build_checkpoint  # sibling scripts: benchmarks/ is on sys.path

from qwenrun import LLM, SamplingParams
from qwenrun.layers.parallel import TensorParallel


class CollectiveTimer:
    """Wraps TensorParallel's collectives in this process (rank 0): seconds and calls."""

    def __init__(self, cuda: bool) -> None:
        self.seconds, self.calls, self.cuda = 0.0, 0, cuda
        self.originals = {name: getattr(TensorParallel, name) for name in ("all_reduce", "all_gather")}
        for name, fn in self.originals.items():
            setattr(TensorParallel, name, self._timed(fn))

    def _timed(self, fn):
        def timed(tp: TensorParallel, x: torch.Tensor) -> torch.Tensor:
            if tp.world == 1:
                return fn(tp, x)
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(tp, x)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def run_case(folder: Path, tp: int, batch: int, args: argparse.Namespace, timer: CollectiveTimer) -> dict:
    llm = LLM(folder, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
              tensor_parallel_size=tp, enable_expert_parallel=args.expert_parallel, max_num_seqs=max(batch, 1))
    vocab = llm.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.prompt,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    steps, first, decode_steps = 0, None, 0
    timer.reset()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if first is None:  # the prefill step: excluded from the decode figures
            first = time.perf_counter()
            timer.reset()
        else:
            decode_steps += 1
    end = time.perf_counter()
    out = {"tp": tp, "batch": batch, "prefill_s": first - start,
           "decode_tok_s": batch * (args.new - 1) / (end - first) if decode_steps else 0.0,
           "step_ms": 1000 * (end - first) / max(decode_steps, 1),
           "allreduce_ms_per_step": 1000 * timer.seconds / max(decode_steps, 1),
           "collectives_per_step": timer.calls / max(decode_steps, 1),
           "weight_bytes_rank0": _resident_bytes(llm.model)}
    if tp > 1:
        llm.model.executor.close()
    return out


def _resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers, each storage once (a tied LM head shares the embedding's)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*model.parameters(), *model.buffers())}
    return sum(seen.values())


def _collective_rank(rank: int, world: int, port: int, device: str, shape: tuple[int, int], iters: int,
                     dtype: torch.dtype, out) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    if device == "cuda":
        torch.cuda.set_device(rank)
        group = dist.ProcessGroupNCCL(store, rank, world)
    else:
        torch.set_num_threads(1)
        group = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60))
    x = torch.ones(shape, dtype=dtype, device=device if device == "cpu" else f"cuda:{rank}")
    for _ in range(10):
        group.allreduce([x]).wait()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        group.allreduce([x]).wait()
    if device == "cuda":
        torch.cuda.synchronize()
    if rank == 0:
        out.put((time.perf_counter() - t) / iters)


def isolated_allreduce(world: int, device: str, shape: tuple[int, int], dtype: torch.dtype, iters: int = 200) -> float:
    """Seconds per all-reduce of `shape` between `world` fresh processes (nothing else running)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_collective_rank, args=(r, world, port, device, shape, iters, dtype, q))
             for r in range(world)]
    for p in procs:
        p.start()
    result = q.get(timeout=300)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint folder or hub id (default: random weights of --shape)")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4, help="layers of the random checkpoint (0: the shape's)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwenrun-bench"))
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-memory", type=int, default=256 << 20)
    ap.add_argument("--expert-parallel", action="store_true")
    ap.add_argument("--collective-only", action="store_true")
    args = ap.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    hidden = SHAPES[args.shape]["hidden_size"]
    cpu = platform.processor() or platform.machine()
    print(f"# tp_bench on {cpu}, {torch.get_num_threads()} torch threads, device {args.device}, {args.dtype}\n")
    sizes = sorted({1, *args.batch})
    print("| ranks | all-reduce of [B, hidden] | " + " | ".join(f"B={b}" for b in sizes) + " |")
    print("|---:|---|" + "---:|" * len(sizes))
    for world in (w for w in args.tp if w > 1):
        cells = [f"{1e6 * isolated_allreduce(world, args.device, (b, hidden), dtype):.0f} us" for b in sizes]
        print(f"| {world} | isolated, {hidden} wide | " + " | ".join(cells) + " |")
    if args.collective_only:
        return
    folder = Path(args.model) if args.model else build_checkpoint(args.shape, args.layers or None, args.out)
    timer = CollectiveTimer(args.device == "cuda")
    print(f"\nmodel {folder}; prompt {args.prompt}, {args.new} new tokens, greedy\n")
    print("| TP | B | prefill s | decode tok/s | step ms | all-reduce ms / step | collectives / step "
          "| rank-0 weight MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tp in args.tp:
        for b in args.batch:
            r = run_case(folder, tp, b, args, timer)
            print(f"| {tp} | {b} | {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {r['step_ms']:.1f} | "
                  f"{r['allreduce_ms_per_step']:.2f} | {r['collectives_per_step']:.0f} | "
                  f"{r['weight_bytes_rank0'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
