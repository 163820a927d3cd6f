"""`qwenrun train-demo`: the bundled `qwen3-tiny-thinker`, end to end (tokenizer -> data -> training -> export).

The recipe is the Qwen3 report's post-training in miniature, as supervised stages. Stage 1: long
step-by-step reasoning in thinking mode, and thinking-mode fusion (the same problems answered with an
empty think block under `enable_thinking=False` or `/no_think`), plus budget-truncated reasoning and
calculator tool calls. Stage 2 is a short low-LR pass richer in subtraction and tool turns; stage 3
teaches conversations (1-4 turns, history as the template renders it) and off-topic messages.

Stage 3 came after the first release, and the tokenizer is still trained on stage-1 chats only, so
`--init` can start it from an exported stage-1+2 model (the bundled one was made that way).

The MTP stage trains a multi-token-prediction head (`qwenrun.layers.mtp`) on the finished, frozen
model: from the final hidden state h_t and the token x_{t+1} it predicts x_{t+2}, so speculative
decoding with method "mtp" has a drafter that learned something. It is stored under Qwen's `mtp.*`
names beside untouched trunk tensors, and its held-out next-next-token accuracy goes in the log.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from qwenrun.config import ModelConfig
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.demo.data import MODES, OPS, examples, make_example, sample_problem, tokenizer_corpus
from qwenrun.loading.weights import load_weights
from qwenrun.tokenizer.chat import ChatTemplate
from qwenrun.train.chat_template import QWEN3_CHAT_TEMPLATE
from qwenrun.train.tokenizer import save_tokenizer, train_tokenizer
from qwenrun.train.trainer import (
    Sample,
    TrainConfig,
    Trainer,
    add_mtp_head,
    export_hf,
    hf_config,
    init_model,
    loss_on,
    mtp_loss_on,
    mtp_rows,
)

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "qwen3-tiny-thinker"


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512


DEMO_SIZE = ModelSize()
VOCAB_TARGET = 1024


def template() -> ChatTemplate:
    return ChatTemplate(
        QWEN3_CHAT_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    )


def build_tokenizer(seed: int, vocab: int = VOCAB_TARGET) -> tokenizers.Tokenizer:
    return train_tokenizer(tokenizer_corpus(seed, template()), vocab)


def model_config(tok: tokenizers.Tokenizer, size: ModelSize = DEMO_SIZE) -> dict:
    vocab = (
        -(-tok.get_vocab_size() // 64) * 64
    )  # padded to a multiple of 64, as Qwen pads its vocab
    return hf_config(
        {
            "vocab_size": vocab,
            **size.__dict__,
            "bos_token_id": None,
            "eos_token_id": tok.token_to_id("<|im_end|>"),
            "pad_token_id": tok.token_to_id("<|endoftext|>"),
        }
    )


def batch_fn(
    tok: tokenizers.Tokenizer, seed: int, batch_size: int, step: int, stage: int = 1
) -> list[Sample]:
    """The samples of `step`: a pure function of (seed, step), so resumed runs see the same data."""
    key = f"{seed}:{step}" if stage == 1 else f"{seed}:{stage}:{step}"
    return _samples(tok, key, batch_size, stage)


def mtp_batch_fn(tok: tokenizers.Tokenizer, seed: int, batch_size: int, step: int) -> list[Sample]:
    """The MTP stage's samples: the three stages' mixes in turn, chats the trunk never saw."""
    return _samples(tok, f"{seed}:mtp:{step}", batch_size, 1 + step % 3)


def _samples(tok: tokenizers.Tokenizer, key: str, batch_size: int, stage: int) -> list[Sample]:
    stream = examples(random.Random(key).getrandbits(63), template(), stage)
    out = []
    for _ in range(batch_size):
        ex = next(stream)
        out.append((tok.encode(ex.prompt).ids, tok.encode(ex.completion).ids))
    return out


def heldout_samples(tok: tokenizers.Tokenizer, n: int, seed: int = 0) -> list[Sample]:
    """`n` stage-1 chats (every mode) on held-out problems, which no stage trained on."""
    rng = random.Random(f"heldout:{seed}")
    modes, mode_weights = zip(*MODES.items())
    ops, op_weights = zip(*OPS.items())
    out = []
    for _ in range(n):
        mode = rng.choices(modes, mode_weights)[0]
        p = sample_problem(rng, rng.choices(ops, op_weights)[0], heldout=True)
        ex = make_example(rng, template(), mode, p)
        out.append((tok.encode(ex.prompt).ids, tok.encode(ex.completion).ids))
    return out


@torch.no_grad()
def mtp_accuracy(model: torch.nn.Module, samples: list[Sample], batch: int = 32) -> dict[str, float]:
    """Teacher-forced over the completion tokens of `samples`: `top1`, how often the head's argmax
    from (h_t, x_{t+1}) is x_{t+2}; `agrees_with_target`, how often it is the model's own greedy
    token after x_{t+1} (a greedy draft's chance of being accepted); `target_top1`, the model's
    next-token accuracy on the same positions."""
    model.eval()
    hits = torch.zeros(3)
    total = 0
    for i in range(0, len(samples), batch):
        ids, pos, lens, rows, head, tgt = mtp_rows(samples[i : i + batch], torch.device("cpu"))
        hidden = model(ForwardBatch.without_cache(ids, pos, lens))
        draft = model.mtp.compute_logits(model.mtp(head, hidden[rows])).argmax(-1)
        greedy = model.compute_logits(hidden[rows + 1]).argmax(-1)  # the target's token after x_{t+1}
        keep = tgt != -100
        d, g, t = draft[keep], greedy[keep], tgt[keep]
        hits += torch.tensor([(d == t).sum(), (d == g).sum(), (g == t).sum()], dtype=torch.float)
        total += int(keep.sum())
    top1, agree, target = (hits / total).tolist()
    return {"top1": round(top1, 4), "agrees_with_target": round(agree, 4), "target_top1": round(target, 4),
            "tokens": total}


def train_demo(
    out: Path,
    steps: int,
    resume: bool,
    seed: int = 0,
    size: ModelSize = DEMO_SIZE,
    batch_size: int = 24,
    lr: float = 2e-3,
    progress: bool = True,
    stage2_steps: int = 0,
    compile: bool = True,
    stage3_steps: int = 0,
    init: Path | None = None,
    mtp_steps: int = 0,
    mtp_eval_chats: int = 200,
) -> Path:
    """Train and export; the run's checkpoint lives in `out/checkpoint`, the HF model in `out`.

    With `init` (an exported model of this recipe), its tokenizer and weights stand for stages 1-2,
    which are skipped. `mtp_steps` trains the MTP head last, on the frozen model (asserted: every
    trunk tensor leaves the stage bit for bit as it came)."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    tok_file = ckpt / "tokenizer.json"
    if init is not None:
        tok = tokenizers.Tokenizer.from_file(str(init / "tokenizer.json"))
    elif resume and tok_file.is_file():
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    else:
        tok = build_tokenizer(seed)
    ckpt.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_file))
    cfg = model_config(tok, size)
    model = init_model(ModelConfig.from_hf(cfg), seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {cfg['vocab_size']}")
    history: list[float] = []
    stage = functools.partial(
        _stage, model, tok, seed, batch_size, ckpt, resume, progress, compile, history
    )
    if init is not None:
        load_weights(model, init, torch.float32, tied_embeddings=True)
        print(f"stages 1-2: from {init}")
    else:
        warmup = min(100, steps // 10 + 1)
        stage(1, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup=warmup))
        if stage2_steps:
            stage(2, TrainConfig(steps=stage2_steps, lr=lr / 4, min_lr=lr / 100, warmup=10))
    if stage3_steps:
        stage(3, TrainConfig(steps=stage3_steps, lr=lr / 4, min_lr=lr / 100, warmup=10))
    log = {
        "steps": 0 if init is not None else steps,
        "stage2_steps": 0 if init is not None else stage2_steps,
        "stage3_steps": stage3_steps,
        "init": None if init is None else str(init),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "size": size.__dict__,
        "final_loss": sum(history[-20:]) / max(1, len(history[-20:])),
    }
    carried = init is not None and not stage3_steps and (init / "train_log.json").is_file()
    if carried:  # the trunk is init's, unchanged: its own log describes it
        log = json.loads((init / "train_log.json").read_text())
    if mtp_steps:
        t_mtp = time.perf_counter()
        trunk = {k: v.clone() for k, v in model.state_dict().items()}
        add_mtp_head(model, seed)
        mtp_history: list[float] = []
        _stage(model, tok, seed, batch_size, ckpt, resume, progress, compile, mtp_history, "mtp",
               TrainConfig(steps=mtp_steps, lr=lr, min_lr=lr / 20, warmup=20))
        after = model.state_dict()
        assert all(_same_bytes(v, after[k]) for k, v in trunk.items()), "the MTP stage changed the trunk"
        cfg["num_nextn_predict_layers"] = 1
        log["mtp"] = {
            "steps": mtp_steps,
            "batch_size": batch_size,
            "lr": lr,
            "final_loss": sum(mtp_history[-20:]) / max(1, len(mtp_history[-20:])),
            "heldout": mtp_accuracy(model, heldout_samples(tok, mtp_eval_chats, seed)),
            "heldout_chats": mtp_eval_chats,
            "wall_s": round(time.perf_counter() - t_mtp, 1),
            "threads": torch.get_num_threads(),
        }
        print(f"MTP head on {mtp_eval_chats} held-out chats: {log['mtp']['heldout']}")
    export_hf(model, cfg, out)
    save_tokenizer(tok, QWEN3_CHAT_TEMPLATE, out)
    if not carried:
        log.update(wall_s_this_run=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads())
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"exported to {out} in {time.perf_counter() - t0:.0f}s")
    return out


