"""Fast paths against their reference ops (rung b): the C++ decode kernels (GEMV over bf16/int8/int4
weights, decode attention, RMSNorm, q/k norm + RoPE, argmax), oneDNN-packed linears, paged attention,
and the dispatch table (`kernels.KERNELS`) that picks a kernel or the torch reference per call."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from qwenrun import kernels
from qwenrun.layers import linear as linear_mod
from qwenrun.layers.attention import AttentionMetadata, DecodeGroup, paged_attention
from qwenrun.layers.moe import Qwen3MoeExperts
from qwenrun.layers.packed import PackedLinear, StreamingExperts
from qwenrun.layers.rotary import apply_rotary
from qwenrun.quant import linear as quant_linear
from qwenrun.quant.linear import dequantize_int4, pack_int4, quantize_int4, quantize_int8, unpack_int4

ops = kernels.cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="C++ kernels need x86 AVX2 or AVX512-BF16/VNNI and a compiler")
gen = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="oneDNN's bf16 reorder needs AVX512-BF16 or AVX-NE-CONVERT (pack_linears streams instead)")
@pytest.mark.parametrize("m", [1, 7, 64])
def test_packed_linear_equals_f_linear(m):
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    x = torch.randn(m, 64, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(w, None)(x), F.linear(x, w))
    torch.testing.assert_close(PackedLinear(w, b)(x), F.linear(x, w, b))


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 5, 8])
@pytest.mark.parametrize("n, k", [(96, 64), (7, 80), (130, 1056)])
def test_bf16_gemv_matches_fp32_matmul(m, n, k):
    """Products of bf16 values are exact in fp32, so the only error is the output's own bf16 rounding."""
    w, x, b = randn(n, k, dtype=torch.bfloat16), randn(m, k, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    ref = x.float() @ w.float().T + b.float()
    got = ops.gemv_bf16(x, w, b, "none")
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()


@needs_kernels
@pytest.mark.parametrize("m", [1, 4])
def test_fused_silu_mul_epilogue(m):
    w, x = randn(2 * 48, 64, dtype=torch.bfloat16), randn(m, 64, dtype=torch.bfloat16)
    gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    got = ops.gemv_bf16(x, w, None, "silu_mul")
    assert got.shape == (m, 48)
    assert ((got.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [96, 256])
def test_int8_gemv_matches_dequantized_matmul(dtype, k):
    """Activations are quantized per 32 inputs (as llama.cpp's Q8_0): ~0.5% relative error, no more."""
    q, scale = quantize_int8(randn(40, k))
    x = randn(3, k, dtype=dtype)
    ref = x.float() @ (q.float() * scale[:, None]).T
    got = ops.gemv_int8(x, q, scale, None, "none")
    assert got.dtype == dtype
    assert rel_err(got, ref) < 0.01
    fused = ops.gemv_int8(x, q, scale, None, "silu_mul")
    assert rel_err(fused, F.silu(ref[:, :20]) * ref[:, 20:]) < 0.02


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 6])
def test_int4_gemv_matches_dequantized_matmul(group, m):
    q, scale, mins = quantize_int4(randn(24, 512), group)
    packed = pack_int4(q)
    x = randn(m, 512, dtype=torch.bfloat16)
    ref = x.float() @ dequantize_int4(q, scale, mins, group).T
    got = ops.gemv_int4(x, packed, scale, mins, group, None, "none")
    assert rel_err(got, ref) < 0.015


def _quantized_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, K] as the integer kernels see it: per `block` inputs, round(x * 127/amax) * amax/127 (fp64)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    # a true division, as the kernels' (a Python number over a tensor multiplies by its reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).double() * (amax / 127.0).double()).reshape(M, K)


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 32])
@pytest.mark.parametrize("k", [32, 96, 1056])
def test_int8_gemv_exact_given_its_quantized_activations(m, k):
    """The integer dot products are exact: against the same activation rounding in fp64 the only error is
    fp32 accumulation. Weights and activations at full scale with matching signs are the worst case for
    AVX2's s16 pair sums (127 * 127 * 2), which must not saturate."""
    w = randn(40, k)
    w[:8] = torch.where(randn(8, k) > 0, 1.0, -1.0)
    q, scale = quantize_int8(w)
    x = randn(m, k, dtype=torch.bfloat16)
    x[0] = torch.where(q[0] > 0, 1.0, -1.0)  # every |x| quantizes to 127, signs as row 0's
    ref = _quantized_activations(x, 32) @ (q.double() * scale.double()[:, None]).T
    got = ops.gemv_int8(x, q, scale, None, "none" if m > 4 else "silu_mul")
    if m <= 4:
        ref = F.silu(ref[:, :20]) * ref[:, 20:]
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all()


@needs_kernels
@pytest.mark.parametrize("group, k", [(32, 128), (64, 384), (128, 256), (256, 512), (384, 768)])
@pytest.mark.parametrize("m", [1, 3, 4, 6, 48])
def test_int4_gemv_exact_given_its_quantized_activations(group, k, m):
    """As int8, for every group size (activations share a scale per 128 inputs when groups are that
    long), with all-15 codes against full-scale activations (the largest s16 sums) in row 0."""
    w = randn(24, k)
    w[0] = torch.where(torch.arange(k) % group == 0, -1.0, 1.0)  # per group: one minimum, the rest code 15
    q, scale, mins = quantize_int4(w, group)
    x = randn(m, k)
    x[0] = 1.0
    ref = _quantized_activations(x, 128 if group >= 128 else 32) @ dequantize_int4(q, scale, mins, group).double().T
    got = ops.gemv_int4(x, pack_int4(q), scale, mins, group, None, "none")
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()


