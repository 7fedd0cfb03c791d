"""Every private PyTorch API the library touches, one function each, each probed once.

Private APIs change without notice between torch releases. Here each one sits behind a
function with a documented fallback that keeps results correct (only slower) when the API is
missing or behaves differently; nothing else in the package reaches into ``torch._*``
internals. A probe runs at most once per process, on first use (importing
``torch._inductor`` costs seconds, so nothing is probed at import time); :data:`PROBES`
lists them, and tests force each one off to run its fallback.

========================  ====================================================================
probe                     fallback when it fails
========================  ====================================================================
``functorch``             every tensor counts as wrapped by a ``torch.func`` transform: no
                          host reads of tensor values, no engine fast path (same bits)
``storage_use_count``     no reference counts: the adapter watches every tensor's pointer
``foreach_copy``          one ``copy_`` per tensor
``standalone_compile``    ``torch.compile`` builds the update kernels
``precision_casts``       no compiled kernels (Inductor could not round like eager): eager
``fsdp_state``            an FSDP2 module's gathered state cannot be read; the update's
                          DTensor check still rejects gathered parameters
========================  ====================================================================
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


PROBES = (
    "functorch",
    "storage_use_count",
    "foreach_copy",
    "standalone_compile",
    "precision_casts",
    "fsdp_state",
)
"""The names :func:`available` answers for."""

_forced_off: set[str] = set()


def available(probe: str) -> bool:
    """Whether the private API behind ``probe`` is usable here (probed once, then cached)."""
    if probe not in PROBES:
        raise ValueError(f"_compat.available: unknown probe {probe!r}: expected one of {PROBES}.")
    return probe not in _forced_off and _probe(probe)


_IS_WRAPPED: Callable[[Tensor], bool] | None = getattr(
    torch._C._functorch, "is_functorch_wrapped_tensor", None
)
_USE_COUNT: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
_FOREACH_COPY: Callable[[list[Tensor], list[Tensor]], None] | None = getattr(
    torch, "_foreach_copy_", None
)


@functools.cache
def _probe(probe: str) -> bool:
    if probe == "functorch":
        return callable(_IS_WRAPPED)
    if probe == "storage_use_count":
        return callable(_USE_COUNT) and hasattr(torch.UntypedStorage(0), "_cdata")
    if probe == "foreach_copy":
        return callable(_FOREACH_COPY)
    if probe in ("standalone_compile", "precision_casts"):
        # Seconds to import: probed on the first compile only.
        inductor = importlib.import_module("torch._inductor")
        if probe == "standalone_compile":
            return callable(getattr(inductor, "standalone_compile", None))
        config = importlib.import_module("torch._inductor.config")
        return hasattr(config, "emulate_precision_casts")
    # fsdp_state: FSDP2's module state exposes its parameter groups' sharding. Probed only
    # once an FSDP2 module exists, so torch.distributed.fsdp is imported already.
    try:
        fsdp = importlib.import_module("torch.distributed.fsdp")
    except ImportError:
        return False
    return hasattr(getattr(fsdp, "FSDPModule", None), "_get_fsdp_state")


class forced_off:
    """Context manager that makes :func:`available` answer ``False`` for ``probes`` (tests).

    Example:
        >>> from functional_ema import _compat
        >>> with _compat.forced_off("foreach_copy"):
        ...     _compat.available("foreach_copy")
        False
    """

    def __init__(self, *probes: str) -> None:
        for probe in probes:
            available(probe)  # validates the name
        self.probes = set(probes) - _forced_off

    def __enter__(self) -> None:
        _forced_off.update(self.probes)

    def __exit__(self, *exc: object) -> None:
        _forced_off.difference_update(self.probes)


def is_functorch_wrapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is seen through a ``torch.func`` transform (vmap, grad) or traced.

    Fallback: ``True`` (a wrapped tensor is never read on the host nor updated by the engine).
    """
    if _IS_WRAPPED is None or (_forced_off and "functorch" in _forced_off):
        return True
    return bool(_IS_WRAPPED(tensor))


def storage_key(tensor: Tensor) -> tuple[int, int, int]:
    """A storage's identity: its ``StorageImpl`` address, data pointer and size in bytes.

    Fallback (no ``_cdata``): the Python storage object's id stands for the address.
    """
    storage = tensor.untyped_storage()
    address = storage._cdata if available("storage_use_count") else id(storage)
    return address, storage.data_ptr(), storage.nbytes()


def storage_use_count(storage: torch.UntypedStorage) -> int | None:
    """How many tensors and storages share ``storage`` (``None``: not readable here)."""
    if _USE_COUNT is None or not available("storage_use_count"):
        return None
    return int(_USE_COUNT(storage._cdata))


def foreach_copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, in one multi-tensor operation where available."""
    if _FOREACH_COPY is not None and not (_forced_off and "foreach_copy" in _forced_off):
        _FOREACH_COPY(list(targets), list(sources))
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


Kernel = Callable[..., list[Tensor]]


def standalone_compile(fn: Kernel, examples: tuple[Tensor, ...]) -> Kernel:
    """Inductor's compiled ``fn`` for any input sizes, without Dynamo, rounding like eager.

    ``fn`` is traced with symbolic shapes (``make_fx``) and compiled once by
    ``torch._inductor.standalone_compile``: a call costs a fraction of a ``torch.compile``'d
    function's (no frame evaluation or guards). ``emulate_precision_casts`` rounds every
    intermediate to its dtype as eager does, so bfloat16/float16 results keep their bits.

    Raises:
        RuntimeError: When either API is missing here (the caller falls back).
    """
    if not (available("standalone_compile") and available("precision_casts")):
        raise RuntimeError("torch._inductor.standalone_compile is not available")
    from torch.fx.experimental.proxy_tensor import make_fx

    # Traced through a lambda: an annotated function would put its return annotation (a
    # string) among the graph's globals, which Inductor's cache cannot key on.
    graph = make_fx(lambda *args: fn(*args), tracing_mode="symbolic")(*examples)
    for node in graph.graph.nodes:  # what standalone_compile reads the shapes from
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    inputs = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
    compile_graph = importlib.import_module("torch._inductor").standalone_compile
    return compile_graph(
        graph,
        inputs,
        dynamic_shapes="from_graph",
        options={"config_patches": {"emulate_precision_casts": True}},
    )


def dynamo_compile(fn: Kernel, examples: tuple[Tensor, ...]) -> Kernel:
    """``torch.compile`` of ``fn``, rounding like eager, compiled now on ``examples``.

    Raises:
        RuntimeError: When Inductor cannot round like eager here (the caller falls back).
    """
    if not available("precision_casts"):
        raise RuntimeError("Inductor's emulate_precision_casts is not available")
    compiled = torch.compile(
        fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
    )
    compiled(*examples)
    return compiled


def fsdp_unsharded(module: nn.Module) -> bool | None:
    """Whether an FSDP2 module has its gathered parameters registered instead of the shards.

    Reads FSDP2's parameter-group state. ``None`` when that state is not readable in this
    torch (the update's DTensor check still rejects gathered parameters, with the fix).
    """
    if not available("fsdp_state"):
        return None
    try:
        state = module._get_fsdp_state()  # type: ignore[operator]
    except (AttributeError, AssertionError, RuntimeError):
        return None
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    if not all(hasattr(group, "is_sharded") for group in groups):
        return None
    return any(not group.is_sharded for group in groups)
