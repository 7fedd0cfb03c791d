#!/usr/bin/env python
"""Side-by-side benchmark of EMA-of-weights updates: functional_ema against its peers.

Every candidate updates an exponential moving average (decay 0.999) of the same live model,
in one process, timed round-robin (each round visits every candidate once, in a new shuffled
order), so slow drifts of the machine (turbo, other load, page cache) hit all candidates alike.
Before timing, every candidate is checked against a float64 reference EMA, so a candidate that
silently skips work cannot look fast. See benchmarks/README.md for what each number means.

Run from the repository root, after ``bash benchmarks/setup_env.sh``::

    benchmarks/.venv/bin/python benchmarks/bench_ema.py    # everything: about 10 min on 2 cores
    benchmarks/.venv/bin/python benchmarks/bench_ema.py --models small --repeats 5 --out /tmp/b.md

To add a candidate, write a ``build_*`` function returning a ``Runner`` and append a
``Candidate`` to ``CANDIDATES`` (see the functional_ema entries for the pattern).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path


os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's banner lines

import torch
from torch import Tensor, nn

import functional_ema as fe


ROOT = Path(__file__).resolve().parent.parent
DECAY = 0.999
BANK_DECAYS = (0.99, 0.995, 0.999, 0.9999)
MB = 1e6
GB = 1e9


# --------------------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark on."""

    title: str
    build: Callable[[], nn.Module]
    dtype: torch.dtype
    repeats: int  # default timed rounds (each round times every candidate once)


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def _vit_b_16() -> nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


def _small() -> nn.Module:
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(2000)])


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("ResNet-50 (fp32)", _resnet50, torch.float32, 25),
    "vit_b_16": ModelSpec("ViT-B/16 (fp32)", _vit_b_16, torch.float32, 8),
    "small": ModelSpec(
        "2000 x Linear(16,16): 4000 small tensors (fp32)", _small, torch.float32, 20
    ),
    "resnet50_bf16": ModelSpec(
        "ResNet-50 in bfloat16 (fp32 averages where the library allows)",
        _resnet50,
        torch.bfloat16,
        25,
    ),
}
BANK_KEY = "bank"
BANK_REPEATS = 8


# ----------------------------------------------------------------------------------- candidates


@dataclasses.dataclass
class Ctx:
    """What a candidate's builder gets."""

    model: nn.Module  # the live model the candidate averages
    device: torch.device
    model_dtype: torch.dtype
    names: list[str]  # trainable parameter names, in model order

    @property
    def low_precision(self) -> bool:
        """Whether the model is bfloat16 or float16."""
        return self.model_dtype in (torch.bfloat16, torch.float16)

    @property
    def wide(self) -> torch.dtype | None:
        """The averages' dtype for libraries that support a wider one: fp32 for a bf16 model."""
        return torch.float32 if self.low_precision else None


class Runner:
    """One constructed candidate: ``update()`` is what gets timed."""

    shadow_dtype: torch.dtype = torch.float32
    note: str = ""

    def update(self) -> None:
        """One EMA update (the timed call)."""
        raise NotImplementedError

    def averages(self) -> dict[str, Tensor] | None:
        """The averaged trainable parameters by name (None: nothing to check)."""
        return None

    def sync(self) -> None:
        """Called (untimed) before each check update: pull the live params if the runner copies."""

    def stream_bytes(self, ctx: Ctx) -> int:
        """Bytes one update must move: read average + read param + write average, params only."""
        params = dict(ctx.model.named_parameters())
        return sum(
            params[n].numel() * (2 * self.shadow_dtype.itemsize + params[n].element_size())
            for n in ctx.names
        )


class FnRunner(Runner):
    """A runner from plain closures."""

    def __init__(
        self,
        update: Callable[[], object],
        averages: Callable[[], dict[str, Tensor]] | None,
        shadow_dtype: torch.dtype,
        note: str = "",
    ) -> None:
        self._update = update
        self._averages = averages
        self.shadow_dtype = shadow_dtype
        self.note = note

    def update(self) -> None:
        """Call the wrapped update."""
        self._update()

    def averages(self) -> dict[str, Tensor] | None:
        """The averages from the wrapped accessor, if any."""
        return None if self._averages is None else self._averages()


def _named(names: list[str], tensors: Iterable[Tensor]) -> dict[str, Tensor]:
    tensors = list(tensors)
    assert len(tensors) == len(names), (len(tensors), len(names))
    return dict(zip(names, tensors, strict=True))


def _dtype_of(tensors: Iterable[Tensor]) -> torch.dtype:
    return next(iter(tensors)).dtype


# functional_ema ------------------------------------------------------------------------------


def build_fe_adapter(ctx: Ctx) -> Runner:
    """functional_ema's ``EMA`` adapter (fp32 averages for a bf16 model)."""
    ema = fe.EMA(ctx.model, DECAY, dtype=ctx.wide)
    return FnRunner(
        ema.update,
        lambda: ema.state()["params"],
        _dtype_of(ema.state()["params"].values()),
        "`fe.EMA(model, 0.999, dtype=...)`, `ema.update()`",
    )


def flatten(model: nn.Module) -> None:
    """Lay the model's parameters out contiguously (a one-off model setup step, not timed)."""
    fe.flatten_parameters_(model)  # type: ignore[attr-defined]


def build_fe_adapter_flat(ctx: Ctx) -> Runner:
    """The adapter over a model whose parameters were flattened first."""
    # Runs on its own copy of the model, flattened by Candidate.prepare before this.
    runner = build_fe_adapter(ctx)
    runner.note = (
        "`fe.flatten_parameters_(model)` once on its own copy of the model, then the adapter"
    )
    return runner


def build_fe_inplace(ctx: Ctx) -> Runner:
    """``fe.update_`` on an ``fe.init`` state (in place)."""
    # module_state returns views sharing the model's storage, so they are pulled once (as the
    # README's quick start does); the adapter row includes the per-call module walk.
    params, buffers = fe.module_state(ctx.model)
    state = fe.init(params, buffers, dtype=ctx.wide)
    return FnRunner(
        lambda: fe.update_(state, params, DECAY, buffers),
        lambda: state["params"],
        _dtype_of(state["params"].values()),
        "`fe.update_(state, params, 0.999, buffers)`",
    )


