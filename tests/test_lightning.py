"""``functional_ema.lightning.EMACallback`` under a real Lightning Trainer, on the CPU.

Every check is exact: the callback's averages against an ``fe.EMA`` driven by hand with the
weights recorded after each optimizer step, a resumed run against an uninterrupted one, two
DDP / FSDP2 processes against one, evaluation outputs against ``ema.shadow``. The last test
compares with Lightning's own ``WeightAveraging`` (memory, time per update, and the averages
within a tolerance) and prints the numbers that ``docs/lightning.md`` quotes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_bits_equal
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

import functional_ema as fe
from functional_ema.lightning import EMACallback


pytestmark = [
    # Lightning 2.6.6's own data loading warns about torch's LeafSpec (torch >= 2.10).
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
    # Most runs here train without validation data.
    pytest.mark.filterwarnings(
        "ignore:You defined a `validation_step` but have no `val_dataloader`"
        ":lightning.fabric.utilities.warnings.PossibleUserWarning"
    ),
    # Tiny in-memory DataLoaders: worker processes would only slow these tests down.
    pytest.mark.filterwarnings(
        "ignore:The '\\w+' does not have many workers"
        ":lightning.fabric.utilities.warnings.PossibleUserWarning"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "lightning_ddp_script.py"
EXAMPLE = ROOT / "examples" / "lightning_ema.py"
STAGES = ("val", "test", "predict")


class Net(pl.LightningModule):
    """A tiny MLP with BatchNorm (buffers, one of them an integer) that keeps its outputs."""

    def __init__(self, fail_validation: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.outputs: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
        self.fail_validation = fail_validation

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def _keep(self, stage: str, batch: tuple[Tensor, Tensor]) -> Tensor:
        out = self(batch[0])
        self.outputs[stage].append(out.detach().clone())
        return out

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self.fail_validation and self.trainer.global_step > 0:
            raise RuntimeError("stopped during validation")
        self._keep("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._keep("test", batch)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._keep("predict", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(batches: int, seed: int = 1, batch_size: int = 4) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed)
    n = batches * batch_size
    data = TensorDataset(torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen))
    return DataLoader(data, batch_size=batch_size)


def trainer(callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "max_epochs": 2,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


class Probe(pl.Callback):
    """Records the weights when training starts and after each optimizer step (with its dt)."""

    def __init__(self) -> None:
        self.initial: dict[str, Tensor] = {}
        self.steps: list[tuple[int, dict[str, Tensor]]] = []
        self.seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial, self.seen = weights(pl_module), trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if trainer.global_step > self.seen:
            self.steps.append((trainer.global_step - self.seen, weights(pl_module)))
            self.seen = trainer.global_step


def replay(
    initial: dict[str, Tensor], steps: list[tuple[int, dict[str, Tensor]]], **options: Any
) -> fe.EMA:
    """A plain ``fe.EMA`` updated by hand with the recorded weights (``dt`` as recorded)."""
    model = Net()
    model.load_state_dict(initial)
    decay = options.pop("decay")
    ema = fe.EMA(model, decay, **options)
    for dt, values in steps:
        model.load_state_dict(values)
        ema.update(dt=dt)
    return ema


def state(ema: fe.EMA) -> dict[str, Any]:
    return dict(ema.state_dict())


def shadow_outputs(callback: EMACallback, data: DataLoader[Any]) -> list[Tensor]:
    with torch.no_grad():
        return [callback.ema.shadow(x) for x, _ in data]


# --- import and construction -----------------------------------------------------------


def test_import_functional_ema_does_not_import_lightning_and_a_missing_lightning_says_how() -> None:
    code = (
        "import sys\n"
        "import functional_ema\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', "
        "'pytorch_lightning')], 'functional_ema imported Lightning'\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None\n"
        "try:\n"
        "    import functional_ema.lightning\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("functional_ema.lightning: Lightning is not installed"), done
    assert 'pip install "functional_ema[lightning]"' in done.stdout


def test_standalone_pytorch_lightning_is_used_when_lightning_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    import functional_ema

    standalone = types.ModuleType("pytorch_lightning")
    standalone.Callback = type("Callback", (), {})  # type: ignore[attr-defined]
    monkeypatch.setattr(functional_ema, "lightning", functional_ema.lightning)
    monkeypatch.delitem(sys.modules, "functional_ema.lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", standalone)
    module = importlib.import_module("functional_ema.lightning")
    assert module.pl is standalone
    assert issubclass(module.EMACallback, standalone.Callback)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"decay": 1.5}, ValueError, "EMACallback: .* at 'decay'"),
        ({"decay": fe.warmup(), "use_num_updates": True}, TypeError, "use_num_updates"),
        ({"decay": 0.9, "update_every": 0}, ValueError, "at 'update_every'"),
        ({"decay": 0.9, "buffer_policy": "mean"}, ValueError, "at 'buffer_policy'"),
        ({"decay": 0.9, "nonfinite": "ignore"}, ValueError, "at 'nonfinite'"),
        ({"decay": 0.9, "exclude": "head.*"}, TypeError, "at 'exclude'"),
        ({"decay": 0.9, "dtype": torch.int64}, TypeError, "at 'dtype'"),
        ({"decay": 0.9, "apply_at_end": 1}, TypeError, "at 'apply_at_end'"),
    ],
)
def test_options_are_checked_when_the_callback_is_made(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        EMACallback(**options)


def test_the_averages_do_not_exist_before_fit() -> None:
    with pytest.raises(RuntimeError, match=r"EMACallback.ema: no averages yet .* trainer.fit"):
        _ = EMACallback(0.9).ema


def test_fsdp1_strategy_is_refused_before_training() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    fake = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"FSDPStrategy, whose FSDP1 .*ModelParallelStrategy"):
        EMACallback(0.9).setup(fake, Net(), "fit")  # type: ignore[arg-type]


def test_a_foreign_checkpoint_state_is_refused() -> None:
    with pytest.raises(ValueError, match=r"EMACallback.load_state_dict: unreadable state"):
        EMACallback(0.9).load_state_dict({"latest_update_step": 3})


# --- updating --------------------------------------------------------------------------


def test_fit_averages_equal_an_ema_driven_by_hand() -> None:
    options = {"decay": 0.9, "use_num_updates": True, "buffer_policy": "average"}
    probe, callback = Probe(), EMACallback(**options)
    trainer([probe, callback]).fit(Net(), loader(5))

    assert [dt for dt, _ in probe.steps] == [1] * 10
    assert int(callback.ema.step) == 10
    assert_bits_equal(state(callback.ema), state(replay(probe.initial, probe.steps, **options)))
    live = probe.steps[-1][1]["net.0.weight"]
    assert not torch.equal(callback.ema.average("net.0.weight"), live)


class Recording(EMACallback):
    """Records each ``should_update`` call; ``skip_odd`` skips odd steps."""

    def __init__(self, *args: Any, skip_odd: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[int, int]] = []  # (step, batch count so far)
        self.skip_odd = skip_odd
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1
        super().on_train_batch_end(*args)

    def should_update(self, trainer: pl.Trainer, step: int) -> bool:
        self.asked.append((step, self.batches))
        return not (self.skip_odd and step % 2)


def test_gradient_accumulation_updates_once_per_window() -> None:
    probe, callback = Probe(), Recording(fe.tf_warmup(0.9))
    # 7 batches per epoch in windows of 3: optimizer steps after batches 3, 6, 7 of each epoch.
    trainer([probe, callback], accumulate_grad_batches=3).fit(Net(), loader(7))

    assert callback.asked == [(1, 3), (2, 6), (3, 7), (4, 10), (5, 13), (6, 14)]
    assert [dt for dt, _ in probe.steps] == [1] * 6
    assert int(callback.ema.step) == 6
    options = {"decay": fe.tf_warmup(0.9)}
    assert_bits_equal(state(callback.ema), state(replay(probe.initial, probe.steps, **options)))


def test_skipped_steps_are_covered_by_the_next_update_dt() -> None:
    probe, callback = Probe(), Recording(fe.half_life(3.0), skip_odd=True)
    trainer([probe, callback], accumulate_grad_batches=2, max_epochs=1).fit(Net(), loader(8))

    assert [step for step, _ in callback.asked] == [1, 2, 3, 4]
    assert int(callback.ema.step) == 4  # two updates, dt=2 each
    every_other = [(2, values) for _, values in probe.steps[1::2]]
    reference = replay(probe.initial, every_other, decay=fe.half_life(3.0))
    assert_bits_equal(dict(callback.ema.state()), dict(reference.state()))


# --- evaluating on the averages --------------------------------------------------------


class LiveWatch(pl.Callback):
    """Placed after EMACallback: the live weights before the swap and after the restore."""

    def __init__(self) -> None:
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before.append(weights(pl_module))  # before every on_validation_epoch_start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after.append(weights(pl_module))  # after EMACallback's on_validation_end


def test_validation_test_and_predict_run_on_the_averages() -> None:
    val = loader(2, seed=2)
    probe, watch, callback = Probe(), LiveWatch(), EMACallback(0.8)
    model = Net()
    initial = Net()
    initial.load_state_dict(model.state_dict())
    fit = trainer([probe, callback, watch], num_sanity_val_steps=2)
    fit.fit(model, loader(5), val)

    # The sanity check evaluated the averages as they start (the initial weights).
    sanity, *epochs = [model.outputs["val"][i : i + 2] for i in range(0, 6, 2)]
    with torch.no_grad():
        assert_bits_equal(sanity, [initial.eval()(x) for x, _ in val])
    # The last validation ran after the last update: its outputs are the shadow's.
    assert_bits_equal(epochs[-1], shadow_outputs(callback, val))
    # The live weights came back bit for bit after each validation (sanity check included).
    assert len(watch.before) == len(watch.after) == 3
    assert_bits_equal(watch.after, watch.before)
    # ... and the sanity check left the averages alone.
    assert_bits_equal(state(callback.ema), state(replay(probe.initial, probe.steps, decay=0.8)))

    live = weights(model)
    for stage, run in [
        ("val", lambda: fit.validate(model, val, verbose=False)),
        ("test", lambda: fit.test(model, val, verbose=False)),
        ("predict", lambda: fit.predict(model, val)),
    ]:
        model.outputs[stage].clear()
        run()
        assert_bits_equal(model.outputs[stage], shadow_outputs(callback, val))
        assert_bits_equal(weights(model), live)


def test_a_run_stopped_during_validation_gets_its_live_weights_back() -> None:
    model, watch = Net(fail_validation=True), LiveWatch()
    callback = EMACallback(0.5)
    fit = trainer([callback, watch], max_epochs=3)
    with pytest.raises(RuntimeError, match="stopped during validation"):
        fit.fit(model, loader(3), loader(1, seed=2))

    assert len(watch.before) == 1 and not watch.after
    assert_bits_equal(weights(model), watch.before[0])
    model.train()  # Lightning leaves it in eval mode after the error
    callback.ema.update()  # not stuck between store() and restore()


def tensors(module: nn.Module) -> dict[str, Tensor]:
    """``weights(module)`` while the averages are in (``state_dict()`` raises then)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.detach().clone() for name, t in named}


