"""Keep an EMA of a small CNN's weights while a noisy optimizer trains it on 8x8 digits.

The live weights are trained with Adam at a constant, deliberately high learning rate on small
batches, so they keep jittering from step to step; the exponential moving average
(TensorFlow's arithmetic, with its ``num_updates`` warmup) smooths that jitter out, and its
held-out accuracy and loss end up better than the live model's. Each epoch prints both,
evaluated on a fixed 30% held-out split of scikit-learn's digits dataset (shipped with
scikit-learn: no download). The model has a BatchNorm layer: with ``buffer_policy="average"``
the EMA averages its running statistics too, so they go with the averaged weights (the default,
``"copy"``, would pair the averaged weights with the live model's statistics).

Runs are reproducible for a given seed and thread count. Run it on an idle CPU in seconds
(needs scikit-learn, e.g. ``pip install scikit-learn``)::

    python examples/demo.py
    python examples/demo.py --epochs 3 --seed 1
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F

import functional_ema


DECAY = 0.99  # use_num_updates=True ramps it up as min(0.99, (1 + n) / (10 + n)), n updates
LEARNING_RATE = 0.02  # deliberately high for Adam: the live weights never settle
BATCH_SIZE = 16
SPLIT_SEED = 0  # the held-out split is the same for every training seed


def make_model() -> nn.Module:
    """A small CNN for 1x8x8 images, with a BatchNorm layer (its buffers travel with the EMA)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits images scaled to [0, 1] and split 70/30 (stratified): train x, y, test x, y."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(
        torch.arange(len(labels)), test_size=0.3, random_state=SPLIT_SEED, stratify=digits.target
    )
    return images[train], labels[train], images[test], labels[test]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``."""
    logits = model(x)
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return accuracy, F.cross_entropy(logits, y).item()


def plot(curves: dict[str, list[float]], path: str) -> None:
    """Write held-out accuracy of the live and the averaged weights per epoch to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = range(1, len(curves["live"]) + 1)
    axes.plot(epochs, curves["live"], "o-", color="0.55", label="live weights")
    axes.plot(
        epochs, curves["ema"], "o-", color="tab:blue", linewidth=2, label="EMA (functional_ema)"
    )
    axes.set_xlabel("epoch")
    axes.set_ylabel("held-out accuracy")
    axes.set_title("digits CNN, noisy Adam: live vs averaged weights")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def main(epochs: int = 8, seed: int = 0, plot_path: str | None = None) -> dict[str, float]:
    """Train for ``epochs``, print live and EMA held-out metrics per epoch; return the last.

    With ``plot_path``, also write both accuracy curves to that PNG (needs matplotlib).
    """
    if epochs < 1:
        raise ValueError(f"demo: `epochs` must be at least 1, got {epochs}.")
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data()
    steps = -(-len(y_train) // BATCH_SIZE)
    print(f"digits: {len(y_train)} train / {len(y_test)} held-out images, {steps} steps per epoch")

    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    ema = functional_ema.EMA(model, DECAY, use_num_updates=True, buffer_policy="average")

    results: dict[str, float] = {}
    curves: dict[str, list[float]] = {"live": [], "ema": []}
    for epoch in range(1, epochs + 1):
        ema.train()  # also puts the live model in train mode
        for batch in torch.randperm(len(y_train), generator=shuffle).split(BATCH_SIZE):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()

        ema.eval()  # the live model too; ema(x) now runs the averaged weights and buffers
        live_acc, live_loss = evaluate(model, x_test, y_test)
        ema_acc, ema_loss = evaluate(ema, x_test, y_test)
        print(
            f"epoch {epoch:2d}  live acc {live_acc:.3f} loss {live_loss:.3f} | "
            f"ema acc {ema_acc:.3f} loss {ema_loss:.3f}"
        )
        curves["live"].append(live_acc)
        curves["ema"].append(ema_acc)
        results = {
            "live_acc": live_acc,
            "live_loss": live_loss,
            "ema_acc": ema_acc,
            "ema_loss": ema_loss,
        }
    ema.train()

    print(
        f"after {int(ema.step)} updates: held-out accuracy live {results['live_acc']:.3f}, "
        f"ema {results['ema_acc']:.3f} ({results['ema_acc'] - results['live_acc']:+.3f})"
    )
    if plot_path is not None:
        plot(curves, plot_path)
        print(f"plot: {plot_path}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training split")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches")
    parser.add_argument(
        "--plot", default="demo_accuracy.png", help="PNG of both accuracy curves ('' to skip)"
    )
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed, plot_path=args.plot or None)
