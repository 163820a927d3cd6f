"""Parity with transformers for the hybrid models (Qwen3-Next, Qwen3.5, Qwen3.5-MoE), fp32, on tiny random
checkpoints of every `tiny.HYBRID` variant.

Model level (no engine): whole prompts several chunks of 64 long, alone and packed into one flat batch,
then the same prompt run through state slots and a paged KV cache made by hand — a prefix chunk, a
continuation chunk and single-token decode steps — against transformers' own cached generation
(chunked prefill, then its recurrent step). LLM level, through the engine's hybrid cache (state slots
beside paged KV): teacher-forced logits, and 32 greedy tokens one prompt at a time and as a
mixed-length batch against transformers' `generate`, with every slot and block free afterwards; and
bf16 as far from fp32 as transformers' bf16 is (these tiny checkpoints are ill-conditioned in bf16:
transformers' own bf16 moves their logits by 3-15% of the mean logit and changes the greedy tokens
within a few steps, so bf16 greedy agreement is measured, not required — see the issue report).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun import LLM, SamplingParams
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import load_model, open_checkpoint
from hand_cache import HandCache
from tiny import HYBRID, make_checkpoint

LOGITS_TOL = 1e-4  # of the largest reference logit
PROMPT = 150  # three chunks of the delta rule, the last partial


@pytest.fixture(scope="module", params=sorted(HYBRID))
def pair(request, tmp_path_factory):
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    model = load_model(open_checkpoint(folder), torch.float32, torch.device("cpu"))
    return request.param, model, ref


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours - theirs).abs().max().item() <= LOGITS_TOL * theirs.abs().max().item()


def _tokens(n: int, seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_whole_prompt_logits_match_transformers(pair):
    name, model, ref = pair
    a, b = _tokens(PROMPT, 1), _tokens(37, 2)
    with torch.no_grad():
        want_a, want_b = ref(a[None]).logits[0], ref(b[None]).logits[0]
        alone = model.compute_logits(model(ForwardBatch.without_cache(a, torch.arange(PROMPT), [PROMPT])))
        assert _close(alone, want_a), f"{name}: one prompt of {PROMPT}"
        packed = ForwardBatch.without_cache(torch.cat((b, a)), torch.cat((torch.arange(37), torch.arange(PROMPT))),
                                            [37, PROMPT])
        both = model.compute_logits(model(packed))
    assert _close(both[:37], want_b) and _close(both[37:], want_a), f"{name}: two prompts in one flat batch"


def test_chunks_and_decode_through_the_cache_match_transformers(pair):
    """Prefix 70 + continuation 80 (crossing chunk boundaries) + 8 decode steps, the state ping-ponging
    between two slots, against transformers' generate-style cached run (prefill 150, recurrent steps)."""
    name, model, ref = pair
    ids = _tokens(PROMPT + 8, 3)
    with torch.no_grad():
        out = ref(ids[None, :PROMPT], use_cache=True)
        cache, want = out.past_key_values, [out.logits[0, -1]]
        for t in range(PROMPT, PROMPT + 7):
            out = ref(ids[None, t : t + 1], past_key_values=cache, use_cache=True)
            want.append(out.logits[0, -1])
        whole = ref(ids[None]).logits[0, PROMPT - 1 : PROMPT + 7]

        kv = HandCache(model.cache_specs(torch.float32))
        model(kv.batch(ids[:70], 0, 0, 1))
        got = [model.compute_logits(model(kv.batch(ids[70:PROMPT], 70, 1, 2)))[-1]]
        slot = 2
        for t in range(PROMPT, PROMPT + 7):
            nxt = 1 if slot == 2 else 2
            got.append(model.compute_logits(model(kv.batch(ids[t : t + 1], t, slot, nxt)))[-1])
            slot = nxt
    got_t, want_t = torch.stack(got), torch.stack(want)
    assert _close(got_t, want_t), f"{name}: cached chunks + decode vs transformers' cached generation"
    assert _close(got_t, whole), f"{name}: vs one full forward"
    assert got_t.argmax(-1).tolist() == want_t.argmax(-1).tolist()


