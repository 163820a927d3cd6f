"""LLMEngine: requests in, one scheduled step at a time, token and text deltas out.

The loop is explicit data: `Scheduler.schedule()` returns a `ScheduledBatch`, `ModelRunner.prepare()`
turns it into a `ForwardBatch`, `ModelRunner.execute()` returns a `StepResult` (tokens per request),
`Scheduler.update()` advances the requests' computed tokens and prefix cache, and `_apply` turns
each request's tokens into output (forced thinking-budget tokens go in whole), checks stop
conditions and frees finished requests' blocks at once. An exception while serving one request
fails that request alone (`step`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence

import torch

from qwenrun.engine.cache import CacheManager
from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.engine.kv_cache import BlockPool
from qwenrun.engine.request import (
    EARLY_STOP_TEXT,
    Request,
    ScheduledBatch,
    StepDelta,
    StepResult,
    Thinking,
    think_open_in_prompt,
)
from qwenrun.engine.runner import ModelRunner
from qwenrun.engine.scheduler import Scheduler
from qwenrun.errors import ContextLengthError, InvalidRequestError, RequestFailedError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.attention import kv_cache_dtype as kv_cache_dtype_of
from qwenrun.loading.loader import Checkpoint
from qwenrun.sampling.params import SamplingParams
from qwenrun.sampling.sampler import make_generator
from qwenrun.spec_decode import SpeculativeConfig, make_drafter, make_proposer
from qwenrun.spec_decode.policy import DraftPolicy
from qwenrun.structured.backend import GrammarMatcher, StructuredBackend
from qwenrun.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

# Room left for the answer when max_tokens forces reasoning to close: a quarter, at most 1024.
ANSWER_RESERVE_FRACTION, ANSWER_RESERVE_MAX = 4, 1024
# Encoder output kept for reuse (vision-language models): an eighth of the cache memory, at most this.
ENCODER_CACHE_MAX = 1 << 30

def default_kv_cache_memory(device: torch.device) -> int:
    """A fifth of RAM on CPU (at most 4 GiB); 90% of the free memory left on a GPU after loading."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(ram // 5, 4 << 30)


def _stored_as(specs: list, dtype: torch.dtype) -> list:
    """The model's cache specs with attention K/V stored as `dtype` (recurrent state unchanged)."""
    return [dataclasses.replace(s, dtype=dtype) if isinstance(s, KVCacheSpec) else s for s in specs]


