"""The in-place engine (regions, chunks, gathers, compiled kernel) keeps TF's bits.

Engine thresholds are forced down so the tiny TF fixtures exercise every path: chunk
boundaries inside leaves, gathered values, and the compiled kernel.
"""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import (
    VARIABLE_CASES,
    assert_bits_equal,
    get_case,
    leaves_at,
    mlp,
    step_decay,
    train,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import functional_ema as fe
from functional_ema import _engine, _kernels
from functional_ema._arith import average_leaf


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}
DTYPES["bfloat16"] = torch.bfloat16


@pytest.fixture
def eager_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "CHUNK", 7)  # chunk boundaries fall inside leaves
    monkeypatch.setattr(_engine, "MIN_CHUNK", 7)
    monkeypatch.setattr(_engine.compiled, "enabled", False)


def _run_tf_case(dtype_name: str, case_name: str, *, scattered: bool) -> None:
    dtype = DTYPES[dtype_name]
    case = get_case(dtype_name, case_name)
    state = fe.init(leaves_at(case, dtype, "init"))
    assert _engine.flat_view(optree.tree_leaves(state["params"])) is not None
    for t in range(1, len(case["decay"]) + 1):
        values = leaves_at(case, dtype, "values", t)
        if not scattered:  # values laid out like the state: one region per update
            values = fe.init(values)["params"]
        fe.update_(state, values, step_decay(case, t))
        assert_bits_equal(fe.average(state), leaves_at(case, dtype, "average", t))


@pytest.mark.parametrize("scattered", [False, True], ids=["region", "gather"])
@pytest.mark.parametrize("case_name", VARIABLE_CASES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_eager_engine_matches_tf(
    dtype_name: str, case_name: str, scattered: bool, eager_small_chunks: None
) -> None:
    _run_tf_case(dtype_name, case_name, scattered=scattered)


@pytest.mark.compile
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_compiled_engine_matches_tf(dtype_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_engine, "ROW", 3)  # full rows and a shorter last row
    monkeypatch.setattr(_engine, "GATHER_BELOW", 4)  # scattered: updated in place or gathered
    monkeypatch.setattr(_engine.compiled, "enabled", True)
    monkeypatch.setattr(_engine.compiled, "synchronous", True)  # no update runs eager
    for case_name in ("per_step_decay", "num_updates_from_zero"):
        _run_tf_case(dtype_name, case_name, scattered=False)
        _run_tf_case(dtype_name, case_name, scattered=True)
    assert not _kernels.compiled.fallbacks  # it compiled, and did not fall back
    assert (
        True,
        False,
        "cpu",
        DTYPES[dtype_name],
        DTYPES[dtype_name],
        False,
    ) in _kernels.compiled.built


def _broken(*args: object) -> None:
    raise RuntimeError("this compiler is unavailable")


@pytest.mark.compile
def test_kernel_falls_back_to_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = _kernels.Compiled()
    fresh.enabled = True
    fresh.synchronous = True
    built = []
    dynamo = _kernels.dynamo_compile

    def recording(fn, examples):  # type: ignore[no-untyped-def]
        built.append(fn)
        return dynamo(fn, examples)

    monkeypatch.setattr(_engine, "compiled", fresh)
    monkeypatch.setattr(_kernels, "standalone_compile", _broken)
    monkeypatch.setattr(_kernels, "dynamo_compile", recording)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    _run_tf_case("float32", "per_step_decay", scattered=False)
    assert not fresh.fallbacks
    assert built == [_kernels.update_rows_masked]


def test_kernel_failure_warns_once_and_keeps_the_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = _kernels.Compiled()
    fresh.enabled = True
    fresh.synchronous = True
    monkeypatch.setattr(_engine, "compiled", fresh)
    monkeypatch.setattr(_kernels, "standalone_compile", _broken)
    monkeypatch.setattr(_kernels, "dynamo_compile", _broken)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    with pytest.warns(RuntimeWarning, match=r"compiling the update kernel .* failed .*unavailable"):
        _run_tf_case("float32", "per_step_decay", scattered=False)
    assert fresh.fallbacks == [(True, False, "cpu", torch.float32, torch.float32, False)]
    assert "unavailable" in fresh.failures[fresh.fallbacks[0]]
    assert fresh.enabled  # other kernels are still built


@pytest.mark.compile
def test_compiled_rows_leave_nonfinite_values_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_engine.compiled, "enabled", True)
    monkeypatch.setattr(_engine.compiled, "synchronous", True)
    state = fe.init({"w": torch.zeros(300)})  # two rows of 128 and a row of 44
    for position in (5, 200, 290):  # in the first row, the second, the last
        values = torch.ones(300)
        values[position] = float("nan") if position != 200 else float("inf")
        before = state["params"]["w"].clone()
        fe.update_(state, {"w": values}, 0.5)
        after = state["params"]["w"]
        assert after[position] == before[position]
        keep = torch.arange(300) != position
        assert torch.equal(after[keep], before[keep] - (before[keep] - 1.0) * 0.5)
    assert int(state["nonfinite_updates"]) == 3
    fe.update_(state, {"w": torch.ones(300)}, 0.5)
    assert int(state["nonfinite_updates"]) == 3


