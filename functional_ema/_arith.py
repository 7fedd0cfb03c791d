r"""TensorFlow's EMA step and the non-finite masking: the only place either is written.

Per floating leaf, with :math:`w` TensorFlow's weight ``float32(1) - float32(decay)`` cast to
the leaf's dtype (see ``_decay.weight_as``):

.. math:: \bar\theta \leftarrow \bar\theta - (\bar\theta - \theta)\, w

with every operation rounded in the average's dtype, which is what
``ExponentialMovingAverage.apply`` computes, bit for bit. The pure path, the in-place eager
path, the decay banks, post-hoc tracking and every kernel the engine compiles call
:func:`ema_step` (the kernels are compiled from functions that call it, so they cannot
drift); :func:`keep_finite` is the one way a NaN or Inf is left out of an average.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


_DTYPE = operator.attrgetter("dtype")


def is_inexact(tensor: Tensor) -> bool:
    """Whether a leaf is averaged (floating or complex) rather than copied."""
    return tensor.is_floating_point() or tensor.is_complex()


def inexact_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """:func:`is_inexact` of each tensor: one pass in C over the dtypes, no Python per tensor."""
    dtypes = list(map(_DTYPE, tensors))
    kinds = {dtype: dtype.is_floating_point or dtype.is_complex for dtype in set(dtypes)}
    return list(map(kinds.__getitem__, dtypes))


def _in_shadow_dtype(shadow: Tensor, value: Tensor) -> Tensor:
    """``value`` as the update reads it: a wider dtype is rounded to ``shadow``'s first.

    A narrower ``value`` is left as it is: mixed arithmetic widens it exactly, which gives the
    same bits as converting it and costs no copy.
    """
    if torch.promote_types(shadow.dtype, value.dtype) != shadow.dtype:
        return value.to(shadow.dtype)
    return value


def ema_step(
    shadow: Tensor,
    value: Tensor,
    weight: float | Tensor,
    *,
    inplace: bool,
    scratch: Tensor | None = None,
) -> Tensor:
    r"""TF's ``shadow - (shadow - value) * weight``, each operation rounded in ``shadow``'s dtype.

    ``value`` in another floating dtype is read in ``shadow``'s (so a wide average of a
    narrow model runs in the wide dtype); ``weight`` is already in ``shadow``'s dtype and may
    broadcast (one row of weights per decay in a bank).

    Args:
        shadow: The average; written when ``inplace``.
        value: The value it moves towards.
        weight: :math:`w = 1 - \beta`, a number or a tensor in ``shadow``'s dtype.
        inplace: Update ``shadow`` (and return it) or return a new tensor.
        scratch: A buffer shaped and typed like ``shadow`` for the difference: the same
            operations, with no allocation (the engine's eager path). May be ``value``'s own
            storage when ``value`` came from :func:`keep_finite` with the same scratch.
    """
    value = _in_shadow_dtype(shadow, value)
    if scratch is None:
        delta = (shadow - value) * weight
    else:
        delta = torch.sub(shadow, value, out=scratch).mul_(weight)
    return shadow.sub_(delta) if inplace else shadow - delta


def ema_step_if_finite_(
    shadow: Tensor, value: Tensor, weight: float | Tensor, *, scratch: Tensor, total: Tensor
) -> bool:
    """:func:`ema_step` in place when it involves no NaN/Inf, at the cost of one more read.

    The difference ``(shadow - value) * weight`` is computed into ``scratch`` and summed: a
    finite sum means every ``value`` is finite (a NaN or an infinite value makes its
    difference non-finite), so :func:`keep_finite` would change nothing, and the step is
    finished with the same operations (same bits). Otherwise ``shadow`` is left untouched and
    ``False`` returned, for the caller's exact path (a sum that overflows only sends a finite
    chunk there too). Reads the sum (into ``total``, a 0-dim tensor of ``shadow``'s dtype)
    on the host: for 1-D CPU tensors.
    """
    value = _in_shadow_dtype(shadow, value)
    delta = torch.sub(shadow, value, out=scratch).mul_(weight)
    if not math.isfinite(float(torch.sum(delta, dim=0, out=total))):
        return False
    shadow.sub_(delta)
    return True


def keep_finite(
    shadow: Tensor, value: Tensor, *, scratch: Tensor | None = None, finite: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``value`` with each NaN/Inf replaced by ``shadow``, in ``shadow``'s dtype, and the mask.

    :func:`ema_step` of the result leaves those elements of ``shadow`` unchanged
    (``shadow - (shadow - shadow) * w``) and every other element's bits as they would be.

    Args:
        shadow: The average.
        value: The values, possibly holding NaN or Inf.
        scratch: With ``finite``, buffers shaped like ``shadow`` (its dtype, and bool) that
            receive the results: the same test (``v - v`` is 0 exactly where ``v`` is
            finite), with no allocation.
        finite: See ``scratch``.

    Returns:
        The kept values and the elementwise "is finite" mask of ``value``.
    """
    value = _in_shadow_dtype(shadow, value)
    if scratch is None or finite is None:
        mask = torch.isfinite(value)
        return torch.where(mask, value, shadow), mask
    mask = torch.eq(torch.sub(value, value, out=scratch), 0, out=finite)
    return torch.where(mask, value, shadow, out=scratch), mask


def copy_leaf(shadow: Tensor, value: Tensor, *, inplace: bool) -> Tensor:
    """Copy ``value`` into ``shadow`` (in place) or return a copy of it shaped like ``shadow``.

    Integer and bool leaves (e.g. ``num_batches_tracked``) are copied, never averaged.
    ``value`` broadcasts to ``shadow`` (a bank holds one row per decay).
    """
    if inplace:
        return shadow.copy_(value)
    return value.clone() if value.shape == shadow.shape else value.expand(shadow.shape).clone()


def average_leaf(
    shadow: Tensor,
    value: Tensor,
    weight: float | Tensor,
    *,
    inplace: bool,
    finite_flags: list[Tensor] | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """One leaf's update: :func:`ema_step` for floating leaves, :func:`copy_leaf` for others.

    With a ``finite_flags`` list, non-finite values leave their averages unchanged
    (:func:`keep_finite`) and the leaf's 0-dim "all finite" flag is appended
    (``nonfinite="skip"``); the flags stay on the device. With ``valid`` (a 0-dim bool on
    the device, not read here), a floating ``shadow`` keeps its bits where it is false: the
    new average is computed out of place and selected (``torch.where``), so the kept bits are
    exact whatever the values (NaN, Inf, a negative zero). Integer leaves are copied either
    way, as a skipped non-finite update copies them.
    """
    if not is_inexact(shadow):
        return copy_leaf(shadow, value, inplace=inplace)
    if valid is not None:
        new = average_leaf(shadow, value, weight, inplace=False, finite_flags=finite_flags)
        kept = torch.where(valid.to(shadow.device), new, shadow)
        return shadow.copy_(kept) if inplace else kept
    if finite_flags is not None:
        value, finite = keep_finite(shadow, value)
        finite_flags.append(finite.all())
    return ema_step(shadow, value, weight, inplace=inplace)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a finiteness check sums in (float32 for 16-bit floats: no overflow to Inf)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
