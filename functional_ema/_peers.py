"""Checkpoints of the peers' EMAs, converted to the state dict that ``EMA`` loads.

One function, :func:`from_peer`: it reads what ``state_dict()`` of ``AveragedModel``, timm's
``ModelEmaV2`` / ``ModelEmaV3``, torch_ema's ``ExponentialMovingAverage``, ema-pytorch's
``EMA`` or diffusers' ``EMAModel`` returned, names the averages with the model's names, maps
the peer's counter to ``step``, and checks it all before returning new tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor, nn

from functional_ema._errors import (
    check_choice,
    describe,
    short_list,
    wrong_type,
    wrong_value,
)
from functional_ema._module import check_unwrapped
from functional_ema._restore import Problem, describe_mismatch, unwrap_keys


Peer: TypeAlias = Literal["averaged_model", "timm", "torch_ema", "ema_pytorch", "diffusers"]
"""The peers whose checkpoints :func:`from_peer` reads."""

PEERS: tuple[Peer, ...] = ("averaged_model", "timm", "torch_ema", "ema_pytorch", "diffusers")

_API = "from_peer"
_WRAPPERS = ("module", "_orig_mod")  # DDP / DataParallel and torch.compile name segments

_FORMATS = (
    "the state_dict() of AveragedModel ('n_averaged', 'module.*'), timm ModelEmaV2/V3 "
    "('module.*'), torch_ema ('shadow_params', 'num_updates'), ema-pytorch ('ema_model.*', "
    "'step', 'initted') or diffusers EMAModel ('shadow_params', 'optimization_step')"
)
_PASS_IT = (
    "Pass the object the peer's state_dict() returned (as torch.load reads it back), or name "
    "the peer with peer=..."
)


class _Read(NamedTuple):
    """What a peer's checkpoint holds, before it is named and checked."""

    named: dict[str, Any]  # name (the peer's attribute prefix removed) -> tensor
    keys: dict[str, str]  # name -> the peer's own key, for messages
    unnamed: list[Any] | None  # a positional list of averages (torch_ema, diffusers)
    step: int
    holds_buffers: bool


# --- reading each format --------------------------------------------------------------------


