"""Rung (a) for Qwen3-Next (Qwen3NextForCausalLM): see smoke.py for what is checked."""

import pytest

from smoke import run_all


@pytest.mark.parametrize("name", ["next-interval4-moe", "next-interval2-mlponly-tied-bias",
                                  "next-layertypes-dense-ratio4"])
def test_smoke(name, tmp_path):
    run_all(name, tmp_path, bf16_tol=None)  # bf16: test_parity_hybrid.py, against transformers' bf16
