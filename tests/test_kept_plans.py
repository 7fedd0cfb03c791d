"""``update_`` keeps a state's plan between calls: never a different result than planning anew.

Each test changes what a training script may change between two updates (a tensor's memory,
its strides or dtype, a leaf of the state, the trees' keys, the thread) and compares the
averages bit for bit with TF's update written out independently (``Reference``), or checks
that an error comes before anything is written. ``validate`` is spied on to tell a kept
plan from a new one.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable

import pytest
import torch
from helpers import assert_bits_equal, snapshot
from torch import Tensor, nn

import functional_ema as fe
from functional_ema import _update
from functional_ema._engine import use_strategy


DECAY = 0.9


class Reference:
    """TF's update of a tree: float32 ``1 - decay``, then ``s - (s - v) * w`` per leaf."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.params = {n: p.detach().clone() for n, p in params.items()}

    def update(self, params: dict[str, Tensor], decay: float = DECAY) -> None:
        weight = torch.tensor(1.0) - torch.tensor(decay)
        for name, shadow in self.params.items():
            value = params[name].detach().to(shadow.dtype)
            self.params[name] = shadow - (shadow - value) * weight.to(shadow.dtype)


def model() -> nn.Module:
    """Many small tensors (gathered) and one large one (updated where it is)."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 3) for _ in range(30)]
    return nn.Sequential(*layers, nn.Linear(300, 300))


def train(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


@pytest.fixture(autouse=True)
def _no_kept_plans() -> None:
    fe.release_plans()


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The API names ``validate`` was called with (a new plan for each)."""
    calls: list[str] = []
    original = _update.validate

    def spy(api: str, *args: object, **kwargs: object) -> _update.Bound:
        calls.append(api)
        return original(api, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_update, "validate", spy)
    return calls


def _averages(state: fe.EmaState) -> dict[str, Tensor]:
    return dict(state["params"])


def test_a_state_updated_from_the_same_tensors_keeps_its_plan_with_tf_bits(
    validations: list[str],
) -> None:
    net = model()
    params = dict(net.named_parameters())
    state = fe.init(fe.module_state(net)[0])
    reference = Reference(params)
    for step in range(6):
        train(net, step)
        fe.update_(state, params, DECAY)
        reference.update(params)
        assert_bits_equal(_averages(state), reference.params)
    assert int(state["step"]) == 6
    assert validations == ["update_", "update_"]  # planned twice, then kept
    assert fe.release_plans() == 1
    assert fe.release_plans() == 0


Change = Callable[[nn.Module, fe.EmaState], None]


def _new_memory(net: nn.Module, state: fe.EmaState) -> None:
    net[0].weight.data = torch.randn(3, 3)


def _transposed(net: nn.Module, state: fe.EmaState) -> None:
    net[1].weight.data = net[1].weight.data.t()  # same memory, other strides


def _wider(net: nn.Module, state: fe.EmaState) -> None:
    net[2].weight.data = net[2].weight.data.double()


def _large_new_memory(net: nn.Module, state: fe.EmaState) -> None:
    net[-1].weight.data = net[-1].weight.data.clone()


def _large_strided(net: nn.Module, state: fe.EmaState) -> None:
    big = torch.randn(300, 600)
    net[-1].weight.data = big[:, ::2]  # same shape, every other column


def _state_leaf_replaced(net: nn.Module, state: fe.EmaState) -> None:
    state["params"]["3.weight"] = state["params"]["3.weight"].clone()


def _step_replaced(net: nn.Module, state: fe.EmaState) -> None:
    state["step"] = state["step"].clone()


def _frozen(net: nn.Module, state: fe.EmaState) -> None:
    net[4].weight.requires_grad_(False)


def _resized_in_place(net: nn.Module, state: fe.EmaState) -> None:
    weight = net[5].weight
    with torch.no_grad():
        weight.data.resize_(10_000).resize_(3, 3)  # same shape again, in new memory


_CHANGES = [
    _new_memory,
    _transposed,
    _wider,
    _large_new_memory,
    _large_strided,
    _state_leaf_replaced,
    _step_replaced,
    _resized_in_place,
]


