"""TensorFlow's remaining moving-average pieces, replayed bit for bit from real TF.

``tests/tf_reference/extra_ops.json`` was recorded from TensorFlow by
``tests/tf_reference/generate_extra.py`` (its docstring says exactly what was driven):

- ``fe.extend``: ``ema.apply(A)`` for a few steps, then ``ema.apply(A + B)`` (new shadows for
  B mid-run), plain and ``zero_debias``;
- ``tf_op="assign_moving_average"``: ``assign_moving_average`` called with a Python float
  (or float64 tensor) decay, which rounds ``1 - decay`` otherwise than ``apply``;
- ``fe.weighted_moving_average``;
- the names of ``average_name`` / ``variables_to_restore``.

TensorFlow is not needed here. A missing or incomplete fixture fails (never skips).
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from helpers import BIT_VIEW, DTYPES, REF_DIR, assert_bits_equal, from_hex, load_fixture, snapshot

import functional_ema as fe


FIXTURE = REF_DIR / "extra_ops.json"
EXTEND_CASES = {
    ("extend", "variable", None),
    ("extend_zero_debias_apply_new", "zero_debias", "new"),
    ("extend_zero_debias_apply_all", "zero_debias", "all"),
}
EXTEND_DTYPES = ("float32", "float64")
ASSIGN_CASES = {
    (name, dtype)
    for dtype in DTYPES
    for name in ("assign_python", "assign_zero_debias")
    + (("assign_float64",) if dtype in ("float32", "float64") else ())
}
WEIGHTED_CASES = {
    (name, dtype)
    for dtype in ("float32", "float64")
    for name in ("weighted_scalar", "weighted_same_shape")
}
A_NAMES, B_NAMES = ("a.w", "a.b"), ("b.w", "b.s")


@functools.cache
def fixture() -> dict:
    assert FIXTURE.is_file(), f"missing TF reference fixture {FIXTURE} (run generate_extra.py)"
    with FIXTURE.open() as f:
        return json.load(f)


def case(section: str, name: str, dtype_name: str) -> dict:
    found = [c for c in fixture()[section] if c["name"] == name and c["dtype"] == dtype_name]
    assert len(found) == 1, (section, name, dtype_name, len(found))
    return found[0]


def at(leaves: dict, key: str, dtype: torch.dtype, t: int | None = None, names=None) -> dict:
    """``{leaf: tensor}`` of ``key`` ("init", or "values"/"average" at step t >= 1)."""
    out = {}
    for name in names or leaves:
        leaf = leaves[name]
        out[name] = from_hex(leaf[key] if t is None else leaf[key][t - 1], dtype, leaf["shape"])
    return out


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(BIT_VIEW[x.element_size()])


def differing(a: dict, b: dict) -> int:
    """How many elements of two dicts of tensors differ in their bits."""
    return sum(int((bits_of(a[k]) != bits_of(b[k])).sum()) for k in a)


def elements(tree: dict) -> int:
    return sum(t.numel() for t in tree.values())


def assert_tf_bits(actual: dict, expected: dict, where: str) -> None:
    assert set(actual) == set(expected), (where, sorted(actual), sorted(expected))
    bad = differing(actual, expected)
    assert not bad, f"{where}: {bad}/{elements(expected)} elements differ from TensorFlow"
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, (where, k)


# --------------------------------------------------------------------------- coverage


def test_fixture_is_complete_and_from_the_parity_fixtures_tf_version():
    doc = fixture()
    assert doc["generator"] == "tests/tf_reference/generate_extra.py"
    assert doc["tensorflow_version"] == load_fixture("float32")["tensorflow_version"]
    extend = {(c["name"], c["dtype"]) for c in doc["extend"]}
    assert extend == {(n, d) for n, _, _ in EXTEND_CASES for d in EXTEND_DTYPES}
    for c in doc["extend"]:
        assert set(c["leaves"]) == {*A_NAMES, *B_NAMES}
        assert 0 < c["k"] < c["steps"]
        for name, leaf in c["leaves"].items():
            live = c["steps"] - (0 if name in A_NAMES else c["k"])
            assert len(leaf["values"]) == len(leaf["average"]) == live
    assert {(c["name"], c["dtype"]) for c in doc["assign"]} == ASSIGN_CASES
    python = case("assign", "assign_python", "float32")["decay"]
    assert {0.0, 1.0, 0.3, 0.9, 0.99, 0.999, 0.9999} <= set(python)
    assert {(c["name"], c["dtype"]) for c in doc["weighted"]} == WEIGHTED_CASES
    assert "variables_to_restore_subset" in doc["restore_names"]


# --------------------------------------------------------------------------- extend


def _extend_params():
    return [
        pytest.param(name, mode, second, d, id=f"{d}-{name}")
        for name, mode, second in sorted(EXTEND_CASES)
        for d in EXTEND_DTYPES
    ]


@pytest.mark.parametrize(("name", "mode", "second", "dtype_name"), _extend_params())
def test_extend_matches_tf(name, mode, second, dtype_name):
    """``fe.extend`` mid-run, then ``fe.update`` / ``fe.update_``, replay TF bit for bit."""
    dtype = DTYPES[dtype_name]
    c = case("extend", name, dtype_name)
    leaves, k, decay = c["leaves"], c["k"], c["decay"]

    def values(t):
        names = A_NAMES if t <= k else (*A_NAMES, *B_NAMES)
        # B's lists start at t = K+1
        return {
            n: at(leaves, "values", dtype, t - (k if n in B_NAMES else 0), [n])[n] for n in names
        }

    def expected(t):
        names = A_NAMES if t <= k else (*A_NAMES, *B_NAMES)
        return {
            n: at(leaves, "average", dtype, t - (k if n in B_NAMES else 0), [n])[n] for n in names
        }

    if mode == "variable":
        pure = fe.init(at(leaves, "init", dtype, names=A_NAMES))
        inplace = fe.init(at(leaves, "init", dtype, names=A_NAMES))
    else:
        pure = fe.init(values(1), zero_debias=True)
        inplace = fe.init(values(1), zero_debias=True)
    compared = debiased_differs = 0
    for t in range(1, c["steps"] + 1):
        if t == k + 1:
            new = (
                at(leaves, "init", dtype, names=B_NAMES)
                if mode == "variable"
                else {n: values(t)[n] for n in B_NAMES}
            )
            before = snapshot(pure)
            extended = fe.extend(pure, new)
            assert_bits_equal(pure, before)  # pure: the old state is as it was
            for key in ("step", "nonfinite_updates"):
                assert extended[key] is pure[key]
            assert int(extended["step"]) == k
            for n in A_NAMES:  # the existing averages are shared, not copied
                assert fe.average(extended)[n] is fe.average(pure)[n]
            started = {n: fe.average(extended)[n] for n in B_NAMES}
            if mode == "variable":
                assert_tf_bits(started, new, "fe.extend starts at the values")
            else:
                assert all(not bool(v.any()) for v in started.values())
                assert all(int(extended["local_step"][n]) == 0 for n in B_NAMES)
            pure = extended
            inplace = fe.extend(inplace, new)
        if second == "all" and t > k:
            # TF's apply(A + B) moves A's (already debiased) shadow as a plain average: the
            # public ema_update reproduces it; fe.extend keeps debiasing A instead.
            if t == k + 1:
                plain = {n: fe.average(pure)[n] for n in A_NAMES}
            plain = fe.ema_update(plain, {n: values(t)[n] for n in A_NAMES}, decay)
            pure = fe.update(pure, values(t), decay)
            ours = fe.average(pure)
            assert_tf_bits({**plain, **{n: ours[n] for n in B_NAMES}}, expected(t), name)
            debiased_differs += differing({n: ours[n] for n in A_NAMES}, plain)
            compared += elements(expected(t))
            continue
        pure = fe.update(pure, values(t), decay)
        fe.update_(inplace, values(t), decay)
        assert_tf_bits(fe.average(pure), expected(t), f"{name} t={t} fe.update")
        assert_tf_bits(fe.average(inplace), expected(t), f"{name} t={t} fe.update_")
        compared += elements(expected(t))
    assert int(pure["step"]) == c["steps"]
    if second == "all":
        assert debiased_differs > 0  # the documented difference is real
    print(
        f"\n{dtype_name} {name}: {compared} elements equal to TF's bits"
        + (f"; A debiased by fe.update: {debiased_differs} differ" if second == "all" else "")
    )


def _two_layer():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )


def test_extend_unfreezing_moves_a_frozen_parameter_out_of_the_buffers():
    model = _two_layer()
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen: module_state puts it among the buffers
    state = fe.init(*fe.module_state(model))
    assert "0.weight" in state["buffers"] and "0.weight" not in state["params"]
    state = fe.update(state, *fe.module_state(model)[:1], 0.9, fe.module_state(model)[1])
    for p in model[0].parameters():
        p.requires_grad_(True)  # unfrozen
    with torch.no_grad():
        model[0].weight.add_(1.0)
    params, buffers = fe.module_state(model)
    new = {k: v for k, v in params.items() if k not in fe.average(state)}
    assert sorted(new) == ["0.bias", "0.weight"]
    extended = fe.extend(state, new)
    assert "0.weight" not in extended["buffers"] and "0.weight" in state["buffers"]
    assert torch.equal(fe.average(extended)["0.weight"], params["0.weight"])
    assert fe.average(extended)["0.weight"].data_ptr() != params["0.weight"].data_ptr()
    moved = fe.update(extended, params, 0.9, buffers)  # the module's own split now matches
    assert torch.equal(fe.average(moved)["0.weight"], params["0.weight"])  # first update: no-op
    assert list(fe.average(extended))[-2:] == ["0.weight", "0.bias"]  # new keys come last


def test_extend_dtype_nested_dicts_and_buffers():
    state = fe.init(
        {"enc": {"w": torch.ones(2, dtype=torch.bfloat16)}},
        {"bn": {"n": torch.tensor(3)}},
        dtype=torch.float32,
    )
    new = {"enc": {"b": torch.ones(1, dtype=torch.bfloat16)}, "dec": {"w": torch.ones(3)}}
    extended = fe.extend(state, new, {"bn": {"m": torch.zeros(2)}}, dtype=torch.float32)
    averages = fe.average(extended)
    assert list(averages) == ["enc", "dec"] and list(averages["enc"]) == ["w", "b"]
    assert averages["enc"]["b"].dtype == torch.float32
    assert list(extended["buffers"]["bn"]) == ["n", "m"]
    assert extended["buffers"]["bn"]["n"] is state["buffers"]["bn"]["n"]
    values = {"enc": {"w": torch.zeros(2), "b": torch.zeros(1)}, "dec": {"w": torch.zeros(3)}}
    buffers = {"bn": {"n": torch.tensor(4), "m": torch.ones(2)}}
    updated = fe.update(extended, values, 0.5, buffers)
    assert torch.equal(fe.average(updated)["dec"]["w"], torch.full((3,), 0.5))
    # a state without buffers gains them; update needs them from then on
    plain = fe.extend(fe.init({"w": torch.ones(1)}), {}, {"count": torch.tensor(1)})
    assert set(plain["buffers"]) == {"count"}
    fe.update(plain, {"w": torch.ones(1)}, 0.9, {"count": torch.tensor(2)})


def test_extend_inplace_after_extend_matches_pure_and_shares_tensors():
    base = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    new = {"v": torch.randn(5)}
    pure = fe.extend(fe.init(base), new)
    inplace = fe.extend(fe.init(base), new)
    for i in range(5):
        values = {k: v + 0.1 * (i + 1) for k, v in {**base, **new}.items()}
        pure = fe.update(pure, values, 0.99)
        fe.update_(inplace, values, 0.99)
    assert_bits_equal(pure, inplace)
    state = fe.init(base)
    extended = fe.extend(state, new)
    fe.update_(extended, {**base, **new}, 0.0)
    assert state["step"].item() == 1  # shared counters: the old state is replaced


def _message(error: pytest.ExceptionInfo) -> str:
    return str(error.value)


def test_extend_errors_name_the_path_and_leave_the_state_alone():
    state = fe.init({"enc": {"w": torch.ones(2)}, "head": torch.ones(1)}, {"bn.n": torch.tensor(1)})
    before = snapshot(state)
    with pytest.raises(
        ValueError, match=re.escape("extend: name already in the state at 'enc.w'")
    ) as err:
        fe.extend(state, {"enc": {"w": torch.zeros(2)}})
    assert "k not in fe.average(state)" in _message(err)
    with pytest.raises(ValueError, match=re.escape("at 'head'")):
        fe.extend(state, {"head": {"w": torch.zeros(2)}})  # a subtree where a leaf is
    with pytest.raises(ValueError, match=re.escape("at 'enc'")):
        fe.extend(state, {"enc": torch.zeros(2)})  # a leaf where a subtree is
    with pytest.raises(TypeError, match=re.escape("extend: non-tensor leaf in `params` at 'x.y'")):
        fe.extend(state, {"x": {"y": 1.0}})
    with pytest.raises(
        TypeError, match=re.escape("extend: trees that cannot be merged at '<root>'")
    ):
        fe.extend(state, [torch.ones(1)])
    with pytest.raises(TypeError, match=re.escape("trees that cannot be merged at 'enc'")):
        fe.extend(fe.init({"enc": [torch.ones(1)]}), {"enc": [torch.ones(1)]})
    with pytest.raises(TypeError, match="trees that cannot be merged at '<root>'"):
        fe.extend(fe.init([torch.ones(1)]), {"w": torch.ones(1)})
    with pytest.raises(
        ValueError, match=re.escape("extend: buffer named like an average at 'head'")
    ):
        fe.extend(state, {}, {"head": torch.ones(1)})
    with pytest.raises(ValueError, match=re.escape("name already in the state at 'bn.n'")):
        fe.extend(state, {}, {"bn.n": torch.tensor(2)})
    with pytest.raises(TypeError, match=re.escape("extend: a module passed as a tree of tensors")):
        fe.extend(state, torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="extend: not a floating dtype"):
        fe.extend(state, {"v": torch.ones(1)}, dtype=torch.int32)
    with pytest.raises(TypeError, match="extend: not an EmaState"):
        fe.extend({"params": {}}, {"v": torch.ones(1)})
    assert_bits_equal(state, before)


def test_extend_zero_debias_slots_like_init():
    state = fe.init({"w": torch.ones(2)}, zero_debias=True)
    state = fe.update(state, {"w": torch.full((2,), 2.0)}, 0.9)
    extended = fe.extend(state, {"n": torch.tensor([3]), "v": torch.ones(3, dtype=torch.float16)})
    fresh = fe.init(
        {"n": torch.tensor([3]), "v": torch.ones(3, dtype=torch.float16)}, zero_debias=True
    )
    for key in ("params", "biased", "local_step"):
        assert_bits_equal({k: extended[key][k] for k in ("n", "v")}, fresh[key])
        assert extended[key]["w"] is state[key]["w"]


# --------------------------------------------------------------------- assign_moving_average


def _assign_params():
    return [pytest.param(n, d, id=f"{d}-{n}") for n, d in sorted(ASSIGN_CASES)]


@pytest.mark.parametrize(("name", "dtype_name"), _assign_params())
def test_assign_moving_average_matches_tf(name, dtype_name):
    """``tf_op="assign_moving_average"`` replays TF's op bit for bit; ``"apply"`` would not."""
    dtype = DTYPES[dtype_name]
    c = case("assign", name, dtype_name)
    leaves = c["leaves"]
    compared = apply_differs = 0
    if not c["zero_debias"]:
        shadow = at(leaves, "init", dtype)
        inplace = at(leaves, "init", dtype)
        for t, d in enumerate(c["decay"], start=1):
            decay = d if c["decay_kind"] == "python" else torch.tensor(d, dtype=torch.float64)
            x, expected = at(leaves, "values", dtype, t), at(leaves, "average", dtype, t)
            as_apply = fe.ema_update(shadow, x, decay)  # from TF's previous average
            shadow = fe.ema_update(shadow, x, decay, tf_op="assign_moving_average")
            fe.ema_update_(inplace, x, decay, tf_op="assign_moving_average")
            assert_tf_bits(shadow, expected, f"{name} t={t} (decay {d!r}) ema_update")
            assert_tf_bits(inplace, expected, f"{name} t={t} (decay {d!r}) ema_update_")
            apply_differs += differing(as_apply, expected)
            compared += elements(expected)
    else:
        # TF's zero-debiased op: the biased accumulator takes the step (the public
        # ema_update with this op's weight), then is divided by 1 - (1 - w) ** local_step.
        decay = c["decay"][0]
        x1 = at(leaves, "values", dtype, 1)
        biased = {k: torch.zeros_like(v) for k, v in x1.items()}
        state = fe.init(x1, zero_debias=True)  # tf_op="apply" weights, for the count
        w = torch.tensor(1.0 - decay, dtype=torch.float32).to(dtype)
        count = torch.zeros((), dtype=dtype)
        for t in range(1, len(c["decay"]) + 1):
            x, expected = at(leaves, "values", dtype, t), at(leaves, "average", dtype, t)
            biased = fe.ema_update(biased, x, decay, tf_op="assign_moving_average")
            count = count + 1
            debiased = {k: v / (1 - torch.pow(1 - w, count)) for k, v in biased.items()}
            assert_tf_bits(debiased, expected, f"{name} t={t} (decay {decay!r})")
            state = fe.update(state, x, decay)
            apply_differs += differing(fe.average(state), expected)
            compared += elements(expected)
    if dtype in (torch.float32, torch.float64) and c["decay_kind"] == "python":
        assert apply_differs > 0, "tf_op='apply' would give the same bits: nothing to test"
    print(
        f"\n{dtype_name} {name}: {compared} elements equal to TF's bits; "
        f"with tf_op='apply' {apply_differs} would differ"
    )


