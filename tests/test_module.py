"""module_state and apply: names, frozen and tied parameters, wrappers, lazy modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functional_ema as fe


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def test_names_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    params, buffers = fe.module_state(model)
    assert list(params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert list(buffers) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert all(not t.requires_grad for t in params.values())
    assert params["0.weight"].data_ptr() == model[0].weight.data_ptr()  # a view, no copy


def test_frozen_parameters_travel_with_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    params, buffers = fe.module_state(model)
    assert list(params) == ["1.weight", "1.bias"]
    assert list(buffers) == ["0.weight", "0.bias"]
    params_all, buffers_all = fe.module_state(model, trainable_only=False)
    assert list(params_all) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert buffers_all == {}


def test_tied_weights_once_and_routed_to_every_use() -> None:
    model = Tied()
    params, buffers = fe.module_state(model)
    assert list(params) == ["embed.weight"]
    replaced = {"embed.weight": torch.randn(5, 3)}
    x = torch.tensor([0, 3])
    out = fe.apply(model, replaced, buffers, x)
    expected = replaced["embed.weight"][x] @ replaced["embed.weight"].T
    torch.testing.assert_close(out, expected)


def test_apply_equals_module_and_leaves_it_untouched() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    params, buffers = fe.module_state(model)
    x = torch.randn(4, 2)
    assert torch.equal(fe.apply(model, params, buffers, x), model(x))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    assert torch.equal(fe.apply(model, zeros, buffers, x), torch.zeros(4, 3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_apply_kwargs_forwarded() -> None:
    class WithKwargs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor, *, offset: float = 0.0) -> torch.Tensor:
            return x * self.scale + offset

    model = WithKwargs()
    out = fe.apply(model, {"scale": torch.tensor(3.0)}, {}, torch.ones(2), offset=1.0)
    assert out.tolist() == [4.0, 4.0]


def test_apply_missing_names_raise() -> None:
    model = nn.Linear(2, 1)
    params, buffers = fe.module_state(model)
    del params["bias"]
    with pytest.raises(
        ValueError, match=r"^apply: names do not match Linear at '<root>': .*got missing \['bias'\]"
    ):
        fe.apply(model, params, buffers, torch.ones(1, 2))


def test_wrappers_rejected_with_fix() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"'_orig_mod\.' prefix\. Pass `model\._orig_mod`"):
        fe.module_state(torch.compile(model))
    with pytest.raises(ValueError, match=r"'module\.' prefix\. Pass `model\.module`"):
        fe.module_state(nn.DataParallel(model))


def test_lazy_module_rejected() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"uninitialized lazy tensor at '0.weight'"):
        fe.module_state(model)
    model(torch.ones(1, 4))
    params, _ = fe.module_state(model)
    assert params["0.weight"].shape == (3, 4)
