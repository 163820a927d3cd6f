"""SamplingParams validation and the batched sampler, checked against transformers' warpers.

Every random draw is seeded, so the statistical tests cannot flake.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenrun.errors import InvalidRequestError
from qwenrun.sampling import (
    SamplingBatch,
    SamplingParams,
    compute_logprobs,
    make_generator,
    mask_vocab,
    sample,
)
from qwenrun.sampling.sampler import apply_top_k_top_p, process_logits

QWEN3_GEN_CONFIG = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                    "eos_token_id": [151645, 151643]}


def build(params: list[SamplingParams], vocab_size: int, *, outputs: list[list[int]] | None = None,
          prompts: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None,
          eos_token_ids: tuple[int, ...] = ()) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.build(
        params, outputs or [[] for _ in range(rows)], prompts or [[] for _ in range(rows)],
        generators or [None] * rows, vocab_size, "cpu", eos_token_ids=eos_token_ids)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --- SamplingParams ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be in [0, 2], got -1"),
    ({"temperature": 2.5}, "temperature must be in [0, 2], got 2.5"),
    ({"temperature": 1e39}, "temperature must be in [0, 2], got 1e+39"),  # inf in float32
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": 10**400}, "temperature must be a finite number, got an integer of 1329 bits"),
    ({"temperature": "1"}, "temperature must be a finite number, got '1'"),
    ({"temperature": True}, "temperature must be a finite number, got True"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": float("inf")}, "top_p must be a finite number, got inf"),
    ({"top_k": -2}, "top_k must be -1 or 0 (off) or an integer >= 1, got -2"),
    ({"top_k": 2.5}, "top_k must be -1 or 0 (off) or an integer >= 1, got 2.5"),
    ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
    ({"min_p": -5e-324}, "min_p must be in [0, 1], got -5e-324"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
    ({"repetition_penalty": 0}, "repetition_penalty must be in [0.01, 2], got 0"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty must be in [0.01, 2], got 5e-324"),
    ({"repetition_penalty": 2.01}, "repetition_penalty must be in [0.01, 2], got 2.01"),
    ({"n": 0}, "n must be an integer >= 1, got 0"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1 or None, got 0"),
    ({"max_tokens": 1.0}, "max_tokens must be an integer >= 1 or None, got 1.0"),
    ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens, got min_tokens=5"),
    ({"logprobs": -1}, "logprobs must be an integer >= 0 or None, got -1"),
    ({"thinking_budget": -1}, "thinking_budget must be an integer >= 0 or None, got -1"),
    ({"seed": "7"}, "seed must be an integer in [-2**63, 2**64) or None, got '7'"),
    ({"seed": 2**64}, "seed must be an integer in [-2**63, 2**64) or None, got 1844674407370955"),
    ({"stop": ["ok", ""]}, "stop must be a non-empty string or a list of non-empty strings"),
    ({"stop": [1]}, "stop must be a non-empty string or a list of non-empty strings, got [1]"),
    ({"stop": ["s"] * 65}, "stop takes at most 64 strings, got 65"),
    ({"stop": "x" * 1025}, "stop strings must be at most 1024 characters, got 1025"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids must be a list of integers in [0, 2**31)"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids must be a list of integers in [0, 2**31)"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of integers in [0, 2**31), got 5"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids takes at most 1024 ids, got 1025"),
    ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
    ({"skip_special_tokens": None}, "skip_special_tokens must be a bool, got None"),
])
def test_validation_messages_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
        SamplingParams(**kwargs)
    assert info.value.param == message.split()[0]  # the field the message starts with
    assert len(str(info.value)) < 200  # a megabyte sent in a field is not echoed back


def test_values_at_the_edges_of_each_range_are_accepted() -> None:
    edges = SamplingParams(temperature=2, top_p=5e-324, min_p=1, presence_penalty=-2,
                           frequency_penalty=2, repetition_penalty=0.01, top_k=10**30,
                           seed=-(2**63), stop_token_ids=[2**31 - 1], stop=["x" * 1024] * 64)
    assert edges.temperature == 2.0 and isinstance(edges.temperature, float)
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy


def test_defaults_normalisation_and_greedy() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1, 1.0, 1.0, 0, 0.0)
    assert params.stop == [] and params.stop_token_ids == [] and params.max_tokens is None
    assert not params.greedy
    assert SamplingParams(stop="</s>").stop == ["</s>"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0).temperature == 0.0
    assert SamplingParams(top_k=-1).top_k == -1  # -1 and 0 both mean off, as in vLLM


def test_from_generation_config_qwen3() -> None:
    params = SamplingParams.from_generation_config(QWEN3_GEN_CONFIG)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 20, 0.95, 0.0)
    assert not params.greedy and params.max_tokens is None

    overridden = SamplingParams.from_generation_config(
        QWEN3_GEN_CONFIG, temperature=0.0, top_p=None, max_tokens=64, seed=3)
    assert overridden.greedy and overridden.top_p == 0.95  # None overrides keep the file's value
    assert (overridden.max_tokens, overridden.seed, overridden.top_k) == (64, 3, 20)

    base = SamplingParams.from_generation_config({"do_sample": False, "max_new_tokens": 2048})
    assert base.greedy and base.max_tokens == 2048
    assert not SamplingParams.from_generation_config({"do_sample": False}, temperature=0.7).greedy
    assert SamplingParams.from_generation_config({}) == SamplingParams()


def test_from_generation_config_rejects_bad_input() -> None:
    unknown = r"unknown sampling parameter\(s\): best_of"
    with pytest.raises(InvalidRequestError, match=unknown) as info:
        SamplingParams.from_generation_config(QWEN3_GEN_CONFIG, best_of=2)
    assert info.value.param == "best_of"
    with pytest.raises(InvalidRequestError, match="top_p must be in"):
        SamplingParams.from_generation_config({"top_p": 0})


# --- greedy and limits ------------------------------------------------------------------------

def test_all_greedy_is_argmax_for_any_dtype() -> None:
    logits = random_logits(6, 500)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cast = logits.to(dtype)
        batch = build([SamplingParams(temperature=0)] * 6, 500)
        assert batch.all_greedy and not batch.has_penalties
        tokens = sample(cast, batch)
        assert tokens.dtype == torch.int64 and torch.equal(tokens, cast.argmax(-1))


def test_mixed_batch_greedy_rows_take_argmax() -> None:
    logits = random_logits(8, 300, scale=1.0)  # flat enough that sampled rows rarely hit argmax
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams(temperature=1.5)
              for i in range(8)]
    torch.manual_seed(0)
    tokens = sample(logits, build(params, 300))
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))


def test_top_k_1_and_tiny_temperature_equal_greedy() -> None:
    logits = random_logits(64, 1000)
    torch.manual_seed(0)
    assert torch.equal(sample(logits, build([SamplingParams(top_k=1)] * 64, 1000)),
                       logits.argmax(-1))
    assert torch.equal(sample(logits, build([SamplingParams(temperature=1e-3)] * 64, 1000)),
                       logits.argmax(-1))


def test_tiny_top_p_keeps_exactly_the_most_likely_token() -> None:
    logits = random_logits(4, 500)
    # 1e-300 is 0 in float32; the partial (top-k) path once indexed column -1 for it and raised.
    for params in (SamplingParams(top_p=1e-9), SamplingParams(top_p=1e-9, top_k=30),
                   SamplingParams(top_p=1e-300), SamplingParams(top_p=1e-300, top_k=30)):
        kept = ~torch.isinf(process_logits(logits, build([params] * 4, 500)))
        assert kept.sum(-1).tolist() == [1, 1, 1, 1]
        assert torch.equal(kept.int().argmax(-1), logits.argmax(-1))


# --- filters against transformers ---------------------------------------------------------------

def hf_filtered(row: torch.Tensor, temperature: float, top_k: int, top_p: float,
                min_p: float) -> torch.Tensor:
    """transformers' warper chain, in generate()'s order, on one row of logits."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, row[None].clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores[0]


