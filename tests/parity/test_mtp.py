"""MTP head parity, fp32, on tiny random Qwen3 / Qwen3-Next / Qwen3.5(-MoE) checkpoints with random `mtp.*`
tensors added to the file transformers wrote.

transformers has no MTP (it drops `mtp.*`), so the reference is the step of qwen3-text-spec §4.9 written
here with torch ops on the stored tensors — `fc(cat[norm_e(E[x_{i+1}]), norm_h(h_i)])`, the layer,
`norm`, the LM head, zero-centred norms as `x̂·(1 + w)` — where the one decoder layer is transformers' own
decoder layer of the family (Qwen3, or Qwen3-Next / Qwen3.5 full attention with its MoE or dense MLP),
given the very weights written under `mtp.layers.0.`, and h_i is transformers' final-normed hidden state.
Teacher-forced over whole sequences (every row attends the earlier ones) and through a paged cache made by
hand (a prefix chunk, then one row at a time); a checkpoint without `mtp.*` asked for MTP is refused, one
with it loads as before when MTP is not asked for, and int8 quantizes the head's linears too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from hand_cache import HandCache
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.loading.loader import load_model, open_checkpoint
from qwenrun.quant import quantize_model
from qwenrun.quant.linear import Int8Linear
from tiny import make_checkpoint

NAMES = ["dense-untied-gqa2", "dense-tied-mha", "next-interval4-moe", "next-interval2-mlponly-tied-bias",
         "qwen3_5-interval4", "qwen3_5_moe-interval2"]
LOGITS_TOL = 1e-4  # of the largest reference logit
CPU = torch.device("cpu")


def _zero_centred(name: str) -> bool:
    return not name.startswith("dense")


def add_mtp_head(folder, ref, seed: int = 7) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Append a random MTP head to `folder/model.safetensors`; returns (transformers' decoder layer holding
    the head's layer weights, the head's other stored tensors). Norms are perturbed away from their init
    (0 for zero-centred ones, 1 otherwise); Qwen3-Next experts are stored per expert as released
    checkpoints store them, Qwen3.5-MoE ones fused."""
    cfg = copy.deepcopy(ref.config)
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    layer = type(ref.model.layers[0])(cfg, 0).eval()
    gen = torch.Generator().manual_seed(seed)
    centre = 0.0 if "Next" in type(layer).__name__ or "3_5" in type(layer).__name__ else 1.0
    with torch.no_grad():
        # Every value written here: a bare decoder layer is not initialised (its fused experts are
        # torch.empty), and adding noise to that memory made the test fail at random with NaNs.
        for name, p in layer.named_parameters():
            base = centre if "norm" in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.05))
    H = cfg.hidden_size
    head = {"mtp.fc.weight": torch.randn(H, 2 * H, generator=gen) * 0.1,
            **{f"mtp.{n}.weight": centre + torch.randn(H, generator=gen) * 0.3
               for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}}
    stored = {f"mtp.layers.0.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    if "Qwen3Next" in type(layer).__name__ and "mtp.layers.0.mlp.experts.gate_up_proj" in stored:
        gate_up, down = stored.pop("mtp.layers.0.mlp.experts.gate_up_proj"), stored.pop("mtp.layers.0.mlp.experts.down_proj")
        I = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            stored[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :I].clone()
            stored[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = gate_up[e, I:].clone()
            stored[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = down[e].clone()
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, **stored, **head}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return layer, {**tensors, **head}


def reference_logits(ref, layer, stored: dict[str, torch.Tensor], ids: torch.Tensor, zero_centred: bool):
    """Row i: the draft logits for x_{i+2} from (h_i, x_{i+1}), i = 0 .. len(ids) - 2."""

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ref.config.rms_norm_eps) * (1 + w if zero_centred else w)

    T = len(ids) - 1
    h = ref.model(ids[None]).last_hidden_state[0, :T]  # final-normed h_i
    e = stored["model.embed_tokens.weight"][ids[1:]]
    u = torch.cat((norm(e, stored["mtp.pre_fc_norm_embedding.weight"]),
                   norm(h, stored["mtp.pre_fc_norm_hidden.weight"])), dim=-1) @ stored["mtp.fc.weight"].T
    pos = torch.arange(T)[None]
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    u = layer(u[None], position_embeddings=ref.model.rotary_emb(u[None], pos), attention_mask=causal,
              position_ids=pos)
    u = u[0] if isinstance(u, tuple) else u
    head = stored.get("lm_head.weight", stored["model.embed_tokens.weight"])
    return norm(u[0], stored["mtp.norm.weight"]) @ head.T


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory):
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    layer, stored = add_mtp_head(folder, ref)
    model = load_model(open_checkpoint(folder), torch.float32, CPU, mtp=True)
    return request.param, folder, ref, layer, stored, model


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours - theirs).abs().max().item() <= LOGITS_TOL * theirs.abs().max().item()


