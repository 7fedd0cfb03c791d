"""Post-hoc EMA: power tracking, the snapshot store (atomic, per run), reconstruction."""

from __future__ import annotations

import math
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import optree
import pytest
import torch
from helpers import assert_bits_equal

import functional_ema as fe
from functional_ema import _engine
from functional_ema._bank import update_bank_weights_
from functional_ema._posthoc._solver import inner


F64 = torch.float64
SIGMAS = (0.05, 0.1)


def _gamma(sigma_rel: float) -> float:
    return fe.sigma_rel_to_gamma(sigma_rel)


def _weights(times: list[int], t_r: int, gamma: float) -> torch.Tensor:
    """Exact weights of the power EMA at t_r on the values given at ``times`` (<= t_r)."""
    edges = torch.tensor([0, *times], dtype=F64) / t_r
    cumulative = edges ** (gamma + 1)
    return cumulative[1:] - cumulative[:-1]


# --- tracking ---------------------------------------------------------------------------


def _ramp(k: int, steps: int) -> torch.Tensor:
    """Both tracked averages of w_t = t (float64) updated every k steps with dt=k."""
    tracker = fe.posthoc_init({"w": torch.zeros((), dtype=F64)}, sigma_rel=SIGMAS)
    for t in range(k, steps + 1, k):
        fe.posthoc_update_(tracker, {"w": torch.tensor(float(t), dtype=F64)}, dt=k)
    assert int(tracker["t"]) == steps
    return tracker["params"]["w"]


@pytest.mark.parametrize("k", [1, 10, 100])
def test_power_profile_ramp_matches_closed_form(k: int) -> None:
    steps = 6000
    got = _ramp(k, steps)
    for row, sigma_rel in enumerate(SIGMAS):
        gamma = _gamma(sigma_rel)
        n, g = steps // k, gamma + 1
        discrete = k * n - k * sum(j**g for j in range(n)) / n**g  # samples at j k
        assert float(got[row]) == pytest.approx(discrete, rel=1e-12)
        continuous = (gamma + 1) / (gamma + 2) * steps
        assert abs(float(got[row]) - continuous) <= k / 2 + 1  # samples lead by (k - 1) / 2


def test_time_unit_samples_gives_the_same_bits_as_steps() -> None:
    values = [torch.randn(3, dtype=F64) for _ in range(200)]
    by_step = fe.posthoc_init({"w": torch.zeros(3, dtype=F64)}, sigma_rel=SIGMAS)
    by_sample = fe.posthoc_init({"w": torch.zeros(3, dtype=F64)}, sigma_rel=SIGMAS)
    for value in values:
        fe.posthoc_update_(by_step, {"w": value})
        fe.posthoc_update_(by_sample, {"w": value}, dt=32)  # batches of 32 samples
    assert int(by_sample["t"]) == 32 * int(by_step["t"])
    assert torch.equal(by_step["params"]["w"], by_sample["params"]["w"])


def test_irregular_intervals_follow_the_profile() -> None:
    rng = random.Random(0)
    times, t = [], 0
    while t < 3000:
        t += rng.choice([1, 3, 17, 64])
        times.append(t)
    values = torch.randn(len(times), 4, dtype=F64)
    tracker = fe.posthoc_init({"w": torch.zeros(4, dtype=F64)}, sigma_rel=SIGMAS)
    previous = 0
    for time_, value in zip(times, values, strict=True):
        fe.posthoc_update_(tracker, {"w": value}, dt=torch.tensor(time_ - previous))
        previous = time_
    for row, sigma_rel in enumerate(SIGMAS):
        expected = _weights(times, times[-1], _gamma(sigma_rel)) @ values
        torch.testing.assert_close(tracker["params"]["w"][row], expected, rtol=1e-12, atol=1e-12)


def test_first_update_copies_and_the_weight_is_exact_at_large_t() -> None:
    tracker = fe.posthoc_init({"w": torch.full((2,), 5.0)}, sigma_rel=SIGMAS)
    fe.posthoc_update_(tracker, {"w": torch.ones(2)}, dt=7)
    assert torch.equal(tracker["params"]["w"], torch.ones(2, 2))  # beta = 0 at t == dt
    # At t = 1e6 the weight 1 - beta ~ (gamma + 1) / t is computed in float64 and rounded
    # once to float32; a float32 beta (TF's rounding) would be off by ~1e-3 here.
    tracker["t"].fill_(10**6 - 1)
    tracker["params"]["w"].zero_()
    fe.posthoc_update_(tracker, {"w": torch.ones(2)})
    for row, sigma_rel in enumerate(SIGMAS):
        exact = -math.expm1((_gamma(sigma_rel) + 1) * math.log1p(-1e-6))
        got = float(tracker["params"]["w"][row, 0])
        assert got == pytest.approx(exact, rel=1e-7)
        rounded = 1 - float(torch.tensor((1 - 1e-6) ** (_gamma(sigma_rel) + 1)).float())
        assert abs(rounded - exact) / exact > 1e-4


