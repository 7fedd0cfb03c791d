"""``EMA``: a stateful ``nn.Module`` adapter over the functional core, for classic scripts."""

from __future__ import annotations

import copy
import fnmatch
import threading
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from functional_ema._arith import is_inexact
from functional_ema._core import check_policy, raise_if_nonfinite
from functional_ema._decay import check_decay, check_interval, resolve_decay
from functional_ema._engine import flat_view, pack
from functional_ema._errors import (
    describe,
    message,
    short_list,
    strip_wrapper_prefixes,
    wrong_type,
    wrong_value,
)
from functional_ema._fingerprint import Fingerprint
from functional_ema._fsdp import check_sharded, fsdp_modules, reject_fsdp, reshard
from functional_ema._module import apply, check_materialised, check_unwrapped, module_state
from functional_ema._offload import Staging, staged_update
from functional_ema._restore import check_state_dict, unwrap_keys
from functional_ema._schedules import config_of, from_config, is_bank, tf_warmup
from functional_ema._state import EmaState, init
from functional_ema._swap import swap_in
from functional_ema._tree import check_dense_leaves, check_pair
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule
from functional_ema._update import Bound, apply_, check_buffer_policy, follow_, validate


def _register_tree(root: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Register ``tensors`` as buffers of nested containers mirroring their dotted names."""
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]  # type: ignore[assignment]
        owner.register_buffer(leaf, tensor)


def check_count(api: str, path: str, value: object, least: int) -> int:
    """An int ``>= least`` (``update_every``, ``update_after``, saved counters)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(
            api,
            f"{path} of the wrong type",
            path,
            f"an int >= {least}",
            describe(value),
            f"Pass a whole number of steps, e.g. {path}={max(least, 1)}.",
        )
    if value < least:
        raise wrong_value(
            api,
            f"{path} out of range",
            path,
            f"an int >= {least}",
            value,
            f"Pass a whole number of steps, e.g. {path}={max(least, 1)}.",
        )
    return value


def check_ema_decay(api: str, decay: object, use_num_updates: bool) -> Decay | Schedule:
    """An EMA's decay: a checked constant, or a schedule of one decay.

    Not a schedule with ``use_num_updates``, which is TF's warmup schedule itself.
    """
    if not callable(decay) or isinstance(decay, Tensor):
        return check_decay(api, decay)
    if is_bank(decay):
        raise wrong_value(
            api,
            "a bank schedule",
            "decay",
            "a schedule of one decay",
            repr(decay),
            "An EMA keeps one average per parameter: pass one decay, or keep several "
            "averages with fe.bank / fe.ema_update_bank.",
        )
    if use_num_updates:
        raise wrong_type(
            api,
            "`use_num_updates` with a schedule",
            "decay",
            "a constant decay",
            f"the schedule {decay!r}",
            "Pass the schedule alone, or fe.tf_warmup(decay) as the schedule.",
        )
    return decay


def check_patterns(api: str, path: str, patterns: object) -> None:
    """A list of names or globs (``exclude=``, ``names=``), not a string."""
    if isinstance(patterns, str) or not (
        isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns)
    ):
        raise wrong_type(
            api,
            f"{path} of the wrong type",
            path,
            "a list of names or glob patterns",
            describe(patterns),
            f"Write {path}=['head.*'] (a list, even for one pattern).",
        )


def _matching(api: str, path: str, patterns: Sequence[str], names: list[str]) -> list[str]:
    """The names matched by ``patterns`` (exact names or ``fnmatch`` globs), in model order.

    Raises:
        TypeError: ``patterns`` is a string (not a list of them) or holds a non-string.
        ValueError: A pattern that matches no parameter or buffer (a typo would silently
            leave out what it meant).
    """
    check_patterns(api, path, patterns)

    def matches(name: str, pattern: str) -> bool:
        # A pattern that is a name matches only that name ('a[0].weight' is not a glob).
        return name == pattern if pattern in names else fnmatch.fnmatchcase(name, pattern)

    for index, pattern in enumerate(patterns):
        if not any(matches(name, pattern) for name in names):
            raise wrong_value(
                api,
                f"a pattern that matches nothing ({pattern!r})",
                f"{path}[{index}]",
                "a parameter or buffer name, or a glob matching some",
                f"no match among {short_list(names)}",
                "Check the name against dict(model.named_parameters()) and "
                "dict(model.named_buffers()); globs use fnmatch ('*' also crosses dots).",
            )
    return [n for n in names if any(matches(n, p) for p in patterns)]


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
"""``nn.Module``'s own attributes (slots, hooks, mode): never copied between live and shadow."""

_NOT_SYNCED = (nn.Module, types.MethodType)


@dataclass
class _Shadow:
    """The shadow module and what it was built from (see ``EMA.shadow``)."""

    module: nn.Module
    tree: Fingerprint  # the live module tree: a change rebuilds the shadow
    live: Fingerprint  # the live parameters and their storage: a change re-binds its slots
    layout: int  # the EMA's ``_layout`` when bound
    pairs: list[tuple[nn.Module, nn.Module]]  # (live, shadow) modules, in the same order
    slots: list[tuple[dict[str, Any], str, Tensor]]  # (shadow slot dict, name, tensor)
    casts: list[tuple[Tensor, Tensor]]  # (the shadow's own copy, the average it casts)
    version: int


@dataclass
class _Planned:
    """A validated update and the fingerprints it holds under (parameters, buffers)."""

    bound: Bound
    params: Fingerprint
    buffers: Fingerprint


_ADDED_LATER: dict[str, Any] = {
    "_stored": None,
    "_update_every": 1,
    "_update_after": 0,
    "_calls": 0,
    "_pending": 0,
    "_excluded_buffers": [],
    "_excluded": [],
    "_keep_hyperparameters": False,
    "_offload": False,
}
"""Attributes an ``EMA`` pickled by an earlier version lacks, with the values it behaved by."""

_EXTRA = "_extra_state"
_SETTINGS_FORMAT = 1

_UPDATE_FIX = "Updating now would average the averages into themselves: call update()"


class _Fixed:
    """A schedule that returns one decay already resolved for the call (staged updates)."""

    def __init__(self, value: Decay) -> None:
        self.value = value

    def __call__(self, t: Tensor, dt: Tensor) -> Decay:
        return self.value


def _check_offload(
    api: str, model: nn.Module, device: torch.device | str | None, pin_memory: bool
) -> torch.device:
    """The device for the averages (``device=``, ``pin_memory=``), checked."""
    try:
        target = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise wrong_value(
            api,
            "not a device",
            "device",
            "a torch.device or a name like 'cpu'",
            describe(device),
            "Pass device='cpu' to keep the averages in host memory.",
        ) from None
    try:
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as error:
        raise wrong_value(
            api,
            "a device this machine does not have",
            "device",
            "an available device",
            f"{target} ({str(error).splitlines()[0]})",
            "Pass device='cpu' to keep the averages in host memory.",
        ) from None
    if target.type == "meta":
        raise wrong_value(
            api,
            "averages without data",
            "device",
            "a device with memory, e.g. 'cpu'",
            "device='meta'",
            "Pass device='cpu' to keep the averages in host memory.",
        )
    if fsdp_modules(model):
        raise wrong_value(
            api,
            "averages on another device for an FSDP2 model",
            "device",
            "None (each rank averages its own shard where it is)",
            str(target),
            "Leave device unset: FSDP2 shards are already a fraction of the model per rank.",
        )
    if pin_memory and (target.type != "cpu" or not _pinning_available()):
        got = f"device={str(target)!r}" if target.type != "cpu" else "no accelerator here"
        raise wrong_value(
            api,
            "pin_memory without an accelerator to copy to",
            "pin_memory",
            "averages in host memory (device='cpu') on a machine with an accelerator",
            got,
            "Pinned memory only speeds up copies to an accelerator: drop pin_memory=True.",
        )
    return target


def _pinning_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()  # pragma: no cover - torch without torch.accelerator


