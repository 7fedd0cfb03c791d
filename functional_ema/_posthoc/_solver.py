r"""The post-hoc solver: inner products of power profiles and the least-squares weights.

A snapshot taken at time :math:`t_i` of a profile with exponent :math:`\gamma_i` averages the
weights with :math:`p_i(\tau) = (\gamma_i + 1)\, \tau^{\gamma_i} / t_i^{\gamma_i + 1}` on
:math:`[0, t_i]` (EDM2 Eq. 121). :func:`solve` projects target profiles onto the snapshots'
(EDM2 Eq. 151 gives the inner products in closed form), in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._profiles import parse


def inner(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    r"""EDM2 Eq. 151: :math:`\langle p_{t_a,\gamma_a}, p_{t_b,\gamma_b}\rangle`, broadcast.

    Example:
        >>> import torch
        >>> from functional_ema._posthoc._solver import inner
        >>> one, g = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        >>> float(inner(one, g, one, g))  # (g + 1)^2 / (2 g + 1) at t = 1
        1.3333333333333333
    """
    e = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def solve(
    times: Tensor, gammas: Tensor, t: float, targets: Tensor, *, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Coefficients ``(M, N)`` and relative L2 errors ``(M,)`` for snapshots with times <= t.

    Args:
        times: The N snapshot times (float64), all at most ``t``.
        gammas: Their exponents (float64).
        t: The time of the reconstruction.
        targets: The M target exponents (float64).
        normalize: Constrain each row of coefficients to sum to 1 (a KKT system) rather than
            the plain projection.
    """
    scaled = times / t  # inner products scale as 1 / t: solve on [0, 1]
    a = inner(scaled[:, None], gammas[:, None], scaled[None, :], gammas[None, :])
    one = torch.ones((), dtype=torch.float64)
    b = inner(scaled[:, None], gammas[:, None], one, targets[None, :])
    r = (targets + 1) ** 2 / (2 * targets + 1)  # <p_target, p_target> at t = 1
    scale = a.diagonal().rsqrt()  # Jacobi scaling: unit diagonal
    a_s, b_s = a * scale[:, None] * scale[None, :], b * scale[:, None]
    n, m = len(times), len(targets)
    if normalize:  # minimise the profile error subject to sum(x) == 1 (KKT system)
        kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        kkt[:n, :n], kkt[:n, n], kkt[n, :n] = a_s, scale, scale
        rhs = torch.cat([b_s, torch.ones(1, m, dtype=torch.float64)])
        y = torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:n]
    else:  # the plain projection: the normal equations A x = b
        y = torch.linalg.lstsq(a_s, b_s, driver="gelsd").solution
    x = y * scale[:, None]
    squared = (x * (a @ x)).sum(0) - 2 * (x * b).sum(0) + r
    return x.T.contiguous(), squared.clamp(min=0).sqrt() / r.sqrt()


def _snapshot_lists(api: str, times: object, gammas: object) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(gammas, dtype=torch.float64).reshape(-1)
    if len(t) != len(g) or len(t) == 0:
        raise wrong_value(
            api,
            "snapshot lists of different lengths" if len(t) != len(g) else "no snapshots",
            "snapshot_t/snapshot_gamma",
            "two non-empty lists of the same length",
            f"{len(t)} times and {len(g)} exponents",
            "Pass one time and one gamma per snapshot.",
        )
    if not bool(((t > 0) & t.isfinite()).all()) or not bool(((g > 0) & g.isfinite()).all()):
        raise wrong_value(
            api,
            "snapshot out of range",
            "snapshot_t/snapshot_gamma",
            "finite times and exponents > 0",
            f"t={t.tolist()[:8]}, gamma={g.tolist()[:8]}",
            "A snapshot at t = 0 has no profile: save snapshots after the first update.",
        )
    return t, g


def _check_time(api: str, t: object) -> float:
    if isinstance(t, Tensor) and t.ndim == 0:
        t = t.item()
    expected = "a finite number > 0 (in the unit of the snapshot times)"
    fix = "Pass the time to reconstruct at, e.g. the last snapshot time."
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise wrong_type(api, "time of the wrong type", "t", expected, describe(t), fix)
    if not 0 < t < math.inf:
        raise wrong_value(api, "time out of range", "t", expected, repr(t), fix)
    return float(t)


