"""The batched strategy (what accelerators use), run on CPU tensors: TF's bits and launch budgets.

On a GPU each dispatched operation or compiled-kernel call is a launch that costs host time, so
an update must cost O(dtype groups + bytes / chunk) of them, however many tensors the model has.
Here they are counted on the CPU: every aten operation that reaches the dispatcher (a
``TorchDispatchMode``; views included) plus every call of a compiled kernel.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import optree
import pytest
import torch
from helpers import DTYPES, VARIABLE_CASES, get_case, leaves_at, step_decay
from test_tf_parity import assert_bits_equal
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import functional_ema as fe
from functional_ema import _engine
from functional_ema._engine import use_strategy
from functional_ema._kernels import compiled


PER_UNIT = 40
"""Launches allowed per unit of (dtype groups + chunks): the budget's constant ``c``."""


class _Ops(TorchDispatchMode):
    """Counts every aten operation dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _count(fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> tuple[int, Counter[str]]:
    """Launches of one call of ``fn``: dispatched operations plus compiled-kernel calls."""
    calls = Counter[str]()
    kernel = compiled.kernel

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        built = kernel(*args, **kwargs)
        if built is None:
            return None

        def call(*inputs: Tensor) -> list[Tensor]:
            calls["compiled kernel"] += 1
            return built(*inputs)

        return call

    with monkeypatch.context() as patch:
        patch.setattr(compiled, "kernel", counting)
        with _Ops() as mode:
            fn()
    launches = mode.ops + calls
    return sum(launches.values()), launches


def _model(tensors: int) -> nn.Module:
    """A model with about ``tensors`` parameters (16, 161 or 4000), of mixed shapes."""
    if tensors == 4000:
        return nn.Sequential(*[nn.Linear(16, 16) for _ in range(2000)])
    if tensors == 16:
        return nn.Sequential(*[nn.Linear(256 + 32 * i, 256 + 32 * (i + 1)) for i in range(8)])
    # 161: ResNet-like, conv weights with batch norms (their buffers too), and a classifier.
    layers: list[nn.Module] = []
    width = 16
    for i in range(53):
        out = 16 * (1 + i % 8)
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)]
        width = out
    layers += [nn.Flatten(), nn.LazyLinear(10)]
    model = nn.Sequential(*layers)
    model(torch.randn(1, 16, 2, 2))
    return model


def _budget(*trees: dict[str, Tensor]) -> tuple[int, int]:
    """``(groups + chunks, launches allowed)`` for one update of ``trees``.

    A group per tree and dtype, and its chunks (:func:`_engine.batch_chunk`).
    """
    by_dtype = Counter[tuple[int, torch.dtype]]()
    for index, tree in enumerate(trees):
        for p in tree.values():
            by_dtype[index, p.dtype] += p.numel()
    units = sum(1 + math.ceil(n / _engine.batch_chunk(n)) for n in by_dtype.values())
    return units, PER_UNIT * units


@pytest.fixture(params=["kernels", "eager"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """With compiled kernels (built before counting) or the eager path only."""
    if request.param == "eager":
        monkeypatch.setattr(compiled, "enabled", False)
    else:
        monkeypatch.setattr(compiled, "synchronous", True)
    return request.param


@pytest.mark.parametrize("tensors", [16, 161, 4000])
@pytest.mark.parametrize("path", ["update_", "update", "ema_update_", "adapter"])
def test_launches_do_not_grow_with_the_number_of_tensors(
    tensors: int, path: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tensors)
    params, buffers = fe.module_state(model)
    assert len(params) == tensors
    state = fe.init(params, buffers)
    shadow = {k: v.clone() for k, v in params.items()}
    ema = fe.EMA(model, 0.999)
    box = {"state": state}
    calls: dict[str, Callable[[], object]] = {
        "update_": lambda: fe.update_(state, params, 0.999, buffers),
        "update": lambda: box.update(state=fe.update(box["state"], params, 0.999, buffers)),
        "ema_update_": lambda: fe.ema_update_(shadow, params, 0.999),
        "adapter": ema.update,
    }
    with use_strategy("batched"):
        # Builds the kernels and what is kept: the adapter's plan, update_'s from its second
        # call, each kept plan's views of its gather buffers on its second run. Then counts
        # a call of the steady state (update and ema_update_ keep nothing: every call plans).
        for _ in range(3):
            calls[path]()
        compiled.wait()
        launches, seen = _count(calls[path], monkeypatch)
    units, allowed = _budget(params) if path == "ema_update_" else _budget(params, buffers)
    print(f"{path} {tensors} tensors {kernels}: {launches} launches ({units} units)")
    assert launches <= allowed, f"{launches} launches > {allowed}: {seen.most_common(8)}"


@pytest.mark.parametrize("path", ["update", "update_"])
def test_the_pure_update_of_161_tensors_dispatches_at_most_64_operations(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "synchronous", True)
    params, buffers = fe.module_state(_model(161))
    state = fe.init(params, buffers)
    box = {"state": state}

    def pure() -> None:
        box["state"] = fe.update(box["state"], params, 0.999, buffers)

    def inplace() -> None:
        fe.update_(state, params, 0.999, buffers)

    call = pure if path == "update" else inplace
    with use_strategy("batched"):
        call()
        compiled.wait()
        launches, seen = _count(call, monkeypatch)
    assert launches <= 64, seen.most_common(10)


def _scattered(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each leaf in its own storage, some transposed (no region to find)."""
    return {k: v.t().clone().t() if v.ndim == 2 else v.clone() for k, v in tree.items()}


@pytest.mark.parametrize("path", ["update_", "ema_update_", "scattered ema_update_", "adapter"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_batched_strategy_replays_tf_bit_for_bit(
    dtype_name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "BATCH_MIN", 5)  # chunk boundaries inside the fixtures' leaves
    dtype = DTYPES[dtype_name]
    for case_name in VARIABLE_CASES:
        case = get_case(dtype_name, case_name)
        init = leaves_at(case, dtype, "init")
        state = fe.init(init)
        shadow = _scattered(init) if path.startswith("scattered") else dict(init)
        module = nn.Module()
        for name, value in init.items():
            module.register_parameter(name, nn.Parameter(value.clone()))
        ema = fe.EMA(module, 0.5)
        with use_strategy("batched"):
            for t in range(1, len(case["decay"]) + 1):
                values = leaves_at(case, dtype, "values", t)
                decay = step_decay(case, t)
                if path == "update_":
                    fe.update_(state, values, decay)
                    got = fe.average(state)
                elif path == "adapter":
                    with torch.no_grad():
                        for name, value in values.items():
                            getattr(module, name).copy_(value)
                    ema.decay = decay
                    ema.update()
                    got = dict(ema.state()["params"])
                else:
                    fe.ema_update_(shadow, values, decay)
                    got = shadow
                where = f"[{path}, batched] tf_{dtype_name} {case_name!r} t={t}"
                assert_bits_equal(got, leaves_at(case, dtype, "average", t), where)
    assert optree.tree_structure(state) == optree.tree_structure(fe.init(init))
