"""`qwenrun serve MODEL`: load a checkpoint and serve it over HTTP (OpenAI and Anthropic APIs).

`add_serve_parser(subparsers)` declares the subcommand and `run(args)` runs it; neither
imports torch, FastAPI or the model until the command actually runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenrun.spec_decode.config import SpeculativeConfig

DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_DTYPES = ("auto", "int8")  # qwenrun.layers.attention.KV_CACHE_DTYPES, without importing torch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "4GiB", "512M", "2g", "1048576" (binary units: K = 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected a size like 4GiB, 512MiB or a byte count, got {text!r}")
    value = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(value)


def _int_at_least(low: int):
    """An argparse type: an integer >= low, with the range in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535], got {value}")
    return value


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """`--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'` (vLLM's flag) as a
    validated `SpeculativeConfig`; a usage error naming the bad field otherwise.

    Imported only when the flag is given, so `--help` stays instant."""
    from qwenrun.errors import InvalidRequestError
    from qwenrun.spec_decode.config import SpeculativeConfig

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    try:
        return SpeculativeConfig.parse(raw)
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to a subparsers object; returns the new parser (its defaults set `parser`)."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve MODEL with OpenAI-compatible /v1/chat/completions, /v1/completions and "
            "/v1/models, Anthropic-compatible /v1/messages, /health and Prometheus /metrics. "
            "Reasoning comes back as reasoning_content; tool calls as tool_calls."))
    p.add_argument("model", nargs="?", help="checkpoint folder or hub id (default: the bundled demo model)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")
    net = p.add_argument_group("http")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    net.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    net.add_argument("--api-key", default=os.environ.get("QWENRUN_API_KEY"),
                     help="require this Bearer token on /v1 routes "
                          "(default: $QWENRUN_API_KEY, else none)")
    net.add_argument("--served-model-name", nargs="+", metavar="NAME",
                     help="model name(s) clients send, the first one reported back (default: a hub "
                          "id as given, a local folder by its folder name; its path is accepted too)")
    net.add_argument("--max-queue", type=_non_negative, default=256, metavar="N",
                     help="waiting requests accepted before answering 429 (default 256)")
    net.add_argument("--allow-media-urls", action="store_true",
                     help="let vision-language requests name images and videos by http(s) URL, which "
                          "the server then fetches (size, time and redirects capped). Off by default: "
                          "fetching reaches whatever this machine can reach; without it media come "
                          "inline (data: URLs, base64)")
    net.add_argument("--no-webui", dest="webui", action="store_false",
                     help="do not serve the chat page at / (the APIs are unchanged)")
    net.add_argument("--log-level", default="info",
                     choices=("critical", "error", "warning", "info", "debug"))
    rt = p.add_argument_group("runtime")
    rt.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="weights and KV cache dtype (default: the checkpoint's)")
    rt.add_argument("--device", default="auto",
                    help='"auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...')
    rt.add_argument("--max-model-len", type=_positive, metavar="N",
                    help="context window in tokens (default: the model's)")
    rt.add_argument("--quantization", choices=("int8", "int4"),
                    help="weight-only quantization at load: int8 per channel, int4 group-wise (group 128)")
    rt.add_argument("--kv-cache-memory", type=parse_size, metavar="SIZE",
                    help="KV cache size, e.g. 4GiB (default: 90%% of free GPU memory; "
                         "on CPU a fifth of RAM, at most 4 GiB)")
    rt.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                    help="KV cache storage: auto (the model dtype) or int8 (a scale per token and head: "
                         "about twice the tokens in the same memory)")
    rt.add_argument("--max-num-seqs", type=_positive, default=64, metavar="N",
                    help="requests decoded together (default 64)")
    rt.add_argument("--max-num-batched-tokens", type=_positive, default=512, metavar="N",
                    help="tokens per step; longer prompts prefill in chunks (default 512)")
    rt.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                    help="do not reuse the KV cache of repeated prompt prefixes")
    rt.add_argument("--speculative-config", type=parse_speculative_config, metavar="JSON",
                    help='speculative decoding, vLLM\'s shape: \'{"method": "ngram", '
                         '"num_speculative_tokens": 4}\' (prompt lookup; also "draft_model" with "model", '
                         'and "mtp"); greedy output is unchanged')
    rt.add_argument("--tensor-parallel-size", type=_positive, default=1, metavar="N",
                    help="split the model over N ranks on this host (processes: gloo on CPU, NCCL over "
                         "one GPU each; default 1)")
    rt.add_argument("--enable-expert-parallel", action="store_true",
                    help="MoE models: spread whole experts over the tensor-parallel ranks instead of "
                         "splitting every expert")
    rt.add_argument("--distributed-executor-backend", "--distributed-executor", choices=("mp", "ray"),
                    default="mp", help="where the tensor-parallel ranks run: mp (processes on this host, "
                    "default) or ray (Ray actors, on any node of the cluster --ray-address names)")
    rt.add_argument("--data-parallel-size", type=_positive, default=1, metavar="N",
                    help="N whole replicas of the model, each a Ray actor with its own placement group, "
                         "behind this one API; a request goes to the replica holding its prompt's prefix, "
                         "else to the least loaded (default 1: no Ray)")
    rt.add_argument("--ray-address", metavar="ADDR",
                    help="the Ray cluster the data-parallel replicas or the Ray tensor-parallel ranks join "
                         "(\"auto\": the one this node is in; default: start a local one)")
    rt.add_argument("--tool-call-parser", default="hermes", help="tool-call format (default hermes)")
    rt.add_argument("--mcp-config", metavar="FILE",
                    help="also serve POST /v1/agent/chat/completions, which runs these MCP servers' tools "
                         "server-side (off by default: /v1/chat/completions passes tool calls to the client)")
    p.set_defaults(parser=p)
    return p


