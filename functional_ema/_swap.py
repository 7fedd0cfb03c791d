"""Swapping values into a live model for a ``with`` block, and guarding it meanwhile.

The one implementation behind :func:`swapped` and ``EMA.swap``: every check before the first
write, values copied in place (local shards of sharded parameters, no communication), on
exit every module's parameter and buffer slots given back the objects they held (a forward
may reassign or resize a buffer) and the live values restored bit for bit, and
``state_dict`` / ``load_state_dict`` of the live model refused while it holds the averages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from functional_ema._dtensor import localize
from functional_ema._errors import message
from functional_ema._fsdp import reshard
from functional_ema._module import check_keys, check_unwrapped, module_state
from functional_ema._tree import check_pair
from functional_ema._types import Buffers, Params


def _inert_hook(*args: Any) -> None:
    """What a swap guard becomes in a copy of the model: nothing to guard there."""
    del args


_BLOCKS = {
    "EMA.swap": ("inside `with ema.swap():`", "after the `with` block"),
    "EMA.store": ("between ema.store() and ema.restore()", "after ema.restore()"),
    "swapped": ("inside `with fe.swapped(...):`", "after the `with` block"),
}
"""Per API: where the averages are in the model, and when the live weights are back."""


def _swap_error(api: str, what: str, why: str, fix: str) -> RuntimeError:
    """``fix`` may say ``{after}``: when the live weights are back for ``api``."""
    where, after = _BLOCKS.get(api, (f"inside {api}", "after it"))
    return RuntimeError(
        message(
            api,
            f"{what} {where}",
            "<root>",
            "the live weights",
            f"the averages (swapped in until {after.removeprefix('after ')})",
            f"{why} {fix.format(after=after)}",
        )
    )


_SAVE_FIX = (
    "Save the model {after}; for the averages use ema.state_dict() (to resume the EMA) or "
    "ema.shadow.state_dict() (the model's keys, for export)."
)


class _Refuse:
    """A hook that raises: saving (``state_dict``) or loading while the averages are in."""

    def __init__(self, api: str, loading: bool) -> None:
        self.api, self.loading = api, loading

    def __call__(self, *args: Any) -> None:
        del args
        if self.loading:
            raise _swap_error(
                self.api,
                "model.load_state_dict()",
                "The live weights are restored at the end, which would undo this load.",
                "Load {after}.",
            )
        raise _swap_error(
            self.api,
            "model.state_dict()",
            "Saving them as the model's weights is the classic resume bug.",
            _SAVE_FIX,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert_hook  # a copy made inside the block (e.g. ema.shadow) is not guarded

    def __reduce__(self) -> Any:
        raise _swap_error(
            self.api,
            "pickling the model",
            "A pickled model would hold the averages as its weights.",
            _SAVE_FIX,
        )


class SwapGuard:
    """Refuse ``state_dict`` / ``load_state_dict`` of the live model while it holds averages.

    Inside ``with ema.swap():`` the live model's tensors are the averages: saving
    ``model.state_dict()`` then stores the averages as if they were the weights (resuming
    from it silently restarts training from the averages), and ``model.load_state_dict``
    would be undone when the block restores the live weights. The hooks sit on the live
    model's root module, whose hooks run before anything is read or written, so they also
    cover a parent module's ``state_dict`` and DDP / ``torch.compile`` wrappers (not a
    submodule's own ``state_dict``). A ``copy.deepcopy`` of the model made inside the block
    (e.g. ``ema.shadow``) gets an inert hook; pickling the guarded model raises.
    """

    def __init__(self, model: nn.Module, api: str = "EMA.swap") -> None:
        self._handles = [
            model.register_state_dict_pre_hook(_Refuse(api, loading=False)),
            model.register_load_state_dict_pre_hook(_Refuse(api, loading=True)),
        ]

    def remove(self) -> None:
        """Uninstall the hooks (the model is itself again)."""
        for handle in self._handles:
            handle.remove()


@contextmanager
def swapped(
    model: nn.Module, params: Params, buffers: Buffers | None = None
) -> Iterator[nn.Module]:
    """Put ``params`` (and ``buffers``) into ``model``'s own tensors for the ``with`` block.

    The functional twin of :meth:`EMA.swap`, and the way to evaluate averages on an FSDP2
    model, where :func:`apply` (``torch.func.functional_call``) cannot work: values are copied
    in place into the local shards of the sharded parameters (no communication), and the
    live model is restored on exit, also when the body raises: every module's parameter and
    buffer slots hold the objects they held on entry (a forward that reassigns a buffer,
    ``self.calls = self.calls + 1``, adds, deletes or resizes one is undone), with their
    entry shapes, strides and storage, and their values bit for bit. FSDP2 modules are
    resharded on entry and on exit (frees gathered copies, communicates nothing), so the
    block's forward gathers the averages and no gathered average outlives the block. Inside
    the block the model's ``state_dict()`` and ``load_state_dict()`` raise, as in
    :meth:`EMA.swap`. Works for plain models as well.

    Args:
        model: The live model (an FSDP2 model, or not; not a DDP wrapper).
        params: Values for the trainable parameters keyed by module names, e.g.
            :func:`average` of a state made from :func:`module_state`; DTensors sharded like
            the model's parameters. Floating values are cast to the model's dtypes.
        buffers: Values for every buffer and frozen parameter (e.g. ``state["buffers"]``);
            ``None`` keeps the model's own.

    Yields:
        ``model``, holding the given values.

    Raises:
        ValueError: Names, shapes, devices or placements differ (checked before any write).

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(fe.module_state(model)[0])
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> live = model.weight.clone()
        >>> with fe.swapped(model, fe.average(state)):
        ...     torch.equal(model.weight, fe.average(state)["weight"])
        True
        >>> torch.equal(model.weight, live)
        True
    """
    with swap_in("swapped", model, params, buffers):
        yield model


class _Slots:
    """The objects in every module's parameter and buffer slots, to put back later.

    A forward may replace what a slot holds (``self.calls = self.calls + 1`` puts a new
    tensor in ``_buffers['calls']``), add or delete entries, or change a tensor's shape,
    strides or storage in place (``self.min_val.resize_(...)``, ``p.data = ...``).
    :meth:`restore` undoes all of it: the same objects in the same slots, each with the
    storage, offset, shape, strides, dtype and device it had.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            (m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
            for m in model.modules()
        ]
        tensors: dict[int, Tensor] = {}
        for _, params, buffers, _ in self.modules:
            for tensor in [*params.values(), *buffers.values()]:
                if tensor is not None:
                    tensors.setdefault(id(tensor), tensor)
        # Detached aliases of the plain tensors: the same storage, with today's metadata.
        # (Tensor subclasses such as FSDP2's DTensors get their slots back, no more.)
        self.tensors = [(t, t.detach()) for t in tensors.values() if type(t.data) is Tensor]

    def restore(self) -> None:
        """Put every recorded object back in its slot, with its recorded layout."""
        for module, params, buffers, non_persistent in self.modules:
            _put_back(module._parameters, params)
            _put_back(module._buffers, buffers)
            if module._non_persistent_buffers_set != non_persistent:
                module._non_persistent_buffers_set.clear()
                module._non_persistent_buffers_set.update(non_persistent)
        with torch.no_grad():
            for tensor, alias in self.tensors:
                if not _same_layout(tensor, alias):
                    tensor.data = alias


