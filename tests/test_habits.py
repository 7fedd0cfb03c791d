"""Habits from the peers get an error that says what was meant and how to write it here."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal
from torch import nn

import functional_ema as fe


def test_update_with_the_model_says_update_takes_no_model() -> None:
    model = nn.Linear(2, 2)
    ema = fe.EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.state()["params"].items()}
    with pytest.raises(
        TypeError, match=r"EMA\.update: a model passed to update\(\).*ema\.update\(\)"
    ):
        ema.update(model)  # type: ignore[arg-type]
    assert_bits_equal(ema.state()["params"], before)
    assert int(ema.step) == 0


@pytest.mark.parametrize("where", ["params", "buffers"])
def test_init_with_a_module_says_module_state(where: str) -> None:
    model = nn.Linear(2, 2)
    args = (model, None) if where == "params" else ({"w": torch.zeros(2)}, model)
    with pytest.raises(
        TypeError,
        match=rf"init: a module passed as a tree of tensors at '{where}'.*module_state\(model\)",
    ):
        fe.init(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("api", ["ema_update", "ema_update_"])
def test_a_schedule_given_to_ema_update_says_use_a_state(api: str) -> None:
    shadow = {"w": torch.zeros(2)}
    with pytest.raises(
        TypeError,
        match=rf"{api}: a schedule passed as the decay.*fe\.update\(state, params, schedule\)",
    ):
        getattr(fe, api)(shadow, {"w": torch.ones(2)}, fe.tf_warmup(0.99))
    assert torch.equal(shadow["w"], torch.zeros(2))


@pytest.mark.parametrize("api", ["update", "update_"])
@pytest.mark.parametrize("decay", [0.9, torch.tensor(0.9)])
def test_decay_and_buffers_swapped_say_the_order(api: str, decay: object) -> None:
    state = fe.init({"w": torch.zeros(2)}, {"b": torch.zeros(1)})
    with pytest.raises(
        TypeError,
        match=rf"{api}: decay and buffers swapped.*{api}\(state, params, decay, buffers\)",
    ):
        getattr(fe, api)(state, {"w": torch.ones(2)}, {"b": torch.ones(1)}, decay)
    assert int(state["step"]) == 0
    new = getattr(fe, api)(state, {"w": torch.ones(2)}, 0.5, {"b": torch.ones(1)})  # the order
    assert torch.equal(new["params"]["w"], torch.full((2,), 0.5))


def test_repr_says_what_the_ema_holds() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    ema = fe.EMA(model, 0.999, use_num_updates=True)
    ema.update()
    shown = repr(ema)
    assert shown == (
        "EMA(decay=tf_warmup(decay=0.999), step=1, 3 averages (12 elements, float32 on cpu), "
        "3 buffers (copy), 1 frozen, nonfinite='skip', nonfinite_updates=0, "
        "forward=live model)"
    )
    assert "Module()" not in shown
    ema.eval()
    assert repr(ema).endswith("forward=averages)")
