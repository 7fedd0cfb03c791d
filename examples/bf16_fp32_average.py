"""A float32 average of a bfloat16 model: why, and what it changes.

A bfloat16 weight has 8 significant bits. At decay 0.999 an update moves the average by
``(average - weight) * 0.001``, which is below half a bfloat16 ulp unless the weight is far from
the average, so a bfloat16 average hardly moves: it stalls. ``fe.EMA(model, decay,
dtype=torch.float32)`` keeps the average in float32 (the update runs in float32 on the bfloat16
values, exactly) and casts to the model's dtype only for the forward pass, ``swap`` and
``copy_to``. This script trains a bfloat16 model and compares a bfloat16 and a float32 average
with a float64 reference average of the same bfloat16 weights.

Run it on a CPU in seconds::

    python examples/bf16_fp32_average.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import functional_ema as fe


def main(steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Train a bfloat16 model; return each average's relative error against float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    narrow = fe.EMA(model, 0.999)  # the average in the model's dtype (TF's behaviour)
    wide = fe.EMA(model, 0.999, dtype=torch.float32)
    reference = fe.init(fe.module_state(model)[0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(16, 1, generator=gen)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        loss = F.mse_loss(model(x.to(torch.bfloat16)).float(), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        narrow.update()
        wide.update()
        fe.update_(reference, fe.module_state(model)[0], 0.999)

    def error(ema: fe.EMA) -> float:
        got, ref = ema.state()["params"], fe.average(reference)
        num = sum((got[n].double() - ref[n]).pow(2).sum() for n in ref)
        start = fe.module_state(model)[0]
        den = sum((start[n].double() - ref[n]).pow(2).sum() for n in ref)
        return float((num / den).sqrt())

    results = {"bfloat16 average": error(narrow), "float32 average": error(wide)}
    print(f"after {steps} updates at decay 0.999, error against a float64 average")
    print("(relative to how far the live weights are from it):")
    for name, value in results.items():
        print(f"  {name:17}  {value:.3e}")
    print(
        f"average dtypes: {narrow.state()['params']['0.weight'].dtype}, "
        f"{wide.state()['params']['0.weight'].dtype}; model dtype {model[0].weight.dtype}"
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
