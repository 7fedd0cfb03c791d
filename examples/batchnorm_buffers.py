"""BatchNorm buffers under an EMA: copy the running statistics (default) or average them.

A BatchNorm layer keeps running statistics (``running_mean``, ``running_var``) and an integer
counter (``num_batches_tracked``). The EMA averages the trainable parameters; for the buffers it
either copies the live values at each update (``buffer_policy="copy"``, the default, as the
classic ``EMA(nn.Module)`` snippet does) or averages the floating ones like parameters
(``buffer_policy="average"``). The integer counter is always copied, never averaged. This script
trains a small BatchNorm MLP on synthetic data with both policies and prints what each EMA
holds, plus the held-out loss of the live model and of each average.

Run it on a CPU in seconds::

    python examples/batchnorm_buffers.py
    python examples/batchnorm_buffers.py --steps 50
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import functional_ema as fe


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noisy linear regression task with shifted, scaled inputs (BatchNorm has work to do)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(8, 1, generator=gen)
    x = torch.randn(1200, 8, generator=gen) * 3 + 2
    y = x @ weights + 0.5 * torch.randn(1200, 1, generator=gen)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def main(steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Train with both buffer policies; return the held-out losses."""
    torch.manual_seed(seed)
    x, y, x_test, y_test = make_data(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    emas = {policy: fe.EMA(model, 0.98, buffer_policy=policy) for policy in ("copy", "average")}
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for ema in emas.values():
            ema.update()

    live_mean = model[1].running_mean
    print(f"after {steps} steps (num_batches_tracked = {int(model[1].num_batches_tracked)}):")
    results = {}
    with torch.no_grad():
        model.eval()
        results["live"] = F.mse_loss(model(x_test), y_test).item()
        for policy, ema in emas.items():
            ema.eval()
            results[policy] = F.mse_loss(ema(x_test), y_test).item()
            held = ema.state()["buffers"]
            gap = (held["1.running_mean"] - live_mean).abs().max().item()
            print(
                f"  buffer_policy={policy!r:9}  running_mean - live: max {gap:.2e}  "
                f"num_batches_tracked {int(held['1.num_batches_tracked'])}  "
                f"held-out mse {results[policy]:.4f}"
            )
        model.train()
    print(f"  {'live model':<56}  held-out mse {results['live']:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
