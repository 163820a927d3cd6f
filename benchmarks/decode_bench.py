"""Single-stream prefill and decode speed: qwenrun (bf16 / int8 / int4) against transformers bf16, same run.

Protocol (as ../shared/spec/cpu-baselines.md): batch 1, a 512-token prompt, 128 greedy new tokens, a
fresh random prompt per run (so the prefix cache never helps), median (min / max) of --runs timed runs
after one warm-up. Each engine runs in its own subprocess, which also gives a clean peak RSS.

    python benchmarks/decode_bench.py                        # Qwen3-0.6B shape, random bf16 weights
    python benchmarks/decode_bench.py --shape qwen3-30b-a3b --layers 4
    python benchmarks/decode_bench.py --model /path/to/checkpoint --engines qwenrun-bf16,qwenrun-int8

llama.cpp joins the same run when llama-cpp-python is installed and GGUF files of the checkpoint are
given (`--gguf-dir` holding model-bf16.gguf / model-q8_0.gguf / model-q4_0.gguf): engines
llamacpp-bf16, llamacpp-q8_0, llamacpp-q4_0. benchmarks/RESULTS.md says how to build and convert.
The machine's 2-thread read bandwidth is sampled before and after, since it moves by ±30% over minutes
on a shared host and every decode figure here is bounded by it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qwenrun.cli.bench import fmt

SHAPES = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    # hybrid: 3 Gated DeltaNet layers per gated attention layer (use --layers 4 or 8: 512 experts a layer)
    "qwen3-next-80b-a3b": dict(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=151936, hidden_size=2048,
        intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512,
        num_experts_per_tok=10, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        max_position_embeddings=262144, rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                         "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
    ),
    "qwen3.5-35b-a3b": dict(
        architectures=["Qwen3_5MoeForCausalLM"], model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
        num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        full_attention_interval=4, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10]},
        tie_word_embeddings=False,
    ),
}
ENGINES = ("transformers-bf16", "qwenrun-bf16", "qwenrun-int8", "qwenrun-int4")
LLAMACPP_TYPES = ("bf16", "q8_0", "q4_0")


def build_checkpoint(shape: str, layers: int | None, out: Path) -> Path:
    """Random N(0, 0.02) bf16 weights with the exact real shapes, written by transformers. MoE attention
    output projections get std 0.002 so routing spreads over the experts (cpu-baselines.md, routing caveat)."""
    import torch
    import transformers

    cfg_dict = dict(SHAPES[shape], rms_norm_eps=1e-6, torch_dtype="bfloat16", eos_token_id=151645)
    if layers:
        cfg_dict["num_hidden_layers"] = layers
    folder = out / f"{shape}-{cfg_dict['num_hidden_layers']}l"
    if (folder / "config.json").is_file():
        return folder
    cfg = transformers.AutoConfig.for_model(
        cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    zero_centred = "linear_num_value_heads" in cfg_dict  # hybrid families: norms scale by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.002 if ("o_proj" in name and "num_experts" in cfg_dict) else 0.02
            if "norm" in name:
                p.fill_(0.0 if zero_centred and "linear_attn.norm" not in name else 1.0)
            else:
                p.normal_(0, std, generator=gen)
    model.save_pretrained(folder)
    return folder


def _prompt(seed: int, n: int) -> list[int]:
    import torch

    return torch.randint(0, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_qwenrun(model: str, quant: str | None, runs: int, prompt_len: int, new_tokens: int) -> dict:
    from qwenrun import LLM
    from qwenrun.cli.bench import measure  # the same loop as `qwenrun bench`

    llm = LLM(model, dtype="bfloat16", device="cpu", quantization=quant, max_model_len=prompt_len + new_tokens + 16,
              max_num_seqs=1, max_num_batched_tokens=prompt_len)
    return measure(llm, runs, prompt_len, new_tokens)


def run_transformers(model: str, runs: int, prompt_len: int, new_tokens: int) -> dict:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(runs + 1):
            ids = torch.tensor([_prompt(i, prompt_len)])
            t0 = time.perf_counter()
            m(ids)
            t1 = time.perf_counter()
            m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            t2 = time.perf_counter()
            if i:
                prefill.append(prompt_len / (t1 - t0))
                decode.append((new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return {"prefill": prefill, "decode": decode}


def run_llamacpp(gguf: str, runs: int, prompt_len: int, new_tokens: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python: prompt evaluated in one batch, then greedy tokens one by one."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(gguf, n_ctx=prompt_len + new_tokens + 16, n_batch=prompt_len, n_threads=threads or 2,
                          n_threads_batch=threads or 2, verbose=False)
    vocab = llm.n_vocab()
    prefill, decode = [], []
    for i in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(_prompt(i, prompt_len))
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy: argmax of the last position's logits
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        if i:
            prefill.append(prompt_len / (t1 - t0))
            decode.append((new_tokens - 1) / (t2 - t1))
    return {"prefill": prefill, "decode": decode}


def read_bandwidth() -> float:
    """2-thread read bandwidth now, GB/s: median of 5 sums over 1 GiB of fp32."""
    import torch

    x = torch.ones(2**28)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def child(args: argparse.Namespace) -> None:
    bandwidth = read_bandwidth()
    if args.engine == "transformers-bf16":
        res = run_transformers(args.model, args.runs, args.prompt_len, args.new_tokens)
    elif args.engine.startswith("llamacpp-"):
        gguf = Path(args.gguf_dir) / f"model-{args.engine.removeprefix('llamacpp-')}.gguf"
        res = run_llamacpp(str(gguf), args.runs, args.prompt_len, args.new_tokens, args.threads)
    else:
        quant = {"qwenrun-bf16": None, "qwenrun-int8": "int8", "qwenrun-int4": "int4"}[args.engine]
        res = run_qwenrun(args.model, quant, args.runs, args.prompt_len, args.new_tokens)
    res["read_bandwidth_gbs"] = [bandwidth, read_bandwidth()]  # around this engine's runs
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: build one with --shape)")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="reduce depth (e.g. 4 for the 30B-A3B per-layer shape)")
    ap.add_argument("--cache-dir", default=os.environ.get("QWENRUN_BENCH_DIR", "/tmp/qwenrun-bench"))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--gguf-dir", help="folder with model-{bf16,q8_0,q4_0}.gguf: adds the llama.cpp engines")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.engine:
        return child(args)
    model = args.model or str(build_checkpoint(args.shape, args.layers, Path(args.cache_dir)))
    engines = args.engines.split(",")
    if args.gguf_dir:
        engines += [f"llamacpp-{t}" for t in LLAMACPP_TYPES if (Path(args.gguf_dir) / f"model-{t}.gguf").is_file()]
    bandwidth = [read_bandwidth()]
    print(f"read bandwidth (2 threads) before: {bandwidth[0]:.1f} GB/s", flush=True)
    results = {}
    for engine in engines:
        cmd = [sys.executable, __file__, "--engine", engine, "--model", model, "--runs", str(args.runs),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        if args.gguf_dir:
            cmd += ["--gguf-dir", args.gguf_dir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{engine}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = json.loads(line[7:])
        r = results[engine]
        print(f"{engine:18s} prefill {fmt(r['prefill'])} tok/s   decode {fmt(r['decode'])} tok/s   "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB   read bandwidth {r['read_bandwidth_gbs'][0]:.0f}"
              f"→{r['read_bandwidth_gbs'][1]:.0f} GB/s", flush=True)
    bandwidth.append(read_bandwidth())
    print(f"read bandwidth (2 threads) after: {bandwidth[1]:.1f} GB/s")
    base = results.get("transformers-bf16")
    if base:
        for name, r in results.items():
            if name != "transformers-bf16":
                print(f"{name}: decode {statistics.median(r['decode']) / statistics.median(base['decode']):.2f}x, "
                      f"prefill {statistics.median(r['prefill']) / statistics.median(base['prefill']):.2f}x transformers bf16")
    for ours, theirs in (("qwenrun-bf16", "llamacpp-bf16"), ("qwenrun-int8", "llamacpp-q8_0"), ("qwenrun-int4", "llamacpp-q4_0")):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"{ours}: decode {statistics.median(a['decode']) / statistics.median(b['decode']):.2f}x, "
                  f"prefill {statistics.median(a['prefill']) / statistics.median(b['prefill']):.2f}x {theirs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "args": vars(args), "read_bandwidth_gbs": bandwidth,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
