"""Formatting helpers for error messages: ``api: what at 'path': expected X, got Y. Fix.``."""

from __future__ import annotations

from collections.abc import Iterable


_WRAPPER_SEGMENTS = ("module", "_orig_mod")


def short_list(names: Iterable[str], limit: int = 8) -> str:
    """Render a sorted list of names, truncated after ``limit`` entries."""
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def strip_wrapper_prefixes(name: str) -> str:
    """Drop the ``module`` (DDP) and ``_orig_mod`` (torch.compile) segments of a dotted name."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def prefix_hint(missing: set[str], extra: set[str], missing_side: str, extra_side: str) -> str:
    """Explain a key mismatch that only differs by a wrapper prefix, or return ''.

    ``missing`` are names only ``missing_side`` has; ``extra`` are names only ``extra_side``
    has.
    """
    if not missing or not extra:
        return ""
    if {strip_wrapper_prefixes(n) for n in extra} != {strip_wrapper_prefixes(n) for n in missing}:
        return ""
    prefixed = extra_side if any(n != strip_wrapper_prefixes(n) for n in extra) else missing_side
    return (
        f" The names in {prefixed} carry a wrapper prefix ('module.' from DistributedDataParallel"
        " or '_orig_mod.' from torch.compile): take the state from the unwrapped model"
        " (`model.module` for DDP, `model._orig_mod` for torch.compile), or strip the prefix"
        " from the keys."
    )
