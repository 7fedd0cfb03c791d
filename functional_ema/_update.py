"""One EMA update of a state: validated once, then applied purely or in place.

:func:`validate` does every structure, shape, device and dtype check and returns a
:class:`Bound`, the pairing of a state with the tensors that update it. :func:`apply` returns
a new state from it; :func:`apply_` writes into the state's tensors, through the engine's
plan (built on its first use and kept, so re-applying a cached ``Bound``, as the ``EMA``
adapter does while the model's tensors stay the same, costs no Python work per leaf). Both
call the TF step of ``_arith``; the per-call arguments (decay, ``dt``, policy) are checked
before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any, cast

import optree
import torch
from optree import PyTreeSpec
from torch import Tensor

from functional_ema._arith import average_leaf, copy_leaf, is_inexact, keep_finite
from functional_ema._compat import forced
from functional_ema._core import (
    WeightCache,
    check_policy,
    raise_if_nonfinite,
    split_by_kind,
    updated_leaves,
)
from functional_ema._decay import check_interval, resolve_decay, steps_covered
from functional_ema._dtensor import TensorRecord, data_ptrs, local_leaves, localize, rewrap
from functional_ema._engine import (
    Plan,
    all_finite,
    build_plan,
    copies,
    fast_path_ok,
    pure_path_ok,
    strategy_setting,
)
from functional_ema._errors import check_choice, describe, wrong_type, wrong_value
from functional_ema._state import EmaState, check_state_structure
from functional_ema._tree import check_pair
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule, TensorTree


@dataclass
class Bound:
    """A validated pairing of a state with the tensors that update it (see :func:`validate`).

    ``shadow``/``values`` are the leaves of ``state["params"]`` and of the params (local
    shards for DTensors; ``templates`` keeps the DTensors to wrap pure results in),
    ``held``/``current`` those of the buffers (empty without buffers).
    """

    api: str
    state: EmaState
    buffer_policy: BufferPolicy
    shadow: list[Tensor]
    values: list[Tensor]
    spec: PyTreeSpec
    templates: list[object] | None
    held: list[Tensor]
    current: list[Tensor]
    buffer_spec: PyTreeSpec | None
    buffer_templates: list[object] | None

    @functools.cached_property
    def plan(self) -> Plan | None:
        """The engine's in-place plan, or ``None`` where the engine cannot be used."""
        tensors = [*self.shadow, *self.values, *self.held, *self.current]
        if "biased" in self.state or not fast_path_ok(*tensors):
            return None
        return self.params_plan.merged(self.buffers_plan)

    @functools.cached_property
    def params_plan(self) -> Plan:
        """The part of :attr:`plan` over the parameters (kept by :meth:`with_buffers`)."""
        averaged, copied = split_by_kind(list(zip(self.shadow, self.values, strict=True)))
        return build_plan(averaged, copied)

    @functools.cached_property
    def buffers_plan(self) -> Plan:
        """The part of :attr:`plan` over the buffers."""
        pairs = list(zip(self.held, self.current, strict=True))
        if self.buffer_policy == "copy":
            return build_plan([], pairs)
        averaged, copied = split_by_kind(pairs)
        return build_plan(averaged, copied)

    def with_buffers(self, held: TensorTree, buffers: TensorTree) -> Bound:
        """This pairing with other buffers, checked; the parameters' part is kept as is.

        For a model whose forward reassigns a buffer: only the buffers are checked and
        planned again. ``held`` is the state's buffer tree (it may hold new tensors).
        """
        names = ("state['buffers']", "buffers")
        held_leaves, current, spec = check_pair(self.api, held, buffers, names)
        held_leaves, current, templates = localize(self.api, held, held_leaves, current, names)
        new = dataclasses.replace(
            self,
            state={**self.state, "buffers": held},
            held=held_leaves,
            current=current,
            buffer_spec=spec,
            buffer_templates=templates,
        )
        if "params_plan" in self.__dict__:
            new.__dict__["params_plan"] = self.__dict__["params_plan"]
        return new


