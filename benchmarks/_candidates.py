"""The benchmark's rows: what each candidate builds and calls, and the registry ``CANDIDATES``.

A candidate is a ``Candidate(key, label, family, build)``: ``build(ctx)`` constructs it on the
model in ``ctx`` and returns a ``Runner``, whose ``update()`` is the timed call and whose
``averages()`` the correctness check reads. Every candidate is set up for a constant decay of
``DECAY`` on every call, so all of them do the same work.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

import functional_ema as fe


DECAY = 0.999
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Ctx:
    """What a candidate's builder gets.

    Attributes:
        model: The live model the candidate averages.
        device: Where the model and the averages live.
        model_dtype: The model's parameter dtype.
        names: Trainable parameter names, in model order.
    """

    model: nn.Module
    device: torch.device
    model_dtype: torch.dtype
    names: list[str]

    @property
    def low_precision(self) -> bool:
        """Whether the model is bfloat16 or float16."""
        return self.model_dtype in LOW_PRECISION

    @property
    def wide(self) -> torch.dtype | None:
        """The averages' dtype for libraries that support a wider one: fp32 for a bf16 model."""
        return torch.float32 if self.low_precision else None

    def params(self) -> dict[str, Tensor]:
        """The trainable parameters by name, detached (views of the model's storage)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}


class Runner:
    """One constructed candidate: ``update()`` is what gets timed.

    Attributes:
        shadow_dtype: The averages' dtype (None: the row keeps no averages, like the triad).
        note: How the candidate is called, for the report.
    """

    shadow_dtype: torch.dtype | None = torch.float32
    note: str = ""

    def update(self) -> None:
        """One EMA update (the timed call)."""
        raise NotImplementedError

    def averages(self) -> dict[str, Tensor] | None:
        """The averaged trainable parameters by name (None: nothing to check).

        For a workload with K decays each tensor has a leading dimension of K, one average per
        decay in the workload's order.
        """
        return None

    def sync(self) -> None:
        """Called (untimed) before each check update: pull the live params if the runner copies."""

    def stream_bytes(self, ctx: Ctx) -> int:
        """Bytes one update must move: read average + read param + write average, params only.

        Args:
            ctx: The context the runner was built with.

        Returns:
            The byte count the GB/s column divides by the median.
        """
        shadow = self.shadow_dtype or ctx.model_dtype
        params = ctx.params()
        return sum(p.numel() * (2 * shadow.itemsize + p.element_size()) for p in params.values())


class FnRunner(Runner):
    """A runner from plain closures.

    Args:
        update: The timed call.
        averages: Returns the averages by name (None: nothing to check).
        shadow_dtype: The averages' dtype.
        note: How the candidate is called, for the report.
        bytes_moved: Bytes one update moves, where the default count of ``stream_bytes`` does
            not fit.
    """

    def __init__(
        self,
        update: Callable[[], object],
        averages: Callable[[], dict[str, Tensor]] | None,
        shadow_dtype: torch.dtype,
        note: str = "",
        bytes_moved: int | None = None,
    ) -> None:
        self._update = update
        self._averages = averages
        self.shadow_dtype = shadow_dtype
        self.note = note
        self._bytes_moved = bytes_moved

    def update(self) -> None:
        """Call the wrapped update."""
        self._update()

    def averages(self) -> dict[str, Tensor] | None:
        """The averages from the wrapped accessor, if any."""
        return None if self._averages is None else self._averages()

    def stream_bytes(self, ctx: Ctx) -> int:
        """``bytes_moved`` when given, else the default count."""
        return super().stream_bytes(ctx) if self._bytes_moved is None else self._bytes_moved


def dtype_of(tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype of the first tensor."""
    return next(iter(tensors)).dtype


def _named_params(module: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """``module``'s parameters whose names are in ``names``."""
    keep = set(names)
    return {n: p for n, p in module.named_parameters() if n in keep}


# functional_ema ------------------------------------------------------------------------------


def build_fe_adapter(ctx: Ctx) -> Runner:
    """The functional_ema ``EMA`` adapter (fp32 averages for a bf16 model)."""
    ema = fe.EMA(ctx.model, DECAY, dtype=ctx.wide)
    return FnRunner(
        ema.update,
        lambda: ema.state()["params"],
        dtype_of(ema.state()["params"].values()),
        "`fe.EMA(model, 0.999, dtype=...)`, `ema.update()`",
    )


def flatten(model: nn.Module) -> None:
    """Lay the model's parameters out contiguously (a one-off model setup step, not timed)."""
    fe.flatten_parameters_(model)


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
    # module_state returns views of the model's storage, so they are pulled once (as the
    # README's quick start does); the adapter row includes the per-call module walk.
    params, buffers = fe.module_state(ctx.model)
    state = fe.init(params, buffers, dtype=ctx.wide)
    return FnRunner(
        lambda: fe.update_(state, params, DECAY, buffers),
        lambda: state["params"],
        dtype_of(state["params"].values()),
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
        dtype_of(box["state"]["params"].values()),
        "`state = fe.update(state, params, 0.999, buffers)` (new tensors each call)",
    )


# the seed's loop ------------------------------------------------------------------------------


class SeedEMA(nn.Module):
    """The classic ``EMA(nn.Module)`` snippet this project replaces (kept verbatim in spirit).

    Args:
        model: The live model.
        decay: The constant decay.
    """

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
        lambda: _named_params(ema.shadow, ctx.names),
        ctx.model_dtype,
        "per-parameter `shadow.sub_((1 - d) * (shadow - param))`, buffers `copy_`",
    )


