"""Tensor and expert parallelism on CPU with 2 processes (gloo): the same logits and greedy tokens as
one process (fp32, tiny random checkpoints perturbed in every parameter), each rank holding about half
the weights, and the ranks' failure modes (a dead worker fails requests with a clear error; workers
die with the driver)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.layers.parallel import TensorParallel
from qwenrun.loading.loader import load_model, open_checkpoint
from qwenrun.quant import Quantization
from tiny import make_checkpoint

LOGITS_TOL = 1e-5  # of the largest TP=1 logit
KV = 8 << 20

# (checkpoint, expert parallel, config overrides): dense GQA with an untied head, one KV head (each
# rank keeps a copy), 8 q / 2 kv heads with biases (o_proj's added once), MoE with experts split and
# spread, the Qwen3-Next and Qwen3.5 hybrids (Gated DeltaNet + gated attention); Qwen3-Next's prompts
# are prefilled in chunks of 16 tokens (state checkpoints at every chunk, copied on the prefix hit)
CASES = [("dense-untied-gqa2", False, {}), ("dense-untied-gqa2", False, {"num_key_value_heads": 1}),
         ("dense-gqa4-yarn", False, {}), ("moe-norm-topk", False, {}), ("moe-raw-topk-sparse2-mlponly", True, {}),
         ("next-interval4-moe", True, {}), ("qwen3_5-interval4", False, {})]
CHUNKED = {"next-interval4-moe": 16}


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 29, 11)]


def _close(llm: LLM) -> None:
    llm.model.executor.close()


@pytest.mark.parametrize("name,ep,extra", CASES,
                         ids=[f"{n}{'-ep' if ep else ''}{'-kv1' if x else ''}" for n, ep, x in CASES])
def test_tp2_logits_and_greedy_tokens_equal_tp1(name, ep, extra, tmp_path):
    folder, ref = make_checkpoint(name, tmp_path / name, **extra)
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=KV, max_num_batched_tokens=CHUNKED.get(name, 512))
    one = LLM(folder, **kw)
    two = LLM(folder, **kw, tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        prompts = _prompts(ref.config.vocab_size)
        for prompt in prompts:
            a, b = one.logits(prompt), two.logits(prompt)
            assert (a - b).abs().max().item() <= LOGITS_TOL * a.abs().max().item(), name
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]  # batched: prefill and decode mixed
        assert [o.outputs[0].token_ids for o in two.generate(prompts, params)] == want
        # a repeated prompt starts from cached blocks (and, for the hybrid, a state checkpoint the
        # driver copied: the workers replay it)
        again = [o.outputs[0].token_ids for o in two.generate(prompts[1:2], params)]
        assert again == want[1:2]
    finally:
        _close(two)


def test_one_process_runs_no_collective(tmp_path, monkeypatch):
    """tensor_parallel_size=1 is the single-process model: plain embedding, no collective called."""
    def refuse(self, x):
        raise AssertionError("a collective ran in a single process")

    monkeypatch.setattr(TensorParallel, "all_reduce", refuse)
    monkeypatch.setattr(TensorParallel, "all_gather", refuse)
    folder, _ = make_checkpoint("next-interval4-moe", tmp_path / "ckpt")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=KV)
    assert type(llm.model.model.embed_tokens) is torch.nn.Embedding
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))


def test_info_per_rank(tmp_path):
    from qwenrun.cli.info import describe

    folder, _ = make_checkpoint("moe-norm-topk", tmp_path / "ckpt")
    whole = describe(str(folder), None)
    rank = describe(str(folder), None, 2)["per_rank"]
    assert 0.5 <= rank["num_parameters"] / whole["num_parameters"] <= 0.56
    assert rank["kv_cache_bytes_per_token"]["bfloat16"] * 2 == whole["kv_cache_bytes_per_token"]["bfloat16"]
    assert "not divisible" in describe(str(folder), None, 3)["per_rank"]


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("name,ep,quant", [("dense-untied-gqa2", False, None), ("moe-norm-topk", True, None),
                                           ("next-interval4-moe", False, None), ("dense-untied-gqa2", False, "int8")])
def test_each_rank_holds_half_the_weights(name, ep, quant, tmp_path):
    """Parameter bytes of each rank's shard, as loaded (collectives are not needed to load)."""
    folder, _ = make_checkpoint(name, tmp_path / name)
    ckpt = open_checkpoint(folder)
    q = Quantization(quant) if quant else None
    whole = _param_bytes(load_model(ckpt, torch.float32, torch.device("cpu"), quantization=q))
    for rank in range(2):
        shard = load_model(ckpt, torch.float32, torch.device("cpu"), quantization=q,
                           tp=TensorParallel(rank, 2, expert_parallel=ep))
        # replicated: the norms (and routers, int8 scales of split inputs): a few percent of a tiny model
        assert 0.5 <= _param_bytes(shard) / whole <= 0.56, (name, rank)


