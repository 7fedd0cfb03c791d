"""Checks of a loaded EMA state against the current model, before anything is used.

Every missing or unexpected name, shape, dtype or device difference is listed in one error,
and names saved through a DDP or ``torch.compile`` wrapper are mapped to the model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, cast

import optree
from torch import Tensor

from functional_ema._errors import (
    describe,
    short_list,
    strip_wrapper_prefixes,
    wrong_type,
    wrong_value,
)
from functional_ema._state import EmaState, check_counter, check_state_structure
from functional_ema._tree import check_tensor_leaves, leaf_paths


def unwrap_keys(keys: Iterable[str], reference: Iterable[str]) -> dict[str, str]:
    """Map ``keys`` to ``reference`` names, dropping DDP / ``torch.compile`` prefixes.

    A key is renamed only when it is not a reference name itself and removing its
    ``module.`` / ``_orig_mod.`` segments gives the (equally stripped) name of exactly one
    reference name that no other key maps to. Other keys map to themselves, so real mismatches
    are still reported.
    """
    keys, reference = list(keys), list(reference)
    exact = set(reference)
    by_stripped: dict[str, list[str]] = {}
    for name in reference:
        by_stripped.setdefault(strip_wrapper_prefixes(name), []).append(name)
    mapping = {key: key for key in keys}
    claims: dict[str, list[str]] = {}
    for key in keys:
        if key in exact:
            continue
        candidates = by_stripped.get(strip_wrapper_prefixes(key), [])
        if len(candidates) == 1 and candidates[0] not in mapping:
            claims.setdefault(candidates[0], []).append(key)
    for target, sources in claims.items():
        if len(sources) == 1:
            mapping[sources[0]] = target
    return mapping


def _rename(tree: Any, reference: Any) -> Any:
    """``tree`` with wrapper prefixes dropped from its keys when both are flat str dicts."""
    if not (isinstance(tree, dict) and isinstance(reference, dict)):
        return tree
    if not all(isinstance(k, str) for k in (*tree, *reference)) or set(tree) == set(reference):
        return tree
    mapping = unwrap_keys(tree, reference)
    return {mapping[key]: value for key, value in tree.items()}


class Problem(NamedTuple):
    """One difference of a loaded tensor: ``mismatch at 'name': expected ..., got ...``.

    ``of_type`` when the value is not a tensor or only its dtype differs.
    """

    text: str
    of_type: bool


def describe_mismatch(
    missing: Iterable[str], unexpected: Iterable[str], problems: list[Problem]
) -> str:
    """``missing keys [...], unexpected keys [...]; mismatch at ...`` (non-empty parts)."""
    parts = []
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        parts.append(
            f"missing keys {short_list(missing)}, unexpected keys {short_list(unexpected)}"
        )
    parts.extend(problem.text for problem in problems[:8])
    if len(problems) > 8:
        parts.append(f"... ({len(problems) - 8} more mismatches)")
    return "; ".join(parts)


def _spec(tensor: Tensor, device: bool) -> str:
    return f"{tuple(tensor.shape)} {tensor.dtype}" + (f" on {tensor.device}" if device else "")


def tensor_problem(name: str, got: Any, expected: Tensor, *, device: bool = True) -> Problem | None:
    """The :class:`Problem` of ``got`` where ``expected`` is wanted, or ``None``."""
    if not isinstance(got, Tensor):
        return Problem(f"mismatch at {name!r}: expected a tensor, got {describe(got)}", True)
    if got.layout != expected.layout:
        return Problem(
            f"mismatch at {name!r}: expected a {expected.layout} tensor, got a {got.layout} one",
            True,
        )
    show_device = device and got.device != expected.device
    if got.shape != expected.shape or got.dtype != expected.dtype or show_device:
        text = (
            f"mismatch at {name!r}: expected {_spec(expected, show_device)}, got "
            f"{_spec(got, show_device)}"
        )
        return Problem(text, got.shape == expected.shape and not show_device)
    return None


def _mismatch(
    api: str, what: str, path: str, expected: str, got: str, fix: str, *, type_only: bool
) -> TypeError | ValueError:
    """The one error listing every difference: a ``TypeError`` when all are of type or dtype."""
    constructor = wrong_type if type_only else wrong_value
    return constructor(api, what, path, expected, got, fix)


_CHECKPOINT_FIX = "The checkpoint was modified or not saved from an EMA: save the EMA's own state."


def check_step(api: str, step: Any, where: str) -> None:
    """A saved step counter: a 0-dim int64 tensor >= 0 (read on the host: load time only)."""
    check_counter(api, step, where, _CHECKPOINT_FIX)
    if step.device.type != "meta" and int(step) < 0:
        raise wrong_value(
            api,
            "negative counter",
            where,
            "a count >= 0",
            int(step),
            "The checkpoint is corrupted: load an earlier one.",
        )


def check_state(state: Any, like: EmaState) -> EmaState:
    """Check a loaded :class:`EmaState` against the state of the current model.

    ``like`` is what :func:`init` gives for the current model and options (e.g.
    ``fe.init(*fe.module_state(model))``); ``state`` must have the same entries
    (``buffers``, ``zero_debias`` counters), names, shapes, dtypes and devices, and a valid
    step counter. Names saved from a DDP or ``torch.compile`` wrapper (``module.`` /
    ``_orig_mod.`` prefixes) are mapped to the model's. Every difference is listed in one
    error, before anything is used.

    Args:
        state: The loaded state, e.g. ``fe.load(path)``. Not modified.
        like: A state of the current model, e.g. from :func:`init`. Not modified.

    Returns:
        ``state`` with the names of ``like`` (the same tensors, not copies), ready for
        :func:`update`.

    Raises:
        TypeError: If ``state`` is not an :class:`EmaState`, its step counter is not an int64
            tensor, or every difference is of type or dtype (a value that is not a tensor, a
            tensor of another dtype).
        ValueError: Missing or unexpected names, shape or device mismatches (with dtype
            mismatches, if any, in the same message), entries that ``like`` lacks or has, a
            step counter that is not 0-dim, or a negative step.

    Example:
        >>> import os, tempfile, torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(*fe.module_state(model))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fe.save(state, os.path.join(folder, "ema.pt"))
        ...     loaded = fe.load(os.path.join(folder, "ema.pt"))
        >>> resumed = fe.check_state(loaded, like=fe.init(*fe.module_state(model)))
        >>> int(resumed["step"]), sorted(resumed["params"])
        (0, ['bias', 'weight'])
    """
    api = "check_state"
    if isinstance(state, dict) and "nonfinite" in state and "nonfinite_updates" not in state:
        # Saved before the counter was renamed from the policy's name.
        state = {("nonfinite_updates" if k == "nonfinite" else k): v for k, v in state.items()}
    for label, value in (("like", like), ("state", state)):
        if not isinstance(value, dict) or not {"step", "params"} <= set(value):
            raise wrong_type(
                api,
                "not an EmaState",
                label,
                "an EmaState (a dict with 'step' and 'params')",
                f"a dict with keys {short_list(map(str, value))}"
                if isinstance(value, dict)
                else describe(value),
                "Pass the state functional_ema.load read back as `state` and "
                "functional_ema.init(...) of the current model as `like`.",
            )
    check_state_structure(api, like, "like")
    if set(state) != set(like):
        raise wrong_value(
            api,
            "entries",
            "<root>",
            f"{sorted(like)} (as in `like`)",
            sorted(map(str, state)),
            "Build `like` with the options of the saved state (buffers given to init or not, "
            "zero_debias).",
        )
    check_step(api, state["step"], "step")
    out: dict[str, Any] = {"step": state["step"]}
    details: dict[str, str] = {}
    type_only = True
    ref = cast("dict[str, Any]", like)  # indexed by a variable key: a TypedDict wants literals
    for entry in ref:
        if entry == "step":
            continue
        tree = _rename(state[entry], ref[entry])
        out[entry] = tree
        check_tensor_leaves(api, tree, f"state[{entry!r}]")
        have = dict(zip(leaf_paths(tree), optree.tree_leaves(tree), strict=True))
        want = dict(zip(leaf_paths(ref[entry]), optree.tree_leaves(ref[entry]), strict=True))
        missing, unexpected = set(want) - set(have), set(have) - set(want)
        problems = [
            problem
            for name in sorted(set(want) & set(have))
            if (problem := tensor_problem(name, have[name], want[name])) is not None
        ]
        if not (missing or unexpected or problems) and optree.tree_structure(
            tree
        ) != optree.tree_structure(ref[entry]):
            text = (
                f"mismatch of containers: expected {optree.tree_structure(ref[entry])}, got "
                f"{optree.tree_structure(tree)}"
            )
            problems.append(Problem(text, False))
        if missing or unexpected or problems:
            details[entry] = describe_mismatch(missing, unexpected, problems)
            type_only &= not (missing or unexpected) and all(p.of_type for p in problems)
    if details:
        (path, got), *more = details.items()
        if more:
            path, got = "<root>", "; ".join(f"at {e!r}: {d}" for e, d in details.items())
        raise _mismatch(
            api,
            "state does not match the model",
            path,
            "the names, shapes, dtypes and devices of `like`",
            got,
            "Load a state saved from the same model with the same `dtype` (for another device, "
            "functional_ema.load(path, map_location=...)).",
            type_only=type_only,
        )
    return out  # type: ignore[return-value]


def check_state_dict(api: str, state_dict: Any, own: dict[str, Tensor], *, strict: bool) -> Any:
    """Check an ``EMA.state_dict()`` against the adapter's own before anything is written.

    Keys saved through a DDP or ``torch.compile`` wrapper are mapped to ``own``'s (the result
    is then a new dict); every missing or unexpected key (when ``strict``), shape and dtype
    difference is listed in one error: a ``TypeError`` when every difference is of type or
    dtype, else a ``ValueError``. Devices may differ (loading copies).

    Returns:
        ``state_dict`` itself, or a renamed copy.
    """
    if not isinstance(state_dict, dict):
        raise wrong_type(
            api,
            "not a state dict",
            "state_dict",
            "a dict (from EMA.state_dict())",
            describe(state_dict),
            "Pass the object functional_ema.load read back.",
        )
    if set(state_dict) != set(own) and all(isinstance(key, str) for key in state_dict):
        mapping = unwrap_keys(state_dict, own)
        if any(key != new for key, new in mapping.items()):
            state_dict = {mapping[key]: value for key, value in state_dict.items()}
    missing, unexpected = set(own) - set(state_dict), set(state_dict) - set(own)
    if not strict:
        missing = unexpected = set()
    problems = [
        problem
        for key in sorted(set(own) & set(state_dict), key=str)
        if (problem := tensor_problem(key, state_dict[key], own[key], device=False)) is not None
    ]
    problems += [
        Problem(f"mismatch at {key!r}: expected a tensor with data, got a meta tensor", False)
        for key in sorted(set(own) & set(state_dict), key=str)
        if isinstance(state_dict[key], Tensor)
        and state_dict[key].device.type == "meta"
        and own[key].device.type != "meta"
    ]
    if missing or unexpected or problems:
        hint = ""
        if missing and {f"averages.{k}" for k in unexpected} <= missing:
            hint = (
                " The keys look like a model's state_dict: load it into the model, and load "
                "the EMA from ema.state_dict()."
            )
        raise _mismatch(
            api,
            "state dict does not match the EMA",
            "<root>",
            "the keys, shapes and dtypes of the EMA's own state_dict()",
            describe_mismatch(map(str, missing), map(str, unexpected), problems),
            "Load a state saved by an EMA of the same model architecture with the same "
            f"`dtype`.{hint}",
            type_only=not (missing or unexpected) and all(p.of_type for p in problems),
        )
    if "step" in state_dict:
        check_step(api, state_dict["step"], "step")
    return state_dict
