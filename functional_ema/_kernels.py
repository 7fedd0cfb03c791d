"""The engine's compiled kernels: :func:`_arith.ema_step` over rows, built per key off-thread.

A kernel sees a region of averages as rows of ``ROW`` elements (a bank's leaf as K such
blocks, one per average, of one value's rows) and updates it in one pass. The kernels are
compiled *from* the arithmetic module's functions, never restated, so their bits are
TensorFlow's by construction; the compiled engine tests check that they are.

Compiling takes seconds, so it never happens on the caller's thread: the first update that
wants a kernel starts its build in a daemon thread (which also does the heavy imports, e.g.
``torch._inductor``) and runs the engine's eager path (same bits) until the kernel is ready.

torch's compiler stack is not thread-safe: while a build traces (``make_fx``, AOTAutograd),
a process-wide flag is set that makes every ``torch.compile``d function called from another
thread raise ``RuntimeError: Detected that you are using FX to symbolically trace a
dynamo-optimized function``, and two compiles at once share Inductor's global state. So a
build runs in the background only while torch's compiler is idle in the process (nothing
but these builds compiled yet: :func:`compiler_idle`), and holds Dynamo's compile lock;
otherwise the update waits for it, as a compile in the caller's thread would. What remains:
a program that calls a ``torch.compile``d function for the first time while a background
build traces (about 0.1 s of its seconds, right after the first update of a process that had
compiled nothing), or that imports torch's compiler or runs ``torch.export`` while the build
imports or traces, can meet the errors above. ``FUNCTIONAL_EMA_COMPILE=sync`` rules that out
(every build then runs while the update that needs it waits).

At interpreter exit the queued builds are dropped and a running one is waited for (at most
``EXIT_WAIT`` seconds): a process leaving while torch compiles on another thread can abort
in C++ ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from functional_ema._arith import ema_step, keep_finite, sum_dtype
from functional_ema._compat import (
    Kernel,
    compile_count,
    compile_lock,
    dynamo_compile,
    standalone_compile,
)


ROW = 128
"""The row kernel sees a region as rows of ``ROW`` elements (and one shorter row for the
rest): with ``nonfinite="skip"`` it sums each row to check it, then updates the row while it
is still in the L1 cache, so the check costs no extra pass over memory."""

EXIT_WAIT = 120.0
"""The most seconds the interpreter's exit waits for a running build."""

Key = tuple[bool, bool, str, torch.dtype, torch.dtype, bool]
"""What a kernel is built for: (mask, bank, device type, average dtype, value dtype, into)."""


def update_rows_into(
    shadow: Tensor, value: Tensor, weight: Tensor, valid: Tensor, out: Tensor
) -> list[Tensor]:
    """``shadow`` (R, C) moved towards ``value`` (R, C) by ``weight``, written to ``out``.

    A bank's K averages of one leaf come as ``shadow`` (K, R, C), ``value`` (1, R, C) and
    ``weight`` (K, 1, 1). ``weight`` is 0-dim otherwise; ``out`` is shaped like ``shadow``
    and may be ``shadow``
    itself (the in-place update). Where the 0-dim bool ``valid`` is false, ``out`` gets
    ``shadow``'s bits (an update whose decay or ``dt`` was found out of range on the
    device). Returns ``[weight]``, ignored: with no output Inductor writes ``out`` in a
    second pass.
    """
    out.copy_(torch.where(valid, ema_step(shadow, value, weight, inplace=False), shadow))
    return [weight]


def update_rows_masked_into(
    shadow: Tensor, value: Tensor, weight: Tensor, valid: Tensor, out: Tensor
) -> list[Tensor]:
    """:func:`update_rows_into` leaving non-finite values out; returns the "all finite" flag.

    A row's sum is finite exactly when its values are (or when the sum overflows, which
    reports a finite update as one with NaN/Inf). ``where(row_ok, weight, weight)`` is
    ``weight``: reading the row's check in the update makes Inductor evaluate both in one
    loop over each row.
    """
    row_ok = torch.isfinite(
        value.to(shadow.dtype).to(sum_dtype(shadow.dtype)).sum(dim=-1, keepdim=True)
    )
    kept, _ = keep_finite(shadow, value)
    stepped = ema_step(shadow, kept, torch.where(row_ok, weight, weight), inplace=False)
    out.copy_(torch.where(valid, stepped, shadow))
    return [row_ok.all()]


