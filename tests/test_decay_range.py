"""Decay and ``dt`` values: range-checked on the host where that is free, on the device otherwise.

A number or a CPU tensor (a decay, a schedule's decay, ``dt``) is read and rejected with a
``ValueError`` before anything is written. A tensor the host does not read (on an
accelerator, or traced) is checked on its device: an out-of-range update leaves every average
bit for bit unchanged and counts in ``state["nonfinite_updates"]``, with no host sync. The
accelerator branch is chosen by ``_decay._host_readable``; the tests replace it to run that
branch on CPU tensors.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import NoHostSync, assert_bits_equal, snapshot
from torch import nn

import functional_ema as fe
from functional_ema import _decay, _engine, _kernels


NAN = float("nan")
BAD_DECAYS = [1.5, -0.1, NAN]
UPDATES = {"update": fe.update, "update_": fe.update_}


def _state(**init: object) -> fe.EmaState:
    params = {"w": torch.tensor([1.0, -0.0, 3.0, 4.0]), "b": torch.arange(300.0)}
    return fe.init(params, {"n": torch.tensor(2), "m": torch.ones(3)}, **init)  # type: ignore[arg-type]


def _values(nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Values; with ``nonfinite``, a NaN and an Inf, and a value that would turn -0.0 to 0.0."""
    w = [2.0, 5.0, NAN, -float("inf")] if nonfinite else [2.0, -0.0, 1.0, 0.5]
    return {"w": torch.tensor(w), "b": torch.linspace(-1.0, 1.0, 300)}


