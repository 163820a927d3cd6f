"""Hybrid checkpoints that disagree with their config.json fail with one line naming the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun.errors import CheckpointError
from qwenrun.loading.loader import load_model, open_checkpoint
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder, _ = make_checkpoint("next-interval4-moe", tmp_path_factory.mktemp("good"))
    return folder


def _variant(good, tmp_path, config=None, drop=()):
    dest = tmp_path / "bad"
    dest.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = {k: v for k, v in load_file(good / "model.safetensors").items() if k not in drop}
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(open_checkpoint(folder), torch.float32, torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_layer_types_disagreeing_with_the_weights(good, tmp_path):
    types = ["full_attention", "linear_attention", "linear_attention", "full_attention"]  # layer 0 stored as GDN
    message = _error(_variant(good, tmp_path, {"layer_types": types}))
    assert "does not use" in message and "model.layers.0.linear_attn." in message


@pytest.mark.parametrize("tensor", ["A_log", "dt_bias"])
def test_missing_gdn_parameter(good, tmp_path, tensor):
    message = _error(_variant(good, tmp_path, drop=(f"model.layers.1.linear_attn.{tensor}",)))
    assert f"missing 1 tensor(s): model.layers.1.linear_attn.{tensor}" in message


def test_conv_kernel_mismatch(good, tmp_path):
    message = _error(_variant(good, tmp_path, {"linear_conv_kernel_dim": 3}))
    assert "tensor model.layers.0.linear_attn.conv1d.weight has shape" in message
    assert "expects [160, 1, 3]" in message  # conv_dim 2·2·16 + 4·24


def test_the_good_checkpoint_loads(good, tmp_path):
    shutil.copytree(good, tmp_path / "copy")
    load_model(open_checkpoint(tmp_path / "copy"), torch.float32, torch.device("cpu"))
