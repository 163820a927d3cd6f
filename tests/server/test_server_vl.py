"""Images and videos through the HTTP server: a tiny Qwen3-VL checkpoint (tests/tiny.py "vl-untied",
every parameter perturbed) behind a real uvicorn, driven by the official `openai` client and httpx.

The tiny vocabulary (512) has no tokenizer, so the test writes one: a WordLevel vocabulary where
id i is the word `w{i}`, except the vision tokens at the checkpoint's ids (<|image_pad|> 500,
<|video_pad|> 501, <|vision_start|> 502, <|vision_end|> 503), <|im_start|>, <|im_end|> and the
role names, plus a minimal ChatML template. Every generated id then decodes to its own token text, so the server's
logprob tokens name the generated ids, and "same tokens as `LLM.chat`" is an exact comparison.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

from PIL import Image
from steered import make_steered_checkpoint
from test_server import CHAT_TABLE, serve, wait_idle
from tiny import VL_TOKENS, make_vl_checkpoint

from qwenrun import LLM, SamplingParams
from qwenrun.multimodal import MediaLimits

NEW = 8
SPECIAL = {
    VL_TOKENS["image_token_id"]: "<|image_pad|>",
    VL_TOKENS["video_token_id"]: "<|video_pad|>",
    VL_TOKENS["vision_start_token_id"]: "<|vision_start|>",
    VL_TOKENS["vision_end_token_id"]: "<|vision_end|>",
    504: "<|im_start|>",
    505: "<|im_end|>",
}
WORDS = {506: "user", 507: "assistant", 508: "system", 509: "[UNK]"}
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The server's limits, small enough to test each one with small files.
LIMITS = MediaLimits.for_server(
    max_image_pixels=200_000, max_images_per_prompt=2, max_video_seconds=1.0
)


def write_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(512)}
    for i, text in {**SPECIAL, **WORDS}.items():
        del vocab[f"w{i}"]
        vocab[text] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL.values()]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))


def png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb() -> bytes:
    """A valid 1×1 PNG whose header claims 100000×100000 pixels: a few bytes that would decode to 30 GB."""
    data = png(1, 1)
    body = struct.pack(">II", 100_000, 100_000) + data[24:29]
    return data[:16] + body + struct.pack(">I", zlib.crc32(data[12:16] + body)) + data[33:]


def mp4(frames: int, rate: int = 10) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            a = np.full((48, 64, 3), 8 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, media_type: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, media_type)}}


def user(*parts: dict | str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts],
        }
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder, _ = make_vl_checkpoint("vl-untied", tmp_path_factory.mktemp("vl"))
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    """The offline side (the server's engine runs on its own thread, so it gets its own LLM)."""
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def served(folder) -> LLM:
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def server(served):
    with serve(served, media_limits=LIMITS) as s:
        yield s


def offline(llm: LLM, messages: list[dict]):
    """What `LLM.chat` answers for the same content parts (greedy, with logprobs)."""
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=NEW, logprobs=0))
    return out