@needs_kernels
@pytest.mark.parametrize("k", [1, 7, 15, 17, 33, 1000])
@pytest.mark.parametrize("m", sorted({1, 2, 3, 4, 5, 8, 9, kernels.GEMV_MAX_ROWS["bf16"]}))
def test_bf16_gemv_any_k_and_row_count(m, k):
    """K with a tail past the last whole vector (AVX2 takes 16 inputs a step, AVX-512 32), row counts
    around the blocks of 4 up to the most that stream, plain and fused."""
    w, x = randn(2 * 12, k, dtype=torch.bfloat16), randn(m, k, dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    got = ops.gemv_bf16(x, w, None, "none")
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    gate, up = ref.chunk(2, dim=-1)
    fused = ops.gemv_bf16(x, w, None, "silu_mul")
    assert ((fused.double() - F.silu(gate) * up).abs() <= (F.silu(gate) * up).abs() * 2**-7 + 1e-4).all()


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("m", [*range(1, 11), 16, 17])
def test_gemv_tiles_cover_every_column_and_row(fmt, m):
    """The kernels take tiles of up to 4 weight rows by up to 8 activation rows: column counts that
    leave a partial tile (13 plain, 7 gated), and row counts that leave a partial pass, with a bias,
    against the exact product of what the kernel multiplies (the quantized activations for int8/int4)."""
    k = 256
    w, x, bias = randn(14, k), randn(m, k, dtype=torch.bfloat16), randn(14)
    if fmt == "bf16":
        wq = w.bfloat16()
        xs, wd = x.double(), wq.double()
        run = lambda wt, act, b: ops.gemv_bf16(x, wt, b, act)  # noqa: E731
        parts = (wq,)
    elif fmt == "int8":
        q, scale = quantize_int8(w)
        xs, wd = _quantized_activations(x, 32), q.double() * scale.double()[:, None]
        run = lambda wt, act, b: ops.gemv_int8(x, wt, scale[: wt.shape[0]], b, act)  # noqa: E731
        parts = (q,)
    else:
        q, scale, mins = quantize_int4(w, 128)
        xs, wd = _quantized_activations(x, 128), dequantize_int4(q, scale, mins, 128).double()
        packed = pack_int4(q)
        run = lambda wt, act, b: ops.gemv_int4(x, wt, scale[: wt.shape[0]], mins[: wt.shape[0]], 128, b, act)  # noqa: E731
        parts = (packed,)
    full = xs @ wd.T + bias.bfloat16().double()
    plain = run(parts[0][:13], "none", bias[:13].bfloat16())
    ref = full[:, :13]
    assert plain.shape == (m, 13)
    assert ((plain.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max()).all()
    gate, up = full.chunk(2, dim=-1)
    fused = run(parts[0], "silu_mul", bias.bfloat16())
    ref = F.silu(gate) * up
    assert fused.shape == (m, 7)
    assert ((fused.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-4 * ref.abs().max()).all()


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 4096])
def test_wide_linear_is_the_fp32_product_rounded_once(monkeypatch, chunk_bytes):
    """The prefill GEMM of CPUs without bf16 instructions, whole and in slices of output rows (4096
    bytes: 10 rows of 96 fp32 inputs, so the last slice is short), with and without a bias."""
    monkeypatch.setattr(linear_mod, "WIDE_CHUNK_BYTES", chunk_bytes)
    x, w, b = randn(3, 5, 96, dtype=torch.bfloat16), randn(205, 96, dtype=torch.bfloat16), randn(205, dtype=torch.bfloat16)
    for bias in (None, b):
        got = linear_mod.wide_linear(x, lambda n0, n1: w[n0:n1].float(), 205, bias)
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float()).bfloat16()
        assert got.shape == (3, 5, 205) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_prefill_widened_matches_the_expanded_weight(monkeypatch, fmt):
    """Past the streaming bound a quantized linear expands its weight in row slices to fp32 where
    bf16 GEMMs are slow: the product of the whole expanded weight, rounded once."""
    monkeypatch.setattr(quant_linear, "cpu_gemm_widens_bf16", lambda: True)
    monkeypatch.setattr(linear_mod, "WIDE_CHUNK_BYTES", 40 * 256 * 4)
    w = randn(100, 256)
    parts = quantize_int8(w) if fmt == "int8" else (lambda q, s, m: (pack_int4(q), s, m))(*quantize_int4(w, 64))
    x = randn(200, 256, dtype=torch.bfloat16)
    got = quant_linear.quantized_matmul(x, fmt, parts, 64, None)
    want = F.linear(x.float(), quant_linear.expand(fmt, parts, 64, torch.float32)).bfloat16()
    torch.testing.assert_close(got, want)


@needs_kernels
def test_dequantize_kernels_match_python():
    for k in (96, 13):  # 13: a tail past the last whole vector
        q8, s8 = quantize_int8(randn(17, k))
        torch.testing.assert_close(ops.dequantize_int8(q8, s8, torch.float32, False), q8.float() * s8[:, None])
        assert torch.equal(ops.dequantize_int8(q8, s8, torch.bfloat16, False), (q8.float() * s8[:, None]).bfloat16())
    q4, s4, m4 = quantize_int4(randn(9, 256), 64)
    packed = pack_int4(q4)
    assert torch.equal(unpack_int4(packed), q4)
    ref = dequantize_int4(q4, s4, m4, 64)
    torch.testing.assert_close(ops.dequantize_int4(packed, s4, m4, 64, torch.float32, False), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.dequantize_int4(packed, s4, m4, 64, torch.bfloat16, False), ref.bfloat16(),
                               rtol=0, atol=0)


