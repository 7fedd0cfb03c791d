"""Smoke test of ``benchmarks/gpu_check.py`` on the CPU (the check itself is meant for CUDA).

It must run where only torch and optree are installed (no peers, no torchvision, no
matplotlib), replay the TensorFlow fixtures with a PASS for every dtype and strategy, and
write its report with a launches column.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DTYPES = ("float32", "float64", "float16", "bfloat16")
STRATEGIES = ("batched", "direct")


def _run_cpu_check(out: Path) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    args = ["--device", "cpu", "--repeats", "1", "--models", "tiny", "--out", str(out)]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _table_row(report: str, label: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].strip("*") == label:
            return cells
    raise AssertionError(f"no row {label!r} in the report:\n{report}")


def test_cpu_smoke_run_passes_tf_bits_and_reports_launches(tmp_path: Path) -> None:
    proc = _run_cpu_check(tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for dtype in DTYPES:
        for strategy in STRATEGIES:
            assert re.search(rf"^TF bits {dtype} +{strategy} +PASS", output, re.MULTILINE), (
                f"no PASS line for {dtype} / {strategy}:\n{output[-6000:]}"
            )

    report = (tmp_path / "gpu_check_cpu.md").read_text()
    header = _table_row(report, "candidate")
    assert "launches / update" in header
    launches = header.index("launches / update")
    for label in (
        "functional_ema adapter [batched]",
        "functional_ema update (pure) [direct]",
        "bound: contiguous lerp_",
        "ref: torch._foreach_lerp (new tensors)",
    ):
        assert re.fullmatch(r"[\d,.]+", _table_row(report, label)[launches]), label
    # the bound is one lerp_: one dispatched operator per update
    assert _table_row(report, "bound: contiguous lerp_")[launches] == "1"