def assert_same_tokens(llm: LLM, response, out) -> None:
    """The server's answer names the same generated ids, with the same logprobs, as offline."""
    comp = out.outputs[0]
    choice = response.choices[0]
    assert [t.token for t in choice.logprobs.content] == [
        llm.tokenizer.decode([i]) for i in comp.token_ids
    ]
    got = [t.logprob for t in choice.logprobs.content]
    want = [lp[i] for lp, i in zip(comp.logprobs, comp.token_ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    # the raw text: LLM.chat runs its tool parser on every answer, which strips the content
    assert choice.message.content == comp.text
    assert response.usage.prompt_tokens == len(out.prompt_token_ids)
    assert response.usage.completion_tokens == len(comp.token_ids) == NEW


def test_models_list_what_messages_may_carry(server):
    """The chat page shows its Attach button from this field."""
    with server.http() as http:
        assert http.get("/v1/models").json()["data"][0]["input_modalities"] == ["text", "image", "video"]
        assert http.get("/v1/models/qwen-test").json()["input_modalities"] == ["text", "image", "video"]


def test_openai_client_images_match_llm_chat(llm, served, server):
    cat, dog = png(70, 45, 1), png(33, 100, 2)
    messages = user("w10 w11", image_part(cat), "w12 w13", image_part(dog), "w14")
    out = offline(llm, messages)
    pads = out.prompt_token_ids.count(VL_TOKENS["image_token_id"])
    assert pads > 2  # the placeholders were expanded to the images' feature tokens
    client = server.client()
    r = client.chat.completions.create(
        model="qwen-test",
        messages=messages,
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=0,
    )
    assert_same_tokens(llm, r, out)
    assert r.usage.prompt_tokens_details.image_tokens == pads
    assert r.usage.prompt_tokens_details.video_tokens == 0
    # streamed: the same text, usage with the image tokens
    stream = client.chat.completions.create(
        model="qwen-test",
        messages=messages,
        temperature=0,
        max_tokens=NEW,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == r.choices[0].message.content
    )
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # a bare URL string as image_url, and a second turn: still LLM.chat's tokens
    turns = [
        *user(image_part(cat)),
        {"role": "assistant", "content": "w20 w21"},
        *user("w22", {"type": "image_url", "image_url": data_url(dog, "image/png")}),
    ]
    out = offline(llm, turns)
    r = client.chat.completions.create(
        model="qwen-test",
        messages=turns,
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=0,
    )
    assert_same_tokens(llm, r, out)
    wait_idle(served)


def test_video_and_mm_processor_kwargs_match_llm_chat(llm, served, server):
    clip = data_url(mp4(8), "video/mp4")  # 0.8 s at 10 fps
    messages = user("w30", {"type": "video_url", "video_url": {"url": clip}}, "w31")
    out = offline(llm, messages)
    client = server.client()
    r = client.chat.completions.create(
        model="qwen-test",
        messages=messages,
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=0,
    )
    assert_same_tokens(llm, r, out)
    assert (
        r.usage.prompt_tokens_details.video_tokens
        == out.prompt_token_ids.count(VL_TOKENS["video_token_id"])
        > 0
    )
    # vLLM's mm_processor_kwargs: a smaller pixel budget, fewer image tokens, as offline
    cat = png(200, 160, 3)
    kwargs = {"max_pixels": 64 * 64}
    small = llm.generate(
        [
            {
                "prompt": llm.render_chat(
                    [{"role": "user", "content": "w1<|vision_start|><|image_pad|><|vision_end|>"}]
                ),
                "multi_modal_data": {"image": [Image.open(io.BytesIO(cat))]},
                "mm_processor_kwargs": kwargs,
            }
        ],
        SamplingParams(temperature=0, max_tokens=NEW, logprobs=0),
    )[0]
    full = client.chat.completions.create(
        model="qwen-test", messages=user("w1", image_part(cat)), temperature=0, max_tokens=1
    )
    r = client.chat.completions.create(
        model="qwen-test",
        messages=user("w1", image_part(cat)),
        temperature=0,
        max_tokens=NEW,
        logprobs=True,
        top_logprobs=0,
        extra_body={"mm_processor_kwargs": kwargs},
    )
    assert r.usage.prompt_tokens == len(small.prompt_token_ids) < full.usage.prompt_tokens
    assert [t.token for t in r.choices[0].logprobs.content] == [
        llm.tokenizer.decode([i]) for i in small.outputs[0].token_ids
    ]
    wait_idle(served)


def test_anthropic_image_block_matches_llm_chat(llm, served, server):
    cat = png(48, 64, 4)
    block = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(cat).decode(),
        },
    }
    body = {
        "model": "qwen-test",
        "max_tokens": NEW,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "w40"},
                    block,
                    {"type": "text", "text": "w41"},
                ],
            }
        ],
    }
    out = offline(llm, user("w40", image_part(cat), "w41"))
    with server.http() as http:
        r = http.post("/v1/messages", json=body)
        assert r.status_code == 200, r.text
        msg = r.json()
        assert msg["usage"] == {"input_tokens": len(out.prompt_token_ids), "output_tokens": NEW}
        assert msg["content"] == [{"type": "text", "text": out.outputs[0].text}]
        count = http.post("/v1/messages/count_tokens", json=body).json()
        assert count["input_tokens"] == len(out.prompt_token_ids)
    wait_idle(served)


