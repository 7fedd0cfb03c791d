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
``tensor_guards``         the adapter's per-update check of every tensor's dtype, device,
                          shape, strides and ``requires_grad`` runs in Python (same answer,
                          slower on models of many tensors)
``foreach_copy``          one ``copy_`` per tensor
``nested_views``          the views of a packed buffer are made one by one in Python (one
                          ``slice`` and one ``view`` dispatched per tensor instead of two in all)
``chunk_cat``             a gather copies through views of its buffer (:func:`views_of`, then
                          one multi-tensor copy), as plans that run again always do
``unflatten_dense``       views shaped like given tensors are made by :func:`views_of` (a nested
                          tensor and ``unbind``: a few operations, slower in C++ for thousands)
``standalone_compile``    ``torch.compile`` builds the update kernels
``precision_casts``       no compiled kernels (Inductor could not round like eager): eager
``compile_lock``          kernel builds do not hold Dynamo's compile lock (a ``torch.compile``
                          in another thread may compile at the same time)
``dynamo_counters``       Dynamo's compile counters are unreadable: torch's compiler counts as
                          in use once imported, so updates wait for their kernel's build
``fsdp_state``            an FSDP2 module's gathered state cannot be read; the update's
                          DTensor check still rejects gathered parameters
========================  ====================================================================
"""

from __future__ import annotations

import array
import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, chain
from typing import Any

import torch
from torch import Tensor, nn


PROBES = (
    "functorch",
    "tensor_guards",
    "foreach_copy",
    "nested_views",
    "chunk_cat",
    "unflatten_dense",
    "standalone_compile",
    "precision_casts",
    "compile_lock",
    "dynamo_counters",
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
_TENSOR_GUARDS: Callable[..., object] | None = getattr(
    getattr(getattr(torch._C, "_dynamo", None), "guards", None), "TensorGuards", None
)
_FOREACH_COPY: Callable[[list[Tensor], list[Tensor]], None] | None = getattr(
    torch, "_foreach_copy_", None
)
_NESTED_VIEW: Callable[..., Tensor] | None = getattr(torch, "_nested_view_from_buffer", None)
_CHUNK_CAT: Callable[..., Tensor] | None = getattr(torch, "_chunk_cat", None)
_UNFLATTEN: Callable[..., Sequence[Tensor]] | None = getattr(
    getattr(torch._C, "_nn", None), "unflatten_dense_tensors", None
)


@functools.cache
def _probe(probe: str) -> bool:
    if probe == "functorch":
        return callable(_IS_WRAPPED)
    if probe == "tensor_guards":
        return _guards_work()
    if probe == "foreach_copy":
        return callable(_FOREACH_COPY)
    if probe == "nested_views":
        return _nested_views_work()
    if probe == "chunk_cat":
        return _chunk_cat_works()
    if probe == "unflatten_dense":
        return _unflatten_works()
    if probe in ("standalone_compile", "precision_casts"):
        # Seconds to import: probed on the first compile only, on the kernels' build thread.
        inductor = importlib.import_module("torch._inductor")
        if probe == "standalone_compile":
            return callable(getattr(inductor, "standalone_compile", None))
        config = importlib.import_module("torch._inductor.config")
        return hasattr(config, "emulate_precision_casts")
    if probe == "compile_lock":  # imports Dynamo: probed on the kernels' build thread only
        lock = getattr(importlib.import_module("torch._dynamo.convert_frame"), "compile_lock", None)
        return hasattr(lock, "__enter__") and hasattr(lock, "__exit__")
    if probe == "dynamo_counters":  # asked by compiler_idle only once Dynamo is imported
        counters = getattr(importlib.import_module("torch._dynamo.utils"), "counters", None)
        return callable(getattr(counters, "values", None))
    # fsdp_state: FSDP2's module state exposes its parameter groups' sharding. Probed only
    # once an FSDP2 module exists, so torch.distributed.fsdp is imported already.
    try:
        fsdp = importlib.import_module("torch.distributed.fsdp")
    except ImportError:
        return False
    return hasattr(getattr(fsdp, "FSDPModule", None), "_get_fsdp_state")


def forced() -> frozenset[str]:
    """The probes :class:`forced_off` turns off now (plans built under them differ)."""
    return frozenset(_forced_off)


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


def any_functorch_wrapped(tensors: Sequence[Tensor]) -> bool:
    """:func:`is_functorch_wrapped` of any of ``tensors`` (one pass in C)."""
    if _IS_WRAPPED is None or (_forced_off and "functorch" in _forced_off):
        return bool(tensors)
    return any(map(_IS_WRAPPED, tensors))


TensorCheck = Callable[[Sequence[Tensor]], bool]
"""Answers whether tensors still have the metadata some reference tensors had."""


def _guards_for(tensors: Sequence[Tensor]) -> TensorCheck:
    """Dynamo's C++ ``TensorGuards`` over ``tensors``, with static sizes and strides."""
    assert _TENSOR_GUARDS is not None
    guards: Any = _TENSOR_GUARDS(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    )
    return lambda current: bool(guards.check(*current))


