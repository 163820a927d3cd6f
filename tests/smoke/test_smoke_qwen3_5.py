"""Rung (a) for Qwen3.5 dense (Qwen3_5ForCausalLM): see smoke.py for what is checked."""

import pytest

from smoke import run_all


@pytest.mark.parametrize("name", ["qwen3_5-interval4", "qwen3_5-layertypes-tied-bias-ratio1"])
def test_smoke(name, tmp_path):
    run_all(name, tmp_path, bf16_tol=None)  # bf16: test_parity_hybrid.py, against transformers' bf16
