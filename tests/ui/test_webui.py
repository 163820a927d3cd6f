"""The chat page of `qwenrun serve` in a real browser: Debian's headless Chromium driven by Playwright
for Python, against `qwenrun serve` processes on the bundled model (qwen3-tiny-thinker, which thinks
through column arithmetic and stops early at a thinking budget) and on a tiny Qwen3-VL checkpoint
steered to answer with math (attachments and typesetting).

Every test fails if the page asked for anything outside the server's origin (the browser's own
request log), and saves a screenshot (QWENRUN_UI_SCREENSHOTS, else the test's tmp dir). The page
leaves sampling to the model's generation_config (temperature 0.6) unless its temperature field is
set; the tests set it to 0, so answers are the greedy ones.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: scripts/setup.sh dev")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tiny import VL_TOKENS, make_vl_checkpoint  # noqa: E402

_REPO = Path(__file__).resolve().parents[2]
BUNDLED = _REPO / "qwenrun" / "assets" / "qwen3-tiny-thinker"
CHROMIUM = os.environ.get("QWENRUN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
KEY = "s3cret-key"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/setup.sh dev does, as root)"),
    pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled demo model not present"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`qwenrun serve` on the bundled model in a child process; `url` is the page URL it printed."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenrun", "serve", "--port", str(self.port), "--dtype", "float32",
             "--device", "cpu", "--kv-cache-memory", "64MiB", "--log-level", "warning", *flags],
            cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.origin = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []

    def wait(self, *, page: bool = True) -> Serve:
        """Read its output until the last start-up line (the page URL, or the API URL without it)."""
        deadline = time.time() + 120
        last = "chat page at " if page else "serving "
        while not any(line.startswith(last) for line in self.lines):
            assert time.time() < deadline and self.proc.poll() is None, "".join(self.lines)
            self.lines.append(self.proc.stdout.readline())
        while True:  # the socket binds just after the banner
            try:
                httpx.get(f"{self.origin}/health", timeout=2)
                return self
            except httpx.TransportError:
                assert time.time() < deadline and self.proc.poll() is None, "".join(self.lines)
                time.sleep(0.1)

    @property
    def url(self) -> str:
        [url] = [line.split(" at ", 1)[1].strip() for line in self.lines if line.startswith("chat page at ")]
        return url

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.origin}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
                out[key] = s.value
        return out

    def reap(self) -> None:
        """Wait for its exit after a SIGINT (a second one would cut uvicorn's shutdown short)."""
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


# The VL checkpoint's tokenizer: WordLevel, id i is the word `w{i}` but for the vision tokens, ChatML's
# and these words, which the steered model answers with, one a step, then <|im_end|> (its EOS).
VL_SPECIAL = {VL_TOKENS["image_token_id"]: "<|image_pad|>", VL_TOKENS["video_token_id"]: "<|video_pad|>",
              VL_TOKENS["vision_start_token_id"]: "<|vision_start|>",
              VL_TOKENS["vision_end_token_id"]: "<|vision_end|>", 504: "<|im_start|>", 505: "<|im_end|>"}
VL_WORDS = {506: "user", 507: "assistant", 508: "system", 509: "[UNK]",
            10: "Pythagoras:", 11: "$a^2+b^2=c^2$", 12: "so", 13: "\\(c=\\sqrt{a^2+b^2}\\)"}
VL_ANSWER = [10, 11, 12, 13, 505]  # after "assistant"
VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_vl_model(folder: Path) -> Path:
    """A tiny Qwen3-VL checkpoint (tests/tiny.py "vl-untied") whose greedy answer to any prompt is
    VL_ANSWER: every weight zero but the norms (one), so a position's residual is its token's
    embedding, and the untied LM head maps each answer token's embedding to the next one."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    folder, model = make_vl_checkpoint("vl-untied", folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        embed = model.get_input_embeddings().weight
        for dim, (src, dst) in enumerate(zip([507, *VL_ANSWER], VL_ANSWER)):
            embed[src, dim] = 1.0
            model.lm_head.weight[dst, dim] = 1.0
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 505}))
    vocab = {f"w{i}": i for i in range(512)}
    for i, text in {**VL_SPECIAL, **VL_WORDS}.items():
        del vocab[f"w{i}"]
        vocab[text] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VL_SPECIAL.values()])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": VL_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Serve]]:
    """Four servers started at once (each load overlaps the others): the plain one (with the demo
    calculator over MCP, for the agent route), one with --api-key, one with --no-webui, and the
    steered vision-language one."""
    config = tmp_path_factory.mktemp("mcp") / "servers.json"
    calculator = _REPO / "tests" / "mcp_servers" / "demo_calculator.py"
    config.write_text(json.dumps({"mcpServers": {"calc": {"command": sys.executable, "args": [str(calculator)]}}}))
    started = {"plain": Serve("--mcp-config", str(config)), "key": Serve("--api-key", KEY),
               "off": Serve("--no-webui")}
    try:
        started["vl"] = Serve(str(make_vl_model(tmp_path_factory.mktemp("vl") / "qwen3-vl-steered")))
        for name, s in started.items():
            s.wait(page=name != "off")
        yield started
    finally:
        for s in started.values():  # all at once: each takes seconds to shut down
            s.proc.send_signal(signal.SIGINT)
        for s in started.values():
            s.reap()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("QWENRUN_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, server: Serve, requests: list[str], *, width: int = 1200, height: int = 860,
              permissions: tuple[str, ...] = ()):
    """A fresh browser context (empty storage) on the printed page URL, temperature 0, and every
    request URL appended to `requests`; `window.__csp` collects the page's CSP violations. (Not a
    route handler adding temperature: Playwright's interception buffers the response, so nothing
    would stream.)"""
    context = browser.new_context(viewport={"width": width, "height": height}, permissions=list(permissions))
    context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                            " (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url)
    # the page is ready when it focuses the message box (or, wanting a key, the key box)
    page.wait_for_function("() => ['prompt', 'key-input'].includes(document.activeElement.id)")
    page.fill("#temperature", "0")
    page.press("#temperature", "Tab")
    return page


@pytest.fixture
def requests_seen(servers) -> Iterator[list[str]]:
    """The URLs the page requested; after the test, all of them must be on a server's origin."""
    seen: list[str] = []
    yield seen
    origins = tuple(s.origin + "/" for s in servers.values())
    outside = [u for u in seen if not u.startswith(origins) and not u.startswith("data:")]
    assert seen and not outside, f"the page requested outside its origin: {outside}"


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_answer(page, timeout: float = 60_000) -> None:
    """Until the last answer finished streaming (its actions come back, Send replaces Stop)."""
    page.wait_for_selector("#stop", state="hidden", timeout=timeout)
    page.wait_for_selector("article.msg.assistant:last-child .actions", state="visible", timeout=timeout)


