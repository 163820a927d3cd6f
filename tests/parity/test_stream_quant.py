"""Quantizing as the weights load (`load_model(..., quantization=...)`) against loading in full precision
and then quantizing (`quantize_model`): the same modules and the same stored tensors byte for byte, so
the same logits, for dense and MoE models (experts stored per expert and fused, transposed too), tied
and untied LM heads with and without `quantize_lm_head`, an MTP head, fp32 and bf16 checkpoints; and
the reader keeping only the tensor in hand resident.

Both paths quantize each row from the same model-dtype values, so nothing but a bug (a slice written
to the wrong rows, a format chosen differently, a tensor quantized before its dtype conversion) can
make them differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading import weights
from qwenrun.quant import linear as qlinear
from qwenrun.loading.loader import load_model, open_checkpoint
from qwenrun.quant import Quantization, quantize_model
from qwenrun.quant.linear import QuantizedExperts, QuantizedLinear
from test_mtp import add_mtp_head
from tiny import fuse_experts, make_checkpoint

CPU = torch.device("cpu")
IDS = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(11))
# input sizes that are multiples of 128 so int4 is used (not its int8 fallback) where the test means it
INT4_SIZES = dict(hidden_size=128, intermediate_size=256, head_dim=32)


def _rewrite(folder, dest, edit):
    dest.mkdir()
    for f in folder.glob("*.json"):
        shutil.copy(f, dest / f.name)
    save_file(edit(load_file(folder / "model.safetensors")), dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _to_bf16(tensors):
    return {k: v.to(torch.bfloat16) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    made = {}
    for name in ("dense-untied-gqa2", "dense-tied-mha"):
        made[name], _ = make_checkpoint(name, root / name, **INT4_SIZES)
    made["moe"], _ = make_checkpoint("moe-norm-topk", root / "moe", **INT4_SIZES, moe_intermediate_size=128)
    made["moe-fused"] = _rewrite(made["moe"], root / "moe-fused", fuse_experts(False))
    # experts' input size 32: int4 asked, the experts fall back to int8
    made["moe-small-experts"], _ = make_checkpoint("moe-norm-topk", root / "moe-small", **INT4_SIZES)
    made["bf16-dense"] = _rewrite(made["dense-tied-mha"], root / "bf16-dense", _to_bf16)
    made["hybrid-mtp"], ref = make_checkpoint("next-interval4-moe", root / "hybrid", hidden_size=128)
    add_mtp_head(made["hybrid-mtp"], ref)
    made["hybrid-fused-transposed"], _ = make_checkpoint("qwen3_5_moe-interval2", root / "q35",
                                                         moe_intermediate_size=64)
    made["hybrid-fused-transposed"] = _rewrite(made["hybrid-fused-transposed"], root / "q35-fused",
                                               fuse_experts(True))
    return made


def _stored(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _logits(model):
    with torch.no_grad():
        return model.compute_logits(model(ForwardBatch.without_cache(IDS, torch.arange(len(IDS)), [len(IDS)])))


def _assert_same_model(streamed, after):
    assert {n: type(m) for n, m in streamed.named_modules()} == {n: type(m) for n, m in after.named_modules()}
    a, b = _stored(streamed), _stored(after)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{name} differs"
    assert torch.equal(_logits(streamed), _logits(after))


CASES = [  # (checkpoint, model dtype, method, quantize_lm_head, group size, mtp)
    ("dense-untied-gqa2", torch.float32, "int8", True, 128, False),
    ("dense-untied-gqa2", torch.bfloat16, "int4", True, 64, False),
    ("dense-untied-gqa2", torch.bfloat16, "int4", False, 128, False),
    ("dense-tied-mha", torch.bfloat16, "int4", True, 128, False),
    ("dense-tied-mha", torch.float32, "int8", True, 32, False),
    ("dense-tied-mha", torch.bfloat16, "int8", False, 128, False),
    ("moe", torch.bfloat16, "int4", True, 128, False),
    ("moe", torch.float32, "int8", True, 128, False),
    ("moe-fused", torch.bfloat16, "int4", True, 128, False),
    ("moe-fused", torch.bfloat16, "int8", False, 128, False),
    ("moe-small-experts", torch.bfloat16, "int4", True, 128, False),
    ("bf16-dense", torch.bfloat16, "int4", True, 128, False),
    ("bf16-dense", torch.float32, "int8", True, 128, False),
    ("hybrid-mtp", torch.float32, "int8", True, 32, True),
    ("hybrid-mtp", torch.bfloat16, "int4", True, 32, True),
    ("hybrid-fused-transposed", torch.bfloat16, "int8", True, 32, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}-head{c[3]}-g{c[4]}")
def test_quantized_as_loaded_is_byte_identical(folders, case, monkeypatch):
    name, dtype, method, head, group, mtp = case
    ckpt = open_checkpoint(folders[name])
    after = quantize_model(load_model(ckpt, dtype, CPU, mtp=mtp), method, group, head)
    # blocks of a few rows (sizes that divide nothing evenly), as an embedding or fused experts of a
    # real model go; the reference above loaded every tensor in one block
    monkeypatch.setattr(weights, "LOAD_BLOCK_BYTES", 3000)
    monkeypatch.setattr(qlinear, "QUANT_CHUNK_BYTES", 5000)
    streamed = load_model(ckpt, dtype, CPU, mtp=mtp, quantization=Quantization(method, group, head))
    _assert_same_model(streamed, after)
    # not vacuous: the method is the one used (int4's int8 fallback only for experts of input size 32)
    small_experts = name in ("moe-small-experts", "hybrid-mtp")
    experts = {m.format for m in streamed.modules() if isinstance(m, QuantizedExperts)}
    linears = {m.format for m in streamed.modules() if isinstance(m, QuantizedLinear)}
    assert method in linears and experts <= ({"int8"} if small_experts else {method})
    assert isinstance(streamed.lm_head, QuantizedLinear) == head
    if mtp:
        assert isinstance(streamed.mtp.fc, QuantizedLinear)


def _mapped_rss(path) -> int:
    """Bytes of `path` resident in this process's mappings of it (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_read_tensors_leave_no_pages_behind(tmp_path):
    """While the loader reads a file, only the tensor in hand is resident: each one's pages are
    dropped when the next is taken, so reading a checkpoint does not add the file's size to the RSS."""
    size = 1 << 20  # fp32 values per tensor: 4 MB each
    path = tmp_path / "model.safetensors"
    save_file({f"t{i}": torch.full((size,), float(i)) for i in range(6)}, str(path))
    for i, (name, tensor, _) in enumerate(weights.iter_tensors([path])):
        assert tensor[::1024].sum().item() == float(int(name[1:])) * 1024  # touch every page
        assert _mapped_rss(path) <= 4 * size + (256 << 10), f"after tensor {i}: {_mapped_rss(path)} bytes mapped"
