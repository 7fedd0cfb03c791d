"""``ema_update`` / ``ema_update_``: the TF step over any pytree, pure and in place.

Shared by the state, bank and adapter paths: the per-call weight cache, the non-finite
policy check and the ``nonfinite="raise"`` check.
"""

from __future__ import annotations

import operator
import struct
from itertools import compress
from typing import Literal, TypeAlias, cast

import optree
import torch
from torch import Tensor

from functional_ema._arith import average_leaf, inexact_flags, is_inexact
from functional_ema._decay import averaging_weight, check_decay, unread_in_range, weight_as
from functional_ema._dtensor import localize, rewrap
from functional_ema._engine import build_plan, fast_path_ok, pure_path_ok, updated
from functional_ema._errors import check_choice, describe, wrong_type, wrong_value
from functional_ema._tree import check_pair, leaf_paths
from functional_ema._types import Decay, NonFinite, T


TfOp: TypeAlias = Literal["apply", "assign_moving_average"]
"""Which TensorFlow op's weight ``1 - decay`` an update reproduces (see :func:`tf_op_weight`)."""

TF_OPS: tuple[TfOp, ...] = ("apply", "assign_moving_average")


def tf_op_weight(decay: Decay, tf_op: TfOp = "apply") -> float | Tensor:
    """The weight ``1 - decay`` as the TensorFlow op ``tf_op`` computes it, before the leaf cast.

    - ``"apply"``: ``ExponentialMovingAverage.apply`` converts the decay to float32 first,
      ``float32(1) - float32(decay)`` (:func:`_decay.averaging_weight`).
    - ``"assign_moving_average"`` called directly: ``convert_to_tensor(1.0 - decay)``. For a
      Python number the subtraction is Python's (float64), rounded once to float32 when
      converted; for a tensor it runs in the tensor's own dtype (a float64 decay gives a
      float64 weight, never rounded to float32).

    Either way the result is then cast to each leaf's dtype (:func:`_decay.weight_as`).
    """
    if tf_op == "apply":
        return averaging_weight(decay)
    if isinstance(decay, Tensor):
        return 1 - decay
    return struct.unpack("f", struct.pack("f", 1.0 - decay))[0]


class WeightCache:
    """The averaging weight of one call, cast once per leaf dtype.

    ``valid``: the call's device-side range check (:func:`_decay.unread_in_range`), a 0-dim
    bool not read on the host, or ``None`` when the host checked every value. Where it is
    false the update leaves the averages unchanged and counts as a skipped update.
    ``tf_op``: whose weight (:func:`tf_op_weight`); TF's ``apply`` unless told otherwise.
    """

    def __init__(self, decay: Decay, valid: Tensor | None = None, *, tf_op: TfOp = "apply") -> None:
        self._weight = tf_op_weight(decay, tf_op)
        self._by_dtype: dict[torch.dtype, float | Tensor] = {}
        self.valid = valid

    def __call__(self, dtype: torch.dtype) -> float | Tensor:
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = weight_as(self._weight, dtype)
        return self._by_dtype[dtype]


