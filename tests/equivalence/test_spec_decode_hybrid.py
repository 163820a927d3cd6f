"""Speculative decoding on hybrid models (Gated DeltaNet + attention): the recurrent state rolls back.

A verify step's draft rows leave the state after each of them in its own slot, and the step's commit
keeps the one after the last accepted token (layers/recurrent.py, engine/cache.py). Greedy output
then equals non-speculative greedy alone, batched, chunked, on a prefix hit resumed from a state
checkpoint and under preemption; seeded sampling equals non-speculative sampling; the cache is whole
after. Tiny random hybrid models rarely repeat themselves, so beside prompt lookup on repetitive
prompts an oracle proposer drafts the reference continuation with some tokens wrong: that makes
every accepted count from 0 to k occur, at any state the model reaches.
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_cases import assert_idle_and_whole as _assert_idle_and_whole
from engine_cases import greedy as _greedy
from engine_cases import random_prompts as _prompts
from hybrid_cases import checkpoint, solo  # noqa: F401 (module fixtures)
from tiny import make_checkpoint

from qwenrun import LLM, SamplingParams
from qwenrun.layers.gated_delta_net import GatedDeltaNet
from qwenrun.layers.recurrent import RecurrentMetadata

K = 4
SPEC = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 3}


class Oracle:
    """Drafts the reference continuation of a known prompt, each drafted position wrong with
    probability 0.3 (seeded by the position: the same drafts whatever the schedule)."""

    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab: int) -> None:
        self.references, self.vocab = references, vocab

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        for prompt, out in self.references.items():
            n = len(token_ids) - len(prompt)
            if n >= 0 and tuple(token_ids[: len(prompt)]) == prompt and token_ids[len(prompt) :] == out[:n]:
                return [(t + 1) % self.vocab if random.Random(n + i).random() < 0.3 else t
                        for i, t in enumerate(out[n : n + k])]
        return []


def _llm(folder, references=None, vocab=0, **kwargs) -> LLM:
    llm = LLM(folder, dtype="float32", speculative_config=SPEC, **{"kv_cache_memory": 16 << 20, **kwargs})
    if references is not None:
        llm.engine.scheduler.proposer = Oracle(references, vocab)
    return llm


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _assert_accepted_and_rejected(llm: LLM) -> None:
    stats = llm.engine.scheduler.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats


def test_draft_rows_leave_the_state_after_each_row_as_decoding_them_does():
    """One batch: a sequence verifying 1 + 3 rows, a prompt's last 3 rows from zeros with 2 drafts,
    and a plain decode. Each kept state, and each output row, equals running the tokens one step
    at a time (to the projections' rounding over a different batch); the slots read are untouched
    (a failed step reruns from them)."""
    torch.manual_seed(0)
    gdn = GatedDeltaNet(64, 2, 4, 16, 24, 4, 1e-6)
    with torch.no_grad():
        for p in gdn.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    spec = gdn.state_spec(torch.float32)
    conv, state = torch.randn(16, *spec.conv_shape), torch.randn(16, *spec.state_shape)
    x = torch.randn(10, 64)
    cache = (conv, state)
    before = conv.clone(), state.clone()
    # sequence 0 reads slot 0, rows 0..3; sequence 1 from zeros, rows 4..8; sequence 2 reads 8, row 9
    meta = RecurrentMetadata.build([4, 5, 1], [0, 4, 8], [1, 5, 9], [True, False, True], torch.device("cpu"),
                                   [[2, 3, 10], [6, 7], []])
    with torch.no_grad():
        out = gdn(x, meta, cache)
    for s in (0, 8):
        assert torch.equal(conv[s], before[0][s]) and torch.equal(state[s], before[1][s])

    def alone(rows, slot, has_state):
        """Each group of rows as its own step, from `slot`, each step's state into a fresh slot."""
        c, st = before[0].clone(), before[1].clone()
        outs, states, src = [], [], slot
        for i, r in enumerate(rows):
            m = RecurrentMetadata.build([len(r)], [src], [12 + i], [has_state or i > 0], torch.device("cpu"))
            with torch.no_grad():
                outs.append(gdn(x[r], m, (c, st)))
            states.append((c[12 + i].clone(), st[12 + i].clone()))
            src = 12 + i
        return torch.cat(outs), states

    for rows, slot, has_state, kept_in, out_rows in (
            ([[0], [1], [2], [3]], 0, True, [10, 3, 2, 1], slice(0, 4)),  # state j back in rewind[j - 1]
            ([[4, 5, 6], [7], [8]], 4, False, [7, 6, 5], slice(4, 9)),
            ([[9]], 8, True, [9], slice(9, 10))):
        want_out, want_states = alone([torch.tensor(r) for r in rows], slot, has_state)
        torch.testing.assert_close(out[out_rows], want_out, rtol=1e-5, atol=1e-5)
        for (c, st), dst in zip(want_states, kept_in):
            torch.testing.assert_close((conv[dst], state[dst]), (c, st), rtol=1e-5, atol=1e-5)


def test_greedy_identical_alone_batched_chunked(checkpoint, solo):
    folder, vocab = checkpoint
    prompts = _prompts(vocab, (1, 17, 40, 6), seed=7)  # a one-token prompt drafts from its first step
    expected = [solo(p, 16) for p in prompts]
    refs = {tuple(p): e for p, e in zip(prompts, expected)}
    alone = _llm(folder, refs, vocab)
    assert [_ids(alone, [p], _greedy(16))[0] for p in prompts] == expected
    # a 9-token budget chunks the prompts and squeezes four decoding requests' drafts
    batched = _llm(folder, refs, vocab, max_num_batched_tokens=9)
    assert _ids(batched, prompts, _greedy(16)) == expected
    for llm in (alone, batched):
        _assert_accepted_and_rejected(llm)
        _assert_idle_and_whole(llm)


@pytest.mark.parametrize("name", ["next-interval4-moe", "qwen3_5-interval4"])
def test_prompt_lookup_on_repetitive_prompts(name, tmp_path):
    """Prompt lookup proper. The tiny model is made to echo: its LM head reads the embedding, which
    is scaled up in the residual stream, so the current token mostly wins and the text repeats in
    runs, while the layers (their state included) still decide where a run ends."""
    folder, ref = make_checkpoint(name, tmp_path / "random")
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.model.embed_tokens.weight)
        ref.model.embed_tokens.weight.mul_(3.0)
    ref.save_pretrained(tmp_path / "echo")
    prompts = [p * 3 for p in _prompts(ref.config.vocab_size, (3, 5, 8), seed=8)]
    plain = LLM(tmp_path / "echo", dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    expected = _ids(plain, prompts, _greedy(24))
    llm = _llm(tmp_path / "echo", max_num_batched_tokens=12)
    assert _ids(llm, prompts, _greedy(24)) == expected
    assert [_ids(llm, [p], _greedy(24))[0] for p in prompts] == expected
    _assert_accepted_and_rejected(llm)
    _assert_idle_and_whole(llm)


def test_chat_turn_two_resumes_from_a_checkpoint_with_drafts(checkpoint, solo):
    """Turn 1 decodes with drafts; turn 2 resumes from the checkpoint at turn 1's junction (no state
    after a draft was ever checkpointed) and decodes with drafts too."""
    folder, vocab = checkpoint
    [history, header, answer, question] = _prompts(vocab, (45, 4, 7, 6), seed=9)
    turn1, turn2 = history + header, history + header + answer + question
    refs = {tuple(turn1): solo(turn1, 12), tuple(turn2): solo(turn2, 12)}
    llm = _llm(folder, refs, vocab, block_size=8)
    engine = llm.engine
    req = engine.make_request(turn1, _greedy(12))
    req.junction = len(history)
    engine.add(req)
    while engine.has_unfinished_requests():
        engine.step()
    assert req.output_token_ids == refs[tuple(turn1)]
    assert _ids(llm, [turn2], _greedy(12))[0] == refs[tuple(turn2)]
    assert engine.scheduler.stats.prefix_hit_tokens == 40  # the block before the junction
    _assert_accepted_and_rejected(llm)
    _assert_idle_and_whole(llm)


def test_preempted_equals_not_preempted(checkpoint, solo):
    folder, vocab = checkpoint
    prompts = _prompts(vocab, (150, 160, 140, 170), seed=5)
    expected = [solo(p, 24) for p in prompts]
    # state slots for two running sequences (six each), KV blocks for 344 tokens: the second of two
    # running sequences gets preempted as they grow
    llm = _llm(folder, {tuple(p): e for p, e in zip(prompts, expected)}, vocab, kv_cache_memory=600 << 10,
               block_size=8, max_model_len=256)
    assert llm.engine.cache.slots.num_slots == 2 * (2 + K) + 6 and llm.engine.pool.num_blocks == 43
    assert _ids(llm, prompts, _greedy(24)) == expected
    assert llm.engine.scheduler.stats.preemptions > 0
    _assert_accepted_and_rejected(llm)
    _assert_idle_and_whole(llm)


def test_seeded_sampling_equals_non_speculative(checkpoint):
    folder, vocab = checkpoint
    prompts = _prompts(vocab, (5, 12), seed=10)
    params = [SamplingParams(temperature=0.8, top_k=3, max_tokens=16, ignore_eos=True, seed=s) for s in (1, 2)]
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    expected = [_ids(plain, [p], q)[0] for p, q in zip(prompts, params)]
    llm = _llm(folder, {tuple(p): e for p, e in zip(prompts, expected)}, vocab, max_num_batched_tokens=8)
    assert _ids(llm, prompts, params) == expected
    _assert_accepted_and_rejected(llm)
    _assert_idle_and_whole(llm)
