"""Pytree validation: structure, leaf types, shapes, devices and dtypes, with leaf paths."""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import repeat
from typing import Any

import optree
import torch
from optree import PyTreeSpec
from torch import Tensor

from functional_ema._arith import is_inexact
from functional_ema._errors import describe, prefix_hint, short_list, wrong_type, wrong_value


def leaf_paths(tree: Any) -> list[str]:
    """Dotted paths of the leaves of ``tree``, in optree's leaf order.

    Dict keys, sequence indices and namedtuple field names are joined with ``.``, so a dict
    keyed by module names gives back those names (``'0.weight'``).
    """
    accessors, _, _ = optree.tree_flatten_with_accessor(tree)
    paths = []
    for accessor in accessors:
        parts = []
        for entry in accessor:
            field = getattr(entry, "field", None)
            parts.append(field if isinstance(field, str) else str(entry.entry))
        paths.append(".".join(parts) or "<root>")
    return paths


def check_tensor_leaves(api: str, tree: Any, name: str) -> tuple[list[Tensor], PyTreeSpec]:
    """Flatten ``tree`` and check every leaf is a tensor; return leaves and treespec."""
    leaves, spec = optree.tree_flatten(tree)
    if not torch.compiler.is_compiling() and all(map(isinstance, leaves, repeat(Tensor))):
        return leaves, spec  # one pass in C: the common case
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise wrong_type(
                api,
                f"non-tensor leaf in `{name}`",
                leaf_paths(tree)[index],
                "a torch.Tensor",
                describe(leaf),
                "Keep only tensors in the tree: convert the value with torch.as_tensor(...) or "
                "move it out of the tree.",
            )
    return leaves, spec


def check_dense_leaves(api: str, tree: Any, name: str, *, meta: bool = True) -> None:
    """Reject sparse (or other non-strided) leaves, and meta ones unless ``meta``.

    Meta tensors (no data) make sense for shape tracing of the functional API, not for an
    EMA of a live model.
    """
    leaves = optree.tree_leaves(tree)
    for index, leaf in enumerate(leaves):
        if leaf.layout != torch.strided:
            raise wrong_type(
                api,
                f"{leaf.layout} tensor in `{name}`",
                leaf_paths(tree)[index],
                "a dense (strided) tensor",
                describe(leaf),
                "Averages are dense: keep the parameter dense (e.g. nn.Embedding(sparse=False) "
                "keeps dense weights; only its gradients are sparse), or call .to_dense().",
            )
        if not meta and leaf.device.type == "meta":
            raise wrong_value(
                api,
                "meta tensor (no data)",
                leaf_paths(tree)[index],
                "a tensor with data",
                f"{describe(leaf)} on the meta device",
                "Materialise the model first: model.to_empty(device=...) and load its weights, "
                "then create the EMA.",
            )


def _structure_error(api: str, first: Any, second: Any, names: tuple[str, str]) -> ValueError:
    first_paths, second_paths = set(leaf_paths(first)), set(leaf_paths(second))
    missing, extra = first_paths - second_paths, second_paths - first_paths
    if missing or extra:
        expected = f"the leaf paths of `{names[0]}`"
        got = (
            f"missing in `{names[1]}`: {short_list(missing)}, extra in `{names[1]}`: "
            f"{short_list(extra)}"
        )
    else:
        expected = f"{optree.tree_structure(first)} (`{names[0]}`)"
        got = (
            f"{optree.tree_structure(second)} (`{names[1]}`: same leaf paths, different "
            "container types)"
        )
    hint = prefix_hint(missing, extra, f"`{names[0]}`", f"`{names[1]}`")
    return wrong_value(
        api,
        "tree structure mismatch",
        "<root>",
        expected,
        got,
        f"Pass `{names[1]}` with exactly the structure of `{names[0]}` (for a module, both from "
        f"functional_ema.module_state of the same model).{hint}",
    )


