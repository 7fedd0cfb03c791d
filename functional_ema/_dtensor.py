"""DTensor leaves: averages updated on their local shards, with no communication.

A DTensor average is paired with a DTensor value of the same mesh and placements, and the
update runs on their local shards (``to_local()``): the arithmetic is elementwise, so each
rank's shard of the average is exactly the shard of the unsharded average. Nothing here
imports ``torch.distributed``: a process that never imported ``torch.distributed.tensor``
cannot hold a DTensor, so the checks cost one dictionary lookup there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from functional_ema._compat import tensor_check, tensor_layout
from functional_ema._engine import pack as _pack_plain
from functional_ema._errors import describe, wrong_value
from functional_ema._tree import leaf_paths


def dtensor_type() -> Any:
    """The DTensor class, if ``torch.distributed.tensor`` was imported (else none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (no communication); any other tensor itself."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.to_local()
    return tensor


def data_ptrs(tensors: Sequence[Tensor]) -> list[int]:
    """Data pointers of ``tensors``, of the local shard for a DTensor (whose own is 0)."""
    pointers = list(map(Tensor.data_ptr, tensors))
    dtensor = dtensor_type()
    if dtensor is None or 0 not in pointers:
        return pointers
    return [local_tensor(t).data_ptr() for t in tensors]


class TensorRecord:
    """What some tensors were when a plan was made from them: data pointers and metadata.

    :meth:`holds` tells whether tensors (the same ones, or others passed in their place)
    now have the recorded data pointers (of the local shard for a DTensor), dtype, device,
    shape, strides and type: Dynamo's C++ check first, then, where it fails, the layouts
    without ``requires_grad``. A change of ``requires_grad`` alone (a GAN freezing a network
    each step) or of the thread's dispatch state (a ``TorchDispatchMode``) fails the C++
    check but not the layouts: the check is made again and the record holds.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.pointers = data_ptrs(tensors)
        self.layouts = list(map(tensor_layout, tensors))
        self.check = tensor_check(tensors)

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (in the recorded order) have the recorded pointers and layouts."""
        if data_ptrs(tensors) != self.pointers:
            return False
        if self.check(tensors):
            return True
        if list(map(tensor_layout, tensors)) != self.layouts:
            return False
        self.check = tensor_check(tensors)
        return True


def wrap_as_dtensor(local: Tensor, template: Any) -> Tensor:
    """Wrap a local shard as a DTensor sharded like ``template`` (no communication)."""
    return type(template).from_local(
        local,
        template.device_mesh,
        template.placements,
        run_check=False,
        shape=template.shape,
        stride=template.stride(),
    )


def rewrap(templates: list[Any] | None, leaves: list[Tensor]) -> list[Tensor]:
    """Wrap the local results of a pure update back into DTensors, where ``templates`` has one."""
    if templates is None:
        return leaves
    return [
        t if template is None else wrap_as_dtensor(t, template)
        for t, template in zip(leaves, templates, strict=True)
    ]


def local_leaves(leaves: list[Tensor]) -> list[Tensor]:
    """The local shards of ``leaves`` (other tensors unchanged)."""
    if dtensor_type() is None:
        return leaves
    return [local_tensor(t) for t in leaves]


_UNSHARDED_FIX = (
    "An FSDP2 (fully_shard) module holds plain, gathered parameters after a forward without "
    "backward (e.g. an evaluation under torch.no_grad()): call model.reshard() first (no "
    "communication). Otherwise create the EMA from the parameters you update it with."
)


def localize(
    api: str,
    tree: Any,
    shadow: list[Tensor],
    values: list[Tensor],
    names: tuple[str, str],
) -> tuple[list[Tensor], list[Tensor], list[Any] | None]:
    """Map validated ``(shadow, value)`` DTensor pairs to their local shards.

    Each DTensor average must meet a DTensor value with the same device mesh and placements;
    the update then runs on the local shards, shard-local, with no collective (the masked
    path's ``.all()`` on a DTensor would be one). Plain pairs pass through unchanged.

    Returns:
        The shadow leaves, the value leaves (local shards where they were DTensors) and, when
        any leaf was a DTensor, the list of original shadow DTensors (``None`` elsewhere) for
        :func:`rewrap`; ``None`` when there were none.

    Raises:
        ValueError: A DTensor met a plain tensor, or meshes or placements differ.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return shadow, values, None
    templates: list[Any] | None = None
    out_shadow, out_values = list(shadow), list(values)
    pairs: list[tuple[Any, Any]] = list(zip(shadow, values, strict=True))  # DTensors or not
    for index, (s, v) in enumerate(pairs):
        s_sharded, v_sharded = isinstance(s, dtensor), isinstance(v, dtensor)
        if not (s_sharded or v_sharded):
            continue
        problem = None
        if not s_sharded:
            problem = (
                "sharding mismatch",
                "Create the EMA from the sharded parameters (fe.init / fe.EMA after "
                "fully_shard) so that the averages are sharded like them.",
            )
        elif not v_sharded:
            problem = ("sharding mismatch", _UNSHARDED_FIX)
        elif s.device_mesh != v.device_mesh or tuple(s.placements) != tuple(v.placements):
            problem = (
                "placement mismatch",
                "The update is shard-local (no communication), so both sides must be sharded "
                "alike: create the EMA from these parameters, or redistribute one side "
                "explicitly (dtensor.redistribute(mesh, placements)).",
            )
        elif any(p.is_partial() for p in s.placements):
            problem = (
                "partial placement",
                "Averages are kept sharded or replicated, not as pending sums: redistribute "
                "to Shard or Replicate placements first.",
            )
        if problem is not None:
            what, fix = problem
            raise wrong_value(
                api,
                what,
                leaf_paths(tree)[index],
                f"{describe(s)} ({names[0]})",
                f"{describe(v)} ({names[1]})",
                fix,
            )
        local_s, local_v = s.to_local(), v.to_local()
        if local_s.shape != local_v.shape:
            raise wrong_value(
                api,
                "local shard mismatch",
                leaf_paths(tree)[index],
                f"shape {tuple(local_s.shape)} ({names[0]})",
                f"{tuple(local_v.shape)} ({names[1]})",
                "Both sides must be sharded alike: create the EMA from these parameters.",
            )
        if templates is None:
            templates = [None] * len(shadow)
        templates[index] = s
        out_shadow[index], out_values[index] = local_s, local_v
    return out_shadow, out_values, templates


def pack(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """:func:`functional_ema._engine.pack` that keeps DTensors sharded.

    The local shards are laid out back to back (so the engine updates them as one region)
    and wrapped again as DTensors with the original mesh, placements, shape and stride.
    """
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return _pack_plain(tensors, dtype)
    packed = _pack_plain([local_tensor(t.detach()) for t in tensors], dtype)
    return [
        wrap_as_dtensor(view, t) if isinstance(t, dtensor) else view
        for view, t in zip(packed, tensors, strict=True)
    ]
