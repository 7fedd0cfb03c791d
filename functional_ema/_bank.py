r"""Decay banks: K averages of one params tree, updated together, params read once.

A bank's leaves hold K averages stacked on a leading dimension (:func:`bank`). Row :math:`k`
moves towards the value with its own weight :math:`w_k = 1 - \beta_k`:

.. math:: \bar\theta_k \leftarrow \bar\theta_k - (\bar\theta_k - \theta)\, w_k

:func:`update_bank_weights_` is the one bank update, given the K weights: the engine's bank
kernel where it applies, else :func:`_arith.average_leaf` per leaf, with the non-finite policy
and DTensor leaves updated on their local shards. :func:`ema_update_bank_` calls it with TF's
float32 weights :math:`\mathrm{f32}(1) - \mathrm{f32}(\beta_k)`; ``posthoc_update_`` with the
float64 weights of the power profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import optree
import torch
from torch import Tensor

from functional_ema._arith import average_leaf, is_inexact
from functional_ema._core import check_policy, raise_if_nonfinite
from functional_ema._decay import averaging_weight, check_decay, check_decays_tensor
from functional_ema._dtensor import dtensor_type, localize, rewrap
from functional_ema._engine import fast_path_ok, update_bank_leaf_
from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves
from functional_ema._types import NonFinite, T, TensorTree


_SIZE_FIX = "Pass the number of averages, e.g. len(decays)."
_DECAYS_FIX = "Pass one decay per bank row, e.g. torch.tensor([0.99, 0.999]) or [0.99, 0.999]."


def bank(params: TensorTree, size: int, *, dtype: torch.dtype | None = None) -> TensorTree:
    """Start ``size`` averages of ``params``, stacked on a new leading dimension.

    Every row starts at a copy of ``params`` (detached), as :func:`init` does.

    Args:
        params: Any pytree of tensors.
        size: The number of averages K (one per decay).
        dtype: Floating dtype of the averages (e.g. ``torch.float32`` for a bfloat16 model);
            ``None`` keeps each leaf's dtype.

    Returns:
        A tree like ``params`` whose leaves have shape ``(size, *leaf.shape)``.

    Example:
        >>> import torch, functional_ema as fe
        >>> fe.bank({"w": torch.ones(3)}, 2)["w"].shape
        torch.Size([2, 3])
    """
    api = "bank"
    check_tensor_leaves(api, params, "params")
    check_floating_dtype(api, dtype)
    if isinstance(size, bool) or not isinstance(size, int):
        raise wrong_type(
            api, "bank size of the wrong type", "size", "an int >= 1", describe(size), _SIZE_FIX
        )
    if size < 1:
        raise wrong_value(api, "bank size out of range", "size", "an int >= 1", size, _SIZE_FIX)

    def stack(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None and is_inexact(t):
            t = t.to(dtype)
        return t.unsqueeze(0).expand(size, *t.shape).clone()

    return optree.tree_map(stack, params)


def _check_decays(api: str, decays: object) -> Tensor:
    """K decays as a 1-D floating tensor (Python decays checked and rounded to float32)."""
    expected = "a 1-D floating tensor or a non-empty sequence of floats"
    if isinstance(decays, Tensor):
        if not decays.is_floating_point():
            what = "decays of a non-floating dtype"
            raise wrong_type(api, what, "decays", expected, describe(decays), _DECAYS_FIX)
        if decays.ndim != 1:
            what = "decays not 1-D"
            raise wrong_value(api, what, "decays", expected, describe(decays), _DECAYS_FIX)
        check_decays_tensor(api, decays)  # a CPU tensor is read (free); others are not
        return decays
    if not isinstance(decays, Sequence) or isinstance(decays, str):
        what = "decays of the wrong type"
        raise wrong_type(api, what, "decays", expected, describe(decays), _DECAYS_FIX)
    if not decays:
        raise wrong_value(api, "no decays", "decays", expected, "an empty sequence", _DECAYS_FIX)
    for index, decay in enumerate(decays):
        check_decay(api, decay, f"decays[{index}]")
    # float32 is what TF rounds a decay to, so this loses nothing.
    return torch.tensor([float(d) for d in decays], dtype=torch.float32)


class _RowWeights:
    """The K weights of one update, cast once per leaf dtype, rank and device.

    A leaf's weights have shape ``(K, 1, ..., 1)`` (broadcast over the row of each average)
    and the leaf's dtype: the cast is their only rounding, as TF's ``cast(1 - decay,
    var.dtype)``.
    """

    def __init__(self, weights: Tensor) -> None:
        self._weights = weights
        self._by_leaf: dict[tuple[torch.dtype, int, torch.device], Tensor] = {}

    def __call__(self, leaf: Tensor) -> Tensor:
        key = (leaf.dtype, leaf.ndim, leaf.device)
        if key not in self._by_leaf:
            rows = self._weights.to(device=leaf.device, dtype=leaf.dtype)
            self._by_leaf[key] = rows.view(-1, *([1] * (leaf.ndim - 1)))
        return self._by_leaf[key]


def _localize(
    api: str,
    shadows: Any,
    shadow_leaves: list[Tensor],
    params_leaves: list[Tensor],
    names: tuple[str, str],
) -> tuple[list[Tensor], list[Tensor], list[Any] | None]:
    """:func:`_dtensor.localize` for a bank: DTensor pairs map to their local shards.

    A bank leaf has one more (leading) dimension than its value, so a value sharded on
    dimension ``d`` meets averages sharded on ``d + 1``. Each DTensor value is therefore
    compared as K rows of itself (``value.unsqueeze(0).expand(K, ...)``: a view, no
    communication), and its local shard is the first row of that view's.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return shadow_leaves, params_leaves, None
    sharded = [isinstance(value, dtensor) for value in params_leaves]
    rows = [
        value.unsqueeze(0).expand(shadow.shape[0], *value.shape) if is_dtensor else value
        for shadow, value, is_dtensor in zip(shadow_leaves, params_leaves, sharded, strict=True)
    ]
    local_shadows, local_rows, templates = localize(api, shadows, shadow_leaves, rows, names)
    local_values = [
        row[0] if is_dtensor else row for row, is_dtensor in zip(local_rows, sharded, strict=True)
    ]
    return local_shadows, local_values, templates


