"""Bad input: a clear error naming the path, expected and actual value; nothing mutated."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bits_equal, snapshot
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


_RANGE = r"decay out of range at 'decay': expected a number in \[0, 1\], "
_DECAY_TYPE = r"decay of the wrong type at 'decay': expected a Python float or a 0-dim floating"

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
        r"non-tensor leaf in `params` at '0.bias': expected a torch.Tensor, got int \(3\)",
    ),
    (
        "non-tensor-list",
        _with(**{"0__bias": [1.0, 2.0]}),
        0.9,
        TypeError,
        r"non-tensor leaf in `params` at '0.bias.0': expected a torch.Tensor, got float \(1.0\)",
    ),
    (
        "non-tensor-str",
        _with(**{"0__bias": "x"}),
        0.9,
        TypeError,
        r"non-tensor leaf in `params` at '0.bias': expected a torch.Tensor, got str",
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
    ("decay-above-1", None, 1.5, ValueError, _RANGE + r"got 1.5\. Pass a decay in \[0, 1\]"),
    ("decay-negative", None, -0.1, ValueError, _RANGE + r"got -0.1\."),
    ("decay-nan", None, float("nan"), ValueError, _RANGE + r"got nan\."),
    ("decay-inf", None, float("inf"), ValueError, _RANGE + r"got inf\."),
    (
        "decay-vector",
        None,
        torch.tensor([0.9, 0.9]),
        ValueError,
        r"decay not a scalar at 'decay': expected a 0-dim tensor, got a tensor of shape \(2,\)",
    ),
    (
        "decay-int-tensor",
        None,
        torch.tensor(1),
        TypeError,
        r"decay of a non-floating dtype at 'decay': expected .*, got .*dtype torch.int64",
    ),
    ("decay-str", None, "0.9", TypeError, _DECAY_TYPE + r".* got str \('0.9'\)"),
    ("decay-bool", None, True, TypeError, _DECAY_TYPE + r".* got bool \(True\)"),
    ("decay-none", None, None, TypeError, _DECAY_TYPE + r".* got NoneType \(None\)"),
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
    with pytest.raises(ValueError, match=r"^update_ \(schedule\): " + _RANGE + r"got 2.0"):
        fe.update_(state, _values(), lambda t, dt: 2.0)
    assert_bits_equal(state, before)


def test_malformed_state() -> None:
    with pytest.raises(TypeError, match=r"^update: not an EmaState at 'state': expected a dict"):
        fe.update({"params": _tree()}, _values(), 0.9)
    state = fe.init(_tree())
    state["step"] = torch.tensor(1.0)
    with pytest.raises(TypeError, match=r"counter at 'step': expected a 0-dim int64 tensor"):
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
    with pytest.raises(
        ValueError,
        match=r"^update: unknown option at 'buffer_policy': expected 'copy' or 'average', got 'x'",
    ):
        fe.update(state, _values(), 0.9, buffer_policy="x")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"^update: option of the wrong type at 'buffer_policy': .*got NoneType"
    ):
        fe.update(state, _values(), 0.9, buffer_policy=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^update: option of the wrong type at 'nonfinite'"):
        fe.update(state, _values(), 0.9, nonfinite=0)  # type: ignore[arg-type]


def test_init_rejects_non_tensor_and_bad_dtype() -> None:
    with pytest.raises(TypeError, match=r"^init: non-tensor leaf in `params` at 'a.b'"):
        fe.init({"a": {"b": 1.0}})
    with pytest.raises(TypeError, match=r"^init: not a floating dtype at 'dtype'"):
        fe.init(_tree(), dtype=torch.int32)


def test_tf_decay_rejects_negative_and_bad_types() -> None:
    negative = r"^tf_decay: negative num_updates at 'num_updates': expected a count >= 0, got "
    with pytest.raises(ValueError, match=negative + "-1"):
        fe.tf_decay(0.9, -1)
    with pytest.raises(ValueError, match=negative + "-3"):
        fe.tf_decay(0.9, torch.tensor(-3))
    with pytest.raises(
        TypeError, match=r"^tf_decay: num_updates of the wrong type at 'num_updates': .*got float"
    ):
        fe.tf_decay(0.9, 1.5)
    with pytest.raises(TypeError, match=r"^tf_decay: num_updates of a non-integer dtype"):
        fe.tf_decay(0.9, torch.tensor(True))
    with pytest.raises(ValueError, match=r"^tf_decay: " + _RANGE):
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
        (1.5, ValueError, r"^EMA: " + _RANGE + "got 1.5"),
        (float("nan"), ValueError, r"^EMA: " + _RANGE + "got nan"),
        ("0.9", TypeError, r"^EMA: " + _DECAY_TYPE),
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

    return [
        ("param-added", add_param, r"changed since the EMA was made at 'extra'"),
        ("shape-changed", reshape, r"shape mismatch at '0.bias': expected \(4,\)"),
        ("device-changed", move, r"device mismatch at '0.bias': expected cpu"),
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
    with pytest.raises(ValueError, match=rf"^EMA.update: .*{pattern}"):
        ema.update()
    assert_bits_equal(ema.state_dict(), before)


def test_adapter_load_state_dict_errors_before_writing() -> None:
    ema = fe.EMA(_model(), 0.9)
    before = snapshot(ema.state_dict())
    good = fe.EMA(_model(), 0.9).state_dict()
    prefixed = {
        ("averages.module." + k[9:] if k.startswith("averages.") else k): v for k, v in good.items()
    }
    fresh = fe.EMA(_model(), 0.9)  # wrapper prefixes are mapped to the EMA's own names
    fresh.load_state_dict(prefixed)
    assert_bits_equal(dict(fresh.state_dict()), dict(good))
    shaped = dict(good, **{"averages.0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"mismatch at 'averages.0.bias': expected \(4,\)"):
        ema.load_state_dict(shaped)
    typed = dict(good, **{"averages.0.bias": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(  # only a dtype differs: a TypeError
        TypeError, match=r"expected \(4,\) torch.float32, got \(4,\) torch.float64"
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


# --- the bad-input matrix, continued: state API, checkpoints, adapter lifecycle ---------
#
# Each case builds fresh inputs and returns (action, watch): `action()` must raise the
# error, whose message starts with the API name and names the path (a leaf, a key, an
# argument or a file); `watch()` returns everything the call could have modified, which
# must be bit-identical before and after.


Build = Callable[[Path], tuple[Callable[[], Any], Callable[[], Any]]]
"""A case: given a scratch folder, return ``(action, watch)``."""


class _Tied(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3, bias=False)
        self.dec = nn.Linear(3, 3, bias=False)
        if tie:
            self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def _tensors(module: nn.Module) -> dict[str, Any]:
    return snapshot({**dict(module.named_parameters()), **dict(module.named_buffers())})


def _ema_case(
    change: Callable[[nn.Module, fe.EMA], Callable[[], Any]], model: nn.Module | None = None
) -> Build:
    """An adapter case: build model and EMA, apply ``change``, watch both."""

    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        live = _model() if model is None else copy.deepcopy(model)
        ema = fe.EMA(live, 0.9)
        action = change(live, ema)
        return action, lambda: {"model": _tensors(live), "ema": snapshot(dict(ema.state_dict()))}

    return build


def _state_case(
    corrupt: Callable[[dict[str, Any]], None], call: Callable[[Any], Any] | None = None
) -> Build:
    """A state API case: corrupt a fresh state, then call update_ (or ``call``) on it."""

    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        state: dict[str, Any] = dict(fe.init(_tree(), {"rm": torch.zeros(2)}))
        corrupt(state)
        values = _values()
        if call is None:
            action = lambda: fe.update_(state, values, 0.9, {"rm": torch.ones(2)})  # noqa: E731
        else:
            action = lambda: call(state)  # noqa: E731
        return action, lambda: snapshot({"state": state, "values": values})

    return build


def _loaded_case(
    corrupt: Callable[[dict[str, Any]], None],
) -> Build:
    """A checkpoint case: a state of the model, corrupted, checked against the model's."""

    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        loaded: dict[str, Any] = dict(fe.init(*fe.module_state(_model())))
        corrupt(loaded)
        like = fe.init(*fe.module_state(_model()))
        return lambda: fe.check_state(loaded, like=like), lambda: snapshot([loaded, like])

    return build


