"""The in-place update engine: TF-order arithmetic at memory bandwidth, in few launches.

The arithmetic is :func:`_arith.ema_step`'s. What this module adds is how it is evaluated in
place:

- over **contiguous regions**, by a kernel compiled once for every size (``_kernels``): it
  reads ``shadow`` and ``value`` once, writes ``shadow`` once and, with ``nonfinite="skip"``,
  checks each row of values in the same pass; else in eager chunks (no full-size temporary);
- over **many tensors at once**: when a group of leaves are adjacent views of one buffer (the
  layout ``init`` gives averages and :func:`flatten_parameters_` gives a model), the group is one
  region; otherwise runs of values (and of averages laid out elsewhere) are copied into a
  bounded gather buffer by one multi-tensor copy, updated there as one region, and copied back.

Two strategies decide which tensors are updated where they are (:func:`use_strategy`):

- ``"direct"`` (the default on the CPU, where a call costs less than moving data again): a
  contiguous pair of at least ``GATHER_BELOW`` elements is a region of its own (one kernel
  call each); smaller ones are gathered, ``CHUNK`` elements at most per gather.
- ``"batched"`` (the default on accelerators, where each launch costs microseconds of host
  time and the whole update's memory traffic may take less): every value is gathered, in
  chunks of a tenth of the group (between ``BATCH_MIN`` and ``BATCH_MAX`` elements), so an
  update costs O(dtype groups + bytes / chunk) launches whatever the number of tensors, and
  the gather buffer holds at most about a tenth of the averages.

Plans are built once per validated pairing of tensors and can be re-run (the adapter keeps
its plan while the model's tensors stay the same).

Every path takes an optional 0-dim bool ``valid`` on the device (the update's decay and
``dt`` were in range, checked there because the host could not read them): where it is
false, the averages keep every bit, with no host sync.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import os
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, compress, pairwise, repeat
from typing import Any

import torch
from torch import Tensor

from functional_ema._arith import average_leaf, ema_step, ema_step_if_finite_, keep_finite
from functional_ema._compat import (
    any_functorch_wrapped,
    any_lazy,
    foreach_copy_,
    gather_into,
    views_like,
    views_of,
)
from functional_ema._kernels import ROW, compiled


CHUNK = 1 << 20
"""Most elements per chunk of the direct strategy's eager path (4 MiB of float32: stays in
cache). Each region uses at most 1/32 of its size (and at least ``MIN_CHUNK``), so the
temporaries stay a small fraction of the averages. Also the most elements it gathers into one
buffer."""

MIN_CHUNK = 1 << 15

BUSY_CHUNK = 1 << 22
"""The eager path's chunk while a kernel builds in the background (see ``_eager_region_``)."""

GATHER_BELOW = 1 << 16
"""Direct strategy: values smaller than this (in elements) that are not laid out like their
averages are copied into a gather buffer (one multi-tensor copy per run) and updated there as
one region; larger contiguous ones are updated where they are, each by its own kernel call."""

BATCH_MIN = 1 << 20
BATCH_MAX = 1 << 26
"""Batched strategy: the chunk is a tenth of the group's elements, within these bounds (4 to
256 MiB of float32). Values at least a chunk long and contiguous are updated where they are
(there are at most ten of them per group)."""

STRATEGIES = ("auto", "direct", "batched")

_strategy: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "functional_ema_strategy", default=None
)


def _strategy_setting() -> str:
    setting = os.environ.get("FUNCTIONAL_EMA_STRATEGY", "auto").strip().lower() or "auto"
    return setting if setting in STRATEGIES else "auto"


@contextlib.contextmanager
def use_strategy(name: str) -> Iterator[None]:
    """Plans built inside use strategy ``name`` (``"auto"``, ``"direct"`` or ``"batched"``).

    For tests and benchmarks: the results are the same bits either way. ``"auto"`` (the
    default, or ``FUNCTIONAL_EMA_STRATEGY``) picks ``"direct"`` on the CPU and ``"batched"``
    on other devices. The setting is per thread (a context variable).

    Example:
        >>> import torch, functional_ema as fe
        >>> from functional_ema._engine import use_strategy
        >>> state = fe.init({"w": torch.zeros(3)})
        >>> with use_strategy("batched"):
        ...     _ = fe.update_(state, {"w": torch.ones(3)}, 0.5)
        >>> state["params"]["w"]
        tensor([0.5000, 0.5000, 0.5000])
    """
    if name not in STRATEGIES:
        raise ValueError(f"use_strategy: unknown strategy {name!r}: expected one of {STRATEGIES}.")
    token = _strategy.set(name)
    try:
        yield
    finally:
        _strategy.reset(token)


def strategy_setting() -> str:
    """The strategy setting plans are built under now (``"auto"`` or a forced one)."""
    return _strategy.get() or _strategy_setting()


