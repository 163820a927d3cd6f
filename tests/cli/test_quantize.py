"""`qwenrun quantize`: a checkpoint in qwenrun's own format loads, mapped from its files, into the same
modules with the same bytes (so the same logits) as quantizing its source at load — dense tied and
untied, MoE experts, a hybrid model with its MTP head, int8 and int4, one file and sharded — and the
CLI writes it with the source's tokenizer files, `info` describes it, bad uses fail with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenrun.cli.quantize import quantize
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import load_model, open_checkpoint
from qwenrun.quant import Quantization
from qwenrun.quant.linear import QuantizedExperts, QuantizedLinear
from tiny import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from test_mtp import add_mtp_head  # noqa: E402

CPU = torch.device("cpu")
IDS = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(11))
SIZES = dict(hidden_size=128, intermediate_size=256, head_dim=32)  # input sizes that take int4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize-src")
    made = {
        "dense-tied": make_checkpoint("dense-tied-mha", root / "tied", **SIZES)[0],
        "dense-untied": make_checkpoint("dense-untied-gqa2", root / "untied", **SIZES)[0],
        "moe": make_checkpoint("moe-norm-topk", root / "moe", **SIZES, moe_intermediate_size=128)[0],
    }
    made["hybrid-mtp"], ref = make_checkpoint("next-interval4-moe", root / "hybrid", hidden_size=128)
    add_mtp_head(made["hybrid-mtp"], ref)
    (made["dense-tied"] / "chat_template.jinja").write_text("{{ messages }}")
    return made


def _logits(model):
    with torch.no_grad():
        return model.compute_logits(model(ForwardBatch.without_cache(IDS, torch.arange(len(IDS)), [len(IDS)])))


def _stored(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


CASES = [  # (source, method, group, quantize_lm_head, dtype, mtp, shard bytes)
    ("dense-tied", "int4", 64, True, torch.float32, False, None),
    ("dense-tied", "int8", 128, False, torch.bfloat16, False, None),
    ("dense-untied", "int4", 128, True, torch.bfloat16, False, 60_000),
    ("moe", "int4", 128, True, torch.bfloat16, False, 100_000),
    ("moe", "int8", 128, True, torch.float32, False, None),
    ("hybrid-mtp", "int4", 32, True, torch.float32, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-g{c[2]}-head{c[3]}-{str(c[4])[6:]}"
                                                      f"{'-mtp' if c[5] else ''}{'-sharded' if c[6] else ''}")
def test_round_trip_is_quantize_at_load(sources, tmp_path, case):
    name, method, group, head, dtype, mtp, shard = case
    out = tmp_path / "q"
    files = quantize(str(sources[name]), out, method, group, head, str(dtype)[6:], max_shard_bytes=shard)
    assert (len(files) > 1) == (shard is not None)
    q = Quantization(method, group, head)
    at_load = load_model(open_checkpoint(sources[name]), dtype, CPU, mtp=mtp, quantization=q)
    loaded = load_model(open_checkpoint(out), dtype, CPU, mtp=mtp)
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in at_load.named_modules()}
    a, b = _stored(loaded), _stored(at_load)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert torch.equal(_logits(loaded), _logits(at_load))
    formats = {m.format for m in loaded.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    assert method in formats and isinstance(loaded.lm_head, QuantizedLinear) == head
    if mtp:
        assert isinstance(loaded.mtp.fc, QuantizedLinear)
        assert not load_model(open_checkpoint(out), dtype, CPU).__dict__.get("mtp")  # head skipped unless asked


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (/proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_loads_mapped_from_its_files(sources, tmp_path):
    """The loaded tensors are the file's pages, not copies (full-precision ones too, when the model
    dtype is the stored one)."""
    out = tmp_path / "q"
    quantize(str(sources["dense-untied"]), out, "int4")
    model = load_model(open_checkpoint(out), torch.float32, CPU)
    ranges = _mapped_ranges(out / "model.safetensors")
    for name, t in _stored(model).items():
        assert any(a <= t.data_ptr() < b for a, b in ranges), f"{name} is not in the file's mapping"


def test_cli_writes_the_folder_and_info_describes_it(sources, tmp_path):
    out = tmp_path / "q4"
    run = lambda *a: subprocess.run([sys.executable, "-m", "qwenrun", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    proc = run("quantize", sources["dense-tied"], "--to", "int4", "--group-size", "64", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "int4" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "qwenrun", "format_version": 1, "method": "int4",
                                             "group_size": 64, "quantize_lm_head": True, "dtype": "float32"}
    for f in ("generation_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (sources["dense-tied"] / f).read_bytes()
    info = json.loads(run("info", out, "--json").stdout)
    assert info["quantization"]["format"] == "qwenrun int4, group 64, from float32"
    assert info["quantization"]["weight_file_bytes"] == (out / "model.safetensors").stat().st_size
    assert "qwenrun int4, group 64, from float32" in run("info", out).stdout
    again = run("quantize", sources["dense-tied"], "--to", "int8", out)  # out is not empty
    assert again.returncode == 1 and "already exists" in again.stderr


def test_refused_uses(sources, tmp_path):
    out = tmp_path / "q"
    quantize(str(sources["dense-untied"]), out, "int8")
    with pytest.raises(InvalidRequestError, match="already quantized as int8"):
        load_model(open_checkpoint(out), torch.float32, CPU, quantization=Quantization("int4"))
    with pytest.raises(InvalidRequestError, match="quantize_lm_head=True") as e:
        load_model(open_checkpoint(out), torch.float32, CPU, quantization=Quantization("int8", quantize_lm_head=False))
    assert e.value.param == "quantize_lm_head"
    load_model(open_checkpoint(out), torch.float32, CPU, quantization=Quantization("int8"))  # what it holds: fine
    out4 = tmp_path / "q4"
    quantize(str(sources["dense-untied"]), out4, "int4", group_size=64)
    with pytest.raises(InvalidRequestError, match="group size 64") as e:
        load_model(open_checkpoint(out4), torch.float32, CPU, quantization=Quantization("int4", 128))
    assert e.value.param == "quant_group_size"
    load_model(open_checkpoint(out4), torch.float32, CPU, quantization=Quantization("int4", 64))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidRequestError, match="format_version 99") as e:
        load_model(open_checkpoint(out), torch.float32, CPU)
    assert e.value.param == "quantization_config.format_version"


def test_llm_runs_it_in_the_dtype_it_was_quantized_from(sources, tmp_path):
    """`LLM(out)` with dtype auto: the source is fp32, the checkpoint quantized from bf16 loads in bf16
    and decodes the tokens of quantizing the source at load in bf16."""
    from qwenrun import LLM, SamplingParams

    quantize(str(sources["moe"]), tmp_path / "q", "int4", dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=16)
    ours = LLM(tmp_path / "q", device="cpu", kv_cache_memory=8 << 20)
    assert ours.dtype == torch.bfloat16
    at_load = LLM(sources["moe"], dtype="bfloat16", device="cpu", quantization="int4", kv_cache_memory=8 << 20)
    prompt = [[1, 2, 3, 4, 5]]
    assert ours.generate(prompt, params)[0].outputs[0].token_ids == at_load.generate(prompt, params)[0].outputs[0].token_ids
