"""StructuredBackend on xgrammar (chosen over llguidance by benchmarks/grammar_bench.py).

Why xgrammar: its per-token mask, the cost every constrained decode step pays, is several times
cheaper than llguidance's on Qwen3's 151936-token vocabulary and far steadier (xgrammar
precomputes the context-independent tokens of each grammar state at compile time; llguidance
walks the token trie per step, so its worst steps are milliseconds: a first probe on a loaded
CPU, nested schema, gave a median/max mask of 0.008/0.2 ms against 0.047/12 ms; the tokenizer
conversion took ~1 s against ~7 s). Its weakness is compile time (hundreds of ms for a nested
schema on a loaded CPU, where llguidance's lazy construction is tens of ms). That is paid once per distinct constraint, not per token: compiled grammars are kept by
their canonical key (agents send the same tools and schemas every turn), and `compile` runs on the
caller's thread, which the server keeps off the engine loop. It also ships structural tags
(structured/tool_calls.py builds the tool-call formats on them). Its CPU bitmask kernel is not
used: the sampler's `apply_token_bitmask` is several times cheaper on grammar-shaped masks.

The TokenizerInfo (the decoded vocabulary, ~1 s for Qwen3) is built once per tokenizer, at the
first compile, not at start-up: servers that never see a constraint never pay it.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from qwenrun.errors import InvalidRequestError
from qwenrun.structured.backend import GrammarMatcher, StructuredBackend, stop_free_mask
from qwenrun.structured.params import StructuredOutputsParams, lengths_as_patterns
from qwenrun.tokenizer.tokenizer import Tokenizer

# Room for a newline and three levels of four-space indentation, as Qwen indents JSON.
JSON_MAX_WHITESPACE = 13
CACHE_SIZE = 256  # compiled constraints kept; Qwen3 grammars are ~0.1-2 MB each

# GPT-2 byte-level BPE spells a leading space as U+0120; every Qwen tokenizer is one.
_BYTE_LEVEL_SPACE = "\u0120"


def _whitespace(spec: StructuredOutputsParams) -> dict[str, Any]:
    """JSON whitespace: compact with `disable_any_whitespace`, else at most JSON_MAX_WHITESPACE
    characters between two tokens. Unbounded whitespace is a run a small model falls into and fills
    until max_tokens (a random model always does; xgrammar's docs warn of it)."""
    if spec.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE}


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int,
                    stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of `tokenizer` for logits of width `vocab_size`.

    Never allowed by a grammar (xgrammar treats an empty token as special): ids past the
    tokenizer's own vocabulary (the LM head's padding), special tokens (`<|im_start|>`, which
    skip_special_tokens would drop from the text the grammar was matched on), and `<think>` /
    `</think>` (text to xgrammar, which would let a JSON string open reasoning that the engine
    then closes with forced text the grammar rejects; the free region is `GrammarMatcher`'s).
    Non-special added tokens (`<tool_call>`) stay text: tool-call tags are written with them.

    Raises:
        ValueError: not a byte-level BPE tokenizer (the only kind the Qwen3 family ships).
    """
    never = set(tokenizer.special_ids) | {tokenizer.think_start_id, tokenizer.think_end_id}
    encoded = ["" if i in never else tokenizer.id_to_token(i) or ""
               for i in range(min(tokenizer.vocab_size, vocab_size))]
    if not any(t.startswith(_BYTE_LEVEL_SPACE) for t in encoded):
        raise ValueError("structured outputs need a byte-level BPE tokenizer (as Qwen3's)")
    encoded += [""] * (vocab_size - len(encoded))
    return xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids), add_prefix_space=False)


def _tag_lengths_as_patterns(tag: Any) -> Any:
    """A structural tag with `lengths_as_patterns` applied to each of its JSON schemas."""
    if isinstance(tag, dict):
        return {k: lengths_as_patterns(v) if k == "json_schema" and tag.get("type") == "json_schema"
                else _tag_lengths_as_patterns(v) for k, v in tag.items()}
    if isinstance(tag, list):
        return [_tag_lengths_as_patterns(v) for v in tag]
    return tag


def _choice_grammar(choices: Sequence[str]) -> str:
    # JSON string escapes are EBNF's (\" \\ \n \uXXXX); non-ASCII stays literal, never a surrogate pair.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class XGrammarBackend(StructuredBackend):
    """xgrammar for one tokenizer, logits width and set of stop tokens; thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        if not stop_token_ids:
            raise ValueError("a constrained request needs at least one stop token to finish with")
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._tokenizer = tokenizer
        self._compiler: xgr.GrammarCompiler | None = None
        self._free_mask = stop_free_mask(vocab_size, self.stop_token_ids)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = _tokenizer_info(self._tokenizer, self.vocab_size, self.stop_token_ids)
                # our own cache holds compiled grammars by key; xgrammar's would keep a second copy
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(self._get_compiler(), spec)
        self._check_satisfiable(compiled, spec)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: xgr.GrammarCompiler, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        param = f"structured_outputs.{spec.kind}"
        try:
            if spec.json is not None:
                return compiler.compile_json_schema(json.dumps(lengths_as_patterns(spec.json)),
                                                    **_whitespace(spec))
            if spec.json_object:
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False,
                                                    **_whitespace(spec))
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(_choice_grammar(spec.choice))
            if spec.grammar is not None:
                return compiler.compile_grammar(spec.grammar)
            return compiler.compile_structural_tag(
                json.dumps(_tag_lengths_as_patterns(spec.structural_tag)))
        # xgrammar reports a bad pattern, grammar or tag as RuntimeError / ValueError subclasses
        except (RuntimeError, ValueError) as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise InvalidRequestError(f"{param} cannot be compiled: {message}", param=param) from exc

    def _check_satisfiable(self, compiled: xgr.CompiledGrammar, spec: StructuredOutputsParams) -> None:
        """A constraint no output can meet (`{"anyOf": []}`, a required property of an empty enum)
        allows no first token; refused here, or the request would sample from nothing."""
        bitmask = self.allocate_bitmask(1)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        if not bitmask.any():
            param = f"structured_outputs.{spec.kind}"
            raise InvalidRequestError(f"{param} admits no output: nothing can satisfy it", param=param)

    def matcher(self, compiled: xgr.CompiledGrammar, free_until: int | None = None,
                free_if_first: int | None = None, after_free: int | None = None) -> GrammarMatcher:
        return GrammarMatcher(xgr.GrammarMatcher(compiled), self._free_mask, self.stop_token_ids,
                              free_until, free_if_first, after_free)


_backends: weakref.WeakKeyDictionary[Tokenizer, dict[Any, XGrammarBackend]] = weakref.WeakKeyDictionary()
_backends_lock = threading.Lock()


def backend_for(tokenizer: Tokenizer, vocab_size: int,
                stop_token_ids: Sequence[int]) -> XGrammarBackend:
    """The one backend of `tokenizer` (for this logits width and stop set), made on first use."""
    key = (vocab_size, tuple(stop_token_ids))
    with _backends_lock:
        per_tokenizer = _backends.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
        return per_tokenizer[key]
