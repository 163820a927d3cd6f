"""The C++ Gated DeltaNet kernels against the torch path (rung b).

Decode: `layers.gated_delta_net.gdn_decode.reference` is transformers' decode step in its rounding order
(the layer's parity tests hold it to transformers). Several steps run on the same slots, so a state the
kernel wrote wrong also shows in the next step's output; in place (out slot = read slot) and ping-pong (out
slot elsewhere, the read slot left as it was).

Prefill: the token-loop kernel against the chunked form (`gdn_prefill.reference`), from zeros and
from a carried window and state, and split anywhere against whole.
"""

from __future__ import annotations

import pytest
import torch

from qwenrun import kernels
from qwenrun.layers.gated_delta_net import GatedDeltaNet, gdn_decode, gdn_prefill

ops = kernels.cpu_ops()
# the AVX2 build has no Gated DeltaNet kernels (test_kernels.py checks those ops then run torch)
pytestmark = pytest.mark.skipif(ops is None or not hasattr(ops, "gdn_decode"),
                                reason="Gated DeltaNet kernels need x86 AVX512-BF16/VNNI and a compiler")
EPS = 1e-6


def make_layer(dtype, Hk, Hv, dk, dv, K, num_slots, gen):
    conv_dim = 2 * Hk * dk + Hv * dv
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(dtype)  # noqa: E731
    params = dict(conv_weight=rand(conv_dim, K, std=0.5), A_log=rand(Hv), dt_bias=rand(Hv),
                  norm_weight=1 + rand(dv, std=0.3))
    caches = dict(conv_states=rand(num_slots, conv_dim, K - 1),
                  states=torch.randn(num_slots, Hv, dk, dv, generator=gen) * 0.3)  # a continuing sequence's state
    return params, caches


def step_inputs(dtype, B, Hv, conv_dim, dv, gen):
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return dict(mixed_qkv=rand(B, conv_dim) * 2, a=rand(B, Hv), b=rand(B, Hv), z=rand(B, Hv, dv))


def args(inputs, params, caches, slots, out_slots, Hk):
    """The op's arguments, in its order."""
    return (inputs["mixed_qkv"], caches["conv_states"], params["conv_weight"], slots, out_slots, inputs["a"],
            inputs["b"], params["A_log"], params["dt_bias"], caches["states"], inputs["z"], params["norm_weight"],
            EPS, Hk)


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        return
    # bf16: float reassociation inside the kernel can move a value across a rounding boundary of one of the
    # reference's bf16 casts (the conv output, o, the norm), a difference of a few bf16 ulps in a few elements
    diff = (got.float() - ref.float()).abs()
    assert (diff <= ref.float().abs() * 2**-6 + 1e-3).all(), diff.max()  # a few ulps
    assert (diff > 0).sum() <= 1 + diff.numel() // 100, (diff > 0).sum()  # the rest bitwise equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hk, Hv", [(2, 2), (2, 4), (1, 3)])
@pytest.mark.parametrize("dk, dv", [(32, 16), (16, 48), (32, 128)])
@pytest.mark.parametrize("slots", [[3], [6, 0, 4, 9, 2]])
@pytest.mark.parametrize("ping_pong", [False, True])
def test_kernel_matches_reference_over_steps(dtype, Hk, Hv, dk, dv, slots, ping_pong):
    """Value/key head ratios 1, 2 and 3, dk != dv (dv 48 and 128: 3- and 8-vector column sweeps), a lone
    sequence and five scattered ones; every slot the step does not write keeps its conv and recurrent state."""
    gen = torch.Generator().manual_seed(len(slots) * 1000 + Hk * 100 + Hv * 10 + dv)
    K, num_slots = 4, 11
    params, caches = make_layer(dtype, Hk, Hv, dk, dv, K, num_slots, gen)
    ours = {name: t.clone() for name, t in caches.items()}
    read = torch.tensor(slots)
    spare = [s for s in range(num_slots) if s not in slots]
    for step in range(4):
        write = torch.tensor(spare[: len(slots)]) if ping_pong else read
        inputs = step_inputs(dtype, len(slots), Hv, caches["conv_states"].shape[1], dv, gen)
        before = {name: t.clone() for name, t in ours.items()}
        with torch.no_grad():
            assert kernels.uses_kernel("gdn_decode", *args(inputs, params, ours, read, write, Hk))
            ref = gdn_decode.reference(*args(inputs, params, caches, read, write, Hk))
            got = gdn_decode(*args(inputs, params, ours, read, write, Hk))
        assert got.dtype == dtype and got.shape == ref.shape
        close(got, ref, dtype)
        assert torch.equal(ours["conv_states"], caches["conv_states"])  # a shift and copies: exact
        torch.testing.assert_close(ours["states"], caches["states"], rtol=1e-5, atol=1e-5)
        untouched = [s for s in range(num_slots) if s not in write.tolist()]
        for name, t in ours.items():
            assert torch.equal(t[untouched], before[name][untouched]), name
        if ping_pong:  # the written slots hold the state now; the next step reads them
            spare = [s for s in range(num_slots) if s not in write.tolist()]
            read = write


