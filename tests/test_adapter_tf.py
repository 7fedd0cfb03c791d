"""The adapter's counterparts of TF's ``apply()`` on a longer ``var_list``, ``average(var)``
and a subset ``variables_to_restore()``: checked against the functional core, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functional_ema as fe
from tests.helpers import assert_bits_equal


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def move(model: nn.Module, call: int) -> None:
    gen = torch.Generator().manual_seed(call)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_extend_starts_new_averages_at_the_value_and_shares_the_step() -> None:
    """TF: ``apply([a])`` for 3 steps, then ``apply([a, b])``: b's shadow starts at b's value
    then and takes the same (global) decay as a from there."""
    model = make_model()
    model[0].requires_grad_(False)
    ema = fe.EMA(model, fe.tf_warmup(0.9))
    head = {n: p for n, p in model.named_parameters() if n.startswith("1.")}
    state = fe.init({n: p.detach() for n, p in head.items()})
    for call in range(1, 4):
        move(model, call)
        ema.update()
        state = fe.update(state, {n: p.detach() for n, p in head.items()}, fe.tf_warmup(0.9))
    model[0].requires_grad_(True)
    assert ema.extend() == ["0.weight", "0.bias"]
    assert ema.extend() == []
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")}
    assert_bits_equal({n: ema.average(n) for n in backbone}, backbone)
    both = {"head": state["params"], "backbone": backbone}
    state = {**state, "params": both}
    for call in range(4, 8):
        move(model, call)
        ema.update()
        values = {
            "head": {n: p.detach() for n, p in head.items()},
            "backbone": {n: p.detach() for n, p in model.named_parameters() if n.startswith("0.")},
        }
        state = fe.update(state, values, fe.tf_warmup(0.9))
        for group in both:
            assert_bits_equal(
                {n: ema.average(n) for n in state["params"][group]}, state["params"][group]
            )
    # The shadow and a checkpoint see the extended averages.
    assert torch.equal(ema.shadow[0].weight, ema.average("0.weight"))
    assert "averages.0.weight" in ema.state_dict()


def test_extend_by_name_and_errors() -> None:
    model = make_model()
    model.requires_grad_(False)
    with pytest.warns(UserWarning, match="nothing to average"):
        ema = fe.EMA(model, 0.9)
    assert ema.extend(["1.*"]) == ["1.weight", "1.bias"]
    with pytest.raises(
        ValueError, match=r"a pattern that matches nothing \('2.\*'\) at 'names\[0\]'"
    ):
        ema.extend(["2.*"])
    with ema.swap(), pytest.raises(RuntimeError, match=r"EMA.extend: called inside"):
        ema.extend(["0.*"])
    assert sorted(ema.state()["params"]) == ["1.bias", "1.weight"]


def test_average_lookup() -> None:
    model = make_model()
    model[0].requires_grad_(False)
    ema = fe.EMA(model, 0.9)
    assert ema.average("1.weight") is ema.state()["params"]["1.weight"]
    assert ema.average(model[1].bias) is ema.state()["params"]["1.bias"]
    with pytest.raises(ValueError, match=r"frozen or excluded, not averaged at '0.weight'"):
        ema.average("0.weight")
    with pytest.raises(ValueError, match=r"no such name at 'nope'"):
        ema.average("nope")
    with pytest.raises(ValueError, match=r"a tensor that is not the model's at 'name'"):
        ema.average(torch.zeros(1))


def test_copy_to_a_subset() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.5)
    move(model, 1)
    ema.update()
    fresh = make_model()
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    ema.copy_to(fresh, names=["1.weight"])
    assert torch.equal(fresh[1].weight, ema.average("1.weight"))
    for name in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(dict(fresh.named_parameters())[name], before[name])
    with pytest.raises(ValueError, match=r"names\[0\]"):
        ema.copy_to(fresh, names=["x.*"])
