"""Bit-for-bit parity with real ``tf.train.ExponentialMovingAverage`` trajectories.

The fixtures ``tests/tf_reference/tf_<dtype>.json`` were recorded from TensorFlow
(CPU, eager; TF1 graph mode for ``zero_debias``) by ``tests/tf_reference/generate.py``;
that script's docstring describes exactly what was driven and the file format.
TensorFlow is not needed here: the fixtures hold raw tensor bits as hex strings and
this test reads them back with torch only.

A missing or incomplete fixture fails (never skips): the expected dtypes and case
names are listed below so the coverage cannot silently shrink.
"""

import pytest
import torch
from helpers import (
    BIT_VIEW,
    CASES,
    DTYPES,
    LEAF_NAMES,
    MIN_STEPS,
    NUM_UPDATES_CASES,
    REF_DIR,
    VARIABLE_CASES,
    get_case,
    leaves_at,
    load_fixture,
    step_decay,
)

import functional_ema as fe


def _params(case_names):
    return [
        pytest.param(dtype_name, case_name, id=f"{dtype_name}-{case_name}")
        for dtype_name in DTYPES
        for case_name in case_names
    ]


# --------------------------------------------------------------------------- helpers


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().contiguous().view(BIT_VIEW[x.element_size()])


def assert_bits_equal(actual: dict, expected: dict, where: str) -> None:
    assert set(actual) == set(expected), f"{where}: leaves {sorted(actual)} != {sorted(expected)}"
    for name in sorted(expected):
        a, e = actual[name], expected[name]
        assert isinstance(a, torch.Tensor), f"{where}, leaf {name!r}: got {type(a).__name__}"
        assert a.dtype == e.dtype, f"{where}, leaf {name!r}: dtype {a.dtype} != {e.dtype}"
        assert tuple(a.shape) == tuple(e.shape), (
            f"{where}, leaf {name!r}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        )
        ab, eb = _bits(a), _bits(e)
        if torch.equal(ab, eb):
            continue
        i = int((ab.flatten() != eb.flatten()).nonzero()[0])
        av, ev = a.detach().cpu().flatten()[i].item(), e.flatten()[i].item()
        nbad = int((ab != eb).sum())
        hexw = 2 * a.element_size()
        mask = (1 << (8 * a.element_size())) - 1
        raise AssertionError(
            f"{where}, leaf {name!r}: {nbad}/{e.numel()} elements differ from TensorFlow; "
            f"first at flat index {i}: got {av!r} (0x{int(ab.flatten()[i]) & mask:0{hexw}x}), "
            f"TF {ev!r} (0x{int(eb.flatten()[i]) & mask:0{hexw}x})"
        )


def _where(dtype_name: str, case: dict, t: int, api: str) -> str:
    n = None if case["num_updates"] is None else case["num_updates"][t - 1]
    return (
        f"[{api}] tf_{dtype_name}.json case {case['name']!r} step t={t} "
        f"(decay={case['decay'][t - 1]!r}, num_updates={n!r})"
    )


# --------------------------------------------------------------------------- coverage


def test_fixture_set_is_complete():
    files = sorted(p.name for p in REF_DIR.glob("tf_*.json"))
    assert files == sorted(f"tf_{d}.json" for d in DTYPES), files
    versions = set()
    for dtype_name in DTYPES:
        doc = load_fixture(dtype_name)
        assert doc["generator"] == "tests/tf_reference/generate.py"
        assert isinstance(doc["tensorflow_version"], str)
        assert doc["tensorflow_version"]
        versions.add(doc["tensorflow_version"])
        names = [c["name"] for c in doc["cases"]]
        assert sorted(names) == sorted(CASES), f"tf_{dtype_name}.json cases: {names}"
        for case in doc["cases"]:
            assert case["mode"] == CASES[case["name"]]
            steps = len(case["decay"])
            assert steps >= MIN_STEPS, (dtype_name, case["name"], steps)
            assert all(isinstance(d, float) for d in case["decay"])
            if case["num_updates"] is not None:
                assert len(case["num_updates"]) == steps
                assert all(isinstance(n, int) for n in case["num_updates"])
            assert (case["num_updates"] is not None) == ("num_updates" in case["name"])
            assert set(case["leaves"]) == LEAF_NAMES, (dtype_name, case["name"])
            for leaf in case["leaves"].values():
                assert len(leaf["values"]) == steps
                assert len(leaf["average"]) == steps
                if case["mode"] == "variable":
                    assert isinstance(leaf["init"], str)
                else:
                    assert leaf.get("init") is None
    assert len(versions) == 1, f"fixtures from several TF versions: {versions}"


def test_fixture_schedules_cover_the_edge_cases():
    case = get_case("float32", "per_step_decay")
    assert {0.0, 1.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999} <= set(case["decay"])
    assert case["decay"].count(1.0) >= 2
    assert case["decay"].count(0.0) >= 2
    big = get_case("float32", "num_updates_beyond_2_24")["num_updates"]
    assert min(big) < 2**24 < max(big)
    assert max(big) > 2**31
    reset = get_case("float32", "num_updates_reset")["num_updates"]
    assert reset[0] == 0
    assert reset.count(0) >= 2
    assert get_case("float32", "num_updates_from_zero")["num_updates"][0] == 0
    for dtype_name in DTYPES:
        # the schedules and the float64 random walks are shared by all dtypes
        for case_name in CASES:
            a, b = get_case("float32", case_name), get_case(dtype_name, case_name)
            assert a["decay"] == b["decay"]
            assert a["num_updates"] == b["num_updates"]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("dtype_name", "case_name"), _params(CASES))
