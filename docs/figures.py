"""The docs' figures, drawn from the code at every docs build (so they are never stale).

``conf.py`` calls :func:`draw_all` when the build starts; the PNGs go to ``docs/_generated/``
(not committed) and the pages include them from there. Each figure takes a few seconds on a
laptop CPU: the schedules are evaluated directly, the demo, ensemble and post-hoc figures are
drawn by the examples themselves (``examples/*.py``), from short training runs on scikit-learn's
bundled digits (no download).
"""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import functional_ema as fe


DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUT = DOCS / "_generated"

SCHEDULES = {
    "constant(0.999)": fe.constant(0.999),
    "tf_warmup(0.999)": fe.tf_warmup(0.999),
    "warmup(0.999)": fe.warmup(0.999),
    "half_life(200)": fe.half_life(200.0),
    "power(sigma_rel=0.05)": fe.power(sigma_rel=0.05),
}


def draw_schedules(path: Path) -> None:
    """Decay against the step for every built-in schedule, per step and per 10-step update.

    Plotted as ``1 - decay`` (log scale), the weight of the newest value. Left:
    ``schedule(t, 1)``, an update every step. Right: an update every 10 steps (``dt = 10``) as
    the per-step decay it amounts to, ``schedule(t, 10) ** 0.1``: interval-correct schedules
    give the same curve as on the left.
    """
    steps = torch.unique(torch.logspace(0, 5, 400).round().to(torch.int64))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, schedule in SCHEDULES.items():
        every = [1 - float(schedule(t, torch.tensor(1))) for t in steps]
        line = axes[0].plot(steps, every, label=name)[0]
        tens = steps[steps >= 10]
        per_step = [1 - float(schedule(t, torch.tensor(10))) ** 0.1 for t in tens]
        axes[1].plot(tens, per_step, color=line.get_color(), label=name)
    for ax, title in zip(
        axes,
        ("update every step (dt = 1)", "update every 10 steps: 1 - decay(t, 10) ** (1/10)"),
        strict=True,
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step t")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("1 - decay per step (the weight of the newest value)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Built-in schedules: fe.constant, tf_warmup, warmup, half_life, power")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _run_example(name: str, **kwargs: object) -> None:
    main = runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="docs")["main"]
    with contextlib.redirect_stdout(io.StringIO()):
        main(**kwargs)
    plt.close("all")


def draw_all(out: Path = OUT) -> list[Path]:
    """Draw every figure into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "schedules": out / "schedules.png",
        "demo": out / "demo_accuracy.png",
        "ensemble": out / "vmap_ensemble.png",
        "posthoc": out / "posthoc_ema.png",
    }
    draw_schedules(paths["schedules"])
    _run_example("demo", plot_path=str(paths["demo"]))
    _run_example("vmap_ensemble", plot=str(paths["ensemble"]))
    _run_example("posthoc_ema", plot=str(paths["posthoc"]))
    return list(paths.values())


if __name__ == "__main__":
    for written in draw_all():
        print(written)