def split_by_kind(
    pairs: list[tuple[Tensor, Tensor]],
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Validated ``(shadow, value)`` pairs split into floating ones (averaged) and the rest."""
    kinds = inexact_flags(list(map(operator.itemgetter(0), pairs)))
    if all(kinds):
        return list(pairs), []
    return list(compress(pairs, kinds)), list(compress(pairs, map(operator.not_, kinds)))


def updated_leaves(
    shadow: list[Tensor],
    values: list[Tensor],
    weights: WeightCache,
    *,
    mask: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """A pure update of validated leaves by the engine: the new leaves, in order, and flags.

    Floating leaves are averaged, the others copied (see :func:`_engine.updated`).
    """
    averaged, copied = split_by_kind(list(zip(shadow, values, strict=True)))
    new_averaged, new_copied, flags = updated(
        averaged, copied, weights, mask=mask, valid=weights.valid
    )
    if not copied:
        return new_averaged, flags
    averaged_iter, copied_iter = iter(new_averaged), iter(new_copied)
    kinds = inexact_flags(shadow)
    return [next(averaged_iter) if k else next(copied_iter) for k in kinds], flags


def check_policy(api: str, nonfinite: object) -> None:
    """Validate the non-finite policy."""
    check_choice(
        api,
        "nonfinite",
        nonfinite,
        ("skip", "raise", "propagate"),
        "'skip' (the default) leaves NaN/Inf values out of the average, 'raise' rejects the "
        "update, 'propagate' averages them in as TF does.",
    )


def raise_if_nonfinite(
    api: str, tree: object, shadow: list[Tensor], values: list[Tensor], name: str
) -> None:
    """``nonfinite="raise"``: reject non-finite values before anything is written (host sync)."""
    for index, (s, v) in enumerate(zip(shadow, values, strict=True)):
        if is_inexact(s) and not bool(torch.isfinite(v).all()):
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            raise wrong_value(
                api,
                "non-finite value",
                leaf_paths(tree)[index],
                f"finite {name}",
                f"{nan} NaN and {inf} Inf",
                "Nothing was updated. Find the cause (learning rate, loss scale), or pass "
                "nonfinite='skip' to leave such values out of the average.",
            )


def check_tf_op(api: str, tf_op: object) -> None:
    """Validate the TF op whose weight an update reproduces."""
    check_choice(
        api,
        "tf_op",
        tf_op,
        TF_OPS,
        "'apply' (the default) is ExponentialMovingAverage.apply; 'assign_moving_average' is "
        "that function called directly with this decay (it computes 1 - decay before the "
        "float32 conversion).",
    )


def _ema_update(
    api: str,
    shadow: T,
    params: T,
    decay: Decay,
    *,
    inplace: bool,
    nonfinite: NonFinite,
    tf_op: TfOp = "apply",
) -> T:
    if callable(decay) and not isinstance(decay, Tensor):
        raise wrong_type(
            api,
            "a schedule passed as the decay",
            "decay",
            "a Python float or a 0-dim floating tensor",
            describe(decay),
            f"{api} keeps no step to call a schedule with: keep a state (state = "
            "fe.init(params), then state = fe.update(state, params, schedule)), or pass the "
            "schedule's value, decay=schedule(t, dt).",
        )
    decay = check_decay(api, decay)
    valid = unread_in_range(decay)
    check_policy(api, nonfinite)
    check_tf_op(api, tf_op)
    shadow_leaves, params_leaves, spec = check_pair(api, shadow, params)
    # DTensor pairs update their local shards: shard-local, no collective.
    shadow_leaves, params_leaves, templates = localize(
        api, shadow, shadow_leaves, params_leaves, ("shadow", "params")
    )
    if nonfinite == "raise":
        raise_if_nonfinite(api, shadow, shadow_leaves, params_leaves, "params")
    mask = nonfinite == "skip"
    weights = WeightCache(decay, valid, tf_op=tf_op)
    if inplace and fast_path_ok(*shadow_leaves, *params_leaves):
        build_plan(*split_by_kind(list(zip(shadow_leaves, params_leaves, strict=True)))).run(
            weights, mask=mask, valid=valid
        )
        return shadow
    if not inplace and pure_path_ok(*shadow_leaves, *params_leaves):
        new, _ = updated_leaves(shadow_leaves, params_leaves, weights, mask=mask)
        return cast(T, optree.tree_unflatten(spec, rewrap(templates, new)))
    flags: list[Tensor] | None = [] if mask else None
    new = [
        average_leaf(s, p, weights(s.dtype), inplace=inplace, finite_flags=flags, valid=valid)
        for s, p in zip(shadow_leaves, params_leaves, strict=True)
    ]
    return shadow if inplace else cast(T, optree.tree_unflatten(spec, rewrap(templates, new)))


def ema_update(
    shadow: T,
    params: T,
    decay: Decay,
    *,
    nonfinite: NonFinite = "skip",
    tf_op: TfOp = "apply",
) -> T:
    r"""Return the moving average of ``shadow`` towards ``params`` as a new tree.

    Per floating leaf, exactly as TensorFlow's ``ExponentialMovingAverage.apply`` (which calls
    ``assign_moving_average`` with the decay converted to a float32 tensor):

    .. math::
        w = \mathrm{cast}_{\mathrm{dtype}}\big(\mathrm{f32}(1) - \mathrm{f32}(\beta)\big), \qquad
        \bar\theta \leftarrow \bar\theta - (\bar\theta - \theta)\, w

    with every operation rounded in the leaf's dtype, which reproduces TF's shadow values bit
    for bit in float32, float64, float16 and bfloat16 (``torch.lerp`` and
    ``decay * s + (1 - decay) * p`` round differently). Integer and bool leaves (e.g.
    BatchNorm's ``num_batches_tracked``) are copied from ``params``, never averaged.

    ``assign_moving_average(variable, value, decay)`` called directly (as TF1-era batch-norm
    code does for its moving statistics) computes the weight otherwise when ``decay`` is a
    Python number: ``w = cast_dtype(f32(1.0 - β))``, the subtraction in float64 and one
    rounding to float32. At ``β = 0.999`` that weight is ``1.0000000475e-3`` instead of
    ``0.99998713e-3``, 1.3e-5 larger relative to it: an update then differs from TF's by an
    ulp or two in a few float32 averages (2 of 16 in the recorded case) and, by that relative
    1.3e-5 of its step, in every float64 one.
    ``tf_op="assign_moving_average"`` gives that op's bits (and, for a tensor ``β``,
    computes ``1 - β`` in its own dtype, as TF does: a float64 decay gives a float64
    weight).

    Args:
        shadow: The running averages: any optree pytree of tensors. Not modified.
        params: A tree with the structure, shapes and devices of ``shadow``. Floating leaves
            may be narrower than ``shadow``'s (a float32 average of a bfloat16 model); the
            update then runs in ``shadow``'s dtype. Not modified.
        decay: :math:`\beta \in [0, 1]`, a Python float or a 0-dim floating tensor (read on
            the device, no host sync). ``1.0`` freezes the average; ``0.0`` gives
            ``shadow - (shadow - params)``, which is ``params`` up to one rounding, as in TF.
            A number or CPU tensor outside [0, 1] (or NaN) raises; a tensor on an
            accelerator is checked there instead: out of range, every average keeps its
            bits (there is no counter here; :func:`update_` counts such updates).
        nonfinite: ``"skip"`` (default): a NaN or Inf in ``params`` leaves that element's
            average unchanged (no host sync); ``"raise"``: a ``ValueError`` naming the leaf,
            before anything is written (reads a flag on the host); ``"propagate"``: average
            it in, as TF does.
        tf_op: ``"apply"`` (default): the bits of ``ExponentialMovingAverage.apply``;
            ``"assign_moving_average"``: those of ``assign_moving_average(shadow, params,
            decay, zero_debias=False)`` called with this ``decay``.

    Returns:
        A new tree like ``shadow``. It is differentiable with respect to ``params`` like any
        torch expression; pass detached tensors to keep no autograd history.

    Raises:
        ValueError: If structure, shapes or devices differ, ``decay`` is out of range,
            ``nonfinite`` or ``tf_op`` is not one of its options, or (with
            ``nonfinite="raise"``) ``params`` holds NaN or Inf.
        TypeError: If a leaf is not a tensor, a dtype cannot be averaged, or ``decay``,
            ``nonfinite`` or ``tf_op`` has the wrong type.

    Example:
        >>> import torch, functional_ema as fe
        >>> fe.ema_update({"w": torch.zeros(2)}, {"w": torch.ones(2)}, decay=0.9)
        {'w': tensor([0.1000, 0.1000])}
        >>> x = {"w": torch.tensor([1.0], dtype=torch.float64)}
        >>> zero = {"w": torch.zeros(1, dtype=torch.float64)}
        >>> fe.ema_update(zero, x, 0.999)["w"].item()  # apply: f32(1) - f32(0.999)
        0.0009999871253967285
        >>> fe.ema_update(zero, x, 0.999, tf_op="assign_moving_average")["w"].item()
        0.0010000000474974513

    See also: :func:`ema_update_` (in place), :func:`update` (state with step counter).
    """
    return _ema_update(
        "ema_update", shadow, params, decay, inplace=False, nonfinite=nonfinite, tf_op=tf_op
    )


@torch.no_grad()
def ema_update_(
    shadow: T,
    params: T,
    decay: Decay,
    *,
    nonfinite: NonFinite = "skip",
    tf_op: TfOp = "apply",
) -> T:
    r"""In-place twin of :func:`ema_update`: update ``shadow``'s tensors and return ``shadow``.

    Same TF step and bits as :func:`ema_update`; runs under ``torch.no_grad()``. Every
    check runs before the first tensor is written, so a failed call leaves ``shadow`` as it
    was.

    .. math:: \bar\theta \leftarrow \bar\theta - (\bar\theta - \theta)\, w

    Args:
        shadow: The running averages, modified in place.
        params: A tree with the structure, shapes and devices of ``shadow``. Not modified.
        decay: :math:`\beta \in [0, 1]`, a Python float or a 0-dim floating tensor.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in :func:`ema_update`.
        tf_op: ``"apply"`` or ``"assign_moving_average"``: whose weight :math:`w`, as in
            :func:`ema_update`.

    Returns:
        ``shadow`` itself.

    Raises:
        ValueError: If structure, shapes or devices differ, ``decay`` is out of range,
            ``nonfinite`` or ``tf_op`` is not one of its options, or (with
            ``nonfinite="raise"``) ``params`` holds NaN or Inf.
        TypeError: If a leaf is not a tensor, a dtype cannot be averaged, or ``decay``,
            ``nonfinite`` or ``tf_op`` has the wrong type.

    Example:
        >>> import torch, functional_ema as fe
        >>> shadow = {"w": torch.zeros(2)}
        >>> _ = fe.ema_update_(shadow, {"w": torch.ones(2)}, decay=0.9)
        >>> shadow
        {'w': tensor([0.1000, 0.1000])}
    """
    return _ema_update(
        "ema_update_", shadow, params, decay, inplace=True, nonfinite=nonfinite, tf_op=tf_op
    )