FILTER_CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 1, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 50, 1.0, 0.0), (1.0, 0, 0.1, 0.0),
    (1.0, 0, 0.5, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (1.0, 0, 1.0, 0.3),
    (0.7, 20, 0.95, 0.0), (0.6, 50, 0.8, 0.02), (1.3, 0, 0.9, 0.1), (0.5, 10, 1.0, 0.2),
]


def test_filters_keep_the_same_tokens_as_transformers() -> None:
    vocab = 1000
    logits = random_logits(len(FILTER_CASES), vocab, scale=2.0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in FILTER_CASES]
    ours = process_logits(logits, build(params, vocab))
    for row, case in enumerate(FILTER_CASES):
        theirs = hf_filtered(logits[row], *case)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs)), case
        kept = ~torch.isinf(theirs)
        torch.testing.assert_close(ours[row][kept], theirs[kept])


def test_top_k_batches_take_the_partial_path_with_the_same_sets() -> None:
    vocab = 1000
    cases = [case for case in FILTER_CASES if case[1] > 0]
    logits = random_logits(len(cases) + 1, vocab, seed=3, scale=2.0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in cases]
    batch = build(params + [SamplingParams(temperature=0)], vocab)
    assert batch.max_top_k == 50  # the greedy row's k = 1 does not force a full sort
    ours = process_logits(logits, batch)
    for row, case in enumerate(cases):
        theirs = hf_filtered(logits[row], *case)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs)), case
    assert ours[-1].argmax() == logits[-1].argmax()


