"""The full-depth Qwen3-30B-A3B shape (48 layers x 128 experts, 30.5B parameters) loaded as int4 and decoded
on this 24 GB machine, against llama.cpp's Q4_0 of the same weights in the same run (issue 16, acceptance 2).

Its bf16 checkpoint would be 61 GB, more than this disk holds beside the two quantized files, so the
weights come from a generator instead: every tensor N(0, 0.02) in bf16 (attention output 0.002, so
routing spreads, as decode_bench does; norms 1), each seeded by its checkpoint name, so both engines
get the same values.

- qwenrun: `LLM(folder, quantization="int4")` on a folder holding only config.json, through the loading
  path a user's checkpoint takes (layers built quantized on `meta`, each tensor quantized into its
  packed rows as it arrives, `load_weights`' checks), with the safetensors reader swapped for the
  generator. Peak RSS is the streaming quantizer's own; no file is read.
- llama.cpp: a Q4_0 GGUF written tensor by tensor from the generator (gguf_build.GgufStream: metadata
  and per-role types from the 8-layer conversion by llama.cpp's own tools; output projection Q6_K as
  llama-quantize makes it), loaded by llama-cpp-python with its defaults; deleted afterwards
  unless --keep.

Each engine runs in a child process of its own (VmHWM after load, and after decoding). Decode: batch 1,
a random prompt, greedy, the loop of `qwenrun bench` / decode_bench's llama.cpp loop.

    python benchmarks/big_moe.py                  # 48 layers, ~35 min on 2 cores (generation included)
    python benchmarks/big_moe.py --layers 2       # the same path, small
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import SHAPES, run_llamacpp  # noqa: E402
from load_rss import CASES, build_moe_checkpoint, resident_parts, vm_hwm  # noqa: E402

GB = 1e9
SHAPE = "qwen3-30b-a3b"
# GGUF role -> checkpoint name (blocks: the part after "model.layers.N.")
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "mlp.gate"}
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def config(layers: int) -> dict:
    return dict(SHAPES[SHAPE], num_hidden_layers=layers, rms_norm_eps=1e-6, torch_dtype="bfloat16",
                eos_token_id=151645)


def checkpoint_infos(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the bf16 checkpoint, with Qwen's per-expert names."""
    H, V, D, E = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"], cfg["num_experts"]
    I, nq, nkv = cfg["moe_intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (V, H)), ("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (nq * D, H)), (p + "self_attn.k_proj.weight", (nkv * D, H)),
                (p + "self_attn.v_proj.weight", (nkv * D, H)), (p + "self_attn.o_proj.weight", (H, nq * D)),
                (p + "self_attn.q_norm.weight", (D,)), (p + "self_attn.k_norm.weight", (D,)),
                (p + "mlp.gate.weight", (E, H))]
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out += [(q + "gate_proj.weight", (I, H)), (q + "up_proj.weight", (I, H)), (q + "down_proj.weight", (H, I))]
    return out


def value(name: str, shape: tuple[int, ...]):
    """The bf16 tensor called `name`: the same values in every process."""
    import torch

    if "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 0.002 if "o_proj" in name else 0.02
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=gen)


def gguf_layout(template_names: list[str], cfg: dict) -> list[tuple[str, tuple[int, ...], list[str]]]:
    """(GGUF name, numpy shape, checkpoint names stacked into it) in the template's order: the embedding,
    every block as the template's blk.0, then the other global tensors."""
    shapes = dict(checkpoint_infos(cfg))
    block0 = [n.split(".", 2)[2] for n in template_names if n.startswith("blk.0.")]
    out = [("token_embd.weight", shapes[GLOBAL["token_embd.weight"]], [GLOBAL["token_embd.weight"]])]
    for i in range(cfg["num_hidden_layers"]):
        for rest in block0:
            role, suffix = rest.rsplit(".", 1)
            if role in EXPERTS:
                names = [f"model.layers.{i}.mlp.experts.{e}.{EXPERTS[role]}.{suffix}" for e in range(cfg["num_experts"])]
                out.append((f"blk.{i}.{rest}", (len(names), *shapes[names[0]]), names))
            else:
                name = f"model.layers.{i}.{BLOCK[role]}.{suffix}"
                out.append((f"blk.{i}.{rest}", shapes[name], [name]))
    out += [(n, shapes[GLOBAL[n]], [GLOBAL[n]]) for n in template_names
            if not n.startswith("blk.") and n != "token_embd.weight"]
    return out


def write_gguf(template: Path, out: Path, cfg: dict) -> float:
    """The Q4_0 GGUF of the generated weights; returns seconds taken."""
    import torch

    from gguf_build import GgufStream

    start = time.perf_counter()
    stream = GgufStream(template, out.with_suffix(".part"), cfg["num_hidden_layers"])
    layout = gguf_layout(list(stream.types), cfg)
    shapes = dict(checkpoint_infos(cfg))

    def arrays():
        for name, _, sources in layout:
            parts = [value(n, shapes[n]) for n in sources]
            yield name, (torch.stack(parts) if len(parts) > 1 else parts[0]).float().numpy()

    stream.write(arrays(), [(name, shape) for name, shape, _ in layout])
    out.with_suffix(".part").rename(out)
    return time.perf_counter() - start


