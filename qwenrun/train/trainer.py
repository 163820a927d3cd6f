"""A small supervised trainer over the engine's own `Qwen3ForCausalLM` (no second model definition).

AdamW with a linear warm-up and cosine decay, gradient clipping, fp32 (optional bf16 autocast), loss on
completion tokens only, checkpoint save/resume (weights in safetensors, optimizer state through
`torch.load(weights_only=True)`, the step and the torch RNG), a rich progress bar, and export to the
standard Hugging Face layout that both qwenrun and transformers load.

Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwenrun.config import ModelConfig
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.weights import weight_targets
from qwenrun.models.qwen3 import Qwen3ForCausalLM

# (prompt ids, completion ids): the loss covers the completion only.
Sample = tuple[list[int], list[int]]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 24  # examples per step
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bf16 (CPU or CUDA); weights and optimizer stay fp32
    save_every: int = 100
    log_every: int = 50
    threads: int | None = 2
    compile: bool = (
        False  # torch.compile the forward (fuses the elementwise work; ~2x on CPU after ~1 min)
    )

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then cosine decay to `min_lr` at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A complete Qwen3 config.json from the few sizes that vary."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 1024,
        "max_window_layers": cfg["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        **cfg,
    }


def init_model(cfg: ModelConfig, seed: int) -> Qwen3ForCausalLM:
    """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers), norms 1."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(
                    0.0, resid if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                )
    return model


