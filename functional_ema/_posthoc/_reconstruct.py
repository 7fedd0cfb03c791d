r"""Reconstruction: the post-hoc EMA of any length, as a weighted sum of stored snapshots.

:func:`reconstruct` plans first (checks the targets and the time, solves for the snapshots'
coefficients and checks the profile error: nothing is read before that), then streams the
weighted sums one snapshot file at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch
from optree import PyTreeSpec
from torch import Tensor, nn

from functional_ema._arith import is_inexact
from functional_ema._errors import describe, short_list, wrong_type, wrong_value
from functional_ema._module import check_unwrapped, module_state, module_with
from functional_ema._posthoc._solver import solve
from functional_ema._posthoc._store import Snapshot, SnapshotStore
from functional_ema._profiles import Profiles, gamma_to_sigma_rel, parse
from functional_ema._tree import check_pair
from functional_ema._types import TensorTree


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
        trees = {"params": self.params, "buffers": {} if self.buffers is None else self.buffers}
        for path, tree in trees.items():
            if not isinstance(tree, dict):
                raise wrong_value(
                    api,
                    "tree not a dict",
                    path,
                    "a dict keyed by module names (track fe.module_state(model))",
                    type(tree).__name__,
                    "Use the tree with functional_ema.apply or your own code instead.",
                )
            held.update(tree)
        if self.buffers is None:
            held.update({n: b for n, b in live_buffers.items() if n not in held})
        missing, extra = set(live) - set(held), set(held) - set(live)
        bad = [n for n in set(live) & set(held) if tuple(held[n].shape) != tuple(live[n].shape)]
        if missing or extra or bad:
            shapes = [f"{n!r}: {tuple(live[n].shape)} vs {tuple(held[n].shape)}" for n in bad]
            raise wrong_value(
                api,
                "names mismatch",
                "model",
                "the reconstruction's names and shapes",
                f"missing {short_list(missing)}, unexpected {short_list(extra)}, shapes "
                f"(model vs reconstruction) {shapes[:8]}",
                "Pass a model of the tracked architecture.",
            )
        return module_with(model, held)


@dataclass(frozen=True)
class _Plan:
    """What :func:`reconstruct` sums: the snapshots used and each target's coefficients.

    Attributes:
        targets: The target profiles.
        t: The time of the reconstruction.
        snapshots: The snapshots with time <= ``t``.
        coefficients: ``(M, N)`` float64, one row per target, aligned with ``snapshots``.
        errors: ``(M,)`` float64, the relative L2 profile errors.
    """

    targets: Profiles
    t: int
    snapshots: tuple[Snapshot, ...]
    coefficients: Tensor
    errors: Tensor


def _time(api: str, store: SnapshotStore, t: object) -> int:
    """The time of the reconstruction: an int within the run's snapshots (default: the last)."""
    snapshots = store.snapshots
    if not snapshots:
        raise wrong_value(
            api,
            "no snapshots",
            "store",
            f"at least one snapshot in run {store.run_id!r}",
            "none",
            "Save snapshots during training with store.save(tracker).",
        )
    first, last = snapshots[0].t, snapshots[-1].t
    t = last if t is None else t
    expected = (
        f"an int between the first and the last snapshot ({first} to {last}) of run "
        f"{store.run_id!r}"
    )
    fix = (
        "Nothing is known about the weights outside that range: reconstruct at or before the "
        "last snapshot."
    )
    if isinstance(t, bool) or not isinstance(t, int):
        raise wrong_type(api, "time of the wrong type", "t", expected, describe(t), fix)
    if not first <= t <= last:
        raise wrong_value(api, "time out of range", "t", expected, repr(t), fix)
    return t


def _check_max_error(api: str, max_error: object) -> None:
    """``max_error``: ``None`` or a number > 0."""
    expected, fix = "a number > 0 or None", "Pass e.g. max_error=0.1, or None to accept any."
    if max_error is None:
        return
    if isinstance(max_error, bool) or not isinstance(max_error, int | float):
        what = "max_error of the wrong type"
        raise wrong_type(api, what, "max_error", expected, describe(max_error), fix)
    if not max_error > 0:
        raise wrong_value(
            api, "max_error out of range", "max_error", expected, repr(max_error), fix
        )


