"""Bad checkpoints and bad arguments fail with a QwenrunError that names the culprit and says what to do.

Every test builds a tiny random checkpoint with transformers, damages one thing, and checks the error
class and the message. A few positive tests pin down the cases that must *not* fail (tied embeddings
stored twice, sharded checkpoints).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from qwenrun.config import ModelConfig, RopeConfig
from qwenrun.errors import CheckpointError, InvalidRequestError, QwenrunError, UnsupportedModelError
from qwenrun.llm import LLM
from qwenrun.loading.source import resolve_model_path

TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)
TINY_MOE = dict(TINY, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
IDS = [1, 5, 9, 17, 33, 65, 127, 0, 3]


# ------------------------------------------------------------------------------------------ fixtures
def _save(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def dense_src(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, tie_word_embeddings=False))
    return _save(model, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory, dense_src) -> Path:
    """The same weights as `dense_src`, saved in several shards with an index JSON."""
    model = transformers.Qwen3ForCausalLM.from_pretrained(dense_src, dtype=torch.float32)
    folder = _save(model, tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) >= 2
    return folder


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, tie_word_embeddings=True))
    return _save(model, tmp_path_factory.mktemp("tied"))


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TINY_MOE))
    return _save(model, tmp_path_factory.mktemp("moe"))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def dense(dense_src, tmp_path) -> Path:
    return _copy(dense_src, tmp_path)


@pytest.fixture
def sharded(sharded_src, tmp_path) -> Path:
    return _copy(sharded_src, tmp_path)


@pytest.fixture
def moe(moe_src, tmp_path) -> Path:
    return _copy(moe_src, tmp_path)


def load(path, **kwargs) -> LLM:
    kwargs = {"dtype": "float32", "device": "cpu", "max_model_len": 64, "kv_cache_memory": 1 << 20, **kwargs}
    return LLM(path, **kwargs)


def edit_config(folder: Path, **changes) -> None:
    """Set (or with value None, delete) top-level fields of config.json."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensors(file: Path, drop: tuple[str, ...] = (), put: dict[str, torch.Tensor] | None = None) -> None:
    tensors = load_file(file)
    for name in drop:
        assert name in tensors, name
        del tensors[name]
    tensors.update(put or {})
    save_file(tensors, file, metadata={"format": "pt"})


def raises(cls, path, **kwargs) -> str:
    with pytest.raises(cls) as info:
        load(path, **kwargs)
    assert isinstance(info.value, QwenrunError)
    return str(info.value)


# ------------------------------------------------------------------------------------ where is it?
def test_folder_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "Qwen3-0.6B"
    msg = raises(CheckpointError, missing)
    assert str(missing) in msg and "does not exist" in msg


def test_path_is_a_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    msg = raises(CheckpointError, file)
    assert str(file) in msg and "is a file" in msg and "folder that holds config.json" in msg