class EpochEndNet(Net):
    """Records its weights in its own ``on_*_epoch_end`` hooks (which run after callbacks')."""

    def __init__(self) -> None:
        super().__init__()
        self.at_epoch_end: dict[str, list[dict[str, Tensor]]] = {stage: [] for stage in STAGES}

    def on_validation_epoch_end(self) -> None:
        self.at_epoch_end["val"].append(tensors(self))

    def on_test_epoch_end(self) -> None:
        self.at_epoch_end["test"].append(tensors(self))

    def on_predict_epoch_end(self) -> None:
        self.at_epoch_end["predict"].append(tensors(self))


def test_the_module_epoch_end_hooks_see_the_averages_and_checkpoints_the_live_weights(
    tmp_path: Path,
) -> None:
    model, probe, callback = EpochEndNet(), Probe(), EMACallback(0.8)
    checkpoints = ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=-1)  # on_validation_end
    val = loader(1, seed=2)
    fit = trainer([probe, callback, checkpoints], enable_checkpointing=True)
    fit.fit(model, loader(3), val)
    fit.test(model, val, verbose=False)
    fit.predict(model, val)

    held = callback.ema.state()
    averages = {**held["params"], **held["buffers"]}
    averages = {name: averages[name] for name in tensors(model)}
    assert len(model.at_epoch_end["val"]) == 2  # two epochs
    for stage in STAGES:
        assert_bits_equal(model.at_epoch_end[stage][-1], averages)
    assert_bits_equal(weights(model), probe.steps[-1][1])  # the live weights, back
    for epoch, step in [(0, 3), (1, 6)]:
        saved = torch.load(tmp_path / f"epoch={epoch}-step={step}.ckpt", weights_only=True)
        assert_bits_equal(dict(saved["state_dict"]), probe.steps[step - 1][1])


