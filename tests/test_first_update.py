"""The first in-place update: eager while its kernel builds, robust under ``python -W error``.

Kernels are built on a background thread (``_kernels.Compiled``); until one is ready the
engine runs its eager path, with the same bits. No test here asserts a duration: the
subprocess test prints the first update's wall time for a reader to see.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import assert_bits_equal

import functional_ema as fe
from functional_ema import _engine, _kernels


KEY = (True, False, "cpu", torch.float32, torch.float32, False)

_SCRIPT = """
import sys, time
import torch
import functional_ema as fe
from functional_ema import _kernels

torch.manual_seed(0)
# 263k parameters: one region above the engine's COMPILE_FROM, so a build is queued
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
ema = fe.EMA(model, 0.99)
state = fe.init(dict(model.named_parameters()))
opt = torch.optim.SGD(model.parameters(), lr=0.01)  # its first step imports torch's compiler
gen = torch.Generator().manual_seed(1)
times = []
for step in range(4):
    model(torch.randn(8, 256, generator=gen)).pow(2).mean().backward()
    opt.step()
    start = time.perf_counter()
    ema.update()
    times.append(time.perf_counter() - start)
    fe.update_(state, dict(model.named_parameters()), 0.99)
    if step == 1 and sys.argv[2] == "wait":
        assert _kernels.compiled.wait(timeout=600)  # later updates: the kernel, or eager
print(f"first update {times[0]:.3f} s; built {_kernels.compiled.built}; "
      f"failed {_kernels.compiled.failures}")
torch.save({"adapter": ema.state(), "functional": state}, sys.argv[1])
"""


def _run(tmp_path: Path, name: str, *flags: str, compile_env: str, wait: bool) -> dict:
    """Run the script in a fresh interpreter; its averages after four updates."""
    out = tmp_path / f"{name}.pt"
    package_root = str(Path(fe.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),  # empty: a cold build
        "FUNCTIONAL_EMA_COMPILE": compile_env,
    }
    env.pop("PYTHONWARNINGS", None)
    script = [sys.executable, *flags, "-c", _SCRIPT, str(out), "wait" if wait else "exit"]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    print(name, done.stdout.strip())  # the first update's wall time, for the reader
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The script's averages with compiling off: every update eager."""
    return _run(tmp_path_factory.mktemp("reference"), "eager", compile_env="0", wait=False)


def test_first_update_under_w_error_with_an_empty_cache(tmp_path: Path, reference: dict) -> None:
    """Exit 0 under ``-W error`` (torch warns inside its compiler), reference bits."""
    waited = _run(tmp_path, "w-error-wait", "-W", "error", compile_env="1", wait=True)
    exited = _run(tmp_path, "w-error-exit", "-W", "error", compile_env="1", wait=False)
    assert_bits_equal(waited, reference)
    assert_bits_equal(exited, reference)  # left while the build was pending: a clean exit


def test_exit_while_a_kernel_builds_is_clean(tmp_path: Path, reference: dict) -> None:
    """Leaving while torch compiles on the build thread: no C++ abort, exit 0."""
    exited = _run(tmp_path, "exit", compile_env="1", wait=False)
    assert_bits_equal(exited, reference)


