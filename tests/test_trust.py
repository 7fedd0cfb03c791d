"""The adapter against what training scripts do to their model.

Each test changes the model the way a real script does and checks the EMA gives the correct
result, bit for bit against an independent TF-order reference, or a clear error before
anything is written. They run with Dynamo's C++ tensor guards and with the Python check.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
import torch
from helpers import assert_bits_equal, snapshot
from torch import Tensor, nn

import functional_ema as fe
from functional_ema import _compat


DECAY = 0.9


@pytest.fixture(params=["tensor_guards", "python_check"], autouse=True)
def check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs with the C++ guards and with their Python fallback."""
    if request.param == "python_check":
        with _compat.forced_off("tensor_guards"):
            yield
    else:
        yield


class Reference:
    """TF's update written out independently: float32 weight ``1 - decay``, then
    ``shadow - (shadow - value) * weight`` in the shadow's dtype; buffers copied."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def update(self, model: nn.Module, decay: float = DECAY) -> None:
        live = dict(model.named_parameters())
        weight = torch.tensor(1.0) - torch.tensor(decay)  # float32, as TF
        for name, shadow in self.params.items():
            value = live[name].detach()
            w = weight.to(shadow.dtype)
            self.params[name] = shadow - (shadow - value.to(shadow.dtype)) * w
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6))


def step(model: nn.Module, seed: int) -> None:
    """One SGD step of ``model`` on a seeded batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=gen)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)


def check_against(ema: fe.EMA, reference: Reference) -> None:
    state = ema.state()
    assert_bits_equal(state["params"], reference.params)
    for name, held in state["buffers"].items():
        assert_bits_equal(held, reference.buffers[name].to(held.dtype))


def run(model: nn.Module, ema: fe.EMA, reference: Reference, seeds: range) -> None:
    for seed in seeds:
        step(model, seed)
        ema.update()
        reference.update(model)


# --- tensors replaced under the EMA ----------------------------------------------------


def test_p_data_transposed_square_is_read_in_its_new_layout() -> None:
    model = mlp()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(2))
    with torch.no_grad():
        model[3].weight.data = model[3].weight.data.t()  # 6x6: same shape, new strides
    run(model, ema, reference, range(2, 5))
    check_against(ema, reference)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m[0].weight, "data", m[0].weight.data.t()),  # (6, 4) -> (4, 6)
        lambda m: setattr(m[0].bias, "data", m[0].bias.data[:3]),
    ],
    ids=["transposed", "sliced"],
)
def test_p_data_of_another_shape_is_an_error_before_writing(change) -> None:
    model = mlp()
    ema = fe.EMA(model, DECAY)
    ema.update()
    change(model)
    before = snapshot(ema.state_dict())
    with pytest.raises(ValueError, match=r"^EMA.update: shape mismatch at '0\.(weight|bias)'"):
        ema.update()
    assert_bits_equal(ema.state_dict(), before)


def test_p_data_of_another_storage_strides_and_offset() -> None:
    model = mlp()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(2))
    with torch.no_grad():
        big = torch.randn(100)
        model[0].bias.data = big[10:16]  # another storage, at an offset
        wide = torch.randn(6, 8)
        model[0].weight.data = wide[:, ::2]  # non-contiguous, same shape
    run(model, ema, reference, range(2, 5))
    check_against(ema, reference)


def test_tying_late_by_data_after_flattening() -> None:
    model = fe.flatten_parameters_(mlp())
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(2))
    with torch.no_grad():
        model[3].bias.data = model[1].bias.data  # both views of one flattened buffer
    run(model, ema, reference, range(2, 5))
    check_against(ema, reference)


def test_float_conversion_of_a_float64_buffer() -> None:
    model = mlp()
    model.register_buffer("scale", torch.full((3,), 1.0 / 3.0, dtype=torch.float64))
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(2))
    model.float()
    with torch.no_grad():
        model.scale.add_(1)
    run(model, ema, reference, range(2, 4))
    assert ema.state()["buffers"]["scale"].dtype == torch.float32  # a copy mirrors the model
    check_against(ema, reference)


def test_overwrite_params_on_conversion_then_double() -> None:
    model = mlp()
    ema, reference = fe.EMA(model, 0.0), Reference(model)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()  # new Parameter objects
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with torch.no_grad():
        model[3].bias.fill_(5.0)
    ema.update()
    reference.update(model, 0.0)
    assert torch.equal(ema.state()["params"]["3.bias"], torch.full((6,), 5.0))
    check_against(ema, reference)


