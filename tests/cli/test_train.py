"""Trainer, tokenizer and data generators of the demo recipe (fast; no bundled model needed)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

from qwenrun.config import ModelConfig
from qwenrun.demo.data import (
    FIRST_IMPRESSIONS,
    REPLIES,
    OffTopic,
    Problem,
    answer_text,
    examples,
    is_heldout,
    is_heldout_text,
    make_example,
    sample_off_topic,
    sample_problem,
    trace,
)
from qwenrun.demo.evaluate import TRACE_PATTERN
from qwenrun.train.chat_template import QWEN3_CHAT_TEMPLATE
from qwenrun.train.recipe import ModelSize, batch_fn, build_tokenizer, model_config, template
from qwenrun.train.tokenizer import ADDED_TOKENS
from qwenrun.train.trainer import TrainConfig, Trainer, export_hf, init_model

QWEN3_TOKENIZER = Path("/work/shared/assets/qwen3-tokenizer")
TINY = ModelSize(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=128,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(seed=0)


def test_traces_end_in_the_answer():
    rng = random.Random(0)
    for _ in range(2000):
        p = sample_problem(rng, rng.choice(["add", "sub", "mul"]))
        assert trace(p).split("\n")[-1] == f"={p.answer}", p
    assert trace(Problem("mul", 347, 86)).split("\n")[-1] == "=29842"
    assert "7*6+0=42" in trace(Problem("mul", 347, 86))
    assert trace(Problem("sub", 35, 4821)).endswith("=-4786")


def test_generators_are_seeded_and_skip_heldout():
    a = [next(examples(7, template())) for _ in range(3)]
    b = [next(examples(7, template())) for _ in range(3)]
    assert [(e.prompt, e.completion) for e in a] == [(e.prompt, e.completion) for e in b]
    for stage in (1, 2, 3):
        gen = examples(3, template(), stage)
        for _ in range(300):
            ex = next(gen)
            for item in (*ex.history, ex.problem):
                if isinstance(item, Problem):
                    assert not is_heldout(item), item
                elif item is not None:
                    assert not is_heldout_text(item.text), item
    rng = random.Random(1)
    assert all(is_heldout(sample_problem(rng, "mul", (3, 2), heldout=True)) for _ in range(50))
    held = [sample_off_topic(rng, heldout=True) for _ in range(100)]
    assert all(is_heldout_text(o.text) for o in held)
    assert not any(is_heldout_text(o.text) for o in FIRST_IMPRESSIONS)


def test_conversations_render_history_as_inference_does():
    """Earlier turns sit in the prompt as the template renders a chat client's history: their
    answers without their reasoning; only the last turn, the trained one, carries a think block."""
    gen = examples(5, template(), stage=3)
    seen_turns, seen_modes = set(), set()
    for _ in range(400):
        ex = next(gen)
        seen_turns.add(ex.turns)
        seen_modes.add(ex.mode)
        assert "<|im_start|>" not in ex.completion  # the loss covers the last assistant turn only
        for past in ex.history:
            if isinstance(past, Problem):
                assert answer_text(past) + "<|im_end|>" in ex.prompt
                if len(str(past.answer)) > 2:  # short traces can occur inside the tool prompt
                    assert trace(past) not in ex.prompt
            else:
                assert past.text in ex.prompt and past.reply + "<|im_end|>" in ex.prompt
                assert past.thought not in ex.prompt
        # The prompt holds at most this turn's tool-call think block, or the empty no-think block.
        blocks = ex.prompt.count("<think>")
        if ex.mode == "tool_answer":
            assert blocks <= 1
        else:
            assert blocks == (1 if ex.prompt.endswith("<think>\n\n</think>\n\n") else 0), ex.prompt
        if ex.mode in ("think", "tool_call", "tool_answer") or (
            ex.mode == "off_topic" and not ex.prompt.endswith("</think>\n\n")
        ):
            assert ex.completion.startswith("<think>\n") and "\n</think>\n\n" in ex.completion
        if ex.mode == "think":
            assert ex.completion.startswith(f"<think>\n{trace(ex.problem)}\n</think>")
    assert seen_turns == {1, 2, 3, 4}
    assert seen_modes == {"think", "no_think", "budget", "tool_call", "tool_answer", "off_topic"}


def test_off_topic_turns_get_the_honest_reply_and_no_trace():
    """Greetings and other questions, also in a later turn and with the calculator offered, get the
    short fixed reply: no column arithmetic, no tool call."""
    rng = random.Random(2)
    replies = {r for by_lang in REPLIES.values() for r in by_lang.values()}
    history = (Problem("mul", 347, 28), OffTopic("hi", "greeting", False))
    for tools in (False, True):
        for past in ((), history):
            for _ in range(20):
                ex = make_example(rng, template(), "off_topic", None, past, tools)
                reply = ex.completion.split("</think>\n\n")[-1].removesuffix("<|im_end|>")
                assert reply in replies, ex.completion
                assert "<tool_call>" not in ex.completion
                assert TRACE_PATTERN.search(ex.completion) is None, ex.completion
    first = make_example(random.Random(0), template(), "off_topic", None)
    assert first.completion.endswith("<|im_end|>")


@pytest.mark.parametrize("mode", ["think", "no_think", "budget", "tool_call", "tool_answer"])
def test_examples_render_like_inference(mode):
    ex = make_example(random.Random(0), template(), mode, Problem("mul", 347, 86))
    assert ex.completion.endswith("<|im_end|>")
    if mode == "no_think":
        assert ex.prompt.endswith("<think>\n\n</think>\n\n") or ex.completion.startswith(
            "<think>\n\n</think>\n\n"
        )
    if mode == "tool_call":
        assert (
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 86"}}\n</tool_call>'
            in ex.completion
        )
        assert "# Tools" in ex.prompt
    if mode == "tool_answer":
        assert "<tool_response>\n29842\n</tool_response>" in ex.prompt
        assert ex.completion.endswith("347 * 86 = 29842<|im_end|>")


def test_chat_template_is_the_official_one():
    if not (QWEN3_TOKENIZER / "tokenizer_config.json").is_file():
        pytest.skip("official Qwen3 tokenizer not present")
    official = json.loads((QWEN3_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    assert QWEN3_CHAT_TEMPLATE == official


def test_tokenizer_like_qwen3(tok):
    for t, special in ADDED_TOKENS:
        assert tok.encode(t).tokens == [t]
    flags = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert (
        flags["<|im_end|>"] is True and flags["<think>"] is False and flags["<tool_call>"] is False
    )
    text = "What is 12345 * 67?\n计算 347 × 86。<think>\n7*6+0=42\n</think>\n\n"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    if (QWEN3_TOKENIZER / "tokenizer.json").is_file():
        import tokenizers

        real = tokenizers.Tokenizer.from_file(str(QWEN3_TOKENIZER / "tokenizer.json"))
        digits = lambda enc: [t for t in enc.tokens if any(c.isdigit() for c in t)]
        assert digits(tok.encode(text)) == digits(
            real.encode(text)
        )  # one token per digit, as in Qwen3
    assert all(len(t) == 1 for t in tok.encode("1234567890").tokens)


def test_prompt_and_completion_tokenize_like_the_whole(tok):
    gen = examples(11, template())
    for _ in range(50):
        ex = next(gen)
        assert (
            tok.encode(ex.prompt + ex.completion).ids
            == tok.encode(ex.prompt).ids + tok.encode(ex.completion).ids
        )


def _trainer(tok, steps: int) -> Trainer:
    cfg = model_config(tok, TINY)
    model = init_model(ModelConfig.from_hf(cfg), seed=0)
    tcfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=5, save_every=1000, threads=None)
    return Trainer(model, tcfg, functools.partial(batch_fn, tok, 0, 8))


def test_loss_goes_down_and_resume_continues_identically(tok, tmp_path):
    torch.manual_seed(0)
    tr = _trainer(tok, steps=40)
    for _ in range(30):
        tr.train_step()
    h = tr.history
    assert sum(h[-5:]) / 5 < 0.6 * sum(h[:5]) / 5, h
    tr.save(tmp_path / "ckpt")
    expected, _ = tr.train_step()

    resumed = _trainer(tok, steps=40)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 30 and resumed.history == h[:30]
    got, _ = resumed.train_step()
    assert resumed.step == 31
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_export_loads_in_qwenrun_and_transformers(tok, tmp_path):
    from qwenrun.train.tokenizer import save_tokenizer

    tr = _trainer(tok, steps=3)
    for _ in range(3):
        tr.train_step()
    cfg = model_config(tok, TINY)
    export_hf(tr.model, cfg, tmp_path)
    save_tokenizer(tok, QWEN3_CHAT_TEMPLATE, tmp_path)
    transformers = pytest.importorskip("transformers")
    from qwenrun.llm import LLM

    llm = LLM(str(tmp_path), dtype="float32")
    ids = tok.encode("<|im_start|>user\nWhat is 12 * 3?<|im_end|>\n<|im_start|>assistant\n").ids
    ours = llm.logits(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref[:, : ours.shape[1]], atol=1e-4, rtol=1e-4)


def test_tokenizer_is_the_bundled_one(tok):
    """Stage 3 starts from the bundled stages-1-2 model (`--init`), which needs the same vocabulary:
    conversations must not change the tokenizer corpus (stage-1 chats)."""
    from qwenrun.train.recipe import BUNDLED

    bundled = json.loads((BUNDLED / "tokenizer.json").read_text())
    ours = json.loads(tok.to_str())
    assert ours["model"]["vocab"] == bundled["model"]["vocab"]
    assert ours["model"]["merges"] == bundled["model"]["merges"]


def test_stage3_continues_from_an_exported_model(tok, tmp_path):
    """`train-demo --init MODEL`: the model's weights stand for stages 1-2, stage 3 trains on from them."""
    from safetensors.torch import load_file

    from qwenrun.train.recipe import train_demo
    from qwenrun.train.tokenizer import save_tokenizer

    tr = _trainer(tok, steps=2)
    for _ in range(2):
        tr.train_step()
    export_hf(tr.model, model_config(tok, TINY), tmp_path / "init")
    save_tokenizer(tok, QWEN3_CHAT_TEMPLATE, tmp_path / "init")
    start = load_file(str(tmp_path / "init" / "model.safetensors"))
    kw = dict(size=TINY, batch_size=4, progress=False, compile=False, init=tmp_path / "init")
    train_demo(tmp_path / "same", steps=5, resume=False, **kw)  # no stage 3: the same weights
    same = load_file(str(tmp_path / "same" / "model.safetensors"))
    assert all(torch.equal(start[k], same[k]) for k in start)
    train_demo(tmp_path / "s3", steps=5, resume=False, stage3_steps=2, **kw)
    trained = load_file(str(tmp_path / "s3" / "model.safetensors"))
    assert not all(torch.equal(start[k], trained[k]) for k in start)
    log = json.loads((tmp_path / "s3" / "train_log.json").read_text())
    assert log["stage3_steps"] == 2 and log["steps"] == 0 and log["init"] == str(tmp_path / "init")
    stage3 = [tok.decode(p, skip_special_tokens=False) for p, _ in batch_fn(tok, 0, 40, 0, stage=3)]
    queries = [t.count("<|im_start|>user\n") - t.count("<|im_start|>user\n<tool_response>") for t in stage3]
    assert max(queries) >= 3 and min(queries) == 1, queries  # conversations, and single turns too


