"""The EMA adapter: routing, equality with the functional core, swap, state_dict, options."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from helpers import assert_bits_equal, snapshot
from torch import nn

import functional_ema as fe


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train_steps(model: nn.Module, steps: int, after_step=lambda: None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step()


def test_adapter_equals_functional_loop_bit_for_bit() -> None:
    model_a, model_b = make_model(), make_model()
    ema = fe.EMA(model_a, 0.9, use_num_updates=True)
    params, buffers = fe.module_state(model_b)
    state = fe.init(params, buffers)
    shadow = fe.init(params)["params"]

    def functional_update() -> None:
        nonlocal state, shadow
        p, b = fe.module_state(model_b)
        decay = fe.tf_decay(0.9, state["step"] + 1)  # TF's num_updates counts this update
        shadow = fe.ema_update(shadow, p, decay)
        state = fe.update(state, p, fe.tf_warmup(0.9), b)

    train_steps(model_a, 7, ema.update)
    train_steps(model_b, 7, functional_update)
    assert_bits_equal(ema.state(), state)
    assert_bits_equal(ema.state()["params"], shadow)
    assert ema.step.item() == 7
    assert ema.state()["buffers"]["1.num_batches_tracked"].item() == 7


def test_train_routes_to_live_model_eval_to_averages() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    train_steps(model, 5, ema.update)
    x = torch.randn(6, 4)
    ema.train()
    assert torch.equal(ema(x), model(x))
    ema.eval()
    assert model.training  # routing only: the live model's mode is the user's
    before = snapshot(model.state_dict())
    out = ema(x)
    assert model.training
    state = ema.state()
    model.eval()
    expected = torch.func.functional_call(
        model, (state["params"], state["buffers"]), (x,), strict=True
    )
    assert torch.equal(out, expected)
    assert not torch.equal(out, model(x))
    assert_bits_equal(model.state_dict(), before)


def test_update_follows_the_live_model_mode_and_warns_once() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    model.eval()
    with pytest.warns(UserWarning, match="EMA.update: the live model is in eval mode") as seen:
        ema.update()
    assert seen[0].filename == __file__  # the caller's line, not a torch file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update()  # once per EMA
    assert ema.step.item() == 0
    # timm's loop: ema.eval() to validate, model.train() each epoch, never ema.train()
    ema.eval()
    model.train()
    ema.update()
    assert ema.step.item() == 1


def test_swap_restores_bit_for_bit_also_on_exception() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    train_steps(model, 4, ema.update)
    live = snapshot(model.state_dict())
    x = torch.randn(3, 4)
    ema.eval()
    model.eval()
    expected = ema(x)
    with ema.swap() as swapped:
        assert swapped is model
        assert torch.equal(model(x), expected)
        with pytest.raises(RuntimeError, match=r"EMA.update: called inside `with ema.swap"):
            ema.update()
    assert_bits_equal(model.state_dict(), live)
    with pytest.raises(KeyError), ema.swap():
        raise KeyError("boom")
    assert_bits_equal(model.state_dict(), live)


def test_state_dict_roundtrip_into_fresh_adapter() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    train_steps(model, 3, ema.update)
    blob = io.BytesIO()
    torch.save(ema.state_dict(), blob)
    blob.seek(0)
    fresh_model = make_model()
    fresh = fe.EMA(fresh_model, 0.9)
    fresh.load_state_dict(torch.load(blob, weights_only=True))
    assert_bits_equal(fresh.state(), ema.state())
    assert not any(k.startswith("model") for k in ema.state_dict())
    # continuing both gives the same bits
    fresh_model.load_state_dict(model.state_dict())
    ema.update()
    fresh.update()
    assert_bits_equal(fresh.state(), ema.state())


def test_shadow_module_and_copy_to() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    train_steps(model, 3, ema.update)
    ema.eval()
    x = torch.randn(5, 4)
    shadow = ema.shadow
    assert isinstance(shadow, nn.Sequential) and not shadow.training
    assert list(shadow.state_dict()) == list(model.state_dict())
    assert torch.equal(shadow(x), ema(x))
    assert all(not p.requires_grad for p in shadow.parameters())
    target = make_model().eval()
    ema.copy_to(target)
    assert torch.equal(target(x), ema(x))


def test_wider_dtype_for_bf16_model() -> None:
    model = make_model().to(torch.bfloat16)
    ema = fe.EMA(model, 0.999, dtype=torch.float32)
    assert ema.state()["params"]["0.weight"].dtype == torch.float32
    assert ema.state()["buffers"]["1.running_mean"].dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    for _ in range(10):
        ema.update()
    ema.eval()
    out = ema(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    moved = ema.state()["params"]["0.bias"] - make_model().to(torch.bfloat16)[0].bias.float()
    assert moved.abs().min() > 0  # the fp32 average moves where a bf16 one would stall


def test_buffer_policy_average() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.5, buffer_policy="average")
    train_steps(model, 2, ema.update)
    held = ema.state()["buffers"]
    assert not torch.equal(held["1.running_mean"], model[1].running_mean)
    assert held["1.num_batches_tracked"].item() == 2


def test_decay_schedule_and_tensor_decay() -> None:
    model = make_model()
    ema = fe.EMA(model, lambda t, dt: torch.tensor(0.5))
    ema2 = fe.EMA(make_model(), torch.tensor(0.5))
    train_steps(model, 2, ema.update)
    assert ema.step.item() == 2
    assert ema2.step.item() == 0


def test_to_moves_only_averages() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9).to(torch.float64)
    assert ema.state()["params"]["0.weight"].dtype == torch.float64
    assert model[0].weight.dtype == torch.float32