def test_plans_pick_the_expected_paths() -> None:
    shadow = fe.init({"a": torch.randn(10), "b": torch.randn(3, 3)})["params"]
    flat_values = fe.init({"a": torch.randn(10), "b": torch.randn(3, 3)})["params"]
    pairs = list(zip(optree.tree_leaves(shadow), optree.tree_leaves(flat_values), strict=True))
    assert len(_engine.build_plan(pairs, []).regions) == 1
    scattered = [(s, v.clone()) for s, v in pairs]
    assert len(_engine.build_plan(scattered, []).gathers) == 1
    # One region of averages, a large value between small ones: the large one is updated
    # where it is, the small ones on either side are gathered.
    big = _engine.GATHER_BELOW
    values = {"a": torch.randn(3), "b": torch.randn(big), "c": torch.randn(2, 2)}
    state = fe.init(values)
    plan = _engine.build_plan(
        list(zip(optree.tree_leaves(state["params"]), optree.tree_leaves(values), strict=True)),
        [],
    )
    assert [r.shadow.numel() for r in plan.regions] == [big]
    assert [g.shadow.numel() for g in plan.gathers] == [3, 4]
    # Averages the caller laid out: small ones are gathered with their values and copied
    # back (any strides); large contiguous pairs are regions where they are.
    separate = [(torch.randn(6), torch.randn(6)), (torch.randn(2, 3), torch.randn(3, 2).t())]
    plan = _engine.build_plan(separate, [])
    assert (len(plan.regions), len(plan.gathers), len(plan.leaves)) == (0, 1, 0)
    assert plan.gathers[0].shadows is not None
    large = [(torch.randn(big), torch.randn(big)), (torch.randn(2, 3).t(), torch.randn(3, 2))]
    plan = _engine.build_plan(large, [])
    assert (len(plan.regions), len(plan.gathers), len(plan.leaves)) == (1, 1, 0)


@pytest.mark.parametrize("path", ["region", "gather", "leaves"])
def test_wide_shadow_engine_equals_pure(path: str, eager_small_chunks: None) -> None:
    params = {"a": torch.randn(50).to(torch.bfloat16), "b": torch.randn(7, 3).to(torch.bfloat16)}
    if path == "region":
        params = fe.init(params)["params"]
    state = fe.init(params, dtype=torch.float32)
    if path == "leaves":
        state["params"] = optree.tree_map(torch.clone, state["params"])  # not one region
    pure = fe.init(params, dtype=torch.float32)
    for i in range(5):
        fe.update_(state, params, 0.9 + 0.02 * i)
        pure = fe.update(pure, params, 0.9 + 0.02 * i)
    assert_bits_equal(state, pure)