def _refuse_large_errors(api: str, plan: _Plan, max_error: float) -> None:
    """Raise when a target's profile error exceeds ``max_error``, before any file is read."""
    bad = [
        f"sigma_rel={gamma_to_sigma_rel(g):.4f} (gamma={g:.3f}): {float(e):.3g}"
        for g, e in zip(plan.targets.gammas, plan.errors, strict=True)
        if float(e) > max_error
    ]
    if bad:
        tracked = sorted({round(s.sigma_rel, 4) for s in plan.snapshots})
        raise wrong_value(
            api,
            "profile error too large",
            "sigma_rel",
            f"a relative L2 error <= {max_error} for the target at t={plan.t}",
            f"{'; '.join(bad)}, from {len(plan.snapshots)} snapshots of sigma_rel {tracked}",
            "The target is too far from the tracked lengths or the snapshots are too sparse: "
            "pick a target between the tracked lengths, reconstruct at a snapshot time, track a "
            "closer profile or save snapshots more often, or pass max_error=... to accept the "
            "error.",
        )


def _plan(
    api: str,
    store: SnapshotStore,
    targets: Profiles,
    t: int | None,
    max_error: float | None,
    *,
    normalize: bool,
) -> _Plan:
    """Check the time and ``max_error``, solve, and refuse targets above ``max_error``."""
    t = _time(api, store, t)
    _check_max_error(api, max_error)
    used = tuple(s for s in store.snapshots if s.t <= t)
    x, errors = solve(
        torch.tensor([float(s.t) for s in used], dtype=torch.float64),
        torch.tensor([s.gamma for s in used], dtype=torch.float64),
        float(t),
        torch.tensor(targets.gammas, dtype=torch.float64),
        normalize=normalize,
    )
    plan = _Plan(targets, t, used, x, errors)
    if max_error is not None:
        _refuse_large_errors(api, plan, max_error)
    return plan


def _zeros(params: TensorTree, count: int) -> tuple[PyTreeSpec, list[list[Tensor]]]:
    """``count`` zero sums (float32, or float64 for float64 leaves) shaped like ``params``.

    Integer leaves are copied: the sums hold the latest snapshot's.
    """
    leaves, spec = optree.tree_flatten(params)

    def zero(leaf: Tensor) -> Tensor:
        if not is_inexact(leaf):
            return leaf.clone()
        return torch.zeros_like(leaf, dtype=torch.promote_types(leaf.dtype, torch.float32))

    return spec, [[zero(leaf) for leaf in leaves] for _ in range(count)]


def _accumulate(sums: list[list[Tensor]], params: TensorTree, coefficients: list[float]) -> None:
    """``sums[m] += coefficients[m] * params`` leaf by leaf (integer leaves: the latest)."""
    for total, coefficient in zip(sums, coefficients, strict=True):
        for j, leaf in enumerate(optree.tree_leaves(params)):
            if is_inexact(total[j]):
                total[j].add_(leaf.to(total[j].dtype), alpha=coefficient)
            else:
                total[j] = leaf.clone()


def _weighted_sums(
    api: str, store: SnapshotStore, plan: _Plan, map_location: Any
) -> tuple[list[TensorTree], TensorTree | None]:
    """The planned weighted sums, one snapshot file in memory at a time.

    Returns:
        One params tree per target, and the latest snapshot's buffers (``None`` without).
    """
    sums: list[list[Tensor]] = []
    spec: Any = None
    buffers: TensorTree | None = None
    first = plan.snapshots[0]
    for index, snapshot in enumerate(plan.snapshots):
        payload = store.load(snapshot, map_location=map_location)
        if index == 0:
            spec, sums = _zeros(payload["params"], len(plan.targets.gammas))
        else:
            check_pair(
                api,
                optree.tree_unflatten(spec, sums[0]),
                payload["params"],
                (f"snapshot {first.file}", f"snapshot {snapshot.file}"),
            )
        _accumulate(sums, payload["params"], plan.coefficients[:, index].tolist())
        buffers = payload.get("buffers")
        del payload  # one snapshot in memory at a time
    return [optree.tree_unflatten(spec, total) for total in sums], buffers


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
        TypeError: A store that is not a :class:`SnapshotStore`, or a target, ``t`` or
            ``max_error`` of the wrong type.

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
        raise wrong_type(
            api,
            "store of the wrong type",
            "store",
            "a SnapshotStore",
            describe(store),
            "Open the run with functional_ema.SnapshotStore.open(folder).",
        )
    targets = parse(api, sigma_rel, gamma)
    plan = _plan(api, store, targets, t, max_error, normalize=normalize)
    sums, buffers = _weighted_sums(api, store, plan, map_location)
    results = [
        Reconstruction(
            params=params,
            buffers=None if buffers is None else optree.tree_map(torch.clone, buffers),
            sigma_rel=targets.sigma_rels[m],
            gamma=targets.gammas[m],
            t=plan.t,
            error=float(plan.errors[m]),
            snapshots=plan.snapshots,
            coefficients=plan.coefficients[m].clone(),
        )
        for m, params in enumerate(sums)
    ]
    return results if targets.several else results[0]
