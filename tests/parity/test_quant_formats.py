"""Qwen's quantized checkpoint formats (FP8 block-wise, AWQ GEMM, GPTQ), written here from their specs
by quantizing a tiny random model's weights, read by qwenrun and compared with transformers running
the same weights dequantized.

The writers below follow the formats as their producers lay them out (AutoAWQ's GEMM packing with its
0 2 4 6 1 3 5 7 nibble order, AutoGPTQ's qweight packed along the inputs with zero points stored minus
one, Qwen's/DeepSeek's e4m3 weights with a `weight_scale_inv` per 128 x 128 block), independently of
qwenrun's reader. AWQ and GPTQ map onto qwenrun's int4 without loss, so besides logits the tests check
that the int4 layers dequantize to exactly the reference weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenrun import kernels
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import load_model, open_checkpoint
from qwenrun.quant import Quantization, formats
from qwenrun.quant.linear import Int4Linear, QuantizedExperts, QuantizedLinear, expand
from tiny import make_checkpoint

CPU = torch.device("cpu")
IDS = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(5))
LOGITS_TOL = 1e-4  # of the largest reference logit, as tests/parity/test_parity.py
SIZES = dict(hidden_size=128, intermediate_size=256, head_dim=32)
# the linears Qwen's AWQ/GPTQ/FP8 checkpoints store quantized (attention, MLP and expert projections;
# never the embedding, LM head, norms or MoE router)
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|linear_attn\.(in_proj_qkvz|in_proj_ba|out_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_expert\.)?(gate|up|down)_proj)\.weight")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column 8c + AWQ_ORDER[i]


def _groups_asym(w: torch.Tensor, g: int):
    """Per row and group of g inputs: codes q [N, K], zero points z [N, K/g] (0..15), fp16 scales s."""
    N, K = w.shape
    wg = w.reshape(N, K // g, g)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-5).half().float()
    z = torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
    return q.reshape(N, K).int(), z.int(), s


def _groups_sym(w: torch.Tensor, g: int):
    """GPTQ sym: zero point 8, scale max|w| / 7.5 per group."""
    N, K = w.shape
    wg = w.reshape(N, K // g, g)
    s = (wg.abs().amax(-1) / 7.5).clamp(min=1e-5).half().float()
    q = torch.clamp(torch.round(wg / s[..., None]) + 8, 0, 15)
    return q.reshape(N, K).int(), torch.full_like(s, 8).int(), s


def _pack(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int [..., 8M] (0..15) -> int32 [..., M]: value 8c + order[i] in nibble i of word c."""
    v = values.reshape(*values.shape[:-1], -1, 8).long()
    word = torch.zeros(v.shape[:-1], dtype=torch.long)
    for i, col in enumerate(order):
        word |= v[..., col] << (4 * i)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement of the 32-bit word


def awq_tensors(w: torch.Tensor, g: int):
    q, z, s = _groups_asym(w, g)
    return ({"qweight": _pack(q.t(), AWQ_ORDER), "qzeros": _pack(z.t(), AWQ_ORDER), "scales": s.t().half()},
            (q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1))


def gptq_tensors(w: torch.Tensor, g: int, sym: bool, act_order: bool, v1: bool = True):
    N, K = w.shape
    if act_order:  # desc_act: inputs visited in a permuted order, groups of g over that order
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(K + N))
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // g
        wp = w[:, perm]  # quantize in visiting order, then put the codes back in place
        q, z, s = (_groups_sym if sym else _groups_asym)(wp, g)
        q = q[:, torch.argsort(perm)]
    else:
        g_idx = torch.arange(K, dtype=torch.int32) // g
        q, z, s = (_groups_sym if sym else _groups_asym)(w, g)
    dense = (q - z[:, g_idx.long()]) * s[:, g_idx.long()]
    stored_z = z - 1 if v1 else z  # AutoGPTQ's checkpoint format stores z - 1
    words = _pack(q.t().reshape(K // 8, 8, N).permute(0, 2, 1)).reshape(K // 8, N)  # input 8i + j in nibble j
    return {"qweight": words, "qzeros": _pack(stored_z.t()), "scales": s.t().half(), "g_idx": g_idx}, dense


def fp8_tensors(w: torch.Tensor, block=(128, 128)):
    N, K = w.shape
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    pad = torch.zeros(nb * bn, kb * bk)
    pad[:N, :K] = w
    amax = pad.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3))
    scale = (amax / 448).clamp(min=1e-8)
    per = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
    q = (w / per).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale}, q.float() * per


