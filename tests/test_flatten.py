"""flatten_parameters_: parameters only, no empty or non-contiguous tensor moved, same bits.

Buffers stay where they are (observers ``resize_`` them), empty parameters are not aliased,
non-contiguous (``channels_last``) parameters keep their memory format, and a flattened
model trains, and is averaged, bit for bit like an unflattened twin.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import optree
import pytest
import torch
from helpers import assert_bits_equal, bits, mlp, train
from torch import nn

import functional_ema as fe
from functional_ema import _engine


class Observer(nn.Module):
    """A per-channel min/max observer, as ``torch.ao.quantization`` writes them.

    Its statistics start empty and are ``resize_``d on the first forward (the way
    ``PerChannelMinMaxObserver`` does), so a view of a shared buffer would grow into its
    neighbours.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(x.shape[0], -1)
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        if self.min_val.numel() == 0:
            self.min_val.resize_(low.shape).copy_(low)
            self.max_val.resize_(high.shape).copy_(high)
        else:
            torch.minimum(self.min_val, low, out=self.min_val)
            torch.maximum(self.max_val, high, out=self.max_val)
        return x


def fake_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per-row 8-bit fake quantization with a straight-through gradient."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    scale = ((high - low) / 255).clamp_min(1e-8).reshape(shape)
    return x + (torch.round(x / scale) * scale - x).detach()


