"""functional_ema: TensorFlow-exact exponential moving averages of PyTorch weights.

A functional core over ``torch.func`` and optree pytrees, and a thin ``nn.Module`` adapter.
This module only re-exports. The private modules form layers; each imports only from the
layers below it (import-linter checks this in CI, with the contracts in ``pyproject.toml``):

1. Base: ``_types`` (type aliases), ``_errors`` (the message constructors), ``_compat``
   (every private torch API, probed once, with a tested fallback).
2. Tensors and trees: ``_arith`` (the TF step and the non-finite masking, written once),
   ``_kernels`` (compiled from ``_arith``), ``_engine`` (in-place plans over regions),
   ``_tree`` (pytree checks with leaf paths), ``_decay`` (decays, intervals, TF's weight),
   ``_profiles`` (EDM2's power profiles), ``_dtensor`` (shard-local DTensor updates).
3. Functional core: ``_core`` (``ema_update``), ``_state`` (``EmaState``, ``init``),
   ``_update`` (``update``: validate, then apply purely or in place), ``_bank`` (decay
   banks), ``_schedules``.
4. Persistence: ``_io`` (atomic saves, verified loads), ``_restore`` (checks of a loaded
   state).
5. Module glue: ``_fsdp``, ``_fingerprint``, ``_offload`` (averages on another device,
   updated through bounded staging buffers), ``_module`` (module state, ``apply``, exports),
   ``_swap`` (averages swapped into a live model).
6. Adapters: ``_adapter`` (``EMA``), ``_posthoc`` (EDM2's post-hoc EMA) and ``_peers``
   (``from_peer``: the peers' checkpoints).
"""

from importlib.metadata import PackageNotFoundError, version

from functional_ema._adapter import EMA as EMA
from functional_ema._bank import bank as bank
from functional_ema._bank import ema_update_bank as ema_update_bank
from functional_ema._bank import ema_update_bank_ as ema_update_bank_
from functional_ema._core import ema_update as ema_update
from functional_ema._core import ema_update_ as ema_update_
from functional_ema._decay import tf_decay as tf_decay
from functional_ema._io import load as load
from functional_ema._io import save as save
from functional_ema._module import apply as apply
from functional_ema._module import flatten_parameters_ as flatten_parameters_
from functional_ema._module import full_state_dict as full_state_dict
from functional_ema._module import module_state as module_state
from functional_ema._peers import from_peer as from_peer
from functional_ema._posthoc import PostHocState as PostHocState
from functional_ema._posthoc import Reconstruction as Reconstruction
from functional_ema._posthoc import Snapshot as Snapshot
from functional_ema._posthoc import SnapshotStore as SnapshotStore
from functional_ema._posthoc import posthoc_coefficients as posthoc_coefficients
from functional_ema._posthoc import posthoc_init as posthoc_init
from functional_ema._posthoc import posthoc_update_ as posthoc_update_
from functional_ema._posthoc import reconstruct as reconstruct
from functional_ema._restore import check_state as check_state
from functional_ema._schedules import constant as constant
from functional_ema._schedules import gamma_to_sigma_rel as gamma_to_sigma_rel
from functional_ema._schedules import half_life as half_life
from functional_ema._schedules import power as power
from functional_ema._schedules import sigma_rel_to_gamma as sigma_rel_to_gamma
from functional_ema._schedules import tf_warmup as tf_warmup
from functional_ema._schedules import warmup as warmup
from functional_ema._state import EmaState as EmaState
from functional_ema._state import average as average
from functional_ema._state import extend as extend
from functional_ema._state import init as init
from functional_ema._swap import swapped as swapped
from functional_ema._update import release_plans as release_plans
from functional_ema._update import update as update
from functional_ema._update import update_ as update_
from functional_ema._weighted import weighted_moving_average as weighted_moving_average


try:
    __version__ = version("functional_ema")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "EMA",
    "EmaState",
    "PostHocState",
    "Reconstruction",
    "Snapshot",
    "SnapshotStore",
    "apply",
    "average",
    "bank",
    "check_state",
    "constant",
    "ema_update",
    "ema_update_",
    "ema_update_bank",
    "ema_update_bank_",
    "extend",
    "flatten_parameters_",
    "from_peer",
    "full_state_dict",
    "gamma_to_sigma_rel",
    "half_life",
    "init",
    "load",
    "module_state",
    "posthoc_coefficients",
    "posthoc_init",
    "posthoc_update_",
    "power",
    "reconstruct",
    "release_plans",
    "save",
    "sigma_rel_to_gamma",
    "swapped",
    "tf_decay",
    "tf_warmup",
    "update",
    "update_",
    "warmup",
    "weighted_moving_average",
]
