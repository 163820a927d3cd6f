"""The int8 KV cache (`kv_cache_dtype="int8"`): the C++ kernels against dequantize-then-attend
references, and the engine's self-equivalences with int8 K/V. Those stay exact (batched vs alone,
chunked vs whole prefill, prefix hit vs miss, preemption, speculative rollback, hybrid models), since
every path reads the same stored int8 values; against a full-precision cache the logits are close
within a stated bound, and the same memory holds about twice the tokens of bf16."""

from __future__ import annotations

import functools
import random

import engine_cases
import pytest
import torch
import torch.nn.functional as F
from engine_cases import assert_idle_and_whole, greedy, random_prompts
from tiny import make_checkpoint

from qwenrun import LLM, kernels
from qwenrun.engine.cache import CachePlan
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import (
    KVCacheSpec,
    AttentionMetadata,
    DecodeGroup,
    QuantizedKV,
    decode_attention,
    dequantize_kv,
    paged_attention,
    qk_norm_rope_store,
    quantize_kv,
)
from qwenrun.layers.rotary import apply_rotary

ops = kernels.cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="C++ kernels need x86 AVX2 or AVX512-BF16/VNNI and a compiler")
gen = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def quantized(x: torch.Tensor) -> QuantizedKV:
    """x [nkv, S, d] as an int8 cache."""
    return QuantizedKV(*quantize_kv(x))


def sdpa_reference(q, k_cache: QuantizedKV, v_cache: QuantizedKV, slots, n, scale):
    """One query [nh, d] over the first n of `slots`, the cache dequantized to fp32 first."""
    s = slots[:n]
    k, v = dequantize_kv(k_cache, s, torch.float32), dequantize_kv(v_cache, s, torch.float32)  # [nkv, n, d]
    out = F.scaled_dot_product_attention(q.float()[None, :, None], k[None], v[None], scale=scale, enable_gqa=True)
    return out.reshape(-1)