def _junction(prompt: list[int], tokenizer: Tokenizer | None) -> int:
    """The last `<|im_start|>` of a chat prompt (the next turn keeps everything before it: its
    template may render this turn's header and reasoning differently), else the prompt's end."""
    start = tokenizer.im_start_id if tokenizer is not None else None
    if start is not None:
        for i in range(len(prompt) - 1, -1, -1):
            if prompt[i] == start:
                return i
    return len(prompt)


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        ckpt: Checkpoint,
        tokenizer: Tokenizer | None,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        speculative_config: dict | SpeculativeConfig | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        """`kv_cache_dtype`: "auto" stores K/V in `dtype`, "int8" as int8 with a scale per token and kv
        head (`QuantizedKV`): about twice the tokens in the same memory, for every attention layer
        (drafters' too). `speculative_config`: vLLM's shape, e.g. {"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 3}, {"method": "draft_model", "model": path, ...} (loaded here, in
        `dtype` on `device`) or {"method": "mtp", ...} (the head `model` was loaded with);
        InvalidRequestError for a bad field. A hybrid model's running sequences then hold a state
        slot per draft besides their two (`CachePlan`), so fewer may fit."""
        cfg = ckpt.config
        spec = SpeculativeConfig.parse(speculative_config) if speculative_config is not None else None
        self.config, self.tokenizer, self.device = cfg, tokenizer, device
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings}); configure rope scaling (YaRN) to go further"
            )
        budget = kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory(device)
        self.model = model
        self.drafter = make_drafter(spec, model, ckpt, dtype, device) if spec is not None else None
        stored = kv_cache_dtype_of(kv_cache_dtype, dtype)
        target_specs = _stored_as(model.cache_specs(dtype), stored)
        drafter_specs = _stored_as(self.drafter.cache_specs(dtype), stored) if self.drafter is not None else []
        # the drafter's K/V layers follow the target's in the one plan: same blocks, same block tables
        self.cache, self.max_model_len = CacheManager.from_budget(
            target_specs + drafter_specs, budget, block_size, max_model_len or cfg.max_position_embeddings,
            max_num_seqs, device, enable_prefix_caching, context_required=max_model_len is not None,
            encoder_cache_bytes=min(budget // 8, ENCODER_CACHE_MAX) if self.is_multimodal else 0,
            num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
        )
        self.speculative_config = spec
        k = spec.num_speculative_tokens if spec else 0
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens,
                                   DraftPolicy.from_config(spec) if spec else None,
                                   make_proposer(spec) if spec and self.drafter is None else None,
                                   k - self.drafter.token_shift if self.drafter is not None else 0)
        gen = ckpt.generation_config.get("eos_token_id")
        eos = set(cfg.eos_token_id) | set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        vocab = tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size
        layers = self.cache.layers
        self.runner = ModelRunner(model, cfg, layers[: len(target_specs)], block_size, self.cache.is_hybrid,
                                  self.cache.encoder, vocab, self.eos_token_ids, device, self.drafter,
                                  layers[len(target_specs) :], k)
        self.early_stop_ids: tuple[int, ...] = tuple(tokenizer.encode(EARLY_STOP_TEXT)) if tokenizer else ()
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

    @property
    def is_multimodal(self) -> bool:
        """A vision-language model: requests may carry images and videos (`make_request(mm_items=...)`)."""
        return hasattr(self.model, "encode_vision")

    @property
    def pool(self) -> BlockPool:
        """The KV block pool (read-only use: stats, checks); allocation goes through `cache`."""
        return self.cache.pool

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] of one sequence, in scratch blocks of the cache manager
        (RuntimeError when running requests leave too few free)."""
        with self.cache.scratch(len(token_ids)) as handle:
            return self.runner.prompt_logits(token_ids, handle.block_table)

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """How many tokens a request may generate; ContextLengthError if it cannot fit."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the context window is {self.max_model_len} tokens"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
                f"of {self.max_model_len} tokens; lower max_tokens to at most {room}"
            )
        return params.max_tokens or room

    def _thinking(self, prompt: list[int], params: SamplingParams, max_new: int) -> Thinking:
        """The request's reasoning bookkeeping."""
        tok = self.tokenizer
        start, end = (tok.think_start_id, tok.think_end_id) if tok else (None, None)
        is_open = think_open_in_prompt(prompt, start, end)
        early_stop = self.early_stop_ids
        stop_len = len(early_stop)
        close_at = None
        if early_stop and max_new > stop_len:
            reserve = max(1, min(ANSWER_RESERVE_MAX, (max_new - stop_len) // ANSWER_RESERVE_FRACTION))
            close_at = max_new - stop_len - reserve
        budget = params.thinking_budget if self.early_stop_ids else None
        if params.thinking_budget is not None and not self.early_stop_ids:
            raise InvalidRequestError("thinking_budget needs a tokenizer with <think> and </think> tokens")
        thinking = Thinking(start, end, early_stop, budget, close_at, open=is_open)
        thinking.check_limits(0)
        return thinking

    @property
    def structured_backend(self) -> StructuredBackend:
        """The grammar engine for this model's tokenizer, logits width and EOS ids (made once, on
        the first constrained request; InvalidRequestError without a tokenizer)."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured_outputs needs the checkpoint's tokenizer",
                                      param="structured_outputs")
        from qwenrun.structured.xgrammar_backend import backend_for  # xgrammar loads on first use

        return backend_for(self.tokenizer, self.config.vocab_size, self.eos_token_ids)

    def _grammar(self, prompt: list[int], params: SamplingParams, thinking: Thinking) -> GrammarMatcher | None:
        """A fresh matcher for `params.structured_outputs` (compiled here, on the caller's thread;
        InvalidRequestError naming the field if it does not compile), or None.

        Where the constraint starts: after `</think>` (and the "\n\n" that may follow it) when
        the prompt leaves reasoning open (the thinking budget's forced close too); at the first token when the
        prompt's final turn (from its last `<|im_start|>`) closed reasoning already (thinking
        off: the template wrote an empty block), or when the prompt has no chat turn at all (a
        raw completion, whose text is returned as written: no reasoning is split off it); and
        otherwise at the first token unless that token is `<think>` (Qwen3 with thinking on
        writes it itself), which opens a free region up to `</think>`. So a model that never
        reasons is constrained from its first token.
        """
        spec = params.structured_outputs
        if spec is None:
            return None
        backend = self.structured_backend
        compiled = backend.compile(spec)
        start, end = thinking.start_id, thinking.end_id
        if start is None or end is None:
            return backend.matcher(compiled)
        # the token Qwen3 writes after </think> ("\n\n", the early-stop text's last) may come
        # before the constraint: masking it would push the model off its answer's first token
        stop = self.early_stop_ids
        gap = stop[stop.index(end) + 1] if end in stop[:-1] else None
        if thinking.open:
            return backend.matcher(compiled, free_until=end, after_free=gap)
        turn = _junction(prompt, self.tokenizer)  # the prompt's end when it has no turns
        if turn == len(prompt) or end in prompt[turn:]:
            return backend.matcher(compiled)
        return backend.matcher(compiled, free_until=end, free_if_first=start, after_free=gap)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    mm_items: Sequence[MultimodalItem] = ()) -> Request:
        """Validates against the context window and queues the request (ContextLengthError otherwise)."""
        return self.add(self.make_request(prompt_token_ids, params, request_id, mm_items))

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     mm_items: Sequence[MultimodalItem] = ()) -> Request:
        """Validate and build a request without touching the scheduler (safe from any thread).

        `mm_items`: the prompt's preprocessed images and videos, in prompt order, each over its own
        run of placeholder tokens (qwenrun.multimodal builds them)."""
        prompt = list(prompt_token_ids)
        vocab = self.config.vocab_size
        if any(not (0 <= t < vocab) for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        mrope = None
        if mm_items:
            if not self.is_multimodal:
                raise InvalidRequestError(f"{self.config.architecture} is a text-only model: it takes no images or videos")
            runs = [run for it in mm_items for run in it.runs]
            ends = [0] + [o + n for o, n in runs]
            if any(o < end or n < 1 for (o, n), end in zip(runs, ends)) or ends[-1] > len(prompt):
                raise InvalidRequestError("images and videos must cover disjoint placeholder runs inside the prompt, "
                                          "in order")
            mrope = self.model.rope_positions(
                prompt, [it.grid_thw for it in mm_items if it.kind == "image"],
                [it.grid_thw for it in mm_items if it.kind == "video"])
        max_new = self.max_new_tokens(len(prompt), params)
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= set(self.eos_token_ids)
        thinking = self._thinking(prompt, params, max_new)
        req = Request(
            request_id=request_id or str(next(self._ids)),
            prompt_token_ids=prompt,
            params=params,
            max_new_tokens=max_new,
            stop_ids=frozenset(stop_ids),
            thinking=thinking,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens)
            if self.tokenizer
            else None,
            generator=make_generator(params.seed, self.device),
            junction=_junction(prompt, self.tokenizer),
            mm_items=tuple(mm_items),
            mrope=mrope,
            grammar=self._grammar(prompt, params, thinking),
        )
        return req

    def add(self, req: Request) -> Request:
        if req.request_id in self._requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already running")
        self._requests[req.request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks return to the pool immediately."""
        req = self._requests.pop(request_id, None)
        if req is not None and not req.finished:
            req.finish_reason = "abort"
            self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def unfinished_requests(self) -> list[Request]:
        """Every request added and not yet finished or aborted."""
        return list(self._requests.values())

    def step(self) -> list[StepDelta]:
        """Schedule, prepare, execute, update: one batch, and one delta per request that produced one.

        A failure while serving one request fails that request alone (`fail`); the others carry
        on. Per-request work (applying tokens, detokenizing, stop checks) is guarded request by
        request. When the batched forward or sampling raises, the batch's requests are run again
        one at a time (`_execute`), so only a request that fails on its own is failed. Should
        scheduling itself raise, no request's state can be trusted, and every unfinished request
        is failed.
        """
        try:
            batch = self.scheduler.schedule()
        except Exception as e:
            logger.exception("scheduling failed; failing every unfinished request")
            return [self.fail(req, e) for req in self.unfinished_requests()]
        if batch is None:
            return []
        result = self._execute(batch)
        self.scheduler.update(batch, result)
        deltas: list[StepDelta] = []
        for req, tokens, logprobs, error in zip(batch.requests, result.token_ids, result.logprobs, result.errors):
            try:
                if error is not None:
                    raise error
                if tokens:
                    deltas.append(self._apply(req, tokens, logprobs))
            except Exception as e:
                deltas.append(self.fail(req, e))
        return deltas

    def _execute(self, batch: ScheduledBatch) -> StepResult:
        """The runner's result for the batch; when it raises, each request's result alone, or the
        exception it fails with (`StepResult.errors`).

        Rerunning one request at a time (not bisecting) keeps this simple; it costs a forward
        per request, only in the step that failed.
        """
        try:
            return self.runner.execute(batch, self.runner.prepare(batch))
        except Exception as e:
            if len(batch.requests) == 1:
                return StepResult([[]], [[]], [e])
            logger.warning("a step of %d requests failed (%s: %s); running them one at a time to "
                           "find the failing one", len(batch.requests), type(e).__name__, e)
        alone = [self._execute(ScheduledBatch([req], [n], [d]))
                 for req, n, d in zip(batch.requests, batch.num_tokens, batch.drafts)]
        return StepResult([r.token_ids[0] for r in alone], [r.logprobs[0] for r in alone],
                          [r.errors[0] for r in alone], [r.drafts[0] for r in alone])

    def fail(self, req: Request, exc: BaseException) -> StepDelta:
        """End `req` with finish_reason "error" and `error` set, freeing its blocks at once.

        The exception is a bug (validated input never raises) and is logged with its traceback,
        except an InvalidRequestError (a constraint found unsatisfiable while decoding), which is
        the client's to fix and reaches the consumer as itself (`Request.failure`); the returned
        delta tells the request's consumer.
        """
        if isinstance(exc, InvalidRequestError):
            logger.info("request %s failed: %s", req.request_id, exc)
        else:
            logger.error("request %s failed; the other requests carry on", req.request_id, exc_info=exc)
        req.finish_reason = "error"
        req.error = f"{type(exc).__name__}: {exc}"
        req.failure = exc
        if not req.finished:
            self.scheduler.finish(req)
        self._requests.pop(req.request_id, None)
        return StepDelta(req, [], "", True)

    def _apply(self, req: Request, sampled: list[int], logprobs: list[dict[int, float] | None]) -> StepDelta:
        """Append a step's tokens to `req` until one ends it.

        A forced close (the thinking-budget early-stop text) goes in whole: its tokens follow the
        sampled token that triggered it (or replace what was sampled, when it was queued before
        the first token), and the next step prefills them in one forward instead of one each.
        """
        tokens: list[int] = []
        base = len(req.token_ids)
        if not req.thinking.forced:
            for token, logprob in zip(sampled, logprobs):
                tokens.append(token)
                self._accept(req, token, logprob, forced=False)
                if req.finish_reason is not None or req.thinking.forced:
                    break  # tokens past the end, or past a forced close, are not the request's
        # Accepted drafts past the tokens kept were computed at positions that forced tokens now take.
        excess = req.num_computed_tokens - (base + len(tokens))
        if excess > 0 and req.finish_reason is None:
            self.scheduler.rollback(req, excess)
        while req.thinking.forced and req.finish_reason is None:
            tokens.append(req.thinking.forced.popleft())
            self._accept(req, tokens[-1], None, forced=True)
        if req.finish_reason is not None:
            if req.detokenizer is not None and not isinstance(req.stop_reason, str):
                req.text += req.detokenizer.flush()
            self.scheduler.finish(req)
            self._requests.pop(req.request_id, None)
        return StepDelta(req, tokens, self._release_text(req), req.finished)

    def _accept(self, req: Request, token: int, logprob: dict[int, float] | None, forced: bool) -> None:
        """One token appended to `req`, with its stop checks; sets `finish_reason` when it ends."""
        if not forced and not 0 <= token < self.runner.valid_vocab_size:
            # Only a row with no finite logit yields a padded column (see `sample`).
            raise RequestFailedError(f"the model produced no valid token (id {token}): its "
                                     "logits for this request are NaN or infinite")
        req.token_ids.append(token)
        if req.logprobs is not None:
            req.logprobs.append(logprob if not forced else {token: 0.0})
        n_out = req.num_output_tokens
        req.thinking.observe(token, n_out)
        grammar, params = req.grammar, req.params
        if grammar is not None and not grammar.accept(token):
            if grammar.is_dead_end():  # the client's constraint, not a bug: nothing could follow
                raise InvalidRequestError(
                    f"structured_outputs cannot be satisfied: after {n_out - 1} output tokens the "
                    "constraint allows no next token (an empty pattern or enum inside it?)",
                    param="structured_outputs")
            raise RequestFailedError(f"token {token} breaks the request's structured_outputs constraint")
        if not forced and token in req.stop_ids and n_out >= max(params.min_tokens, 1) or \
                grammar is not None and grammar.is_terminated:
            # a grammar ends only by accepting a stop token, and then ends the request even
            # before min_tokens or with ignore_eos: nothing may follow it
            req.finish_reason = "stop"
            req.stop_reason = token if token in (params.stop_token_ids or ()) else None
        elif req.detokenizer is not None:
            self._append_text(req, req.detokenizer.add([token]))
        if req.finish_reason is None and (n_out >= req.max_new_tokens or len(req.token_ids) >= self.max_model_len):
            req.finish_reason = "length"

    def _append_text(self, req: Request, delta: str) -> None:
        """Adds decoded text; a stop string ends the request and is cut from the output (vLLM)."""
        old = len(req.text)
        req.text += delta
        for stop in req.params.stop or ():
            i = req.text.find(stop, max(0, old - len(stop) + 1))
            if i != -1:
                req.text = req.text[:i]
                req.finish_reason, req.stop_reason = "stop", stop
                return

    def _release_text(self, req: Request) -> str:
        """Text safe to stream: everything once finished, else all but a possible stop-string prefix."""
        hold = 0 if req.finished else max((len(s) - 1 for s in req.params.stop or ()), default=0)
        end = max(req.sent_text_len, len(req.text) - hold)
        out = req.text[req.sent_text_len : end]
        req.sent_text_len = end
        return out
