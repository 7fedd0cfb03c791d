"""FSDP2 (``fully_shard``) models: detection, resharding, and where they cannot be used.

Nothing here imports ``torch.distributed``: a process that never imported
``torch.distributed.fsdp`` cannot hold an FSDP2 module, so the checks cost one dictionary
lookup there.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from functional_ema._compat import fsdp_unsharded
from functional_ema._errors import wrong_value


def _fsdp_types() -> tuple[Any, Any]:
    """``(FSDPModule, FullyShardedDataParallel)`` if ``torch.distributed.fsdp`` was imported."""
    module = sys.modules.get("torch.distributed.fsdp")
    if module is None:
        return None, None
    return getattr(module, "FSDPModule", None), getattr(module, "FullyShardedDataParallel", None)


def fsdp_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 (``fully_shard``) modules in ``module``, with their names."""
    kind, _ = _fsdp_types()
    if kind is None:
        return []
    return [(name or "<root>", m) for name, m in module.named_modules() if isinstance(m, kind)]


def check_sharded(api: str, module: nn.Module) -> None:
    """Reject an FSDP2 model that holds gathered (unsharded) parameters, with the fix.

    Where this torch's FSDP2 state is not readable the check passes; the update's DTensor
    check (:func:`localize`) then rejects the gathered parameters with the same fix.
    """
    for name, fsdp_module in fsdp_modules(module):
        if fsdp_unsharded(fsdp_module):
            raise wrong_value(
                api,
                "unsharded FSDP2 parameters",
                name,
                "the sharded DTensor parameters",
                "the gathered full tensors that fully_shard leaves registered after a forward "
                "without backward (e.g. an evaluation under torch.no_grad())",
                "Call model.reshard() first: it frees the gathered copies and communicates "
                "nothing; the next forward gathers again.",
            )


def reshard(module: nn.Module) -> None:
    """Reshard every FSDP2 module of ``module`` (frees gathered copies; no communication)."""
    for _, fsdp_module in fsdp_modules(module):
        fsdp_module.reshard()  # type: ignore[operator]


def reject_fsdp(api: str, module: nn.Module, why: str, fix: str) -> None:
    """Raise for an FSDP2 model where ``api`` cannot work with one."""
    found = fsdp_modules(module)
    if found:
        name, fsdp_module = found[0]
        raise wrong_value(
            api,
            "FSDP2 module",
            name,
            "a module that is not sharded with fully_shard",
            type(fsdp_module).__name__,
            f"{why} {fix}",
        )


def reject_fsdp1(api: str, module: nn.Module) -> None:
    """Raise for an FSDP1 ``FullyShardedDataParallel`` wrapper (flat parameters)."""
    _, fsdp1 = _fsdp_types()
    if fsdp1 is not None and isinstance(module, fsdp1):
        raise wrong_value(
            api,
            "wrapped model",
            "<root>",
            "the model itself",
            "FullyShardedDataParallel, whose parameters are flattened under the "
            "'_fsdp_wrapped_module.' prefix",
            "Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard): its DTensor "
            "parameters keep their names and the EMA keeps them sharded, with no communication "
            "per update.",
        )


APPLY_FIX = (
    "Swap the averages into the sharded parameters in place instead: "
    "`with fe.swapped(model, params, buffers): model(x)` (or, with the adapter, "
    "`with ema.swap(): model(x)` or ema.eval(); ema(x))."
)
"""The fix named when ``functional_call`` is asked to run an FSDP2 module."""

APPLY_WHY = (
    "fully_shard's pre-forward hooks register the module's own gathered parameters, so "
    "torch.func.functional_call would silently evaluate the live weights, not the given ones."
)