# peers ----------------------------------------------------------------------------------------


def _timm(ctx: Ctx, foreach: bool, *, wide: bool = True) -> Runner:
    from timm.utils.model_ema import ModelEmaV3

    dtype = ctx.wide if wide else None
    ema = ModelEmaV3(ctx.model, decay=DECAY, foreach=foreach, dtype=dtype)
    note = f"`ModelEmaV3(model, 0.999, foreach={foreach}{', dtype=float32' if dtype else ''})`"
    if ctx.low_precision and not dtype:
        note += ", bf16 average with stochastic rounding (timm's default)"
    return FnRunner(
        lambda: ema.update(ctx.model),
        lambda: _named_params(ema.module, ctx.names),
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
    note = "`AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))`"
    if ctx.low_precision:
        note += "; average in the model's dtype (an fp32 copy raises in `_foreach_lerp_`)"
    return FnRunner(
        lambda: ema.update_parameters(ctx.model),
        lambda: _named_params(ema.module, ctx.names),
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
    note = f"`EMA(model, beta=0.999, update_after_step=0, update_every=1, use_foreach={foreach})`"
    if ctx.low_precision:
        note += " with an fp32 `ema_model` and `coerce_dtype=True`"
    return FnRunner(
        ema.update,
        lambda: _named_params(ema.ema_model, ctx.names),
        torch.float32 if ctx.low_precision else ctx.model_dtype,
        note,
    )


def build_ema_pytorch(ctx: Ctx) -> Runner:
    """The ema_pytorch ``EMA`` (its default per-tensor loop)."""
    return _ema_pytorch(ctx, False)


def build_ema_pytorch_foreach(ctx: Ctx) -> Runner:
    """The ema_pytorch ``EMA`` with ``use_foreach=True``."""
    return _ema_pytorch(ctx, True)


def _shadow_params(ctx: Ctx, shadows: list[Tensor]) -> dict[str, Tensor]:
    """Name the ``shadow_params`` list of torch_ema and diffusers (one per model parameter)."""
    names = [n for n, _ in ctx.model.named_parameters()]
    keep = set(ctx.names)
    return {n: s for n, s in zip(names, shadows, strict=True) if n in keep}


def build_torch_ema(ctx: Ctx) -> Runner:
    """The torch_ema ``ExponentialMovingAverage``."""
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(ctx.model.parameters(), decay=DECAY, use_num_updates=False)
    note = "`ExponentialMovingAverage(model.parameters(), 0.999, use_num_updates=False)`"
    if ctx.low_precision:
        ema.to(dtype=torch.float32)
        note += " then `.to(dtype=float32)`"
    return FnRunner(
        ema.update,
        lambda: _shadow_params(ctx, ema.shadow_params),
        dtype_of(ema.shadow_params),
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
    return FnRunner(
        lambda: ema.step(ctx.model.parameters()),
        lambda: _shadow_params(ctx, ema.shadow_params),
        dtype_of(ema.shadow_params),
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
    """One ``lerp_`` over contiguous fp32 buffers with the model's parameter count.

    Args:
        ctx: The model whose trainable parameters the flat buffers hold.
    """

    note = "one `torch.lerp_(flat_avg, flat_params, 1 - d)` over contiguous fp32 buffers"

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        params = ctx.params()
        self.shapes = [p.shape for p in params.values()]
        self.flat_params = torch.cat([p.reshape(-1).float() for p in params.values()])
        self.flat_avg = self.flat_params.clone()
        self.weight = 1.0 - DECAY

    def update(self) -> None:
        """One ``lerp_`` of the flat average towards the flat params."""
        self.flat_avg.lerp_(self.flat_params, self.weight)

    def sync(self) -> None:
        """Copy the model's current params into the flat buffer."""
        params = self.ctx.params()
        torch.cat([p.reshape(-1).float() for p in params.values()], out=self.flat_params)

    def averages(self) -> dict[str, Tensor]:
        """Views of the flat average, by parameter name."""
        chunks = self.flat_avg.split([math.prod(s) for s in self.shapes])
        return {n: c.view(s) for n, c, s in zip(self.ctx.names, chunks, self.shapes, strict=True)}

    def stream_bytes(self, ctx: Ctx) -> int:
        """Read average, read params, write average, all fp32."""
        return 3 * 4 * self.flat_avg.numel()


class TriadRunner(Runner):
    """STREAM triad ``a = b + s * c`` over three fp32 buffers.

    Args:
        numel: Elements per buffer.
        device: Where the buffers live.
    """

    shadow_dtype = None
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


class ForeachLerpRunner(Runner):
    """Bare ``torch._foreach_lerp`` over per-tensor copies of the trainable params.

    No library around it: the floor for a model whose parameters are separate tensors. The
    averages are fp32 copies of an fp32 model's params; for a bf16/fp16 model they keep the
    model's dtype, since ``_foreach_lerp`` needs matching dtypes (as ``AveragedModel``).

    Args:
        ctx: The model whose trainable parameters are averaged.
        inplace: ``_foreach_lerp_`` into the held list (True), or ``_foreach_lerp`` making new
            tensors that replace the held list each call (False: what the pure ``fe.update``
            is judged against).
    """

    def __init__(self, ctx: Ctx, *, inplace: bool) -> None:
        self.names = list(ctx.names)
        params = ctx.params()  # views of the model's storage: no sync() needed
        self.params = [params[n] for n in self.names]
        self.avgs = [p.clone() for p in self.params]
        self.weight = 1.0 - DECAY
        self.inplace = inplace
        self.shadow_dtype = ctx.model_dtype
        call = (
            "torch._foreach_lerp_(avgs, params, 1 - d)"
            if inplace
            else "avgs = torch._foreach_lerp(avgs, params, 1 - d)"
        )
        self.note = f"`{call}` over per-tensor copies of the params, no library"
        if ctx.low_precision:
            self.note += "; average in the model's dtype (`_foreach_lerp` needs matching dtypes)"

    def update(self) -> None:
        """One multi-tensor lerp of the averages towards the params."""
        if self.inplace:
            torch._foreach_lerp_(self.avgs, self.params, self.weight)
        else:
            self.avgs = list(torch._foreach_lerp(self.avgs, self.params, self.weight))

    def averages(self) -> dict[str, Tensor]:
        """The held averages, by parameter name."""
        return dict(zip(self.names, self.avgs, strict=True))


def build_bound(ctx: Ctx) -> Runner:
    """The contiguous-lerp bound."""
    return BoundRunner(ctx)


def build_foreach_lerp_inplace(ctx: Ctx) -> Runner:
    """Bare in-place ``torch._foreach_lerp_``: the floor for an unflattened model."""
    return ForeachLerpRunner(ctx, inplace=True)


def build_foreach_lerp(ctx: Ctx) -> Runner:
    """Bare out-of-place ``torch._foreach_lerp``: the reference for the pure ``fe.update``."""
    return ForeachLerpRunner(ctx, inplace=False)


def build_triad(ctx: Ctx) -> Runner:
    """A STREAM triad of the model's parameter count."""
    return TriadRunner(sum(p.numel() for p in ctx.params().values()), ctx.device)


# registry -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A benchmark row.

    Attributes:
        key: Its name on the command line and in the JSON.
        label: Its name in the tables and the plot.
        family: ``fe`` (this library), ``seed``, ``peer`` (counts for "x fastest peer") or
            ``ref`` (bound, bare ``_foreach_lerp``, triad).
        build: Constructs the candidate on ``ctx.model``; measured for state memory.
        own_model: Whether it gets a deep copy of the model (for candidates that mutate it).
        prepare: Untimed, unmeasured setup of the ``own_model`` copy.
        only_low_precision: Whether it runs on bf16/fp16 models only.
    """

    key: str
    label: str
    family: str
    build: Callable[[Ctx], Runner]
    own_model: bool = False
    prepare: Callable[[nn.Module], None] | None = None
    only_low_precision: bool = False


CANDIDATES: list[Candidate] = [
    Candidate("fe_adapter", "functional_ema adapter", "fe", build_fe_adapter),
    Candidate(
        "fe_adapter_flat",
        "functional_ema adapter (flattened)",
        "fe",
        build_fe_adapter_flat,
        own_model=True,
        prepare=flatten,
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
    Candidate(
        "foreach_lerp_", "ref: torch._foreach_lerp_ (in place)", "ref", build_foreach_lerp_inplace
    ),
    Candidate("foreach_lerp", "ref: torch._foreach_lerp (new tensors)", "ref", build_foreach_lerp),
    Candidate("triad", "STREAM triad (same size)", "ref", build_triad),
]
