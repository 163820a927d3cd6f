"""Peak RSS of loading a bf16 checkpoint quantized (issue 16's acceptance: <= 1.15 x the loaded model's
bytes + the KV budget + 300 MB), against the loaded model's own bytes and torch's footprint.

Each case runs in a fresh child process, which reads its own high-water mark (/proc/self/status VmHWM)
once `LLM(...)` has returned: the checkpoint read, the quantization, the KV cache and the engine set-up
are all inside it. "torch baseline" is a child that only imports torch and qwenrun and finds the C++
kernels (`kernels.prepare`), what every case pays before its first tensor. "model bytes" counts every
parameter and buffer of the loaded model once (quantized parts, the full-precision embedding, norms).

    python benchmarks/load_rss.py                              # 0.6B shape and 30B-A3B shape, 8 layers, int4
    python benchmarks/load_rss.py --cases qwen3-0.6b --also-unstreamed
    python benchmarks/load_rss.py --cases qwen3-0.6b --also-prequantized   # + `qwenrun quantize`'s output

"load s" is the wall time of `LLM(...)` in the child (checkpoint files in the page cache, kernels
already built). With --also-prequantized the checkpoint is first written by `qwenrun quantize` (kept
in --cache-dir) and loaded with no quantization asked: its tensors are mapped from the files, so its
peak counts those file pages (which the kernel can drop and re-read) instead of anonymous memory.

The 0.6B checkpoint is written by decode_bench.build_checkpoint (transformers); the 30B-A3B one tensor by
tensor, one shard per layer (N(0, 0.02) bf16, Qwen's per-expert names), since the whole bf16 model at 8
layers (~10 GB) would be held twice by transformers. Both are kept in --cache-dir for the next run.

`--llamacpp` adds llama.cpp's Q4_0 of the same weights (converted once by benchmarks/gguf_build.py with
llama.cpp's own converter and quantizer, kept in --cache-dir), loaded by llama-cpp-python with its
defaults in a child of its own at the same context length. Both engines' children also report the
peak after a first token (a 4-token prompt through every layer): llama.cpp maps its file and reads a
weight's pages when first used, as a `qwenrun quantize` output does, so only that column compares
lazily loaded files fairly; "anon + file" splits the resident set after it into memory the process
holds and mapped file pages. "model bytes" for llama.cpp is its own `llama_model_size`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import SHAPES, build_checkpoint  # noqa: E402
from gguf_build import DEFAULT_SRC, q4_0_from_checkpoint  # noqa: E402

MB = 1 << 20
CASES = {"qwen3-0.6b": ("qwen3-0.6b", None), "qwen3-30b-a3b-8l": ("qwen3-30b-a3b", 8)}
FIRST_PROMPT = [9707, 11, 1879, 0]


def status(key: str) -> int:
    """A /proc/self/status size field, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def vm_hwm() -> int:
    """This process's peak resident set, bytes."""
    return status("VmHWM")


def resident_parts() -> dict:
    """The resident set now, split: anonymous memory (what the process holds) and mapped file pages
    (which the kernel may drop and read again)."""
    return {"anon": status("RssAnon"), "file": status("RssFile")}