def _update(
    api: str,
    shadows: T,
    params: T,
    weights: Tensor,
    *,
    inplace: bool,
    nonfinite: NonFinite,
    names: tuple[str, str],
) -> T:
    """The bank update with K given weights; see :func:`update_bank_weights_`."""
    check_policy(api, nonfinite)
    shadow_leaves, params_leaves, spec = check_pair(
        api, shadows, params, names, bank=weights.shape[0]
    )
    shadow_leaves, params_leaves, templates = _localize(
        api, shadows, shadow_leaves, params_leaves, names
    )
    if nonfinite == "raise":
        raise_if_nonfinite(api, shadows, shadow_leaves, params_leaves, names[1])
    flags: list[Tensor] | None = [] if nonfinite == "skip" else None
    weight_for = _RowWeights(weights)
    engine = inplace and fast_path_ok(*shadow_leaves, *params_leaves)
    new = []
    for s, p in zip(shadow_leaves, params_leaves, strict=True):
        if engine and is_inexact(s) and s.numel():
            leaf_flags = update_bank_leaf_(s, p, weight_for(s), mask=flags is not None)
            if leaf_flags is not None:  # the bank kernel ran
                if flags is not None:
                    flags.extend(leaf_flags)
                new.append(s)
                continue
        weight = weight_for(s) if is_inexact(s) else 0.0
        new.append(average_leaf(s, p, weight, inplace=inplace, finite_flags=flags))
    return shadows if inplace else cast(T, optree.tree_unflatten(spec, rewrap(templates, new)))


