"""How the benchmark measures: construction, the reference check, memory and timing.

``run_workload`` takes one workload through the same steps for every table: build each
candidate (measuring the memory it keeps), one warm-start call, the correctness check against a
float64 reference EMA (``check_against_reference``), untimed warm-up rounds (the first one
profiling memory), then round-robin timed rounds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import random
import statistics
import time
import traceback
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from functional_ema._kernels import compiled

from _candidates import LOW_PRECISION, Candidate, Ctx, Runner, TriadRunner
from _workloads import Workload


GB = 1e9


# ---------------------------------------------------------------------------- device & memory


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_allocations(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run ``fn`` under torch's profiler and replay its allocator events (CPU tensors).

    Args:
        fn: The call to measure.

    Returns:
        ``(result, peak, net)``: the highest sum of bytes allocated minus freed during the
        call, and that sum at its end. Only memory from torch's allocator is seen (not Python
        objects, not malloc arenas).
    """
    try:  # the low-level API skips building FunctionEvents (seconds for 4000-tensor models)
        from torch._C._profiler import _ExperimentalConfig
        from torch.autograd import _disable_profiler, _enable_profiler, _prepare_profiler
        from torch.autograd.profiler import ProfilerActivity, ProfilerConfig, ProfilerState

        config = ProfilerConfig(
            ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig()
        )
        activities = {ProfilerActivity.CPU}
        _prepare_profiler(config, activities)
        _enable_profiler(config, activities)
        try:
            result = fn()
        finally:
            results = _disable_profiler()
        events = results.events()
    except (ImportError, TypeError, AttributeError):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return result, peak, current


