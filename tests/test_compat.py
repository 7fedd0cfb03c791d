"""The private-torch seam: each probe forced off runs its fallback, with the same results."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal, mlp, train
from torch import nn

import functional_ema as fe
from functional_ema import _compat, _engine, _kernels


def _scattered_update(steps: int = 3) -> fe.EmaState:
    """Updates from values that are not laid out like the averages (gather + copy paths)."""
    torch.manual_seed(0)
    params = {f"p{i}": torch.randn(5 + i) for i in range(6)}
    state = fe.init(params, {"count": torch.tensor(0)})
    for step in range(steps):
        params = {k: v + 0.25 * torch.randn_like(v) for k, v in params.items()}
        fe.update_(state, params, 0.9, buffers={"count": torch.tensor(step)})
    return state


def test_every_probe_answers_a_bool_and_unknown_names_fail() -> None:
    for probe in _compat.PROBES:
        assert isinstance(_compat.available(probe), bool)
    with pytest.raises(ValueError, match="unknown probe 'nope'"):
        _compat.available("nope")


def test_forced_off_is_scoped() -> None:
    before = _compat.available("foreach_copy")
    with _compat.forced_off("foreach_copy"):
        assert not _compat.available("foreach_copy")
    assert _compat.available("foreach_copy") == before


def test_without_functorch_probe_the_engine_steps_aside_with_the_same_bits() -> None:
    expected = _scattered_update()
    t = torch.zeros(3)
    with torch.no_grad():
        assert _engine.fast_path_ok(t)
        with _compat.forced_off("functorch"):
            assert _compat.is_functorch_wrapped(t)
            assert not _engine.fast_path_ok(t)
            got = _scattered_update()
    assert_bits_equal(got, expected)


def test_without_foreach_copy_the_gather_copies_one_by_one() -> None:
    expected = _scattered_update()
    with _compat.forced_off("foreach_copy"):
        got = _scattered_update()
    assert_bits_equal(got, expected)


def test_without_storage_counts_the_adapter_keeps_the_bits() -> None:
    plain = mlp()
    ema_plain = fe.EMA(plain, 0.9)
    train(plain, ema_plain, 4)
    with _compat.forced_off("storage_use_count"):
        assert _compat.storage_use_count(torch.UntypedStorage(4)) is None
        model = fe.flatten_parameters_(mlp())
        ema = fe.EMA(model, 0.9)
        train(model, ema, 4)
    assert_bits_equal(ema.state(), ema_plain.state())


def test_without_fsdp_state_the_gathered_check_defers_to_the_update() -> None:
    with _compat.forced_off("fsdp_state"):
        assert _compat.fsdp_unsharded(nn.Linear(2, 2)) is None


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> _kernels.Compiled:
    """A new kernel cache, compiling on, used by the engine for every region size."""
    kernels = _kernels.Compiled()
    kernels.enabled = True
    monkeypatch.setattr(_engine, "compiled", kernels)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    return kernels


@pytest.mark.compile
def test_without_standalone_compile_kernels_come_from_torch_compile(
    fresh: _kernels.Compiled,
) -> None:
    expected = _scattered_update()
    with _compat.forced_off("standalone_compile"):
        with pytest.raises(RuntimeError, match="standalone_compile is not available"):
            _compat.standalone_compile(_kernels.update_rows, ())
        got = _scattered_update()
    assert fresh.fallbacks == []
    assert_bits_equal(got, expected)


def test_without_precision_casts_nothing_is_compiled_and_the_bits_hold(
    fresh: _kernels.Compiled,
) -> None:
    fresh.enabled = False
    expected = _scattered_update()  # the eager path
    fresh.enabled = True
    with (
        _compat.forced_off("precision_casts"),
        pytest.warns(RuntimeWarning, match="Inductor's emulate_precision_casts is not available"),
    ):
        got = _scattered_update()
    assert fresh.fallbacks
    assert_bits_equal(got, expected)
