"""The engine's compiled kernels: :func:`_arith.ema_step` over rows, built once per key.

A kernel sees a region of averages as rows of ``ROW`` elements (a bank as K rows of one
leaf) and updates it in one pass. The kernels are compiled *from* the arithmetic module's
functions, never restated, so their bits are TensorFlow's by construction; the compiled
engine tests check that they are.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

from functional_ema._arith import ema_step, keep_finite, sum_dtype
from functional_ema._compat import Kernel, dynamo_compile, standalone_compile


ROW = 128
"""The row kernel sees a region as rows of ``ROW`` elements (and one shorter row for the
rest): with ``nonfinite="skip"`` it sums each row to check it, then updates the row while it
is still in the L1 cache, so the check costs no extra pass over memory."""


def update_rows(shadow: Tensor, value: Tensor, weight: Tensor) -> list[Tensor]:
    """``shadow`` (R, C) moves towards ``value`` (R or 1, C) by ``weight`` (0-dim or (R, 1)).

    Returns ``[weight]``, ignored: with no output Inductor writes ``shadow`` in a second pass.
    """
    ema_step(shadow, value, weight, inplace=True)
    return [weight]


def update_rows_masked(shadow: Tensor, value: Tensor, weight: Tensor) -> list[Tensor]:
    """:func:`update_rows` leaving non-finite values out; returns the 0-dim "all finite" flag.

    A row's sum is finite exactly when its values are (or when the sum overflows, which
    reports a finite update as one with NaN/Inf). ``where(row_ok, weight, weight)`` is
    ``weight``: reading the row's check in the update makes Inductor evaluate both in one
    loop over each row.
    """
    row_ok = torch.isfinite(
        value.to(shadow.dtype).to(sum_dtype(shadow.dtype)).sum(dim=1, keepdim=True)
    )
    kept, _ = keep_finite(shadow, value)
    ema_step(shadow, kept, torch.where(row_ok, weight, weight), inplace=True)
    return [row_ok.all()]


class Compiled:
    """The compiled kernels, built on first use per (mask, bank, device type, dtypes).

    Built with ``torch._inductor.standalone_compile`` where it works, else ``torch.compile``;
    when both fail for a key, that key warns once and uses the engine's eager path (same
    bits, slower); other keys are unaffected. ``FUNCTIONAL_EMA_COMPILE=0`` (read when the
    object is made) or ``enabled = False`` turns compiling off.
    """

    def __init__(self) -> None:
        self.enabled = os.environ.get("FUNCTIONAL_EMA_COMPILE", "1") != "0"
        self._kernels: dict[tuple[Any, ...], Kernel | None] = {}
        self._lock = threading.Lock()

    @property
    def fallbacks(self) -> list[tuple[Any, ...]]:
        """The keys whose kernel failed to build (they use the eager path)."""
        return [key for key, kernel in self._kernels.items() if kernel is None]

    def kernel(
        self, shadow: Tensor, value: Tensor, *, mask: bool, bank: bool = False
    ) -> Kernel | None:
        """The kernel for these tensors; ``None`` means: use the eager path.

        ``None`` when compiling is off or failed for this key, or for a device without
        Inductor. ``bank``: shapes ``(K, M)``, ``(1, M)`` and weights ``(K, 1)``.
        """
        if not self.enabled or shadow.device.type not in ("cpu", "cuda"):
            return None
        key = (mask, bank, shadow.device.type, shadow.dtype, value.dtype)
        if key in self._kernels:
            return self._kernels[key]
        with self._lock:
            if key not in self._kernels:
                self._kernels[key] = self._build(mask, bank, shadow, value)
            return self._kernels[key]

    def _build(self, mask: bool, bank: bool, shadow: Tensor, value: Tensor) -> Kernel | None:
        fn = update_rows_masked if mask else update_rows
        device = shadow.device
        # Shapes as the kernel will mostly see (Inductor tunes its loops to them).
        rows, columns = (4, 64 * ROW) if bank else (64, ROW)
        examples = (
            torch.zeros(rows, columns, dtype=shadow.dtype, device=device),
            torch.zeros(1 if bank else rows, columns, dtype=value.dtype, device=device),
            torch.zeros((rows, 1) if bank else (), dtype=shadow.dtype, device=device),
        )
        errors = []
        with torch.no_grad():
            for build in (standalone_compile, dynamo_compile):
                try:
                    return build(fn, examples)
                except Exception as error:  # any failure: the next builder, then eager
                    errors.append(f"{build.__name__}: {error!r}")
        warnings.warn(
            f"functional_ema: compiling the update kernel for {shadow.dtype} averages of "
            f"{value.dtype} values on {device.type} failed ("
            + "; ".join(errors)
            + "); using the eager chunked path instead (same results, slower). Set "
            "FUNCTIONAL_EMA_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=5,
        )
        return None


compiled = Compiled()
