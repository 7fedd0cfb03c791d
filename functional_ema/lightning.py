"""Lightning integration: :class:`EMACallback`, TF-exact averages of a LightningModule.

Needs the ``lightning`` extra (``pip install "functional_ema[lightning]"``); ``import
functional_ema`` never imports Lightning, this module does. ``lightning.pytorch`` is used
where installed, else the standalone ``pytorch_lightning`` package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from functional_ema._adapter import EMA
from functional_ema._callbacks import Options
from functional_ema._dtensor import dtensor_type
from functional_ema._errors import describe, message, short_list, wrong_value
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule


def _import_lightning() -> ModuleType:
    """``lightning.pytorch``, else ``pytorch_lightning``; an ImportError naming the extra."""
    first: ImportError | None = None
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError as error:
            first = first or error
    raise ImportError(
        message(
            "functional_ema.lightning",
            "Lightning is not installed",
            "<root>",
            "the lightning package (lightning.pytorch) or pytorch_lightning",
            f"neither importable ({first})",
            'Install the extra: pip install "functional_ema[lightning]".',
        )
    ) from first


if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.types import STEP_OUTPUT
else:
    pl = _import_lightning()
    Callback = pl.Callback

__all__ = ["EMACallback"]

_FORMAT = 1
_API = "EMACallback"


def _gathered(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each DTensor as its full tensor on the CPU, kept on rank 0 only.

    For sharded (FSDP2) averages at checkpoint time: Lightning writes the callbacks' state
    from rank 0 alone, so the shards are gathered there (one all-gather per sharded tensor,
    in the same order on every rank). Other ranks keep their DTensors (nothing written).
    """
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(v, dtensor) for v in state.values()):
        return state
    keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    gathered = dict(state)
    for key in sorted(state):  # the same order on every rank
        value = state[key]
        if isinstance(value, dtensor):
            full = value.full_tensor()  # every rank takes part
            if keep:
                gathered[key] = full.cpu()
    return gathered