@pytest.mark.parametrize(
    ("change", "values"),
    [
        *((change, values) for values in ("parameters", "views") for change in _CHANGES),
        (_frozen, "parameters"),  # module_state leaves a frozen parameter out: not a change
    ],
)
def test_a_change_between_updates_gives_the_result_of_planning_anew(
    change: Change, values: str
) -> None:
    """The values as the ``Parameter`` objects, or as detached views made anew each call
    (``module_state``), which a kept plan would read in their old memory and layout."""

    def current() -> dict[str, Tensor]:
        if values == "views":
            return fe.module_state(net)[0]
        return dict(net.named_parameters())

    net = model()
    state = fe.init(fe.module_state(net)[0])
    reference = Reference(current())
    for step in range(3):  # the plan is kept from the second update on
        train(net, step)
        fe.update_(state, current(), DECAY)
        reference.update(current())
    change(net, state)
    reference.params = {n: t.clone() for n, t in _averages(state).items()}
    for step in range(3, 6):
        train(net, step)
        fe.update_(state, current(), DECAY)
        reference.update(current())
        assert_bits_equal(_averages(state), reference.params)


def test_a_new_shape_or_a_missing_key_raises_before_anything_is_written() -> None:
    net = model()
    state = fe.init(fe.module_state(net)[0])
    for step in range(3):
        train(net, step)
        fe.update_(state, dict(net.named_parameters()), DECAY)
    before = snapshot(state)
    net[0].weight.data = net[0].weight.data[:2]
    with pytest.raises(ValueError, match=r"update_.*0\.weight"):
        fe.update_(state, dict(net.named_parameters()), DECAY)
    assert_bits_equal(state, before)
    net[0].weight.data = torch.zeros(3, 3)
    params = dict(net.named_parameters())
    del params["1.bias"]
    with pytest.raises(ValueError, match=r"1\.bias"):
        fe.update_(state, params, DECAY)
    assert_bits_equal(state, before)


def test_nan_with_raise_is_refused_on_a_kept_plan_before_anything_is_written() -> None:
    net = model()
    state = fe.init(fe.module_state(net)[0])
    for _ in range(3):
        fe.update_(state, dict(net.named_parameters()), DECAY, nonfinite="raise")
    before = snapshot(state)
    with torch.no_grad():
        net[7].bias[1] = float("nan")  # in place: same memory, the kept plan holds
    with pytest.raises(ValueError, match=r"7\.bias"):
        fe.update_(state, dict(net.named_parameters()), DECAY, nonfinite="raise")
    assert_bits_equal(state, before)


def test_values_made_anew_each_call_are_read_where_they_are_now(
    validations: list[str],
) -> None:
    """Fresh clones each step (new memory, the old freed): planned each time, never stale."""
    net = model()
    state = fe.init(fe.module_state(net)[0])
    reference = Reference(dict(net.named_parameters()))
    for step in range(5):
        train(net, step)
        clones = {n: p.detach().clone() for n, p in net.named_parameters()}
        fe.update_(state, clones, DECAY)
        reference.update(clones)
        del clones
        gc.collect()
        assert_bits_equal(_averages(state), reference.params)
    assert len(validations) == 5
    views = fe.module_state(net)[0]  # detached views made anew, same memory: kept
    for _ in range(3):
        fe.update_(state, fe.module_state(net)[0], DECAY)
        reference.update(views)
    assert_bits_equal(_averages(state), reference.params)
    assert len(validations) == 7


def test_a_plan_is_dropped_with_its_state() -> None:
    net = model()
    state = fe.init(fe.module_state(net)[0])
    for _ in range(3):
        fe.update_(state, dict(net.named_parameters()), DECAY)
    average = weakref.ref(state["params"]["0.weight"])
    del state
    gc.collect()
    assert average() is None
    assert fe.release_plans() == 0


