r"""Post-hoc EMA (EDM2): track power-function EMAs, store snapshots, reconstruct any length.

Karras et al. 2024 (arXiv 2312.02696, Sec. 3 and App. C): train once while tracking a few
power-function EMAs, save snapshots of them now and then, and afterwards build the EMA of any
other length :math:`\sigma_{\mathrm{rel}}` as a weighted sum of the snapshots. Three pieces:

* :func:`posthoc_init` / :func:`posthoc_update_`: a :class:`PostHocState` (a plain dict)
  holding K power EMAs of one params tree, updated in one pass with
  :math:`\beta = (1 - dt / t)^{\gamma + 1}`, for any update interval and time unit.
* :class:`SnapshotStore`: one folder, one run id; atomic ``torch.save`` snapshots (one file
  per profile and time, float32 by default) listed in an atomically written manifest.
* :func:`reconstruct`: the least-squares projection of the target profile onto the stored
  snapshot profiles (:func:`posthoc_coefficients`), streamed one snapshot file at a time,
  with the approximation error of the profile reported and checked.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import optree
import torch
from torch import Tensor, nn

from functional_ema._arith import average_leaf, copy_leaf, is_inexact
from functional_ema._bank import bank
from functional_ema._decay import check_interval
from functional_ema._errors import short_list
from functional_ema._io import load as _load
from functional_ema._io import remove_stale_temps
from functional_ema._io import save as _atomic_save
from functional_ema._module import check_unwrapped, module_state, module_with
from functional_ema._schedules import gamma_to_sigma_rel, sigma_rel_to_gamma
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves, leaf_paths
from functional_ema._types import TensorTree


_SIGMA_REL_MAX = math.sqrt(1 / 12)
"""The supremum of :math:`\\sigma_{\\mathrm{rel}}` (the limit :math:`\\gamma \\to 0`)."""

_FORMAT = "functional_ema.posthoc/1"
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MANIFEST_SUFFIX = ".manifest.pt"


# --- profiles and the solver --------------------------------------------------------------


def _gammas(
    api: str, sigma_rel: float | Sequence[float] | None, gamma: float | Sequence[float] | None
) -> tuple[tuple[float, ...], bool]:
    """Exponents from exactly one of ``sigma_rel`` / ``gamma``, and whether a sequence came."""
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(
            f"{api}: profile at 'sigma_rel'/'gamma': expected exactly one of them, got "
            f"sigma_rel={sigma_rel!r}, gamma={gamma!r}. Pass e.g. sigma_rel=0.1."
        )
    name, value = ("sigma_rel", sigma_rel) if gamma is None else ("gamma", gamma)
    several = isinstance(value, Sequence | Tensor) and not isinstance(value, str)
    values: list[Any]
    if isinstance(value, Tensor):
        values = value.reshape(-1).tolist() if value.ndim else [value.item()]
        several = value.ndim > 0
    else:
        values = list(value) if several else [value]  # type: ignore[arg-type]
    if not values:
        raise ValueError(f"{api}: `{name}` must not be empty; pass e.g. {name}=[0.05, 0.1].")
    gammas = []
    for index, v in enumerate(values):
        where = f"{name}[{index}]" if several else name
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if name == "sigma_rel":
            if not number or not 0 < v < _SIGMA_REL_MAX:
                raise ValueError(
                    f"{api}: sigma_rel at {where!r}: expected a number in (0, "
                    f"{_SIGMA_REL_MAX:.4f}) (a power-function profile is at most sqrt(1/12) "
                    f"long, the limit gamma -> 0), got {v!r}. EDM2 uses 0.05 to 0.2."
                )
            gammas.append(sigma_rel_to_gamma(float(v)))
        else:
            if not number or not 0 < v < math.inf:
                raise ValueError(
                    f"{api}: gamma at {where!r}: expected a finite number > 0, got {v!r}. Pass "
                    "e.g. gamma=6.94 (sigma_rel=0.1)."
                )
            gammas.append(float(v))
    return tuple(gammas), several


def _lengths(sigma_rel: Any, gammas: tuple[float, ...]) -> tuple[float, ...]:
    """The targets' sigma_rel: as given (no round trip through gamma), or from gamma."""
    if sigma_rel is None:
        return tuple(gamma_to_sigma_rel(g) for g in gammas)
    if isinstance(sigma_rel, Tensor):
        return tuple(float(v) for v in sigma_rel.reshape(-1).tolist())
    return (
        tuple(float(v) for v in sigma_rel)
        if isinstance(sigma_rel, Sequence)
        else (float(sigma_rel),)
    )


