#!/usr/bin/env python
"""Side-by-side benchmark of EMA-of-weights updates: functional_ema against its peers.

Every candidate updates an exponential moving average (decay 0.999) of the same live model,
in one process, timed round-robin (each round visits every candidate once, in a new shuffled
order), so slow drifts of the machine (turbo, other load, page cache) hit all candidates alike.
Before timing, every candidate is checked against a float64 reference EMA, so a candidate that
silently skips work cannot look fast. See benchmarks/README.md for what each number means.

Run from the repository root, after ``bash benchmarks/setup_env.sh``::

    benchmarks/.venv/bin/python benchmarks/bench_ema.py    # everything: about 4 min on 2 cores
    benchmarks/.venv/bin/python benchmarks/bench_ema.py --models small --repeats 5 --out /tmp/b.md

The candidates are in ``_candidates.py``, the models and the decay bank in ``_workloads.py``,
the check and the timing in ``_harness.py``, the report in ``_report.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path


os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's banner lines

import torch

from _candidates import CANDIDATES
from _harness import machine_triad, run_workload
from _report import ROOT, Run, machine_info, read_json, write_json, write_outputs
from _workloads import WORKLOADS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see benchmarks/README.md for the options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(WORKLOADS),
        default=list(WORKLOADS),
        help="models (and 'bank') to run",
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        choices=[c.key for c in CANDIDATES],
        help="only these candidates (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed rounds for every model (default: per model, "
        + ", ".join(f"{k} {w.spec.repeats}" for k, w in WORKLOADS.items())
        + ")",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds before timing, the first one measuring memory (default 1; the check's "
        "warm-start and check calls come first)",
    )
    parser.add_argument(
        "--check-steps", type=int, default=2, help="updates in the correctness check (default 2)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown report"
    )
    parser.add_argument("--plot", type=Path, help="PNG plot (default docs/benchmarks_<device>.png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip memory measurement"
    )
    parser.add_argument(
        "--json", type=Path, help="raw results (default benchmarks/results/<device>.json)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="rewrite the report and plot from a raw-results file of an earlier run (no timing)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not args.from_json and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmarks, write the report, the plot and raw JSON."""
    args = parse_args(argv)
    if args.from_json:
        write_outputs(read_json(args.from_json, args), args)
        return 0
    device = torch.device(args.device)
    begin = time.perf_counter()
    words = [sys.executable, sys.argv[0]]
    command = " ".join(
        shlex.quote(a)
        for a in [*map(os.path.relpath, words), *(sys.argv[1:] if argv is None else argv)]
    )

    machine = machine_info(device)
    machine["load_start"] = os.getloadavg()[0]
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {torch.__version__}, "
        f"{machine['torch_threads']} threads, device {device}",
        flush=True,
    )
    triad = machine_triad(device, 10)
    print(
        f"machine triad: median {triad['median_gbs']:.2f} GB/s, best {triad['best_gbs']:.2f} GB/s",
        flush=True,
    )

    results = []
    for key in args.models:
        workload = WORKLOADS[key]
        results.append(run_workload(workload, workload.rows(args.candidates), args))
    seconds = time.perf_counter() - begin
    machine["load_end"] = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = Run(results, machine, triad, command, seconds, date)
    write_outputs(run, args)
    raw = args.json or Path(__file__).resolve().parent / "results" / f"{device.type}.json"
    write_json(raw, run, args)
    print(f"wrote {raw}\ntotal {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
