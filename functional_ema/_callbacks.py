"""The options the training-framework callbacks share, checked once before training starts.

``functional_ema.lightning`` and ``functional_ema.transformers`` each take :class:`EMA`'s
options plus ``apply_at_end`` and build the EMA later, when the framework hands them the model;
:class:`Options` checks them when the callback is made (so a typo fails before training, not
at its first step) and writes the callbacks' repr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from functional_ema._adapter import EMA, check_count, check_ema_decay, check_patterns
from functional_ema._core import check_policy
from functional_ema._errors import describe, wrong_type
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule
from functional_ema._update import check_buffer_policy


DEFAULTS: dict[str, Any] = {
    "use_num_updates": False,
    "dtype": None,
    "buffer_policy": "copy",
    "nonfinite": "skip",
    "update_every": 1,
    "update_after": 0,
    "exclude": [],
    "device": None,
    "pin_memory": False,
    "apply_at_end": False,
}
"""The callbacks' keyword arguments and their defaults (those of :class:`EMA`)."""


def check_bool(api: str, path: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ``TypeError`` naming ``path``."""
    if not isinstance(value, bool):
        raise wrong_type(
            api,
            f"{path} of the wrong type",
            path,
            "True or False",
            describe(value),
            f"Pass {path}=True or {path}=False.",
        )
    return value


class Options:
    """A callback's decay and :class:`EMA` options, checked; :meth:`make` builds the EMA."""

    def __init__(
        self,
        api: str,
        decay: Decay | Schedule,
        *,
        use_num_updates: bool,
        dtype: torch.dtype | None,
        buffer_policy: BufferPolicy,
        nonfinite: NonFinite,
        update_every: int,
        update_after: int,
        exclude: Sequence[str],
        device: torch.device | str | None,
        pin_memory: bool,
        apply_at_end: bool,
    ) -> None:
        decay = check_ema_decay(api, decay, use_num_updates)
        check_buffer_policy(api, buffer_policy)
        check_policy(api, nonfinite)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise wrong_type(
                api,
                "not a floating dtype",
                "dtype",
                "None or a floating torch.dtype",
                describe(dtype),
                "Pass e.g. dtype=torch.float32, or None to keep the model's dtypes.",
            )
        check_patterns(api, "exclude", exclude)
        self.decay: Decay | Schedule = decay
        self.ema_options: dict[str, Any] = {
            "use_num_updates": check_bool(api, "use_num_updates", use_num_updates),
            "dtype": dtype,
            "buffer_policy": buffer_policy,
            "nonfinite": nonfinite,
            "update_every": check_count(api, "update_every", update_every, 1),
            "update_after": check_count(api, "update_after", update_after, 0),
            "exclude": list(exclude),
            "device": device,
            "pin_memory": check_bool(api, "pin_memory", pin_memory),
        }
        self.apply_at_end = check_bool(api, "apply_at_end", apply_at_end)

    def make(self, model: nn.Module) -> EMA:
        """The :class:`EMA` of ``model`` with these options."""
        return EMA(model, self.decay, **self.ema_options)

    def call(self, name: str) -> str:
        """``name(decay, options that differ from the defaults)``: the callback's repr."""
        options = {**self.ema_options, "apply_at_end": self.apply_at_end}
        changed = [f"{k}={v!r}" for k, v in options.items() if v != DEFAULTS[k]]
        return f"{name}({', '.join([repr(self.decay), *changed])})"