def test_update_matches_tf(dtype_name, case_name):
    """``fe.init`` / ``fe.update`` / ``fe.average`` replay TF's trajectory bit for bit."""
    dtype = DTYPES[dtype_name]
    case = get_case(dtype_name, case_name)
    steps = len(case["decay"])
    if case["mode"] == "variable":
        init = leaves_at(case, dtype, "init")
        state = fe.init(init)
        assert_bits_equal(fe.average(state), init, f"[fe.init] case {case_name!r} init")
    else:
        # zero_debias: the t=1 values only fix structure and dtype; TF starts with
        # biased = 0 and local_step = 0, and t=1 is the first update.
        state = fe.init(leaves_at(case, dtype, "values", 1), zero_debias=True)
    for t in range(1, steps + 1):
        values = leaves_at(case, dtype, "values", t)
        prev_state, prev_avg = state, {k: v.clone() for k, v in fe.average(state).items()}
        state = fe.update(state, values, step_decay(case, t))
        assert_bits_equal(
            fe.average(state),
            leaves_at(case, dtype, "average", t),
            _where(dtype_name, case, t, "fe.update"),
        )
        # fe.update is pure: neither the old state nor the params were modified
        assert_bits_equal(
            fe.average(prev_state),
            prev_avg,
            _where(dtype_name, case, t, "fe.update mutated its input state"),
        )
        assert_bits_equal(
            values,
            leaves_at(case, dtype, "values", t),
            _where(dtype_name, case, t, "fe.update mutated params"),
        )


@pytest.mark.parametrize(("dtype_name", "case_name"), _params(VARIABLE_CASES))
def test_ema_update_matches_tf(dtype_name, case_name):
    """The pure tree function ``fe.ema_update`` replays TF's trajectory bit for bit."""
    dtype = DTYPES[dtype_name]
    case = get_case(dtype_name, case_name)
    shadow = leaves_at(case, dtype, "init")
    for t in range(1, len(case["decay"]) + 1):
        values = leaves_at(case, dtype, "values", t)
        prev = {k: v.clone() for k, v in shadow.items()}
        new = fe.ema_update(shadow, values, step_decay(case, t))
        assert_bits_equal(
            new, leaves_at(case, dtype, "average", t), _where(dtype_name, case, t, "fe.ema_update")
        )
        assert_bits_equal(
            shadow, prev, _where(dtype_name, case, t, "fe.ema_update mutated its input")
        )
        shadow = new


@pytest.mark.parametrize(("dtype_name", "case_name"), _params(VARIABLE_CASES))
def test_ema_update_inplace_matches_tf(dtype_name, case_name):
    """The in-place twin ``fe.ema_update_`` replays TF's trajectory bit for bit."""
    dtype = DTYPES[dtype_name]
    case = get_case(dtype_name, case_name)
    shadow = leaves_at(case, dtype, "init")
    storage = {k: v.data_ptr() for k, v in shadow.items()}
    for t in range(1, len(case["decay"]) + 1):
        fe.ema_update_(shadow, leaves_at(case, dtype, "values", t), step_decay(case, t))
        assert_bits_equal(
            shadow,
            leaves_at(case, dtype, "average", t),
            _where(dtype_name, case, t, "fe.ema_update_"),
        )
    assert {k: v.data_ptr() for k, v in shadow.items()} == storage


@pytest.mark.parametrize("case_name", NUM_UPDATES_CASES)
def test_tf_decay_accepts_int64_tensor_num_updates(case_name):
    case = get_case("float32", case_name)
    for decay, n in zip(case["decay"], case["num_updates"], strict=True):
        from_int = fe.tf_decay(decay, n)
        from_tensor = fe.tf_decay(decay, torch.tensor(n, dtype=torch.int64))
        for d in (from_int, from_tensor):
            assert isinstance(d, torch.Tensor)
            assert d.dtype == torch.float32
            assert d.dim() == 0
        assert torch.equal(_bits(from_int), _bits(from_tensor)), (decay, n, from_int, from_tensor)