def strategy_for(device: torch.device) -> str:
    """The strategy plans for ``device`` use now: ``"direct"`` or ``"batched"``."""
    name = strategy_setting()
    if name == "auto":
        return "direct" if device.type == "cpu" else "batched"
    return name


def batch_chunk(numel: int) -> int:
    """The batched strategy's chunk for a group of ``numel`` elements."""
    return max(BATCH_MIN, min(BATCH_MAX, numel // 10))


KERNEL_FROM = 1 << 10
"""Regions of at least this many elements use the compiled kernel once it is built (below,
the few eager operations cost less than a kernel call)."""

COMPILE_FROM = 1 << 16
"""Regions of at least this many elements start the kernel's build; smaller ones use it only
once something else built it (a model of small regions never compiles). Per call the kernel
wins from about 1k elements (2 idle CPU cores, float32, best of 9: 4096 elements take 8 us
eager and 6 us compiled, 23 vs 7 us with ``nonfinite="skip"``; 25M elements 6.6 vs 4.1 ms,
22 vs 4.1 ms), but a build costs seconds of CPU (and runs beside the program, see
``_kernels``): below 65536 elements the eager path costs at most 0.13 ms per update, too
little to pay a build back."""


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)

_local = threading.local()

_ALWAYS: dict[torch.device, Tensor] = {}


def _always(device: torch.device) -> Tensor:
    """A 0-dim ``True`` on ``device`` (the kernels' ``valid`` for a host-checked update)."""
    flag = _ALWAYS.get(device)
    if flag is None:
        flag = _ALWAYS[device] = torch.ones((), dtype=torch.bool, device=device)
    return flag


def _lazy(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a lazily negated or conjugated view (its memory is not its value)."""
    return tensor.is_neg() or tensor.is_conj()


def _plain(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is a plain tensor or ``Parameter``, not wrapped by a transform."""
    if not set(map(type, tensors)) <= {Tensor, torch.nn.Parameter}:
        return False
    return not any_functorch_wrapped(tensors)


def _dense(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is strided (not sparse): one pass in C."""
    return set(map(_LAYOUT, tensors)) <= {torch.strided}


def _engine_tensors(tensors: Sequence[Tensor]) -> bool:
    """Plain dense tensors or ``Parameter``s, not wrapped by a transform, not being traced."""
    return not torch.compiler.is_compiling() and _dense(tensors) and _plain(tensors)


def fast_path_ok(*tensors: Tensor) -> bool:
    """Whether the engine may update these tensors in place (grad mode off)."""
    return not torch.is_grad_enabled() and _engine_tensors(tensors)


def pure_path_ok(*tensors: Tensor) -> bool:
    """Whether :func:`updated` may make a pure update of these tensors.

    As :func:`fast_path_ok`, with no autograd graph to record: under grad mode a tensor
    that requires grad takes the per-leaf path, whose result is differentiable.
    """
    if not _engine_tensors(tensors):
        return False
    return not (torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors)))


def all_finite(flags: list[Tensor]) -> Tensor:
    """One 0-dim "all finite" flag from several, on the first one's device (no host sync)."""
    if len(flags) == 1:
        return flags[0]
    return torch.stack([flag.to(flags[0].device) for flag in flags]).all()


def _rows(shadow: Tensor, value: Tensor, out: Tensor | None = None) -> list[tuple[Tensor, ...]]:
    """``shadow`` and ``value`` (1-D, equal length), and ``out`` if given, as kernel inputs.

    Full rows of ``ROW`` elements, then one row with the rest.
    """
    numel = shadow.numel()
    full = numel - numel % ROW
    tensors = (shadow, value) if out is None else (shadow, value, out)
    blocks = []
    if full == numel and full:  # whole rows: no slice
        return [tuple(t.view(-1, ROW) for t in tensors)]
    if full:
        blocks.append(tuple(t[:full].view(-1, ROW) for t in tensors))
    if full < numel:
        blocks.append(tuple(t[full:].view(1, -1) for t in tensors))
    return blocks


def update_bank_leaf_(
    shadow: Tensor, value: Tensor, weight: Tensor, *, mask: bool
) -> list[Tensor] | None:
    """K averages of one value in place: ``shadow`` (K, *shape), ``value`` (*shape).

    ``weight`` holds the K weights, shape (K, 1, ...) in ``shadow``'s dtype. Row ``k`` gets
    exactly TF's update with ``weight[k]``; the value is read once for all K rows of a
    column. Returns the "all finite" flags (with ``mask``), or ``None`` when the kernel is
    not available for these tensors (use the per-leaf path).
    """
    if not (shadow.is_contiguous() and value.is_contiguous()) or shadow.is_complex():
        return None
    if _lazy(shadow) or _lazy(value):
        return None
    # Any size once built: a call costs less than the per-leaf path's operations.
    build = shadow.numel() >= COMPILE_FROM
    kernel = compiled.kernel(shadow, value, mask=mask, bank=True, build=build)
    if kernel is None:
        return None
    size = shadow.shape[0]
    valid = _always(shadow.device)
    # Rows of ROW elements, so that the check of each row of values is read again from the
    # cache by its update; a leaf of another length is one row (read twice: small leaves).
    numel = value.numel()
    row = ROW if numel % ROW == 0 else max(numel, 1)
    out = kernel(
        shadow.view(size, -1, row), value.view(1, -1, row), weight.reshape(size, 1, 1), valid
    )
    return out if mask else []


def scratch(dtype: torch.dtype, device: torch.device, numel: int, slot: str = "tmp") -> Tensor:
    """A reusable per-thread buffer of ``numel`` elements (one per slot, dtype and device)."""
    buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = getattr(_local, "scratch", {})
    _local.scratch = buffers
    key = (slot, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]


def _eager_region_(
    shadow: Tensor,
    value: Tensor,
    weight: float | Tensor,
    *,
    mask: bool,
    valid: Tensor | None = None,
    chunk: int | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    """A region in place without the kernel: chunks through a scratch buffer.

    ``chunk``: elements per chunk (the batched strategy's); by default cache-sized. ``out``:
    the new averages go there, ``shadow`` is only read (each chunk is copied into ``out``
    and updated there while it is in the cache).

    The TF step and the masking of ``_arith``, written into per-thread scratch buffers: no
    allocation per update, no full-size temporary. With ``mask``, returns the 0-dim "all
    finite" flag. With ``valid`` (0-dim bool on the device), each chunk's result is selected
    against its old bits (one chunk-sized temporary), so a false ``valid`` keeps them all.
    """
    numel = shadow.numel()
    busy = False
    if chunk is None:
        # While a kernel builds on another thread, every operation here gives the GIL away
        # and waits to get it back: fewer, larger operations then (up to BUSY_CHUNK, in
        # temporaries freed after the call rather than in the kept scratch buffers).
        chunk = max(MIN_CHUNK, min(CHUNK, numel // 32))
        if chunk < numel and compiled.building():
            chunk, busy = max(chunk, min(numel, BUSY_CHUNK)), True

    def buffer(dtype: torch.dtype, size: int, slot: str) -> Tensor:
        if busy:
            return torch.empty(size, dtype=dtype, device=shadow.device)
        return scratch(dtype, shadow.device, size, slot=slot)

    tmp = buffer(shadow.dtype, min(numel, chunk), "tmp")
    ok_buffer = buffer(torch.bool, min(numel, chunk), "finite") if mask else None
    flags = (
        torch.empty(-(-numel // chunk), dtype=torch.bool, device=shadow.device) if mask else None
    )
    # On the CPU a host read per chunk is cheap: unmasked steps where all values are finite.
    host = shadow.device.type == "cpu" and valid is None and flags is not None
    total = buffer(shadow.dtype, 1, "total")[0] if host else None
    for index, start in enumerate(range(0, numel, chunk)):
        stop = min(start + chunk, numel)
        s, t, v = shadow[start:stop], tmp[: stop - start], value[start:stop]
        if out is not None:
            s = out[start:stop].copy_(s)
        if total is not None and ema_step_if_finite_(s, v, weight, scratch=t, total=total):
            flags[index] = True  # type: ignore[index]  # the common case: same bits
            continue
        if flags is not None and ok_buffer is not None:
            v, finite = keep_finite(s, v, scratch=t, finite=ok_buffer[: stop - start])
            torch.all(finite, out=flags[index])
        if valid is None:
            ema_step(s, v, weight, inplace=True, scratch=t)
        else:
            torch.where(valid, ema_step(s, v, weight, inplace=False, scratch=t), s, out=s)
    return None if flags is None else flags.all()


# --- layouts ---------------------------------------------------------------------------


def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering ``tensors`` if they are adjacent contiguous views of one buffer.

    Empty tensors are ignored. Returns ``None`` for any other layout. A few passes in C
    (``map`` over tensor methods, list comparisons): no Python per tensor.
    """
    parts = list(compress(tensors, map(Tensor.numel, tensors)))
    if not parts:
        return None
    first = parts[0]
    # Adjacency first: it rules out scattered tensors at the cost of two passes.
    starts = list(map(Tensor.data_ptr, parts))
    sizes = list(map(Tensor.numel, parts))
    ends = list(map(operator.add, starts, map(operator.mul, sizes, repeat(first.itemsize))))
    if starts[1:] != ends[:-1]:
        return None
    if not all(map(Tensor.is_contiguous, parts)) or any_lazy(parts):
        return None
    if len(parts) > 1 and (
        set(map(_DTYPE, parts)) != {first.dtype} or set(map(_DEVICE, parts)) != {first.device}
    ):
        return None
    storage = first.untyped_storage()
    if ends[-1] > storage.data_ptr() + storage.nbytes():  # adjacent, yet in another buffer
        return None
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(storage, first.storage_offset(), (sum(sizes),), (1,))


def pack(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Copies of ``tensors`` laid out back to back in one buffer per (device, dtype).

    ``dtype`` (if given) applies to floating and complex tensors. Order is preserved, so
    :func:`flat_view` of the returned views (per group) is one region. A few dispatched
    operations per group (the views in one C++ loop, one multi-tensor copy), however many
    tensors.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, t in enumerate(tensors):
        target = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else None
        groups.setdefault((t.device, target or t.dtype), []).append(index)
    out: list[Tensor | None] = [None] * len(tensors)
    with torch.no_grad():
        for key, indices in groups.items():
            _pack_group(tensors, indices, key, out)
    return out  # type: ignore[return-value]


def _pack_group(
    tensors: Sequence[Tensor],
    indices: list[int],
    key: tuple[torch.device, torch.dtype],
    out: list[Tensor | None],
) -> None:
    """:func:`pack` of one group: the tensors at ``indices`` into one new buffer."""
    device, group_dtype = key
    sources = [tensors[i] for i in indices]
    buffer = torch.empty(sum(t.numel() for t in sources), dtype=group_dtype, device=device)
    views = views_of(buffer, [t.shape for t in sources])
    source = flat_view(sources) if len(sources) > 1 else None
    if source is not None and source.numel() == buffer.numel():
        buffer.copy_(source)  # already one region: one copy
    else:
        foreach_copy_(views, sources)
    for index, view in zip(indices, views, strict=True):
        out[index] = view


# --- plans -----------------------------------------------------------------------------


@dataclass
class _Region:
    """A contiguous 1-D run of averages and the values of the same length that update it.

    ``chunk``: the eager path's chunk (``None``: cache-sized, the direct strategy's).
    ``out``: where the new averages go (a pure update); ``None`` updates ``shadow``.
    """

    shadow: Tensor
    value: Tensor
    chunk: int | None = None
    out: Tensor | None = None
    blocks: list[tuple[Tensor, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = _rows(self.shadow, self.value, self.out)

    def run(
        self, weight: float | Tensor, *, mask: bool, valid: Tensor | None = None
    ) -> list[Tensor]:
        """Update in place; the "all finite" flags with ``mask``.

        ``valid``: a 0-dim bool on the region's device; where false, nothing changes.
        """
        shadow, value = self.shadow, self.value
        kernel = None
        into = self.out is not None
        if shadow.numel() >= KERNEL_FROM:
            build = shadow.numel() >= COMPILE_FROM
            kernel = compiled.kernel(shadow, value, mask=mask, build=build, into=into)
        if kernel is None:
            flag = _eager_region_(
                shadow, value, weight, mask=mask, valid=valid, chunk=self.chunk, out=self.out
            )
            return [] if flag is None else [flag]
        w = weight
        if not isinstance(w, Tensor) or w.dtype != shadow.dtype or w.device != shadow.device:
            w = torch.as_tensor(weight, dtype=shadow.dtype, device=shadow.device)
        ok = _always(shadow.device) if valid is None else valid
        flags: list[Tensor] = []
        for shadow_rows, value_rows, *out_rows in self.blocks:
            found = kernel(shadow_rows, value_rows, w, ok, *out_rows)
            if mask:
                flags.extend(found)
        return flags


@dataclass
class _Gather:
    """A run of values (and of averages, when they are not one region) copied into buffers.

    The values are copied into ``region.value`` (a gather buffer the plan's gathers share),
    updated there as one region against ``region.shadow``, which is a slice of the averages'
    region, or, with ``shadows``, views of a second shared buffer that the averages are
    copied into first and back from after. ``targets``, views of the gather buffer shaped
    like the values, are made on the second run (``None`` until then): a plan run once (a
    functional update) gathers without them, in one operation; a kept plan (the adapter's)
    makes them once and copies through them, which costs less per run.
    """

    values: list[Tensor]
    targets: list[Tensor] | None
    region: _Region
    shadows: list[Tensor] | None = None
    shadow_targets: list[Tensor] | None = None
    runs: int = 0

    @property
    def shadow(self) -> Tensor:
        return self.region.shadow

    def run(
        self, weight: float | Tensor, *, mask: bool, valid: Tensor | None = None
    ) -> list[Tensor]:
        """Copy the values (and averages) in, update the region, copy the averages back."""
        if self.targets is not None:
            foreach_copy_(self.targets, self.values)
        elif not self.runs:
            gather_into(self.region.value, self.values)
        else:
            self.targets = views_of(self.region.value, [v.shape for v in self.values], pad=True)
            foreach_copy_(self.targets, self.values)
        self.runs += 1
        if self.shadows is not None and self.shadow_targets is not None:
            foreach_copy_(self.shadow_targets, self.shadows)
            flags = self.region.run(weight, mask=mask, valid=valid)
            foreach_copy_(self.shadows, self.shadow_targets)
            return flags
        return self.region.run(weight, mask=mask, valid=valid)


@dataclass
class Plan:
    """How to apply one in-place update to validated pairs of tensors.

    ``regions`` update values where they are (one kernel call per region), ``gathers`` copy
    runs of scattered values into a buffer first, ``leaves`` are updated one by one (complex
    dtypes, which the kernels do not take), ``copies`` are copied (``regions_copied``: one
    ``copy_`` each).
    """

    regions: list[_Region] = field(default_factory=list)
    gathers: list[_Gather] = field(default_factory=list)
    leaves: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    copies: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    regions_copied: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _weights: dict[tuple[torch.dtype, torch.device], tuple[float, Tensor]] = field(
        default_factory=dict, repr=False
    )
    _pointers: list[int] = field(default_factory=list, repr=False)

    def merged(self, other: Plan) -> Plan:
        """One plan doing the work of both."""
        return Plan(
            self.regions + other.regions,
            self.gathers + other.gathers,
            self.leaves + other.leaves,
            (self.copies[0] + other.copies[0], self.copies[1] + other.copies[1]),
            self.regions_copied + other.regions_copied,
        ).sealed()

    def _views(self) -> list[Tensor]:
        """The tensors the plan made over memory it does not own, and keeps.

        Views of the averages' and values' storages: their data pointers move if such a
        storage is resized or freed (``untyped_storage().resize_``), whatever the tensors
        passed later look like.
        """
        views: list[Tensor] = []
        for region in self.regions:
            views += [region.shadow, region.value]
        views += [g.region.shadow for g in self.gathers if g.shadows is None]
        for held, current in self.regions_copied:
            views += [held, current]
        return views

    def sealed(self) -> Plan:
        """This plan, its views' data pointers noted for :meth:`intact` (returns ``self``)."""
        self._pointers = list(map(Tensor.data_ptr, self._views()))
        return self

    def intact(self) -> bool:
        """Whether the memory the plan's own views read is where it was when it was sealed.

        A kept plan is checked with this as well as the tensors passed now: a storage
        shrunk or freed in place, then a new tensor made at the old address, keeps the
        passed tensors' pointers and layouts but not the plan's views'.
        """
        return list(map(Tensor.data_ptr, self._views())) == self._pointers

    def run(
        self,
        weight_for: Callable[[torch.dtype], float | Tensor],
        *,
        mask: bool = False,
        valid: Tensor | None = None,
    ) -> list[Tensor]:
        """Apply the update with ``weight_for(dtype)``, TF's weight cast to ``dtype``.

        With ``mask``, non-finite values leave their averages unchanged; returns the 0-dim
        "all finite" flags of the averaged groups (device tensors, not read here). With
        ``valid`` (a 0-dim bool, read on the device only), every average keeps its bits
        where it is false; integer leaves and copied buffers are copied either way.
        """
        flags: list[Tensor] = []
        weights: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        gates: dict[torch.device, Tensor] = {}
        parts: list[_Region | _Gather] = [*self.regions, *self.gathers]
        for part in parts:
            key = (part.shadow.dtype, part.shadow.device)
            if key not in weights:  # one 0-dim weight per dtype and device, for every part
                weights[key] = self._weight(weight_for(key[0]), key)
            gate = None
            if valid is not None:
                gate = gates.get(key[1])
                if gate is None:
                    gate = gates[key[1]] = valid.to(key[1])
            flags.extend(part.run(weights[key], mask=mask, valid=gate))
        for shadow, value in self.leaves:
            average_leaf(
                shadow,
                value,
                weight_for(shadow.dtype),
                inplace=True,
                finite_flags=flags if mask else None,
                valid=valid,
            )
        for held, current in self.regions_copied:
            held.copy_(current)
        if self.copies[0]:
            foreach_copy_(self.copies[0], self.copies[1])
        return flags

    def _weight(self, weight: float | Tensor, key: tuple[torch.dtype, torch.device]) -> Tensor:
        """``weight`` as a 0-dim tensor of ``key``'s dtype and device.

        The tensor made for a Python weight is kept for the next update with the same weight
        (a constant decay): no new tensor, and no host-to-device copy, per update.
        """
        if isinstance(weight, Tensor):
            return torch.as_tensor(weight, dtype=key[0], device=key[1])
        held = self._weights.get(key)
        if held is None or held[0] != weight:
            held = (weight, torch.as_tensor(weight, dtype=key[0], device=key[1]))
            self._weights[key] = held
        return held[1]


class _Buffers:
    """The gather buffers of one plan: one per (role, dtype, device), shared by its gathers.

    Gathers run one after another, so each starts at offset 0 of the same buffer: the
    buffer is as long as the largest gather, not as the sum.
    """

    def __init__(self) -> None:
        self._sizes: dict[tuple[str, torch.dtype, torch.device], int] = {}
        self._made: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def reserve(self, role: str, like: Tensor, numel: int) -> tuple[str, torch.dtype, torch.device]:
        key = (role, like.dtype, like.device)
        self._sizes[key] = max(self._sizes.get(key, 0), numel)
        return key

    def get(self, key: tuple[str, torch.dtype, torch.device]) -> Tensor:
        buffer = self._made.get(key)
        if buffer is None:
            buffer = self._made[key] = torch.empty(self._sizes[key], dtype=key[1], device=key[2])
        return buffer


def _runs(
    pairs: list[tuple[Tensor, Tensor]],
    direct: Callable[[Tensor, Tensor], bool],
    direct_from: int,
    chunk: int,
) -> Iterator[tuple[int, int, bool]]:
    """Split ``pairs`` into ``(start, stop, direct)`` index runs.

    A direct run is one pair of at least ``direct_from`` elements that ``direct`` accepts,
    updated where it is; the others are runs of gathered pairs of at most ``chunk`` elements
    (or one larger pair). Sizes are read in C passes and runs found by bisection: no Python
    per pair.
    """
    numels = list(map(Tensor.numel, (v for _, v in pairs)))
    candidates = [i for i, n in enumerate(numels) if n >= direct_from]
    directs = [i for i in candidates if direct(*pairs[i])]
    bounds = list(accumulate(numels, initial=0))
    start = 0
    for stop in [*directs, len(pairs)]:
        index = start
        while index < stop:
            end = bisect_right(bounds, bounds[index] + chunk, index + 1, stop + 1) - 1
            end = max(end, index + 1)
            yield index, end, False
            index = end
        if stop < len(pairs):
            yield stop, stop + 1, True
        start = stop + 1


def _span(tensor: Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``tensor`` reads (strides are never negative)."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    last = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + (last + 1) * tensor.element_size()


def _aliased(groups: Sequence[tuple[list[Tensor], Tensor | None]], values: list[Tensor]) -> bool:
    """Whether two averages overlap in memory, or a value overlaps an average.

    ``groups``: each group's averages and their region (``None``: laid out by the caller).
    Then the update goes leaf by leaf in the order written (a tied average is moved twice, a
    value that is an average is read after its update), which no gather or grouping would
    reproduce. A region counts as one span of memory; the values' spans are read in C passes
    and compared by bisection (no Python per value but the non-contiguous ones).
    """
    spans = []
    for shadows, region in groups:
        if region is not None:
            spans.append(_span(region))
        else:
            spans += [_span(t) for t in shadows if t.numel()]
    spans.sort()
    if any(later[0] < earlier[1] for earlier, later in pairwise(spans)):
        return True
    values = [v for v in values if v.numel()]
    if not values or not spans:
        return False
    starts = list(map(Tensor.data_ptr, values))
    sizes = map(operator.mul, map(Tensor.numel, values), map(Tensor.element_size, values))
    ends = list(map(operator.add, starts, sizes))
    for index in compress(
        range(len(values)), map(operator.not_, map(Tensor.is_contiguous, values))
    ):
        ends[index] = _span(values[index])[1]
    ordered = sorted(zip(starts, ends, strict=True))
    value_starts = list(map(operator.itemgetter(0), ordered))
    reach = list(accumulate(map(operator.itemgetter(1), ordered), max))  # furthest end so far
    for start, end in spans:  # a value starting before ``end`` and reaching past ``start``
        before = bisect_left(value_starts, end)
        if before and reach[before - 1] > start:
            return True
    return False


def _plan_group(
    plan: Plan,
    pairs: list[tuple[Tensor, Tensor]],
    shadow_flat: Tensor | None,
    buffers: _Buffers,
    strategy: str,
) -> Callable[[], None]:
    """Plan one (device, dtypes) group of non-empty pairs, in their given order.

    ``shadow_flat``: the averages' region (``None``: laid out by the caller). ``strategy``:
    ``"direct"``, ``"batched"`` or ``"whole"`` (one gather of every value: a plan run once,
    by a pure update). Returns what makes the gathers' views once every group has reserved
    its buffers.
    """
    shadows = list(map(_FIRST, pairs))
    values = list(map(_SECOND, pairs))
    offsets = list(accumulate(map(Tensor.numel, shadows), initial=0))
    total = offsets[-1]
    if strategy == "whole":
        chunk = direct_from = total + 1
        eager_chunk = batch_chunk(total)
    elif strategy == "batched":
        chunk = batch_chunk(total)
        direct_from, eager_chunk = chunk, chunk
    else:
        chunk, direct_from, eager_chunk = CHUNK, GATHER_BELOW, None
    if shadow_flat is None and any_lazy(shadows):  # lazy views cannot be copied back into
        plan.leaves.extend(pairs)
        return lambda: None
    value_flat = flat_view(values) if shadow_flat is not None else None
    if shadow_flat is not None and value_flat is not None:
        plan.regions.append(_Region(shadow_flat, value_flat, eager_chunk))
        return lambda: None

    def direct(shadow: Tensor, value: Tensor) -> bool:
        return (
            value.is_contiguous()
            and not _lazy(value)
            and (shadow_flat is not None or (shadow.is_contiguous() and not _lazy(shadow)))
        )

    pending: list[tuple[int, int, tuple[str, torch.dtype, torch.device], object]] = []
    for start, stop, is_direct in _runs(pairs, direct, direct_from, chunk):
        if is_direct:
            shadow = (
                shadow_flat[offsets[start] : offsets[stop]]
                if shadow_flat is not None
                else shadows[start].view(-1)
            )
            plan.regions.append(_Region(shadow, values[start].view(-1), eager_chunk))
            continue
        numel = offsets[stop] - offsets[start]
        value_key = buffers.reserve("value", values[start], numel)
        shadow_key = (
            None if shadow_flat is not None else buffers.reserve("shadow", shadows[start], numel)
        )
        pending.append((start, stop, value_key, shadow_key))

    def make() -> None:
        for start, stop, value_key, shadow_key in pending:
            numel = offsets[stop] - offsets[start]
            value_buffer = buffers.get(value_key)[:numel]
            if shadow_key is None:
                assert shadow_flat is not None
                region = _Region(
                    shadow_flat[offsets[start] : offsets[stop]], value_buffer, eager_chunk
                )
                plan.gathers.append(_Gather(values[start:stop], None, region))
                continue
            targets = views_of(value_buffer, [v.shape for v in values[start:stop]], pad=True)
            shadow_buffer = buffers.get(shadow_key)[:numel]  # type: ignore[arg-type]
            shadow_targets = views_of(shadow_buffer, [s.shape for s in shadows[start:stop]])
            region = _Region(shadow_buffer, value_buffer, eager_chunk)
            plan.gathers.append(
                _Gather(values[start:stop], targets, region, shadows[start:stop], shadow_targets)
            )

    return make


def _groups(
    averaged: Sequence[tuple[Tensor, Tensor]], leaves: list[tuple[Tensor, Tensor]]
) -> dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]]:
    """Non-empty real pairs by (device, shadow dtype, value dtype), in their given order.

    Complex pairs go to ``leaves`` (the engine's kernels are for real floating dtypes).
    Keys and sizes are read in C passes; the common case, one key and no empty pair, makes
    no Python step per pair.
    """
    shadows = list(map(_FIRST, averaged))
    keys = list(
        zip(
            map(_DEVICE, shadows),
            map(_DTYPE, shadows),
            map(_DTYPE, map(_SECOND, averaged)),
            strict=True,
        )
    )
    unique = set(keys)
    if len(unique) == 1 and all(map(Tensor.numel, shadows)):
        key = unique.pop()
        if not key[1].is_complex:
            return {key: list(averaged)}
    groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
    for key, pair in zip(keys, averaged, strict=True):
        if key[1].is_complex:
            leaves.append(pair)
        elif pair[0].numel():
            groups.setdefault(key, []).append(pair)
    return groups


def build_plan(
    averaged: Sequence[tuple[Tensor, Tensor]],
    copied: Sequence[tuple[Tensor, Tensor]],
    *,
    whole: bool = False,
) -> Plan:
    """Group validated ``(shadow, value)`` pairs for :meth:`Plan.run`.

    ``averaged`` pairs are floating (TF-order update), ``copied`` pairs are copied. Pairs are
    grouped by (device, shadow dtype, value dtype) in their given order. A group whose
    averages and values each form one region is one region; otherwise the strategy for the
    device (:func:`strategy_for`) picks the pairs updated where they are, and the rest are
    gathered in runs (averages laid out by the caller are gathered too, and copied back).
    ``whole``: every value of a group is gathered at once (a plan run once, by a pure
    update: a few launches, whatever the device).
    """
    plan = Plan()
    groups = _groups(averaged, plan.leaves)
    regions = {key: flat_view(list(map(_FIRST, pairs))) for key, pairs in groups.items()}
    spans = [(list(map(_FIRST, pairs)), regions[key]) for key, pairs in groups.items()]
    spans.append((list(map(_FIRST, plan.leaves)), None))
    if _aliased(spans, list(map(_SECOND, averaged))):  # one leaf after another, as written
        plan.leaves = list(averaged)
        groups = {}
    buffers = _Buffers()
    makers = [
        _plan_group(plan, pairs, regions[key], buffers, "whole" if whole else strategy_for(key[0]))
        for key, pairs in groups.items()
    ]
    for make in makers:
        make()
    copy_groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
    for shadow, value in copied:
        key = (shadow.device, shadow.dtype, value.dtype)
        copy_groups.setdefault(key, []).append((shadow, value))
    for pairs in copy_groups.values():  # one copy_ where both sides are one region
        held = flat_view([s for s, _ in pairs])
        current = flat_view([v for _, v in pairs]) if held is not None else None
        if held is not None and current is not None:
            plan.regions_copied.append((held, current))
            continue
        plan.copies[0].extend(s for s, _ in pairs)
        plan.copies[1].extend(v for _, v in pairs)
    return plan.sealed()


def updated(
    averaged: Sequence[tuple[Tensor, Tensor]],
    copied: Sequence[tuple[Tensor, Tensor]],
    weight_for: Callable[[torch.dtype], float | Tensor],
    *,
    mask: bool = False,
    valid: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """A pure update: ``(new averages, new copies, flags)``, nothing given is written.

    Check :func:`pure_path_ok` first. Per (device, dtypes) group, by its strategy:

    - batched: the averages are copied into one new buffer and updated there by a plan that
      gathers every value at once: a few dispatched operations per group, however many
      tensors (the new averages are contiguous views of that buffer, :func:`pack`'s layout);
    - direct: each large contiguous pair gets a new tensor that one kernel call writes from
      the average and the value (read once each: no copy first); the others, in order
      across the large ones, are packed in runs of at most ``CHUNK`` elements (so no buffer
      is large enough to be fresh memory from the system, whose first touch costs more than
      the update) and updated there.

    An average that is not contiguous (``channels_last``, transposed) gets a new tensor laid
    out like it, leaf by leaf. ``copied`` pairs give copies of their values (as
    :func:`_arith.copy_leaf`, strides kept). Same bits and flags as :meth:`Plan.run`. The new
    tensors of a group share its buffers, as :func:`init`'s do (save the whole state, or
    ``clone`` a leaf to keep it alone).
    """
    with torch.no_grad():
        new: list[Tensor | None] = [None] * len(averaged)
        plans = [Plan()]
        whole: list[tuple[Tensor, Tensor]] = []
        groups: dict[tuple[Any, ...], list[int]] = {}
        flags: list[Tensor] = []
        for index, (shadow, value) in enumerate(averaged):
            if not shadow.is_contiguous():  # a new tensor laid out like it (channels_last...)
                weight = weight_for(shadow.dtype)
                new[index] = average_leaf(
                    shadow,
                    value,
                    weight,
                    inplace=False,
                    finite_flags=flags if mask else None,
                    valid=valid,
                )
                continue
            groups.setdefault((shadow.device, shadow.dtype, value.dtype), []).append(index)

        def packed(indices: list[int]) -> list[tuple[Tensor, Tensor]]:
            outs = pack([averaged[i][0] for i in indices])
            for i, out in zip(indices, outs, strict=True):
                new[i] = out
            return [(out, averaged[i][1]) for i, out in zip(indices, outs, strict=True)]

        def fresh(indices: list[int]) -> bool:
            """New averages of a run whose averages are one region, computed into one buffer.

            The values are gathered into a per-thread buffer, and one region reads the
            averages where they are and writes the new ones (no copy of the averages first,
            no plan to check: nothing is written in place). ``False``: not one region.
            """
            shadows = [averaged[i][0] for i in indices]
            region = flat_view(shadows)
            if region is None:
                return False
            values = [averaged[i][1] for i in indices]
            out = torch.empty(region.numel(), dtype=region.dtype, device=region.device)
            gathered = scratch(values[0].dtype, region.device, region.numel(), slot="gather")
            gather_into(gathered, values)
            part = Plan(regions=[_Region(region, gathered, out=out)])
            flags.extend(part.run(weight_for, mask=mask, valid=valid))
            views = views_like(out, shadows)
            for i, view in zip(indices, views, strict=True):
                new[i] = view
            return True

        for (device, dtype, _), indices in groups.items():
            if strategy_for(device) == "batched" or dtype.is_complex:
                whole += packed(indices)
                continue
            run: list[int] = []
            size = 0
            for i in indices:
                shadow, value = averaged[i]
                large = value.numel() >= GATHER_BELOW
                if run and size + value.numel() > CHUNK:
                    if not fresh(run):
                        plans.append(build_plan(packed(run), []))
                    run, size = [], 0
                if large and value.is_contiguous() and not (_lazy(value) or _lazy(shadow)):
                    out = torch.empty(shadow.shape, dtype=dtype, device=device)
                    new[i] = out
                    plans[0].regions.append(
                        _Region(shadow.view(-1), value.view(-1), out=out.view(-1))
                    )
                    continue
                run.append(i)
                size += value.numel()
            if run and not fresh(run):
                plans.append(build_plan(packed(run), []))
        if whole:
            plans.append(build_plan(whole, [], whole=True))
        for plan in plans:
            flags += plan.run(weight_for, mask=mask, valid=valid)
        return new, copies([v for _, v in copied]), flags  # type: ignore[return-value]


def copies(values: list[Tensor]) -> list[Tensor]:
    """Copies of ``values``: contiguous ones packed, others cloned (their strides kept)."""
    contiguous = list(map(Tensor.is_contiguous, values))
    if all(contiguous):
        return pack(values)
    packed = iter(pack(list(compress(values, contiguous))))
    return [next(packed) if c else v.clone() for v, c in zip(values, contiguous, strict=True)]
