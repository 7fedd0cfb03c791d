"""Module state as pytrees, forward passes on such trees (``functional_call``), full exports."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from functional_ema._dtensor import dtensor_type
from functional_ema._engine import pack
from functional_ema._errors import describe, prefix_hint, short_list, wrong_type, wrong_value
from functional_ema._fsdp import APPLY_FIX, APPLY_WHY, check_sharded, reject_fsdp, reject_fsdp1
from functional_ema._types import Buffers, Params


def check_unwrapped(api: str, module: nn.Module, name: str = "module") -> None:
    """Reject DDP / DataParallel / torch.compile / FSDP1 wrappers, whose names carry a prefix.

    ``name`` is the argument's name in messages.
    """
    if not isinstance(module, nn.Module):
        raise wrong_type(
            api,
            "not a module",
            name,
            "a torch.nn.Module",
            describe(module),
            "For a tree of tensors use init / update / ema_update directly.",
        )
    reject_fsdp1(api, module)
    if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
        prefix, fix = "module.", "model.module"
    elif type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        prefix, fix = "_orig_mod.", "model._orig_mod"
    else:
        return
    raise wrong_value(
        api,
        "wrapped model",
        "<root>",
        "the model itself",
        f"{type(module).__name__}, whose parameter names carry the {prefix!r} prefix",
        f"Pass `{fix}` instead (it shares the same parameters), so names and checkpoints match "
        "the bare model.",
    )


def check_materialised(api: str, module: nn.Module, fix: str) -> None:
    """Reject a lazy module whose parameters or buffers are not materialised yet."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if isinstance(tensor, UninitializedTensorMixin):
            raise wrong_value(
                api,
                "uninitialized lazy tensor",
                name,
                "a materialised tensor",
                f"an {type(tensor).__name__}",
                f"Run one forward pass on a real batch {fix}.",
            )


def module_state(module: nn.Module, *, trainable_only: bool = True) -> tuple[Params, Buffers]:
    """Pull a module's state into ``(params, buffers)`` dicts keyed by its own dotted names.

    ``params`` holds the trainable parameters (``requires_grad=True``), the ones TensorFlow
    averages; ``buffers`` holds every buffer (persistent or not) and, by default, the frozen
    parameters: they are not averaged but travel with the buffers, so a forward on the
    averages (:func:`apply`) still sees them. Tied weights appear once, under their first
    name; ``functional_call`` routes them to every use.

    The tensors are detached views that share storage with the module (no copy): they see
    later in-place updates of the optimizer. :func:`init` copies them. For an FSDP2
    (``fully_shard``) model they are the sharded DTensor parameters, and the EMA made from
    them stays sharded alike.

    Args:
        module: The model (not a DDP or ``torch.compile`` wrapper).
        trainable_only: With ``False``, frozen parameters are put in ``params`` too.

    Returns:
        ``(params, buffers)``, two ``dict[str, Tensor]``.

    Raises:
        ValueError: For a DDP, DataParallel, ``torch.compile`` or FSDP1 wrapper, a lazy
            module whose parameters are not initialised yet, or an FSDP2 model holding gathered
            parameters after a forward without backward (call ``model.reshard()`` first).

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> params, buffers = fe.module_state(model)
        >>> list(params)
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> list(buffers)
        ['1.running_mean', '1.running_var', '1.num_batches_tracked']
    """
    api = "module_state"
    check_unwrapped(api, module)
    check_sharded(api, module)
    params: Params = {}
    buffers: Buffers = {}
    check_materialised(api, module, "before creating the EMA")
    for name, param in module.named_parameters():
        target = params if param.requires_grad or not trainable_only else buffers
        target[name] = param.detach()
    for name, buffer in module.named_buffers():
        buffers[name] = buffer.detach()
    return params, buffers


def check_keys(api: str, module: nn.Module, params: Params, buffers: Buffers) -> None:
    """Check ``params`` and ``buffers`` name every tensor of ``module`` once, and nothing else."""
    fix = "Build it with functional_ema.module_state(model)."
    for label, tree in (("params", params), ("buffers", buffers)):
        if not isinstance(tree, dict):
            raise wrong_type(
                api,
                "not a dict of tensors",
                label,
                "a dict of tensors keyed by module names",
                describe(tree),
                fix,
            )
        for name, value in tree.items():
            if not isinstance(value, Tensor):
                raise wrong_type(
                    api,
                    f"non-tensor value in `{label}`",
                    str(name),
                    "a torch.Tensor",
                    describe(value),
                    fix,
                )
    both = set(params) & set(buffers)
    if both:
        raise wrong_value(
            api,
            "names given twice",
            "<root>",
            "each name in `params` or `buffers`",
            f"{short_list(both)} in both",
            "Remove the duplicates from one of them.",
        )
    required = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    known = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    known |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    given = set(params) | set(buffers)
    missing, extra = required - given, given - known
    if missing or extra:
        hint = prefix_hint(missing, extra, "the module", "`params`/`buffers`")
        raise wrong_value(
            api,
            f"names do not match {type(module).__name__}",
            "<root>",
            "every parameter and buffer name of the module",
            f"missing {short_list(missing)}, unexpected {short_list(extra)}",
            "Pass every parameter and buffer of the module (functional_ema.module_state gives "
            f"both).{hint}",
        )