def build_moe_checkpoint(shape: str, layers: int, out: Path) -> Path:
    """A Qwen3-MoE-shaped bf16 checkpoint written one layer per shard, so at most one layer's tensors
    are in memory while writing."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(SHAPES[shape], num_hidden_layers=layers, rms_norm_eps=1e-6, torch_dtype="bfloat16",
               eos_token_id=151645)
    folder = out / f"{shape}-{layers}l"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    H, V, D, E = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"], cfg["num_experts"]
    I, nq, nkv = cfg["moe_intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=gen)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    shard("embed.safetensors", {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": ones(H)})
    shard("lm_head.safetensors", {"lm_head.weight": rand(V, H)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ones(H),
             p + "post_attention_layernorm.weight": ones(H),
             p + "self_attn.q_proj.weight": rand(nq * D, H), p + "self_attn.k_proj.weight": rand(nkv * D, H),
             p + "self_attn.v_proj.weight": rand(nkv * D, H),
             p + "self_attn.o_proj.weight": rand(H, nq * D, std=0.002),  # routing spreads (decode_bench)
             p + "self_attn.q_norm.weight": ones(D),
             p + "self_attn.k_norm.weight": ones(D),
             p + "mlp.gate.weight": rand(E, H)}
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t |= {q + "gate_proj.weight": rand(I, H), q + "up_proj.weight": rand(I, H),
                  q + "down_proj.weight": rand(H, I)}
        shard(f"layer-{i:03d}.safetensors", t)
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def child(args: argparse.Namespace) -> None:
    if args.llamacpp_child:  # no torch in this process: llama.cpp's footprint alone
        import llama_cpp

        start = time.perf_counter()
        llm = llama_cpp.Llama(args.child, n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
        seconds = time.perf_counter() - start
        loaded = vm_hwm()
        llm.eval(FIRST_PROMPT)
        print(json.dumps({"peak": loaded, "first": vm_hwm(), "model": llm._model.size(), "seconds": seconds,
                          **resident_parts()}))
        return
    import torch

    from qwenrun import kernels

    if args.child == "baseline":
        import qwenrun.llm  # noqa: F401

        kernels.prepare(torch.device("cpu"), torch.bfloat16)
        print(json.dumps({"peak": vm_hwm()}))
        return
    from qwenrun import LLM
    from qwenrun.loading.loader import load_model
    from qwenrun.sampling.params import SamplingParams

    if args.unstreamed:  # the load-then-quantize path (issue 16's "before"), for comparison
        import qwenrun.llm as llm_module
        from qwenrun.quant import quantize_model

        def load_whole(ckpt, dtype, device, mtp=False, quantization=None):
            model = load_model(ckpt, dtype, device, mtp)
            q = quantization
            return quantize_model(model, q.method, q.group_size, q.quantize_lm_head) if q else model

        llm_module.load_model = load_whole
    start = time.perf_counter()
    llm = LLM(args.child, dtype="bfloat16", device="cpu", quantization=None if args.prequantized else args.method,
              kv_cache_memory=args.kv_mb * MB, max_model_len=1024)
    seconds = time.perf_counter() - start
    seen, nbytes = set(), 0
    for t in [*llm.model.parameters(), *llm.model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            nbytes += t.untyped_storage().nbytes()
    loaded = vm_hwm()
    llm.engine.add_request(FIRST_PROMPT, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    print(json.dumps({"peak": loaded, "first": vm_hwm(), "model": nbytes, "seconds": seconds, **resident_parts()}))


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"case {extra} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--method", default="int4", choices=["int8", "int4"])
    ap.add_argument("--kv-mb", type=int, default=128, help="KV cache budget (kv_cache_memory), MB")
    ap.add_argument("--cache-dir", default=os.environ.get("QWENRUN_BENCH_DIR", "/tmp/qwenrun-bench"))
    ap.add_argument("--also-unstreamed", action="store_true", help="also the load-then-quantize path")
    ap.add_argument("--also-prequantized", action="store_true",
                    help="also a checkpoint `qwenrun quantize` wrote, loaded as it is")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's Q4_0 of the same weights")
    ap.add_argument("--llama-cpp-src", default=DEFAULT_SRC, help="llama.cpp source tree (its converter)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--llamacpp-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prequantized", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unstreamed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    base = run_child("--child", "baseline")["peak"]
    rows = []

    def add(name: str, r: dict, kv: bool = True) -> None:
        bound = 1.15 * r["model"] + args.kv_mb * MB + 300 * MB if kv else None
        rows.append((name, r, bound))

    for case in args.cases.split(","):
        shape, layers = CASES[case]
        cache = Path(args.cache_dir)
        folder = (build_checkpoint(shape, layers, cache) if layers is None
                  else build_moe_checkpoint(shape, layers, cache))
        common = ["--method", args.method, "--kv-mb", str(args.kv_mb), "--child", str(folder)]
        for unstreamed in (False, True) if args.also_unstreamed else (False,):
            r = run_child(*common, *(["--unstreamed"] if unstreamed else []))
            add(f"{case} {args.method}" + (" (load, then quantize)" if unstreamed else ""), r)
        if args.also_prequantized:
            out = cache / f"{folder.name}-{args.method}-qwenrun"
            if not (out / "config.json").is_file():
                subprocess.run([sys.executable, "-m", "qwenrun", "quantize", str(folder), "--to", args.method,
                                str(out)], check=True)
            add(f"{case} {args.method} (qwenrun quantize output)", run_child("--prequantized", *common[:-1], str(out)))
        if args.llamacpp:
            gguf = q4_0_from_checkpoint(folder, cache / f"{folder.name}-q4_0.gguf", args.llama_cpp_src)
            add(f"{case} llama.cpp Q4_0", run_child("--llamacpp-child", "--child", str(gguf)), kv=False)
    print(f"torch baseline (import torch and qwenrun, kernels found): {base / MB:.0f} MB; KV budget {args.kv_mb} MB "
          "(llama.cpp: its own KV cache for 1024 tokens, no torch)\n")
    print("| case | model bytes | peak RSS after load | peak / model | bound (1.15·model + KV + 300 MB) | "
          "peak / bound | peak after a first token | then anon + file | load s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, bound in rows:
        b = f"{bound / MB:.0f} MB | {r['peak'] / bound:.2f}" if bound else "– | –"
        print(f"| {name} | {r['model'] / MB:.0f} MB | {r['peak'] / MB:.0f} MB | {r['peak'] / r['model']:.2f} | {b} | "
              f"{r['first'] / MB:.0f} MB | {r['anon'] / MB:.0f} + {r['file'] / MB:.0f} MB | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