class _Gate:
    """A builder that waits for ``release`` before building (the real compiler or not)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.build: Callable[[_kernels.Kernel, tuple[torch.Tensor, ...]], _kernels.Kernel] | None
        self.build = None

    def __call__(self, fn: _kernels.Kernel, examples: tuple[torch.Tensor, ...]) -> _kernels.Kernel:
        self.calls += 1
        assert threading.current_thread() is not threading.main_thread()
        assert self.release.wait(timeout=600)
        return fn if self.build is None else self.build(fn, examples)


@pytest.fixture
def gate() -> Iterator[_Gate]:
    """A gated builder, released at the end of the test whatever happened (no stuck build)."""
    held = _Gate()
    yield held
    held.release.set()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> _kernels.Compiled:
    """A new kernel cache in background mode, used by the engine for every region size."""
    kernels = _kernels.Compiled()
    kernels.enabled, kernels.synchronous = True, False
    monkeypatch.setattr(_engine, "compiled", kernels)
    monkeypatch.setattr(_engine, "COMPILE_FROM", 0)
    monkeypatch.setattr(_engine, "KERNEL_FROM", 0)
    monkeypatch.setattr(_kernels, "compiler_idle", lambda: True)  # as in a fresh process
    return kernels


def _values(count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    values = [
        {"w": torch.randn(1000, generator=gen), "b": torch.randn(300, generator=gen)}
        for _ in range(count)
    ]
    for value in values:
        value["w"][7] = float("nan")  # left out (the masked kernel) and counted
    return values


@pytest.mark.compile
def test_eager_while_pending_then_compiled_gives_identical_bits(
    fresh: _kernels.Compiled, gate: _Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate.build = _kernels.standalone_compile  # the real compiler, once released
    monkeypatch.setattr(_kernels, "standalone_compile", gate)
    params = {"w": torch.randn(1000), "b": torch.randn(300)}
    values = _values(6)
    state, reference = fe.init(params), fe.init(params)
    for value in values[:3]:
        fe.update_(state, value, 0.9)  # the build is pending: eager
    assert fresh.pending == [KEY] and not fresh.built
    gate.release.set()
    assert fresh.wait(timeout=600)
    assert fresh.built == [KEY] and not fresh.fallbacks and gate.calls == 1
    for value in values[3:]:
        fe.update_(state, value, 0.9)  # the compiled kernel
    fresh.enabled = False
    for value in values:
        fe.update_(reference, value, 0.9)  # eager throughout
    assert_bits_equal(state, reference)
    assert int(state["nonfinite_updates"]) == 6


def test_kernel_is_none_while_pending_and_built_once(
    fresh: _kernels.Compiled, gate: _Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kernels, "standalone_compile", gate)
    shadow, value = torch.zeros(4), torch.zeros(4)
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(fresh.kernel(shadow, value, mask=True)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None] * 8 and fresh.pending == [KEY]
    assert not fresh.wait(timeout=0.01)
    gate.release.set()
    assert fresh.wait(timeout=600)
    assert fresh.kernel(shadow, value, mask=True) is _kernels.update_rows_masked
    assert gate.calls == 1 and fresh.built == [KEY] and fresh.pending == []


@pytest.mark.parametrize("mode", ["synchronous", "compiler in use"])
def test_the_update_waits_for_its_kernel_when_asked_or_when_torch_compiles(
    mode: str, fresh: _kernels.Compiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kernels, "standalone_compile", lambda fn, examples: fn)
    if mode == "synchronous":
        fresh.synchronous = True
    else:  # a torch.compile'd function has run: building beside it would break it
        monkeypatch.setattr(_kernels, "compiler_idle", lambda: False)
    kernel = fresh.kernel(torch.zeros(4), torch.zeros(4), mask=False)
    assert kernel is _kernels.update_rows


def test_environment_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting, enabled, synchronous in (
        ("0", False, False),
        ("sync", True, True),
        ("1", True, False),
    ):
        monkeypatch.setenv("FUNCTIONAL_EMA_COMPILE", setting)
        kernels = _kernels.Compiled()
        assert (kernels.enabled, kernels.synchronous) == (enabled, synchronous)


def _warning_builder(fn: _kernels.Kernel, examples: tuple[torch.Tensor, ...]) -> _kernels.Kernel:
    # What `warnings.warn` does inside torch's compiler when a filter makes warnings errors.
    raise DeprecationWarning("torch is deprecating something")


def _broken_builder(fn: _kernels.Kernel, examples: tuple[torch.Tensor, ...]) -> _kernels.Kernel:
    raise RuntimeError("no C++ compiler here")


@pytest.mark.parametrize("cause", ["warning", "error"])
def test_a_failed_build_falls_back_and_never_raises_in_the_caller_under_w_error(
    cause: str, fresh: _kernels.Compiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = _warning_builder if cause == "warning" else _broken_builder
    monkeypatch.setattr(_kernels, "standalone_compile", builder)
    monkeypatch.setattr(_kernels, "dynamo_compile", builder)
    fresh.synchronous = True
    params = {"w": torch.randn(1000)}
    state, reference = fe.init(params), fe.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as `python -W error`: every warning raises
        fe.update_(state, {"w": torch.ones(1000)}, 0.9)  # neither warning raises here
    fresh.enabled = False
    fe.update_(reference, {"w": torch.ones(1000)}, 0.9)
    assert_bits_equal(state, reference)
    assert fresh.fallbacks == [KEY]
    expected = "DeprecationWarning('torch is deprecating" if cause == "warning" else "no C++"
    assert expected in fresh.failures[KEY]


def test_a_failed_build_warns_from_the_build_thread_unless_a_warning_caused_it(
    fresh: _kernels.Compiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh.synchronous = True
    seen: list[tuple[str, str]] = []

    def record(message, category, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((category.__name__, threading.current_thread().name))

    monkeypatch.setattr(_kernels, "dynamo_compile", _broken_builder)
    with warnings.catch_warnings():  # restores the filters and `showwarning`
        warnings.simplefilter("always")
        warnings.showwarning = record
        for builder, mask in ((_broken_builder, True), (_warning_builder, False)):
            monkeypatch.setattr(_kernels, "standalone_compile", builder)
            assert fresh.kernel(torch.zeros(4), torch.zeros(4), mask=mask) is None
    assert seen == [("RuntimeWarning", "functional_ema-compile")]  # the first build only
    assert len(fresh.fallbacks) == 2


_FORK_MID_BUILD = """
import os, time, torch
import functional_ema as fe
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
ema = fe.EMA(model, 0.99)
ema.update()  # queues a build in the background
time.sleep(0.3)
pid = os.fork()
if pid == 0:
    ema.update()
    ema.update()
    print("child updated", flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child status", status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_child_forked_mid_build_updates_eagerly(tmp_path: Path) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _FORK_MID_BUILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "child updated" in done.stdout and "child status 0" in done.stdout