@needs_kernels
def test_kernels_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="activations must be"):
        ops.gemv_bf16(randn(1, 63, dtype=torch.bfloat16), randn(8, 64, dtype=torch.bfloat16), None, "none")
    with pytest.raises(RuntimeError, match="unknown epilogue"):
        ops.gemv_bf16(randn(1, 64, dtype=torch.bfloat16), randn(8, 64, dtype=torch.bfloat16), None, "gelu")
    with pytest.raises(RuntimeError, match="divisible by 128"):
        ops.gemv_int4(randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8), randn(8, 1), randn(8, 1), 64, None, "none")
    if ops.interleaved_layouts:  # slabs of 16 rows, in pairs: 48 rows is not whole pairs
        with pytest.raises(RuntimeError, match="N divisible by 32"):
            ops.gemv_int4(randn(1, 128), torch.zeros(48, 64, dtype=torch.uint8), randn(48, 1), randn(48, 1), 128,
                          None, "none", True)


needs_x16 = pytest.mark.skipif(ops is None or not ops.interleaved_layouts,
                               reason="the interleaved (_x16) layouts' kernels are AVX-512 (VNNI) only")


def _int4_x16(w: torch.Tensor, group: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """w's int4 parts in the plain layout and interleaved."""
    q, scale, mins = quantize_int4(w, group)
    plain = (pack_int4(q), scale, mins)
    return plain, quant_linear.interleave_int4(*plain)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_interleave_int4_is_a_reordering_and_its_inverse_undoes_it(lead):
    """Every byte, scale and minimum kept, moved (not copied in place), and back exactly: plain and
    interleaved parts expand to the same weight, a matrix or a stack of experts."""
    w = randn(*lead, 64, 256)
    flat = w.reshape(-1, 256)
    q, scale, mins = quantize_int4(flat, 128)
    plain = tuple(t.reshape(*lead, 64, -1) for t in (pack_int4(q), scale, mins))
    mixed = quant_linear.interleave_int4(*plain)
    for a, b in zip(plain, mixed):
        assert a.shape == b.shape and a.dtype == b.dtype and not torch.equal(a, b)
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
    for a, b in zip(plain, quant_linear.interleave_int4(*mixed, inverse=True)):
        assert torch.equal(a, b)
    # slab 1, block 1, vector c = 2, row 3, byte 1 is plain row 16 + 3's byte 64 + 4 * 2 + 1
    assert mixed[0].reshape(-1)[(1 * 2 + 1) * 1024 + 2 * 64 + 3 * 4 + 1] == plain[0].reshape(-1, 128)[19, 73]
    one = [p.reshape(-1, 64, p.shape[-1])[0] for p in mixed]
    assert torch.equal(quant_linear.expand.reference("int4_x16", one, 128, torch.float32),
                       dequantize_int4(q[:64], scale[:64], mins[:64], 128))


@needs_x16
@pytest.mark.parametrize("group, k", [(128, 256), (256, 512), (128, 1024)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 48])
def test_int4_x16_gemv_exact_given_its_quantized_activations(group, k, m):
    """The slab kernel against the exact product of what it multiplies, as the plain int4 kernel is
    tested: all-15 codes against full-scale activations in row 0, a partial pass of 8 activation rows,
    plain with a bias and fused SiLU·up (whose halves are two slabs apart)."""
    w = randn(64, k)
    w[0] = torch.where(torch.arange(k) % group == 0, -1.0, 1.0)
    (packed, scale, mins), mixed = _int4_x16(w, group)
    x, bias = randn(m, k), randn(64)
    x[0] = 1.0
    full = _quantized_activations(x, 128) @ dequantize_int4(unpack_int4(packed), scale, mins, group).double().T
    got = ops.gemv_int4(x, *mixed, group, bias, "none", True)
    ref = full + bias.double()
    assert got.shape == (m, 64)
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    gate, up = full.chunk(2, dim=-1)
    fused = ops.gemv_int4(x.bfloat16(), *mixed, group, None, "silu_mul", True)
    x_b = _quantized_activations(x.bfloat16(), 128) @ dequantize_int4(unpack_int4(packed), scale, mins, group).double().T
    gate, up = x_b.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert fused.shape == (m, 32) and fused.dtype == torch.bfloat16
    assert ((fused.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-4 * ref.abs().max()).all()
    plain = ops.gemv_int4(x, packed, scale, mins, group, bias, "none")
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("lead", [(), (3,)])
def test_interleave_int8_is_a_reordering_and_its_inverse_undoes_it(lead):
    q, scale = quantize_int8(randn(*lead, 32, 64).reshape(-1, 64))
    q, scale = q.reshape(*lead, 32, 64), scale.reshape(*lead, 32)
    mixed, same = quant_linear.interleave("int8", (q, scale))
    assert same is scale and mixed.shape == q.shape and not torch.equal(mixed, q)
    assert torch.equal(quant_linear.interleave("int8_x16", (mixed, scale), inverse=True)[0], q)
    # slab 1, inputs 4 * 5 .. (v = 5), row 3, byte 2 is plain row 16 + 3's input 22
    assert mixed.reshape(-1)[1 * 16 * 64 + 5 * 64 + 3 * 4 + 2] == q.reshape(-1, 64)[19, 22]


@needs_x16
@pytest.mark.parametrize("k", [32, 96, 1056])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 32])
def test_int8_x16_gemv_exact_given_its_quantized_activations(m, k):
    """As the plain int8 kernel: full-scale weights with matching full-scale activations in row 0,
    odd numbers of 32-input blocks, plain with a bias and fused, and equal to the plain kernel."""
    w = randn(64, k)
    w[:8] = torch.where(randn(8, k) > 0, 1.0, -1.0)
    q, scale = quantize_int8(w)
    mixed, _ = quant_linear.interleave("int8", (q, scale))
    x, bias = randn(m, k, dtype=torch.bfloat16), randn(64)
    x[0] = torch.where(q[0] > 0, 1.0, -1.0)
    full = _quantized_activations(x, 32) @ (q.double() * scale.double()[:, None]).T
    got = ops.gemv_int8(x.float(), mixed, scale, bias, "none", True)
    ref = full + bias.double()
    assert ((got.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    fused = ops.gemv_int8(x, mixed, scale, None, "silu_mul", True)
    gate, up = full.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert fused.shape == (m, 32) and fused.dtype == torch.bfloat16
    assert ((fused.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-4 * ref.abs().max()).all()
    plain = ops.gemv_int8(x.float(), q, scale, bias, "none")
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@needs_x16
def test_int8_x16_dequantize_kernel_matches_python():
    q, scale = quantize_int8(randn(96, 160))
    mixed, _ = quant_linear.interleave("int8", (q, scale))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ops.dequantize_int8(mixed, scale, dtype, True), ops.dequantize_int8(q, scale, dtype, False))
    assert torch.equal(quant_linear.expand.reference("int8_x16", (mixed, scale), 0, torch.float32),
                       q.float() * scale[:, None])


@needs_x16
def test_int4_x16_dequantize_kernel_matches_python():
    (packed, scale, mins), mixed = _int4_x16(randn(96, 384), 128)
    ref = quant_linear.expand.reference("int4", (packed, scale, mins), 128, torch.float32)
    torch.testing.assert_close(ops.dequantize_int4(*mixed, 128, torch.float32, True), ref, rtol=1e-6, atol=1e-6)
    # the same arithmetic as the plain layout's kernel, element for element
    assert torch.equal(quant_linear.expand("int4_x16", mixed, 128, torch.bfloat16),
                       ops.dequantize_int4(packed, scale, mins, 128, torch.bfloat16, False))


@needs_x16
def test_interleave_quantized_takes_only_what_its_kernels_read():
    """Linears whose rows fill pairs of slabs and whose groups are whole blocks are interleaved, and
    compute what they did; the rest, and experts with a matrix that does not fit, keep the plain layout."""
    from qwenrun.quant.linear import Int4Linear, Int8Linear, QuantizedExperts, interleave_quantized

    model = torch.nn.Module()
    model.fits = Int4Linear.from_weight(randn(64, 256), randn(64), 128)
    model.odd_rows = Int4Linear.from_weight(randn(48, 256), None, 128)
    model.small_group = Int4Linear.from_weight(randn(64, 256), None, 64)
    model.int8 = Int8Linear.from_weight(randn(64, 256), None)
    experts = torch.nn.Module()
    experts.num_experts, experts.w13, experts.w2 = 4, torch.nn.Parameter(randn(4, 256, 256)), \
        torch.nn.Parameter(randn(4, 256, 128))
    model.experts = QuantizedExperts.from_experts(experts, "int4", 64)  # int4 experts, groups of 64
    x = randn(3, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = model.fits(x), model.fits.silu_mul(x), model.int8(x), model.int8.silu_mul(x)
        interleave_quantized(model)
        after = model.fits(x), model.fits.silu_mul(x), model.int8(x), model.int8.silu_mul(x)
    assert model.fits.format == "int4_x16"
    assert model.int8.format == "int8_x16"
    assert [m.format for m in (model.odd_rows, model.small_group, model.experts)] == ["int4", "int4", "int4"]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0.01, atol=0.01 * a.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("H", [96, 13])  # 13: a tail past the last whole vector
def test_rms_norm_kernel_rounds_like_transformers(dtype, with_residual, H):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    ref_norm = Qwen3RMSNorm(H, eps=1e-6)
    ref_norm.weight.data = randn(H).to(dtype)
    ref_norm = ref_norm.to(dtype)
    x, res = randn(5, H, dtype=dtype) * 3, randn(5, H, dtype=dtype)
    with torch.no_grad():
        y, new_res = ops.rms_norm(x, res if with_residual else None, ref_norm.weight, 1e-6)
        expect_in = x + res if with_residual else x
        tol = 0 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(y, ref_norm(expect_in), rtol=tol, atol=tol)
        assert torch.equal(new_res, expect_in)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 32, 128])
def test_qk_norm_rope_kernel_matches_torch_path(dtype, d):
    T, nh, nkv, S = 3, 4, 2, 16
    qkv = randn(T, (nh + 2 * nkv) * d, dtype=dtype)
    qw, kw = randn(d, dtype=dtype), randn(d, dtype=dtype)
    ang = torch.arange(T)[:, None] * torch.rand(d // 2, generator=gen)[None]
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    slots = torch.tensor([5, 9, 2])
    kc, vc = torch.zeros(nkv, S, d, dtype=dtype), torch.zeros(nkv, S, d, dtype=dtype)
    q = ops.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, nh, nkv, kc, vc, slots)
    heads = qkv.view(T, nh + 2 * nkv, d)
    normed = F.rms_norm(heads[:, : nh + nkv], (d,), None, 1e-6) * torch.cat((qw.expand(nh, d), kw.expand(nkv, d)))
    rotated = apply_rotary(normed, cos, sin)
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q, rotated[:, :nh], **tol)
    torch.testing.assert_close(kc[:, slots].transpose(0, 1), rotated[:, nh:], **tol)
    assert torch.equal(vc[:, slots].transpose(0, 1), heads[:, nh + nkv :])
    assert kc[:, [0, 1, 3]].abs().sum() == 0  # nothing written outside the slots


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_matches_torch(dtype):
    x = randn(4, 1000 + 3, dtype=dtype)
    x[1, 17] = x[1, 400] = 50  # ties: the first index wins, as torch.argmax
    x[2, -1] = 50  # in the tail past the last full vector
    x[3] = -torch.inf
    x[3, 999] = -1e30
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))
    for V in (1, 5, 8, 9):  # shorter than one vector, exactly one, one and a tail
        short = randn(3, V, dtype=dtype)
        assert torch.equal(ops.argmax(short), short.argmax(dim=-1))


