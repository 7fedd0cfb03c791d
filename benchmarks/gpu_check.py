#!/usr/bin/env python
"""Device check: TensorFlow's bits, every candidate timed side by side, launches per update.

One run, in three parts, on one device (``--device cuda``, the default, or ``cpu``):

1. **TF bits.** The recorded ``tf.train.ExponentialMovingAverage`` trajectories
   (``tests/tf_reference/tf_<dtype>.json``, float32, float64, float16, bfloat16) are replayed
   on the device through ``fe.ema_update_``, ``fe.update_``, ``fe.update``, ``fe.update_`` with
   the decay as a tensor on the device, the ``fe.EMA`` adapter and ``fe.update_`` with the
   engine's compiled kernel forced on even these tiny leaves, under each engine strategy
   (``batched`` and ``direct``), and compared bit for bit: one PASS/FAIL line per dtype and
   strategy.
2. **Timings.** Every candidate of ``_candidates.py`` on each model of ``--models``, through
   the benchmark's own harness (``_harness.run_workload``: the float64 reference check, then
   round-robin timed rounds), with functional_ema's adapter, ``update_`` and ``update`` once
   per engine strategy. Peers that are not installed are skipped and reported as such.
3. **Launches per update.** Each candidate's update, counted: on CUDA the device activities
   (kernels, memcpy, memset) that ``torch.profiler`` records; on CPU the aten operators
   dispatched plus the calls of functional_ema's compiled kernel.

It writes ``<out>/benchmarks_cuda.md`` and ``<out>/benchmarks_cuda.png`` (on CPU
``gpu_check_cpu.*``, so as not to overwrite ``bench_ema.py``'s CPU plot) and exits 1 when a TF
replay failed. Run it through ``bash benchmarks/gpu_check.sh`` (which checks the environment
first), or from the repository root::

    PYTHONPATH=. benchmarks/.venv/bin/python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu --repeats 1 --models tiny --out /tmp/check
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's banner lines

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import functional_ema as fe
from functional_ema import _engine
from functional_ema._kernels import compiled

from _candidates import Candidate, Ctx, Runner
from _harness import Row, run_workload
from _report import ROOT, _fmt, machine_info
from _workloads import WORKLOADS, ModelSpec, Workload


STRATEGIES = ("batched", "direct")
"""The engine strategies every functional_ema row and every TF replay runs under."""

PER_STRATEGY = ("fe_adapter", "fe_inplace", "fe_pure")
"""The candidates timed once per strategy (the other rows run as they are)."""

PEER_MODULES = {
    "timm": "timm",
    "ema_pytorch": "ema_pytorch",
    "torch_ema": "torch_ema",
    "diffusers": "diffusers",
}
"""A peer candidate's key prefix -> the module it needs."""

DEFAULT_MODELS = ("resnet50", "vit_b_16", "small", "resnet50_bf16")
CUDA_REPEATS = 20
"""Timed rounds per model on CUDA (on CPU each model's own default)."""

PROFILED_UPDATES = 3
"""Updates counted per candidate; the table shows the count per update."""

DEVICE_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
"""The profiler's activity types that each cost one launch on the device."""

GOAL_PURE = 1.3
"""The pure ``fe.update`` should take at most this times the bare ``_foreach_lerp``."""

FIXTURES = ROOT / "tests" / "tf_reference"
TF_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BIT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


StrategySwitch = Callable[[str], contextlib.AbstractContextManager[object]]