def write_quantized(source: Path, dest: Path, method: str, **kw) -> tuple[Path, dict[str, torch.Tensor]]:
    """`source` rewritten in `method`'s layout; returns (folder, the dequantized weights by name)."""
    dest.mkdir()
    for f in source.glob("*.json"):
        shutil.copy(f, dest / f.name)
    out, dense = {}, {}
    for name, w in load_file(source / "model.safetensors").items():
        if not QUANTIZED.fullmatch(name):
            out[name] = w
            continue
        base = name.removesuffix(".weight")
        if method == "awq":
            parts, dense[name] = awq_tensors(w, kw["group_size"])
        elif method == "gptq":
            g = w.shape[1] if kw["group_size"] == -1 else kw["group_size"]  # -1: one group per row
            parts, dense[name] = gptq_tensors(w, g, kw["sym"], kw["desc_act"], kw.get("format", "gptq") == "gptq")
        else:
            parts, dense[name] = fp8_tensors(w)
        for k, v in parts.items():
            out[f"{base}.{k}"] = v.contiguous()
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": kw.get("group_size"), "version": "gemm",
                "zero_point": True, "modules_to_not_convert": None},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": kw.get("group_size"), "sym": kw.get("sym"),
                 "desc_act": kw.get("desc_act"), "checkpoint_format": kw.get("format", "gptq"), "damp_percent": 0.01},
        "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }[method]
    (dest / "config.json").write_text(json.dumps(config))
    return dest, dense


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ForwardBatch.without_cache(IDS, torch.arange(len(IDS)), [len(IDS)])))