@pytest.mark.parametrize("apply_at_end", [False, True])
def test_apply_at_end_leaves_the_averages_in_the_model_only_if_asked(
    apply_at_end: bool, tmp_path: Path
) -> None:
    probe, model = Probe(), Net()
    callback = EMACallback(0.7, apply_at_end=apply_at_end)
    # Stopped mid-epoch: ModelCheckpoint saves last.ckpt in its on_train_end.
    last = ModelCheckpoint(tmp_path, save_last=True, save_top_k=0)
    options = {"max_steps": 4, "max_epochs": None, "enable_checkpointing": True}
    trainer([probe, callback, last], **options).fit(model, loader(3))

    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert_bits_equal(dict(saved["state_dict"]), probe.steps[-1][1])  # live, to resume from
    averages = callback.ema.state()
    held = {**averages["params"], **averages["buffers"]}
    if apply_at_end:
        assert_bits_equal(weights(model), {name: held[name] for name in weights(model)})
    else:
        assert_bits_equal(weights(model), probe.steps[-1][1])
        assert not torch.equal(model.net[0].weight, held["net.0.weight"])


# --- checkpoints -----------------------------------------------------------------------


DIRPATH_CHANGED = "ignore:The dirpath has changed from:UserWarning"  # resumed in another folder


