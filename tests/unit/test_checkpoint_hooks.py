"""The tensor side of checkpoint loading: a model class's `checkpoint_rules` (renamed prefixes,
transformed tensors, dropped tensors) and a target's `rank_slice` for tensor parallelism.

Each rule test re-saves a tiny transformers Qwen3 checkpoint the way another family stores it and
checks that a model whose rules say so loads it to the same logits, while the end-of-load checks
still refuse what the rules do not cover.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwenrun import LLM
from qwenrun.errors import CheckpointError
from qwenrun.layers.checkpoint import CheckpointRules, Rank, replicated, split
from qwenrun.layers.linear import WeightTarget
from qwenrun.loading.weights import load_weights
from qwenrun.models.qwen3 import Qwen3ForCausalLM
from qwenrun.models.qwen3_moe import Qwen3MoeForCausalLM
from tiny import make_checkpoint

IDS = [3, 17, 101, 256, 7, 480, 33, 9, 64, 200, 11, 5]
QWEN3_IGNORES = Qwen3ForCausalLM.checkpoint_rules.ignore
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("hooks"))[0]


@pytest.fixture(scope="module")
def dense_logits(dense) -> torch.Tensor:
    return _logits(dense)


def _logits(folder: Path) -> torch.Tensor:
    return LLM(folder, dtype="float32", kv_cache_memory=8 << 20).logits(IDS)


def _variant(src: Path, dst: Path, edit: Callable[[Tensors], Tensors]) -> Path:
    """A copy of `src` whose tensors are re-saved through `edit`."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _rules(monkeypatch, **rules) -> None:
    monkeypatch.setattr(Qwen3ForCausalLM, "checkpoint_rules", CheckpointRules(**rules))


def _language_model_prefix(tensors: Tensors) -> Tensors:
    """VL / Qwen3.5 layout: the text model under `model.language_model.`, the head where it was."""
    return {("model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k): v
            for k, v in tensors.items()}


def test_language_model_prefix_loads_identically(dense, dense_logits, tmp_path, monkeypatch):
    folder = _variant(dense, tmp_path / "vl", _language_model_prefix)
    with pytest.raises(CheckpointError, match=r"does not use: model\.language_model\."):
        _logits(folder)
    _rules(monkeypatch, renames=(("model.language_model.", "model."),), ignore=QWEN3_IGNORES)
    assert torch.equal(_logits(folder), dense_logits)


def test_renamed_tensors_that_collide_are_named(dense, tmp_path, monkeypatch):
    def both(tensors: Tensors) -> Tensors:
        return {**tensors, "model.language_model.norm.weight": tensors["model.norm.weight"].clone()}

    folder = _variant(dense, tmp_path / "both", both)
    _rules(monkeypatch, renames=(("model.language_model.", "model."),))
    with pytest.raises(CheckpointError, match=r"tensor model\.(language_model\.)?norm\.weight is stored twice"):
        _logits(folder)


def test_zero_centred_norms_are_transformed(dense, dense_logits, tmp_path, monkeypatch):
    """Stored as `w - 1` (Qwen3-Next's norms), applied as `1 + w`."""
    def centred(tensors: Tensors) -> Tensors:
        return {k: v - 1 if k.endswith("norm.weight") else v for k, v in tensors.items()}

    folder = _variant(dense, tmp_path / "centred", centred)
    assert (_logits(folder) - dense_logits).abs().max() > 1  # read as stored, the norms are wrong
    _rules(monkeypatch, ignore=QWEN3_IGNORES, transforms=(("*norm.weight", lambda w: w + 1),))
    torch.testing.assert_close(_logits(folder), dense_logits, rtol=1e-5, atol=1e-5)


def _with_mtp(tensors: Tensors) -> Tensors:
    gen = torch.Generator().manual_seed(5)
    return {**tensors, "mtp.fc.weight": torch.randn(64, 128, generator=gen),
            "mtp.layers.0.input_layernorm.weight": torch.randn(64, generator=gen)}


def test_mtp_tensors_are_dropped_only_where_the_rules_say_so(dense, dense_logits, tmp_path, monkeypatch):
    folder = _variant(dense, tmp_path / "mtp", _with_mtp)
    _rules(monkeypatch, ignore=tuple(p for p in QWEN3_IGNORES if p != "mtp.*"))
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) the model does not use: mtp\.fc\.weight"):
        _logits(folder)
    _rules(monkeypatch, ignore=QWEN3_IGNORES)  # Qwen3's own: a head loads only when asked for
    assert torch.equal(_logits(folder), dense_logits)