def _load_state_dict_case(corrupt: Callable[[dict[str, Any]], None], strict: bool = True) -> Build:
    def change(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
        saved = dict(fe.EMA(_model(), 0.9).state_dict())
        corrupt(saved)
        return lambda: ema.load_state_dict(saved, strict=strict)

    return _ema_case(change)


def _file_case(content: bytes) -> Build:
    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        path = folder / "ema.pt"
        path.write_bytes(content)
        return lambda: fe.load(path), lambda: {"bytes": path.read_bytes()}

    return build


def _saved_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(fe.init(*fe.module_state(_model())), buffer)
    return buffer.getvalue()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Corrupt ``state[a][b]`` (path 'a/b') or ``state[a]`` (path 'a'); None deletes."""

    def corrupt(state: dict[str, Any]) -> None:
        *outer, key = path.split("/")
        target = state[outer[0]] if outer else state
        if outer:
            target = state[outer[0]] = dict(target)
        if value is None:
            del target[key]
        else:
            target[key] = value

    return corrupt


def _untie(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
    model.dec.weight = nn.Parameter(model.enc.weight.detach().clone())
    return ema.update


def _tie(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
    model.dec.weight = model.enc.weight
    return ema.update


def _lazy(api: str) -> Build:
    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        model = nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(4))
        calls = {
            "EMA": lambda: fe.EMA(model, 0.9),
            "module_state": lambda: fe.module_state(model),
            "flatten_parameters_": lambda: fe.flatten_parameters_(model),
        }
        watch = lambda: {  # noqa: E731
            "types": [type(p).__name__ for p in model.parameters()],
            "first": snapshot(dict(model[0].named_parameters())),
        }
        return calls[api], watch

    return build


def _lazy_buffers(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    del folder
    model = nn.Sequential(nn.Linear(2, 3), nn.LazyBatchNorm1d(affine=False))
    watch = lambda: {  # noqa: E731
        "types": [type(b).__name__ for b in model.buffers()],
        "first": snapshot(dict(model[0].named_parameters())),
    }
    return lambda: fe.flatten_parameters_(model), watch


def _wrapped(kind: str, api: str) -> Build:
    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        model = _model()
        ema = fe.EMA(model, 0.9)
        wrapper = torch.compile(model) if kind == "compile" else nn.DataParallel(model)
        params, buffers = fe.module_state(model)
        calls = {
            "copy_to": lambda: ema.copy_to(wrapper),
            "module_state": lambda: fe.module_state(wrapper),
            "apply": lambda: fe.apply(wrapper, params, buffers, torch.ones(2, 2)),
        }
        return calls[api], lambda: {"model": _tensors(model), "ema": snapshot(ema.state())}

    return build


def _register(what: str) -> Callable[[nn.Module, fe.EMA], Callable[[], Any]]:
    def change(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
        if what == "buffer":
            model[1].register_buffer("extra", torch.zeros(2))
        elif what == "module":
            model.add_module("head", nn.Linear(4, 2))
        elif what == "removed":
            model[0].register_parameter("bias", None)
        elif what == "parametrized":
            nn.utils.parametrizations.weight_norm(model[0])
        elif what == "int-buffer-dtype":
            model[1].num_batches_tracked = model[1].num_batches_tracked.int()
        return ema.update

    return change


def _update_with(**kwargs: Any) -> Callable[[nn.Module, fe.EMA], Callable[[], Any]]:
    def change(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
        if "decay" in kwargs:
            ema.decay = kwargs["decay"]
            return ema.update
        return lambda: ema.update(**kwargs)

    return change


def _construct(*args: Any, **kwargs: Any) -> Build:
    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        model = _model()
        return lambda: fe.EMA(model, *args, **kwargs), lambda: _tensors(model)

    return build


def _sparse_model() -> nn.Module:
    model = _model()
    model[0].weight = nn.Parameter(model[0].weight.detach().to_sparse())
    return model


def _construct_on(make: Callable[[], nn.Module]) -> Build:
    def build(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        del folder
        model = make()
        return lambda: fe.EMA(model, 0.9), lambda: None

    return build


def _tied_apply_alias_only(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    del folder
    model = _Tied()
    params = {"dec.weight": torch.ones(3, 3)}  # the alias of a tied weight, not its name
    return lambda: fe.apply(model, params, {}, torch.ones(1, 3)), lambda: _tensors(model)


def _swap_load(model: nn.Module, ema: fe.EMA) -> Callable[[], Any]:
    other = fe.EMA(nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5)), 0.9).state_dict()
    return lambda: ema.load_state_dict(other)


_NEG = torch.tensor(-1)
_CKPT = r"load: unreadable checkpoint at '.*ema.pt': expected a file written by torch.save"

_CHANGED = r"EMA.update: the model's parameters or buffers changed since the EMA was made at "

# (case id, build, error type, message pattern after "^")
MATRIX: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # --- the state API: a corrupted state -----------------------------------------------
    (
        "state-step-float",
        _state_case(_set("step", torch.tensor(1.0))),
        TypeError,
        r"update_: counter at 'step': expected a 0-dim int64 tensor, got a tensor of shape "
        r"\(\) and dtype torch.float32",
    ),
    (
        "state-step-vector",
        _state_case(_set("step", torch.tensor([1]))),
        ValueError,  # an int64 tensor of the wrong shape (was a TypeError)
        r"update_: counter at 'step': expected a 0-dim int64 tensor, got a tensor of shape "
        r"\(1,\)",
    ),
    (
        "state-step-int32",
        _state_case(_set("step", torch.tensor(1, dtype=torch.int32))),
        TypeError,
        r"update_: .*counter at 'step': .*dtype torch.int32",
    ),
    (
        "state-step-python-int",
        _state_case(_set("step", 3)),
        TypeError,
        r"update_: .*counter at 'step': expected a 0-dim int64 tensor, got int",
    ),
    (
        "state-average-step-float",
        _state_case(_set("step", torch.tensor(2.0)), call=fe.average),
        TypeError,
        r"average: .*counter at 'step'",
    ),
    (
        "state-non-tensor-leaf",
        _state_case(_set("params/0.bias", [1.0, 2.0])),
        TypeError,
        r"update_: non-tensor leaf in `state\['params'\]` at '0.bias.0': expected a "
        r"torch.Tensor, got float",
    ),
    (
        "state-shape-corrupted",
        _state_case(_set("params/0.weight", torch.zeros(2, 4))),
        ValueError,
        r"update_: shape mismatch at '0.weight': expected \(2, 4\) \(state\['params'\]\), got "
        r"\(4, 2\) \(params\)",
    ),
    (
        "state-buffer-shape",
        _state_case(_set("buffers/rm", torch.zeros(3))),
        ValueError,
        r"update_: shape mismatch at 'rm': expected \(3,\) \(state\['buffers'\]\), got \(2,\)",
    ),
    (
        "state-int-leaf-became-float",
        _state_case(_set("params/n", torch.tensor(3.0))),
        TypeError,
        r"update_: dtype mismatch at 'n': expected a floating dtype like torch.float32 "
        r"\(state\['params'\]\), got torch.int64",
    ),
    (
        "state-half-zero-debias",
        _state_case(_set("biased", {k: v.clone() for k, v in _tree().items()})),
        ValueError,
        r"update_: incomplete zero_debias state at '<root>': expected both 'biased' and "
        r"'local_step' or neither, got only 'biased'",
    ),
    (
        "state-complex-value",
        _state_case(
            lambda s: None,
            call=lambda s: fe.update_(
                s, {**_values(), "0.bias": torch.ones(4, dtype=torch.complex64)}, 0.9, s["buffers"]
            ),
        ),
        TypeError,
        r"update_: dtype mismatch at '0.bias': expected a floating dtype like torch.float32 .*"
        r"got torch.complex64",
    ),
    (
        "state-dt-zero",
        _state_case(
            lambda s: None, call=lambda s: fe.update_(s, _values(), 0.9, s["buffers"], dt=0)
        ),
        ValueError,
        r"update_: dt out of range at 'dt': expected an int >= 1, got 0",
    ),
    (
        "state-dt-float",
        _state_case(
            lambda s: None, call=lambda s: fe.update(s, _values(), 0.9, s["buffers"], dt=1.5)
        ),
        TypeError,
        r"update: dt of the wrong type at 'dt': expected an int >= 1 or a 0-dim integer tensor, "
        r"got float",
    ),
    (
        "state-dt-vector",
        _state_case(
            lambda s: None,
            call=lambda s: fe.update_(s, _values(), 0.9, s["buffers"], dt=torch.tensor([1, 2])),
        ),
        ValueError,  # an integer tensor of the wrong shape (was a TypeError)
        r"update_: dt not a scalar at 'dt': expected an int >= 1 or a 0-dim integer tensor, got "
        r"a tensor of shape \(2,\)",
    ),
    (
        "state-nonfinite-option",
        _state_case(
            lambda s: None,
            call=lambda s: fe.update_(s, _values(), 0.9, s["buffers"], nonfinite=None),
        ),
        TypeError,  # not a string (was a ValueError)
        r"update_: option of the wrong type at 'nonfinite': expected 'skip', 'raise' or "
        r"'propagate', got NoneType \(None\)",
    ),
    # --- checkpoints: a loaded state against the model ----------------------------------
    (
        "ckpt-other-model",
        _loaded_case(
            lambda s: s.update(
                params={**s["params"], "2.weight": torch.ones(1)}, buffers=dict(s["buffers"])
            )
        ),
        ValueError,
        r"check_state: state does not match the model at 'params': expected the names, shapes, "
        r"dtypes and devices of `like`, got missing keys \[\], unexpected keys \['2.weight'\]",
    ),
    (
        "ckpt-missing-key",
        _loaded_case(_set("params/0.bias", None)),
        ValueError,
        r"check_state: .*at 'params': .*got missing keys \['0.bias'\], unexpected keys \[\]",
    ),
    (
        "ckpt-shape",
        _loaded_case(_set("params/0.weight", torch.zeros(2, 4))),
        ValueError,
        r"check_state: .*mismatch at '0.weight': expected \(4, 2\) torch.float32, got \(2, 4\)",
    ),
    (
        "ckpt-dtype",
        _loaded_case(_set("buffers/1.running_mean", torch.zeros(4, dtype=torch.float64))),
        TypeError,  # only a dtype differs (was a ValueError)
        r"check_state: state does not match the model at 'buffers': .*got mismatch at "
        r"'1.running_mean': expected \(4,\) torch.float32, got \(4,\) torch.float64",
    ),
    (
        "ckpt-step-negative",
        _loaded_case(_set("step", _NEG)),
        ValueError,
        r"check_state: negative counter at 'step': expected a count >= 0, got -1",
    ),
    (
        "ckpt-step-float",
        _loaded_case(_set("step", torch.tensor(3.0))),
        TypeError,
        r"check_state: .*counter at 'step': expected a 0-dim int64 tensor",
    ),
    (
        "ckpt-non-tensor",
        _loaded_case(_set("params/0.bias", "zeros")),
        TypeError,
        r"check_state: non-tensor leaf in `state\['params'\]` at '0.bias'",
    ),
    (
        "ckpt-entry-missing",
        _loaded_case(_set("buffers", None)),
        ValueError,
        r"check_state: entries at '<root>': expected \['buffers', .*\(as in `like`\)",
    ),
    ("ckpt-file-empty", _file_case(b""), ValueError, _CKPT + r".*got an empty file"),
    (
        "ckpt-file-truncated",
        _file_case(_saved_bytes()[:-100]),
        ValueError,
        _CKPT + r".*got a zip archive without its central directory \(truncated\)",
    ),
    (
        "ckpt-file-text",
        _file_case(b"step,params\n1,2\n"),
        ValueError,
        _CKPT + r".*got a file that is not a torch checkpoint",
    ),
    # --- the adapter's checkpoints ------------------------------------------------------
    (
        "adapter-load-missing",
        _load_state_dict_case(_set("averages.0.bias", None)),
        ValueError,
        r"EMA.load_state_dict: state dict does not match the EMA at '<root>': expected the keys, "
        r"shapes and dtypes of the EMA's own state_dict\(\), got missing keys "
        r"\['averages.0.bias'\], unexpected keys \[\]",
    ),
    (
        "adapter-load-other-model",
        _ema_case(_swap_load),
        ValueError,
        r"EMA.load_state_dict: .*got mismatch at 'averages.0.bias': expected \(4,\) "
        r"torch.float32, got \(5,\) torch.float32",
    ),
    (
        "adapter-load-non-tensor",
        _load_state_dict_case(_set("averages.0.bias", [0.0] * 4)),
        TypeError,  # a value that is not a tensor (was a ValueError)
        r"EMA.load_state_dict: .*got mismatch at 'averages.0.bias': expected a tensor, got list",
    ),
    (
        "adapter-load-step-float",
        _load_state_dict_case(_set("step", torch.tensor(2.0))),
        TypeError,  # only the dtype differs (was a ValueError; check_state raised TypeError)
        r"EMA.load_state_dict: .*got mismatch at 'step': expected \(\) torch.int64, got \(\) "
        r"torch.float32",
    ),
    (
        "adapter-load-step-negative",
        _load_state_dict_case(_set("step", _NEG)),
        ValueError,
        r"EMA.load_state_dict: negative counter at 'step': expected a count >= 0, got -1",
    ),
    (
        "adapter-load-shape-non-strict",
        _load_state_dict_case(_set("averages.1.running_var", torch.ones(5)), strict=False),
        ValueError,
        r"EMA.load_state_dict: .*got mismatch at 'averages.1.running_var': expected \(4,\)",
    ),
    (
        "adapter-load-not-a-dict",
        _ema_case(lambda m, ema: lambda: ema.load_state_dict([("step", torch.tensor(1))])),
        TypeError,
        r"EMA.load_state_dict: not a state dict at 'state_dict': expected a dict .*got list",
    ),
    # --- the adapter: tied weights, lazy modules, a model changed after construction ----
    (
        "tied-untied-after",
        _ema_case(_untie, _Tied()),
        ValueError,
        _CHANGED + r"'dec.weight': .*got new names \['dec.weight'\]",
    ),
    (
        "tied-tied-after",
        _ema_case(_tie, _Tied(tie=False)),
        ValueError,
        _CHANGED + r"'dec.weight': expected the names at construction \(missing now: "
        r"\['dec.weight'\]\)",
    ),
    (
        "tied-apply-alias-only",
        _tied_apply_alias_only,
        ValueError,
        r"apply: names do not match _Tied at '<root>': expected every parameter and buffer name "
        r"of the module, got missing \['enc.weight'\], unexpected \[\]",
    ),
    (
        "lazy-EMA",
        _lazy("EMA"),
        ValueError,
        r"EMA: uninitialized lazy tensor at '1.weight'",
    ),
    (
        "lazy-module_state",
        _lazy("module_state"),
        ValueError,
        r"module_state: uninitialized lazy tensor at '1.weight': expected a materialised tensor",
    ),
    (
        "lazy-flatten",
        _lazy("flatten_parameters_"),
        ValueError,
        r"flatten_parameters_: uninitialized lazy tensor at '1.weight': .*got an "
        r"UninitializedParameter. Run one forward pass on a real batch before flattening",
    ),
    (
        "lazy-buffer-flatten",
        _lazy_buffers,
        ValueError,
        r"flatten_parameters_: uninitialized lazy tensor at '1.running_mean': .*got an "
        r"UninitializedBuffer",
    ),
    (
        "added-buffer",
        _ema_case(_register("buffer")),
        ValueError,
        _CHANGED + r"'1.extra': .*new names \['1.extra'\]",
    ),
    (
        "added-submodule",
        _ema_case(_register("module")),
        ValueError,
        _CHANGED + r"'head.weight': .*new names \['head.bias', 'head.weight'\]",
    ),
    (
        "removed-parameter",
        _ema_case(_register("removed")),
        ValueError,
        _CHANGED + r"'0.bias': .*missing now: \['0.bias'\]",
    ),
    (
        "renamed-by-parametrization",
        _ema_case(_register("parametrized")),
        ValueError,
        _CHANGED + r"'0.weight': .*missing now: \['0.weight'\]\), got new names "
        r"\['0.parametrizations.weight.original0', '0.parametrizations.weight.original1'\]",
    ),
    (
        "EMA-of-an-EMA",
        _construct_on(lambda: fe.EMA(_model(), 0.9)),
        ValueError,
        r"EMA: an EMA of an EMA at 'model': expected the live model, got an EMA adapter. Pass "
        r"the model it tracks \(ema.model\)",
    ),
    (
        "sparse-parameter",
        _construct_on(_sparse_model),
        TypeError,
        r"EMA: torch.sparse_coo tensor in `model` at '0.weight': expected a dense \(strided\) "
        r"tensor",
    ),
    (
        "meta-parameter",
        _construct_on(lambda: _model().to("meta")),
        ValueError,
        r"EMA: meta tensor \(no data\) at '0.bias': expected a tensor with data, got a tensor "
        r"of shape \(4,\) and dtype torch.float32 on the meta device. .*"
        r"model.to_empty\(device=...\)",
    ),
    (
        "wrapper-compile-copy_to",
        _wrapped("compile", "copy_to"),
        ValueError,
        r"EMA.copy_to: wrapped model at '<root>': .*Pass `model._orig_mod`",
    ),
    (
        "wrapper-dp-module_state",
        _wrapped("dp", "module_state"),
        ValueError,
        r"module_state: wrapped model at '<root>': .*'module.' prefix. Pass `model.module`",
    ),
    (
        "wrapper-compile-apply",
        _wrapped("compile", "apply"),
        ValueError,
        r"apply: wrapped model at '<root>'",
    ),
    # --- the adapter's arguments --------------------------------------------------------
    (
        "adapter-dt-zero",
        _ema_case(_update_with(dt=0)),
        ValueError,
        r"EMA.update: dt out of range at 'dt'",
    ),
    (
        "adapter-decay-vector",
        _ema_case(_update_with(decay=torch.tensor([0.9, 0.9]))),
        ValueError,
        r"EMA.update: decay not a scalar at 'decay': expected a 0-dim tensor, got a tensor of "
        r"shape \(2,\)",
    ),
    (
        "adapter-schedule-out-of-range",
        _ema_case(_update_with(decay=lambda t, dt: 1.5)),
        ValueError,
        r"EMA.update \(schedule\): " + _RANGE + "got 1.5",
    ),
    (
        "adapter-dtype-int",
        _construct(0.9, dtype=torch.int32),
        TypeError,
        r"init: not a floating dtype at 'dtype': expected a floating torch.dtype or None, got "
        r"torch.int32",
    ),
    (
        "adapter-num-updates-with-schedule",
        _construct(fe.tf_warmup(0.9), use_num_updates=True),
        TypeError,
        r"EMA: `use_num_updates` with a schedule at 'decay': expected a constant decay",
    ),
    (
        "adapter-buffer-policy",
        _construct(0.9, buffer_policy="mean"),
        ValueError,
        r"EMA: unknown option at 'buffer_policy': expected 'copy' or 'average', got 'mean'",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [case[1:] for case in MATRIX],
    ids=[case[0] for case in MATRIX],
)
def test_bad_input_matrix(
    build: Build, error: type[Exception], pattern: str, tmp_path: Path
) -> None:
    action, watch = build(tmp_path)
    before = watch()
    with pytest.raises(error, match=rf"^{pattern}"):
        action()
    assert_bits_equal(watch(), before)


def test_bad_input_matrix_size() -> None:
    # The matrix above plus the tree cases run against four APIs at the top of this file.
    assert len(MATRIX) >= 40
    assert len(MATRIX) + len(TREE_CASES) >= 60