def test_mtp_stage_trains_only_the_head(tok, tmp_path):
    """The MTP stage on a frozen model: the head's loss (x_{t+2} from h_t and x_{t+1}) goes down, the
    export adds Qwen's `mtp.*` tensors beside trunk tensors equal bit for bit to the init model's, the
    config gets the depth key, and the head loads back for speculative decoding."""
    from safetensors.torch import load_file

    from qwenrun.loading.loader import load_model, open_checkpoint
    from qwenrun.train.recipe import mtp_batch_fn, train_demo
    from qwenrun.train.tokenizer import save_tokenizer
    from qwenrun.train.trainer import add_mtp_head, mtp_loss_on

    tr = _trainer(tok, steps=3)
    for _ in range(3):
        tr.train_step()
    export_hf(tr.model, model_config(tok, TINY), tmp_path / "init")
    save_tokenizer(tok, QWEN3_CHAT_TEMPLATE, tmp_path / "init")

    model = tr.model
    add_mtp_head(model, seed=0)
    trunk = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    held = mtp_batch_fn(tok, 1, 16, 0)  # another seed: chats the head never trains on
    with torch.no_grad():
        before = mtp_loss_on(model, held).item()
    head = Trainer(model, TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup=2, threads=None),
                   functools.partial(mtp_batch_fn, tok, 0, 8), mtp_loss_on)
    for _ in range(20):
        head.train_step()
    with torch.no_grad():
        after = mtp_loss_on(model, held).item()
    assert after < before - 0.15, (before, after)  # a 3-step trunk leaves the head little to read
    assert all(torch.equal(p, trunk[n]) for n, p in model.named_parameters() if n in trunk)

    out = train_demo(tmp_path / "mtp", steps=5, resume=False, size=TINY, batch_size=4, progress=False,
                     compile=False, init=tmp_path / "init", mtp_steps=2, mtp_eval_chats=4)
    start, end = load_file(str(tmp_path / "init" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(start[k].view(torch.uint8), end[k].view(torch.uint8)) for k in start)
    assert {k for k in end if k not in start} >= {"mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight",
                                                   "mtp.pre_fc_norm_embedding.weight", "mtp.layers.0.mlp.up_proj.weight"}
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    acc = json.loads((out / "train_log.json").read_text())["mtp"]["heldout"]
    assert acc["tokens"] > 0 and 0 <= acc["top1"] <= 1
    loaded = load_model(open_checkpoint(out), torch.float32, torch.device("cpu"), mtp=True)
    assert torch.equal(loaded.mtp.fc.weight, end["mtp.fc.weight"])
