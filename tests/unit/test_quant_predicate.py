"""Per-model quantization predicates: which layers `quantize_model` leaves in the model dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenrun import LLM
from qwenrun.layers.linear import MergedLinear
from qwenrun.quant import quantize_model
from qwenrun.quant.linear import QuantizedExperts, QuantizedLinear
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder, _ = make_checkpoint("moe-raw-topk-sparse2-mlponly", tmp_path_factory.mktemp("qp"))
    return folder


def test_moe_routers_stay_in_the_model_dtype(moe_folder):
    plain = LLM(moe_folder, dtype="float32", kv_cache_memory=8 << 20)
    quant = LLM(moe_folder, dtype="float32", kv_cache_memory=8 << 20, quantization="int8")
    modules = dict(quant.model.named_modules())
    routers = [name for name in modules if name.endswith("mlp.gate")]
    assert routers == ["model.layers.1.mlp.gate", "model.layers.3.mlp.gate"]  # sparse step 2, layer 2 dense
    for name in routers:
        assert type(modules[name]) is nn.Linear
        assert torch.equal(modules[name].weight, plain.model.get_submodule(name).weight)
    left = {n for n, m in modules.items() if isinstance(m, (nn.Linear, MergedLinear))}
    assert left == set(routers)  # everything else is quantized, dense MLP layers included
    assert sum(isinstance(m, QuantizedExperts) for m in modules.values()) == 2
    assert isinstance(modules["model.layers.2.mlp.down_proj"], QuantizedLinear)


def test_without_a_predicate_every_linear_is_quantized():
    model = nn.Sequential(nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 128))
    quantize_model(model, "int8", quantize_lm_head=False)
    assert all(isinstance(model[i], QuantizedLinear) for i in (0, 2))


def test_the_predicate_sees_full_paths():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.ModuleDict({"keep": nn.Linear(128, 32), "quant": nn.Linear(128, 32)})
            self.seen: list[str] = []

        def quant_predicate(self, path: str, module: nn.Module) -> bool:
            self.seen.append(path)
            return path != "block.keep"

    net = Net()
    quantize_model(net, "int8", quantize_lm_head=False)
    assert type(net.block["keep"]) is nn.Linear and isinstance(net.block["quant"], QuantizedLinear)
    assert {"block", "block.keep", "block.quant"} <= set(net.seen)