def test_two_states_of_one_model_keep_one_plan_each(validations: list[str]) -> None:
    net = model()
    params = dict(net.named_parameters())
    fast, slow = fe.init(fe.module_state(net)[0]), fe.init(fe.module_state(net)[0])
    ref_fast, ref_slow = Reference(params), Reference(params)
    for step in range(5):
        train(net, step)
        fe.update_(fast, params, 0.5)
        fe.update_(slow, params, 0.99)
        ref_fast.update(params, 0.5)
        ref_slow.update(params, 0.99)
    assert_bits_equal(_averages(fast), ref_fast.params)
    assert_bits_equal(_averages(slow), ref_slow.params)
    assert len(validations) == 4
    assert fe.release_plans() == 2


def test_threads_keep_their_own_plans() -> None:
    nets = [model() for _ in range(2)]
    states = [fe.init(fe.module_state(n)[0]) for n in nets]
    references = [Reference(dict(n.named_parameters())) for n in nets]
    errors: list[BaseException] = []
    start, done, released = threading.Barrier(2), threading.Barrier(3), threading.Barrier(3)

    def run(index: int) -> None:
        try:
            start.wait()
            net, state, reference = nets[index], states[index], references[index]
            for step in range(20):
                train(net, 100 * index + step)
                fe.update_(state, dict(net.named_parameters()), DECAY)
                reference.update(dict(net.named_parameters()))
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            done.wait(timeout=60)
            released.wait(timeout=60)  # alive until the main thread released their plans

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    done.wait(timeout=60)
    count = fe.release_plans()
    released.wait(timeout=60)
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert count == 2  # both threads' plans, released from this one
    for state, reference in zip(states, references, strict=True):
        assert_bits_equal(_averages(state), reference.params)


def test_a_plan_is_not_reused_under_another_strategy(validations: list[str]) -> None:
    net = model()
    params = dict(net.named_parameters())
    state = fe.init(fe.module_state(net)[0])
    reference = Reference(params)
    for _ in range(3):
        fe.update_(state, params, DECAY)
        reference.update(params)
    with use_strategy("batched"):
        fe.update_(state, params, DECAY)
        reference.update(params)
    assert validations == ["update_"] * 3
    assert_bits_equal(_averages(state), reference.params)


def test_buffers_resized_by_the_forward_are_planned_anew() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    params, buffers = fe.module_state(net)
    state = fe.init(params, buffers)
    for _ in range(3):
        fe.update_(state, params, DECAY, buffers)
    before = snapshot(state)
    net[1].running_mean.resize_(5)
    with pytest.raises(ValueError, match=r"1\.running_mean"):
        fe.update_(state, params, DECAY, dict(net.named_buffers()))
    assert_bits_equal(state, before)
    net[1].running_mean.resize_(4).fill_(3.0)
    fe.update_(state, params, DECAY, dict(net.named_buffers()))
    assert_bits_equal(state["buffers"]["1.running_mean"], torch.full((4,), 3.0))


def test_kept_values_moved_by_the_caller_are_not_read_at_their_new_place() -> None:
    """The plan reads the tensors it kept: one moved (``.data =``, ``set_``) or reshaped in
    place after the plan was kept, while others are passed at its old memory, must not be
    read where it is now."""

    def run(release: bool) -> dict[str, Tensor]:
        n = 8
        state = fe.init(
            {
                "a": torch.zeros(n),
                "b": torch.zeros(n),
                "i": torch.zeros(n, dtype=torch.int64),
                "r": torch.zeros(n),
            }
        )
        base = torch.arange(20.0)
        a, b, i, r = torch.ones(n), torch.ones(n), torch.ones(n, dtype=torch.int64), base[:8]
        for _ in range(3):
            if release:
                fe.release_plans()
            fe.update_(state, {"a": a, "b": b, "i": i, "r": r}, 0.5)
        aliases = [t.detach() for t in (a, b, i)]  # the same memory and metadata
        a.data = torch.full((n,), 100.0)
        i.set_(torch.full((n,), 100, dtype=torch.int64))
        r.resize_(0)  # its memory is untouched
        for alias in aliases:
            alias.fill_(7)
        base.add_(100)
        if release:
            fe.release_plans()
        fe.update_(state, {"a": aliases[0], "b": aliases[1], "i": aliases[2], "r": base[:8]}, 0.5)
        return dict(state["params"])

    assert_bits_equal(run(release=False), run(release=True))


