"""The EMA state (a plain dict pytree) and its init / update / average functions."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import optree
import torch
from torch import Tensor

from functional_ema._core import WeightCache, average_leaf, copy_leaf
from functional_ema._decay import check_decay
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves, is_inexact
from functional_ema._types import Decay, Schedule, TensorTree


class EmaState(TypedDict):
    """State of an exponential moving average: a plain ``dict`` pytree of tensors.

    Being a plain dict, it round-trips through ``torch.save`` /
    ``torch.load(weights_only=True)`` with nothing to allow-list, and optree, ``vmap`` and
    ``torch.compile`` see ordinary containers.

    Attributes:
        step: Number of updates applied (0-dim int64, on the device of the first leaf).
        params: The averages, TF's shadow variables; read them with :func:`average`.
        buffers: Copies (or averages) of the buffers given to :func:`init`, else ``None``.
        biased: ``zero_debias`` only: TF's zero-initialised ``biased`` accumulators.
        local_step: ``zero_debias`` only: TF's per-leaf ``local_step``, in the leaf's dtype.
    """

    step: Tensor
    params: TensorTree
    buffers: TensorTree | None
    biased: TensorTree | None
    local_step: TensorTree | None


BufferPolicy = Literal["copy", "average"]


def _copy_tree(tree: TensorTree, dtype: torch.dtype | None) -> TensorTree:
    def copy(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None and is_inexact(t) and t.dtype != dtype:
            return t.to(dtype)
        return t.clone()

    return optree.tree_map(copy, tree)


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
            Copied and detached; not modified.
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
    leaves, _ = check_tensor_leaves(api, params, "params")
    if buffers is not None:
        check_tensor_leaves(api, buffers, "buffers")
    check_floating_dtype(api, dtype)
    device = leaves[0].device if leaves else torch.device("cpu")
    shadow = _copy_tree(params, dtype)
    biased = local_step = None
    if zero_debias:
        shadow = optree.tree_map(lambda t: torch.zeros_like(t) if is_inexact(t) else t, shadow)
        biased = optree.tree_map(torch.clone, shadow)
        local_step = optree.tree_map(
            lambda t: torch.zeros(
                (), dtype=t.dtype if is_inexact(t) else torch.int64, device=t.device
            ),
            shadow,
        )
    return EmaState(
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=shadow,
        buffers=None if buffers is None else _copy_tree(buffers, None),
        biased=biased,
        local_step=local_step,
    )


def _check_state(api: str, state: Any) -> None:
    if not isinstance(state, dict) or set(state) != set(EmaState.__annotations__):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise TypeError(
            f"{api}: `state` must be an EmaState: expected a dict with keys "
            f"{sorted(EmaState.__annotations__)}, got {got}. Create it with functional_ema.init."
        )
    step = state["step"]
    if not isinstance(step, Tensor) or step.ndim != 0 or step.dtype != torch.int64:
        got = (
            f"shape {tuple(step.shape)}, dtype {step.dtype}"
            if isinstance(step, Tensor)
            else type(step).__name__
        )
        raise TypeError(
            f"{api}: step counter at 'step': expected a 0-dim int64 tensor, got {got}. "
            "Keep the state as functional_ema.init made it."
        )
    if (state["biased"] is None) != (state["local_step"] is None):
        raise ValueError(
            f"{api}: zero_debias state at 'biased'/'local_step': expected both or neither, got "
            "only one. Keep the state as functional_ema.init made it."
        )
    if state["biased"] is not None:
        check_pair(api, state["params"], state["biased"], ("state['params']", "state['biased']"))
        steps, steps_spec = check_tensor_leaves(api, state["local_step"], "state['local_step']")
        if steps_spec != optree.tree_structure(state["params"]) or any(n.ndim for n in steps):
            raise ValueError(
                f"{api}: zero_debias counters at 'local_step': expected one 0-dim tensor per "
                f"leaf of state['params'], got {steps_spec}. Keep the state as "
                "functional_ema.init made it."
            )


def _resolve_decay(api: str, decay: Decay | Schedule, step: Tensor) -> Decay:
    if callable(decay) and not isinstance(decay, Tensor):
        return check_decay(f"{api} (schedule)", decay(step))
    return check_decay(api, decay)


def _update(
    api: str,
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None,
    buffer_policy: BufferPolicy,
    *,
    inplace: bool,
) -> EmaState:
    # Every check first: nothing is written until all of them have passed.
    _check_state(api, state)
    if buffer_policy not in ("copy", "average"):
        raise ValueError(
            f"{api}: `buffer_policy` must be 'copy' or 'average', got {buffer_policy!r}."
        )
    decay = _resolve_decay(api, decay, state["step"])
    shadow, values, spec = check_pair(api, state["params"], params, ("state['params']", "params"))
    if (state["buffers"] is None) != (buffers is None):
        if buffers is None:
            fix = "pass the current buffers: update(state, params, decay, buffers)."
        else:
            fix = "pass the buffers to init too: init(params, buffers)."
        raise ValueError(
            f"{api}: buffers at 'buffers': expected "
            f"{'a tree' if state['buffers'] is not None else 'None'} (as given to init), got "
            f"{'a tree' if buffers is not None else 'None'}. To keep buffers in the state, {fix}"
        )
    buffer_pairs: tuple[list[Tensor], list[Tensor], Any] | None = None
    if buffers is not None:
        buffer_pairs = check_pair(api, state["buffers"], buffers, ("state['buffers']", "buffers"))
    weights = WeightCache(decay)

    if state["biased"] is None:
        new_shadow = [
            average_leaf(s, v, weights(s.dtype), inplace=inplace)
            for s, v in zip(shadow, values, strict=True)
        ]
        new_biased = new_local_step = None
    else:
        biased = optree.tree_leaves(state["biased"])
        local_step = optree.tree_leaves(state["local_step"])
        new_shadow, new_biased_leaves, new_steps = [], [], []
        for s, b, n, v in zip(shadow, biased, local_step, values, strict=True):
            if not is_inexact(s):
                new_shadow.append(copy_leaf(s, v, inplace=inplace))
                new_biased_leaves.append(copy_leaf(b, v, inplace=inplace))
                new_steps.append(n)
                continue
            # TF's _zero_debias: biased -= (biased - value) * c; local_step += 1;
            # shadow = biased / (1 - (1 - c) ** local_step), all in the leaf's dtype.
            c = torch.as_tensor(weights(s.dtype), dtype=s.dtype, device=s.device)
            b = average_leaf(b, v, weights(s.dtype), inplace=inplace)
            n = n.add_(1) if inplace else n + 1
            debiased = b / (1 - torch.pow(1 - c, n))
            new_shadow.append(s.copy_(debiased) if inplace else debiased)
            new_biased_leaves.append(b)
            new_steps.append(n)
        new_biased = optree.tree_unflatten(spec, new_biased_leaves)
        new_local_step = optree.tree_unflatten(spec, new_steps)

    new_buffers = None
    if buffer_pairs is not None:
        held, current, buffer_spec = buffer_pairs
        new_buffer_leaves = [
            average_leaf(h, c, weights(h.dtype), inplace=inplace)
            if buffer_policy == "average"
            else copy_leaf(h, c, inplace=inplace)
            for h, c in zip(held, current, strict=True)
        ]
        new_buffers = optree.tree_unflatten(buffer_spec, new_buffer_leaves)

    if inplace:
        state["step"].add_(1)
        return state
    return EmaState(
        step=state["step"] + 1,
        params=optree.tree_unflatten(spec, new_shadow),
        buffers=new_buffers,
        biased=new_biased,
        local_step=new_local_step,
    )


def update(
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None = None,
    *,
    buffer_policy: BufferPolicy = "copy",
) -> EmaState:
    r"""Apply one EMA update and return a new state; ``state`` is not modified.

    Per floating leaf, with :math:`w = \mathrm{cast}(\mathrm{f32}(1) - \mathrm{f32}(\beta))`:
    :math:`\bar\theta \leftarrow \bar\theta - (\bar\theta - \theta) w` (see
    :func:`ema_update`), or TF's zero-debiased form when the state was made with
    ``zero_debias=True``. Integer leaves are copied; ``step`` is incremented.

    Args:
        state: From :func:`init` or a previous :func:`update`.
        params: The current values, with the structure of ``state["params"]``.
        decay: :math:`\beta`: a Python float, a 0-dim floating tensor, or a schedule (a
            callable of ``state["step"]``, the number of updates applied so far, e.g.
            ``lambda n: fe.tf_decay(0.999, n)`` for TF's ``num_updates`` warmup).
        buffers: The current buffers, required when the state holds buffers.
        buffer_policy: ``"copy"`` (default, as TF's users and the classic ``EMA`` snippet do:
            the averaged model uses the latest buffers) or ``"average"`` (floating buffers
            are averaged like parameters; integer buffers are always copied).

    Returns:
        The new :class:`EmaState`.

    Raises:
        ValueError: Mismatched structure, shapes or devices, or ``decay`` out of range.
        TypeError: Non-tensor leaves, wrong dtypes or a malformed state.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> state = fe.update(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"], int(state["step"])
        (tensor([0.1000, 0.1000]), 1)
    """
    return _update("update", state, params, decay, buffers, buffer_policy, inplace=False)


@torch.no_grad()
def update_(
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None = None,
    *,
    buffer_policy: BufferPolicy = "copy",
) -> EmaState:
    """In-place twin of :func:`update`: write the new values into ``state``'s tensors.

    Same leaf routine and bits as :func:`update`; every check runs before the first write.

    Args:
        state: Modified in place.
        params: The current values, with the structure of ``state["params"]``.
        decay: A Python float, a 0-dim floating tensor, or a schedule of ``state["step"]``.
        buffers: The current buffers, required when the state holds buffers.
        buffer_policy: ``"copy"`` or ``"average"``, as in :func:`update`.

    Returns:
        ``state`` itself.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> _ = fe.update_(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"]
        tensor([0.1000, 0.1000])
    """
    return _update("update_", state, params, decay, buffers, buffer_policy, inplace=True)


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
    _check_state("average", state)
    return state["params"]