def _inner(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    r"""EDM2 Eq. 151: :math:`\langle p_{t_a,\gamma_a}, p_{t_b,\gamma_b}\rangle`, broadcast."""
    e = torch.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def _solve(
    times: Tensor, gammas: Tensor, t: float, targets: Tensor, *, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Coefficients ``(M, N)`` and relative L2 errors ``(M,)`` for snapshots with times <= t."""
    scaled = times / t  # inner products scale as 1 / t: solve on [0, 1]
    a = _inner(scaled[:, None], gammas[:, None], scaled[None, :], gammas[None, :])
    one = torch.ones((), dtype=torch.float64)
    b = _inner(scaled[:, None], gammas[:, None], one, targets[None, :])
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
    targets, several = _gammas(api, sigma_rel, gamma)
    times, gammas = _snapshot_lists(api, snapshot_t, snapshot_gamma)
    t = _check_time(api, t)
    used = times <= t
    if not bool(used.any()):
        raise ValueError(
            f"{api}: time at 't': expected at least the earliest snapshot time "
            f"{float(times.min()):g}, got {t:g}. No snapshot exists at or before t."
        )
    target = torch.tensor(targets, dtype=torch.float64)
    x_used, errors = _solve(times[used], gammas[used], t, target, normalize=normalize)
    x = torch.zeros(len(targets), len(times), dtype=torch.float64)
    x[:, used] = x_used
    return (x, errors) if several else (x[0], errors[0])


def _snapshot_lists(api: str, times: Any, gammas: Any) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(gammas, dtype=torch.float64).reshape(-1)
    if len(t) != len(g) or len(t) == 0:
        raise ValueError(
            f"{api}: snapshots at 'snapshot_t'/'snapshot_gamma': expected two non-empty lists "
            f"of the same length, got {len(t)} times and {len(g)} exponents. Pass one time "
            "and one gamma per snapshot."
        )
    if not bool(((t > 0) & t.isfinite()).all()) or not bool(((g > 0) & g.isfinite()).all()):
        raise ValueError(
            f"{api}: snapshots at 'snapshot_t'/'snapshot_gamma': expected finite times and "
            f"exponents > 0, got t={t.tolist()[:8]}, gamma={g.tolist()[:8]}. A snapshot at "
            "t = 0 has no profile: save snapshots after the first update."
        )
    return t, g


def _check_time(api: str, t: object) -> float:
    if isinstance(t, Tensor) and t.ndim == 0:
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < math.inf:
        raise ValueError(
            f"{api}: time at 't': expected a finite number > 0 (in the unit of the snapshot "
            f"times), got {t!r}."
        )
    return float(t)


# --- tracking -----------------------------------------------------------------------------


class _PostHocStateRequired(TypedDict):
    t: Tensor
    gamma: Tensor
    params: TensorTree


class PostHocState(_PostHocStateRequired, total=False):
    r"""K power-function EMAs of one tree: a plain ``dict`` of tensors.

    Tensors only (optional entries are absent, never ``None``), so it round-trips through
    ``torch.save`` / ``torch.load(weights_only=True)`` (or :func:`save` / :func:`load`) for
    resuming training.

    Attributes:
        t: The time reached: the sum of the ``dt`` of every update, in the unit you count
            (steps, samples, tokens), 0-dim int64.
        gamma: The K exponents :math:`\gamma_k`, 1-D float64.
        params: The averages: a bank (see :func:`bank`), leaves of shape ``(K, *leaf.shape)``,
            row k tracking ``gamma[k]``.
        buffers: Only when :func:`posthoc_init` got buffers: copies of the latest buffers.
    """

    buffers: TensorTree


def posthoc_init(
    params: TensorTree,
    buffers: TensorTree | None = None,
    *,
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
) -> PostHocState:
    r"""Start K power-function EMAs of ``params`` (EDM2's post-hoc tracking), one per profile.

    Each profile is given by its length :math:`\sigma_{\mathrm{rel}}` or its exponent
    :math:`\gamma` (converted with :func:`sigma_rel_to_gamma`). EDM2 tracks two,
    ``sigma_rel=(0.05, 0.1)``, and reconstructs every other length from their snapshots
    (:class:`SnapshotStore`, :func:`reconstruct`). The averages start as copies of
    ``params``; the first update gives them weight 0.

    Args:
        params: The tree to average (e.g. ``fe.module_state(model)[0]``): any pytree of
            tensors (plain ``dict`` / ``list`` / ``tuple`` containers to store snapshots).
        buffers: Optional tree of buffers kept beside the averages: copied at each update
            and stored with every snapshot.
        sigma_rel: The profile lengths, in :math:`(0, \sqrt{1/12})`: a number or a sequence
            (give exactly one of ``sigma_rel`` and ``gamma``).
        gamma: The profile exponents :math:`\gamma > 0`: a number or a sequence.
        dtype: Floating dtype of the averages (``torch.float32`` for a bfloat16 model);
            ``None`` keeps each leaf's.

    Returns:
        A fresh :class:`PostHocState` with ``t == 0``.

    Raises:
        ValueError: A profile outside the valid range, or the same profile twice.
        TypeError: Non-tensor leaves or a non-floating ``dtype``.

    Example:
        >>> import torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(3)}, sigma_rel=(0.05, 0.1))
        >>> tracker["params"]["w"].shape, tracker["gamma"].round(decimals=2).tolist()
        (torch.Size([2, 3]), [16.97, 6.94])
    """
    api = "posthoc_init"
    gammas, _ = _gammas(api, sigma_rel, gamma)
    if len(set(gammas)) != len(gammas):
        raise ValueError(
            f"{api}: profiles at 'sigma_rel'/'gamma': expected distinct profiles, got "
            f"gamma={[round(g, 4) for g in gammas]}. Track each profile once."
        )
    leaves, _ = check_tensor_leaves(api, params, "params")
    if buffers is not None:
        check_tensor_leaves(api, buffers, "buffers")
    check_floating_dtype(api, dtype)
    device = leaves[0].device if leaves else torch.device("cpu")
    state: PostHocState = {
        "t": torch.zeros((), dtype=torch.int64, device=device),
        "gamma": torch.tensor(gammas, dtype=torch.float64, device=device),
        "params": bank(params, len(gammas), dtype=dtype),
    }
    if buffers is not None:
        state["buffers"] = optree.tree_map(lambda b: b.detach().clone(), buffers)
    return state


def _check_tracker(api: str, tracker: Any) -> int:
    """Validate a :class:`PostHocState`; return K."""
    keys = set(tracker) if isinstance(tracker, dict) else set()
    if not {"t", "gamma", "params"} <= keys or keys - {"t", "gamma", "params", "buffers"}:
        got = sorted(keys) if isinstance(tracker, dict) else type(tracker).__name__
        raise TypeError(
            f"{api}: `tracker` at '<root>': expected a PostHocState (a dict with 't', 'gamma', "
            f"'params' and optionally 'buffers'), got {got}. Create it with "
            "functional_ema.posthoc_init."
        )
    t, gamma = tracker["t"], tracker["gamma"]
    if not isinstance(t, Tensor) or t.ndim != 0 or t.dtype != torch.int64:
        raise TypeError(
            f"{api}: time counter at 't': expected a 0-dim int64 tensor, got "
            f"{_describe(t)}. Keep the tracker as functional_ema.posthoc_init made it."
        )
    if not isinstance(gamma, Tensor) or gamma.ndim != 1 or gamma.dtype != torch.float64:
        raise TypeError(
            f"{api}: exponents at 'gamma': expected a 1-D float64 tensor, got "
            f"{_describe(gamma)}. Keep the tracker as functional_ema.posthoc_init made it."
        )
    return gamma.shape[0]


def _check_bank(api: str, tree: TensorTree, size: int) -> None:
    leaves, _ = check_tensor_leaves(api, tree, "tracker['params']")
    paths = None
    for index, leaf in enumerate(leaves):
        if leaf.ndim == 0 or leaf.shape[0] != size:
            paths = paths or leaf_paths(tree)
            raise ValueError(
                f"{api}: bank size mismatch at {paths[index]!r}: expected a leading dimension of "
                f"{size} (one row per profile), got shape {tuple(leaf.shape)}. Keep the "
                "tracker as functional_ema.posthoc_init made it."
            )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


@torch.no_grad()
def posthoc_update_(
    tracker: PostHocState,
    params: TensorTree,
    buffers: TensorTree | None = None,
    *,
    dt: int | Tensor = 1,
) -> PostHocState:
    r"""Advance every tracked profile by one update covering ``dt`` time units, in place.

    With :math:`t` the time reached (``tracker["t"] + dt``), row :math:`k` gets the power
    profile's update (EDM2 Eq. 127)

    .. math::
        \beta_k = \left(1 - \frac{dt}{t}\right)^{\gamma_k + 1}, \qquad
        \bar\theta_k \leftarrow \bar\theta_k - (\bar\theta_k - \theta)(1 - \beta_k)

    The products of the decays telescope, so the average at time :math:`T` weights the value
    given at :math:`t_j` by :math:`(t_j / T)^{\gamma + 1} - (t_{j-1} / T)^{\gamma + 1}`,
    i.e. the profile :math:`(\gamma + 1)\tau^\gamma / T^{\gamma + 1}` integrated over the
    interval the value covers: the profile is right for any update interval (every step,
    every 10 steps, irregular) and any time unit (count samples with ``dt=batch_size``).
    :math:`1 - \beta_k` is computed in float64 as ``-expm1((gamma + 1) * log1p(-dt / t))``
    and cast to the leaf dtype once (not via a float32 :math:`\beta`, whose rounding would
    perturb the profile by about 0.2% after 1e6 updates). One pass over ``params`` updates
    all K rows; nothing is read on the host.

    Args:
        tracker: From :func:`posthoc_init`; modified in place.
        params: The current values, with the structure of the tracked tree.
        buffers: The current buffers; required exactly when :func:`posthoc_init` got them.
        dt: Time units this update covers (an int >= 1 or a 0-dim integer tensor): 1 per
            step, ``k`` when updating every ``k`` steps, the batch size to count samples.

    Returns:
        ``tracker`` itself.

    Raises:
        ValueError: Mismatched structure, shapes or devices, or an invalid ``dt``.
        TypeError: Non-tensor leaves, wrong dtypes or a malformed tracker.

    Example:
        >>> import torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(())}, gamma=[1.0, 3.0])
        >>> for t in range(1, 101):  # a ramp w_t = t, one update per step
        ...     _ = fe.posthoc_update_(tracker, {"w": torch.tensor(float(t))})
        >>> tracker["params"]["w"]  # (gamma + 1) / (gamma + 2) * 100, plus 0.5 (discrete)
        tensor([67.1650, 80.4967])
    """
    api = "posthoc_update_"
    size = _check_tracker(api, tracker)
    dt = check_interval(api, dt)
    shadows, values, _ = check_pair(
        api, tracker["params"], params, ("tracker['params']", "params"), bank=size
    )
    held: list[Tensor] = []
    current: list[Tensor] = []
    if ("buffers" in tracker) != (buffers is not None):
        expected = "a tree (as given to posthoc_init)" if buffers is None else "None"
        raise ValueError(
            f"{api}: buffers at 'buffers': expected {expected}, got "
            f"{'None' if buffers is None else 'a tree'}. Pass buffers to both posthoc_init and "
            "posthoc_update_, or to neither."
        )
    if buffers is not None:
        held, current, _ = check_pair(
            api, tracker["buffers"], buffers, ("tracker['buffers']", "buffers")
        )
    t = tracker["t"]
    step = dt if isinstance(dt, int) else dt.to(torch.float64)
    ratio = step / (t + dt).to(torch.float64)
    weight = -torch.expm1((tracker["gamma"] + 1) * torch.log1p(-ratio))  # 1 at the first update
    cache: dict[tuple[torch.dtype, int, torch.device], Tensor] = {}
    for shadow, value in zip(shadows, values, strict=True):
        key = (shadow.dtype, shadow.ndim, shadow.device)
        if is_inexact(shadow) and key not in cache:
            cast = weight.to(device=shadow.device, dtype=shadow.dtype)
            cache[key] = cast.view(size, *([1] * (shadow.ndim - 1)))
        average_leaf(shadow, value, cache.get(key, 0.0), inplace=True)
    for h, c in zip(held, current, strict=True):
        copy_leaf(h, c, inplace=True)
    t.add_(dt)
    return tracker


# --- the snapshot store -------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: profile ``profile`` of a tracker at time ``t``.

    Attributes:
        file: The file name inside the store's folder.
        t: The time of the snapshot (the tracker's ``t``).
        gamma: The profile's exponent.
        sigma_rel: The profile's length, :func:`gamma_to_sigma_rel` of ``gamma``.
        dtype: The dtype the floating leaves were stored in (e.g. ``"float32"``).
        profile: The row of the tracker the snapshot was taken from.
    """

    file: str
    t: int
    gamma: float
    sigma_rel: float
    dtype: str
    profile: int

    def as_dict(self) -> dict[str, Any]:
        """The manifest entry (plain values, ``weights_only``-loadable)."""
        return {
            "file": self.file,
            "t": self.t,
            "gamma": self.gamma,
            "sigma_rel": self.sigma_rel,
            "dtype": self.dtype,
            "profile": self.profile,
        }


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def _valid_dtype_name(name: object) -> bool:
    if name == "":
        return True
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _dtype_of(name: str) -> torch.dtype | None:
    return None if not name else getattr(torch, name)