def check_argument_order(api: str, decay: object, buffers: object) -> None:
    """Name the habit of passing the buffers third and the decay fourth."""
    number = isinstance(buffers, int | float) and not isinstance(buffers, bool)
    scalar = isinstance(buffers, Tensor) and buffers.ndim == 0 and buffers.is_floating_point()
    decay_like = isinstance(decay, int | float | Tensor) or callable(decay)
    if (number or scalar) and not decay_like:
        raise wrong_type(
            api,
            "decay and buffers swapped",
            "buffers",
            "the buffers' tree (the 4th argument; the decay is the 3rd)",
            describe(buffers),
            f"The order is {api}(state, params, decay, buffers), e.g. fe.{api}(state, params, "
            "0.999, buffers); or name them: decay=..., buffers=....",
        )


def check_buffer_policy(api: str, buffer_policy: object) -> None:
    """Validate the buffer policy."""
    check_choice(
        api,
        "buffer_policy",
        buffer_policy,
        ("copy", "average"),
        "'copy' (the default) keeps the latest buffers, 'average' averages the floating ones.",
    )


def validate(
    api: str,
    state: EmaState,
    params: TensorTree,
    buffers: TensorTree | None = None,
    buffer_policy: BufferPolicy = "copy",
) -> Bound:
    """Check that ``params`` (and ``buffers``) can update ``state``; nothing is written."""
    check_state_structure(api, state)
    check_buffer_policy(api, buffer_policy)
    names = ("state['params']", "params")
    shadow, values, spec = check_pair(api, state["params"], params, names)
    # DTensor pairs update their local shards: shard-local, no collective.
    shadow, values, templates = localize(api, state["params"], shadow, values, names)
    if ("buffers" in state) != (buffers is not None):
        if buffers is None:
            expected, got = "a tree (as given to init)", "None"
            fix = "pass the current buffers: update(state, params, decay, buffers)."
        else:
            expected, got = "None (init got no buffers)", "a tree"
            fix = "pass the buffers to init too: init(params, buffers)."
        raise wrong_value(
            api, "buffers", "buffers", expected, got, f"To keep buffers in the state, {fix}"
        )
    held: list[Tensor] = []
    current: list[Tensor] = []
    buffer_spec = buffer_templates = None
    if buffers is not None:
        names = ("state['buffers']", "buffers")
        held, current, buffer_spec = check_pair(api, state["buffers"], buffers, names)
        held, current, buffer_templates = localize(api, state["buffers"], held, current, names)
    return Bound(
        api,
        state,
        buffer_policy,
        shadow,
        values,
        spec,
        templates,
        held,
        current,
        buffer_spec,
        buffer_templates,
    )


def _check_call(
    bound: Bound, decay: Decay | Schedule, dt: int | Tensor, nonfinite: NonFinite
) -> tuple[int | Tensor, WeightCache]:
    """Validate the per-call arguments and the values (``"raise"``), before any write.

    Returns what ``step`` advances by and the call's weights. Numbers and CPU tensors
    (decay, a schedule's decay, ``dt``) are range-checked here and raise; the rest is
    checked on the device (``weights.valid``, counted by :func:`_count_nonfinite`), and a
    ``dt`` found below 1 there advances ``step`` by 0.
    """
    api = bound.api
    check_policy(api, nonfinite)
    dt = check_interval(api, dt)
    weights = WeightCache(*resolve_decay(api, decay, bound.state["step"], dt))
    if nonfinite == "raise":
        _raise_if_nonfinite(bound)
    return steps_covered(dt), weights


def _raise_if_nonfinite(bound: Bound) -> None:
    """``nonfinite="raise"``: reject NaN/Inf in what would be averaged, before any write."""
    api, state = bound.api, bound.state
    raise_if_nonfinite(api, state["params"], bound.shadow, bound.values, "params")
    if "buffers" in state and bound.buffer_policy == "average":
        raise_if_nonfinite(api, state["buffers"], bound.held, bound.current, "buffers")


def _count_nonfinite(
    counter: Tensor, flags: list[Tensor], *, inplace: bool, valid: Tensor | None = None
) -> Tensor:
    """Add 1 to ``counter`` if any "all finite" flag is false, on the device (no sync).

    ``valid`` (the call's device-side range check) counts like one more flag: an update
    whose decay or ``dt`` was out of range counts once, whatever its values.
    """
    if valid is not None:
        flags = [*flags, valid]
    if not flags:
        return counter if inplace else counter.clone()
    seen = ~all_finite(flags).to(counter.device)
    return counter.add_(seen) if inplace else counter + seen


