"""Shared fixtures and helpers: seeding, bit-level comparison, snapshots of trees."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