def build_fe_pure(ctx: Ctx) -> Runner:
    """``fe.update`` (pure: a new state each call)."""
    params, buffers = fe.module_state(ctx.model)
    box = {"state": fe.init(params, buffers, dtype=ctx.wide)}

    def update() -> None:
        box["state"] = fe.update(box["state"], params, DECAY, buffers)

    return FnRunner(
        update,
        lambda: box["state"]["params"],
        _dtype_of(box["state"]["params"].values()),
        "`state = fe.update(state, params, 0.999, buffers)` (new tensors each call)",
    )


# the seed's loop ------------------------------------------------------------------------------


class SeedEMA(nn.Module):
    """The classic ``EMA(nn.Module)`` snippet this project replaces (kept verbatim in spirit)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.model = model
        self.shadow = copy.deepcopy(model)
        for param in self.shadow.parameters():
            param.detach_()

    @torch.no_grad()
    def update(self) -> None:
        """The forum snippet's update: per-tensor TF-order arithmetic, buffers copied."""
        model_params = OrderedDict(self.model.named_parameters())
        shadow_params = OrderedDict(self.shadow.named_parameters())
        for name, param in model_params.items():
            shadow_params[name].sub_((1.0 - self.decay) * (shadow_params[name] - param))
        model_buffers = OrderedDict(self.model.named_buffers())
        shadow_buffers = OrderedDict(self.shadow.named_buffers())
        for name, buffer in model_buffers.items():
            shadow_buffers[name].copy_(buffer)


def build_seed(ctx: Ctx) -> Runner:
    """The seed's classic loop."""
    ema = SeedEMA(ctx.model, DECAY)
    return FnRunner(
        ema.update,
        lambda: {n: p for n, p in ema.shadow.named_parameters() if n in set(ctx.names)},
        ctx.model_dtype,
        "per-parameter `shadow.sub_((1 - d) * (shadow - param))`, buffers `copy_`",
    )


# peers ----------------------------------------------------------------------------------------


def _timm(ctx: Ctx, foreach: bool, *, wide: bool = True) -> Runner:
    from timm.utils.model_ema import ModelEmaV3

    dtype = ctx.wide if wide else None
    ema = ModelEmaV3(ctx.model, decay=DECAY, foreach=foreach, dtype=dtype)
    names = set(ctx.names)
    note = f"`ModelEmaV3(model, 0.999, foreach={foreach}{', dtype=float32' if dtype else ''})`"
    if ctx.low_precision and not dtype:
        note += ", bf16 average with stochastic rounding (timm's default)"
    return FnRunner(
        lambda: ema.update(ctx.model),
        lambda: {n: p for n, p in ema.module.named_parameters() if n in names},
        dtype or ctx.model_dtype,
        note + "; also lerps float buffers",
    )


def build_timm_foreach(ctx: Ctx) -> Runner:
    """The timm ``ModelEmaV3`` with foreach."""
    return _timm(ctx, True)


def build_timm_loop(ctx: Ctx) -> Runner:
    """The timm ``ModelEmaV3`` without foreach."""
    return _timm(ctx, False)


def build_timm_sr(ctx: Ctx) -> Runner:
    """The timm ``ModelEmaV3`` with its default bf16 stochastic rounding (bf16 model only)."""
    return _timm(ctx, True, wide=False)


def build_averaged_model(ctx: Ctx) -> Runner:
    """``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(ctx.model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    names = set(ctx.names)
    note = "`AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))`"
    if ctx.low_precision:
        note += "; average in the model's dtype (an fp32 copy raises in `_foreach_lerp_`)"
    return FnRunner(
        lambda: ema.update_parameters(ctx.model),
        lambda: {n: p for n, p in ema.module.named_parameters() if n in names},
        ctx.model_dtype,
        note,
    )


def _ema_pytorch(ctx: Ctx, foreach: bool) -> Runner:
    from ema_pytorch import EMA

    kwargs: dict[str, object] = {}
    if ctx.low_precision:
        kwargs = {"ema_model": copy.deepcopy(ctx.model).float(), "coerce_dtype": True}
    # update_after_step=0, update_every=1, min_value=beta: a constant 0.999 every call (its
    # defaults would copy for 100 steps, update every 10th call and warm the decay up).
    ema = EMA(
        ctx.model,
        beta=DECAY,
        update_after_step=0,
        update_every=1,
        min_value=DECAY,
        use_foreach=foreach,
        **kwargs,
    )
    names = set(ctx.names)
    note = f"`EMA(model, beta=0.999, update_after_step=0, update_every=1, use_foreach={foreach})`"
    if ctx.low_precision:
        note += " with an fp32 `ema_model` and `coerce_dtype=True`"
    return FnRunner(
        ema.update,
        lambda: {n: p for n, p in ema.ema_model.named_parameters() if n in names},
        torch.float32 if ctx.low_precision else ctx.model_dtype,
        note,
    )


def build_ema_pytorch(ctx: Ctx) -> Runner:
    """ema_pytorch ``EMA`` (its default per-tensor loop)."""
    return _ema_pytorch(ctx, False)


def build_ema_pytorch_foreach(ctx: Ctx) -> Runner:
    """ema_pytorch ``EMA`` with ``use_foreach=True``."""
    return _ema_pytorch(ctx, True)


def build_torch_ema(ctx: Ctx) -> Runner:
    """torch_ema ``ExponentialMovingAverage``."""
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(ctx.model.parameters(), decay=DECAY, use_num_updates=False)
    note = "`ExponentialMovingAverage(model.parameters(), 0.999, use_num_updates=False)`"
    if ctx.low_precision:
        ema.to(dtype=torch.float32)
        note += " then `.to(dtype=float32)`"
    params = [n for n, _ in ctx.model.named_parameters()]
    return FnRunner(
        ema.update,
        lambda: {n: s for n, s in zip(params, ema.shadow_params, strict=True) if n in ctx.names},
        _dtype_of(ema.shadow_params),
        note + "; parameters only",
    )


def _diffusers(ctx: Ctx, foreach: bool) -> Runner:
    from diffusers.training_utils import EMAModel

    # min_decay=decay: a constant 0.999 (its default is TF-style (1+n)/(10+n) warmup).
    ema = EMAModel(ctx.model.parameters(), decay=DECAY, min_decay=DECAY, foreach=foreach)
    note = f"`EMAModel(model.parameters(), 0.999, min_decay=0.999, foreach={foreach})`"
    if ctx.low_precision:
        ema.to(dtype=torch.float32)
        note += " then `.to(dtype=float32)`"
    params = [n for n, _ in ctx.model.named_parameters()]
    return FnRunner(
        lambda: ema.step(ctx.model.parameters()),
        lambda: {n: s for n, s in zip(params, ema.shadow_params, strict=True) if n in ctx.names},
        _dtype_of(ema.shadow_params),
        note + "; parameters only",
    )


def build_diffusers_foreach(ctx: Ctx) -> Runner:
    """The diffusers ``EMAModel`` with foreach."""
    return _diffusers(ctx, True)


def build_diffusers_loop(ctx: Ctx) -> Runner:
    """The diffusers ``EMAModel`` without foreach."""
    return _diffusers(ctx, False)


# references -----------------------------------------------------------------------------------


class BoundRunner(Runner):
    """One ``lerp_`` over contiguous fp32 buffers with the model's parameter count."""

    note = "one `torch.lerp_(flat_avg, flat_params, 1 - d)` over contiguous fp32 buffers"

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        params = dict(ctx.model.named_parameters())
        self.shapes = [params[n].shape for n in ctx.names]
        self.flat_params = torch.cat([params[n].detach().reshape(-1).float() for n in ctx.names])
        self.flat_avg = self.flat_params.clone()
        self.weight = 1.0 - DECAY

    def update(self) -> None:
        """One ``lerp_`` of the flat average towards the flat params."""
        self.flat_avg.lerp_(self.flat_params, self.weight)

    def sync(self) -> None:
        """Copy the model's current params into the flat buffer."""
        params = dict(self.ctx.model.named_parameters())
        torch.cat(
            [params[n].detach().reshape(-1).float() for n in self.ctx.names], out=self.flat_params
        )

    def averages(self) -> dict[str, Tensor]:
        """Views of the flat average, by parameter name."""
        chunks = self.flat_avg.split([math.prod(s) for s in self.shapes])
        return {n: c.view(s) for n, c, s in zip(self.ctx.names, chunks, self.shapes, strict=True)}

    def stream_bytes(self, ctx: Ctx) -> int:
        """Read average, read params, write average, all fp32."""
        return 3 * 4 * self.flat_avg.numel()


