"""Checkpoint files: atomic saves and verified weights-only loads (nothing EMA-specific)."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import socket
import zipfile
from typing import Any

import torch
from torch import Tensor

from functional_ema._errors import message, wrong_type, wrong_value


PathLike = str | os.PathLike[str]

_TMP_SUFFIX = ".tmp"


# --- saving -----------------------------------------------------------------------------


def _host_tag() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def _temp_prefix(path: str) -> str:
    """Prefix of the temporary files of ``path``: hidden, in the same directory."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Delete temporary files of ``path`` left by processes of this host that no longer run.

    A save killed between creating its temporary file and renaming it (SIGKILL, power loss)
    leaves ``.<name>.<host>-<pid>-<token>.tmp`` beside the target. Only files of this host
    whose process is gone are removed, so concurrent writers (other processes, other hosts on
    a shared file system) are never disturbed. POSIX only (elsewhere nothing is removed).
    """
    if os.name != "posix":
        return []
    prefix = _temp_prefix(path)
    directory, start = os.path.dirname(prefix) or ".", os.path.basename(prefix)
    host, removed = _host_tag(), []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(start) and name.endswith(_TMP_SUFFIX)):
                continue
            parts = name[len(start) : -len(_TMP_SUFFIX)].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


_SAFE_TYPES = (
    Tensor,
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


def _first_unsafe(obj: Any, path: str = "") -> tuple[str, Any] | None:
    """The first value (path, value) that is not a tensor, number, string or plain container."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _first_unsafe(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            found = _first_unsafe(value, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
        return None
    if isinstance(obj, _SAFE_TYPES):
        return None
    return path or "<root>", obj


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories can't sync)."""
    if os.name != "posix":
        return
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj: Any, path: PathLike) -> None:
    """Write ``obj`` with ``torch.save`` atomically: ``path`` holds the old or the new file.

    The object is written to a temporary file in the same directory, flushed and
    ``fsync``-ed, checked to load with ``torch.load(weights_only=True)``, then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows) and the directory is
    ``fsync``-ed. A crash or ``SIGKILL`` at any point leaves ``path`` as it was (the previous
    checkpoint, or no file), never a partial file.

    A killed save leaves its temporary file, ``.<name>.<host>-<pid>-<token>.tmp``, beside
    ``path``; the next :func:`save` to the same ``path`` on that host deletes the ones whose
    process no longer runs (other writers' files are left alone). A save that fails with an
    exception deletes its own temporary file.

    Args:
        obj: What to save: tensors, numbers, strings and ``dict`` / ``list`` / ``tuple``
            containers, e.g. an :class:`EmaState`, ``EMA.state_dict()``, or a dict holding
            the model's, the optimizer's and the EMA's state dicts. Anything that
            ``torch.load(weights_only=True)`` would refuse is rejected before ``path`` is
            touched.
        path: The checkpoint file. Its directory must exist.

    Raises:
        TypeError: If ``obj`` holds a value that ``torch.load(weights_only=True)`` cannot
            read back (the error names its path in ``obj``).
        OSError: If the directory is missing or not writable, or the disk is full; ``path``
            is left as it was.

    Example:
        >>> import os, tempfile, torch, functional_ema as fe
        >>> state = fe.init({"w": torch.ones(2)})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fe.save(state, os.path.join(folder, "ema.pt"))
        ...     loaded = fe.load(os.path.join(folder, "ema.pt"))
        ...     sorted(os.listdir(folder))
        ['ema.pt']
        >>> loaded["params"]["w"]
        tensor([1., 1.])
    """
    api = "save"
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    remove_stale_temps(target)
    temp = f"{_temp_prefix(target)}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}"
    # O_EXCL: never reuse a file; mode 0o666 minus the umask, as a plain open() would give.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        _check_loadable(api, obj, temp, target)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