class SnapshotStore:
    """A folder of post-hoc EMA snapshots of one training run.

    Create one with :meth:`create` (a new run) or :meth:`open` (an existing run: to resume
    training or to :func:`reconstruct`); do not call the constructor directly.

    Each :meth:`save` writes one file per tracked profile, ``<run_id>.t<t>.p<k>.pt``, holding
    ``{"params", "buffers"?, "t", "gamma", "sigma_rel", "dtype", "run_id", ...}`` (tensors,
    numbers and strings only: ``torch.load(weights_only=True)`` reads it), then rewrites the
    manifest ``<run_id>.manifest.pt`` that lists the snapshots. Every file is written
    atomically (:func:`save`: temporary file, ``fsync``, rename), files before the manifest,
    so a crash at any point leaves the run as it was after the previous :meth:`save`: a
    snapshot is part of the run only once the manifest lists it. Files of other runs in the
    same folder are never read: a store reads only its own manifest, and :meth:`open`
    without a run id refuses a folder holding several runs.

    One process writes a run at a time; reading (:func:`reconstruct`) while it writes is safe.

    Example:
        >>> import tempfile, torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(2)}, sigma_rel=(0.05, 0.1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     store = fe.SnapshotStore.create(folder, run_id="demo")
        ...     for t in range(1, 201):
        ...         _ = fe.posthoc_update_(tracker, {"w": torch.full((2,), float(t))})
        ...         if t % 50 == 0:
        ...             _ = store.save(tracker)
        ...     runs = fe.SnapshotStore.runs(folder)
        >>> [(s.t, round(s.sigma_rel, 2)) for s in store.snapshots][:3], runs
        ([(50, 0.05), (50, 0.1), (100, 0.05)], ['demo'])
    """

    def __init__(self, folder: str, manifest: dict[str, Any]) -> None:
        self._folder = folder
        self._manifest = manifest

    # -- construction --

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        run_id: str | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
    ) -> SnapshotStore:
        """Start a new run in ``folder`` (created if missing) and write its empty manifest.

        Args:
            folder: The directory of the snapshots; other runs may share it.
            run_id: A name for the run (letters, digits, ``_`` and ``-``); by default the
                current time and a random suffix. Must not exist in ``folder`` yet.
            dtype: Floating dtype of stored snapshots: float32 by default (whatever the
                tracker's), ``None`` keeps the tracker's. Integer leaves keep theirs.

        Returns:
            The store, with no snapshots.

        Raises:
            ValueError: An invalid or already used ``run_id``.
            TypeError: A non-floating ``dtype``.
        """
        api = "SnapshotStore.create"
        check_floating_dtype(api, dtype)
        if run_id is None:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        _check_run_id(api, run_id)
        folder = os.path.abspath(os.fspath(folder))
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(_manifest_path(folder, run_id)):
            raise ValueError(
                f"{api}: run at 'run_id': expected a new run id, got {run_id!r}, which already "
                f"has snapshots in {folder!r}. Continue it with SnapshotStore.open(folder, "
                f"{run_id!r}), or pick another run_id (or none, for a generated one)."
            )
        manifest = {
            "format": _FORMAT,
            "run_id": run_id,
            "dtype": _dtype_name(dtype),
            "snapshots": [],
        }
        _atomic_save(manifest, _manifest_path(folder, run_id))
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], run_id: str | None = None) -> SnapshotStore:
        """Open an existing run, to continue saving snapshots or to reconstruct from it.

        Args:
            folder: The directory of the snapshots.
            run_id: The run to open; ``None`` opens the only run in ``folder`` and refuses a
                folder with several (see :meth:`runs`).

        Returns:
            The store, listing the snapshots its manifest lists.

        Raises:
            ValueError: No such run, several runs and no ``run_id``, or a damaged manifest.
        """
        api = "SnapshotStore.open"
        folder = os.path.abspath(os.fspath(folder))
        runs = cls.runs(folder)
        if run_id is None:
            if len(runs) != 1:
                got = "none" if not runs else f"{len(runs)} runs {short_list(runs)}"
                fix = (
                    "Pass run_id=... to choose one: runs are never mixed."
                    if runs
                    else "Check the folder, or create a run with SnapshotStore.create."
                )
                raise ValueError(
                    f"{api}: run at {folder!r}: expected exactly one run of snapshots, got "
                    f"{got}. {fix}"
                )
            run_id = runs[0]
        _check_run_id(api, run_id)
        if run_id not in runs:
            raise ValueError(
                f"{api}: run at 'run_id': expected one of {short_list(runs)} in {folder!r}, got "
                f"{run_id!r}. Check the run id (SnapshotStore.runs(folder) lists them)."
            )
        path = _manifest_path(folder, run_id)
        manifest = _load(path, map_location="cpu")
        _check_manifest(api, manifest, run_id, path)
        for name in os.listdir(folder):  # temporary files of writes killed mid-way
            match = re.fullmatch(rf"\.({re.escape(run_id)}\..+)\.[^.]+-\d+-[0-9a-f]+\.tmp", name)
            if match:
                remove_stale_temps(os.path.join(folder, match.group(1)))
        return cls(folder, manifest)

    @staticmethod
    def runs(folder: str | os.PathLike[str]) -> list[str]:
        """The run ids with a manifest in ``folder``, sorted.

        Args:
            folder: The directory of the snapshots.

        Returns:
            The run ids (an empty list for a missing folder).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            return []
        names = os.listdir(folder)
        return sorted(
            name[: -len(_MANIFEST_SUFFIX)]
            for name in names
            if name.endswith(_MANIFEST_SUFFIX) and _RUN_ID.fullmatch(name[: -len(_MANIFEST_SUFFIX)])
        )

    # -- properties --

    @property
    def folder(self) -> str:
        """The directory of the snapshots (absolute)."""
        return self._folder

    @property
    def run_id(self) -> str:
        """The run this store reads and writes."""
        return self._manifest["run_id"]

    @property
    def dtype(self) -> torch.dtype | None:
        """Floating dtype of stored snapshots (``None``: the tracker's)."""
        return _dtype_of(self._manifest["dtype"])

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """The run's snapshots, by time then profile."""
        return tuple(Snapshot(**entry) for entry in self._manifest["snapshots"])

    def __repr__(self) -> str:
        return (
            f"SnapshotStore(folder={self._folder!r}, run_id={self.run_id!r}, "
            f"snapshots={len(self._manifest['snapshots'])})"
        )

    # -- writing --

    def save(self, tracker: PostHocState) -> tuple[Snapshot, ...]:
        """Store a snapshot of every profile of ``tracker`` at its current time.

        Each profile's average is copied to the CPU in the store's dtype (float32 by default;
        integer leaves keep theirs) and written, with the tracker's buffers, to its own file;
        the manifest is rewritten last, so the new snapshots join the run together or not at
        all. Snapshot times must increase.

        Args:
            tracker: A :class:`PostHocState` with ``t > 0``. Not modified.

        Returns:
            The new snapshots.

        Raises:
            ValueError: ``t`` is 0 or not later than the last snapshot of the run.
            TypeError: A malformed tracker, or containers that ``torch.load(weights_only=True)``
                cannot read (use plain ``dict`` / ``list`` / ``tuple`` trees).
        """
        api = "SnapshotStore.save"
        size = _check_tracker(api, tracker)
        _check_bank(api, tracker["params"], size)
        t = int(tracker["t"])
        entries = self._manifest["snapshots"]
        last = entries[-1]["t"] if entries else 0
        if t <= last:
            fix = (
                "Update the tracker before saving."
                if t == 0
                else (
                    f"After resuming from an earlier checkpoint, drop the later snapshots first "
                    f"with store.truncate({t - 1})."
                )
            )
            raise ValueError(
                f"{api}: time at \"tracker['t']\": expected a time after the last snapshot "
                f"({last}) of run {self.run_id!r}, got {t}. {fix}"
            )
        dtype = self.dtype
        gammas = tracker["gamma"].tolist()

        def stored(leaf: Tensor) -> Tensor:
            cast = dtype if dtype is not None and is_inexact(leaf) else leaf.dtype
            return leaf.detach().to(device="cpu", dtype=cast, copy=True)

        new = []
        for k, g in enumerate(gammas):
            params = optree.tree_map(lambda leaf, k=k: stored(leaf[k]), tracker["params"])
            name = f"{self.run_id}.t{t:012d}.p{k}.pt"
            leaves = [leaf for leaf in optree.tree_leaves(params) if is_inexact(leaf)]
            snapshot = Snapshot(
                file=name,
                t=t,
                gamma=float(g),
                sigma_rel=gamma_to_sigma_rel(float(g)),
                dtype=_dtype_name(leaves[0].dtype) if leaves else "",
                profile=k,
            )
            payload: dict[str, Any] = {
                "format": _FORMAT,
                "run_id": self.run_id,
                **snapshot.as_dict(),
                "params": params,
            }
            if "buffers" in tracker:
                payload["buffers"] = optree.tree_map(stored, tracker["buffers"])
            _atomic_save(payload, os.path.join(self._folder, name))
            new.append(snapshot)
        manifest = {**self._manifest, "snapshots": [*entries, *(s.as_dict() for s in new)]}
        _atomic_save(manifest, _manifest_path(self._folder, self.run_id))
        self._manifest = manifest
        return tuple(new)

    def truncate(self, t: int) -> tuple[Snapshot, ...]:
        """Drop the snapshots taken after ``t`` (when training resumes from an earlier point).

        The manifest is rewritten first (atomically), then the files are deleted.

        Args:
            t: Keep the snapshots with time <= ``t``.

        Returns:
            The dropped snapshots.

        Example:
            >>> import tempfile, torch, functional_ema as fe
            >>> tracker = fe.posthoc_init({"w": torch.zeros(1)}, sigma_rel=0.1)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     store = fe.SnapshotStore.create(folder)
            ...     for _ in range(3):
            ...         _ = fe.posthoc_update_(tracker, {"w": torch.ones(1)}, dt=10)
            ...         _ = store.save(tracker)
            ...     dropped = store.truncate(15)
            >>> [s.t for s in dropped], [s.t for s in store.snapshots]
            ([20, 30], [10])
        """
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(
                f"SnapshotStore.truncate: time at 't': expected an int, got {type(t).__name__}."
            )
        entries = self._manifest["snapshots"]
        keep = [e for e in entries if e["t"] <= t]
        dropped = tuple(Snapshot(**e) for e in entries if e["t"] > t)
        if dropped:
            manifest = {**self._manifest, "snapshots": keep}
            _atomic_save(manifest, _manifest_path(self._folder, self.run_id))
            self._manifest = manifest
            for snapshot in dropped:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._folder, snapshot.file))
        return dropped

    # -- reading --

    def load(self, snapshot: Snapshot, *, map_location: Any = "cpu") -> dict[str, Any]:
        """Load one snapshot file, checked against the manifest.

        Args:
            snapshot: One of :attr:`snapshots`.
            map_location: As in ``torch.load``.

        Returns:
            The file's dict: ``params`` (and ``buffers``) with the metadata.

        Raises:
            ValueError: A missing, damaged or foreign file (another run's, or another time's).
        """
        api = "SnapshotStore.load"
        path = os.path.join(self._folder, snapshot.file)
        if not os.path.isfile(path):
            raise ValueError(
                f"{api}: snapshot at {path!r}: expected the file the manifest of run "
                f"{self.run_id!r} lists, got nothing. It was deleted or moved: restore it, or "
                f"drop the later snapshots with store.truncate({snapshot.t - 1})."
            )
        payload = _load(path, map_location=map_location)
        expected = {"format": _FORMAT, "run_id": self.run_id, **snapshot.as_dict()}
        got = {k: payload.get(k) for k in expected} if isinstance(payload, dict) else payload
        if got != expected or "params" not in payload:
            raise ValueError(
                f"{api}: snapshot at {path!r}: expected {expected}, got "
                f"{got if isinstance(payload, dict) else type(payload).__name__}. The file was "
                "replaced by another run's or another time's: restore the folder."
            )
        return payload


