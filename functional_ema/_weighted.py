"""TensorFlow's ``weighted_moving_average``: two averages and their ratio, on the TF step."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor

from functional_ema._arith import is_inexact
from functional_ema._core import _ema_update
from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._types import Decay, NonFinite


class WeightedState(TypedDict):
    """The two averages :func:`weighted_moving_average` keeps, named as TF's variables.

    Attributes:
        value_x_weight: The average of ``value * weight`` (``value``'s shape and dtype).
        weight: The average of ``weight`` (its shape and dtype).
    """

    value_x_weight: Tensor
    weight: Tensor


def _check_tensor(api: str, name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor) or not is_inexact(tensor):
        raise wrong_type(
            api,
            f"`{name}` not a floating tensor",
            name,
            "a floating torch.Tensor",
            describe(tensor),
            "Pass a float tensor, e.g. torch.as_tensor(x, dtype=torch.float32).",
        )
    return tensor


def weighted_moving_average(
    value: Tensor,
    decay: Decay,
    weight: Tensor,
    *,
    state: WeightedState | None = None,
    nonfinite: NonFinite = "skip",
) -> tuple[Tensor, WeightedState]:
    r"""TensorFlow's ``weighted_moving_average(value, decay, weight)``, bit for bit, pure.

    TF keeps two moving averages, of ``value * weight`` and of ``weight``, both starting at
    zero (no debiasing), each moved by ``assign_moving_average(..., zero_debias=False)``,
    and returns their ratio:

    .. math::
        n \leftarrow n - (n - v \cdot u)\, w, \qquad
        d \leftarrow d - (d - u)\, w, \qquad
        \text{result} = n / d

    with :math:`u` the weight and :math:`w` that op's ``cast(f32(1.0 - decay))``
    (:func:`ema_update` with ``tf_op="assign_moving_average"``), every operation rounded in
    the tensors' dtype. The zero start cancels in the ratio (both averages carry the same
    factor :math:`1 - \text{decay}^t`). TF's ``truediv`` flag only matters for integer
    dtypes, which are not averaged here.

    Arguments come in TF's order. TF creates its two variables the first time the op is
    built (in TF 2 eager code, every call makes new ones, so its result there is just
    ``value``); here the state is explicit: pass ``state=None`` the first time, then the
    state each call returns.

    Args:
        value: A floating tensor.
        decay: :math:`\beta \in [0, 1]`: a Python float or a 0-dim floating tensor.
        weight: A tensor of ``value``'s dtype whose shape broadcasts to ``value``'s (a
            scalar, a column, or the same shape).
        state: ``None`` to start (TF's zero-initialised variables), else the state the
            previous call returned. Not modified.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"propagate"`` (TF's behaviour), for
            NaN/Inf in ``value * weight`` and ``weight``, as in :func:`ema_update`.

    Returns:
        ``(average, state)``: the weighted average (``value``'s shape, where the
        denominator broadcasts) and the new :class:`WeightedState`.

    Raises:
        TypeError: ``value`` or ``weight`` is not a floating tensor, or their dtypes differ.
        ValueError: ``weight``'s shape does not broadcast to ``value``'s, ``state`` does not
            match them, or ``decay`` is out of range.

    Example:
        >>> import torch, functional_ema as fe
        >>> avg, state = fe.weighted_moving_average(torch.tensor([2.0]), 0.5, torch.tensor(1.0))
        >>> avg, state = fe.weighted_moving_average(
        ...     torch.tensor([8.0]), 0.5, torch.tensor(3.0), state=state
        ... )
        >>> avg  # (0.25 * 2 * 1 + 0.5 * 8 * 3) / (0.25 * 1 + 0.5 * 3)
        tensor([7.1429])
        >>> state
        {'value_x_weight': tensor([12.5000]), 'weight': tensor(1.7500)}
    """
    api = "weighted_moving_average"
    value = _check_tensor(api, "value", value)
    weight = _check_tensor(api, "weight", weight)
    if weight.dtype != value.dtype:
        raise wrong_type(
            api,
            "dtype mismatch",
            "weight",
            f"{value.dtype} (value's dtype)",
            weight.dtype,
            "TF multiplies value by weight in one dtype: convert one, e.g. weight.to(value.dtype).",
        )
    try:
        broadcast = torch.broadcast_shapes(value.shape, weight.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != value.shape:
        raise wrong_value(
            api,
            "shape mismatch",
            "weight",
            f"a shape that broadcasts to value's {tuple(value.shape)}",
            tuple(weight.shape),
            "Give the weight value's shape, one entry per row (a column), or a scalar.",
        )
    product = value * weight
    if state is None:
        state = {"value_x_weight": torch.zeros_like(product), "weight": torch.zeros_like(weight)}
    values: WeightedState = {"value_x_weight": product, "weight": weight}
    new = _ema_update(
        api,
        state,
        values,
        decay,
        inplace=False,
        nonfinite=nonfinite,
        tf_op="assign_moving_average",
    )
    return new["value_x_weight"] / new["weight"], new
