"""Error messages as code: ``api: what at 'path': expected X, got Y. Fix.``.

Every error the package raises for bad input is built here: :func:`wrong_type` (a
``TypeError``: the value has the wrong type or dtype) and :func:`wrong_value` (a
``ValueError``: the right type with a wrong value, shape or structure), with :func:`describe`
for the "got" part, :func:`check_choice` for options given as strings, and the helpers that
list names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor


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


def message(api: str, what: str, path: str, expected: object, got: object, fix: str) -> str:
    """The one error format: ``api: what at 'path': expected X, got Y. Fix.``.

    ``path`` is a leaf path (``'0.weight'``), an argument (``'decay'``) or ``'<root>'``.
    """
    return f"{api}: {what} at {path!r}: expected {expected}, got {got}. {fix}"


def wrong_type(
    api: str, what: str, path: str, expected: object, got: object, fix: str
) -> TypeError:
    """A :func:`message` as ``TypeError``: the value has the wrong type (or dtype)."""
    return TypeError(message(api, what, path, expected, got, fix))


def wrong_value(
    api: str, what: str, path: str, expected: object, got: object, fix: str
) -> ValueError:
    """A :func:`message` as ``ValueError``: right type, wrong value, shape or structure."""
    return ValueError(message(api, what, path, expected, got, fix))


def describe(value: object) -> str:
    """A short description of ``value`` for the "got" part of a message.

    Tensors by shape and dtype (DTensors by their placements and mesh), other values by type
    and a repr cut to 40 characters.
    """
    if isinstance(value, Tensor):
        placements = getattr(value, "placements", None)
        if placements is not None and hasattr(value, "device_mesh"):
            return f"a DTensor with placements {tuple(placements)} on {value.device_mesh}"
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} ({text})"


def check_choice(api: str, path: str, value: object, choices: Sequence[str], fix: str) -> None:
    """Check an option given as one of a few strings (``nonfinite``, ``buffer_policy``).

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: ``value`` is a string but not one of ``choices``.
    """
    names = [repr(choice) for choice in choices]
    expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if not isinstance(value, str):
        raise wrong_type(api, "option of the wrong type", path, expected, describe(value), fix)
    if value not in choices:
        raise wrong_value(api, "unknown option", path, expected, repr(value), fix)