def update_rows(shadow: Tensor, value: Tensor, weight: Tensor, valid: Tensor) -> list[Tensor]:
    """:func:`update_rows_into` in place (``out`` is ``shadow``)."""
    return update_rows_into(shadow, value, weight, valid, shadow)


def update_rows_masked(
    shadow: Tensor, value: Tensor, weight: Tensor, valid: Tensor
) -> list[Tensor]:
    """:func:`update_rows_masked_into` in place (``out`` is ``shadow``)."""
    return update_rows_masked_into(shadow, value, weight, valid, shadow)


_FUNCTIONS: dict[tuple[bool, bool], Kernel] = {
    (False, False): update_rows,
    (True, False): update_rows_masked,
    (False, True): update_rows_into,
    (True, True): update_rows_masked_into,
}
"""The function a kernel is compiled from, by (mask, into)."""


class _Usage:
    """Dynamo's compile count that this module's own builds account for (process-wide)."""

    lock = threading.Lock()
    own = 0
    building = False
    idle_at_start = False

    @classmethod
    def after_fork(cls) -> None:
        """In a forked child no build runs (and the lock may have been held at the fork)."""
        cls.lock = threading.Lock()
        cls.building = False


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_Usage.after_fork)


def compiler_idle() -> bool:
    """Whether nothing but this module's kernel builds has been compiled in this process.

    Then no ``torch.compile``d function has run, so none runs in another thread while a
    build traces (and a user's compile waits for the build's lock). While a build runs, its
    own counts are not known yet: the answer is the one from when it started (nothing else
    compiles meanwhile: the build holds Dynamo's compile lock). ``False`` when Dynamo's
    counters are unreadable.
    """
    with _Usage.lock:
        if _Usage.building:
            return _Usage.idle_at_start
        count = compile_count()
        return count is not None and count <= _Usage.own


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """A build runs inside, holding Dynamo's compile lock; the counts it adds are its own.

    Whether the compiler is idle is read first, before the lock's import of Dynamo, and
    answers for the whole build.
    """
    idle = compiler_idle()
    with _Usage.lock:
        _Usage.building, _Usage.idle_at_start = True, idle
    try:
        with compile_lock():
            start = compile_count()
            try:
                yield
            finally:
                end = compile_count()
                if start is not None and end is not None:
                    with _Usage.lock:
                        _Usage.own += end - start
    finally:
        with _Usage.lock:
            _Usage.building = False