def _check_run_id(api: str, run_id: object) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"{api}: run id at 'run_id': expected 1 to 64 letters, digits, '_' or '-', got "
            f"{run_id!r}. Pass e.g. run_id='exp1-seed0'."
        )


def _manifest_path(folder: str, run_id: str) -> str:
    return os.path.join(folder, f"{run_id}{_MANIFEST_SUFFIX}")


def _check_manifest(api: str, manifest: Any, run_id: str, path: str) -> None:
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") == _FORMAT
        and manifest.get("run_id") == run_id
        and isinstance(manifest.get("snapshots"), list)
        and _valid_dtype_name(manifest.get("dtype"))
    )
    if not ok:
        got = (
            {k: manifest.get(k) for k in ("format", "run_id")}
            if isinstance(manifest, dict)
            else type(manifest).__name__
        )
        raise ValueError(
            f"{api}: manifest at {path!r}: expected a {_FORMAT!r} manifest of run {run_id!r}, "
            f"got {got}. The file was not written by SnapshotStore or was renamed."
        )


# --- reconstruction -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Reconstruction:
    """A post-hoc EMA built from snapshots: the weights, and how good the profile is.

    Attributes:
        params: The reconstructed tree (structure of the tracked ``params``), floating leaves
            in float32 (float64 if the snapshots are); integer leaves from the latest
            snapshot used.
        buffers: The buffers of the latest snapshot used, or ``None`` if the tracker had none.
        sigma_rel: The target length.
        gamma: The target exponent.
        t: The time of the reconstruction.
        error: The relative L2 error of the reconstructed profile (see
            :func:`posthoc_coefficients`).
        snapshots: The snapshots used (time <= ``t``).
        coefficients: Their weights, float64, aligned with ``snapshots``.
    """

    params: TensorTree
    buffers: TensorTree | None
    sigma_rel: float
    gamma: float
    t: int
    error: float
    snapshots: tuple[Snapshot, ...]
    coefficients: Tensor

    def __repr__(self) -> str:
        return (
            f"Reconstruction(sigma_rel={self.sigma_rel:.4g}, gamma={self.gamma:.4g}, "
            f"t={self.t}, error={self.error:.3g}, snapshots={len(self.snapshots)})"
        )

    def module(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the reconstruction, for code that needs a module.

        The tracked ``params`` must be keyed by the module's names (``fe.module_state``).
        Buffers come from the snapshot (or, if the tracker had none, from ``model``). Values
        are cast to ``model``'s dtypes and moved to its devices; parameters have
        ``requires_grad=False`` and the copy is in eval mode. ``model`` is not modified
        (only its structure is copied, as ``EMA.shadow`` does).

        Args:
            model: A template with the tracked model's architecture (not a DDP or
                ``torch.compile`` wrapper).

        Returns:
            The new module.

        Raises:
            ValueError: Names or shapes that differ from ``model``'s.
        """
        api = "Reconstruction.module"
        check_unwrapped(api, model)
        live_params, live_buffers = module_state(model)
        live = {**live_params, **live_buffers}
        held: dict[str, Any] = {}
        for tree in (self.params, self.buffers if self.buffers is not None else {}):
            if not isinstance(tree, dict):
                raise ValueError(
                    f"{api}: tree at 'params': expected a dict keyed by module names (track "
                    f"fe.module_state(model)), got {type(tree).__name__}. Use the params "
                    "tree with functional_ema.apply or your own code instead."
                )
            held.update(tree)
        if self.buffers is None:
            held.update({n: b for n, b in live_buffers.items() if n not in held})
        missing, extra = set(live) - set(held), set(held) - set(live)
        bad = [n for n in set(live) & set(held) if tuple(held[n].shape) != tuple(live[n].shape)]
        if missing or extra or bad:
            shapes = [f"{n!r}: {tuple(live[n].shape)} vs {tuple(held[n].shape)}" for n in bad]
            raise ValueError(
                f"{api}: names at 'model': expected the reconstruction's names and shapes, got "
                f"missing {short_list(missing)}, unexpected {short_list(extra)}, shapes "
                f"(model vs reconstruction) {shapes[:8]}. Pass a model of the tracked "
                "architecture."
            )
        return module_with(model, held)


def reconstruct(
    store: SnapshotStore,
    sigma_rel: float | Sequence[float] | None = None,
    *,
    gamma: float | Sequence[float] | None = None,
    t: int | None = None,
    max_error: float | None = 0.1,
    normalize: bool = True,
    map_location: Any = "cpu",
) -> Reconstruction | list[Reconstruction]:
    r"""Build the power-function EMA of length ``sigma_rel`` at time ``t`` from snapshots.

    The coefficients come from :func:`posthoc_coefficients` over the run's snapshots with
    time :math:`t_i \le t`; the weighted sum :math:`\sum_i x_i \hat\theta_i` is then
    streamed one snapshot file at a time, accumulated in float32 (float64 for float64
    snapshots): peak memory is one accumulator per target plus one snapshot (two model
    copies for one target), however many snapshots there are. All targets share one pass.

    Everything is checked before the first file is read: the target range, the time, and the
    profile error against ``max_error``.

    Args:
        store: The run (:meth:`SnapshotStore.open`).
        sigma_rel: The target length(s), in :math:`(0, \sqrt{1/12})` (give exactly one of
            ``sigma_rel`` and ``gamma``); a sequence gives a list of reconstructions.
        gamma: The target exponent(s) :math:`\gamma > 0`.
        t: The time of the reconstruction, between the first and the last snapshot time
            (default: the last). A snapshot time is best: after it, the weights until ``t``
            are unknown and the profile error grows.
        max_error: Refuse targets whose relative L2 profile error exceeds this (``None``
            accepts any). The error grows for targets far outside the tracked lengths and
            with fewer snapshots.
        normalize: Constrain the coefficients to sum to 1 (see :func:`posthoc_coefficients`).
        map_location: Where to load the snapshots and accumulate, as in ``torch.load``.

    Returns:
        A :class:`Reconstruction`, or a list of them for a sequence of targets.

    Raises:
        ValueError: A target outside the valid range, a time outside the snapshots' range, a
            profile error above ``max_error``, or missing, damaged or foreign files.

    Example:
        >>> import tempfile, torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(())}, sigma_rel=(0.05, 0.1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     store = fe.SnapshotStore.create(folder)
        ...     for t in range(1, 1001):  # a ramp w_t = t, snapshots every 50 steps
        ...         _ = fe.posthoc_update_(tracker, {"w": torch.tensor(float(t))})
        ...         if t % 50 == 0:
        ...             _ = store.save(tracker)
        ...     r = fe.reconstruct(store, sigma_rel=0.08)  # not tracked
        >>> r
        Reconstruction(sigma_rel=0.08, gamma=9.452, t=1000, error=0.00193, snapshots=40)
        >>> g = r.gamma  # the ramp's power EMA: (g + 1) / (g + 2) * t, plus 0.5 (discrete)
        >>> round(float(r.params["w"]), 1), round((g + 1) / (g + 2) * 1000 + 0.5, 1)
        (913.2, 913.2)
    """
    api = "reconstruct"
    if not isinstance(store, SnapshotStore):
        raise TypeError(
            f"{api}: store at 'store': expected a SnapshotStore, got {type(store).__name__}. "
            "Open the run with functional_ema.SnapshotStore.open(folder)."
        )
    targets, several = _gammas(api, sigma_rel, gamma)
    lengths = _lengths(sigma_rel, targets)
    snapshots = store.snapshots
    if not snapshots:
        raise ValueError(
            f"{api}: snapshots of run {store.run_id!r}: expected at least one, got none. Save "
            "snapshots during training with store.save(tracker)."
        )
    first, last = snapshots[0].t, snapshots[-1].t
    t = last if t is None else t
    if isinstance(t, bool) or not isinstance(t, int) or not first <= t <= last:
        raise ValueError(
            f"{api}: time at 't': expected an int between the first and the last snapshot "
            f"({first} to {last}) of run {store.run_id!r}, got {t!r}. Nothing is known about "
            "the weights outside that range: reconstruct at or before the last snapshot."
        )
    if max_error is not None and not (isinstance(max_error, int | float) and max_error > 0):
        raise ValueError(f"{api}: max_error: expected a number > 0 or None, got {max_error!r}.")
    used = tuple(s for s in snapshots if s.t <= t)
    x, errors = _solve(
        torch.tensor([float(s.t) for s in used], dtype=torch.float64),
        torch.tensor([s.gamma for s in used], dtype=torch.float64),
        float(t),
        torch.tensor(targets, dtype=torch.float64),
        normalize=normalize,
    )
    if max_error is not None:
        bad = [
            f"sigma_rel={gamma_to_sigma_rel(g):.4f} (gamma={g:.3f}): {float(e):.3g}"
            for g, e in zip(targets, errors, strict=True)
            if float(e) > max_error
        ]
        if bad:
            tracked = sorted({round(s.sigma_rel, 4) for s in used})
            raise ValueError(
                f"{api}: profile error at 'sigma_rel': expected a relative L2 error <= "
                f"{max_error} for the target at t={t}, got {'; '.join(bad)}, from "
                f"{len(used)} snapshots of sigma_rel {tracked}. The target is too far from "
                "the tracked lengths or the snapshots are too sparse: pick a target between "
                "the tracked lengths, reconstruct at a snapshot time, track a closer profile "
                "or save snapshots more often, or pass max_error=... to accept the error."
            )
    sums: list[list[Tensor]] = []
    spec: Any = None
    buffers: TensorTree | None = None
    for index, snapshot in enumerate(used):
        payload = store.load(snapshot, map_location=map_location)
        if index == 0:
            spec, sums = _start_sums(payload["params"], len(targets))
        else:
            check_pair(
                api,
                optree.tree_unflatten(spec, sums[0]),
                payload["params"],
                (f"snapshot {used[0].file}", f"snapshot {snapshot.file}"),
            )
        _accumulate(sums, payload["params"], x[:, index].tolist())
        buffers = payload.get("buffers")
        del payload  # one snapshot in memory at a time
    results = [
        Reconstruction(
            params=optree.tree_unflatten(spec, acc),
            buffers=None if buffers is None else optree.tree_map(torch.clone, buffers),
            sigma_rel=lengths[m],
            gamma=g,
            t=t,
            error=float(errors[m]),
            snapshots=used,
            coefficients=x[m].clone(),
        )
        for m, (g, acc) in enumerate(zip(targets, sums, strict=True))
    ]
    return results if several else results[0]


def _start_sums(params: TensorTree, count: int) -> tuple[Any, list[list[Tensor]]]:
    """Zero accumulators (float32, or float64 for float64 leaves) shaped like ``params``."""
    leaves, spec = optree.tree_flatten(params)

    def zero(leaf: Tensor) -> Tensor:
        if not is_inexact(leaf):
            return leaf.clone()
        return torch.zeros_like(leaf, dtype=torch.promote_types(leaf.dtype, torch.float32))

    return spec, [[zero(leaf) for leaf in leaves] for _ in range(count)]


def _accumulate(sums: list[list[Tensor]], params: TensorTree, coefficients: list[float]) -> None:
    """``sums[m] += coefficients[m] * params`` leaf by leaf (integer leaves: the latest)."""
    for acc, coefficient in zip(sums, coefficients, strict=True):
        for j, leaf in enumerate(optree.tree_leaves(params)):
            if is_inexact(acc[j]):
                acc[j].add_(leaf.to(acc[j].dtype), alpha=coefficient)
            else:
                acc[j] = leaf.clone()
