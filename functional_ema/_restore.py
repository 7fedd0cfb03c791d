"""Checks of a loaded EMA state against the current model, before anything is used.

Every missing or unexpected name, shape, dtype or device difference is listed in one error,
and names saved through a DDP or ``torch.compile`` wrapper are mapped to the model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import optree
import torch
from torch import Tensor

from functional_ema._errors import short_list, strip_wrapper_prefixes
from functional_ema._state import EmaState, check_state_structure
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


def describe_mismatch(
    missing: Iterable[str], unexpected: Iterable[str], problems: list[str]
) -> str:
    """``keys do not match: missing [...], unexpected [...]; mismatch at ...`` (non-empty parts)."""
    parts = []
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        parts.append(
            f"keys do not match: missing {short_list(missing)}, unexpected {short_list(unexpected)}"
        )
    parts.extend(problems[:8])
    if len(problems) > 8:
        parts.append(f"... ({len(problems) - 8} more mismatches)")
    return "; ".join(parts)


def _spec(tensor: Tensor, device: bool) -> str:
    return f"{tuple(tensor.shape)} {tensor.dtype}" + (f" on {tensor.device}" if device else "")


def tensor_problem(name: str, got: Any, expected: Tensor, *, device: bool = True) -> str | None:
    """``mismatch at 'name': expected <shape> <dtype>, got ...`` when they differ, else None."""
    if not isinstance(got, Tensor):
        return f"mismatch at {name!r}: expected a tensor, got {type(got).__name__}"
    show_device = device and got.device != expected.device
    if got.shape != expected.shape or got.dtype != expected.dtype or show_device:
        return (
            f"mismatch at {name!r}: expected {_spec(expected, show_device)}, got "
            f"{_spec(got, show_device)}"
        )
    return None


def check_step(api: str, step: Any, where: str) -> None:
    """A saved step counter: a 0-dim int64 tensor >= 0 (read on the host: load time only)."""
    if not isinstance(step, Tensor) or step.ndim != 0 or step.dtype != torch.int64:
        got = (
            f"shape {tuple(step.shape)}, dtype {step.dtype}"
            if isinstance(step, Tensor)
            else type(step).__name__
        )
        raise TypeError(
            f"{api}: step counter at {where!r}: expected a 0-dim int64 tensor, got {got}. The "
            "checkpoint was modified or not saved from an EMA: save the EMA's own state."
        )
    if step.device.type != "meta" and int(step) < 0:
        raise ValueError(
            f"{api}: step counter at {where!r}: expected a count >= 0, got {int(step)}. The "
            "checkpoint is corrupted: load an earlier one."
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
        TypeError: If ``state`` is not an :class:`EmaState` or its step counter is malformed.
        ValueError: Missing or unexpected names, shape, dtype or device mismatches, entries
            that ``like`` lacks or has, or a negative step.

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
            got = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
            raise TypeError(
                f"{api}: `{label}` at '<root>': expected an EmaState (a dict with 'step' and "
                f"'params'), got {got}. Pass the state functional_ema.load read back as `state` "
                "and functional_ema.init(...) of the current model as `like`."
            )
    check_state_structure(api, like)
    if set(state) != set(like):
        raise ValueError(
            f"{api}: entries at '<root>': expected {sorted(like)} (as in `like`), got "
            f"{sorted(state)}. Build `like` with the options of the saved state (buffers given "
            "to init or not, zero_debias)."
        )
    check_step(api, state["step"], "step")
    out: dict[str, Any] = {"step": state["step"]}
    problems_by_entry = []
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
            problems.append(
                f"expected containers {optree.tree_structure(ref[entry])}, got "
                f"{optree.tree_structure(tree)}"
            )
        if missing or unexpected or problems:
            detail = describe_mismatch(missing, unexpected, problems)
            problems_by_entry.append(f"at {entry!r}: {detail}")
    if problems_by_entry:
        raise ValueError(
            f"{api}: state does not match the model {'; '.join(problems_by_entry)}. Load a "
            "state saved from the same model with the same `dtype` (for another device, "
            "functional_ema.load(path, map_location=...))."
        )
    return out  # type: ignore[return-value]


def check_state_dict(api: str, state_dict: Any, own: dict[str, Tensor], *, strict: bool) -> Any:
    """Check an ``EMA.state_dict()`` against the adapter's own before anything is written.

    Keys saved through a DDP or ``torch.compile`` wrapper are mapped to ``own``'s (the result
    is then a new dict); every missing or unexpected key (when ``strict``), shape and dtype
    difference is listed in one ``ValueError``. Devices may differ (loading copies).

    Returns:
        ``state_dict`` itself, or a renamed copy.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"{api}: `state_dict` at '<root>': expected a dict (from EMA.state_dict()), got "
            f"{type(state_dict).__name__}. Pass the object functional_ema.load read back."
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
        f"mismatch at {key!r}: expected a tensor with data, got a meta tensor"
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
        raise ValueError(
            f"{api}: {describe_mismatch(map(str, missing), map(str, unexpected), problems)}. Load "
            f"a state saved by an EMA of the same model architecture with the same `dtype`.{hint}"
        )
    if "step" in state_dict:
        check_step(api, state_dict["step"], "step")
    return state_dict