def test_a_row_without_top_p_keeps_its_top_k_beside_a_row_with_it() -> None:
    """One row's top_p must not cut another's set: in float32 the mass before a tail token of a
    confident row rounds to exactly 1, which `< top_p` = 1 would drop."""
    logits = -torch.arange(100.0).expand(2, 100) / 100  # distinct: no ties at the k-th value
    logits[:, 0] = 30.0  # p rounds to 1: the other 19 kept tokens hold ~1e-13 each
    batch = build([SamplingParams(top_k=20), SamplingParams(top_k=20, top_p=0.5)], 100)
    assert batch.top_p is not None and batch.max_top_k == 20  # the partial path
    kept = (~torch.isinf(process_logits(logits, batch))).sum(-1)
    alone = process_logits(logits[:1], build([SamplingParams(top_k=20)], 100))
    assert (~torch.isinf(alone)).sum().item() == 20
    assert kept.tolist() == [20, 1]


def test_top_k_keeps_ties_like_transformers_on_bf16_logits() -> None:
    vocab = 4000
    logits = (random_logits(2, vocab, seed=4) * 4).round().to(torch.bfloat16) / 4  # many exact ties
    batch = build([SamplingParams(top_k=20), SamplingParams(top_k=20, top_p=0.99)], vocab)
    ours = process_logits(logits, batch)
    theirs = TopKLogitsWarper(20)(None, logits.float())
    assert (~torch.isinf(theirs)).sum(-1).min() > 20  # ties at the 20th value exist
    assert torch.equal(torch.isinf(ours[0]), torch.isinf(theirs[0]))
    sorted_path = apply_top_k_top_p(logits.float(), batch.top_k, None, vocab)
    assert torch.equal(torch.isinf(ours[0]), torch.isinf(sorted_path[0]))
    # At the top-p cutoff the partial path keeps every tie; transformers keeps an arbitrary subset.
    chain = TopPLogitsWarper(0.99)(None, theirs[1:])[0]
    extra = ~torch.isinf(ours[1]) & torch.isinf(chain)
    assert not (torch.isinf(ours[1]) & ~torch.isinf(chain)).any()
    assert (logits[1][extra].float() == ours[1][~torch.isinf(ours[1])].min()).all()


