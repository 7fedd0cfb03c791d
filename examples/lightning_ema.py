"""Lightning with ``EMACallback``: validation on the averages, checkpoints, a bit-identical resume.

A small regressor trained with a large, noisy learning rate, where the averages generalise
better than the live weights. ``EMACallback`` updates them after each optimizer step,
validates on them (the live weights are put back after each validation, bit for bit) and
saves them in every checkpoint; a second run, killed after half the epochs and resumed from
its checkpoint, ends with the same averages, bit for bit.

Run it on a CPU in seconds::

    python examples/lightning_ema.py
    python examples/lightning_ema.py --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import functional_ema as fe
from functional_ema.lightning import EMACallback


BATCH = 32


class Regressor(pl.LightningModule):
    """An MLP fitted to a noisy linear target with SGD at a high learning rate."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))  # on the averages (EMACallback)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """16 training batches of a noisy linear target, and a clean validation set."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(16, 1, generator=gen)
    x = torch.randn(16 * BATCH, 16, generator=gen)
    y = x @ target + 0.5 * torch.randn(16 * BATCH, 1, generator=gen)
    x_val = torch.randn(256, 16, generator=gen)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    return train, DataLoader(TensorDataset(x_val, x_val @ target), batch_size=128)


def callback() -> EMACallback:
    """The same callback in both runs (its settings are not taken from the checkpoint)."""
    return EMACallback(fe.warmup(0.99))


def make_trainer(epochs: int, callbacks: list[Any], checkpoints: Path) -> pl.Trainer:
    checkpoint = ModelCheckpoint(checkpoints, every_n_epochs=1, save_top_k=-1)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[*callbacks, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@torch.no_grad()
def loss_of(model: nn.Module, data: DataLoader[Any]) -> float:
    model.eval()
    losses = [F.mse_loss(model(x), y, reduction="sum") for x, y in data]
    return float(sum(losses) / sum(len(x) for x, _ in data))


def main(epochs: int = 6, seed: int = 0) -> dict[str, Any]:
    """Train, compare live and averaged weights, resume from the middle; return the numbers."""
    if epochs < 2:
        raise ValueError(
            f"main: epochs must be at least 2 (to resume from the middle), got {epochs}"
        )
    train, val = loaders(seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        model, ema = Regressor(), callback()
        trainer = make_trainer(epochs, [ema], Path(tmp) / "run")
        trainer.fit(model, train, val)  # each validation runs on the averages
        validated = trainer.validate(model, val, verbose=False)[0]["val_loss"]

        live_loss = loss_of(model, val)  # the live weights: the model still holds them
        ema_loss = loss_of(ema.ema.shadow, val)  # the averages, without touching the model

        # A second run, killed after half the epochs: resume from that checkpoint.
        middle = epochs // 2
        saved = sorted((Path(tmp) / "run").glob(f"epoch={middle - 1}-*.ckpt"))[0]
        torch.manual_seed(seed + 1)  # another initialisation: the checkpoint restores all
        resumed = callback()
        make_trainer(epochs, [resumed], Path(tmp) / "resumed").fit(
            Regressor(), train, val, ckpt_path=saved
        )
        final, again = ema.ema.state_dict(), resumed.ema.state_dict()
        identical = final.keys() == again.keys() and all(
            torch.equal(final[k], again[k]) for k in final if isinstance(final[k], Tensor)
        )

    steps_per_epoch = len(train)
    print(f"live weights    val loss {live_loss:.4f}")
    print(f"ema (averages)  val loss {ema_loss:.4f}  (trainer.validate: {validated:.4f})")
    print(f"resumed from epoch {middle}: bit-identical averages: {identical}")
    return {
        "steps": int(ema.ema.step),
        "steps_per_epoch": steps_per_epoch,
        "live_val_loss": live_loss,
        "ema_val_loss": ema_loss,
        "validated_val_loss": float(validated),
        "resumed_bit_identical": identical,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    main(epochs=arguments.epochs, seed=arguments.seed)
