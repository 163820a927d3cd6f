"""The ways hybrid checkpoints are stored, each loaded and compared with transformers (fp32 logits):
Qwen3.5(-MoE) *ForConditionalGeneration (text under `model.language_model.*` beside the vision tower,
which loads too; vision parity is test_parity_vl.py), a CausalLM checkpoint renamed to that prefix, `mtp.*` heads
(skipped and counted), fused expert tensors in transformers' layout and transposed; and int8 / int4
quantization of these models (routers and shared-expert gates stay in the model dtype).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwenrun import LLM, SamplingParams
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import load_model, open_checkpoint
from tiny import fuse_experts, make_checkpoint, make_multimodal_checkpoint

TOL = 1e-4


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ForwardBatch.without_cache(ids, torch.arange(len(ids)), [len(ids)])))


def _check(folder, ref, ids: torch.Tensor) -> None:
    ours = _logits(load_model(open_checkpoint(folder), torch.float32, torch.device("cpu")), ids)
    with torch.no_grad():
        theirs = ref(input_ids=ids[None]).logits[0]
    err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    assert err <= TOL, f"max relative logit error {err:.2e}"


def _rewrite(folder, dest, edit) -> None:
    """Copy the checkpoint at `folder` to `dest` with its tensors passed through `edit(dict) -> dict`."""
    dest.mkdir()
    shutil.copy(folder / "config.json", dest / "config.json")
    save_file(edit(load_file(folder / "model.safetensors")), dest / "model.safetensors", metadata={"format": "pt"})


IDS = torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["qwen3_5-layertypes-tied-bias-ratio1", "qwen3_5_moe-interval2"])
def test_multimodal_checkpoint_runs_text_prompts(name, tmp_path, caplog):
    """The tower loads with the language model (no tensor skipped) and text-only prompts are unchanged."""
    folder, ref = make_multimodal_checkpoint(name, tmp_path / "ckpt")
    with caplog.at_level(logging.INFO):
        _check(folder, ref, IDS)
    assert "skipped" not in caplog.text


def test_language_model_prefix_on_a_causal_lm_checkpoint(tmp_path):
    folder, ref = make_checkpoint("qwen3_5-interval4", tmp_path / "ckpt")
    _rewrite(folder, tmp_path / "prefixed",
             lambda t: {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
                        for k, v in t.items()})
    _check(tmp_path / "prefixed", ref, IDS)


@pytest.mark.parametrize("name", ["next-interval4-moe", "qwen3_5-interval4"])
def test_mtp_tensors_are_skipped_and_counted(name, tmp_path, caplog):
    folder, ref = make_checkpoint(name, tmp_path / "ckpt")
    H = ref.config.hidden_size
    mtp = {"mtp.fc.weight": torch.randn(H, 2 * H), "mtp.norm.weight": torch.randn(H),
           "mtp.layers.0.self_attn.q_proj.weight": torch.randn(2 * 4 * 32, H)}
    _rewrite(folder, tmp_path / "mtp", lambda t: {**t, **mtp})
    with caplog.at_level(logging.INFO):
        _check(tmp_path / "mtp", ref, IDS)
    assert "skipped 3 checkpoint tensor(s) matching mtp.*" in caplog.text


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_experts(transposed, tmp_path):
    """Per-expert tensors replaced by `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`
    (transformers' in-memory layout), or their transposes (Qwen3-VL-MoE's), told apart by shape (so
    2I != H here)."""
    folder, ref = make_checkpoint("qwen3_5_moe-interval2", tmp_path / "ckpt", moe_intermediate_size=40)
    _rewrite(folder, tmp_path / "fused", fuse_experts(transposed))
    _check(tmp_path / "fused", ref, IDS)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["next-interval4-moe", "qwen3_5_moe-tied-ratio1"])
def test_quantized_hybrid_models_run(name, method, tmp_path):
    """The routers and the shared-expert gates are left in the model dtype, every GDN and attention
    projection is quantized, and greedy decoding through the cache runs. Tiny random hybrids are far
    more sensitive to rounding than dense Qwen3 (bf16 alone moves their logits by ~0.1 of the mean
    logit and flips ~20% of the top-1 tokens; routing flips, and the decay gate `a` is amplified by
    exp(A_log)), so the yardstick is the bf16 model's own distance to fp32: unrelated logits would be
    ~1.4x the mean logit off. Decode and prefill of one quantized model are not compared token for
    token: the int8 kernels (few rows) and the dequantized matmuls (many rows) round differently by
    design."""
    folder, _ = make_checkpoint(name, tmp_path / "ckpt")
    plain = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    bf16 = LLM(folder, dtype="bfloat16", device="cpu", kv_cache_memory=8 << 20)
    quant = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20, quantization=method,
                quant_group_size=32)
    kept = {n for n, m in quant.model.named_modules() if type(m) is nn.Linear}
    assert kept == {f"model.layers.{i}.mlp.{g}" for i in range(4) for g in ("gate", "shared_expert_gate")}
    prompt = IDS[:40].tolist()
    a, b, c = plain.logits(prompt), quant.logits(prompt), bf16.logits(prompt)
    err = lambda x: ((x - a).abs().mean() / a.abs().mean()).item()  # noqa: E731
    assert 0 < err(b) <= 3 * err(c) + 0.02
    [out] = quant.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 8