def test_tp2_int8_quantizes_each_shard(tmp_path):
    """int8 at load quantizes each rank's rows (row-parallel layers' scales over their half of the
    inputs): as close to the fp32 logits as one process's int8."""
    folder, ref = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    prompt = _prompts(ref.config.vocab_size)[1]
    with torch.no_grad():
        exact = ref(torch.tensor([prompt])).logits[0]
    one = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=KV, quantization="int8")
    two = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=KV, quantization="int8", tensor_parallel_size=2)
    try:
        err_one = (one.logits(prompt) - exact).abs().max().item()
        err_two = (two.logits(prompt) - exact).abs().max().item()
        assert 0 < err_two <= 2 * err_one + 1e-3 * exact.abs().max().item()
    finally:
        _close(two)


def test_qwenrun_quantized_checkpoint_is_refused_clearly(tmp_path):
    from qwenrun.cli.quantize import quantize
    from qwenrun.errors import InvalidRequestError

    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    quantize(str(folder), tmp_path / "int8", "int8")
    with pytest.raises(InvalidRequestError, match="does not load tensor-parallel"):
        load_model(open_checkpoint(tmp_path / "int8"), torch.float32, torch.device("cpu"), tp=TensorParallel(1, 2))


def test_dead_worker_fails_requests_with_a_clear_error(tmp_path):
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=KV, tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 4
        assert llm.model.healthy
        [worker] = llm.model.executor.procs
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        assert not llm.model.healthy  # what /health reports (503)
        start = time.time()
        outs = [o.outputs[0] for o in llm.generate([[1, 2, 3], [4, 5]], params)]
        assert time.time() - start < 10  # failed, not waited on
        assert all(o.finish_reason == "error" and "tensor-parallel rank 1 exited" in o.error for o in outs)
        assert not llm.engine.has_unfinished_requests() and llm.engine.pool.num_free == llm.engine.pool.num_blocks
    finally:
        _close(llm)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan waits for a reaper that a container may not run)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_rank0_failing_mid_step_stops_the_ranks(tmp_path):
    """Rank 0 raises after the layers' collectives, before the LM head's gather the worker waits in:
    the request fails, and later ones too (the ranks cannot be paired again), without waiting."""
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=KV, tensor_parallel_size=2)
    try:
        norm = llm.model.model_shard.model.norm

        def boom(*args):
            raise RuntimeError("boom")

        norm.forward = boom
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        start = time.time()
        [out] = [o.outputs[0] for o in llm.generate([[1, 2, 3]], params)]
        assert out.finish_reason == "error" and "out of step" in out.error
        del norm.forward
        [out] = [o.outputs[0] for o in llm.generate([[1, 2, 3]], params)]
        assert out.finish_reason == "error" and "tensor-parallel" in out.error
        assert time.time() - start < 20
        assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    finally:
        _close(llm)


_DRIVER = """
import sys, time
from qwenrun import LLM
if __name__ == "__main__":  # the spawned ranks import this module
    llm = LLM(sys.argv[1], dtype="float32", device="cpu", kv_cache_memory=8 << 20, tensor_parallel_size=2)
    print(llm.model.executor.procs[0].pid, flush=True)
    time.sleep(60)
"""


def test_workers_die_with_the_driver(tmp_path):
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        pid = int(proc.stdout.readline())
        assert _running(pid)
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline:
            if not _running(pid):
                return
            time.sleep(0.1)
        pytest.fail(f"worker {pid} outlived its driver")
    finally:
        proc.kill()
