"""Post-hoc EMA (EDM2): train once, choose the averaging length afterwards.

A small MLP (a plain ``nn.Module``) is trained with noisy SGD on scikit-learn's 8x8 digits
(bundled with scikit-learn, no download; fixed held-out split). During training, two
power-function EMAs of its parameters (``sigma_rel`` 0.05 and 0.10, EDM2's choice) are tracked
in one pass (``functional_ema.posthoc_init`` / ``posthoc_update_`` on
``functional_ema.module_state(model)``), with time counted in training samples (``dt`` = the
batch size), and snapshots of both are written about 40 times to a ``SnapshotStore`` (atomic
files, float32). After training, the store is opened again and the EMA of six lengths, from
0.03 to 0.20, is reconstructed from the snapshots (``functional_ema.reconstruct``), in one
streaming pass, and evaluated as a module (``Reconstruction.module(model)``). The two tracked
lengths come back as the tracked averages themselves (the maximum difference is printed), the
others as least-squares combinations whose profile error is printed beside the held-out loss.

It prints a table (sigma_rel, profile error, held-out loss and accuracy) and writes a PNG plot
of held-out loss against ``sigma_rel``, with the live weights' loss for reference.

Run it on a CPU in well under a minute (needs scikit-learn and matplotlib)::

    python examples/posthoc_ema.py
    python examples/posthoc_ema.py --steps 4000 --plot /tmp/posthoc.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F

import functional_ema as fe


TRACKED = (0.05, 0.10)  # the profiles tracked during training (EDM2's)
TARGETS = (0.03, 0.05, 0.08, 0.10, 0.15, 0.20)  # the profiles reconstructed afterwards
SNAPSHOTS = 40  # snapshot times over the run
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


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Held-out cross-entropy and accuracy of ``model``.

    Args:
        model: The model to evaluate.
        x: Inputs.
        y: Labels.

    Returns:
        ``(loss, accuracy)``.
    """
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def plot_losses(path: str, rows: list[dict[str, Any]], live_loss: float, steps: int) -> None:
    """Write held-out loss against sigma_rel (tracked profiles marked) as a PNG.

    Args:
        path: Where to write the PNG.
        rows: One dict per reconstructed profile (``sigma_rel``, ``loss``).
        live_loss: The held-out loss of the live weights, drawn as a line.
        steps: The training steps, for the title.
    """
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg: no display, no pyplot state
    ax = figure.subplots()
    sigmas = [row["sigma_rel"] for row in rows]
    ax.plot(sigmas, [row["loss"] for row in rows], "o-", color="C0", label="reconstructed EMA")
    tracked = [row for row in rows if row["sigma_rel"] in TRACKED]
    ax.plot(
        [row["sigma_rel"] for row in tracked],
        [row["loss"] for row in tracked],
        "s",
        ms=11,
        mfc="none",
        color="C3",
        label="tracked during training",
    )
    ax.axhline(live_loss, color="0.5", ls="--", lw=1, label="live weights")
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title(f"post-hoc EMA on digits after {steps} SGD steps (lr {LEARNING_RATE})")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=100)


def main(steps: int = 2500, seed: int = 0, plot: str | None = "posthoc_ema.png") -> dict[str, Any]:
    """Train with two tracked profiles, reconstruct six, print the table, write the plot.

    Args:
        steps: Training steps (one SGD step and one tracker update each); at least 2.
        seed: Seed of the initial weights and of the batches.
        plot: Where to write the PNG plot; ``None`` for no plot.

    Returns:
        ``results``, one dict per reconstructed ``sigma_rel`` (``sigma_rel``,
        ``profile_error``, ``loss``, ``accuracy``, held out), ``live_loss``,
        ``tracked_max_difference`` (reconstructed vs tracked averages, for the tracked
        lengths), ``snapshots`` (files written) and ``plot`` (the path written, or ``None``).
    """
    if steps < 2:
        raise ValueError(f"main: `steps` must be at least 2, got {steps}.")
    torch.manual_seed(seed)
    batches = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data()
    model = make_model()
    params, _ = fe.module_state(model)  # views of the model's parameters (the MLP has no buffers)
    tracker = fe.posthoc_init(params, sigma_rel=TRACKED, dtype=torch.float32)
    every = max(1, steps // SNAPSHOTS)
    print(
        f"digits: {len(y_train)} train / {len(y_test)} held-out images; {steps} SGD steps "
        f"(lr {LEARNING_RATE}, batch {BATCH_SIZE}); tracking sigma_rel {TRACKED}, a snapshot "
        f"every {every} steps"
    )
    with tempfile.TemporaryDirectory() as folder:
        store = fe.SnapshotStore.create(folder)
        for step in range(1, steps + 1):
            batch = torch.randint(len(y_train), (BATCH_SIZE,), generator=batches)
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD
                for parameter in model.parameters():
                    parameter.sub_(LEARNING_RATE * parameter.grad)
            fe.posthoc_update_(tracker, params, dt=BATCH_SIZE)  # time in samples
            if step % every == 0 or step == steps:
                store.save(tracker)

        # Afterwards (typically in another process): open the run and reconstruct.
        store = fe.SnapshotStore.open(folder, store.run_id)
        reconstructions = fe.reconstruct(store, sigma_rel=list(TARGETS))
        snapshots = len(store.snapshots)

    tracked_difference = 0.0
    for result in reconstructions:
        if result.sigma_rel in TRACKED:
            row = TRACKED.index(result.sigma_rel)
            for name, value in result.params.items():
                difference = (value - tracker["params"][name][row]).abs().max().item()
                tracked_difference = max(tracked_difference, difference)
    live_loss, live_accuracy = evaluate(model.eval(), x_test, y_test)
    rows = []
    print(f"held-out results at t = {int(tracker['t'])} samples, from {snapshots} snapshots:")
    print("  sigma_rel  profile error  loss     accuracy")
    for result in reconstructions:
        loss, accuracy = evaluate(result.module(model), x_test, y_test)
        mark = "  (tracked)" if result.sigma_rel in TRACKED else ""
        print(
            f"  {result.sigma_rel:<9.2f}  {result.error:<13.2e}  {loss:.4f}   {accuracy:.4f}{mark}"
        )
        rows.append(
            {
                "sigma_rel": result.sigma_rel,
                "profile_error": result.error,
                "loss": loss,
                "accuracy": accuracy,
            }
        )
    print(f"  live weights               {live_loss:.4f}   {live_accuracy:.4f}")
    print(f"tracked lengths reconstructed to within {tracked_difference:.2e} of the tracked EMAs")
    if plot is not None:
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        plot_losses(plot, rows, live_loss, steps)
        print(f"plot: {plot}")
    return {
        "results": rows,
        "live_loss": live_loss,
        "tracked_max_difference": tracked_difference,
        "snapshots": snapshots,
        "plot": plot,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500, help="training steps (default 2500)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--plot", default="posthoc_ema.png", help="PNG path (default posthoc_ema.png)"
    )
    args = parser.parse_args()
    # A model this small gains nothing from intra-op threads, and one thread keeps the run fast
    # on a busy machine (threads waiting for each other dominate such tiny matmuls).
    torch.set_num_threads(1)
    main(steps=args.steps, seed=args.seed, plot=args.plot)