@pytest.mark.filterwarnings(DIRPATH_CHANGED)
def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    options = {"decay": fe.tf_warmup(0.9), "update_every": 2, "update_after": 1}
    data = loader(5)  # 5 steps per epoch: update_every=2 windows straddle the epochs

    torch.manual_seed(0)
    whole, whole_callback = Net(), EMACallback(**options)
    checkpoints = ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer([whole_callback, checkpoints], max_epochs=3, enable_checkpointing=True).fit(whole, data)
    first_epoch = tmp_path / "epoch=0-step=5.ckpt"

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed, callback = Net(), EMACallback(**options)
    checkpoints = ModelCheckpoint(tmp_path / "resumed", every_n_epochs=1, save_top_k=-1)
    trainer([callback, checkpoints], max_epochs=3, enable_checkpointing=True).fit(
        resumed, data, ckpt_path=first_epoch
    )

    assert_bits_equal(state(callback.ema), state(whole_callback.ema))
    assert_bits_equal(weights(resumed), weights(whole))
    assert int(callback.ema.step) == 14  # 15 steps, the first copied (update_after=1)
    saved = torch.load(first_epoch, weights_only=True)["callbacks"]["EMACallback"]
    assert saved["updated_at"] == 5 and saved["ema"]["_extra_state"]["pending"] == 0


def test_a_fresh_trainer_evaluates_the_averages_of_a_checkpoint(tmp_path: Path) -> None:
    val = loader(2, seed=2)
    model, callback = Net(), EMACallback(0.8)
    fit = trainer([callback], max_epochs=1)
    fit.fit(model, loader(4))
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    expected = shadow_outputs(callback, val)

    fresh, fresh_callback = Net(), EMACallback(0.8)
    trainer([fresh_callback]).validate(fresh, val, ckpt_path=path, verbose=False)
    assert_bits_equal(fresh.outputs["val"], expected)
    assert_bits_equal(weights(fresh), weights(model))  # the live weights, restored
    assert_bits_equal(state(fresh_callback.ema), state(callback.ema))

    other = Net()
    with pytest.warns(UserWarning, match="no averages to evaluate .* live weights are evaluated"):
        trainer([EMACallback(0.8)]).validate(other, val, verbose=False)
    with torch.no_grad():
        assert_bits_equal(other.outputs["val"], [other.eval()(x) for x, _ in val])