def _leaf_problem(
    shadow: Tensor, value: Tensor, names: tuple[str, str], bank: int | None
) -> tuple[Callable[..., Exception], str, object, object, str] | None:
    """Why ``value`` cannot update ``shadow``: ``(constructor, what, expected, got, fix)``.

    ``constructor`` is :func:`wrong_type` or :func:`wrong_value`; ``None`` when it can.

    With ``bank=K``, ``shadow`` holds K averages stacked on a leading dimension.
    """
    if bank is not None and (shadow.ndim == 0 or shadow.shape[0] != bank):
        return (
            wrong_value,
            "bank size mismatch",
            f"a leading dimension of {bank} (one row per decay)",
            f"shape {tuple(shadow.shape)}",
            "Create the bank with functional_ema.bank(params, len(decays)).",
        )
    shadow_shape = shadow.shape if bank is None else shadow.shape[1:]
    if value.shape != shadow_shape:
        return (
            wrong_value,
            "shape mismatch",
            tuple(shadow_shape),
            tuple(value.shape),
            "Shapes must match exactly (no broadcasting): did the model change since the EMA "
            "was created?",
        )
    if value.device != shadow.device:
        return (
            wrong_value,
            "device mismatch",
            shadow.device,
            value.device,
            "The EMA never moves tensors implicitly: move one side explicitly, e.g. "
            f"optree.tree_map(lambda t: t.to('{shadow.device}'), {names[1]}).",
        )
    if is_inexact(shadow):
        if not is_inexact(value) or (value.is_complex() and not shadow.is_complex()):
            return (
                wrong_type,
                "dtype mismatch",
                f"a floating dtype like {shadow.dtype}",
                value.dtype,
                "Floating leaves are averaged from floating values only: pass the tensor this "
                "average tracks.",
            )
    elif value.dtype != shadow.dtype:
        return (
            wrong_type,
            "dtype mismatch",
            shadow.dtype,
            value.dtype,
            "Non-floating leaves (e.g. num_batches_tracked) are copied, never converted: pass a "
            "tensor of the same dtype.",
        )
    return None


_SHAPE = operator.attrgetter("shape")
_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")


def _alike(first: list[Tensor], second: list[Tensor]) -> bool:
    """Whether the leaves have equal shapes, devices and dtypes, pair by pair.

    Three passes in C (list comparisons), no Python per leaf: the common case of a
    per-call check. Equal dtypes can always update each other; anything else is checked
    leaf by leaf by :func:`_leaf_problem` (as under ``torch.compile``, which traces that).
    """
    if torch.compiler.is_compiling():
        return False
    return (
        list(map(_SHAPE, first)) == list(map(_SHAPE, second))
        and list(map(_DEVICE, first)) == list(map(_DEVICE, second))
        and list(map(_DTYPE, first)) == list(map(_DTYPE, second))
    )


def check_pair(
    api: str,
    shadow: Any,
    params: Any,
    names: tuple[str, str] = ("shadow", "params"),
    *,
    bank: int | None = None,
) -> tuple[list[Tensor], list[Tensor], PyTreeSpec]:
    """Check that ``params`` can update ``shadow`` leaf by leaf, before anything is mutated.

    With ``bank=K`` every leaf of ``shadow`` is K averages stacked on a leading dimension.

    Returns:
        The leaves of ``shadow``, the matching leaves of ``params`` and ``shadow``'s treespec.

    Raises:
        ValueError: different structure (listing missing and extra paths), shape or device.
        TypeError: a non-tensor leaf, or a dtype that cannot be averaged or copied.
    """
    shadow_leaves, shadow_spec = check_tensor_leaves(api, shadow, names[0])
    params_leaves, params_spec = check_tensor_leaves(api, params, names[1])
    if shadow_spec != params_spec:
        raise _structure_error(api, shadow, params, names)
    if bank is None and _alike(shadow_leaves, params_leaves):
        return shadow_leaves, params_leaves, shadow_spec
    for index, (s, p) in enumerate(zip(shadow_leaves, params_leaves, strict=True)):
        problem = _leaf_problem(s, p, names, bank)
        if problem is not None:
            constructor, what, expected, got, fix = problem
            raise constructor(
                api,
                what,
                leaf_paths(shadow)[index],
                f"{expected} ({names[0]})",
                f"{got} ({names[1]})",
                fix,
            )
    return shadow_leaves, params_leaves, shadow_spec


def check_floating_dtype(api: str, dtype: torch.dtype | None) -> None:
    """Check an optional shadow dtype is a floating dtype."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise wrong_type(
            api,
            "not a floating dtype",
            "dtype",
            "a floating torch.dtype or None",
            repr(dtype) if isinstance(dtype, torch.dtype) else describe(dtype),
            "Pass e.g. dtype=torch.float32 to keep a float32 average of a bfloat16 model.",
        )
