"""Exponential moving averages in the Hugging Face ``Trainer``: :class:`EMACallback`.

One :class:`~transformers.TrainerCallback` that keeps an :class:`~functional_ema.EMA` of the
trained model: it updates the averages once per optimizer step (after the last micro-batch of
each gradient-accumulation window), runs the Trainer's evaluations on the averages (each forward
puts them in and the live weights back, bit for bit, also when it raises), writes the averages
beside each checkpoint (``checkpoint-N/ema.pt``), reads them back when ``trainer.train()``
resumes, and can copy them into the model when training ends.

This module imports ``transformers`` (``pip install 'functional_ema[transformers]'``);
``import functional_ema`` never does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from functional_ema._errors import describe, message, short_list, wrong_type, wrong_value


try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - depends on what is installed
    raise ImportError(
        message(
            "functional_ema.transformers",
            "a missing dependency",
            "<root>",
            "the Hugging Face transformers library",
            f"{type(error).__name__} ({error})",
            "Install it with: pip install 'functional_ema[transformers]'.",
        )
    ) from error

from functional_ema._adapter import EMA
from functional_ema._callbacks import Options
from functional_ema._io import load, save
from functional_ema._types import BufferPolicy, Decay, NonFinite, Schedule


__all__ = ["CHECKPOINT_FILE", "EMACallback"]

CHECKPOINT_FILE = "ema.pt"
"""The file :class:`EMACallback` writes into each ``checkpoint-N`` folder."""

_FORMAT = 1
_API = "EMACallback"


class _Hook:
    """A forward (pre-)hook of :class:`EMACallback`; inert in a copy or a pickle of the model.

    ``copy.deepcopy(model)`` or pickling it while the callback is armed (e.g. ``ema.shadow``
    built in a later callback's ``on_evaluate``) gives the copy hooks that do nothing: its
    forwards run its own weights and never touch the EMA.
    """

    def __init__(self, call: Callable[[nn.Module], None] | None) -> None:
        self.call = call

    def __call__(self, module: nn.Module, *args: Any) -> None:
        del args
        if self.call is not None:
            self.call(module)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Hook:
        return _Hook(None)

    def __reduce__(self) -> tuple[type[_Hook], tuple[None]]:
        return _Hook, (None,)


class EMACallback(TrainerCallback):
    r"""Keep an :class:`~functional_ema.EMA` of the model a ``Trainer`` trains.

    Add it to ``Trainer(callbacks=[...])``; it builds ``fe.EMA(model, decay, ...)`` with its
    arguments when ``trainer.train()`` begins (after the Trainer has loaded the checkpoint it
    resumes from), from the parameters trainable then.

    - **Updates.** One ``ema.update(dt)`` per optimizer step, in ``on_step_end``, with ``dt``
      the steps since the last update read from ``state.global_step``: with
      ``gradient_accumulation_steps=k`` that is once per ``k`` micro-batches, never per
      micro-batch.
    - **Evaluation on the averages.** The Trainer has no "evaluation begins" event, so the
      callback arms itself in ``on_step_end`` / ``on_epoch_end`` when ``control.should_evaluate``
      is set (and in ``on_train_begin`` with ``eval_on_start``): it registers a forward pre-hook
      and a forward hook (``always_call=True``) on each of the model's modules. While armed,
      each forward in eval mode runs on the averages: the first module called puts them in
      (``ema.store()``) and the end of that module's forward puts the live weights back
      (``ema.restore()``, bit for bit), also when the forward raises. Nested modules run inside
      that one swap; a submodule called on its own (``model.get_encoder()(...)`` in
      ``generate``, a ``compute_loss`` that calls ``model.bert``) gets its own. Between
      forwards (metrics, logging, saving) the model holds its live weights, so an exception
      anywhere in the evaluation leaves the live weights in the model (torch runs
      ``always_call`` hooks for an ``Exception``, not a ``KeyboardInterrupt``: an interrupt
      inside a forward leaves the averages in until ``callback.ema.restore()`` or the
      callback's next event). ``on_evaluate`` removes the hooks (with several evaluation
      datasets, the next step, epoch or save does). The metrics, the choice of the best
      checkpoint (``metric_for_best_model``) and early stopping all see the averages.
    - **Checkpoints.** In ``on_save`` (on the main process) the averages, the EMA's counters and
      settings, and the global step are written with :func:`functional_ema.save` (atomic) to
      ``checkpoint-N/`` :data:`CHECKPOINT_FILE`; ``torch.load(weights_only=True)`` reads it.
      ``save_total_limit`` removes it with its folder.
    - **Resuming.** When ``trainer.train(resume_from_checkpoint=...)`` resumes at global step
      ``N`` (``N > 0``), ``on_train_begin`` loads ``<args.output_dir>/checkpoint-N/ema.pt`` (or
      the file in :attr:`resume_from`), so that the averages continue as if training had not
      stopped: the final averages equal an uninterrupted run's bit for bit (given the Trainer's
      own deterministic resume). A missing file is an error, not fresh averages, and leaves
      :attr:`ema` as it was.
    - **End.** With ``load_best_model_at_end`` the averages of the best checkpoint are loaded
      with it; with ``apply_at_end=True`` the averages are then copied into the model
      (``ema.copy_to(model)``), so ``trainer.save_model()`` saves them.

    Add this callback after any callback of your own that sets ``control.should_evaluate``
    (the Trainer's own flow callback always comes first). A manual ``trainer.evaluate()`` or
    ``trainer.predict()`` outside ``train()`` runs on the model as it is (the hooks exist only
    during training, so your own forwards are never redirected): evaluate the averages with
    ``with callback.ema.swap(): trainer.evaluate()``, or pass ``apply_at_end=True``.

    Each forward during an evaluation pays one ``ema.store()`` / ``ema.restore()``: a copy of
    the trainable parameters out, the averages in, the copy back. Generation pays it once per
    generated token, a ``compute_loss`` that calls submodules once per call.

    Args:
        decay: The decay or schedule, as for :class:`~functional_ema.EMA` (e.g. ``0.999`` or
            ``fe.warmup(0.9999)``).
        use_num_updates: As for :class:`~functional_ema.EMA` (TF's ``num_updates`` warmup).
        dtype: As for :class:`~functional_ema.EMA` (e.g. float32 averages of a bfloat16 model).
        buffer_policy: As for :class:`~functional_ema.EMA`.
        nonfinite: As for :class:`~functional_ema.EMA`.
        update_every: As for :class:`~functional_ema.EMA`: update on every ``k``-th optimizer
            step, for ``dt=k``.
        update_after: As for :class:`~functional_ema.EMA`: follow the weights for the first
            ``n`` optimizer steps.
        exclude: As for :class:`~functional_ema.EMA`.
        device: As for :class:`~functional_ema.EMA` (e.g. ``"cpu"`` to keep the averages off
            the accelerator).
        pin_memory: As for :class:`~functional_ema.EMA`.
        apply_at_end: Copy the averages into the model when training ends.

    Raises:
        TypeError: An argument of the wrong type (checked here, before training).
        ValueError: A decay outside [0, 1], an unknown ``buffer_policy`` or ``nonfinite``, or
            a count out of range.

    Attributes:
        decay: The decay or schedule each new EMA is built with.
        apply_at_end: Whether the averages are copied into the model at the end.
        resume_from: The checkpoint folder to read the averages from when training resumes
            (``None``: ``<args.output_dir>/checkpoint-<global step>``, where the Trainer writes
            them); set it to resume from a checkpoint outside ``output_dir``.

    Example:
        >>> import tempfile, torch
        >>> from transformers import Trainer, TrainingArguments
        >>> from functional_ema.transformers import EMACallback
        >>> class Regression(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = torch.nn.Linear(2, 1)
        ...     def forward(self, x, labels):
        ...         return {"loss": (self.linear(x).squeeze(-1) - labels).pow(2).mean()}
        >>> data = [{"x": torch.ones(2), "labels": torch.tensor(1.0)}] * 8
        >>> callback = EMACallback(0.9)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     args = TrainingArguments(
        ...         folder, max_steps=2, per_device_train_batch_size=4, report_to=[],
        ...         use_cpu=True, disable_tqdm=True, save_strategy="no",
        ...     )
        ...     trainer = Trainer(Regression(), args, train_dataset=data, callbacks=[callback])
        ...     _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> int(callback.ema.step)  # one update per optimizer step
        2
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
        self.resume_from: str | os.PathLike[str] | None = None
        self._ema: EMA | None = None
        self._last_step = 0  # state.global_step at the last update (or the resumed step)
        self._training = False  # between on_train_begin and on_train_end
        self._hooks: list[RemovableHandle] = []  # armed: the forward hooks of every module
        self._inside: list[nn.Module] = []  # forwards running on the averages, outermost first

    def __repr__(self) -> str:
        """The constructor call: the decay and the options that differ from the defaults."""
        return self._settings.call(type(self).__name__)

    @property
    def ema(self) -> EMA:
        """The :class:`~functional_ema.EMA` of the current (or last) ``trainer.train()``.

        Raises:
            RuntimeError: Before ``trainer.train()`` has begun.
        """
        if self._ema is None:
            raise RuntimeError(
                message(
                    "EMACallback.ema",
                    "no EMA yet",
                    "<root>",
                    "an EMA, built when trainer.train() begins",
                    "a callback whose training has not begun",
                    "Read callback.ema after trainer.train() has started (e.g. in another "
                    "callback or after it returns).",
                )
            )
        return self._ema

    # --- evaluation on the averages -------------------------------------------------------

    def _arm(self, model: nn.Module) -> None:
        """Run the forwards in eval mode on the averages until :meth:`_disarm`."""
        if not self._hooks:
            enter, leave = _Hook(self._enter), _Hook(self._leave)
            for module in model.modules():
                self._hooks.append(module.register_forward_pre_hook(enter))
                self._hooks.append(module.register_forward_hook(leave, always_call=True))

    def _enter(self, module: nn.Module) -> None:
        """A forward begins: the outermost one in eval mode puts the averages in."""
        if self._inside:
            self._inside.append(module)  # nested: the averages are in
            return
        ema = self._ema
        if ema is None or ema.model.training:
            return
        ema.store()
        self._inside.append(module)

    def _leave(self, module: nn.Module) -> None:
        """A forward ends (or raises): the outermost one puts the live weights back."""
        if self._inside and self._inside[-1] is module:
            self._inside.pop()
            if not self._inside:
                self.ema.restore()

    def _give_back(self) -> None:
        """Put the live weights back if a forward that stored the averages never ended.

        Torch runs ``always_call`` hooks for an ``Exception`` only: a ``KeyboardInterrupt``
        inside a forward leaves the averages in, until here or a ``callback.ema.restore()``.
        """
        inside, self._inside = self._inside, []
        ema = self._ema
        # The EMA's own record: the user may have restored by hand, as the refusals say.
        if inside and ema is not None and ema.stored:
            ema.restore()

    def _disarm(self) -> None:
        """Remove the hooks (and put the live weights back if an interrupt left the averages)."""
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.remove()
        self._give_back()

    # --- checkpoints -----------------------------------------------------------------------

    def _checkpoint_folder(self, args: TrainingArguments, state: TrainerState) -> str:
        return os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _load(self, ema: EMA, folder: str | os.PathLike[str], step: int, api: str) -> None:
        """Load ``folder/ema.pt`` into ``ema``, checking it was written at ``step``."""
        path = os.path.join(os.fspath(folder), CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                message(
                    api,
                    "no averages beside the checkpoint",
                    path,
                    f"the {CHECKPOINT_FILE} that EMACallback writes into each checkpoint",
                    "no such file",
                    "Resume from a checkpoint saved with EMACallback; if it is not under "
                    "args.output_dir, set callback.resume_from to its folder.",
                )
            )
        saved = load(path, map_location="cpu")
        keys = {"format", "global_step", "ema"}
        if not isinstance(saved, dict) or set(saved) != keys:
            got = short_list(saved) if isinstance(saved, dict) else describe(saved)
            raise wrong_value(
                api,
                "not an EMACallback checkpoint",
                path,
                f"a dict with keys {short_list(keys)}",
                got,
                "Point callback.resume_from at a checkpoint folder written with EMACallback.",
            )
        if saved["global_step"] != step:
            raise wrong_value(
                api,
                "averages of another step",
                path,
                f"averages saved at global step {step} (the checkpoint's)",
                f"global step {saved['global_step']!r}",
                "Resume from the checkpoint folder that holds these averages, or set "
                "callback.resume_from to the folder of the checkpoint you resume.",
            )
        ema.load_state_dict(saved["ema"])

    # --- the Trainer's events --------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Build the EMA from the model (and load the averages when resuming)."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise wrong_type(
                "EMACallback.on_train_begin",
                "no model from the Trainer",
                "model",
                "the nn.Module the Trainer trains",
                describe(model),
                "Add EMACallback to a transformers.Trainer (callbacks=[...]).",
            )
        self._disarm()  # an earlier train() that stopped while armed
        self._training = False
        ema = EMA(model, self.decay, **self._options)
        if state.global_step > 0:  # resumed: the Trainer loaded checkpoint-N's state
            folder = self.resume_from
            if folder is None:
                folder = self._checkpoint_folder(args, state)
            self._load(ema, folder, state.global_step, "EMACallback.on_train_begin")
        self._ema, self._last_step, self._training = ema, state.global_step, True
        if args.eval_on_start:
            self._arm(model)

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Make sure the live weights are in the model for the training step."""
        self._disarm()

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Make sure the live weights are in the model for the epoch."""
        self._disarm()

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Update the averages (once per optimizer step); arm if an evaluation follows."""
        if self._ema is None:
            return
        self._disarm()
        dt = state.global_step - self._last_step
        if dt >= 1:
            self._ema.update(dt=dt)
            self._last_step = state.global_step
        if control.should_evaluate:
            self._arm(self._ema.model)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Arm if the epoch's evaluation follows (``eval_strategy="epoch"``)."""
        if self._ema is not None and control.should_evaluate:
            self._arm(self._ema.model)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Disarm after an evaluation (of the last dataset)."""
        armed = bool(self._hooks)
        metrics = kwargs.get("metrics") or {}
        if not armed and self._training:
            warnings.warn(
                message(
                    "EMACallback.on_evaluate",
                    "an evaluation of the live weights",
                    "<root>",
                    "evaluations during training on the averages",
                    "an evaluation EMACallback was not told of (control.should_evaluate was "
                    "set after its on_step_end or on_epoch_end)",
                    "Add EMACallback after the callbacks that set control.should_evaluate.",
                ),
                UserWarning,
                stacklevel=2,
            )
        # One dataset ("eval_runtime"): done. Several ("eval_<name>_runtime"): stay armed
        # for the next one; the next step, epoch or save ends it.
        if "eval_runtime" in metrics or not any(k.endswith("_runtime") for k in metrics):
            self._disarm()

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write the averages into the checkpoint the Trainer has just saved."""
        self._disarm()
        if self._ema is None or not args.should_save:
            return
        folder = self._checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            raise wrong_value(
                "EMACallback.on_save",
                "no checkpoint folder",
                folder,
                "the folder the Trainer has just saved (args.output_dir/checkpoint-N)",
                "no such folder",
                "Hyperparameter-search runs save under run-<id>/ and are not supported; "
                "use a plain trainer.train().",
            )
        saved = {"format": _FORMAT, "global_step": state.global_step, "ema": self._ema.state_dict()}
        save(saved, os.path.join(folder, CHECKPOINT_FILE))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Load the best checkpoint's averages if asked, and copy them in with apply_at_end."""
        self._disarm()
        self._training = False
        if self._ema is None:
            return
        best, step = state.best_model_checkpoint, state.best_global_step
        if args.load_best_model_at_end and best is not None and step is not None:
            self._load(self._ema, best, step, "EMACallback.on_train_end")
        if self.apply_at_end:
            self._ema.copy_to(self._ema.model)
