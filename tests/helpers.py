"""Helpers shared by the test modules (imported as ``from helpers import ...``).

Bit-level comparison of trees, snapshots, the TensorFlow reference fixtures, a dispatch mode
that fails on host syncs, and a small model with its training loop.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import functional_ema as fe


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor (so -0.0 != 0.0 and NaNs compare by payload)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return tensor
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view)


def assert_bits_equal(actual: Any, expected: Any) -> None:
    """Assert two trees have the same structure, dtypes and bits."""
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"structure {a_spec} != {e_spec}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        if not isinstance(a, torch.Tensor):
            assert a == e, (a, e)
            continue
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        assert a.device == e.device, (a.device, e.device)
        if a.device.type == "meta":  # no data to compare (and none to mutate)
            assert a.shape == e.shape, (a.shape, e.shape)
            continue
        assert a.shape == e.shape, (a.shape, e.shape)
        assert torch.equal(bits(a), bits(e)), f"bits differ: {a} vs {e}"


def snapshot(tree: Any) -> Any:
    """A deep copy of every tensor in ``tree`` (to check inputs are left unchanged)."""
    return optree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


# --- TensorFlow reference fixtures (tests/tf_reference) ----------------------------------

REF_DIR = Path(__file__).parent / "tf_reference"

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BIT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

CASES = {
    "const": "variable",
    "const_low": "variable",
    "num_updates_from_zero": "variable",
    "num_updates_large": "variable",
    "num_updates_reset": "variable",
    "num_updates_beyond_2_24": "variable",
    "per_step_decay": "variable",
    "zero_debias_const": "zero_debias",
    "zero_debias_const_high": "zero_debias",
    "zero_debias_num_updates": "zero_debias",
    "zero_debias_per_step_decay": "zero_debias",
}
LEAF_NAMES = {"scalar", "vec", "mat", "cube"}
MIN_STEPS = 20

VARIABLE_CASES = [c for c, m in CASES.items() if m == "variable"]
NUM_UPDATES_CASES = [c for c in CASES if "num_updates" in c]


@functools.cache
def load_fixture(dtype_name: str) -> dict:
    path = REF_DIR / f"tf_{dtype_name}.json"
    assert path.is_file(), f"missing TF reference fixture {path} (run generate.py)"
    with path.open() as f:
        doc = json.load(f)
    assert doc["dtype"] == dtype_name, f"{path}: dtype field is {doc['dtype']!r}"
    return doc


def get_case(dtype_name: str, case_name: str) -> dict:
    doc = load_fixture(dtype_name)
    found = [c for c in doc["cases"] if c["name"] == case_name]
    assert len(found) == 1, f"tf_{dtype_name}.json: {len(found)} cases named {case_name!r}"
    case = found[0]
    assert case["mode"] == CASES[case_name], (case_name, case["mode"])
    return case


def from_hex(hex_bits: str, dtype: torch.dtype, shape) -> torch.Tensor:
    """Little-endian raw bits (``array.tobytes().hex()``) -> tensor of ``dtype``."""
    assert sys.byteorder == "little", "fixtures hold little-endian bits"
    buf = bytearray.fromhex(hex_bits)
    shape = tuple(shape)
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert len(buf) == numel * itemsize, (len(buf), shape, dtype)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape).clone()


def leaves_at(case: dict, dtype: torch.dtype, key: str, t: int | None = None) -> dict:
    """``{leaf: tensor}`` of ``key`` ("init", or "values"/"average" at step t >= 1)."""
    out = {}
    for name, leaf in case["leaves"].items():
        hex_bits = leaf[key] if t is None else leaf[key][t - 1]
        out[name] = from_hex(hex_bits, dtype, leaf["shape"])
    return out


def step_decay(case: dict, t: int):
    """The decay TF used at step t: the Python float, or ``fe.tf_decay`` with num_updates."""
    decay = case["decay"][t - 1]
    if case["num_updates"] is None:
        return decay
    return fe.tf_decay(decay, case["num_updates"][t - 1])


class NoHostSync(TorchDispatchMode):
    """Fail on any device-to-host read (``.item()``, ``bool(tensor)``, ``.tolist()``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host sync through {func}")
        return func(*args, **(kwargs or {}))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, ema: fe.EMA, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        loss = model(torch.randn(8, 6, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
