"""Fine-tuning: a frozen backbone and a small trainable head, one EMA update each way.

Times ``ema.update()`` of an ``fe.EMA`` of the whole model (frozen backbone, trainable head)
against an ``fe.EMA`` of the head alone, timm's ``ModelEmaV3`` and PyTorch's ``AveragedModel``
(EMA multi-average function) of the whole model, in one process, and reports the bytes each
holds. These are measurements, not tests: nothing fails on a slow number.

Run from the repository root (``bash benchmarks/setup_env.sh`` once)::

    benchmarks/.venv/bin/python benchmarks/bench_finetune.py
    benchmarks/.venv/bin/python benchmarks/bench_finetune.py --width 2048 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import functional_ema as fe


def make_model(width: int, depth: int) -> nn.Sequential:
    """A frozen backbone of ``depth`` square layers and a trainable 1000-way head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    backbone = nn.Sequential(*layers).requires_grad_(False)
    return nn.Sequential(backbone, nn.Linear(width, 10))


def held_bytes(tensors: list[Tensor]) -> int:
    """Bytes of ``tensors``' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def candidates(model: nn.Sequential) -> dict[str, tuple[Callable[[], None], int]]:
    """Each candidate's update and the bytes it holds."""
    rows: dict[str, tuple[Callable[[], None], int]] = {}
    ema = fe.EMA(model, 0.999)
    rows["fe.EMA(model) (frozen backbone)"] = (
        ema.update,
        held_bytes(list(ema.state_dict().values())),
    )
    head = fe.EMA(model[1], 0.999)
    rows["fe.EMA(head) alone"] = (head.update, held_bytes(list(head.state_dict().values())))
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=0.999)
        rows["timm ModelEmaV3(model)"] = (
            lambda: timm_ema.update(model),
            held_bytes(list(timm_ema.module.state_dict().values())),
        )
    except ImportError:
        print("timm not installed: skipped")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    rows["torch AveragedModel(model)"] = (
        lambda: averaged.update_parameters(model),
        held_bytes(list(averaged.module.state_dict().values())),
    )
    return rows


def main(width: int, depth: int, repeats: int) -> None:
    """Time every candidate in its own block of ``repeats`` updates; print the table."""
    torch.set_num_threads(2)
    model = make_model(width, depth)
    frozen = sum(p.numel() for p in model[0].parameters())
    trainable = sum(p.numel() for p in model[1].parameters())
    print(f"backbone {frozen / 1e6:.1f}M frozen parameters, head {trainable} trainable")
    rows = candidates(model)
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for name, (update, _) in rows.items():  # each in its own block: its caches are warm
            update()  # warm-up
            for _ in range(repeats):
                model[1].weight.add_(1e-3)  # the head trains
                start = time.perf_counter()
                update()
                times[name].append(time.perf_counter() - start)
    head_ms = statistics.median(times["fe.EMA(head) alone"]) * 1e3
    print(f"\n| candidate | update (ms, median of {repeats}) | x EMA of the head | held (MiB) |")
    print("|---|---|---|---|")
    for name, (_, held) in rows.items():
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.3f} | {ms / head_ms:.1f} | {held / 2**20:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    main(args.width, args.depth, args.repeats)