def _check_loadable(api: str, obj: Any, temp: str, target: str) -> None:
    """Check the written file unpickles under ``weights_only=True`` (tensors memory-mapped)."""
    try:
        loaded = torch.load(temp, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        found = _first_unsafe(obj)
        where, got = (
            (found[0], f"{type(found[1]).__module__}.{type(found[1]).__qualname__}")
            if found is not None
            else ("<root>", f"a value torch refuses ({str(error).splitlines()[0]})")
        )
        raise wrong_type(
            api,
            "value that torch.load(weights_only=True) cannot read",
            where,
            "tensors, numbers, strings and dict/list/tuple containers in `obj`",
            got,
            f"Convert it (e.g. a dataclass or namedtuple to a dict) before saving; {target!r} "
            "was not modified.",
        ) from None
    del loaded


# --- loading ----------------------------------------------------------------------------


def _unreadable(path: str, got: str, fix: str) -> ValueError:
    return wrong_value(
        "load",
        "unreadable checkpoint",
        path,
        "a file written by torch.save (functional_ema.save)",
        got,
        fix,
    )


_DAMAGED_FIX = (
    "The file is truncated or damaged (an interrupted copy or write, a full disk): load an "
    "earlier checkpoint and save with functional_ema.save, which never leaves a partial file."
)


def _verify_archive(path: str) -> None:
    """Check the zip archive's CRC32 checksums (``torch.load`` does not verify them)."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    if not head:
        raise _unreadable(path, "an empty file", _DAMAGED_FIX)
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            raise _unreadable(
                path, "a zip archive without its central directory (truncated)", _DAMAGED_FIX
            )
        return  # torch's legacy (pre-1.6) format or not a checkpoint: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
        raise _unreadable(path, f"a damaged zip archive ({error})", _DAMAGED_FIX) from None
    if bad is not None:
        raise _unreadable(
            path, f"a failed CRC32 checksum in the record {bad!r} (corrupted data)", _DAMAGED_FIX
        )


def load(path: PathLike, *, map_location: Any = None, verify: bool = True) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)``, after checking its integrity.

    Only tensors, numbers, strings and standard containers are unpickled: no code from the
    file runs. ``torch.load`` does not check the archive's checksums, so a flipped bit in
    tensor data would load silently; with ``verify=True`` (the default) every record's CRC32
    is checked first, at the cost of reading the file once more.

    Args:
        path: A file written by :func:`save` or ``torch.save``.
        map_location: As in ``torch.load``, e.g. ``"cpu"`` or ``torch.device("cuda", 0)``.
        verify: Check the CRC32 checksums of the archive before loading.

    Returns:
        The saved object.

    Raises:
        ValueError: If the file is empty, truncated, corrupted, not a checkpoint, or holds
            objects that ``weights_only=True`` refuses (the message names the file).
        FileNotFoundError: If there is no file at ``path``.

    Example:
        >>> import os, tempfile, torch, functional_ema as fe
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fe.save({"step": torch.tensor(3)}, os.path.join(folder, "ckpt.pt"))
        ...     fe.load(os.path.join(folder, "ckpt.pt"), map_location="cpu")
        {'step': tensor(3)}
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(
            message(
                "load",
                "no checkpoint",
                name,
                "a file",
                "a directory" if os.path.isdir(name) else "nothing",
                "Check the path.",
            )
        )
    if verify:
        _verify_archive(name)
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
            detail = found.group(0) if found else text.splitlines()[0][:120]
            raise wrong_value(
                "load",
                "checkpoint holding objects that torch.load(weights_only=True) refuses",
                name,
                "tensors, numbers, strings and containers",
                detail,
                "Save plain state (functional_ema.save checks this); if you trust the file, "
                "register the class with torch.serialization.add_safe_globals.",
            ) from None
        raise _unreadable(name, *_what_failed(name, error)) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as error:
        raise _unreadable(name, *_what_failed(name, error)) from None


def _what_failed(path: str, error: BaseException) -> tuple[str, str]:
    """``(got, fix)`` for a file ``torch.load`` failed on: not a checkpoint, or damaged."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    if not head:
        return "an empty file", _DAMAGED_FIX
    if not head.startswith((b"PK", b"\x80")):  # a zip archive, or torch's legacy pickle format
        return (
            f"a file that is not a torch checkpoint (it starts with {head!r})",
            "Check the path: pass a file written by functional_ema.save or torch.save.",
        )
    text = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{type(error).__name__} from torch.load{f' ({text})' if text else ''}", _DAMAGED_FIX
