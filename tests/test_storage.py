"""The adapter's cached update follows replaced storage.

Tensors in buffers laid out by ``flatten_parameters_`` are watched by the buffer's reference
count (no per-tensor work at each update); the others by their data pointers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import assert_bits_equal, mlp, train
from torch import nn

import functional_ema as fe
from functional_ema import _compat, _storage


def _count_pointer_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the guard's pointer reads to record how many tensors each call reads."""
    reads: list[int] = []
    real = _storage.data_ptrs

    def counting(tensors: list[torch.Tensor]) -> list[int]:
        reads.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(_storage, "data_ptrs", counting)
    return reads


def test_flattened_model_is_watched_by_reference_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    fe.flatten_parameters_(model)
    ema = fe.EMA(model, 0.9)
    train(model, ema, 2)
    guard = ema._bound[1]  # type: ignore[index]
    assert guard.loose == []
    assert len(guard.storages) == 2  # float32 parameters and statistics; the int64 count
    first = ema._validated()
    reads = _count_pointer_reads(monkeypatch)
    train(model, ema, 3)  # forward, backward, step, update: no pointer read at all
    assert reads == []
    assert ema._validated() is first


def test_unflattened_model_is_watched_by_pointers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    ema = fe.EMA(model, 0.9)
    ema.update()
    guard = ema._bound[1]  # type: ignore[index]
    assert len(guard.loose) == len([*model.parameters(), *model.buffers()]) == 9
    assert guard.storages == []
    reads = _count_pointer_reads(monkeypatch)
    ema.update()
    assert reads == [9]


def _data(model: nn.Module) -> None:
    model[0].weight.data = torch.ones_like(model[0].weight)


def _set(model: nn.Module) -> None:
    model[0].weight.set_(torch.ones_like(model[0].weight))


def _flatten_again(model: nn.Module) -> None:
    fe.flatten_parameters_(model)
    model[0].weight.fill_(1.0)


def _to_float64(model: nn.Module) -> None:
    model.to(torch.float64)
    model[0].weight.fill_(1.0)


@pytest.mark.parametrize("replace", [_data, _set, _flatten_again, _to_float64])
def test_flattened_model_follows_replaced_storage(replace: Callable[[nn.Module], None]) -> None:
    model = mlp()
    fe.flatten_parameters_(model)
    ema = fe.EMA(model, 0.5)
    ema.update()
    first = ema._validated()
    before = ema.state()["params"]["0.weight"].clone()
    with torch.no_grad():
        replace(model)
    ema.update()
    assert ema._validated() is not first
    # TF's order with weight 1 - 0.5: the new storage (all ones) was read, not the old buffer.
    assert_bits_equal(ema.state()["params"]["0.weight"], before - (before - 1.0) * 0.5)


def test_views_kept_by_the_caller_keep_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    fe.flatten_parameters_(model)
    ema = fe.EMA(model, 0.5)
    ema.update()
    first = ema._validated()
    reads = _count_pointer_reads(monkeypatch)
    view = model[0].weight.t()  # one more reference to the buffer: every pointer is read once
    assert ema._validated() is first
    assert ema._validated() is first
    assert reads == [9]
    del view
    assert ema._validated() is first
    assert reads == [9, 9]
    with torch.no_grad():
        model[3].bias.data = torch.zeros_like(model[3].bias)
    assert ema._validated() is not first


def test_without_reference_counts_every_tensor_is_watched_by_pointer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with _compat.forced_off("storage_use_count"):
        model = mlp()
        fe.flatten_parameters_(model)
        ema = fe.EMA(model, 0.5)
        ema.update()
    guard = ema._bound[1]  # type: ignore[index]
    assert len(guard.loose) == 9 and guard.storages == []
    first = ema._validated()
    with torch.no_grad():
        _data(model)
    assert ema._validated() is not first
