"""`LLM`: the offline Python API, with vLLM's names (`generate`, `chat`) plus Qwen3 hybrid thinking."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.engine.engine import LLMEngine
from qwenrun.engine.request import CompletionOutput, Request, RequestOutput, think_open_in_prompt
from qwenrun.errors import CheckpointError, ContextLengthError, InvalidRequestError, RequestFailedError
from qwenrun.loading.loader import load_model, open_checkpoint, resolve_dtype
from qwenrun.quant import Quantization, quantize_model
from qwenrun.quant.linear import prepare_cpu_weights
from qwenrun.sampling.params import SamplingParams
from qwenrun.spec_decode import ModelDrafter, SpeculativeConfig
from qwenrun.tokenizer.chat import ChatTemplate, soft_thinking_switch
from qwenrun.tokenizer.chat_output import ChatOutputParser
from qwenrun.tokenizer.reasoning import StreamingReasoningParser
from qwenrun.tokenizer.tokenizer import Tokenizer
from qwenrun.tokenizer.tool_parsers import get_tool_parser
from qwenrun.tokenizer.tool_parsers.base import Tools

Prompt = str | list[int] | Mapping[str, Any]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ChatDelta:
    """One streamed piece of a chat answer; `output` is set on the last one."""

    reasoning: str
    content: str
    finished: bool
    output: CompletionOutput | None = None


class LLM:
    """Load a Qwen3 / Qwen3-MoE checkpoint (folder or hub id) and run it.

    Args:
        model: checkpoint folder or hub id (`Qwen/Qwen3-0.6B`).
        dtype: "auto" (checkpoint dtype), "bfloat16", "float16" or "float32".
        device: "auto", "cpu", "cuda", "cuda:1", ...
        revision: hub revision (branch, tag or commit) to pin.
        max_model_len: context window (default: the model's max_position_embeddings).
        kv_cache_memory: bytes for the KV cache (default: a fifth of RAM up to 4 GiB on CPU).
        kv_cache_dtype: "auto" (K/V in the model dtype) or "int8" (a scale per token and kv head:
            about twice the tokens in `kv_cache_memory`, half the bytes decode attention reads).
        max_num_seqs: most requests decoded together.
        max_num_batched_tokens: tokens per step; longer prompts are prefilled in chunks of this size.
        enable_prefix_caching: reuse the KV blocks of a repeated prompt prefix.
        quantization: None, "int8" (per channel) or "int4" (group-wise, `quant_group_size` 32/64/128/256)
            weight-only; `quantize_lm_head=False` keeps the LM head in the model dtype.
        tool_parser: tool-call output format ("hermes" for Qwen3).
        tensor_parallel_size: ranks the model is split over (processes on this host: gloo on CPU, NCCL
            over one GPU each); this process is rank 0 and schedules, `qwenrun.distributed.executor`.
        enable_expert_parallel: MoE experts spread whole over the ranks instead of split.
        distributed_executor_backend: where ranks 1..N-1 run: "mp" (processes on this host) or
            "ray" (Ray actors in a placement group, any node of the cluster; `ray_address` joins one,
            else a local cluster starts), `qwenrun.distributed.ray_executor`.
        speculative_config: vLLM's shape; {"method": "ngram", "num_speculative_tokens": k,
            "prompt_lookup_min": 1, "prompt_lookup_max": 3} drafts by prompt lookup, {"method":
            "draft_model", "model": path or hub id, "num_speculative_tokens": k} with a smaller Qwen3
            of the same tokenizer (loaded, quantized and packed like the target), {"method": "mtp",
            ...} with the checkpoint's MTP head; drafts are verified in each decode step (greedy
            output unchanged, sampling from the same distribution). Dense, MoE, hybrid and
            vision-language models. Counts: `engine.scheduler.stats`.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        revision: str | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        quant_group_size: int = 128,
        quantize_lm_head: bool = True,
        tool_parser: str = "hermes",
        speculative_config: dict | None = None,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        kv_cache_dtype: str = "auto",
        distributed_executor_backend: str = "mp",
        ray_address: str | None = None,
    ) -> None:
        ckpt = open_checkpoint(model, revision)
        self.checkpoint = ckpt
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, ckpt.config, self.device)
        self.tokenizer = Tokenizer.from_dir(ckpt.path) if (ckpt.path / "tokenizer.json").is_file() else None
        self._chat_template: ChatTemplate | None = None
        self._mm_processor = None  # built when a prompt first brings images or videos
        spec = SpeculativeConfig.parse(speculative_config) if speculative_config is not None else None
        quant = Quantization(quantization, quant_group_size, quantize_lm_head) if quantization is not None else None
        if tensor_parallel_size < 1:
            raise InvalidRequestError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}",
                                      param="tensor_parallel_size")
        if tensor_parallel_size > 1 and spec is not None:
            raise InvalidRequestError("speculative decoding does not run tensor-parallel yet",
                                      param="tensor_parallel_size")
        # quantized as it loads: peak memory is the quantized model, not the full-precision one
        if distributed_executor_backend not in ("mp", "ray"):
            raise InvalidRequestError(f"distributed_executor_backend is 'mp' or 'ray', not "
                                      f"{distributed_executor_backend!r}", param="distributed_executor_backend")
        if tensor_parallel_size > 1:
            from qwenrun.distributed.executor import start_tensor_parallel

            if ckpt.config.vision is not None:
                raise InvalidRequestError("vision-language models do not run tensor-parallel yet",
                                          param="tensor_parallel_size")
            if distributed_executor_backend == "ray":
                from qwenrun.distributed.ray_executor import start_tensor_parallel_ray

                self.model = start_tensor_parallel_ray(ckpt.path, self.dtype, self.device, tensor_parallel_size,
                                                       enable_expert_parallel, quant, ray_address)
            else:
                self.model = start_tensor_parallel(ckpt.path, self.dtype, self.device, tensor_parallel_size,
                                                   enable_expert_parallel, quant)
        else:
            self.model = load_model(ckpt, self.dtype, self.device, mtp=spec is not None and spec.method == "mtp",
                                    quantization=quant)

        def prepare_weights(model: torch.nn.Module, quantized: bool) -> None:
            if quant is not None and not quantized:
                quantize_model(model, quant.method, quant.group_size, quant.quantize_lm_head)
            prepare_cpu_weights(model, self.dtype, self.device)  # whatever quantization left in bf16 packed

        if tensor_parallel_size == 1:  # the ranks prepare their own shards
            prepare_weights(self.model, quantized=True)
        self.engine = LLMEngine(
            self.model, ckpt, self.tokenizer, self.dtype, self.device,
            max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            speculative_config=spec, kv_cache_dtype=kv_cache_dtype,
        )
        if tensor_parallel_size > 1:
            self.model.bind_cache(self.engine.cache)
        if isinstance(self.engine.drafter, ModelDrafter):
            # a draft model runs in the target's precision (loaded by the drafter in full, then quantized)
            prepare_weights(self.engine.drafter.model, quantized=False)
        self.tool_parser = get_tool_parser(tool_parser)

    @property
    def config(self):
        return self.checkpoint.config

    def get_default_sampling_params(self) -> SamplingParams:
        """Defaults from the checkpoint's generation_config.json (Qwen3: T=0.6, top_p 0.95, top_k 20)."""
        return SamplingParams.from_generation_config(self.checkpoint.generation_config)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise CheckpointError(f"{self.checkpoint.path} has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_tokenizer(self._need_tokenizer())
        return self._chat_template

    # ----------------------------------------------------------------------------------- generate
    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int], list[MultimodalItem]]:
        """(text, token ids, images and videos) of one prompt; a dict may carry vLLM's
        `multi_modal_data` ({"image": one or a list, "video": ...}) and `mm_processor_kwargs`."""
        if isinstance(prompt, str):
            return prompt, self._need_tokenizer().encode(prompt), []
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], self._need_tokenizer().encode(prompt["prompt"])
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            media = prompt.get("multi_modal_data")
            if not media:
                return text, ids, []
            ids, items = self.process_media(ids, media, prompt.get("mm_processor_kwargs"))
            return text, ids, items
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt), []
        raise InvalidRequestError(f"unsupported prompt type {type(prompt).__name__}")

    def process_media(self, token_ids: list[int], media: Mapping[str, Any], options: Mapping[str, Any] | None = None,
                      param: str = "multi_modal_data") -> tuple[list[int], list[MultimodalItem]]:
        """Preprocess a prompt's images and videos and expand its placeholders (one
        `<|vision_start|><|image_pad|><|vision_end|>` per image, `...<|video_pad|>...` per video, in
        order) into the token ids and items the engine takes."""
        if not self.engine.is_multimodal:
            raise InvalidRequestError(f"{self.config.architecture} is a text-only model: it takes no images or videos",
                                      param=param)
        unknown = set(media) - {"image", "video"}
        if unknown:
            raise InvalidRequestError(f"{param} keys are 'image' and 'video', not {sorted(unknown)}", param=param)
        as_list = lambda x: list(x) if isinstance(x, (list, tuple)) else ([] if x is None else [x])  # noqa: E731
        if self._mm_processor is None:
            from qwenrun.multimodal import MediaLimits, MultimodalProcessor

            self._mm_processor = MultimodalProcessor.from_model_dir(self.checkpoint.path, MediaLimits())
        tok = self.tokenizer
        if media.get("video") is not None and tok is None:
            raise InvalidRequestError(f"{self.checkpoint.path} has no tokenizer.json, which videos need for their "
                                      "timestamp text", param=f"{param}.video")
        mm = self._mm_processor(token_ids, as_list(media.get("image")), as_list(media.get("video")),
                                encode=tok.encode if tok else None, options=options, param=param)
        return mm.token_ids, multimodal_items(mm)

    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)

    def _submit(self, prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None) -> list[tuple[str | None, list[Request]]]:
        if params is None:
            params = self.get_default_sampling_params()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        encoded = [self._prompt_ids(p) for p in prompts]
        submitted: list[tuple[str | None, list[Request]]] = []
        try:
            for (text, ids, items), p in zip(encoded, plist):
                reqs = []
                for i in range(p.n):
                    reqs.append(self.engine.add_request(ids, p.for_choice(i), mm_items=items))
                submitted.append((text, reqs))
        except Exception:
            for _, reqs in submitted:  # leave nothing half-queued
                for r in reqs:
                    self.engine.abort(r.request_id)
            raise
        return submitted

    def _run(self) -> Iterator:
        while self.engine.has_unfinished_requests():
            yield from self.engine.step()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together (continuous batching) and return one output per prompt, in order."""
        submitted = self._submit(self._as_list(prompts), sampling_params)
        for _ in self._run():
            pass
        return [_request_output(text, reqs) for text, reqs in submitted]

    def generate_stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[tuple[int, str, bool]]:
        """Yields (prompt index, text delta, finished) as tokens are produced (n must be 1)."""
        submitted = self._submit(self._as_list(prompts), sampling_params)
        index = {reqs[0].request_id: i for i, (_, reqs) in enumerate(submitted)}
        try:
            for delta in self._run():
                if delta.text_delta or delta.finished:
                    yield index[delta.request.request_id], delta.text_delta, delta.finished
        finally:
            for _, reqs in submitted:
                for r in reqs:
                    self.engine.abort(r.request_id)

    # --------------------------------------------------------------------------------------- chat
    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages`. Thinking: explicit `enable_thinking` wins; otherwise the
        latest `/think` or `/no_think` in a user/system message decides; otherwise the template default (on).
        Tool-call arguments may be OpenAI's JSON string or an object (see `_arguments_as_objects`)."""
        kwargs = dict(chat_template_kwargs or {})
        if enable_thinking is None and "enable_thinking" not in kwargs:
            enable_thinking = soft_thinking_switch(messages)
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return self.chat_template.render(_arguments_as_objects(messages), tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         chat_template_kwargs=kwargs)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation or a list of them. Each output carries `reasoning_content`, `content`,
        parsed `tool_calls` (and `tool_call_errors` for malformed ones), token counts and finish reason."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        params = self._chat_params(sampling_params, thinking_budget)
        prompts = [self._chat_prompt(c, enable_thinking, tools, chat_template_kwargs) for c in conversations]
        outputs = self.generate(prompts, params)
        for out in outputs:
            opened = self.think_open(out.prompt_token_ids)
            for comp in out.outputs:
                self.parse_chat_output(comp, opened, tools=tools)
        return outputs

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling_params: SamplingParams | None = None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> Iterator[ChatDelta]:
        """Streams reasoning and content deltas of one conversation; the last delta has the full output."""
        params = self._chat_params(sampling_params, thinking_budget)
        prompt = self._chat_prompt(messages, enable_thinking, tools, chat_template_kwargs)
        [(_, [req])] = self._submit([prompt], _with(params, n=1))
        opened = self.think_open(req.prompt_token_ids)
        parser = StreamingReasoningParser(think_open_in_prompt=opened)
        try:
            for delta in self._run():
                if delta.request is not req:
                    continue
                reasoning, content = parser.feed(delta.text_delta)
                if delta.finished and req.finish_reason == "error":
                    # one conversation, so its failure is the caller's exception (the CLI shows it)
                    raise RequestFailedError(f"generation failed: {req.error}")
                if delta.finished:
                    r2, c2 = parser.finish()
                    comp = completion_output(0, req)
                    self.parse_chat_output(comp, opened, tools=tools)
                    yield ChatDelta(reasoning + r2, content + c2, True, comp)
                    return
                if reasoning or content:
                    yield ChatDelta(reasoning, content, False)
        finally:
            self.engine.abort(req.request_id)

    def _chat_prompt(self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool | None, tools: Tools,
                     chat_template_kwargs: Mapping[str, Any] | None) -> Prompt:
        """The rendered prompt, with the conversation's images and videos (OpenAI content parts) as
        `multi_modal_data` when it has any."""
        from qwenrun.multimodal.messages import extract_media

        flat, images, videos = extract_media(messages)
        text = self.render_chat(flat, enable_thinking=enable_thinking, tools=tools,
                                chat_template_kwargs=chat_template_kwargs)
        if not images and not videos:
            return text
        return {"prompt": text, "multi_modal_data": {"image": images, "video": videos}}

    def _chat_params(self, params: SamplingParams | None, thinking_budget: int | None) -> SamplingParams:
        params = params or self.get_default_sampling_params()
        return _with(params, thinking_budget=thinking_budget) if thinking_budget is not None else params

    def think_open(self, prompt_ids: list[int]) -> bool:
        """Whether generation starts inside reasoning (the prompt left <think> open)."""
        tok = self._need_tokenizer()
        return think_open_in_prompt(prompt_ids, tok.think_start_id, tok.think_end_id)

    def parse_chat_output(self, comp: CompletionOutput, think_open_in_prompt: bool, *, tools: Tools) -> None:
        """Fill `reasoning_content`, `content`, `tool_calls`, `tool_call_errors` and `reasoning_tokens` of a
        chat completion from its text.

        Args:
            tools: the tools the prompt offered (None if none): Qwen3-Coder types its arguments by
                their schemas and rejects calls to functions not among them. Required, so that no
                caller parses without them.
        """
        parsed = ChatOutputParser(self.tool_parser, tools, think_open_in_prompt).parse(comp.text)
        comp.reasoning_content = parsed.reasoning
        comp.content = parsed.content
        comp.tool_calls = parsed.tool_calls
        comp.tool_call_errors = parsed.errors
        tok = self._need_tokenizer()
        ids = comp.token_ids
        if tok.think_end_id in ids:
            comp.reasoning_tokens = ids.index(tok.think_end_id)
        elif parsed.reasoning is not None and parsed.content is None and not parsed.tool_calls:
            comp.reasoning_tokens = len(ids)

    # ------------------------------------------------------------------------------------- logits
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] (fp32 on CPU) for scoring and verification."""
        ids = list(token_ids)
        if not ids:
            raise InvalidRequestError("token_ids is empty")
        if len(ids) > self.engine.max_model_len:
            raise ContextLengthError(f"{len(ids)} tokens exceed the context window of {self.engine.max_model_len}")
        return self.engine.prompt_logits(ids).float().cpu()


def _with(params: SamplingParams, **changes: Any) -> SamplingParams:
    from dataclasses import replace

    return replace(params, **changes)


def _arguments_as_objects(messages: Sequence[Any]) -> Sequence[Any]:
    """Messages whose assistant `tool_calls[].function.arguments` JSON strings (the OpenAI shape,
    what `Agent` stores) are objects: every Qwen3 template renders an object, and the Qwen3-Coder
    one iterates `arguments|items`, which fails on a string. Anything else passes unchanged, for
    the template's own checks."""
    if not isinstance(messages, (list, tuple)):
        return messages  # not a list of messages: the template's checks say so
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, Mapping) else None
        if isinstance(calls, list) and calls:
            message = {**message, "tool_calls": [_call_with_object(c) for c in calls]}
        out.append(message)
    return out