@torch.no_grad()
def update_bank_weights_(
    api: str,
    shadows: T,
    params: T,
    weights: Tensor,
    *,
    nonfinite: NonFinite,
    names: tuple[str, str] = ("bank", "params"),
) -> T:
    r"""Move row :math:`k` of every bank leaf towards ``params`` by ``weights[k]``, in place.

    The one bank update: :math:`\bar\theta_k \leftarrow \bar\theta_k - (\bar\theta_k -
    \theta)\, w_k` per floating leaf (integer leaves are copied into every row), with the
    engine's bank kernel where it applies and the per-leaf TF step elsewhere (same bits).
    Every check runs before the first tensor is written.

    Args:
        api: The public function's name, for messages.
        shadows: A bank (leaves of shape ``(K, *param.shape)``), modified in place.
        params: The current values, with the structure of the bank's rows. Not modified.
        weights: The K weights :math:`w_k = 1 - \beta_k`, a 1-D floating tensor (float32 for
            TF's weights, float64 for the post-hoc ones); cast to each leaf's dtype once,
            which is their only rounding.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in :func:`ema_update`.
        names: What ``shadows`` and ``params`` are called in messages.

    Returns:
        ``shadows`` itself.

    Raises:
        ValueError: Mismatched structure, shapes, devices, bank size or sharding, an unknown
            policy, or (``nonfinite="raise"``) a NaN/Inf in ``params``.
        TypeError: Non-tensor leaves or wrong dtypes.

    Example:
        >>> import torch, functional_ema as fe
        >>> from functional_ema._bank import update_bank_weights_
        >>> shadows = fe.bank({"w": torch.zeros(2)}, 2)
        >>> weights = torch.tensor([1.0, 0.25], dtype=torch.float64)
        >>> update_bank_weights_("demo", shadows, {"w": torch.ones(2)}, weights, nonfinite="skip")
        {'w': tensor([[1.0000, 1.0000],
                [0.2500, 0.2500]])}
    """
    return _update(api, shadows, params, weights, inplace=True, nonfinite=nonfinite, names=names)


def _tf_weights(api: str, decays: object) -> Tensor:
    """TF's weights ``float32(1) - float32(decay)`` of validated decays."""
    return cast(Tensor, averaging_weight(_check_decays(api, decays)))


def ema_update_bank(
    shadows: T, params: T, decays: Tensor | Sequence[float], *, nonfinite: NonFinite = "skip"
) -> T:
    r"""Update K averages of one tree at once, one decay each; return a new bank.

    Row :math:`k` gets exactly :func:`ema_update` with ``decays[k]`` (same bits), but each
    operation covers all K rows, so ``params`` is read once per update rather than K times:
    a decay sweep (0.99, 0.999, 0.9999) or EDM2's two power profiles in one pass.

    .. math::
        \bar\theta_k \leftarrow \bar\theta_k - (\bar\theta_k - \theta)\, w_k, \qquad
        w_k = \mathrm{cast}(\mathrm{f32}(1) - \mathrm{f32}(\beta_k))

    Args:
        shadows: A bank from :func:`bank`: leaves of shape ``(K, *param.shape)``. Not
            modified.
        params: The current values (leaves of shape ``param.shape``). Not modified.
        decays: K decays: a 1-D floating tensor (e.g. from a schedule such as
            ``fe.power(sigma_rel=[0.05, 0.1])``) or a sequence of floats in [0, 1].
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in :func:`ema_update`.

    Returns:
        The new bank.

    Raises:
        ValueError: Mismatched structure, shapes, devices or bank size, or a decay out of
            range.
        TypeError: Non-tensor leaves or wrong dtypes.

    Example:
        >>> import torch, functional_ema as fe
        >>> shadows = fe.bank({"w": torch.zeros(2)}, 3)
        >>> fe.ema_update_bank(shadows, {"w": torch.ones(2)}, [0.0, 0.5, 1.0])["w"]
        tensor([[1.0000, 1.0000],
                [0.5000, 0.5000],
                [0.0000, 0.0000]])
    """
    api = "ema_update_bank"
    weights = _tf_weights(api, decays)
    return _update(
        api, shadows, params, weights, inplace=False, nonfinite=nonfinite, names=("bank", "params")
    )


@torch.no_grad()
def ema_update_bank_(
    shadows: T, params: T, decays: Tensor | Sequence[float], *, nonfinite: NonFinite = "skip"
) -> T:
    """In-place twin of :func:`ema_update_bank`; returns ``shadows``.

    Args:
        shadows: A bank from :func:`bank`, modified in place.
        params: The current values. Not modified.
        decays: K decays, as in :func:`ema_update_bank`.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in :func:`ema_update`.

    Returns:
        ``shadows`` itself.

    Example:
        >>> import torch, functional_ema as fe
        >>> shadows = fe.bank({"w": torch.zeros(2)}, 2)
        >>> _ = fe.ema_update_bank_(shadows, {"w": torch.ones(2)}, [0.9, 0.99])
        >>> shadows["w"][:, 0]
        tensor([0.1000, 0.0100])
    """
    api = "ema_update_bank_"
    return update_bank_weights_(api, shadows, params, _tf_weights(api, decays), nonfinite=nonfinite)