def _pinned(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.pin_memory() for name, tensor in tree.items()}


def _on_meta(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Data-less copies (shape, dtype, strides): checked without copying across devices."""
    return {name: tensor.to("meta") for name, tensor in tree.items()}


def _read_settings(api: str, state: Any, *, keep: bool = False) -> dict[str, Any]:
    """Check a saved ``_extra_state`` (see ``EMA.get_extra_state``); the values to set.

    With ``keep`` (``keep_hyperparameters=True``) only the counters and names are read: the
    saved settings are neither checked nor returned.
    """
    path = "state_dict['_extra_state']"
    fix = "Load a state dict saved by EMA.state_dict(), or drop this key to keep the settings."
    if not isinstance(state, dict) or state.get("format") != _SETTINGS_FORMAT:
        raise wrong_value(
            api,
            "unreadable settings",
            path,
            f"a dict with format={_SETTINGS_FORMAT}",
            describe(state),
            fix,
        )
    settings: dict[str, Any] = {
        "calls": check_count(api, f"{path}['calls']", state.get("calls"), 0),
        "pending": check_count(api, f"{path}['pending']", state.get("pending"), 0),
    }
    averaged = state.get("averaged")
    if averaged is not None:
        if not isinstance(averaged, list) or not all(isinstance(n, str) for n in averaged):
            raise wrong_type(
                api,
                "averaged names of the wrong type",
                f"{path}['averaged']",
                "a list of parameter names",
                describe(averaged),
                fix,
            )
        settings["averaged"] = averaged
    if keep:
        return settings
    every, after = state.get("update_every"), state.get("update_after")
    settings["update_every"] = check_count(api, f"{path}['update_every']", every, 1)
    settings["update_after"] = check_count(api, f"{path}['update_after']", after, 0)
    check_buffer_policy(api, state.get("buffer_policy"))
    check_policy(api, state.get("nonfinite"))
    settings["buffer_policy"], settings["nonfinite"] = state["buffer_policy"], state["nonfinite"]
    decay = state.get("decay")
    if isinstance(decay, dict):
        settings["decay"] = from_config(api, decay, f"{path}['decay']")
    elif isinstance(decay, Tensor):
        settings["decay"] = check_decay(api, decay.clone(), f"{path}['decay']")  # not shared
    elif decay is not None:
        settings["decay"] = check_decay(api, decay, f"{path}['decay']")
    return settings


def _is_extra(key: str) -> bool:
    return strip_wrapper_prefixes(key) == _EXTRA


def _cast_like(state_dict: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with floating tensors cast to ``own``'s floating dtypes (same keys)."""
    mapping = unwrap_keys(state_dict, own)
    cast = {}
    for key, value in state_dict.items():
        mine = own.get(mapping[key])
        if (
            isinstance(value, Tensor)
            and isinstance(mine, Tensor)
            and is_inexact(value)
            and is_inexact(mine)
            and value.is_complex() == mine.is_complex()
            and value.dtype != mine.dtype
        ):
            value = value.to(mine.dtype)
        cast[key] = value
    return cast


class EMA(nn.Module):
    r"""Exponential moving average of a model, for classic training scripts.

    A thin adapter over the functional core: :meth:`update` reads the live model's tensors
    and calls :func:`update_`, with TensorFlow's arithmetic
    (:math:`\bar\theta \leftarrow \bar\theta - (\bar\theta - \theta)(1 - \beta)`, bit for
    bit). In training mode ``ema(x)`` runs the live model; in eval mode it runs
    :attr:`shadow`, a copy of the model's structure whose parameters are the averages
    themselves: the live model is never touched, so other threads may use it meanwhile.
    ``ema.train()`` / ``ema.eval()`` choose between the two; they do not change the live
    model's mode. The live model is not registered, so ``ema.state_dict()`` holds only the
    averages, the held buffers and the counters, and ``ema.to(...)`` moves only those.

    What is averaged follows TensorFlow's ``var_list``: the parameters trainable when the EMA
    is made. Frozen parameters (a fine-tuned model's backbone) are neither held nor copied:
    the shadow and :meth:`copy_to` use the live frozen tensors. Buffers are held and copied
    at each update (see ``buffer_policy``).

    Each update checks, at a few tens of nanoseconds per tensor, that the model's tensors are
    the ones its plan reads (same objects in the module slots, same storage, offset, shape,
    strides, dtype and device); anything changed (``p.data = ...``, ``model.to(...)``, a
    buffer reassigned by the forward) is planned again. A change of structure (a parameter or
    buffer added, removed or renamed) is a ``ValueError`` naming it, before anything is written.

    Args:
        model: The live model (not a DDP or ``torch.compile`` wrapper: pass ``model.module``
            or ``model._orig_mod``). The parameters trainable now are averaged (freezing or
            unfreezing some later does not change which, as TF's ``var_list``).
        decay: :math:`\beta \in [0, 1]`: a float, a 0-dim tensor, or a schedule called as
            ``schedule(t, dt)`` (see :func:`update`), e.g. :func:`warmup` or :func:`power`.
        use_num_updates: Apply TF's ``num_updates`` warmup
            :math:`\min(\beta, (1 + n) / (10 + n))` with :math:`n` the step count including
            this update (1 at the first update), i.e. the schedule :func:`tf_warmup`.
        dtype: Floating dtype of the averages, e.g. ``torch.float32`` for a bfloat16 model
            (a bfloat16 average stalls at high decay). ``None`` keeps the model's dtypes.
            Forward, :meth:`swap`, :meth:`copy_to` and :attr:`shadow` cast to the model's.
        buffer_policy: ``"copy"`` (default) or ``"average"`` floating buffers (integer
            buffers such as ``num_batches_tracked`` are always copied).
        nonfinite: ``"skip"`` (default): NaN/Inf values in the model leave their averages
            unchanged and ``ema.nonfinite_updates`` counts such updates (on the device);
            ``"raise"``: ``update()`` raises before writing anything; ``"propagate"``: TF's
            behaviour (they enter the average).
        update_every: Update on every ``k``-th call of :meth:`update` only, for the ``k``
            steps since the last one (``dt=k``, so a schedule's time constant stays in
            steps); the calls between read nothing.
        update_after: For the first ``n`` calls of :meth:`update` the averages follow the
            weights (each call copies them, as ema-pytorch's ``update_after_step`` and
            Lightning's ``update_starting_at_step``); ``step`` stays 0, so schedules start
            with the first real update, at call ``n + update_every``.
        exclude: Names or ``fnmatch`` globs (``"head.*"``) of parameters and buffers to
            leave out: they behave like frozen parameters (not held; the shadow, :meth:`swap`
            and :meth:`copy_to` use the live tensors), as ema-pytorch's
            ``param_or_buffer_names_no_ema``. A pattern matching nothing is an error.
        device: Keep the averages on this device, e.g. ``"cpu"`` for a big model trained
            on a GPU (AveragedModel's ``device=``, diffusers' ``offload_ema``). Each update
            copies the weights through two staging buffers of at most 64 MiB (pinned when
            the model is on an accelerator), with non-blocking copies overlapping the
            arithmetic of the previous chunk: no full extra copy, the same bits as on the
            model's device. Eval, :meth:`swap` and :meth:`copy_to` bring the averages back
            to the model's device. Not for FSDP2 models (their shards are already small).
        pin_memory: Pin the averages in host memory (with ``device="cpu"`` on a machine
            with an accelerator): faster, asynchronous copies back for evaluation.

    Raises:
        ValueError: For a wrapper, an ``EMA`` of an ``EMA``, a sparse or meta tensor, or a
            lazy module not materialised yet.

    Attributes:
        decay: The decay or schedule each update uses (a built-in schedule after
            ``use_num_updates=True``: ``tf_warmup(decay=...)``); may be reassigned.
        step: 0-dim int64 tensor: the steps the averages cover (``dt`` summed); in
            ``state_dict()``.
        nonfinite_updates: 0-dim int64 tensor: updates whose values held NaN/Inf (or whose
            decay was out of range on the device); in ``state_dict()``.
        averages: The module holding the averages and the held buffers as buffers, under
            the model's names (``state()`` gives them as dicts; ``state_dict()`` saves them).
        buffer_policy, nonfinite, update_every, update_after: The settings, as given (checked
            when assigned; see their entries below).

    ``state_dict()`` saves these settings (the decay as a number, a tensor or a built-in
    schedule's parameters) beside the tensors under ``_extra_state``, with the timing
    counters; :meth:`load_state_dict` restores them (``keep_hyperparameters=True`` keeps the
    constructor's).

    Example:
        >>> import torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = fe.EMA(model, 0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update()
        >>> _ = ema.eval()
        >>> torch.equal(ema(torch.ones(1, 2)), model(torch.ones(1, 2)))
        False
    """

    step: Tensor
    nonfinite_updates: Tensor
    _model: nn.Module
    _planned: _Planned | None

    @property
    def buffer_policy(self) -> BufferPolicy:
        """``"copy"`` or ``"average"`` (checked when assigned; the next update plans again)."""
        return self._buffer_policy

    @buffer_policy.setter
    def buffer_policy(self, value: BufferPolicy) -> None:
        check_buffer_policy("EMA", value)
        self._buffer_policy = value
        self._planned = None

    @property
    def nonfinite(self) -> NonFinite:
        """``"skip"``, ``"raise"`` or ``"propagate"`` (checked when assigned)."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: NonFinite) -> None:
        check_policy("EMA", value)
        self._nonfinite = value

    @property
    def update_every(self) -> int:
        """Calls of :meth:`update` per real update (an int >= 1, checked when assigned)."""
        return self._update_every

    @update_every.setter
    def update_every(self, value: int) -> None:
        self._update_every = check_count("EMA", "update_every", value, 1)

    @property
    def update_after(self) -> int:
        """Calls during which the averages follow the weights (an int >= 0, checked)."""
        return self._update_after

    @update_after.setter
    def update_after(self, value: int) -> None:
        self._update_after = check_count("EMA", "update_after", value, 0)

    def __init__(
        self,
        model: nn.Module,
        decay: Decay | Schedule,
        *,
        use_num_updates: bool = False,
        dtype: torch.dtype | None = None,
        buffer_policy: BufferPolicy = "copy",
        nonfinite: NonFinite = "skip",
        update_every: int = 1,
        update_after: int = 0,
        exclude: Sequence[str] = (),
        device: torch.device | str | None = None,
        pin_memory: bool = False,
    ) -> None:
        """Make the averages: copies of the model's trainable parameters and buffers.

        See the class docstring for the arguments.
        """
        super().__init__()
        api = "EMA"
        if isinstance(model, EMA):
            raise wrong_value(
                api,
                "an EMA of an EMA",
                "model",
                "the live model",
                "an EMA adapter",
                "Pass the model it tracks (ema.model); to average the averages, pass ema.shadow.",
            )
        check_unwrapped(api, model, "model")
        decay = check_ema_decay(api, decay, use_num_updates)
        check_buffer_policy(api, buffer_policy)
        check_policy(api, nonfinite)
        update_every = check_count(api, "update_every", update_every, 1)
        update_after = check_count(api, "update_after", update_after, 0)
        check_materialised(api, model, "before creating the EMA")
        everything, buffers = module_state(model, trainable_only=False)
        check_dense_leaves(api, {**everything, **buffers}, "model", meta=False)
        excluded = _matching(api, "exclude", exclude, [*everything, *buffers])
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        params = {n: t for n, t in everything.items() if n in trainable and n not in excluded}
        buffers = {name: t for name, t in buffers.items() if name not in excluded}
        if not params:
            warnings.warn(
                message(
                    api,
                    "nothing to average",
                    "<root>",
                    "at least one trainable parameter (requires_grad=True)",
                    f"none among {len(everything)} parameters",
                    "Create the EMA after unfreezing the layers to average; as is, update() "
                    "only copies the buffers.",
                ),
                UserWarning,
                stacklevel=2,
            )
        if device is not None or pin_memory:
            device = _check_offload(api, model, device, pin_memory)
            params = {name: t.detach().to(device) for name, t in params.items()}
            buffers = {name: t.detach().to(device) for name, t in buffers.items()}
        state = init(params, buffers, dtype=dtype)
        if pin_memory:
            state = {
                **state,
                "params": _pinned(state["params"]),
                "buffers": _pinned(state["buffers"]),
            }
        # The live model is a template, not a submodule: not in state_dict, not moved by .to().
        object.__setattr__(self, "_model", model)
        self.decay: Decay | Schedule = (
            tf_warmup(decay) if use_num_updates else decay  # type: ignore[arg-type]
        )
        self._planned = None
        self.buffer_policy = buffer_policy
        self.nonfinite = nonfinite
        self.update_every = update_every
        self.update_after = update_after
        self._calls = 0  # update() calls in training mode, warm-up included
        self._pending: int | Tensor = 0  # steps (dt summed) since the last update
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self._frozen_names = [name for name in everything if name not in params]
        self._excluded = excluded
        self._excluded_buffers = [name for name in excluded if name not in everything]
        self._offload = device is not None  # averages elsewhere: updates staged (_offload)
        self._dtype = dtype
        self._staging = Staging()
        self._swapped = False
        self._stored: AbstractContextManager[nn.Module] | None = None
        self._warned_eval = False
        self._planned_names: dict[int, tuple[Tensor, str]] = {}
        self._shadow_built: _Shadow | None = None
        self._copy_error: str | None = None
        self._version = 0  # counts writes to the averages (update, load): refreshes casts
        self._layout = 0  # counts replacements of the averages' tensors (.to(), assign)
        self._lock = threading.RLock()
        self._keep_hyperparameters = False  # set by load_state_dict(keep_hyperparameters=)
        self._fsdp = bool(fsdp_modules(model))  # FSDP2: sharded averages, in-place eval
        self.register_buffer("step", state["step"])
        self.register_buffer("nonfinite_updates", state["nonfinite_updates"])
        self.averages = nn.Module()
        _register_tree(self.averages, {**state["params"], **state["buffers"]})
        self.train(model.training)

    def __repr__(self) -> str:
        """What the EMA holds and does, in one line.

        (The averages are buffers: a module's repr would show empty modules.)
        """
        averages = list(self.state()["params"].values())
        numel = sum(t.numel() for t in averages)
        dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in averages}))
        devices = "/".join(sorted({str(t.device) for t in averages}))
        held = f"{len(averages)} averages ({numel:,} elements, {dtypes or 'none'}"
        held += f" on {devices})" if devices else ")"
        return (
            f"EMA(decay={self.decay!r}, step={int(self.step)}, {held}, "
            f"{len(self._buffer_names)} buffers ({self.buffer_policy}), "
            f"{len(self._frozen_names)} frozen, nonfinite={self.nonfinite!r}, "
            f"nonfinite_updates={int(self.nonfinite_updates)}, "
            f"forward={'live model' if self.training else 'averages'})"
        )

    @property
    def model(self) -> nn.Module:
        """The live model this EMA tracks."""
        return self._model

    def state(self) -> EmaState:
        """The adapter's :class:`EmaState`: its own tensors (no copy), keyed by model names."""
        held = dict(self.averages.named_buffers())
        return {
            "step": self.step,
            "nonfinite_updates": self.nonfinite_updates,
            "params": {name: held[name] for name in self._param_names},
            "buffers": {name: held[name] for name in self._buffer_names},
        }

    def train(self, mode: bool = True) -> EMA:
        """Route ``forward``: the live model (``True``) or the averages (``False``).

        The live model's own mode is left as it is (set it with ``model.train()``);
        :meth:`update` follows the live model's mode, not this one.
        """
        return super().train(mode)

    def update(self, dt: int | Tensor = 1) -> None:
        """Update the averages from the live model (one call per optimizer step).

        Runs whenever the live model is in training mode (``model.training``), whatever
        ``ema.eval()`` was called before; while the live model is in eval mode it does
        nothing and warns once. All checks run before anything is written.

        Args:
            dt: Steps since the last update (e.g. ``k`` when updating every ``k`` steps): the
                decay is applied for ``dt`` steps (see :func:`update`).

        With ``update_after=n`` the first ``n`` calls copy the weights into the averages;
        then, with ``update_every=k``, every ``k``-th call updates for the ``dt`` of the
        ``k`` calls summed, and the others only count (nothing is read). Calls while the
        live model is in eval mode are not counted.

        Raises:
            RuntimeError: Inside :meth:`swap` or between :meth:`store` and :meth:`restore`
                (the model holds the averages, not the weights).
            ValueError: If a parameter or buffer was added, removed, renamed or moved to
                another name since construction, a shape or device changed, or an FSDP2 model
                holds gathered parameters after a forward without backward (call
                ``model.reshard()`` first).
        """
        if isinstance(dt, nn.Module):
            raise wrong_type(
                "EMA.update",
                "a model passed to update()",
                "dt",
                "the number of steps since the last update (an int >= 1)",
                describe(dt),
                "The EMA updates from the model it was made with (unlike timm's "
                "ema.update(model) or AveragedModel's update_parameters(model)): call "
                "ema.update(), or ema.update(dt=k) after k steps.",
            )
        dt = check_interval("EMA.update", dt)
        refusal = ("EMA.update", "called", _UPDATE_FIX)
        self._refuse_while_stored(*refusal)
        if not self._model.training:
            if not self._warned_eval:
                warnings.warn(
                    "EMA.update: the live model is in eval mode; this update (and any other "
                    "while it is) was skipped. Call model.train() before training steps; "
                    "this warning is shown once per EMA.",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned_eval = True  # after warn: under -W error it raises each time
            return
        if self._fsdp:
            check_sharded("EMA.update", self._model)
        with self._lock:
            self._refuse_while_stored(*refusal)  # again: a store() in another thread
            calls = self._calls + 1
            pending = (
                dt if isinstance(self._pending, int) and not self._pending else self._pending + dt
            )
            warming = calls <= self.update_after
            if not warming and (calls - self.update_after) % self.update_every:
                self._calls, self._pending = calls, pending  # between updates: nothing read
                return
            if self._offload and self._elsewhere():
                self._staged_update(warming, pending)
            else:
                planned, followed = self._current("EMA.update")
                with torch.no_grad():
                    if warming:
                        follow_(planned.bound, self.nonfinite)
                    else:
                        apply_(planned.bound, self.decay, pending, self.nonfinite)
                if followed:  # written: now they are the held buffers
                    _register_tree(self.averages, followed)
                    self._layout += 1
                self._planned = planned
            self._version += 1
            self._calls, self._pending = calls, 0

    def _elsewhere(self) -> bool:
        """Whether the averages are on another device than the model's values (``device=``)."""
        state = self.state()
        held = next(iter({**state["params"], **state["buffers"]}.values()), None)
        if held is None:
            return False
        live = (*self._model.parameters(), *self._model.buffers())
        return any(t.device != held.device for t in live)

    def _staged_update(self, warming: bool, dt: int | Tensor) -> None:
        """The update of averages on another device, staged chunk by chunk (``_offload``).

        Everything is checked first (names, shapes and dtypes on meta copies, NaN/Inf for
        ``nonfinite="raise"``), so no chunk raises once writing began.
        """
        api = "EMA.update"
        params, buffers, slots = self._live(api)
        names = [*params, *buffers]
        self._planned_names = {id(t): (t, n) for n, t in zip(names, slots, strict=True)}
        state = self.state()
        followed = self._followed_buffers(state["buffers"], buffers)
        state["buffers"].update(followed)
        meta: EmaState = {
            **state,
            "params": _on_meta(state["params"]),
            "buffers": _on_meta(state["buffers"]),
        }
        validate(api, meta, _on_meta(params), _on_meta(buffers), self.buffer_policy)
        if self.nonfinite == "raise":
            kinds = ("params", "buffers") if self.buffer_policy == "average" else ("params",)
            for kind, values in zip(kinds, (params, buffers), strict=False):
                ordered = dict(sorted(values.items()))  # optree's order, as leaf paths name it
                held = [state[kind][key] for key in ordered]  # type: ignore[literal-required]
                raise_if_nonfinite(api, ordered, held, list(ordered.values()), kind)
        nonfinite, decay = self.nonfinite, self.decay
        if callable(decay) and not isinstance(decay, Tensor) and not warming:
            # Called once, as on one device: every chunk gets the same decay.
            value, _ = resolve_decay(api, decay, state["step"], dt)
            decay = _Fixed(value)

        def run(bound: Bound) -> object:
            if warming:
                return follow_(bound, nonfinite)
            return apply_(bound, decay, dt, nonfinite)

        with torch.no_grad():
            staged_update(api, state, params, buffers, self.buffer_policy, self._staging, run)
        if followed:
            _register_tree(self.averages, followed)
            self._layout += 1

    def _current(self, api: str) -> tuple[_Planned, dict[str, Tensor]]:
        """The plan for the model as it is now, and the buffers it follows (not kept yet).

        The kept plan while both fingerprints hold and its own views still read where they
        did (a storage shrunk or freed in place moves them); only the buffers planned again
        when a buffer alone moved (a forward that reassigns one); else everything.
        """
        planned = self._planned
        plan = None if planned is None else planned.bound.__dict__.get("plan")
        if planned is not None and planned.params.holds() and (plan is None or plan.intact()):
            if planned.buffers.holds():
                return planned, {}
            rebound = self._rebind_buffers(api, planned)
            if rebound is not None:
                return rebound
        self._planned = None
        return self._plan(api)

    def _live(self, api: str) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Tensor]]:
        """The live tensors the update reads: ``(params, buffers, slot objects)``.

        Raises:
            ValueError: If the model's parameters or buffers are not the ones the EMA was
                made with (added, removed, renamed, or moved to another name).
        """
        model = self._model
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        known = {*self._param_names, *self._frozen_names}
        known_buffers = {*self._buffer_names, *self._excluded_buffers}
        missing = [n for n in self._param_names if n not in params]
        missing += [n for n in self._buffer_names if n not in buffers]
        extra = [n for n in params if n not in known]
        extra += [n for n in buffers if n not in known_buffers]
        if missing or extra:
            raise wrong_value(
                api,
                "the model's parameters or buffers changed since the EMA was made",
                (missing or extra)[0],
                f"the names at construction (missing now: {short_list(missing)})",
                f"new names {short_list(extra)}",
                "An EMA averages the tensors it was made with (TF's var_list): restore the "
                "module, or make a new EMA and load what still matches with "
                "new.load_state_dict(old.state_dict(), strict=False).",
            )
        live_params = {name: params[name] for name in self._param_names}
        live_buffers = {name: buffers[name] for name in self._buffer_names}
        slots = [*live_params.values(), *live_buffers.values()]
        planned = self._planned_names
        for name, tensor in zip([*live_params, *live_buffers], slots, strict=True):
            before = planned.get(id(tensor))
            if before is not None and before[0] is tensor and before[1] != name:
                raise wrong_value(
                    api,
                    "a tensor moved to another name",
                    name,
                    f"the tensor averaged as {before[1]!r} to stay there",
                    f"it now sits at {name!r}",
                    "Submodules were swapped or reordered: an EMA follows the model by name. "
                    "Restore the order, or make a new EMA for the new model.",
                )
        detached = {name: t.detach() for name, t in live_params.items()}
        return detached, {name: t.detach() for name, t in live_buffers.items()}, slots

    def _plan(self, api: str) -> tuple[_Planned, dict[str, Tensor]]:
        """Validate the live model against the averages: the plan and the followed buffers.

        Followed buffers are new held tensors for copied buffers whose shape or dtype
        changed: the plan writes into them; the caller registers them once the update
        succeeded.
        """
        params, buffers, slots = self._live(api)
        state = self.state()
        followed = self._followed_buffers(state["buffers"], buffers)
        state["buffers"].update(followed)
        bound = validate(api, state, params, buffers, self.buffer_policy)
        names = [*params, *buffers]
        self._planned_names = {id(t): (t, name) for name, t in zip(names, slots, strict=True)}
        split = len(params)
        return _Planned(
            bound,
            Fingerprint(self._model, slots[:split], ("modules", "parameters"), ("buffers",)),
            self._buffers_fingerprint(slots[split:]),
        ), followed

    def _rebind_buffers(
        self, api: str, planned: _Planned
    ) -> tuple[_Planned, dict[str, Tensor]] | None:
        """``planned`` with the buffers planned again (``None``: their names changed)."""
        buffers = dict(self._model.named_buffers())
        if buffers.keys() != {*self._buffer_names, *self._excluded_buffers}:
            return None
        slots = [buffers[name] for name in self._buffer_names]
        live = {name: t.detach() for name, t in zip(self._buffer_names, slots, strict=True)}
        held = self.state()["buffers"]
        followed = self._followed_buffers(held, live)
        held.update(followed)
        bound = planned.bound.with_buffers(held, live)
        return _Planned(bound, planned.params, self._buffers_fingerprint(slots)), followed

    def _buffers_fingerprint(self, slots: list[Tensor]) -> Fingerprint:
        """The buffers' fingerprint: their objects, in the modules that hold buffers.

        The parameters' fingerprint covers the module tree and every buffer name, so a
        buffer added to another module shows there; this one walks only the modules that
        hold buffers (none for a model of ``Linear`` layers).
        """
        holders = [m for m in self._model.modules() if m._buffers]
        return Fingerprint(self._model, slots, ("buffers",), modules=holders)

    def _validated(self) -> Bound:
        """The validated update from the live model (planned again when anything moved)."""
        with self._lock:
            planned, followed = self._current("EMA.update")
            if not followed:  # else kept by update(), which registers the followed buffers
                self._planned = planned
            return planned.bound

    def _followed_buffers(
        self, held: dict[str, Tensor], live: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """New held tensors for copied buffers whose shape or dtype the model changed.

        A copied buffer mirrors the live one: when the forward ``resize_``s it (a
        quantization observer's ``min_val``) or a conversion changes its dtype, the held
        copy takes the new shape and dtype (the update writes its values). Averaged buffers
        keep theirs (a changed shape is an error).
        """
        followed = {}
        for name, tensor in live.items():
            mine = held[name]
            copied = self.buffer_policy == "copy" or not is_inexact(mine)
            if (
                copied
                and (mine.device == tensor.device or self._offload)
                and (mine.shape != tensor.shape or mine.dtype != tensor.dtype)
            ):
                followed[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=mine.device)
        return followed

    def _apply(self, fn: Any, recurse: bool = True) -> EMA:
        """``.to()``, ``.half()``, ``.share_memory()``...: convert, then keep one region.

        Averages a conversion scattered (one new tensor each) are laid out again as init
        lays them out; a conversion that kept the layout (``share_memory()``) or made a
        tensor non-contiguous (a memory format asked for) is left as it is.
        """
        super()._apply(fn, recurse)
        self._forget()
        self._layout += 1
        state = self.state()
        for group in (state["params"], state["buffers"]):
            names = sorted(group)  # optree's dict order, which the engine follows
            tensors = [group[name] for name in names]
            keep = any(t.is_shared() or not t.is_contiguous() for t in tensors)
            by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for tensor in tensors:
                by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
            if keep or all(flat_view(ts) is not None for ts in by_kind.values()):
                continue
            packed = pack(tensors)
            _register_tree(self.averages, dict(zip(names, packed, strict=True)))
        return self

    def _forget(self) -> None:
        """Drop the cached plan (made again on next use); the shadow re-binds (``_layout``)."""
        self._planned = None
        self._planned_names = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the caches (plans, shadow module, lock): rebuilt after loading.

        Raises:
            RuntimeError: Inside :meth:`swap` or between :meth:`store` and :meth:`restore`,
                where the model holds the averages.
        """
        self._refuse_while_stored(
            "EMA",
            "copied or pickled",
            "A copy would keep the averages as the model's weights: copy",
        )
        state = self.__dict__.copy()
        state.update(_planned=None, _planned_names={}, _shadow_built=None, _lock=None)
        state["_staging"] = Staging(self._staging.limit)  # the buffers are scratch: not saved
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled EMA (a fresh lock; caches rebuilt on first use)."""
        super().__setstate__(state)
        self._lock = threading.RLock()
        if self.__dict__.get("_staging") is None:
            self._staging = Staging()
        for name in ("buffer_policy", "nonfinite", "update_every", "update_after"):
            if name in self.__dict__:  # plain attributes before they became checked ones
                self.__dict__[f"_{name}"] = self.__dict__.pop(name)
        for name, default in _ADDED_LATER.items():  # pickled by an earlier version
            self.__dict__.setdefault(name, default)
        if "_dtype" not in state:  # the averages' dtype, where they share one
            dtypes = {t.dtype for t in self.state()["params"].values()}
            self._dtype = dtypes.pop() if len(dtypes) == 1 else None

    # --- the averages as the model's values ---------------------------------------------

    def _values_for(self, module: nn.Module) -> dict[str, Tensor]:
        """Every parameter and buffer value of ``module`` as the averages give it.

        Trainable parameters: the averages; frozen (and excluded) ones: the live model's
        own; buffers: the held ones (excluded ones: the live model's). Cast to ``module``'s
        dtypes (no copy where they match).
        """
        live_params, live_buffers = module_state(module, trainable_only=False)
        live = {**live_params, **live_buffers}
        state = self.state()
        own = {**dict(self._model.named_parameters()), **dict(self._model.named_buffers())}
        unheld = [*self._frozen_names, *self._excluded_buffers]
        held = {
            **state["params"],
            **state["buffers"],
            **{name: own[name].detach() for name in unheld if name in own},
        }
        if self._offload:  # averages on another device: brought to the module's
            held = {n: t.to(live[n].device) if n in live else t for n, t in held.items()}
        check_pair("EMA", held, live, ("averages", "module"))
        return {name: held[name].to(live[name].dtype) for name in live}

    def _shadow(self) -> _Shadow | None:
        """The shadow module, bound to the current averages; ``None`` if it cannot be made.

        Rebuilt (a deep copy) only when the live module tree changed; re-bound (its slots
        pointed at new tensors) when the averages or a live parameter were replaced;
        cast copies refreshed after updates; slots the shadow's own forward reassigned are
        put back; the live modules' plain attributes (not slots, hooks or mode) copied
        over, so the shadow runs the live model's configuration.
        """
        with self._lock:
            built = self._shadow_built
            if built is None or not built.tree.structure_holds():
                built = self._build_shadow()
                if built is None:
                    return None
                self._shadow_built = built
            elif built.layout != self._layout or not built.live.holds():
                self._bind(built)
            version = self._version  # read first: an update meanwhile refreshes again
            if built.version != version:
                with torch.no_grad():
                    for target, source in built.casts:
                        target.copy_(source)
                built.version = version
            for slots, name, tensor in built.slots:
                if slots.get(name) is not tensor:
                    slots[name] = tensor
            for live, shadow in built.pairs:
                own = shadow.__dict__
                for key, value in live.__dict__.items():
                    if key in _MODULE_INTERNALS or isinstance(value, _NOT_SYNCED):
                        continue  # slots, hooks, mode; modules; methods bound to a live one
                    if own.get(key, own) is not value:
                        own[key] = value
            return built

    def _values_by_id(self) -> tuple[dict[int, Tensor], list[tuple[Tensor, Tensor]]]:
        """What the shadow holds for each live tensor (by id), and the cast copies made.

        Trainable parameters: the averages (no copy where dtype and device match);
        frozen ones: the live storage (shared, ``requires_grad=False``); buffers: the held
        ones (excluded ones: the live buffer itself).
        """
        model = self._model
        state = self.state()
        held = {**state["params"], **state["buffers"]}
        frozen = set(self._frozen_names)
        values: dict[int, Tensor] = {}
        casts: list[tuple[Tensor, Tensor]] = []

        def value(name: str, like: Tensor) -> Tensor:
            average = held[name]
            if average.dtype == like.dtype and average.device == like.device:
                return average  # the average itself: no copy
            cast = average.to(device=like.device, dtype=like.dtype, copy=True)
            casts.append((cast, average))
            return cast

        for name, param in model.named_parameters():
            data = param.detach() if name in frozen else value(name, param)
            values[id(param)] = nn.Parameter(data, requires_grad=False)
        excluded = set(self._excluded_buffers)
        for name, buffer in model.named_buffers():
            values[id(buffer)] = buffer if name in excluded else value(name, buffer)
        return values, casts

    def _bind(self, built: _Shadow) -> None:
        """Point the shadow's slots at the current averages (the module tree is the same)."""
        values, casts = self._values_by_id()
        built.slots = []
        for live, shadow in built.pairs:
            for kind in ("_parameters", "_buffers"):
                own = getattr(shadow, kind)
                for name, tensor in getattr(live, kind).items():
                    if tensor is not None:
                        built.slots.append((own, name, values[id(tensor)]))
        built.casts = casts
        built.version = -1
        built.layout = self._layout
        built.live = self._live_fingerprint()
        for slots, name, tensor in built.slots:
            slots[name] = tensor

    def _live_fingerprint(self) -> Fingerprint:
        return Fingerprint(
            self._model,
            list(self._model.parameters()),
            watched=("modules", "parameters"),
            named=("buffers",),
        )

    def _build_shadow(self) -> _Shadow | None:
        """A deep copy of the model's structure holding the averages (see :attr:`shadow`)."""
        model = self._model
        values, _ = self._values_by_id()
        try:
            module = copy.deepcopy(model, dict(values))
        except Exception as error:  # a lock, a trainer reference: no shadow module
            self._copy_error = f"{type(error).__name__}: {error}"
            return None
        module.eval()
        pairs = list(
            zip(
                model.modules(),
                module.modules(),
                strict=True,
            )
        )
        tree = Fingerprint(model, watched=("modules",), named=("parameters", "buffers"))
        built = _Shadow(module, tree, self._live_fingerprint(), self._layout, pairs, [], [], -1)
        self._bind(built)
        return built

    def _no_shadow(self, api: str) -> str:
        return message(
            api,
            "model cannot be deep-copied",
            "<root>",
            "a model copy.deepcopy can copy (the shadow module shares its tensors)",
            self._copy_error,
            "Make the model copyable (keep locks, trainers and open files out of its "
            "attributes, or give it a __deepcopy__), or export with ema.copy_to(fresh_model).",
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Train mode: the live model. Eval mode: the shadow (the live model untouched).

        For an FSDP2 model, whose hooks ignore other modules' weights, eval mode runs the
        live model inside :meth:`swap` (in place, restored bit for bit). For a model that
        cannot be deep-copied, it runs the averages through ``torch.func.functional_call``
        on the live model, which holds them during the call (warned once: other threads
        must not use the live model meanwhile).
        """
        if self.training:
            return self._model(*args, **kwargs)
        if self._fsdp:
            with self.swap() as model:
                return model(*args, **kwargs)
        built = self._shadow()
        if built is not None:
            return built.module(*args, **kwargs)
        if not getattr(self, "_warned_copy", False):
            warnings.warn(
                self._no_shadow("EMA.forward")
                + " Meanwhile eval runs torch.func.functional_call on the live model, which "
                "holds the averages during the call: do not use it from other threads.",
                UserWarning,
                stacklevel=2,
            )
            self._warned_copy = True
        values = self._values_for(self._model)
        live_params, live_buffers = module_state(self._model)
        params = {name: values[name] for name in live_params}
        buffers = {name: values[name] for name in live_buffers}
        return apply(self._model, params, buffers, *args, **kwargs)

    @torch.no_grad()
    def copy_to(self, module: nn.Module, names: Sequence[str] | None = None) -> None:
        """Copy the averages, the frozen parameters and the held buffers into ``module``.

        TF's ``variables_to_restore()`` loaded into a model; with ``names``, the subset
        ``variables_to_restore(moving_avg_variables=...)`` restores (the rest of ``module``
        is left as it is).

        Args:
            module: A model with the tracked model's names and shapes (e.g. a fresh instance
                for export); floating values are cast to its dtypes. Its frozen parameters get
                the live model's values (the EMA does not hold them).
            names: Only these parameters and buffers: names or ``fnmatch`` globs
                (``["backbone.*"]``); each must match something.

        Raises:
            ValueError: If names, shapes or devices differ, or a pattern of ``names``
                matches nothing (checked before any write).

        Example:
            >>> import torch, functional_ema as fe
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> ema = fe.EMA(model, 0.5)
            >>> with torch.no_grad():
            ...     _ = model[1].weight.add_(1.0)
            >>> ema.update()
            >>> fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> ema.copy_to(fresh, names=["1.*"])  # only the head's averages
            >>> torch.equal(fresh[1].weight, ema.average("1.weight"))
            True
        """
        api = "EMA.copy_to"
        check_unwrapped(api, module)
        values = self._values_for(module)
        live_params, live_buffers = module_state(module, trainable_only=False)
        live = {**live_params, **live_buffers}
        chosen = list(live) if names is None else _matching(api, "names", names, list(live))
        for name in chosen:
            live[name].copy_(values[name])

    def average(self, name: str | Tensor) -> Tensor:
        """The average of one parameter (or the held copy of one buffer), by the model's name.

        TF's ``ema.average(var)``: the tensor itself (no copy; writing into it writes the
        average). ``name`` may also be the live parameter or buffer object.

        Raises:
            ValueError: For a frozen or excluded parameter (not averaged: the shadow uses the
                live one), or a name the model does not have.

        Example:
            >>> import torch, functional_ema as fe
            >>> model = torch.nn.Linear(2, 1)
            >>> ema = fe.EMA(model, 0.9)
            >>> torch.equal(ema.average("weight"), ema.average(model.weight))
            True
        """
        api = "EMA.average"
        if isinstance(name, Tensor):
            by_id = {
                id(t): n for n, t in (*self._model.named_parameters(), *self._model.named_buffers())
            }
            if id(name) not in by_id:
                raise wrong_value(
                    api,
                    "a tensor that is not the model's",
                    "name",
                    "a parameter or buffer of ema.model, or its name",
                    describe(name),
                    "Pass the name, e.g. ema.average('0.weight'), or model.<layer>.weight.",
                )
            name = by_id[id(name)]
        held = {**self.state()["params"], **self.state()["buffers"]}
        if name in held:
            return held[name]
        unheld = {*self._frozen_names, *self._excluded_buffers}
        raise wrong_value(
            api,
            "frozen or excluded, not averaged" if name in unheld else "no such name",
            name,
            f"one of the averaged names {short_list(sorted(held))}",
            "a frozen or excluded tensor (the shadow uses the live one)"
            if name in unheld
            else describe(name),
            (
                "Use the live tensor, or add it to the averages with ema.extend([name])."
                if name in self._frozen_names
                else "Use the live buffer: an excluded buffer is not held."
            )
            if name in unheld
            else "Names are the model's, as in dict(model.named_parameters()).",
        )

    def extend(self, names: Sequence[str] | None = None) -> list[str]:
        """Average more parameters from now on, as TF's ``apply()`` with a longer ``var_list``.

        For progressive unfreezing: each new average starts at the parameter's current value
        (TF's initialisation), in the EMA's ``dtype`` and on its averages' device; ``step``,
        the schedule and the existing averages go on as they are. Nothing is written until
        every name is checked.

        Args:
            names: Names or ``fnmatch`` globs of parameters (frozen or excluded ones);
                ``None`` adds every parameter trainable now that is not averaged yet.
                Names already averaged are left as they are.

        Returns:
            The names added, in the model's order.

        Raises:
            ValueError: A pattern that matches no parameter; inside :meth:`swap` or between
                :meth:`store` and :meth:`restore` (``RuntimeError``).

        Example:
            >>> import torch, functional_ema as fe
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> _ = model[0].requires_grad_(False)  # a frozen backbone
            >>> ema = fe.EMA(model, 0.9)
            >>> _ = model[0].requires_grad_(True)  # unfrozen later
            >>> ema.extend()
            ['0.weight', '0.bias']
        """
        api = "EMA.extend"
        with self._lock:
            self._refuse_while_stored(api, "called", "Extend the averages")
            params = dict(self._model.named_parameters())
            if names is None:
                chosen = [n for n, p in params.items() if p.requires_grad]
            else:
                chosen = _matching(api, "names", names, list(params))
            averaged = set(self._param_names)
            added = [n for n in chosen if n not in averaged]
            if not added:
                return []
            held = next(iter(self.state()["params"].values()), None)
            device = held.device if held is not None else None
            values = {n: params[n].detach().to(device or params[n].device) for n in added}
            state = init(values, dtype=self._dtype)
            _register_tree(self.averages, state["params"])
            self._param_names += added
            self._frozen_names = [n for n in self._frozen_names if n not in set(added)]
            self._forget()
            self._layout += 1
            self._version += 1
            return added

    def store(self) -> nn.Module:
        """Put the averages into the live model until :meth:`restore` (two calls of ``swap``).

        For code that begins evaluation in one place and ends it in another (a training
        framework's "validation starts" and "validation ends" hooks). Until :meth:`restore`
        the live model holds the averages (frozen parameters stay as they are), with the
        guarantees of :meth:`swap`: ``update()``, the live model's ``state_dict()`` and
        ``load_state_dict()``, and copying or pickling the EMA raise ``RuntimeError``; and
        :meth:`restore` puts back the live weights bit for bit, and every module's parameter
        and buffer slots as they were. Prefer ``with ema.swap():`` where one block fits.

        Returns:
            The live model, holding the averages.

        Raises:
            RuntimeError: If the averages are in the model already (an earlier ``store()``
                without ``restore()``, or inside ``with ema.swap():``).

        Example:
            >>> import torch, functional_ema as fe
            >>> model = torch.nn.Linear(2, 1)
            >>> ema = fe.EMA(model, 0.9)
            >>> before = model.weight.clone()
            >>> _ = ema.store()  # e.g. where validation starts
            >>> _ = model(torch.ones(1, 2))  # evaluates the averages
            >>> ema.restore()  # e.g. where validation ends
            >>> torch.equal(model.weight, before)
            True
        """
        with self._lock:  # one check-and-swap: a store() or update() elsewhere waits
            return self._store()

    def _store(self) -> nn.Module:
        if self._swapped:
            raise RuntimeError(
                message(
                    "EMA.store",
                    "called while the model holds the averages",
                    "<root>",
                    "the live weights in the model",
                    "the averages, put there by an earlier store() or a swap block",
                    "store() and restore() come in pairs: call restore() first.",
                )
            )
        model, self._stored = self._put_averages("EMA.store")
        return model

    @property
    def stored(self) -> bool:
        """Whether the live model holds the averages: between :meth:`store` and :meth:`restore`.

        (Inside ``with ema.swap():`` too, but only :meth:`store` needs a :meth:`restore`; this
        is ``True`` only for it.) For code that must put the live weights back after an
        interruption: ``if ema.stored: ema.restore()``.

        Example:
            >>> import torch, functional_ema as fe
            >>> ema = fe.EMA(torch.nn.Linear(2, 1), 0.9)
            >>> _ = ema.store()
            >>> ema.stored
            True
            >>> ema.restore()
            >>> ema.stored
            False
        """
        return self._stored is not None

    def restore(self) -> None:
        """Put the live weights back after :meth:`store`, bit for bit, slots included.

        Raises:
            RuntimeError: Without a :meth:`store` before it (nothing to restore: the model
                holds its own weights), or inside ``with ema.swap():`` (the block restores).
        """
        with self._lock:
            self._restore()

    def _restore(self) -> None:
        entered = self._stored
        if entered is None:
            in_block = self._swapped
            raise RuntimeError(
                message(
                    "EMA.restore",
                    "called in a swap block" if in_block else "called without store()",
                    "<root>",
                    "a store() before it",
                    "the averages, which the `with` block restores"
                    if in_block
                    else "the live weights in the model",
                    "Call store() before restore(), or let the `with` block restore.",
                )
            )
        self._stored = None
        self._take_back(entered)

    def _refuse_while_stored(self, api: str, what: str, fix: str) -> None:
        """Raise while the model holds the averages; ``fix`` ends with when to do it instead."""
        if not self._swapped:
            return
        if self._stored is not None:
            where, until, after = "between store() and restore()", "restore()", "after restore()"
        else:
            where, until, after = "inside `with ema.swap():`", "the block ends", "after the block"
        raise RuntimeError(
            message(
                api,
                f"{what} {where}",
                "<root>",
                "the live weights in the model",
                f"the averages (in the model until {until})",
                f"{fix} {after}.",
            )
        )

    def _put_averages(self, api: str) -> tuple[nn.Module, AbstractContextManager[nn.Module]]:
        """Swap the averages into the live model: the model and what :meth:`_take_back` ends."""
        reshard(self._model)  # FSDP2: drop gathered copies so the forward gathers the averages
        values = self._values_for(self._model)
        live_params, live_buffers = module_state(self._model)
        params = {name: values[name] for name in live_params}
        buffers = {name: values[name] for name in live_buffers}
        entered = swap_in(api, self._model, params, buffers)
        model = entered.__enter__()
        self._swapped = True
        return model, entered

    def _take_back(self, entered: AbstractContextManager[nn.Module]) -> None:
        """Restore the live model that :meth:`_put_averages` swapped (also on errors)."""
        try:
            entered.__exit__(None, None, None)
        finally:
            self._swapped = False

    @contextmanager
    def swap(self) -> Iterator[nn.Module]:
        """Swap the averages into the live model for the ``with`` block, then restore it.

        The block's own :meth:`store` and :meth:`restore`, the second also when the body
        raises: the live weights and buffers are restored bit for bit, and so are the
        module's parameter and buffer slots (a forward that reassigns a buffer is undone).
        Frozen parameters are left as they are. ``update()`` is refused inside the block, and
        so are the live model's ``state_dict()`` (saving the averages as the model's weights
        is the classic resume bug: save the averages with ``ema.state_dict()`` or
        ``ema.shadow.state_dict()``) and ``load_state_dict()`` (the exit would undo it); both
        raise ``RuntimeError``. Prefer ``ema.eval()`` and ``ema(x)``, which leave the live
        model alone.

        Yields:
            The live model, holding the averages.

        Example:
            >>> import torch, functional_ema as fe
            >>> model = torch.nn.Linear(2, 1)
            >>> ema = fe.EMA(model, 0.9)
            >>> before = model.weight.clone()
            >>> with ema.swap():
            ...     _ = model(torch.ones(1, 2))
            >>> torch.equal(model.weight, before)
            True
        """
        with self._lock:  # one check-and-swap: a store() or update() elsewhere waits
            if self._swapped:
                stored = self._stored is not None
                raise RuntimeError(
                    message(
                        "EMA.swap",
                        "called after store()" if stored else "nested `with ema.swap():`",
                        "<root>",
                        "the live weights in the model",
                        "the averages, put there by store()"
                        if stored
                        else "the averages of the enclosing block",
                        "Do not nest swap blocks, nor swap between store() and restore(): the "
                        "model already holds the averages.",
                    )
                )
            model, entered = self._put_averages("EMA.swap")
        try:
            yield model
        finally:
            with self._lock:
                self._take_back(entered)

    @property
    def shadow(self) -> nn.Module:
        """The averaged model: the model's structure and names, holding the averages.

        The same module at every access (built on first use, rebuilt only when the live
        model's structure, a parameter's storage or the averages' device changes): its
        trainable parameters are the averages' own tensors (no copy; a cast copy, refreshed
        after each update, where ``dtype`` differs from the model's), its frozen parameters
        are the live model's (shared), its buffers are the held buffers. Parameters have
        ``requires_grad=False``; it is in eval mode. Writing into it writes the averages.
        Not for an FSDP2 model (export with :func:`full_state_dict` there) nor a model that
        ``copy.deepcopy`` cannot copy.

        Raises:
            ValueError: For an FSDP2 model.
            TypeError: For a model that cannot be deep-copied (the message says why).
        """
        reject_fsdp(
            "EMA.shadow",
            self._model,
            "An FSDP2 model cannot be deep-copied.",
            "Export the averages with fe.full_state_dict(ema.model, ema.state()['params'], "
            "ema.state()['buffers']) on every rank and load them into a plain model.",
        )
        built = self._shadow()
        if built is None:
            raise TypeError(self._no_shadow("EMA.shadow"))
        return built.module

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """What a checkpoint of the EMA needs, under the model's names.

        ``averages.<name>``, ``step``, ``nonfinite_updates`` and the settings
        (``_extra_state``, see :meth:`get_extra_state`): plain tensors and values, which
        ``torch.load(weights_only=True)`` reads back. The live model is not included (save
        ``model.state_dict()`` too); frozen and excluded parameters are not held, so not
        saved. Arguments as ``nn.Module.state_dict``.
        """
        return super().state_dict(*args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        """The settings and update-timing counters ``state_dict()`` saves as ``_extra_state``.

        Plain values (``torch.load(weights_only=True)`` reads them): the decay (a number, a
        tensor, a built-in schedule as its :meth:`config`, or ``None`` for a schedule of
        your own, which cannot be saved), ``update_every``, ``update_after``,
        ``buffer_policy``, ``nonfinite``, and the counters of :meth:`update`'s timing.
        """
        decay = self.decay
        saved: Any = decay if not callable(decay) or isinstance(decay, Tensor) else None
        return {
            "format": _SETTINGS_FORMAT,
            "decay": config_of(decay) if saved is None else saved,
            "update_every": self.update_every,
            "update_after": self.update_after,
            "buffer_policy": self.buffer_policy,
            "nonfinite": self.nonfinite,
            "calls": self._calls,
            "pending": int(self._pending),
            "averaged": list(self._param_names),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (checked first; see load_state_dict)."""
        settings = _read_settings("EMA.load_state_dict", state, keep=self._keep_hyperparameters)
        for name in ("decay", "update_every", "update_after", "buffer_policy", "nonfinite"):
            if name in settings:
                setattr(self, name, settings[name])
        self._calls, self._pending = settings["calls"], settings["pending"]

    def _check_averaged(self, api: str, settings: Any) -> None:
        """Refuse (strict loads) averages saved for parameters this EMA does not average.

        The checkpoint's EMA was extended (:meth:`extend`) after it was made: dropping those
        averages would lose them, so the error says to extend this one first.
        """
        saved = settings.get("averaged") if isinstance(settings, dict) else None
        frozen = set(self._frozen_names) - set(self._excluded)  # excluded: left out on purpose
        extended = [name for name in saved or () if name in frozen]
        if extended:
            raise wrong_value(
                api,
                "averages of parameters this EMA does not average",
                f"averages.{extended[0]}",
                "the parameters this EMA averages",
                f"{len(extended)} saved averages of parameters frozen here: {short_list(extended)}",
                f"The saved EMA was extended: call ema.extend({extended!r}) before loading, "
                "or load with strict=False to drop them.",
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load this EMA's part, also from a parent module's ``load_state_dict``.

        Before any of this EMA's tensors is written: the settings are checked, a checkpoint
        without them keeps the current ones, averages of extended parameters are refused
        (strict), and frozen or excluded parameters' keys are dropped. The cached plan and
        shadow binding are dropped (the averages may be new tensors).
        """
        api = "EMA.load_state_dict"
        key = prefix + _EXTRA
        if key not in state_dict:  # a checkpoint from before settings were saved
            state_dict[key] = self.get_extra_state()
        _read_settings(api, state_dict[key], keep=self._keep_hyperparameters)
        if strict:
            self._check_averaged(api, state_dict[key])
        for name in (*self._frozen_names, *self._excluded_buffers):
            state_dict.pop(f"{prefix}averages.{name}", None)
        self._forget()
        self._version += 1
        self._layout += 1
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        strict: bool = True,
        assign: bool = False,
        *,
        cast: bool = False,
        keep_hyperparameters: bool = False,
    ) -> Any:
        """Load what :meth:`state_dict` saved, all of it checked before anything is written.

        The averages, held buffers and counters, and the settings: the decay (or built-in
        schedule), ``update_every``, ``update_after``, ``buffer_policy`` and ``nonfinite``
        replace the constructor's, as torch_ema restores its decay (a schedule of your own
        is not saved: the constructor's stays). Keys saved through a DDP or
        ``torch.compile`` wrapper (``module.`` / ``_orig_mod.`` segments) are mapped to this
        adapter's. Tensors may be on any device (they are copied). Frozen (or excluded)
        parameters saved by a peer or an earlier version are ignored, and so is a missing
        ``_extra_state`` (a checkpoint from before settings were saved).

        Args:
            state_dict: From :meth:`state_dict` (or :func:`from_peer`).
            strict: Missing or unexpected keys are an error.
            assign: Take the loaded tensors instead of copying into the current ones.
            cast: Cast floating tensors of another floating dtype (e.g. a float32
                checkpoint into an EMA of a float16 model) instead of raising; integer
                counters and buffers must still match.
            keep_hyperparameters: Keep the constructor's settings; load only the tensors
                and counters.

        Raises:
            ValueError: Missing or unexpected keys (with ``strict``) or shape mismatches (all
                differences listed in one message, dtype mismatches included), a negative
                step counter, or settings out of range.
            TypeError: ``state_dict`` is not a dict, or every difference is of type or dtype
                (a value that is not a tensor, a tensor of another dtype without ``cast``).
        """
        api = "EMA.load_state_dict"
        with self._lock:  # an update meanwhile would keep writing into replaced tensors
            own = self.state_dict(keep_vars=True)
            settings = own.pop(_EXTRA)
            if isinstance(state_dict, dict):
                extras = [k for k in state_dict if isinstance(k, str) and _is_extra(k)]
                if len(extras) == 1:  # through a DDP / torch.compile wrapper too
                    settings = state_dict[extras[0]]
                state_dict = {k: v for k, v in state_dict.items() if k not in extras}
                _read_settings(api, settings, keep=keep_hyperparameters)
                if strict:
                    self._check_averaged(api, settings)
                unheld = {f"averages.{n}" for n in (*self._frozen_names, *self._excluded_buffers)}
                if all(isinstance(key, str) for key in state_dict):  # after the wrapper mapping
                    mapping = unwrap_keys(state_dict, [*own, *unheld])
                    state_dict = {k: v for k, v in state_dict.items() if mapping[k] not in unheld}
                if cast:
                    state_dict = _cast_like(state_dict, own)
            state_dict = check_state_dict(api, state_dict, own, strict=strict)
            self._keep_hyperparameters = keep_hyperparameters
            try:
                return super().load_state_dict(
                    {**state_dict, _EXTRA: settings}, strict=strict, assign=assign
                )
            finally:
                self._keep_hyperparameters = False