class _Allocations(TorchDispatchMode):
    """Sum the bytes of every tensor an operation newly allocates (not views or outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in optree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in optree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_inplace_update_allocates_no_full_size_temporary(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _engine.compiled.wait(timeout=600)  # no build running: cache-sized chunks
    monkeypatch.setattr(_engine.compiled, "enabled", False)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).to(torch.bfloat16)
    ema = fe.EMA(model, 0.999, dtype=torch.float32)
    fe.flatten_parameters_(model)
    shadow_bytes = sum(t.numel() * 4 for t in ema.state()["params"].values())
    ema.update()  # warm-up: allocates the scratch once
    with _Allocations() as counted:
        ema.update()
    assert counted.bytes < 0.05 * shadow_bytes, (counted.bytes, shadow_bytes)
    first = _Allocations()
    _engine._local.scratch = {}
    with first:
        ema.update()
    assert first.bytes < 0.05 * shadow_bytes, (first.bytes, shadow_bytes)


def test_flattened_model_uses_regions_and_keeps_bits() -> None:
    plain, flat = mlp(), mlp()
    fe.flatten_parameters_(flat)
    ema_plain, ema_flat = fe.EMA(plain, 0.9), fe.EMA(flat, 0.9)
    train(plain, ema_plain, 6)
    train(flat, ema_flat, 6)
    assert_bits_equal(ema_flat.state(), ema_plain.state())
    plan = ema_flat._validated().plan
    assert plan is not None
    assert len(plan.regions) == 1
    assert not plan.leaves
    assert not plan.gathers
    # The buffers stay where the model keeps them: copies, one per buffer at most.
    assert len(plan.copies[0]) + len(plan.regions_copied) == 3


def test_frozen_parameters_are_neither_held_nor_copied() -> None:
    model = mlp()
    model[0].bias.requires_grad_(False)  # TF's var_list: not averaged, not held
    fe.flatten_parameters_(model)
    ema = fe.EMA(model, 0.9)
    train(model, ema, 3)
    plan = ema._validated().plan
    assert plan is not None
    assert len(plan.regions) == 1 and not plan.gathers and not plan.leaves
    assert "0.bias" not in {**ema.state()["params"], **ema.state()["buffers"]}
    assert not any("0.bias" in key for key in ema.state_dict())
    assert len(plan.copies[0]) + len(plan.regions_copied) == 3  # the BatchNorm buffers only
    assert torch.equal(ema.state()["buffers"]["1.running_mean"], model[1].running_mean)
    assert ema.shadow[0].bias.data_ptr() == model[0].bias.data_ptr()  # shared, not copied


def test_cached_plan_follows_replaced_storage() -> None:
    model = mlp()
    ema = fe.EMA(model, 0.5)
    ema.update()
    first = ema._validated()
    assert ema._validated() is first  # cached while nothing changed
    with torch.no_grad():
        model[0].weight.data = torch.ones_like(model[0].weight)  # new storage, same Parameter
    ema.update()
    assert ema._validated() is not first
    assert (ema.state()["params"]["0.weight"] != 1).any()
    for _ in range(60):
        ema.update()
    torch.testing.assert_close(ema.state()["params"]["0.weight"], model[0].weight.detach())


def test_freezing_later_keeps_the_averaged_set() -> None:
    """As TF's ``var_list``: the parameters trainable at construction stay averaged."""
    model = mlp()
    ema = fe.EMA(model, 0.5)
    model[3].bias.requires_grad_(False)  # frozen after construction: still averaged
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[3].bias.fill_(2.0)
    before = ema.state()["params"]["3.bias"].clone()
    ema.update()
    assert set(ema.state()["params"]) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    }
    assert_bits_equal(ema.state()["params"]["3.bias"], before - (before - 2.0) * 0.5)
    _ = ema.eval()
    ema(torch.randn(4, 6))  # the averaged model still runs
    frozen = mlp()
    frozen[0].bias.requires_grad_(False)  # frozen at construction: never averaged nor held
    ema = fe.EMA(frozen, 0.5)
    frozen[0].bias.requires_grad_(True)
    with torch.no_grad():
        frozen[0].bias.fill_(3.0)
    ema.update()
    assert "0.bias" not in {**ema.state()["params"], **ema.state()["buffers"]}
    assert torch.equal(ema.shadow[0].bias, torch.full((16,), 3.0))  # the live tensor


def test_cached_plan_ignores_other_modules() -> None:
    model = mlp()
    ema = fe.EMA(model, 0.5)
    ema.update()
    first = ema._validated()
    other = nn.Linear(2, 2)
    other.register_buffer("count", torch.zeros(()))
    other.count = torch.ones(())  # a module assigning its own buffer (as AveragedModel does)
    assert ema._validated() is first
    model[1].register_buffer("extra", torch.zeros(()))  # in the tracked model: re-validated
    with pytest.raises(ValueError, match=r"extra"):
        ema.update()


def test_to_keeps_the_averages_one_region() -> None:
    model = mlp()
    ema = fe.EMA(model, 0.9).to(torch.float64)
    leaves = list(ema.state()["params"].values())
    assert _engine.flat_view(sorted(leaves, key=lambda t: t.storage_offset())) is not None
    model.double()
    ema.update()
    assert ema.state()["params"]["0.weight"].dtype == torch.float64


