"""The typed step: `ModelRunner.prepare` builds a `ForwardBatch`, the model takes only that,
`Scheduler.update` alone advances requests, and a forced early-stop text is prefilled in one step."""

from __future__ import annotations

import pytest
import torch

from qwenrun import LLM, SamplingParams
from qwenrun.engine.request import EARLY_STOP_TEXT, StepResult
from qwenrun.layers.forward_batch import ForwardBatch
from steered import make_steered_checkpoint
from tiny import make_checkpoint

NL, NLNL, THINK, HMM, YES, IM_END = 198, 271, 151667, 87501, 9454, 151645
LOOP = {NL: THINK, THINK: HMM, HMM: HMM, NLNL: YES, YES: IM_END}


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    folder, _ = make_checkpoint("dense-tied-mha", tmp_path_factory.mktemp("step"))
    return LLM(folder, dtype="float32", kv_cache_memory=8 << 20, block_size=8, max_num_batched_tokens=12)


def test_prepare_builds_one_forward_batch_with_logits_rows_for_finished_chunks(tiny):
    engine = tiny.engine
    long = engine.add_request(list(range(1, 21)), _greedy(3))  # 20 tokens: a first chunk of 12
    batch = engine.scheduler.schedule()
    fb = engine.runner.prepare(batch)
    assert isinstance(fb, ForwardBatch) and fb.num_tokens == 12
    assert fb.logits_counts == [0] and fb.logits_rows.tolist() == []
    assert fb.positions.tolist() == list(range(12)) and fb.input_ids.tolist() == list(range(1, 13))
    result = engine.runner.execute(batch, fb)
    assert result.token_ids == [[]] and long.num_computed_tokens == 0  # the runner changed nothing
    engine.scheduler.update(batch, result)
    assert long.num_computed_tokens == 12
    short = engine.add_request([5, 6, 7], _greedy(3))
    batch = engine.scheduler.schedule()
    assert batch.requests == [long, short] and batch.num_tokens == [8, 3]
    fb = engine.runner.prepare(batch)
    assert fb.logits_counts == [1, 1] and fb.logits_rows.tolist() == [7, 10]
    assert fb.positions.tolist() == list(range(12, 20)) + [0, 1, 2]
    hidden = engine.runner.model(fb)
    assert hidden.shape == (11, engine.config.hidden_size)
    result = engine.runner.execute(batch, fb)
    assert [len(t) for t in result.token_ids] == [1, 1]
    # a failed request's state stays where it was scheduled
    engine.scheduler.update(batch, StepResult(result.token_ids, result.logprobs, [None, RuntimeError("x")]))
    assert (long.num_computed_tokens, short.num_computed_tokens) == (20, 0)
    for rid in (long.request_id, short.request_id):
        engine.abort(rid)
    engine.cache.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_model_without_cache_equals_the_paged_path(tiny):
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    model = tiny.engine.runner.model
    t = torch.tensor(ids)
    with torch.inference_mode():
        hidden = model(ForwardBatch.without_cache(t, torch.arange(len(ids)), [len(ids)]))
        whole = model.compute_logits(hidden)
    torch.testing.assert_close(whole, tiny.logits(ids))


@pytest.fixture(scope="module")
def steered(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("steered"), qwen3_tokenizer_dir, LOOP)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)


def test_forced_early_stop_text_is_prefilled_in_one_step(steered, monkeypatch):
    engine, early = steered.engine, steered.tokenizer.encode(EARLY_STOP_TEXT)
    assert len(early) == 24
    steps: list[list[int]] = []
    real = engine.runner.execute

    def execute(batch, fb):
        steps.append(list(batch.num_tokens))
        return real(batch, fb)

    monkeypatch.setattr(engine.runner, "execute", execute)
    prompt = steered.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    req = engine.add_request(prompt, SamplingParams(temperature=0, thinking_budget=1))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [d.new_token_ids for d in engine.step()]
    assert req.output_token_ids == [THINK, HMM] + early + [YES, IM_END]
    # the prefill samples <think>, <think> samples " hmm" (the budget is spent: the whole early-stop
    # text follows it), " hmm" and the 24 forced tokens go in one forward, then "Yes"
    assert steps == [[len(prompt)], [1], [25], [1]]
    assert deltas == [[THINK], [HMM] + early, [YES], [IM_END]]
    engine.cache.check_integrity()


def test_budget_zero_in_an_open_prompt_replaces_the_first_sample_with_the_whole_text(steered):
    tok = steered.tokenizer
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    [out] = steered.generate([prompt], SamplingParams(temperature=0, thinking_budget=0))
    assert out.outputs[0].token_ids == tok.encode(EARLY_STOP_TEXT) + [YES, IM_END]