def _is_integral(tensor: Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _count(value: object, key: str, peer: str) -> int:
    """A peer's counter (int or one-element integer tensor) as an int >= 0."""
    fix = f"The checkpoint was modified or not saved by {peer!r}: pass its own state_dict()."
    if isinstance(value, Tensor) and value.numel() == 1 and _is_integral(value):
        value = int(value)  # a host read, once, at load time
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(_API, "counter of the wrong type", key, "an integer", describe(value), fix)
    if value < 0:
        raise wrong_value(_API, "negative counter", key, "an integer >= 0", value, fix)
    return value


def _prefixed(state_dict: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The entries under ``prefix`` with it removed, and each new name's original key."""
    named = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    return named, {name: prefix + name for name in named}


def _shadow_params(state_dict: Mapping[str, Any]) -> list[Any]:
    shadow = state_dict["shadow_params"]
    if not isinstance(shadow, list | tuple):
        raise wrong_type(
            _API,
            "averages of the wrong type",
            "shadow_params",
            "a list of tensors",
            describe(shadow),
            "Pass the peer's own state_dict().",
        )
    return list(shadow)


def _read(peer: Peer, state_dict: Mapping[str, Any]) -> _Read:
    """Split a checkpoint of ``peer`` into averages and counter (``peer`` already checked)."""
    if peer == "averaged_model":
        named, keys = _prefixed(state_dict, "module.")
        # n_averaged counts update_parameters() calls, the first of which copies the model.
        n_averaged = _count(state_dict["n_averaged"], "n_averaged", peer)
        return _Read(named, keys, None, max(n_averaged - 1, 0), True)
    if peer == "timm":
        if all(key.startswith("module.") for key in state_dict):
            named, keys = _prefixed(state_dict, "module.")
        else:  # timm's train.py saves the unwrapped EMA model: checkpoint["state_dict_ema"]
            named, keys = dict(state_dict), {key: key for key in state_dict}
        return _Read(named, keys, None, 0, True)
    if peer == "ema_pytorch":
        named, keys = _prefixed(state_dict, "ema_model.")
        return _Read(named, keys, None, _count(state_dict["step"], "step", peer), True)
    if peer == "torch_ema":
        updates = state_dict["num_updates"]  # None with use_num_updates=False: no count kept
        step = 0 if updates is None else _count(updates, "num_updates", peer)
        return _Read({}, {}, _shadow_params(state_dict), step, False)
    step = _count(state_dict["optimization_step"], "optimization_step", peer)
    return _Read({}, {}, _shadow_params(state_dict), step, False)  # diffusers


_NEEDS: dict[Peer, tuple[tuple[str, ...], str]] = {
    # peer: (keys it always has, a prefix its averages have or "")
    "averaged_model": (("n_averaged",), "module."),
    "timm": ((), ""),
    "torch_ema": (("shadow_params", "num_updates"), ""),
    "ema_pytorch": (("step",), "ema_model."),
    "diffusers": (("shadow_params", "optimization_step"), ""),
}


def _check_fits(peer: Peer, state_dict: Mapping[str, Any]) -> None:
    """Raise unless ``state_dict`` has the keys of ``peer``'s format (and no other peer's)."""
    known = _known(state_dict)
    if known is not None and known != peer:
        raise wrong_value(
            _API,
            f"a checkpoint of another peer than {peer!r}",
            "state_dict",
            f"a {peer!r} checkpoint",
            f"a {known!r} one (keys {short_list(map(str, state_dict))})",
            f"Pass peer={known!r}, or leave `peer` None to detect the format.",
        )
    needed, prefix = _NEEDS[peer]
    missing = [key for key in needed if key not in state_dict]
    if prefix and not any(key.startswith(prefix) for key in state_dict):
        missing.append(prefix + "*")
    if peer == "timm" and not (
        state_dict and all(isinstance(v, Tensor) for v in state_dict.values())
    ):
        missing.append("only tensors")
    if missing:
        wanted = [*needed, prefix + "*"] if prefix else list(needed) or ["only tensors"]
        raise wrong_value(
            _API,
            f"not a {peer!r} checkpoint",
            "state_dict",
            f"a dict with {short_list(wanted)}",
            f"a dict with keys {short_list(map(str, state_dict))} (lacking {short_list(missing)})",
            "Check `peer`, or leave it None to detect the format.",
        )


def _known(state_dict: Mapping[str, Any]) -> Peer | None:
    """The peer whose ``state_dict()`` has these keys, or ``None``."""
    keys = set(state_dict)
    if {"step", "nonfinite_updates"} <= keys and any(k.startswith("averages.") for k in keys):
        raise wrong_value(
            _API,
            "already a functional_ema checkpoint",
            "state_dict",
            "a peer's checkpoint",
            "EMA.state_dict() keys ('step', 'nonfinite_updates', 'averages.*')",
            "Load it directly: ema.load_state_dict(state_dict).",
        )
    if "shadow_params" in keys and "optimization_step" in keys:
        return "diffusers"
    if "shadow_params" in keys and "num_updates" in keys:
        return "torch_ema"
    if "n_averaged" in keys and any(k.startswith("module.") for k in keys):
        return "averaged_model"
    if "step" in keys and "initted" in keys and any(k.startswith("ema_model.") for k in keys):
        return "ema_pytorch"
    if keys and all(
        k.startswith("module.") and isinstance(v, Tensor) for k, v in state_dict.items()
    ):
        return "timm"
    return None


def _detect(state_dict: Mapping[str, Any]) -> Peer:
    """The peer whose ``state_dict()`` has these keys; raise if none."""
    peer = _known(state_dict)
    if peer is not None:
        return peer
    keys = set(state_dict)
    hint = ""
    if "state_dict_ema" in keys:
        hint = (
            " This looks like a timm training checkpoint: pass checkpoint['state_dict_ema'] "
            "with peer='timm'."
        )
    elif keys and all(isinstance(v, Tensor) for v in state_dict.values()):
        hint = (
            " A plain model state dict (such as timm's checkpoint['state_dict_ema']) needs "
            "peer='timm'; a model's own weights load into the model, not the EMA."
        )
    raise wrong_value(
        _API,
        "unrecognised checkpoint",
        "state_dict",
        _FORMATS,
        f"a dict with keys {short_list(map(str, keys))}",
        _PASS_IT + hint,
    )


# --- naming and checking against the model ----------------------------------------------------


def _strip_leading(name: str) -> str:
    """``name`` without leading ``module.`` / ``_orig_mod.`` segments (DDP, torch.compile)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return ".".join(parts)


def _unwrapped(
    named: dict[str, Any], keys: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Drop leading wrapper prefixes from the names, unless two names would then collide."""
    stripped = {name: _strip_leading(name) for name in named}
    if len(set(stripped.values())) < len(stripped):
        return named, keys
    return (
        {stripped[name]: value for name, value in named.items()},
        {stripped[name]: keys[name] for name in named},
    )


def _shape_problem(name: str, got: Any, want: Tensor) -> Problem | None:
    if not isinstance(got, Tensor):
        return Problem(f"mismatch at {name!r}: expected a tensor, got {describe(got)}", True)
    if got.shape != want.shape:
        return Problem(
            f"mismatch at {name!r}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}",
            False,
        )
    return None


def _mismatch_error(got: str, fix: str) -> ValueError:
    return wrong_value(
        _API,
        "checkpoint does not match the model",
        "<root>",
        "the names and shapes of `model`'s parameters and buffers",
        got,
        fix,
    )


class _Layout(NamedTuple):
    """The model's names: every parameter, the trainable ones, buffers, and tied aliases."""

    params: dict[str, Tensor]
    trainable: list[str]
    buffers: dict[str, Tensor]
    persistent: set[str]
    aliases: set[str]


def _layout(model: nn.Module) -> _Layout:
    params: dict[str, Tensor] = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    every |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return _Layout(
        params,
        [name for name, p in params.items() if p.requires_grad],
        buffers,
        set(model.state_dict(keep_vars=True)),
        every - set(params) - set(buffers),
    )


def _name_list(unnamed: list[Any], layout: _Layout) -> dict[str, Any]:
    """Name a positional list of averages: ``model.parameters()``, or its trainable ones."""
    names = list(layout.params)
    if len(unnamed) != len(names) and len(unnamed) == len(layout.trainable):
        names = layout.trainable
    if len(unnamed) != len(names):
        counts = f"{len(layout.params)} (model.parameters())"
        if len(layout.trainable) != len(layout.params):
            counts += f" or {len(layout.trainable)} (the trainable ones)"
        raise wrong_value(
            _API,
            "a list of averages of another length",
            "shadow_params",
            counts,
            f"{len(unnamed)} tensors",
            "Pass the model whose parameters (or trainable parameters, in their order) the "
            "peer was created with.",
        )
    problems = [
        problem
        for index, (name, value) in enumerate(zip(names, unnamed, strict=True))
        if (
            problem := _shape_problem(
                f"shadow_params[{index}] ({name})", value, layout.params[name]
            )
        )
        is not None
    ]
    if problems:
        raise _mismatch_error(
            describe_mismatch((), (), problems),
            "Pass the model the peer was created with (the list follows model.parameters()).",
        )
    return dict(zip(names, unnamed, strict=True))


def _name_dict(named: dict[str, Any], keys: dict[str, str], layout: _Layout) -> dict[str, Any]:
    """Map names to the model's (wrapper prefixes, tied aliases) and check them."""
    mapping = unwrap_keys(named, [*layout.params, *layout.buffers, *layout.aliases])
    renamed = {mapping[name]: value for name, value in named.items()}
    original = {mapping[name]: keys[name] for name in named}
    renamed = {name: value for name, value in renamed.items() if name not in layout.aliases}
    reference = {**layout.params, **layout.buffers}
    required = set(layout.params) | (set(layout.buffers) & layout.persistent)
    missing = required - set(renamed)
    unexpected = {original[name] for name in set(renamed) - set(reference)}
    problems = [
        problem
        for name in sorted(set(renamed) & set(reference))
        if (problem := _shape_problem(original[name], renamed[name], reference[name])) is not None
    ]
    if missing or unexpected or problems:
        raise _mismatch_error(
            describe_mismatch(missing, unexpected, problems),
            "Pass the model the peer averaged (the same architecture), unwrapped.",
        )
    return renamed


def _check_tensors(named: Mapping[Any, Any], keys: Mapping[Any, str]) -> None:
    """Raise for the first value that is not a tensor, naming the peer's key."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise wrong_type(
                _API,
                "not a tensor",
                keys.get(name, name),
                "a tensor",
                describe(value),
                "Pass the peer's own state_dict().",
            )


# --- the public function ---------------------------------------------------------------------


def from_peer(
    state_dict: Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    peer: Peer | None = None,
    step: int | None = None,
) -> dict[str, Tensor]:
    r"""Convert a peer EMA's checkpoint into a state dict for :meth:`EMA.load_state_dict`.

    Reads what the peer's ``state_dict()`` returned (as ``torch.load`` reads it back) and
    returns ``{"step", "nonfinite_updates", "averages.<name>"...}`` with the model's names.
    Every tensor is a new copy: the input is neither modified nor shared. Wrapper prefixes
    (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) are dropped from the names.

    The peer is recognised by its keys, or named with ``peer``:

    ==================  ========================================  =============================
    ``peer``            ``state_dict()`` of                       keys
    ==================  ========================================  =============================
    ``averaged_model``  ``torch.optim.swa_utils.AveragedModel``   ``n_averaged``, ``module.*``
    ``timm``            timm ``ModelEmaV3`` / ``ModelEmaV2``      ``module.*`` only
    ``torch_ema``       ``torch_ema.ExponentialMovingAverage``    ``shadow_params`` (a list),
                                                                  ``num_updates``
    ``ema_pytorch``     ``ema_pytorch.EMA``                       ``ema_model.*``, ``step``,
                                                                  ``initted``
    ``diffusers``       ``diffusers.training_utils.EMAModel``     ``shadow_params`` (a list),
                                                                  ``optimization_step``
    ==================  ========================================  =============================

    With ``peer="timm"`` a plain model state dict is read too: timm's ``train.py`` saves the
    unwrapped EMA model as ``checkpoint["state_dict_ema"]``.

    ``step`` is the value ``ema.step`` would have if the run had used the equivalent from the
    migration guide (``docs/migration.md``) from the start, so a schedule goes on where the
    peer's left off:

    ==================  ==============================================  =====================
    peer                its counter                                     ``step``
    ==================  ==============================================  =====================
    ``averaged_model``  ``n_averaged``: ``update_parameters`` calls;    ``n_averaged - 1``
                        the first copies (the guide creates the EMA     (0 if 0)
                        there)
    ``timm``            none (the step is an argument of ``update``)    the ``step`` argument
                                                                        (0 if not given)
    ``torch_ema``       ``num_updates``: ``update`` calls (``None``     ``num_updates``
                        with ``use_num_updates=False``)                 (0 if ``None``)
    ``ema_pytorch``     ``step``: ``update`` calls; the first copies    ``step``
                        (``initted``); ``update_every`` skips count
    ``diffusers``       ``optimization_step``: ``step`` calls; the      ``optimization_step``
                        first copies (its decay is 0)
    ==================  ==============================================  =====================

    ``nonfinite_updates`` is 0 (the peers do not count them). What the peers hold besides
    the trainable parameters is fine: frozen parameters (``EMA.load_state_dict`` ignores
    them) and buffers, as the peer left them. AveragedModel (``use_buffers=True``) and timm
    average floating buffers (load into ``fe.EMA(..., buffer_policy="average")`` to go on
    averaging them; with ``"copy"`` the next update replaces them); AveragedModel
    (``use_buffers=True``) and timm V2 truncate a float average of integer buffers and
    ema-pytorch never updates them (``num_batches_tracked`` falls behind: the next update
    copies the model's). torch_ema and diffusers hold no buffers: the model's
    current ones are copied, as their averaged model uses the live ones; so are non-persistent
    buffers, which no ``state_dict()`` holds.

    Args:
        state_dict: The peer's checkpoint. Not modified.
        model: The model the peer averaged (not a DDP or ``torch.compile`` wrapper). Needed
            by torch_ema and diffusers, whose averages are an unnamed list in the order of
            ``model.parameters()`` (or of its trainable ones: the length tells which);
            otherwise optional: when given, names and shapes are checked against it, tied
            aliases dropped and non-persistent buffers added, so the result loads with
            ``strict=True``. Dtypes are the peer's, not checked.
        peer: One of ``"averaged_model"``, ``"timm"``, ``"torch_ema"``, ``"ema_pytorch"``,
            ``"diffusers"``; ``None`` recognises it from the keys.
        step: The step to record, an int >= 0, instead of the peer's counter (for timm,
            which keeps none: the ``step`` last given to ``update(model, step=...)``).

    Returns:
        A new ``dict[str, Tensor]`` for :meth:`EMA.load_state_dict`: ``"step"`` and
        ``"nonfinite_updates"`` (0-dim int64) and ``"averages.<name>"`` for each average and
        buffer, copies on the peer's devices.

    Raises:
        TypeError: ``state_dict`` is not a dict, ``model`` is not a module (or is missing for
            torch_ema and diffusers), ``step`` or a counter is not an integer, or a value is
            not a tensor.
        ValueError: An unrecognised checkpoint (or one that is not of the named ``peer``), a
            wrapped ``model``, a list of averages whose length is neither that of
            ``model.parameters()`` nor of the trainable ones, names or shapes that differ
            from ``model``'s (all listed in one message), or a negative counter.

    Example:
        >>> import io, torch, functional_ema as fe
        >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        >>> model = torch.nn.Linear(2, 1)
        >>> peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        >>> for _ in range(3):
        ...     peer.update_parameters(model)  # the first copies
        >>> buffer = io.BytesIO()
        >>> torch.save(peer.state_dict(), buffer)
        >>> _ = buffer.seek(0)
        >>> state_dict = fe.from_peer(torch.load(buffer, weights_only=True), model)
        >>> sorted(state_dict), int(state_dict["step"])
        (['averages.bias', 'averages.weight', 'nonfinite_updates', 'step'], 2)
        >>> ema = fe.EMA(model, 0.9)
        >>> ema.load_state_dict(state_dict)
        <All keys matched successfully>
        >>> torch.equal(ema.state()["params"]["weight"], peer.module.weight)
        True
    """
    if not isinstance(state_dict, Mapping):
        raise wrong_type(
            _API,
            "not a checkpoint",
            "state_dict",
            "a dict (what the peer's state_dict() returned)",
            describe(state_dict),
            _PASS_IT,
        )
    if not all(isinstance(key, str) for key in state_dict):
        raise wrong_value(
            _API,
            "unrecognised checkpoint",
            "state_dict",
            _FORMATS,
            f"a dict with non-string keys {short_list(map(repr, state_dict))}",
            _PASS_IT,
        )
    if peer is None:
        peer = _detect(state_dict)
    else:
        check_choice(_API, "peer", peer, PEERS, "Leave `peer` None to detect the format.")
        _check_fits(peer, state_dict)
    if model is not None:
        check_unwrapped(_API, model, "model")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise wrong_type(
            _API, "step of the wrong type", "step", "an int >= 0", describe(step), "Pass an int."
        )
    if step is not None and step < 0:
        raise wrong_value(_API, "negative step", "step", "an int >= 0", step, "Pass an int >= 0.")
    read = _read(peer, state_dict)
    layout = None if model is None else _layout(model)
    if read.unnamed is not None:
        if layout is None:
            raise wrong_type(
                _API,
                "unnamed averages",
                "model",
                "the model whose parameters the peer averaged",
                "None",
                f"A {peer} checkpoint keeps its averages as a list in the order of "
                "model.parameters(): pass the model to name them, fe.from_peer(state_dict, "
                "model).",
            )
        _check_tensors(
            dict(enumerate(read.unnamed)),
            {i: f"shadow_params[{i}]" for i in range(len(read.unnamed))},
        )
        named = _name_list(read.unnamed, layout)
        keys = {name: f"shadow_params[{index}]" for index, name in enumerate(named)}
    else:
        named, keys = read.named, read.keys
        _check_tensors(named, keys)
    if layout is not None and read.unnamed is None:
        named = _name_dict(named, keys, layout)
    elif layout is None:
        named, keys = _unwrapped(named, keys)
    if layout is not None:  # buffers the peer does not hold: the model's own
        missing = [
            name
            for name in layout.buffers
            if name not in named and (not read.holds_buffers or name not in layout.persistent)
        ]
        named.update({name: layout.buffers[name] for name in missing})
        order = [*layout.params, *layout.buffers]
        named = {name: named[name] for name in order if name in named}
    count = read.step if step is None else step
    out: dict[str, Tensor] = {
        "step": torch.tensor(count, dtype=torch.int64),
        "nonfinite_updates": torch.zeros((), dtype=torch.int64),
    }
    with torch.no_grad():
        out.update({f"averages.{name}": value.detach().clone() for name, value in named.items()})
    return out