def posthoc_coefficients(
    snapshot_t: Sequence[float] | Tensor,
    snapshot_gamma: Sequence[float] | Tensor,
    t: float,
    *,
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""Weights of snapshots whose sum best approximates a power-function EMA at time ``t``.

    A snapshot taken at time :math:`t_i` of an EMA with exponent :math:`\gamma_i` averages
    the weights with the profile :math:`p_i(\tau) = (\gamma_i + 1)\, \tau^{\gamma_i} /
    t_i^{\gamma_i + 1}` on :math:`[0, t_i]` (EDM2 Eq. 121). The coefficients :math:`x` minimise
    :math:`\lVert \sum_i x_i p_i - p_r \rVert_2` for the target profile :math:`p_r`, from the
    Gram matrix :math:`A_{ij} = \langle p_i, p_j\rangle` and :math:`b_i = \langle p_i,
    p_r\rangle` (closed form, EDM2 Eq. 151), in float64 with a rank-revealing least-squares
    solver (duplicate or nearly collinear snapshots are fine). Only snapshots with
    :math:`t_i \le t` take part (the others get 0).

    With ``normalize=True`` (the default) the coefficients are constrained to sum to 1, so
    the reconstruction is an affine combination of snapshots and a weight that never changed
    comes back exactly; EDM2 instead rescales the unconstrained solution by its sum, which
    gives the same constraint with a slightly larger profile error.

    The error returned is the relative L2 error of the reconstructed profile,
    :math:`\lVert \sum_i x_i p_i - p_r\rVert_2 / \lVert p_r \rVert_2` (computed from the same
    inner products, so values below about 1e-8 are at the float64 floor). It bounds the
    reconstruction: for any weight trajectory :math:`\theta`,
    :math:`|\hat\theta - \bar\theta_r| \le \mathrm{error} \cdot \lVert p_r\rVert_2 \lVert
    \theta \rVert_{L^2[0, t]}`.

    Args:
        snapshot_t: The snapshot times :math:`t_i > 0` (N of them, any time unit).
        snapshot_gamma: Their exponents :math:`\gamma_i` (N of them).
        t: The time :math:`t_r` of the reconstruction, at least the earliest snapshot time.
        sigma_rel: The target length(s) (give exactly one of ``sigma_rel`` and ``gamma``).
        gamma: The target exponent(s).
        normalize: Constrain the coefficients to sum to 1.

    Returns:
        ``(coefficients, errors)`` in float64: shapes ``(N,)`` and ``()`` for one target,
        ``(M, N)`` and ``(M,)`` for a sequence of M targets.

    Raises:
        ValueError: A target outside the valid range, mismatched or invalid snapshot lists,
            or no snapshot at or before ``t``.
        TypeError: A target or ``t`` that is not a number.

    Example:
        >>> import functional_ema as fe
        >>> g = [fe.sigma_rel_to_gamma(0.05), fe.sigma_rel_to_gamma(0.1)]
        >>> x, error = fe.posthoc_coefficients([100, 100], g, 100, sigma_rel=0.1)
        >>> x.round(decimals=6).tolist() == [0.0, 1.0], float(error) < 1e-6  # the tracked one
        (True, True)
        >>> x, error = fe.posthoc_coefficients([100, 100], g, 100, sigma_rel=0.07)
        >>> round(float(x.sum()), 12), round(float(error), 3)
        (1.0, 0.051)
    """
    api = "posthoc_coefficients"
    targets = parse(api, sigma_rel, gamma)
    times, gammas = _snapshot_lists(api, snapshot_t, snapshot_gamma)
    t = _check_time(api, t)
    used = times <= t
    if not bool(used.any()):
        raise wrong_value(
            api,
            "time before the first snapshot",
            "t",
            f"at least the earliest snapshot time {float(times.min()):g}",
            f"{t:g}",
            "No snapshot exists at or before t: pass a later t.",
        )
    target = torch.tensor(targets.gammas, dtype=torch.float64)
    x_used, errors = solve(times[used], gammas[used], t, target, normalize=normalize)
    x = torch.zeros(len(targets.gammas), len(times), dtype=torch.float64)
    x[:, used] = x_used
    return (x, errors) if targets.several else (x[0], errors[0])