def test_values_passed_once_are_not_kept_alive() -> None:
    """A first update from some memory keeps nothing (copies each step are freed at once)."""
    state = fe.init({"w": torch.zeros(1000)})

    def update_from_a_copy() -> weakref.ref[Tensor]:
        copy = {"w": torch.randn(1000)}
        fe.update_(state, copy, 0.9)
        return weakref.ref(copy["w"])

    refs = [update_from_a_copy() for _ in range(3)]
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert fe.release_plans() == 0  # noted, not kept


def test_requires_grad_flipped_each_step_keeps_the_plan(validations: list[str]) -> None:
    """A GAN freezing a network every other step changes no memory or layout: kept."""
    net = model()
    params = dict(net.named_parameters())
    state = fe.init(fe.module_state(net)[0])
    reference = Reference(params)
    for step in range(6):
        train(net, step)
        net.requires_grad_(step % 2 == 0)
        fe.update_(state, params, DECAY)
        reference.update(params)
        assert_bits_equal(_averages(state), reference.params)
    assert validations == ["update_", "update_"]


def test_a_storage_freed_in_place_is_not_read_by_a_kept_plan(validations: list[str]) -> None:
    """``untyped_storage().resize_(0)`` (what FSDP and offloading code do), then a new tensor
    at the value's memory: the tensors passed look the same, the plan's own view does not."""
    n = 1 << 16  # updated where it is: the plan holds a view of the value's storage
    torch.manual_seed(0)
    a, b = torch.randn(n), torch.randn(n)
    state = fe.init({"a": torch.zeros(n), "b": torch.zeros(n)})
    params = {"a": a, "b": b}
    for _ in range(3):
        fe.update_(state, params, 0.5)
    plan = _update._thread_plans().kept[id(state["step"])].bound.plan  # type: ignore[union-attr]
    assert plan is not None and plan.intact()
    expected = Reference(dict(state["params"]))
    address = b.data_ptr()
    b.untyped_storage().resize_(0)
    assert not plan.intact()
    held = []  # allocations until one lands at the old address (the allocator's choice)
    for _ in range(200):
        new = torch.full((n,), 100.0)
        if new.data_ptr() == address:
            break
        held.append(new)
    b.set_(new)
    fe.update_(state, params, 0.5)
    expected.update(params, 0.5)
    assert_bits_equal(_averages(state), expected.params)
    assert len(validations) == 3


def test_a_thread_s_plans_are_freed_when_it_ends_without_the_garbage_collector() -> None:
    """The state lives on (its ``step`` too); the thread that kept a plan for it ends."""
    refs: list[weakref.ref[Tensor]] = []
    state = fe.init({"w": torch.zeros(1000)})

    def run() -> None:
        values = {"w": torch.randn(1000)}
        for _ in range(3):
            fe.update_(state, values, 0.9)
        refs.append(weakref.ref(values["w"]))

    gc.disable()
    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert refs[0]() is None
    finally:
        gc.enable()


def test_the_adapter_replans_when_a_storage_is_freed_in_place() -> None:
    """The same for ``fe.EMA``: its fingerprint sees the parameter object and pointer only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8))
    ema = fe.EMA(net, 0.5)
    for _ in range(3):
        ema.update()
    weight = net[0].weight
    expected = Reference({n: t.clone() for n, t in ema.state()["params"].items()})
    address = weight.data_ptr()
    weight.untyped_storage().resize_(0)
    held = []
    for _ in range(200):
        new = torch.full((256, 256), 100.0)
        if new.data_ptr() == address:
            break
        held.append(new)
    with torch.no_grad():
        weight.set_(new)
    ema.update()
    expected.update(dict(net.named_parameters()), 0.5)
    assert_bits_equal(dict(ema.state()["params"]), expected.params)