def test_constant_weight_tensor_is_kept_between_updates() -> None:
    shadow, value = torch.zeros(2048), torch.ones(2048)
    plan = _engine.build_plan([(shadow, value)], [])
    key = (torch.float32, shadow.device)
    first = plan._weight(0.25, key)
    assert plan._weight(0.25, key) is first  # a constant decay: no new tensor per update
    changed = plan._weight(0.5, key)
    assert changed is not first and changed.item() == 0.5 and first.item() == 0.25
    tensor_weight = torch.tensor(0.125, dtype=torch.float64)
    assert plan._weight(tensor_weight, key).dtype == torch.float32
    plan.run(lambda dtype: 0.5)
    plan.run(lambda dtype: 0.25)  # the weight changed between updates: the new one is used
    assert_bits_equal(shadow, (torch.zeros(2048) - (0 - 1.0) * 0.5) - ((0.5 - 1.0) * 0.25))


@pytest.mark.parametrize("kernels", ["compiled", "eager"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_pure_update_writes_new_tensors_with_tf_bits(
    dtype_name: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fe.update`` through the engine: large pairs by the kernel writing a new tensor.

    Thresholds forced down so the fixtures' leaves take every path: new tensors written
    from the average and the value (``into`` kernels, or eager chunks), and runs of small
    ones packed (at most ``CHUNK`` elements each). Neither input is written.
    """
    monkeypatch.setattr(_engine, "GATHER_BELOW", 4)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 4)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 4)
    monkeypatch.setattr(_engine, "CHUNK", 7)
    monkeypatch.setattr(_engine, "MIN_CHUNK", 7)
    if kernels == "eager":
        monkeypatch.setattr(_engine.compiled, "enabled", False)
    else:
        monkeypatch.setattr(_engine.compiled, "synchronous", True)
    dtype = DTYPES[dtype_name]
    for case_name in VARIABLE_CASES:
        case = get_case(dtype_name, case_name)
        state = fe.init(leaves_at(case, dtype, "init"))
        for t in range(1, len(case["decay"]) + 1):
            values = leaves_at(case, dtype, "values", t)
            before = optree.tree_map(torch.clone, state)
            new = fe.update(state, values, step_decay(case, t))
            assert_bits_equal(fe.average(new), leaves_at(case, dtype, "average", t))
            assert_bits_equal(state, before)  # the input state is not written
            assert_bits_equal(values, leaves_at(case, dtype, "values", t))
            state = new
    if kernels == "compiled":
        assert (True, False, "cpu", dtype, dtype, True) in _engine.compiled.built


def test_pure_update_skips_nonfinite_and_range_like_the_in_place_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Masked values and a device-side out-of-range decay (forced here) in the pure path."""
    monkeypatch.setattr(_engine, "GATHER_BELOW", 4)
    params = {"big": torch.randn(300), "small": torch.randn(3), "int": torch.tensor(3)}
    values = {k: v + 1 for k, v in params.items()}
    values["big"][[5, 200]] = torch.tensor([float("nan"), float("inf")])
    pure = fe.update(fe.init(params), values, 0.9)
    in_place = fe.update_(fe.init(params), values, 0.9)
    assert_bits_equal(pure, in_place)
    assert int(pure["nonfinite_updates"]) == 1
    assert pure["params"]["big"][5] == params["big"][5]


@pytest.mark.parametrize("strategy", ["direct", "batched"])
@pytest.mark.parametrize("size", [4, 70000])
def test_tied_and_overlapping_averages_are_updated_in_order(strategy: str, size: int) -> None:
    """Averages sharing memory, or a value that is an average: leaf after leaf, as written."""
    with _engine.use_strategy(strategy):
        w = torch.zeros(size)
        tied = {"a": w, "b": torch.zeros(5), "c": w}
        fe.ema_update_(
            tied, {"a": torch.ones(size), "b": torch.ones(5), "c": torch.ones(size)}, 0.5
        )
        assert torch.all(w == 0.75)  # moved twice
        buffer = torch.zeros(6)
        overlapping = {"a": buffer[:4], "b": buffer[2:]}
        fe.ema_update_(overlapping, {"a": torch.ones(4), "b": torch.ones(4)}, 0.5)
        assert buffer.tolist() == [0.5, 0.5, 0.75, 0.75, 0.5, 0.5]
        first, second = torch.zeros(3), torch.zeros(3)
        fe.ema_update_({"a": first, "b": second}, {"a": torch.ones(3), "b": first}, 0.5)
        assert second.tolist() == [0.25] * 3  # read after its own update
        state = fe.init({"a": torch.zeros(3), "b": torch.zeros(3)})
        fe.update_(state, {"a": torch.ones(3), "b": state["params"]["a"]}, 0.5)
        assert state["params"]["b"].tolist() == [0.25] * 3


def test_lazy_negated_and_conjugated_views_are_read_as_their_values() -> None:
    c = torch.tensor([1 + 1j, 2 + 2j, 3 + 3j, 4 + 4j, 5 + 5j, 6 + 6j]).conj()
    shadow = {"a": c[:2], "b": c[2:4], "c": c[4:]}
    assert torch.equal(fe.init(shadow)["params"]["a"], c[:2].resolve_conj())
    values = {k: v.resolve_conj().clone() for k, v in shadow.items()}
    assert torch.equal(fe.ema_update(shadow, values, 0.5)["a"], c[:2].resolve_conj())
    n = torch._neg_view(torch.arange(6.0))
    negated = {"a": n[:2], "b": n[2:4], "c": n[4:]}
    plain = {k: v.clone() for k, v in negated.items()}
    expected = fe.ema_update(plain, plain, 0.5)
    assert_bits_equal(fe.ema_update(negated, negated, 0.5), expected)
    state = fe.init({k: torch.zeros(2) for k in negated})
    fe.update_(state, negated, 0.0)
    assert state["params"]["a"].tolist() == [0.0, -1.0]


def test_pure_results_keep_the_averages_layout() -> None:
    shadow = {
        "w": torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
        "t": torch.zeros(3, 5).t(),
        "i": torch.zeros(2, 4, dtype=torch.int64).t(),
    }
    values = {k: torch.ones_like(v) for k, v in shadow.items()}
    new = fe.ema_update(shadow, values, 0.9)
    for name, leaf in new.items():
        assert leaf.stride() == shadow[name].stride(), name


def test_sparse_leaves_take_the_per_leaf_path() -> None:
    shadow = {"s": torch.zeros(4).to_sparse(), "i": torch.zeros(4, dtype=torch.int64).to_sparse()}
    values = {"s": torch.ones(4).to_sparse(), "i": torch.ones(4, dtype=torch.int64).to_sparse()}
    new = fe.ema_update(shadow, values, 0.5, nonfinite="propagate")
    assert new["s"].to_dense().tolist() == [0.5] * 4
    assert new["i"].to_dense().tolist() == [1] * 4


def test_views_of_a_buffer_with_a_storage_offset() -> None:
    from functional_ema import _compat

    storage = torch.arange(20.0)
    buffer = storage[5:17]
    shapes = [torch.Size(s) for s in ((2, 3), (), (4,), (1, 1))]
    for pad in (False, True):
        views = _compat.views_of(buffer, shapes, pad=pad)
        assert [int(v.reshape(-1)[0]) for v in views] == [5, 11, 12, 16]


def _leaf_by_leaf(shadow: dict, values: dict, decay: float) -> dict:
    """The per-leaf in-place path (what the engine must reproduce), on clones."""
    with torch.no_grad():
        for name in shadow:  # dict order, as the engine visits the leaves
            s, v = shadow[name], values[name]
            w = torch.tensor(1.0, dtype=torch.float32) - torch.tensor(decay, dtype=torch.float32)
            s.sub_(
                (s - v.to(s.dtype) if v.dtype.itemsize > s.dtype.itemsize else s - v)
                * w.to(s.dtype)
            )
    return shadow


@pytest.mark.parametrize("size", [10, 70000])
def test_aliasing_across_dtype_groups_keeps_the_written_order(size: int) -> None:
    """A value that is an average of another dtype group, and a tie across groups."""
    base = torch.randn(2, size)
    shadow = {"a": base[0].clone(), "b": base[1].clone()}
    values = {"a": shadow["b"], "b": torch.randn(size).bfloat16()}
    expected = _leaf_by_leaf(
        {k: v.clone() for k, v in shadow.items()}, {"a": shadow["b"].clone(), "b": values["b"]}, 0.9
    )
    fe.ema_update_(shadow, values, 0.9)
    assert_bits_equal(shadow, expected)
    tied = torch.randn(size)
    shadow = {"a": tied, "b": tied, "c": tied}
    values = {
        "a": torch.randn(size).bfloat16(),
        "b": torch.randn(size).bfloat16(),
        "c": torch.randn(size),
    }
    reference = tied.clone()
    for name in "abc":
        _leaf_by_leaf({"x": reference}, {"x": values[name]}, 0.9)
    fe.ema_update_(shadow, values, 0.9)
    assert torch.equal(tied, reference)


def test_a_lazily_negated_average_is_updated_without_a_partial_write() -> None:
    negated = torch._neg_view(torch.randn(5))
    shadow = {"a": torch.randn(70000), "b": negated}
    values = {"a": torch.randn(70000), "b": torch.randn(5)}
    expected = _leaf_by_leaf({k: v.clone() for k, v in shadow.items()}, values, 0.9)
    fe.ema_update_(shadow, values, 0.9)
    assert_bits_equal({k: v.resolve_neg() for k, v in shadow.items()}, expected)


def test_pure_update_keeps_the_strides_of_copied_buffers() -> None:
    params = {"w": torch.randn(3)}
    buffers = {"t": torch.zeros(4, 3).t(), "n": torch.zeros(3, 2, dtype=torch.int64).t()}
    state = fe.init(params, buffers)
    live = {"t": torch.ones(4, 3).t(), "n": torch.ones(3, 2, dtype=torch.int64).t()}
    new = fe.update(state, params, 0.9, live)
    for name, leaf in new["buffers"].items():
        assert leaf.stride() == live[name].stride(), name
        assert torch.equal(leaf, live[name])


def test_while_a_kernel_builds_the_eager_path_takes_larger_temporary_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fewer operations (each gives the GIL to the build thread), in temporaries of at most
    ``BUSY_CHUNK`` elements that the call frees, and the same bits."""
    monkeypatch.setattr(_engine.compiled, "enabled", False)
    monkeypatch.setattr(_engine, "BUSY_CHUNK", 1000)
    monkeypatch.setattr(_engine, "CHUNK", 100)
    monkeypatch.setattr(_engine, "MIN_CHUNK", 100)
    shadow, value = torch.randn(2500), torch.randn(2500)
    expected = shadow.clone()
    _engine._eager_region_(expected, value, 0.25, mask=True)
    _engine._local.scratch = {}
    monkeypatch.setattr(_engine.compiled, "building", lambda: True)
    with _Allocations() as counted:
        flag = _engine._eager_region_(shadow, value, 0.25, mask=True)
    assert torch.equal(shadow, expected) and bool(flag)
    assert 1000 * 4 + 1000 <= counted.bytes < 1000 * 4 + 1000 + 16  # one chunk of each, flags
    assert getattr(_engine._local, "scratch", {}) == {}  # nothing kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_eager_masked_path_skips_the_mask_only_where_every_value_is_finite(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Chunks whose difference sums to a finite number take the unmasked step (same bits);
    a NaN, an Inf, or finite values whose sum overflows take the exact masked path."""
    monkeypatch.setattr(_engine, "CHUNK", 100)
    monkeypatch.setattr(_engine, "MIN_CHUNK", 100)
    gen = torch.Generator().manual_seed(3)
    shadow = torch.randn(1000, generator=gen).to(dtype)
    value = torch.randn(1000, generator=gen).to(dtype)
    value[150] = float("nan")  # chunk 1
    value[420] = float("-inf")  # chunk 4
    value[700:800] = torch.finfo(dtype).max  # chunk 7: finite, the sum overflows
    shadow[700:800] = -torch.finfo(dtype).max
    expected = shadow.clone()
    flags: list[torch.Tensor] = []
    average_leaf(expected, value, 0.25, inplace=True, finite_flags=flags)
    result = shadow.clone()
    flag = _engine._eager_region_(result, value, 0.25, mask=True)
    assert_bits_equal(result, expected)
    assert flag is not None and not bool(flag)
    clean = value.clone()
    clean[150], clean[420] = 0.0, 0.0
    result = shadow.clone()
    flag = _engine._eager_region_(result, clean, 0.25, mask=True)
    expected = shadow.clone()
    average_leaf(expected, clean, 0.25, inplace=True, finite_flags=[])
    assert_bits_equal(result, expected)
    assert flag is not None and bool(flag)
