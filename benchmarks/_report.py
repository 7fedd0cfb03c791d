"""What the benchmark writes: machine info, the Markdown tables, the plot and the raw JSON."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from _candidates import CANDIDATES, DECAY
from _harness import GB, Row
from _workloads import BANK_KEY


ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


@dataclasses.dataclass
class Run:
    """One run's results and the circumstances of it: what the report is written from.

    Attributes:
        results: One section per workload, as ``run_workload`` returns it.
        machine: ``machine_info`` plus ``load_start`` and ``load_end``.
        triad: ``machine_triad``'s bandwidth.
        command: The command line, shell-quoted.
        seconds: The whole run's wall time.
        date: When it ended, UTC.
    """

    results: list[dict]
    machine: dict
    triad: dict
    command: str
    seconds: float
    date: str


# ----------------------------------------------------------------------------------- machine


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    """The machine, the versions and the commit, for the report's header."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "functional_ema",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (library modified)" if dirty else ""
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "commit": commit,
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "torchvision",
                "functional_ema",
                "optree",
                "timm",
                "ema-pytorch",
                "torch-ema",
                "diffusers",
            )
        },
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _check_cell(row: Row) -> str:
    if row.error:
        return f"**ERROR** ({row.error})"
    if row.check_msg == "n/a" or row.check_err is None:
        return "n/a"
    cell = f"{row.check_msg} ({row.check_err:.1e})"
    return f"**{cell}**" if row.check_msg.startswith("FAIL") else cell


def _mb(value: int | None) -> str:
    return _fmt(None if value is None else value / MB, 1)


