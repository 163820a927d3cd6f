"""xgrammar vs llguidance on Qwen3's vocabulary (151936 logits): what a constrained request pays.

python benchmarks/grammar_bench.py [--runs 5] [--threads N] [--schemas nested,enum] [--sections engines,decode]

Needs llguidance besides the project's xgrammar: pip install llguidance==1.9.1.

For each engine: the tokenizer conversion (once per tokenizer), then per test schema
(tests/structured_cases.py, the ones the structured-output tests decode under): compile time,
first mask (matcher creation + the first fill, what a request's first step waits for), and the
per-step mask cost at batch 1 and 16: every row's fill, and apart, the bitmask applied to [B, V]
fp32 logits by the engine's own kernel (xgrammar's C++ one; llguidance's is torch.compile'd). Each figure is a median over `--runs` repetitions; per-step figures are medians (and
the 99th percentile) over every step of a valid output replayed token by token. The outputs
are sampled once from random logits under the grammar (compact JSON, which both engines' default
any-whitespace grammars accept), 16 different ones for batch 16.

The decode section is what issue 15's goal is stated in: the Qwen3-0.6B shape (random bf16 weights,
benchmarks/decode_bench.py) decoding B = 1 and 16 sequences through the engine, plain against
every row under a JSON Schema (an array of short strings that cannot end within the steps timed,
so the batch stays full), median ms per decode step. The constrained step includes everything a
request pays: the fill on the runner's worker thread while the forward runs, the wait for it, the
sampler's own bitmask kernel and the matcher's advance.
Prints markdown tables; measure on an idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' schemas

from hybrid_bench import tokenizer_dir  # sibling scripts: benchmarks/ is on sys.path
from spec_bench import _cpu
from structured_cases import SCHEMAS

from qwenrun.sampling import SamplingBatch, SamplingParams, make_generator, mask_vocab, sample
from qwenrun.sampling.sampler import apply_token_bitmask
from qwenrun.structured import StructuredOutputsParams, backend_for
from qwenrun.tokenizer.tokenizer import Tokenizer

V = 151936
STOP = [151645, 151643]
BATCH = 16


def outputs(tok: Tokenizer, schema: dict, count: int) -> list[list[int]]:
    """`count` valid outputs (stop token included) sampled from random logits under `schema`."""
    backend = backend_for(tok, V, STOP)
    compiled = backend.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    bitmask = backend.allocate_bitmask(1)
    found = []
    for seed in range(count):
        matcher, out, rng = backend.matcher(compiled), [], torch.Generator().manual_seed(seed)
        params = SamplingParams(seed=seed)
        generator = make_generator(seed, "cpu")
        while not matcher.is_terminated:
            matcher.fill_bitmask(bitmask, 0)
            logits = mask_vocab(torch.randn(1, V, generator=rng) * 3, tok.vocab_size)
            token = int(sample(logits, SamplingBatch.build([params], [out], [[]], [generator], V, "cpu",
                                                          bitmask=bitmask, bitmask_rows=[0]))[0])
            matcher.accept(token)
            out.append(token)
        found.append(out)
    return found


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, threads: int) -> None:
        import xgrammar as xgr

        from qwenrun.structured.params import lengths_as_patterns
        from qwenrun.structured.xgrammar_backend import _tokenizer_info

        self.xgr = xgr
        self.rewrite = lengths_as_patterns
        start = time.perf_counter()
        info = _tokenizer_info(tok, V, STOP)
        self.setup_ms = 1e3 * (time.perf_counter() - start)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def compile(self, schema: dict):
        # as the backend serves it (length bounds rewritten, see lengths_as_patterns)
        return self.compiler.compile_json_schema(json.dumps(self.rewrite(schema)))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch
        from transformers import AutoTokenizer

        self.ll = llguidance
        hf = AutoTokenizer.from_pretrained(tokenizer_dir())
        start = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=V)
        self.setup_ms = 1e3 * (time.perf_counter() - start)

    def compile(self, schema: dict):
        # lazy: the work happens in LLMatcher(), which the first-mask figure includes
        return self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))

    def matcher(self, grammar):
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        self.ll.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> None:
        if not matcher.is_stopped():  # it stops by itself once nothing can follow, before EOS
            assert matcher.consume_token(token), matcher.get_error()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.ll.torch.apply_token_bitmask_inplace(logits, bitmask)


def step_times(engine, grammar, sequences: list[list[int]]) -> tuple[list[float], list[float], list[float]]:
    """ms per decode step: every row's fill, and the mask applied to the batch's logits by the
    engine's kernel and by qwenrun's sampler (`apply_token_bitmask`, what the engine runs; the
    kernels differ as much as the matchers, and each takes either engine's bitmask)."""
    matchers = [engine.matcher(grammar) for _ in sequences]
    bitmask = torch.zeros(len(sequences), (V + 31) // 32, dtype=torch.int32)
    logits = torch.zeros(len(sequences), V)
    rows = list(range(len(sequences)))
    fills, applies, ours = [], [], []
    for step in range(min(map(len, sequences))):
        start = time.perf_counter()
        for row, m in enumerate(matchers):
            engine.fill(m, bitmask, row)
        filled = time.perf_counter()
        engine.apply(logits, bitmask)
        applied = time.perf_counter()
        apply_token_bitmask(logits, bitmask, rows)
        fills.append(1e3 * (filled - start))
        applies.append(1e3 * (applied - filled))
        ours.append(1e3 * (time.perf_counter() - applied))
        for m, seq in zip(matchers, sequences):
            engine.accept(m, seq[step])
    return fills, applies, ours


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def bench(engine, runs: int, cases: dict[str, list[list[int]]]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, sequences in cases.items():
        schema = SCHEMAS[name]
        compile_ms, first_ms = [], []
        steps: dict[str, list[list[float]]] = {}
        bitmask = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)
        for _ in range(runs):
            start = time.perf_counter()
            grammar = engine.compile(schema)
            compile_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            engine.fill(engine.matcher(grammar), bitmask, 0)
            first_ms.append(1e3 * (time.perf_counter() - start))
            for batch, rows_ in (("b1", sequences[:1]), ("b16", sequences)):
                fills, applies, ours = step_times(engine, grammar, rows_)
                steps.setdefault(f"{batch}_fill", []).append(fills)
                steps.setdefault(f"{batch}_apply", []).append(applies)
                steps.setdefault(f"{batch}_ours", []).append(ours)
        rows[name] = {"compile": statistics.median(compile_ms), "first": statistics.median(first_ms)}
        for key, runs_ in steps.items():
            rows[name][key] = statistics.median(statistics.median(t) for t in runs_)
            rows[name][key + "_p99"] = statistics.median(p99(t) for t in runs_)
    return rows


STEP_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 500}


def decode_section(runs: int, steps: int, cache_dir: Path) -> None:
    import shutil

    from decode_bench import build_checkpoint

    from qwenrun import LLM

    folder = build_checkpoint("qwen3-0.6b", None, cache_dir)
    for f in tokenizer_dir().iterdir():
        if f.is_file() and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    llm = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=512, kv_cache_memory=1 << 30,
              max_num_seqs=16)
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    print("### Decode step of the Qwen3-0.6B shape (bf16), plain vs every row constrained\n")
    print("| batch | plain ms/step | constrained ms/step | mask cost | of a step |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 16):
        per_run: dict[str, list[float]] = {"plain": [], "json": []}
        for _, (label, constraint) in itertools.product(range(runs), (
                ("plain", None), ("json", StructuredOutputsParams(json=STEP_SCHEMA)))):  # interleaved
            params = SamplingParams(temperature=1.0, seed=1, max_tokens=steps + 8, ignore_eos=True,
                                    structured_outputs=constraint)
            reqs = [engine.add_request(torch.randint(0, 150000, (32,), generator=gen).tolist(), params)
                    for _ in range(batch)]
            while any(not r.output_token_ids for r in reqs):  # prefill (and the first token)
                engine.step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            assert not any(r.finished for r in reqs), "a request ended inside the timed steps"
            for r in reqs:
                engine.abort(r.request_id)
            while engine.has_unfinished_requests():
                engine.step()
            per_run[label].append(statistics.median(times))
        medians = {label: 1e3 * statistics.median(t) for label, t in per_run.items()}
        cost = medians["json"] - medians["plain"]
        print(f"| {batch} | {medians['plain']:.1f} | {medians['json']:.1f} | {cost:+.2f} ms | "
              f"{100 * cost / medians['plain']:+.1f}% |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--schemas", default=",".join(SCHEMAS), help="comma-separated subset")
    parser.add_argument("--sections", default="engines,decode")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/qwenrun-bench"))
    args = parser.parse_args()
    sections = args.sections.split(",")
    torch.set_num_threads(args.threads)
    folder = tokenizer_dir()
    if folder is None:
        sys.exit("the real Qwen3 tokenizer is needed: set QWENRUN_TOKENIZER_DIR")
    tok = Tokenizer.from_dir(folder)
    print(f"{_cpu()}, {args.threads} threads, vocab {V}, "
          f"median of {args.runs} runs; steps = tokens of the replayed outputs\n")
    if "decode" in sections:
        decode_section(args.runs, args.steps, args.cache_dir)
    if "engines" not in sections:
        return
    cases = {name: outputs(tok, SCHEMAS[name], BATCH) for name in args.schemas.split(",")}
    for engine_cls in (XGrammar, LLGuidance):
        engine = engine_cls(tok, args.threads)
        print(f"### {engine.name}: tokenizer conversion {engine.setup_ms:.0f} ms\n")
        print("| schema | steps | compile ms | first mask ms | fill ms b1 (p99) | apply ms b1: its / qwenrun's | "
              "fill ms b16 (p99) | apply ms b16: its / qwenrun's |")
        print("|---|---|---|---|---|---|---|---|")
        for name, row in bench(engine, args.runs, cases).items():
            print(f"| {name} | {min(map(len, cases[name]))} | {row['compile']:.1f} | {row['first']:.2f} | "
                  f"{row['b1_fill']:.3f} ({row['b1_fill_p99']:.3f}) | {row['b1_apply']:.3f} / {row['b1_ours']:.3f} | "
                  f"{row['b16_fill']:.3f} ({row['b16_fill_p99']:.3f}) | "
                  f"{row['b16_apply']:.3f} / {row['b16_ours']:.3f} |")
        print()


if __name__ == "__main__":
    main()
