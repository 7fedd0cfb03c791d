"""Regression tests for problems an adversarial review found in the adapter's options.

Each test names the behaviour it holds; each failed before its fix.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import functional_ema as fe
from functional_ema._offload import Staging
from tests.helpers import assert_bits_equal


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def move(model: nn.Module, call: int) -> None:
    gen = torch.Generator().manual_seed(call)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    model(torch.randn(5, 3, generator=gen))


def tensors(ema: fe.EMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}


class Holder(nn.Module):
    """A training module holding its EMA as a submodule (Lightning's habit)."""

    def __init__(self, model: nn.Module, **kwargs: object) -> None:
        super().__init__()
        self.ema = fe.EMA(model, 0.9, **kwargs)  # type: ignore[arg-type]


def test_a_parent_load_with_assign_keeps_updating_the_loaded_averages() -> None:
    model = make_model()
    source = fe.EMA(model, 0.9)
    move(model, 1)
    source.update()
    holder = Holder(model)
    holder.ema.update()  # a plan cached on the old tensors
    holder.load_state_dict(
        {f"ema.{k}": getattr(v, "clone", lambda v=v: v)() for k, v in source.state_dict().items()},
        assign=True,
    )
    move(model, 2)
    source.update()
    holder.ema.update()
    assert_bits_equal(tensors(holder.ema), tensors(source))


def test_a_parent_load_checks_settings_before_writing_and_applies_them() -> None:
    model = make_model()
    holder = Holder(model)
    saved = {
        f"ema.{k}": v for k, v in fe.EMA(model, 0.5, buffer_policy="average").state_dict().items()
    }
    saved["ema.step"] = torch.tensor(99)
    bad = {**saved, "ema._extra_state": {**saved["ema._extra_state"], "update_every": 0}}
    with pytest.raises(ValueError, match=r"update_every"):
        holder.load_state_dict(bad)
    assert int(holder.ema.step) == 0
    holder.load_state_dict(saved)
    assert (holder.ema.decay, holder.ema.buffer_policy) == (0.5, "average")
    old = {k: v for k, v in saved.items() if k != "ema._extra_state"}  # an older checkpoint
    holder.load_state_dict(old)


def test_resuming_an_extended_ema_refuses_to_drop_the_saved_averages() -> None:
    model = make_model()
    model[2].requires_grad_(False)
    ema = fe.EMA(model, 0.9)
    move(model, 1)
    ema.update()
    model[2].requires_grad_(True)
    ema.extend()
    move(model, 2)
    ema.update()
    saved = ema.state_dict()
    model[2].requires_grad_(False)
    fresh = fe.EMA(model, 0.9)  # as the resumed script makes it, before unfreezing
    before = tensors(fresh)
    with pytest.raises(ValueError, match=r"call ema.extend\(\['2.weight', '2.bias'\]\)"):
        fresh.load_state_dict(saved)
    assert_bits_equal(tensors(fresh), before)
    fresh.extend(["2.weight", "2.bias"])
    fresh.load_state_dict(saved)
    assert_bits_equal(tensors(fresh), tensors(ema))


def test_the_staged_update_refuses_swapped_submodules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fe.EMA, "_elsewhere", lambda self: self._offload)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ema = fe.EMA(model, 0.9, device="cpu")
    ema.update()
    model[0], model[1] = model[1], model[0]
    with pytest.raises(ValueError, match=r"a tensor moved to another name"):
        ema.update()


def test_the_staged_update_calls_a_schedule_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fe.EMA, "_elsewhere", lambda self: self._offload)
    calls = []

    def schedule(t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        calls.append(int(t))
        return torch.tensor(0.9, dtype=torch.float64)

    ema = fe.EMA(make_model(), schedule, device="cpu")
    ema._staging = Staging(limit=64)
    ema.update()
    assert calls == [1]


def test_an_exact_name_with_brackets_is_not_a_glob() -> None:
    model = nn.Module()
    model.layers = nn.ModuleDict({"a[0]": nn.Linear(2, 2), "a0": nn.Linear(2, 2)})
    ema = fe.EMA(model, 0.9, exclude=["layers.a[0].weight"])
    assert "layers.a0.weight" in ema.state()["params"]
    assert "layers.a[0].weight" not in ema.state()["params"]


def test_keep_hyperparameters_loads_a_checkpoint_with_an_unknown_schedule() -> None:
    model = make_model()
    saved = fe.EMA(model, 0.9).state_dict()
    saved["_extra_state"] = {**saved["_extra_state"], "decay": {"schedule": "future"}}
    ema = fe.EMA(model, 0.7)
    with pytest.raises(ValueError, match=r"unknown schedule"):
        ema.load_state_dict(saved)
    ema.load_state_dict(saved, keep_hyperparameters=True)
    assert ema.decay == 0.7
    bad = {**saved["_extra_state"], "decay": {"schedule": "warmup", "decay": 1.5}}
    with pytest.raises(ValueError, match=r"_extra_state'\]\['decay'\]"):
        ema.load_state_dict({**saved, "_extra_state": bad})


def test_pickling_leaves_the_staging_buffers_out() -> None:
    ema = fe.EMA(make_model(), 0.9, device="cpu")
    ema._staging.buffers.append(torch.zeros(1 << 20, dtype=torch.uint8))
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    assert buffer.tell() < 1 << 20
    assert pickle.loads(pickle.dumps(ema))._staging.buffers == []


def test_settings_are_checked_when_assigned_and_take_effect() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    ema.update()
    with pytest.raises(ValueError, match=r"buffer_policy"):
        ema.buffer_policy = "bogus"  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"update_every out of range"):
        ema.update_every = 0
    with pytest.raises(TypeError, match=r"update_every of the wrong type"):
        ema.update_every = 2.0  # type: ignore[assignment]
    ema.buffer_policy = "average"  # the cached plan copied the buffers
    reference = fe.EMA(model, 0.9, buffer_policy="average")
    reference.load_state_dict(ema.state_dict())
    move(model, 1)
    ema.update()
    reference.update()
    assert_bits_equal(tensors(ema), tensors(reference))


def test_a_tensor_decay_is_loaded_as_a_copy_and_banks_are_refused() -> None:
    model = make_model()
    source = fe.EMA(model, torch.tensor(0.9, dtype=torch.float64))
    target = fe.EMA(model, 0.5)
    target.load_state_dict(source.state_dict())
    assert target.decay is not source.decay and float(target.decay) == 0.9
    with pytest.raises(ValueError, match=r"a bank schedule at 'decay'"):
        fe.EMA(model, fe.power(gamma=(5.0, 7.0)))


@pytest.mark.parametrize(("device", "match"), [("meta", "averages without data"), ("cuda", "")])
def test_unusable_devices_are_refused(device: str, match: str) -> None:
    if device == "cuda" and torch.cuda.is_available():  # pragma: no cover - GPU machine
        pytest.skip("this machine has CUDA: the device is usable")
    with pytest.raises(ValueError, match=match or r"a device this machine does not have"):
        fe.EMA(make_model(), 0.9, device=device)