def _head_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced MTP logits over one whole sequence, without a cache."""
    T = len(ids)
    hidden = model(ForwardBatch.without_cache(ids, torch.arange(T), [T]))
    rows = ForwardBatch.without_cache(ids[1:], torch.arange(T - 1), [T - 1])  # row i: x_{i+1} at position i
    return model.mtp.compute_logits(model.mtp(rows, hidden[:-1]))


def test_head_logits_match_the_spec_formula(case):
    name, _, ref, layer, stored, model = case
    ids = _tokens(41, 1)
    with torch.no_grad():
        want = reference_logits(ref, layer, stored, ids, _zero_centred(name))
        ours = _head_logits(model, ids)
    assert _close(ours, want), f"{name}: max diff {(ours - want).abs().max().item():.3g}"
    # not vacuous: the head's attention reads earlier rows (a head without it differs beyond tolerance)
    assert not _close(want[1:], reference_logits(ref, layer, stored, ids[1:], _zero_centred(name))), name


def test_head_through_a_paged_cache(case):
    """A 20-row prefix chunk, then one row at a time, through the head's own `cache_specs`: the same
    logits as the whole sequence (the reference), so its K/V is written and read at the right slots."""
    name, _, ref, layer, stored, model = case
    ids = _tokens(30, 2)
    with torch.no_grad():
        want = reference_logits(ref, layer, stored, ids, _zero_centred(name))
        hidden = model(ForwardBatch.without_cache(ids, torch.arange(30), [30]))
        cache = HandCache(model.mtp.cache_specs(torch.float32))
        got = []
        for start, n in [(0, 20)] + [(s, 1) for s in range(20, 29)]:
            fb = cache.batch(ids[start + 1 : start + 1 + n], start, 0, 0)
            got.append(model.mtp.compute_logits(model.mtp(fb, hidden[start : start + n])))
    assert _close(torch.cat(got), want), name


def test_shares_the_target_embedding_and_head(case):
    name, _, _, _, _, model = case
    names = {n for n, _ in model.mtp.named_parameters()}
    assert all(n.startswith(("fc.", "layers.0.", "pre_fc_norm_", "norm.")) for n in names), names
    assert model.mtp.token_shift == 1 and len(model.mtp.cache_specs(torch.float32)) == 1


def test_without_mtp_the_head_is_skipped(case):
    name, folder, ref, *_ = case
    model = load_model(open_checkpoint(folder), torch.float32, CPU)
    assert not hasattr(model, "mtp")
    ids = _tokens(17, 3)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
        ours = model.compute_logits(model(ForwardBatch.without_cache(ids, torch.arange(17), [17])))
    assert _close(ours, want), name


def test_int8_quantizes_the_head_linears(case):
    """Fed the same target hidden, the int8 head stays near the fp32 one but is not it: the quantized
    linears are the ones called."""
    name, folder, _, _, _, model = case
    quantized = quantize_model(load_model(open_checkpoint(folder), torch.float32, CPU, mtp=True), "int8")
    assert isinstance(quantized.mtp.fc, Int8Linear)
    assert isinstance(quantized.mtp.layers[0].self_attn.o_proj, Int8Linear)
    ids = _tokens(25, 4)
    with torch.no_grad():
        hidden = model(ForwardBatch.without_cache(ids, torch.arange(25), [25]))[:-1]
        rows = ForwardBatch.without_cache(ids[1:], torch.arange(24), [24])
        want = model.mtp.compute_logits(model.mtp(rows, hidden))
        ours = quantized.mtp.compute_logits(quantized.mtp(rows, hidden))
    err = (ours - want).abs().max().item() / want.abs().max().item()
    assert 1e-6 < err < 0.05, f"{name}: int8 head off by {err:.3g} of the largest logit"


def test_a_checkpoint_without_mtp_is_refused(tmp_path):
    folder, _ = make_checkpoint("dense-tied-mha", tmp_path)
    with pytest.raises(InvalidRequestError, match="no mtp"):
        load_model(open_checkpoint(folder), torch.float32, CPU, mtp=True)