def _buffers() -> dict[str, torch.Tensor]:
    return {"n": torch.tensor(7), "m": torch.full((3,), 5.0)}


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor counts as not host-readable: the accelerator branch, on CPU tensors."""
    monkeypatch.setattr(_decay, "_host_readable", lambda tensor: False)


# --- numbers and CPU tensors: ValueError before anything is written ----------------------


@pytest.mark.parametrize("name", list(UPDATES))
@pytest.mark.parametrize("value", BAD_DECAYS, ids=["1.5", "-0.1", "nan"])
def test_cpu_tensor_decay_out_of_range_raises_before_any_write(name: str, value: float) -> None:
    state = _state()
    before = snapshot(state)
    expected = f"{name}: decay out of range at 'decay': expected a number in [0, 1], got a tensor "
    with pytest.raises(ValueError, match=re.escape(expected + f"holding {value!r}")):
        UPDATES[name](state, _values(), torch.tensor(value), _buffers())
    assert_bits_equal(state, before)


@pytest.mark.parametrize("name", list(UPDATES))
@pytest.mark.parametrize("dt", [0, -3])
def test_cpu_tensor_dt_below_one_raises_before_any_write(name: str, dt: int) -> None:
    state = _state()
    before = snapshot(state)
    expected = f"{name}: dt out of range at 'dt': expected an int >= 1, got a tensor holding {dt}."
    with pytest.raises(ValueError, match=re.escape(expected)):
        UPDATES[name](state, _values(), 0.9, _buffers(), dt=torch.tensor(dt))
    assert_bits_equal(state, before)


@pytest.mark.parametrize("name", list(UPDATES))
@pytest.mark.parametrize("value", BAD_DECAYS, ids=["1.5", "-0.1", "nan"])
def test_schedule_returning_an_out_of_range_tensor_raises_before_any_write(
    name: str, value: float
) -> None:
    state = _state()
    before = snapshot(state)
    expected = f"{name} (schedule): decay out of range at 'decay': expected a number in [0, 1]"
    with pytest.raises(ValueError, match=re.escape(expected)):
        UPDATES[name](state, _values(), lambda t, dt: torch.tensor(value), _buffers())
    assert_bits_equal(state, before)


def test_adapter_rejects_an_out_of_range_tensor_decay_and_schedule() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^EMA: decay out of range at 'decay'"):
        fe.EMA(model, torch.tensor(1.5))
    ema = fe.EMA(model, lambda t, dt: torch.tensor(NAN))
    before = snapshot(ema.state())
    with pytest.raises(ValueError, match=r"\(schedule\): decay out of range at 'decay'.* nan"):
        ema.update()
    assert_bits_equal(ema.state(), before)


@pytest.mark.parametrize("inplace", [False, True], ids=["ema_update", "ema_update_"])
def test_ema_update_and_bank_reject_out_of_range_cpu_tensors(inplace: bool) -> None:
    shadow = {"w": torch.zeros(3)}
    update = fe.ema_update_ if inplace else fe.ema_update
    with pytest.raises(ValueError, match=r"decay out of range at 'decay'.* holding 1\.5"):
        update(shadow, {"w": torch.ones(3)}, torch.tensor(1.5))
    shadows = fe.bank(shadow, 3)
    before = snapshot(shadows)
    bank_update = fe.ema_update_bank_ if inplace else fe.ema_update_bank
    with pytest.raises(ValueError, match=r"decay out of range at 'decays\[1\]'.* holding nan"):
        bank_update(shadows, {"w": torch.ones(3)}, torch.tensor([0.9, NAN, 0.99]))
    assert_bits_equal(shadows, before)
    assert_bits_equal(shadow, {"w": torch.zeros(3)})


def test_in_range_cpu_tensors_still_give_the_float_bits() -> None:
    state, reference = _state(), _state()
    fe.update_(state, _values(), torch.tensor(0.9, dtype=torch.float64), _buffers())
    fe.update_(reference, _values(), 0.9, _buffers())
    assert_bits_equal(state, reference)
    fe.update_(state, _values(), 1.0, _buffers(), dt=torch.tensor(3))
    fe.update_(reference, _values(), 1.0, _buffers(), dt=3)
    assert_bits_equal(state, reference)


# --- tensors the host does not read: counted on the device, averages unchanged ------------


def _skipped(before: fe.EmaState, after: fe.EmaState, *, steps: int) -> None:
    """``after`` is ``before`` with the update skipped: averages kept, counted once."""
    assert_bits_equal(after["params"], before["params"])
    for key in ("biased", "local_step"):
        if key in before:
            assert_bits_equal(after[key], before[key])
    assert_bits_equal(after["buffers"]["m"], before["buffers"]["m"])  # averaged buffer
    assert torch.equal(after["buffers"]["n"], torch.tensor(7))  # integers are copied
    assert int(after["step"]) == int(before["step"]) + steps
    assert int(after["nonfinite_updates"]) == int(before["nonfinite_updates"]) + 1


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("zero_debias", [False, True], ids=["plain", "zero_debias"])
@pytest.mark.parametrize("name", list(UPDATES))
@pytest.mark.parametrize("value", BAD_DECAYS, ids=["1.5", "-0.1", "nan"])
def test_device_decay_out_of_range_is_counted_and_keeps_every_bit(
    name: str, value: float, zero_debias: bool, nonfinite: str, on_device: None
) -> None:
    state = _state(zero_debias=zero_debias)
    update = UPDATES[name]
    kwargs = {"buffer_policy": "average", "nonfinite": nonfinite}
    state = update(state, _values(), 0.5, _buffers(), **kwargs)  # moved; a -0.0 average kept
    if not zero_debias:
        assert str(state["params"]["w"][1].item()) == "-0.0"
    before = snapshot(state)
    after = update(state, _values(nonfinite=True), torch.tensor(value), _buffers(), **kwargs)
    _skipped(before, after, steps=1)
    if name == "update":
        assert_bits_equal(state, before)  # the pure update wrote nothing


@pytest.mark.parametrize("name", list(UPDATES))
@pytest.mark.parametrize("dt", [0, -3])
def test_device_dt_below_one_is_counted_and_does_not_advance_the_step(
    name: str, dt: int, on_device: None
) -> None:
    state = _state()
    before = snapshot(state)
    after = UPDATES[name](
        state, _values(), 0.9, _buffers(), buffer_policy="average", dt=torch.tensor(dt)
    )
    _skipped(before, after, steps=0)


@pytest.mark.parametrize("name", list(UPDATES))
def test_device_schedule_out_of_range_is_counted(name: str, on_device: None) -> None:
    state = _state()
    before = snapshot(state)
    schedule = lambda t, dt: torch.tensor(1.5)  # noqa: E731
    after = UPDATES[name](state, _values(), schedule, _buffers(), buffer_policy="average")
    _skipped(before, after, steps=1)


@pytest.mark.parametrize("name", list(UPDATES))
def test_device_values_in_range_give_the_host_checked_bits(name: str, on_device: None) -> None:
    got, expected = _state(), _state()
    for step in range(1, 4):
        decay, dt = torch.tensor(0.5 + 0.1 * step), torch.tensor(step)
        got = UPDATES[name](got, _values(step == 2), decay, _buffers(), dt=dt)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_decay, "_host_readable", lambda tensor: True)
            expected = UPDATES[name](expected, _values(step == 2), decay, _buffers(), dt=dt)
    assert_bits_equal(got, expected)
    assert int(got["nonfinite_updates"]) == 1  # the non-finite values of step 2 only


def test_device_check_reads_nothing_on_the_host() -> None:
    device = torch.device("meta")  # no data: any host read fails
    state = fe.init({"w": torch.empty(4, device=device)})
    dt = torch.ones((), dtype=torch.int64, device=device)
    with NoHostSync():
        fe.update_(state, {"w": torch.empty(4, device=device)}, torch.empty((), device=device))
        fe.update(state, {"w": torch.empty(4, device=device)}, 0.9, dt=dt)


@pytest.mark.parametrize("inplace", [False, True], ids=["ema_update", "ema_update_"])
def test_device_decay_out_of_range_leaves_ema_update_averages_unchanged(
    inplace: bool, on_device: None
) -> None:
    shadow = {"w": torch.tensor([1.0, -0.0, float("inf")]), "b": torch.arange(300.0)}
    before = snapshot(shadow)
    values = {"w": torch.tensor([2.0, 3.0, NAN]), "b": torch.zeros(300)}
    update = fe.ema_update_ if inplace else fe.ema_update
    assert_bits_equal(update(shadow, values, torch.tensor(NAN)), before)
    assert_bits_equal(shadow, before)


def _as_kernel(fn: _kernels.Kernel, examples: tuple[torch.Tensor, ...]) -> _kernels.Kernel:
    return fn  # the kernel's function, run eagerly: its arithmetic, no compile


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_kernel_keeps_every_bit_when_the_device_check_fails(
    nonfinite: str, monkeypatch: pytest.MonkeyPatch, on_device: None
) -> None:
    kernels = _kernels.Compiled()
    kernels.enabled = kernels.synchronous = True
    monkeypatch.setattr(_engine, "compiled", kernels)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_kernels, "standalone_compile", _as_kernel)
    state = _state()
    fe.update_(state, _values(), 0.5, _buffers(), nonfinite=nonfinite)
    before = snapshot(state)
    fe.update_(state, _values(nonfinite=True), torch.tensor(NAN), _buffers(), nonfinite=nonfinite)
    assert kernels.built  # the regions ran the kernel
    assert_bits_equal(state["params"], before["params"])
    assert int(state["nonfinite_updates"]) == int(before["nonfinite_updates"]) + 1
    fe.update_(state, _values(), torch.tensor(0.5), _buffers(), nonfinite=nonfinite)
    reference = fe.update_(before, _values(), 0.5, _buffers(), nonfinite=nonfinite)
    assert_bits_equal(state["params"], reference["params"])


@pytest.mark.compile
def test_compiled_kernel_keeps_every_bit_when_the_device_check_fails(
    monkeypatch: pytest.MonkeyPatch, on_device: None
) -> None:
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_engine.compiled, "enabled", True)
    monkeypatch.setattr(_engine.compiled, "synchronous", True)
    state = _state()
    fe.update_(state, _values(), 0.5, _buffers())
    before = snapshot(state)
    fe.update_(state, _values(nonfinite=True), torch.tensor(1.5), _buffers())
    assert (True, False, "cpu", torch.float32, torch.float32, False) in _engine.compiled.built
    assert_bits_equal(state["params"], before["params"])
    assert int(state["nonfinite_updates"]) == 1