def model_table(result: dict) -> tuple[list[str], dict[str, float]]:
    """A model's Markdown table and each candidate's x-bound ratio (for the plot)."""
    rows: list[Row] = result["rows"]
    timed = {r.key: r for r in rows if r.median is not None}
    bound = timed.get("bound")
    peers = [r for r in timed.values() if r.family == "peer" and not r.error]
    # "x fastest peer" compares with the fastest peer keeping averages of the same dtype
    # (bf16 averages move less memory than fp32 ones); all peers when none matches.
    fastest_by_dtype: dict[str, Row] = {}
    for r in peers:
        best = fastest_by_dtype.get(r.shadow)
        if best is None or r.median < best.median:
            fastest_by_dtype[r.shadow] = r
    fastest_any = min(peers, key=lambda r: r.median) if peers else None
    lines = [
        "| candidate | shadow | median ms | min ms | x bound | x own bound | x fastest peer "
        "| GB/s | peak extra MB | state MB | first call ms | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ratios: dict[str, float] = {}
    for r in rows:
        fastest = fastest_by_dtype.get(r.shadow or "float32", fastest_any)
        x_bound = r.median / bound.median if (r.median and bound) else None
        x_peer = r.median / fastest.median if (r.median and fastest) else None
        # Per byte moved: the bound moves 12 bytes per element, a bf16 model with fp32
        # averages 10, bf16 averages 6.
        x_own = None
        if x_bound is not None and r.stream_bytes and bound and bound.stream_bytes:
            x_own = x_bound * bound.stream_bytes / r.stream_bytes
        if x_bound is not None:
            ratios[r.key] = x_bound
        gbs = r.stream_bytes / r.median / GB if r.median else None
        cells = [
            f"**{r.label}**" if r.family == "fe" else r.label,
            r.shadow,
            _fmt(r.median and r.median * 1e3),
            _fmt(r.best and r.best * 1e3),
            _fmt(x_bound),
            _fmt(x_own),
            _fmt(x_peer),
            _fmt(gbs),
            _mb(r.peak_extra),
            _mb(r.state_bytes),
            _fmt(r.first_call and r.first_call * 1e3),
            _check_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for dtype, r in sorted(fastest_by_dtype.items()):
        lines.append(f"Fastest peer with {dtype} averages: {r.label} ({_fmt(r.median * 1e3)} ms).")
    return lines, ratios


def bank_table(result: dict) -> list[str]:
    """The decay-bank Markdown table."""
    rows = {r.key: r for r in result["rows"]}
    bound = rows["bound"]
    lines = [
        "| candidate | median ms | min ms | x bound | GB/s | peak extra MB | state MB | check |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows.values():
        cells = [
            f"**{r.label}**" if r.key == "bank" else r.label,
            _fmt(r.median and r.median * 1e3),
            _fmt(r.best and r.best * 1e3),
            _fmt(r.median / bound.median if (r.median and bound.median) else None),
            _fmt(r.stream_bytes / r.median / GB if r.median else None),
            _mb(r.peak_extra),
            _mb(r.state_bytes),
            _check_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    bank = rows["bank"]
    for key in ("separate_init", "separate_clone"):
        other = rows.get(key)
        if bank.median and other and other.median:
            speedup = other.median / bank.median
            word = "faster" if speedup >= 1 else "slower"
            lines.append(f"- Bank vs {other.label}: {_fmt(speedup)}x {word} (medians).")
    lines.append(
        "- GB/s counts the params once for the bank and the bound, once per decay for the "
        "separate updates."
    )
    return lines


COLUMNS = """\
Columns: **median / min ms**: one `update()` call over the timed rounds. **x bound**: median /
the bound's median (one `lerp_` over contiguous fp32 buffers of the same element count).
**x own bound**: the same per byte moved (the bound moves 12 bytes per element; a bf16 model
with fp32 averages 10, with bf16 averages 6): equal to x bound for fp32 models.
**x fastest peer**: median / the median of the fastest third-party library (timm, torch
AveragedModel, ema_pytorch, torch_ema, diffusers) keeping averages of the same dtype. **GB/s**:
bytes of the trainable parameters read and written (read average + read params + write average)
/ median. **peak extra MB**: the most memory torch's allocator held during one steady-state
update above what it held when the call started (temporaries; for the pure update also the new
state). **state MB**: memory a candidate keeps from construction (its averages and anything
else it copies). **first call ms**: the first `update()` after construction (includes any
one-off compile or planning). **check**: `||average - ref|| / ||ref - start||` after a
warm-start call and {check_steps} updates towards perturbed params, with ref a float64 EMA of
the values the model held; ok below 1e-3 for fp32 averages (TF's float32 rounding of the decay
alone gives ~1e-5) and below 0.5 for bf16 averages (their rounding alone gives ~0.1-0.2 here;
an average that does not move gives 1.0)."""

CAVEATS = """\
## Caveats

- A small VM is noisy, all the more when other processes compete for its cores (see the load
  average above): compare medians across rows of one table (same run, interleaved), not across
  runs or machines.
- timm ModelEmaV3 also lerps floating buffers (BatchNorm statistics); AveragedModel, the seed
  loop and functional_ema copy them; torch_ema and diffusers ignore them. ResNet-50 has 0.05M
  buffer elements against 25.6M parameters, so this hardly moves the numbers.
- bf16 model: AveragedModel and the seed loop keep bf16 averages (AveragedModel cannot keep an
  fp32 copy of a bf16 model), and timm's default keeps bf16 with stochastic rounding; they move
  6 bytes per element instead of 10. At decay 0.999 a bf16 average of a slowly moving model
  stalls (an increment `(1 - d)(p - s)` below half a bf16 unit in the last place of the average,
  0.2-0.4% of its magnitude, rounds to nothing); this check uses large steps, so it only shows
  that they move.
- The functional update_ / update rows pull `fe.module_state(model)` once (views that see the
  optimizer's in-place steps); the adapter row walks the module on every call.
- On CPU, peak extra memory replays the allocation events torch's profiler records: memory
  outside torch's allocator (Python objects) is not counted. On CUDA it is
  `torch.cuda.max_memory_allocated` around the call.
- Timing uses static params (the work does not depend on the values); the correctness check
  runs before timing on the same objects."""


def write_report(path: Path, run: Run, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Write the Markdown report.

    Args:
        path: Where to write it.
        run: What to write.
        args: The settings the header states (warm-up, memory, check steps).

    Returns:
        Per model section title, each candidate's x-bound ratio (for the plot).
    """
    machine, triad, seconds = run.machine, run.triad, run.seconds
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    busy = max(machine["load_start"], machine["load_end"]) > 0.5 * machine["usable_cores"]
    compile_env = os.environ.get("FUNCTIONAL_EMA_COMPILE", "unset")
    out = [
        "# EMA update benchmarks",
        "",
        "Generated by `benchmarks/bench_ema.py`; do not edit by hand (re-run it). How to run it "
        "and what each number means: [benchmarks/README.md](../benchmarks/README.md).",
        "",
        f"- Date: {run.date}; whole run {seconds / 60:.1f} min.",
        f"- Command: `{run.command}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} "
        f"usable, torch threads {machine['torch_threads']}), {machine['memory']} RAM{gpu}; "
        f"device `{machine['device']}`; {machine['platform']}, Python {machine['python']}.",
        f"- Versions: {versions}; functional_ema at commit {machine['commit'] or '?'}.",
        f"- Load average (1 min): {machine['load_start']:.2f} at the start, "
        f"{machine['load_end']:.2f} at the end, on {machine['usable_cores']} cores"
        + ("; other processes competed for the cores, so timings are noisier." if busy else "."),
        f"- FUNCTIONAL_EMA_COMPILE={compile_env} (the library's compiled kernel is on unless 0).",
        f"- Machine bandwidth (STREAM triad `a = b + s*c`, 3 x {triad['numel'] * 4 / MB:.0f} MB "
        f"fp32): median {triad['median_gbs']:.2f} GB/s, best {triad['best_gbs']:.2f} GB/s.",
        f"- Decay {DECAY}. Per model: construction, the check, {args.warmup} warm-up round(s) "
        f"({'the first one profiling memory' if args.memory else 'memory not measured'}), then "
        "the timed rounds; each round calls every candidate once in a new random order "
        "(round-robin), with gc off.",
        "",
        COLUMNS.format(check_steps=args.check_steps),
        "",
    ]
    all_ratios: dict[str, dict[str, float]] = {}
    for result in run.results:
        if result["key"] == BANK_KEY:
            out += [
                f"## {result['title']}",
                "",
                f"{result['tensors']} tensors, {result['numel']:,} elements per average; "
                f"{result['repeats']} timed rounds; section took {result['seconds']:.0f} s.",
                "",
                *bank_table(result),
                "",
            ]
            continue
        lines, ratios = model_table(result)
        all_ratios[result["title"]] = ratios
        notes = [f"- {r.label}: {r.note}" for r in result["rows"] if r.note]
        out += [
            f"## {result['title']}",
            "",
            f"{result['tensors']} trainable tensors, {result['numel']:,} elements; "
            f"{result['repeats']} timed rounds; section took {result['seconds']:.0f} s.",
            "",
            *lines,
            "",
            "<details><summary>How each candidate is called</summary>",
            "",
            *notes,
            "",
            "</details>",
            "",
        ]
    out.append(CAVEATS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return all_ratios


def write_plot(
    path: Path, ratios: dict[str, dict[str, float]], labels: dict[str, str], device: str
) -> None:
    """Grouped bars: per model (group), each candidate's median / the bound's median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    families = {c.key: c.family for c in CANDIDATES}
    keys = [
        c.key for c in CANDIDATES if c.key != "bound" and any(c.key in r for r in ratios.values())
    ]
    groups = list(ratios)
    width = 0.85 / max(len(keys), 1)
    palettes = {
        "fe": plt.get_cmap("Blues"),
        "seed": plt.get_cmap("Greys"),
        "peer": plt.get_cmap("tab20"),
        "ref": plt.get_cmap("Greys"),
    }
    counts = {f: sum(1 for k in keys if families[k] == f) for f in palettes}
    seen = dict.fromkeys(palettes, 0)
    colors: dict[str, object] = {}
    for key in keys:
        family = families[key]
        j = seen[family]
        seen[family] += 1
        if family == "fe":
            colors[key] = palettes["fe"](0.45 + 0.5 * j / max(counts["fe"] - 1, 1))
        elif family == "peer":
            colors[key] = palettes["peer"]((2 + j) % 20)
        else:
            colors[key] = "0.55" if family == "seed" else "0.15"
    fig, ax = plt.subplots(figsize=(max(12, 3.2 * len(groups)), 7.5))
    labelled: set[str] = set()
    for g, name in enumerate(groups):
        present = [k for k in keys if k in ratios[name]]  # no gaps for rows a model lacks
        for i, key in enumerate(present):
            ax.bar(
                g + (i - (len(present) - 1) / 2) * width,
                ratios[name][key],
                width,
                label=None if key in labelled else labels[key],
                color=colors[key],
                edgecolor="black",
                linewidth=0.4,
                hatch="//" if families[key] == "fe" else None,
            )
            labelled.add(key)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else "")
    )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace(" (", "\n(").replace(": ", ":\n") for g in groups], fontsize=9)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("median update time / bound (dashed line = 1; log scale, lower is better)")
    ax.set_title(
        f"EMA update cost relative to one contiguous lerp_ of the same size\n{device}", fontsize=11
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(run: Run, args: argparse.Namespace) -> None:
    """Write the Markdown report and, unless ``--no-plot``, the plot.

    Args:
        run: What to write.
        args: ``--out``, ``--plot``, ``--no-plot`` and the settings the header states.
    """
    ratios = write_report(args.out, run, args)
    print(f"\nwrote {args.out}")
    if not args.no_plot and ratios:
        device = run.machine["device"].split(":")[0]
        plot = args.plot or ROOT / "docs" / f"benchmarks_{device}.png"
        labels = {c.key: c.label for c in CANDIDATES}
        title = run.machine.get("gpu", run.machine["cpu"]) + f", {device}"
        write_plot(plot, ratios, labels, title)
        print(f"wrote {plot}")


# ----------------------------------------------------------------------------------- raw JSON


def write_json(path: Path, run: Run, args: argparse.Namespace) -> None:
    """Write the raw results, with the settings ``read_json`` needs to rewrite the report."""
    results = [
        result
        | {
            "rows": [
                dataclasses.asdict(r) | {"median": r.median, "best": r.best} for r in result["rows"]
            ]
        }
        for result in run.results
    ]
    payload = {
        "machine": run.machine,
        "triad": run.triad,
        "results": results,
        "command": run.command,
        "seconds": run.seconds,
        "date": run.date,
        "settings": {
            "warmup": args.warmup,
            "memory": args.memory,
            "check_steps": args.check_steps,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


def read_json(path: Path, args: argparse.Namespace) -> Run:
    """Read an earlier run's raw results (``--from-json``).

    Args:
        path: A file ``write_json`` wrote.
        args: Gets the run's warm-up, memory and check-step settings (files from before
            settings were saved keep the defaults).

    Returns:
        The run, ready for ``write_outputs``.
    """
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    results = [
        result
        | {"rows": [Row(**{k: v for k, v in r.items() if k in fields}) for r in result["rows"]]}
        for result in data["results"]
    ]
    settings = data.get("settings", {})
    for name in ("warmup", "memory", "check_steps"):
        setattr(args, name, settings.get(name, getattr(args, name)))
    date = data.get("date") or datetime.datetime.fromtimestamp(
        path.stat().st_mtime, datetime.timezone.utc
    ).strftime("%Y-%m-%d %H:%M UTC")
    return Run(results, data["machine"], data["triad"], data["command"], data["seconds"], date)
