"""A save killed with SIGKILL mid-write leaves the previous checkpoint loadable and intact.

A child process (the venv's Python, importing torch once) forks writer processes that save
checkpoints in a loop with ``functional_ema.save``; the test kills a writer with ``SIGKILL``
while its temporary file is being written (seen growing on disk), and at random moments.
Then the checkpoint at the target path must be absent (first save killed) or load, CRC
verified, bit-identical to the last save that completed (or the one being killed, when the
kill came after the rename). A killed save leaves its temporary file beside the target; the
next save removes it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bits_equal

import functional_ema as fe


pytestmark = pytest.mark.skipif(
    os.name != "posix" or not hasattr(os, "fork"), reason="needs POSIX fork and SIGKILL"
)

TENSORS, NUMEL = 16, 1 << 20  # 16 x 4 MiB of float32: 64 MiB per checkpoint

SERVER = r"""
import os, sys
import torch
torch.set_num_threads(1)  # no thread pool before fork
import functional_ema as fe

path, tensors, numel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def payload(i):
    return {
        "i": torch.tensor(i),
        "w": [torch.arange(numel, dtype=torch.float32) + (i * tensors + j) for j in range(tensors)],
    }

def say(text):
    os.write(1, (text + "\n").encode())

say("ready")
for line in sys.stdin:
    command = line.split()
    if command[0] == "quit":
        break
    first = int(command[1])
    pid = os.fork()
    if pid == 0:  # the writer: save forever (until killed)
        for i in range(first, first + 100):
            obj = payload(i)
            say(f"start {i}")
            fe.save(obj, path)
            say(f"done {i}")
        os._exit(0)
    say(f"writer {pid}")
    os.waitpid(pid, 0)  # reaped: its pid is no longer alive when the next save looks
    say("reaped")
"""


def payload(i: int) -> dict[str, Any]:
    return {
        "i": torch.tensor(i),
        "w": [torch.arange(NUMEL, dtype=torch.float32) + (i * TENSORS + j) for j in range(TENSORS)],
    }


class Server:
    """The child process; ``run(first)`` starts a writer, ``kill()`` SIGKILLs it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(path), str(TENSORS), str(NUMEL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.expect("ready", timeout=180)
        self.writer = 0
        self.done: list[int] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float = 60) -> str:
        """Wait for a line starting with ``prefix``, recording completed saves on the way."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line.startswith("done "):
                self.done.append(int(line.split()[1]))
            if line.startswith(prefix):
                return line

    def run(self, first: int) -> None:
        assert self.proc.stdin is not None
        self.done = []
        self.proc.stdin.write(f"run {first}\n")
        self.proc.stdin.flush()
        self.writer = int(self.expect("writer ").split()[1])

    def kill(self) -> None:
        os.kill(self.writer, signal.SIGKILL)
        self.expect("reaped")

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the child this test started, by its own handle
            self.proc.wait(timeout=60)
        self.reader.join(timeout=60)
        self.proc.stdout.close()


def temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def kill_while_writing(server: Server, index: int) -> int:
    """Kill the writer once the temporary file of save ``index`` is partly written."""
    server.expect(f"start {index}")
    full = TENSORS * NUMEL * 4
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for temp in temps(server.path):
            size = temp.stat().st_size if temp.exists() else 0
            if 1 << 20 <= size < full:
                server.kill()
                return size
        time.sleep(0.0005)
    raise AssertionError("the temporary file was never seen partly written")


def check_target(path: Path, done: list[int]) -> int:
    """The target holds the last completed save (or the next one): complete, bit-identical."""
    last = done[-1]
    loaded = fe.load(path)  # CRC-verified
    index = int(loaded["i"])
    assert index in (last, last + 1), (index, done)
    assert_bits_equal(loaded, payload(index))
    return index


@pytest.fixture
def server(tmp_path: Path) -> Any:
    child = Server(tmp_path / "ckpt.pt")
    try:
        yield child
    finally:
        child.close()


def test_sigkill_mid_save_leaves_previous_checkpoint_intact(server: Server) -> None:
    path = server.path
    report: list[str] = []

    # 1. The very first save killed mid-write: no file at the target, only the temporary.
    server.run(0)
    size = kill_while_writing(server, 0)
    assert not path.exists()
    assert len(temps(path)) == 1
    report.append(f"first save killed at {size} bytes: no target, 1 temp")

    # 2. Killed mid-write after two completed saves: the second one is intact.
    server.run(10)
    server.expect("done 11")
    size = kill_while_writing(server, 12)
    assert server.done == [10, 11]
    assert check_target(path, server.done) == 11
    assert len(temps(path)) == 1  # the writer's own save removed the dead first writer's temp
    report.append(f"save 12 killed at {size} bytes: target = save 11")

    # 3. Killed at random moments (writing, syncing, verifying, renaming).
    rng = random.Random(0)
    for round_ in range(3):
        first = 20 + 10 * round_
        server.run(first)
        server.expect(f"done {first}")
        time.sleep(rng.uniform(0.0, 1.0))
        server.kill()
        index = check_target(path, server.done)
        assert len(temps(path)) <= 1
        report.append(f"random kill after {server.done}: target = save {index}")

    # The next save removes temporaries of writers that no longer run.
    fe.save({"i": torch.tensor(-1)}, path)
    assert temps(path) == []
    assert int(fe.load(path)["i"]) == -1
    print("\n".join(report))