def _sharded_like(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``state`` with full tensors cut to this rank's part where ``own`` holds a DTensor.

    Each rank slices its local shard of the full tensor the checkpoint holds, with the
    placements of its own average (``src_data_rank=None``: no communication).
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return state
    from torch.distributed.tensor import distribute_tensor

    sharded = dict(state)
    for key, value in state.items():
        mine = own.get(key)
        if (
            isinstance(mine, dtensor)
            and isinstance(value, Tensor)
            and not isinstance(value, dtensor)
        ):
            sharded[key] = distribute_tensor(
                value.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None
            )
    return sharded


class EMACallback(Callback):
    r"""Keep TensorFlow-exact moving averages of a LightningModule's weights during ``fit``.

    The averages are an :class:`functional_ema.EMA` of the LightningModule itself (not of the
    strategy's wrapper), made when training starts (after the strategy moved, converted or
    sharded the model, and after a checkpoint was restored) and updated once per optimizer
    step: the callback watches ``trainer.global_step`` after each training batch, so with
    ``accumulate_grad_batches=k`` it updates once per window, and each update covers the
    optimizer steps since the last one (``dt``; see :meth:`should_update`).

    Validation, test and predict run on the averages: they are put into the model with
    :meth:`EMA.store` when the epoch starts (``on_validation_epoch_start``, ...) and the live
    weights are put back, bit for bit, with :meth:`EMA.restore` when the loop ends
    (``on_validation_end``, ...: after every ``on_*_epoch_end`` hook, the LightningModule's
    included, and before ``ModelCheckpoint`` saves), or when the run raises. This covers the
    sanity check, validation during ``fit``, and ``trainer.validate`` / ``test`` /
    ``predict`` afterwards with the same callback. Given a ``ckpt_path``, they run on the
    averages saved in that checkpoint (on the live weights, with a warning, if it holds
    none).

    Checkpoints hold the live weights as the model's ``state_dict`` (what resuming needs)
    and the averages, counters and settings as this callback's state
    (``checkpoint["callbacks"]["EMACallback"]``, from :meth:`EMA.state_dict`); resuming with
    ``trainer.fit(..., ckpt_path=...)`` continues bit for bit as if never stopped, and
    resuming from a checkpoint without that state is an error. Another ``fit`` of the same
    LightningModule without ``ckpt_path`` (with this Trainer or a new one) continues the same
    averages, its first update covering the optimizer steps since the last one.

    DDP: every rank keeps the full averages of its (identical) replica, with no
    communication. FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard`` in
    ``configure_model``): every rank keeps the shard of the averages that matches its shard
    of the parameters, updated with no communication; a checkpoint gathers them into full
    tensors on rank 0 (one all-gather per sharded tensor, at save time only), and resuming
    cuts each rank's shard back out locally. Lightning's ``FSDPStrategy`` (FSDP1, flat
    parameters) is refused.

    Args:
        decay: :math:`\beta \in [0, 1]` (a float or a 0-dim tensor) or a schedule such as
            :func:`functional_ema.warmup` (see :class:`functional_ema.EMA`).
        use_num_updates: TF's ``num_updates`` warmup (:func:`functional_ema.tf_warmup`).
        dtype: Floating dtype of the averages (e.g. ``torch.float32`` for a bf16 model).
        buffer_policy: ``"copy"`` (default) or ``"average"`` floating buffers.
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"propagate"`` NaN/Inf weights.
        update_every: Update every ``k``-th optimizer step, for the ``k`` steps since the
            last update (counted in optimizer steps, not batches).
        update_after: For the first ``n`` optimizer steps the averages copy the weights.
        exclude: Names or globs of parameters and buffers not to average (as
            :class:`functional_ema.EMA`'s ``exclude``; names are the LightningModule's,
            e.g. ``"net.head.*"``).
        device: Keep the averages on this device (e.g. ``"cpu"``); not for FSDP2 models.
        pin_memory: Pin CPU averages (with ``device="cpu"`` and an accelerator).
        apply_at_end: When ``fit`` ends (``on_fit_end``: after every ``on_train_end`` hook,
            so the checkpoints saved there, e.g. ``ModelCheckpoint(save_last=True)``'s, hold
            the live weights), copy the averages into the model (its live weights are then
            lost). By default the model keeps its live weights, and the averages stay in
            :attr:`ema` (``callback.ema.copy_to(model)``, ``callback.ema.shadow``,
            ``with callback.ema.swap():``).

    Raises:
        TypeError, ValueError: For an option of the wrong type or out of range (here, not
            when training starts). ``ValueError`` when ``fit(ckpt_path=...)`` resumes from
            a checkpoint without this callback's state (it would start new averages).

    Example:
        >>> import functional_ema as fe
        >>> from functional_ema.lightning import EMACallback
        >>> EMACallback(fe.tf_warmup(0.999), update_every=2)
        EMACallback(tf_warmup(decay=0.999), update_every=2)

        Then ``Trainer(callbacks=[callback]).fit(model)``: see the Lightning page of the
        documentation.
    """

    def __init__(
        self,
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
        apply_at_end: bool = False,
    ) -> None:
        super().__init__()
        self._settings = Options(
            _API,
            decay,
            use_num_updates=use_num_updates,
            dtype=dtype,
            buffer_policy=buffer_policy,
            nonfinite=nonfinite,
            update_every=update_every,
            update_after=update_after,
            exclude=exclude,
            device=device,
            pin_memory=pin_memory,
            apply_at_end=apply_at_end,
        )
        self.decay: Decay | Schedule = self._settings.decay
        self.apply_at_end = self._settings.apply_at_end
        self._options = self._settings.ema_options
        self._ema: EMA | None = None
        # trainer.global_step at the last update (dt counts from it) and at the last batch end
        # (should_update is asked once per step): counted by the Trainer that set them.
        self._updated_at = 0
        self._seen = 0
        self._loaded: dict[str, Any] | None = None  # this run's checkpoint state, not yet applied
        self._restored: str | None = None  # this run's checkpoint: "averages", "empty", "missing"
        self._begun = False  # this run's checkpoint (or its absence) was taken into account
        self._stored = False  # the averages are in the model (an evaluation loop runs)
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        """The constructor call: the decay and the options that differ from the defaults."""
        return self._settings.call(type(self).__name__)

    @property
    def ema(self) -> EMA:
        """The :class:`functional_ema.EMA` of the LightningModule (made when ``fit`` starts).

        Raises:
            RuntimeError: Before any ``fit`` (or evaluation of a checkpoint) made it.
        """
        if self._ema is None:
            raise RuntimeError(
                message(
                    "EMACallback.ema",
                    "no averages yet",
                    "<root>",
                    "an EMA made when training started",
                    "none: no fit (nor evaluation of a checkpoint holding averages) ran with "
                    "this callback since it was made or since a checkpoint without averages "
                    "was loaded",
                    "Read it after trainer.fit(model) (or during it, from training hooks).",
                )
            )
        return self._ema

    def should_update(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether to update the averages now, after optimizer step ``step``; override it.

        Called once per new optimizer step (``trainer.global_step``, 1 after the first);
        ``True`` by default. Returning ``False`` skips the update: the next one covers the
        skipped steps too (its ``dt`` counts every step since the last update), as
        ``update_every`` does. E.g. ``return trainer.current_epoch >= 2`` starts averaging
        at the third epoch (with ``update_after`` the averages copy the weights first).
        """
        del trainer, step
        return True

    # --- making the averages -----------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse Lightning's ``FSDPStrategy`` (FSDP1); start a run (before a checkpoint loads)."""
        del pl_module, stage
        fsdp1 = getattr(pl.strategies, "FSDPStrategy", None)
        if fsdp1 is not None and isinstance(trainer.strategy, fsdp1):
            raise wrong_value(
                _API,
                "unsupported strategy",
                "trainer.strategy",
                "a strategy whose parameters keep their names: single device, DDP, or "
                "ModelParallelStrategy (FSDP2)",
                "FSDPStrategy, whose FSDP1 wrappers flatten the parameters",
                "Shard with FSDP2: strategy=ModelParallelStrategy() and fully_shard in "
                "configure_model; the averages are then shard-local DTensors.",
            )
        # Every run (fit, validate, test, predict) calls setup before restoring its ckpt_path:
        # what an earlier run loaded but never applied is not this run's.
        self._loaded = self._restored = None
        self._begun = False

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take this run's checkpoint (or its absence) into account, once per run.

        Runs when the averages are first needed (the first validation or training hook), after
        Lightning restored the checkpoint, the model and ``trainer.global_step``.
        """
        fitting = trainer.state.fn == "fit"
        restored = self._restored
        if restored is None and trainer.ckpt_path:
            restored = "missing"  # a checkpoint without callbacks' state (weights only)
        if restored == "missing" and fitting:
            raise self._no_averages_to_resume(None)
        loaded, self._loaded = self._loaded, None
        if restored in ("missing", "empty"):
            self._ema = None  # the averages of other weights than the checkpoint's
            return
        ema = self._ema if self._ema is not None and self._ema.model is pl_module else None
        if loaded is not None:
            # Not inference tensors (validate/test/predict run in inference mode): a later
            # fit updates them in place.
            with torch.inference_mode(False):
                if ema is None:
                    ema = EMA(pl_module, self.decay, **self._options)
                own = ema.state_dict(keep_vars=True)
                ema.load_state_dict(_sharded_like(loaded["ema"], own), keep_hyperparameters=True)
            self._ema = ema
            # Resuming restored global_step; an evaluation did not (the counters then start
            # at the update the checkpoint saved, for a later fit of these weights).
            self._updated_at = loaded["updated_at"]
            self._seen = trainer.global_step if fitting else self._updated_at
        elif ema is not None and fitting:
            # Another fit of the same model: the same averages go on. Counted from this
            # Trainer's global_step (a new Trainer starts at 0), the steps seen but not yet
            # covered by an update (declined by should_update) still owed to the next one.
            owed = max(0, self._seen - self._updated_at)
            self._seen = trainer.global_step
            self._updated_at = self._seen - owed

    def _ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EMA | None:
        """The EMA of ``pl_module``, made (and this run's checkpoint applied) where needed.

        While fitting it is made from the module as it is (moved, converted, sharded and
        restored by then), unless the averages of this module go on (another fit) or come
        from the checkpoint; for an evaluation, the averages of this module, from the
        checkpoint or an earlier fit (otherwise ``None``: nothing to evaluate but the live
        weights).
        """
        if not self._begun:
            self._begin(trainer, pl_module)
            self._begun = True
        ema = self._ema
        if ema is None or ema.model is not pl_module:
            if trainer.state.fn != "fit":
                return None
            with torch.inference_mode(False):  # a fit's validation may run in inference mode
                ema = EMA(pl_module, self.decay, **self._options)
            self._ema = ema
            self._updated_at = self._seen = trainer.global_step
        return ema

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the averages (if the sanity check did not): the model is final by now."""
        self._ensure(trainer, pl_module)

    # --- updating ----------------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Update after each optimizer step (``dt`` = optimizer steps since the last update)."""
        del outputs, batch, batch_idx
        step = trainer.global_step
        if step <= self._seen:
            return  # no optimizer step since the last batch (accumulating)
        self._seen = step
        if not self.should_update(trainer, step):
            return
        ema = self._ensure(trainer, pl_module)
        if ema is not None:
            ema.update(dt=step - self._updated_at)
            self._updated_at = step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``apply_at_end``, copy the averages into the model.

        After every ``on_train_end`` hook (``ModelCheckpoint`` saves the last checkpoint
        there, with the live weights) and after the strategy's teardown, which may have moved
        the model to the CPU: the averages are copied across devices (and cast to the
        model's dtypes, as :meth:`EMA.copy_to`).
        """
        del trainer
        ema = self._ema
        if self.apply_at_end and ema is not None and ema.model is pl_module:
            held = ema.state()
            live = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
            with torch.no_grad():
                for name, average in {**held["params"], **held["buffers"]}.items():
                    live[name].copy_(average)

    # --- evaluating on the averages ----------------------------------------------------

    def _store(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stored:
            return
        ema = self._ensure(trainer, pl_module)
        if ema is None:
            path = trainer.ckpt_path
            if path:
                got = f"a checkpoint without them ({path})"
            else:
                got = f"neither (trainer.{trainer.state.fn} without ckpt_path)"
            if str(path) not in self._warned:  # once per checkpoint, once without
                self._warned.add(str(path))
                pl.utilities.rank_zero_warn(
                    message(
                        _API,
                        "no averages to evaluate",
                        "<root>",
                        "averages from a fit with this callback, or a checkpoint holding them",
                        got,
                        "The live weights are evaluated. Pass ckpt_path=... of a checkpoint "
                        "saved with EMACallback, or evaluate with the callback that fitted.",
                    ),
                    category=UserWarning,
                )
            return
        ema.store()
        self._stored = True

    def _restore(self) -> None:
        if self._stored and self._ema is not None:
            self._stored = False
            self._ema.restore()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the averages into the model (the sanity check's too)."""
        self._store(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the live weights back, bit for bit (after the ``on_*_epoch_end`` hooks)."""
        self._restore()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the averages into the model."""
        self._store(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the live weights back, bit for bit (after the ``on_*_epoch_end`` hooks)."""
        self._restore()

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the averages into the model."""
        self._store(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the live weights back, bit for bit (after the ``on_*_epoch_end`` hooks)."""
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Put the live weights back if the run stopped during an evaluation loop."""
        del trainer, pl_module, exception
        self._restore()

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The averages, counters and settings (:meth:`EMA.state_dict`), for the checkpoint.

        Plain values and tensors (``torch.load(weights_only=True)`` reads them). Sharded
        (FSDP2) averages are gathered into full CPU tensors on rank 0; every rank must
        call this (Lightning does, when it saves a checkpoint). Before the averages exist,
        ``{"format": 1, "ema": None}``: Lightning leaves empty states out of checkpoints, and
        this one says that the checkpoint was saved with the callback, before training
        started (resuming from it starts the averages then, as the uninterrupted run did).
        """
        if self._loaded is not None:  # loaded for this run, not applied yet: still current
            return self._loaded
        if self._ema is None:
            return {"format": _FORMAT, "ema": None}
        return {
            "format": _FORMAT,
            "ema": _gathered(dict(self._ema.state_dict())),
            "updated_at": self._updated_at,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note whether the checkpoint holds this callback's averages (before they load).

        Raises:
            ValueError: ``fit`` resumes from a checkpoint without this callback's state (it
                would silently start new averages). Validation, test and predict evaluate
                the live weights of such a checkpoint, with a warning.
        """
        del pl_module
        states = checkpoint.get("callbacks") or {}
        key = next((k for k in (self.state_key, self._legacy_state_key) if k in states), None)
        if key is None and trainer.state.fn == "fit":
            raise self._no_averages_to_resume(states)
        if key is not None:
            _check_state(states[key])
        if key is None:
            self._restored = "missing"
        elif states[key]["ema"] is None:  # saved before the averages were made
            self._restored = "empty"
        else:
            self._restored = "averages"
        if self._restored != "averages":
            self._ema = None  # the averages of other weights than the checkpoint's
        self._loaded = None
        self._begun = False  # a checkpoint restored during the run (e.g. the LR finder's) too

    def _no_averages_to_resume(self, states: dict[Any, Any] | None) -> ValueError:
        if states is None:
            got = "a checkpoint without callbacks' state (saved with weights only)"
        elif not states:
            got = "a checkpoint without any callback's state"
        else:
            got = f"only the states of {short_list(str(k) for k in states)}"
        return wrong_value(
            _API,
            "resuming from a checkpoint without averages",
            f"checkpoint['callbacks'][{self.state_key!r}]",
            "the state EMACallback saved with the checkpoint",
            got,
            "Resume from a checkpoint saved with EMACallback, or start a new fit without "
            "ckpt_path (loading the weights with model.load_state_dict(torch.load(path)"
            "['state_dict'])): its averages start from those weights.",
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take what :meth:`state_dict` saved; applied when the averages are next needed.

        Lightning calls it while restoring a ``ckpt_path``; the state applies to that run
        (the next run drops it if this one did not use it). The constructor's settings are
        kept (decay, schedule, ``update_every``, ...); the averages, the step and the
        update-timing counters are loaded.

        Raises:
            ValueError: ``state_dict`` was not saved by this callback.
        """
        _check_state(state_dict)
        self._loaded = None if state_dict["ema"] is None else state_dict


def _check_state(state: Any) -> None:
    """Refuse a state :meth:`EMACallback.state_dict` did not save (before anything is set)."""
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        readable = False
    elif state.get("ema") is None:  # saved before the averages existed
        readable = set(state) == {"format", "ema"}
    else:
        readable = isinstance(state["ema"], dict) and isinstance(state.get("updated_at"), int)
    if not readable:
        raise wrong_value(
            "EMACallback.load_state_dict",
            "unreadable state",
            "checkpoint['callbacks']['EMACallback']",
            f"a dict with format={_FORMAT}, 'ema' and 'updated_at' (or 'ema': None alone)",
            describe(state),
            "Load a checkpoint saved by a Trainer with EMACallback.",
        )
