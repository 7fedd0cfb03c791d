"""Bad input: a clear error naming the path, expected and actual value; nothing mutated."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_bits_equal, snapshot
from torch import nn

import functional_ema as fe


def _tree() -> dict[str, torch.Tensor]:
    return {"0.weight": torch.randn(4, 2), "0.bias": torch.randn(4), "n": torch.tensor(3)}


def _values() -> dict[str, torch.Tensor]:
    return {"0.weight": torch.randn(4, 2), "0.bias": torch.randn(4), "n": torch.tensor(5)}


def _with(**changes: Any) -> dict[str, Any]:
    values = _values()
    for key, value in changes.items():
        if value is None:
            del values[key.replace("__", ".")]
        else:
            values[key.replace("__", ".")] = value
    return values


# (case id, bad params (or None), decay, error type, message pattern)
TREE_CASES = [
    (
        "missing-key",
        _with(**{"0__bias": None}),
        0.9,
        ValueError,
        r"tree structure mismatch .* missing in `params`: \['0.bias'\], extra in `params`: \[\]",
    ),
    (
        "extra-key",
        {**_values(), "1.weight": torch.ones(1)},
        0.9,
        ValueError,
        r"missing in `params`: \[\], extra in `params`: \['1.weight'\]",
    ),
    (
        "renamed-key",
        {"0.weight": torch.ones(4, 2), "0.b": torch.ones(4), "n": torch.tensor(1)},
        0.9,
        ValueError,
        r"missing in `params`: \['0.bias'\], extra in `params`: \['0.b'\]",
    ),
    (
        "ddp-prefix",
        {f"module.{k}": v for k, v in _values().items()},
        0.9,
        ValueError,
        r"carry a wrapper prefix .*`model.module` for DDP",
    ),
    (
        "compile-prefix",
        {f"_orig_mod.{k}": v for k, v in _values().items()},
        0.9,
        ValueError,
        r"carry a wrapper prefix .*`model._orig_mod` for torch.compile",
    ),
    ("list-not-dict", list(_values().values()), 0.9, ValueError, r"tree structure mismatch"),
    (
        "shape",
        _with(**{"0__weight": torch.ones(2, 4)}),
        0.9,
        ValueError,
        r"shape mismatch at '0.weight': expected \(4, 2\) .*, got \(2, 4\)",
    ),
    (
        "shape-broadcastable",
        _with(**{"0__bias": torch.ones(1)}),
        0.9,
        ValueError,
        r"shape mismatch at '0.bias': expected \(4,\) .*, got \(1,\) .*\(no broadcasting\)",
    ),
    (
        "shape-scalar",
        _with(**{"0__bias": torch.tensor(1.0)}),
        0.9,
        ValueError,
        r"shape mismatch at '0.bias': expected \(4,\) .*, got \(\) ",
    ),
    (
        "device",
        _with(**{"0__bias": torch.ones(4, device="meta")}),
        0.9,
        ValueError,
        r"device mismatch at '0.bias': expected cpu .*, got meta .* move one side explicitly",
    ),
    (
        "non-tensor-int",
        _with(**{"0__bias": 3}),
        0.9,
        TypeError,
        r"non-tensor leaf at '0.bias' of `params`: expected a torch.Tensor, got int \(3\)",
    ),
    (
        "non-tensor-list",
        _with(**{"0__bias": [1.0, 2.0]}),
        0.9,
        TypeError,
        r"non-tensor leaf at '0.bias.0' of `params`: expected a torch.Tensor, got float \(1.0\)",
    ),
    (
        "non-tensor-str",
        _with(**{"0__bias": "x"}),
        0.9,
        TypeError,
        r"non-tensor leaf at '0.bias' of `params`: expected a torch.Tensor, got str",
    ),
    (
        "int-for-float",
        _with(**{"0__bias": torch.ones(4, dtype=torch.int64)}),
        0.9,
        TypeError,
        r"dtype mismatch at '0.bias': expected a floating dtype like torch.float32 .*, got "
        r"torch.int64",
    ),
    (
        "float-for-int",
        _with(n=torch.tensor(5.0)),
        0.9,
        TypeError,
        r"dtype mismatch at 'n': expected torch.int64 .*, got torch.float32 .* never converted",
    ),
    ("decay-above-1", None, 1.5, ValueError, r"`decay` must be in \[0, 1\], got 1.5"),
    ("decay-negative", None, -0.1, ValueError, r"`decay` must be in \[0, 1\], got -0.1"),
    ("decay-nan", None, float("nan"), ValueError, r"`decay` must be in \[0, 1\], got nan"),
    ("decay-inf", None, float("inf"), ValueError, r"`decay` must be in \[0, 1\], got inf"),
    (
        "decay-vector",
        None,
        torch.tensor([0.9, 0.9]),
        ValueError,
        r"`decay` must be a scalar: expected a 0-dim tensor, got shape \(2,\)",
    ),
    (
        "decay-int-tensor",
        None,
        torch.tensor(1),
        TypeError,
        r"`decay` must be a floating tensor: expected .*, got torch.int64",
    ),
    ("decay-str", None, "0.9", TypeError, r"`decay` must be a Python float .* got str"),
    ("decay-bool", None, True, TypeError, r"`decay` must be a Python float .* got bool"),
    ("decay-none", None, None, TypeError, r"`decay` must be a Python float .* got NoneType"),
]

APIS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "ema_update": lambda shadow, params, decay: fe.ema_update(shadow, params, decay),
    "ema_update_": lambda shadow, params, decay: fe.ema_update_(shadow, params, decay),
    "update": lambda state, params, decay: fe.update(state, params, decay),
    "update_": lambda state, params, decay: fe.update_(state, params, decay),
}


@pytest.mark.parametrize("api", list(APIS))
@pytest.mark.parametrize(
    ("params", "decay", "error", "pattern"),
    [case[1:] for case in TREE_CASES],
    ids=[case[0] for case in TREE_CASES],
)
def test_bad_input_raises_and_mutates_nothing(
    api: str, params: Any, decay: Any, error: type[Exception], pattern: str
) -> None:
    first = _tree() if api.startswith("ema") else fe.init(_tree())
    params = _values() if params is None else params
    first_before, params_before = snapshot(first), snapshot(params)
    with pytest.raises(error, match=rf"^{re.escape(api)}: .*{pattern}"):
        APIS[api](first, params, decay)
    assert_bits_equal(first, first_before)
    assert_bits_equal(params, params_before)


def test_schedule_returning_bad_decay() -> None:
    state = fe.init(_tree())
    before = snapshot(state)
    with pytest.raises(
        ValueError, match=r"^update_ \(schedule\): `decay` must be in \[0, 1\], got 2.0"
    ):
        fe.update_(state, _values(), lambda t, dt: 2.0)
    assert_bits_equal(state, before)


def test_malformed_state() -> None:
    with pytest.raises(TypeError, match=r"^update: `state` must be an EmaState: expected a dict"):
        fe.update({"params": _tree()}, _values(), 0.9)
    state = fe.init(_tree())
    state["step"] = torch.tensor(1.0)
    with pytest.raises(TypeError, match=r"step counter at 'step': expected a 0-dim int64 tensor"):
        fe.update(state, _values(), 0.9)


def test_buffers_missing_from_update() -> None:
    state = fe.init(_tree(), {"rm": torch.zeros(2)})
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"^update_: buffers at 'buffers': expected a tree"):
        fe.update_(state, _values(), 0.9)
    with pytest.raises(ValueError, match=r"buffers at 'buffers'.*shape mismatch|shape mismatch"):
        fe.update_(state, _values(), 0.9, {"rm": torch.zeros(3)})
    assert_bits_equal(state, before)


def test_bad_buffer_policy() -> None:
    state = fe.init(_tree())
    with pytest.raises(ValueError, match=r"`buffer_policy` must be 'copy' or 'average', got 'x'"):
        fe.update(state, _values(), 0.9, buffer_policy="x")  # type: ignore[arg-type]


def test_init_rejects_non_tensor_and_bad_dtype() -> None:
    with pytest.raises(TypeError, match=r"^init: non-tensor leaf at 'a.b' of `params`"):
        fe.init({"a": {"b": 1.0}})
    with pytest.raises(TypeError, match=r"^init: `dtype` must be a floating torch.dtype"):
        fe.init(_tree(), dtype=torch.int32)


def test_tf_decay_rejects_negative_and_bad_types() -> None:
    with pytest.raises(ValueError, match=r"^tf_decay: `num_updates` must be >= 0, got -1"):
        fe.tf_decay(0.9, -1)
    with pytest.raises(ValueError, match=r"^tf_decay: `num_updates` must be >= 0, got -3"):
        fe.tf_decay(0.9, torch.tensor(-3))
    with pytest.raises(TypeError, match=r"^tf_decay: `num_updates` must be an int"):
        fe.tf_decay(0.9, 1.5)
    with pytest.raises(ValueError, match=r"^tf_decay: `decay` must be in \[0, 1\]"):
        fe.tf_decay(1.1, 0)


# --- the adapter -----------------------------------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))


def test_adapter_rejects_wrappers() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"^EMA: wrapped model .* Pass `model._orig_mod`"):
        fe.EMA(torch.compile(model), 0.9)
    with pytest.raises(ValueError, match=r"^EMA: wrapped model .* Pass `model.module`"):
        fe.EMA(nn.DataParallel(model), 0.9)


@pytest.mark.parametrize(
    ("decay", "error", "pattern"),
    [
        (1.5, ValueError, r"^EMA: `decay` must be in \[0, 1\], got 1.5"),
        (float("nan"), ValueError, r"^EMA: `decay` must be in \[0, 1\], got nan"),
        ("0.9", TypeError, r"^EMA: `decay` must be a Python float"),
    ],
)
def test_adapter_rejects_bad_decay(decay: Any, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        fe.EMA(_model(), decay)


def _changed_model_cases() -> list[tuple[str, Callable[[nn.Module], None], str]]:
    def add_param(m: nn.Module) -> None:
        m.register_parameter("extra", nn.Parameter(torch.ones(1)))

    def reshape(m: nn.Module) -> None:
        m[0].bias = nn.Parameter(torch.zeros(5))

    def move(m: nn.Module) -> None:
        m[0].bias = nn.Parameter(torch.zeros(4, device="meta"))

    def freeze(m: nn.Module) -> None:
        m[0].weight.requires_grad_(False)

    return [
        ("param-added", add_param, r"extra in `params`: \['extra'\]"),
        ("shape-changed", reshape, r"shape mismatch at '0.bias': expected \(4,\)"),
        ("device-changed", move, r"device mismatch at '0.bias': expected cpu"),
        ("frozen-after", freeze, r"missing in `params`: \['0.weight'\]"),
    ]


@pytest.mark.parametrize(
    ("change", "pattern"),
    [case[1:] for case in _changed_model_cases()],
    ids=[case[0] for case in _changed_model_cases()],
)
def test_adapter_update_after_model_changed(
    change: Callable[[nn.Module], None], pattern: str
) -> None:
    model = _model()
    ema = fe.EMA(model, 0.9)
    change(model)
    before = snapshot(ema.state_dict())
    with pytest.raises(ValueError, match=rf"^update_: .*{pattern}"):
        ema.update()
    assert_bits_equal(ema.state_dict(), before)


def test_adapter_load_state_dict_errors_before_writing() -> None:
    ema = fe.EMA(_model(), 0.9)
    before = snapshot(ema.state_dict())
    good = fe.EMA(_model(), 0.9).state_dict()
    prefixed = {
        ("averages.module." + k[9:] if k.startswith("averages.") else k): v for k, v in good.items()
    }
    with pytest.raises(
        ValueError, match=r"^EMA.load_state_dict: keys do not match: .*wrapper prefix"
    ):
        ema.load_state_dict(prefixed)
    shaped = dict(good, **{"averages.0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"mismatch at 'averages.0.bias': expected \(4,\)"):
        ema.load_state_dict(shaped)
    typed = dict(good, **{"averages.0.bias": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(
        ValueError, match=r"expected \(4,\) torch.float32, got \(4,\) torch.float64"
    ):
        ema.load_state_dict(typed)
    assert_bits_equal(ema.state_dict(), before)


def test_adapter_copy_to_mismatched_module() -> None:
    ema = fe.EMA(_model(), 0.9)
    other = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5))
    before = snapshot(other.state_dict())
    with pytest.raises(ValueError, match=r"^EMA: shape mismatch at '0.bias': expected \(4,\)"):
        ema.copy_to(other)
    assert_bits_equal(other.state_dict(), before)
