"""The in-place update engine: TF-order arithmetic at memory bandwidth.

The arithmetic is :func:`_arith.ema_step`'s. What this module adds is how it is evaluated in
place:

- over **contiguous regions**, by a kernel compiled once for every size (``_kernels``): it
  reads ``shadow`` and ``value`` once, writes ``shadow`` once and, with ``nonfinite="skip"``,
  checks each row of values in the same pass; else in cache-sized eager chunks (no
  full-size temporary);
- over **many tensors at once**: when a group of leaves are adjacent views of one buffer (the
  layout ``init`` gives averages and :func:`flatten_parameters_` gives a model), the group is one
  region; otherwise large values are regions of their own against their slice of the averages
  and runs of small ones are copied into a gather buffer first (one multi-tensor copy).

Plans are built once per validated pairing of tensors and can be re-run (the adapter caches
its plan while the model's tensors stay the same).

Every path takes an optional 0-dim bool ``valid`` on the device (the update's decay and
``dt`` were in range, checked there because the host could not read them): where it is
false, the averages keep every bit, with no host sync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from functional_ema._arith import average_leaf, ema_step, keep_finite
from functional_ema._compat import foreach_copy_, is_functorch_wrapped
from functional_ema._kernels import ROW, compiled


CHUNK = 1 << 20
"""Most elements per chunk of the eager path (4 MiB of float32: stays in cache). Each
region uses at most 1/32 of its size (and at least ``MIN_CHUNK``), so the temporaries stay a
small fraction of the averages. Also the most elements gathered into one buffer."""

MIN_CHUNK = 1 << 15

GATHER_BELOW = 1 << 16
"""Values smaller than this (in elements) that are not laid out like their averages are
copied into a gather buffer (one multi-tensor copy per group) and updated there as one
region; larger ones are updated where they are, each by its own kernel call."""

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


_local = threading.local()

_ALWAYS: dict[torch.device, Tensor] = {}


def _always(device: torch.device) -> Tensor:
    """A 0-dim ``True`` on ``device`` (the kernels' ``valid`` for a host-checked update)."""
    flag = _ALWAYS.get(device)
    if flag is None:
        flag = _ALWAYS[device] = torch.ones((), dtype=torch.bool, device=device)
    return flag


def fast_path_ok(*tensors: Tensor) -> bool:
    """Whether the engine may work on these tensors (plain tensors, no transform, no trace)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return not any(
        type(t) not in (Tensor, torch.nn.Parameter) or is_functorch_wrapped(t) for t in tensors
    )


def all_finite(flags: list[Tensor]) -> Tensor:
    """One 0-dim "all finite" flag from several, on the first one's device (no host sync)."""
    if len(flags) == 1:
        return flags[0]
    return torch.stack([flag.to(flags[0].device) for flag in flags]).all()


def _rows(shadow: Tensor, value: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``shadow`` and ``value`` (1-D, equal length) as kernel inputs.

    Full rows of ``ROW`` elements, then one row with the rest.
    """
    numel = shadow.numel()
    full = numel - numel % ROW
    blocks = []
    if full:
        blocks.append((shadow[:full].view(-1, ROW), value[:full].view(-1, ROW)))
    if full < numel:
        blocks.append((shadow[full:].view(1, -1), value[full:].view(1, -1)))
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
    if shadow.numel() < KERNEL_FROM:
        return None
    build = shadow.numel() >= COMPILE_FROM
    kernel = compiled.kernel(shadow, value, mask=mask, bank=True, build=build)
    if kernel is None:
        return None
    size = shadow.shape[0]
    valid = _always(shadow.device)
    out = kernel(shadow.view(size, -1), value.view(1, -1), weight.reshape(size, 1), valid)
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
) -> Tensor | None:
    """A region in place without the kernel: cache-sized chunks through a scratch buffer.

    The TF step and the masking of ``_arith``, written into per-thread scratch buffers: no
    allocation per update, no full-size temporary. With ``mask``, returns the 0-dim "all
    finite" flag. With ``valid`` (0-dim bool on the device), each chunk's result is selected
    against its old bits (one chunk-sized temporary), so a false ``valid`` keeps them all.
    """
    numel = shadow.numel()
    chunk = max(MIN_CHUNK, min(CHUNK, numel // 32)) if shadow.device.type == "cpu" else 1 << 24
    tmp = scratch(shadow.dtype, shadow.device, min(numel, chunk))
    flags = (
        torch.empty(-(-numel // chunk), dtype=torch.bool, device=shadow.device) if mask else None
    )
    for index, start in enumerate(range(0, numel, chunk)):
        stop = min(start + chunk, numel)
        s, t, v = shadow[start:stop], tmp[: stop - start], value[start:stop]
        if flags is not None:
            ok = scratch(torch.bool, shadow.device, stop - start, slot="finite")
            v, finite = keep_finite(s, v, scratch=t, finite=ok)
            torch.all(finite, out=flags[index])
        if valid is None:
            ema_step(s, v, weight, inplace=True, scratch=t)
        else:
            torch.where(valid, ema_step(s, v, weight, inplace=False, scratch=t), s, out=s)
    return None if flags is None else flags.all()


# --- layouts ---------------------------------------------------------------------------


def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering ``tensors`` if they are adjacent contiguous views of one buffer.

    Empty tensors are ignored. Returns ``None`` for any other layout.
    """
    parts = [t for t in tensors if t.numel()]
    if not parts:
        return None
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    expected = offset
    for t in parts:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != expected
        ):
            return None
        expected += t.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(first.untyped_storage(), offset, (expected - offset,), (1,))


def pack(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """Copies of ``tensors`` laid out back to back in one buffer per (device, dtype).

    ``dtype`` (if given) applies to floating and complex tensors. Order is preserved, so
    :func:`flat_view` of the returned views (per group) is one region.
    """
    targets = [
        (
            t.device,
            dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype,
        )
        for t in tensors
    ]
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t, key in zip(tensors, targets, strict=True):
        sizes[key] = sizes.get(key, 0) + t.numel()
    buffers = {key: torch.empty(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
    offsets = dict.fromkeys(buffers, 0)
    out = []
    for t, key in zip(tensors, targets, strict=True):
        start = offsets[key]
        view = buffers[key][start : start + t.numel()].view(t.shape)
        view.copy_(t.detach())
        offsets[key] = start + t.numel()
        out.append(view)
    return out


# --- plans -----------------------------------------------------------------------------


@dataclass
class _Region:
    """A contiguous 1-D run of averages and the values of the same length that update it."""

    shadow: Tensor
    value: Tensor
    blocks: list[tuple[Tensor, Tensor]] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = _rows(self.shadow, self.value)

    def run(
        self, weight: float | Tensor, *, mask: bool, valid: Tensor | None = None
    ) -> list[Tensor]:
        """Update in place; the "all finite" flags with ``mask``.

        ``valid``: a 0-dim bool on the region's device; where false, nothing changes.
        """
        shadow, value = self.shadow, self.value
        kernel = None
        if shadow.numel() >= KERNEL_FROM:
            build = shadow.numel() >= COMPILE_FROM
            kernel = compiled.kernel(shadow, value, mask=mask, build=build)
        if kernel is None:
            flag = _eager_region_(shadow, value, weight, mask=mask, valid=valid)
            return [] if flag is None else [flag]
        w = weight
        if not isinstance(w, Tensor) or w.dtype != shadow.dtype or w.device != shadow.device:
            w = torch.as_tensor(weight, dtype=shadow.dtype, device=shadow.device)
        ok = _always(shadow.device) if valid is None else valid
        flags: list[Tensor] = []
        for shadow_rows, value_rows in self.blocks:
            out = kernel(shadow_rows, value_rows, w, ok)
            if mask:
                flags.extend(out)
        return flags


@dataclass
class _Gather:
    """Small scattered values, copied into one buffer, then updated as one region."""

    values: list[Tensor]
    targets: list[Tensor]  # views of the region's value buffer, shaped like ``values``
    region: _Region

    @classmethod
    def of(cls, shadow: Tensor, values: list[Tensor]) -> _Gather:
        buffer = torch.empty(shadow.numel(), dtype=values[0].dtype, device=shadow.device)
        targets, offset = [], 0
        for value in values:
            targets.append(buffer[offset : offset + value.numel()].view(value.shape))
            offset += value.numel()
        return cls(values, targets, _Region(shadow, buffer))

    @property
    def shadow(self) -> Tensor:
        return self.region.shadow

    def run(
        self, weight: float | Tensor, *, mask: bool, valid: Tensor | None = None
    ) -> list[Tensor]:
        """Copy the values in, then update the region."""
        foreach_copy_(self.targets, self.values)
        return self.region.run(weight, mask=mask, valid=valid)


@dataclass
class Plan:
    """How to apply one in-place update to validated pairs of tensors.

    ``regions`` update values where they are (one kernel call per region), ``gathers`` copy
    small scattered values into a buffer first, ``leaves`` are updated one by one (layouts the
    kernels do not take), ``copies`` are copied (``regions_copied``: one ``copy_`` each).
    """

    regions: list[_Region] = field(default_factory=list)
    gathers: list[_Gather] = field(default_factory=list)
    leaves: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    copies: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    regions_copied: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _weights: dict[tuple[torch.dtype, torch.device], tuple[float, Tensor]] = field(
        default_factory=dict, repr=False
    )

    def merged(self, other: Plan) -> Plan:
        """One plan doing the work of both."""
        return Plan(
            self.regions + other.regions,
            self.gathers + other.gathers,
            self.leaves + other.leaves,
            (self.copies[0] + other.copies[0], self.copies[1] + other.copies[1]),
            self.regions_copied + other.regions_copied,
        )

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


def _kernel_layout(tensor: Tensor) -> bool:
    return tensor.is_contiguous() and not tensor.is_complex()


def _plan_group(plan: Plan, pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Plan one (device, dtypes) group of non-empty pairs, in their given order."""
    shadows = [s for s, _ in pairs]
    values = [v for _, v in pairs]
    shadow_flat = flat_view(shadows)
    value_flat = flat_view(values) if shadow_flat is not None else None
    if shadow_flat is not None and value_flat is not None:
        plan.regions.append(_Region(shadow_flat, value_flat))
        return
    if shadow_flat is None:  # averages laid out by the caller: each pair on its own
        for shadow, value in pairs:
            if _kernel_layout(shadow) and _kernel_layout(value):
                plan.regions.append(_Region(shadow.view(-1), value.view(-1)))
            else:
                plan.leaves.append((shadow, value))
        return
    # One region of averages, scattered values: large contiguous values are updated where
    # they are; runs of the others are gathered (at most CHUNK elements per buffer).
    pending: list[Tensor] = []
    pending_start = offset = 0
    for value in values:
        numel = value.numel()
        direct = numel >= GATHER_BELOW and value.is_contiguous()
        if pending and (direct or offset + numel - pending_start > CHUNK):
            plan.gathers.append(_Gather.of(shadow_flat[pending_start:offset], pending))
            pending = []
        if direct:
            plan.regions.append(_Region(shadow_flat[offset : offset + numel], value.view(-1)))
        else:
            if not pending:
                pending_start = offset
            pending.append(value)
        offset += numel
    if pending:
        plan.gathers.append(_Gather.of(shadow_flat[pending_start:offset], pending))


def build_plan(
    averaged: Sequence[tuple[Tensor, Tensor]], copied: Sequence[tuple[Tensor, Tensor]]
) -> Plan:
    """Group validated ``(shadow, value)`` pairs for :meth:`Plan.run`.

    ``averaged`` pairs are floating (TF-order update), ``copied`` pairs are copied. Pairs are
    grouped by (device, shadow dtype, value dtype) in their given order. A group whose
    averages and values each form one region is one region; when only the averages do, large
    values are regions of their own and runs of small ones are gathered; otherwise each
    contiguous pair is a region and the rest are updated leaf by leaf.
    """
    plan = Plan()
    groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
    for shadow, value in averaged:
        if shadow.is_complex():  # the engine's kernels are for real floating dtypes
            plan.leaves.append((shadow, value))
        elif shadow.numel():
            key = (shadow.device, shadow.dtype, value.dtype)
            groups.setdefault(key, []).append((shadow, value))
    for pairs in groups.values():
        _plan_group(plan, pairs)
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
    return plan
