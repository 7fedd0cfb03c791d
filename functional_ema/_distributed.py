"""Sharded averages: DTensor leaves updated shard-local, FSDP2 swaps, and full exports.

A DTensor average is paired with a DTensor value of the same mesh and placements, and the
update runs on their local shards (``to_local()``, no communication): the arithmetic is
elementwise, so each rank's shard of the average is exactly the shard of the unsharded
average. Nothing here imports ``torch.distributed``: a process that never imported
``torch.distributed.tensor`` (or ``torch.distributed.fsdp``) cannot hold a DTensor (or an
FSDP2 module), so the checks cost one dictionary lookup there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from functional_ema._engine import pack as _pack_plain
from functional_ema._tree import leaf_paths
from functional_ema._types import Buffers, Params


# --- DTensor leaves ----------------------------------------------------------------------


def _dtensor_type() -> Any:
    """The DTensor class, if ``torch.distributed.tensor`` was imported (else none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (no communication); any other tensor itself."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.to_local()
    return tensor


def data_ptrs(tensors: Sequence[Tensor]) -> list[int]:
    """Data pointers of ``tensors``, of the local shard for a DTensor (whose own is 0)."""
    pointers = list(map(Tensor.data_ptr, tensors))
    dtensor = _dtensor_type()
    if dtensor is None or 0 not in pointers:
        return pointers
    return [(t._local_tensor if isinstance(t, dtensor) else t).data_ptr() for t in tensors]


def _like(local: Tensor, like: Any) -> Tensor:
    """Wrap a local shard as a DTensor sharded like ``like`` (no communication)."""
    return type(like).from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def rewrap(likes: list[Any] | None, leaves: list[Tensor]) -> list[Tensor]:
    """Wrap the local results of a pure update back into DTensors, where ``likes`` has one."""
    if likes is None:
        return leaves
    return [t if like is None else _like(t, like) for t, like in zip(leaves, likes, strict=True)]


def local_leaves(leaves: list[Tensor]) -> list[Tensor]:
    """The local shards of ``leaves`` (other tensors unchanged)."""
    if _dtensor_type() is None:
        return leaves
    return [local_tensor(t) for t in leaves]


def _describe(tensor: Tensor, dtensor: type) -> str:
    if isinstance(tensor, dtensor):
        placements = tuple(tensor.placements)  # type: ignore[attr-defined]
        return f"a DTensor with placements {placements} on {tensor.device_mesh}"  # type: ignore[attr-defined]
    return "a plain tensor"


_UNSHARDED_FIX = (
    "An FSDP2 (fully_shard) module holds plain, gathered parameters after a forward without "
    "backward (e.g. an evaluation under torch.no_grad()): call model.reshard() first (no "
    "communication). Otherwise create the EMA from the parameters you update it with."
)


def localize(
    api: str,
    tree: Any,
    shadow: list[Tensor],
    values: list[Tensor],
    names: tuple[str, str],
) -> tuple[list[Tensor], list[Tensor], list[Any] | None]:
    """Map validated ``(shadow, value)`` DTensor pairs to their local shards.

    Each DTensor average must meet a DTensor value with the same device mesh and placements;
    the update then runs on the local shards, shard-local, with no collective (the masked
    path's ``.all()`` on a DTensor would be one). Plain pairs pass through unchanged.

    Returns:
        The shadow leaves, the value leaves (local shards where they were DTensors) and, when
        any leaf was a DTensor, the list of original shadow DTensors (``None`` elsewhere) for
        :func:`rewrap`; ``None`` when there were none.

    Raises:
        ValueError: A DTensor met a plain tensor, or meshes or placements differ.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return shadow, values, None
    likes: list[Any] | None = None
    out_shadow, out_values = list(shadow), list(values)
    pairs: list[tuple[Any, Any]] = list(zip(shadow, values, strict=True))  # DTensors or not
    for index, (s, v) in enumerate(pairs):
        s_sharded, v_sharded = isinstance(s, dtensor), isinstance(v, dtensor)
        if not (s_sharded or v_sharded):
            continue
        problem = None
        if not s_sharded:
            problem = (
                "sharding mismatch",
                "Create the EMA from the sharded parameters (fe.init / fe.EMA after "
                "fully_shard) so that the averages are sharded like them.",
            )
        elif not v_sharded:
            problem = ("sharding mismatch", _UNSHARDED_FIX)
        elif s.device_mesh != v.device_mesh or tuple(s.placements) != tuple(v.placements):
            problem = (
                "placement mismatch",
                "The update is shard-local (no communication), so both sides must be sharded "
                "alike: create the EMA from these parameters, or redistribute one side "
                "explicitly (dtensor.redistribute(mesh, placements)).",
            )
        elif any(p.is_partial() for p in s.placements):
            problem = (
                "partial placement",
                "Averages are kept sharded or replicated, not as pending sums: redistribute "
                "to Shard or Replicate placements first.",
            )
        if problem is not None:
            what, fix = problem
            raise ValueError(
                f"{api}: {what} at {leaf_paths(tree)[index]!r}: expected "
                f"{_describe(s, dtensor)} ({names[0]}), got {_describe(v, dtensor)} "
                f"({names[1]}). {fix}"
            )
        local_s, local_v = s.to_local(), v.to_local()
        if local_s.shape != local_v.shape:
            raise ValueError(
                f"{api}: local shard mismatch at {leaf_paths(tree)[index]!r}: expected shape "
                f"{tuple(local_s.shape)} ({names[0]}), got {tuple(local_v.shape)} ({names[1]}). "
                "Both sides must be sharded alike: create the EMA from these parameters."
            )
        if likes is None:
            likes = [None] * len(shadow)
        likes[index] = s
        out_shadow[index], out_values[index] = local_s, local_v
    return out_shadow, out_values, likes


def pack(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """:func:`functional_ema._engine.pack` that keeps DTensors sharded.

    The local shards are laid out back to back (so the engine updates them as one region)
    and wrapped again as DTensors with the original mesh, placements, shape and stride.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return _pack_plain(tensors, dtype)
    packed = _pack_plain([local_tensor(t.detach()) for t in tensors], dtype)
    return [
        _like(view, t) if isinstance(t, dtensor) else view
        for view, t in zip(packed, tensors, strict=True)
    ]


# --- FSDP2 modules -----------------------------------------------------------------------


def _fsdp_types() -> tuple[Any, Any]:
    """``(FSDPModule, FullyShardedDataParallel)`` if ``torch.distributed.fsdp`` was imported."""
    module = sys.modules.get("torch.distributed.fsdp")
    if module is None:
        return None, None
    return getattr(module, "FSDPModule", None), getattr(module, "FullyShardedDataParallel", None)


def fsdp_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 (``fully_shard``) modules in ``module``, with their names."""
    kind, _ = _fsdp_types()
    if kind is None:
        return []
    return [(name or "<root>", m) for name, m in module.named_modules() if isinstance(m, kind)]


def _unsharded(fsdp_module: nn.Module) -> bool:
    """Whether an FSDP2 module has its gathered parameters registered (not the shards).

    Reads FSDP2's parameter-group state; ``False`` where that state is not readable.
    """
    try:
        state = fsdp_module._get_fsdp_state()  # type: ignore[operator]
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        return any(not group.is_sharded for group in groups)
    except (AttributeError, AssertionError, RuntimeError):  # pragma: no cover - other torch
        return False


def check_sharded(api: str, module: nn.Module) -> None:
    """Reject an FSDP2 model that holds gathered (unsharded) parameters, with the fix."""
    for name, fsdp_module in fsdp_modules(module):
        if _unsharded(fsdp_module):
            raise ValueError(
                f"{api}: unsharded FSDP2 parameters at {name!r}: expected the sharded DTensor "
                "parameters, got the gathered full tensors that fully_shard leaves registered "
                "after a forward without backward (e.g. an evaluation under torch.no_grad()). "
                "Call model.reshard() first: it frees the gathered copies and communicates "
                "nothing; the next forward gathers again."
            )


def reshard(module: nn.Module) -> None:
    """Reshard every FSDP2 module of ``module`` (frees gathered copies; no communication)."""
    for _, fsdp_module in fsdp_modules(module):
        fsdp_module.reshard()  # type: ignore[operator]


def reject_fsdp(api: str, module: nn.Module, why: str, fix: str) -> None:
    """Raise for an FSDP2 model where ``api`` cannot work with one."""
    found = fsdp_modules(module)
    if found:
        name, fsdp_module = found[0]
        raise ValueError(
            f"{api}: FSDP2 module at {name!r}: expected a module that is not sharded with "
            f"fully_shard, got {type(fsdp_module).__name__}. {why} {fix}"
        )


def reject_fsdp1(api: str, module: nn.Module) -> None:
    """Raise for an FSDP1 ``FullyShardedDataParallel`` wrapper (flat parameters)."""
    _, fsdp1 = _fsdp_types()
    if fsdp1 is not None and isinstance(module, fsdp1):
        raise ValueError(
            f"{api}: wrapped model at '<root>': expected the model itself, got "
            "FullyShardedDataParallel, whose parameters are flattened under the "
            "'_fsdp_wrapped_module.' prefix. Shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard): its DTensor parameters keep their names "
            "and the EMA keeps them sharded, with no communication per update."
        )


APPLY_FIX = (
    "Swap the averages into the sharded parameters in place instead: "
    "`with fe.swapped(model, params, buffers): model(x)` (or, with the adapter, "
    "`with ema.swap(): model(x)` or ema.eval(); ema(x))."
)
"""The fix named when ``functional_call`` is asked to run an FSDP2 module."""

APPLY_WHY = (
    "fully_shard's pre-forward hooks register the module's own gathered parameters, so "
    "torch.func.functional_call would silently evaluate the live weights, not the given ones."
)


# --- public helpers ----------------------------------------------------------------------


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
    from functional_ema._checkpoint import SwapGuard
    from functional_ema._module import _check_keys, check_unwrapped, module_state
    from functional_ema._tree import check_pair

    api = "swapped"
    check_unwrapped(api, model)
    reshard(model)
    live_params, live_buffers = module_state(model)
    if buffers is None:
        _check_keys(api, model, params, live_buffers)
        given = dict(params)
    else:
        _check_keys(api, model, params, buffers)
        given = {**params, **buffers}
    everything = {**live_params, **live_buffers}
    live = {name: everything[name] for name in given}
    targets, values, _ = check_pair(api, live, given, ("model", "params"))
    targets, values, _ = localize(api, live, targets, values, ("model", "params"))
    with torch.no_grad():
        backup = [t.clone() for t in targets]
    guard = SwapGuard(model)
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


def _state_dict_names(model: nn.Module) -> dict[str, str]:
    """``model.state_dict()``'s keys, each mapped to its :func:`module_state` name.

    Tied tensors appear under every name (as in ``state_dict``), mapped to the first;
    non-persistent buffers are left out. Computed from the module tree, without calling
    ``state_dict()`` (and its hooks).
    """
    canonical: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        canonical.setdefault(id(tensor), name)
    names: dict[str, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                names[dot + name] = canonical[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                names[dot + name] = canonical[id(buffer)]
    return names


def full_state_dict(
    model: nn.Module, params: Params, buffers: Buffers | None = None, *, rank: int | None = 0
) -> dict[str, Tensor]:
    """Gather (sharded) averages into one full state dict of ``model``, for inference.

    Every rank must call it (each sharded leaf is gathered with one all-gather, in the same
    order everywhere); rank ``rank`` gets the full tensors, on the CPU, under the keys of
    ``model.state_dict()`` (tied weights under each name, non-persistent buffers left out),
    so ``torch.save`` of it loads into a plain, unsharded model with
    ``load_state_dict(strict=True)``. Other ranks get ``{}`` and hold at most one gathered
    leaf at a time. Plain tensors are copied as they are; dtypes are kept (load_state_dict
    casts to the model's).

    Args:
        model: The live model (FSDP2 or not), for its names.
        params: The averages keyed by module names (e.g. :func:`average` of the state, or
            ``ema.state()["params"]``); DTensors or plain tensors.
        buffers: The held buffers and frozen parameters (``state["buffers"]``); ``None``
            takes the model's own (gathered where sharded).
        rank: The rank that keeps the result; ``None`` keeps it on every rank.

    Returns:
        ``dict[str, Tensor]`` of full CPU tensors on rank ``rank``, ``{}`` elsewhere.

    Raises:
        ValueError: Names missing, unexpected or given twice.

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(*fe.module_state(model))
        >>> full = fe.full_state_dict(model, fe.average(state), state["buffers"])
        >>> torch.nn.Linear(2, 1).load_state_dict(full, strict=True)
        <All keys matched successfully>
    """
    from functional_ema._module import _check_keys, check_unwrapped, module_state

    api = "full_state_dict"
    check_unwrapped(api, model)
    if buffers is None:
        buffers = module_state(model)[1]
    _check_keys(api, model, params, buffers)
    values = {**params, **buffers}
    keep = rank is None or not (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() != rank
    )
    dtensor = _dtensor_type()
    gathered: dict[str, Tensor] = {}
    with torch.no_grad():
        for name in sorted(values):  # the same order on every rank
            tensor = values[name]
            if dtensor is not None and isinstance(tensor, dtensor):
                full = tensor.full_tensor()  # one all-gather
            elif keep:
                full = tensor
            else:
                continue
            if keep:
                gathered[name] = full.to("cpu", copy=True)
            del full
    if not keep:
        return {}
    return {key: gathered[name] for key, name in _state_dict_names(model).items()}
