"""Rung (a) for Qwen3-MoE (Qwen3MoeForCausalLM): see smoke.py for what is checked."""

import pytest

from smoke import run_all


@pytest.mark.parametrize("name", ["moe-norm-topk", "moe-raw-topk-sparse2-mlponly"])
def test_smoke(name, tmp_path):
    run_all(name, tmp_path)
