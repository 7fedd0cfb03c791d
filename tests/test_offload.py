"""Averages on another device (``EMA(..., device=)``): the staged update, checked on the CPU.

A CPU-only machine has one device, so the staged path is forced (``EMA._elsewhere``) and the
staging buffers made tiny: every chunking and split path runs, and each result must equal,
bit for bit, the update of an EMA on the model's own device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functional_ema as fe
from functional_ema._offload import Staging
from tests.helpers import assert_bits_equal


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))


def step(model: nn.Module, call: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(call)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        if nan:
            model[2].weight[1, 2] = float("nan")
    model(torch.randn(4, 5, generator=gen).to(next(model.parameters()).dtype))


def tensors(ema: fe.EMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fe.EMA, "_elsewhere", lambda self: self._offload)


@pytest.mark.parametrize("limit", [64, 200, 1 << 20])
@pytest.mark.parametrize(
    "options",
    [
        {"decay": fe.tf_warmup(0.99)},
        {"decay": 0.9, "buffer_policy": "average"},
        {"decay": fe.power(gamma=7.0), "update_every": 3, "update_after": 2},
        {"decay": 0.9, "nonfinite": "propagate"},
    ],
    ids=["tf_warmup", "average_buffers", "timing", "propagate"],
)
def test_staged_update_is_bit_identical(staged: None, limit: int, options: dict) -> None:
    model = make_model()
    options = dict(options)
    decay = options.pop("decay")
    reference = fe.EMA(model, decay, **options)
    offloaded = fe.EMA(model, decay, device="cpu", **options)
    offloaded._staging = Staging(limit=limit)
    for call in range(1, 9):
        step(model, call, nan=call == 5)
        reference.update()
        offloaded.update()
        assert_bits_equal(tensors(offloaded), tensors(reference))
    assert int(offloaded.nonfinite_updates) == int(reference.nonfinite_updates)
    if limit == 64:  # 16*5 floats do not fit 64 bytes: split leaves, many chunks
        assert len(offloaded._staging.buffers) == 2
        assert all(b.numel() <= 64 for b in offloaded._staging.buffers)


def test_staged_update_with_wider_averages(staged: None) -> None:
    model = make_model().to(torch.bfloat16)
    reference = fe.EMA(model, 0.99, dtype=torch.float32)
    offloaded = fe.EMA(model, 0.99, dtype=torch.float32, device="cpu")
    offloaded._staging = Staging(limit=128)
    for call in range(1, 5):
        step(model, call)
        reference.update()
        offloaded.update()
    assert_bits_equal(tensors(offloaded), tensors(reference))


def test_staged_update_follows_a_resized_buffer(staged: None) -> None:
    model = make_model()
    model.register_buffer("observer", torch.zeros(0))
    reference = fe.EMA(model, 0.9)
    offloaded = fe.EMA(model, 0.9, device="cpu")
    offloaded._staging = Staging(limit=64)
    model.observer.resize_(7).fill_(3.0)
    reference.update()
    offloaded.update()
    assert_bits_equal(tensors(offloaded), tensors(reference))
    assert offloaded.state()["buffers"]["observer"].shape == (7,)


def test_staged_raise_writes_nothing(staged: None) -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9, device="cpu", nonfinite="raise")
    ema._staging = Staging(limit=64)
    step(model, 1, nan=True)  # the NaN is in the last layer: the last chunks
    before = tensors(ema)
    with pytest.raises(ValueError, match=r"non-finite value at '2.weight'"):
        ema.update()
    assert_bits_equal(tensors(ema), before)
    assert ema._calls == 0


def test_staged_structure_change_writes_nothing(staged: None) -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9, device="cpu")
    ema._staging = Staging(limit=64)
    before = tensors(ema)
    with torch.no_grad():
        model[2].weight = nn.Parameter(torch.zeros(3, 15))
    with pytest.raises(ValueError, match=r"2.weight"):
        ema.update()
    assert_bits_equal(tensors(ema), before)


def test_same_device_needs_no_staging() -> None:
    model = make_model()
    reference = fe.EMA(model, 0.9)
    ema = fe.EMA(model, 0.9, device="cpu")
    step(model, 1)
    reference.update()
    ema.update()
    assert ema._staging.buffers == []
    assert_bits_equal(tensors(ema), tensors(reference))
    ema.eval()
    x = torch.randn(2, 5)
    assert torch.equal(ema(x), reference.eval()(x))
    with ema.swap():
        assert torch.equal(model[0].weight, ema.state()["params"]["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "nope"}, r"not a device at 'device'"),
        ({"pin_memory": True}, r"pin_memory without an accelerator to copy to at 'pin_memory'"),
    ],
)
def test_offload_errors(kwargs: dict, match: str) -> None:
    if "pin_memory" in kwargs and torch.cuda.is_available():  # pragma: no cover - GPU machine
        kwargs = {**kwargs, "device": "meta"}
    with pytest.raises(ValueError, match=match):
        fe.EMA(make_model(), 0.9, **kwargs)


def test_staged_averages_match_averaged_model_with_a_device(staged: None) -> None:
    """AveragedModel(device=...) keeps its averages elsewhere too (a blocking copy per tensor):
    same averages up to the rounding of its lerp (TF's order here), 1e-6 relative."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    peer = AveragedModel(model, device="cpu", multi_avg_fn=get_ema_multi_avg_fn(0.9))
    peer.update_parameters(model)  # its first call copies
    ours = fe.EMA(model, 0.9, device="cpu")
    ours._staging = Staging(limit=256)
    for call in range(1, 8):
        step(model, call)
        peer.update_parameters(model)
        ours.update()
    for name, average in ours.state()["params"].items():
        torch.testing.assert_close(average, peer.module.get_parameter(name), rtol=1e-6, atol=1e-7)
    assert int(ours.step) == int(peer.n_averaged) - 1