def _put_back(slots: dict[str, Any], saved: dict[str, Any]) -> None:
    """Make ``slots`` hold exactly ``saved``'s entries (same objects, same order)."""
    if slots.keys() != saved.keys() or any(slots[k] is not v for k, v in saved.items()):
        slots.clear()
        slots.update(saved)


def _same_layout(tensor: Tensor, alias: Tensor) -> bool:
    """Whether ``tensor`` still has ``alias``'s storage, offset, shape, strides and dtype."""
    return (
        type(tensor.data) is Tensor
        and tensor.dtype == alias.dtype
        and tensor.device == alias.device
        and tensor.shape == alias.shape
        and tensor.stride() == alias.stride()
        and tensor.storage_offset() == alias.storage_offset()
        and tensor.untyped_storage().data_ptr() == alias.untyped_storage().data_ptr()
    )


def _same_tensor(target: Tensor, value: Tensor) -> bool:
    """Whether ``value`` views exactly ``target``'s elements (same memory, layout and dtype)."""
    return (
        target.data_ptr() == value.data_ptr()
        and target.dtype == value.dtype
        and target.device == value.device
        and target.shape == value.shape
        and target.stride() == value.stride()
    )


@contextmanager
def swap_in(
    api: str, model: nn.Module, params: Params, buffers: Buffers | None = None
) -> Iterator[nn.Module]:
    """:func:`swapped`, with errors and the state_dict guard naming ``api``.

    On exit (also when the body raises) every module's parameter and buffer slots hold the
    objects they held on entry, each with its entry layout (:class:`_Slots`), and then the
    live values are copied back bit for bit.
    """
    check_unwrapped(api, model, "model")
    reshard(model)
    live_params, live_buffers = module_state(model)
    if buffers is None:
        check_keys(api, model, params, live_buffers)
        given = dict(params)
    else:
        check_keys(api, model, params, buffers)
        given = {**params, **buffers}
    everything = {**live_params, **live_buffers}
    live = {name: everything[name] for name in given}
    targets, values, _ = check_pair(api, live, given, ("model", "params"))
    targets, values, _ = localize(api, live, targets, values, ("model", "params"))
    # A value that is the live tensor itself (a frozen parameter) needs no swap, no backup.
    pairs = [(t, v) for t, v in zip(targets, values, strict=True) if not _same_tensor(t, v)]
    targets, values = [t for t, _ in pairs], [v for _, v in pairs]
    with torch.no_grad():
        backup = [t.clone() for t in targets]
    slots = _Slots(model)
    guard = SwapGuard(model, api)
    try:
        with torch.no_grad():
            for target, value in zip(targets, values, strict=True):
                target.copy_(value)
        yield model
    finally:
        try:
            reshard(model)
            slots.restore()
            with torch.no_grad():
                for target, value in zip(targets, backup, strict=True):
                    target.copy_(value)
        finally:
            guard.remove()
