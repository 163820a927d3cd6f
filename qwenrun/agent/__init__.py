"""Tool-using Qwen3 agents: an agent loop over `LLM`, Python-function tools and MCP servers.

    from qwenrun import LLM
    from qwenrun.agent import Agent, ToolRegistry, add_mcp_servers, tool

    @tool
    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.\"\"\"
        return a + b

    with ToolRegistry([add]) as tools:
        add_mcp_servers(tools, "servers.json")         # {"mcpServers": {...}}
        agent = Agent(LLM("Qwen/Qwen3-0.6B"), tools, max_steps=8)
        for event in agent.stream("What is 6*7? Use the tools."):
            ...                                         # ReasoningDelta, ContentDelta, ToolCallEvent, ...

Nothing heavy is imported here: `mcp` is imported when servers are connected.
"""

from __future__ import annotations

from qwenrun.agent.loop import (
    Agent,
    AgentEvent,
    AgentResult,
    ContentDelta,
    FinalEvent,
    ReasoningDelta,
    ToolCallEvent,
    ToolResultEvent,
    infer_tool_parser,
)
from qwenrun.agent.mcp_client import (
    MCPConfigError,
    MCPServerConfig,
    MCPServerError,
    add_mcp_servers,
    load_mcp_config,
)
from qwenrun.agent.tools import (
    Tool,
    ToolCrash,
    ToolError,
    ToolOutput,
    ToolRegistry,
    ToolResult,
    function_tool,
    tool,
)

__all__ = [
    "Agent",
    "AgentEvent",
    "AgentResult",
    "ContentDelta",
    "FinalEvent",
    "MCPConfigError",
    "MCPServerConfig",
    "MCPServerError",
    "ReasoningDelta",
    "Tool",
    "ToolCallEvent",
    "ToolCrash",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolResult",
    "ToolResultEvent",
    "add_mcp_servers",
    "function_tool",
    "infer_tool_parser",
    "load_mcp_config",
    "tool",
]
