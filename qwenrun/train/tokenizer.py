"""Train a small byte-level BPE that behaves like Qwen3's tokenizer: same normalizer, pre-tokenizer
(digits split one by one), byte-level decoder and the same added tokens with the same `special` flags.

Only the merges and the vocabulary size differ, so the official chat template and qwenrun's
reasoning/tool parsers work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

# Qwen3's pre-tokenizer regex (tokenizer.json of Qwen/Qwen3-*).
QWEN3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Qwen3's added tokens in id order, with their `special` flags.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A Qwen3-style byte-level BPE of `vocab_size` entries (added tokens included), learnt on `texts`.

    The added tokens take the last ids, as in Qwen3, so ordinary tokens keep ids 0..n-1.
    """
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(  # type: ignore[call-arg]  # the stubs lag the Rust signature
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Keep added-token text out of the merges: the model sees them as single ids anyway.
    specials = [t for t, _ in ADDED_TOKENS]

    def strip(text: str) -> str:
        for s in specials:
            text = text.replace(s, "\n")
        return text

    tok.train_from_iterator((strip(t) for t in texts), trainer=trainer)
    data = json.loads(tok.to_str())
    data["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    base = len(data["model"]["vocab"])
    data["added_tokens"] = [
        {
            "id": base + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (t, special) in enumerate(ADDED_TOKENS)
    ]
    return tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config(tok: tokenizers.Tokenizer, chat_template: str) -> dict[str, Any]:
    """tokenizer_config.json in Qwen3's shape: eos `<|im_end|>`, pad `<|endoftext|>`, the chat template."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for t, special in ADDED_TOKENS
        },
        "additional_special_tokens": [
            t for t, special in ADDED_TOKENS if special and t != "<|endoftext|>"
        ],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: tokenizers.Tokenizer, chat_template: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok, chat_template), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
