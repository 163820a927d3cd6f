"""The `qwenrun` CLI: subprocess runs against a tiny random Qwen3 checkpoint with the real
tokenizer, plus in-process runs of the chat session and `generate` printing against a scripted
LLM, which (unlike a random model) produces reasoning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qwenrun.cli import generate
from qwenrun.cli.chat import ChatSession
from qwenrun.cli.main import build_parser
from qwenrun.engine.request import CompletionOutput, RequestOutput
from qwenrun.llm import ChatDelta
from qwenrun.sampling.params import SamplingParams

TINY = dict(
    vocab_size=151936,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, qwen3_tokenizer_dir: Path) -> tuple[Path, int]:
    """(checkpoint folder, parameter count as transformers counts it)."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir / name, path / name)
    return path, sum(p.numel() for p in model.parameters())


def qwenrun(
    *args: str | Path, stdin: str = "", debug: bool = False
) -> subprocess.CompletedProcess[str]:
    # Rich would colour a pipe under FORCE_COLOR/TTY_COMPATIBLE; the checks read plain text.
    unset = ("QWENRUN_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if debug:
        env["QWENRUN_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "qwenrun", *map(str, args)],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------- subprocess runs
def test_version_and_usage_errors() -> None:
    proc = qwenrun("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "qwenrun 0.1.0"
    assert qwenrun("generate", "m", "--prompt", "x", "--no-think").returncode == 2  # needs --chat
    proc = qwenrun("generate", "m", "--prompt", "x", "--top-p", "3")
    assert proc.returncode == 2 and "top_p" in proc.stderr
    assert qwenrun("info").returncode == 2


def test_info_text(tiny: tuple[Path, int]) -> None:
    path, n_params = tiny
    proc = qwenrun("info", path)
    assert proc.returncode == 0, proc.stderr
    rows = {line[:21].strip(): line[21:].strip() for line in proc.stdout.splitlines()}
    assert rows["architecture"] == "Qwen3ForCausalLM (qwen3)"
    assert rows["parameters"].startswith(f"{n_params:,} ")
    assert rows["layers"] == "2"
    assert rows["attention heads"] == "4 q / 2 kv, head_dim 8"
    assert rows["vocab size"] == "151936"
    assert rows["context length"] == "2048"
    assert rows["tied embeddings"] == "yes"
    assert rows["KV cache"].startswith(
        "128 bytes per token bf16"
    )  # 2 (K,V) * 2 layers * 2 heads * 8 * 2 B


def test_info_json(tiny: tuple[Path, int]) -> None:
    path, n_params = tiny
    proc = qwenrun("info", path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    hf = json.loads((path / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert info[key] == hf[key], key
    assert info["architecture"] == "Qwen3ForCausalLM" and info["moe"] is None
    assert info["num_parameters"] == info["num_active_parameters"] == n_params
    assert info["weight_bytes"] == {"bfloat16": 2 * n_params, "float32": 4 * n_params}
    int8 = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * (hf["head_dim"] + 4)  # + a fp32 scale per head
    assert info["kv_cache_bytes_per_token"] == {"bfloat16": 128, "float32": 256, "int8": int8}
    assert info["default_cache"]["kv_tokens_int8"] >= info["default_cache"]["kv_tokens"]
    assert info["rope"] == {"type": "default", "theta": 10000.0}


def test_generate_with_an_int8_kv_cache(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    args = ("generate", path, "--prompt", "The capital of France is", "--temperature", "0", "--max-tokens", "8",
            "--json")
    proc = qwenrun(*args, "--kv-cache-dtype", "int8")
    assert proc.returncode == 0, proc.stderr
    assert 1 <= json.loads(proc.stdout)["completion_tokens"] <= 8
    assert qwenrun(*args, "--kv-cache-dtype", "fp8").returncode == 2  # argparse: not a choice


def test_generate_json_batch(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    prompts = ["Hello", "The capital of France is", "Hello"]
    proc = qwenrun(
        "generate",
        path,
        *(a for p in prompts for a in ("--prompt", p)),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert 1 <= r["completion_tokens"] <= 8 and r["prompt_tokens"] >= 1
        assert r["finish_reason"] in ("length", "stop")
        assert r["content"] is None and r["tool_calls"] is None  # chat-only fields
    assert records[0]["text"] == records[2]["text"]  # greedy: the batch neighbour does not matter


def test_generate_speculative_config_keeps_greedy_text(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    args = ("generate", path, "--prompt", "Hello Hello Hello", "--temperature", "0", "--max-tokens", "12", "--json")
    plain = qwenrun(*args)
    spec = qwenrun(*args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["text"] == json.loads(plain.stdout)["text"]
    bad = qwenrun(*args, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}')
    assert bad.returncode == 2 and "num_speculative_tokens" in bad.stderr


def test_generate_chat_json_with_budget(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    proc = qwenrun(
        "generate",
        path,
        "--chat",
        "--json",
        "--budget",
        "4",
        "--max-tokens",
        "40",
        "--seed",
        "0",
        "--prompt",
        "Why is the sky blue?",
    )
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    r = json.loads(line)
    assert set(r) == {
        "prompt",
        "text",
        "reasoning_content",
        "content",
        "tool_calls",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    }
    assert r["prompt"] == "Why is the sky blue?" and r["tool_calls"] == []
    assert 1 <= r["completion_tokens"] <= 40 and r["finish_reason"] in ("length", "stop")
    assert r["prompt_tokens"] > 8  # the chat template wrapped the question


def test_chat_through_a_pipe(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    script = "/no_think\nhello\n/budget 5\nhi\n/reset\n/exit\n"
    proc = qwenrun("chat", path, "--max-tokens", "6", "--temperature", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "thinking off" in out and "budget 5 tokens" in out and "conversation cleared" in out
    assert out.count(" tok/s") == 2  # one stats line per answered turn
    assert ">>> hello" in out and ">>> hi" in out


def test_bench_reports_prefill_and_decode(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    proc = qwenrun("bench", path, "--runs", "2", "--prompt-len", "16", "--new-tokens", "4", "--quantization", "int8")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "prefill" in out and "decode" in out and "int8" in out and "of 2 runs" in out


def test_missing_folder_is_one_line(tmp_path: Path) -> None:
    line = one_error_line(qwenrun("chat", tmp_path / "nope", stdin="hi\n"))
    assert "does not exist" in line


def test_unknown_architecture(tiny: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = tiny
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]})
    )
    line = one_error_line(qwenrun("generate", tmp_path, "--prompt", "hi"))
    assert "not supported" in line and "LlamaForCausalLM" in line
    debug = qwenrun("info", tmp_path, debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ------------------------------------------------------------------ in process, scripted LLM
class ScriptedLLM:
    """Answers every chat with the same reasoning and answer, streamed in pieces; records calls."""

    REASONING = ["\n", "Two plus", " two.", "\n\n"]
    CONTENT = ["\n\n", "It is", " 4."]

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.checkpoint = SimpleNamespace(generation_config={"temperature": 0.6})
        self.calls: list[dict[str, Any]] = []
        self.interrupt_after, self.closed = interrupt_after, False

    def _output(self) -> CompletionOutput:
        return CompletionOutput(
            index=0,
            text="<think>Two plus two.</think>It is 4.",
            token_ids=list(range(9)),
            finish_reason="stop",
            reasoning_content="Two plus two.",
            content="It is 4.",
            tool_calls=[],
            reasoning_tokens=4,
        )

    def chat_stream(
        self, messages: list[dict[str, str]], params: SamplingParams, **kwargs: Any
    ) -> Iterator[ChatDelta]:
        self.calls.append({"messages": list(messages), "params": params, **kwargs})
        pieces = [(r, "") for r in self.REASONING] + [("", c) for c in self.CONTENT]
        try:
            for i, (reasoning, content) in enumerate(pieces):
                if i == self.interrupt_after:
                    os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, between two steps
                yield ChatDelta(reasoning, content, False)
            yield ChatDelta("", "", True, self._output())
        finally:
            self.closed = True

    def chat(
        self, conversations: list[list[dict[str, str]]], params: SamplingParams, **kwargs: Any
    ) -> list[RequestOutput]:
        self.calls.append({"conversations": conversations, "params": params, **kwargs})
        return [RequestOutput("r", None, [1, 2], [self._output()], True) for _ in conversations]


def session(llm: ScriptedLLM, **kwargs: Any) -> ChatSession:
    settings = dict(thinking=True, budget=None, system=None, show_thinking=True) | kwargs
    return ChatSession(llm, SamplingParams(), **settings)  # type: ignore[arg-type]


def test_chat_streams_reasoning_then_answer(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM()
    chat = session(llm)
    chat.turn("What is 2+2?")
    out = capsys.readouterr().out
    assert (
        "Thinking…\nTwo plus two.\n\nIt is 4.\n" in out
    )  # template newlines dropped, one blank line
    assert "9 tokens (4 thinking)" in out and "/show" not in out  # short thinking stays expanded
    assert chat.history[-1] == {
        "role": "assistant",
        "content": "It is 4.",
        "reasoning_content": "Two plus two.",
    }
    assert llm.calls[0]["enable_thinking"] is True and llm.calls[0]["thinking_budget"] is None

    assert chat.command("/hide")
    chat.turn("Again /no_think")  # the soft switch in a message holds for later turns
    out = capsys.readouterr().out
    assert (
        "Two plus" not in out
        and "It is 4." in out
        and "thought for 4 tokens, /show to expand" in out
    )
    assert llm.calls[1]["enable_thinking"] is False
    chat.command("/show")
    assert "Two plus two." in capsys.readouterr().out


def test_chat_commands_shape_the_next_request(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM()
    chat = session(llm, thinking=False)
    for line in ("/think", "/budget 3", "/system Be brief."):
        assert chat.command(line)
    chat.turn("hi")
    call = llm.calls[-1]
    assert call["enable_thinking"] is True and call["thinking_budget"] == 3
    assert call["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    chat.command("/budget off")
    chat.command("/no_think")
    chat.turn("and?")
    call = llm.calls[-1]
    assert call["enable_thinking"] is False and call["thinking_budget"] is None
    assert [m["role"] for m in call["messages"]] == ["system", "user", "assistant", "user"]
    chat.command("/history")
    assert "you: hi" in capsys.readouterr().out
    chat.command("/reset")
    assert chat.history == []
    assert chat.command("/exit") is False


def test_chat_ctrl_c_keeps_the_partial_answer(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    llm = ScriptedLLM(interrupt_after=len(ScriptedLLM.REASONING) + 1)
    chat = session(llm)
    chat.turn("What is 2+2?")
    assert llm.closed  # the stream was closed, which aborts the request in the real LLM
    assert chat.history[-1] == {
        "role": "assistant",
        "content": "It is",
        "reasoning_content": "Two plus two.",
    }
    assert "[stopped after" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the turn restored the handler it found


def test_generate_chat_text_keeps_reasoning_off_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    llm = ScriptedLLM()
    monkeypatch.setattr(generate, "load_llm", lambda args, max_num_seqs: llm)
    args = build_parser().parse_args(
        ["generate", "m", "--chat", "--budget", "2", "--prompt", "2+2?"]
    )
    assert generate.run(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "It is 4.\n"  # stdout is not a terminal: only the answer
    assert "Two plus two." in captured.err
    assert llm.calls[0]["params"].thinking_budget == 2 and llm.calls[0]["params"].temperature == 0.6
