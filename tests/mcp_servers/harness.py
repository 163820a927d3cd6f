"""Test harness for the agent tests: a steered two-turn checkpoint, and MCP servers as processes.

The checkpoint extends tests/steered.py (greedy decoding follows a token -> next-token table) with
one attention head that looks for `</tool_response>` anywhere in the context. A pure bigram table
cannot tell the agent's second turn from its first (both prompts end in the same generation
prompt), so the head adds a "tool results seen" flag at the `\\n\\n` that follows `</think>`:
without it the model writes `tool_text`, with it `answer_text`. Both turns think first
("<think> hmm </think>"), so the template's reasoning retention is exercised too.

How the head works (1 layer, hidden 64, head_dim 16, rope_theta 1e6): only `\\n\\n` has a query and
only `</tool_response>` a key, both in head dim 7, whose RoPE frequency (1e6^-0.875 ~ 6e-6 rad per
token) leaves them aligned at any distance, and a large k_norm weight makes the score ~40, so the
softmax picks that token; its value is copied by o_proj into a spare hidden dim that the LM head
reads as a vote (3 > 1) for the first answer token. Other tokens have no query and attend evenly,
so they see at most a diluted flag that cannot outvote their table entry.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from steered import steer  # tests/ is on sys.path for the test modules that import this harness
from tiny import add_tokenizer

SERVERS = Path(__file__).resolve().parent
NL, NLNL, THINK, END_THINK, IM_END, HMM = 198, 271, 151667, 151668, 151645, 87501
TOOL_RESPONSE_END = 151666
VOCAB = 151936
HIDDEN, FLAG_DIM, TR_DIM = 64, 63, 62


def make_agent_checkpoint(
    folder: Path, tokenizer_dir: Path, tokenizer, tool_text: str, answer_text: str
) -> Path:
    tool_ids = tokenizer.encode(tool_text)
    answer_ids = tokenizer.encode(answer_text)
    think = [NL, THINK, HMM, END_THINK, NLNL]
    first = think + tool_ids + [IM_END]
    assert len(set(think + tool_ids)) == len(think + tool_ids), (
        "tool text must tokenize to distinct tokens"
    )
    assert not set(answer_ids) & set(first) and len(set(answer_ids)) == len(answer_ids)
    table = dict(itertools.pairwise(first)) | dict(itertools.pairwise(answer_ids + [IM_END]))
    assert len(table) <= TR_DIM
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        eos_token_id=IM_END,
        rope_theta=1e6,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    attn = model.model.layers[0].self_attn
    steer(model, table)
    with torch.no_grad():
        nlnl_dim = list(table).index(NLNL)
        model.model.embed_tokens.weight[TOOL_RESPONSE_END, TR_DIM] = 1.0
        attn.q_proj.weight[7, nlnl_dim] = 1.0  # head 0, dim 7: the query of "\n\n"
        attn.k_proj.weight[7, TR_DIM] = 1.0  # the key of </tool_response>
        attn.k_norm.weight[7] = 10.0  # score = 4 * 40 / sqrt(16) = 40
        attn.v_proj.weight[0, TR_DIM] = 1.0 / 8  # input RMSNorm scales a one-hot by sqrt(64)
        attn.o_proj.weight[FLAG_DIM, 0] = 1.0
        model.lm_head.weight[answer_ids[0], FLAG_DIM] = 3.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    add_tokenizer(folder, tokenizer_dir)
    return folder


def stdio_server(script: str, **extra: object) -> dict[str, object]:
    """A `mcpServers` entry that starts `script` (in tests/mcp_servers) as a child process."""
    return {"command": sys.executable, "args": [str(SERVERS / script)], **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(script: str, **env: str) -> Iterator[str]:
    """Run `script` over streamable HTTP on a free local port; yields its MCP URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVERS / script), "--http", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, f"{script} exited with {proc.returncode}"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                break
            assert time.time() < deadline, f"{script} did not listen on {port}"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_pids() -> set[int]:
    """Live (non-zombie) descendants of this process, read from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: set[int] = set()
    todo = [os.getpid()]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out
