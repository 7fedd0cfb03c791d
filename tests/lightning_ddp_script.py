"""Two CPU processes (gloo) training with ``EMACallback`` under Lightning's DDP or FSDP2.

Run by ``tests/test_lightning.py`` as ``python tests/lightning_ddp_script.py {ddp,fsdp} OUT``;
Lightning relaunches this script for rank 1. Both ranks see the same batches (no distributed
sampler), so the gradient averaged over ranks is each rank's own, bit for bit, and the run
equals a single process's with as many threads (the test sets ``OMP_NUM_THREADS=1``: CPU
kernels may round differently with another thread count). Each rank fits one epoch with a
checkpoint, then a fresh model, callback and Trainer resume from it for a second epoch,
validating on the averages each epoch, and writes ``OUT/{strategy}_rank{r}.pt``: the full
averages, the live weights, the validation outputs, the step counters and the collectives
counted inside the callback's update hook.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import functional_ema as fe
from functional_ema.lightning import EMACallback


OPTIONS: dict[str, Any] = {"decay": fe.tf_warmup(0.9), "update_every": 2}
BATCHES = 5  # per epoch (odd: update_every=2 windows straddle the epochs)


class Net(pl.LightningModule):
    """A tiny MLP with BatchNorm (buffers) whose validation outputs are kept."""

    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        self.shard = shard
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.val_outputs: list[Tensor] = []

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[3], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_outputs.append(self(batch[0]).detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data() -> tuple[DataLoader[Any], DataLoader[Any]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * BATCHES, 4, generator=gen), torch.randn(4 * BATCHES, 1, generator=gen)
    train = TensorDataset(x, y)
    val = TensorDataset(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen))
    return DataLoader(train, batch_size=4), DataLoader(val, batch_size=4)


class Collectives:
    """Count collectives (c10d calls and DTensor/functional ones) while entered."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "broadcast",
        "barrier",
        "send",
        "recv",
    )

    def __init__(self) -> None:
        self.total = 0

    def __enter__(self) -> Collectives:
        from torch.distributed import distributed_c10d
        from torch.distributed.tensor.debug import CommDebugMode

        self._saved = []
        for space in (torch.distributed, distributed_c10d):
            for name in self.NAMES:
                original = getattr(space, name)
                self._saved.append((space, name, original))
                setattr(space, name, self._counting(original))
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def _counting(self, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.total += 1
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self.total += self._mode.get_total_counts()
        for space, name, original in self._saved:
            setattr(space, name, original)


class CountingEMACallback(EMACallback):
    """EMACallback counting the collectives of its per-step hook."""

    collectives = 0
    updates = 0

    def on_train_batch_end(self, *args: Any) -> None:
        with Collectives() as counter:
            super().on_train_batch_end(*args)
        type(self).collectives += counter.total
        type(self).updates += 1


def strategy(kind: str) -> Any:
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def trainer(kind: str, epochs: int, callbacks: list[Any], ckpt_dir: Path | None) -> pl.Trainer:
    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(ckpt_dir, every_n_epochs=1, save_top_k=-1)]
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy(kind),
        max_epochs=epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def full(model: nn.Module, tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU copies of ``tree`` (DTensors gathered: a collective on every rank)."""
    dtensor = torch.distributed.tensor.DTensor
    return {
        name: (t.full_tensor() if isinstance(t, dtensor) else t).detach().cpu().clone()
        for name, t in sorted(tree.items())
    }


def main(kind: str, out: Path) -> None:
    shard = kind == "fsdp"
    train, val = data()
    torch.manual_seed(0)
    # The same class in both runs: a callback's state is saved under its class name.
    first = trainer(kind, 1, [CountingEMACallback(**OPTIONS)], out / f"{kind}_ckpt")
    first.fit(Net(shard), train, val)
    checkpoint = sorted((out / f"{kind}_ckpt").iterdir())[-1]

    torch.manual_seed(1)  # another initialisation: the checkpoint must restore everything
    model = Net(shard)
    CountingEMACallback.collectives = CountingEMACallback.updates = 0
    callback = CountingEMACallback(**OPTIONS)
    second = trainer(kind, 2, [callback], None)
    second.fit(model, train, val, ckpt_path=checkpoint)

    ema = callback.ema
    state = ema.state()
    result = {
        "averages": full(model, {**state["params"], **state["buffers"]}),
        "live": full(model, {**dict(model.named_parameters()), **dict(model.named_buffers())}),
        "local_shapes": {
            name: tuple(getattr(t, "to_local", lambda t=t: t)().shape)
            for name, t in state["params"].items()
        },
        "val_outputs": [t.cpu() for t in model.val_outputs],
        "step": int(ema.step),
        "global_step": second.global_step,
        "collectives": CountingEMACallback.collectives,
        "hook_calls": CountingEMACallback.updates,
        "world_size": second.world_size,
    }
    torch.save(result, out / f"{kind}_rank{second.global_rank}.pt")
    if torch.distributed.is_initialized():  # a clean exit: gloo's threads joined, not killed
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
