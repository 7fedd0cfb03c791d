"""Property tests (hypothesis): random trees, dtypes, decays and step sequences.

Properties, for every example:

- **Convex hull.** Each average lies between the per-element min and max of the values seen
  (cast to the average's dtype). In exact arithmetic it is inside; with TF's rounded
  ``s - (s - v) * w`` the last step may land outside by the rounding of ``s - v`` and of the
  final subtraction: at most 2 ulps of ``M = max(|min|, |max|)`` (1 when the values share a
  sign). The slack allowed is ``2 * eps * M`` plus two subnormal steps.
- **Fixed point.** A constant input leaves an average that equals it unchanged, bit for bit
  (``s - (s - s) * w == s``).
- **One routine.** ``ema_update``, ``ema_update_``, ``update``, ``update_`` and the ``EMA``
  adapter give the same bits, with the decay as a Python float or a 0-dim tensor.
- **Resume.** Saving with :func:`fe.save` at a random step, loading with :func:`fe.load`
  (checked by :func:`fe.check_state` / ``EMA.load_state_dict``) and continuing equals never
  stopping, bit for bit.
- **decay 1.0 freezes**: the same values, and the same bits except that a ``-0.0`` average
  becomes ``+0.0`` when the value is positive (``-0.0 - (-0.0) == +0.0`` in IEEE arithmetic,
  as in TF; the values here include signed zeros and subnormals to pin this down).
  **decay 0.0 copies**: TF's formula gives
  ``s - (s - v)``, equal to ``v`` exactly when ``s - v`` is exact in the leaf's dtype, and
  otherwise within the same one-rounding bound as above (TF agrees, see docs/index.md).

Runs are deterministic (``derandomize=True``, no example database) and small
(``MAX_EXAMPLES`` per property); each property reports how many examples it ran.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import optree
import pytest
import torch
from helpers import assert_bits_equal, bits
from torch import nn

import functional_ema as fe
from functional_ema._tree import leaf_paths


# A tree of integer leaves only gives an EMA with nothing to average, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:EMA. nothing to average:UserWarning")


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

MAX_EXAMPLES = 60
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Leaf:
    """A leaf of a random tree: its shape and dtype (a leaf for optree: not a container)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


leaves = st.builds(
    Leaf,
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([*FLOATS, *FLOATS, torch.int64]),  # integer leaves are copied
)
containers = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from(["a", "b", "w", "bias"]), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
    ),
    max_leaves=6,
)
# A dict at the top, so every leaf has a dotted name (the adapter's module names).
trees = st.dictionaries(st.sampled_from(["x", "y", "z"]), containers, min_size=1, max_size=2)
decay_values = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.999, 0.9999, 1 - 2**-30]), st.floats(0.0, 1.0)
)
decays = st.one_of(
    decay_values,
    st.builds(torch.tensor, decay_values, dtype=st.sampled_from([torch.float32, torch.float64])),
)
kinds = st.sampled_from(["normal", "small", "large", "grid", "special"])
step = st.tuples(st.integers(0, 2**31), kinds, decays)
steps = st.lists(step, min_size=1, max_size=5)
shadow_dtypes = st.sampled_from([None, None, torch.float32, torch.float64])


def make_values(spec: Any, seed: int, kind: str) -> Any:
    """A tree of tensors shaped like ``spec``: finite values of one of several kinds."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(spec: Leaf) -> torch.Tensor:
        if not spec.dtype.is_floating_point:
            return torch.randint(-5, 6, spec.shape, generator=gen)
        if kind == "grid":  # exactly representable, with ties and equal values
            x = torch.randint(-8, 9, spec.shape, generator=gen).double() / 4
        elif kind == "special":  # signed zeros and subnormals of every dtype
            pool = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 6e-8, 1e-40, 1.0, -1.0, 2.0])
            x = pool[torch.randint(0, len(pool), spec.shape, generator=gen)].double()
        else:
            scale = {"normal": 1.0, "small": 1e-3, "large": 100.0}[kind]
            x = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * scale
        return x.to(spec.dtype)

    return optree.tree_map(leaf, spec)


def cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """The values as the average holds them (``init(..., dtype=dtype)``)."""
    if dtype is None:
        return tree
    return optree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def ulp_slack(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 * eps * M`` plus two subnormal steps: the rounding allowance of the hull (float64)."""
    info = torch.finfo(dtype)
    return 2 * info.eps * magnitude + 2 * info.tiny * info.eps


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``magnitude`` (>= 0, float64) in ``dtype``."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude)
    return torch.clamp(info.eps * torch.exp2(exponent.double() - 1), min=info.tiny * info.eps)