class TriadRunner(Runner):
    """STREAM triad ``a = b + s * c`` over three fp32 buffers with the model's parameter count."""

    note = "`torch.add(b, c, alpha=s, out=a)`, same element count: the machine's bandwidth"

    def __init__(self, numel: int, device: torch.device) -> None:
        self.a = torch.zeros(numel, device=device)
        self.b = torch.rand(numel, device=device)
        self.c = torch.rand(numel, device=device)

    def update(self) -> None:
        """One triad."""
        torch.add(self.b, self.c, alpha=0.5, out=self.a)

    def stream_bytes(self, ctx: Ctx) -> int:
        """Read b, read c, write a."""
        return 3 * 4 * self.a.numel()


def build_bound(ctx: Ctx) -> Runner:
    """The contiguous-lerp bound."""
    return BoundRunner(ctx)


def build_triad(ctx: Ctx) -> Runner:
    """A STREAM triad of the model's parameter count."""
    return TriadRunner(
        sum(p.numel() for n, p in ctx.model.named_parameters() if n in ctx.names), ctx.device
    )


# registry -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A benchmark row. ``family``: 'fe' (this library), 'seed', 'peer' or 'ref' (bound, triad)."""

    key: str
    label: str
    family: str
    build: Callable[[Ctx], Runner]
    own_model: bool = False  # gets a deep copy of the model (for candidates that mutate it)
    prepare: Callable[[nn.Module], None] | None = None  # untimed, unmeasured setup of own_model
    only_low_precision: bool = False  # only on the bf16 model
    enabled: Callable[[], bool] = lambda: True


CANDIDATES: list[Candidate] = [
    Candidate("fe_adapter", "functional_ema adapter", "fe", build_fe_adapter),
    Candidate(
        "fe_adapter_flat",
        "functional_ema adapter (flattened)",
        "fe",
        build_fe_adapter_flat,
        own_model=True,
        prepare=flatten,
        enabled=lambda: hasattr(fe, "flatten_parameters_"),
    ),
    Candidate("fe_inplace", "functional_ema update_ (in-place)", "fe", build_fe_inplace),
    Candidate("fe_pure", "functional_ema update (pure)", "fe", build_fe_pure),
    Candidate("seed", "seed loop (classic EMA snippet)", "seed", build_seed),
    Candidate("timm_foreach", "timm ModelEmaV3 (foreach)", "peer", build_timm_foreach),
    Candidate("timm_loop", "timm ModelEmaV3 (no foreach)", "peer", build_timm_loop),
    Candidate(
        "timm_sr",
        "timm ModelEmaV3 (bf16 + stochastic rounding)",
        "peer",
        build_timm_sr,
        only_low_precision=True,
    ),
    Candidate(
        "averaged_model", "torch AveragedModel (EMA multi_avg_fn)", "peer", build_averaged_model
    ),
    Candidate("ema_pytorch", "ema_pytorch EMA", "peer", build_ema_pytorch),
    Candidate(
        "ema_pytorch_foreach", "ema_pytorch EMA (use_foreach)", "peer", build_ema_pytorch_foreach
    ),
    Candidate("torch_ema", "torch_ema ExponentialMovingAverage", "peer", build_torch_ema),
    Candidate("diffusers_foreach", "diffusers EMAModel (foreach)", "peer", build_diffusers_foreach),
    Candidate("diffusers_loop", "diffusers EMAModel (no foreach)", "peer", build_diffusers_loop),
    Candidate("bound", "bound: contiguous lerp_", "ref", build_bound),
    Candidate("triad", "STREAM triad (same size)", "ref", build_triad),
]


