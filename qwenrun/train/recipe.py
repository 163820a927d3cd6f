"""`qwenrun train-demo`: the bundled `qwen3-tiny-thinker`, end to end (tokenizer -> data -> training -> export).

The recipe is the Qwen3 report's post-training in miniature, as supervised stages. Stage 1: long
step-by-step reasoning in thinking mode, and thinking-mode fusion (the same problems answered with an
empty think block under `enable_thinking=False` or `/no_think`), plus budget-truncated reasoning and
calculator tool calls. Stage 2 is a short low-LR pass richer in subtraction and tool turns; stage 3
teaches conversations (1-4 turns, history as the template renders it) and off-topic messages.

Stage 3 came after the first release, and the tokenizer is still trained on stage-1 chats only, so
`--init` can start it from an exported stage-1+2 model (the bundled one was made that way).
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
from qwenrun.demo.data import examples, tokenizer_corpus
from qwenrun.loading.weights import load_weights
from qwenrun.tokenizer.chat import ChatTemplate
from qwenrun.train.chat_template import QWEN3_CHAT_TEMPLATE
from qwenrun.train.tokenizer import save_tokenizer, train_tokenizer
from qwenrun.train.trainer import Sample, TrainConfig, Trainer, export_hf, hf_config, init_model

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
    stream = examples(random.Random(key).getrandbits(63), template(), stage)
    out = []
    for _ in range(batch_size):
        ex = next(stream)
        out.append((tok.encode(ex.prompt).ids, tok.encode(ex.completion).ids))
    return out


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
) -> Path:
    """Train and export; the run's checkpoint lives in `out/checkpoint`, the HF model in `out`.

    With `init` (an exported model of this recipe), its tokenizer and weights stand for stages 1-2,
    which are skipped."""
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
    export_hf(model, cfg, out)
    save_tokenizer(tok, QWEN3_CHAT_TEMPLATE, out)
    (out / "train_log.json").write_text(
        json.dumps(
            {
                "steps": 0 if init is not None else steps,
                "stage2_steps": 0 if init is not None else stage2_steps,
                "stage3_steps": stage3_steps,
                "init": None if init is None else str(init),
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "size": size.__dict__,
                "final_loss": sum(history[-20:]) / max(1, len(history[-20:])),
                "wall_s_this_run": round(time.perf_counter() - t0, 1),
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n"
    )
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
    stage: int,
    cfg: TrainConfig,
) -> None:
    """Run one stage (its own optimizer and LR schedule) to the end; stage 1 checkpoints in `ckpt`,
    later ones in `ckpt/stage<n>`, so each resumes where it stopped."""
    cfg.batch_size, cfg.seed, cfg.compile = batch_size, seed, compile
    folder = ckpt if stage == 1 else ckpt / f"stage{stage}"
    trainer = Trainer(model, cfg, functools.partial(batch_fn, tok, seed, batch_size, stage=stage))
    if resume and (folder / "state.json").is_file():
        trainer.load(folder)
        print(f"stage {stage} resumed at step {trainer.step}")
    print(f"stage {stage}: {cfg.steps} steps x {batch_size} chats")
    trainer.fit(folder, progress=progress)
    history += trainer.history


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
