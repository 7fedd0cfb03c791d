"""Swapping values into a live model for a ``with`` block, and guarding it meanwhile.

The one implementation behind :func:`swapped` and ``EMA.swap``: every check before the first
write, values copied in place (local shards of sharded parameters, no communication), the
live values restored bit for bit on exit, and ``state_dict`` / ``load_state_dict`` of the
live model refused while it holds the averages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from functional_ema._dtensor import localize
from functional_ema._errors import message
from functional_ema._fsdp import reshard
from functional_ema._module import check_keys, check_unwrapped, module_state
from functional_ema._tree import check_pair
from functional_ema._types import Buffers, Params


def _inert_hook(*args: Any) -> None:
    """What a swap guard becomes in a copy of the model: nothing to guard there."""
    del args


_BLOCKS = {"EMA.swap": "`with ema.swap():`", "swapped": "`with fe.swapped(...):`"}


def _swap_error(api: str, what: str, why: str, fix: str) -> RuntimeError:
    return RuntimeError(
        message(
            api,
            f"{what} inside {_BLOCKS.get(api, api)}",
            "<root>",
            "the live weights",
            "the averages (swapped in until the block ends)",
            f"{why} {fix}",
        )
    )


_SAVE_FIX = (
    "Save the model after the `with` block; for the averages use ema.state_dict() (to resume "
    "the EMA) or ema.shadow.state_dict() (the model's keys, for export)."
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
                "The live weights are restored when the block ends, which would undo this load.",
                "Load after the `with` block.",
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
    live values are restored bit for bit on exit, also when the body raises. FSDP2 modules
    are resharded on entry and on exit (frees gathered copies, communicates nothing), so the
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


@contextmanager
def swap_in(
    api: str, model: nn.Module, params: Params, buffers: Buffers | None = None
) -> Iterator[nn.Module]:
    """:func:`swapped`, with errors and the state_dict guard naming ``api``."""
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
    with torch.no_grad():
        backup = [t.clone() for t in targets]
    guard = SwapGuard(model, api)
    try:
        with torch.no_grad():
            for target, value in zip(targets, values, strict=True):
                target.copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for target, value in zip(targets, backup, strict=True):
                target.copy_(value)
        reshard(model)
        guard.remove()