def test_samples_stay_inside_the_filtered_support() -> None:
    vocab, copies = 200, 400
    base = random_logits(len(FILTER_CASES), vocab, scale=2.0)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in FILTER_CASES]
    logits = base.repeat_interleave(copies, dim=0)
    torch.manual_seed(1)
    tokens = sample(logits, build([p for p in params for _ in range(copies)], vocab))
    for row, case in enumerate(FILTER_CASES):
        support = ~torch.isinf(hf_filtered(base[row], *case))
        drawn = tokens[row * copies:(row + 1) * copies]
        assert support[drawn].all(), case


# --- penalties --------------------------------------------------------------------------------

def test_repetition_penalty_matches_transformers() -> None:
    vocab = 50
    logits = random_logits(3, vocab)
    prompts = [[1, 2, 3, 3, 40], [5, 6], [7, 8, 9]]
    outputs = [[3, 10, 10], [], [9, 11]]
    penalties = [1.3, 0.7, 1.0]
    batch = build([SamplingParams(temperature=0, repetition_penalty=r) for r in penalties], vocab,
                  prompts=prompts, outputs=outputs)
    assert batch.has_penalties
    ours = process_logits(logits, batch)
    for row, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[row] + outputs[row]])
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[row:row + 1].clone())[0]
        torch.testing.assert_close(ours[row], theirs, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0]])
    batch = build([SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.0)], 5,
                  prompts=[[0, 0, 4]], outputs=[[1, 3, 3, 3]])
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 1.0, 0.5, 3.0 - 0.5 - 3.0, 0.0]])
    torch.testing.assert_close(process_logits(logits, batch), expected)
    # The penalty changes the greedy pick: token 3 drops below token 0.
    assert sample(logits, batch).tolist() == [0]


def test_no_penalty_work_when_all_neutral_and_empty_outputs_are_fine() -> None:
    params = [SamplingParams(), SamplingParams(temperature=0)]
    assert not build(params, 10, outputs=[[1, 2], [3]]).has_penalties
    batch = build([SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2)] * 2, 10,
                  prompts=[[1], []])
    logits = random_logits(2, 10)
    expected = logits.clone()
    expected[0, 1] = torch.where(logits[0, 1] < 0, logits[0, 1] * 1.2, logits[0, 1] / 1.2)
    torch.testing.assert_close(process_logits(logits, batch), expected)


def test_min_tokens_bans_stop_tokens_until_reached() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 7] = 10.0  # EOS
    logits[:, 6] = 9.0  # a stop_token_id
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)]
    batch = build(params, 8, outputs=[[1], [1, 2], []], eos_token_ids=(7,))
    assert sample(logits, batch).tolist() == [0, 7, 7]


# --- seeds, distribution, logprobs, vocab padding ---------------------------------------------

def seeded_run(seed: int, row: int, others: list[SamplingParams], steps: int = 12) -> list[int]:
    """Tokens of one seeded request placed at `row` among `others`, over `steps` steps."""
    vocab = 64
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    params = others[:row] + [target] + others[row:]
    generators = [make_generator(p.seed, "cpu") for p in params]
    step_logits = torch.Generator().manual_seed(123)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(len(params), vocab, generator=step_logits)
        logits[row] = torch.randn(vocab, generator=torch.Generator().manual_seed(len(tokens)))
        tokens.append(int(sample(logits, build(params, vocab, generators=generators))[row]))
    return tokens