def test_other_shapes_and_dtypes_run_the_reference():
    """Head dims that are not whole vectors, a bf16 state or an fp32 z in a bf16 model take the torch path."""
    gen = torch.Generator().manual_seed(0)
    for dtype, dk, dv, state_dtype, z_dtype in [(torch.float32, 16, 24, torch.float32, torch.float32),
                                                 (torch.float32, 8, 16, torch.float32, torch.float32),
                                                 (torch.bfloat16, 16, 16, torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, 16, 16, torch.float32, torch.float32)]:
        params, caches = make_layer(dtype, 1, 2, dk, dv, 4, 3, gen)
        caches["states"] = caches["states"].to(state_dtype)
        inputs = step_inputs(dtype, 1, 2, caches["conv_states"].shape[1], dv, gen)
        inputs["z"] = inputs["z"].to(z_dtype)
        with torch.no_grad():
            assert not kernels.uses_kernel("gdn_decode", *args(inputs, params, caches, torch.tensor([0]),
                                                              torch.tensor([0]), 1))


def test_kernel_rejects_a_batch_that_writes_a_slot_another_sequence_reads():
    """Sequences run concurrently: an out slot that another sequence reads or writes would race."""
    gen = torch.Generator().manual_seed(0)
    params, caches = make_layer(torch.float32, 1, 2, 16, 16, 4, 4, gen)
    inputs = step_inputs(torch.float32, 2, 2, caches["conv_states"].shape[1], 16, gen)
    for read, write in [([0, 1], [1, 2]), ([0, 1], [2, 2])]:
        with pytest.raises(RuntimeError, match="another sequence"):
            ops.gdn_decode(*args(inputs, params, caches, torch.tensor(read), torch.tensor(write), 1))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gdn_decode(*args(inputs, params, caches, torch.tensor([0, 4]), torch.tensor([0, 1]), 1))


def prefill_layer(dtype, Hk, Hv, dk, dv, K, gen):
    layer = GatedDeltaNet(32, Hk, Hv, dk, dv, K, EPS)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer.to(dtype)


def prefill_inputs(dtype, layer, n, resume, gen):
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    Hv, dk, dv, K = layer.num_v_heads, layer.k_head_dim, layer.v_head_dim, layer.conv1d.kernel_size[0]
    window = rand(layer.conv_dim, K - 1) if resume else None
    state = torch.randn(Hv, dk, dv, generator=gen) * 0.3 if resume else None
    return rand(n, layer.conv_dim) * 2, rand(n, Hv), rand(n, Hv), window, state


def kernel_prefill(layer, mixed, a, b, window, state):
    return ops.gdn_prefill(mixed, window, layer.conv1d.weight[:, 0, :], a, b, layer.A_log, layer.dt_bias, state,
                           layer.num_v_heads, layer.k_head_dim, layer.num_k_heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hk, Hv, dk, dv", [(2, 2, 32, 16), (2, 4, 16, 48), (1, 3, 32, 128)])
@pytest.mark.parametrize("n", [1, 2, 70])
@pytest.mark.parametrize("resume", [False, True])
def test_prefill_kernel_matches_the_chunked_form(dtype, Hk, Hv, dk, dv, n, resume):
    """n below the conv window (its new window still holds old inputs), one token, a chunk and a bit."""
    gen = torch.Generator().manual_seed(n * 10 + Hv)
    layer = prefill_layer(dtype, Hk, Hv, dk, dv, 4, gen)
    mixed, a, b, window, state = prefill_inputs(dtype, layer, n, resume, gen)
    with torch.no_grad():
        o_ref, window_ref, state_ref = gdn_prefill.reference(mixed, window, layer.conv1d.weight[:, 0, :], a, b,
                                                             layer.A_log, layer.dt_bias, state, layer.num_v_heads,
                                                             layer.k_head_dim, layer.num_k_heads)
        o, new_window, new_state = kernel_prefill(layer, mixed, a, b, window, state)
    assert o.dtype == dtype and o.shape == o_ref.shape
    close(o, o_ref, dtype)
    assert torch.equal(new_window, window_ref)
    torch.testing.assert_close(new_state, state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_split_anywhere_is_bitwise_the_whole(dtype):
    """The same token loop whatever the chunks: a prefill resumed from its own window and state is exact."""
    gen = torch.Generator().manual_seed(1)
    layer = prefill_layer(dtype, 2, 4, 16, 32, 4, gen)
    mixed, a, b, window, state = prefill_inputs(dtype, layer, 40, True, gen)
    with torch.no_grad():
        whole = kernel_prefill(layer, mixed, a, b, window, state)
        outs = []
        for lo, hi in [(0, 2), (2, 3), (3, 33), (33, 40)]:
            o, window, state = kernel_prefill(layer, mixed[lo:hi], a[lo:hi], b[lo:hi], window, state)
            outs.append(o)
    assert torch.equal(torch.cat(outs), whole[0])
    assert torch.equal(window, whole[1]) and torch.equal(state, whole[2])
