"""ema_update / ema_update_: TF arithmetic, pytrees, dtypes, purity, no host sync."""

from __future__ import annotations

import struct
from collections import namedtuple

import optree
import pytest
import torch
from helpers import NoHostSync, assert_bits_equal, bits, snapshot

import functional_ema as fe


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _round(x: float, dtype: torch.dtype) -> float:
    """Round an exact float64 result as the leaf dtype's arithmetic does.

    float64: exact already. float32: one rounding. float16/bfloat16: TF (Eigen) and PyTorch
    compute in float32 and round the float32 result to the leaf dtype.
    """
    if dtype == torch.float64:
        return x
    x = _f32(x)
    if dtype == torch.float32:
        return x
    return torch.tensor(x, dtype=torch.float32).to(dtype).item()


def reference_tf(shadow: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """Independent scalar emulation of TF's assign_moving_average, element by element."""
    dtype = shadow.dtype
    c = _round(1.0 - _f32(decay), torch.float32)
    c = torch.tensor(c, dtype=torch.float32).to(dtype).item()
    out = []
    for s, v in zip(shadow.flatten().tolist(), value.flatten().tolist(), strict=True):
        diff = _round(s - v, dtype)
        out.append(_round(s - _round(diff * c, dtype), dtype))
    return torch.tensor(out, dtype=torch.float64).to(dtype).reshape(shadow.shape)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 0.9999, 1.0])
def test_matches_independent_tf_emulation(dtype: torch.dtype, decay: float) -> None:
    shadow = (torch.randn(257, dtype=torch.float64) * 10).to(dtype)
    value = (shadow.double() + torch.randn(257, dtype=torch.float64)).to(dtype)
    expected = reference_tf(shadow, value, decay)
    assert_bits_equal(fe.ema_update({"w": shadow}, {"w": value}, decay), {"w": expected})
    tensor_decay = torch.tensor(decay, dtype=torch.float64)
    assert_bits_equal(fe.ema_update({"w": shadow}, {"w": value}, tensor_decay), {"w": expected})


def test_lerp_and_convex_form_round_differently() -> None:
    shadow = torch.randn(4096) * 3
    value = shadow + torch.randn(4096)
    ours = fe.ema_update([shadow], [value], 0.999)[0]
    assert torch.equal(bits(ours), bits(reference_tf(shadow, value, 0.999)))
    lerp = torch.lerp(shadow, value, 1 - 0.999)
    convex = 0.999 * shadow + (1 - 0.999) * value
    assert (bits(lerp) != bits(ours)).sum() > 0
    assert (bits(convex) != bits(ours)).sum() > 0


def test_closed_form_two_steps() -> None:
    d = 0.9
    x0, x1, x2 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-2.0])
    shadow = fe.ema_update({"w": x0.double()}, {"w": x1.double()}, d)
    shadow = fe.ema_update(shadow, {"w": x2.double()}, d)
    w = 1 - _f32(d)
    expected = (1 - w) ** 2 * 1.0 + w * (1 - w) * 3.0 + w * -2.0
    torch.testing.assert_close(shadow["w"], torch.tensor([expected], dtype=torch.float64))