def test_seeded_request_is_reproducible_in_any_batch() -> None:
    alone = seeded_run(7, 0, [])
    assert seeded_run(7, 0, []) == alone
    torch.manual_seed(99)  # other rows' global draws must not leak into the seeded row
    mixed = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=1, top_k=5)]
    assert seeded_run(7, 2, mixed) == alone
    assert seeded_run(7, 1, mixed[:1]) == alone
    assert seeded_run(8, 0, []) != alone


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is p = 0.001."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def assert_matches(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """Draws follow `expected`: none outside its support, small TV, chi-square below p = 0.001."""
    draws = tokens.numel()
    observed = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert (observed[~support] == 0).all()
    assert 0.5 * (observed / draws - expected).abs().sum() < 0.02
    deviation = (observed - draws * expected)[support] ** 2 / (draws * expected[support])
    assert deviation.sum() < chi_square_critical(int(support.sum()) - 1)


def test_empirical_distribution_matches_softmax() -> None:
    vocab, draws, temperature = 12, 20_000, 0.7
    logits = random_logits(1, vocab, seed=5, scale=1.0)
    torch.manual_seed(2024)
    tokens = sample(logits.expand(draws, vocab),
                    build([SamplingParams(temperature=temperature)] * draws, vocab))
    assert_matches(tokens, torch.softmax(logits[0] / temperature, dim=-1).double())


def test_empirical_distribution_after_filters_matches_transformers() -> None:
    vocab, draws = 30, 20_000
    logits = random_logits(1, vocab, seed=6, scale=1.5)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    expected = torch.softmax(hf_filtered(logits[0], 0.8, 10, 0.9, 0.05), dim=-1).double()
    assert 2 < int((expected > 0).sum()) < 10  # every filter matters on this row
    torch.manual_seed(2025)
    assert_matches(sample(logits.expand(draws, vocab), build([params] * draws, vocab)), expected)


def test_seeded_draws_follow_the_distribution() -> None:
    vocab, steps = 8, 4000
    logits = random_logits(1, vocab, seed=7, scale=1.0)
    params = [SamplingParams(temperature=1.0, seed=42)]
    generators = [make_generator(42, "cpu")]
    batch = build(params, vocab, generators=generators)
    tokens = torch.cat([sample(logits, batch) for _ in range(steps)])
    assert_matches(tokens, torch.softmax(logits[0], dim=-1).double())


def test_compute_logprobs_uses_raw_log_softmax() -> None:
    logits = random_logits(4, 100).to(torch.bfloat16)
    chosen_ids = torch.tensor([0, 5, 99, 42])
    chosen, top_ids, top_logprobs = compute_logprobs(logits, chosen_ids, 3)
    reference = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(chosen, reference[torch.arange(4), chosen_ids])
    torch.testing.assert_close(top_logprobs, reference.topk(3).values)
    assert torch.equal(top_ids, reference.topk(3).indices)
    assert (top_logprobs[:, :-1] >= top_logprobs[:, 1:]).all()
    _, empty_ids, empty = compute_logprobs(logits, chosen_ids, 0)
    assert empty_ids.shape == (4, 0) and empty.shape == (4, 0)


def test_mask_vocab_never_samples_padding() -> None:
    logits = random_logits(4, 40)
    logits[:, 35:] = 100.0  # padded LM-head columns with huge logits
    masked = mask_vocab(logits, 35)
    assert masked is logits and torch.isinf(logits[:, 35:]).all()
    assert (sample(logits, build([SamplingParams(temperature=0)] * 4, 40)) < 35).all()
    torch.manual_seed(0)
    hot = build([SamplingParams(temperature=2.0)] * 200, 40)
    assert (sample(logits.repeat(50, 1), hot) < 35).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_sample_does_not_sync_on_cuda() -> None:
    device = torch.device("cuda")
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, top_p=0.9, min_p=0.05, seed=3),
              SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, min_tokens=4),
              SamplingParams()]
    batch = SamplingBatch.build(params, [[1, 2]] * 4, [[3]] * 4,
                                [make_generator(p.seed, device) for p in params], 1000, device,
                                eos_token_ids=(7,))
    logits = torch.randn(4, 1000, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,)


# --- float extremes: validated values never make the sampler raise ----------------------------

VOCAB, VALID = 64, 60  # the last 4 columns are padding, masked as the runner masks them
_EDGE_FLOATS = [
    0.0, -0.0, 5e-324, -5e-324, 1e-300, 1e-45, 1.4e-45, 1.1754943508222875e-38, 1e-30, 9.99e-6,
    1e-5, 1.00001e-5, 0.00999, 0.01, 0.5, 1 - 2**-53, 1.0, 1 + 2**-52, -2.0, 2.0,
    2.0000000000000004, 3.4028234663852886e38, 3.5e38, 1e39, 1e308, math.inf, -math.inf, math.nan,
]
_EDGE_INTS = [
    -(2**63) - 1, -(2**63), -2, -1, 0, 1, 2, 5, 59, 60, 63, 64, 65, 2**31 - 1, 2**31, 2**63 - 1,
    2**63, 2**64 - 1, 2**64, 10**30,
]
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_INT_FIELDS = ("top_k", "seed", "max_tokens", "min_tokens", "logprobs", "thinking_budget")

_ANY_FLOAT = st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(), st.floats(-3, 3),
                       st.integers(-3, 3), st.sampled_from([10**400, True, "1", None]))
_ANY_INT = st.one_of(st.sampled_from(_EDGE_INTS), st.integers(-3, 70), st.integers(),
                     st.sampled_from([1.0, 2.5, math.nan, True, "3"]))
_ANY_VALUE = {
    **{name: _ANY_FLOAT for name in _FLOAT_FIELDS},
    **{name: _ANY_INT | st.none() for name in _INT_FIELDS},
    "stop_token_ids": st.none() | st.lists(_ANY_INT, max_size=4),
    "ignore_eos": st.booleans() | st.integers(0, 1),
}


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(kwargs=st.fixed_dictionaries({}, optional=_ANY_VALUE))
def test_any_value_is_accepted_in_float32_range_or_rejected_naming_its_field(kwargs: dict) -> None:
    try:
        params = SamplingParams(**kwargs)
    except InvalidRequestError as e:
        assert e.param in kwargs, (e.param, str(e))
        return
    for name in _FLOAT_FIELDS:
        value = getattr(params, name)
        assert type(value) is float and math.isfinite(value)
        assert math.isfinite(torch.tensor(value, dtype=torch.float32).item())  # the sampler's
    assert -2 <= params.presence_penalty <= 2 and 0.01 <= params.repetition_penalty <= 2
    assert 0 <= params.temperature <= 2 and 0 < params.top_p <= 1 and 0 <= params.min_p <= 1


# Accepted values: each range's edges (and float32's: subnormals, values that round to 0), plus
# anything inside it.
_ACCEPTED = {
    "temperature": st.sampled_from([0.0, 5e-324, 9.99e-6, 1e-5, 1.00001e-5, 1e-3, 2.0])
    | st.floats(0, 2),
    "top_p": st.sampled_from([5e-324, 1e-300, 1e-45, 1e-38, 1e-9, 0.5, 1 - 2**-53, 1.0])
    | st.floats(0, 1, exclude_min=True),
    "min_p": st.sampled_from([0.0, 5e-324, 1e-45, 1e-9, 0.5, 1 - 2**-53, 1.0]) | st.floats(0, 1),
    "presence_penalty": st.sampled_from([-2.0, -5e-324, 0.0, 5e-324, 2.0]) | st.floats(-2, 2),
    "frequency_penalty": st.sampled_from([-2.0, -5e-324, 0.0, 5e-324, 2.0]) | st.floats(-2, 2),
    "repetition_penalty": st.sampled_from([0.01, 0.0100001, 0.5, 1.0, 1 + 2**-52, 2.0])
    | st.floats(0.01, 2),
    "top_k": st.sampled_from([-1, 0, 1, 2, VALID - 1, VALID, VOCAB, 2**31, 10**30])
    | st.integers(1, 100),
    "seed": st.sampled_from([None, 0, -(2**63), 2**64 - 1]) | st.integers(-(2**63), 2**64 - 1),
    "min_tokens": st.sampled_from([0, 1, 3, 10**9]),
    "stop_token_ids": st.lists(st.sampled_from([0, 1, VALID - 2, VALID, VOCAB, 2**31 - 1]),
                               max_size=4),
    "ignore_eos": st.booleans(),
}
_LOGIT_KINDS = ["normal", "tiny", "huge", "some +inf", "some nan", "all -inf", "all nan", "mixed"]


def _poisoned_row(kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=gen) * 3
    pick = torch.randint(0, VOCAB, (5,), generator=gen)
    if kind == "tiny":
        row *= 1e-30
    elif kind == "huge":
        row = row.sign() * 3.4e38
    elif kind == "some +inf":
        row[pick] = math.inf
    elif kind == "some nan":
        row[pick] = math.nan
    elif kind == "all -inf":
        row[:] = -math.inf
    elif kind == "all nan":
        row[:] = math.nan
    elif kind == "mixed":
        row[pick] = torch.tensor([math.inf, -math.inf, math.nan, 3.4e38, -3.4e38])
    return row


def _sample_rows(params: list[SamplingParams], logits: torch.Tensor, histories: list[list[int]],
                 dtype: torch.dtype) -> torch.Tensor:
    """One engine-like step: padded vocab masked, fresh generators, inference mode (the CPU
    kernels' argmax), as ModelRunner samples."""
    with torch.inference_mode():
        x = mask_vocab(logits.to(dtype), VALID)
        batch = build(params, VOCAB, outputs=histories, prompts=histories,
                      generators=[make_generator(p.seed, "cpu") for p in params],
                      eos_token_ids=(VALID - 1,))
        return sample(x, batch)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(kwargs=st.fixed_dictionaries({}, optional=_ACCEPTED),
       kinds=st.lists(st.sampled_from(_LOGIT_KINDS), min_size=1, max_size=3),
       sampled_neighbour=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**16))