def test_tf_op_weights():
    """The weight each op uses, as a float32 (or float64) number before the leaf cast."""
    one = {"w": torch.ones(1, dtype=torch.float64)}
    zero = {"w": torch.zeros(1, dtype=torch.float64)}

    def weight(decay, tf_op):
        return fe.ema_update(zero, one, decay, tf_op=tf_op)["w"].item()

    assert weight(0.999, "apply") == 0.0009999871253967285  # f32(1) - f32(0.999)
    assert weight(0.999, "assign_moving_average") == 0.0010000000474974513  # f32(0.001)
    tensor = torch.tensor(0.999, dtype=torch.float64)
    assert weight(tensor, "assign_moving_average") == 1 - 0.999  # float64, not rounded
    assert weight(tensor, "apply") == 0.0009999871253967285
    f32 = torch.tensor(0.999)
    assert weight(f32, "assign_moving_average") == weight(f32, "apply")
    with pytest.raises(ValueError, match=re.escape("ema_update: unknown option at 'tf_op'")):
        fe.ema_update(zero, one, 0.9, tf_op="assign")
    with pytest.raises(
        TypeError, match=re.escape("ema_update_: option of the wrong type at 'tf_op'")
    ):
        fe.ema_update_(zero, one, 0.9, tf_op=None)
    assert zero["w"].item() == 0.0


