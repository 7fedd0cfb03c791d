"""Record timm's EMA checkpoints for ``tests/test_peers.py`` (timm is not a test dependency).

timm imports torchvision (``timm.layers`` needs ``torchvision.ops``), whose build pins one torch
version, so timm cannot be installed beside the test dependencies (CI runs torch 2.13.0 and
2.14.1). ``pip install --no-deps timm`` does not help: ``from timm.utils.model_ema import
ModelEmaV3`` still imports torchvision. This script runs the real ``ModelEmaV3`` and
``ModelEmaV2`` once, in an environment that has timm, and saves what the tests need to
``timm.pt`` beside it (a few KB, loadable with ``torch.load(weights_only=True)``):

- ``model``: the live model's ``state_dict()`` after ``STEPS`` training steps, and
  ``model_next`` after one more;
- ``v3`` / ``v2``: the EMAs' ``state_dict()`` after ``STEPS`` updates, and ``v3_next`` /
  ``v2_next`` after one more (from ``model_next``);
- ``x`` and ``y_v3`` / ``y_v2``: an input and the EMA models' outputs on it;
- ``v3_step``: the step given to ``ModelEmaV3.update`` last; ``config``: the EMAs' options;
  ``versions``: timm's and torch's.

The tests rebuild the model with :func:`make_model` (imported from here) and load ``model``.
Run from the repository root, with the Python of an environment that has timm::

    benchmarks/.venv/bin/python tests/peer_checkpoints/record.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


STEPS = 6
DECAY = 0.9
PATH = Path(__file__).with_name("timm.pt")


def make_model() -> nn.Module:
    """Linear, BatchNorm, Linear; the first bias frozen. Seeded: the same weights every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter
    return model


def training(model: nn.Module, steps: int, seed: int = 1) -> Iterator[int]:
    """Train ``model`` in place with SGD; yield after each optimizer step (0-based index)."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        inputs = torch.randn(32, 4, generator=generator)
        loss = (model(inputs) - (inputs[:, :2] * 3 + 1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


def cloned(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as copies (its tensors change in place as training goes on)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def main() -> None:
    """Run timm's EMAs and save their checkpoints to ``timm.pt``."""
    import timm
    from timm.utils.model_ema import ModelEmaV2, ModelEmaV3

    config = {"decay": DECAY, "use_warmup": True, "warmup_gamma": 1.0, "warmup_power": 2 / 3}
    model = make_model()
    v3 = ModelEmaV3(model, **config)  # type: ignore[arg-type]
    v2 = ModelEmaV2(model, decay=DECAY)
    trainer = training(model, STEPS + 1)
    for step in range(STEPS):
        next(trainer)
        v3.update(model, step=step + 1)
        v2.update(model)
    record = {
        "versions": {"timm": str(timm.__version__), "torch": str(torch.__version__)},
        "config": config,
        "model": cloned(model),
        "v3": cloned(v3),
        "v2": cloned(v2),
        "v3_step": STEPS,
    }
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        record.update({"x": x, "y_v3": v3(x), "y_v2": v2(x)})
    next(trainer)
    v3.update(model, step=STEPS + 1)
    v2.update(model)
    record.update({"model_next": cloned(model), "v3_next": cloned(v3), "v2_next": cloned(v2)})
    torch.save(record, PATH)
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes) with {record['versions']}")


if __name__ == "__main__":
    main()