def tensor_layout(tensor: Tensor) -> tuple[object, ...]:
    """What a plan reading ``tensor`` depends on, but its storage.

    :func:`tensor_check`'s metadata without ``requires_grad`` (nor the thread's dispatch
    state, which the C++ guards also compare): a check that fails while these hold can be
    made again.
    """
    return (
        type(tensor),
        tensor.dtype,
        tensor.device,
        tensor.shape,
        tensor.stride(),
        tensor.is_neg(),
        tensor.is_conj(),
    )


def _metadata(tensor: Tensor) -> tuple[object, ...]:
    return (*tensor_layout(tensor), tensor.requires_grad)


def _python_check(tensors: Sequence[Tensor]) -> TensorCheck:
    expected = [_metadata(t) for t in tensors]
    return lambda current: [_metadata(t) for t in current] == expected


def _guards_work() -> bool:
    """Whether ``TensorGuards`` exists and tells the changes the adapter relies on."""
    if not callable(_TENSOR_GUARDS):
        return False
    try:
        base = torch.zeros(2, 3)
        check = _guards_for([base])
        changed = [base.t(), base[:1], base.double(), base.requires_grad_(False).view(3, 2)]
        return check([base]) and not any(check([t]) for t in changed)
    except Exception:  # any change of the private API: use the Python check
        return False


def tensor_check(tensors: Sequence[Tensor]) -> TensorCheck:
    """A check that tensors (in the same order) have ``tensors``' metadata now.

    The metadata: type, dtype, device, shape, strides and ``requires_grad``; storage and
    offset are the caller's (data pointers). Uses Dynamo's C++ tensor guards (tens of
    nanoseconds per tensor). Fallback: the same comparison in Python.
    """
    if available("tensor_guards"):
        return _guards_for(tensors)
    return _python_check(tensors)


def foreach_copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, in one multi-tensor operation where available."""
    if _FOREACH_COPY is not None and not (_forced_off and "foreach_copy" in _forced_off):
        _FOREACH_COPY(list(targets), list(sources))
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def any_lazy(tensors: Sequence[Tensor]) -> bool:
    """Whether any tensor is a lazily negated or conjugated view: two passes in C."""
    return any(map(Tensor.is_neg, tensors)) or any(map(Tensor.is_conj, tensors))


def gather_into(buffer: Tensor, sources: Sequence[Tensor]) -> None:
    """Copy ``sources`` back to back into the 1-D ``buffer``, each in its logical order.

    ``buffer`` holds exactly their elements, in their dtype. One dispatched operation
    (``torch._chunk_cat``, which reads any strides, and lazily negated or conjugated views
    on the CPU; elsewhere those take the fallback) however many sources, and no views made:
    cheaper than :func:`views_of` plus :func:`foreach_copy_` for a gather that runs once (a
    pure or functional update), dearer for one that runs again (an adapter's kept plan),
    whose views are made once. Fallback: those views and that copy.
    """
    parts = list(sources)
    lazy = buffer.device.type != "cpu" and any_lazy(parts)  # the probe saw the CPU's kernel
    if parts and not lazy and available("chunk_cat"):
        assert _CHUNK_CAT is not None
        if not all(map(Tensor.dim, parts)):  # 0-dim values: ``_chunk_cat`` wants a dimension
            parts = [p.view(1) if not p.dim() else p for p in parts]
        try:
            _CHUNK_CAT(parts, 0, 1, out=buffer.view(1, -1))
            return
        except (RuntimeError, TypeError, ValueError):  # e.g. a device without the kernel
            pass
    foreach_copy_(views_of(buffer, [s.shape for s in sources]), sources)


def views_like(buffer: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Contiguous views of the 1-D ``buffer`` shaped like ``tensors``, back to back from 0.

    One C++ loop (``torch._C._nn.unflatten_dense_tensors``, what DDP uses): faster than
    :func:`views_of` on a CPU, but two dispatched operations per tensor, so not for the
    accelerators' strategy. An empty tensor may get a new empty tensor rather than a view.
    Fallback: :func:`views_of`.
    """
    if len(tensors) > 2 and available("unflatten_dense"):
        assert _UNFLATTEN is not None
        try:
            return list(_UNFLATTEN(buffer, list(tensors)))
        except (RuntimeError, TypeError, ValueError):
            pass
    return views_of(buffer, [t.shape for t in tensors])


def _unflatten_works() -> bool:
    """Whether ``unflatten_dense_tensors`` gives the views :func:`views_of` makes."""
    if _UNFLATTEN is None:
        return False
    buffer = torch.arange(20.0)[2:]
    like = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(()), torch.zeros(3, 1).t()]
    try:
        got = list(_UNFLATTEN(buffer, like))
    except Exception:
        return False
    return _same_views(got, buffer, [t.shape for t in like])


