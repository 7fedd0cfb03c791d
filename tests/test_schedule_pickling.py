"""Built-in schedules are small picklable objects with a readable repr (``torch.save(ema)``,
spawned workers)."""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle

import pytest
import torch
from helpers import assert_bits_equal
from torch import nn

import functional_ema as fe


SCHEDULES = {
    "constant": (lambda: fe.constant(0.99), "constant(decay=0.99)"),
    "constant bank": (lambda: fe.constant([0.9, 0.99]), "constant(decay=(0.9, 0.99))"),
    "tf_warmup": (lambda: fe.tf_warmup(0.999), "tf_warmup(decay=0.999)"),
    "warmup": (
        lambda: fe.warmup(0.999, inv_gamma=2.0, power=0.75),
        "warmup(decay=0.999, inv_gamma=2.0, power=0.75, min_decay=0.0)",
    ),
    "half_life": (lambda: fe.half_life(100), "half_life(steps=100.0)"),
    "power": (lambda: fe.power(gamma=7.0), "power(gamma=7.0)"),
    "power bank": (lambda: fe.power(gamma=[5.0, 7.0]), "power(gamma=(5.0, 7.0))"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_builtin_schedule_pickles_and_reads_as_its_call(name: str) -> None:
    make, shown = SCHEDULES[name]
    schedule = make()
    assert repr(schedule) == shown
    copied = pickle.loads(pickle.dumps(schedule))
    for t, dt in ((1, 1), (10, 1), (100, 10)):
        t_, dt_ = torch.tensor(t), torch.tensor(dt)
        assert torch.equal(copied(t_, dt_), schedule(t_, dt_))


def _trained(decay: object) -> fe.EMA:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = fe.EMA(model, decay)  # type: ignore[arg-type]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))
        ema.update()
    return ema


@pytest.mark.parametrize("name", [n for n in SCHEDULES if "bank" not in n])
def test_torch_save_of_an_ema_with_each_schedule(name: str) -> None:
    ema = _trained(SCHEDULES[name][0]())
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert repr(loaded.decay) == repr(ema.decay)
    assert_bits_equal(loaded.state(), ema.state())
    loaded.model.load_state_dict(ema.model.state_dict())
    ema.update()
    loaded.update()
    assert_bits_equal(loaded.state(), ema.state())


def test_use_num_updates_is_tf_warmup_and_pickles() -> None:
    ema = fe.EMA(nn.Linear(2, 2), 0.999, use_num_updates=True)
    assert repr(ema.decay) == "tf_warmup(decay=0.999)"
    assert repr(pickle.loads(pickle.dumps(ema)).decay) == "tf_warmup(decay=0.999)"


def _update_in_child(ema: fe.EMA) -> dict[str, torch.Tensor]:
    ema.update()
    return {k: v.clone() for k, v in ema.state()["params"].items()}


def test_an_ema_with_a_schedule_crosses_to_a_spawned_worker() -> None:
    """(torch's multiprocessing shares tensors with the worker: the expected update is
    computed on a copy first.)"""
    ema = _trained(fe.warmup(0.99))
    expected = copy.deepcopy(ema)
    expected.update()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_update_in_child, (ema,))
    assert_bits_equal(got, expected.state()["params"])