def model_names(model: str, served_model_name: Sequence[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """(names `/v1/models` lists, first one primary; further names accepted in requests' `model`).

    `--served-model-name` gives exactly the names (vLLM's rule). Otherwise a hub id is served as
    itself and a local folder by its folder name (a hub-cache snapshot by its hub id): the bundled
    model is `qwen3-tiny-thinker`, not its install path. The folder as typed and its absolute path
    stay accepted, so clients that send the path (the only name before) keep working.
    """
    if served_model_name:
        return list(dict.fromkeys(served_model_name)), []
    path = Path(model).expanduser()
    if not path.exists():
        return [model], []
    path = Path(os.path.abspath(path))
    snapshots = path.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        name = snapshots.parent.name.removeprefix("models--").replace("--", "/", 1)
    else:
        name = path.name or str(path)
    accepted = [n for n in dict.fromkeys([model, str(path), str(path.resolve())]) if n != name]
    return [name], accepted


def run(args: argparse.Namespace) -> int:
    """Load the model behind a spinner, print the URL, serve until Ctrl-C; returns the exit status.

    With `--mcp-config`, the MCP servers start after the model loads and are stopped (child
    processes included) however the command ends: a failed start, Ctrl-C, SIGTERM or an error.
    """
    import uvicorn
    from rich.console import Console
    from rich.text import Text

    from qwenrun.llm import LLM
    from qwenrun.multimodal import MediaLimits
    from qwenrun.server.app import create_app

    err = Console(stderr=True, highlight=False)
    start = time.perf_counter()
    llm_kwargs = dict(dtype=args.dtype, device=args.device, revision=args.revision,
                      max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      enable_prefix_caching=args.enable_prefix_caching, tool_parser=args.tool_call_parser,
                      quantization=args.quantization, speculative_config=args.speculative_config,
                      kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
                      enable_expert_parallel=args.enable_expert_parallel,
                      distributed_executor_backend=args.distributed_executor_backend)
    if args.distributed_executor_backend == "ray" and args.data_parallel_size == 1:
        llm_kwargs["ray_address"] = args.ray_address
    replicas = None
    with err.status(f"Loading {args.model}…"):
        if args.data_parallel_size > 1:
            from qwenrun.distributed.ray_data_parallel import RayDataParallelEngine

            replicas = RayDataParallelEngine.launch(args.model, args.data_parallel_size,
                                                    ray_address=args.ray_address,
                                                    max_waiting_per_replica=args.max_queue, **llm_kwargs)
            llm = replicas.frontend
        else:
            llm = LLM(args.model, **llm_kwargs)
    names, accepted = model_names(args.model, args.served_model_name)
    slots = llm.engine.cache.slots
    state = "" if slots is None else (
        f"; recurrent state for {min(args.max_num_seqs, slots.num_slots // 2)} sequences at once "
        f"({slots.num_slots} slots, the spare ones keep prefix checkpoints)")
    err.print(Text(f"loaded {args.model} on {llm.device} as {str(llm.dtype).removeprefix('torch.')} "
                   f"in {time.perf_counter() - start:.1f} s; context {llm.engine.max_model_len} tokens{state}",
                   style="grey50"), soft_wrap=True)
    if replicas is not None:
        where = ", ".join(f"{i.device} {i.num_threads} threads on {i.node}" for i in replicas.infos)
        err.print(Text(f"{len(replicas.infos)} data-parallel replicas on Ray ({where}); this process "
                       "routes and serves", style="grey50"), soft_wrap=True)
    tools = None
    restore = _sigterm_as_interrupt()
    try:
        if args.mcp_config:
            from qwenrun.agent.mcp_client import add_mcp_servers
            from qwenrun.agent.tools import ToolRegistry

            tools = ToolRegistry()
            added = add_mcp_servers(tools, args.mcp_config)
        app = create_app(llm, served_model_name=names, accepted_model_names=accepted,
                         api_key=args.api_key, max_queue=args.max_queue,
                         media_limits=MediaLimits.for_server(allow_http=args.allow_media_urls),
                         webui=args.webui, engine=replicas)
        if replicas is not None:
            app.state.qwenrun.metrics.registry.register(replicas.collector())
        if tools is not None:
            from qwenrun.agent.server import AGENT_PATH, add_agent_route

            add_agent_route(app, tools)
            err.print(Text(f"server-side tools at {AGENT_PATH}: {', '.join(added) or 'none'}",
                           style="grey50"), soft_wrap=True)
        host = f"[{args.host}]" if ":" in args.host else args.host
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else host
        err.print(Text(f"serving {names[0]!r} at http://{shown}:{args.port}/v1 "
                       f"(OpenAI + Anthropic APIs; /health, /metrics)"
                       + ("; API key required" if args.api_key else "")
                       + ("; fetches http(s) media URLs" if args.allow_media_urls else ""),
                       style="bold"), soft_wrap=True)
        if args.webui:
            err.print(Text(f"chat page at http://{shown}:{args.port}/", style="bold"), soft_wrap=True)
        sys.stderr.flush()
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        restore()
        if tools is not None:
            tools.close()  # stops the MCP child processes
        if replicas is not None:
            import ray

            replicas.shutdown()
            ray.shutdown()
    return 0


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM stop `serve` as Ctrl-C does; returns the function that restores the handler.

    uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler it found: with
    Python's default one the process died right there, before the `finally` that stops the MCP
    servers, whose children were left behind.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