def _chunk_cat_works() -> bool:
    """Whether ``torch._chunk_cat`` gathers in logical order (strides, 1-D and 2-D values)."""
    if _CHUNK_CAT is None:
        return False
    sources = [torch.arange(6.0).view(2, 3).t(), torch.arange(3.0), torch.arange(8.0)[::2]]
    want = torch.cat([s.reshape(-1) for s in sources])
    out = torch.full((want.numel(),), -1.0)
    try:
        _CHUNK_CAT(sources, 0, 1, out=out.view(1, -1))
    except Exception:
        return False
    return bool(torch.equal(out, want))


def _python_views(buffer: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    views, offset = [], 0
    for shape in shapes:
        numel = shape.numel()
        views.append(buffer[offset : offset + numel].view(shape))
        offset += numel
    return views


def _nested_views(buffer: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """:func:`views_of` in a few dispatched operations per number of dimensions.

    A strided nested tensor over ``buffer`` (one per ndim: its components share one) whose
    ``unbind`` makes every view in one C++ loop. The metadata is built in C passes (no
    Python per view).
    """
    assert _NESTED_VIEW is not None
    base = int(buffer.storage_offset())  # nested offsets count from the storage's start
    offsets: list[int] = list(accumulate(map(torch.Size.numel, shapes), initial=base))
    ndims = list(map(len, shapes))
    if ndims and min(ndims) == max(ndims):  # one group: the common case (and with ``pad``)
        groups: dict[int, list[int]] = {ndims[0]: list(range(len(shapes)))}
    else:
        groups = {}
        for index, ndim in enumerate(ndims):
            groups.setdefault(ndim, []).append(index)
    out: list[Tensor | None] = [None] * len(shapes)
    strides: dict[torch.Size, tuple[int, ...]] = {}
    for ndim, indices in groups.items():
        if ndim == 0:  # a nested tensor needs a dimension: ``unbind`` runs of 0-dim views
            run: list[int] = []
            for index in [*indices, -1]:
                if run and (index < 0 or offsets[index] != offsets[run[-1]] + 1):
                    start, stop = offsets[run[0]] - base, offsets[run[-1]] + 1 - base
                    for at, view in zip(run, buffer[start:stop].unbind(), strict=True):
                        out[at] = view
                    run = []
                run.append(index)
            continue
        picked = [shapes[i] for i in indices]
        for shape in set(picked):
            strides[shape] = _contiguous_strides(shape)
        nested = _NESTED_VIEW(
            buffer,
            _int64(chain.from_iterable(picked), ndim),
            _int64(chain.from_iterable(map(strides.__getitem__, picked)), ndim),
            _int64([offsets[i] for i in indices]),
        )
        for index, view in zip(indices, nested.unbind(), strict=True):
            out[index] = view
    return out  # type: ignore[return-value]


def _int64(values: Iterable[int], columns: int = 0) -> Tensor:
    """A CPU int64 tensor of ``values`` (rows of ``columns``), without a dispatched copy."""
    flat = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    return flat.view(-1, columns) if columns else flat


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(strides[::-1])


def _nested_views_work() -> bool:
    """Whether nested views give exactly the Python views (sizes, strides, offsets, storage)."""
    if _NESTED_VIEW is None:
        return False
    buffer = torch.arange(20.0)
    shapes = [torch.Size(s) for s in ((2, 3), (4,), (1, 2, 2), (0, 3), (3, 1))]
    try:
        got = _nested_views(buffer, shapes)
    except Exception:
        return False
    return _same_views(got, buffer, shapes)


def _same_views(got: Sequence[Tensor], buffer: Tensor, shapes: Sequence[torch.Size]) -> bool:
    """Whether ``got`` are exactly the Python views of ``buffer``, shaped ``shapes``.

    Sizes, strides, offsets, storage and type: what a probe of a faster way checks.
    """
    want = _python_views(buffer, shapes)
    return len(got) == len(want) and all(
        g.shape == w.shape
        and g.stride() == w.stride()
        and g.storage_offset() == w.storage_offset()
        and g.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        and type(g) is Tensor
        for g, w in zip(got, want, strict=True)
    )


def views_of(buffer: Tensor, shapes: Sequence[torch.Size], *, pad: bool = False) -> list[Tensor]:
    """Contiguous views of the 1-D ``buffer``, shaped ``shapes``, back to back from offset 0.

    Made in a few dispatched operations however many there are (the engine's budget), else
    one by one. ``pad``: the views may have extra leading dimensions of size 1 (targets
    of a copy, which broadcasts): then they are made together whatever their shapes.
    """
    if len(shapes) > 2 and buffer.numel() and available("nested_views"):
        if pad:
            ndim = max(1, *map(len, shapes))
            padded = {s: torch.Size((1,) * (ndim - len(s)) + tuple(s)) for s in set(shapes)}
            shapes = list(map(padded.__getitem__, shapes))
        try:
            return _nested_views(buffer, shapes)
        except (RuntimeError, TypeError, ValueError):  # e.g. a device nested tensors lack
            pass
    return _python_views(buffer, shapes)


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


def compile_lock() -> contextlib.AbstractContextManager[object]:
    """Dynamo's compile lock, which ``torch.compile`` holds while it compiles a frame.

    A kernel build holds it, so a ``torch.compile`` in another thread never compiles at the
    same time (torch's compilers share process-wide state). Imports Dynamo: call it on the
    kernels' build thread. Fallback: no lock.
    """
    if not available("compile_lock"):
        return contextlib.nullcontext()
    lock: contextlib.AbstractContextManager[object] = sys.modules[
        "torch._dynamo.convert_frame"
    ].compile_lock
    return lock


def compile_count() -> int | None:
    """How many compiles Dynamo has counted in this process, without importing anything.

    The sum of Dynamo's counters (frames, graphs, AOTAutograd and Inductor compiles; none
    moves unless something is compiled: ``optimizer.step()`` imports Dynamo without counting,
    and ``torch._dynamo.reset()`` keeps the counts). 0 while Dynamo is not imported.
    Fallback (``dynamo_counters`` off): ``None`` once Dynamo is imported (unknown).
    """
    if "torch._dynamo" not in sys.modules:
        return 0
    if "torch._dynamo.utils" not in sys.modules or not available("dynamo_counters"):
        return None
    counters = sys.modules["torch._dynamo.utils"].counters
    try:
        return sum(sum(counts.values()) for counts in list(counters.values()))
    except (AttributeError, TypeError, RuntimeError):  # another layout, or changed while read
        return None


def dynamo_compile(fn: Kernel, examples: tuple[Tensor, ...]) -> Kernel:
    """``torch.compile`` of ``fn``, rounding like eager, compiled now on ``examples``.

    Each build compiles a copy of ``fn`` with its own code object: Dynamo keeps its compiled
    graphs per code object, so kernels built for several dtypes would otherwise share (and
    exhaust) one recompile limit. A call that Dynamo cannot serve any more (e.g. a shape
    past the recompile limit raises under ``fullgraph=True``) runs ``fn`` eagerly instead,
    the same operations, so the same bits, and every later call too.

    Raises:
        RuntimeError: When Inductor cannot round like eager here (the caller falls back).
    """
    if not available("precision_casts"):
        raise RuntimeError("Inductor's emulate_precision_casts is not available")
    own = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    compiled = torch.compile(
        own, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
    )
    compiled(*examples)
    broken: list[BaseException] = []

    def kernel(*args: Tensor) -> list[Tensor]:
        if not broken:
            try:
                return compiled(*args)
            except Exception as error:  # raised before the graph ran: nothing written
                broken.append(error)
        return fn(*args)

    return kernel


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
