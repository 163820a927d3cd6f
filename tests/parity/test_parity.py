"""Parity with transformers (the definition of correct) on tiny random checkpoints, fp32.

For every config: teacher-forced logits, 64 greedy tokens one prompt at a time and as a mixed-length
batch, and cached decode against a full forward at every step. A last test checks the check: checkpoints
with two weights swapped (what a model reading the wrong one would compute) fail it by far.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun import LLM, SamplingParams
from tiny import CONFIGS, HYBRID, make_checkpoint

PROMPT_LENS = (3, 11, 29, 7)
NEW_TOKENS = 64
LOGITS_TOL = 1e-4  # of the largest reference logit


@pytest.fixture(scope="module", params=sorted(set(CONFIGS) - HYBRID))  # hybrid: test_parity_hybrid.py
def pair(request, tmp_path_factory):
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ref.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    return request.param, llm, ref, prompts


def _reference_greedy(ref, prompt: list[int]) -> list[int]:
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def test_logits_match_transformers(pair):
    name, llm, ref, prompts = pair
    for prompt in prompts:
        ours = llm.logits(prompt)
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0]
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= LOGITS_TOL * theirs.abs().max().item(), name


def test_greedy_tokens_match_one_at_a_time_and_batched(pair):
    name, llm, ref, prompts = pair
    expected = [_reference_greedy(ref, p) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt, want in zip(prompts, expected):
        [out] = llm.generate([prompt], params)
        assert out.outputs[0].token_ids == want, f"{name}: single prompt of {len(prompt)} tokens"
    batched = llm.generate(prompts, params)
    for out, want in zip(batched, expected):
        assert out.outputs[0].token_ids == want, f"{name}: batched prompt of {len(out.prompt_token_ids)} tokens"
    llm.engine.pool.check_integrity()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_cached_decode_equals_full_forward(pair):
    """The top logprobs of every decode step (KV cache) equal a full forward over the same tokens."""
    name, llm, ref, prompts = pair
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts[:2], params)
    for out in outs:
        comp = out.outputs[0]
        full = torch.log_softmax(llm.logits(out.prompt_token_ids + comp.token_ids), dim=-1)
        for step, entry in enumerate(comp.logprobs):
            row = full[len(out.prompt_token_ids) + step - 1]
            for token, lp in entry.items():
                assert abs(row[token].item() - lp) < 1e-4, f"{name}: step {step} token {token}"
            assert comp.token_ids[step] == int(row.argmax())


@pytest.mark.parametrize("a, b", [("q_norm", "k_norm"), ("input_layernorm", "post_attention_layernorm"),
                                  ("gate_proj", "up_proj")])
def test_swapped_weights_fail_parity(tmp_path, a, b):
    """Each of these pairs has one shape, so a model that loads or applies one in place of the other runs
    without error; on transformers' own init (all norms 1.0) the norm swaps changed no logit at all."""
    folder, ref = make_checkpoint("dense-untied-gqa2", tmp_path / "good")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if f".{a}." in n]:
        other = name.replace(f".{a}.", f".{b}.")
        tensors[name], tensors[other] = tensors[other], tensors[name]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(folder / "config.json", swapped / "config.json")
    save_file(tensors, swapped / "model.safetensors", metadata={"format": "pt"})
    prompt = list(range(1, 30))
    with torch.no_grad():
        theirs = ref(torch.tensor([prompt])).logits[0]
    ours = LLM(swapped, dtype="float32", device="cpu", kv_cache_memory=8 << 20).logits(prompt)
    assert (ours - theirs).abs().max().item() > 100 * LOGITS_TOL * theirs.abs().max().item()
