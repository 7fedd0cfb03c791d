"""Decay banks: K averages of one params tree, updated together, params read once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import optree
import torch
from torch import Tensor

from functional_ema._arith import average_leaf, is_inexact
from functional_ema._core import check_policy, raise_if_nonfinite
from functional_ema._decay import averaging_weight, check_decay, weight_as
from functional_ema._engine import fast_path_ok, update_bank_leaf_
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves
from functional_ema._types import NonFinite, T, TensorTree


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
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{api}: `size` must be an int >= 1, got {size!r}. Pass len(decays).")

    def stack(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None and is_inexact(t):
            t = t.to(dtype)
        return t.unsqueeze(0).expand(size, *t.shape).clone()

    return optree.tree_map(stack, params)


def _check_decays(api: str, decays: Tensor | Sequence[float]) -> Tensor:
    if isinstance(decays, Tensor):
        if decays.ndim != 1 or not decays.is_floating_point():
            raise ValueError(
                f"{api}: `decays` must be a 1-D floating tensor (one decay per row), got shape "
                f"{tuple(decays.shape)} and dtype {decays.dtype}. Pass e.g. "
                "torch.tensor([0.99, 0.999])."
            )
        return decays
    if not isinstance(decays, Sequence) or isinstance(decays, str) or not decays:
        raise TypeError(
            f"{api}: `decays` must be a 1-D tensor or a non-empty sequence of floats, got "
            f"{type(decays).__name__}. Pass e.g. [0.99, 0.999, 0.9999]."
        )
    for index, decay in enumerate(decays):
        check_decay(f"{api} (decays[{index}])", decay)
    # float32 is what TF rounds a decay to, so this loses nothing.
    return torch.tensor([float(d) for d in decays], dtype=torch.float32)


def _ema_update_bank(
    api: str, shadows: T, params: T, decays: object, *, inplace: bool, nonfinite: NonFinite
) -> T:
    decays = _check_decays(api, decays)  # type: ignore[arg-type]
    check_policy(api, nonfinite)
    size = decays.shape[0]
    shadow_leaves, params_leaves, spec = check_pair(
        api, shadows, params, ("bank", "params"), bank=size
    )
    if nonfinite == "raise":
        raise_if_nonfinite(api, shadows, shadow_leaves, params_leaves, "params")
    flags: list[Tensor] | None = [] if nonfinite == "skip" else None
    weight = averaging_weight(decays)
    cache: dict[tuple[torch.dtype, int, torch.device], Tensor] = {}

    def weight_for(leaf: Tensor) -> Tensor:
        key = (leaf.dtype, leaf.ndim, leaf.device)
        if key not in cache:
            cast = weight_as(weight, leaf.dtype)
            assert isinstance(cast, Tensor)
            cache[key] = cast.to(leaf.device).view(size, *([1] * (leaf.ndim - 1)))
        return cache[key]

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
        new.append(
            average_leaf(
                s, p, weight_for(s) if is_inexact(s) else 0.0, inplace=inplace, finite_flags=flags
            )
        )
    return shadows if inplace else cast(T, optree.tree_unflatten(spec, new))


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
    return _ema_update_bank(
        "ema_update_bank", shadows, params, decays, inplace=False, nonfinite=nonfinite
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
    return _ema_update_bank(
        "ema_update_bank_", shadows, params, decays, inplace=True, nonfinite=nonfinite
    )
