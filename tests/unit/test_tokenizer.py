"""Tokenizer gives transformers' ids and text; IncrementalDetokenizer streams exactly `decode`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from qwenrun.errors import CheckpointError
from qwenrun.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer, replace_surrogates

TEXTS = {
    "latin": "The quick brown fox jumps over the lazy dog. Ça déjà vu, naïve façade — Straße!",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε!",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟ ١٢٣",
    "hebrew": "שלום עולם, מה שלומך היום?",
    "devanagari": "नमस्ते दुनिया, आप कैसे हैं? हिन्दी भाषा",
    "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "chinese": "你好，世界！机器学习是人工智能的一个分支。繁體中文測試。",
    "japanese": "こんにちは世界。カタカナとひらがな、漢字を混ぜた文章です。",
    "korean": "안녕하세요 세계! 한국어 문장을 토큰화합니다.",
    "emoji": "Emoji 😀👍🏽 🧑‍🚀 👨‍👩‍👧‍👦 🪼🫠🦩 𓀀𓁐 ꙮ 🇯🇵",
    "code": "def f(x):\n\tif x  >  0:\n        return [i ** 2 for i in range(x)]  # comment\n"
    "\n\n    return {}\r\n",
    "whitespace": "  leading\n\n\n   trailing   \t\t  \u00a0nbsp \u3000ideographic ",
    "special_tokens": "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nhmm\n</think>\n\n"
    '<tool_call>\n{"name": "f"}\n</tool_call><|endoftext|>',
    "mixed": "English 中文 русский العربية 🎉 <think>x</think> 12345.678 ½ ∑∫√",
}


@pytest.fixture(scope="module")
def hf_tokenizer(qwen3_tokenizer_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_matches_transformers(tok: Tokenizer, hf_tokenizer: Any, name: str) -> None:
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tokenizer.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
        ids, skip_special_tokens=True
    )


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode(TEXTS["special_tokens"])
    for token_id in (151644, 151645, 151643, 151667, 151668, 151657, 151658):
        assert token_id in ids
    # `<think>`/`<tool_call>` are not special: they survive skip_special_tokens; `<|im_end|>` not.
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<think>" in text and "<tool_call>" in text and "<|im_end|>" not in text


def test_protocol_ids(tok: Tokenizer, hf_tokenizer: Any) -> None:
    assert tok.vocab_size == len(hf_tokenizer) == 151669
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert (tok.tool_call_start_id, tok.tool_call_end_id) == (151657, 151658)
    assert tok.im_end_id == 151645
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.id_to_token(151668) == "</think>"
    assert tok.token_to_id("<not a token>") is None
    expected_special = {i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special}
    assert tok.special_ids == expected_special
    assert {151643, 151644, 151645, 151655} <= tok.special_ids
    assert not {151657, 151667, 151668} & tok.special_ids
    assert tok.special_tokens_map == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert tok.chat_template is not None and "<tool_call>" in tok.chat_template


def test_ids_past_vocab_are_dropped_like_transformers(tok: Tokenizer, hf_tokenizer: Any) -> None:
    ids = [9707, 151700, 151935]  # the model's embedding is padded to 151936 rows
    assert tok.decode(ids) == hf_tokenizer.decode(ids) == "Hello"


def stream(tok: Tokenizer, ids: list[int], chunks: list[int], **kwargs: Any) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    out, pos = [], 0
    for size in chunks:
        out.append(detok.add(ids[pos : pos + size]))
        pos += size
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("skip", [False, True])
def test_incremental_one_token_at_a_time(tok: Tokenizer, name: str, skip: bool) -> None:
    ids = tok.encode(TEXTS[name])
    deltas = stream(tok, ids, [1] * len(ids), skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🪼🫠")
    assert all(tok.decode([i]) == "\ufffd" for i in ids)  # every token is a fragment of a character
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert [d for d in deltas if d] == ["🪼", "🫠"]
    assert detok.flush() == ""


def test_incremental_random_chunks_with_prompt_context(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    prompt = tok.encode("<|im_start|>user\n你好 🦩<|im_end|>\n<|im_start|>assistant\n")
    text = "".join(TEXTS.values())
    ids = tok.encode(text)
    for _ in range(20):
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(1, 6)))
            left -= chunks[-1]
        skip = rng.random() < 0.5
        deltas = stream(tok, ids, chunks, prompt_ids=prompt, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_flush_releases_dangling_bytes(tok: Tokenizer) -> None:
    head, tail = tok.encode("ok "), tok.encode("🪼")[:-1]  # the output stops inside the emoji
    detok = IncrementalDetokenizer(
        tok, prompt_ids=tok.encode("🪼")[:1]
    )  # the prompt ends mid-character too
    assert detok.add(head) == "ok "
    assert detok.add(tail) == ""
    assert detok.flush() == tok.decode(tail) == "\ufffd"


def test_incremental_window_stays_small(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    for i in tok.encode(TEXTS["latin"] * 20):
        detok.add([i])
        assert (
            len(detok._ids) <= 8
        )  # released ids are dropped: each add decodes O(window), not O(output)


def test_from_dir_errors(tmp_path: Path, qwen3_tokenizer_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is corrupt"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(qwen3_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(
        CheckpointError, match=r"tokenizer_config\.json is unreadable or not valid JSON"
    ):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_jinja_file_wins(tmp_path: Path, qwen3_tokenizer_dir: Path) -> None:
    (tmp_path / "tokenizer.json").symlink_to(qwen3_tokenizer_dir / "tokenizer.json")
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ messages[0].content }}"
    del config["chat_template"]
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    no_template = Tokenizer.from_dir(tmp_path)
    assert no_template.chat_template is None
    assert no_template.eos_token_id == 151645  # the rest of the config is still read


@pytest.mark.parametrize(
    ("text", "repaired"),
    [
        (json.loads('"a\\ud800b"'), "a\ufffdb"),  # JSON's lone high surrogate
        (json.loads('"lone low \\udfff"'), "lone low \ufffd"),
        ("\ud83d\ude00", "\U0001f600"),  # a pair as two code points becomes its character
        ("x\ud83d", "x\ufffd"),  # high surrogate at the end
        ("\ude00\ud83d", "\ufffd\ufffd"),  # the two halves in the wrong order
        ("\ud800\ud800\ude00", "\ufffd\U00010200"),  # a lone one, then a pair
        (b"caf\xe9".decode("utf-8", "surrogateescape"), "caf\ufffd"),  # os.fsdecode of latin-1
        (b"\xed\xa0\xbd\xed\xb8\x80".decode("utf-8", "surrogatepass"), "\U0001f600"),  # CESU-8
        ("plain ascii", "plain ascii"),
        (TEXTS["emoji"], TEXTS["emoji"]),
    ],
)
def test_replace_surrogates(text: str, repaired: str) -> None:
    assert replace_surrogates(text) == repaired


def test_encode_accepts_surrogates(tok: Tokenizer) -> None:
    """The Rust tokenizer raised TypeError on these; now they encode as their repaired text."""
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode("smile \ud83d\ude00!") == tok.encode("smile \U0001f600!")
    assert tok.decode(tok.encode("\udc80<think>\udfff")) == "\ufffd<think>\ufffd"
    assert tok.token_to_id("\ud800") is None
    assert tok.token_to_id("<think>") == tok.think_start_id
