r"""Post-hoc EMA (EDM2): track power-function EMAs, store snapshots, reconstruct any length.

Karras et al. 2024 (arXiv 2312.02696, Sec. 3 and App. C): train once while tracking a few
power-function EMAs, save snapshots of them now and then, and afterwards build the EMA of any
other length :math:`\sigma_{\mathrm{rel}}` as a weighted sum of the snapshots. This package only
re-exports; its modules import one another in this order:

* ``_solver``: the inner products of power profiles and :func:`posthoc_coefficients`, the
  least-squares weights of snapshots (float64).
* ``_tracker``: :func:`posthoc_init` / :func:`posthoc_update_`, a :class:`PostHocState` (a
  plain dict) holding K power EMAs of one params tree in a decay bank, updated in one pass by
  the bank's update with :math:`1 - \beta = -\mathrm{expm1}((\gamma + 1)\,
  \mathrm{log1p}(-dt / t))`, for any update interval and time unit.
* ``_store``: :class:`SnapshotStore`, one folder, one run id; atomic ``torch.save`` snapshots
  (one file per profile and time, float32 by default) listed in an atomically written
  manifest.
* ``_reconstruct``: :func:`reconstruct`, the least-squares projection of the target profile
  onto the stored snapshot profiles, streamed one snapshot file at a time, with the
  approximation error of the profile reported and checked.
"""

from functional_ema._posthoc._reconstruct import Reconstruction as Reconstruction
from functional_ema._posthoc._reconstruct import reconstruct as reconstruct
from functional_ema._posthoc._solver import posthoc_coefficients as posthoc_coefficients
from functional_ema._posthoc._store import Snapshot as Snapshot
from functional_ema._posthoc._store import SnapshotStore as SnapshotStore
from functional_ema._posthoc._tracker import PostHocState as PostHocState
from functional_ema._posthoc._tracker import posthoc_init as posthoc_init
from functional_ema._posthoc._tracker import posthoc_update_ as posthoc_update_