class QATLinear(nn.Module):
    """A linear layer trained with fake-quantized weights (quantization-aware training)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.weight_observer = Observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        self.weight_observer(weight)
        weight = fake_quantize(weight, self.weight_observer.min_val, self.weight_observer.max_val)
        return nn.functional.linear(x, weight, self.linear.bias)


def qat_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(QATLinear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), QATLinear(16, 3))


def channels_last_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),  # a 1x1 kernel: contiguous in both memory formats
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def image_batch(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)


def feature_batch(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(8, 6, generator=gen)


def fit(
    model: nn.Module,
    batch: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    ema: fe.EMA | None = None,
) -> None:
    """``steps`` SGD steps with momentum on deterministic batches (and EMA updates)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        loss = model(batch(gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()


def everything(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (``state_dict`` without its detach)."""
    return {
        name: tensor.detach()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }


def storages(tensors: dict[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}


def test_qat_model_buffers_stay_put_and_training_keeps_the_bits() -> None:
    plain, flat = qat_model(), qat_model()
    buffers_before = {name: id(b) for name, b in flat.named_buffers()}
    buffer_storage = {name: b.untyped_storage()._cdata for name, b in flat.named_buffers()}
    fe.flatten_parameters_(flat)
    params = dict(flat.named_parameters())
    assert len(storages(params)) == 1  # every parameter is a view of one buffer
    assert {name: id(b) for name, b in flat.named_buffers()} == buffers_before
    assert {name: b.untyped_storage()._cdata for name, b in flat.named_buffers()} == buffer_storage
    fit(plain, feature_batch, 3)
    fit(flat, feature_batch, 3)
    assert_bits_equal(everything(flat), everything(plain))
    assert flat[0].weight_observer.min_val.shape == (16,)
    shared = storages(params)
    assert not shared & storages(dict(flat.named_buffers())), "a buffer views the parameters"
    assert len(storages(dict(flat.named_parameters()))) == 1  # still one region


def test_flattened_parameters_are_one_region_in_the_ema_order() -> None:
    model = qat_model()
    model[0].linear.bias.requires_grad_(False)
    fe.flatten_parameters_(model)
    named = sorted(model.named_parameters())
    order = [n for n, p in named if p.requires_grad] + [n for n, p in named if not p.requires_grad]
    offsets = [dict(named)[n].storage_offset() for n in order]
    sizes = [dict(named)[n].numel() for n in order]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    # The averaged values, in the order the EMA visits them (optree's sorted dict keys), are
    # one region: the engine's fast path.
    averaged = optree.tree_leaves(fe.module_state(model)[0])
    assert _engine.flat_view(averaged) is not None


def test_ema_of_a_flattened_model_keeps_the_bits() -> None:
    plain, flat = qat_model(), qat_model()
    gen = torch.Generator().manual_seed(1)
    calibration = feature_batch(gen)
    plain(calibration)  # the observers size their statistics before the EMA copies them
    flat(calibration)
    fe.flatten_parameters_(flat)
    ema_plain, ema_flat = fe.EMA(plain, 0.9), fe.EMA(flat, 0.9)
    fit(plain, feature_batch, 4, ema_plain)
    fit(flat, feature_batch, 4, ema_flat)
    assert_bits_equal(ema_flat.state(), ema_plain.state())
    assert_bits_equal(everything(flat), everything(plain))


def test_ema_of_a_flattened_mlp_keeps_the_bits() -> None:
    plain, flat = mlp(), fe.flatten_parameters_(mlp())
    ema_plain, ema_flat = fe.EMA(plain, 0.9), fe.EMA(flat, 0.9)
    train(plain, ema_plain, 5)
    train(flat, ema_flat, 5)
    assert_bits_equal(ema_flat.state(), ema_plain.state())


def test_channels_last_weights_keep_their_memory_format() -> None:
    plain, flat = channels_last_model(), channels_last_model()
    strides = {name: p.stride() for name, p in flat.named_parameters()}
    fe.flatten_parameters_(flat)
    params = dict(flat.named_parameters())
    assert {name: p.stride() for name, p in params.items()} == strides
    for name in ("0.weight", "3.weight"):
        assert params[name].is_contiguous(memory_format=torch.channels_last), name
    # The 3x3 kernel is not contiguous: left where it is. The 1x1 kernel is: packed.
    packed = params["0.bias"].untyped_storage().data_ptr()
    assert params["0.weight"].untyped_storage().data_ptr() != packed
    assert params["3.weight"].untyped_storage().data_ptr() == packed
    fit(plain, image_batch, 3)
    fit(flat, image_batch, 3)
    assert_bits_equal(everything(flat), everything(plain))
    assert flat[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert flat[0].weight.stride() == strides["0.weight"]


def test_ema_of_a_flattened_channels_last_model_keeps_the_bits() -> None:
    plain, flat = channels_last_model(), fe.flatten_parameters_(channels_last_model())
    ema_plain, ema_flat = fe.EMA(plain, 0.9), fe.EMA(flat, 0.9)
    fit(plain, image_batch, 3, ema_plain)
    fit(flat, image_batch, 3, ema_flat)
    assert_bits_equal(ema_flat.state(), ema_plain.state())


class WithEmpty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.empty = nn.Parameter(torch.empty(0))
        self.frozen_empty = nn.Parameter(torch.empty(0, 4), requires_grad=False)
        self.z = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z(self.a(x)) + self.empty.sum()


def test_empty_parameters_are_left_alone() -> None:
    model = WithEmpty()
    empty_storages = {
        name: model.get_parameter(name).untyped_storage()._cdata
        for name in ("empty", "frozen_empty")
    }
    fe.flatten_parameters_(model)
    for name, storage in empty_storages.items():
        assert model.get_parameter(name).untyped_storage()._cdata == storage, name
    assert model.frozen_empty.shape == (0, 4)
    # Growing an empty parameter does not write into the flattened ones.
    before = {name: p.clone() for name, p in model.named_parameters() if p.numel()}
    with torch.no_grad():
        model.frozen_empty.resize_(8, 4).fill_(7.0)
    for name, value in before.items():
        assert torch.equal(bits(model.get_parameter(name)), bits(value)), name


def test_empty_parameters_train_like_a_twin() -> None:
    plain, flat = WithEmpty(), fe.flatten_parameters_(WithEmpty())
    ema_plain, ema_flat = fe.EMA(plain, 0.9), fe.EMA(flat, 0.9)

    def batch(gen: torch.Generator) -> torch.Tensor:
        return torch.randn(5, 3, generator=gen)

    fit(plain, batch, 3, ema_plain)
    fit(flat, batch, 3, ema_flat)
    assert_bits_equal(everything(flat), everything(plain))
    assert_bits_equal(ema_flat.state(), ema_plain.state())


def saved_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_submodule_state_dict_saves_the_shared_storage_unless_cloned() -> None:
    model = nn.ModuleDict({"big": nn.Linear(512, 512), "small": nn.Linear(8, 8)})
    fe.flatten_parameters_(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    small = model["small"].state_dict()
    # Documented pitfall: the views carry the whole shared storage into the file.
    assert saved_bytes(small) > total
    # The documented fix: clone before saving.
    cloned = saved_bytes({k: v.clone() for k, v in small.items()})
    assert cloned < 4096
    # The whole model's state_dict writes the shared storage once.
    assert saved_bytes(model.state_dict()) < total + 4096
    restored = nn.Linear(8, 8)
    restored.load_state_dict(torch.load(io.BytesIO(_save(small)), weights_only=True))
    assert_bits_equal(dict(restored.state_dict()), dict(small))


def _save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_flattening_twice_keeps_values_and_layout() -> None:
    model = qat_model()
    fe.flatten_parameters_(model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    fe.flatten_parameters_(model)
    assert_bits_equal(
        {name: p.detach() for name, p in model.named_parameters()},
        before,
    )
    assert len(storages(dict(model.named_parameters()))) == 1


class SharedMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("view", self.weight.detach()[1])


def test_parameter_sharing_memory_with_a_buffer_refused_before_any_move() -> None:
    model = SharedMemory()
    pointer = model.weight.data_ptr()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "flatten_parameters_: parameter sharing memory at 'weight': expected parameters "
            "that share no memory with another parameter or buffer, got memory shared with "
            "'view'. Flattening would copy it apart from that tensor."
        ),
    ):
        fe.flatten_parameters_(model)
    assert model.weight.data_ptr() == pointer
    assert model.view.data_ptr() == model.weight[1].data_ptr()