def _keep_where(valid: Tensor, new: Tensor, old: Tensor, *, inplace: bool) -> Tensor:
    """``new`` where ``valid``, else ``old``'s bits (written into ``old`` when ``inplace``)."""
    kept = torch.where(valid.to(old.device), new, old)
    return old.copy_(kept) if inplace else kept


def _debiased_leaf(
    shadow: Tensor,
    biased: Tensor,
    local_step: Tensor,
    value: Tensor,
    weight: float | Tensor,
    *,
    inplace: bool,
    finite_flags: list[Tensor] | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """TF's ``_zero_debias`` for one leaf: new ``(shadow, biased, local_step)``.

    ``biased`` takes the TF step; ``local_step += 1``; ``shadow = biased / (1 - (1 - w) **
    local_step)``, all in the leaf's dtype. Non-floating leaves are copied. With ``valid``
    (the call's device-side range check), all three keep their bits where it is false: the
    new values are computed out of place and selected.
    """
    if not is_inexact(shadow):
        return (
            copy_leaf(shadow, value, inplace=inplace),
            copy_leaf(biased, value, inplace=inplace),
            local_step,
        )
    write = inplace and valid is None
    w = torch.as_tensor(weight, dtype=shadow.dtype, device=shadow.device)
    new_biased = average_leaf(biased, value, weight, inplace=write, finite_flags=finite_flags)
    new_step = local_step.add_(1) if write else local_step + 1
    debiased = new_biased / (1 - torch.pow(1 - w, new_step))
    if valid is not None:
        return (
            _keep_where(valid, debiased, shadow, inplace=inplace),
            _keep_where(valid, new_biased, biased, inplace=inplace),
            _keep_where(valid, new_step, local_step, inplace=inplace),
        )
    return (shadow.copy_(debiased) if inplace else debiased), new_biased, new_step


def _apply(
    bound: Bound, decay: Decay | Schedule, dt: int | Tensor, nonfinite: NonFinite, *, inplace: bool
) -> EmaState:
    """The update leaf by leaf (no engine): pure, or in place where the engine cannot run."""
    state = bound.state
    dt, weights = _check_call(bound, decay, dt, nonfinite)
    valid = weights.valid
    flags: list[Tensor] | None = [] if nonfinite == "skip" else None
    templates = None if inplace else bound.templates  # pure results are DTensors again
    new: EmaState = {
        "step": state["step"].add_(dt) if inplace else state["step"] + dt,
        "params": state["params"],
        "nonfinite_updates": state["nonfinite_updates"],
    }
    if "biased" not in state:
        new_shadow = [
            average_leaf(s, v, weights(s.dtype), inplace=inplace, finite_flags=flags, valid=valid)
            for s, v in zip(bound.shadow, bound.values, strict=True)
        ]
    else:
        biased = local_leaves(optree.tree_leaves(state["biased"]))
        local_step = optree.tree_leaves(state["local_step"])
        columns = zip(bound.shadow, biased, local_step, bound.values, strict=True)
        results = [
            _debiased_leaf(
                s, b, n, v, weights(s.dtype), inplace=inplace, finite_flags=flags, valid=valid
            )
            for s, b, n, v in columns
        ]
        new_shadow = [r[0] for r in results]
        new["biased"] = optree.tree_unflatten(
            bound.spec, rewrap(templates, [r[1] for r in results])
        )
        new["local_step"] = optree.tree_unflatten(bound.spec, [r[2] for r in results])
    new["params"] = optree.tree_unflatten(bound.spec, rewrap(templates, new_shadow))
    if bound.buffer_spec is not None:
        average = bound.buffer_policy == "average"
        new_held = [
            average_leaf(h, c, weights(h.dtype), inplace=inplace, finite_flags=flags, valid=valid)
            if average
            else copy_leaf(h, c, inplace=inplace)
            for h, c in zip(bound.held, bound.current, strict=True)
        ]
        buffer_templates = None if inplace else bound.buffer_templates
        new["buffers"] = optree.tree_unflatten(
            bound.buffer_spec, rewrap(buffer_templates, new_held)
        )
    new["nonfinite_updates"] = _count_nonfinite(
        state["nonfinite_updates"], flags or [], inplace=inplace, valid=valid
    )
    return state if inplace else new


def apply(
    bound: Bound, decay: Decay | Schedule, dt: int | Tensor = 1, nonfinite: NonFinite = "skip"
) -> EmaState:
    """A new state: ``bound.state`` moved by one update (``bound.state`` is not modified).

    Through the engine (:func:`_engine.updated`: a few dispatched operations per dtype
    group) where it applies, else leaf by leaf; same bits either way.
    """
    tensors = [*bound.shadow, *bound.values, *bound.held, *bound.current]
    if "biased" in bound.state or not pure_path_ok(*tensors):
        return _apply(bound, decay, dt, nonfinite, inplace=False)
    state = bound.state
    dt, weights = _check_call(bound, decay, dt, nonfinite)
    mask = nonfinite == "skip"
    with torch.no_grad():
        shadow, flags = updated_leaves(bound.shadow, bound.values, weights, mask=mask)
        if bound.buffer_spec is not None and bound.buffer_policy == "average":
            held, buffer_flags = updated_leaves(bound.held, bound.current, weights, mask=mask)
            flags += buffer_flags
        elif bound.buffer_spec is not None:  # copied (``copy_leaf``: the values' dtypes)
            held = copies(bound.current)
        new: EmaState = {
            "step": state["step"] + dt,
            "params": optree.tree_unflatten(bound.spec, rewrap(bound.templates, shadow)),
            "nonfinite_updates": _count_nonfinite(
                state["nonfinite_updates"], flags, inplace=False, valid=weights.valid
            ),
        }
        if bound.buffer_spec is not None:
            new["buffers"] = optree.tree_unflatten(
                bound.buffer_spec, rewrap(bound.buffer_templates, held)
            )
    return new


def apply_(
    bound: Bound, decay: Decay | Schedule, dt: int | Tensor = 1, nonfinite: NonFinite = "skip"
) -> EmaState:
    """Write one update into ``bound.state``'s tensors (the engine's plan where it applies)."""
    plan = bound.plan
    if plan is None:
        return _apply(bound, decay, dt, nonfinite, inplace=True)
    dt, weights = _check_call(bound, decay, dt, nonfinite)
    state = bound.state
    with torch.no_grad():
        flags = plan.run(weights, mask=nonfinite == "skip", valid=weights.valid)
        state["step"].add_(dt)
        _count_nonfinite(state["nonfinite_updates"], flags, inplace=True, valid=weights.valid)
    return state


def update(
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None = None,
    *,
    buffer_policy: BufferPolicy = "copy",
    dt: int | Tensor = 1,
    nonfinite: NonFinite = "skip",
) -> EmaState:
    r"""Apply one EMA update and return a new state; ``state`` is not modified.

    Per floating leaf, with :math:`w = \mathrm{cast}(\mathrm{f32}(1) - \mathrm{f32}(\beta))`:
    :math:`\bar\theta \leftarrow \bar\theta - (\bar\theta - \theta) w` (see
    :func:`ema_update`), or TF's zero-debiased form when the state was made with
    ``zero_debias=True``. Integer leaves are copied; ``step`` advances by ``dt``.

    Args:
        state: From :func:`init` or a previous update.
        params: The current values, with the structure of ``state["params"]``.
        decay: :math:`\beta \in [0, 1]`: a Python float, a 0-dim floating tensor, or a
            schedule (e.g. :func:`tf_warmup`, :func:`power`), called as ``schedule(t, dt)``
            with ``t = state["step"] + dt``, the step this update reaches. A number or CPU
            tensor (a schedule's result included) outside [0, 1], or NaN, raises before
            anything is written. A tensor on an accelerator is not read on the host (no
            sync): out of range there, the update leaves every average (and zero-debias
            accumulator) bit for bit unchanged and counts in
            ``state["nonfinite_updates"]``, like an update of non-finite values.
        buffers: The current buffers; required exactly when :func:`init` got buffers.
        buffer_policy: ``"copy"`` (default: the averaged model uses the latest buffers, as
            the classic ``EMA`` snippet does) or ``"average"`` (floating buffers are averaged
            like parameters; integer buffers are always copied).
        dt: Steps this update covers (an int >= 1 or a 0-dim integer tensor), for updates
            every ``dt`` steps or after skipped steps: a constant decay is applied as
            :math:`\beta^{dt}` and schedules get ``dt``, so the average's time constant does
            not depend on how often you update. ``dt=1`` is TF's update, bit for bit. An
            int or CPU tensor below 1 raises; a tensor on an accelerator below 1 is counted
            as above and ``step`` does not advance.
        nonfinite: ``"skip"`` (default): NaN/Inf values leave their averages unchanged and
            ``state["nonfinite_updates"]`` counts the update, on the device (no host sync);
            ``"raise"``: a ``ValueError`` naming the leaf before anything is written (reads a
            flag on the host); ``"propagate"``: average them in, as TF does.

    Returns:
        The new :class:`EmaState`, differentiable with respect to ``params``.

    Raises:
        ValueError: Mismatched structure, shapes or devices, ``decay``/``dt`` (numbers or
            CPU tensors) out of range or not 0-dim, or an option (``buffer_policy``,
            ``nonfinite``) not among its values.
        TypeError: Non-tensor leaves, wrong dtypes, a malformed state, or an argument of the
            wrong type.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> state = fe.update(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"], int(state["step"])
        (tensor([0.1000, 0.1000]), 1)
    """
    check_argument_order("update", decay, buffers)
    bound = validate("update", state, params, buffers, buffer_policy)
    return apply(bound, decay, dt, nonfinite)


@torch.no_grad()
def update_(
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None = None,
    *,
    buffer_policy: BufferPolicy = "copy",
    dt: int | Tensor = 1,
    nonfinite: NonFinite = "skip",
) -> EmaState:
    """In-place twin of :func:`update`: write the new values into ``state``'s tensors.

    Same TF step and bits as :func:`update`; every check runs before the first write. A
    decay (or a schedule's result) or ``dt`` given as a number or CPU tensor is range-checked
    then (``ValueError``, nothing written). One on an accelerator is checked on the device,
    without a host sync: out of range, the update writes every average's old bits back
    (``step`` still advances by a valid ``dt``, copied buffers are still copied) and adds 1
    to ``state["nonfinite_updates"]``, as for non-finite values.

    Args:
        state: Modified in place.
        params: The current values, with the structure of ``state["params"]``.
        decay: A float, a 0-dim floating tensor or a schedule, as in :func:`update`.
        buffers: The current buffers; required exactly when :func:`init` got buffers.
        buffer_policy: ``"copy"`` or ``"average"``, as in :func:`update`.
        dt: Steps this update covers, as in :func:`update`.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in :func:`update`.

    Returns:
        ``state`` itself.

    Raises:
        ValueError: As :func:`update` (a decay or ``dt`` out of range included).
        TypeError: As :func:`update`.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> _ = fe.update_(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"]
        tensor([0.1000, 0.1000])
    """
    check_argument_order("update_", decay, buffers)
    bound = _kept_bound("update_", state, params, buffers, buffer_policy)
    if bound is not None:
        return apply_(bound, decay, dt, nonfinite)
    bound = validate("update_", state, params, buffers, buffer_policy)
    apply_(bound, decay, dt, nonfinite)
    _keep(bound, params, buffers)
    return state


# --- kept plans: update_ of one state, call after call -----------------------------------


@dataclass
class _Kept:
    """A validated in-place update kept for the next ``update_`` of the same state.

    ``tensors`` are the ones the kept ``bound`` reads (the state's and the values', as
    passed when it was kept, but the state's two counters, which it reads from the state
    passed now); ``record`` has their data pointers and metadata (dtype, device, shape,
    strides, type), and the counters'. The kept update holds while the tensors
    passed now *and* the kept ones (which its plan reads, and which the caller may have
    changed since) still have them; the plan's views keep that memory alive, so no other
    tensor can sit there meanwhile. ``bound.state`` is ``None``: the kept update never holds
    the state itself, whose ``step`` tensor it watches by weak reference (when the state is
    gone, so is this).
    """

    bound: Bound
    structure: tuple[object, ...]
    tensors: list[Tensor]
    record: TensorRecord
    step: weakref.ref[Tensor]


@dataclass
class _Seen:
    """The first update of a state from some memory: its structure and pointers only.

    Nothing is held (no tensor, no plan): a second update from the same memory validates
    again and is then kept, so updates from new tensors every time (copies, offloaded
    values) pay only for the pointers and keep nothing alive.
    """

    structure: tuple[object, ...]
    pointers: list[int]
    step: weakref.ref[Tensor]


class _Plans:
    """One thread's kept updates, by the identity of their state's ``step`` tensor."""

    def __init__(self) -> None:
        self.kept: dict[int, _Kept | _Seen] = {}


_local = threading.local()
_every_thread: weakref.WeakSet[_Plans] = weakref.WeakSet()
_every_thread_lock = threading.Lock()


def _thread_plans() -> _Plans:
    """The calling thread's kept updates (made on first use, dropped with the thread)."""
    plans: _Plans | None = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = _Plans()
        with _every_thread_lock:
            _every_thread.add(plans)
    return plans


def release_plans() -> int:
    """Drop the update plans :func:`update_` keeps, in every thread; return how many.

    ``update_`` validates and plans each update of a state until two in a row read the same
    memory; from then on it keeps that plan while every tensor it reads (the state's and the
    values') has the same data pointer, dtype, device, shape, strides and type, a check in
    C per tensor, and the trees have the same keys. A model of thousands of tensors then
    updates without validating and planning again (4000 tensors: about 3 ms instead of 19
    on a 2-core CPU). Anything else validates and plans anew, with the same checks and
    errors as a first call; the bits never depend on it.

    One plan is kept per state (by its ``step`` tensor) and per thread that updates it. It
    holds the state's tensors, the values (the model's weights, usually alive anyway) and
    the plan's gather buffers: on the CPU at most 2**20 elements per dtype, or one value
    that is not contiguous (a transposed or ``channels_last`` one); on an accelerator a
    tenth of the averages, as the ``EMA`` adapter keeps. It goes when the state's ``step``
    tensor is freed (with the state, unless you keep that tensor elsewhere) or the thread
    ends, and is replaced when the state is updated from other memory (after
    ``model.to(...)``, say). Call this after dropping a model whose EMA state you keep, to
    free the weights' memory at once.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> params = {"w": torch.ones(2)}
        >>> _ = fe.release_plans()  # none kept from here on
        >>> for _ in range(2):  # the second update from the same memory keeps its plan
        ...     _ = fe.update_(state, params, 0.9)
        >>> fe.release_plans()
        1
    """
    with _every_thread_lock:
        every = list(_every_thread)
    released = 0
    for plans in every:
        kept = plans.kept
        released += sum(isinstance(entry, _Kept) for entry in list(kept.values()))
        kept.clear()
    return released


_PLAIN = frozenset({Tensor, torch.nn.Parameter})


def _leaves(tree: object) -> tuple[list[Any], object]:
    """A tree's leaves in a fixed order, and what its structure is.

    A plain dict of tensors (what :func:`module_state` returns) is read in its own order
    (``dict.values``: no sorting of thousands of keys), else optree flattens it. The two
    never describe one tree alike, so a kept update is only found by the same route.
    """
    if type(tree) is dict and set(map(type, tree.values())) <= _PLAIN:
        return list(tree.values()), ("dict", tuple(tree))
    return optree.tree_flatten(tree)  # type: ignore[arg-type]


def _read(
    state: EmaState, params: TensorTree, buffers: TensorTree | None
) -> tuple[tuple[object, ...], list[Tensor]]:
    """What a kept update depends on: the trees' structure, and every tensor it reads.

    Each tree is read in some fixed order (:func:`_leaves`); only the kept ``Bound`` holds
    the validated pairing, so the order here only has to be the same from call to call.
    """
    shadow, shadow_structure = _leaves(state["params"])
    values, structure = _leaves(params)
    tensors = [*shadow, *values]
    read: tuple[object, ...] = (
        tuple(state),
        buffers is None,
        shadow_structure,
        structure,
        strategy_setting(),  # what the plan was built under (tests force other paths)
        forced(),
    )
    if buffers is not None and "buffers" in state:
        held, held_structure = _leaves(state["buffers"])
        current, current_structure = _leaves(buffers)
        tensors += held + current
        read += (held_structure, current_structure)
    tensors += [state["step"], state["nonfinite_updates"]]  # last: a kept update holds the rest
    return read, tensors


def _keep(bound: Bound, params: TensorTree, buffers: TensorTree | None) -> None:
    """Note ``bound`` (validated and applied) for the next ``update_`` of its state.

    The first update from some memory is only noted (:class:`_Seen`); the second from the
    same memory is kept (:class:`_Kept`), with the C++ check, which costs about as much as
    planning.
    """
    state = bound.state
    if bound.plan is None or torch.compiler.is_compiling():
        return
    structure, tensors = _read(state, params, buffers)
    structure = (*structure, bound.buffer_policy)
    pointers = data_ptrs(tensors)
    step = state["step"]
    key = id(step)
    plans = _thread_plans()
    kept = plans.kept
    before = kept.get(key)
    again = (
        before is not None
        and before.step() is step
        and before.structure == structure
        and (before.record.pointers if isinstance(before, _Kept) else before.pointers) == pointers
    )

    owner = weakref.ref(plans)  # not the dict itself: a cycle would outlive the thread

    def forget(_: object, key: int = key) -> None:
        alive = owner()
        if alive is not None:
            alive.kept.pop(key, None)

    watch = weakref.ref(step, forget)
    if not again:
        kept[key] = _Seen(structure, pointers, watch)
        return
    kept[key] = _Kept(
        _rebound(bound, state=None),
        structure,
        tensors[:-2],  # not the counters: holding ``step`` would keep the state's plan forever
        TensorRecord(tensors),
        watch,
    )


def _rebound(bound: Bound, **changes: object) -> Bound:
    """``bound`` with ``changes``, sharing its plan (built once)."""
    new = dataclasses.replace(bound, **changes)  # type: ignore[arg-type]
    for name in ("plan", "params_plan", "buffers_plan"):
        if name in bound.__dict__:
            new.__dict__[name] = bound.__dict__[name]
    return new


def _kept_bound(
    api: str,
    state: object,
    params: TensorTree,
    buffers: TensorTree | None,
    buffer_policy: BufferPolicy,
) -> Bound | None:
    """The kept update of ``state``, bound to it, if it still holds; else ``None``."""
    plans: _Plans | None = getattr(_local, "plans", None)
    if plans is None or not isinstance(state, dict) or torch.compiler.is_compiling():
        return None
    step = state.get("step")
    kept = plans.kept.get(id(step))
    if not isinstance(kept, _Kept) or kept.step() is not step:
        return None
    try:
        structure, tensors = _read(cast(EmaState, state), params, buffers)
        if (*structure, buffer_policy) != kept.structure:
            return None
        if not kept.record.holds(tensors) or not kept.bound.plan.intact():  # type: ignore[union-attr]
            return None
        # The plan reads the kept tensors: unless they are the ones passed now, check them
        # too (the caller may have moved or reshaped them, then passed others at the same
        # memory).
        if not all(map(operator.is_, tensors, kept.tensors)) and not kept.record.holds(
            [*kept.tensors, *tensors[-2:]]
        ):
            return None
    except Exception:  # anything unexpected (a leaf that is not a tensor): validate instead
        return None
    return _rebound(kept.bound, api=api, state=state)


def follow_(bound: Bound, nonfinite: NonFinite = "skip") -> EmaState:
    """Copy the values into ``bound.state``'s averages: they follow the weights exactly.

    What a warm-up before averaging does (``EMA(..., update_after=n)``): each average becomes
    a copy of its value (re-initialised, as :func:`init` makes it), the held buffers are
    copied, and ``step`` is left as it is.
    NaN/Inf values follow ``nonfinite`` as an update does: ``"raise"`` raises before any
    write, ``"skip"`` keeps those elements of the averages and counts the call in
    ``nonfinite_updates``, ``"propagate"`` copies them.
    """
    check_policy(bound.api, nonfinite)
    if nonfinite == "raise":
        _raise_if_nonfinite(bound)
    flags: list[Tensor] | None = [] if nonfinite == "skip" else None
    averaged = list(zip(bound.shadow, bound.values, strict=True))
    copied = list(zip(bound.held, bound.current, strict=True))
    if bound.buffer_policy == "average":
        averaged, copied = averaged + copied, []
    with torch.no_grad():
        for shadow, value in averaged:
            if flags is not None and is_inexact(shadow):
                value, finite = keep_finite(shadow, value)
                flags.append(finite.all())
            copy_leaf(shadow, value, inplace=True)
        for held, current in copied:
            copy_leaf(held, current, inplace=True)
        _count_nonfinite(bound.state["nonfinite_updates"], flags or [], inplace=True)
    return bound.state