@example(kwargs={"top_p": 1e-300, "top_k": 20}, kinds=["normal"], sampled_neighbour=False,
         bf16=False, seed=0)  # the reported crash: index -1 on the top-k path
@example(kwargs={"temperature": 1e-5, "repetition_penalty": 0.01}, kinds=["huge"],
         sampled_neighbour=True, bf16=False, seed=0)
def test_validated_params_never_make_the_sampler_raise_nor_touch_other_rows(
        kwargs: dict, kinds: list[str], sampled_neighbour: bool, bf16: bool, seed: int) -> None:
    """Poisoned rows (extreme accepted values, NaN/inf/huge logits) mixed with healthy ones: the
    sampler returns an id in range for every row, and the healthy rows (one greedy, maybe one
    seeded sampled row) get the tokens they get alone."""
    poisoned = SamplingParams(**kwargs)
    healthy = [SamplingParams(temperature=0)]
    if sampled_neighbour:
        healthy.append(SamplingParams(temperature=0.7, seed=11))
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    healthy_logits = torch.randn(len(healthy), VOCAB, generator=gen) * 3
    healthy_hist = [torch.randint(0, VOCAB, (6,), generator=gen).tolist() for _ in healthy]
    alone = _sample_rows(healthy, healthy_logits, healthy_hist, dtype)

    rows = [("healthy", i) for i in range(len(healthy))]
    rows += [("poisoned", i) for i in range(len(kinds))]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    params, logits, hist = [], [], []
    for what, i in rows:
        if what == "healthy":
            params.append(healthy[i])
            logits.append(healthy_logits[i])
            hist.append(healthy_hist[i])
        else:
            params.append(poisoned)
            logits.append(_poisoned_row(kinds[i], seed + i))
            hist.append(torch.randint(0, VOCAB, (i * 3,), generator=gen).tolist())
    tokens = _sample_rows(params, torch.stack(logits), hist, dtype)

    assert tokens.shape == (len(rows),) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < VOCAB)).all(), tokens
    together = [int(t) for (what, _), t in zip(rows, tokens) if what == "healthy"]
    order = [i for what, i in rows if what == "healthy"]
    assert together == [int(alone[i]) for i in order]
    assert all(t < VALID for t in together)