def apply(module: nn.Module, params: Params, buffers: Buffers, /, *args: Any, **kwargs: Any) -> Any:
    """Run ``module`` on ``params`` and ``buffers`` instead of its own tensors.

    A checked ``torch.func.functional_call(module, (params, buffers), args, kwargs,
    strict=True)``: every parameter and buffer must be given (no silent fallback to the
    module's own tensors), tied weights are routed to every use, and the module itself is
    untouched. Modules that write buffers in training mode (BatchNorm) write into the tensors
    of ``buffers``: evaluate in ``eval()`` mode, as ``torch.func.functional_call`` documents.

    Args:
        module: The template module (its own tensors are not used).
        params: Parameters keyed by module names, e.g. :func:`average` of an EMA state.
        buffers: Buffers (and frozen parameters) keyed by module names.
        *args: Positional arguments of ``module.forward``.
        **kwargs: Keyword arguments of ``module.forward``.

    Returns:
        Whatever ``module.forward`` returns.

    Raises:
        ValueError: If names are missing, unexpected or given twice, or for an FSDP2
            (``fully_shard``) model, whose hooks would run its own weights: use
            :func:`swapped` there.

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> params, buffers = fe.module_state(model)
        >>> zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        >>> fe.apply(model, zeros, buffers, torch.ones(1, 2))
        tensor([[0.]])
    """
    api = "apply"
    check_unwrapped(api, module)
    reject_fsdp(api, module, APPLY_WHY, APPLY_FIX)
    check_keys(api, module, params, buffers)
    return torch.func.functional_call(
        module, (params, buffers), args, kwargs, tie_weights=True, strict=True
    )


def module_with(model: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    """A new module with ``model``'s structure holding copies of ``values`` (by module name).

    Every parameter and buffer is replaced by ``values[name]`` cast to its dtype and device
    (tied weights stay tied), so no live tensor is copied; parameters get
    ``requires_grad=False`` and the copy is returned in eval mode. ``model`` is not modified.
    """
    memo: dict[int, Any] = {}
    for name, param in model.named_parameters():
        value = values[name].to(device=param.device, dtype=param.dtype, copy=True)
        memo[id(param)] = nn.Parameter(value, requires_grad=False)
    for name, buffer in model.named_buffers():
        memo[id(buffer)] = values[name].to(device=buffer.device, dtype=buffer.dtype, copy=True)
    return copy.deepcopy(model, memo).eval()


def _packable(tensor: Tensor) -> bool:
    """Whether :func:`flatten_parameters_` moves ``tensor`` into the shared buffer.

    Only plain, non-empty, contiguous (in the default memory format) strided parameters are
    moved; the others keep their storage and strides.
    """
    return (
        type(tensor.data) is Tensor
        and tensor.layout == torch.strided
        and tensor.numel() > 0
        and tensor.is_contiguous()
    )


def _check_no_overlap(api: str, module: nn.Module, moved: set[int]) -> None:
    """Refuse to move a parameter whose memory another parameter or buffer also views.

    ``moved`` holds the ``id`` of the parameters about to be moved: moving one would split it
    from the tensor it shares memory with.
    """
    spans: list[tuple[str, int, int, str, bool]] = []  # device, first byte, end, name, moved
    seen: set[int] = set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) in seen or tensor.layout != torch.strided or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        if not tensor.numel() or type(tensor.data) is not Tensor:
            continue
        start = tensor.data_ptr()
        last = sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride(), strict=True))
        end = start + (last + 1) * tensor.element_size()
        spans.append((str(tensor.device), start, end, name, id(tensor) in moved))
    spans.sort()
    clusters: list[list[tuple[str, int, int, str, bool]]] = []
    device, reach = "", -1
    for span in spans:  # runs of spans that overlap one another
        if span[0] == device and span[1] < reach:
            clusters[-1].append(span)
        else:
            clusters.append([span])
            device = span[0]
        reach = span[2] if len(clusters[-1]) == 1 else max(reach, span[2])
    for cluster in clusters:
        for _, start, end, name, is_moved in cluster if len(cluster) > 1 else ():
            others = [s[3] for s in cluster if s[3] != name and s[1] < end and start < s[2]]
            if is_moved and others:
                raise wrong_value(
                    api,
                    "parameter sharing memory",
                    name,
                    "parameters that share no memory with another parameter or buffer",
                    f"memory shared with {others[0]!r}",
                    "Flattening would copy it apart from that tensor. Make them one parameter "
                    "(tie weights by assignment, `decoder.weight = encoder.weight`) or separate "
                    "tensors, or do not flatten this model.",
                )