def _reference(q, ks, vs, ctx, qlen, scale):
    """Causal attention of the last qlen positions of one sequence over its ctx keys (fp32)."""
    nh, nkv = q.shape[1], ks.shape[1]
    k = ks.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).float()  # [nh, ctx, d]
    v = vs.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).float()
    s = q.transpose(0, 1).float() @ k.transpose(1, 2) * scale  # [nh, qlen, ctx]
    pos_q = torch.arange(ctx - qlen, ctx)[:, None]
    s = s.masked_fill(torch.arange(ctx)[None, :] > pos_q, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(qlen, -1)


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("heads", [(4, 2, 8), (8, 1, 32), (6, 2, 128), (3, 3, 16)])
@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_matches_reference_for_any_batch_mix(seed, heads, use_kernels, monkeypatch):
    """Decode rows take the C++ kernel (head_dim 16..256) or the torch path; prefill rows SDPA."""
    if not use_kernels:
        monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    elif ops is None:
        pytest.skip("C++ kernels unavailable")
    rng = random.Random(seed)
    nh, nkv, d = heads
    bs, nblocks = 4, 64
    k_cache = torch.zeros(nkv, nblocks * bs, d)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(nblocks))
    rng.shuffle(free) if seed % 2 else None  # even seeds: consecutive blocks (the in-place decode view)
    B = rng.choice([1, 1, 3, 5])
    qlens = [rng.choice([1, 1, rng.randint(2, 9)]) for _ in range(B)]
    ctxs = [q + rng.randint(0, 20) for q in qlens]
    tables, history = [], []
    for c in ctxs:
        n = -(-c // bs)
        tables.append([free.pop(0) for _ in range(n)])
        history.append((torch.randn(c, nkv, d), torch.randn(c, nkv, d)))
    for (ks, vs), t, c, q in zip(history, tables, ctxs, qlens):  # earlier tokens already cached
        for p in range(c - q):
            slot = t[p // bs] * bs + p % bs
            k_cache[:, slot], v_cache[:, slot] = ks[p], vs[p]
    meta = AttentionMetadata.build(qlens, ctxs, tables, bs, torch.device("cpu"))
    q_all = torch.randn(sum(qlens), nh, d)
    k_new = torch.cat([ks[c - q :] for (ks, _), c, q in zip(history, ctxs, qlens)])
    v_new = torch.cat([vs[c - q :] for (_, vs), c, q in zip(history, ctxs, qlens)])
    out = paged_attention(q_all, k_new, v_new, k_cache, v_cache, meta, d**-0.5)
    row = 0
    for (ks, vs), c, q in zip(history, ctxs, qlens):
        ref = _reference(q_all[row : row + q], ks, vs, c, q, d**-0.5)
        torch.testing.assert_close(out[row : row + q], ref, atol=1e-5, rtol=1e-5)
        row += q


@needs_kernels
def test_bf16_decode_attention_kernel_close_to_reference():
    nh, nkv, d, L = 8, 2, 128, 300
    k_cache, v_cache = randn(nkv, 512, d, dtype=torch.bfloat16), randn(nkv, 512, d, dtype=torch.bfloat16)
    q = randn(3, nh, d, dtype=torch.bfloat16)
    slots = torch.stack([torch.arange(100, 100 + L), torch.arange(L).flip(0), torch.arange(L)])
    lens = torch.tensor([L, 123, 5])  # 5: fewer scores than one vector
    out = ops.decode_attention(q, k_cache, v_cache, slots, lens, d**-0.5)
    for b in range(3):
        s = slots[b, : lens[b]]
        ref = _reference(q[b : b + 1], k_cache[:, s].transpose(0, 1), v_cache[:, s].transpose(0, 1), int(lens[b]), 1,
                         d**-0.5)
        assert (out[b].float() - ref[0]).abs().max() <= 2**-7 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_runs_of_one_sequence(dtype):
    """Rows at consecutive positions over the same slots share their key and value reads (a run, at
    most 8 rows); rows that only look alike must not: row 10 has one more position but a different
    slot for it, row 11 the same slots but a length that skips one, rows 12-13 another sequence."""
    nh, nkv, d, L = 4, 2, 32, 60
    k_cache, v_cache = randn(nkv, 256, d, dtype=dtype), randn(nkv, 256, d, dtype=dtype)
    base = torch.randperm(200)[:L]
    other = base.clone()
    other[40] = 250
    slots = torch.stack([base] * 10 + [other, base, torch.arange(L), torch.arange(L)])
    lens = torch.tensor([30 + i for i in range(10)] + [41, 42, 7, 8])  # rows 0-9: a run of 8, then 2
    q = randn(len(lens), nh, d, dtype=dtype)
    out = ops.decode_attention(q, k_cache, v_cache, slots, lens, d**-0.5)
    for b in range(len(lens)):
        s = slots[b, : lens[b]]
        ref = _reference(q[b : b + 1].float(), k_cache[:, s].transpose(0, 1).float(),
                         v_cache[:, s].transpose(0, 1).float(), int(lens[b]), 1, d**-0.5)
        assert (out[b].float() - ref[0]).abs().max() <= (2**-7 if dtype == torch.bfloat16 else 1e-5) * ref.abs().max()


@pytest.mark.parametrize("checkpoint", ["dense-untied-gqa2", "moe-norm-topk"])
def test_bf16_fast_path_as_accurate_as_plain_model(tmp_path, checkpoint):
    """The bf16 CPU fast path (kernels, or oneDNN-packed weights without them) against plain F.linear
    modules on the same weights, both measured from the fp32 model: bf16 rounds in different places
    (fused SiLU·up in fp32, another accumulation order, and MoE routing near-ties), so the check is that
    the fast path is no further from fp32 than plain bf16 is."""
    from qwenrun import LLM
    from qwenrun.loading.loader import load_model
    from tiny import make_checkpoint

    folder, _ = make_checkpoint(checkpoint, tmp_path)
    llm = LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20)
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert kinds & ({"StreamingLinear", "StreamingExperts"} if ops else {"PackedLinear", "PackedExperts"})
    ids = list(range(1, 40))
    fast = llm.logits(ids)
    llm.engine.runner.model = load_model(llm.checkpoint, torch.bfloat16, torch.device("cpu"))
    plain = llm.logits(ids)
    exact = LLM(folder, dtype="float32", kv_cache_memory=8 << 20).logits(ids)
    assert rel_err(fast, exact) <= 1.5 * rel_err(plain, exact) + 1e-3
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= (plain.argmax(-1) == exact.argmax(-1)).float().mean() - 0.1


def test_model_without_kernels_matches_model_with_them(tmp_path, monkeypatch):
    """The torch fallbacks (no AVX-512 / no compiler) compute the same model in fp32."""
    if ops is None:
        pytest.skip("C++ kernels unavailable")
    from qwenrun import LLM, SamplingParams
    from tiny import make_checkpoint

    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with_kernels = LLM(folder, dtype="float32", kv_cache_memory=8 << 20)
    fast_logits, fast_tokens = with_kernels.logits(list(range(1, 30))), with_kernels.generate([[1, 2, 3]], params)
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    without = LLM(folder, dtype="float32", kv_cache_memory=8 << 20)
    torch.testing.assert_close(without.logits(list(range(1, 30))), fast_logits, rtol=1e-4, atol=1e-4)
    assert without.generate([[1, 2, 3]], params)[0].outputs[0].token_ids == fast_tokens[0].outputs[0].token_ids


def _moe_reference(x, weights, ids, w13, w2):
    """Σ_k weights[t, k] · down(SiLU(gate) · up)(x[t]), token by token and expert by expert, in fp32."""
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            out[t] += weights[t, k].float() * (w2[e].float() @ (F.silu(gate) * up))
    return out


@needs_kernels
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int8_x16", "int4_x16"])
def test_moe_decode_and_grouped_paths_match_per_expert_loop(fmt):
    """A lone token (one C++ call over its chosen experts) and several tokens (grouped by expert) against
    a plain per-token, per-expert loop over the same weights, dequantized for int8/int4."""
    from qwenrun.layers.packed import StreamingExperts
    from qwenrun.quant.linear import QuantizedExperts, interleave_quantized

    if fmt.endswith("_x16") and (ops is None or not ops.interleaved_layouts):
        pytest.skip(f"the {fmt} layout's kernels are AVX-512 (VNNI) only")
    E, H, I = 6, 256, 128
    group = 128 if fmt == "int4_x16" else 64
    w13, w2 = randn(E, 2 * I, H) * 0.1, randn(E, H, I) * 0.1
    if fmt == "bf16":
        module = StreamingExperts(E, w13.bfloat16(), w2.bfloat16())
        seen = [w13.bfloat16(), w2.bfloat16()]
    else:
        experts = torch.nn.Module()
        experts.num_experts, experts.w13, experts.w2 = E, torch.nn.Parameter(w13), torch.nn.Parameter(w2)
        module = QuantizedExperts.from_experts(experts, fmt.removesuffix("_x16"), group)
        if fmt.endswith("_x16"):
            interleave_quantized(module)
        assert module.format == module.fused_format == fmt
        seen = [torch.stack([_dequantized(w[e], fmt.removesuffix("_x16"), group) for e in range(E)]) for w in (w13, w2)]
    x = randn(5, H, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5], [2, 0], [4, 3], [5, 2], [0, 1]])  # experts shared across tokens, in any slot
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.bfloat16)
    with torch.inference_mode():
        lone = torch.cat([module(x[t : t + 1], w[t : t + 1], ids[t : t + 1]) for t in range(5)])
        grouped = module(x, w, ids)
    reference = _moe_reference(x, w, ids, *seen)
    # bf16 activations round each matmul; int8/int4 kernels also quantize them per 32 inputs (~0.5% each)
    tol = 0.01 if fmt == "bf16" else 0.02
    assert rel_err(lone, reference) < tol
    assert rel_err(grouped, reference) < tol
    # the quantizers' own error on Gaussian weights, through two matrices (4 bits: a step of ~σ/3)
    exact = _moe_reference(x, w, ids, w13, w2)
    assert rel_err(grouped, exact) < {"bf16": 0.02, "int8": 0.05, "int4": 0.25, "int8_x16": 0.05, "int4_x16": 0.3}[fmt]
    # id E is no expert (another rank's, under expert parallelism): that assignment adds nothing
    elsewhere = ids.clone()
    elsewhere[1, 0] = elsewhere[3, 1] = E
    dropped = w.clone()
    dropped[1, 0] = dropped[3, 1] = 0
    with torch.inference_mode():
        skipped = module(x, w, elsewhere)
    assert rel_err(skipped, _moe_reference(x, dropped, ids, *seen)) < tol
    assert kernels.uses_kernel("routed_experts", x, w, ids, module) == (kernels.cpu_ops() is not None)


