"""The agent over REAL MCP servers (tests/mcp_servers, written with the SDK's FastMCP), driven by a
steered checkpoint whose tool calls are real model output (tests/mcp_servers/harness.py):

turn 1: "<think> hmm </think>" + a Hermes tool call  ->  parsed -> MCP call -> tool message
turn 2: (the context now holds </tool_response>) "<think> hmm </think>" + the answer

Servers: a calculator over stdio (child process), a key-value store over streamable HTTP on
127.0.0.1, and a misbehaving one (raises, sleeps past the timeout, exits mid-call, rejects the
arguments by schema, floods the output). Every failure must reach the model as a tool error, the
run must end, and no child process may outlive the registry (checked in /proc).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("mcp")

from mcp_servers.harness import child_pids, http_server, make_agent_checkpoint, stdio_server

from qwenrun import LLM, SamplingParams
from qwenrun.agent import (
    Agent, MCPConfigError, MCPServerError, ToolRegistry, add_mcp_servers, load_mcp_config, tool,
)
from qwenrun.tokenizer.tokenizer import Tokenizer

CALC_CALL = '<tool_call>{"name": "calc","arguments":{"expression":"6*7"}}</tool_call>'
KV_CALL = '<tool_call>{"name":"put","arguments":{"key": "city",\n"value" :"Paris"}}</tool_call>'
GREEDY = SamplingParams(temperature=0, max_tokens=64)


def _llm(tmp_path_factory, tokenizer_dir, tool_text: str, answer: str) -> LLM:
    tok = Tokenizer.from_dir(tokenizer_dir)
    folder = make_agent_checkpoint(
        tmp_path_factory.mktemp("agent"), tokenizer_dir, tok, tool_text, answer
    )
    return LLM(
        folder,
        dtype="float32",
        device="cpu",
        kv_cache_memory=32 << 20,
        max_model_len=4096,
        max_num_seqs=2,
    )


@pytest.fixture(scope="module")
def calc_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    return _llm(tmp_path_factory, qwen3_tokenizer_dir, CALC_CALL, "The answer is 42.")


@pytest.fixture(scope="module")
def kv_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    return _llm(tmp_path_factory, qwen3_tokenizer_dir, KV_CALL, "Stored.")


@pytest.fixture
def no_leaked_children():
    before = child_pids()
    yield
    deadline = time.time() + 5
    while (left := child_pids() - before) and time.time() < deadline:
        time.sleep(0.05)
    assert not left, f"child processes left behind: {left}"


def test_stdio_calculator_end_to_end(calc_llm, no_leaked_children):
    config = {"mcpServers": {"calc": stdio_server("calculator.py", deny=["delete_*"])}}
    with ToolRegistry() as tools:
        assert add_mcp_servers(tools, config) == ["calc", "add"]  # delete_everything is denied
        spawned = child_pids()
        assert spawned, "the stdio server runs as a child process"
        agent = Agent(calc_llm, tools, sampling_params=GREEDY)
        result = agent.run("What is 6*7?")
        assert [r.kind for r in result.tool_results] == ["ok"]
        assert result.tool_results[0].content == "42"  # computed by the server
        assert result.content == "The answer is 42." and result.steps == 2
        assistant, tool_msg, final = result.new_messages
        assert assistant["tool_calls"][0]["function"] == {
            "name": "calc",
            "arguments": '{"expression": "6*7"}',
        }
        assert assistant["reasoning_content"] == "hmm" and final["reasoning_content"] == "hmm"
        assert tool_msg == {
            "role": "tool",
            "tool_call_id": assistant["tool_calls"][0]["id"],
            "name": "calc",
            "content": "42",
        }
        # The second turn's prompt: the multi-step turn keeps its thinking, the result follows it.
        prompt = calc_llm.render_chat(result.messages[:-1], tools=tools.specs())
        assert prompt.endswith(
            "<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n"
            '{"name": "calc", "arguments": {"expression": "6*7"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        )
    assert not child_pids() & spawned


def test_http_kv_store_end_to_end(kv_llm, no_leaked_children):
    with http_server("kv_store.py") as url:
        config = {"mcpServers": {"kv": {"url": url, "allow": ["put", "get"]}}}
        with ToolRegistry() as tools:
            assert sorted(add_mcp_servers(tools, config)) == ["get", "put"]  # "keys" is not allowed
            result = Agent(kv_llm, tools, sampling_params=GREEDY).run(
                "Remember that the city is Paris."
            )
            assert result.content == "Stored." and result.steps == 2
            assert [(r.call.name, r.kind, r.content) for r in result.tool_results] == [
                ("put", "ok", "stored city")
            ]

        @tool
        def get(key: str) -> str:
            """A local tool whose name the server's `get` collides with."""
            return "local"

        with ToolRegistry([get]) as other:  # a second client sees what the agent stored
            assert sorted(add_mcp_servers(other, config)) == ["kv-get", "put"]  # Qwen-Agent's prefix
            assert other.call("kv-get", {"key": "city"}).content == "Paris"
            assert other.call("get", {"key": "city"}).content == "local"
            assert other.call("keys").kind == "unknown_tool"


