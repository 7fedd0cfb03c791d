"""A decay sweep in one run: an ensemble trained with ``torch.func.vmap``, one EMA decay each.

Four small MLPs are stacked with ``torch.func.stack_module_state`` and trained together on
scikit-learn's 8x8 digits (bundled with scikit-learn, no download; fixed held-out split): one
``vmap(grad(loss))`` call gives every member's gradients on its own small batch, and plain SGD
at a high learning rate keeps the live weights noisy. Each member keeps an exponential moving
average of its weights with its own decay (0.9, 0.99, 0.995, 0.999): the states come from
``vmap(functional_ema.init)`` and are updated in place by ``vmap(functional_ema.update_)``
with a decay tensor of shape ``[4]``, so one call updates every member with its own decay.

It prints a table of held-out accuracy per member (decay, live weights, averaged weights) and
writes a PNG plot of held-out accuracy against the step, live and averaged, one panel per
decay. A short window (0.9, about 10 steps) smooths the noise least; a long one (0.999, about
1000 steps) smooths it most but lags far behind the live weights early in training, when they
improve fast.

Run it on a CPU in well under a minute (needs scikit-learn and matplotlib)::

    python examples/vmap_ensemble.py
    python examples/vmap_ensemble.py --steps 3000 --plot /tmp/sweep.png
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import optree
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn import functional as F

import functional_ema as fe


Params = dict[str, Tensor]

DECAYS = (0.9, 0.99, 0.995, 0.999)  # one ensemble member per decay
LEARNING_RATE = 0.5  # deliberately high for plain SGD on small batches: noisy live weights
BATCH_SIZE = 8
SPLIT_SEED = 0  # the held-out split is the same for every training seed


def make_model() -> nn.Module:
    """A small MLP for flattened 8x8 images: 64 -> 64 -> 10."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits images, flattened and scaled to [0, 1], split 70/30 (stratified).

    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    """
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(
        range(len(labels)), test_size=0.3, random_state=SPLIT_SEED, stratify=digits.target
    )
    return images[train], labels[train], images[test], labels[test]


def accuracies(base: nn.Module, params: Params, x: Tensor, y: Tensor) -> list[float]:
    """Held-out accuracy of every member of a stacked ensemble.

    Args:
        base: The template module (on the ``meta`` device: only its code is used).
        params: Stacked parameters, each leaf of shape ``[members, ...]``.
        x: Inputs, shared by every member.
        y: Labels.

    Returns:
        One accuracy per member.
    """

    def predict(p: Params) -> Tensor:
        return functional_call(base, p, (x,)).argmax(dim=-1)

    with torch.no_grad():
        return (vmap(predict)(params) == y).float().mean(dim=1).tolist()


def plot_history(
    path: str, steps: list[int], live: list[list[float]], ema: list[list[float]]
) -> None:
    """Write held-out accuracy against the step, one panel per decay, as a PNG.

    Args:
        path: Where to write the PNG.
        steps: The steps at which accuracy was measured.
        live: Per step, the live weights' accuracy of every member.
        ema: Per step, the averaged weights' accuracy of every member.
    """
    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg: no display, no pyplot state
    axes = figure.subplots(2, (len(DECAYS) + 1) // 2, sharex=True, sharey=True).flat
    # Fit the y range to the second half of the run (the first starts near chance), rounded
    # down to 0.05, so the step-to-step noise of the live weights is visible.
    later = [a for row in live[len(live) // 2 :] + ema[len(ema) // 2 :] for a in row]
    bottom = max(0.0, math.floor((min(later, default=0.0) - 0.01) * 20) / 20)
    for member, (ax, decay) in enumerate(zip(axes, DECAYS, strict=False)):
        ax.plot(steps, [row[member] for row in live], color="0.6", lw=1, label="live weights")
        ax.plot(steps, [row[member] for row in ema], color=f"C{member}", lw=2, label="EMA")
        ax.set_title(f"decay {decay} (window ~ {1 / (1 - decay):.0f} steps)")
        ax.set_ylim(bottom, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    for ax in axes:
        ax.set_axis_off()  # unused panels, if any
    for ax in figure.axes:
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("step")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("held-out accuracy")
    figure.suptitle(
        f"vmap ensemble on digits: SGD lr {LEARNING_RATE}, batch {BATCH_SIZE}, one EMA decay "
        "per member"
    )
    figure.savefig(path, dpi=100)


def main(
    steps: int = 1000, seed: int = 0, plot: str | None = "vmap_ensemble.png"
) -> dict[str, Any]:
    """Train the ensemble, print the table of held-out accuracies, write the plot.

    Args:
        steps: Training steps (one SGD step and one EMA update per member each).
        seed: Seed of the initial weights and of the batches.
        plot: Where to write the PNG plot; ``None`` for no plot.

    Returns:
        ``results``, one dict per decay (``decay``, ``live_accuracy``, ``ema_accuracy``, held
        out, after ``steps``), and ``plot``, the path written (or ``None``).
    """
    torch.manual_seed(seed)
    batches = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data()
    members = len(DECAYS)

    models = [make_model() for _ in range(members)]
    params, _ = stack_module_state(models)  # the MLP has no buffers
    params = optree.tree_map(lambda t: t.detach(), params)  # leaves of shape [members, ...]
    base = copy.deepcopy(models[0]).to("meta")
    decays = torch.tensor(DECAYS)  # shape [members]: member i averages with decays[i]
    state = vmap(fe.init)(params)

    def loss_fn(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, p, (x,)), y)

    every = max(1, steps // 50)  # about 50 points per curve
    history: tuple[list[int], list[list[float]], list[list[float]]] = ([], [], [])
    print(
        f"digits: {len(y_train)} train / {len(y_test)} held-out images; {members} members, "
        f"{steps} SGD steps (lr {LEARNING_RATE}, batch {BATCH_SIZE} per member)"
    )
    for step in range(1, steps + 1):
        batch = torch.randint(len(y_train), (members, BATCH_SIZE), generator=batches)
        grads = vmap(grad(loss_fn))(params, x_train[batch], y_train[batch])
        params = optree.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        vmap(fe.update_)(state, params, decays)  # in place, member i with decays[i]
        if step % every == 0 or step == steps:
            history[0].append(step)
            history[1].append(accuracies(base, params, x_test, y_test))
            history[2].append(accuracies(base, vmap(fe.average)(state), x_test, y_test))

    live, ema = history[1][-1], history[2][-1]
    print(f"held-out accuracy after {steps} steps:")
    print("  decay   live     EMA")
    for decay, a, b in zip(DECAYS, live, ema, strict=True):
        print(f"  {decay:<6}  {a:.4f}   {b:.4f}")
    if plot is not None:
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        plot_history(plot, *history)
        print(f"plot: {plot}")
    return {
        "results": [
            {"decay": decay, "live_accuracy": a, "ema_accuracy": b}
            for decay, a, b in zip(DECAYS, live, ema, strict=True)
        ],
        "plot": plot,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--plot", default="vmap_ensemble.png", help="PNG path (default vmap_ensemble.png)"
    )
    args = parser.parse_args()
    # A model this small gains nothing from intra-op threads, and one thread keeps the run fast
    # on a busy machine (threads waiting for each other dominate such tiny matmuls).
    torch.set_num_threads(1)
    main(steps=args.steps, seed=args.seed, plot=args.plot)