@pytest.mark.parametrize("skip_odd", [False, True])
def test_another_fit_of_the_same_model_continues_the_averages(skip_odd: bool) -> None:
    model, callback = Net(), Recording(0.8, skip_odd=skip_odd)
    first, second = Probe(), Probe()
    fit = trainer([first, callback], max_epochs=1)
    fit.fit(model, loader(3))
    fit.validate(model, loader(1, seed=2), verbose=False)  # in inference mode, in between
    # A new Trainer: its global_step starts again at 0.
    trainer([second, callback], max_epochs=1).fit(model, loader(3, seed=3))

    steps = first.steps + second.steps
    assert [dt for dt, _ in steps] == [1] * 6
    assert [step for step, _ in callback.asked] == [1, 2, 3] * 2
    if skip_odd:  # updates at the steps 2 of each fit; the first fit's step 3 is owed
        steps = [(2, steps[1][1]), (3, steps[4][1])]
    reference = replay(first.initial, steps, decay=0.8)
    assert_bits_equal(state(callback.ema), state(reference))
    assert int(callback.ema.step) == 6 - skip_odd


def test_a_checkpoint_evaluated_then_fine_tuned_continues_its_averages(tmp_path: Path) -> None:
    fit = trainer([EMACallback(0.8)], max_epochs=1)
    fit.fit(Net(), loader(3))
    path = tmp_path / "a.ckpt"
    fit.save_checkpoint(path)

    model, probe, callback = Net(), Probe(), EMACallback(0.8)
    other = trainer([probe, callback], max_epochs=1)
    other.validate(model, loader(1, seed=2), ckpt_path=path, verbose=False)
    other.fit(model, loader(3, seed=3))  # no ckpt_path: a fit of the checkpoint's weights

    saved = torch.load(path, weights_only=True)
    reference_model = Net()
    reference_model.load_state_dict(saved["state_dict"])
    reference = fe.EMA(reference_model, 0.8)
    reference.load_state_dict(saved["callbacks"]["EMACallback"]["ema"])
    assert_bits_equal(probe.initial, weights(reference_model))
    for dt, values in probe.steps:
        reference_model.load_state_dict(values)
        reference.update(dt=dt)
    assert [dt for dt, _ in probe.steps] == [1] * 3
    assert_bits_equal(state(callback.ema), state(reference))


def _plain_checkpoints(tmp_path: Path) -> tuple[Net, Path, Path]:
    """A model fitted without EMACallback, saved in full and with its weights only."""
    model, fit = Net(), trainer([], max_epochs=1)
    fit.fit(model, loader(3))
    full, weights_only = tmp_path / "plain.ckpt", tmp_path / "weights.ckpt"
    fit.save_checkpoint(full)
    fit.save_checkpoint(weights_only, weights_only=True)
    return model, full, weights_only


def test_resuming_from_a_checkpoint_without_averages_is_refused(tmp_path: Path) -> None:
    _, path, _ = _plain_checkpoints(tmp_path)
    callback = EMACallback(0.8)
    match = (
        r"EMACallback: resuming from a checkpoint without averages at "
        r".checkpoint\['callbacks'\]\['EMACallback'\].: .* got a checkpoint without any "
        r"callback's state\. Resume from a checkpoint saved with EMACallback, or start a new "
        r"fit without ckpt_path"
    )
    with pytest.raises(ValueError, match=match):
        trainer([callback], max_epochs=2).fit(Net(), loader(3), ckpt_path=path)
    with pytest.raises(RuntimeError, match="no averages yet"):
        _ = callback.ema


