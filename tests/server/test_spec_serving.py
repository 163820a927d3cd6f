"""Speculative decoding behind the server: streamed greedy chat through the `openai` SDK says the
same with and without prompt lookup, and /metrics shows vLLM's spec_decode counters moving.

On the bundled model, whose reasoning restates the question's digits (drafts get accepted)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families
from test_server import serve, wait_idle

from qwenrun import LLM
from qwenrun.cli.serve import add_serve_parser
from qwenrun.spec_decode import SpeculativeConfig
from qwenrun.spec_decode.policy import DraftPolicy

BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}
QUESTIONS = ("What is 347 * 86?", "Compute 4821 + 3779.")


def _stream(server, question: str) -> tuple[str, str]:
    """(reasoning, content) of one streamed greedy chat completion."""
    reasoning = content = ""
    stream = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=160, stream=True)
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    return reasoning, content


def _scrape(server) -> dict[str, list]:
    with server.http() as http:
        text = http.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(metrics: dict[str, list], family: str, sample: str | None = None, **labels: str) -> float:
    return sum(s.value for s in metrics[family] if s.name == (sample or family)
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_streamed_greedy_chat_is_unchanged_and_metrics_move():
    plain = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20)
    spec = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)
    with serve(plain, name="tiny") as server:
        want = [_stream(server, q) for q in QUESTIONS]
        assert not any(name.startswith("qwenrun_spec_decode") for name in _scrape(server))
    with serve(spec, name="tiny") as server:
        before = _scrape(server)
        got = [_stream(server, q) for q in QUESTIONS]
        wait_idle(spec)
        after = _scrape(server)
    assert got == want and all(content for _, content in want)
    drafted = "qwenrun_spec_decode_num_draft_tokens"
    accepted = "qwenrun_spec_decode_num_accepted_tokens"
    moved = {name: _value(after, name, name + "_total") - _value(before, name, name + "_total")
             for name in (drafted, accepted)}
    assert moved[drafted] > moved[accepted] > 0
    stats = spec.engine.scheduler.stats
    assert (_value(after, drafted, drafted + "_total"), _value(after, accepted, accepted + "_total")) == \
        (stats.draft_tokens, stats.accepted_tokens)
    rate = _value(after, "qwenrun_spec_decode_draft_acceptance_rate")
    assert rate == pytest.approx(stats.accepted_tokens / stats.draft_tokens)


def test_draft_policy_counts_are_exported(monkeypatch):
    """Drafts per step and accepted per position come from the scheduler's DraftPolicy."""
    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)
    policy = DraftPolicy(4)
    monkeypatch.setattr(llm.engine.scheduler, "policy", policy, raising=False)
    llm.engine.scheduler.stats.draft_tokens, llm.engine.scheduler.stats.accepted_tokens = 7, 4
    for drafted, accepted in ((4, 3), (3, 1)):
        policy.observe("r", drafted, accepted)
    with serve(llm, name="tiny") as server:
        metrics = _scrape(server)
    per_pos = "qwenrun_spec_decode_num_accepted_tokens_per_pos"
    assert [_value(metrics, per_pos, per_pos + "_total", position=str(i)) for i in range(4)] == [2, 1, 1, 0]
    drafts = "qwenrun_spec_decode_num_drafts"
    assert _value(metrics, drafts, drafts + "_total") == 2
    assert _value(metrics, "qwenrun_spec_decode_mean_acceptance_length") == 1 + 4 / 2


def test_serve_flag_parses_vllm_json_and_names_a_bad_field(capsys):
    parser = argparse.ArgumentParser(prog="qwenrun")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert args.speculative_config == SpeculativeConfig("ngram", 3)
    assert parser.parse_args(["serve"]).speculative_config is None
    for bad, said in (('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
                      ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -1}',
                       "disable_by_batch_size"),
                      ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
                      ("{method: ngram}", "expected a JSON object")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["serve", "--speculative-config", bad])
        assert exit_.value.code == 2
        assert "--speculative-config" in (err := capsys.readouterr().err) and said in err, err