def measure_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, int, int]:
    """Measure one call's memory with the device's allocator.

    Args:
        fn: The call to measure.
        device: Whose allocator to read (CUDA statistics, or torch's profiler on CPU).

    Returns:
        ``(result, peak extra bytes, net bytes)`` of the call.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        sync(device)
        return (
            result,
            torch.cuda.max_memory_allocated(device) - base,
            torch.cuda.memory_allocated(device) - base,
        )
    return _profile_allocations(fn)


def settle_allocator() -> None:
    """Let the C allocator merge the small blocks the previous candidate freed, untimed.

    glibc merges its lists of freed small blocks at the first large request that follows: about
    1 ms after a candidate that freed tens of thousands of small tensors (the per-tensor peers,
    the pure update). Without this, whichever candidate allocates first pays for the one
    before it; a large request here pays that outside the timed call.
    """
    torch.empty(1 << 16, dtype=torch.uint8)


# ------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Row:
    """One row of a results table.

    Attributes:
        key: The candidate's key.
        label: The candidate's label.
        family: The candidate's family.
        shadow: The averages' dtype name ("" for rows without averages).
        note: How the candidate is called.
        times: Seconds of each timed call.
        peak_extra: Peak allocator bytes above the start of one steady-state update.
        state_bytes: Allocator bytes kept from construction (None for reference rows).
        stream_bytes: Bytes one update must move (for GB/s).
        check_err: Relative error against the float64 reference.
        check_tol: The tolerance ``check_err`` was held to.
        check_msg: "ok", "FAIL" or "n/a", with any text a workload's post-check appends.
        first_call: Seconds of the warm-start call (includes any compile).
        error: Where and how the candidate failed ("" when it did not).
    """

    key: str
    label: str
    family: str
    shadow: str = ""
    note: str = ""
    times: list[float] = dataclasses.field(default_factory=list)
    peak_extra: int | None = None
    state_bytes: int | None = None
    stream_bytes: int = 0
    check_err: float | None = None
    check_tol: float | None = None
    check_msg: str = ""
    first_call: float | None = None
    error: str = ""

    @property
    def median(self) -> float | None:
        """Median seconds of the timed calls."""
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> float | None:
        """Fastest timed call, in seconds."""
        return min(self.times) if self.times else None


Pairs = list[tuple[Row, Runner]]


def fail(row: Row, stage: str, exc: BaseException) -> None:
    """Record and print a candidate's failure; ``BENCH_TRACEBACK=1`` prints the traceback."""
    row.error = (
        f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    )
    print(f"    ! {row.label}: {row.error}", flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()


def round_robin(pairs: Pairs, rounds: int, device: torch.device, seed: int, record: bool) -> None:
    """Call every candidate once per round, in a new shuffled order each round, with gc off.

    Args:
        pairs: The rows and their runners; rows with an error are skipped.
        rounds: How many rounds.
        device: Synchronised around each call.
        seed: Seeds the shuffles.
        record: Whether to append each call's seconds to its row's ``times``.
    """
    rng = random.Random(seed)
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            order = list(pairs)
            rng.shuffle(order)
            for row, runner in order:
                if row.error:
                    continue
                try:
                    sync(device)
                    settle_allocator()
                    start = time.perf_counter()
                    runner.update()
                    sync(device)
                    elapsed = time.perf_counter() - start
                except Exception as exc:  # a failing candidate is reported, not fatal
                    fail(row, "update", exc)
                    continue
                if record:
                    row.times.append(elapsed)
            gc.collect()
    finally:
        gc.enable()


def warm_and_time(pairs: Pairs, repeats: int, args: argparse.Namespace) -> None:
    """Warm-up rounds (the first one measures memory, one profiled call each), then timing."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    warmup = args.warmup
    if args.memory:
        for row, runner in pairs:
            if row.error:
                continue
            gc.collect()
            try:
                _, row.peak_extra, _ = measure_memory(runner.update, device)
            except Exception as exc:
                fail(row, "memory", exc)
        warmup -= 1
    round_robin(pairs, max(warmup, 0), device, seed=2, record=False)
    # The library builds its kernels in the background (eager until then): time the
    # steady state, with every kernel the warm-up asked for built and in use.
    if not compiled.wait(timeout=600):
        print("   warning: kernel builds still pending after 600 s", flush=True)
    round_robin(pairs, 1, device, seed=4, record=False)
    t1 = time.perf_counter()
    round_robin(pairs, repeats, device, seed=3, record=True)
    print(
        f"   warm-up{' + memory' if args.memory else ''} {t1 - t0:.1f}s, "
        f"{repeats} timed rounds {time.perf_counter() - t1:.1f}s",
        flush=True,
    )


def machine_triad(device: torch.device, repeats: int) -> dict:
    """STREAM triad on buffers far larger than any cache: the machine's memory bandwidth."""
    numel = 1 << (28 if device.type == "cuda" else 25)
    pair = (Row("triad", "triad", "ref"), TriadRunner(numel, device))
    round_robin([pair], 2, device, seed=0, record=False)
    round_robin([pair], repeats, device, seed=0, record=True)
    row, bytes_ = pair[0], 3 * 4 * numel
    return {
        "numel": numel,
        "median_gbs": bytes_ / row.median / GB,
        "best_gbs": bytes_ / row.best / GB,
        "median_ms": row.median * 1e3,
    }


# ----------------------------------------------------------------------------- the reference


def _norms(tensors: dict[str, Tensor], reference: dict[str, Tensor]) -> Tensor:
    """Per decay (row of ``reference``): the L2 norm of ``tensors - reference`` over all names.

    A tensor of one parameter's shape counts against every decay; one with a leading dimension
    of K, decay by decay.
    """
    squares = [
        (tensors[n].detach().reshape(-1, ref.shape[1]).double() - ref).square().sum(dim=1)
        for n, ref in reference.items()
    ]
    return torch.stack(squares).sum(dim=0).sqrt()


def check_against_reference(
    pairs: Pairs,
    models: Sequence[nn.Module],
    start: dict[str, Tensor],
    decays: Sequence[float],
    steps: int,
) -> None:
    """Score every candidate against a float64 EMA of the values the model held.

    Each step sets every model's trainable params to ``start + 0.5 (a cos k + b sin k)``
    (fixed Gaussian ``a``, ``b``), advances the float64 reference of each decay, and calls
    every candidate once (after its ``sync()``). A row's ``check_err`` is then, maximised over
    the decays, ``||average - ref|| / ||ref - start||`` over all trainable parameters: a
    candidate that skipped its work scores about 1.0. The tolerance is 0.5 for bf16/fp16
    averages (their rounding alone gives 0.1-0.2) and 1e-3 otherwise.

    Args:
        pairs: The rows and their runners, all called at ``start`` once already.
        models: Every model a candidate reads (the first is the reference's).
        start: The trainable params' values at construction, by name.
        decays: One reference per decay; ``averages()`` has them on a leading dimension.
        steps: Updates towards perturbed params.
    """
    device = next(iter(start.values())).device
    gen = torch.Generator().manual_seed(1)
    a, b = (
        {
            n: torch.randn(v.shape, generator=gen).to(device=device, dtype=torch.float32)
            for n, v in start.items()
        }
        for _ in range(2)
    )
    reference = {n: v.double().reshape(1, -1).repeat(len(decays), 1) for n, v in start.items()}
    for k in range(1, steps + 1):
        with torch.no_grad():
            for model in models:
                params = dict(model.named_parameters())
                for n, value in start.items():
                    params[n].copy_(value + 0.5 * (a[n] * math.cos(k) + b[n] * math.sin(k)))
            params = dict(models[0].named_parameters())
            for n, ref in reference.items():
                value = params[n].double().reshape(-1)
                for i, decay in enumerate(decays):
                    ref[i].mul_(decay).add_(value, alpha=1.0 - decay)
        for row, runner in pairs:
            if row.error:
                continue
            try:
                runner.sync()
                runner.update()
            except Exception as exc:
                fail(row, "check update", exc)
    del a, b
    moved = _norms(start, reference)
    for row, runner in pairs:
        if row.error:
            continue
        try:
            averages = runner.averages()
            if averages is None:
                row.check_msg = "n/a"
                continue
            missing = set(start) - set(averages)
            if missing:
                raise KeyError(f"averages lack {sorted(missing)[:3]}")
            row.check_err = float((_norms(averages, reference) / moved).max())
            row.check_tol = 0.5 if runner.shadow_dtype in LOW_PRECISION else 1e-3
            row.check_msg = "ok" if row.check_err <= row.check_tol else "FAIL"
        except Exception as exc:
            fail(row, "check", exc)


# ------------------------------------------------------------------------------------ the run


def print_rows(rows: list[Row]) -> None:
    """One console line per timed row."""
    for row in rows:
        if row.median is not None:
            err = "" if row.check_err is None else f" {row.check_err:.1e}"
            print(
                f"   {row.label:60s} median {row.median * 1e3:9.2f} ms  "
                f"min {row.best * 1e3:9.2f} ms  check {row.check_msg}{err}"
            )


def _build(
    candidates: list[Candidate], base: Ctx, models: list[nn.Module], args: argparse.Namespace
) -> tuple[list[Row], Pairs]:
    """Construct every candidate, measuring the memory it keeps; a failure becomes its row's."""
    device = base.device
    rows: list[Row] = []
    pairs: Pairs = []
    for cand in candidates:
        row = Row(cand.key, cand.label, cand.family)
        rows.append(row)
        ctx = base
        try:
            if cand.own_model:
                ctx = dataclasses.replace(base, model=copy.deepcopy(base.model))
                models.append(ctx.model)
                if cand.prepare is not None:
                    cand.prepare(ctx.model)
            sync(device)
            if args.memory:
                runner, _, net = measure_memory(lambda ctx=ctx, cand=cand: cand.build(ctx), device)
                row.state_bytes = net if cand.family != "ref" else None
            else:
                runner = cand.build(ctx)
            assert isinstance(runner, Runner)
            row.shadow = "" if runner.shadow_dtype is None else str(runner.shadow_dtype)
            row.shadow = row.shadow.removeprefix("torch.")
            row.note = runner.note
            row.stream_bytes = runner.stream_bytes(ctx)
            pairs.append((row, runner))
        except Exception as exc:
            fail(row, "build", exc)
    return rows, pairs


def _warm_start(pairs: Pairs, device: torch.device) -> None:
    """One call per candidate at the start values (AveragedModel, ema_pytorch, diffusers copy)."""
    for row, runner in pairs:
        try:
            runner.sync()
            sync(device)
            first = time.perf_counter()
            runner.update()
            sync(device)
            row.first_call = time.perf_counter() - first
        except Exception as exc:
            fail(row, "warm-start update", exc)
    print(
        "   first calls: "
        + ", ".join(f"{r.key} {r.first_call:.2f}s" for r, _ in pairs if r.first_call is not None),
        flush=True,
    )


def run_workload(workload: Workload, candidates: list[Candidate], args: argparse.Namespace) -> dict:
    """Build, check, time and measure the candidates on one workload.

    Args:
        workload: The model, its decays and its post-check.
        candidates: The rows to run, in table order (see ``Workload.rows``).
        args: The command line: device, memory, check steps, warm-up and timed rounds.

    Returns:
        The section of the report: key, title, tensors, numel, dtype, repeats, rows, seconds.
    """
    device = torch.device(args.device)
    spec = workload.spec
    print(f"\n== {spec.title}", flush=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = spec.build().to(device=device, dtype=spec.dtype).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    base = Ctx(model, device, spec.dtype, names)
    start = {n: p.clone() for n, p in base.params().items()}
    numel = sum(v.numel() for v in start.values())
    print(f"   built in {time.perf_counter() - t0:.1f}s: {len(names)} tensors, {numel:,} elements")

    models = [model]
    rows, pairs = _build(candidates, base, models, args)
    print(f"   {len(pairs)} candidates built in {time.perf_counter() - t0:.1f}s", flush=True)

    t1 = time.perf_counter()
    _warm_start(pairs, device)
    check_against_reference(pairs, models, start, workload.decays, args.check_steps)
    if workload.post_check is not None:
        ok = {row.key: (row, runner) for row, runner in pairs if not row.error}
        for key, text in workload.post_check({k: r for k, (_, r) in ok.items()}).items():
            ok[key][0].check_msg += text
    print(f"   checked ({args.check_steps} updates) in {time.perf_counter() - t1:.1f}s", flush=True)

    # Timing: static params (the work does not depend on the values).
    repeats = args.repeats if args.repeats is not None else spec.repeats
    warm_and_time(pairs, repeats, args)
    print_rows(rows)
    result = {
        "key": workload.key,
        "title": spec.title,
        "tensors": len(names),
        "numel": numel,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "repeats": repeats,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    del pairs, models, model, base, start
    gc.collect()
    return result