def _warning_caused(error: BaseException) -> bool:
    """Whether ``error`` is, or was caused by, a warning turned into an exception."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Warning):
            return True
        inner = getattr(current, "inner_exception", None)  # Dynamo's BackendCompilerFailed
        pending += [current.__cause__, current.__context__]
        if isinstance(inner, BaseException):
            pending.append(inner)
    return False


def _reset_in_child(kernels: Compiled) -> Callable[[], None]:
    """What a forked child runs for ``kernels`` (held weakly: no reference kept alive)."""
    ref = weakref.ref(kernels)

    def reset() -> None:
        held = ref()
        if held is not None:
            held._after_fork()

    return reset


class Compiled:
    """The compiled kernels, built in a background thread on first use per key.

    A key is (mask, bank, device type, dtypes). The first :meth:`kernel` call for a key
    queues its build on the build thread (a daemon thread, one build at a time, at most one
    build per key, holding Dynamo's compile lock). While torch's compiler is idle in the
    process (no ``torch.compile``d function has run, see the module docstring) the call
    returns ``None`` at once (use the engine's eager path, same bits) until the kernel is
    ready; once it is not, or with :attr:`synchronous`, the call waits for the build (the
    kernel is used from that call on). Builds use ``torch._inductor.standalone_compile``
    where it works, else ``torch.compile``.

    A key whose build fails, for any reason, is a *fallback*: it uses the eager path for the
    rest of the process (same bits, slower) and its reason is in :attr:`failures`; other keys
    are unaffected. The build thread then warns once (``RuntimeWarning``) unless the failure
    came from a warning that a filter such as ``python -W error`` turned into an exception
    (e.g. a ``DeprecationWarning`` torch emits inside its compiler): the warning filters are
    process-wide, so the same filter would turn the library's warning into an error too.
    That warning is raised on the build thread only, never on the caller's; a filter that
    turns it into an error there is caught, and the reason stays in :attr:`failures`. The
    build thread installs no warning filters (they are process-wide and not thread-safe).

    Switches: ``FUNCTIONAL_EMA_COMPILE=0`` (read when the object is made) or ``enabled =
    False`` turns compiling off; ``FUNCTIONAL_EMA_COMPILE=sync`` or ``synchronous = True``
    makes :meth:`kernel` wait for its key's build (still on the build thread) so that every
    update runs the kernel (tests, benchmarks). :meth:`wait` waits for every queued build.

    Example:
        >>> from functional_ema._kernels import Compiled
        >>> kernels = Compiled()
        >>> kernels.wait(timeout=1.0)  # nothing queued
        True
        >>> kernels.fallbacks, kernels.pending
        ([], [])
    """

    def __init__(self) -> None:
        setting = os.environ.get("FUNCTIONAL_EMA_COMPILE", "1").strip().lower()
        self.enabled = setting not in ("0", "false", "off", "no")
        self.synchronous = setting == "sync"
        self._kernels: dict[Key, Kernel] = {}
        self._failures: dict[Key, str] = {}
        self._queued: dict[Key, torch.device] = {}  # insertion order is build order
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._exiting = False
        if hasattr(os, "register_at_fork"):  # not on Windows
            os.register_at_fork(after_in_child=_reset_in_child(self))
        _LIVE.add(self)

    def _at_exit(self) -> None:
        """Drop the queued builds and wait for the running one (interpreter exit)."""
        with self._changed:
            self._exiting = True
            self._changed.wait_for(lambda: self._worker is None, EXIT_WAIT)

    def _after_fork(self) -> None:
        """In a forked child the build thread is gone: forget its queue, make new locks.

        A child forked while a build ran may hold Dynamo's compile lock with no thread to
        release it: it never compiles (eager, same bits) rather than wait forever.
        """
        if self._worker is not None:
            for key in self._queued:
                self._failures[key] = "not built: the process forked while it was building"
            self.enabled = False
        self._queued = {}
        self._worker = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    @property
    def fallbacks(self) -> list[Key]:
        """The keys whose kernel failed to build (they use the eager path)."""
        with self._lock:
            return list(self._failures)

    @property
    def failures(self) -> dict[Key, str]:
        """Why each fallback key failed to build, by key."""
        with self._lock:
            return dict(self._failures)

    @property
    def built(self) -> list[Key]:
        """The keys whose kernel is ready."""
        with self._lock:
            return list(self._kernels)

    def building(self) -> bool:
        """Whether a build is queued or running (read without the lock: a hint)."""
        return bool(self._queued)

    @property
    def pending(self) -> list[Key]:
        """The keys queued or being built."""
        with self._lock:
            return list(self._queued)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no build is queued or running (tests, benchmarks).

        Args:
            timeout: The most seconds to wait; ``None`` waits as long as it takes.

        Returns:
            ``True`` when no build is pending, ``False`` when ``timeout`` ran out first.
        """
        with self._changed:
            return self._changed.wait_for(lambda: not self._queued, timeout)

    def kernel(
        self,
        shadow: Tensor,
        value: Tensor,
        *,
        mask: bool,
        bank: bool = False,
        build: bool = True,
        into: bool = False,
    ) -> Kernel | None:
        """The kernel for these tensors; ``None`` means: use the eager path.

        ``None`` when compiling is off, pending or failed for this key (or not built yet and
        ``build`` is false: too little work to start a build), or for a device without
        Inductor. ``bank``: shapes ``(K, R, C)``, ``(1, R, C)`` and weights ``(K, 1, 1)``. ``into``:
        the kernel takes a fifth argument, ``out``, that receives the new averages
        (``shadow`` is not written).
        Never compiles on the calling thread; waits for the key's build when
        :attr:`synchronous` or while torch's compiler is in use in the process.
        """
        if not self.enabled or shadow.device.type not in ("cpu", "cuda"):
            return None
        key: Key = (mask, bank, shadow.device.type, shadow.dtype, value.dtype, into)
        kernel = self._kernels.get(key)
        if kernel is not None or not build:
            return kernel
        with self._changed:
            if key not in self._kernels and key not in self._failures:
                if key not in self._queued:
                    self._queue(key, shadow.device)
                if key in self._queued and (self.synchronous or not compiler_idle()):
                    self._changed.wait_for(lambda: key not in self._queued)
            return self._kernels.get(key)

    def _queue(self, key: Key, device: torch.device) -> None:
        """Queue ``key``'s build and start the build thread if none runs (lock held)."""
        self._queued[key] = device
        if self._worker is not None:
            return
        worker = threading.Thread(target=self._work, name="functional_ema-compile", daemon=True)
        try:
            worker.start()
        except RuntimeError as error:  # e.g. at interpreter shutdown: eager from now on
            del self._queued[key]
            self._failures[key] = f"the build thread could not start: {error!r}"
            return
        self._worker = worker

    def _work(self) -> None:
        """The build thread: build the queued keys one by one, then exit."""
        try:
            while True:
                with self._changed:
                    if self._exiting:  # the interpreter exits: no new build
                        for key in self._queued:
                            self._failures[key] = "not built: the interpreter exited"
                        self._queued.clear()
                    if not self._queued:
                        self._worker = None  # under the lock: a later key starts a new thread
                        self._changed.notify_all()
                        return
                    key, device = next(iter(self._queued.items()))
                kernel, reason = self._build(key, device)
                with self._changed:
                    if kernel is not None:
                        self._kernels[key] = kernel
                    else:
                        self._failures[key] = reason
                    del self._queued[key]
                    self._changed.notify_all()
        except BaseException as error:  # the thread is stopping (e.g. at interpreter exit)
            with self._changed:
                for key in self._queued:
                    self._failures[key] = f"the build thread stopped: {error!r}"
                self._queued.clear()
                self._worker = None
                self._changed.notify_all()

    def _build(self, key: Key, device: torch.device) -> tuple[Kernel | None, str]:
        """Build ``key``'s kernel (on the build thread); ``(None, reason)`` on any failure."""
        mask, bank, _, shadow_dtype, value_dtype, into = key
        fn = _FUNCTIONS[mask, into]
        # Shapes as the kernel will mostly see (Inductor tunes its loops to them): rows of
        # ROW elements, or for a bank K = 4 averages of one leaf, each as rows of ROW.
        shape: tuple[int, ...] = (4, 64, ROW) if bank else (64, ROW)
        value_shape = (1, *shape[1:]) if bank else shape
        weight_shape = (4, 1, 1) if bank else ()
        errors: list[str] = []
        warning_caused = False
        try:
            with _building(), torch.no_grad():
                examples: tuple[Tensor, ...] = (
                    torch.zeros(shape, dtype=shadow_dtype, device=device),
                    torch.zeros(value_shape, dtype=value_dtype, device=device),
                    torch.zeros(weight_shape, dtype=shadow_dtype, device=device),
                    torch.ones((), dtype=torch.bool, device=device),
                )
                if into:
                    examples += (torch.zeros(shape, dtype=shadow_dtype, device=device),)
                for build in (standalone_compile, dynamo_compile):
                    if self._exiting:  # the interpreter exits (torch's atexit hooks ran)
                        break
                    try:
                        return build(fn, examples), ""
                    except Exception as error:  # any failure: the next builder, then eager
                        warning_caused = warning_caused or _warning_caused(error)
                        errors.append(f"{getattr(build, '__name__', build)}: {error!r}")
        except Exception as error:  # e.g. an import failing at interpreter shutdown
            warning_caused = warning_caused or _warning_caused(error)
            errors.append(repr(error))
        reason = "; ".join(errors)
        if not (warning_caused or self._exiting):
            self._warn(key, reason)
        return None, reason

    @staticmethod
    def _warn(key: Key, reason: str) -> None:
        """Warn (on the build thread) that ``key`` fell back; never raises."""
        _, _, device_type, shadow_dtype, value_dtype, _ = key
        try:
            warnings.warn(
                f"functional_ema: compiling the update kernel for {shadow_dtype} averages of "
                f"{value_dtype} values on {device_type} failed ({reason}); using the eager "
                "chunked path instead (same results, slower). Set FUNCTIONAL_EMA_COMPILE=0 "
                "to skip the attempt.",
                RuntimeWarning,
                stacklevel=1,
            )
        except Exception:  # a filter made it an error: the reason is in `failures`
            return


_LIVE: weakref.WeakSet[Compiled] = weakref.WeakSet()


@atexit.register
def _wait_at_exit() -> None:
    """At interpreter exit, let every running build finish (see the module docstring)."""
    for kernels in list(_LIVE):
        kernels._at_exit()


compiled = Compiled()
"""The kernels the engine uses (one per process)."""
