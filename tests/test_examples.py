"""Run the README's main demo (``examples/demo.py``) for one epoch, in process and as a script."""

# scikit-learn (the digits data) comes from the `test` extra. It is required, not optional: if it
# is missing these tests fail instead of skipping, so a broken environment cannot pass silently.

from __future__ import annotations

import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest


DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_main_returns_finite_accuracies() -> None:
    main = runpy.run_path(str(DEMO), run_name="not_main")["main"]

    result = main(epochs=1, seed=0)

    for key in ("live_acc", "ema_acc"):
        assert isinstance(result[key], float), result
        assert math.isfinite(result[key]), result
        assert 0.0 <= result[key] <= 1.0, result


def test_demo_script_prints_live_and_ema_and_plots(tmp_path) -> None:
    png = tmp_path / "demo.png"
    completed = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "1", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    epochs = [line for line in completed.stdout.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 1, completed.stdout
    assert "live" in epochs[0], completed.stdout
    assert "ema" in epochs[0], completed.stdout
    assert png.read_bytes().startswith(b"\x89PNG"), completed.stdout


def test_demo_rejects_no_epochs() -> None:
    main = runpy.run_path(str(DEMO), run_name="not_main")["main"]

    with pytest.raises(ValueError, match="at least 1"):
        main(epochs=0)
