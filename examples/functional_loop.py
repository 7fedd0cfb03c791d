"""A pure functional training loop with an EMA, checkpointed half way and resumed bit for bit.

Nothing here lives in a module or an optimizer object: the weights are a dict of tensors
(``functional_ema.module_state``, cloned), the gradients come from ``torch.func.grad`` over
``torch.func.functional_call``, plain SGD is one ``optree.tree_map``, and the exponential
moving average is an ``EmaState`` (a plain dict of tensors) that ``functional_ema.update``
replaces at every step, with TensorFlow's ``num_updates`` warmup (``tf_warmup``).

The model, a small MLP, is trained on scikit-learn's 8x8 digits (bundled with scikit-learn,
no download) with a fixed held-out split. Half way through, the run saves
``{"params", "state", "step"}`` with ``torch.save``, loads it back with
``torch.load(weights_only=True)`` (the state holds tensors only, so nothing needs allow-listing)
and continues. The same training is also run without the interruption, and the two EMA states
are compared leaf by leaf with ``torch.equal``: they are bit-identical, because the batch of
each step is a function of the step and every update is deterministic. Finally it prints the
held-out accuracy of the live weights and of the averaged ones.

Run it on a CPU in a few seconds (needs scikit-learn, e.g. ``pip install scikit-learn``)::

    python examples/functional_loop.py
    python examples/functional_loop.py --steps 1000 --seed 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optree
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn import functional as F

import functional_ema as fe


Params = dict[str, Tensor]

DECAY = 0.999  # the ceiling of TF's warmup min(decay, (1 + t) / (10 + t))
LEARNING_RATE = 0.3  # deliberately high for plain SGD on small batches: noisy live weights
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


def batch_indices(step: int, size: int, seed: int) -> Tensor:
    """The training examples of ``step``: a pure function of the step, so a resume replays it.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; step ``t`` takes the
    ``t``-th slice of ``BATCH_SIZE`` examples (the last partial slice of an epoch is skipped).

    Args:
        step: The 0-based training step.
        size: The number of training examples.
        seed: The training seed.

    Returns:
        A 1-D int64 tensor of ``BATCH_SIZE`` indices.
    """
    per_epoch = size // BATCH_SIZE
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * BATCH_SIZE : (index + 1) * BATCH_SIZE]


def loss_fn(params: Params, buffers: Params, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model`` run on ``params`` and ``buffers``."""
    return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)


def train(
    model: nn.Module,
    params: Params,
    buffers: Params,
    state: fe.EmaState,
    data: tuple[Tensor, Tensor],
    *,
    start: int,
    stop: int,
    seed: int,
) -> tuple[Params, fe.EmaState]:
    """Run steps ``start, ..., stop - 1``: one SGD step, then one EMA update, each step.

    Args:
        model: The template module (its own tensors are not used).
        params: The live weights at ``start``; not modified.
        buffers: The model's buffers (none for this MLP, but ``functional_call`` takes them).
        state: The EMA state at ``start``; not modified.
        data: ``(x_train, y_train)``.
        start: The first step to run.
        stop: One past the last step to run.
        seed: The training seed (it picks the batches).

    Returns:
        The new ``(params, state)``.
    """
    x_train, y_train = data
    schedule = fe.tf_warmup(DECAY)
    for step in range(start, stop):
        batch = batch_indices(step, len(y_train), seed)
        grads = grad(loss_fn)(params, buffers, model, x_train[batch], y_train[batch])
        params = optree.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        state = fe.update(state, params, schedule)
    return params, state


@torch.no_grad()
def accuracy(model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor) -> float:
    """Held-out accuracy of ``model`` run on ``params`` (via ``functional_ema.apply``)."""
    logits = fe.apply(model, params, buffers, x)
    return (logits.argmax(dim=1) == y).float().mean().item()


def bit_identical(a: fe.EmaState, b: fe.EmaState) -> bool:
    """Whether two trees have the same structure and ``torch.equal`` leaves, dtypes included."""
    a_leaves, a_spec = optree.tree_flatten(a)
    b_leaves, b_spec = optree.tree_flatten(b)
    return a_spec == b_spec and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a_leaves, b_leaves, strict=True)
    )


def main(steps: int = 400, seed: int = 0) -> dict[str, float | bool]:
    """Train twice (once resumed from a checkpoint), compare the EMAs, print the accuracies.

    Args:
        steps: Training steps (SGD updates, each followed by an EMA update); at least 2.
        seed: Seed of the initial weights and of the batch order.

    Returns:
        ``live_accuracy`` and ``ema_accuracy`` (held out, after ``steps``) and
        ``resumed_bit_identical`` (whether the resumed run's EMA state equals the
        uninterrupted one's, bit for bit).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one before the checkpoint), got {steps}.")
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data()
    model = make_model()
    params, buffers = fe.module_state(model)
    params = optree.tree_map(torch.clone, params)  # our own copy: the module is a template
    state = fe.init(params)
    data = (x_train, y_train)
    half = steps // 2
    print(
        f"digits: {len(y_train)} train / {len(y_test)} held-out images; {steps} SGD steps "
        f"(lr {LEARNING_RATE}, batch {BATCH_SIZE}), EMA with tf_warmup({DECAY})"
    )

    # Uninterrupted run.
    live, ema = train(model, params, buffers, state, data, start=0, stop=steps, seed=seed)

    # The same run, checkpointed at `half` and resumed from the file.
    resumed_params, resumed_state = train(
        model, params, buffers, state, data, start=0, stop=half, seed=seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"params": resumed_params, "state": resumed_state, "step": half}, path)
        del resumed_params, resumed_state  # continue from the file alone
        checkpoint = torch.load(path, weights_only=True)
        print(f"checkpoint at step {checkpoint['step']}: saved, reloaded (weights_only=True)")
    _, resumed_state = train(
        model,
        checkpoint["params"],
        buffers,
        checkpoint["state"],
        data,
        start=checkpoint["step"],
        stop=steps,
        seed=seed,
    )
    identical = bit_identical(resumed_state, ema)
    print(
        f"resumed vs uninterrupted EMA state ({len(optree.tree_leaves(ema))} leaves, "
        f"step {int(ema['step'])}): {'bit-identical' if identical else 'DIFFERENT'}"
    )

    live_accuracy = accuracy(model, live, buffers, x_test, y_test)
    ema_accuracy = accuracy(model, fe.average(ema), buffers, x_test, y_test)
    print(f"held-out accuracy: live {live_accuracy:.4f}, EMA {ema_accuracy:.4f}")
    return {
        "live_accuracy": live_accuracy,
        "ema_accuracy": ema_accuracy,
        "resumed_bit_identical": identical,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    args = parser.parse_args()
    # A model this small gains nothing from intra-op threads, and one thread keeps the run fast
    # on a busy machine (threads waiting for each other dominate such tiny matmuls).
    torch.set_num_threads(1)
    main(steps=args.steps, seed=args.seed)
