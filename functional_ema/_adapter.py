"""``EMA``: a stateful ``nn.Module`` adapter over the functional core, for classic scripts."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from functional_ema._core import check_policy
from functional_ema._decay import check_decay
from functional_ema._engine import pack
from functional_ema._errors import message, wrong_type
from functional_ema._fsdp import check_sharded, fsdp_modules, reject_fsdp, reshard
from functional_ema._module import apply, check_unwrapped, module_state, module_with
from functional_ema._restore import check_state_dict
from functional_ema._schedules import tf_warmup
from functional_ema._state import EmaState, init
from functional_ema._storage import StorageGuard
from functional_ema._swap import swap_in
from functional_ema._tree import check_pair
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule
from functional_ema._update import Bound, apply_, check_buffer_policy, validate


_registrations = [0]
"""Counts parameter, buffer and module registrations in modules some ``EMA`` tracks."""

_tracked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""The modules of the models EMAs track (registrations elsewhere, e.g. a module assigning
its own buffer attribute each step, do not invalidate any EMA's cached update)."""


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    del name, value
    if module in _tracked:
        _registrations[0] += 1


def _watch_registrations() -> None:
    """Install the global registration hooks once (they only increment a counter)."""
    if getattr(_watch_registrations, "installed", False):
        return
    register_module_parameter_registration_hook(_count_registration)
    register_module_buffer_registration_hook(_count_registration)
    register_module_module_registration_hook(_count_registration)
    _watch_registrations.installed = True  # type: ignore[attr-defined]


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