def test_tracker_is_a_weights_only_state_and_resumes_bit_identical(tmp_path: Path) -> None:
    values = [{"w": torch.randn(3), "n": torch.tensor(i)} for i in range(20)]
    straight = fe.posthoc_init({"w": torch.zeros(3), "n": torch.tensor(0)}, sigma_rel=SIGMAS)
    for value in values:
        fe.posthoc_update_(straight, value)
    resumed = fe.posthoc_init({"w": torch.zeros(3), "n": torch.tensor(0)}, sigma_rel=SIGMAS)
    for value in values[:10]:
        fe.posthoc_update_(resumed, value)
    fe.save(resumed, tmp_path / "tracker.pt")
    resumed = torch.load(tmp_path / "tracker.pt", weights_only=True)
    for value in values[10:]:
        fe.posthoc_update_(resumed, value)
    assert int(resumed["t"]) == 20
    for a, b in zip(optree.tree_leaves(resumed), optree.tree_leaves(straight), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(straight["params"]["n"], torch.tensor([19, 19]))  # integers copied


def test_tracking_validates_everything() -> None:
    params = {"w": torch.zeros(2)}
    once = re.escape("profile not given exactly once at 'sigma_rel/gamma': expected exactly one")
    with pytest.raises(ValueError, match="^posthoc_init: " + once):
        fe.posthoc_init(params)
    with pytest.raises(ValueError, match=once):
        fe.posthoc_init(params, sigma_rel=0.1, gamma=6.9)
    for bad in (0.0, 0.29, -0.1, float("nan")):
        with pytest.raises(ValueError, match=re.escape("out of range at 'sigma_rel': expected")):
            fe.posthoc_init(params, sigma_rel=bad)
    with pytest.raises(ValueError, match=re.escape("sigma_rel out of range at 'sigma_rel[1]'")):
        fe.posthoc_init(params, sigma_rel=[0.1, 0.3])
    with pytest.raises(ValueError, match="gamma out of range at 'gamma'"):
        fe.posthoc_init(params, gamma=0)
    with pytest.raises(ValueError, match=r"profile tracked twice .* expected distinct profiles"):
        fe.posthoc_init(params, sigma_rel=[0.1, 0.1])
    tracker = fe.posthoc_init(params, sigma_rel=SIGMAS)
    with pytest.raises(ValueError, match="shape mismatch at 'w'"):
        fe.posthoc_update_(tracker, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected buffers at 'buffers'"):
        fe.posthoc_update_(tracker, params, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="at 'dt'"):
        fe.posthoc_update_(tracker, params, dt=0)
    with pytest.raises(ValueError, match="unknown option at 'nonfinite'"):
        fe.posthoc_update_(tracker, params, nonfinite="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not a PostHocState .* expected a PostHocState"):
        fe.posthoc_update_(fe.init(params), params)
    broken = {**tracker, "t": torch.zeros(())}
    with pytest.raises(TypeError, match=r"time of the wrong type at 't': .* got a tensor of shape"):
        fe.posthoc_update_(broken, params)  # type: ignore[arg-type]
    assert int(tracker["t"]) == 0 and torch.equal(tracker["params"]["w"], torch.zeros(2, 2))


def _power_weights(tracker: fe.PostHocState, dt: int) -> torch.Tensor:
    """The post-hoc weights 1 - beta_k of the next update, float64, as documented."""
    t = int(tracker["t"]) + dt
    return -torch.expm1((tracker["gamma"] + 1) * torch.log1p(torch.tensor(-dt / t, dtype=F64)))


@pytest.mark.parametrize(
    "kernel", [False, pytest.param(True, marks=pytest.mark.compile)], ids=["eager", "kernel"]
)
@pytest.mark.parametrize(
    ("dtype", "value_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),  # float32 averages of a bfloat16 model
    ],
)
def test_tracking_is_the_bank_update_with_the_power_weights(
    dtype: torch.dtype, value_dtype: torch.dtype, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row k: TF's step with -expm1((gamma_k + 1) log1p(-dt / t)) cast once, bit for bit."""
    if kernel:  # the engine's bank kernel on every floating leaf
        monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
        monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
        monkeypatch.setattr(_engine.compiled, "enabled", True)
        monkeypatch.setattr(_engine.compiled, "synchronous", True)  # kernels from the start
    params = {"w": torch.randn(64, 3).to(value_dtype), "n": torch.tensor(0)}
    tracker = fe.posthoc_init(params, sigma_rel=(0.05, 0.1, 0.2), dtype=dtype)
    bank = fe.bank(params, 3, dtype=dtype)
    rows = bank["w"].clone()
    for dt in (1, 3, 1, 10, 7):
        params = {"w": torch.randn(64, 3).to(value_dtype), "n": params["n"] + 1}
        weights = _power_weights(tracker, dt)
        fe.posthoc_update_(tracker, params, dt=dt)
        update_bank_weights_("test", bank, params, weights, nonfinite="skip")
        cast = weights.to(dtype).view(3, 1, 1)
        rows = rows - (rows - params["w"].to(dtype)) * cast  # TF's step, in the average's dtype
    assert_bits_equal(tracker["params"], bank)
    assert_bits_equal(tracker["params"]["w"], rows)
    assert torch.equal(tracker["params"]["n"], torch.full((3,), 5))
    if kernel:
        assert not _engine.compiled.fallbacks


def _poisoned_tracker() -> tuple[fe.PostHocState, dict, dict]:
    params = {"w": torch.randn(8), "n": torch.tensor(0)}
    tracker = fe.posthoc_init(params, {"b": torch.zeros(2)}, sigma_rel=SIGMAS)
    fe.posthoc_update_(tracker, params, {"b": torch.zeros(2)})
    bad = {"w": torch.randn(8), "n": torch.tensor(1)}
    bad["w"][[2, 5]] = torch.tensor([float("nan"), -float("inf")])
    return tracker, bad, {"b": torch.ones(2)}


@pytest.mark.parametrize(
    "kernel", [False, pytest.param(True, marks=pytest.mark.compile)], ids=["eager", "kernel"]
)
def test_nonfinite_values_are_skipped_by_default(
    kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel:
        monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
        monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
        monkeypatch.setattr(_engine.compiled, "enabled", True)
        monkeypatch.setattr(_engine.compiled, "synchronous", True)  # kernels from the start
    tracker, bad, buffers = _poisoned_tracker()
    before = optree.tree_map(torch.clone, tracker)
    clean = {"w": torch.where(bad["w"].isfinite(), bad["w"], 0.0), "n": bad["n"]}
    expected = fe.posthoc_update_(optree.tree_map(torch.clone, tracker), clean, buffers)
    fe.posthoc_update_(tracker, bad, buffers)
    finite = bad["w"].isfinite().expand(2, 8)
    assert torch.equal(tracker["params"]["w"][~finite], before["params"]["w"][~finite])
    assert torch.equal(tracker["params"]["w"][finite], expected["params"]["w"][finite])
    assert int(tracker["t"]) == 2 and torch.equal(tracker["buffers"]["b"], torch.ones(2))
    assert torch.equal(tracker["params"]["n"], torch.tensor([1, 1]))


def test_nonfinite_values_raise_before_anything_is_written() -> None:
    tracker, bad, buffers = _poisoned_tracker()
    before = optree.tree_map(torch.clone, tracker)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "posthoc_update_: non-finite value at 'w': expected finite params, got 1 NaN and 1 Inf"
        ),
    ):
        fe.posthoc_update_(tracker, bad, buffers, nonfinite="raise")
    assert_bits_equal(tracker, before)  # the time, the averages and the buffers


def test_nonfinite_values_propagate_as_in_tf() -> None:
    tracker, bad, buffers = _poisoned_tracker()
    fe.posthoc_update_(tracker, bad, buffers, nonfinite="propagate")
    w = tracker["params"]["w"]
    assert bool(w[:, 2].isnan().all()) and bool((w[:, 5] == -float("inf")).all())
    assert bool(w[:, [0, 1, 3, 4, 6, 7]].isfinite().all())


BAD_PROFILES = [  # (sigma_rel, gamma, the error every API raises)
    ("x", None, TypeError),
    (True, None, TypeError),
    ([0.1, "x"], None, TypeError),
    (torch.tensor([0.1, 0.5]), None, ValueError),
    (0.5, None, ValueError),
    (float("nan"), None, ValueError),
    ([], None, ValueError),
    (0.1, 6.9, ValueError),
    (None, None, ValueError),
    (None, "7", TypeError),
    (None, [1.0, 0.0], ValueError),
    (None, float("inf"), ValueError),
]


@pytest.mark.parametrize(("sigma_rel", "gamma", "error"), BAD_PROFILES)
def test_a_bad_profile_raises_the_same_error_everywhere(
    sigma_rel: object, gamma: object, error: type[Exception], tmp_path: Path
) -> None:
    store = fe.SnapshotStore.create(tmp_path)  # no snapshots: the profile is checked first
    params = {"w": torch.zeros(2)}
    calls = {
        "power": lambda: fe.power(gamma, sigma_rel=sigma_rel),
        "posthoc_init": lambda: fe.posthoc_init(params, sigma_rel=sigma_rel, gamma=gamma),
        "posthoc_coefficients": lambda: fe.posthoc_coefficients(
            [10], [6.9], 10, sigma_rel=sigma_rel, gamma=gamma
        ),
        "reconstruct": lambda: fe.reconstruct(store, sigma_rel, gamma=gamma),
    }
    for name, scalar in (("sigma_rel", sigma_rel), ("gamma", gamma)):
        if isinstance(scalar, str | bool | float) and (sigma_rel is None) != (gamma is None):
            convert = fe.sigma_rel_to_gamma if name == "sigma_rel" else fe.gamma_to_sigma_rel
            calls[convert.__name__] = lambda convert=convert, scalar=scalar: convert(scalar)
    for api, call in calls.items():
        with pytest.raises(error, match=f"^{api}: ") as raised:
            call()
        assert type(raised.value) is error


# --- the solver -------------------------------------------------------------------------


def test_inner_product_matches_quadrature() -> None:
    tau = torch.linspace(0, 1, 400001, dtype=F64)[1:]

    def profile(t: float, g: float) -> torch.Tensor:
        return torch.where(tau <= t, (g + 1) / t * (tau / t) ** g, torch.zeros_like(tau))

    for t_a, g_a, t_b, g_b in [(1.0, 6.9, 1.0, 17.0), (0.5, 3.0, 0.9, 6.9), (0.9, 17, 0.3, 2)]:
        numeric = torch.trapezoid(profile(t_a, g_a) * profile(t_b, g_b), tau)
        closed = inner(*(torch.tensor(v, dtype=F64) for v in (t_a, g_a, t_b, g_b)))
        assert float(closed) == pytest.approx(float(numeric), rel=1e-4)


def _snapshot_grid(every: int, steps: int) -> tuple[list[int], list[float]]:
    times = [t for t in range(every, steps + 1, every) for _ in SIGMAS]
    gammas = [_gamma(s) for _ in range(every, steps + 1, every) for s in SIGMAS]
    return times, gammas


def _profile_error(x: torch.Tensor, times: list[int], gammas: list[float], t: float, g: float):
    t_i = torch.tensor(times, dtype=F64) / t
    g_i = torch.tensor(gammas, dtype=F64)
    a = inner(t_i[:, None], g_i[:, None], t_i[None, :], g_i[None, :])
    b = inner(t_i, g_i, torch.tensor(1.0, dtype=F64), torch.tensor(g, dtype=F64))
    r = (g + 1) ** 2 / (2 * g + 1)
    return math.sqrt(max(float(x @ a @ x - 2 * x @ b + r), 0.0) / r)


def test_coefficients_sum_to_one_and_beat_edm2_rescaling() -> None:
    times, gammas = _snapshot_grid(every=500, steps=10000)
    targets = [0.03, 0.08, 0.15, 0.2, 0.25]
    x, errors = fe.posthoc_coefficients(times, gammas, 10000, sigma_rel=targets)
    plain, plain_errors = fe.posthoc_coefficients(
        times, gammas, 10000, sigma_rel=targets, normalize=False
    )
    assert x.shape == (5, len(times)) and errors.shape == (5,)
    torch.testing.assert_close(x.sum(1), torch.ones(5, dtype=F64), rtol=0, atol=1e-12)
    for m, sigma_rel in enumerate(targets):
        g = _gamma(sigma_rel)
        assert float(errors[m]) == pytest.approx(_profile_error(x[m], times, gammas, 1e4, g))
        edm2 = plain[m] / plain[m].sum()  # EDM2: the projection, rescaled to sum to 1
        assert float(errors[m]) <= _profile_error(edm2, times, gammas, 1e4, g) + 1e-12
        assert float(plain_errors[m]) <= float(errors[m]) + 1e-12  # unconstrained is lower
        assert float(errors[m]) <= 1.05 * float(plain_errors[m]) + 1e-9  # ... but barely
    # a tracked profile at a snapshot time is reproduced exactly: one coefficient of 1
    x, error = fe.posthoc_coefficients(times, gammas, 5000, sigma_rel=0.1)
    assert int(x.argmax()) == times.index(5000) + 1
    torch.testing.assert_close(x.max(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-9)
    assert float(x[torch.tensor(times) > 5000].abs().max()) == 0.0  # later ones unused
    assert float(error) < 1e-7


def test_coefficients_refuse_invalid_input() -> None:
    with pytest.raises(ValueError, match="expected at least the earliest snapshot time"):
        fe.posthoc_coefficients([100, 200], [6.9, 17.0], 50, sigma_rel=0.1)
    with pytest.raises(ValueError, match="same length"):
        fe.posthoc_coefficients([100, 200], [6.9], 200, sigma_rel=0.1)
    with pytest.raises(ValueError, match="sigma_rel out of range at 'sigma_rel'"):
        fe.posthoc_coefficients([100], [6.9], 100, sigma_rel=0.3)
    with pytest.raises(ValueError, match="time out of range at 't'"):
        fe.posthoc_coefficients([100], [6.9], float("inf"), sigma_rel=0.1)
    with pytest.raises(TypeError, match="time of the wrong type at 't'"):
        fe.posthoc_coefficients([100], [6.9], "100", sigma_rel=0.1)  # type: ignore[arg-type]


# --- the snapshot store -----------------------------------------------------------------


def _model_tree(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(8, 4, generator=generator),
        "layer.bias": torch.randn(8, generator=generator),
    }


def _random_walk_run(
    folder: Path,
    *,
    run_id: str = "run",
    steps: int = 400,
    every: int = 20,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float32,
    tracker_dtype: torch.dtype | None = None,
) -> tuple[fe.SnapshotStore, fe.PostHocState, dict[int, dict[str, torch.Tensor]]]:
    """Track a random walk of a small tree; return the store, tracker and averages by t."""
    generator = torch.Generator().manual_seed(seed)
    params = _model_tree(seed)
    tracker = fe.posthoc_init(params, sigma_rel=SIGMAS, dtype=tracker_dtype)
    store = fe.SnapshotStore.create(folder, run_id=run_id, dtype=dtype)
    history = {}
    for t in range(1, steps + 1):
        params = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in params.items()}
        fe.posthoc_update_(tracker, params)
        if t % every == 0:
            store.save(tracker)
            history[t] = optree.tree_map(torch.clone, tracker["params"])
    return store, tracker, history


def test_store_files_are_weights_only_with_metadata(tmp_path: Path) -> None:
    store, tracker, _ = _random_walk_run(tmp_path, steps=40, tracker_dtype=F64)
    assert fe.SnapshotStore.runs(tmp_path) == ["run"]
    assert [(s.t, s.profile) for s in store.snapshots] == [(20, 0), (20, 1), (40, 0), (40, 1)]
    for snapshot in store.snapshots:
        payload = torch.load(tmp_path / snapshot.file, weights_only=True)
        assert payload["run_id"] == "run" and payload["t"] == snapshot.t
        assert payload["gamma"] == pytest.approx(_gamma(SIGMAS[snapshot.profile]))
        assert payload["sigma_rel"] == pytest.approx(SIGMAS[snapshot.profile])
        assert payload["dtype"] == "float32" and snapshot.dtype == "float32"
        assert all(v.dtype == torch.float32 for v in payload["params"].values())  # f64 tracker
        assert all(v.device.type == "cpu" for v in payload["params"].values())
    last = torch.load(tmp_path / store.snapshots[-1].file, weights_only=True)
    torch.testing.assert_close(
        last["params"]["layer.bias"], tracker["params"]["layer.bias"][1].float()
    )
    # storage of one row only (not the whole bank), and nothing left over from the writes
    assert last["params"]["layer.weight"].untyped_storage().nbytes() == 8 * 4 * 4
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["run.manifest.pt", *(s.file for s in store.snapshots)]
    )


def test_store_keeps_dtype_when_asked_and_integer_leaves(tmp_path: Path) -> None:
    params = {"w": torch.zeros(2, dtype=F64)}
    buffers = {"count": torch.tensor(0), "mean": torch.zeros(2, dtype=F64)}
    tracker = fe.posthoc_init(params, buffers, sigma_rel=SIGMAS)
    store = fe.SnapshotStore.create(tmp_path, dtype=None)
    fe.posthoc_update_(
        tracker, {"w": torch.ones(2, dtype=F64)}, {**buffers, "count": torch.tensor(7)}
    )
    (snapshot, _) = store.save(tracker)
    payload = store.load(snapshot)
    assert payload["params"]["w"].dtype == F64 and payload["dtype"] == "float64"
    assert (
        payload["buffers"]["count"].dtype == torch.int64 and int(payload["buffers"]["count"]) == 7
    )
    assert fe.SnapshotStore.open(tmp_path).dtype is None


def test_runs_are_never_mixed(tmp_path: Path) -> None:
    _, tracker_a, _ = _random_walk_run(tmp_path, run_id="a", steps=60, seed=1)
    store_b, _, _ = _random_walk_run(tmp_path, run_id="b", steps=80, seed=2)
    assert fe.SnapshotStore.runs(tmp_path) == ["a", "b"]
    with pytest.raises(
        ValueError, match=re.escape("expected exactly one run of snapshots, got 2 runs ['a', 'b']")
    ):
        fe.SnapshotStore.open(tmp_path)
    with pytest.raises(ValueError, match="already has snapshots"):
        fe.SnapshotStore.create(tmp_path, run_id="a")
    with pytest.raises(ValueError, match=re.escape("expected one of ['a', 'b']")):
        fe.SnapshotStore.open(tmp_path, "c")
    with pytest.raises(ValueError, match="letters, digits"):
        fe.SnapshotStore.create(tmp_path, run_id="a.b")
    opened = fe.SnapshotStore.open(tmp_path, "a")
    assert {s.file.split(".")[0] for s in opened.snapshots} == {"a"}
    result = fe.reconstruct(opened, sigma_rel=0.05)
    assert result.t == 60
    torch.testing.assert_close(
        result.params["layer.weight"], tracker_a["params"]["layer.weight"][0]
    )
    # a file replaced by another run's is refused, not silently used
    os.replace(tmp_path / store_b.snapshots[-1].file, tmp_path / opened.snapshots[-1].file)
    with pytest.raises(ValueError, match="replaced by another run's"):
        fe.reconstruct(opened, sigma_rel=0.05)
    os.unlink(tmp_path / opened.snapshots[-1].file)
    with pytest.raises(ValueError, match="expected the file the manifest of run 'a' lists"):
        fe.reconstruct(opened, sigma_rel=0.05)


def test_save_needs_increasing_times_and_truncate_resumes(tmp_path: Path) -> None:
    store, tracker, _ = _random_walk_run(tmp_path, steps=60)
    with pytest.raises(ValueError, match=re.escape("store.truncate(59)")):
        store.save(tracker)
    dropped = store.truncate(30)
    assert [s.t for s in dropped] == [40, 40, 60, 60]
    assert [s.t for s in fe.SnapshotStore.open(tmp_path).snapshots] == [20, 20]
    assert not any(".t000000000040." in name for name in os.listdir(tmp_path))
    store.save(tracker)  # t = 60 again, after the truncation
    assert [s.t for s in store.snapshots] == [20, 20, 60, 60]
    empty = fe.posthoc_init({"w": torch.zeros(1)}, sigma_rel=0.1)
    with pytest.raises(ValueError, match="Update the tracker before saving"):
        fe.SnapshotStore.create(tmp_path / "other").save(empty)


# --- reconstruction ---------------------------------------------------------------------


def test_reconstructing_a_tracked_profile_reproduces_it(tmp_path: Path) -> None:
    store, tracker, history = _random_walk_run(tmp_path, steps=400, every=20)
    both = fe.reconstruct(store, sigma_rel=list(SIGMAS))
    assert isinstance(both, list) and len(both) == 2
    for row, result in enumerate(both):
        assert result.error < 1e-7 and result.t == 400
        for name, value in result.params.items():
            expected = tracker["params"][name][row]
            # float32 snapshots, float32 accumulation: a few float32 ulps of the weights
            assert float((value - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    # at an earlier snapshot time, later snapshots are ignored
    earlier = fe.reconstruct(store, sigma_rel=0.1, t=200)
    assert earlier.t == 200 and max(s.t for s in earlier.snapshots) == 200
    torch.testing.assert_close(earlier.params, {k: v[1] for k, v in history[200].items()})


def test_reconstruction_matches_the_closed_form_within_the_profile_error(tmp_path: Path) -> None:
    """An untracked sigma_rel on a synthetic signal, against the exact power-function EMA."""
    steps, every = 2000, 50
    j = torch.arange(1, steps + 1, dtype=F64)
    signal_ = torch.stack(
        [
            j / steps,
            (j / steps) ** 2,
            torch.sin(2 * math.pi * 3 * j / steps),
            torch.cos(2 * math.pi * 11 * j / steps),
            torch.randn(steps, dtype=F64).cumsum(0) / 10,
        ],
        dim=1,
    )
    tracker = fe.posthoc_init({"w": torch.zeros(5, dtype=F64)}, sigma_rel=SIGMAS)
    store = fe.SnapshotStore.create(tmp_path)
    for t in range(1, steps + 1):
        fe.posthoc_update_(tracker, {"w": signal_[t - 1]})
        if t % every == 0:
            store.save(tracker)
    for t_r in (steps, 1000):
        results = fe.reconstruct(store, sigma_rel=[0.03, 0.07, 0.15, 0.2], t=t_r)
        norm_signal = signal_[:t_r].pow(2).sum(0).sqrt()  # ||theta||_L2[0, t_r], dt = 1
        for result in results:
            g, w = result.gamma, result.params["w"].double()
            exact = _weights(list(range(1, t_r + 1)), t_r, g) @ signal_[:t_r]
            norm_profile = math.sqrt((g + 1) ** 2 / ((2 * g + 1) * t_r))
            bound = result.error * norm_profile * norm_signal + 1e-6  # + float32 storage
            assert bool(((w - exact).abs() <= bound).all()), (result, w - exact, bound)
            assert result.error < 0.03  # 20 to 40 snapshots per profile
            # the ramp's continuous closed form, plus half a step (samples lead their step)
            ramp = (g + 1) / (g + 2) * t_r / steps + 0.5 / steps
            assert abs(float(w[0]) - ramp) <= float(bound[0]) + 1e-6


def test_normalized_coefficients_keep_constants_exact(tmp_path: Path) -> None:
    tracker = fe.posthoc_init({"c": torch.zeros(3)}, sigma_rel=SIGMAS)
    store = fe.SnapshotStore.create(tmp_path)
    for t in range(1, 201):
        fe.posthoc_update_(tracker, {"c": torch.full((3,), 3.0)})
        if t % 40 == 0:
            store.save(tracker)
    normalized = fe.reconstruct(store, sigma_rel=0.25, max_error=None)
    plain = fe.reconstruct(store, sigma_rel=0.25, max_error=None, normalize=False)
    torch.testing.assert_close(normalized.params["c"], torch.full((3,), 3.0))
    total = float(plain.coefficients.sum())
    assert abs(total - 1) > 1e-3  # sparse snapshots, a far target: the projection loses mass
    torch.testing.assert_close(plain.params["c"], torch.full((3,), 3.0 * total))
    assert plain.error <= normalized.error


def test_reconstruct_refuses_invalid_targets(tmp_path: Path) -> None:
    store, _, _ = _random_walk_run(tmp_path, steps=100, every=20)
    with pytest.raises(
        ValueError, match=r"profile error too large at 'sigma_rel': expected a relative L2"
    ):
        fe.reconstruct(store, sigma_rel=0.01)
    far = fe.reconstruct(store, sigma_rel=0.01, max_error=None)
    assert far.error > 0.1
    for bad in (0.0, 0.3):
        with pytest.raises(
            ValueError,
            match=re.escape("out of range at 'sigma_rel': expected a number in (0, 0.2887)"),
        ):
            fe.reconstruct(store, sigma_rel=bad)
    for t in (10, 101, 0):
        with pytest.raises(
            ValueError, match=re.escape("between the first and the last snapshot (20 to 100)")
        ):
            fe.reconstruct(store, sigma_rel=0.1, t=t)
    with pytest.raises(TypeError, match="time of the wrong type at 't'"):
        fe.reconstruct(store, sigma_rel=0.1, t=100.0)  # type: ignore[arg-type]
    for bad_error, error in (("0.1", TypeError), (True, TypeError), (0.0, ValueError)):
        with pytest.raises(error, match=r"max_error .* at 'max_error'"):
            fe.reconstruct(store, sigma_rel=0.1, max_error=bad_error)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no snapshots at 'store': expected at least one"):
        fe.reconstruct(fe.SnapshotStore.create(tmp_path / "empty"), sigma_rel=0.1)
    with pytest.raises(TypeError, match="expected a SnapshotStore"):
        fe.reconstruct(str(tmp_path), sigma_rel=0.1)  # type: ignore[arg-type]


def test_reconstruct_streams_one_snapshot_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = _random_walk_run(tmp_path, steps=200, every=20)
    loaded: list[weakref.ref[torch.Tensor]] = []
    real_load = fe.SnapshotStore.load

    def load(self: fe.SnapshotStore, snapshot: fe.Snapshot, **kwargs: object) -> dict:
        alive = [ref for ref in loaded if ref() is not None]
        assert not alive, "the previous snapshot is still in memory"
        payload = real_load(self, snapshot, **kwargs)  # type: ignore[arg-type]
        loaded.extend(weakref.ref(v) for v in payload["params"].values())
        return payload

    monkeypatch.setattr(fe.SnapshotStore, "load", load)
    results = fe.reconstruct(store, sigma_rel=[0.07, 0.12])
    assert len(loaded) == 2 * len(store.snapshots)  # every file read once, for both targets
    assert all(r.params["layer.weight"].dtype == torch.float32 for r in results)


def test_reconstruction_as_a_module(tmp_path: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).to(torch.bfloat16)
    tracker = fe.posthoc_init(*fe.module_state(model), sigma_rel=SIGMAS, dtype=torch.float32)
    store = fe.SnapshotStore.create(tmp_path)
    for t in range(1, 61):
        with torch.no_grad():  # the weights and BatchNorm's statistics move (a random walk)
            for tensor in [*model.parameters(), model[1].running_mean, model[1].running_var]:
                tensor.add_(0.1 * torch.randn_like(tensor).abs())
            model[1].num_batches_tracked.add_(1)
        fe.posthoc_update_(tracker, *fe.module_state(model))
        if t % 10 == 0:
            store.save(tracker)
    result = fe.reconstruct(store, sigma_rel=0.08)
    assert int(result.buffers["1.num_batches_tracked"]) == 60
    rebuilt = result.module(model)
    assert not rebuilt.training and rebuilt is not model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in rebuilt.parameters())
    x = torch.randn(5, 3, dtype=torch.bfloat16)
    params = {k: v.to(torch.bfloat16) for k, v in result.params.items()}
    buffers = {k: v.to(model.get_buffer(k).dtype) for k, v in result.buffers.items()}
    model.eval()
    assert torch.equal(rebuilt(x), fe.apply(model, params, buffers, x))
    with pytest.raises(ValueError, match="names mismatch at 'model'"):
        result.module(torch.nn.Linear(3, 4))


# --- crash safety -----------------------------------------------------------------------


_WRITER = textwrap.dedent(
    """
    import io, os, random, signal, sys, torch, functional_ema as fe

    # A training process that saves a snapshot every 10 updates and dies by SIGKILL (no
    # cleanup runs) at a chosen point of one of its file writes. Each write of fe.save is one
    # torch.save into a temporary file, then os.replace onto the target.
    folder, mode = sys.argv[1], sys.argv[2]
    tracker = fe.posthoc_init({"w": torch.zeros(50_000)}, sigma_rel=(0.05, 0.1))
    real_save, real_replace = torch.save, os.replace
    writes = [0]
    if mode.startswith("random:"):  # a seeded random write (saves 4 to 8) and phase
        rng = random.Random(int(mode.split(":")[1]))
        kill_at = rng.randrange(11, 26)
        phase, fraction = rng.choice(["write", "rename", "after"]), rng.random()
        print(phase, flush=True)
    else:  # at t = 40: half-way through the second profile's file, or the manifest
        kill_at, phase, fraction = {"snapshot": 12, "manifest": 13}[mode], "write", 0.5

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def dying_save(obj, f, *args, **kwargs):
        writes[0] += 1  # 1: the manifest of create(); save k: 3k - 1, 3k (profiles), 3k + 1
        if writes[0] == kill_at and phase == "write":
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: int(len(buffer.getvalue()) * fraction)])
            f.flush()
            os.fsync(f.fileno())  # the partial file is on disk
            die()
        return real_save(obj, f, *args, **kwargs)

    def dying_replace(source, target):
        if writes[0] == kill_at and phase == "rename":
            die()  # a complete temporary file, not renamed
        real_replace(source, target)
        if writes[0] == kill_at and phase == "after":
            die()  # renamed, but what comes after (the manifest, the next profile) is not

    torch.save, os.replace = dying_save, dying_replace
    store = fe.SnapshotStore.create(folder, run_id="crash")
    for t in range(1, 10**9):
        fe.posthoc_update_(tracker, {"w": torch.full((50_000,), float(t))})
        if t % 10 == 0:
            store.save(tracker)
            print(t, flush=True)
    """
)


_WRITER_ENV = {**os.environ, "FUNCTIONAL_EMA_COMPILE": "0"}
"""The writers test the files, not the kernels: the eager path starts in a second, not ten."""


def _expected_ramp(last: int) -> dict[int, torch.Tensor]:
    """The writer's tracked averages of w = t (float32) at t = 10, 20, ..., last."""
    tracker = fe.posthoc_init({"w": torch.zeros(1)}, sigma_rel=SIGMAS)
    averages = {}
    for t in range(1, last + 1):
        fe.posthoc_update_(tracker, {"w": torch.full((1,), float(t))})
        if t % 10 == 0:
            averages[t] = tracker["params"]["w"][:, 0].clone()
    return averages


def _check_store_after_crash(folder: Path, at_least: int) -> fe.SnapshotStore:
    store = fe.SnapshotStore.open(folder)  # also removes the dead writer's temporary file
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    times = sorted({s.t for s in store.snapshots})
    assert times == list(range(10, times[-1] + 1, 10)) and times[-1] >= at_least
    expected = _expected_ramp(times[-1])
    for snapshot in store.snapshots:  # every listed file is complete and weights-only
        payload = torch.load(folder / snapshot.file, weights_only=True)
        value = float(expected[snapshot.t][snapshot.profile])
        assert torch.equal(payload["params"]["w"], torch.full((50_000,), value))
    result = fe.reconstruct(store, sigma_rel=0.05)
    torch.testing.assert_close(result.params["w"][:3], expected[times[-1]][0].expand(3))
    return store


@pytest.mark.parametrize("mode", ["snapshot", "manifest"])
def test_a_write_killed_mid_way_leaves_the_store_loadable(tmp_path: Path, mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_WRITER_ENV,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.split() == ["10", "20", "30"]
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # the half-written file
    store = _check_store_after_crash(tmp_path, at_least=30)
    assert [s.t for s in store.snapshots][-1] == 30  # t = 40 never joined the run
    # training resumes: the orphaned t = 40 files are overwritten, the run continues
    tracker = fe.posthoc_init({"w": torch.zeros(50_000)}, sigma_rel=SIGMAS)
    for t in range(1, 41):
        fe.posthoc_update_(tracker, {"w": torch.full((50_000,), float(t))})
    store.save(tracker)
    _check_store_after_crash(tmp_path, at_least=40)


def test_writers_killed_at_random_points_leave_the_store_loadable(tmp_path: Path) -> None:
    seeds = (1, 2, 4)  # after a rename, mid-write, before a rename (one seeded point each)
    writers = [  # all at once: the start-up (importing torch) dominates
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / str(seed)), f"random:{seed}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_WRITER_ENV,
        )
        for seed in seeds
    ]
    phases = set()
    for seed, writer in zip(seeds, writers, strict=True):
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == -signal.SIGKILL, err
        phase, *saved = out.split()
        phases.add(phase)
        assert len(saved) >= 3, out
        _check_store_after_crash(tmp_path / str(seed), at_least=30)
    assert phases == {"write", "rename", "after"}


# --- the example --------------------------------------------------------------------------


def test_example_reconstructs_every_target_and_plots(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "posthoc_ema.py"
    namespace = runpy.run_path(str(example), run_name="example")
    plot = tmp_path / "posthoc.png"
    result = namespace["main"](steps=20, seed=0, plot=str(plot))
    assert [row["sigma_rel"] for row in result["results"]] == list(namespace["TARGETS"])
    for row in result["results"]:
        assert math.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 <= row["profile_error"] < 0.1
    assert result["tracked_max_difference"] <= 1e-6
    assert result["snapshots"] == 2 * 20
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="at least 2"):
        namespace["main"](steps=1, plot=None)
