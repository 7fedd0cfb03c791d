"""Non-finite values: skipped (default, counted on the device), rejected, or propagated."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import NoHostSync, assert_bits_equal, snapshot
from torch import nn

import functional_ema as fe
from functional_ema import _engine


def _poisoned() -> tuple[dict, dict, dict]:
    shadow = {"a": torch.randn(40), "b": torch.randn(5, 3)}
    clean = optree.tree_map(lambda t: t + 1, shadow)
    bad = optree.tree_map(torch.clone, clean)
    bad["a"][[3, 17]] = torch.tensor([float("nan"), float("inf")])
    bad["b"][1, 2] = -float("inf")
    return shadow, clean, bad


def _expected(shadow: dict, clean: dict, bad: dict) -> dict:
    """The clean update where values are finite, the old average elsewhere."""
    updated = fe.ema_update(shadow, clean, 0.9)
    return optree.tree_map(
        lambda u, s, b: torch.where(torch.isfinite(b), u, s), updated, shadow, bad
    )


@pytest.mark.parametrize("path", ["pure", "inplace", "engine-region", "engine-gather", "leaves"])
def test_skip_leaves_nonfinite_values_out(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "CHUNK", 8)
    monkeypatch.setattr(_engine, "MIN_CHUNK", 8)
    monkeypatch.setattr(_engine.compiled, "enabled", False)
    shadow, clean, bad = _poisoned()
    expected = _expected(shadow, clean, bad)
    if path == "pure":
        got = fe.ema_update(shadow, bad, 0.9)
    else:
        state = fe.init(shadow) if path.startswith("engine") else {"params": shadow}
        if path == "engine-region":
            bad = fe.init(bad)["params"]  # laid out like the averages: one region
        if path == "leaves":
            monkeypatch.setattr(_engine, "GATHER_BELOW", 0)
        fe.ema_update_(state["params"], bad, 0.9)
        got = state["params"]
    assert_bits_equal(got, expected)


@pytest.mark.parametrize("inplace", [False, True])
def test_state_counts_updates_with_nonfinite_values(inplace: bool) -> None:
    shadow, clean, bad = _poisoned()
    state = fe.init(shadow)
    apply = fe.update_ if inplace else fe.update
    for values in (clean, bad, clean, bad, bad):
        state = apply(state, values, 0.9)
    assert state["nonfinite_updates"].item() == 3
    assert state["step"].item() == 5
    assert all(torch.isfinite(t).all() for t in optree.tree_leaves(state["params"]))


def test_raise_names_the_leaf_and_writes_nothing() -> None:
    shadow, _, bad = _poisoned()
    state = fe.init(shadow)
    before = snapshot(state)
    with pytest.raises(
        ValueError,
        match=r"^update_: non-finite value at 'a': expected finite params, got 1 NaN and 1 Inf\. "
        r"Nothing was updated",
    ):
        fe.update_(state, bad, 0.9, nonfinite="raise")
    assert_bits_equal(state, before)
    with pytest.raises(ValueError, match=r"^ema_update_: non-finite value at 'a'"):
        fe.ema_update_(state["params"], bad, 0.9, nonfinite="raise")
    assert_bits_equal(state, before)


def test_propagate_is_tfs_behaviour() -> None:
    shadow, _, bad = _poisoned()
    out = fe.ema_update(shadow, bad, 0.9, nonfinite="propagate")
    assert torch.isnan(out["a"][3])
    assert torch.isinf(out["a"][17])


def test_bad_policy() -> None:
    shadow, clean, _ = _poisoned()
    with pytest.raises(
        ValueError,
        match=r"^ema_update: unknown option at 'nonfinite': expected 'skip', 'raise' or "
        r"'propagate', got 'drop'",
    ):
        fe.ema_update(shadow, clean, 0.9, nonfinite="drop")  # type: ignore[arg-type]


def test_adapter_skips_and_counts() -> None:
    model = nn.Linear(4, 3)
    ema = fe.EMA(model, 0.5)
    before = ema.state()["params"]["weight"].clone()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    ema.update()
    assert ema.nonfinite_updates.item() == 1
    assert ema.state()["params"]["weight"][0, 0] == before[0, 0]
    assert torch.isfinite(ema.state()["params"]["weight"]).all()
    strict = fe.EMA(nn.Linear(4, 3), 0.5, nonfinite="raise")
    with torch.no_grad():
        strict.model.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"^EMA.update: non-finite value at 'bias'"):
        strict.update()
    assert strict.step.item() == 0


def test_bank_skip() -> None:
    shadow, clean, bad = _poisoned()
    shadows = fe.bank(shadow, 2)
    out = fe.ema_update_bank(shadows, bad, [0.9, 0.9])
    expected = _expected(shadow, clean, bad)
    assert_bits_equal(optree.tree_map(lambda t: t[1], out), expected)


def test_skip_has_no_host_sync() -> None:
    device = torch.device("meta")
    shadow = {"w": torch.empty(4, device=device)}
    state = fe.init(shadow)
    with NoHostSync():
        fe.update(state, {"w": torch.empty(4, device=device)}, torch.empty((), device=device))
        fe.ema_update(shadow, {"w": torch.empty(4, device=device)}, 0.5)


@pytest.mark.compile
def test_compiled_kernel_skips_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_engine.compiled, "enabled", True)
    monkeypatch.setattr(_engine.compiled, "synchronous", True)  # kernels from the start
    shadow, clean, bad = _poisoned()
    expected = _expected(shadow, clean, bad)
    state = fe.init(shadow)
    fe.update_(state, fe.init(bad)["params"], 0.9)
    fe.update_(state, fe.init(clean)["params"], 0.0, nonfinite="propagate")
    assert not _engine.compiled.fallbacks
    assert state["nonfinite_updates"].item() == 1
    state = fe.init(shadow)
    fe.update_(state, fe.init(bad)["params"], 0.9)
    assert_bits_equal(state["params"], expected)