def _reference_logits(ref, dense: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers on the dequantized weights (per-expert names mapped onto its fused experts)."""
    state = ref.state_dict()
    for name, w in dense.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m is None or name in state:
            state[name] = w
            continue
        experts, e, which = m.group(1), int(m.group(2)), m.group(3)
        if which == "down":
            state[f"{experts}.down_proj"][e] = w
        else:
            I = w.shape[0]
            state[f"{experts}.gate_up_proj"][e, (0 if which == "gate" else I):][:I] = w
    ref.load_state_dict(state)
    with torch.no_grad():
        return ref(IDS[None]).logits[0]


@pytest.fixture(autouse=True)
def expanded_gemm(monkeypatch):
    """Every quantized matmul through the dequantized weight (no streaming GEMV): the GEMV kernels
    quantize activations too (tested against their references in tests/equivalence), which would
    hide here whether the weights are exactly the stored ones. MoE experts see a few rows each."""
    monkeypatch.setattr(kernels, "GEMV_MAX_ROWS", {"bf16": 0, "int8": 0, "int4": 0})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {
        "dense": make_checkpoint("dense-untied-gqa2", root / "dense", **SIZES),
        "moe": make_checkpoint("moe-norm-topk", root / "moe", **SIZES, moe_intermediate_size=128),
        "hybrid": make_checkpoint("next-interval4-moe", root / "hybrid", hidden_size=128, moe_intermediate_size=128,
                                  shared_expert_intermediate_size=128),
    }


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert (ours - theirs).abs().max().item() <= LOGITS_TOL * theirs.abs().max().item()


CASES = [  # (source, method, options, the layers' int4 group in qwenrun or None: dequantized)
    ("dense", "awq", dict(group_size=128), 128),
    ("dense", "awq", dict(group_size=64), 64),
    ("moe", "awq", dict(group_size=128), 128),
    ("dense", "gptq", dict(group_size=128, sym=True, desc_act=False), 128),
    ("moe", "gptq", dict(group_size=128, sym=True, desc_act=False), 128),
    ("dense", "gptq", dict(group_size=32, sym=False, desc_act=False), 32),
    ("dense", "gptq", dict(group_size=64, sym=True, desc_act=True), None),
    ("dense", "gptq", dict(group_size=-1, sym=False, desc_act=False, format="gptq_v2"), 128),
    ("dense", "fp8", {}, None),
    ("moe", "fp8", {}, None),
    ("hybrid", "fp8", {}, None),
    # out_proj (96 inputs) does not fit int4: dequantized; in_proj_qkvz/ba reordered by Next's rule, still int4
    ("hybrid", "awq", dict(group_size=32), 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[2].items()))
def test_matches_the_dequantized_reference(sources, tmp_path, case):
    name, method, options, group = case
    source, ref = sources[name]
    folder, dense = write_quantized(source, tmp_path / method, method, **options)
    model = load_model(open_checkpoint(folder), torch.float32, CPU)
    _close(_logits(model), _reference_logits(ref, dense))
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    if group is None:
        assert not linears and not experts  # dequantized to the model dtype
        return
    if name == "hybrid":
        assert all(isinstance(layer.linear_attn.in_proj, Int4Linear) for layer in model.model.layers
                   if hasattr(layer, "linear_attn"))
    assert linears and all(isinstance(m, Int4Linear) and m.group_size == group for m in linears)
    assert not isinstance(model.lm_head, QuantizedLinear)  # stored in full precision, kept so
    assert (name != "dense") == bool(experts) and all(m.format == "int4" for m in experts)
    # without loss: every int4 layer holds exactly the stored values, as qwenrun lays out the same
    # weights loaded dequantized (merged projections, Qwen3-Next's reordered rows, stacked experts)
    plain = {n: m for n, m in load_model(open_checkpoint(_dequantized(source, dense, tmp_path)), torch.float32,
                                         CPU).named_modules()}
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert torch.equal(expand("int4", m.parts, group, torch.float32), plain[path].weight), path
        elif isinstance(m, QuantizedExperts):
            for which in ("w13", "w2"):
                for e in range(m.num_experts):
                    got = expand("int4", [p[e] for p in m.parts(which)], group, torch.float32)
                    assert torch.equal(got, getattr(plain[path], which)[e]), f"{path}.{which}[{e}]"


def _dequantized(source: Path, dense: dict[str, torch.Tensor], root: Path) -> Path:
    """`source` with its quantized weights replaced by their dequantized values, as a plain checkpoint."""
    plain = root / "dequantized"
    plain.mkdir()
    for f in source.glob("*.json"):
        shutil.copy(f, plain / f.name)
    save_file({**load_file(source / "model.safetensors"), **dense}, plain / "model.safetensors")
    return plain


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_asked_quantization_requantizes_the_dequantized_weights(sources, tmp_path, method):
    """Loading with quantization= asks for qwenrun's int8: the same bytes as quantizing a checkpoint of
    the dequantized weights at load."""
    source, _ = sources["moe"]
    folder, dense = write_quantized(source, tmp_path / method, method, group_size=128)
    plain = _dequantized(source, dense, tmp_path)
    q = Quantization("int8")
    a = load_model(open_checkpoint(folder), torch.float32, CPU, quantization=q)
    b = load_model(open_checkpoint(plain), torch.float32, CPU, quantization=q)
    sa, sb = dict(a.state_dict()), dict(b.state_dict())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(isinstance(m, QuantizedExperts) for m in a.modules())


REFUSED = [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "quantization_config.version"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "quantization_config.zero_point"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "quantization_config.bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "quantization_config.checkpoint_format"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "quantization_config.activation_scheme"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quantization_config.weight_block_size"),
    ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method"),
]


@pytest.mark.parametrize("config,field", REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_variants_are_refused(sources, tmp_path, config, field):
    source, _ = sources["dense"]
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}))
    with pytest.raises(InvalidRequestError) as e:
        load_model(open_checkpoint(folder), torch.float32, CPU)
    assert e.value.param == field and field.split(".")[1] in str(e.value)


def test_info_names_the_format(sources, tmp_path):
    from qwenrun.cli.info import describe

    source, _ = sources["moe"]
    expected = {("awq", 128): "awq 4-bit, group 128 (runs as qwenrun int4)",
                ("fp8", None): "fp8 e4m3, 128x128 blocks (dequantized at load)"}
    for (method, group), text in expected.items():
        folder, _ = write_quantized(source, tmp_path / method, method, group_size=group)
        d = describe(str(folder), None)
        assert d["quantization"]["format"] == text
        assert d["weight_file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert describe(str(source), None)["quantization"] is None


@pytest.mark.parametrize("pack,unpack", [(tuple(range(8)), tuple(range(8))), (AWQ_ORDER, formats.AWQ_REVERSE_ORDER)],
                         ids=["gptq", "awq"])
def test_unpacking_in_row_blocks_gives_every_row(monkeypatch, pack, unpack):
    """A block that does not divide the rows, and one word per block: the last rows are not lost."""
    values = torch.randint(0, 16, (13, 48), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed = _pack(values, pack)
    assert torch.equal(formats._unpack_int32(packed, unpack), values)
    for words in (1, 5 * packed.shape[1]):
        monkeypatch.setattr(formats, "_UNPACK_WORDS", words)
        assert torch.equal(formats._unpack_int32(packed, unpack), values)
