"""Run the functional examples (pure loop with a checkpoint, vmap ensemble) with tiny budgets."""

# scikit-learn (the digits data) and matplotlib (the ensemble's plot) come from the `test`
# extra. They are required, not optional: a missing one fails these tests instead of skipping
# them, so a broken environment cannot pass silently.

from __future__ import annotations

import math
import runpy
from pathlib import Path
from typing import Any

import pytest


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _main(name: str) -> Any:
    """The ``main`` function of ``examples/<name>.py``, loaded without running its CLI."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]


def _is_accuracy(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_functional_loop_resumes_bit_identical(capsys: pytest.CaptureFixture[str]) -> None:
    result = _main("functional_loop")(steps=6, seed=0)
    assert result["resumed_bit_identical"] is True
    assert _is_accuracy(result["live_accuracy"]), result
    assert _is_accuracy(result["ema_accuracy"]), result
    assert "bit-identical" in capsys.readouterr().out


def test_functional_loop_rejects_too_few_steps() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        _main("functional_loop")(steps=1)


def test_vmap_ensemble_one_result_per_decay_and_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    namespace = runpy.run_path(str(EXAMPLES / "vmap_ensemble.py"), run_name="example")
    result = namespace["main"](steps=4, seed=0, plot=str(plot))
    decays = namespace["DECAYS"]
    assert [row["decay"] for row in result["results"]] == list(decays)
    for row in result["results"]:
        assert _is_accuracy(row["live_accuracy"]), row
        assert _is_accuracy(row["ema_accuracy"]), row
    assert result["plot"] == str(plot)
    assert plot.stat().st_size > 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_vmap_ensemble_without_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _main("vmap_ensemble")(steps=2, seed=0, plot=None)
    assert result["plot"] is None
    assert len(result["results"]) == 4
    assert not list(tmp_path.iterdir())


def test_batchnorm_buffers_example() -> None:
    main = runpy.run_path(str(EXAMPLES / "batchnorm_buffers.py"), run_name="example")["main"]
    results = main(steps=20, seed=0)
    assert set(results) == {"live", "copy", "average"}
    assert all(math.isfinite(v) for v in results.values())


def test_bf16_fp32_average_example() -> None:
    main = runpy.run_path(str(EXAMPLES / "bf16_fp32_average.py"), run_name="example")["main"]
    results = main(steps=60, seed=0)
    # The float32 average tracks the float64 reference; the bfloat16 one stalls.
    assert results["float32 average"] < 1e-3
    assert results["bfloat16 average"] > 10 * results["float32 average"]


def test_finetune_frozen_backbone_example() -> None:
    main = runpy.run_path(str(EXAMPLES / "finetune_frozen_backbone.py"), run_name="example")["main"]
    results = main(steps=5, width=32, seed=0)
    assert results["held elements"] == 32 + 1 + 2  # the head's weight and bias, and `step`s
    assert math.isfinite(results["ema"]) and math.isfinite(results["live"])
