"""Rung (a) for Qwen3.5-MoE (Qwen3_5MoeForCausalLM): see smoke.py for what is checked."""

import pytest

from smoke import run_all


@pytest.mark.parametrize("name", ["qwen3_5_moe-interval2", "qwen3_5_moe-tied-ratio1"])
def test_smoke(name, tmp_path):
    run_all(name, tmp_path, bf16_tol=None)  # bf16: test_parity_hybrid.py, against transformers' bf16