# ---------------------------------------------------------------------------------------- LLM level
PROMPT_LENS = (3, 11, PROMPT, 29)
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=sorted(HYBRID))
def llm_pair(request, tmp_path_factory):
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    prompts = [_tokens(n, 10 + i).tolist() for i, n in enumerate(PROMPT_LENS)]
    return request.param, llm, ref, prompts


def _idle(llm: LLM) -> None:
    cache = llm.engine.cache
    cache.check_integrity()
    assert cache.num_live == 0 and llm.engine.pool.num_free == llm.engine.pool.num_blocks
    assert cache.slots.num_free + cache.slots.num_checkpoints == cache.slots.num_slots, "a state slot is still owned"


def test_llm_logits_match_transformers(llm_pair):
    name, llm, ref, prompts = llm_pair
    for prompt in prompts:
        ours = llm.logits(prompt)
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0]
        assert ours.shape == theirs.shape
        assert _close(ours, theirs), f"{name}: prompt of {len(prompt)}"
    _idle(llm)


def test_llm_greedy_matches_transformers_one_at_a_time_and_batched(llm_pair):
    name, llm, ref, prompts = llm_pair
    expected = []
    for p in prompts:
        out = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, want in zip(prompts, expected):
        [out] = llm.generate([prompt], params)
        assert out.outputs[0].token_ids == want, f"{name}: single prompt of {len(prompt)} tokens"
    _idle(llm)
    for out, want in zip(llm.generate(prompts, params), expected):
        assert out.outputs[0].token_ids == want, f"{name}: batched prompt of {len(out.prompt_token_ids)} tokens"
    _idle(llm)


def test_bf16_is_as_close_to_fp32_as_transformers_bf16(llm_pair, tmp_path):
    """Mean relative logit distance to fp32 over the prompts, ours (bf16 weights, the folded 1 + w norms,
    fp32 state) vs transformers in bf16 (which multiplies by 1 + w in fp32)."""
    name, llm, ref, prompts = llm_pair
    bf16 = LLM(llm.checkpoint.path, dtype="bfloat16", device="cpu", kv_cache_memory=16 << 20)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours = theirs = 0.0
    for prompt in prompts:
        fp32 = llm.logits(prompt)
        with torch.no_grad():
            ref_bf16 = ref16(torch.tensor([prompt])).logits[0].float()
        ours += ((bf16.logits(prompt) - fp32).abs().mean() / fp32.abs().mean()).item()
        theirs += ((ref_bf16 - fp32).abs().mean() / fp32.abs().mean()).item()
    n = len(prompts)
    assert 0 < ours <= 2 * theirs + 0.02 * n, f"{name}: bf16 {ours / n:.3f} vs transformers' {theirs / n:.3f}"


@pytest.mark.parametrize("a, b", [("in_proj_b", "in_proj_a"), ("A_log", "dt_bias"), ("q_norm", "k_norm"),
                                  ("input_layernorm", "post_attention_layernorm")])
def test_swapped_weights_fail_parity(tmp_path, a, b):
    """Same-shape pairs a model could read one for the other without an error; each swap moves the
    logits by far more than the parity tolerance, so the tests above would catch it."""
    folder, ref = make_checkpoint("qwen3_5-interval4", tmp_path / "good")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(f".{a}.weight") or n.endswith(f".{a}")]:
        other = name.replace(f".{a}", f".{b}")
        tensors[name], tensors[other] = tensors[other], tensors[name]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(folder / "config.json", swapped / "config.json")
    save_file(tensors, swapped / "model.safetensors", metadata={"format": "pt"})
    model = load_model(open_checkpoint(swapped), torch.float32, torch.device("cpu"))
    ids = _tokens(PROMPT, 4)
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0]
        ours = model.compute_logits(model(ForwardBatch.without_cache(ids, torch.arange(PROMPT), [PROMPT])))
    assert (ours - theirs).abs().max().item() > 100 * LOGITS_TOL * theirs.abs().max().item()
