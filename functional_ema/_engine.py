"""The in-place update engine: TF-order arithmetic at memory bandwidth.

The arithmetic is the leaf routine's, ``shadow - (shadow - value) * w`` with every operation
rounded in the shadow's dtype. What this module adds is how it is evaluated in place:

- over **contiguous regions**, in chunks that stay in cache with a small reusable scratch
  buffer (no full-size temporary), or as one compiled kernel (``torch.compile``) that reads
  ``shadow`` and ``value`` once and writes ``shadow`` once;
- over **many tensors at once**: when a group of leaves are adjacent views of one buffer (the
  layout ``init`` gives averages and :func:`flatten_parameters_` gives a model), the group is one
  region; small scattered values are gathered into the scratch with one ``torch.cat``.

Plans are built once per validated pairing of tensors and can be re-run (the adapter caches
its plan while the model's tensors stay the same).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


CHUNK = 1 << 20
"""Most elements per chunk of the eager path (4 MiB of float32: stays in cache). Each
region uses at most 1/32 of its size (and at least ``MIN_CHUNK``), so the scratch stays a
small fraction of the averages."""

MIN_CHUNK = 1 << 15

GATHER_BELOW = 1 << 14
"""Values smaller than this (in elements) are gathered with ``torch.cat`` instead of updated
one by one, when the averages are one contiguous region."""

COMPILE_FROM = 1 << 16
"""Regions of at least this many elements use the compiled kernel (when enabled)."""

_local = threading.local()


def _wrapped(tensor: Tensor) -> bool:
    """Whether a tensor is seen through a torch.func transform (vmap, grad) or traced."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def fast_path_ok(*tensors: Tensor) -> bool:
    """Whether the engine may work on these tensors (plain tensors, no transform, no trace)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    return not any(_wrapped(t) or type(t) not in (Tensor, torch.nn.Parameter) for t in tensors)


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


# --- the kernels ------------------------------------------------------------------------


def masked_value(shadow: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """``value`` in ``shadow``'s dtype with NaN/Inf replaced by ``shadow``, and an all-finite flag.

    Where ``value`` is not finite the update becomes ``shadow - (shadow - shadow) * w``, which
    leaves ``shadow`` unchanged; elsewhere the arithmetic (and TF's bits) are untouched.
    """
    value = value.to(shadow.dtype)
    finite = torch.isfinite(value)
    return torch.where(finite, value, shadow), finite.all()


def _kernel(shadow: Tensor, value: Tensor, weight: Tensor) -> None:
    shadow.sub_((shadow - value.to(shadow.dtype)) * weight)


def _kernel_masked(shadow: Tensor, value: Tensor, weight: Tensor) -> None:
    value = value.to(shadow.dtype)
    shadow.sub_((shadow - torch.where(torch.isfinite(value), value, shadow)) * weight)


def finite_flag(value: Tensor) -> Tensor:
    """0-dim "all finite" flag from one summing pass (no full-size temporary, no host sync).

    The sum is non-finite exactly when an element is NaN or Inf, or in the (for weights,
    theoretical) case of an overflowing sum; half precision sums in float32.
    """
    dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    return torch.isfinite(value.sum(dtype=dtype))


class _Compiled:
    """``torch.compile`` of the TF-order kernels, built on first use, disabled on failure."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("FUNCTIONAL_EMA_COMPILE", "1") != "0"
        self._fns: dict[bool, Callable[..., Any]] = {}

    def __call__(self, shadow: Tensor, value: Tensor, weight: Tensor, *, mask: bool) -> bool:
        """Run the kernel; ``False`` when compiling is disabled or failed (use eager)."""
        if not self.enabled:
            return False
        try:
            if mask not in self._fns:
                # emulate_precision_casts: round every intermediate to the shadow's dtype, as
                # eager (and TF) do, so bfloat16/float16 averages stay bit-exact.
                self._fns[mask] = torch.compile(
                    _kernel_masked if mask else _kernel,
                    dynamic=True,
                    fullgraph=True,
                    options={"emulate_precision_casts": True},
                )
            self._fns[mask](shadow, value, weight)
        except Exception as error:
            self.enabled = False
            warnings.warn(
                f"functional_ema: torch.compile of the update kernel failed ({error!r}); "
                "using the eager chunked path instead (same results, slower). Set "
                "FUNCTIONAL_EMA_COMPILE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True


compiled = _Compiled()


def update_region_(
    shadow: Tensor, value: Tensor, weight: float | Tensor, *, mask: bool = False
) -> Tensor | None:
    """In place, TF order, over 1-D contiguous ``shadow`` and ``value`` of equal length.

    ``weight`` is already cast to ``shadow.dtype``. ``value`` may be narrower (promoted
    exactly per chunk). Peak extra memory: one chunk, not a full-size temporary. With
    ``mask``, non-finite values leave their average unchanged and a 0-dim "all finite" flag
    (on the device, never read here) is returned.
    """
    numel = shadow.numel()
    if numel >= COMPILE_FROM and shadow.device.type in ("cpu", "cuda"):
        w = torch.as_tensor(weight, dtype=shadow.dtype, device=shadow.device)
        if compiled(shadow, value, w, mask=mask):
            # The kernel masks non-finite values; the flag is one extra read of ``value``
            # (Inductor does not fuse the reduction into the update's loop).
            return finite_flag(value) if mask else None
    chunk = max(MIN_CHUNK, min(CHUNK, numel // 32)) if shadow.device.type == "cpu" else 1 << 24
    tmp = scratch(shadow.dtype, shadow.device, min(numel, chunk))
    narrower = torch.promote_types(shadow.dtype, value.dtype) != shadow.dtype
    flags = (
        torch.empty(-(-numel // chunk), dtype=torch.bool, device=shadow.device) if mask else None
    )
    for index, start in enumerate(range(0, numel, chunk)):
        stop = min(start + chunk, numel)
        s, t = shadow[start:stop], tmp[: stop - start]
        v = value[start:stop]
        if narrower:  # the update runs in the shadow's dtype: round the values first
            v = v.to(shadow.dtype)
        if flags is not None:  # v := where(finite, v, s), without allocating
            ok = scratch(torch.bool, shadow.device, stop - start, slot="finite")
            torch.sub(v, v, out=t)  # 0 where finite, NaN at NaN and +-Inf
            torch.eq(t, 0, out=ok)
            torch.all(ok, out=flags[index])
            torch.where(ok, v, s, out=t)
            v = t
        torch.sub(s, v, out=t)
        t.mul_(weight)
        s.sub_(t)
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
    shadow: Tensor
    value: Tensor


@dataclass
class _Gather:
    shadow: Tensor  # contiguous region of the averages
    values: list[Tensor]  # small values, gathered with torch.cat


@dataclass
class Plan:
    """How to apply one in-place update to validated pairs of tensors."""

    regions: list[_Region] = field(default_factory=list)
    gathers: list[_Gather] = field(default_factory=list)
    leaves: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    copies: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))

    def merged(self, other: Plan) -> Plan:
        """One plan doing the work of both."""
        return Plan(
            self.regions + other.regions,
            self.gathers + other.gathers,
            self.leaves + other.leaves,
            (self.copies[0] + other.copies[0], self.copies[1] + other.copies[1]),
        )

    def run(
        self, weight_for: Callable[[torch.dtype], float | Tensor], *, mask: bool = False
    ) -> list[Tensor]:
        """Apply the update with ``weight_for(dtype)``, TF's weight cast to ``dtype``.

        With ``mask``, non-finite values leave their averages unchanged; returns the 0-dim
        "all finite" flags of the averaged groups (device tensors, not read here).
        """
        flags: list[Tensor | None] = []
        for region in self.regions:
            weight = weight_for(region.shadow.dtype)
            flags.append(update_region_(region.shadow, region.value, weight, mask=mask))
        for gather in self.gathers:
            flags.extend(_run_gather(gather, weight_for(gather.shadow.dtype), mask=mask))
        for shadow, value in self.leaves:
            flags.append(_update_leaf_(shadow, value, weight_for(shadow.dtype), mask=mask))
        if self.copies[0]:
            torch._foreach_copy_(self.copies[0], self.copies[1])
        return [flag for flag in flags if flag is not None]


def _run_gather(gather: _Gather, weight: float | Tensor, *, mask: bool) -> list[Tensor | None]:
    values, flags = gather.values, []
    dtype, device = values[0].dtype, values[0].device
    start = offset = 0
    while start < len(values):
        # As many values as fit one chunk (at least one), gathered into a scratch buffer.
        stop, size = start, 0
        while stop < len(values) and (stop == start or size + values[stop].numel() <= CHUNK):
            size += values[stop].numel()
            stop += 1
        buf = scratch(dtype, device, size, slot="gather")
        torch.cat([v.reshape(-1) for v in values[start:stop]], out=buf)
        flags.append(update_region_(gather.shadow[offset : offset + size], buf, weight, mask=mask))
        start, offset = stop, offset + size
    return flags


def _update_leaf_(
    shadow: Tensor, value: Tensor, weight: float | Tensor, *, mask: bool
) -> Tensor | None:
    if shadow.is_contiguous() and value.is_contiguous() and not shadow.is_complex():
        return update_region_(shadow.view(-1), value.view(-1), weight, mask=mask)
    finite = None
    if mask:
        value, finite = masked_value(shadow, value)
    elif value.dtype != shadow.dtype:
        value = value.to(shadow.dtype)
    shadow.sub_((shadow - value) * weight)
    return finite


def build_plan(
    averaged: Sequence[tuple[Tensor, Tensor]], copied: Sequence[tuple[Tensor, Tensor]]
) -> Plan:
    """Group validated ``(shadow, value)`` pairs for :meth:`Plan.run`.

    ``averaged`` pairs are floating (TF-order update), ``copied`` pairs are copied. Pairs are
    grouped by (device, shadow dtype, value dtype) in their given order; a group whose
    averages form one region becomes a region update when its values do too, a gather when its
    values are small, and per-leaf updates otherwise.
    """
    plan = Plan()
    groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
    for shadow, value in averaged:
        if shadow.is_complex():  # the engine's kernels are for real floating dtypes
            plan.leaves.append((shadow, value))
            continue
        groups.setdefault((shadow.device, shadow.dtype, value.dtype), []).append((shadow, value))
    for pairs in groups.values():
        shadows = [s for s, _ in pairs if s.numel()]
        values = [v for s, v in pairs if s.numel()]
        if not shadows:
            continue
        shadow_flat = flat_view(shadows)
        value_flat = flat_view(values) if shadow_flat is not None else None
        if shadow_flat is not None and value_flat is not None:
            plan.regions.append(_Region(shadow_flat, value_flat))
        elif shadow_flat is not None and sum(v.numel() for v in values) < GATHER_BELOW * len(
            values
        ):
            plan.gathers.append(_Gather(shadow_flat, values))
        else:
            plan.leaves.extend(zip(shadows, values, strict=True))
    for shadow, value in copied:
        plan.copies[0].append(shadow)
        plan.copies[1].append(value)
    return plan