def run_property(prop: Callable[[], None], counter: list[int], name: str) -> None:
    """Run a hypothesis property, then report and check the number of examples it ran."""
    counter[0] = 0
    prop()
    print(f"{name}: {counter[0]} examples")
    assert counter[0] >= MAX_EXAMPLES // 2, counter[0]


class TreeModule(nn.Module):
    """A module whose parameters (floating leaves) and buffers (integer leaves) are a tree."""

    def __init__(self, flat: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in flat.items():
            *path, last = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]  # type: ignore[assignment]
            if tensor.is_floating_point():
                owner.register_parameter(last, nn.Parameter(tensor.clone()))
            else:
                owner.register_buffer(last, tensor.clone())

    @torch.no_grad()
    def load(self, flat: dict[str, torch.Tensor]) -> None:
        live = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, tensor in flat.items():
            live[name].copy_(tensor)


def flat(tree: Any) -> dict[str, torch.Tensor]:
    return dict(zip(leaf_paths(tree), optree.tree_leaves(tree), strict=True))


def split(tree: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(floating, integer)`` leaves by dotted name: the adapter's params and buffers."""
    named = flat(tree)
    return (
        {k: v for k, v in named.items() if v.is_floating_point()},
        {k: v for k, v in named.items() if not v.is_floating_point()},
    )


# --- convex hull ------------------------------------------------------------------------

hull_count = [0]


@SETTINGS
@hypothesis.given(spec=trees, init_seed=st.integers(0, 2**31), sequence=steps, dtype=shadow_dtypes)
def _convex_hull(spec: Any, init_seed: int, sequence: list[Any], dtype: Any) -> None:
    hull_count[0] += 1
    first = make_values(spec, init_seed, "normal")
    state = fe.init(first, dtype=dtype)
    seen = cast(first, dtype)
    lo = optree.tree_map(lambda t: t.double(), seen)
    hi = optree.tree_map(lambda t: t.double(), seen)
    for seed, kind, decay in sequence:
        values = make_values(spec, seed, kind)
        state = fe.update_(state, values, decay)
        held = optree.tree_map(lambda t: t.double(), cast(values, dtype))
        lo = optree.tree_map(torch.minimum, lo, held)
        hi = optree.tree_map(torch.maximum, hi, held)
        for avg, low, high, latest in zip(
            optree.tree_leaves(fe.average(state)),
            optree.tree_leaves(lo),
            optree.tree_leaves(hi),
            optree.tree_leaves(held),
            strict=True,
        ):
            if not avg.is_floating_point():
                assert torch.equal(avg.double(), latest)  # integer leaves are copied
                continue
            slack = ulp_slack(torch.maximum(low.abs(), high.abs()), avg.dtype)
            a = avg.double()
            assert bool(((a >= low - slack) & (a <= high + slack)).all()), (a, low, high, decay)


def test_average_stays_in_the_convex_hull_of_the_values() -> None:
    run_property(_convex_hull, hull_count, "convex hull")


# --- constant input: a fixed point ------------------------------------------------------

fixed_count = [0]


@SETTINGS
@hypothesis.given(
    spec=trees, seed=st.integers(0, 2**31), kind=kinds, sequence=steps, dtype=shadow_dtypes
)
def _fixed_point(spec: Any, seed: int, kind: str, sequence: list[Any], dtype: Any) -> None:
    fixed_count[0] += 1
    values = make_values(spec, seed, kind)
    state = fe.init(values, dtype=dtype)
    expected = cast(values, dtype)
    ema = fe.EMA(TreeModule(flat(values)), 0.9, dtype=dtype)
    for _, _, decay in sequence:
        state = fe.update(state, values, decay)
        ema.decay = decay
        ema.update()
    assert_bits_equal(fe.average(state), expected)
    floating, integer = split(expected)
    assert_bits_equal(ema.state()["params"], floating)
    assert_bits_equal(ema.state()["buffers"], integer)


def test_constant_input_is_a_fixed_point() -> None:
    run_property(_fixed_point, fixed_count, "fixed point")


# --- pure == in-place == state API == adapter ------------------------------------------

agree_count = [0]


def as_tensor(decay: Any) -> torch.Tensor:
    return decay if isinstance(decay, torch.Tensor) else torch.tensor(decay, dtype=torch.float64)


MIXED = {  # every dtype, an integer leaf, nesting, a 0-dim and an empty leaf
    "x": [Leaf((), torch.float64), Leaf((2, 3), torch.bfloat16), Leaf((0,), torch.float16)],
    "y": {"a": Leaf((3,), torch.float32), "b": Leaf((2,), torch.int64)},
}


@SETTINGS
@hypothesis.given(spec=trees, init_seed=st.integers(0, 2**31), sequence=steps, dtype=shadow_dtypes)
@hypothesis.example(
    spec=MIXED, init_seed=1, sequence=[(2, "grid", 0.5), (3, "normal", 0.9)], dtype=None
)
@hypothesis.example(  # a wider and a narrower average than the values
    spec=MIXED, init_seed=1, sequence=[(2, "normal", torch.tensor(0.99))], dtype=torch.float32
)
def _apis_agree(spec: Any, init_seed: int, sequence: list[Any], dtype: Any) -> None:
    agree_count[0] += 1
    first = make_values(spec, init_seed, "normal")
    floating, integer = split(first)
    model = TreeModule(flat(first))
    ema = fe.EMA(model, 0.9, dtype=dtype)
    pure = fe.init(first, dtype=dtype)["params"]
    inplace = fe.init(first, dtype=dtype)["params"]
    state = fe.init(first, dtype=dtype)
    state_ = fe.init(first, dtype=dtype)
    by_tensor = fe.init(first, dtype=dtype)
    module_state = fe.init(floating, integer, dtype=dtype)
    for seed, kind, decay in sequence:
        values = make_values(spec, seed, kind)
        new = fe.ema_update(pure, values, decay)
        assert new is not pure
        pure = new
        assert fe.ema_update_(inplace, values, decay) is inplace
        state = fe.update(state, values, decay)
        assert fe.update_(state_, values, decay) is state_
        fe.update_(by_tensor, values, as_tensor(decay))
        p, b = split(values)
        module_state = fe.update(module_state, p, decay, b)
        model.load(flat(values))
        ema.decay = decay
        ema.update()
    assert_bits_equal(inplace, pure)
    assert_bits_equal(fe.average(state), pure)
    assert_bits_equal(state_, state)
    assert_bits_equal(by_tensor, state)
    averaged = flat(pure)
    assert_bits_equal(ema.state()["params"], {k: averaged[k] for k in floating})
    assert_bits_equal(ema.state()["buffers"], {k: averaged[k] for k in integer})
    assert_bits_equal(module_state["params"], ema.state()["params"])
    assert int(ema.step) == int(state["step"]) == len(sequence)


def test_pure_inplace_state_api_and_adapter_agree_bit_for_bit() -> None:
    run_property(_apis_agree, agree_count, "APIs agree")


# --- save / load at a random step, then continue ---------------------------------------

resume_count = [0]


@SETTINGS
@hypothesis.given(
    spec=trees,
    init_seed=st.integers(0, 2**31),
    sequence=steps,
    dtype=shadow_dtypes,
    stop=st.integers(0, 5),
    zero_debias=st.booleans(),
)
def _resume(
    spec: Any, init_seed: int, sequence: list[Any], dtype: Any, stop: int, zero_debias: bool
) -> None:
    resume_count[0] += 1
    stop = min(stop, len(sequence))
    first = make_values(spec, init_seed, "normal")
    floating, integer = split(first)
    straight = fe.init(floating, integer, dtype=dtype, zero_debias=zero_debias)
    resumed = fe.init(floating, integer, dtype=dtype, zero_debias=zero_debias)
    model = TreeModule(flat(first))
    ema = fe.EMA(model, 0.9, dtype=dtype)
    ema_straight = fe.EMA(TreeModule(flat(first)), 0.9, dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        for index, (seed, kind, decay) in enumerate(sequence):
            if index == stop:
                fe.save(resumed, os.path.join(folder, "state.pt"))
                fe.save(ema.state_dict(), os.path.join(folder, "ema.pt"))
                like = fe.init(floating, integer, dtype=dtype, zero_debias=zero_debias)
                resumed = fe.check_state(fe.load(os.path.join(folder, "state.pt")), like=like)
                model = TreeModule(flat(first))  # a fresh process: a new model and EMA
                ema = fe.EMA(model, 0.9, dtype=dtype)
                ema.load_state_dict(fe.load(os.path.join(folder, "ema.pt")))
            p, b = split(make_values(spec, seed, kind))
            straight = fe.update_(straight, p, decay, b)
            resumed = fe.update_(resumed, p, decay, b)
            for adapter in (ema, ema_straight):
                adapter.model.load({**p, **b})
                adapter.decay = decay
                adapter.update()
    assert_bits_equal(resumed, straight)
    assert_bits_equal(ema.state(), ema_straight.state())


def test_save_load_at_a_random_step_then_continue_equals_never_stopping() -> None:
    run_property(_resume, resume_count, "resume")


# --- decay 1.0 freezes, decay 0.0 copies -------------------------------------------------

extremes_count = [0]


def exact_difference(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where ``s - v`` is exactly representable in their dtype (elementwise, exact rationals)."""
    d = s - v
    return torch.tensor(
        [
            Fraction(a) - Fraction(b) == Fraction(c)
            for a, b, c in zip(*(t.double().reshape(-1).tolist() for t in (s, v, d)), strict=True)
        ],
        dtype=torch.bool,
    ).reshape(s.shape)


@SETTINGS
@hypothesis.given(
    spec=trees,
    init_seed=st.integers(0, 2**31),
    sequence=st.lists(step, max_size=3),
    seed=st.integers(0, 2**31),
    kind=kinds,
    as_tensor_decay=st.booleans(),
)
def _extremes(
    spec: Any, init_seed: int, sequence: list[Any], seed: int, kind: str, as_tensor_decay: bool
) -> None:
    extremes_count[0] += 1
    state = fe.init(make_values(spec, init_seed, "special"))
    for step_seed, step_kind, decay in sequence:
        state = fe.update_(state, make_values(spec, step_seed, step_kind), decay)
    values = make_values(spec, seed, kind)
    one = torch.tensor(1.0) if as_tensor_decay else 1.0
    zero = torch.tensor(0.0) if as_tensor_decay else 0.0

    frozen = fe.update(state, values, one)
    for s, v, f in zip(
        optree.tree_leaves(state["params"]),
        optree.tree_leaves(values),
        optree.tree_leaves(frozen["params"]),
        strict=True,
    ):
        if not s.is_floating_point():
            assert_bits_equal(f, v)  # integer leaves are copied
            continue
        assert torch.equal(f, s)  # frozen: the same values ...
        negative_zero = (s == 0) & torch.signbit(s)
        assert torch.equal(bits(f)[~negative_zero], bits(s)[~negative_zero])  # ... and bits,
        assert_bits_equal(f, s - (s - v) * 0)  # but -0.0 - (-0.0) is +0.0 (IEEE, as in TF)
    assert int(frozen["step"]) == int(state["step"]) + 1

    copied = fe.update(state, values, zero)
    for s, v, c in zip(
        optree.tree_leaves(state["params"]),
        optree.tree_leaves(values),
        optree.tree_leaves(copied["params"]),
        strict=True,
    ):
        if not s.is_floating_point():
            assert torch.equal(c, v)
            continue
        exact = exact_difference(s, v)
        assert torch.equal(bits(c)[exact], bits(s - (s - v))[exact])
        assert torch.equal(c[exact], v[exact])  # value-equal (a -0.0 may become +0.0)
        magnitude = torch.maximum(s.double().abs(), v.double().abs())
        same_sign = (s.double() * v.double()) >= 0
        bound = torch.where(same_sign, 1.0, 2.0) * ulp(magnitude, s.dtype)
        assert bool(((c.double() - v.double()).abs() <= bound).all()), (s, v, c)


def test_decay_one_freezes_and_decay_zero_copies() -> None:
    run_property(_extremes, extremes_count, "decay 1.0 / 0.0")


def test_narrower_average_than_the_values() -> None:
    # The smallest case the properties above generate with a shadow dtype narrower than the
    # values (init(float64 values, dtype=torch.float32)): every API must accept it, like
    # the wider case, and agree bit for bit.
    values = {"w": torch.tensor([1.0, -2.5, 3.25], dtype=torch.float64)}
    target = {"w": torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)}
    pure = fe.update(fe.init(values, dtype=torch.float32), target, 0.9)
    inplace = fe.update_(fe.init(values, dtype=torch.float32), target, 0.9)
    model = TreeModule({"w": values["w"]})
    ema = fe.EMA(model, 0.9, dtype=torch.float32)
    model.load(target)
    ema.update()
    assert_bits_equal(inplace, pure)
    assert_bits_equal(ema.state()["params"], pure["params"])
