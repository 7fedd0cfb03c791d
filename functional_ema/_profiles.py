r"""EDM2's power-function profiles: sigma_rel and gamma, and the one parser of a profile.

A profile is given by its length :math:`\sigma_{\mathrm{rel}} \in (0, \sqrt{1/12})` or by its
exponent :math:`\gamma > 0` (EDM2, Karras et al. 2024, arXiv 2312.02696, Eq. 123 and 126).
:func:`parse` reads the ``sigma_rel=`` / ``gamma=`` pair that :func:`power`,
:func:`posthoc_init`, :func:`posthoc_coefficients` and :func:`reconstruct` take, so each refuses
the same input with the same error: a value of the wrong type raises ``TypeError``, a number out
of range ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeGuard

import torch
from torch import Tensor

from functional_ema._errors import describe, wrong_type, wrong_value


_SIGMA_REL_MAX = math.sqrt(1 / 12)
r"""The supremum of :math:`\sigma_{\mathrm{rel}}`: the length of the profile as
:math:`\gamma \to 0`."""

_SIGMA_REL_RANGE = f"a number in (0, {_SIGMA_REL_MAX:.4f})"
_SIGMA_REL_FIX = (
    "A power-function profile is at most sqrt(1/12) long (the limit gamma -> 0): pass e.g. "
    "sigma_rel=0.1 (EDM2 uses 0.05 to 0.2)."
)
_GAMMA_RANGE = "a finite number > 0"
_GAMMA_FIX = "Pass e.g. gamma=6.94 (sigma_rel=0.1)."
_EXAMPLES = {"sigma_rel": "[0.05, 0.1]", "gamma": "[16.97, 6.94]"}


class Profiles(NamedTuple):
    """One or several profiles, as :func:`parse` read them.

    Attributes:
        gammas: The exponents, one per profile.
        sigma_rels: The lengths, one per profile: as given (no round trip through gamma), or
            computed from the given exponents.
        several: Whether a sequence was given (the caller returns one result per profile)
            rather than one number.
    """

    gammas: tuple[float, ...]
    sigma_rels: tuple[float, ...]
    several: bool


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_sigma_rel(api: str, value: object, path: str = "sigma_rel") -> float:
    """Validate one profile length: a number (else ``TypeError``) in range (else ``ValueError``).

    ``path`` names the argument in the message (``'sigma_rel[1]'`` for a sequence's element).
    """
    if not _number(value):
        raise wrong_type(
            api,
            "sigma_rel of the wrong type",
            path,
            _SIGMA_REL_RANGE,
            describe(value),
            _SIGMA_REL_FIX,
        )
    if not 0 < value < _SIGMA_REL_MAX:
        raise wrong_value(
            api, "sigma_rel out of range", path, _SIGMA_REL_RANGE, repr(value), _SIGMA_REL_FIX
        )
    return float(value)


def check_gamma(api: str, value: object, path: str = "gamma") -> float:
    """Validate one profile exponent: a number (else ``TypeError``), finite and > 0."""
    if not _number(value):
        raise wrong_type(
            api, "gamma of the wrong type", path, _GAMMA_RANGE, describe(value), _GAMMA_FIX
        )
    if not 0 < value < math.inf:
        raise wrong_value(api, "gamma out of range", path, _GAMMA_RANGE, repr(value), _GAMMA_FIX)
    return float(value)


def _exponent(sigma_rel: float) -> float:
    """The largest real root of EDM2's cubic (Eq. 126) for a valid ``sigma_rel``."""
    c = 1.0 / sigma_rel**2
    a, b, d = 7.0, 16.0 - c, 12.0 - c  # monic cubic g^3 + a g^2 + b g + d
    companion = torch.tensor([[-a, -b, -d], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    roots = torch.linalg.eigvals(companion)
    gamma = max(r.real.item() for r in roots if abs(r.imag.item()) < 1e-9)
    # One Newton step polishes the eigenvalue to full float64 accuracy.
    value = ((gamma + a) * gamma + b) * gamma + d
    slope = (3 * gamma + 2 * a) * gamma + b
    return gamma - value / slope


def _length(gamma: float) -> float:
    """EDM2 Eq. 123 for a valid ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_to_sigma_rel(gamma: float) -> float:
    r"""The relative standard deviation of a power-function profile (EDM2 Eq. 123).

    .. math:: \sigma_{\mathrm{rel}} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}}

    Args:
        gamma: The exponent :math:`\gamma > 0` (finite).

    Returns:
        :math:`\sigma_{\mathrm{rel}}`, in :math:`(0, \sqrt{1/12})`.

    Raises:
        TypeError: If ``gamma`` is not a number.
        ValueError: If ``gamma`` is not finite and > 0.

    Example:
        >>> import functional_ema as fe
        >>> round(fe.gamma_to_sigma_rel(6.94), 4)
        0.1
    """
    return _length(check_gamma("gamma_to_sigma_rel", gamma))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""The exponent of the power-function profile with a given :math:`\sigma_{\mathrm{rel}}`.

    The largest real root of
    :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma^{-2})\gamma + (12 - \sigma^{-2})` (EDM2 Eq. 126,
    Algorithm 2), the inverse of :func:`gamma_to_sigma_rel`.

    Args:
        sigma_rel: In :math:`(0, \sqrt{1/12} \approx 0.2887)`; EDM2 uses 0.05 to 0.2.

    Returns:
        :math:`\gamma > 0`.

    Raises:
        TypeError: If ``sigma_rel`` is not a number.
        ValueError: If ``sigma_rel`` is outside the valid range.

    Example:
        >>> import functional_ema as fe
        >>> round(fe.sigma_rel_to_gamma(0.1), 4), round(fe.sigma_rel_to_gamma(0.05), 4)
        (6.9372, 16.9722)
    """
    return _exponent(check_sigma_rel("sigma_rel_to_gamma", sigma_rel))


def parse(
    api: str,
    sigma_rel: float | Sequence[float] | Tensor | None,
    gamma: float | Sequence[float] | Tensor | None,
) -> Profiles:
    """Read profiles from exactly one of ``sigma_rel`` and ``gamma``.

    Each may be a number, a 0-dim tensor (one profile), or a non-empty sequence or 1-D tensor
    (several, one result each).

    Raises:
        ValueError: Both or neither given, an empty sequence, or a value out of range (the
            message names the element, e.g. ``'sigma_rel[1]'``).
        TypeError: A value that is not a number.

    Example:
        >>> from functional_ema._profiles import parse
        >>> profiles = parse("demo", [0.05, 0.1], None)
        >>> [round(g, 2) for g in profiles.gammas], profiles.sigma_rels, profiles.several
        ([16.97, 6.94], (0.05, 0.1), True)
    """
    if (gamma is None) == (sigma_rel is None):
        raise wrong_value(
            api,
            "profile not given exactly once",
            "sigma_rel/gamma",
            "exactly one of sigma_rel and gamma",
            f"sigma_rel={sigma_rel!r}, gamma={gamma!r}",
            "Pass e.g. sigma_rel=0.1 (or gamma=6.94, the same profile).",
        )
    name, given = ("sigma_rel", sigma_rel) if gamma is None else ("gamma", gamma)
    values: list[Any]
    if isinstance(given, Tensor):
        several = given.ndim > 0
        values = given.reshape(-1).tolist()
    elif isinstance(given, Sequence) and not isinstance(given, str):
        several, values = True, list(given)
    else:
        several, values = False, [given]
    if not values:
        raise wrong_value(
            api,
            "no profile",
            name,
            "at least one profile",
            "an empty sequence",
            f"Pass one value per profile, e.g. {name}={_EXAMPLES[name]}.",
        )
    paths = [f"{name}[{i}]" if several else name for i in range(len(values))]
    if name == "sigma_rel":
        lengths = tuple(check_sigma_rel(api, v, p) for v, p in zip(values, paths, strict=True))
        return Profiles(tuple(map(_exponent, lengths)), lengths, several)
    gammas = tuple(check_gamma(api, v, p) for v, p in zip(values, paths, strict=True))
    return Profiles(gammas, tuple(map(_length, gammas)), several)