def test_to_and_back_keeps_following() -> None:
    model = fe.flatten_parameters_(mlp())
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(2))
    model.to(torch.float64).to(torch.float32)  # new storage for every tensor
    run(model, ema, reference, range(2, 4))
    check_against(ema, reference)


class Counting(nn.Module):
    """A forward that reassigns one buffer and resizes another (a quantization observer)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("min_val", torch.tensor([]))

    def forward(self, x: Tensor) -> Tensor:
        self.calls = self.calls + 1  # a new tensor in the slot
        self.min_val.resize_(4)
        with torch.no_grad():
            self.min_val.copy_(x.min(dim=0).values)
        return self.linear(x)


def test_buffers_reassigned_and_resized_by_the_forward() -> None:
    model = Counting()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        model(torch.randn(5, 4, generator=gen)).sum().backward()
        ema.update()
        reference.update(model)
    assert int(ema.state()["buffers"]["calls"]) == 4
    assert ema.state()["buffers"]["min_val"].shape == (4,)
    check_against(ema, reference)


# --- structure changed under the EMA -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "leaf"),
    [
        (lambda m: m.__delitem__(1), "1.weight"),
        (lambda m: delattr(m[3], "weight"), "3.weight"),
        (
            lambda m: nn.utils.parametrize.register_parametrization(m[3], "weight", nn.Identity()),
            "3.weight",
        ),
        (lambda m: setattr(m[3], "weight", m[0].weight), "3.weight"),  # tied late
    ],
    ids=["deleted-submodule", "deleted-parameter", "parametrized", "tied-late"],
)
def test_structure_changes_are_errors_naming_the_leaf(change, leaf: str) -> None:
    model = mlp()
    ema = fe.EMA(model, DECAY)
    ema.update()
    change(model)
    before = snapshot(ema.state_dict())
    with pytest.raises(
        ValueError, match=rf"^EMA.update: .* changed since the EMA was made at '{leaf}'"
    ):
        ema.update()
    assert_bits_equal(ema.state_dict(), before)


def test_no_process_global_hooks() -> None:
    from torch.nn.modules import module as torch_module

    hooks = [
        torch_module._global_parameter_registration_hooks,
        torch_module._global_buffer_registration_hooks,
        torch_module._global_module_registration_hooks,
    ]
    counts = [len(h) for h in hooks]
    model = mlp()
    ema = fe.EMA(model, DECAY)
    ema.update()
    ema.eval()
    ema(torch.randn(2, 4))
    assert [len(h) for h in hooks] == counts


# --- eval, threads, pickling ---------------------------------------------------------------


def test_eval_in_one_thread_never_touches_the_live_model_in_another() -> None:
    model = mlp().eval()
    ema = fe.EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live weights differ from the averages
    ema.eval()
    x = torch.randn(16, 4)
    with torch.no_grad():
        live_out = model(x).clone()
    stop = threading.Event()
    seen = {"live": 0, "other": 0, "ema": 0}

    def live_forwards() -> None:
        while not stop.is_set():
            with torch.no_grad():
                out = model(x)
            seen["live" if torch.equal(out, live_out) else "other"] += 1

    thread = threading.Thread(target=live_forwards)
    thread.start()
    deadline = time.perf_counter() + 1.0
    try:
        while time.perf_counter() < deadline:
            with torch.no_grad():
                ema(x)
            seen["ema"] += 1
    finally:
        stop.set()
        thread.join()
    print(seen)
    assert seen["other"] == 0 and seen["live"] > 0 and seen["ema"] > 0


def test_shadow_is_one_module_sharing_the_averages() -> None:
    model = mlp()
    ema = fe.EMA(model, DECAY)
    run(model, ema, Reference(model), range(2))
    shadow = ema.shadow
    assert ema.shadow is shadow
    assert shadow[0].weight.data_ptr() == ema.state()["params"]["0.weight"].data_ptr()
    assert shadow[1].running_mean is ema.state()["buffers"]["1.running_mean"]
    run(model, ema, Reference(model), range(2, 4))
    assert ema.shadow is shadow  # updates write into the same tensors
    assert torch.equal(shadow[3].bias, ema.state()["params"]["3.bias"])
    model[2] = nn.ReLU()  # another module object: rebuilt
    assert ema.shadow is not shadow


def test_shadow_of_a_bf16_model_with_float32_averages_is_refreshed() -> None:
    model = mlp().to(torch.bfloat16)
    ema = fe.EMA(model, DECAY, dtype=torch.float32)
    with torch.no_grad():
        model[0].bias.add_(1)
    ema.update()
    assert torch.equal(ema.shadow[0].bias, ema.state()["params"]["0.bias"].bfloat16())
    with torch.no_grad():
        model[0].bias.add_(1)
    ema.update()
    assert torch.equal(ema.shadow[0].bias, ema.state()["params"]["0.bias"].bfloat16())


class Locked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.lock = threading.Lock()  # copy.deepcopy cannot copy it

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def test_a_model_that_cannot_be_copied_falls_back_with_a_message() -> None:
    model = Locked()
    ema = fe.EMA(model, 0.5)
    with torch.no_grad():
        model.linear.bias.add_(1)
    ema.update()
    ema.eval()
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"EMA.forward: model cannot be deep-copied .*lock"):
        out = ema(x)
    state = ema.state()
    assert torch.equal(out, torch.func.functional_call(model, state["params"], (x,)))
    with pytest.raises(TypeError, match=r"^EMA.shadow: model cannot be deep-copied"):
        _ = ema.shadow


def test_pickle_and_torch_save_in_every_state() -> None:
    model = fe.flatten_parameters_(mlp())
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    blobs = [pickle.dumps(ema)]  # fresh
    run(model, ema, reference, range(2))
    blobs.append(pickle.dumps(ema))  # planned
    ema.eval()
    ema(torch.randn(2, 4))
    buffer = io.BytesIO()
    torch.save(ema, buffer)  # shadow built
    restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for blob in blobs:
        pickle.loads(blob)
    assert_bits_equal(restored.state(), ema.state())
    restored.train()
    live = restored.model
    step(live, 7)
    restored.update()
    step(model, 7)
    ema.update()
    assert_bits_equal(restored.state(), ema.state())


# --- frozen parameters, mode, nothing to average --------------------------------------


def test_frozen_backbone_is_not_held() -> None:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(3))
    check_against(ema, reference)
    keys = set(ema.state_dict())
    assert not any(k.startswith("averages.0.") for k in keys)
    assert {"averages.3.weight", "averages.3.bias", "averages.1.running_mean"} <= keys
    frozen = ema.shadow[0].weight
    assert frozen.data_ptr() == model[0].weight.data_ptr()  # shared storage, no copy
    assert not frozen.requires_grad and frozen is not model[0].weight
    target = mlp()
    with torch.no_grad():
        target[0].weight.zero_()
    ema.copy_to(target)
    assert torch.equal(target[0].weight, model[0].weight)  # the live frozen values
    assert torch.equal(target[3].weight, ema.state()["params"]["3.weight"])


def test_timm_loop_updates_every_step() -> None:
    model = mlp()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    seed = 0
    for _ in range(3):  # epochs
        model.train()
        for _ in range(5):
            step(model, seed)
            ema.update()
            reference.update(model)
            seed += 1
        ema.eval()  # validate on the averages, never ema.train()
        ema(torch.randn(2, 4))
    assert int(ema.step) == 15
    check_against(ema, reference)


def test_nothing_to_average_warns() -> None:
    model = mlp().requires_grad_(False)
    with pytest.warns(UserWarning, match=r"^EMA: nothing to average at '<root>'") as seen:
        fe.EMA(model, DECAY)
    assert seen[0].filename == __file__


def test_swap_restores_a_buffer_the_forward_reassigned() -> None:
    model = Counting()
    ema = fe.EMA(model, DECAY)
    model(torch.randn(2, 4))
    ema.update()
    calls = model.calls
    with ema.swap():
        model(torch.randn(2, 4))
    assert model.calls is calls and int(calls) == 1


def test_warnings_as_errors_during_updates_and_eval() -> None:
    model = mlp()
    ema = fe.EMA(model, DECAY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            step(model, seed)
            ema.update()
        ema.eval()
        ema(torch.randn(2, 4))
        copy.deepcopy(ema)


# --- found by review ---------------------------------------------------------------------


def test_a_failing_update_leaves_a_followed_buffer_alone() -> None:
    model = Counting()
    ema = fe.EMA(model, DECAY)
    model(torch.randn(3, 4))  # min_val: (0,) -> (4,)
    before = snapshot(ema.state_dict())
    with pytest.raises(ValueError, match=r"dt out of range"):
        ema.update(dt=0)
    assert_bits_equal(ema.state_dict(), before)
    ema.update()
    assert ema.state()["buffers"]["min_val"].shape == (4,)


def test_shadow_keeps_the_held_buffers_when_its_forward_reassigns_them() -> None:
    model = Counting()
    ema = fe.EMA(model, DECAY)
    ema.eval()
    for seed in range(4):
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)))
        ema.update()
        ema(torch.randn(3, 4))  # the shadow's forward reassigns its own `calls`
    assert ema.shadow.calls is ema.state()["buffers"]["calls"]
    assert int(ema.shadow.calls) == int(model.calls) == 4


class FadeIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.alpha = 0.0  # a plain attribute the training script changes

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * self.linear(x)


def test_shadow_follows_the_live_models_plain_attributes() -> None:
    model = FadeIn()
    ema = fe.EMA(model, DECAY)
    ema.eval()
    x = torch.randn(2, 4)
    assert torch.equal(ema(x), torch.zeros(2, 4))
    model.alpha = 1.0
    with ema.swap():
        expected = model(x)
    assert torch.equal(ema(x), expected)


def test_submodules_swapped_in_place_are_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    ema = fe.EMA(model, DECAY)
    ema.update()
    model[0], model[2] = model[2], model[0]  # same objects, other names
    before = snapshot(ema.state_dict())
    with pytest.raises(ValueError, match=r"^EMA.update: a tensor moved to another name at '0\."):
        ema.update()
    assert_bits_equal(ema.state_dict(), before)


def test_a_held_shadow_stays_bound_after_the_averages_move() -> None:
    model = mlp().to(torch.bfloat16)
    ema = fe.EMA(model, DECAY, dtype=torch.float32)
    shadow = ema.shadow
    ema.to(torch.float64)  # the averages are new tensors
    fe.flatten_parameters_(model)  # and so are the live ones
    with torch.no_grad():
        model[0].bias.add_(1)
    ema.update()
    assert ema.shadow is shadow
    assert torch.equal(shadow[0].bias, ema.state()["params"]["0.bias"].bfloat16())


def test_share_memory_is_kept() -> None:
    ema = fe.EMA(mlp(), DECAY).share_memory()
    assert all(t.is_shared() for t in ema.state_dict().values() if isinstance(t, torch.Tensor))


def test_a_sparse_tensor_in_a_state_dict_is_refused_before_writing() -> None:
    ema = fe.EMA(mlp(), DECAY)
    before = snapshot(ema.state_dict())
    bad = dict(ema.state_dict())
    bad["averages.0.bias"] = bad["averages.0.bias"].to_sparse()
    with pytest.raises(TypeError, match=r"expected a torch.strided tensor, got a torch.sparse_coo"):
        ema.load_state_dict(bad)
    assert_bits_equal(ema.state_dict(), before)


def test_no_copy_inside_swap() -> None:
    ema = fe.EMA(mlp(), DECAY)
    with ema.swap(), pytest.raises(RuntimeError, match=r"copied or pickled inside"):
        copy.deepcopy(ema)
    copy.deepcopy(ema)


def test_toggling_requires_grad_keeps_the_plan() -> None:
    model = mlp()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    run(model, ema, reference, range(1))
    planned = ema._planned
    for seed in range(1, 4):
        model.requires_grad_(seed % 2 == 0)  # a GAN freezing its discriminator
        ema.update()
        reference.update(model)
        assert ema._planned is planned
    check_against(ema, reference)


def test_warnings_as_errors_raise_every_time() -> None:
    model = mlp().eval()
    ema = fe.EMA(model, DECAY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(UserWarning, match="live model is in eval mode"):
                ema.update()


def test_a_forward_reassigning_a_buffer_replans_the_buffers_only() -> None:
    model = Counting()
    ema, reference = fe.EMA(model, DECAY), Reference(model)
    params_plans = []
    for seed in range(4):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)))
        ema.update()
        reference.update(model)
        params_plans.append(ema._validated().params_plan)
    assert all(plan is params_plans[0] for plan in params_plans)
    check_against(ema, reference)