def _dequantized(w: torch.Tensor, fmt: str, group: int = 64) -> torch.Tensor:
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return q.float() * scale[:, None]
    return dequantize_int4(*quantize_int4(w, group), group)


def _decode_calls(dtype=torch.bfloat16) -> dict[str, tuple]:
    """Every operation's arguments at a decode step's shapes: one token, head_dim 128, 1024 hidden."""
    T, nh, nkv, d, H, E = 1, 16, 8, 128, 1024, 4
    x = randn(T, H, dtype=dtype)
    cache = torch.zeros(nkv, 32, d, dtype=dtype)
    cos = randn(T, d, dtype=dtype)
    group = DecodeGroup(torch.tensor([0]), torch.arange(5)[None], torch.tensor([5]), None, None)
    q8 = list(quantize_int8(randn(64, H)))
    experts = StreamingExperts(E, randn(E, 64, H, dtype=dtype), randn(E, H, 32, dtype=dtype))
    return {
        "rms_norm": (x, x, randn(H, dtype=dtype), 1e-6),
        "qk_norm_rope_store": (randn(T, (nh + 2 * nkv) * d, dtype=dtype), randn(d, dtype=dtype), randn(d, dtype=dtype),
                               cos, cos, 1e-6, nh, nkv, cache, cache.clone(), torch.zeros(T, dtype=torch.long)),
        "decode_attention": (randn(T, nh, d, dtype=dtype), randn(nkv, 32, d, dtype=dtype),
                             randn(nkv, 32, d, dtype=dtype), group, d**-0.5),
        "argmax": (randn(T, 1000, dtype=dtype),),
        # fp32 logits of 3 rows, rows 0 and 2 masked (a few allowed words, and random bits)
        "apply_token_bitmask": (randn(3, 1000), torch.cat([
            torch.zeros(1, 32, dtype=torch.int32).index_fill_(1, torch.tensor([0, 5]), -1),
            torch.randint(-2**31, 2**31 - 1, (2, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))]),
            [0, 2]),
        "bf16_linear": (x, randn(64, H, dtype=dtype), None, "silu_mul"),
        "quantized_linear": (x, "int8", q8, 0, None, "none"),
        "dequantize": ("int8", q8, 0, dtype),
        "routed_experts": (x, torch.ones(T, 2, dtype=dtype), torch.tensor([[0, 3]]), experts),
        **_gdn_calls(dtype),
    }