@pytest.mark.parametrize("text", ["./relative/missing", "a/b/c", "no-slash-model"])
def test_not_a_hub_id(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = raises(CheckpointError, text)
    assert repr(text) in msg and "does not exist" in msg and "hub id like 'Qwen/Qwen3-0.6B'" in msg


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection in offline mode")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hub_id_offline_with_empty_cache(tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into `constants` once, at import; since it is
    already imported here, set both the environment and the constants it was read into."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    _no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)  # so "Qwen/Qwen3-0.6B" is not a local folder by accident
    start = time.monotonic()
    msg = raises(CheckpointError, "Qwen/Qwen3-0.6B")
    assert time.monotonic() - start < 5
    assert "Qwen/Qwen3-0.6B" in msg and "not in the local hub cache" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_id_offline_fresh_process(tmp_path):
    """The same through the real environment variables, read at import as in a user's shell."""
    home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    code = (
        "from qwenrun.errors import CheckpointError\n"
        "from qwenrun.loading.source import resolve_model_path\n"
        "try:\n    resolve_model_path('Qwen/Qwen3-0.6B')\n"
        "except CheckpointError as e:\n    print('CheckpointError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CheckpointError: Qwen/Qwen3-0.6B is not in the local hub cache"), out.stdout


def test_local_folder_wins_over_hub_id(dense, monkeypatch):
    """An existing relative folder named like a hub id is used as is (no hub look-up)."""
    org = dense.parent / "Qwen"
    org.mkdir()
    shutil.move(dense, org / "Qwen3-0.6B")
    monkeypatch.chdir(dense.parent)
    _no_network(monkeypatch)
    assert resolve_model_path("Qwen/Qwen3-0.6B") == Path("Qwen/Qwen3-0.6B")


# ------------------------------------------------------------------------------------- config.json
def test_config_json_missing(dense):
    (dense / "config.json").unlink()
    msg = raises(CheckpointError, dense)
    assert "config.json not found" in msg and str(dense) in msg


def test_config_json_not_json(dense):
    (dense / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"],')
    msg = raises(CheckpointError, dense)
    assert str(dense / "config.json") in msg and "is not valid JSON" in msg


def test_config_json_not_an_object(dense):
    (dense / "config.json").write_text("[1, 2]")
    msg = raises(CheckpointError, dense)
    assert str(dense / "config.json") in msg and "JSON object" in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers"])
def test_config_missing_required_field(dense, field):
    edit_config(dense, **{field: None})
    msg = raises(CheckpointError, dense)
    assert f"config.json is missing required field {field!r}" in msg


def test_config_moe_missing_required_field(moe):
    edit_config(moe, moe_intermediate_size=None)
    msg = raises(CheckpointError, moe)
    assert "config.json is missing required field 'moe_intermediate_size'" in msg


def test_config_without_architectures(dense):
    edit_config(dense, architectures=None)
    msg = raises(CheckpointError, dense)
    assert "config.json" in msg and "'architectures'" in msg


def test_unknown_architecture(dense, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read although the architecture is unsupported")

    monkeypatch.setattr("qwenrun.llm.load_model", no_weights)
    edit_config(dense, architectures=["LlamaForCausalLM"])
    msg = raises(UnsupportedModelError, dense)
    assert "'LlamaForCausalLM' is not supported" in msg
    assert "Qwen3ForCausalLM" in msg and "Qwen3MoeForCausalLM" in msg


def test_unsupported_rope_type(dense):
    edit_config(dense, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0})
    msg = raises(CheckpointError, dense)
    assert "rope type 'longrope' is not supported" in msg and "'yarn'" in msg


def test_unsupported_rope_type_v4_spelling(dense):
    edit_config(dense, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    msg = raises(CheckpointError, dense)
    assert "rope type 'dynamic' is not supported" in msg


def test_heads_not_a_multiple_of_kv_heads(dense):
    edit_config(dense, num_key_value_heads=3)
    msg = raises(CheckpointError, dense)
    assert "num_attention_heads (4) must be a multiple of num_key_value_heads (3)" in msg


# ------------------------------------------------------------------------------------ weight files
def test_no_weights(dense):
    (dense / "model.safetensors").unlink()
    msg = raises(CheckpointError, dense)
    assert "no *.safetensors weights found" in msg and str(dense) in msg


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pth"])
def test_pickle_only_is_refused_without_unpickling(dense, name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    (dense / "model.safetensors").unlink()
    (dense / name).write_bytes(b"\x80\x04 not really a pickle; must never be opened")
    msg = raises(CheckpointError, dense)
    assert name in msg and "never loads pickles" in msg and "Convert to safetensors" in msg
    assert "save_pretrained" in msg


def test_truncated_safetensors(dense):
    file = dense / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    msg = raises(CheckpointError, dense)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg and "download it again" in msg


def test_truncated_header(dense):
    file = dense / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    msg = raises(CheckpointError, dense)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file at all" * 10, bytes(range(256)) * 4])
def test_garbage_safetensors(dense, content):
    (dense / "model.safetensors").write_bytes(content)
    msg = raises(CheckpointError, dense)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg


def test_corrupt_shard_is_named(sharded):
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.write_bytes(b"garbage" * 20)
    msg = raises(CheckpointError, sharded)
    assert shard.name in msg and "corrupt or truncated" in msg


def test_sharded_missing_shard(sharded):
    shard = sorted(sharded.glob("*.safetensors"))[1]
    shard.unlink()
    msg = raises(CheckpointError, sharded)
    assert shard.name in msg and "model.safetensors.index.json" in msg and "missing" in msg
    assert "fetch them again" in msg


def test_index_without_weight_map(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    msg = raises(CheckpointError, sharded)
    assert "model.safetensors.index.json" in msg and "'weight_map'" in msg


@pytest.mark.parametrize("weight_map", [{}, [], {"model.norm.weight": 3}])
def test_index_with_malformed_weight_map(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = raises(CheckpointError, sharded)
    assert "model.safetensors.index.json" in msg and "'weight_map'" in msg and "shard file name" in msg


def test_index_not_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{")
    msg = raises(CheckpointError, sharded)
    assert "model.safetensors.index.json" in msg and "not valid JSON" in msg


# ----------------------------------------------------------------------------------------- tensors
def test_missing_tensor(dense):
    edit_tensors(dense / "model.safetensors", drop=("model.layers.1.mlp.down_proj.weight",))
    msg = raises(CheckpointError, dense)
    assert "missing 1 tensor(s): model.layers.1.mlp.down_proj.weight" in msg
    assert "incomplete download, or config.json does not match the weights" in msg


def test_missing_tensor_in_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    edit_tensors(sharded / index["weight_map"][name], drop=(name,))
    msg = raises(CheckpointError, sharded)
    assert f"missing 1 tensor(s): {name}" in msg


def test_many_missing_tensors_are_abbreviated(dense):
    tensors = load_file(dense / "model.safetensors")
    dropped = [n for n in tensors if n.startswith("model.layers.")]
    edit_tensors(dense / "model.safetensors", drop=tuple(dropped))
    msg = raises(CheckpointError, dense)
    assert f"missing {len(dropped)} tensor(s)" in msg and "more)" in msg


def test_unexpected_tensor(dense):
    edit_tensors(dense / "model.safetensors", put={"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    msg = raises(CheckpointError, dense)
    assert "model.layers.0.mlp.extra_proj.weight" in msg and "does not use" in msg


def test_misshaped_tensor(dense):
    name = "model.layers.0.self_attn.o_proj.weight"
    edit_tensors(dense / "model.safetensors", put={name: torch.zeros(32, 16)})
    msg = raises(CheckpointError, dense)
    assert f"tensor {name} has shape [32, 16] but the model expects [32, 32]" in msg
    assert "config.json does not match the weights" in msg


def test_config_disagrees_with_weights(dense):
    edit_config(dense, intermediate_size=48)
    msg = raises(CheckpointError, dense)
    assert "tensor model.layers.0.mlp.down_proj.weight has shape [32, 64] but the model expects [32, 48]" in msg
    assert "config.json does not match the weights" in msg


def test_missing_k_proj_of_merged_qkv(dense):
    edit_tensors(dense / "model.safetensors", drop=("model.layers.1.self_attn.k_proj.weight",))
    msg = raises(CheckpointError, dense)
    assert "missing 1 tensor(s): model.layers.1.self_attn.k_proj.weight" in msg


def test_misshaped_v_proj_of_merged_qkv(dense):
    name = "model.layers.0.self_attn.v_proj.weight"
    edit_tensors(dense / "model.safetensors", put={name: torch.zeros(32, 32)})
    msg = raises(CheckpointError, dense)
    assert f"tensor {name} has shape [32, 32] but the model expects [16, 32]" in msg


def test_duplicate_tensor_across_shards(sharded):
    """The same tensor stored in two shards is reported, not silently overwritten."""
    shards = sorted(sharded.glob("*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(s for s in shards if s.name != index["weight_map"][name])
    edit_tensors(other, put={name: torch.ones(32)})
    msg = raises(CheckpointError, sharded)
    assert f"tensor {name} is stored twice" in msg and "already loaded" in msg


def test_moe_missing_expert_up_proj(moe):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    edit_tensors(moe / "model.safetensors", drop=(name,))
    msg = raises(CheckpointError, moe)
    assert f"missing 1 tensor(s): {name}" in msg


def test_moe_misshaped_expert(moe):
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    edit_tensors(moe / "model.safetensors", put={name: torch.zeros(32, 8)})
    msg = raises(CheckpointError, moe)
    assert f"tensor {name} has shape [32, 8] but the model expects [32, 16]" in msg


# ---------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("dtype", ["int3", "float8", "BF16"])
def test_bad_dtype(dense, dtype, monkeypatch):
    monkeypatch.setattr("qwenrun.llm.load_model", lambda *a, **k: pytest.fail("weights loaded before dtype check"))
    msg = raises(InvalidRequestError, dense, dtype=dtype)
    assert f"unknown dtype {dtype!r}" in msg and "auto, bfloat16, float16 or float32" in msg


# ------------------------------------------------------------------------------------ loads fine
def test_tied_checkpoint_with_stored_lm_head_loads(tied_src, tmp_path):
    plain = _copy(tied_src, tmp_path / "a")
    both = _copy(tied_src, tmp_path / "b")
    file = both / "model.safetensors"
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors
    edit_tensors(file, put={"lm_head.weight": tensors["model.embed_tokens.weight"].clone()})
    expected = load(plain).logits(IDS)
    got = load(both).logits(IDS)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tied_src, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ rope spellings
BASE = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **TINY, "max_position_embeddings": 131072}


def test_rope_v4_and_v5_spellings_agree():
    v4 = ModelConfig.from_hf({
        **BASE, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    })
    v5 = ModelConfig.from_hf({
        **BASE, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768,
        },
    })
    assert v4.rope == v5.rope
    assert v4.rope.rope_type == "yarn" and v4.rope.theta == 1e6 and v4.rope.factor == 4.0
    assert v4.rope.original_max_position_embeddings == 32768


def test_rope_default_spellings_agree():
    v4 = ModelConfig.from_hf({**BASE, "rope_theta": 1000000.0})
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}})
    assert v4.rope == v5.rope == RopeConfig(theta=1e6)


def test_yarn_without_factor_derives_it():
    cfg = ModelConfig.from_hf({
        **BASE,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "original_max_position_embeddings": 32768},
    })
    assert cfg.rope.factor == 131072 / 32768 == 4.0
