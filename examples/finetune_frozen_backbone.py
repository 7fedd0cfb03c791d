"""Fine-tuning with a frozen backbone: the EMA holds and updates the trainable head only.

As TensorFlow's ``var_list``, an EMA averages the parameters that are trainable when it is
made. Frozen parameters (a pretrained backbone) are neither held nor copied at each update:
the averaged model (``ema.shadow``, ``ema(x)`` in eval mode, ``ema.copy_to``) reads the live
frozen tensors. So the EMA costs what an EMA of the head alone costs, in memory and in time.
This script fine-tunes a small head on a frozen random-feature backbone, prints what the
EMA holds, and checks the averaged model against an EMA of the head alone.

Run it on a CPU in seconds::

    python examples/finetune_frozen_backbone.py
    python examples/finetune_frozen_backbone.py --steps 20 --width 512
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import functional_ema as fe


def make_model(width: int, seed: int) -> nn.Sequential:
    """A frozen backbone (``width`` features) and a trainable linear head."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    backbone.requires_grad_(False)
    return nn.Sequential(backbone, nn.Linear(width, 1))


def main(steps: int = 200, width: int = 1024, seed: int = 0) -> dict[str, float]:
    """Fine-tune the head; return the held-out losses and the EMA's size."""
    model = make_model(width, seed)
    ema = fe.EMA(model, 0.95)
    head_only = fe.EMA(model[1], 0.95)  # the same averages, made from the head alone
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(16, 1, generator=gen)
    x_test = torch.randn(256, 16, generator=gen)
    y_test = x_test @ target
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        loss = F.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        head_only.update()

    held = sum(t.numel() for t in ema.state_dict().values() if isinstance(t, torch.Tensor))
    frozen = sum(p.numel() for p in model[0].parameters())
    print(f"EMA state_dict: {sorted(ema.state_dict())}")
    print(f"elements held: {held} (the frozen backbone has {frozen}, not held)")
    for name, average in head_only.state()["params"].items():
        assert torch.equal(ema.state()["params"][f"1.{name}"], average)
    # The shadow's frozen weights are the live ones (shared storage, never copied).
    assert ema.shadow[0][0].weight.data_ptr() == model[0][0].weight.data_ptr()
    ema.eval()
    with torch.no_grad():
        results = {
            "live": F.mse_loss(model(x_test), y_test).item(),
            "ema": F.mse_loss(ema(x_test), y_test).item(),
            "held elements": float(held),
        }
    print(f"held-out loss: live {results['live']:.4f}, EMA {results['ema']:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.width, args.seed)
