"""swap() restores the live model's slots, not just its values.

A forward inside ``with fe.swapped(...)`` / ``with ema.swap():`` may put new tensors in a
module's slots (``self.calls = self.calls + 1``), resize a buffer, reassign or delete a
parameter, or add a buffer; on exit, also when the body raises, every slot holds the object
it held on entry, with its entry layout and its entry bits.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from helpers import assert_bits_equal
from torch import nn

import functional_ema as fe


class Counter(nn.Module):
    """Counts its calls by reassigning a buffer (a new tensor in the slot every call)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 2)
        self.register_buffer("calls", torch.tensor(5))
        self.register_buffer("stats", torch.tensor([]))  # resized by the forward
        self.register_buffer("hist", torch.arange(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.linear(x)


class Resizing(Counter):
    """Also ``resize_``s buffers in its forward, as quantization observers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.stats.resize_(x.shape[1]).copy_(x.amax(dim=0))
            self.hist.resize_(7).fill_(-1.0)
        return super().forward(x)


def model_and_values(kind: type[Counter] = Counter) -> tuple[Counter, fe.Params, fe.Buffers]:
    """A model whose live tensors differ from the values swapped in."""
    model = kind()
    params = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    buffers = {
        "calls": torch.tensor(100),
        "stats": torch.tensor([]),
        "hist": torch.tensor([7.0, 8.0, 9.0]),
    }
    return model, params, buffers


def slots(model: nn.Module) -> dict[tuple[str, str, str], int]:
    """The identity of the object in every parameter and buffer slot, by module and name."""
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind, entries in (("param", module._parameters), ("buffer", module._buffers)):
            for name, value in entries.items():
                found[(prefix, kind, name)] = id(value)
    return found


def layouts(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Every tensor's storage, offset, shape and strides, by name."""
    return {
        name: (
            t.untyped_storage()._cdata,
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }


def values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
    }


def record(model: nn.Module) -> tuple[Any, ...]:
    return slots(model), layouts(model), values(model)


def assert_unchanged(model: nn.Module, before: tuple[Any, ...]) -> None:
    """The model is what it was: same objects in the slots, same layouts, same bits."""
    assert slots(model) == before[0]
    assert layouts(model) == before[1]
    assert_bits_equal(values(model), before[2])


def ema_swap(model: nn.Module) -> AbstractContextManager[nn.Module]:
    ema = fe.EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.get_buffer("calls").fill_(7)
    ema.update()  # the averages now differ from the live weights
    return ema.swap()


def swapped(model: nn.Module) -> AbstractContextManager[nn.Module]:
    _, params, buffers = model_and_values()
    return fe.swapped(model, params, buffers)


SWAPS = pytest.mark.parametrize("swap", [swapped, ema_swap], ids=["swapped", "ema.swap"])


@SWAPS
def test_reassigned_buffer_is_put_back(
    swap: Callable[[nn.Module], AbstractContextManager[nn.Module]],
) -> None:
    model = Counter()
    block = swap(model)
    before = record(model)
    calls = model.calls
    with block:
        model(torch.ones(2, 3))
        model(torch.ones(2, 3))
        assert model.calls is not calls
    assert_unchanged(model, before)
    assert model.calls is calls


def test_counter_returns_to_five_after_swapped() -> None:
    model, params, buffers = model_and_values()
    before = record(model)
    with fe.swapped(model, params, buffers):
        assert int(model.calls) == 100
        model(torch.ones(1, 3))
        assert int(model.calls) == 101
    assert_unchanged(model, before)
    assert int(model.calls) == 5


@SWAPS
def test_resized_buffers_are_put_back(
    swap: Callable[[nn.Module], AbstractContextManager[nn.Module]],
) -> None:
    model = Resizing()
    block = swap(model)
    before = record(model)
    with block:
        model(torch.ones(2, 3))
        assert model.stats.shape == (3,)
        assert model.hist.shape == (7,)
    assert_unchanged(model, before)
    assert model.stats.shape == (0,)
    assert model.hist.shape == (3,)


@SWAPS
def test_reassigned_and_removed_parameters_are_put_back(
    swap: Callable[[nn.Module], AbstractContextManager[nn.Module]],
) -> None:
    model = Counter()
    block = swap(model)
    before = record(model)
    weight = model.linear.weight
    with block:
        model.linear.weight = nn.Parameter(torch.zeros(2, 3))
        del model.linear.bias
        model.linear.register_buffer("extra", torch.ones(1))
        model.linear.register_parameter("added", nn.Parameter(torch.ones(2)))
    assert_unchanged(model, before)
    assert model.linear.weight is weight
    assert "extra" not in model.linear._buffers
    assert "added" not in model.linear._parameters


@SWAPS
def test_repointed_tensors_are_put_back(
    swap: Callable[[nn.Module], AbstractContextManager[nn.Module]],
) -> None:
    model = Counter()
    block = swap(model)
    before = record(model)
    with block:
        model.linear.weight.data = torch.zeros(4, 6)[::2, ::2]  # other storage and strides
        model.hist.data = torch.zeros(3, dtype=torch.float64)
    assert_unchanged(model, before)


@SWAPS
def test_slots_are_put_back_when_the_body_raises(
    swap: Callable[[nn.Module], AbstractContextManager[nn.Module]],
) -> None:
    model = Resizing()
    block = swap(model)
    before = record(model)

    def run() -> None:
        with block:
            model(torch.ones(2, 3))
            model.linear.weight = nn.Parameter(torch.zeros(2, 3))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run()
    assert_unchanged(model, before)
    with torch.no_grad():  # the model is usable and guarded no more
        model(torch.ones(1, 3))
    assert "calls" in model.state_dict()


def test_ema_keeps_working_after_the_block() -> None:
    model = Counter()
    plain = Counter()
    ema, ema_plain = fe.EMA(model, 0.9), fe.EMA(plain, 0.9)
    with ema.swap():
        model(torch.ones(1, 3))
        model.hist.resize_(5)
    for m, e in ((model, ema), (plain, ema_plain)):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)
        e.update()
    assert_bits_equal(ema.state(), ema_plain.state())