# ------------------------------------------------------------------------------------ quantization
def test_quantize_kv_rounds_to_the_nearest_step_of_each_rows_absmax():
    x = randn(3, 7, 64) * torch.logspace(-3, 2, 7)[None, :, None]  # rows of very different size
    x[1, 2] = 0  # a zero row: scale 0, values 0
    data, scale = quantize_kv(x)
    assert data.dtype == torch.int8 and scale.shape == (3, 7) and scale.dtype == torch.float32
    assert data.abs().amax(-1)[scale > 0].eq(127).all()  # each row's absmax maps to 127
    err = (data.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert scale[1, 2] == 0 and data[1, 2].eq(0).all()
    bf = x.bfloat16()  # from bf16 the values are taken as they are, widened to fp32
    assert torch.equal(quantize_kv(bf)[0], quantize_kv(bf.float())[0])


# ---------------------------------------------------------------------------------------- kernels
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
def test_int8_decode_attention_kernel_matches_dequantize_then_sdpa(dtype, d):
    """The kernel reads int8 rows and folds the scales in; the reference expands the cache to fp32 and
    runs SDPA. fp32 queries: accumulation order only; bf16: the output's own rounding (2^-8)."""
    nh, nkv, S, L = 8, 2, 512, 300
    k_cache, v_cache = quantized(randn(nkv, S, d) * 3), quantized(randn(nkv, S, d))
    q = randn(4, nh, d, dtype=dtype)
    slots = torch.stack([torch.arange(100, 100 + L), torch.arange(L).flip(0), torch.randperm(S, generator=gen)[:L],
                         torch.arange(L)])
    lens = torch.tensor([L, 123, 77, 5])  # 5: fewer scores than one vector
    out = ops.decode_attention_int8(q, k_cache.data, v_cache.data, k_cache.scale, v_cache.scale, slots, lens, d**-0.5)
    assert out.dtype == dtype and out.shape == (4, nh * d)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for b in range(4):
        ref = sdpa_reference(q[b], k_cache, v_cache, slots[b], int(lens[b]), d**-0.5)
        assert (out[b].float() - ref).abs().max() <= tol * ref.abs().max(), b


def test_int8_decode_attention_reference_matches_dequantize_then_sdpa():
    """The torch path (no kernel: another device, head_dim 96) dequantizes what it gathers, in place and gathered."""
    nh, nkv, d, bs = 6, 2, 96, 4
    k_cache, v_cache = quantized(randn(nkv, 64, d)), quantized(randn(nkv, 64, d))
    q = randn(3, nh, d)
    for one_sequence in (True, False):
        lens = [9, 9, 9] if one_sequence else [9, 30, 2]
        tables = [list(range(8))] * 3 if one_sequence else [[3, 1, 4], [5, 9, 2, 6, 7, 8, 10, 11], [0]]
        meta = AttentionMetadata.build([1] * 3, lens, tables, bs, torch.device("cpu"))
        if one_sequence:  # three rows of one sequence are a 3-token chunk; its keys are read in place
            meta = AttentionMetadata.build([3], [9], [tables[0]], bs, torch.device("cpu"))
            lens = [7, 8, 9]
        g = meta.decode
        assert (g.span is not None) == one_sequence
        out = decode_attention.reference(q, k_cache, v_cache, g, d**-0.5)
        for b in range(3):
            ref = sdpa_reference(q[b], k_cache, v_cache, g.key_slots[b], lens[b], d**-0.5)
            torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_paged_attention_over_an_int8_cache_for_any_batch_mix(seed, use_kernels, monkeypatch):
    """Decode rows (kernel or torch) and prefill rows (SDPA over dequantized blocks) attend to the
    quantized values of every key, this step's own included: what a later step will read."""
    if not use_kernels:
        monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    elif ops is None:
        pytest.skip("C++ kernels unavailable")
    rng = random.Random(seed)
    nh, nkv, d, bs, nblocks = 4, 2, 32, 4, 64
    cache = (QuantizedKV.zeros(nkv, nblocks * bs, d, "cpu"), QuantizedKV.zeros(nkv, nblocks * bs, d, "cpu"))
    free = list(range(nblocks))
    rng.shuffle(free)
    qlens = [rng.choice([1, 1, rng.randint(2, 9), rng.randint(17, 30)]) for _ in range(rng.choice([1, 3, 5]))]
    ctxs = [q + rng.randint(0, 20) for q in qlens]
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in ctxs]
    history = [(randn(c, nkv, d), randn(c, nkv, d)) for c in ctxs]
    for (ks, vs), t, c, q in zip(history, tables, ctxs, qlens):  # earlier tokens already cached
        slots = torch.tensor([t[p // bs] * bs + p % bs for p in range(c - q)], dtype=torch.long)
        for x, kv in ((ks, cache[0]), (vs, cache[1])):
            data, scale = quantize_kv(x[: c - q])
            kv.data[:, slots], kv.scale[:, slots] = data.transpose(0, 1), scale.T
    meta = AttentionMetadata.build(qlens, ctxs, tables, bs, torch.device("cpu"))
    q_all = randn(sum(qlens), nh, d)
    k_new = torch.cat([ks[c - q :] for (ks, _), c, q in zip(history, ctxs, qlens)])
    v_new = torch.cat([vs[c - q :] for (_, vs), c, q in zip(history, ctxs, qlens)])
    out = paged_attention(q_all, k_new, v_new, *cache, meta, d**-0.5)
    row = 0
    for (ks, vs), t, c, q in zip(history, tables, ctxs, qlens):
        slots = torch.tensor([t[p // bs] * bs + p % bs for p in range(c)], dtype=torch.long)
        for i in range(q):
            ref = sdpa_reference(q_all[row + i], *cache, slots, c - q + 1 + i, d**-0.5)
            torch.testing.assert_close(out[row + i], ref, atol=1e-5, rtol=1e-5)
        row += q


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 128, 24])  # 24: the kernel's scalar path
def test_int8_qk_norm_rope_store_kernel_stores_what_torch_stores(dtype, d):
    """From bf16 the kernel rounds as torch does, so it writes the same int8 bytes and scales; in fp32 its
    norm differs from torch's in the last bits, which can move a value across a rounding boundary."""
    T, nh, nkv, S = 3, 4, 2, 16
    qkv = randn(T, (nh + 2 * nkv) * d, dtype=dtype)
    qw, kw = randn(d, dtype=dtype), randn(d, dtype=dtype)
    ang = torch.arange(T)[:, None] * torch.rand(d // 2, generator=gen)[None]
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    slots = torch.tensor([5, 9, 2])
    args = (qkv, qw, kw, cos, sin, 1e-6, nh, nkv)
    caches = [tuple(QuantizedKV.zeros(nkv, S, d, "cpu") for _ in range(2)) for _ in range(2)]
    with torch.inference_mode():
        assert kernels.uses_kernel("qk_norm_rope_store", *args, *caches[0], slots)
        q_kernel = qk_norm_rope_store(*args, *caches[0], slots)[0]
        q_torch = qk_norm_rope_store.reference(*args, *caches[1], slots)[0]
    (kk, vk), (kt, vt) = caches
    if dtype == torch.bfloat16:
        assert torch.equal(q_kernel, q_torch)
        for a, b in ((kk, kt), (vk, vt)):
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    else:
        torch.testing.assert_close(q_kernel, q_torch, rtol=1e-5, atol=1e-5)
        assert (kk.data.int() - kt.data.int()).abs().max() <= 1
        torch.testing.assert_close(kk.scale, kt.scale, rtol=1e-5, atol=0)
        assert torch.equal(vk.data, vt.data) and torch.equal(vk.scale, vt.scale)
    # what was stored is the rotated k (and the raw v) to within half a step per value
    heads = qkv.view(T, nh + 2 * nkv, d).float()
    normed = F.rms_norm(heads[:, nh : nh + nkv], (d,), None, 1e-6) * kw.float()
    k_ref = apply_rotary(normed, cos.float(), sin.float())
    k_back = dequantize_kv(kk, slots, torch.float32).transpose(0, 1)
    assert ((k_back - k_ref).abs() <= kk.scale[:, slots].T[..., None] * 0.51 + 0.02 * k_ref.abs()).all()
    assert kk.data[:, [0, 1, 3]].abs().sum() == 0 and kk.scale[:, [0, 1, 3]].abs().sum() == 0  # only the slots


def test_dispatch_routes_int8_caches_to_the_int8_kernels():
    d, nkv = 128, 2
    cache = QuantizedKV.zeros(nkv, 32, d, "cpu")
    group = DecodeGroup(torch.tensor([0]), torch.arange(5)[None], torch.tensor([5]), None, None)
    with torch.inference_mode():
        assert kernels.uses_kernel("decode_attention", randn(1, 4, d), cache, cache, group, d**-0.5) == (ops is not None)
        assert not kernels.uses_kernel("qk_norm_rope_store", randn(1, 8 * d), randn(d), randn(d), randn(1, 64),
                                       randn(1, 64), 1e-6, 4, nkv, cache, cache, torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    folder, ref = make_checkpoint("moe-norm-topk", tmp_path_factory.mktemp("kv8"))
    return folder, ref.config.vocab_size


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder, ref = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("kv8dense"))
    return folder, ref.config.vocab_size


def int8_llm(*args, **kwargs) -> LLM:
    llm = LLM(*args, kv_cache_dtype="int8", **kwargs)
    assert all(isinstance(kv, QuantizedKV) for layer in llm.engine.cache.kv.layers.values() for kv in layer)
    return llm


@pytest.fixture
def int8_everywhere(monkeypatch):
    """The shared engine scenarios (engine_cases, spec_cases and the tests that use them) with every LLM
    they build, their references included, on an int8 cache."""
    import spec_cases
    import test_engine
    import test_engine_hybrid
    import test_spec_decode_drafter
    import test_spec_decode_mtp

    for module in (engine_cases, spec_cases, test_engine, test_engine_hybrid, test_spec_decode_drafter,
                   test_spec_decode_mtp):
        monkeypatch.setattr(module, "LLM", int8_llm)


def test_int8_chunked_prefix_hit_and_joining_requests_equal_alone(moe, int8_everywhere):
    import test_engine

    solo = engine_cases.solo_runner(moe[0])
    test_engine.test_chunked_prefill_equals_whole_prefill(moe, solo)
    test_engine.test_prefix_hit_computes_only_new_tokens_and_equals_miss(moe, solo)
    test_engine.test_requests_joining_between_steps_and_aborts(moe, solo)


def test_int8_preemption_keeps_outputs_exact(moe):
    folder, vocab = moe
    ref = int8_llm(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    per_block = 2 * 3 * 16 * 2 * (24 + 4)  # K and V, 3 layers, 16 tokens, 2 heads of 24 int8 + a fp32 scale each
    llm = int8_llm(folder, dtype="float32", kv_cache_memory=12 * per_block, block_size=16, max_model_len=192)
    assert llm.engine.cache.pool.num_blocks == 12
    prompts = random_prompts(vocab, (30, 12, 21, 40), seed=5)
    outs = llm.generate(prompts, greedy(40))
    assert llm.engine.scheduler.stats.preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == ref.generate([p], greedy(40))[0].outputs[0].token_ids
    assert_idle_and_whole(llm)


def test_int8_logits_close_to_the_full_precision_cache(dense):
    """Teacher-forced logits of a 200-token prompt, int8 vs fp32 K/V, on the dense model: relative error
    (Frobenius) under 2%, each row's largest deviation under 5% of its largest logit, the top token the same
    in 95% of rows (measured 1.1%, 2.1%, 98.5%; the whole model in bf16 moves them 1.7%, 3.6%, 98.5%).
    The MoE model is left out: its routing turns small input changes into large ones (4.2% int8, 6.1% bf16)."""
    folder, vocab = dense
    prompt = random_prompts(vocab, (200,), seed=2)[0]
    full = LLM(folder, dtype="float32", kv_cache_memory=16 << 20).engine.prompt_logits(prompt)
    int8 = int8_llm(folder, dtype="float32", kv_cache_memory=16 << 20).engine.prompt_logits(prompt)
    assert not torch.equal(full, int8)
    assert ((int8 - full).norm() / full.norm()).item() < 0.02
    assert ((int8 - full).abs().amax(-1) / full.abs().amax(-1)).max().item() < 0.05
    assert (int8.argmax(-1) == full.argmax(-1)).float().mean().item() >= 0.95


def test_int8_cache_plan_holds_about_twice_the_tokens_of_bf16():
    """The 0.6B shape's 28 layers of 8 kv heads x 128: int8 + one fp32 scale per head and token is
    2 x 8 x 132 bytes a layer against bf16's 2 x 8 x 256, 1.94x the tokens in one budget."""
    bf16, int8 = ([KVCacheSpec(8, 128, dt)] * 28 for dt in (torch.bfloat16, torch.int8))
    assert int8[0].bytes_per_token == 2 * 8 * (128 + 4) and bf16[0].bytes_per_token == 2 * 8 * 128 * 2
    plans = [CachePlan.make(s, 1 << 30, 16, 40960, 64) for s in (bf16, int8)]
    assert plans[1].num_blocks / plans[0].num_blocks == pytest.approx(256 / 132, rel=1e-3)


def test_int8_engine_allocates_within_its_budget_and_fits_more_blocks(moe):
    folder, _ = moe
    budget = 1 << 20
    llms = [LLM(folder, dtype="bfloat16", kv_cache_memory=budget, max_num_seqs=256),
            int8_llm(folder, dtype="bfloat16", kv_cache_memory=budget, max_num_seqs=256)]
    blocks = [llm.engine.cache.pool.num_blocks for llm in llms]
    assert blocks[1] / blocks[0] == pytest.approx(2 * 24 / (24 + 4), rel=0.01)  # head_dim 24: 1.71x
    stored = sum(t.numel() * t.element_size() for layer in llms[1].engine.cache.kv.layers.values()
                 for kv in layer for t in kv)
    assert budget - llms[1].engine.cache.kv.bytes_per_block(llms[1].engine.cache.specs, 16) < stored <= budget


def test_bad_kv_cache_dtype_is_refused(moe):
    from qwenrun.cli import serve
    from qwenrun.layers import attention

    assert serve.KV_CACHE_DTYPES == attention.KV_CACHE_DTYPES  # the CLI's copy (it does not import torch)
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of auto, int8"):
        LLM(moe[0], dtype="float32", kv_cache_memory=1 << 20, kv_cache_dtype="fp8")


def test_int8_hybrid_model_batched_and_prefix_hits_equal_alone(tmp_path, int8_everywhere):
    """Qwen3-Next's full-attention layers on int8; its Gated DeltaNet state stays fp32."""
    import test_engine_hybrid

    folder, ref = make_checkpoint("next-interval4-moe", tmp_path)
    checkpoint = (folder, ref.config.vocab_size)
    solo = engine_cases.solo_runner(folder)
    test_engine_hybrid.test_batched_equals_alone_while_others_decode(checkpoint, solo)
    test_engine_hybrid.test_prefix_hit_resumes_from_a_checkpoint_and_equals_miss(checkpoint, solo)


def test_int8_speculative_decoding_rolls_back_exactly(dense, tmp_path_factory, int8_everywhere):
    """ngram, MTP and draft-model drafts on int8 caches (the drafter's layers too): greedy output equals
    non-speculative int8 greedy alone, batched, chunked and from prefix hits, with drafts rejected."""
    import spec_cases
    import test_spec_decode_drafter
    import test_spec_decode_mtp

    root, folder = tmp_path_factory.mktemp("kv8spec"), dense[0]
    prompts = spec_cases.repeating((7, 13, 5, 20)) + random_prompts(512, (9, 3))
    spec_cases.assert_greedy_identical_alone_batched_chunked_prefix_hit(
        folder, {"method": "ngram", "num_speculative_tokens": 3}, prompts)
    head = test_spec_decode_mtp._with_random_head(folder, root / "head")
    test_spec_decode_mtp.test_random_head_greedy_identical_alone_batched_chunked_prefix_hit(head)
    draft = test_spec_decode_drafter._first_layers(folder, root / "draft", 2)
    test_spec_decode_drafter.test_greedy_identical_alone_batched_chunked_prefix_hit((folder, draft))