# ---------------------------------------------------------------------------- device & memory


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_allocations(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run ``fn`` under torch's profiler and replay its allocator events (CPU tensors).

    Returns ``(result, peak, net)``: the highest sum of bytes allocated minus freed during the
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
    """``(result, peak extra bytes, net bytes)`` of one call, from the device's allocator."""
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


# ------------------------------------------------------------------------------------- harness


@dataclasses.dataclass
class Row:
    """One row of a results table."""

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
    first_call: float | None = None  # seconds of the warm-start call (includes any compile)
    error: str = ""

    @property
    def median(self) -> float | None:
        """Median seconds of the timed calls."""
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> float | None:
        """Fastest timed call, in seconds."""
        return min(self.times) if self.times else None


def _fail(row: Row, stage: str, exc: BaseException) -> None:
    row.error = (
        f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    )
    print(f"    ! {row.label}: {row.error}", flush=True)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()


def _perturb(models: list[nn.Module], start: dict[str, Tensor], k: int, noise: tuple) -> None:
    """Set every model's trainable params to ``start + 0.5 (a cos k + b sin k)``."""
    a, b = noise
    with torch.no_grad():
        for model in models:
            params = dict(model.named_parameters())
            for name, value in start.items():
                params[name].copy_(value + 0.5 * (a[name] * math.cos(k) + b[name] * math.sin(k)))


def _settle_allocator() -> None:
    """Let the C allocator merge the small blocks the previous candidate freed, untimed.

    glibc merges its lists of freed small blocks at the first large request that follows: about
    1 ms after a candidate that freed tens of thousands of small tensors (the per-tensor peers,
    the pure update). Without this, whichever candidate allocates first pays for the one
    before it; a large request here pays that outside the timed call.
    """
    torch.empty(1 << 16, dtype=torch.uint8)


def _round_robin(
    runners: list[tuple[Row, Runner]], rounds: int, device: torch.device, seed: int, record: bool
) -> None:
    rng = random.Random(seed)
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            order = list(runners)
            rng.shuffle(order)
            for row, runner in order:
                if row.error:
                    continue
                try:
                    sync(device)
                    _settle_allocator()
                    start = time.perf_counter()
                    runner.update()
                    sync(device)
                    elapsed = time.perf_counter() - start
                except Exception as exc:  # a failing candidate is reported, not fatal
                    _fail(row, "update", exc)
                    continue
                if record:
                    row.times.append(elapsed)
            gc.collect()
    finally:
        gc.enable()


def _print_rows(rows: list[Row]) -> None:
    for row in rows:
        if row.median is not None:
            err = "" if row.check_err is None else f" {row.check_err:.1e}"
            print(
                f"   {row.label:60s} median {row.median * 1e3:9.2f} ms  "
                f"min {row.best * 1e3:9.2f} ms  check {row.check_msg}{err}"
            )


def _warm_and_time(
    runners: list[tuple[Row, Runner]], repeats: int, args: argparse.Namespace
) -> None:
    """Warm-up rounds (the first one measures memory, one profiled call each), then timing."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    warmup = args.warmup
    if args.memory:
        for row, runner in runners:
            if row.error:
                continue
            gc.collect()
            try:
                _, row.peak_extra, _ = measure_memory(runner.update, device)
            except Exception as exc:
                _fail(row, "memory", exc)
        warmup -= 1
    _round_robin(runners, max(warmup, 0), device, seed=2, record=False)
    t1 = time.perf_counter()
    _round_robin(runners, repeats, device, seed=3, record=True)
    print(
        f"   warm-up{' + memory' if args.memory else ''} {t1 - t0:.1f}s, "
        f"{repeats} timed rounds {time.perf_counter() - t1:.1f}s",
        flush=True,
    )


def run_model(key: str, spec: ModelSpec, args: argparse.Namespace) -> dict:
    """Build, check, time and measure every candidate on one model."""
    device = torch.device(args.device)
    print(f"\n== {spec.title}", flush=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = spec.build().to(device=device, dtype=spec.dtype).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    numel = sum(p.numel() for n, p in model.named_parameters() if n in names)
    print(f"   built in {time.perf_counter() - t0:.1f}s: {len(names)} tensors, {numel:,} elements")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}

    candidates = [
        c
        for c in CANDIDATES
        if c.enabled()
        and (not c.only_low_precision or spec.dtype in (torch.bfloat16, torch.float16))
        and (not args.candidates or c.key in args.candidates)
    ]
    base_ctx = Ctx(model, device, spec.dtype, names)
    models = [model]
    runners: list[tuple[Row, Runner]] = []
    rows: list[Row] = []
    for cand in candidates:
        row = Row(cand.key, cand.label, cand.family)
        rows.append(row)
        ctx = base_ctx
        try:
            if cand.own_model:
                ctx = Ctx(copy.deepcopy(model), device, spec.dtype, names)
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
            row.shadow = (
                str(runner.shadow_dtype).removeprefix("torch.") if cand.key != "triad" else ""
            )
            row.note = runner.note
            row.stream_bytes = runner.stream_bytes(ctx)
            runners.append((row, runner))
        except Exception as exc:
            _fail(row, "build", exc)
    print(f"   {len(runners)} candidates built in {time.perf_counter() - t0:.1f}s", flush=True)

    # Correctness: one warm-start call at the start values (first calls of AveragedModel,
    # ema_pytorch and diffusers copy), then `check_steps` updates towards known params, against
    # a float64 EMA of the very values the model held.
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    noise = tuple(
        {
            n: torch.randn(v.shape, generator=gen).to(device=device, dtype=torch.float32)
            for n, v in start.items()
        }
        for _ in range(2)
    )
    for row, runner in runners:
        try:
            runner.sync()
            sync(device)
            first = time.perf_counter()
            runner.update()
            sync(device)
            row.first_call = time.perf_counter() - first
        except Exception as exc:
            _fail(row, "warm-start update", exc)
    print(
        "   first calls: "
        + ", ".join(f"{r.key} {r.first_call:.2f}s" for r, _ in runners if r.first_call is not None),
        flush=True,
    )
    reference = {n: v.double() for n, v in start.items()}
    for k in range(1, args.check_steps + 1):
        _perturb(models, start, k, noise)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in names:
                reference[n].mul_(DECAY).add_(params[n].double(), alpha=1.0 - DECAY)
        for row, runner in runners:
            if row.error:
                continue
            try:
                runner.sync()
                runner.update()
            except Exception as exc:
                _fail(row, "check update", exc)
    moved = math.sqrt(
        float(torch.stack([(reference[n] - start[n].double()).square().sum() for n in names]).sum())
    )
    for row, runner in runners:
        if row.error:
            continue
        try:
            averages = runner.averages()
            if averages is None:
                row.check_msg = "n/a"
                continue
            missing = set(names) - set(averages)
            if missing:
                raise KeyError(f"averages lack {sorted(missing)[:3]}")
            err = math.sqrt(
                float(
                    torch.stack(
                        [
                            (averages[n].detach().double() - reference[n]).square().sum()
                            for n in names
                        ]
                    ).sum()
                )
            )
            row.check_err = err / moved
            narrow = runner.shadow_dtype in (torch.bfloat16, torch.float16)
            row.check_tol = 0.5 if narrow else 1e-3
            row.check_msg = "ok" if row.check_err <= row.check_tol else "FAIL"
        except Exception as exc:
            _fail(row, "check", exc)
    print(f"   checked ({args.check_steps} updates) in {time.perf_counter() - t1:.1f}s", flush=True)
    del noise

    # Timing: static params (the work does not depend on the values).
    repeats = args.repeats if args.repeats is not None else spec.repeats
    _warm_and_time(runners, repeats, args)

    _print_rows(rows)
    result = {
        "key": key,
        "title": spec.title,
        "tensors": len(names),
        "numel": numel,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "repeats": repeats,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    del runners, models, model
    gc.collect()
    return result


def run_bank(args: argparse.Namespace) -> dict:
    """K=4 decays: one ``ema_update_bank_`` against K separate ``ema_update_`` calls."""
    device = torch.device(args.device)
    k_size = len(BANK_DECAYS)
    print(f"\n== decay bank, K={k_size}, ResNet-50-sized tree", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = _resnet50().to(device)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    numel = sum(p.numel() for p in params.values())
    start = {n: p.clone() for n, p in params.items()}
    decays = torch.tensor(BANK_DECAYS, dtype=torch.float32, device=device)
    weights = (
        (1.0 - torch.tensor(BANK_DECAYS, dtype=torch.float64)).float().to(device).view(k_size, 1)
    )

    def build_bank() -> Callable[[], None]:
        bank = fe.bank(params, k_size)
        box["bank"] = lambda i, n: bank[n][i]
        return lambda: fe.ema_update_bank_(bank, params, decays)

    def separate(trees: list[dict[str, Tensor]], key: str) -> Callable[[], None]:
        box[key] = lambda i, n: trees[i][n]

        def update() -> None:
            for tree, decay in zip(trees, BANK_DECAYS, strict=True):
                fe.ema_update_(tree, params, decay)

        return update

    def build_separate_init() -> Callable[[], None]:
        return separate([fe.init(params)["params"] for _ in BANK_DECAYS], "separate_init")

    def build_separate_clone() -> Callable[[], None]:
        return separate(
            [{n: p.clone() for n, p in params.items()} for _ in BANK_DECAYS], "separate_clone"
        )

    def build_bound() -> Callable[[], None]:
        flat_params = torch.cat([p.reshape(-1) for p in params.values()])
        flat_avg = flat_params.unsqueeze(0).repeat(k_size, 1)
        box["flat_params"] = flat_params
        sizes = [p.numel() for p in params.values()]
        box["bound"] = lambda i, n: dict(zip(names, flat_avg[i].split(sizes), strict=True))[n]
        return lambda: flat_avg.lerp_(flat_params.expand(k_size, -1), weights)

    box: dict[str, object] = {}
    specs = [
        ("bank", f"fe.ema_update_bank_: one bank of K={k_size} (`fe.bank`)", "fe", build_bank),
        (
            "separate_init",
            f"{k_size} x fe.ema_update_ on `fe.init(params)['params']` trees",
            "fe",
            build_separate_init,
        ),
        (
            "separate_clone",
            f"{k_size} x fe.ema_update_ on per-tensor clones",
            "fe",
            build_separate_clone,
        ),
        ("bound", "bound: one lerp_ over a contiguous (K, N) buffer", "ref", build_bound),
    ]
    params_once = k_size * 2 * 4 * numel + 4 * numel
    runners: list[tuple[Row, Runner]] = []
    for key, label, family, builder in specs:
        row = Row(key, label, family)
        row.stream_bytes = k_size * 3 * 4 * numel if key.startswith("separate") else params_once
        try:
            if args.memory:
                update, _, net = measure_memory(builder, device)
                row.state_bytes = net if key != "bound" else None
            else:
                update = builder()
            runners.append((row, FnRunner(update, None, torch.float32)))
        except Exception as exc:
            _fail(row, "build", exc)
            runners.append((row, FnRunner(lambda: None, None, torch.float32)))

    # Check: every row against a float64 EMA per decay, and the bank against the separate
    # updates bit for bit.
    gen = torch.Generator().manual_seed(1)
    noise = tuple(
        {n: torch.randn(v.shape, generator=gen).to(device) for n, v in start.items()}
        for _ in range(2)
    )
    reference = [{n: v.double() for n, v in start.items()} for _ in BANK_DECAYS]
    for k in range(1, args.check_steps + 1):
        with torch.no_grad():
            for n in names:
                params[n].copy_(
                    start[n] + 0.5 * (noise[0][n] * math.cos(k) + noise[1][n] * math.sin(k))
                )
                value = params[n].double()
                for ref, decay in zip(reference, BANK_DECAYS, strict=True):
                    ref[n].mul_(decay).add_(value, alpha=1.0 - decay)
            if "flat_params" in box:
                torch.cat([params[n].reshape(-1) for n in names], out=box["flat_params"])
        for row, runner in runners:
            if row.error:
                continue
            try:
                runner.update()
            except Exception as exc:
                _fail(row, "check update", exc)
    del noise
    moved = [
        math.sqrt(
            float(torch.stack([(ref[n] - start[n].double()).square().sum() for n in names]).sum())
        )
        for ref in reference
    ]
    for row, _ in runners:
        if row.error:
            continue
        get = box[row.key]
        row.check_err = max(
            math.sqrt(
                float(
                    torch.stack(
                        [
                            (get(i, n).reshape(params[n].shape).double() - reference[i][n])
                            .square()
                            .sum()
                            for n in names
                        ]
                    ).sum()
                )
            )
            / moved[i]
            for i in range(k_size)
        )
        row.check_tol = 1e-3
        row.check_msg = "ok" if row.check_err <= row.check_tol else "FAIL"
    bank_row = runners[0][0]
    if not bank_row.error and "separate_init" in box:
        same = all(
            torch.equal(box["bank"](i, n), box["separate_init"](i, n))
            for i in range(k_size)
            for n in names
        )
        bank_row.check_msg += (
            ", bit-identical to separate" if same else ", NOT bit-identical to separate"
        )

    repeats = args.repeats if args.repeats is not None else BANK_REPEATS
    _warm_and_time(runners, repeats, args)
    _print_rows([row for row, _ in runners])
    return {
        "key": BANK_KEY,
        "title": f"Decay bank: K={k_size} decays {list(BANK_DECAYS)}, ResNet-50-sized fp32 tree",
        "tensors": len(names),
        "numel": numel,
        "repeats": repeats,
        "rows": [row for row, _ in runners],
        "seconds": time.perf_counter() - t0,
    }


def machine_triad(device: torch.device, repeats: int) -> dict:
    """STREAM triad on buffers far larger than any cache: the machine's memory bandwidth."""
    numel = 1 << (28 if device.type == "cuda" else 25)
    runner = TriadRunner(numel, device)
    row = Row("triad", "triad", "ref")
    _round_robin([(row, runner)], 2, device, seed=0, record=False)
    _round_robin([(row, runner)], repeats, device, seed=0, record=True)
    bytes_ = 3 * 4 * numel
    return {
        "numel": numel,
        "median_gbs": bytes_ / row.median / GB,
        "best_gbs": bytes_ / row.best / GB,
        "median_ms": row.median * 1e3,
    }


# ------------------------------------------------------------------------------------- report


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    """The machine, the versions and the commit, for the report's header."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "functional_ema",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (library modified)" if dirty else ""
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "commit": commit,
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "torchvision",
                "functional_ema",
                "optree",
                "timm",
                "ema-pytorch",
                "torch-ema",
                "diffusers",
            )
        },
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _check_cell(row: Row) -> str:
    if row.error:
        return f"**ERROR** ({row.error})"
    if row.check_msg == "n/a" or row.check_err is None:
        return "n/a"
    cell = f"{row.check_msg} ({row.check_err:.1e})"
    return f"**{cell}**" if row.check_msg.startswith("FAIL") else cell


def _mb(value: int | None) -> str:
    return _fmt(None if value is None else value / MB, 1)


def model_table(result: dict) -> tuple[list[str], dict[str, float]]:
    """A model's Markdown table and each candidate's x-bound ratio (for the plot)."""
    rows: list[Row] = result["rows"]
    timed = {r.key: r for r in rows if r.median is not None}
    bound = timed.get("bound")
    peers = [r for r in timed.values() if r.family == "peer" and not r.error]
    # "x fastest peer" compares with the fastest peer keeping averages of the same dtype
    # (bf16 averages move less memory than fp32 ones); all peers when none matches.
    fastest_by_dtype: dict[str, Row] = {}
    for r in peers:
        best = fastest_by_dtype.get(r.shadow)
        if best is None or r.median < best.median:
            fastest_by_dtype[r.shadow] = r
    fastest_any = min(peers, key=lambda r: r.median) if peers else None
    lines = [
        "| candidate | shadow | median ms | min ms | x bound | x own bound | x fastest peer "
        "| GB/s | peak extra MB | state MB | first call ms | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ratios: dict[str, float] = {}
    for r in rows:
        fastest = fastest_by_dtype.get(r.shadow or "float32", fastest_any)
        x_bound = r.median / bound.median if (r.median and bound) else None
        x_peer = r.median / fastest.median if (r.median and fastest) else None
        # Per byte moved: the bound moves 12 bytes per element, a bf16 model with fp32
        # averages 10, bf16 averages 6.
        x_own = None
        if x_bound is not None and r.stream_bytes and bound and bound.stream_bytes:
            x_own = x_bound * bound.stream_bytes / r.stream_bytes
        if x_bound is not None:
            ratios[r.key] = x_bound
        gbs = r.stream_bytes / r.median / GB if r.median else None
        cells = [
            f"**{r.label}**" if r.family == "fe" else r.label,
            r.shadow,
            _fmt(r.median and r.median * 1e3),
            _fmt(r.best and r.best * 1e3),
            _fmt(x_bound),
            _fmt(x_own),
            _fmt(x_peer),
            _fmt(gbs),
            _mb(r.peak_extra),
            _mb(r.state_bytes),
            _fmt(r.first_call and r.first_call * 1e3),
            _check_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for dtype, r in sorted(fastest_by_dtype.items()):
        lines.append(f"Fastest peer with {dtype} averages: {r.label} ({_fmt(r.median * 1e3)} ms).")
    return lines, ratios


def bank_table(result: dict) -> list[str]:
    """The decay-bank Markdown table."""
    rows = {r.key: r for r in result["rows"]}
    bound = rows["bound"]
    lines = [
        "| candidate | median ms | min ms | x bound | GB/s | peak extra MB | state MB | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows.values():
        cells = [
            f"**{r.label}**" if r.key == "bank" else r.label,
            _fmt(r.median and r.median * 1e3),
            _fmt(r.best and r.best * 1e3),
            _fmt(r.median / bound.median if (r.median and bound.median) else None),
            _fmt(r.stream_bytes / r.median / GB if r.median else None),
            _mb(r.peak_extra),
            _mb(r.state_bytes),
            _check_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    bank = rows["bank"]
    for key in ("separate_init", "separate_clone"):
        other = rows.get(key)
        if bank.median and other and other.median:
            speedup = other.median / bank.median
            word = "faster" if speedup >= 1 else "slower"
            lines.append(f"- Bank vs {other.label}: {_fmt(speedup)}x {word} (medians).")
    lines.append(
        "- GB/s counts the params once for the bank and the bound, once per decay for the "
        "separate updates."
    )
    return lines


COLUMNS = """\
Columns: **median / min ms**: one `update()` call over the timed rounds. **x bound**: median /
the bound's median (one `lerp_` over contiguous fp32 buffers of the same element count).
**x own bound**: the same per byte moved (the bound moves 12 bytes per element; a bf16 model
with fp32 averages 10, with bf16 averages 6): equal to x bound for fp32 models.
**x fastest peer**: median / the median of the fastest third-party library (timm, torch
AveragedModel, ema_pytorch, torch_ema, diffusers) keeping averages of the same dtype. **GB/s**:
bytes of the trainable parameters read and written (read average + read params + write average)
/ median. **peak extra MB**: the most memory torch's allocator held during one steady-state
update above what it held when the call started (temporaries; for the pure update also the new
state). **state MB**: memory a candidate keeps from construction (its averages and anything
else it copies). **first call ms**: the first `update()` after construction (includes any
one-off compile or planning). **check**: `||average - ref|| / ||ref - start||` after a
warm-start call and {check_steps} updates towards perturbed params, with ref a float64 EMA of
the values the model held; ok below 1e-3 for fp32 averages (TF's float32 rounding of the decay
alone gives ~1e-5) and below 0.5 for bf16 averages (their rounding alone gives ~0.1-0.2 here;
an average that does not move gives 1.0)."""

CAVEATS = """\
## Caveats

- A small VM is noisy, all the more when other processes compete for its cores (see the load
  average above): compare medians across rows of one table (same run, interleaved), not across
  runs or machines.
- timm ModelEmaV3 also lerps floating buffers (BatchNorm statistics); AveragedModel, the seed
  loop and functional_ema copy them; torch_ema and diffusers ignore them. ResNet-50 has 0.05M
  buffer elements against 25.6M parameters, so this hardly moves the numbers.
- bf16 model: AveragedModel and the seed loop keep bf16 averages (AveragedModel cannot keep an
  fp32 copy of a bf16 model), and timm's default keeps bf16 with stochastic rounding; they move
  6 bytes per element instead of 10. At decay 0.999 a bf16 average of a slowly moving model
  stalls (shared/design/PRIOR_ART.md c.9); this check uses large steps, so it only shows that
  they move.
- The functional update_ / update rows pull `fe.module_state(model)` once (views that see the
  optimizer's in-place steps); the adapter row walks the module on every call.
- On CPU, peak extra memory replays the allocation events torch's profiler records: memory
  outside torch's allocator (Python objects) is not counted. On CUDA it is
  `torch.cuda.max_memory_allocated` around the call.
- Timing uses static params (the work does not depend on the values); the correctness check
  runs before timing on the same objects."""


def write_report(
    path: Path,
    results: list[dict],
    machine: dict,
    triad: dict,
    args: argparse.Namespace,
    command: str,
    seconds: float,
    date: str,
) -> dict[str, dict[str, float]]:
    """Write the Markdown report; return the x-bound ratios per model."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    now = date
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    busy = max(machine["load_start"], machine["load_end"]) > 0.5 * machine["usable_cores"]
    compile_env = os.environ.get("FUNCTIONAL_EMA_COMPILE", "unset")
    out = [
        "# EMA update benchmarks",
        "",
        "Generated by `benchmarks/bench_ema.py`; do not edit by hand (re-run it). How to run it "
        "and what each number means: [benchmarks/README.md](../benchmarks/README.md).",
        "",
        f"- Date: {now}; whole run {seconds / 60:.1f} min.",
        f"- Command: `{command}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} "
        f"usable, torch threads {machine['torch_threads']}), {machine['memory']} RAM{gpu}; "
        f"device `{machine['device']}`; {machine['platform']}, Python {machine['python']}.",
        f"- Versions: {versions}; functional_ema at commit {machine['commit'] or '?'}.",
        f"- Load average (1 min): {machine['load_start']:.2f} at the start, "
        f"{machine['load_end']:.2f} at the end, on {machine['usable_cores']} cores"
        + ("; other processes competed for the cores, so timings are noisier." if busy else "."),
        f"- FUNCTIONAL_EMA_COMPILE={compile_env} (the library's compiled kernel is on unless 0).",
        f"- Machine bandwidth (STREAM triad `a = b + s*c`, 3 x {triad['numel'] * 4 / MB:.0f} MB "
        f"fp32): median {triad['median_gbs']:.2f} GB/s, best {triad['best_gbs']:.2f} GB/s.",
        f"- Decay {DECAY}. Per model: construction, the check, {args.warmup} warm-up round(s) "
        f"({'the first one profiling memory' if args.memory else 'memory not measured'}), then "
        "the timed rounds; each round calls every candidate once in a new random order "
        "(round-robin), with gc off.",
        "",
        COLUMNS.format(check_steps=args.check_steps),
        "",
    ]
    all_ratios: dict[str, dict[str, float]] = {}
    for result in results:
        if result["key"] == BANK_KEY:
            out += [
                f"## {result['title']}",
                "",
                f"{result['tensors']} tensors, {result['numel']:,} elements per average; "
                f"{result['repeats']} timed rounds; section took {result['seconds']:.0f} s.",
                "",
                *bank_table(result),
                "",
            ]
            continue
        lines, ratios = model_table(result)
        all_ratios[result["title"]] = ratios
        notes = [f"- {r.label}: {r.note}" for r in result["rows"] if r.note]
        out += [
            f"## {result['title']}",
            "",
            f"{result['tensors']} trainable tensors, {result['numel']:,} elements; "
            f"{result['repeats']} timed rounds; section took {result['seconds']:.0f} s.",
            "",
            *lines,
            "",
            "<details><summary>How each candidate is called</summary>",
            "",
            *notes,
            "",
            "</details>",
            "",
        ]
    out.append(CAVEATS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return all_ratios


def write_plot(
    path: Path, ratios: dict[str, dict[str, float]], labels: dict[str, str], device: str
) -> None:
    """Grouped bars: per model (group), each candidate's median / the bound's median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    families = {c.key: c.family for c in CANDIDATES}
    keys = [
        c.key for c in CANDIDATES if c.key != "bound" and any(c.key in r for r in ratios.values())
    ]
    groups = list(ratios)
    width = 0.85 / max(len(keys), 1)
    palettes = {
        "fe": plt.get_cmap("Blues"),
        "seed": plt.get_cmap("Greys"),
        "peer": plt.get_cmap("tab20"),
        "ref": plt.get_cmap("Greys"),
    }
    counts = {f: sum(1 for k in keys if families[k] == f) for f in palettes}
    seen = dict.fromkeys(palettes, 0)
    colors: dict[str, object] = {}
    for key in keys:
        family = families[key]
        j = seen[family]
        seen[family] += 1
        if family == "fe":
            colors[key] = palettes["fe"](0.45 + 0.5 * j / max(counts["fe"] - 1, 1))
        elif family == "peer":
            colors[key] = palettes["peer"]((2 + j) % 20)
        else:
            colors[key] = "0.55" if family == "seed" else "0.15"
    fig, ax = plt.subplots(figsize=(max(12, 3.2 * len(groups)), 7.5))
    labelled: set[str] = set()
    for g, name in enumerate(groups):
        present = [k for k in keys if k in ratios[name]]  # no gaps for rows a model lacks
        for i, key in enumerate(present):
            ax.bar(
                g + (i - (len(present) - 1) / 2) * width,
                ratios[name][key],
                width,
                label=None if key in labelled else labels[key],
                color=colors[key],
                edgecolor="black",
                linewidth=0.4,
                hatch="//" if families[key] == "fe" else None,
            )
            labelled.add(key)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else "")
    )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace(" (", "\n(").replace(": ", ":\n") for g in groups], fontsize=9)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("median update time / bound (dashed line = 1; log scale, lower is better)")
    ax.set_title(
        f"EMA update cost relative to one contiguous lerp_ of the same size\n{device}", fontsize=11
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _jsonable(results: list[dict]) -> list[dict]:
    out = []
    for result in results:
        item = dict(result)
        item["rows"] = [
            dataclasses.asdict(r) | {"median": r.median, "best": r.best} for r in result["rows"]
        ]
        out.append(item)
    return out


def _rewrite(args: argparse.Namespace) -> int:
    """Write the report and plot again from ``--from-json`` (e.g. after a presentation fix)."""
    data = json.loads(args.from_json.read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    results = []
    for result in data["results"]:
        rows = [Row(**{k: v for k, v in row.items() if k in fields}) for row in result["rows"]]
        results.append(result | {"rows": rows})
    settings = data.get("settings", {})  # files from before settings were saved: the defaults
    for name in ("warmup", "memory", "check_steps"):
        setattr(args, name, settings.get(name, getattr(args, name)))
    date = data.get("date") or datetime.datetime.fromtimestamp(
        args.from_json.stat().st_mtime, datetime.timezone.utc
    ).strftime("%Y-%m-%d %H:%M UTC")
    machine = data["machine"]
    ratios = write_report(
        args.out, results, machine, data["triad"], args, data["command"], data["seconds"], date
    )
    print(f"wrote {args.out}")
    if not args.no_plot and ratios:
        plot = args.plot or ROOT / "docs" / f"benchmarks_{machine['device'].split(':')[0]}.png"
        labels = {c.key: c.label for c in CANDIDATES}
        write_plot(
            plot, ratios, labels, machine.get("gpu", machine["cpu"]) + f", {machine['device']}"
        )
        print(f"wrote {plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmarks, write the report, the plot and raw JSON."""
    choices = [*MODELS, BANK_KEY]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=choices, default=choices, help="models (and 'bank') to run"
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        choices=[c.key for c in CANDIDATES],
        help="only these candidates (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed rounds for every model (default: per model, "
        + ", ".join(f"{k} {s.repeats}" for k, s in MODELS.items())
        + f", bank {BANK_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds before timing, the first one measuring memory (default 1; the check's "
        "warm-start and check calls come first)",
    )
    parser.add_argument(
        "--check-steps", type=int, default=2, help="updates in the correctness check (default 2)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown report"
    )
    parser.add_argument("--plot", type=Path, help="PNG plot (default docs/benchmarks_<device>.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip memory measurement"
    )
    parser.add_argument(
        "--json", type=Path, help="raw results (default benchmarks/results/<device>.json)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="rewrite the report and plot from a raw-results file of an earlier run (no timing)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return _rewrite(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    begin = time.perf_counter()
    command = " ".join(
        shlex.quote(a)
        for a in [
            os.path.relpath(sys.executable),
            os.path.relpath(sys.argv[0]),
            *(sys.argv[1:] if argv is None else argv),
        ]
    )

    machine = machine_info(device)
    machine["load_start"] = os.getloadavg()[0]
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {torch.__version__}, "
        f"{machine['torch_threads']} threads, device {device}",
        flush=True,
    )
    triad = machine_triad(device, 10)
    print(
        f"machine triad: median {triad['median_gbs']:.2f} GB/s, best {triad['best_gbs']:.2f} GB/s",
        flush=True,
    )

    results = []
    for key in args.models:
        if key == BANK_KEY:
            results.append(run_bank(args))
        else:
            results.append(run_model(key, MODELS[key], args))
    seconds = time.perf_counter() - begin
    machine["load_end"] = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ratios = write_report(args.out, results, machine, triad, args, command, seconds, date)
    print(f"\nwrote {args.out}")
    if not args.no_plot and ratios:
        plot = args.plot or ROOT / "docs" / f"benchmarks_{device.type}.png"
        labels = {c.key: c.label for c in CANDIDATES}
        write_plot(plot, ratios, labels, machine.get("gpu", machine["cpu"]) + f", {device.type}")
        print(f"wrote {plot}")
    raw = args.json or Path(__file__).resolve().parent / "results" / f"{device.type}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(
        json.dumps(
            {
                "machine": machine,
                "triad": triad,
                "results": _jsonable(results),
                "command": command,
                "seconds": seconds,
                "date": date,
                "settings": {
                    "warmup": args.warmup,
                    "memory": args.memory,
                    "check_steps": args.check_steps,
                },
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {raw}\ntotal {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