def _stage(
    model: torch.nn.Module,
    tok: tokenizers.Tokenizer,
    seed: int,
    batch_size: int,
    ckpt: Path,
    resume: bool,
    progress: bool,
    compile: bool,
    history: list[float],
    stage: int | str,
    cfg: TrainConfig,
) -> None:
    """Run one stage (its own optimizer and LR schedule) to the end; stage 1 checkpoints in `ckpt`,
    later ones in `ckpt/stage<n>`, the MTP stage ("mtp") in `ckpt/mtp`, so each resumes where it
    stopped."""
    cfg.batch_size, cfg.seed, cfg.compile = batch_size, seed, compile
    if stage == "mtp":
        folder, loss = ckpt / "mtp", mtp_loss_on
        batches = functools.partial(mtp_batch_fn, tok, seed, batch_size)
    else:
        folder, loss = ckpt if stage == 1 else ckpt / f"stage{stage}", loss_on
        batches = functools.partial(batch_fn, tok, seed, batch_size, stage=stage)
    trainer = Trainer(model, cfg, batches, loss)
    if resume and (folder / "state.json").is_file():
        trainer.load(folder)
        print(f"stage {stage} resumed at step {trainer.step}")
    print(f"stage {stage}: {cfg.steps} steps x {batch_size} chats")
    trainer.fit(folder, progress=progress)
    history += trainer.history


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def run(args: argparse.Namespace) -> int:
    """CLI entry (`qwenrun train-demo`)."""
    out = Path(args.out)
    train_demo(
        out,
        args.steps,
        args.resume,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        stage2_steps=args.stage2_steps,
        stage3_steps=args.stage3_steps,
        init=Path(args.init) if args.init else None,
        mtp_steps=args.mtp_steps,
    )
    if args.install:
        for name in (
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "train_log.json",
        ):
            shutil.copy2(out / name, BUNDLED / name)
        print(f"copied into {BUNDLED}")
    return 0
