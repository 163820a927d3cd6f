"""`qwenrun chat` attachments: `/image PATH` and `/video PATH` go with the next message as content
parts; a text-only model says it takes none. In process: a scripted LLM records what each turn
sends, and a tiny Qwen3-VL checkpoint (with tests/server/test_server_vl.py's tokenizer) answers a
real turn with the tokens `LLM.chat` gives for the same parts."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenrun.cli.chat import ChatSession
from qwenrun.cli.common import TagFilter
from qwenrun.sampling.params import SamplingParams

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "server")
)  # the VL server test's helpers
from test_cli import ScriptedLLM


class MediaLLM(ScriptedLLM):
    def __init__(self, multimodal: bool) -> None:
        super().__init__()
        self.engine = SimpleNamespace(is_multimodal=multimodal)
        self.config = SimpleNamespace(
            architecture="Qwen3VLForConditionalGeneration" if multimodal else "Qwen3ForCausalLM"
        )


def session(llm: ScriptedLLM) -> ChatSession:
    return ChatSession(
        llm,
        SamplingParams(),
        thinking=False,
        budget=None,
        system=None,  # type: ignore[arg-type]
        show_thinking=True,
    )


def test_attachments_go_with_the_next_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat, clip = tmp_path / "cat.png", tmp_path / "clip.mp4"
    cat.write_bytes(b"png")
    clip.write_bytes(b"mp4")
    llm = MediaLLM(multimodal=True)
    chat = session(llm)
    assert (
        chat.command(f"/image {cat}")
        and chat.command(f"/image {cat}")
        and chat.command(f"/video {clip}")
    )
    out = capsys.readouterr().out
    assert "attached image cat.png (1 image for the next message)" in out
    assert "attached video clip.mp4 (2 images, 1 video for the next message)" in out
    chat.command(f"/image {tmp_path / 'missing.png'}")
    assert "no such file" in capsys.readouterr().out
    chat.turn("What is this?")
    image = {"type": "image", "image": str(cat)}
    first = [
        image,
        image,
        {"type": "video", "video": str(clip)},
        {"type": "text", "text": "What is this?"},
    ]
    assert llm.calls[-1]["messages"] == [{"role": "user", "content": first}]
    chat.turn(
        "And now?"
    )  # the attachments went with the first message only, and stay in the history
    assert llm.calls[-1]["messages"][0]["content"] == first
    assert llm.calls[-1]["messages"][-1] == {"role": "user", "content": "And now?"}
    capsys.readouterr()
    chat.command("/history")
    assert (
        "you: [image cat.png] [image cat.png] [video clip.mp4] What is this?"
        in capsys.readouterr().out
    )
    chat.command(f"/image {cat}")
    chat.command("/reset")
    chat.turn("hi")
    assert llm.calls[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_text_only_model_takes_no_attachments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = tmp_path / "cat.png"
    cat.write_bytes(b"png")
    llm = MediaLLM(multimodal=False)
    chat = session(llm)
    chat.command(f"/image {cat}")
    chat.command(f"/video {cat}")
    out = capsys.readouterr().out
    assert "this model (Qwen3ForCausalLM) takes no images" in out and "takes no videos" in out
    chat.turn("hi")
    assert llm.calls[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_a_real_vl_turn_answers_as_llm_chat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_server_vl import png, write_tokenizer
    from tiny import make_vl_checkpoint

    from qwenrun import LLM

    folder, _ = make_vl_checkpoint("vl-untied", tmp_path / "vl")
    write_tokenizer(folder)
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    cat = tmp_path / "cat.png"
    cat.write_bytes(png(50, 40, 7))
    params = SamplingParams(temperature=0, max_tokens=8)
    chat = ChatSession(llm, params, thinking=False, budget=None, system=None, show_thinking=True)
    chat.command(f"/image {cat}")
    chat.turn("w5 w6")
    [want] = llm.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(cat)},
                    {"type": "text", "text": "w5 w6"},
                ],
            }
        ],
        params,
    )
    tags = TagFilter()
    shown = "".join(
        t for kind, t in tags.feed(want.outputs[0].text) + tags.finish() if kind == "content"
    )
    assert chat.history[-1]["content"] == shown.strip()
    assert "8 tokens" in capsys.readouterr().out
    chat.command(f"/image {tmp_path / 'cat.png'}")
    (tmp_path / "cat.png").write_bytes(b"not an image")
    chat.turn("w7")  # a bad file is reported when the message is sent; the session goes on
    assert "error: image" in capsys.readouterr().out and chat.attachments == []