@pytest.mark.parametrize("seed", [None, 0, 7, 2**64 - 1, 2**64 - 3, -(2**63)])
def test_choices_take_consecutive_seeds_within_the_seed_range(seed):
    """Choice i of n draws from seed + i, wrapping at the range's end: a seed near 2**64 with n > 1
    used to overflow the range and be refused."""
    params = SamplingParams(n=4, seed=seed, temperature=1.0)
    seeds = [params.for_choice(i).seed for i in range(4)]
    if seed is None:
        assert seeds == [None] * 4
    else:
        assert all(-(2**63) <= s < 2**64 for s in seeds) and len(set(seeds)) == 4
        assert seeds[0] == seed
    assert all(params.for_choice(i).n == 1 for i in range(4))
    assert SamplingParams(n=1, seed=seed).for_choice(0).seed == seed


# --- grammar bitmask --------------------------------------------------------------------------

def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, ceil(V / 32)] int32, bit j of word j // 32 = token j (xgrammar's layout)."""
    rows, vocab = allowed.shape
    width = (vocab + 31) // 32
    bits = torch.zeros(rows, width * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    words = (bits.view(rows, width, 32) << torch.arange(32)).sum(-1)  # [B, W] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


MASK_PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=2),
    SamplingParams(temperature=1.2, top_k=40, top_p=0.9, seed=3),
    SamplingParams(temperature=0.8, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3),
]