@pytest.mark.parametrize(
    "mode, extra, kind, says",
    [
        ("raise", {}, "tool_error", "division by zero in 6*7"),
        ("sleep", {"timeout": 1}, "timeout", "Error: tool 'calc' timed out after 1 s"),
        ("exit", {}, "crash", "closed the connection during the call to 'calc'"),
        ("typed", {}, "invalid_arguments", "'a' is a required property"),
        (
            "raise",
            {"deny": ["calc"]},
            "unknown_tool",
            "Error: unknown tool 'calc'; available tools: pid",
        ),
        ("big", {}, "ok", "[output truncated: 1000 of 100000 bytes shown]"),
    ],
)
def test_failures_reach_the_model_and_the_run_ends(
    calc_llm, no_leaked_children, mode, extra, kind, says
):
    config = {"mcpServers": {"bad": stdio_server("misbehaving.py", env={"MODE": mode}, **extra)}}
    with ToolRegistry(max_output_bytes=1000) as tools:
        add_mcp_servers(tools, config)
        start = time.perf_counter()
        result = Agent(calc_llm, tools, sampling_params=GREEDY, max_steps=3).run("What is 6*7?")
        assert time.perf_counter() - start < 20
        [r] = result.tool_results
        assert r.kind == kind and says in r.content
        assert r.is_error == (kind != "ok")
        # the model read the error in its second turn and answered
        assert result.new_messages[1]["content"] == r.content
        assert result.content == "The answer is 42." and result.finish_reason == "stop"
        if mode == "exit":  # the crashed server stays down; its other tools say so at once
            assert tools.call("pid").content.startswith("Error: MCP server 'bad' is not running")


def test_http_server_crash_mid_call(calc_llm, no_leaked_children):
    with http_server("misbehaving.py", MODE="exit") as url, ToolRegistry() as tools:
        add_mcp_servers(tools, {"mcpServers": {"bad": {"url": url, "timeout": 5}}})
        start = time.perf_counter()
        result = Agent(calc_llm, tools, sampling_params=GREEDY).run("What is 6*7?")
        assert time.perf_counter() - start < 20
        [r] = result.tool_results
        # mcp 2.x reports the dropped stream at once; mcp 1.x's HTTP client waits, and the
        # per-call timeout ends the call instead
        assert r.is_error and r.kind in ("crash", "timeout")
        assert result.content == "The answer is 42."