def pack(
    samples: Sequence[Sample], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Flatten sequences into one [T] batch: ids, positions, targets (-100 = no loss), lengths."""
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    lens: list[int] = []
    for prompt, completion in samples:
        seq = prompt + completion
        ids += seq
        pos += range(len(seq))
        # target of token i is token i+1; only completion tokens are predicted
        tgt += [-100] * (len(prompt) - 1) + completion + [-100]
        lens.append(len(seq))
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_t(ids), as_t(pos), as_t(tgt), lens


def loss_on(model: Qwen3ForCausalLM, samples: Sequence[Sample], bf16: bool = False) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, pos, tgt, lens = pack(samples, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(ForwardBatch.without_cache(ids, pos, lens))  # [T, H]
        keep = tgt != -100
        logits = model.compute_logits(hidden[keep])  # [N, V]
    return F.cross_entropy(logits.float(), tgt[keep])


def mtp_rows(samples: Sequence[Sample], device: torch.device):
    """The packed batch and the MTP head's rows over it: row t of a sequence reads (h_t, x_{t+1}) at
    position t and predicts x_{t+2} (-100 where that is not a completion token); a sequence's last
    token has no row. Returns the packed ids, positions and lengths, the row indices into that batch,
    the rows' own batch and their targets."""
    ids, pos, tgt, lens = pack(samples, device)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    has_next = torch.ones_like(ids, dtype=torch.bool)
    has_next[last] = False
    rows = has_next.nonzero().squeeze(1)
    head = ForwardBatch.without_cache(ids[rows + 1], pos[rows], [n - 1 for n in lens])
    return ids, pos, lens, rows, head, tgt[rows + 1]


def mtp_loss_on(model: Qwen3ForCausalLM, samples: Sequence[Sample], bf16: bool = False) -> torch.Tensor:
    """Cross-entropy of the MTP head (`model.mtp`) through the shared LM head, on completion tokens;
    the trunk runs without gradients (it is frozen)."""
    device = next(model.parameters()).device
    ids, pos, lens, rows, head, tgt = mtp_rows(samples, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            hidden = model(ForwardBatch.without_cache(ids, pos, lens))[rows]
        out = model.mtp(head, hidden)
        keep = tgt != -100
        logits = model.mtp.compute_logits(out[keep])
    return F.cross_entropy(logits.float(), tgt[keep])


def add_mtp_head(model: Qwen3ForCausalLM, seed: int) -> None:
    """Attach a fresh MTP head as `model.mtp` and freeze everything else. The head's layer starts as a
    copy of the trunk's last layer (it already reads final-layer features), `fc` as `init_model`'s
    matrices, its norms at 1."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.mtp = model.make_mtp()
    with torch.no_grad():
        model.mtp.layers[0].load_state_dict(model.model.layers[-1].state_dict())
        model.mtp.fc.weight.normal_(0.0, 0.02)
        for norm in (model.mtp.pre_fc_norm_embedding, model.mtp.pre_fc_norm_hidden, model.mtp.norm):
            norm.weight.fill_(1.0)


class Trainer:
    """Owns model, optimizer and step; `batch_fn(step)` returns that step's samples.

    Checkpoint folder layout: `model.safetensors` (qwenrun parameter names), `optimizer.pt`, `state.json`.
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        cfg: TrainConfig,
        batch_fn: Callable[[int], list[Sample]],
        loss: Callable[..., torch.Tensor] = loss_on,
    ):
        """`loss(model, samples, bf16)`; only parameters that require grad are trained (the MTP stage
        freezes the trunk)."""
        self.model, self.cfg, self.batch_fn, self.loss = model, cfg, batch_fn, loss
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.dim() >= 2]
        no_decay = [p for p in trained if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.step = 0
        self.history: list[float] = []
        self.forward_model = (
            cast(Qwen3ForCausalLM, torch.compile(model, dynamic=True)) if cfg.compile else model
        )

    def train_step(self) -> tuple[float, int]:
        """One optimizer step; returns (loss, tokens processed)."""
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr_at(self.step)
        samples = self.batch_fn(self.step)
        self.model.train()
        loss = self.loss(self.forward_model, samples, self.cfg.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.history.append(loss.item())
        return self.history[-1], sum(len(p) + len(c) for p, c in samples)

    def fit(self, ckpt_dir: Path | None = None, progress: bool = True) -> None:
        """Train up to `cfg.steps`, saving to `ckpt_dir` every `save_every` steps and at the end."""
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(
                "train", total=self.cfg.steps, completed=self.step, loss=float("nan"), tps=0.0
            )
            ema, t0, toks = None, time.perf_counter(), 0
            while self.step < self.cfg.steps:
                loss, n = self.train_step()
                toks += n
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                tps = toks / (time.perf_counter() - t0)
                bar.update(task, completed=self.step, loss=ema, tps=tps)
                if self.step % self.cfg.log_every == 0:
                    bar.console.print(
                        f"step {self.step}/{self.cfg.steps}  loss {ema:.4f}  "
                        f"lr {self.cfg.lr_at(self.step):.2e}  {tps:.0f} tok/s  "
                        f"{time.perf_counter() - t0:.0f}s"
                    )
                if ckpt_dir is not None and (
                    self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps
                ):
                    self.save(ckpt_dir)

    # ------------------------------------------------------------------------------ checkpointing
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors.tmp"))
        torch.save(self.opt.state_dict(), folder / "optimizer.pt.tmp")
        meta = {
            "step": self.step,
            "history": self.history,
            "config": asdict(self.cfg),
            "torch_rng": torch.get_rng_state().tolist(),
        }
        (folder / "state.json.tmp").write_text(json.dumps(meta))
        for name in (
            "model.safetensors",
            "optimizer.pt",
            "state.json",
        ):  # each file replaced atomically
            (folder / f"{name}.tmp").replace(folder / name)

    def load(self, folder: Path) -> None:
        """Resume from `save`: weights, optimizer moments, step, loss history and torch RNG."""
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        meta = json.loads((folder / "state.json").read_text())
        self.step, self.history = int(meta["step"]), list(meta["history"])
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ export
def export_hf(
    model: Qwen3ForCausalLM, config: dict[str, Any], out: Path, dtype: torch.dtype = torch.float32
) -> None:
    """Write config.json, model.safetensors (HF tensor names) and generation_config.json into `out`.

    HF names come from the loader's own map (`weight_targets`) read in reverse, so merged projections
    (qkv_proj, gate_up_proj) are split back into q/k/v_proj and gate/up_proj exactly as they load.
    """
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {
        t.checkpoint_name: t.view(params[t.param_name].data).detach().to(dtype).contiguous().clone()
        for t in weight_targets(model).values()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config.get("pad_token_id"),
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
