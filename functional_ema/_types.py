"""Type aliases shared by the public API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias, TypeVar

from torch import Tensor


TensorTree: TypeAlias = Any
"""An optree pytree whose leaves are tensors (dict, list, tuple, namedtuple, nested)."""

Params: TypeAlias = dict[str, Tensor]
"""Trainable parameters keyed by the module's own dotted names."""

Buffers: TypeAlias = dict[str, Tensor]
"""Buffers (and frozen parameters) keyed by the module's own dotted names."""

Decay: TypeAlias = float | Tensor
"""A decay in [0, 1]: a Python number or a 0-dim floating tensor (no host sync)."""

Schedule: TypeAlias = Callable[[Tensor, Tensor], float | Tensor]
"""A function ``schedule(t, dt)`` of 0-dim integer tensors (the step the update reaches and
the steps it covers) returning the decay of that update."""

NonFinite: TypeAlias = Literal["skip", "raise", "propagate"]
"""What to do with NaN/Inf values: leave them out of the average (``"skip"``, the default),
reject the update (``"raise"``), or average them in as TF does (``"propagate"``)."""

BufferPolicy: TypeAlias = Literal["copy", "average"]
"""What an update does with floating buffers: copy the latest (``"copy"``) or average them."""

T = TypeVar("T")
