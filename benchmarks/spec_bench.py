"""Speculative decoding, measured: the cost of verifying drafts, and tok/s with and without prompt lookup.

python benchmarks/spec_bench.py [--sections verify,rows,bundled,editing] [--layers N] [--threads N]

Prints markdown tables:

* verify: one forward (+ LM head + argmax) of 1 + k rows of one sequence at a 512-token context,
  relative to a one-row step, k = 1..8, for the Qwen3-0.6B shape in bf16 and int4 and the
  Qwen3-30B-A3B per-layer shape (4 layers; drafted tokens may route to different experts). Random
  weights with the real shapes (`decode_bench.build_checkpoint`). The bandwidth argument: each step
  reads every weight once whatever its rows, so verifying 4 tokens should cost <= 1.3x one step.
* rows: a step of B decode rows (B sequences, one token each) relative to B = 1, the crossover that
  `speculative_config.disable_by_batch_size` defaults from: the smallest B where doubling the rows
  costs >= 1.5x (the step is compute-bound; a draft then costs about what a whole row does).
* bundled: the bundled model at batch 1 on the eval's arithmetic prompts (the reasoning restates the
  question's digits), plain against `{"method": "ngram", ...}` and its trained MTP head, greedy
  output checked identical; --runs passes each way, interleaved, the fastest of each kept.
* editing: the Qwen3-0.6B shape steered (as tests/steered.py: attention and MLP outputs zeroed, the
  untied LM head maps each token to its successor) so that greedy output rewrites a 400-token input
  with one token in 16 changed: the editing case where output repeats much of its input. Same
  weight bytes per token as the real model, so tok/s is the real shape's.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from decode_bench import SHAPES, build_checkpoint  # sibling scripts: benchmarks/ is on sys.path
from vision_bench import _median_time

from qwenrun import LLM, SamplingParams
from qwenrun.demo.evaluate import HEADLINE, TASKS, _user, problems
from qwenrun.layers.attention import AttentionMetadata
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.sampling.sampler import argmax

MODEL = Path(__file__).resolve().parent.parent / "qwenrun" / "assets" / "qwen3-tiny-thinker"
CONTEXT = 512
KS = range(1, 9)
BATCHES = (1, 2, 4, 8, 16, 32)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Stepper:
    """Forwards of the loaded model straight over its KV cache, without the scheduler: a prompt of
    CONTEXT tokens prefilled once, then steps of n new rows after it, timed (their K/V overwrite the
    same slots each run)."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.engine.runner
        self.model, self.layers, self.block_size = runner.model, runner.layers, runner.block_size
        self.device = runner.device
        self.vocab = runner.config.vocab_size
        blocks = -(-CONTEXT // self.block_size)
        self.prefix = list(range(blocks))  # the shared context's blocks
        self.spare = blocks  # blocks past it hold each step's new rows
        ids = torch.randint(0, self.vocab, (CONTEXT,), generator=torch.Generator().manual_seed(0))
        self._forward([CONTEXT], [CONTEXT], [self.prefix], ids, torch.arange(CONTEXT))

    @torch.inference_mode()
    def _forward(self, query_lens: list[int], context_lens: list[int], tables: list[list[int]],
                 ids: torch.Tensor, positions: torch.Tensor) -> None:
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size, self.device)
        rows = torch.arange(ids.shape[0], device=self.device)
        fb = ForwardBatch(ids.to(self.device), positions.to(self.device), meta, self.layers, rows, [len(rows)])
        # the greedy pick the engine's sampler makes (the C++ kernel): torch's argmax over the 152k
        # vocabulary also slowed the step's GEMVs (~7 ms of a 31 ms bf16 step on Zen 4, cause unknown),
        # a fixed cost that flattered every verify ratio
        argmax(self.model.compute_logits(self.model(fb)))

    def chunk(self, n: int) -> Callable[[], None]:
        """One sequence verifying n - 1 drafts: n rows at positions CONTEXT.. (blocks past the prefix)."""
        extra = -(-(CONTEXT + n) // self.block_size) - len(self.prefix)
        table = self.prefix + list(range(self.spare, self.spare + extra))
        ids = torch.randint(0, self.vocab, (n,), generator=torch.Generator().manual_seed(n))
        return lambda: self._forward([n], [CONTEXT + n], [table], ids, torch.arange(CONTEXT, CONTEXT + n))

    def batch(self, b: int) -> Callable[[], None]:
        """b sequences sharing the prefix, one decode row each, written to a block of its own."""
        tables = [self.prefix + [self.spare + i] for i in range(b)]
        ids = torch.randint(0, self.vocab, (b,), generator=torch.Generator().manual_seed(b))
        return lambda: self._forward([1] * b, [CONTEXT + 1] * b, tables, ids, torch.full((b,), CONTEXT))


def _load(folder: Path, quant: str | None, spare_blocks: int, dtype: str) -> LLM:
    """The checkpoint with a KV cache just big enough for the prefix and `spare_blocks` more blocks."""
    cfg = json.loads((folder / "config.json").read_text())
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # K and V, <= fp32
    tokens = CONTEXT + 16 * (spare_blocks + 2)
    return LLM(folder, dtype=dtype, device="cpu", quantization=quant, max_model_len=CONTEXT + 64,
               kv_cache_memory=tokens * per_token, max_num_seqs=spare_blocks)


def verify_section(cache_dir: Path, layers: int | None, runs: int, dtype: str) -> None:
    cases = [("qwen3-0.6b", None, layers), ("qwen3-0.6b", "int4", layers), ("qwen3-30b-a3b", None, layers or 4)]
    print(f"\n### Verify cost: 1 + k rows of one sequence at context {CONTEXT}, relative to a one-row step\n")
    print("| shape | weights | one step (ms) | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|---|---:|" + "---:|" * len(KS))
    for shape, quant, n_layers in cases:
        llm = _load(build_checkpoint(shape, n_layers, cache_dir), quant, 4, dtype)
        stepper = Stepper(llm)
        one = _median_time(stepper.chunk(1), runs)
        ratios = [_median_time(stepper.chunk(1 + k), runs) / one for k in KS]
        depth = f", {n_layers} layers" if n_layers else ""
        print(f"| {shape}{depth} | {quant or dtype} | {one * 1e3:.1f} | " +
              " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)
        del llm, stepper


def rows_section(cache_dir: Path, layers: int | None, runs: int, dtype: str) -> None:
    print(f"\n### Decode rows per step: B sequences at context {CONTEXT}, one token each, relative to B = 1\n")
    print("| shape | weights | " + " | ".join(f"B={b}" for b in BATCHES) + " | compute-bound from |")
    print("|---|---|" + "---:|" * len(BATCHES) + "---:|")
    for quant in (None, "int4"):
        llm = _load(build_checkpoint("qwen3-0.6b", layers, cache_dir), quant, max(BATCHES), dtype)
        stepper = Stepper(llm)
        costs = [_median_time(stepper.batch(b), runs) for b in BATCHES]
        bound = next((b for b, c, c2 in zip(BATCHES, costs, costs[1:]) if c2 / c >= 1.5), None)
        depth = f", {layers} layers" if layers else ""
        print(f"| qwen3-0.6b{depth} | {quant or dtype} | " + " | ".join(f"{c / costs[0]:.2f}x" for c in costs) +
              f" | {bound if bound is not None else f'> {BATCHES[-1]}'} |", flush=True)
        del llm, stepper


def _timed(llm: LLM, prompts: list, params: SamplingParams, chat: bool) -> tuple[list[list[int]], float, int]:
    """Each prompt alone (batch 1), after one warm-up: (outputs, seconds, output tokens)."""
    def one(p):
        return (llm.chat(p, params) if chat else llm.generate([p], params))[0].outputs[0].token_ids

    one(prompts[0])
    outs, seconds = [], 0.0
    for p in prompts:
        t0 = time.perf_counter()
        outs.append(one(p))
        seconds += time.perf_counter() - t0
    return outs, seconds, sum(map(len, outs))


def _compare(name: str, plain: LLM, fast: LLM, prompts: list, params: SamplingParams, chat: bool,
             runs: int = 1) -> None:
    """Plain and speculative timed in turn `runs` times, the fastest of each kept: on a shared
    machine the other processes' load then slows both sides alike, and the minimum is the run they
    disturbed least. Drafts and acceptance are the first speculative run's."""
    stats = fast.engine.scheduler.stats
    t_base = t_spec = float("inf")
    for run in range(runs):
        base, seconds, n = _timed(plain, prompts, params, chat)
        t_base = min(t_base, seconds)
        drafted0, accepted0 = stats.draft_tokens, stats.accepted_tokens
        got, seconds, _ = _timed(fast, prompts, params, chat)
        t_spec = min(t_spec, seconds)
        assert got == base, f"{name}: speculative greedy output differs from plain greedy"
        if run == 0:
            drafted, accepted = stats.draft_tokens - drafted0, stats.accepted_tokens - accepted0
    print(f"| {name} | {len(prompts)} | {n} | {n / t_base:.1f} | {n / t_spec:.1f} | {t_base / t_spec:.2f}x | "
          f"{accepted / max(drafted, 1):.0%} | {accepted / max(n, 1):.2f} |", flush=True)


def _table_header(spec: dict) -> None:
    print(f"\n### Speculative decoding at batch 1, greedy, speculative_config={spec}; outputs identical\n")
    print("| prompts | n | output tokens | plain tok/s | speculative tok/s | speed-up | drafts accepted | "
          "accepted per output token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")


def bundled_section(spec: dict, n: int, max_tokens: int, mtp_k: int, runs: int) -> None:
    rng = random.Random(0)
    arith = [_user(rng, p) for task in (HEADLINE, TASKS[1]) for p in problems(task, n // 2, seed=1)]
    items = [f"{rng.randint(100, 999)} apples" for _ in range(12)]
    edit = [[{"role": "user", "content": "Repeat this list exactly, then add one item: " + ", ".join(items)}]]
    plain = LLM(MODEL, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    # the bundled model's trained MTP head (qwenrun train-demo --mtp-steps) against prompt lookup
    for method in (spec, {"method": "mtp", "num_speculative_tokens": mtp_k}):
        fast = LLM(MODEL, dtype="float32", speculative_config=method)
        _table_header(method)
        _compare(f"{MODEL.name} fp32, eval arithmetic", plain, fast, arith, params, chat=True, runs=runs)
        _compare(f"{MODEL.name} fp32, list repeat", plain, fast, edit, params, chat=True, runs=runs)


def steered_editing_checkpoint(cache_dir: Path, layers: int | None, length: int = 400, edit_every: int = 16
                               ) -> tuple[Path, list[int]]:
    """The 0.6B shape, untied, whose greedy output after `prompt` is the prompt's text with one token
    in `edit_every` replaced: every weight zero but the norms (one), the embedding (token
    chain[i] -> dim i) and the LM head (dim i -> chain[i + 1])."""
    import transformers

    cfg_dict = dict(SHAPES["qwen3-0.6b"], tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=151645)
    if layers:
        cfg_dict["num_hidden_layers"] = layers
    rng = random.Random(0)
    chain = rng.sample(range(1000, 150000), length + length // edit_every + 2)
    edited, fresh = chain[: length + 1], chain[length + 1 :]  # the output: chain order; fresh: the originals
    original = [fresh[i // edit_every] if i % edit_every == edit_every // 2 else t for i, t in enumerate(edited)]
    sep = 999
    prompt = original[:length] + [sep]
    folder = cache_dir / f"qwen3-0.6b-steered-edit-{cfg_dict['num_hidden_layers']}l"
    if not (folder / "config.json").is_file():
        cfg = transformers.AutoConfig.for_model(
            "qwen3", **{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0 if "norm" in name else 0.0)
            for dim, (src, dst) in enumerate(zip([sep, *edited], [*edited, cfg_dict["eos_token_id"]])):
                model.model.embed_tokens.weight[src, dim] = 1.0
                model.lm_head.weight[dst, dim] = 1.0
        model.save_pretrained(folder)
    return folder, prompt


def editing_section(spec: dict, cache_dir: Path, layers: int | None, dtype: str) -> None:
    folder, prompt = steered_editing_checkpoint(cache_dir, layers)
    kw = {"dtype": dtype, "device": "cpu", "max_model_len": 1024, "max_num_seqs": 1, "kv_cache_memory": 256 << 20}
    plain, fast = LLM(folder, **kw), LLM(folder, speculative_config=spec, **kw)
    _table_header(spec)
    params = SamplingParams(temperature=0, max_tokens=len(prompt) - 1, ignore_eos=True)
    depth = f", {layers} layers" if layers else ""
    _compare(f"qwen3-0.6b{depth} {dtype}, steered edit of a {len(prompt) - 1}-token text", plain, fast,
             [{"prompt_token_ids": prompt}], params, chat=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="verify,rows,bundled,editing")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-n", type=int, default=3, help="prompt_lookup_max")
    ap.add_argument("--min-n", type=int, default=2, help="prompt_lookup_min")
    ap.add_argument("--n", type=int, default=8, help="arithmetic prompts")
    ap.add_argument("--mtp-k", type=int, default=2, help="num_speculative_tokens of the bundled model's MTP head")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, help="reduce the 0.6B shape's depth (a quick run)")
    ap.add_argument("--runs", type=int, default=7,
                    help="timed forwards per verify/rows cell (median); bundled: timed passes each way (fastest)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/qwenrun-bench"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the random-weight shapes' dtype (bf16 packing needs AVX-512 or AVX-NE-CONVERT)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.min_n,
            "prompt_lookup_max": args.max_n}
    sections = args.sections.split(",")
    print(f"{_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if "verify" in sections:
        verify_section(args.cache_dir, args.layers, args.runs, args.dtype)
    if "rows" in sections:
        rows_section(args.cache_dir, args.layers, args.runs, args.dtype)
    if "bundled" in sections:
        bundled_section(spec, args.n, args.max_tokens, args.mtp_k, args.runs)
    if "editing" in sections:
        editing_section(spec, args.cache_dir, args.layers, args.dtype)


if __name__ == "__main__":
    main()
