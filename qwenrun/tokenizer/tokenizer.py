"""A checkpoint's Hugging Face tokenizer, loaded without transformers; streaming detokenization.

`tokenizer.json` is read by the Rust `tokenizers` library, which gives the same ids as
`AutoTokenizer(...).encode(text, add_special_tokens=False)` for Qwen3 (added tokens such as
`<think>` or `<|im_end|>` written in the text are matched as single tokens). `tokenizer_config.json`
supplies what the Rust file lacks: the chat template, the eos/pad tokens and the `special` flags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers

from qwenrun.errors import CheckpointError

IM_START = "<|im_start|>"
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
IM_END = "<|im_end|>"

# Named special tokens HF passes to chat templates (its `special_tokens_map`), when set.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

# Prompt tokens the streaming window starts with (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT = 5

_REPLACEMENT_CHAR = "\ufffd"

# A UTF-16 surrogate code point: legal in a Python str, never in UTF-8 (nor in Rust's String).
_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` as valid Unicode: surrogate pairs joined into their character, lone ones -> U+FFFD.

    JSON allows `"\\ud800"` and `json.loads` keeps it as a lone surrogate; `surrogateescape`
    decoding and CESU-8 text give them too. The Rust tokenizer cannot take such a str, so every
    text entry point repairs it the way browsers do (WHATWG's USVString conversion), instead of
    failing the request. Text without surrogates is returned as it is, after one regex scan.
    """
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _token_text(value: Any) -> str | None:
    """Named tokens are saved either as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is unreadable or not valid JSON ({exc}); re-download it"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; re-download it")
    return data


def _pick_template(value: Any) -> str | None:
    """Old configs store several named templates as a list; HF then uses the one named "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` (and `chat_template.jinja`) the runtime uses."""

    chat_template: str | None = None
    special_tokens_map: dict[str, str] = field(default_factory=dict)
    # Ids flagged `special` in `added_tokens_decoder`; None when the config has no decoder.
    special_ids: frozenset[int] | None = None

    @classmethod
    def from_dir(cls, path: Path) -> TokenizerConfig:
        """Read the folder's config; a missing `tokenizer_config.json` yields an empty config.

        Raises:
            CheckpointError: a present config or template file cannot be read.
        """
        config_file = path / "tokenizer_config.json"
        raw = _read_json(config_file) if config_file.is_file() else {}
        template = _pick_template(raw.get("chat_template"))
        # HF gives a standalone chat_template.jinja priority over the config entry.
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(
                    f"{template_file} is unreadable ({exc}); re-download it"
                ) from exc
        named = {key: _token_text(raw.get(key)) for key in _NAMED_TOKENS}
        decoder = raw.get("added_tokens_decoder")
        special = None
        if isinstance(decoder, dict):
            special = frozenset(
                int(i)
                for i, tok in decoder.items()
                if str(i).isdigit() and isinstance(tok, dict) and tok.get("special")
            )
        return cls(
            chat_template=template,
            special_tokens_map={k: v for k, v in named.items() if v is not None},
            special_ids=special,
        )


class Tokenizer:
    """Text <-> token ids for one checkpoint, with the Qwen3 protocol token ids resolved once.

    Invariants: `encode` never adds BOS/EOS; `vocab_size` counts added tokens (151669 for Qwen3,
    smaller than the model's padded embedding of 151936); protocol ids are None when absent.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
        self._backend = backend
        self.chat_template: str | None = config.chat_template
        self.special_tokens_map: dict[str, str] = dict(config.special_tokens_map)
        self.special_ids: frozenset[int] = (
            config.special_ids
            if config.special_ids is not None
            else frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        )
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token_id: int | None = self.token_to_id(eos) if eos else None
        pad = self.special_tokens_map.get("pad_token")
        self.pad_token_id: int | None = self.token_to_id(pad) if pad else None
        self.think_start_id = self.token_to_id(THINK_START)
        self.think_end_id = self.token_to_id(THINK_END)
        self.tool_call_start_id = self.token_to_id(TOOL_CALL_START)
        self.tool_call_end_id = self.token_to_id(TOOL_CALL_END)
        self.im_end_id = self.token_to_id(IM_END)
        self.im_start_id = self.token_to_id(IM_START)

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`) from a folder.

        Raises:
            CheckpointError: `tokenizer.json` is missing or unparsable, or a config file is corrupt.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(
                f"{file} not found: the checkpoint folder needs the HF tokenizer.json"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust loader raises a bare Exception for every parse error
            raise CheckpointError(
                f"{file} is corrupt and cannot be loaded ({exc}); re-download it"
            ) from exc
        return cls(backend, TokenizerConfig.from_dir(path))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids.

        Surrogate code points are repaired first (`replace_surrogates`), so any str encodes.
        """
        return self._backend.encode(replace_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; partial UTF-8 decodes to U+FFFD, ids past the vocab are dropped."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of the vocabulary entry `token`; None if there is none (none has a surrogate)."""
        if _SURROGATE.search(token) is not None:
            return None
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never splitting a UTF-8 character.

    One Qwen3 token may hold part of a character (rare CJK, many emoji), so text is released only
    when the decoded window does not end in U+FFFD. This is vLLM's prefix/read-offset scheme with
    the prefix offset kept at 0: the window `_ids` starts with the ids released last time (left
    context, up to `_read_offset`, decoding to `_prefix_text`), followed by the unreleased ids; the
    delta is the window's text beyond `_prefix_text`. Each `add` decodes O(window) ids.

    Invariant: "".join(add outputs) + flush() == tokenizer.decode(all ids, skip_special_tokens).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # A few prompt ids as left context help tokenizers whose decoding depends on neighbours.
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        prefix_text = self._decode(context)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends mid-character: joining it would change the output's own decoding.
            context, prefix_text = [], ""
        self._ids = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: list[int]) -> str:
        """Append generated ids; return the text they complete (may be "")."""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""  # hold back a partial character until its last byte arrives
        delta = text[len(self._prefix_text) :]
        # Released ids before the old read offset are no longer needed as context.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def flush(self) -> str:
        """Release whatever is held back (end of stream), U+FFFD included."""
        delta = self._decode(self._ids)[len(self._prefix_text) :]
        self._ids.clear()
        self._read_offset = 0
        self._prefix_text = ""
        return delta