def test_evaluating_a_checkpoint_without_averages_runs_on_its_live_weights(
    tmp_path: Path,
) -> None:
    plain, full, weights_only = _plain_checkpoints(tmp_path)
    val = loader(1, seed=2)
    with torch.no_grad():
        expected = [plain.eval()(x) for x, _ in val]
    model, callback = Net(), EMACallback(0.8)
    fit = trainer([callback], max_epochs=1)
    fit.fit(model, loader(3))

    # The fit's averages are not those of the checkpoint's weights: dropped, with a warning.
    for path in (weights_only, full):  # the first one has no callbacks' state at all
        model.outputs["predict"].clear()
        match = rf"no averages to evaluate .* a checkpoint without them \({re.escape(str(path))}\)"
        with pytest.warns(UserWarning, match=match):
            fit.predict(model, val, ckpt_path=path)
        assert_bits_equal(model.outputs["predict"], expected)
        with pytest.raises(RuntimeError, match="no averages yet"):
            _ = callback.ema


def test_the_lr_finder_restoring_its_checkpoint_during_fit_is_not_refused(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.callbacks import LearningRateFinder

    finder = LearningRateFinder(num_training_steps=3, update_attr=False)
    model, probe, callback = Net(), Probe(), EMACallback(0.8)
    initial = weights(model)
    # When fit starts the finder saves a checkpoint (before the averages exist: the callback
    # saves that it was there), trains a few steps with its own callback alone, then restores
    # the checkpoint, this callback's state included, and training starts.
    options = {"max_epochs": 1, "default_root_dir": tmp_path}  # the finder's checkpoint
    trainer([finder, probe, callback], **options).fit(model, loader(4))

    assert_bits_equal(probe.initial, initial)
    assert [dt for dt, _ in probe.steps] == [1] * 4
    assert_bits_equal(state(callback.ema), state(replay(initial, probe.steps, decay=0.8)))


# --- two processes ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the DDP and the FSDP2 jobs of ``lightning_ddp_script.py`` at once; their folder."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    start = time.monotonic()
    jobs = []
    for kind in ("ddp", "fsdp"):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        env["OMP_NUM_THREADS"] = "1"  # every rank, and the reference: one thread each
        env.pop("LOCAL_RANK", None)
        log = (out / f"{kind}.log").open("w")
        command = [sys.executable, str(SCRIPT), kind, str(out)]
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        jobs.append((kind, proc, log))
    failed = []
    for kind, proc, log in jobs:
        try:
            code = proc.wait(timeout=max(1.0, 180 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"{kind}: {code}\n{(out / f'{kind}.log').read_text()[-4000:]}")
    assert not failed, "\n".join(failed)
    print(f"\nDDP + FSDP2 jobs (2 processes each, at once): {time.monotonic() - start:.1f} s")
    return out


def _one_process_reference() -> dict[str, Any]:
    """What the script's two resumed epochs give in one process, uninterrupted."""
    script: dict[str, Any] = {}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), script)  # its Net, data, OPTIONS
    train, val = script["data"]()
    torch.manual_seed(0)
    model, callback = script["Net"](), EMACallback(**script["OPTIONS"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: CPU kernels may round differently with more
    try:
        trainer([callback], max_epochs=2).fit(model, train, val)
    finally:
        torch.set_num_threads(threads)
    held = callback.ema.state()
    return {
        "averages": dict(sorted({**held["params"], **held["buffers"]}.items())),
        "live": dict(sorted(weights(model).items())),
        "val_outputs": model.val_outputs[-2:],  # the second epoch's validation
        "step": int(callback.ema.step),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_hold_the_averages_of_one(distributed: Path, kind: str) -> None:
    reference = _one_process_reference()
    ranks = [torch.load(distributed / f"{kind}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["global_step"] == 10 and rank["step"] == reference["step"] == 10
        assert_bits_equal(rank["averages"], reference["averages"])
        assert_bits_equal(rank["live"], reference["live"])
        assert_bits_equal(rank["val_outputs"], reference["val_outputs"])
        # Each update hook (one per batch) ran without any communication.
        assert rank["hook_calls"] == 5 and rank["collectives"] == 0  # the resumed epoch
    full = {name: tuple(t.shape) for name, t in reference["averages"].items()}
    for name, shape in ranks[0]["local_shapes"].items():
        # FSDP2: each rank holds half of each average (dim 0 split in two); DDP: all of it.
        expected = full[name] if kind == "ddp" else (-(-full[name][0] // 2), *full[name][1:])
        assert shape == expected, (name, shape, full[name])


# --- the example and Lightning's own WeightAveraging ----------------------------------


@pytest.mark.filterwarnings(DIRPATH_CHANGED)
def test_example_runs_with_a_tiny_budget(capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    result = main(epochs=2, seed=0)
    assert result["steps"] == 2 * result["steps_per_epoch"]
    for key in ("live_val_loss", "ema_val_loss"):
        assert isinstance(result[key], float) and result[key] >= 0.0, result
    assert result["resumed_bit_identical"] is True
    assert "ema" in capsys.readouterr().out


def test_against_lightning_weight_averaging(monkeypatch: pytest.MonkeyPatch) -> None:
    from functional_ema._kernels import compiled

    # The eager path: no kernel build in the background (seconds, on a CPU) during the test;
    # docs/lightning.md also gives the compiled kernel's time, measured once it is built.
    monkeypatch.setattr(compiled, "enabled", False)
    decay, steps = 0.99, 40

    class Wide(Net):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Linear(4, 256), nn.BatchNorm1d(256), nn.ReLU()]
            layers += [nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(256, 1))

    clocks: dict[str, list[float]] = {"fe": [], "lightning": []}

    class OurEMA(EMACallback):
        def on_train_batch_end(self, *args: Any) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(*args)
            clocks["fe"].append(time.perf_counter() - start)

    class TheirEMA(WeightAveraging):
        def on_train_batch_end(self, *args: Any) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(*args)
            clocks["lightning"].append(time.perf_counter() - start)

    # The same convention as AveragedModel: the first update copies the weights
    # (update_after=1), later ones average; floating buffers averaged too (use_buffers=True).
    ours = OurEMA(decay, update_after=1, buffer_policy="average")
    theirs = TheirEMA(multi_avg_fn=get_ema_multi_avg_fn(decay))
    model = Wide()
    trainer([ours, theirs], max_steps=steps, max_epochs=None).fit(model, loader(steps, 3, 32))

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    held = ours.ema.state()
    ours_bytes = nbytes([*held["params"].values(), *held["buffers"].values(), held["step"]])
    ours_bytes += nbytes([held["nonfinite_updates"]])
    assert theirs._average_model is not None
    their_state = theirs._average_model.state_dict()
    theirs_bytes = nbytes(their_state.values())
    model_bytes = nbytes(model.state_dict().values())

    averaged = {**held["params"], **held["buffers"]}
    largest, scaled, same, total = 0.0, 0.0, 0, 0
    for name, mine in averaged.items():
        other = their_state[f"module.{name}"]
        if mine.is_floating_point():
            # lerp (theirs) and TF's s - (s - v) * (1 - d) (ours) round differently.
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)
            gap = float((mine - other).abs().max())
            largest = max(largest, gap)
            scaled = max(scaled, gap / float(mine.abs().max()))
            same += int((mine == other).sum())
            total += mine.numel()
    batches = their_state["module.net.1.num_batches_tracked"]
    per_step = {key: sorted(times)[len(times) // 2] * 1e6 for key, times in clocks.items()}
    print(
        f"\nparameters+buffers of the model: {model_bytes / 1024:.1f} KiB"
        f"\nextra tensors held: fe {ours_bytes / 1024:.1f} KiB,"
        f" WeightAveraging {theirs_bytes / 1024:.1f} KiB"
        f"\nupdate per step (median of {steps}, eager path): fe {per_step['fe']:.0f} us,"
        f" WeightAveraging {per_step['lightning']:.0f} us"
        f"\naverages: {same}/{total} elements identical, largest difference {largest:.2e}"
        f" ({scaled:.2e} of the tensor's largest magnitude)"
        f"\nnum_batches_tracked: fe {int(held['buffers']['net.1.num_batches_tracked'])},"
        f" WeightAveraging {int(batches)}"
    )
    assert int(held["buffers"]["net.1.num_batches_tracked"]) == steps  # copied, not averaged