def _error(r: httpx.Response, param: str, *words: str) -> None:
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def test_every_bad_input_is_a_4xx_naming_its_part(llm, served, server):
    def chat(*parts, **extra):
        return {"model": "qwen-test", "max_tokens": 2, "messages": user("w1", *parts), **extra}

    ok = image_part(png(32, 32))
    part = "messages[0].content[1]"
    ppm = io.BytesIO()
    Image.new("RGB", (32, 32)).save(ppm, "PPM")
    cases = [
        (
            chat(
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64"}}
            ),
            part,
            "base64",
        ),
        (chat(image_part(png(32, 32)[:60])), part, "corrupt"),  # truncated PNG
        (chat(image_part(b"this is not an image at all")), part, "format"),
        (
            chat(image_part(ppm.getvalue(), "image/x-portable-pixmap")),
            part,
            "format",
        ),  # PPM is not taken
        (chat(image_part(png(500, 500))), part, "pixels"),  # 250 000 > 200 000
        (chat(image_part(bomb())), part, "decompression bomb"),
        (chat(ok, ok, ok), "messages[0].content[3]", "at most 2"),
        (
            chat({"type": "video_url", "video_url": {"url": data_url(mp4(20), "video/mp4")}}),
            part,
            "at most 1 s",
        ),
        (
            chat({"type": "video_url", "video_url": {"url": data_url(png(32, 32), "video/mp4")}}),
            part,
            "container",
        ),
        (
            chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
            part,
            "disabled",
        ),
        (
            chat({"type": "image_url", "image_url": {"url": "/etc/passwd"}}),
            part,
            "paths are not accepted",
        ),
        (
            chat({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}),
            part,
            "image/*",
        ),
        (chat(ok, mm_processor_kwargs={"colour": 1}), "mm_processor_kwargs", "colour"),
        (
            chat(ok, mm_processor_kwargs={"images_kwargs": 5}),
            "mm_processor_kwargs",
            "must be an object",
        ),
        # a request's min_pixels would upscale past the pixel limit: refused before resizing
        (chat(ok, mm_processor_kwargs={"min_pixels": 10**12}), part, "would be resized"),
        (
            chat(
                {"type": "video_url", "video_url": {"url": data_url(mp4(4), "video/mp4")}},
                mm_processor_kwargs={"videos_kwargs": {"min_pixels": 10**12}},
            ),
            part,
            "lower min_pixels",
        ),
        (chat({"type": "input_audio", "input_audio": {"data": ""}}), None, "image_url"),
    ]
    with server.http() as http:
        for body, param, word in cases:
            r = http.post("/v1/chat/completions", json=body)
            if param is None:  # an unknown part type: the schema's 400
                assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
            else:
                _error(r, param, word)
        anthropic = [
            (
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "%%%"},
                },
                "base64",
            ),
            ({"type": "image", "source": {"type": "base64", "data": "aGk="}}, "media_type"),
            ({"type": "image"}, "source"),
            (
                {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/x.png"}},
                "disabled",
            ),
        ]
        for block, word in anthropic:
            body = {
                "model": "qwen-test",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "w1"}, block]}],
            }
            r = http.post("/v1/messages", json=body)
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
            assert (
                r.json()["error"]["param"] == "messages[0].content[1]"
                and word in r.json()["error"]["message"]
            )
        assert http.get("/health").status_code == 200
    wait_idle(served)


def test_text_only_model_refuses_images(tmp_path, qwen3_tokenizer_dir):
    folder = make_steered_checkpoint(tmp_path / "text", qwen3_tokenizer_dir, CHAT_TABLE)
    text_llm = LLM(
        folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=256
    )
    with serve(text_llm) as s, s.http() as http:
        assert http.get("/v1/models").json()["data"][0]["input_modalities"] == ["text"]
        r = http.post(
            "/v1/chat/completions",
            json={"model": "qwen-test", "messages": user("Hi", image_part(png(8, 8)))},
        )
        _error(r, "messages[0].content[1]", "text-only", "takes no images")
        block = {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": "image/png",
                "data": base64.b64encode(png(8, 8)).decode(),
            },
        }
        r = http.post(
            "/v1/messages",
            json={
                "model": "qwen-test",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": [block]}],
            },
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"
        assert "takes no images" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            s.client().chat.completions.create(
                model="qwen-test", messages=user(image_part(png(8, 8)))
            )


def test_urls_are_fetched_only_with_allow_media_urls(llm, folder):
    import http.server
    import threading

    from qwenrun.cli.main import build_parser

    cat = png(40, 30, 5)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(cat)))
            self.end_headers()
            self.wfile.write(cat)

        def log_message(self, *args) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
    out = offline(llm, user("w50", image_part(cat)))
    fetching = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    try:
        with serve(fetching, media_limits=MediaLimits.for_server(allow_http=True)) as s:
            r = s.client().chat.completions.create(
                model="qwen-test",
                messages=user("w50", {"type": "image_url", "image_url": {"url": url}}),
                temperature=0,
                max_tokens=NEW,
                logprobs=True,
                top_logprobs=0,
            )
            assert_same_tokens(llm, r, out)
            body = {
                "model": "qwen-test",
                "max_tokens": NEW,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "w50"},
                            {"type": "image", "source": {"type": "url", "url": url}},
                        ],
                    }
                ],
            }
            with s.http() as http_client:
                msg = http_client.post("/v1/messages", json=body).json()
            assert msg["content"] == [{"type": "text", "text": out.outputs[0].text}]
    finally:
        files.shutdown()
    args = build_parser().parse_args(["serve", str(folder), "--allow-media-urls"])
    assert (
        args.allow_media_urls
        and not build_parser().parse_args(["serve", str(folder)]).allow_media_urls
    )


def test_preprocessing_runs_off_the_engine_and_event_loop_threads(served, server, monkeypatch):
    import threading

    from qwenrun.multimodal.image import ImageProcessor

    seen: list[str] = []
    call = ImageProcessor.__call__

    def spy(self, *args, **kwargs):
        seen.append(threading.current_thread().name)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ImageProcessor, "__call__", spy)
    server.client().chat.completions.create(
        model="qwen-test", messages=user("w1", image_part(png(40, 40))), max_tokens=1
    )
    loop_thread = server.thread.name  # uvicorn's event loop runs on the Server's thread
    assert len(seen) == 1 and seen[0] not in ("qwenrun-engine", loop_thread), seen
    wait_idle(served)