def child_qwenrun(args: argparse.Namespace) -> dict:
    import qwenrun.loading.weights as weights
    from qwenrun import LLM
    from qwenrun.cli.bench import measure

    cfg = json.loads((Path(args.folder) / "config.json").read_text())
    generating = [0.0]

    def generated(files: list[Path]):
        for name, shape in checkpoint_infos(cfg):
            t0 = time.perf_counter()
            t = value(name, shape)
            generating[0] += time.perf_counter() - t0
            yield name, t, lambda begin=0, end=0: None

    weights.checkpoint_files = lambda folder: [folder]
    weights.iter_tensors = generated
    start = time.perf_counter()
    llm = LLM(args.folder, dtype="bfloat16", device="cpu", quantization="int4", kv_cache_memory=args.kv_mb << 20,
              max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=1,
              max_num_batched_tokens=args.prompt_len)
    seconds = time.perf_counter() - start
    loaded = vm_hwm()
    nbytes = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in
                                                        [*llm.model.parameters(), *llm.model.buffers()]}.values())
    res = measure(llm, args.runs, args.prompt_len, args.new_tokens)
    return {"load_s": seconds, "generate_s": generating[0], "peak_load": loaded, "peak": vm_hwm(),
            "model": nbytes, **resident_parts(), **res}


def child_llamacpp(args: argparse.Namespace) -> dict:
    import llama_cpp

    start = time.perf_counter()
    probe = llama_cpp.Llama(args.folder, n_ctx=64, n_threads=2, verbose=False)  # load alone, timed
    seconds = time.perf_counter() - start
    model = probe._model.size()
    del probe
    res = run_llamacpp(args.folder, args.runs, args.prompt_len, args.new_tokens, 2)
    return {"load_s": seconds, "peak": vm_hwm(), "model": model, **resident_parts(), **res}


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {extra} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-mb", type=int, default=256)
    ap.add_argument("--cache-dir", default="/tmp/qwenrun-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated GGUF")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--child", choices=["qwenrun", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = (child_qwenrun if args.child == "qwenrun" else child_llamacpp)(args)
        print(json.dumps(res))
        return
    cache = Path(args.cache_dir)
    cfg = config(args.layers)
    folder = cache / f"{SHAPE}-{args.layers}l-generated"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    common = ["--runs", str(args.runs), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
              "--kv-mb", str(args.kv_mb)]
    rows = {"qwenrun int4": run_child("--child", "qwenrun", "--folder", str(folder), *common)}
    if not args.skip_llamacpp:
        from gguf_build import q4_0_from_checkpoint

        shape, layers = CASES["qwen3-30b-a3b-8l"]
        template = q4_0_from_checkpoint(build_moe_checkpoint(shape, layers, cache), cache / f"{shape}-{layers}l-q4_0.gguf")
        gguf = cache / f"{SHAPE}-{args.layers}l-generated-q4_0.gguf"
        written = write_gguf(template, gguf, cfg) if not gguf.is_file() else 0.0
        print(f"GGUF written from the generator in {written:.0f} s: {gguf.stat().st_size / GB:.2f} GB")
        try:
            rows["llama.cpp Q4_0"] = run_child("--child", "llamacpp", "--folder", str(gguf), *common)
        finally:
            if not args.keep:
                gguf.unlink()
    print(f"\n{SHAPE}, {args.layers} layers, batch 1, {args.prompt_len}-token prompt, {args.new_tokens} greedy tokens, "
          f"median (min / max) of {args.runs}\n")
    print("| engine | model bytes | load s | peak RSS | then anon + file | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        d, p = r["decode"], r["prefill"]
        print(f"| {name} | {r['model'] / GB:.2f} GB | {r['load_s']:.0f} | {r['peak'] / GB:.2f} GB | "
              f"{r['anon'] / GB:.2f} + {r['file'] / GB:.2f} GB | "
              f"{statistics.median(p):.1f} | {statistics.median(d):.1f} ({min(d):.1f} / {max(d):.1f}) |")
    q = rows["qwenrun int4"]
    print(f"\nqwenrun: weights generated in {q['generate_s']:.0f} s of its {q['load_s']:.0f} s load; "
          f"peak after load {q['peak_load'] / GB:.2f} GB")
    if "llama.cpp Q4_0" in rows:
        ratio = statistics.median(q["decode"]) / statistics.median(rows["llama.cpp Q4_0"]["decode"])
        print(f"decode qwenrun / llama.cpp: {ratio:.2f}x")


if __name__ == "__main__":
    main()