def _call_with_object(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except (ValueError, RecursionError):
        return call
    return {**call, "function": {**fn, "arguments": arguments}} if isinstance(arguments, dict) else call


def completion_output(index: int, req: Request) -> CompletionOutput:
    """The CompletionOutput of a finished request, before its chat text is parsed."""
    return CompletionOutput(
        index=index,
        text=req.text,
        token_ids=list(req.output_token_ids),
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        logprobs=req.logprobs,
        error=req.error,
    )


def _request_output(prompt: str | None, reqs: list[Request]) -> RequestOutput:
    return RequestOutput(
        request_id=reqs[0].request_id,
        prompt=prompt,
        prompt_token_ids=list(reqs[0].prompt_token_ids),
        outputs=[completion_output(i, r) for i, r in enumerate(reqs)],
        finished=all(r.finished for r in reqs),
    )


def multimodal_items(mm: Any) -> list[MultimodalItem]:
    """A `MultimodalPrompt`'s images and videos as engine items, in prompt order (a video's
    placeholder runs, one per temporal patch, grouped under it)."""
    runs: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for r in mm.ranges:
        runs.setdefault((r.modality, r.item), []).append((r.offset, r.length))
    items = []
    for (kind, i), item_runs in runs.items():
        feats = (mm.images if kind == "image" else mm.videos)[i]
        items.append(MultimodalItem(kind, torch.from_numpy(feats.pixel_values), tuple(feats.grid_thw),
                                    feats.content_hash.encode(), tuple(item_runs)))
    return sorted(items, key=lambda it: it.offset)