def _gdn_calls(dtype) -> dict[str, tuple]:
    """The Gated DeltaNet operations at a hybrid layer's shapes: 2 key heads, 4 value heads, dk = dv = 32,
    conv kernel 4; a decode step of two sequences (ping-pong slots) and a 5-token prefill from a state."""
    Hk, Hv, d, K, n = 2, 4, 32, 4, 5
    conv_dim = 2 * Hk * d + Hv * d
    states = randn(6, Hv, d, d) * 0.1
    return {
        "gdn_decode": (randn(2, conv_dim, dtype=dtype), randn(6, conv_dim, K - 1, dtype=dtype),
                       randn(conv_dim, K, dtype=dtype), torch.tensor([0, 1]), torch.tensor([2, 3]),
                       randn(2, Hv, dtype=dtype), randn(2, Hv, dtype=dtype), randn(Hv), randn(Hv), states,
                       randn(2, Hv, d, dtype=dtype), randn(d, dtype=dtype), 1e-6, Hk),
        "gdn_prefill": (randn(n, conv_dim, dtype=dtype), randn(conv_dim, K - 1, dtype=dtype),
                        randn(conv_dim, K, dtype=dtype), randn(n, Hv, dtype=dtype), randn(n, Hv, dtype=dtype),
                        randn(Hv), randn(Hv), randn(Hv, d, d) * 0.1, Hv, d, Hk),
    }