def test_rotary_buffers_are_ignored_per_model(dense, dense_logits, tmp_path, monkeypatch):
    """Qwen3 and Qwen3-MoE skip serialised `inv_freq` buffers; a model without that rule refuses them."""
    def with_inv_freq(tensors: Tensors) -> Tensors:
        inv_freq = torch.rand(12)
        return {**tensors, "model.rotary_emb.inv_freq": inv_freq,
                "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq.clone()}

    folder = _variant(dense, tmp_path / "inv_freq", with_inv_freq)
    assert torch.equal(_logits(folder), dense_logits)
    assert Qwen3MoeForCausalLM.checkpoint_rules.ignored("model.layers.3.self_attn.rotary_emb.inv_freq")
    _rules(monkeypatch)
    with pytest.raises(CheckpointError, match=r"does not use: .*rotary_emb\.inv_freq"):
        _logits(folder)


# ------------------------------------------------------------------------- tensor-parallel slices
class _RankParams(nn.Module):
    """What one of `world` ranks holds: a column-split, a row-split and a replicated parameter."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.col = nn.Parameter(torch.empty(8 // world, 6))
        self.row = nn.Parameter(torch.empty(8, 6 // world))
        self.norm = nn.Parameter(torch.empty(6))

    def weight_targets(self, parent: str, own: str):
        for name, part in (("col", split(0)), ("row", split(1)), ("norm", replicated)):
            yield WeightTarget(f"{own}.{name}", f"{own}.{name}", "", lambda p: p, rank_slice=part)


def _rank_model(world: int) -> nn.Module:
    model = nn.Module()
    model.proj = _RankParams(world)
    return model


@pytest.fixture
def full(tmp_path) -> Tensors:
    gen = torch.Generator().manual_seed(7)
    tensors = {name: torch.randn(shape, generator=gen)
               for name, shape in (("proj.col", (8, 6)), ("proj.row", (8, 6)), ("proj.norm", (6,)))}
    save_file(tensors, tmp_path / "model.safetensors")
    return tensors


def test_each_rank_loads_its_part_of_the_checkpoint_tensor(full, tmp_path):
    ranks = []
    for r in range(2):
        model = _rank_model(2)
        load_weights(model, tmp_path, torch.float32, False, Rank(r, 2))
        assert torch.equal(model.proj.col, full["proj.col"].narrow(0, 4 * r, 4))
        assert torch.equal(model.proj.row, full["proj.row"].narrow(1, 3 * r, 3))
        assert torch.equal(model.proj.norm, full["proj.norm"])
        ranks.append(model.proj)
    assert torch.equal(torch.cat([p.col for p in ranks]), full["proj.col"])
    assert torch.equal(torch.cat([p.row for p in ranks], dim=1), full["proj.row"])


def test_a_single_rank_loads_whole_tensors(full, tmp_path):
    model = _rank_model(1)
    load_weights(model, tmp_path, torch.float32, False)
    for name, tensor in full.items():
        assert torch.equal(model.get_parameter(name), tensor)


def test_a_tensor_that_does_not_split_evenly_is_named(full, tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor proj\.col: dimension 0 of size 8 does not split into 3"):
        load_weights(_rank_model(3), tmp_path, torch.float32, False, Rank(1, 3))
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        Rank(2, 2)
