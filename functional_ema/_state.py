"""The EMA state (a plain dict pytree) and its init / update / average functions."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import optree
import torch
from torch import Tensor

from functional_ema._core import (
    WeightCache,
    average_leaf,
    check_policy,
    copy_leaf,
    engine_plan,
    raise_if_nonfinite,
)
from functional_ema._decay import check_decay
from functional_ema._distributed import local_leaves, local_tensor, localize, pack, rewrap
from functional_ema._engine import _wrapped, fast_path_ok
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves, is_inexact
from functional_ema._types import Decay, NonFinite, Schedule, TensorTree


class _EmaStateRequired(TypedDict):
    step: Tensor
    params: TensorTree
    nonfinite: Tensor


class EmaState(_EmaStateRequired, total=False):
    """State of an exponential moving average: a plain ``dict`` pytree of tensors.

    Being a plain dict with tensor leaves only (optional entries are absent, never ``None``),
    it round-trips through ``torch.save`` / ``torch.load(weights_only=True)`` with nothing to
    allow-list, and optree, ``torch.func.vmap`` and ``torch.compile`` see ordinary containers.

    Attributes:
        step: Steps covered so far: the sum of the ``dt`` of every update, i.e. the number of
            updates when each covers one step (0-dim int64, on the first leaf's device).
        params: The averages, TF's shadow variables; read them with :func:`average`.
        nonfinite: Number of updates whose values held a NaN or Inf (0-dim int64, counted on
            the device); with ``nonfinite="skip"`` those elements were left out.
        buffers: Only when :func:`init` got buffers: their copies (or averages).
        biased: Only with ``zero_debias``: TF's zero-initialised ``biased`` accumulators.
        local_step: Only with ``zero_debias``: TF's per-leaf ``local_step``, in the leaf's
            dtype.
    """

    buffers: TensorTree
    biased: TensorTree
    local_step: TensorTree


BufferPolicy = Literal["copy", "average"]


def _copy_tree(tree: TensorTree, dtype: torch.dtype | None) -> TensorTree:
    """Detached copies of the leaves, back to back in one buffer per (device, dtype).

    The contiguous layout lets the in-place engine update each group as one region. DTensors
    stay DTensors sharded like their leaf, their local shards laid out the same way.
    """
    leaves, spec = optree.tree_flatten(tree)
    if torch.compiler.is_compiling() or any(_wrapped(t) for t in leaves):

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
    leaves, _ = check_tensor_leaves(api, params, "params")
    if buffers is not None:
        check_tensor_leaves(api, buffers, "buffers")
    check_floating_dtype(api, dtype)
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
    state: EmaState = {"step": step, "params": shadow, "nonfinite": step.clone()}
    if buffers is not None:
        state["buffers"] = _copy_tree(buffers, None)
    if biased is not None and local_step is not None:
        state["biased"], state["local_step"] = biased, local_step
    return state


_KEYS = ("step", "params", "nonfinite", "buffers", "biased", "local_step")


def _check_state(api: str, state: Any) -> None:
    keys = set(state) if isinstance(state, dict) else set()
    required = {"step", "params", "nonfinite"}
    if not isinstance(state, dict) or not required <= keys or keys - set(_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise TypeError(
            f"{api}: `state` must be an EmaState: expected a dict with keys 'step', 'params', "
            f"'nonfinite' and optionally 'buffers', 'biased', 'local_step', got {got}. Create "
            "it with functional_ema.init."
        )
    for key in ("step", "nonfinite"):
        counter = state[key]
        if not isinstance(counter, Tensor) or counter.ndim != 0 or counter.dtype != torch.int64:
            got = (
                f"shape {tuple(counter.shape)}, dtype {counter.dtype}"
                if isinstance(counter, Tensor)
                else type(counter).__name__
            )
            raise TypeError(
                f"{api}: counter at {key!r}: expected a 0-dim int64 tensor, got {got}. "
                "Keep the state as functional_ema.init made it."
            )
    if ("biased" in state) != ("local_step" in state):
        raise ValueError(
            f"{api}: zero_debias state at 'biased'/'local_step': expected both or neither, got "
            "only one. Keep the state as functional_ema.init made it."
        )
    if "biased" in state:
        check_pair(api, state["params"], state["biased"], ("state['params']", "state['biased']"))
        steps, steps_spec = check_tensor_leaves(api, state["local_step"], "state['local_step']")
        if steps_spec != optree.tree_structure(state["params"]) or any(n.ndim for n in steps):
            raise ValueError(
                f"{api}: zero_debias counters at 'local_step': expected one 0-dim tensor per "
                f"leaf of state['params'], got {steps_spec}. Keep the state as "
                "functional_ema.init made it."
            )


def check_interval(api: str, dt: object) -> int | Tensor:
    """Validate the number of steps an update covers: an int >= 1 or a 0-dim int tensor."""
    if isinstance(dt, Tensor):
        if dt.ndim != 0 or dt.is_floating_point() or dt.is_complex() or dt.dtype == torch.bool:
            raise TypeError(
                f"{api}: `dt` must be an int or a 0-dim integer tensor, got a tensor of shape "
                f"{tuple(dt.shape)} and dtype {dt.dtype}. Pass the steps since the last update."
            )
        return dt
    if isinstance(dt, bool) or not isinstance(dt, int):
        raise TypeError(
            f"{api}: `dt` must be an int or a 0-dim integer tensor, got "
            f"{type(dt).__name__} ({dt!r}). Pass the steps since the last update, e.g. dt=1."
        )
    if dt < 1:
        raise ValueError(
            f"{api}: `dt` must be >= 1, got {dt}. Pass the number of steps since the last "
            "update (1 when you update every step)."
        )
    return dt


def resolve_decay(api: str, decay: Decay | Schedule, step: Tensor, dt: int | Tensor) -> Decay:
    """The decay of an update covering ``(step, step + dt]``.

    A schedule is called as ``schedule(step + dt, dt)``; a constant decay is raised to the
    power ``dt`` when ``dt != 1`` (so it keeps its per-step meaning), and passed through
    untouched when ``dt == 1`` (TF's exact value).
    """
    if callable(decay) and not isinstance(decay, Tensor):
        return check_decay(
            f"{api} (schedule)", decay(step + dt, torch.as_tensor(dt, device=step.device))
        )
    decay = check_decay(api, decay)
    if isinstance(dt, int) and dt == 1:
        return decay
    return torch.as_tensor(decay, dtype=torch.float64, device=step.device) ** dt


class Prepared:
    """A validated pairing of a state with the tensors that update it.

    Built by :func:`prepare` (all structure, shape, device and dtype checks); :meth:`run`
    validates the decay and applies one update in place. With plain tensors outside any
    ``torch.func`` transform the engine's plan is built once here, so re-running a cached
    ``Prepared`` (as the ``EMA`` adapter does while the model's tensors stay the same) costs
    no Python work per leaf.
    """

    def __init__(
        self,
        api: str,
        state: EmaState,
        params: TensorTree,
        buffers: TensorTree | None,
        buffer_policy: BufferPolicy,
    ) -> None:
        _check_state(api, state)
        if buffer_policy not in ("copy", "average"):
            raise ValueError(
                f"{api}: `buffer_policy` must be 'copy' or 'average', got {buffer_policy!r}."
            )
        self.api, self.state, self.buffer_policy = api, state, buffer_policy
        self.shadow, self.values, self.spec = check_pair(
            api, state["params"], params, ("state['params']", "params")
        )
        # DTensor pairs update their local shards: shard-local, no collective.
        self.shadow, self.values, self.likes = localize(
            api, state["params"], self.shadow, self.values, ("state['params']", "params")
        )
        if ("buffers" in state) != (buffers is not None):
            if buffers is None:
                expected, got = "a tree (as given to init)", "None"
                fix = "pass the current buffers: update(state, params, decay, buffers)."
            else:
                expected, got = "None (init got no buffers)", "a tree"
                fix = "pass the buffers to init too: init(params, buffers)."
            raise ValueError(
                f"{api}: buffers at 'buffers': expected {expected}, got {got}. To keep buffers "
                f"in the state, {fix}"
            )
        self.buffer_pairs, self.buffer_likes = None, None
        if buffers is not None:
            names = ("state['buffers']", "buffers")
            held, current, buffer_spec = check_pair(api, state["buffers"], buffers, names)
            held, current, self.buffer_likes = localize(api, state["buffers"], held, current, names)
            self.buffer_pairs = (held, current, buffer_spec)
        self.plan = None
        held, current = self.buffer_pairs[:2] if self.buffer_pairs else ([], [])
        tensors = [*self.shadow, *self.values, *held, *current]
        if "biased" not in state and fast_path_ok(*tensors):
            copy = buffer_policy == "copy"
            self.plan = engine_plan(
                list(zip(self.shadow, self.values, strict=True)), copy=False
            ).merged(engine_plan(list(zip(held, current, strict=True)), copy=copy))

    def _checked(
        self, decay: Decay | Schedule, dt: int | Tensor, nonfinite: NonFinite
    ) -> tuple[int | Tensor, WeightCache]:
        """Validate the per-call arguments (before anything is written)."""
        check_policy(self.api, nonfinite)
        dt = check_interval(self.api, dt)
        weights = WeightCache(resolve_decay(self.api, decay, self.state["step"], dt))
        if nonfinite == "raise":
            raise_if_nonfinite(self.api, self.state["params"], self.shadow, self.values, "params")
            if self.buffer_pairs is not None and self.buffer_policy == "average":
                held, current, _ = self.buffer_pairs
                raise_if_nonfinite(self.api, self.state["buffers"], held, current, "buffers")
        return dt, weights

    def run(
        self, decay: Decay | Schedule, dt: int | Tensor = 1, nonfinite: NonFinite = "skip"
    ) -> EmaState:
        """Apply one update in place (the engine's plan when there is one); return the state."""
        if self.plan is None:
            return self._run(decay, dt, nonfinite, inplace=True)
        dt, weights = self._checked(decay, dt, nonfinite)
        with torch.no_grad():
            flags = self.plan.run(weights, mask=nonfinite == "skip")
            self.state["step"].add_(dt)
            _count_nonfinite(self.state["nonfinite"], flags, inplace=True)
        return self.state

    def _run(
        self, decay: Decay | Schedule, dt: int | Tensor, nonfinite: NonFinite, *, inplace: bool
    ) -> EmaState:
        state, spec = self.state, self.spec
        shadow, values, buffer_pairs = self.shadow, self.values, self.buffer_pairs
        buffer_policy = self.buffer_policy
        likes = None if inplace else self.likes  # the new leaves are DTensors again
        dt, weights = self._checked(decay, dt, nonfinite)
        flags: list[Tensor] | None = [] if nonfinite == "skip" else None
        new: EmaState = {
            "step": state["step"].add_(dt) if inplace else state["step"] + dt,
            "params": None,
            "nonfinite": state["nonfinite"],
        }
        if "biased" not in state:
            new_shadow = [
                average_leaf(s, v, weights(s.dtype), inplace=inplace, flags=flags)
                for s, v in zip(shadow, values, strict=True)
            ]
        else:
            biased = local_leaves(optree.tree_leaves(state["biased"]))
            local_step = optree.tree_leaves(state["local_step"])
            new_shadow, new_biased, new_steps = [], [], []
            for s, b, n, v in zip(shadow, biased, local_step, values, strict=True):
                if not is_inexact(s):
                    new_shadow.append(copy_leaf(s, v, inplace=inplace))
                    new_biased.append(copy_leaf(b, v, inplace=inplace))
                    new_steps.append(n)
                    continue
                # TF's _zero_debias: biased -= (biased - value) * c; local_step += 1;
                # shadow = biased / (1 - (1 - c) ** local_step), all in the leaf's dtype.
                c = torch.as_tensor(weights(s.dtype), dtype=s.dtype, device=s.device)
                b = average_leaf(b, v, weights(s.dtype), inplace=inplace, flags=flags)
                n = n.add_(1) if inplace else n + 1
                debiased = b / (1 - torch.pow(1 - c, n))
                new_shadow.append(s.copy_(debiased) if inplace else debiased)
                new_biased.append(b)
                new_steps.append(n)
            new["biased"] = optree.tree_unflatten(spec, rewrap(likes, new_biased))
            new["local_step"] = optree.tree_unflatten(spec, new_steps)
        new["params"] = optree.tree_unflatten(spec, rewrap(likes, new_shadow))

        if buffer_pairs is not None:
            held, current, buffer_spec = buffer_pairs
            new_held = [
                average_leaf(h, c, weights(h.dtype), inplace=inplace, flags=flags)
                if buffer_policy == "average"
                else copy_leaf(h, c, inplace=inplace)
                for h, c in zip(held, current, strict=True)
            ]
            buffer_likes = None if inplace else self.buffer_likes
            new["buffers"] = optree.tree_unflatten(buffer_spec, rewrap(buffer_likes, new_held))
        new["nonfinite"] = _count_nonfinite(state["nonfinite"], flags or [], inplace=inplace)
        return state if inplace else new


def _count_nonfinite(counter: Tensor, flags: list[Tensor], *, inplace: bool) -> Tensor:
    """Add 1 to ``counter`` if any "all finite" flag is false, on the device (no sync)."""
    if not flags:
        return counter if inplace else counter.clone()
    flag = (
        flags[0].to(counter.device)
        if len(flags) == 1
        else torch.stack([flag.to(counter.device) for flag in flags]).all()
    )
    seen = ~flag
    return counter.add_(seen) if inplace else counter + seen


def prepare(
    api: str,
    state: EmaState,
    params: TensorTree,
    buffers: TensorTree | None = None,
    buffer_policy: BufferPolicy = "copy",
) -> Prepared:
    """Validate an update of ``state`` from ``params`` (and ``buffers``); see :class:`Prepared`."""
    return Prepared(api, state, params, buffers, buffer_policy)


def _update(
    api: str,
    state: EmaState,
    params: TensorTree,
    decay: Decay | Schedule,
    buffers: TensorTree | None,
    buffer_policy: BufferPolicy,
    dt: int | Tensor,
    nonfinite: NonFinite,
    *,
    inplace: bool,
) -> EmaState:
    # Every check first (structure, shapes, devices, dtypes; then decay and dt in run):
    # nothing is written until all of them have passed.
    prepared = prepare(api, state, params, buffers, buffer_policy)
    if inplace:
        return prepared.run(decay, dt, nonfinite)
    return prepared._run(decay, dt, nonfinite, inplace=False)


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
        decay: :math:`\beta`: a Python float, a 0-dim floating tensor, or a schedule (e.g.
            :func:`tf_warmup`, :func:`power`), called as ``schedule(t, dt)`` with
            ``t = state["step"] + dt``, the step this update reaches.
        buffers: The current buffers; required exactly when :func:`init` got buffers.
        buffer_policy: ``"copy"`` (default: the averaged model uses the latest buffers, as
            the classic ``EMA`` snippet does) or ``"average"`` (floating buffers are averaged
            like parameters; integer buffers are always copied).
        dt: Steps this update covers (an int >= 1 or a 0-dim integer tensor), for updates
            every ``dt`` steps or after skipped steps: a constant decay is applied as
            :math:`\beta^{dt}` and schedules get ``dt``, so the average's time constant does
            not depend on how often you update. ``dt=1`` is TF's update, bit for bit.
        nonfinite: ``"skip"`` (default): NaN/Inf values leave their averages unchanged and
            ``state["nonfinite"]`` counts the update, on the device (no host sync);
            ``"raise"``: a ``ValueError`` naming the leaf before anything is written (reads a
            flag on the host); ``"propagate"``: average them in, as TF does.

    Returns:
        The new :class:`EmaState`, differentiable with respect to ``params``.

    Raises:
        ValueError: Mismatched structure, shapes or devices, or ``decay``/``dt`` out of range.
        TypeError: Non-tensor leaves, wrong dtypes or a malformed state.

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> state = fe.update(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"], int(state["step"])
        (tensor([0.1000, 0.1000]), 1)
    """
    return _update(
        "update", state, params, decay, buffers, buffer_policy, dt, nonfinite, inplace=False
    )


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

    Same leaf routine and bits as :func:`update`; every check runs before the first write.

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

    Example:
        >>> import torch, functional_ema as fe
        >>> state = fe.init({"w": torch.zeros(2)})
        >>> _ = fe.update_(state, {"w": torch.ones(2)}, decay=0.9)
        >>> fe.average(state)["w"]
        tensor([0.1000, 0.1000])
    """
    return _update(
        "update_", state, params, decay, buffers, buffer_policy, dt, nonfinite, inplace=True
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
    _check_state("average", state)
    return state["params"]