def record_stream(page) -> None:
    """Record (reasoning chars, answer chars, reasoning open as "Thinking") of the last answer at every
    DOM change: a fast host streams a short answer before a wait for a transient state could see it."""
    page.evaluate("""() => {
        window.__frames = [];
        new MutationObserver(() => {
            const a = [...document.querySelectorAll('article.msg.assistant')].pop();
            if (!a) return;
            const r = a.querySelector('.reasoning-body'), b = a.querySelector('.answer');
            const open = a.querySelector('.reasoning[open] summary');  // "Thinking" while it streams
            window.__frames.push([r ? r.textContent.length : 0, b ? b.textContent.length : 0,
                                  !!open && open.textContent.includes('Thinking')]);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")


def last_answer(page):
    return page.locator("article.msg.assistant").last


# ----------------------------------------------------------------------------------------- tests


def test_thinking_streams_then_the_right_answer(browser, servers, requests_seen, shots):
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    assert "context 1,024 tokens" in page.text_content("#model-context")
    record_stream(page)
    ask(page, "What is 347 + 586?")
    wait_answer(page)
    assert page.text_content("#status") == "Answer: 347 + 586 = 933"  # what a screen reader is told
    frames = page.evaluate("window.__frames")
    assert any(thinking for _, _, thinking in frames), f"no open 'Thinking' block while streaming: {frames}"
    thinking_only = [r for r, a, _ in frames if r > 0 and a == 0]
    # two distinct lengths of reasoning before any answer text: it arrived in pieces (on a fast host the
    # ~40-character trace of this sum streams in only two or three frames)
    assert len(set(thinking_only)) >= 2, f"reasoning did not stream before the answer: {frames}"
    answer = last_answer(page)
    assert "933" in answer.locator(".answer").text_content()
    summary = answer.locator(".reasoning summary").text_content()
    assert re.search(r"Thought · \d+ tokens · \d+\.\d s", summary), summary
    assert "stopped at the budget" not in summary
    assert answer.locator(".reasoning").get_attribute("open") is None  # collapsed once done
    assert answer.locator(".mode").text_content() == "thinking · no budget · temperature 0"
    stats = answer.locator(".stats").text_content()
    assert re.search(r"TTFT \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens · done", stats), stats
    answer.locator(".reasoning summary").click()  # the trace: column arithmetic
    assert answer.locator(".reasoning-body").text_content().startswith("347+586\n7+6+0=13")
    page.screenshot(path=shots / "thinking.png")  # docs/webui.png


def test_thinking_off_has_no_reasoning_block(browser, servers, requests_seen, shots):
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    # focus order: the header, then (no chats yet) the composer's controls in reading order
    expected = ["theme", "prompt", "thinking", "budget", "budget-tokens", "temperature", "agent", "send"]
    page.focus("#new-chat")
    order = []
    for _ in expected:
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == expected, order
    assert page.is_hidden("#attach")  # a text-only model: nothing to attach
    page.click("#thinking")
    assert page.is_disabled("#budget")
    ask(page, "What is 347 + 586?")
    wait_answer(page)
    answer = last_answer(page)
    assert answer.locator(".reasoning").count() == 0
    assert answer.locator(".mode").text_content() == "thinking off · temperature 0"
    assert answer.locator(".answer").text_content().strip()
    page.screenshot(path=shots / "thinking-off.png")


def test_budget_16_stops_thinking_early(browser, servers, requests_seen, shots):
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#budget-tokens", "16")
    page.press("#budget-tokens", "Tab")
    assert page.text_content("#budget-value") == "16 tokens"
    assert page.input_value("#budget") == "1"  # the slider sits at its first limit (256)
    ask(page, "What is 347 + 586?")
    wait_answer(page)
    assert bodies[-1]["thinking_budget"] == 16 and bodies[-1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert bodies[-1]["temperature"] == 0 and bodies[-1]["stream"] is True
    answer = last_answer(page)
    assert answer.locator(".mode").text_content() == "thinking · budget 16 tokens · temperature 0"
    assert "stopped at the budget" in answer.locator(".reasoning summary").text_content()
    answer.locator(".reasoning summary").click()
    # Qwen's early-stop sentence, which the engine writes when the budget runs out
    assert "Considering the limited time" in answer.locator(".reasoning-body").text_content()
    # the slider: its first stop is no limit, then 256 ... the context (1024)
    page.fill("#budget-tokens", "5000")  # over the context: the slider's last stop
    page.press("#budget-tokens", "Tab")
    assert page.input_value("#budget") == page.get_attribute("#budget", "max") == "3"  # off, 256, 512, 1024
    page.fill("#budget-tokens", "")
    page.press("#budget-tokens", "Tab")
    assert page.text_content("#budget-value") == "no limit" and page.input_value("#budget") == "0"
    page.eval_on_selector("#budget", "e => { e.value = e.max; e.dispatchEvent(new Event('input')); }")
    assert page.text_content("#budget-value") == "1,024 tokens"
    page.eval_on_selector("#budget", "e => { e.value = 1; e.dispatchEvent(new Event('input')); }")
    assert page.text_content("#budget-value") == "256 tokens"
    page.screenshot(path=shots / "budget-16.png")


def test_stop_cancels_on_the_server(browser, servers, requests_seen, shots):
    server = servers["plain"]
    page = open_page(browser, server, requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    question = "What is 347 * 86?"  # a 3x2 product: ~150 reasoning tokens
    start = server.metrics()["qwenrun_generation_tokens_total"]
    ask(page, question)
    wait_answer(page)
    assert "29842" in last_answer(page).locator(".answer").text_content()
    before = server.metrics()
    whole_run = before["qwenrun_generation_tokens_total"] - start
    finished = lambda m: sum(v for k, v in m.items() if k.startswith("qwenrun_request_finished_total"))
    for how in ("click", "Escape"):  # the Stop button, then the key
        page.click("#new-chat")
        ask(page, question)
        # at once, not after the first reasoning text: on a fast host the server streams the whole
        # ~150-token answer before a stop sent then arrives, and nothing is left to cancel
        page.wait_for_selector("#stop", state="visible")
        page.click("#stop") if how == "click" else page.keyboard.press("Escape")
        wait_answer(page)
        assert "stopped" in last_answer(page).locator(".stats").text_content()
        deadline = time.time() + 10
        while (after := server.metrics())["qwenrun_requests_aborted_total"] == before["qwenrun_requests_aborted_total"]:
            assert time.time() < deadline, f"the server did not cancel the request ({how})"
            time.sleep(0.05)
        assert after["qwenrun_requests_aborted_total"] == before["qwenrun_requests_aborted_total"] + 1
        assert after["qwenrun_num_requests_running"] == 0 and after["qwenrun_num_requests_waiting"] == 0
        assert finished(after) == finished(before), "the stopped request finished instead of being aborted"
        stopped_run = after["qwenrun_generation_tokens_total"] - before["qwenrun_generation_tokens_total"]
        assert stopped_run < whole_run, (how, stopped_run, whole_run)
        before = after
    page.screenshot(path=shots / "stopped.png")


def test_reload_keeps_the_conversation_and_edit_regenerate(browser, servers, requests_seen, shots):
    page = open_page(browser, servers["plain"], requests_seen, permissions=("clipboard-read", "clipboard-write"))
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    ask(page, "What is 12 + 30?")
    wait_answer(page)
    assert "42" in last_answer(page).locator(".answer").text_content()
    last_answer(page).locator("button:text('Copy')").click()
    page.wait_for_selector("article.msg.assistant button:text('Copied')")
    source = page.evaluate("JSON.parse(localStorage.getItem('qwenrun.chats.v1'))[0].messages[1].content")
    assert "42" in source and page.evaluate("navigator.clipboard.readText()") == source  # the markdown source
    page.click("article.msg.user button:text('Copy')")
    page.wait_for_function("async () => await navigator.clipboard.readText() === 'What is 12 + 30?'")
    page.reload()
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    assert page.locator("article.msg.user .body").text_content() == "What is 12 + 30?"
    assert "42" in last_answer(page).locator(".answer").text_content()
    assert page.locator("#chat-list .chat-open[aria-current='true']").text_content() == "What is 12 + 30?"
    # edit the question: the conversation is cut there and answered again
    page.click("article.msg.user button:text('Edit')")
    page.fill("article.msg.user .edit-box", "What is 20 + 30?")
    page.click("article.msg.user button:text('Save and send')")
    wait_answer(page)
    assert page.locator("article.msg").count() == 2
    assert "50" in last_answer(page).locator(".answer").text_content()
    page.click("article.msg.assistant button:text('Regenerate')")
    wait_answer(page)
    assert page.locator("article.msg").count() == 2 and "50" in last_answer(page).locator(".answer").text_content()
    page.screenshot(path=shots / "reloaded.png")


def test_api_key_is_asked_for_and_kept_for_the_session(browser, servers, requests_seen, shots):
    server = servers["key"]
    page = open_page(browser, server, requests_seen)
    page.wait_for_selector("#key-dialog[open]")
    assert page.text_content("#model-name") == "qwenrun"  # nothing loaded without the key
    page.fill("#key-input", "wrong")
    page.press("#key-input", "Enter")
    page.wait_for_selector("#key-error:text('That key was refused.')")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#key-dialog", state="hidden")
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    ask(page, "What is 347 + 586?")
    wait_answer(page)
    assert "933" in last_answer(page).locator(".answer").text_content()
    assert page.evaluate("sessionStorage.getItem('qwenrun.apiKey')") == KEY
    assert KEY not in page.evaluate("JSON.stringify(localStorage)")
    page.reload()  # same tab: the key is still there, no dialog
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    assert not page.is_visible("#key-dialog")
    page.screenshot(path=shots / "api-key.png")


def test_phone_width_dark_theme_and_keyboard(browser, servers, requests_seen, shots):
    page = open_page(browser, servers["plain"], requests_seen, width=390, height=844)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    page.click("#theme")
    theme = page.evaluate("document.documentElement.dataset.theme")
    page.fill("#prompt", "What is 347 + 586?")
    page.press("#prompt", "Shift+Enter")
    assert page.input_value("#prompt") == "What is 347 + 586?\n"  # a newline, not sent
    assert page.locator("article.msg").count() == 0
    page.press("#prompt", "Enter")
    wait_answer(page)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    for selector in ("#prompt", "#send", "#thinking", "#budget", "#new-chat"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.click("#chats-toggle")
    assert page.is_visible("#chat-list .chat-open")
    page.click("#chat-list .chat-open")
    assert not page.is_visible("#chat-list")
    page.reload()
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    assert page.evaluate("document.documentElement.dataset.theme") == theme  # kept
    page.screenshot(path=shots / "phone.png", full_page=True)


def test_server_tools_show_the_call_and_its_result(browser, servers, requests_seen, shots):
    """With `serve --mcp-config` the page offers the agent route; its tool steps are shown as such."""
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#agent-box", state="visible")
    page.click("#agent")
    ask(page, "What is 347 * 86?")
    wait_answer(page)
    answer = last_answer(page)
    assert answer.locator(".tool-call .tool-title").text_content() == "Tool call · calculator"
    assert "347" in answer.locator(".tool-call pre").text_content()
    assert answer.locator(".tool-result .tool-title").text_content() == "Tool result · calculator"
    assert answer.locator(".tool-result pre").text_content() == "29842"
    assert "29842" in answer.locator(".answer").text_content()
    assert answer.locator(".mode").text_content().startswith("server tools · thinking")
    assert answer.locator(".reasoning summary").text_content() == "Thought"  # no token count from that route
    page.screenshot(path=shots / "server-tools.png")
    # without --mcp-config there is no such switch
    other = open_page(browser, servers["key"], requests_seen)
    other.fill("#key-input", KEY)
    other.press("#key-input", "Enter")
    other.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    assert not other.is_visible("#agent-box")


def test_streamed_tool_calls_are_shown_as_calls(browser, servers, requests_seen):
    """/v1/chat/completions' streamed `tool_calls` (a name, then argument pieces) become one call
    block. The page sends no tools, so the model never writes one here: the stream is canned,
    in the server's chunk shape, all events in one network read."""
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    def chunk(delta, finish=None):
        return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    body = (chunk({"role": "assistant", "reasoning_content": "need weather"})
            + chunk({"tool_calls": [call]})
            + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
            + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
            + chunk({}, "tool_calls") + "data: [DONE]\n\n")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    ask(page, "Weather in Paris?")
    wait_answer(page)
    answer = last_answer(page)
    assert answer.locator(".tool-call .tool-title").text_content() == "Tool call · get_weather"
    assert json.loads(answer.locator(".tool-call pre").text_content()) == {"city": "Paris"}
    assert answer.locator(".reasoning-body").text_content() == "need weather"
    assert answer.locator(".stats").text_content().endswith("tool_calls")


def test_markdown_is_escaped_then_rendered(browser, servers, requests_seen):
    """The renderer escapes first: markup in an answer is shown as text, never run or loaded."""
    page = open_page(browser, servers["plain"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-tiny-thinker')")
    evil = ('<img src="http://example.com/x.png" onerror="alert(1)"> <script>alert(2)</script> '
            '[x](javascript:alert(3)) **bold** `<b>code</b>`\n\n```python\ndef f(x):  # "c"\n    return "<i>" + 1\n```\n\n'
            'Math: $x^{2} \\times \\frac{a}{b}$ and \\(\\sqrt{2}\\), $5 and $6 (money), \\[E=mc^2\\]\n\n'
            '$$\n\\sum_{i=1}^{n} i\n$$\n\n$\\href{http://example.com}{x}$ and $\\frac{1}$\n\n- one\n- two')
    html = page.evaluate("s => markdown(s)", evil)
    page.evaluate("h => { const d = document.createElement('div'); d.id = 'probe'; d.innerHTML = h; document.body.append(d); }", html)
    probe = page.locator("#probe")
    assert probe.locator("img, script, [onerror], a[href^='javascript']").count() == 0
    assert "<img src=" in probe.text_content() and "<script>" in probe.text_content()
    assert probe.locator("strong").text_content() == "bold"
    assert probe.locator("p code").text_content() == "<b>code</b>"
    assert probe.locator(".code .tok-k").all_text_contents() == ["def", "return"]
    assert probe.locator(".code .tok-c").text_content() == '# "c"'
    assert probe.locator(".code .tok-s").text_content() == '"<i>"'
    assert probe.locator(".code .tok-n").text_content() == "1"
    assert probe.locator("ul li").all_text_contents() == ["one", "two"]
    tex = ["x^{2} \\times \\frac{a}{b}", "\\sqrt{2}", "E=mc^2", "\\sum_{i=1}^{n} i", "\\href{http://example.com}{x}",
           "\\frac{1}"]
    # before typesetting (or without KaTeX) the TeX source is the text; dollar amounts stay text
    assert probe.locator(".math").all_text_contents() == tex
    assert "$5 and $6 (money)" in probe.text_content()
    page.evaluate("typeset(document.getElementById('probe'))")
    assert probe.locator(".math .katex").count() == 5
    assert probe.locator(".math annotation").all_text_contents() == tex[:5]  # KaTeX's MathML keeps the source
    assert probe.locator(".math.display .katex-display").count() == 2  # \[ \] and $$ $$
    assert probe.locator(".katex .mfrac").count() == 1 and probe.locator(".katex .sqrt").count() == 1
    assert probe.locator(".katex a, .katex [href]").count() == 0  # \href is not trusted: no link
    error = probe.locator(".math.math-error")  # shown as the source, marked, with KaTeX's message
    assert error.text_content() == "\\frac{1}" and "KaTeX parse error" in error.get_attribute("title")
    # sizes set through the CSSOM, fonts from this origin: nothing the CSP blocked
    assert page.evaluate("document.querySelector('#probe .katex .vlist').style.height") != ""
    fonts = page.evaluate("document.fonts.ready.then(() => [...document.fonts].filter((f) => "
                          "f.family.startsWith('KaTeX') && f.status === 'loaded').length)")
    assert fonts > 0
    assert page.evaluate("window.__csp") == []
    # \vec's arrow comes sized by a style attribute, which the CSP refuses: the page sets it through the CSSOM
    arrow = page.evaluate("""() => { const d = document.createElement('div'); d.innerHTML = markdown('$\\\\vec{x}$');
        document.body.append(d); typeset(d); return d.querySelector('.katex svg').getBoundingClientRect().width; }""")
    assert arrow > 0


def test_no_webui_flag_and_page_headers(servers):
    off = servers["off"]
    assert not any("chat page" in line for line in off.lines), off.lines
    assert httpx.get(f"{off.origin}/").status_code == 404
    assert httpx.get(f"{off.origin}/v1/models").status_code == 200
    r = httpx.get(servers["plain"].url)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{servers['plain'].origin}/webui/../app.py").status_code == 404
    # the page is outside /v1: it loads without the key, the API behind it does not
    assert httpx.get(servers["key"].url).status_code == 200
    assert httpx.get(f"{servers['key'].origin}/v1/models").status_code == 401


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _mp4(frames: int = 6) -> bytes:
    av = pytest.importorskip("av", reason="PyAV not installed: it writes the test's video")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_attachments_reach_a_vision_model_and_math_is_typeset(browser, servers, requests_seen, shots):
    """On a vision-language model the page offers attachments (file picker, paste, drop), shows
    them, sends them as data: URL content parts; the steered answer's math is typeset by KaTeX."""
    page = open_page(browser, servers["vl"], requests_seen)
    page.wait_for_selector("#model-name:text('qwen3-vl-steered')")
    assert page.get_attribute("#attach", "aria-label").startswith("Attach image or video")
    assert page.get_attribute("#attach-input", "accept") == "image/*,video/*"
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    cat, dog, clip = _png(40, 30, 1), _png(24, 36, 2), _mp4()
    with page.expect_file_chooser() as chooser:  # the Attach button opens the picker
        page.click("#attach")
    chooser.value.set_files([{"name": "cat.png", "mimeType": "image/png", "buffer": cat}])
    page.wait_for_selector("#pending img[alt='Image: cat.png']")
    # a paste into the message box and a drop on the composer, as the browser delivers them
    page.evaluate("""([b64, name, type, how]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type}));
        if (how === "paste") document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
        else document.getElementById("composer").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(dog).decode(), "dog.png", "image/png", "paste"])
    page.wait_for_selector("#pending img[alt='Image: dog.png']")
    page.evaluate("""([b64, name, type]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type}));
        document.getElementById("composer").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(clip).decode(), "clip.mp4", "video/mp4"])
    page.wait_for_selector("#pending video[aria-label='Video: clip.mp4']")
    page.click("#pending button[aria-label='Remove image: dog.png']")
    assert page.locator("#pending li").count() == 2
    page.screenshot(path=shots / "attachments-pending.png")
    ask(page, "w20 w21")
    wait_answer(page)
    # the request: the picked image and the dropped video as data: URLs, then the text
    parts = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "video_url", "text"]
    assert parts[0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(cat).decode()
    assert parts[1]["video_url"]["url"] == "data:video/mp4;base64," + base64.b64encode(clip).decode()
    assert parts[2] == {"type": "text", "text": "w20 w21"}
    assert page.is_hidden("#pending")
    user_msg = page.locator("article.msg.user")
    assert user_msg.locator(".attachments img").get_attribute("alt") == "Image: cat.png"
    assert user_msg.locator(".attachments video").count() == 1
    # the steered answer, streamed and typeset
    answer = last_answer(page)
    assert answer.locator(".answer").text_content().strip().startswith("Pythagoras:")
    assert answer.locator(".stats").text_content().endswith("5 tokens · done")
    assert answer.locator(".math annotation").all_text_contents() == ["a^2+b^2=c^2", "c=\\sqrt{a^2+b^2}"]
    assert answer.locator(".katex .sqrt").count() == 1 and answer.locator(".katex msup").count() >= 3
    assert page.evaluate("window.__csp") == []
    page.screenshot(path=shots / "attachments-math.png")
    # kept across a reload, images and all
    page.reload()
    page.wait_for_selector("#model-name:text('qwen3-vl-steered')")
    assert page.locator("article.msg.user .attachments img").get_attribute("src").startswith("data:image/png;base64,")
    assert last_answer(page).locator(".math .katex").count() == 2
    # a file the model cannot take is refused at the page
    page.set_input_files("#attach-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    page.wait_for_selector("#error:text('notes.txt: this model takes image and video.')")
    assert page.locator("#pending li").count() == 0