def test_server_that_does_not_start(no_leaked_children, tmp_path):
    config = {
        "mcpServers": {
            "ok": stdio_server("calculator.py"),
            "broken": {"command": "/nonexistent/mcp-server"},
        }
    }
    with ToolRegistry() as tools, pytest.raises(MCPServerError, match="'broken' failed to start"):
        add_mcp_servers(tools, config)


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, "mcpServers"),
        ({"mcpServers": {"a": {}}}, 'exactly one of "command"'),
        ({"mcpServers": {"a": {"command": "x", "url": "http://h"}}}, 'exactly one of "command"'),
        ({"mcpServers": {"a": {"command": "x", "args": "no"}}}, "args must be a list of strings"),
        ({"mcpServers": {"a": {"url": "ftp://h"}}}, "http(s) URL"),
        ({"mcpServers": {"a": {"url": "http://h", "type": "ws"}}}, "type must be"),
        ({"mcpServers": {"a": {"command": "x", "timeout": 0}}}, "timeout must be a positive"),
        ({"mcpServers": {"a": {"command": "x", "allow": "calc"}}}, "allow must be a list"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(MCPConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_mcp_config(config)


def test_config_file_and_rules(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text(
        '{"mcpServers": {"a": {"command": "x", "allow": ["get_*"], "deny": ["get_secret"]},'
        ' "b": {"url": "http://127.0.0.1:1/mcp", "disabled": true}}}'
    )
    [a] = load_mcp_config(path)
    assert a.allows("get_weather") and not a.allows("get_secret") and not a.allows("put")
    with pytest.raises(MCPConfigError, match="not valid JSON"):
        path.write_text("{")
        load_mcp_config(path)


def test_cli_agent_shows_tool_calls_and_results(
    calc_llm, no_leaked_children, tmp_path, monkeypatch, capsys
):
    import io
    import json

    from qwenrun.cli.main import main

    config = tmp_path / "servers.json"
    entry = stdio_server("calculator.py", deny=["delete_*"])
    config.write_text(json.dumps({"mcpServers": {"calc": entry}}))
    monkeypatch.setattr("sys.stdin", io.StringIO("/tools\nWhat is 6*7?\n/exit\n"))
    argv = ["agent", str(calc_llm.checkpoint.path), "--mcp-config", str(config)]
    assert main([*argv, "--temperature", "0", "--max-tokens", "64", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "calc  [mcp:calc]" in out and "delete_everything" not in out
    assert '→ calc({"expression": "6*7"})' in out
    assert "← 42" in out
    assert "The answer is 42." in out


def test_cli_chat_with_mcp_config_runs_the_agent(monkeypatch):
    """`qwenrun chat --mcp-config F` is the agent conversation (the test above covers it)."""
    import qwenrun.cli.agent
    from qwenrun.cli.main import main

    seen = []
    monkeypatch.setattr(qwenrun.cli.agent, "run", lambda args: seen.append(args) or 0)
    assert main(["chat", "some-model", "--mcp-config", "servers.json", "--no-think"]) == 0
    assert seen[0].mcp_config == "servers.json" and seen[0].no_think


def test_server_runs_tools_only_on_the_extension_route(calc_llm, no_leaked_children):
    testclient = pytest.importorskip("fastapi.testclient")
    from qwenrun.agent.server import AGENT_PATH, add_agent_route
    from qwenrun.server.app import create_app

    llm = LLM(
        calc_llm.checkpoint.path,
        dtype="float32",
        device="cpu",
        kv_cache_memory=32 << 20,
        max_model_len=4096,
        max_num_seqs=2,
    )
    question = [{"role": "user", "content": "What is 6*7?"}]
    with ToolRegistry() as tools:
        add_mcp_servers(tools, {"mcpServers": {"calc": stdio_server("calculator.py")}})
        app = create_app(llm, served_model_name="qwen-test")
        add_agent_route(app, tools)
        with testclient.TestClient(app) as client:
            # the OpenAI route passes tool calls through, as before
            plain = client.post(
                "/v1/chat/completions",
                json={
                    "model": "qwen-test",
                    "messages": question,
                    "tools": tools.specs(),
                    "temperature": 0,
                },
            )
            [choice] = plain.json()["choices"]
            assert choice["finish_reason"] == "tool_calls"
            assert choice["message"]["tool_calls"][0]["function"]["name"] == "calc"
            # the extension route runs them
            r = client.post(
                AGENT_PATH,
                json={
                    "model": "qwen-test",
                    "messages": question,
                    "temperature": 0,
                    "max_tokens": 64,
                },
            )
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["choices"][0]["message"]["content"] == "The answer is 42."
            assert data["choices"][0]["message"]["reasoning_content"] == "hmm"
            agent = data["qwenrun_agent"]
            assert agent["steps"] == 2 and agent["finish_reason"] == "stop"
            assert [(t["name"], t["content"], t["kind"]) for t in agent["tool_results"]] == [
                ("calc", "42", "ok")
            ]
            assert [m["role"] for m in agent["messages"]] == ["assistant", "tool", "assistant"]
            bad = client.post(AGENT_PATH, json={"messages": question, "max_steps": 99})
            assert bad.status_code == 400 and "max_steps" in bad.json()["error"]["message"]
            bad = client.post(AGENT_PATH, json={"messages": question, "tools": tools.specs()})
            assert bad.status_code == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "6*7?"}], "chat_template_kwargs": "x"}',
         "chat_template_kwargs"),
        (b'{"messages": [1]}', "messages[0]"),
        (b'{"messages": [{"role": "user", "content": "6*7?"}], "model": ["x"]}', "model"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", None),  # past the chat routes' depth 64
        (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', None),  # CESU-8 surrogate
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ],
    ids=["kwargs-not-object", "message-not-object", "model-not-string", "deep-nesting", "depth-70",
         "cesu-bytes", "nan"],
)
def test_extension_route_answers_malformed_bodies_with_400(calc_llm, body, param):
    """Bodies that reached the agent loop and ended as 500s (AttributeError, TypeError,
    RecursionError) before `qwenrun serve --mcp-config` made the route reachable from the CLI."""
    testclient = pytest.importorskip("fastapi.testclient")
    from qwenrun.agent.server import AGENT_PATH, add_agent_route
    from qwenrun.server.app import create_app

    @tool
    def calc(expression: str) -> str:
        """Evaluate.

        Args:
            expression: the expression.
        """
        return "42"

    llm = LLM(calc_llm.checkpoint.path, dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    with ToolRegistry([calc]) as tools:
        app = create_app(llm, served_model_name="qwen-test")
        add_agent_route(app, tools)
        with testclient.TestClient(app, raise_server_exceptions=False) as client:
            r = client.post(AGENT_PATH, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
