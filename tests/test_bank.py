"""Decay banks: K averages of one tree, bit-equal to K separate updates."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import assert_bits_equal, snapshot

import functional_ema as fe
from functional_ema import _engine


def _tree(dtype: torch.dtype = torch.float32) -> dict:
    return {
        "w": torch.randn(4, 3).to(dtype),
        "b": torch.randn(3).to(dtype),
        "s": torch.randn(()).to(dtype),
        "n": torch.tensor(3),
    }


@pytest.mark.parametrize(
    "kernel", [False, pytest.param(True, marks=pytest.mark.compile)], ids=["eager", "kernel"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bank_rows_equal_separate_updates(
    dtype: torch.dtype, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel:  # the in-place bank runs the engine's bank kernel on every leaf
        monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
        monkeypatch.setattr(_engine.compiled, "enabled", True)
    params = _tree(dtype)
    decays = [0.0, 0.9, 0.999, 1.0]
    shadows = fe.bank(params, len(decays))
    singles = [optree.tree_map(torch.clone, params) for _ in decays]
    for _ in range(5):
        params = optree.tree_map(
            lambda t: t + torch.randn_like(t) if t.is_floating_point() else t + 1, params
        )
        before = snapshot(params)
        new = fe.ema_update_bank(shadows, params, decays)
        fe.ema_update_bank_(shadows, params, torch.tensor(decays))
        assert_bits_equal(new, shadows)
        assert_bits_equal(params, before)
        singles = [fe.ema_update(s, params, d) for s, d in zip(singles, decays, strict=True)]
    for k, single in enumerate(singles):
        assert_bits_equal(optree.tree_map(lambda t, k=k: t[k], shadows), single)
    if kernel:
        assert not _engine.compiled.fallbacks
        bad = optree.tree_map(torch.clone, params)
        bad["w"][1, 2] = float("nan")
        before = optree.tree_map(torch.clone, shadows)
        fe.ema_update_bank_(shadows, bad, decays)
        assert torch.equal(shadows["w"][:, 1, 2], before["w"][:, 1, 2])  # left out, every row
        assert_bits_equal(shadows, fe.ema_update_bank(before, bad, decays))


def test_bank_with_power_profiles_and_wide_dtype() -> None:
    params = {"w": torch.randn(8).to(torch.bfloat16)}
    shadows = fe.bank(params, 2, dtype=torch.float32)
    assert shadows["w"].dtype == torch.float32
    profiles = fe.power(sigma_rel=[0.05, 0.1])
    singles = [fe.power(sigma_rel=0.05), fe.power(sigma_rel=0.1)]
    rows = [shadows["w"][k].clone() for k in range(2)]
    for t in range(1, 20):
        params = {"w": params["w"] + 0.25}
        step, dt = torch.tensor(t), torch.tensor(1)
        decays = profiles(step, dt)
        assert decays.shape == (2,)
        fe.ema_update_bank_(shadows, params, decays)
        rows = [
            fe.ema_update({"w": r}, params, s(step, dt))["w"]
            for r, s in zip(rows, singles, strict=True)
        ]
    assert_bits_equal([shadows["w"][0], shadows["w"][1]], rows)


def test_vector_schedules() -> None:
    t, dt = torch.tensor(100), torch.tensor(10)
    assert fe.constant([0.9, 0.99])(t, dt).tolist() == pytest.approx([0.9**10, 0.99**10])
    assert fe.half_life([10, 20])(t, dt).tolist() == pytest.approx([0.5, 0.5**0.5])
    gammas = [fe.sigma_rel_to_gamma(0.05), fe.sigma_rel_to_gamma(0.1)]
    got = fe.power(sigma_rel=[0.05, 0.1])(t, dt).tolist()
    assert got == pytest.approx([0.9 ** (g + 1) for g in gammas])


def test_bank_errors_mutate_nothing() -> None:
    params = _tree()
    shadows = fe.bank(params, 3)
    before = snapshot(shadows)
    with pytest.raises(ValueError, match=r"^ema_update_bank_: bank size mismatch at 'b'"):
        fe.ema_update_bank_(shadows, params, [0.9, 0.99])
    with pytest.raises(ValueError, match=r"decays\[1\]\): `decay` must be in \[0, 1\], got 1.5"):
        fe.ema_update_bank_(shadows, params, [0.9, 1.5, 0.9])
    with pytest.raises(ValueError, match=r"^ema_update_bank_: `decays` must be a 1-D floating"):
        fe.ema_update_bank_(shadows, params, torch.tensor([[0.9, 0.9, 0.9]]))
    with pytest.raises(TypeError, match=r"^ema_update_bank_: `decays` must be a 1-D tensor or"):
        fe.ema_update_bank_(shadows, params, 0.9)  # type: ignore[arg-type]
    bad = dict(params, w=torch.randn(3, 4))
    with pytest.raises(
        ValueError, match=r"^ema_update_bank_: shape mismatch at 'w': expected \(4, 3\)"
    ):
        fe.ema_update_bank_(shadows, bad, [0.9, 0.9, 0.9])
    assert_bits_equal(shadows, before)
    with pytest.raises(ValueError, match=r"^bank: `size` must be an int >= 1, got 0"):
        fe.bank(params, 0)
