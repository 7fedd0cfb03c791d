"""The private-torch seam: each probe forced off runs its fallback, with the same results."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_bits_equal
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


def _pure_updates(steps: int = 3) -> fe.EmaState:
    """Pure updates of many small leaves (one region of averages, scattered values), with
    lazily negated and transposed values among them."""
    torch.manual_seed(0)
    params = {f"p{i:02d}": torch.randn(3, 2 + i % 3) for i in range(40)}
    state = fe.init(params)
    for _ in range(steps):
        params = {k: v + 0.25 * torch.randn_like(v) for k, v in params.items()}
        params["p01"] = torch._neg_view(params["p01"].neg())
        params["p02"] = params["p02"].t().contiguous().t()
        state = fe.update(state, params, 0.9)
    return state


@pytest.mark.parametrize("probe", ["chunk_cat", "unflatten_dense"])
def test_without_chunk_cat_or_unflatten_the_gathers_and_views_give_the_same_bits(
    probe: str,
) -> None:
    expected = _scattered_update(), _pure_updates()
    with _compat.forced_off(probe):
        got = _scattered_update(), _pure_updates()
    assert_bits_equal(got, expected)


def test_pure_updates_of_small_leaves_have_tf_bits() -> None:
    """The pure path's one-region runs against TF's update written out leaf by leaf."""
    torch.manual_seed(0)
    params = {f"p{i:02d}": torch.randn(3, 2 + i % 3) for i in range(40)}
    state = fe.init(params)
    expected = {k: v.clone() for k, v in params.items()}
    weight = torch.tensor(1.0) - torch.tensor(0.9)
    for _ in range(3):
        params = {k: v + 0.25 * torch.randn_like(v) for k, v in params.items()}
        state = fe.update(state, params, 0.9)
        expected = {k: s - (s - params[k]) * weight for k, s in expected.items()}
    assert_bits_equal(dict(state["params"]), expected)


def test_without_tensor_guards_the_python_check_gives_the_same_answers() -> None:
    base = torch.zeros(4, 4)
    changed = [
        base.t(),
        base[:2],
        base.double(),
        base.view(2, 8),
        torch.zeros(4, 4, requires_grad=True),
        nn.Parameter(base.clone()),
        base.clone(),  # same metadata: storage is the caller's check
    ]
    answers = [_compat.tensor_check([base])([t]) for t in changed]
    with _compat.forced_off("tensor_guards"):
        fallback = [_compat.tensor_check([base])([t]) for t in changed]
    assert _compat.available("tensor_guards")  # the C++ guards ran above
    assert fallback[:-2] == answers[:-2] == [False] * 5
    assert answers[-1] and fallback[-1]
    assert not fallback[-2]  # the Python check also compares the tensor's type


def test_without_fsdp_state_the_gathered_check_defers_to_the_update() -> None:
    with _compat.forced_off("fsdp_state"):
        assert _compat.fsdp_unsharded(nn.Linear(2, 2)) is None


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> _kernels.Compiled:
    """A new kernel cache, compiling on, used by the engine for every region size."""
    kernels = _kernels.Compiled()
    kernels.enabled = True
    kernels.synchronous = True  # every update waits for its kernel's build
    monkeypatch.setattr(_engine, "compiled", kernels)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
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


def test_without_dynamo_counters_an_imported_compiler_counts_as_in_use() -> None:
    import torch._dynamo  # noqa: F401  (what an optimizer's first step does)

    assert isinstance(_compat.compile_count(), int)
    with _compat.forced_off("dynamo_counters"):
        assert _compat.compile_count() is None
        assert not _kernels.compiler_idle()  # so updates wait for their kernel's build


def test_without_compile_lock_builds_take_no_lock(fresh: _kernels.Compiled) -> None:
    fresh.enabled = False
    expected = _scattered_update()
    fresh.enabled = True
    with _compat.forced_off("compile_lock"):
        assert isinstance(_compat.compile_lock(), contextlib.nullcontext)
        with pytest.MonkeyPatch.context() as patch:  # the kernel's function, not compiled
            patch.setattr(_kernels, "standalone_compile", lambda fn, examples: fn)
            got = _scattered_update()
    assert fresh.built and not fresh.fallbacks
    assert_bits_equal(got, expected)


def test_torch_compiled_kernels_own_their_code_and_fall_back_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each build compiles its own code object (Dynamo's graphs are kept per code object: a
    shared one would collect every dtype's graphs and hit the recompile limit); a call Dynamo
    refuses runs the function eagerly, the same operations."""
    compiled_functions = []

    def fake_compile(fn, **_):  # type: ignore[no-untyped-def]
        compiled_functions.append(fn)
        calls = []

        def run(*args):  # type: ignore[no-untyped-def]
            calls.append(args)
            if len(calls) > 1:
                raise RuntimeError("recompile limit")  # what fullgraph=True raises
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    rows = (torch.randn(2, 8), torch.randn(2, 8), torch.tensor(0.5), torch.tensor(True))
    kernel = _compat.dynamo_compile(_kernels.update_rows_masked, rows)  # compiles, runs once
    other = _compat.dynamo_compile(_kernels.update_rows_masked, rows)
    assert compiled_functions[0].__code__ is not _kernels.update_rows_masked.__code__
    assert compiled_functions[0].__code__ is not compiled_functions[1].__code__
    shadow, value = torch.randn(3, 8), torch.randn(3, 8)
    expected = shadow.clone()
    _kernels.update_rows_masked(expected, value, rows[2], rows[3])
    flags = kernel(shadow, value, rows[2], rows[3])  # refused: eager
    assert torch.equal(shadow, expected) and bool(flags[0])
    assert other is not kernel
