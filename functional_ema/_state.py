"""The EMA state (a plain dict pytree) and its init / update / average functions."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TypedDict

import optree
import torch
from torch import Tensor

from functional_ema._arith import is_inexact
from functional_ema._compat import is_functorch_wrapped
from functional_ema._dtensor import local_tensor, pack
from functional_ema._errors import describe, short_list, wrong_type, wrong_value
from functional_ema._tree import (
    check_dense_leaves,
    check_floating_dtype,
    check_pair,
    check_tensor_leaves,
    leaf_paths,
)
from functional_ema._types import TensorTree


class _EmaStateRequired(TypedDict):
    step: Tensor
    params: TensorTree
    nonfinite_updates: Tensor


class EmaState(_EmaStateRequired, total=False):
    """State of an exponential moving average: a plain ``dict`` pytree of tensors.

    Being a plain dict with tensor leaves only (optional entries are absent, never ``None``),
    it round-trips through ``torch.save`` / ``torch.load(weights_only=True)`` with nothing to
    allow-list, and optree, ``torch.func.vmap`` and ``torch.compile`` see ordinary containers.

    Attributes:
        step: Steps covered so far: the sum of the ``dt`` of every update, i.e. the number of
            updates when each covers one step (0-dim int64, on the first leaf's device).
        params: The averages, TF's shadow variables; read them with :func:`average`.
        nonfinite_updates: Number of updates whose values held a NaN or Inf (0-dim int64, counted on
            the device); with ``nonfinite="skip"`` those elements were left out.
        buffers: Only when :func:`init` got buffers: their copies (or averages).
        biased: Only with ``zero_debias``: TF's zero-initialised ``biased`` accumulators.
        local_step: Only with ``zero_debias``: TF's per-leaf ``local_step``, in the leaf's
            dtype.
    """

    buffers: TensorTree
    biased: TensorTree
    local_step: TensorTree


def _copy_tree(tree: TensorTree, dtype: torch.dtype | None) -> TensorTree:
    """Detached copies of the leaves, back to back in one buffer per (device, dtype).

    The contiguous layout lets the in-place engine update each group as one region. DTensors
    stay DTensors sharded like their leaf, their local shards laid out the same way.
    """
    leaves, spec = optree.tree_flatten(tree)
    if torch.compiler.is_compiling() or any(is_functorch_wrapped(t) for t in leaves):

        def copy(t: Tensor) -> Tensor:
            t = t.detach()
            keep = dtype is None or not is_inexact(t) or t.dtype == dtype
            return t.clone() if keep else t.to(dtype)

        return optree.tree_map(copy, tree)
    return optree.tree_unflatten(spec, pack(leaves, dtype))


def _scalar_zero(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0-dim zero on ``like``'s device, derived from ``like``.

    Derived from a leaf (not ``torch.zeros(())``) so that ``torch.func.vmap(init)`` gives
    every member its own counter instead of one expanded tensor that in-place updates reject.
    """
    like = local_tensor(like)  # a DTensor's reshape would communicate; its shard does not
    return torch.zeros_like(like.detach().reshape(-1)[:1], dtype=dtype).sum(dtype=dtype)


def init(
    params: TensorTree,
    buffers: TensorTree | None = None,
    *,
    zero_debias: bool = False,
    dtype: torch.dtype | None = None,
) -> EmaState:
    r"""Start an exponential moving average of ``params``.

    As TensorFlow does for variables, each average starts at a copy of the value. With
    ``zero_debias=True`` it follows TF's ``_zero_debias`` instead (which TF applies to
    non-variable tensors): the average and a ``biased`` accumulator start at zero, and
    :func:`update` divides by the bias factor
    :math:`1 - (1 - w)^{\text{local\_step}}`.

    Args:
        params: The tree to average (e.g. ``module_state(model)[0]``): any pytree of tensors.
            Copied and detached; not modified. DTensor leaves (FSDP2 parameters) give DTensor
            averages with the same mesh and placements, updated shard-local.
        buffers: Optional tree of buffers (and frozen parameters) kept beside the averages,
            copied at each :func:`update` (or averaged with ``buffer_policy="average"``).
        zero_debias: Follow TF's zero-debiased average.
        dtype: Floating dtype of the averages (e.g. ``torch.float32`` for a bfloat16 model:
            a bfloat16 average stalls at high decay because ``(s - p) * (1 - decay)`` rounds
            to zero). ``None`` keeps each leaf's dtype, as TF does. Integer leaves keep theirs.

    Returns:
        A fresh :class:`EmaState` with ``step == 0``.

    Raises:
        TypeError: If a leaf is not a tensor or ``dtype`` is not a floating dtype.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.ones(2, dtype=torch.bfloat16)}, dtype=torch.float32)
        >>> state["params"]["w"].dtype, int(state["step"])
        (torch.float32, 0)
    """
    api = "init"
    _check_new_trees(
        api,
        params,
        buffers,
        dtype,
        "Take the module's tensors first: params, buffers = fe.module_state(model); "
        "state = fe.init(params, buffers). Or keep the module: ema = fe.EMA(model, decay).",
    )
    return _fresh(params, buffers, zero_debias=zero_debias, dtype=dtype)


def _check_new_trees(
    api: str, params: TensorTree, buffers: TensorTree | None, dtype: torch.dtype | None, fix: str
) -> None:
    """The checks of trees that start averages (:func:`init`, :func:`extend`).

    Raises:
        TypeError: A module instead of a tree, a non-tensor or non-dense leaf, or a ``dtype``
            that is not floating.
    """
    for name, tree in (("params", params), ("buffers", buffers)):
        if isinstance(tree, torch.nn.Module):
            raise wrong_type(
                api,
                "a module passed as a tree of tensors",
                name,
                "a pytree of tensors (e.g. a dict of them)",
                describe(tree),
                fix,
            )
    check_tensor_leaves(api, params, "params")
    check_dense_leaves(api, params, "params")
    if buffers is not None:
        check_tensor_leaves(api, buffers, "buffers")
        check_dense_leaves(api, buffers, "buffers")
    check_floating_dtype(api, dtype)


def _fresh(
    params: TensorTree,
    buffers: TensorTree | None,
    *,
    zero_debias: bool,
    dtype: torch.dtype | None,
) -> EmaState:
    """A new state of checked trees (see :func:`init`)."""
    leaves = optree.tree_leaves(params)
    shadow = _copy_tree(params, dtype)
    biased = local_step = None
    if zero_debias:
        shadow = optree.tree_map(lambda t: torch.zeros_like(t) if is_inexact(t) else t, shadow)
        biased = optree.tree_map(torch.clone, shadow)
        local_step = optree.tree_map(
            lambda t: _scalar_zero(t, t.dtype if is_inexact(t) else torch.int64), shadow
        )
    step = _scalar_zero(leaves[0], torch.int64) if leaves else torch.zeros((), dtype=torch.int64)
    # A dict literal (dynamo traces it); the counters derive from a leaf (see _scalar_zero).
    state: EmaState = {"step": step, "params": shadow, "nonfinite_updates": step.clone()}
    if buffers is not None:
        state["buffers"] = _copy_tree(buffers, None)
    if biased is not None and local_step is not None:
        state["biased"], state["local_step"] = biased, local_step
    return state


_KEYS = ("step", "params", "nonfinite_updates", "buffers", "biased", "local_step")


_KEEP_FIX = "Keep the state as functional_ema.init made it."


def check_counter(api: str, counter: object, path: str, fix: str = _KEEP_FIX) -> None:
    """Check a counter of a state (``step``, ``nonfinite_updates``) is a 0-dim int64 tensor.

    Raises:
        TypeError: ``counter`` is not a tensor, or not of dtype int64.
        ValueError: ``counter`` is an int64 tensor that is not 0-dim.
    """
    expected = "a 0-dim int64 tensor"
    if not isinstance(counter, Tensor) or counter.dtype != torch.int64:
        raise wrong_type(api, "counter", path, expected, describe(counter), fix)
    if counter.ndim != 0:
        raise wrong_value(api, "counter", path, expected, describe(counter), fix)


def check_state_structure(api: str, state: Any, name: str = "state") -> None:
    """Check ``state`` is an :class:`EmaState` as :func:`init` makes them (keys, counters).

    ``name`` is the argument's name in messages.
    """
    keys = set(state) if isinstance(state, dict) else set()
    required = {"step", "params", "nonfinite_updates"}
    if not isinstance(state, dict) or not required <= keys or keys - set(_KEYS):
        raise wrong_type(
            api,
            "not an EmaState",
            name,
            "a dict with keys 'step', 'params', 'nonfinite_updates' and optionally 'buffers', "
            "'biased', 'local_step'",
            f"a dict with keys {short_list(map(str, state))}"
            if isinstance(state, dict)
            else describe(state),
            "Create it with functional_ema.init."
            + (
                " A state saved with the counter under its former name 'nonfinite' is read "
                "by functional_ema.check_state(state, like=functional_ema.init(...))."
                if "nonfinite" in keys
                else ""
            ),
        )
    for key in ("step", "nonfinite_updates"):
        check_counter(api, state[key], key)
    if ("biased" in state) != ("local_step" in state):
        raise wrong_value(
            api,
            "incomplete zero_debias state",
            "<root>",
            "both 'biased' and 'local_step' or neither",
            f"only {'biased' if 'biased' in state else 'local_step'!r}",
            _KEEP_FIX,
        )
    if "biased" in state:
        check_pair(api, state["params"], state["biased"], ("state['params']", "state['biased']"))
        steps, steps_spec = check_tensor_leaves(api, state["local_step"], "state['local_step']")
        if steps_spec != optree.tree_structure(state["params"]):
            raise wrong_value(
                api,
                "zero_debias counters",
                "local_step",
                "one 0-dim tensor per leaf of state['params']",
                steps_spec,
                _KEEP_FIX,
            )
        shaped = next((index for index, n in enumerate(steps) if n.ndim), None)
        if shaped is not None:
            raise wrong_value(
                api,
                "zero_debias counter in `state['local_step']`",
                leaf_paths(state["local_step"])[shaped],
                "a 0-dim tensor",
                describe(steps[shaped]),
                _KEEP_FIX,
            )


def average(state: EmaState) -> TensorTree:
    """The averages, as TensorFlow's ``ema.average(var)`` returns them.

    With ``zero_debias`` these are the debiased values TF assigns to its shadow variables
    (zeros before the first update). The tensors are the state's own (no copy).

    Args:
        state: An :class:`EmaState`.

    Returns:
        The tree of averages, with the structure of the ``params`` given to :func:`init`.

    Example:
        >>> import torch, functional_ema as fe
        >>> fe.average(fe.init({"w": torch.ones(2)}))
        {'w': tensor([1., 1.])}
    """
    check_state_structure("average", state)
    return state["params"]


_MERGE_FIX = (
    "fe.extend merges dicts key by key (nested dicts recursively); other containers cannot be "
    "merged: keep the averages in a dict keyed by name (as fe.module_state gives them), or "
    "start a new state with fe.init."
)


def _is_dict(tree: object) -> bool:
    """Whether ``tree`` is a container :func:`extend` merges (a ``dict`` or ``OrderedDict``)."""
    return type(tree) in (dict, OrderedDict)


def _path(keys: tuple[Any, ...]) -> str:
    """The dotted path of ``keys``, as :func:`_tree.leaf_paths` writes it."""
    return ".".join(map(str, keys)) or "<root>"


def _entries(tree: Any, keys: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(keys, value)`` of the values reached through nested dicts (the dicts themselves not)."""
    if not _is_dict(tree):
        if keys:
            yield keys, tree
        return
    for key, value in tree.items():
        yield from _entries(value, (*keys, key))


def _lookup(tree: Any, keys: tuple[Any, ...]) -> Any:
    """The value at ``keys`` through nested dicts, or ``None`` where there is none."""
    for key in keys:
        if not _is_dict(tree) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _without(tree: Any, keys: tuple[Any, ...]) -> Any:
    """A copy of the nested dicts on the way to ``keys``, without the entry at ``keys``."""
    out = type(tree)(tree)
    if len(keys) == 1:
        del out[keys[0]]
    else:
        out[keys[0]] = _without(tree[keys[0]], keys[1:])
    return out


def _held(value: Any) -> str:
    """What the state holds at a path, for the "got" part of a message."""
    if isinstance(value, Tensor):
        return describe(value)
    return f"a {type(value).__name__} of {len(optree.tree_leaves(value))} leaves"


def _merged(api: str, old: Any, new: Any, name: str, keys: tuple[Any, ...] = ()) -> Any:
    """``old`` with the entries of ``new`` added, merging nested dicts key by key.

    New keys come after the existing ones, in ``new``'s order; the containers are new, the
    leaves are shared.

    Raises:
        TypeError: Either side, at ``keys``, is not a dict.
        ValueError: ``new`` has a leaf (or subtree) where ``old`` already has one.
    """
    if not _is_dict(old) or not _is_dict(new):
        raise wrong_type(
            api,
            "trees that cannot be merged",
            _path(keys),
            f"a dict in both `state[{name!r}]` and `{name}`",
            f"{type(old).__name__} and {type(new).__name__}",
            _MERGE_FIX,
        )
    out = type(old)(old)
    for key, value in new.items():
        here = (*keys, key)
        if key not in old:
            out[key] = value
        elif isinstance(old[key], Tensor) or isinstance(value, Tensor):
            raise wrong_value(
                api,
                "name already in the state",
                _path(here),
                f"a name that `state[{name!r}]` does not hold",
                f"one it holds ({_held(old[key])})",
                "fe.extend adds new leaves only: pass just those, e.g. {k: v for k, v in "
                "params.items() if k not in fe.average(state)}; fe.update moves the "
                "averages that exist.",
            )
        else:
            out[key] = _merged(api, old[key], value, name, here)
    return out


def extend(
    state: EmaState,
    params: TensorTree,
    buffers: TensorTree | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> EmaState:
    r"""Add leaves to a running average, as TF's ``ema.apply(new_var_list)`` does.

    The new averages start as :func:`init` starts them: at a copy of the value (TF's
    initialisation of a shadow variable), or, for a state made with ``zero_debias=True``, at
    zero with a zero ``biased`` accumulator and ``local_step`` (TF's zero-debias slots). The
    next update moves them with the others; an average started at its value stays there
    that first time (:math:`ar	heta - (ar	heta - 	heta)\,w = 	heta` when
    :math:`ar	heta = 	heta`), as the update TF runs right after creating a shadow. The
    existing averages and the counters ``step`` and ``nonfinite_updates`` are untouched.
    Typical use: progressive unfreezing, where layers join the average as they start to
    train.

    Trees merge as dicts: the new keys are added after the existing ones, and nested dicts
    merge key by key. Other containers (lists, tuples, namedtuples) have no merge (a
    ``TypeError``). A leaf of ``params`` whose name ``state["buffers"]`` holds (a frozen
    parameter, which :func:`module_state` puts among the buffers, now unfrozen) moves: it
    leaves the buffers and starts averaging at the value given, so that
    ``fe.update(state, *fe.module_state(model))`` works after unfreezing.

    Pure: ``state`` is not modified. The result is a new dict (with new containers) that
    shares the state's tensors, counters included: updating it in place (:func:`update_`)
    also changes them in ``state``, so treat ``state`` as replaced.

    Args:
        state: An :class:`EmaState` whose trees are dicts (as :func:`init` makes them from
            :func:`module_state`).
        params: The new leaves to average (a dict of tensors), at their current values.
            Copied and detached; not modified.
        buffers: New buffers to keep beside the averages (a dict of tensors), or ``None``.
            A state without buffers gets these as its ``state["buffers"]``, and
            :func:`update` needs the buffers from then on.
        dtype: Floating dtype of the new averages, as in :func:`init`: pass the ``dtype``
            the state was made with to keep one dtype. ``None`` keeps each leaf's.

    Returns:
        The extended :class:`EmaState`.

    Raises:
        ValueError: A name the state already averages or holds (in ``params`` or
            ``buffers``), or a new buffer with the name of an average.
        TypeError: A malformed state, a non-tensor leaf (its path is named), trees that are
            not dicts, or ``dtype`` not a floating dtype.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"head.w": torch.zeros(2)})
        >>> state = fe.update(state, {"head.w": torch.ones(2)}, 0.9)
        >>> state = fe.extend(state, {"body.w": torch.full((2,), 5.0)})  # unfrozen
        >>> fe.average(state)
        {'head.w': tensor([0.1000, 0.1000]), 'body.w': tensor([5., 5.])}
        >>> int(state["step"])
        1
    """
    api = "extend"
    check_state_structure(api, state)
    _check_new_trees(
        api,
        params,
        buffers,
        dtype,
        "Take the new tensors first: params, buffers = fe.module_state(model), then pass "
        "the new ones: fe.extend(state, {k: v for k, v in params.items() if k not in "
        "fe.average(state)}).",
    )
    fresh = _fresh(params, buffers, zero_debias="biased" in state, dtype=dtype)
    held = state.get("buffers")
    moved = [
        keys
        for keys, value in _entries(params)
        if isinstance(value, Tensor) and isinstance(_lookup(held, keys), Tensor)
    ]
    averages = _merged(api, state["params"], fresh["params"], "params")
    if buffers is not None:
        for keys, _ in _entries(buffers):
            if _lookup(averages, keys) is not None:
                raise wrong_value(
                    api,
                    "buffer named like an average",
                    _path(keys),
                    "a name that neither `state['params']` nor `params` holds",
                    f"one they hold ({_held(_lookup(averages, keys))})",
                    "A tensor is either averaged (params) or kept (buffers): pass it in one "
                    "of the two.",
                )
    for keys in moved:
        held = _without(held, keys)
    new: EmaState = {
        "step": state["step"],
        "params": averages,
        "nonfinite_updates": state["nonfinite_updates"],
    }
    if held is not None or buffers is not None:
        new["buffers"] = (
            fresh["buffers"]
            if held is None
            else held
            if buffers is None
            else _merged(api, held, fresh["buffers"], "buffers")
        )
    if "biased" in state:
        new["biased"] = _merged(api, state["biased"], fresh["biased"], "params")
        new["local_step"] = _merged(api, state["local_step"], fresh["local_step"], "params")
    return new
