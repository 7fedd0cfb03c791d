"""Decay banks: K averages of one tree, bit-equal to K separate updates."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
        monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
        monkeypatch.setattr(_engine.compiled, "enabled", True)
        monkeypatch.setattr(_engine.compiled, "synchronous", True)  # kernels from the start
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
    with pytest.raises(ValueError, match=r"out of range at 'decays\[1\]': .* got 1.5\."):
        fe.ema_update_bank_(shadows, params, [0.9, 1.5, 0.9])
    with pytest.raises(ValueError, match=r"^ema_update_bank_: decays not 1-D at 'decays'"):
        fe.ema_update_bank_(shadows, params, torch.tensor([[0.9, 0.9, 0.9]]))
    with pytest.raises(TypeError, match=r"^ema_update_bank_: decays of a non-floating dtype"):
        fe.ema_update_bank_(shadows, params, torch.tensor([1, 1, 1]))
    with pytest.raises(TypeError, match=r"^ema_update_bank_: decays of the wrong type"):
        fe.ema_update_bank_(shadows, params, 0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ema_update_bank_: no decays at 'decays'"):
        fe.ema_update_bank_(shadows, params, [])
    bad = dict(params, w=torch.randn(3, 4))
    with pytest.raises(
        ValueError, match=r"^ema_update_bank_: shape mismatch at 'w': expected \(4, 3\)"
    ):
        fe.ema_update_bank_(shadows, bad, [0.9, 0.9, 0.9])
    assert_bits_equal(shadows, before)
    with pytest.raises(ValueError, match=r"^bank: bank size out of range at 'size': .* got 0\."):
        fe.bank(params, 0)
    with pytest.raises(TypeError, match=r"^bank: bank size of the wrong type at 'size'"):
        fe.bank(params, 2.0)  # type: ignore[arg-type]


_SHARDED = textwrap.dedent(
    """
    # One rank (gloo): banks and a post-hoc tracker of DTensor params (a value sharded on
    # dim 0 meets averages sharded on dim 1), against the same on plain tensors, bit for bit,
    # with no collective in any update.
    import sys, torch, torch.distributed as dist
    import optree
    import functional_ema as fe
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
    mesh = DeviceMesh("cpu", [0])
    placements = {"w": [Shard(0)], "b": [Replicate()], "n": [Replicate()]}


    def sharded(tree):
        return {k: distribute_tensor(v, mesh, placements[k]) for k, v in tree.items()}


    def full(tree):
        return {k: v.full_tensor() for k, v in tree.items()}


    def values(step):
        w = torch.randn(6, 4)
        if step == 2:
            w[1, 3] = float("nan")
        return {"w": w, "b": torch.randn(4), "n": torch.tensor(step)}


    torch.manual_seed(0)
    start = values(0)
    decays = [0.5, 0.9, 0.99]
    plain, bank = fe.bank(start, 3), fe.bank(sharded(start), 3)
    assert bank["w"].placements == (Shard(1),), bank["w"].placements
    tracker_plain = fe.posthoc_init(start, sigma_rel=(0.05, 0.1))
    tracker = fe.posthoc_init(sharded(start), sigma_rel=(0.05, 0.1))
    for step in range(1, 5):
        current = values(step)
        fe.ema_update_bank_(plain, current, decays)
        fe.posthoc_update_(tracker_plain, current, dt=2)
        current_sharded = sharded(current)
        with CommDebugMode() as comm:
            fe.ema_update_bank_(bank, current_sharded, decays)
            fe.posthoc_update_(tracker, current_sharded, dt=2)
            pure = fe.ema_update_bank(bank, current_sharded, decays)
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        assert pure["w"].placements == (Shard(1),)
        for got, want in ((full(bank), plain), (full(tracker["params"]), tracker_plain["params"])):
            for k in want:
                assert torch.equal(got[k], want[k]), (step, k)
        expected = fe.ema_update_bank(plain, current, decays)
        assert all(torch.equal(full(pure)[k], expected[k]) for k in expected)
    try:
        fe.posthoc_update_(tracker, current)
    except ValueError as error:
        assert "sharding mismatch at 'b'" in str(error), error
    else:
        raise AssertionError("a plain value met a sharded average")
    dist.destroy_process_group()
    print("ok")
    """
)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="no torch.distributed with gloo",
)
def test_dtensor_banks_update_their_local_shards(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]