def strategy_switch() -> StrategySwitch:
    """functional_ema's ``use_strategy`` context manager.

    Returns:
        ``use_strategy``: ``with use_strategy("batched"): ...`` forces that engine strategy.

    Raises:
        SystemExit: If this functional_ema has no ``_engine.use_strategy``.
    """
    try:
        from functional_ema._engine import use_strategy
    except ImportError as exc:
        raise SystemExit(
            "gpu_check: functional_ema._engine.use_strategy is missing; this check runs every "
            f"update under each engine strategy {STRATEGIES} and needs that switch "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return use_strategy


# ------------------------------------------------------------------------------- TF fixtures


@functools.cache
def load_cases(dtype_name: str) -> list[dict]:
    """The recorded TensorFlow cases of one dtype (format: ``tests/tf_reference/generate.py``)."""
    doc = json.loads((FIXTURES / f"tf_{dtype_name}.json").read_text())
    if doc["dtype"] != dtype_name:
        raise ValueError(f"tf_{dtype_name}.json holds dtype {doc['dtype']!r}")
    return doc["cases"]


def tensor_from_hex(hex_bits: str, dtype: torch.dtype, shape: list[int]) -> Tensor:
    """A CPU tensor from the fixtures' little-endian raw bits."""
    raw = bytearray.fromhex(hex_bits)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


def leaves_at(
    case: dict, dtype: torch.dtype, key: str, device: torch.device, t: int | None = None
) -> dict[str, Tensor]:
    """The case's leaves of ``key`` ("init", or "values"/"average" at step ``t`` >= 1)."""
    out = {}
    for name, leaf in case["leaves"].items():
        hex_bits = leaf[key] if t is None else leaf[key][t - 1]
        out[name] = tensor_from_hex(hex_bits, dtype, leaf["shape"]).to(device)
    return out


def step_decay(case: dict, t: int, device: torch.device | None = None) -> float | Tensor:
    """The decay TF used at step ``t``.

    Args:
        case: A fixture case.
        t: The step, from 1.
        device: Where to put the decay as a 0-dim float32 tensor (None: a Python float, or
            the CPU tensor of ``fe.tf_decay`` for cases with ``num_updates``).

    Returns:
        The decay to pass to functional_ema.
    """
    decay = case["decay"][t - 1]
    if case["num_updates"] is not None:
        decay = fe.tf_decay(decay, case["num_updates"][t - 1])
    if device is None:
        return decay
    return torch.as_tensor(decay, dtype=torch.float32).to(device)


def steps(case: dict) -> range:
    """The case's steps, 1..T."""
    return range(1, len(case["decay"]) + 1)


def first_difference(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> str:
    """Where ``actual`` differs from ``expected`` in bits ("" when it does not)."""
    for name, want in expected.items():
        got = actual[name].detach().cpu()
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"leaf {name!r}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
        view = BIT_VIEWS[want.element_size()]
        got_bits, want_bits = got.contiguous().view(view), want.contiguous().view(view)
        if torch.equal(got_bits, want_bits):
            continue
        differ = (got_bits != want_bits).flatten()
        i = int(differ.nonzero()[0])
        return (
            f"leaf {name!r}: {int(differ.sum())}/{want.numel()} elements differ, first at {i}: "
            f"got {got.flatten()[i].item()!r}, TF {want.flatten()[i].item()!r}"
        )
    return ""


# ------------------------------------------------------------------------------- TF replays

Trajectory = Iterator[tuple[int, dict[str, Tensor]]]


def _initial_state(case: dict, dtype: torch.dtype, device: torch.device) -> fe.EmaState:
    if case["mode"] == "variable":
        return fe.init(leaves_at(case, dtype, "init", device))
    # zero_debias: TF starts from zeros; the t=1 values only fix structure and dtype.
    return fe.init(leaves_at(case, dtype, "values", device, 1), zero_debias=True)


def replay_ema_update_(case: dict, dtype: torch.dtype, device: torch.device) -> Trajectory:
    """``fe.ema_update_`` on the initial values, step by step."""
    shadow = leaves_at(case, dtype, "init", device)
    for t in steps(case):
        fe.ema_update_(shadow, leaves_at(case, dtype, "values", device, t), step_decay(case, t))
        yield t, shadow


def replay_update_(
    case: dict, dtype: torch.dtype, device: torch.device, *, decay_on_device: bool = False
) -> Trajectory:
    """``fe.update_`` on an ``fe.init`` state (the decay as a device tensor if asked)."""
    state = _initial_state(case, dtype, device)
    for t in steps(case):
        decay = step_decay(case, t, device if decay_on_device else None)
        fe.update_(state, leaves_at(case, dtype, "values", device, t), decay)
        yield t, fe.average(state)


def replay_update_device_decay(case: dict, dtype: torch.dtype, device: torch.device) -> Trajectory:
    """``fe.update_`` with the decay a 0-dim float32 tensor on the device (no host read)."""
    return replay_update_(case, dtype, device, decay_on_device=True)


def replay_update(case: dict, dtype: torch.dtype, device: torch.device) -> Trajectory:
    """The pure ``fe.update``, a new state each step."""
    state = _initial_state(case, dtype, device)
    for t in steps(case):
        state = fe.update(state, leaves_at(case, dtype, "values", device, t), step_decay(case, t))
        yield t, fe.average(state)


class Leaves(nn.Module):
    """A module whose parameters are the fixture's leaves, by name (for the adapter).

    Args:
        leaves: The initial values.
    """

    def __init__(self, leaves: dict[str, Tensor]) -> None:
        super().__init__()
        for name, value in leaves.items():
            self.register_parameter(name, nn.Parameter(value.clone()))


def replay_adapter(case: dict, dtype: torch.dtype, device: torch.device) -> Trajectory:
    """The ``fe.EMA`` adapter: the live params set to the step's values, then ``update()``."""
    model = Leaves(leaves_at(case, dtype, "init", device))
    ema = fe.EMA(model, case["decay"][0])
    params = dict(model.named_parameters())
    for t in steps(case):
        with torch.no_grad():
            for name, value in leaves_at(case, dtype, "values", device, t).items():
                params[name].copy_(value)
        ema.decay = step_decay(case, t)
        ema.update()
        yield t, ema.state()["params"]


@contextlib.contextmanager
def forced_kernels() -> Iterator[None]:
    """Let the engine use (and build, waiting for it) its compiled kernel on any region size."""
    saved_module = {k: getattr(_engine, k) for k in ("KERNEL_FROM", "COMPILE_FROM")}
    saved_synchronous = compiled.synchronous
    try:
        for name in saved_module:
            setattr(_engine, name, 0)
        compiled.synchronous = True
        yield
    finally:
        for name, value in saved_module.items():
            setattr(_engine, name, value)
        compiled.synchronous = saved_synchronous


@dataclasses.dataclass(frozen=True)
class Replay:
    """One way through functional_ema that the fixtures are replayed with.

    Attributes:
        name: Its name in the output.
        run: Yields ``(t, averages)`` after each step of a case.
        variable_only: Whether it takes only TF2 ``variable`` cases (not ``zero_debias``).
        context: Entered around each case (e.g. ``forced_kernels``).
    """

    name: str
    run: Callable[[dict, torch.dtype, torch.device], Trajectory]
    variable_only: bool = False
    context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext


REPLAYS = (
    Replay("ema_update_", replay_ema_update_, variable_only=True),
    Replay("update_", replay_update_),
    Replay("update", replay_update),
    Replay("update_ (decay on device)", replay_update_device_decay),
    Replay("EMA", replay_adapter, variable_only=True),
)
KERNEL_REPLAY = Replay("update_ (compiled kernel)", replay_update_, context=forced_kernels)


@dataclasses.dataclass
class TfResult:
    """The outcome of one dtype under one strategy.

    Attributes:
        dtype: The fixture's dtype name.
        strategy: The engine strategy.
        steps: Steps compared, by replay name.
        failure: The first difference or error ("" when every step matched).
        note: What else is worth knowing (the compiled kernel's build).
    """

    dtype: str
    strategy: str
    steps: dict[str, int] = dataclasses.field(default_factory=dict)
    failure: str = ""
    note: str = ""

    @property
    def passed(self) -> bool:
        """Whether every replayed step matched TF bit for bit."""
        return not self.failure and bool(self.steps)

    def line(self) -> str:
        """The console line: PASS/FAIL, what was compared, the first difference."""
        verdict = "PASS" if self.passed else "FAIL"
        total = sum(self.steps.values())
        text = f"TF bits {self.dtype:9s} {self.strategy:8s} {verdict}: {total} steps over "
        text += ", ".join(f"{name} {n}" for name, n in self.steps.items())
        if self.failure:
            text += f"; {self.failure}"
        return text + (f" ({self.note})" if self.note else "")


def _replay_case(replay: Replay, case: dict, dtype: torch.dtype, device: torch.device) -> int:
    """Replay one case; the steps compared. Raises ``AssertionError`` at the first difference."""
    count = 0
    with replay.context():
        for t, averages in replay.run(case, dtype, device):
            expected = leaves_at(case, dtype, "average", torch.device("cpu"), t)
            where = first_difference(averages, expected)
            if where:
                raise AssertionError(f"{replay.name}, case {case['name']!r}, t={t}: {where}")
            count += 1
    return count


def _kernel_note(device: torch.device, dtype: torch.dtype) -> str:
    """Whether the compiled kernel for ``dtype`` on ``device`` was built, or why not."""
    if not compiled.enabled:
        return "compiled kernels off: eager"
    keys = [k for k in compiled.built if k[2] == device.type and k[3] == dtype]
    failed = {k: v for k, v in compiled.failures.items() if k[2] == device.type and k[3] == dtype}
    if failed:
        return f"kernel build failed, eager used: {next(iter(failed.values()))[:120]}"
    return "compiled kernel used" if keys else "compiled kernel not used"


def replay_dtype(
    dtype_name: str,
    strategy: str,
    device: torch.device,
    switch: StrategySwitch,
    *,
    kernel: bool,
) -> TfResult:
    """Replay every case of one dtype through every ``Replay``, under one strategy.

    Args:
        dtype_name: The fixture's dtype.
        strategy: The engine strategy to force.
        device: Where the averages and values live.
        switch: ``use_strategy``.
        kernel: Whether to add the replay with the compiled kernel forced on.

    Returns:
        The steps compared and the first difference, if any.
    """
    result = TfResult(dtype_name, strategy)
    dtype = TF_DTYPES[dtype_name]
    replays = (*REPLAYS, KERNEL_REPLAY) if kernel else REPLAYS
    with switch(strategy):
        for replay in replays:
            result.steps[replay.name] = 0
            for case in load_cases(dtype_name):
                if replay.variable_only and case["mode"] != "variable":
                    continue
                try:
                    result.steps[replay.name] += _replay_case(replay, case, dtype, device)
                except AssertionError as exc:
                    result.failure = str(exc)
                    return result
                except Exception as exc:  # an API that raises is a failure, reported
                    result.failure = (
                        f"{replay.name}, case {case['name']!r}: {type(exc).__name__}: {exc}"
                    )
                    return result
    if kernel:
        result.note = _kernel_note(device, dtype)
    return result


def check_tf_bits(device: torch.device, switch: StrategySwitch, *, kernel: bool) -> list[TfResult]:
    """Replay the four dtypes' fixtures under both strategies, printing a line for each."""
    print(f"\n== TensorFlow bits on {device}", flush=True)
    results = []
    for dtype_name in TF_DTYPES:
        for strategy in STRATEGIES:
            result = replay_dtype(dtype_name, strategy, device, switch, kernel=kernel)
            print(result.line(), flush=True)
            results.append(result)
    return results


# ----------------------------------------------------------------------- launches per update


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched (except inside a compiled kernel's call)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_kernel_calls(counter: _OpCounter) -> Iterator[None]:
    """Count each call of functional_ema's compiled kernel as one launch, within the block."""
    original = compiled.kernel
    shadowed = "kernel" in vars(compiled)

    def kernel(*args: object, **kwargs: object) -> Callable[..., object] | None:
        fn = original(*args, **kwargs)
        if fn is None:
            return None

        def counted(*call_args: object) -> object:
            counter.count += 1
            counter.paused = True
            try:
                return fn(*call_args)
            finally:
                counter.paused = False

        return counted

    compiled.kernel = kernel  # type: ignore[method-assign]
    try:
        yield
    finally:
        if shadowed:
            compiled.kernel = original  # type: ignore[method-assign]
        else:
            del compiled.kernel


def _cpu_launches(update: Callable[[], object], updates: int) -> int:
    """Aten operators dispatched plus compiled-kernel calls over ``updates`` calls."""
    counter = _OpCounter()
    with _counting_kernel_calls(counter), counter:
        for _ in range(updates):
            update()
    return counter.count


def _is_device_launch(event: object) -> bool:
    """Whether a profiler event is work launched on the CUDA device."""
    from torch.autograd import DeviceType

    if event.device_type() != DeviceType.CUDA:  # type: ignore[attr-defined]
        return False
    kind = getattr(event, "activity_type", None)
    return kind is None or kind() in DEVICE_ACTIVITIES


def _cuda_launches(update: Callable[[], object], updates: int) -> int:
    """Kernels, memcpys and memsets the profiler saw on the device over ``updates`` calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(updates):
            update()
        torch.cuda.synchronize()
    return sum(1 for e in prof.profiler.kineto_results.events() if _is_device_launch(e))


def launches_per_update(runner: Runner, device: torch.device) -> float:
    """One candidate's launches per update (see the module docstring for what counts)."""
    count = _cuda_launches if device.type == "cuda" else _cpu_launches
    return count(runner.update, PROFILED_UPDATES) / PROFILED_UPDATES


# --------------------------------------------------------------------------------- timings


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)
    )


TINY = Workload(
    "tiny", ModelSpec("Tiny MLP: 3 Linear, LayerNorm, BatchNorm1d (fp32)", _tiny, torch.float32, 5)
)
MODELS: dict[str, Workload] = {"tiny": TINY, **WORKLOADS}


class StrategyRunner(Runner):
    """A runner whose every call runs under one engine strategy.

    Args:
        inner: The candidate's runner.
        strategy: The strategy to force.
        switch: ``use_strategy``.
    """

    def __init__(self, inner: Runner, strategy: str, switch: StrategySwitch) -> None:
        self.inner = inner
        self.strategy = strategy
        self.switch = switch
        self.shadow_dtype = inner.shadow_dtype
        self.note = f"{inner.note}, under `use_strategy({strategy!r})`"

    def update(self) -> None:
        """The inner update, under the strategy."""
        with self.switch(self.strategy):
            self.inner.update()

    def averages(self) -> dict[str, Tensor] | None:
        """The inner runner's averages."""
        return self.inner.averages()

    def sync(self) -> None:
        """The inner runner's sync."""
        self.inner.sync()

    def stream_bytes(self, ctx: Ctx) -> int:
        """The inner runner's byte count."""
        return self.inner.stream_bytes(ctx)


def under_strategy(cand: Candidate, strategy: str, switch: StrategySwitch) -> Candidate:
    """``cand`` built and called under ``strategy``, as a row of its own."""

    def build(ctx: Ctx) -> Runner:
        with switch(strategy):
            return StrategyRunner(cand.build(ctx), strategy, switch)

    return dataclasses.replace(
        cand, key=f"{cand.key}@{strategy}", label=f"{cand.label} [{strategy}]", build=build
    )


def recorded(cand: Candidate, runners: dict[str, Runner]) -> Candidate:
    """``cand`` whose built runner is kept in ``runners`` (the harness drops its own)."""

    def build(ctx: Ctx) -> Runner:
        runner = cand.build(ctx)
        runners[cand.key] = runner
        return runner

    return dataclasses.replace(cand, build=build)


def missing_module(cand: Candidate) -> str:
    """The module a peer candidate needs and cannot import ("" when none)."""
    for prefix, module in PEER_MODULES.items():
        if cand.key.startswith(prefix) and importlib.util.find_spec(module) is None:
            return module
    return ""


def rows_for(
    workload: Workload, switch: StrategySwitch, runners: dict[str, Runner]
) -> tuple[list[Candidate], list[str]]:
    """The candidates to run on a workload, and those skipped for a missing module.

    Args:
        workload: The table.
        switch: ``use_strategy``.
        runners: Receives each built runner, by row key.

    Returns:
        ``(candidates, skipped)``, ``skipped`` as "label (module not installed)".
    """
    candidates, skipped = [], []
    for cand in workload.rows():
        module = missing_module(cand)
        if module:
            skipped.append(f"{cand.label} ({module} not installed)")
        elif cand.key in PER_STRATEGY:
            candidates += [under_strategy(cand, s, switch) for s in STRATEGIES]
        else:
            candidates.append(cand)
    return [recorded(c, runners) for c in candidates], skipped


@dataclasses.dataclass
class Section:
    """One model's results.

    Attributes:
        key: The model's key.
        title: The model's title.
        result: ``run_workload``'s result (None: the model could not be built).
        launches: Launches per update, by row key.
        skipped: Candidates not run, with why.
    """

    key: str
    title: str
    result: dict | None = None
    launches: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        """The table's rows (none when the model was skipped)."""
        return [] if self.result is None else self.result["rows"]


def harness_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings ``run_workload`` reads, from this command line."""
    repeats = args.repeats
    if repeats is None and args.device == "cuda":
        repeats = CUDA_REPEATS
    # No memory profiling: this report does not show it (bench_ema.py does).
    return argparse.Namespace(
        device=args.device, memory=False, check_steps=2, warmup=1, repeats=repeats
    )


def count_launches(section: Section, runners: dict[str, Runner], device: torch.device) -> None:
    """Fill ``section.launches`` from the runners that ran without error."""
    for row in section.rows:
        runner = runners.get(row.key)
        if runner is None or row.error:
            continue
        try:
            section.launches[row.key] = launches_per_update(runner, device)
        except Exception as exc:  # a count that fails is reported, not fatal
            print(f"    ! {row.label}: launch count: {type(exc).__name__}: {exc}", flush=True)
    if section.launches and not any(section.launches.values()):
        print("    ! the profiler saw no launches at all (is CUPTI usable?): not reported")
        section.launches.clear()


def time_model(key: str, args: argparse.Namespace, switch: StrategySwitch) -> Section:
    """Check, time and count the launches of every candidate on one model."""
    workload = MODELS[key]
    section = Section(key, workload.spec.title)
    runners: dict[str, Runner] = {}
    candidates, section.skipped = rows_for(workload, switch, runners)
    try:
        section.result = run_workload(workload, candidates, harness_args(args))
    except ModuleNotFoundError as exc:  # torchvision, for the torchvision models
        print(f"   skipped: the model needs {exc.name}, which is not installed", flush=True)
        section.skipped = [f"the model ({exc.name} not installed)"]
        return section
    for text in section.skipped:
        print(f"   skipped: {text}", flush=True)
    count_launches(section, runners, torch.device(args.device))
    for row in section.rows:
        if row.key in section.launches:
            print(f"   {row.label:60s} launches/update {_fmt_count(section.launches[row.key]):>8s}")
    runners.clear()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return section


# ---------------------------------------------------------------------------------- report


def _fmt_count(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def fastest_peers(rows: list[Row]) -> dict[str, Row]:
    """The fastest peer row by the averages' dtype (the ``""`` key: over all dtypes)."""
    fastest: dict[str, Row] = {}
    for row in rows:
        if row.family != "peer" or row.median is None:
            continue
        for dtype in (row.shadow, ""):
            if dtype not in fastest or row.median < fastest[dtype].median:
                fastest[dtype] = row
    return fastest


def ratios_to_bound(section: Section) -> dict[str, float]:
    """Each timed row's median / the bound's median, by row key."""
    timed = {r.key: r for r in section.rows if r.median is not None}
    bound = timed.get("bound")
    if bound is None:
        return {}
    return {key: r.median / bound.median for key, r in timed.items()}


def _check_cell(row: Row) -> str:
    if row.error:
        return f"**ERROR** ({row.error})"
    if row.check_err is None:
        return "n/a"
    return f"{row.check_msg} ({row.check_err:.1e})"


def model_table(section: Section) -> list[str]:
    """A model's Markdown table: time, ratios, launches per update, check."""
    fastest = fastest_peers(section.rows)
    x_bound = ratios_to_bound(section)
    lines = [
        "| candidate | shadow | median ms | min ms | x bound | x fastest peer "
        "| launches / update | check |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in section.rows:
        peer = fastest.get(row.shadow or "float32", fastest.get(""))
        x_peer = row.median / peer.median if (row.median and peer) else None
        cells = [
            f"**{row.label}**" if row.family == "fe" else row.label,
            row.shadow,
            _fmt(row.median and row.median * 1e3, 3),
            _fmt(row.best and row.best * 1e3, 3),
            _fmt(x_bound.get(row.key)),
            _fmt(x_peer),
            _fmt_count(section.launches.get(row.key)),
            _check_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(section: Section) -> list[str]:
    """The lines that matter: functional_ema against the bare foreach references."""
    timed = {r.key: r for r in section.rows if r.median is not None}
    lines = []
    pairs = (("fe_pure", "foreach_lerp", GOAL_PURE), ("fe_inplace", "foreach_lerp_", None))
    for ours, reference, goal in pairs:
        ref = timed.get(reference)
        for strategy in STRATEGIES:
            row = timed.get(f"{ours}@{strategy}")
            if row is None or ref is None:
                continue
            ratio = row.median / ref.median
            text = f"- {row.label}: {_fmt(ratio)}x {ref.label}"
            if goal is not None:
                text += f" (goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'})"
            if row.shadow != ref.shadow:
                text += f"; not like for like: {row.shadow} averages against {ref.shadow}"
            lines.append(text + ".")
    fe_launches = {
        r.label: section.launches[r.key]
        for r in section.rows
        if r.family == "fe" and r.key in section.launches
    }
    if fe_launches:
        lines.append(
            "- Launches per update of functional_ema: "
            + ", ".join(f"{label} {_fmt_count(n)}" for label, n in fe_launches.items())
            + "."
        )
    return lines


LAUNCHES_CUDA = (
    "device activities per update (kernels, memcpy and memset) that `torch.profiler` "
    f"(CUPTI) records over {PROFILED_UPDATES} updates, divided by {PROFILED_UPDATES}"
)
LAUNCHES_CPU = (
    "aten operators dispatched per update (a `TorchDispatchMode` counting calls) plus calls "
    f"of functional_ema's compiled kernel, over {PROFILED_UPDATES} updates, divided by "
    f"{PROFILED_UPDATES}"
)


def _tf_table(tf_results: list[TfResult]) -> list[str]:
    lines = ["| dtype | strategy | result | steps compared | note |", "|---|---|---|---:|---|"]
    for r in tf_results:
        verdict = "PASS" if r.passed else f"**FAIL**: {r.failure}"
        lines.append(
            f"| {r.dtype} | {r.strategy} | {verdict} | {sum(r.steps.values())} | {r.note} |"
        )
    return lines


def write_report(
    path: Path,
    run: dict,
    tf_results: list[TfResult],
    sections: list[Section],
    plot: Path | None,
) -> None:
    """Write the Markdown report.

    Args:
        path: Where to write it.
        run: ``date``, ``command``, ``seconds``, ``machine`` (``machine_info``), ``device``.
        tf_results: The TF replays.
        sections: The models' results.
        plot: The plot beside it, if one was written.
    """
    machine, device = run["machine"], run["device"]
    where = machine.get("gpu", machine["cpu"])
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    replays = ", ".join(r.name for r in (*REPLAYS, KERNEL_REPLAY))
    out = [
        "---",
        "orphan: true",
        "---",
        "",
        f"# functional_ema device check: {device}",
        "",
        "Generated by `bash benchmarks/gpu_check.sh` (`benchmarks/gpu_check.py`); do not edit "
        "by hand (re-run it). What the columns mean: `benchmarks/README.md`.",
        "",
        f"- Date: {run['date']}; whole run {run['seconds'] / 60:.1f} min.",
        f"- Command: `{run['command']}`",
        f"- Device: {where}; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if device == "cuda" else "")
        + f"; host {machine['cpu']}, {machine['cores']} cores.",
        f"- Versions: {versions}; functional_ema at commit {machine['commit'] or '?'}.",
        f"- Launches: {LAUNCHES_CUDA if device == 'cuda' else LAUNCHES_CPU}.",
        "",
        f"## TensorFlow bits on {device}",
        "",
        f"The fixtures `tests/tf_reference/tf_<dtype>.json`, replayed through {replays} "
        "under each engine strategy, compared bit for bit.",
        "",
        *_tf_table(tf_results),
        "",
    ]
    if plot is not None:
        out += [f"![median update time / bound, and launches per update]({plot.name})", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.result is not None:
            result = section.result
            out += [
                f"{result['tensors']} trainable tensors, {result['numel']:,} elements; "
                f"{result['repeats']} timed rounds; section took {result['seconds']:.0f} s.",
                "",
                *model_table(section),
                "",
                *summary(section),
            ]
        if section.skipped:
            out.append("- Not run: " + "; ".join(section.skipped) + ".")
        out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


FAMILY_COLORS = {"fe": "tab:blue", "peer": "tab:orange", "seed": "0.6", "ref": "0.2"}


def write_plot(path: Path, sections: list[Section], title: str) -> bool:
    """One panel per model: median / bound per candidate, with launches per update.

    Args:
        path: The PNG to write.
        sections: The models' results.
        title: The figure's title (the device).

    Returns:
        Whether a plot was written (False when matplotlib is missing or nothing was timed).
    """
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("plot skipped: matplotlib is not installed", flush=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, ratios_to_bound(s)) for s in sections if ratios_to_bound(s)]
    if not panels:
        return False
    height = sum(0.28 * len(ratios) + 1.0 for _, ratios in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, height), squeeze=False)
    for ax, (section, ratios) in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in section.rows if r.key in ratios]
        ax.barh(
            range(len(rows)),
            [ratios[r.key] for r in rows],
            color=[FAMILY_COLORS.get(r.family, "0.4") for r in rows],
        )
        for i, row in enumerate(rows):
            launches = section.launches.get(row.key)
            if launches is not None:
                ax.text(ratios[row.key], i, f" {_fmt_count(launches)}", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(section.title, fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[-1, 0].set_xlabel(
        "median update time / bound (log scale, lower is better); text: launches per update"
    )
    fig.suptitle(f"EMA updates relative to one contiguous lerp_: {title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- offloading


def check_offload(device: torch.device) -> bool:
    """``EMA(model, decay, device="cpu", pin_memory=True)`` of a model on ``device``.

    The averages live in pinned host memory and each update is staged through two bounded
    pinned buffers: its bits must equal those of an EMA on the model's device (a NaN step
    included), and the staging must stay within its bound. On the CPU the averages share the
    model's device and no staging happens (the staged path is tested by the test suite).
    """
    from functional_ema._offload import STAGING_BYTES, Staging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.Linear(2048, 64))
    model = model.to(device)
    pin = device.type == "cuda"
    here = fe.EMA(model, fe.tf_warmup(0.999))
    away = fe.EMA(model, fe.tf_warmup(0.999), device="cpu", pin_memory=pin)
    away._staging = Staging(limit=1 << 20)  # several chunks for this 1.2M-parameter model
    for call in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            if call == 3:
                model[2].weight[0, 0] = float("nan")
        model(torch.randn(8, 512, device=device))
        here.update()
        away.update()
    ours = {k: v.cpu() for k, v in here.state_dict().items() if isinstance(v, torch.Tensor)}
    theirs = {k: v for k, v in away.state_dict().items() if isinstance(v, torch.Tensor)}
    same = all(
        torch.equal(
            ours[k].view(-1).view(torch.uint8) if ours[k].is_floating_point() else ours[k],
            theirs[k].view(-1).view(torch.uint8) if theirs[k].is_floating_point() else theirs[k],
        )
        for k in ours
    )
    buffers = away._staging.buffers
    bounded = all(b.numel() <= max(1 << 20, STAGING_BYTES) for b in buffers)
    pinned = all(b.is_pinned() for b in buffers) if pin else not buffers
    on_cpu = all(t.device.type == "cpu" for t in theirs.values())
    passed = same and bounded and pinned and on_cpu
    print(
        f"offloaded averages ({device.type} model, averages on cpu, pinned={pin}): "
        f"bits {'equal' if same else 'DIFFER'}, {len(buffers)} staging buffers "
        f"(pinned: {pinned}, bounded: {bounded}): {'PASS' if passed else 'FAIL'}",
        flush=True,
    )
    return passed


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed rounds per model (default: {CUDA_REPEATS} on CUDA, each model's own on CPU)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(DEFAULT_MODELS),
        help=f"models to time (default: {' '.join(DEFAULT_MODELS)}; 'tiny' is a smoke test)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs", help="folder for the report and the plot"
    )
    parser.add_argument(
        "--no-kernel-replay",
        dest="kernel_replay",
        action="store_false",
        help="skip the TF replay with the compiled kernel forced on (saves its builds)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
            "run on a CUDA machine, or pass --device cpu for the CPU smoke test"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the TF bits, time and count every candidate, write the report and the plot."""
    args = parse_args(argv)
    switch = strategy_switch()
    device = torch.device(args.device)
    begin = time.perf_counter()
    machine = machine_info(device)
    print(
        f"device {machine.get('gpu', machine['cpu'])}, torch {torch.__version__}, "
        f"functional_ema {fe.__version__}",
        flush=True,
    )
    tf_results = check_tf_bits(device, switch, kernel=args.kernel_replay)
    offload_passed = check_offload(device)
    print(f"   TF replays took {time.perf_counter() - begin:.0f} s", flush=True)
    sections = [time_model(key, args, switch) for key in args.models]

    stem = "benchmarks_cuda" if device.type == "cuda" else f"gpu_check_{device.type}"
    plot = args.out / f"{stem}.png"
    if write_plot(plot, sections, f"{machine.get('gpu', machine['cpu'])} ({device.type})"):
        print(f"wrote {plot}")
    else:
        plot = None
    words = [os.path.relpath(sys.executable), os.path.relpath(sys.argv[0])]
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([*words, *(sys.argv[1:] if argv is None else argv)]),
        "seconds": time.perf_counter() - begin,
        "machine": machine,
        "device": device.type,
    }
    report = args.out / f"{stem}.md"
    write_report(report, run, tf_results, sections, plot)
    print(f"wrote {report}\ntotal {run['seconds'] / 60:.1f} min", flush=True)
    if not offload_passed:
        print("FAIL: offloaded averages differ from the on-device EMA (see above)", flush=True)
        return 1
    failed = [r for r in tf_results if not r.passed]
    if failed:
        print(f"FAIL: {len(failed)} TF replays differ from TensorFlow (see above)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
