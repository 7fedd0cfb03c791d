"""Averages on another device: the values staged through a bounded buffer, chunk by chunk.

``EMA(model, decay, device="cpu")`` keeps the averages in (optionally pinned) host memory
while the model trains on an accelerator. Each update copies the values into one of two
staging buffers of at most :data:`STAGING_BYTES` each, with non-blocking transfers (pinned
when the values are on an accelerator), and runs the functional update on that chunk where
the averages are, while the next chunk's copy is in flight. No full copy of the model is
made; the arithmetic is the core's (:func:`_update.apply_` / :func:`_update.follow_`), so the
bits are those of an update on one device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from functional_ema._state import EmaState
from functional_ema._types import BufferPolicy
from functional_ema._update import Bound, validate


STAGING_BYTES = 1 << 26
"""The size of each of the two staging buffers (64 MiB): the bound on the extra memory."""

_ALIGN = 64  # bytes: every staged view starts aligned for any dtype


@dataclass
class _Unit:
    """One piece of a leaf to stage.

    ``source`` is on the values' device (a flat slice for a split leaf); ``target`` its
    average's matching flat view, or the whole average when it cannot be split.
    """

    name: str
    source: Tensor
    target: Tensor
    buffer: bool

    @property
    def nbytes(self) -> int:
        return -(-self.source.numel() * self.source.element_size() // _ALIGN) * _ALIGN


def _pieces(name: str, average: Tensor, value: Tensor, buffer: bool, limit: int) -> list[_Unit]:
    """``value`` as units of at most ``limit`` bytes (a contiguous average is split flat)."""
    nbytes = value.numel() * value.element_size()
    if nbytes <= limit or not average.is_contiguous() or average.shape != value.shape:
        return [_Unit(name, value, average, buffer)]
    flat_value, flat_average = value.reshape(-1), average.view(-1)
    step = max(limit // value.element_size(), 1)
    return [
        _Unit(
            f"{name}[{lo}:{lo + step}]",
            flat_value[lo : lo + step],
            flat_average[lo : lo + step],
            buffer,
        )
        for lo in range(0, value.numel(), step)
    ]


def _chunks(units: list[_Unit], limit: int) -> Iterator[list[_Unit]]:
    """Consecutive units whose staged bytes fit ``limit`` (a larger unit goes alone)."""
    chunk: list[_Unit] = []
    size = 0
    for unit in units:
        if chunk and size + unit.nbytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(unit)
        size += unit.nbytes
    if chunk:
        yield chunk


class _Fence:
    """Waits for the copies issued on the sources' CUDA streams (nothing to wait for on CPU)."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.events = []
        for device in devices:
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self.events.append(event)

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


class Staging:
    """Two staging buffers, made on first use and kept.

    At most ``limit`` bytes each, except for a single average that cannot be split (not
    contiguous), which gets its own size.
    """

    def __init__(self, limit: int = STAGING_BYTES) -> None:
        self.limit = limit
        self.buffers: list[Tensor] = []

    def buffer(self, index: int, nbytes: int, device: torch.device, pin: bool) -> Tensor:
        """Staging buffer ``index`` (0 or 1) with room for ``nbytes``, on ``device``."""
        while len(self.buffers) <= index:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        held = self.buffers[index]
        if held.numel() < nbytes or held.device != device or held.is_pinned() != pin:
            held = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
            self.buffers[index] = held
        return held


def _stage(chunk: list[_Unit], buffer: Tensor) -> list[Tensor]:
    """Issue the non-blocking copies of ``chunk`` into ``buffer``; the staged views."""
    staged, offset = [], 0
    for unit in chunk:
        count = unit.source.numel() * unit.source.element_size()
        view = buffer[offset : offset + count].view(unit.source.dtype).view(unit.source.shape)
        view.copy_(unit.source, non_blocking=True)
        staged.append(view)
        offset += unit.nbytes
    return staged


def staged_update(
    api: str,
    state: EmaState,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    buffer_policy: BufferPolicy,
    staging: Staging,
    run: Callable[[Bound], object],
) -> None:
    """Run ``run`` (an in-place update of a :class:`Bound`) chunk by chunk through ``staging``.

    ``state``'s leaves are written in place; its ``step`` and ``nonfinite_updates`` take the
    result of one update (each chunk starts from the same counters; a non-finite value in any
    chunk counts the update once). The caller has checked names, shapes and dtypes, and the
    values for NaN/Inf where ``nonfinite="raise"``, so no chunk raises once writing began.
    """
    sources = {t.device for t in (*params.values(), *buffers.values())}
    target = state["step"].device
    # Pinned host memory lets the accelerator copy asynchronously (DMA) into the staging.
    pin = target.type == "cpu" and any(d.type != "cpu" for d in sources)
    units: list[_Unit] = []
    held_buffers: dict[str, Tensor] = state.get("buffers") or {}
    averages: dict[str, Tensor] = {**state["params"], **held_buffers}
    for name, value in params.items():
        units += _pieces(name, averages[name], value, False, staging.limit)
    for name, value in buffers.items():
        units += _pieces(name, averages[name], value, True, staging.limit)
    chunks = list(_chunks(units, staging.limit))
    step, counter = state["step"], state["nonfinite_updates"]
    new_step: Tensor | None = None
    seen = torch.zeros((), dtype=torch.bool, device=counter.device)
    pending: tuple[list[_Unit], list[Tensor], _Fence] | None = None
    for index in range(len(chunks) + 1):
        issued = None
        if index < len(chunks):  # copy the next chunk while this one is computed
            chunk = chunks[index]
            buffer = staging.buffer(index % 2, sum(u.nbytes for u in chunk), target, pin)
            issued = (chunk, _stage(chunk, buffer), _Fence(sources))
        if pending is not None:
            chunk, staged, fence = pending
            fence.wait()
            part: EmaState = {
                "step": step.clone(),
                "nonfinite_updates": torch.zeros_like(counter),
                "params": {u.name: u.target for u in chunk if not u.buffer},
                "buffers": {u.name: u.target for u in chunk if u.buffer},
            }
            values = {u.name: s for u, s in zip(chunk, staged, strict=True) if not u.buffer}
            held: dict[str, Tensor] = {
                u.name: s for u, s in zip(chunk, staged, strict=True) if u.buffer
            }
            run(validate(api, part, values, held, buffer_policy))
            new_step = part["step"] if new_step is None else new_step
            seen = seen | (part["nonfinite_updates"] > 0)
        pending = issued
    if new_step is not None:
        step.copy_(new_step)
    counter.add_(seen.to(counter.dtype))
