"""Rung (a) for dense Qwen3 (Qwen3ForCausalLM): see smoke.py for what is checked."""

import pytest

from smoke import run_all


@pytest.mark.parametrize("name", ["dense-tied-mha", "dense-gqa4-yarn"])
def test_smoke(name, tmp_path):
    run_all(name, tmp_path)