@pytest.mark.parametrize("params", MASK_PARAMS)
def test_a_constrained_row_samples_only_allowed_tokens(params: SamplingParams) -> None:
    vocab = 3000
    allowed = torch.rand(1, vocab, generator=torch.Generator().manual_seed(0)) < 0.01
    allowed[0, 5] = False  # the stop token min_tokens bans stays banned
    bitmask = pack_bitmask(allowed)
    for step in range(200):
        logits = random_logits(1, vocab, seed=step)
        batch = SamplingBatch.build([params], [[1, 2, 3][: step % 3]], [[4, 7]],
                                    [make_generator(params.seed, "cpu")], vocab, "cpu",
                                    eos_token_ids=(5,), bitmask=bitmask, bitmask_rows=[0])
        token = int(sample(logits, batch)[0])
        assert allowed[0, token]
        if params.greedy and params.repetition_penalty == 1.0:
            assert token == int(logits[0].masked_fill(~allowed[0], -math.inf).argmax())


def test_unconstrained_rows_sample_as_without_a_constrained_row() -> None:
    vocab, steps = 2000, 30
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.2),
              SamplingParams(seed=11, top_k=50, top_p=0.95), SamplingParams(seed=12, min_p=0.1)]
    constrained = SamplingParams(seed=13, temperature=1.0)
    allowed = torch.zeros(1, vocab, dtype=torch.bool)
    allowed[0, 100:140] = True

    def run(with_constrained: bool) -> list[list[int]]:
        rows = params + [constrained] if with_constrained else params
        generators = [make_generator(p.seed, "cpu") for p in rows]
        bitmask = pack_bitmask(torch.cat([torch.ones(len(params), vocab, dtype=torch.bool),
                                          allowed])) if with_constrained else None
        out: list[list[int]] = [[] for _ in rows]
        for step in range(steps):
            logits = random_logits(len(params) + 1, vocab, seed=step)[: len(rows)]
            batch = SamplingBatch.build(rows, out, [[9, 9]] * len(rows), generators, vocab, "cpu",
                                        bitmask=bitmask,
                                        bitmask_rows=[len(params)] if with_constrained else ())
            for row, token in enumerate(sample(logits, batch).tolist()):
                out[row].append(token)
        if with_constrained:
            assert all(allowed[0, t] for t in out[-1])
        return out[: len(params)]

    alone = run(False)
    assert run(True) == alone
    assert len({tuple(o) for o in alone}) == len(params)


def test_no_bitmask_rows_means_no_bitmask_work() -> None:
    batch = build([SamplingParams(temperature=0)] * 2, 100)
    assert batch.bitmask is None and batch.bitmask_rows is None
    ignored = SamplingBatch.build([SamplingParams(temperature=0)] * 2, [[], []], [[], []], [None, None], 100,
                                  "cpu", bitmask=torch.zeros(2, 4, dtype=torch.int32))
    assert ignored.bitmask is None
    with pytest.raises(ValueError, match=r"bitmask must be \[2, 4\] int32, got \(1, 4\)"):
        SamplingBatch.build([SamplingParams()] * 2, [[], []], [[], []], [None, None], 100, "cpu",
                            bitmask=torch.zeros(1, 4, dtype=torch.int32), bitmask_rows=[0])