def _copies(args: tuple) -> tuple:
    """Fresh tensors per call: qk_norm_rope_store writes its caches."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_dispatch_picks_the_kernels_at_bf16_decode_shapes(monkeypatch):
    """Where the CPU runs them, every operation of a bf16 decode step takes its C++ kernel; with
    QWENRUN_CPU_KERNELS=0 (or neither AVX-512 nor AVX2) every one takes its torch reference. The
    AVX2 build has no Gated DeltaNet kernels: those two run torch there."""
    calls = _decode_calls()
    assert set(calls) == set(kernels.KERNELS)  # every operation in the table is checked
    avx512_only = {"gdn_decode", "gdn_prefill"}
    with torch.inference_mode():
        for name, args in calls.items():
            built = ops is not None and (kernels._isa() == "avx512" or name not in avx512_only)
            assert kernels.uses_kernel(name, *args) == built, name
        monkeypatch.setenv("QWENRUN_CPU_KERNELS", "0")
        monkeypatch.setattr(kernels, "cpu_ops", kernels.cpu_ops.__wrapped__)  # uncached: reads the switch now
        for name, args in calls.items():
            assert not kernels.uses_kernel(name, *args), name


def _int8_experts(E: int, H: int, I: int):
    from qwenrun.quant.linear import QuantizedExperts

    experts = torch.nn.Module()
    experts.num_experts = E
    experts.w13, experts.w2 = torch.nn.Parameter(randn(E, 2 * I, H)), torch.nn.Parameter(randn(E, H, I))
    return QuantizedExperts.from_experts(experts, "int8", 64)


def test_dispatch_picks_torch_where_a_kernel_does_not_apply():
    calls = _decode_calls()
    norm, qk, attn, lin, quant, experts = (calls[n] for n in ("rms_norm", "qk_norm_rope_store", "decode_attention",
                                                              "bf16_linear", "quantized_linear", "routed_experts"))
    with torch.inference_mode():
        torch_cases = {
            "fp16 norm": ("rms_norm", (norm[0].half(), None, norm[2].half(), 1e-6)),
            "no cache to write": ("qk_norm_rope_store", qk[:8] + (None, None, qk[10])),
            "partial rotary": ("qk_norm_rope_store", qk[:3] + (qk[3][:, :64], qk[4][:, :64]) + qk[5:]),
            "head_dim 96": ("decode_attention", (randn(1, 4, 96), torch.zeros(2, 8, 96), torch.zeros(2, 8, 96))
                            + attn[3:]),
            "too many rows bf16": ("bf16_linear", (randn(kernels.GEMV_MAX_ROWS["bf16"] + 1, 1024, dtype=torch.bfloat16),)
                                   + lin[1:]),
            "too many rows int8": ("quantized_linear", (randn(kernels.GEMV_MAX_ROWS["int8"] + 1, 1024),) + quant[1:]),
            "int8 K % 32": ("quantized_linear", (randn(1, 80), "int8", list(quantize_int8(randn(8, 80))), 0, None,
                                                  "none")),
            "too many tokens": ("routed_experts", tuple(t.expand(kernels.GEMV_MAX_ROWS["bf16"] + 1, -1)
                                                        for t in experts[:3]) + (experts[3],)),
            "unfused experts": ("routed_experts", experts[:3] + (Qwen3MoeExperts(4, 1024, 32),)),
            "int8 experts, I % 32": ("routed_experts", (randn(1, 256), torch.ones(1, 2), torch.tensor([[0, 1]]),
                                                        _int8_experts(4, 256, 40))),
        }
        for case, (name, args) in torch_cases.items():
            assert not kernels.uses_kernel(name, *args), case
    with torch.enable_grad():  # training: the kernels record no autograd graph
        assert not kernels.uses_kernel("rms_norm", *norm)
        assert not kernels.uses_kernel("argmax", *calls["argmax"])


@needs_kernels
def test_every_operation_matches_its_torch_reference_at_decode_shapes():
    """Each operation of the table, dispatched to its kernel, against its own `.reference`: equal where the
    kernel rounds as torch does, within the kernel's activation quantization (int8) or accumulation order."""
    from qwenrun.layers.attention import decode_attention, qk_norm_rope_store
    from qwenrun.layers.gated_delta_net import gdn_decode, gdn_prefill
    from qwenrun.layers.moe import routed_experts
    from qwenrun.layers.norm import rms_norm
    from qwenrun.layers.packed import bf16_matmul
    from qwenrun.quant.linear import expand, quantized_matmul
    from qwenrun.sampling.sampler import _apply_cpu, argmax

    def in_place(op):  # the masked logits are the result of an in-place operation
        def run(logits, bitmask, rows):
            op(logits, bitmask, rows)
            return logits

        def reference(logits, bitmask, rows):
            op.reference(logits, bitmask, rows)
            return logits

        run.reference = reference
        return run

    apply_token_bitmask = in_place(_apply_cpu)

    operations = {"rms_norm": rms_norm, "qk_norm_rope_store": qk_norm_rope_store, "decode_attention": decode_attention,
                  "argmax": argmax, "apply_token_bitmask": apply_token_bitmask, "bf16_linear": bf16_matmul, "quantized_linear": quantized_matmul,
                  "dequantize": expand, "routed_experts": routed_experts, "gdn_decode": gdn_decode,
                  "gdn_prefill": gdn_prefill}
    assert set(operations) == set(kernels.KERNELS)
    exact = {"rms_norm", "qk_norm_rope_store", "argmax", "apply_token_bitmask"}
    with torch.inference_mode():
        for name, args in _decode_calls().items():
            got, want = operations[name](*_copies(args)), operations[name].reference(*_copies(args))
            for g, w in zip(*((r,) if isinstance(r, torch.Tensor) else r for r in (got, want))):
                if name in exact:
                    assert torch.equal(g, w), name
                else:
                    assert rel_err(g, w) < 0.02, name


@needs_kernels
@pytest.mark.parametrize("checkpoint, quantization, expected", [
    ("dense-untied-gqa2", None, {"gemv_bf16"}),
    ("moe-norm-topk", None, {"gemv_bf16", "moe_gemv"}),
    ("moe-norm-topk", "int8", {"gemv_int8", "moe_gemv"}),
    ("dense-untied-gqa2", "int4", {"gemv_int4"}),
])
def test_bf16_decode_runs_the_cpp_kernels(tmp_path, monkeypatch, checkpoint, quantization, expected):
    """A whole bf16 model's steps call the same C++ kernels as before the dispatch table existed."""
    from qwenrun import LLM, SamplingParams
    from tiny import make_checkpoint

    folder, _ = make_checkpoint(checkpoint, tmp_path, head_dim=32, hidden_size=128)
    seen: set[str] = set()

    class Recording:
        def __getattr__(self, name):
            seen.add(name)
            return getattr(ops, name)

    monkeypatch.setattr(kernels, "cpu_ops", lambda: Recording())
    llm = LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20, quantization=quantization)
    seen.clear()
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert seen >= {"rms_norm", "qk_norm_rope", "decode_attention", "argmax"} | expected
