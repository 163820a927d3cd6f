"""Weight-only quantization: reconstruction error, kernels and whole models vs their dequantized weights,
and perplexity and greedy agreement on the trained bundled model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qwenrun import LLM, SamplingParams, kernels
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.linear import MergedLinear
from qwenrun.quant.linear import (
    QuantizedExperts, QuantizedLinear, dequantize_int4, interleave, pack_int4, quantize_int4,
    quantize_int8, quantized_matmul, unpack_int4,
)
from tiny import make_checkpoint

torch.manual_seed(0)


def test_int8_reconstruction_within_half_a_step():
    w = torch.randn(48, 96)
    q, scale = quantize_int8(w)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [40, 64])
def test_int8_torch_path_takes_any_input_width(k, dtype):
    """The torch reference path (no C++ kernels) for K not a multiple of 16, where torch's
    `_weight_int8pack_mm` crashed: the expanded weight's product, for decode-sized batches."""
    q, scale = quantize_int8(torch.randn(24, k))
    for m in (1, 3, 8):
        x = torch.randn(m, k).to(dtype)
        y = quantized_matmul.reference(x, "int8", [q, scale], 0, None)
        ref = x.float() @ (q.float() * scale[:, None]).T
        assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())

@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_reconstruction_within_half_a_step(group):
    w = torch.randn(32, 256)
    q, scale, mins = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scale, mins, group) - w).abs().reshape(32, 256 // group, group)
    assert (err <= scale[..., None] / 2 + 1e-5).all()


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (8, 384), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (8, 192)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, :64] & 0xF, q[0, :64]) and torch.equal(packed[0, :64] >> 4, q[0, 64:128])


@pytest.fixture(scope="module", params=["dense-untied-gqa2", "moe-norm-topk"])
def models(request, tmp_path_factory):
    """(folder, logits of a fixed prompt for the bf16 model and the fp32 model, that prompt)."""
    # int4 needs output sizes that are multiples of 16 and inputs that are multiples of the group
    folder, _ = make_checkpoint(request.param, tmp_path_factory.mktemp("q"), hidden_size=128, intermediate_size=256,
                                head_dim=32)
    ids = torch.randint(0, 512, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    bf16 = LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20).logits(ids)
    fp32 = LLM(folder, dtype="float32", kv_cache_memory=8 << 20).logits(ids)
    return folder, bf16, fp32, ids


def _python_dequantized(fmt: str, parts: list[torch.Tensor], group_size: int) -> torch.Tensor:
    if fmt.endswith("_x16"):  # the kernels' interleaved layout (`interleave_quantized`)
        fmt, parts = fmt.removesuffix("_x16"), interleave(fmt, parts, inverse=True)
    if fmt == "int8":
        q, scale = parts
        return q.float() * scale[:, None]
    packed, scale, mins = parts
    return dequantize_int4(unpack_int4(packed), scale, mins, group_size)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _agreement(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("method, group", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_quantized_model_computes_its_dequantized_weights(models, method, group):
    """The quantized bf16 model against the fp32 model whose weights are the quantized ones, expanded in
    Python: no further from it than plain bf16 is from fp32 (the kernels also round activations).
    int8, and int4 in groups of 128, take the interleaved layouts where the kernels have them.
    How much quantization itself costs is measured on the trained model below; on random weights it is
    only noise (they give the quantizer no structure to exploit)."""
    folder, bf16, fp32, ids = models
    qllm = LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20, quantization=method, quant_group_size=group or 32)
    assert not [n for n, m in qllm.model.named_modules() if isinstance(m, (nn.Linear, MergedLinear))]
    formats = {m.format for m in qllm.model.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    # int8, and int4 in groups of 128, take the interleaved layout where the kernels have it
    interleaved = method == "int8" or group == 128
    assert (f"{method}_x16" in formats) == (interleaved and getattr(kernels.cpu_ops(), "interleaved_layouts", False))
    ref = LLM(folder, dtype="float32", kv_cache_memory=8 << 20)
    plain = dict(ref.model.named_modules())
    for name, module in qllm.model.named_modules():
        if isinstance(module, QuantizedLinear):
            plain[name].weight.data.copy_(_python_dequantized(module.format, module.parts, module.group_size))
        elif isinstance(module, QuantizedExperts):
            for which in ("w13", "w2"):
                parts = module.parts(which)
                stacked = [_python_dequantized(module.format, [p[e] for p in parts], module.group_size)
                           for e in range(module.num_experts)]
                getattr(plain[name], which).data.copy_(torch.stack(stacked))
    got, want = qllm.logits(ids), ref.logits(ids)
    assert _rel_err(got, want) <= 1.5 * _rel_err(bf16, fp32) + 0.01
    assert _agreement(got, want) >= _agreement(bf16, fp32) - 0.1
    # and it ran the quantized weights, not the originals (for int8 the first bound alone cannot tell)
    assert _rel_err(got, bf16) > _rel_err(want, fp32) / 2
    out = qllm.generate([ids[:10]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 16


def test_bad_quantization_names_the_choices(models):
    folder = models[0]
    with pytest.raises(InvalidRequestError, match="int8, int4"):
        LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20, quantization="int3")


BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled demo model not present")
def test_quantized_trained_model_keeps_perplexity():
    """On a trained model (the bundled one), held-out completion perplexity moves < 1% (int8) / < 2% (int4 g128)
    and greedy next tokens agree with bf16 on >= 98% / >= 97% of positions (benchmarks/quant_accuracy.py)."""
    import math
    import random

    from qwenrun.demo.data import make_example, sample_problem
    from qwenrun.tokenizer.chat import ChatTemplate

    base = LLM(BUNDLED, dtype="bfloat16", kv_cache_memory=32 << 20)
    rng = random.Random(4321)
    template = ChatTemplate.from_tokenizer(base.tokenizer)
    texts = []
    for i in range(9):
        ex = make_example(rng, template, ["think", "no_think", "tool_call"][i % 3],
                          sample_problem(rng, ["add", "sub", "mul"][i % 3], heldout=True))
        prompt = base.tokenizer.encode(ex.prompt)
        texts.append((prompt + base.tokenizer.encode(ex.completion), len(prompt)))

    def score(llm):
        nll, n, tops = 0.0, 0, []
        for ids, plen in texts:
            logits = llm.logits(ids)[plen - 1 : -1]
            nll -= torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[plen:])[:, None]).sum().item()
            n += len(ids) - plen
            tops.append(logits.argmax(-1))
        return math.exp(nll / n), torch.cat(tops)

    ref_ppl, ref_top = score(base)
    for method, max_delta, min_agree in (("int8", 0.01, 0.98), ("int4", 0.02, 0.97)):
        ppl, top = score(LLM(BUNDLED, dtype="bfloat16", kv_cache_memory=32 << 20, quantization=method))
        assert abs(ppl / ref_ppl - 1) < max_delta, method
        assert (top == ref_top).float().mean().item() >= min_agree, method
