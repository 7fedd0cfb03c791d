"""init / update / update_ / average, zero_debias, tf_decay, buffers, save and resume."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from helpers import assert_bits_equal, snapshot

import functional_ema as fe


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _walk(steps: int, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    base = {"w": torch.randn(3, 4), "b": torch.randn(4), "s": torch.randn(())}
    out = []
    for _ in range(steps):
        base = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
        out.append({k: v.to(dtype) for k, v in base.items()})
    return out


def test_init_copies_and_detaches() -> None:
    params = {"w": torch.randn(3, requires_grad=True)}
    state = fe.init(params)
    assert state["params"]["w"].data_ptr() != params["w"].data_ptr()
    assert not state["params"]["w"].requires_grad
    assert torch.equal(state["params"]["w"], params["w"].detach())
    assert state["step"].dtype == torch.int64 and state["step"].item() == 0
    assert set(state) == {"step", "params", "nonfinite_updates"}


def test_update_is_pure_and_counts() -> None:
    walk = _walk(3)
    state = fe.init(walk[0])
    before = snapshot(state)
    new = fe.update(state, walk[1], 0.9)
    assert_bits_equal(state, before)
    assert new["step"].item() == 1
    assert_bits_equal(fe.average(new), fe.ema_update(walk[0], walk[1], 0.9))


def test_update_inplace_twin_bit_equal() -> None:
    walk = _walk(20, torch.bfloat16)
    pure = fe.init(walk[0], dtype=torch.float32)
    inplace = fe.init(walk[0], dtype=torch.float32)
    for i, values in enumerate(walk):
        decay = torch.tensor(0.9 + 0.005 * (i % 10))
        pure = fe.update(pure, values, decay)
        assert fe.update_(inplace, values, decay) is inplace
    assert_bits_equal(pure, inplace)
    assert fe.average(pure)["w"].dtype == torch.float32


def test_schedule_sees_step_reached_and_interval() -> None:
    seen: list[tuple[int, int]] = []

    def schedule(t: torch.Tensor, dt: torch.Tensor) -> float:
        seen.append((int(t), int(dt)))
        return 0.5

    state = fe.init({"w": torch.zeros(1)})
    for dt in (1, 1, 3, 10):
        state = fe.update(state, {"w": torch.ones(1)}, schedule, dt=dt)
    assert seen == [(1, 1), (2, 1), (5, 3), (15, 10)]
    assert state["step"].item() == 15


def test_tf_warmup_schedule_matches_tf_decay() -> None:
    walk = _walk(5)
    state = fe.init(walk[0])
    shadow = walk[0]
    for n, values in enumerate(walk, start=1):
        state = fe.update(state, values, fe.tf_warmup(0.999))
        shadow = fe.ema_update(shadow, values, fe.tf_decay(0.999, n))
    assert_bits_equal(fe.average(state), shadow)


@pytest.mark.parametrize("n", [0, 1, 9, 10, 1000, 2**24 - 1, 2**24 + 1, 2**31 + 7])
def test_tf_decay_float32_formula(n: int) -> None:
    n32 = _f32(float(n))
    expected = min(_f32(0.9999), _f32(_f32(1.0 + n32) / _f32(10.0 + n32)))
    got = fe.tf_decay(0.9999, n)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == expected
    assert fe.tf_decay(torch.tensor(0.9999), torch.tensor(n)).item() == expected


def test_tf_decay_values() -> None:
    assert fe.tf_decay(0.999, 0).item() == _f32(0.1)
    assert fe.tf_decay(0.5, 10**6).item() == 0.5
    assert fe.tf_decay(1.0, 0).item() == _f32(0.1)


def test_zero_debias_closed_form() -> None:
    state = fe.init({"w": torch.zeros(2, dtype=torch.float64)}, zero_debias=True)
    assert fe.average(state)["w"].tolist() == [0.0, 0.0]
    x1, x2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, -1.0]).double()
    state = fe.update(state, {"w": x1}, 0.9)
    torch.testing.assert_close(fe.average(state)["w"], x1)  # first debiased value = x1
    state = fe.update(state, {"w": x2}, 0.9)
    c = 1 - _f32(0.9)
    expected = ((1 - c) * c * x1 + c * x2) / (1 - (1 - c) ** 2)
    torch.testing.assert_close(fe.average(state)["w"], expected)
    assert state["local_step"]["w"].item() == 2.0
    assert state["local_step"]["w"].dtype == torch.float64


def test_zero_debias_pure_equals_inplace() -> None:
    walk = _walk(10, torch.float16)
    pure = fe.init(walk[0], zero_debias=True)
    inplace = fe.init(walk[0], zero_debias=True)
    for values in walk:
        pure = fe.update(pure, values, 0.99)
        fe.update_(inplace, values, 0.99)
    assert_bits_equal(pure, inplace)


@pytest.mark.parametrize("policy", ["copy", "average"])
def test_buffers_policy(policy: str) -> None:
    params = {"w": torch.zeros(2)}
    buffers = {"mean": torch.zeros(2), "count": torch.tensor(0)}
    state = fe.init(params, buffers)
    new_buffers = {"mean": torch.ones(2), "count": torch.tensor(7)}
    state = fe.update(state, params, 0.75, new_buffers, buffer_policy=policy)
    assert state["buffers"]["count"].item() == 7
    expected = 1.0 if policy == "copy" else 0.25
    assert state["buffers"]["mean"].tolist() == [expected, expected]


@pytest.mark.parametrize("zero_debias", [False, True])
def test_save_load_resume_bit_identical(zero_debias: bool) -> None:
    walk = _walk(12, torch.bfloat16)
    straight = fe.init(walk[0], {"count": torch.tensor(0)}, zero_debias=zero_debias)
    resumed = fe.init(walk[0], {"count": torch.tensor(0)}, zero_debias=zero_debias)
    for i, values in enumerate(walk):
        buffers = {"count": torch.tensor(i)}
        straight = fe.update(straight, values, 0.95, buffers)
        resumed = fe.update(resumed, values, 0.95, buffers)
        if i == 5:
            blob = io.BytesIO()
            torch.save(resumed, blob)
            blob.seek(0)
            resumed = torch.load(blob, weights_only=True)
            assert type(resumed) is dict
    assert_bits_equal(straight, resumed)


def test_wider_dtype_survives_save_load() -> None:
    state = fe.init({"w": torch.ones(3, dtype=torch.bfloat16)}, dtype=torch.float32)
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=True)
    assert loaded["params"]["w"].dtype == torch.float32
    loaded = fe.update(loaded, {"w": torch.zeros(3, dtype=torch.bfloat16)}, 0.999)
    assert loaded["params"]["w"].dtype == torch.float32