# ------------------------------------------------------------------- weighted_moving_average


@pytest.mark.parametrize(("name", "dtype_name"), sorted(WEIGHTED_CASES))
def test_weighted_moving_average_matches_tf(name, dtype_name):
    dtype = DTYPES[dtype_name]
    c = case("weighted", name, dtype_name)
    state = None
    for t in range(1, len(c["values"]) + 1):
        value = from_hex(c["values"][t - 1], dtype, c["value_shape"])
        weight = from_hex(c["weights"][t - 1], dtype, c["weight_shape"])
        old, before = state, snapshot(state)
        average, state = fe.weighted_moving_average(value, c["decay"], weight, state=state)
        if old is not None:
            assert_bits_equal(old, before)  # pure
        expected = from_hex(c["average"][t - 1], dtype, c["value_shape"])
        assert_tf_bits({"avg": average}, {"avg": expected}, f"{name} t={t}")
    assert state["weight"].shape == tuple(c["weight_shape"])


def test_weighted_moving_average_errors():
    v = torch.ones(3)
    with pytest.raises(
        TypeError, match=re.escape("weighted_moving_average: dtype mismatch at 'weight'")
    ):
        fe.weighted_moving_average(v, 0.9, torch.ones(3, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=re.escape("weighted_moving_average: shape mismatch at 'weight'")
    ):
        fe.weighted_moving_average(v, 0.9, torch.ones(2, 3))
    with pytest.raises(ValueError, match=re.escape("shape mismatch at 'weight'")):
        fe.weighted_moving_average(v, 0.9, torch.ones(2))
    with pytest.raises(TypeError, match=re.escape("`value` not a floating tensor at 'value'")):
        fe.weighted_moving_average(torch.ones(3, dtype=torch.int64), 0.9, torch.ones(()))
    with pytest.raises(TypeError, match=re.escape("`weight` not a floating tensor at 'weight'")):
        fe.weighted_moving_average(v, 0.9, 2.0)
    _, state = fe.weighted_moving_average(v, 0.9, torch.ones(()))
    with pytest.raises(
        ValueError, match=re.escape("weighted_moving_average: shape mismatch at 'weight'")
    ):
        fe.weighted_moving_average(v, 0.9, torch.ones(3), state=state)  # state kept a scalar
    with pytest.raises(ValueError, match="decay out of range"):
        fe.weighted_moving_average(v, 1.5, torch.ones(()))


# --------------------------------------------------------------------------- names


def variables_to_restore(state: fe.EmaState, model_state: dict, names=None) -> dict:
    """The functional ``variables_to_restore``: averages for ``names``, the rest as is.

    The recipe of docs/tf_mapping.md.
    """
    averages = fe.average(state)
    names = list(averages) if names is None else names
    return {**model_state, **{k: averages[k] for k in names}}


def test_restore_names_follow_tf():
    doc = fixture()["restore_names"]
    for var, avg_name in doc["average_name"].items():
        assert avg_name == f"{var}/ExponentialMovingAverage"  # fe: the average keeps `var`
    model_state = {name: torch.zeros(2) for name in doc["variables"]}
    state = fe.init({name: torch.ones(2) for name in doc["averaged"]})
    for key, restore in (
        ("variables_to_restore", None),
        ("variables_to_restore_subset", doc["subset"]),
    ):
        tf_map = doc[key]  # restore name -> variable it loads into
        from_average = {
            var
            for restore_name, var in tf_map.items()
            if restore_name == f"{var}/ExponentialMovingAverage" and var in doc["variables"]
        }
        ours = variables_to_restore(state, model_state, restore)
        averaged = {k for k, v in ours.items() if bool((v == 1).all())}
        if restore is None:
            # TF's default also maps every trainable variable to an average name, averaged
            # or not ('c'), and fails to restore it; fe maps exactly the averaged ones.
            assert from_average == set(doc["averaged"]) | set(doc["trainable"])
            assert averaged == set(doc["averaged"])
        else:
            assert from_average == averaged == set(restore)
        assert set(ours) == set(doc["variables"])