@torch.no_grad()
def flatten_parameters_(module: nn.Module) -> nn.Module:
    """Make the module's parameters views of one buffer per (device, dtype).

    The parameters keep their identity, names, values, strides and ``requires_grad``; only
    their storage moves. Trainable parameters are laid out in the order the EMA visits them
    (sorted by name, optree's dict order), followed by the frozen parameters (sorted by
    name), so an EMA of the module updates each (device, dtype) group as one region: one
    kernel instead of one per tensor, at the memory-bandwidth limit.

    Left where they are:

    - **Buffers.** Modules resize or reassign them (quantization observers ``resize_`` their
      empty ``min_val`` / ``max_val``; a counter may be ``self.calls = self.calls + 1``),
      which a view of a shared buffer cannot take: it would grow into its neighbours. The
      EMA copies buffers where they are.
    - **Empty parameters**: nothing to lay out, and a view would ``resize_`` into its
      neighbours.
    - **Parameters that are not contiguous**: ``channels_last`` weights (kernels larger than
      1x1) or any other strides keep their storage and memory format. Such a trainable
      parameter splits its group's region in two; the EMA still updates it in place.
    - Parameters that are tensor subclasses or sparse.

    Call it once, after moving the model to its device and dtype and **before creating the
    optimizer**. Safe with ordinary training, gradient clipping, ``state_dict`` /
    ``load_state_dict`` of the whole model (which copy in place) and DDP wrapped afterwards.
    Undone by anything that replaces parameter storage: ``model.to(...)``, ``.half()``,
    ``.cuda()`` (call it again afterwards), ``p.data = ...``, FSDP (which manages parameter
    storage itself). Nothing breaks then: the EMA checks every tensor's storage, offset,
    shape, strides, dtype and device at each update and takes its per-tensor path where the
    layout is gone. (A parametrization or weight norm added later renames the parameter: an
    EMA made before refuses to update, naming it.)

    Saving a submodule: its ``state_dict()`` holds views of the shared buffer, and
    ``torch.save`` writes a view's whole storage, so ``torch.save(model.encoder.state_dict())``
    writes every parameter of the model. Clone first,
    ``torch.save({k: v.clone() for k, v in sub.state_dict().items()}, path)``, or save the
    whole model's ``state_dict()`` (its parameters share the one storage, written once).

    Args:
        module: The model (not a DDP or ``torch.compile`` wrapper).

    Returns:
        ``module`` itself.

    Raises:
        ValueError: For a wrapper, an uninitialized lazy module, an FSDP2 model, or a
            parameter whose memory another parameter or buffer also views (moving it would
            split them); nothing is moved then.

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> before = [p.clone() for p in model.parameters()]
        >>> _ = fe.flatten_parameters_(model)
        >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
        True
        >>> len({p.untyped_storage().data_ptr() for p in model.parameters()})
        1
    """
    api = "flatten_parameters_"
    check_unwrapped(api, module)
    reject_fsdp(
        api,
        module,
        "fully_shard owns the parameters' storage.",
        "Skip this call: the averages of an FSDP2 model are already laid out contiguously.",
    )
    check_materialised(api, module, "before flattening")
    named = sorted(module.named_parameters(), key=lambda item: item[0])
    # Trainable parameters first (the region the EMA averages), then the frozen ones.
    ordered = [p for _, p in named if p.requires_grad] + [
        p for _, p in named if not p.requires_grad
    ]
    moved = [p for p in ordered if _packable(p)]
    _check_no_overlap(api, module, {id(p) for p in moved})
    for tensor, view in zip(moved, pack(moved), strict=True):
        # Same strides as before: a contiguous tensor may have any stride on a size-1 dim
        # (a 1x1 channels_last kernel), and its elements sit in the same order either way.
        tensor.data = view.as_strided(tensor.shape, tensor.stride(), view.storage_offset())
    return module


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
            takes the model's own (gathered where sharded), and so do frozen parameters
            missing from it (an ``EMA`` holds none).
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
    api = "full_state_dict"
    check_unwrapped(api, model, "model")
    own = module_state(model)[1]
    if buffers is None:
        buffers = own
    else:  # frozen parameters the caller does not hold (an EMA's): the model's own
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        kept = {n: own[n] for n in frozen if n not in params and n not in buffers}
        buffers = {**kept, **buffers} if isinstance(buffers, dict) else buffers
    check_keys(api, model, params, buffers)
    values = {**params, **buffers}
    keep = rank is None or not (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() != rank
    )
    dtensor = dtensor_type()
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