def test_exact_dyadic_values() -> None:
    out = fe.ema_update({"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([1.0, 0.0])}, 0.5)
    assert out["w"].tolist() == [0.5, 2.0]
    assert fe.ema_update([torch.tensor(7.0)], [torch.tensor(3.0)], 1.0)[0].item() == 7.0
    assert fe.ema_update([torch.tensor(7.0)], [torch.tensor(3.0)], 0.0)[0].item() == 3.0


Pair = namedtuple("Pair", ["weight", "bias"])


def _trees() -> list[object]:
    t = torch.randn
    return [
        {"a": t(3), "b": {"c": t(2, 2)}},
        [t(3), t(1)],
        (t(2), (t(3), [t(1)])),
        Pair(t(2, 3), t(3)),
        {"layer": Pair(t(2), t(2)), "extra": [t(4)]},
        {},
    ]


@pytest.mark.parametrize("tree_index", range(6))
def test_any_pytree_pure_equals_inplace(tree_index: int) -> None:
    shadow = _trees()[tree_index]
    params = optree.tree_map(lambda x: x + 1, shadow)
    before_shadow, before_params = snapshot(shadow), snapshot(params)
    pure = fe.ema_update(shadow, params, 0.75)
    assert type(pure) is type(shadow)
    assert optree.tree_structure(pure) == optree.tree_structure(shadow)
    assert_bits_equal(shadow, before_shadow)
    assert_bits_equal(params, before_params)
    result = fe.ema_update_(shadow, params, 0.75)
    assert result is shadow
    assert_bits_equal(shadow, pure)
    assert_bits_equal(params, before_params)


def test_integer_and_bool_leaves_are_copied() -> None:
    shadow = {"n": torch.tensor(5), "mask": torch.tensor([True, False]), "w": torch.zeros(2)}
    params = {"n": torch.tensor(10**12), "mask": torch.tensor([False, True]), "w": torch.ones(2)}
    out = fe.ema_update(shadow, params, 0.9)
    assert out["n"].item() == 10**12 and out["n"].dtype == torch.int64
    assert out["mask"].tolist() == [False, True]
    fe.ema_update_(shadow, params, 0.9)
    assert shadow["n"].item() == 10**12


def test_wider_shadow_runs_in_shadow_dtype() -> None:
    params = torch.randn(64).to(torch.bfloat16)
    shadow = torch.randn(64)
    out = fe.ema_update([shadow], [params], 0.999)[0]
    assert out.dtype == torch.float32
    expected = reference_tf(shadow, params.float(), 0.999)
    assert torch.equal(bits(out), bits(expected))


def test_bf16_shadow_stalls_where_fp32_tracks() -> None:
    """Documented behaviour: a bf16 average does not move at high decay; fp32 does."""
    weights = torch.full((256,), 1.0, dtype=torch.bfloat16)
    target = weights + 0.05
    bf16 = [weights.clone()]
    fp32 = [weights.float()]
    for _ in range(100):
        fe.ema_update_(bf16, [target], 0.9999)
        fe.ema_update_(fp32, [target], 0.9999)
    assert torch.equal(bf16[0], weights)
    delta = (target.float() - 1).mean().item()  # bf16(1.05) - 1
    expected = delta * (1 - (1 - (1 - _f32(0.9999))) ** 100)
    assert (
        abs((fp32[0] - 1).mean().item() - expected) < 1e-2 * expected
    )  # float32 rounding near 1.0


def test_differentiable_pure_update() -> None:
    params = torch.randn(3, requires_grad=True)
    out = fe.ema_update({"w": torch.zeros(3)}, {"w": params}, 0.75)
    out["w"].sum().backward()
    torch.testing.assert_close(params.grad, torch.full((3,), 0.25))


def test_inplace_keeps_no_autograd_history() -> None:
    params = torch.randn(3, requires_grad=True)
    shadow = {"w": torch.zeros(3)}
    fe.ema_update_(shadow, {"w": params}, 0.5)
    assert shadow["w"].grad_fn is None and not shadow["w"].requires_grad


def test_tensor_decay_has_no_host_sync() -> None:
    device = torch.device("meta")  # tensors with no data: any host read fails
    shadow = {
        "w": torch.empty(4, device=device),
        "h": torch.empty(2, dtype=torch.bfloat16, device=device),
    }
    params = optree.tree_map(torch.empty_like, shadow)
    decay = torch.empty((), device=device)
    warm, profile = fe.tf_warmup(decay), fe.power(sigma_rel=0.1)  # built once, on the host
    with NoHostSync():
        fe.ema_update(shadow, params, decay)
        fe.ema_update_(shadow, params, decay)
        state = fe.init(shadow)
        state = fe.update(state, params, warm)
        dt = torch.empty((), dtype=torch.int64, device=device)
        state = fe.update(state, params, profile, dt=dt)
        fe.update_(state, params, decay)
        fe.tf_decay(decay, torch.empty((), dtype=torch.int64, device=device))
