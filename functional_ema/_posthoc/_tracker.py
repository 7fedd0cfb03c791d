r"""Post-hoc tracking: K power-function EMAs of one tree, updated in one pass.

A :class:`PostHocState` holds a bank (:func:`bank`) with one row per profile; each update is
the bank's own (:func:`update_bank_weights_`) with the power profile's weights
:math:`1 - \beta_k`, :math:`\beta_k = (1 - dt / t)^{\gamma_k + 1}`, computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import optree
import torch
from torch import Tensor

from functional_ema._arith import copy_leaf
from functional_ema._bank import bank, update_bank_weights_
from functional_ema._decay import check_interval
from functional_ema._dtensor import localize
from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._profiles import parse
from functional_ema._tree import check_floating_dtype, check_pair, check_tensor_leaves, leaf_paths
from functional_ema._types import NonFinite, TensorTree


_KEEP = "Keep the tracker as functional_ema.posthoc_init made it."


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
        TypeError: A profile that is not a number, non-tensor leaves or a non-floating
            ``dtype``.

    Example:
        >>> import torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(3)}, sigma_rel=(0.05, 0.1))
        >>> tracker["params"]["w"].shape, tracker["gamma"].round(decimals=2).tolist()
        (torch.Size([2, 3]), [16.97, 6.94])
    """
    api = "posthoc_init"
    gammas = parse(api, sigma_rel, gamma).gammas
    if len(set(gammas)) != len(gammas):
        raise wrong_value(
            api,
            "profile tracked twice",
            "sigma_rel/gamma",
            "distinct profiles",
            f"gamma={[round(g, 4) for g in gammas]}",
            "Track each profile once.",
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


def check_tracker(api: str, tracker: Any) -> int:
    """Validate a :class:`PostHocState`'s keys, time counter and exponents; return K."""
    keys = set(tracker) if isinstance(tracker, dict) else set()
    if not {"t", "gamma", "params"} <= keys or keys - {"t", "gamma", "params", "buffers"}:
        raise wrong_type(
            api,
            "not a PostHocState",
            "<root>",
            "a PostHocState (a dict with 't', 'gamma', 'params' and optionally 'buffers')",
            sorted(keys) if isinstance(tracker, dict) else describe(tracker),
            "Create it with functional_ema.posthoc_init.",
        )
    t, gamma = tracker["t"], tracker["gamma"]
    expected = "a 0-dim int64 tensor"
    if not isinstance(t, Tensor) or t.dtype != torch.int64:
        raise wrong_type(api, "time of the wrong type", "t", expected, describe(t), _KEEP)
    if t.ndim != 0:
        raise wrong_value(api, "time not a scalar", "t", expected, describe(t), _KEEP)
    expected = "a 1-D float64 tensor"
    if not isinstance(gamma, Tensor) or gamma.dtype != torch.float64:
        raise wrong_type(
            api, "exponents of the wrong type", "gamma", expected, describe(gamma), _KEEP
        )
    if gamma.ndim != 1:
        raise wrong_value(api, "exponents not 1-D", "gamma", expected, describe(gamma), _KEEP)
    return gamma.shape[0]


def check_bank(api: str, tree: TensorTree, size: int) -> None:
    """Check that every leaf of a tracker's ``params`` holds ``size`` rows."""
    leaves, _ = check_tensor_leaves(api, tree, "tracker['params']")
    for index, leaf in enumerate(leaves):
        if leaf.ndim == 0 or leaf.shape[0] != size:
            raise wrong_value(
                api,
                "bank size mismatch",
                leaf_paths(tree)[index],
                f"a leading dimension of {size} (one row per profile)",
                f"shape {tuple(leaf.shape)}",
                _KEEP,
            )


def _buffer_pairs(
    api: str, tracker: PostHocState, buffers: TensorTree | None
) -> tuple[list[Tensor], list[Tensor]]:
    """The tracker's buffers and the current ones, validated (local shards of DTensors)."""
    if ("buffers" in tracker) != (buffers is not None):
        raise wrong_value(
            api,
            "buffers missing" if buffers is None else "unexpected buffers",
            "buffers",
            "a tree (as given to posthoc_init)" if buffers is None else "None",
            "None" if buffers is None else "a tree",
            "Pass buffers to both posthoc_init and posthoc_update_, or to neither.",
        )
    if buffers is None:
        return [], []
    names = ("tracker['buffers']", "buffers")
    held, current, _ = check_pair(api, tracker["buffers"], buffers, names)
    held, current, _ = localize(api, tracker["buffers"], held, current, names)
    return held, current


@torch.no_grad()
def posthoc_update_(
    tracker: PostHocState,
    params: TensorTree,
    buffers: TensorTree | None = None,
    *,
    dt: int | Tensor = 1,
    nonfinite: NonFinite = "skip",
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
    perturb the profile by about 0.2% after 1e6 updates). The update is the decay bank's
    (:func:`ema_update_bank_` with these weights): one pass over ``params`` updates all K
    rows, DTensor leaves are updated on their local shards, and nothing is read on the host
    (except with ``nonfinite="raise"``).

    Args:
        tracker: From :func:`posthoc_init`; modified in place.
        params: The current values, with the structure of the tracked tree.
        buffers: The current buffers; required exactly when :func:`posthoc_init` got them.
        dt: Time units this update covers (an int >= 1 or a 0-dim integer tensor): 1 per
            step, ``k`` when updating every ``k`` steps, the batch size to count samples.
        nonfinite: ``"skip"`` (default): a NaN or Inf in ``params`` leaves that element's
            averages unchanged in every row; ``"raise"``: a ``ValueError`` naming the leaf,
            before anything is written (the time included); ``"propagate"``: average it in,
            as TF does.

    Returns:
        ``tracker`` itself.

    Raises:
        ValueError: Mismatched structure, shapes or devices, an invalid ``dt`` or policy, or
            (with ``nonfinite="raise"``) a NaN or Inf in ``params``.
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
    check_tracker(api, tracker)
    dt = check_interval(api, dt)
    held, current = _buffer_pairs(api, tracker, buffers)
    t = tracker["t"]
    step = dt if isinstance(dt, int) else dt.to(torch.float64)
    ratio = step / (t + dt).to(torch.float64)
    weights = -torch.expm1((tracker["gamma"] + 1) * torch.log1p(-ratio))  # 1 at the first update
    names = ("tracker['params']", "params")
    update_bank_weights_(api, tracker["params"], params, weights, nonfinite=nonfinite, names=names)
    for h, c in zip(held, current, strict=True):
        copy_leaf(h, c, inplace=True)
    t.add_(dt)
    return tracker
