"""End to end with real model output: the bundled demo model calls an MCP calculator over stdio and
answers from the tool's result (not from its own arithmetic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_servers.harness import child_pids, stdio_server
from qwenrun import LLM, SamplingParams
from qwenrun.agent import Agent, ToolRegistry, add_mcp_servers

BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled demo model not present")
def test_bundled_model_uses_the_mcp_calculator():
    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=64 << 20)
    before = child_pids()
    with ToolRegistry() as tools:
        assert add_mcp_servers(tools, {"mcpServers": {"calc": stdio_server("demo_calculator.py")}}) == ["calculator"]
        result = Agent(llm, tools, sampling_params=SamplingParams(temperature=0, max_tokens=400)).run(
            "What is 347 * 86?"
        )
    assert [r.call.name for r in result.tool_results] == ["calculator"]
    assert result.tool_results[0].kind == "ok" and result.tool_results[0].content == "29842"
    assert "29842" in (result.content or "")
    assert child_pids() <= before  # the MCP child process is gone
