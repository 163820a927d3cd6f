"""The Gated DeltaNet layer alone against transformers' module (fp32, perturbed weights).

A whole prompt several chunks of 64 long, the same prompt split into a prefix chunk, a continuation
chunk and single-token decode steps through state slots, and a mixed batch (one sequence decoding
while another prefills) against transformers' layer run with its own cache: chunked prefill then
the recurrent step, as its generate does. Both checkpoint layouts: Qwen3-Next's grouped
`in_proj_qkvz`/`in_proj_ba` and Qwen3.5's split projections.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from qwenrun.layers.gated_delta_net import GatedDeltaNet, gdn_decode, next_ba_to_split, next_qkvz_to_split
from qwenrun.layers.recurrent import RecurrentMetadata
from tiny import perturb

TOL = 1e-4  # of the largest reference output
DIMS = dict(hidden_size=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=24, linear_conv_kernel_dim=4, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, layer_types=["linear_attention"], initializer_range=0.1)


def _pair(kind: str, ratio: int, dv: int = 24):
    """dv 24 runs the torch references; dk = 16 with dv = 32 also the C++ kernels, where available."""
    dims = {**DIMS, "linear_num_value_heads": DIMS["linear_num_key_heads"] * ratio, "linear_value_head_dim": dv}
    if kind == "next":
        cfg = transformers.Qwen3NextConfig(**dims)
        ref = transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet(cfg, 0)
    else:
        cfg = transformers.Qwen3_5TextConfig(**dims)
        ref = transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet(cfg, 0)
    ref.config = cfg  # perturb reads initializer_range
    torch.manual_seed(0)
    perturb(ref, 0)
    ref.eval()
    Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    sources = None
    if kind == "next":
        sources = (("in_proj_qkvz", 2 * Hk * dk + 2 * Hv * dv), ("in_proj_ba", 2 * Hv))
    ours = GatedDeltaNet(64, Hk, Hv, dk, dv, 4, cfg.rms_norm_eps, sources)
    sd = ref.state_dict()
    with torch.no_grad():
        if kind == "next":
            w = torch.cat((next_qkvz_to_split(Hk, dk)(sd["in_proj_qkvz.weight"]),
                           next_ba_to_split(Hk)(sd["in_proj_ba.weight"])))
        else:
            w = torch.cat([sd[f"in_proj_{p}.weight"] for p in ("qkv", "z", "b", "a")])
        ours.in_proj.weight.copy_(w)
        for name in ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"):
            dict(ours.named_parameters())[name].copy_(sd[name])
    return cfg, ref, ours.eval()


def _run(ours: GatedDeltaNet, x: torch.Tensor, lens: list[int], slots, has_state, cache, out_slots=None):
    """`out_slots` None: in place (written where read)."""
    meta = RecurrentMetadata.build(lens, slots, out_slots if out_slots is not None else slots, has_state,
                                   torch.device("cpu"))
    return ours(x, meta, cache)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize("kind", ["next", "qwen3_5"])
@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("dv", [24, 32])
def test_layer_matches_transformers_whole_chunked_and_decode(kind, ratio, dv):
    cfg, ref, ours = _pair(kind, ratio, dv)
    torch.manual_seed(1)
    x = torch.randn(1, 160, 64)
    with torch.no_grad():
        whole_ref = ref(x)[0]  # no cache: the chunked path over the whole sequence
        whole = _run(ours, x[0], [160], None, [False], (None, None))
        assert _close(whole, whole_ref), "whole prompt"

        # transformers with its cache: prefill 70 (chunked), then one token at a time (recurrent)
        cache = DynamicCache(config=cfg)
        steps_ref = [ref(x[:, :70], cache_params=cache)[0]]
        for t in range(70, 76):
            steps_ref.append(ref(x[:, t:t + 1], cache_params=cache)[0])
        steps_ref = torch.cat(steps_ref)

        # ours: prefix chunk 70, continuation chunk 84 (to 154), then 6 decode steps, ping-ponging
        # between slots 2 and 0 of 3; each step leaves the slot it read untouched
        spec = ours.state_spec(torch.float32)
        conv = torch.full((3, *spec.conv_shape), float("nan"))  # a fresh slot's old content is garbage
        state = torch.full((3, *spec.state_shape), float("nan"))
        parts = [_run(ours, x[0, :70], [70], [1], [False], (conv, state), out_slots=[2])]
        src, dst = 2, 0
        for lo, hi in [(70, 154)] + [(t, t + 1) for t in range(154, 160)]:
            read = conv[src].clone(), state[src].clone()
            parts.append(_run(ours, x[0, lo:hi], [hi - lo], [src], [True], (conv, state), out_slots=[dst]))
            assert torch.equal(conv[src], read[0]) and torch.equal(state[src], read[1])
            assert torch.isnan(state[1]).all(), "a slot nobody named was written"
            src, dst = dst, src
        assert _close(torch.cat(parts), whole_ref), "prefix + continuation + decode vs whole"

        # the decode path against transformers' recurrent step from the same state
        conv2 = torch.zeros(1, *spec.conv_shape)
        state2 = torch.zeros(1, *spec.state_shape)
        ours_steps = [_run(ours, x[0, :70], [70], [0], [False], (conv2, state2))]
        for t in range(70, 76):
            ours_steps.append(_run(ours, x[0, t:t + 1], [1], [0], [True], (conv2, state2)))
        assert _close(torch.cat(ours_steps), steps_ref), "decode steps vs transformers' recurrent path"
        assert _close(state2[0], cache.layers[0].recurrent_states[0][0].float())


@pytest.mark.parametrize("kind", ["next", "qwen3_5"])
@pytest.mark.parametrize("dv", [24, 32])
def test_mixed_batch_equals_each_alone(kind, dv):
    """One step holding a decode (slot 0), a fresh prefill (slot 2) and a continuing chunk (slot 1)."""
    _, _, ours = _pair(kind, 2, dv)
    torch.manual_seed(2)
    a, b, c = torch.randn(41, 64), torch.randn(90, 64), torch.randn(30, 64)
    spec = ours.state_spec(torch.float32)
    with torch.no_grad():
        conv, state = torch.zeros(3, *spec.conv_shape), torch.zeros(3, *spec.state_shape)
        _run(ours, a[:40], [40], [0], [False], (conv, state))
        _run(ours, c[:20], [20], [1], [False], (conv, state))
        got = _run(ours, torch.cat((a[40:], b, c[20:])), [1, 90, 10], [0, 2, 1], [True, False, True], (conv, state))
        for rows, seq in ((slice(0, 1), a), (slice(1, 91), b), (slice(91, 101), c)):
            n = rows.stop - rows.start
            alone = _run(ours, seq, [len(seq)], None, [False], (None, None))[-n:]
            assert _close(got[rows], alone)


def test_gdn_decode_in_place_writes_only_its_slots():
    _, _, ours = _pair("qwen3_5", 2)
    spec = ours.state_spec(torch.float32)
    torch.manual_seed(3)
    conv, state = torch.randn(4, *spec.conv_shape), torch.randn(4, *spec.state_shape)
    before_conv, before_state = conv.clone(), state.clone()
    B, Hv, dv = 2, ours.num_v_heads, ours.v_head_dim
    args = (torch.randn(B, ours.conv_dim), conv, ours.conv1d.weight[:, 0].detach(), torch.tensor([3, 1]),
            torch.tensor([3, 1]), torch.randn(B, Hv), torch.randn(B, Hv), ours.A_log.detach(), ours.dt_bias.detach(),
            state,
            torch.randn(B, Hv, dv), ours.norm.weight.detach(), 1e-6, ours.num_k_heads)
    out = gdn_decode(*args)
    assert out.shape == (B, Hv, dv)
    for s in (0, 2):
        assert torch.equal(conv[s], before_conv[s]) and torch.equal(state[s], before_state[s])
    for s in (1, 3):
        assert not torch.equal(state[s], before_state[s])
        assert torch.equal(conv[s, :, :-1], before_conv[s, :, 1:])  # the window shifted by one input


def test_gdn_decode_out_slots_leave_the_read_slots_alone():
    """Reading slots [3, 1] and writing [0, 2] equals the in-place step, and slots 3, 1 stay as they were."""
    _, _, ours = _pair("next", 2)
    spec = ours.state_spec(torch.float32)
    torch.manual_seed(4)
    conv, state = torch.randn(4, *spec.conv_shape), torch.randn(4, *spec.state_shape)
    B, Hv, dv = 2, ours.num_v_heads, ours.v_head_dim
    inputs = (torch.randn(B, ours.conv_dim), torch.randn(B, Hv), torch.randn(B, Hv), torch.randn(B, Hv, dv))
    weights = (ours.conv1d.weight[:, 0].detach(), ours.A_log.detach(), ours.dt_bias.detach(),
               ours.norm.weight.detach())

    def step(conv, state, out_slots):
        (x, a, b, z), (w, A_log, dt_bias, nw) = inputs, weights
        return gdn_decode(x, conv, w, torch.tensor([3, 1]), torch.tensor(out_slots), a, b, A_log, dt_bias, state,
                          z, nw, 1e-6, ours.num_k_heads)

    conv_in, state_in = conv.clone(), state.clone()
    out_in_place = step(conv_in, state_in, [3, 1])
    before = conv.clone(), state.clone()
    out = step(conv, state, [0, 2])
    assert torch.equal(out, out_in_place)
    for read, written in ((3, 0), (1, 2)):
        assert torch.equal(conv[read], before[0][read]) and torch.equal(state[read], before[1][read])
        assert torch.equal(conv[written], conv_in[read]) and torch.equal(state[written], state_in[read])