class EMA(nn.Module):
    r"""Exponential moving average of a model, for classic training scripts.

    A thin adapter over the functional core: :meth:`update` pulls the live model's state
    with :func:`module_state` and calls :func:`update_`, with TensorFlow's arithmetic
    (:math:`\bar\theta \leftarrow \bar\theta - (\bar\theta - \theta)(1 - \beta)`, bit for
    bit). In training mode ``ema(x)`` runs the live model; in eval mode it runs the averages
    through ``functional_call`` with the live model as a template (the live model is never
    touched). ``ema.train()`` / ``ema.eval()`` also set the live model's mode, as the classic
    ``EMA`` snippet (which registers the model) does; the live model is not registered, so
    ``ema.state_dict()`` holds only the averages and the step counter and ``ema.to(...)``
    moves only the averages.

    Args:
        model: The live model (not a DDP or ``torch.compile`` wrapper: pass ``model.module``
            or ``model._orig_mod``). The parameters trainable now are averaged (freezing or
            unfreezing some later does not change which, as TF's ``var_list``); buffers and
            the other parameters are copied at each update (see ``buffer_policy``).
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

    def __init__(
        self,
        model: nn.Module,
        decay: Decay | Schedule,
        *,
        use_num_updates: bool = False,
        dtype: torch.dtype | None = None,
        buffer_policy: BufferPolicy = "copy",
        nonfinite: NonFinite = "skip",
    ) -> None:
        super().__init__()
        api = "EMA"
        check_unwrapped(api, model, "model")
        if not callable(decay) or isinstance(decay, Tensor):
            decay = check_decay(api, decay)
        elif use_num_updates:
            raise wrong_type(
                api,
                "`use_num_updates` with a schedule",
                "decay",
                "a constant decay",
                f"the schedule {decay!r}",
                "Pass the schedule alone, or fe.tf_warmup(decay) as the schedule.",
            )
        check_buffer_policy(api, buffer_policy)
        check_policy(api, nonfinite)
        params, buffers = module_state(model)
        state = init(params, buffers, dtype=dtype)
        # The live model is a template, not a submodule: not in state_dict, not moved by .to().
        object.__setattr__(self, "_model", model)
        self.decay: Decay | Schedule = (
            tf_warmup(decay) if use_num_updates else decay  # type: ignore[arg-type]
        )
        self.buffer_policy: BufferPolicy = buffer_policy
        self.nonfinite: NonFinite = nonfinite
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self._swapped = False
        self._bound: tuple[int, StorageGuard, Bound] | None = None
        _watch_registrations()
        self._fsdp = bool(fsdp_modules(model))  # FSDP2: sharded averages, in-place eval
        self.register_buffer("step", state["step"])
        self.register_buffer("nonfinite_updates", state["nonfinite_updates"])
        self.averages = nn.Module()
        _register_tree(self.averages, {**state["params"], **state["buffers"]})
        self.train(model.training)

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
        """Set the adapter's and the live model's mode (eval: ``forward`` uses the averages)."""
        super().train(mode)
        self._model.train(mode)
        return self

    @torch.no_grad()
    def update(self, dt: int | Tensor = 1) -> None:
        """Update the averages from the live model (one call per optimizer step).

        Calls :func:`update_` on the adapter's state with the model's current
        :func:`module_state`; all checks run before anything is written. In eval mode it
        warns and does nothing, as the classic ``EMA`` snippet does.

        Args:
            dt: Steps since the last update (e.g. ``k`` when updating every ``k`` steps): the
                decay is applied for ``dt`` steps (see :func:`update`).

        Raises:
            RuntimeError: Inside :meth:`swap` (the model holds the averages, not the weights).
            ValueError: If the model's names, shapes or devices changed since construction,
                or an FSDP2 model holds gathered parameters after a forward without backward
                (call ``model.reshard()`` first).
        """
        if self._swapped:
            raise RuntimeError(
                message(
                    "EMA.update",
                    "called inside `with ema.swap():`",
                    "<root>",
                    "the live weights in the model",
                    "the averages (swapped in until the block ends)",
                    "Updating now would average them into themselves: call update() after the "
                    "`with` block.",
                )
            )
        if not self.training:
            warnings.warn(
                "EMA.update: the EMA is in eval mode; the update was skipped. Call ema.train() "
                "(or update only during training).",
                stacklevel=2,
            )
            return
        if self._fsdp:
            check_sharded("EMA.update", self._model)
        apply_(self._validated(), self.decay, dt, self.nonfinite)

    def _validated(self) -> Bound:
        """The validated update from the live model, cached while the model is unchanged.

        The cache holds while no module of the model registered a parameter, buffer or
        submodule and every parameter and buffer keeps its storage (a :class:`StorageGuard`:
        one pointer per tensor, or one reference count per buffer that
        :func:`flatten_parameters_` laid out).
        """
        model = self._model
        if self._bound is not None:
            generation, guard, bound = self._bound
            if generation == _registrations[0] and guard.holds():
                return bound
        modules = list(model.modules())
        _tracked.update(modules)
        params, buffers = self._module_state(model)
        bound = validate("update_", self.state(), params, buffers, self.buffer_policy)
        live = [*model.parameters(), *model.buffers()]
        self._bound = (_registrations[0], StorageGuard(modules, live), bound)
        return bound

    def _apply(self, fn: Any, recurse: bool = True) -> EMA:
        """``.to()``, ``.cuda()``, ``.half()``...: convert, then lay the averages out again."""
        super()._apply(fn, recurse)
        self._bound = None
        state = self.state()
        for group in (state["params"], state["buffers"]):  # as init lays them out
            names = sorted(group)  # optree's dict order, which the engine follows
            packed = pack([group[name] for name in names])
            _register_tree(self.averages, dict(zip(names, packed, strict=True)))
        return self

    def _module_state(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """:func:`module_state` of ``module``, split as at construction.

        The parameters averaged are those trainable when the EMA was made, whatever their
        ``requires_grad`` now.
        """
        params, buffers = module_state(module, trainable_only=False)
        copied = set(self._buffer_names)  # a parameter added since is averaged
        kept = {name: t for name, t in params.items() if name in copied}
        return {name: t for name, t in params.items() if name not in copied}, {**kept, **buffers}

    def _averages_for(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The averages keyed like ``self._module_state(module)``, cast to its dtypes."""
        live_params, live_buffers = self._module_state(module)
        state = self.state()
        held = {**state["params"], **state["buffers"]}
        live = {**live_params, **live_buffers}
        check_pair("EMA", held, live, ("averages", "module"))
        return (
            {name: held[name].to(live[name].dtype) for name in live_params},
            {name: held[name].to(live[name].dtype) for name in live_buffers},
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Train mode: the live model. Eval mode: the averages (the live model untouched).

        For an FSDP2 model, whose hooks ignore ``functional_call``'s weights, eval mode runs
        the live model inside :meth:`swap` (in place, restored bit for bit).
        """
        if self.training:
            return self._model(*args, **kwargs)
        if self._fsdp:
            with self.swap() as model:
                return model(*args, **kwargs)
        params, buffers = self._averages_for(self._model)
        return apply(self._model, params, buffers, *args, **kwargs)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Copy the averages (and held buffers) into ``module``'s own tensors.

        Args:
            module: A model with the tracked model's names and shapes (e.g. a fresh instance
                for export); floating values are cast to its dtypes.

        Raises:
            ValueError: If names, shapes or devices differ (checked before any write).
        """
        check_unwrapped("EMA.copy_to", module)
        params, buffers = self._averages_for(module)
        averages = {**params, **buffers}
        live_params, live_buffers = self._module_state(module)
        for name, tensor in {**live_params, **live_buffers}.items():
            tensor.copy_(averages[name])

    @contextmanager
    def swap(self) -> Iterator[nn.Module]:
        """Swap the averages into the live model for the ``with`` block, then restore it.

        The live weights and buffers are restored bit for bit on exit, also when the body
        raises. ``update()`` is refused inside the block, and so are the live model's
        ``state_dict()`` (saving the averages as the model's weights is the classic resume
        bug: save the averages with ``ema.state_dict()`` or ``ema.shadow.state_dict()``) and
        ``load_state_dict()`` (the exit would undo it); both raise ``RuntimeError``.

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
        if self._swapped:
            raise RuntimeError(
                message(
                    "EMA.swap",
                    "nested `with ema.swap():`",
                    "<root>",
                    "the live weights in the model",
                    "the averages of the enclosing block",
                    "Do not nest swap blocks: the model already holds the averages.",
                )
            )
        reshard(self._model)  # FSDP2: drop gathered copies so the body gathers the averages
        params, buffers = self._averages_for(self._model)
        with swap_in("EMA.swap", self._model, params, buffers) as model:
            self._swapped = True
            try:
                yield model
            finally:
                self._swapped = False

    @property
    def shadow(self) -> nn.Module:
        """A new module with the model's structure and names, holding a copy of the averages.

        Built by copying the live model's structure with every parameter and buffer replaced
        by the (cast) averages, so no live tensor is copied; its parameters have
        ``requires_grad=False`` and it is returned in eval mode, for export and evaluation
        code that needs a module. Not for an FSDP2 model (it cannot be deep-copied): export
        with :func:`full_state_dict` there.
        """
        reject_fsdp(
            "EMA.shadow",
            self._model,
            "An FSDP2 model cannot be deep-copied.",
            "Export the averages with fe.full_state_dict(ema.model, ema.state()['params'], "
            "ema.state()['buffers']) on every rank and load them into a plain model.",
        )
        params, buffers = self._averages_for(self._model)
        return module_with(self._model, {**params, **buffers})

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load averages and step counter saved by :meth:`state_dict`, checked before writing.

        Keys saved through a DDP or ``torch.compile`` wrapper (``module.`` / ``_orig_mod.``
        segments) are mapped to this adapter's. Tensors may be on any device (they are
        copied), but shapes and dtypes must match exactly.

        Raises:
            ValueError: Missing or unexpected keys (with ``strict``) or shape mismatches (all
                differences listed in one message, dtype mismatches included), or a negative
                step counter.
            TypeError: ``state_dict`` is not a dict, or every difference is of type or dtype
                (a value that is not a tensor, a tensor of another dtype).
        """
        state_dict = check_state_dict(
            "EMA.load_state_dict", state_dict, self.state_dict(keep_vars=True), strict=strict
        )
        self._bound = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
