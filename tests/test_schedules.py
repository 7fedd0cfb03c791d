"""Schedules: value tables, no host sync, sigma_rel <-> gamma, interval-correct ramps."""

from __future__ import annotations

import math
import re
import struct

import pytest
import torch

import functional_ema as fe


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _at(schedule, t: int, dt: int = 1) -> float:
    value = schedule(torch.tensor(t), torch.tensor(dt))
    assert isinstance(value, torch.Tensor)
    assert value.shape == ()
    return float(value)


# The tables printed in the docstrings, checked here.
TABLES = {
    "tf_warmup": (fe.tf_warmup(0.999), {1: 0.1818, 2: 0.25, 10: 0.55, 100: 0.9182, 10000: 0.999}),
    "warmup": (
        fe.warmup(),
        {1: 0.0, 2: 0.3700, 11: 0.7978, 101: 0.9539, 1001: 0.9900, 1000001: 0.9999},
    ),
    "power": (
        fe.power(sigma_rel=0.1),
        {1: 0.0, 2: 0.0041, 10: 0.4333, 100: 0.9233, 10000: 0.99921},
    ),
    "half_life": (fe.half_life(10), {1: 0.9330, 5: 0.9330, 1000: 0.9330}),
    "constant": (fe.constant(0.99), {1: 0.99, 100: 0.99}),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_documented_tables(name: str) -> None:
    schedule, table = TABLES[name]
    for t, expected in table.items():
        decimals = len(str(expected).split(".")[1])
        assert round(_at(schedule, t), decimals) == expected, (name, t)


def test_tf_warmup_is_tf_decay_bit_for_bit() -> None:
    for t in (1, 2, 17, 10**6, 2**24 + 3):
        assert _at(fe.tf_warmup(0.9999), t) == fe.tf_decay(0.9999, t).item()


def test_warmup_clamps_and_validates() -> None:
    schedule = fe.warmup(0.99, min_decay=0.5, inv_gamma=2.0, power=0.75)
    assert _at(schedule, 1) == 0.5
    assert _at(schedule, 10**9) == 0.99
    s = 5.0
    assert _at(schedule, 6) == pytest.approx(max(0.5, 1 - (1 + s / 2.0) ** -0.75))
    with pytest.raises(
        ValueError, match=r"^warmup: min_decay above decay at 'min_decay': expected"
    ):
        fe.warmup(0.9, min_decay=0.95)
    with pytest.raises(ValueError, match=r"^warmup: power out of range at 'power': .* got 0\."):
        fe.warmup(power=0)
    with pytest.raises(TypeError, match=r"^warmup: inv_gamma of the wrong type at 'inv_gamma'"):
        fe.warmup(inv_gamma="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^half_life: steps out of range at 'steps\[1\]'"):
        fe.half_life([10, -1])


def test_interval_versions() -> None:
    assert _at(fe.constant(0.99), 50, 10) == pytest.approx(0.99**10, rel=1e-15)
    assert _at(fe.half_life(10), 50, 10) == pytest.approx(0.5, rel=1e-15)
    assert _at(fe.power(gamma=3.0), 100, 10) == pytest.approx(0.9**4, rel=1e-15)
    assert _at(fe.power(gamma=3.0), 10, 10) == 0.0  # the first update copies


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_gamma_roundtrip(sigma_rel: float) -> None:
    gamma = fe.sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert fe.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    c = sigma_rel**-2
    assert gamma**3 + 7 * gamma**2 + (16 - c) * gamma + (12 - c) == pytest.approx(0, abs=1e-8)


def test_sigma_rel_edm2_values() -> None:
    # EDM2 (training/phema.py): PowerFunctionEMA(stds=[0.050, 0.100]) -> gamma 16.97 and 6.94.
    assert round(fe.sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(fe.sigma_rel_to_gamma(0.1), 2) == 6.94


@pytest.mark.parametrize("bad", [0.0, -0.1, math.sqrt(1 / 12), 0.3])
def test_sigma_rel_out_of_range(bad: float) -> None:
    expected = re.escape("out of range at 'sigma_rel': expected a number in (0, 0.2887)")
    with pytest.raises(ValueError, match="^sigma_rel_to_gamma: sigma_rel " + expected):
        fe.sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="^power: sigma_rel " + expected):
        fe.power(sigma_rel=bad)


def test_power_needs_exactly_one_parameter() -> None:
    once = re.escape("power: profile not given exactly once at 'sigma_rel/gamma': expected")
    with pytest.raises(ValueError, match="^" + once):
        fe.power()
    with pytest.raises(ValueError, match="^" + once):
        fe.power(1.0, sigma_rel=0.1)


# --- interval-correct averages of a ramp w_t = t ----------------------------------------


def _ramp_average(decay, k: int, steps: int) -> float:
    """Average of w_t = t (float64) updated every k steps with dt=k, starting at w_0 = 0."""
    state = fe.init({"w": torch.zeros((), dtype=torch.float64)})
    for t in range(k, steps + 1, k):
        state = fe.update(state, {"w": torch.tensor(float(t), dtype=torch.float64)}, decay, dt=k)
    assert state["step"].item() == steps
    return fe.average(state)["w"].item()


@pytest.mark.parametrize("k", [1, 10, 100])
def test_constant_decay_ramp_matches_closed_form(k: int) -> None:
    beta, steps = 0.999, 20000
    w = 1 - _f32(1 - _f32(beta**k))  # the update's decay, rounded as TF rounds it
    n = steps // k
    closed = k * (n - w * (1 - w**n) / (1 - w))  # sum_j (1 - B) B^(n - j) (j k), B = w here
    got = _ramp_average(beta, k, steps)
    assert got == pytest.approx(closed, rel=1e-9)
    # The time constant does not depend on k: the lag behind the ramp is the per-step lag
    # beta / (1 - beta) minus the (k - 1) / 2 steps by which samples lead their interval.
    lag = steps - got
    assert lag == pytest.approx(beta / (1 - beta) - (k - 1) / 2, rel=2e-3)


def test_constant_decay_without_interval_is_k_times_slower() -> None:
    """What peers do (EMA every k steps with the per-step decay): a k-times longer lag."""
    state = fe.init({"w": torch.zeros((), dtype=torch.float64)})
    for t in range(100, 200001, 100):
        state = fe.update(state, {"w": torch.tensor(float(t), dtype=torch.float64)}, 0.999)
    lag = 200000 - fe.average(state)["w"].item()
    assert lag > 50 * 999


@pytest.mark.parametrize("k", [1, 10, 100])
def test_power_profile_ramp_matches_closed_form(k: int) -> None:
    gamma, steps = fe.sigma_rel_to_gamma(0.05), 20000
    got = _ramp_average(fe.power(gamma=gamma), k, steps)
    n, g = steps // k, gamma + 1
    discrete = k * n - k * sum(j**g for j in range(n)) / n**g  # exact for samples at j k
    assert got == pytest.approx(discrete, rel=1e-6)
    continuous = (gamma + 1) / (gamma + 2) * steps  # the power-function average of the ramp
    assert abs(got - continuous) <= k / 2 + 1  # samples lead their interval by (k - 1) / 2
