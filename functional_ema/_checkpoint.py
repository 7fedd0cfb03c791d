"""Checkpoints: atomic saves, verified weights-only loads, and checks of a loaded EMA state."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import socket
import zipfile
from collections.abc import Iterable
from typing import Any, cast

import optree
import torch
from torch import Tensor

from functional_ema._errors import short_list, strip_wrapper_prefixes
from functional_ema._state import EmaState, _check_state
from functional_ema._tree import check_tensor_leaves, leaf_paths


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


def _remove_stale_temps(path: str) -> list[str]:
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
    _remove_stale_temps(target)
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
        raise TypeError(
            f"{api}: value that torch.load(weights_only=True) cannot read at {where!r} of `obj`: "
            f"expected tensors, numbers, strings and dict/list/tuple containers, got {got}. "
            f"Convert it (e.g. a dataclass or namedtuple to a dict) before saving; {target!r} "
            "was not modified."
        ) from None
    del loaded


# --- loading ----------------------------------------------------------------------------


def _unreadable(path: str, got: str, fix: str) -> ValueError:
    return ValueError(
        f"load: unreadable checkpoint at {path!r}: expected a file written by torch.save "
        f"(functional_ema.save), got {got}. {fix}"
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
            f"load: no checkpoint at {name!r}: expected a file, got "
            f"{'a directory' if os.path.isdir(name) else 'nothing'}. Check the path."
        )
    if verify:
        _verify_archive(name)
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            found = re.search(r"Unsupported global: GLOBAL [\w.]+", message)
            detail = found.group(0) if found else message.splitlines()[0][:120]
            raise ValueError(
                f"load: checkpoint at {name!r} holds objects that torch.load(weights_only=True) "
                f"refuses: expected tensors, numbers, strings and containers, got {detail}. "
                "Save plain state (functional_ema.save checks this); if you trust the file, "
                "register the class with torch.serialization.add_safe_globals."
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


# --- checking a loaded EMA state ----------------------------------------------------------


def unwrap_keys(keys: Iterable[str], reference: Iterable[str]) -> dict[str, str]:
    """Map ``keys`` to ``reference`` names, dropping DDP / ``torch.compile`` prefixes.

    A key is renamed only when it is not a reference name itself and removing its
    ``module.`` / ``_orig_mod.`` segments gives the (equally stripped) name of exactly one
    reference name that no other key maps to. Other keys map to themselves, so real mismatches
    are still reported.
    """
    keys, reference = list(keys), list(reference)
    exact = set(reference)
    by_stripped: dict[str, list[str]] = {}
    for name in reference:
        by_stripped.setdefault(strip_wrapper_prefixes(name), []).append(name)
    mapping = {key: key for key in keys}
    claims: dict[str, list[str]] = {}
    for key in keys:
        if key in exact:
            continue
        candidates = by_stripped.get(strip_wrapper_prefixes(key), [])
        if len(candidates) == 1 and candidates[0] not in mapping:
            claims.setdefault(candidates[0], []).append(key)
    for target, sources in claims.items():
        if len(sources) == 1:
            mapping[sources[0]] = target
    return mapping


def _rename(tree: Any, reference: Any) -> Any:
    """``tree`` with wrapper prefixes dropped from its keys when both are flat str dicts."""
    if not (isinstance(tree, dict) and isinstance(reference, dict)):
        return tree
    if not all(isinstance(k, str) for k in (*tree, *reference)) or set(tree) == set(reference):
        return tree
    mapping = unwrap_keys(tree, reference)
    return {mapping[key]: value for key, value in tree.items()}


def describe_mismatch(
    missing: Iterable[str], unexpected: Iterable[str], problems: list[str]
) -> str:
    """``keys do not match: missing [...], unexpected [...]; mismatch at ...`` (non-empty parts)."""
    parts = []
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        parts.append(
            f"keys do not match: missing {short_list(missing)}, unexpected {short_list(unexpected)}"
        )
    parts.extend(problems[:8])
    if len(problems) > 8:
        parts.append(f"... ({len(problems) - 8} more mismatches)")
    return "; ".join(parts)


def _spec(tensor: Tensor, device: bool) -> str:
    return f"{tuple(tensor.shape)} {tensor.dtype}" + (f" on {tensor.device}" if device else "")


def tensor_problem(name: str, got: Any, expected: Tensor, *, device: bool = True) -> str | None:
    """``mismatch at 'name': expected <shape> <dtype>, got ...`` when they differ, else None."""
    if not isinstance(got, Tensor):
        return f"mismatch at {name!r}: expected a tensor, got {type(got).__name__}"
    show_device = device and got.device != expected.device
    if got.shape != expected.shape or got.dtype != expected.dtype or show_device:
        return (
            f"mismatch at {name!r}: expected {_spec(expected, show_device)}, got "
            f"{_spec(got, show_device)}"
        )
    return None


def check_step(api: str, step: Any, where: str) -> None:
    """A saved step counter: a 0-dim int64 tensor >= 0 (read on the host: load time only)."""
    if not isinstance(step, Tensor) or step.ndim != 0 or step.dtype != torch.int64:
        got = (
            f"shape {tuple(step.shape)}, dtype {step.dtype}"
            if isinstance(step, Tensor)
            else type(step).__name__
        )
        raise TypeError(
            f"{api}: step counter at {where!r}: expected a 0-dim int64 tensor, got {got}. The "
            "checkpoint was modified or not saved from an EMA: save the EMA's own state."
        )
    if step.device.type != "meta" and int(step) < 0:
        raise ValueError(
            f"{api}: step counter at {where!r}: expected a count >= 0, got {int(step)}. The "
            "checkpoint is corrupted: load an earlier one."
        )


def check_state(state: Any, like: EmaState) -> EmaState:
    """Check a loaded :class:`EmaState` against the state of the current model.

    ``like`` is what :func:`init` gives for the current model and options (e.g.
    ``fe.init(*fe.module_state(model))``); ``state`` must have the same entries
    (``buffers``, ``zero_debias`` counters), names, shapes, dtypes and devices, and a valid
    step counter. Names saved from a DDP or ``torch.compile`` wrapper (``module.`` /
    ``_orig_mod.`` prefixes) are mapped to the model's. Every difference is listed in one
    error, before anything is used.

    Args:
        state: The loaded state, e.g. ``fe.load(path)``. Not modified.
        like: A state of the current model, e.g. from :func:`init`. Not modified.

    Returns:
        ``state`` with the names of ``like`` (the same tensors, not copies), ready for
        :func:`update`.

    Raises:
        TypeError: If ``state`` is not an :class:`EmaState` or its step counter is malformed.
        ValueError: Missing or unexpected names, shape, dtype or device mismatches, entries
            that ``like`` lacks or has, or a negative step.

    Example:
        >>> import os, tempfile, torch, functional_ema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(*fe.module_state(model))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fe.save(state, os.path.join(folder, "ema.pt"))
        ...     loaded = fe.load(os.path.join(folder, "ema.pt"))
        >>> resumed = fe.check_state(loaded, like=fe.init(*fe.module_state(model)))
        >>> int(resumed["step"]), sorted(resumed["params"])
        (0, ['bias', 'weight'])
    """
    api = "check_state"
    for label, value in (("like", like), ("state", state)):
        if not isinstance(value, dict) or not {"step", "params"} <= set(value):
            got = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
            raise TypeError(
                f"{api}: `{label}` at '<root>': expected an EmaState (a dict with 'step' and "
                f"'params'), got {got}. Pass the state functional_ema.load read back as `state` "
                "and functional_ema.init(...) of the current model as `like`."
            )
    _check_state(api, like)
    if set(state) != set(like):
        raise ValueError(
            f"{api}: entries at '<root>': expected {sorted(like)} (as in `like`), got "
            f"{sorted(state)}. Build `like` with the options of the saved state (buffers given "
            "to init or not, zero_debias)."
        )
    check_step(api, state["step"], "step")
    out: dict[str, Any] = {"step": state["step"]}
    problems_by_entry = []
    ref = cast("dict[str, Any]", like)  # indexed by a variable key: a TypedDict wants literals
    for entry in ref:
        if entry == "step":
            continue
        tree = _rename(state[entry], ref[entry])
        out[entry] = tree
        check_tensor_leaves(api, tree, f"state[{entry!r}]")
        have = dict(zip(leaf_paths(tree), optree.tree_leaves(tree), strict=True))
        want = dict(zip(leaf_paths(ref[entry]), optree.tree_leaves(ref[entry]), strict=True))
        missing, unexpected = set(want) - set(have), set(have) - set(want)
        problems = [
            problem
            for name in sorted(set(want) & set(have))
            if (problem := tensor_problem(name, have[name], want[name])) is not None
        ]
        if not (missing or unexpected or problems) and optree.tree_structure(
            tree
        ) != optree.tree_structure(ref[entry]):
            problems.append(
                f"expected containers {optree.tree_structure(ref[entry])}, got "
                f"{optree.tree_structure(tree)}"
            )
        if missing or unexpected or problems:
            detail = describe_mismatch(missing, unexpected, problems)
            problems_by_entry.append(f"at {entry!r}: {detail}")
    if problems_by_entry:
        raise ValueError(
            f"{api}: state does not match the model {'; '.join(problems_by_entry)}. Load a "
            "state saved from the same model with the same `dtype` (for another device, "
            "functional_ema.load(path, map_location=...))."
        )
    return out  # type: ignore[return-value]


# --- the adapter: loading state dicts, guarding the swapped live model ---------------------


def check_state_dict(api: str, state_dict: Any, own: dict[str, Tensor], *, strict: bool) -> Any:
    """Check an ``EMA.state_dict()`` against the adapter's own before anything is written.

    Keys saved through a DDP or ``torch.compile`` wrapper are mapped to ``own``'s (the result
    is then a new dict); every missing or unexpected key (when ``strict``), shape and dtype
    difference is listed in one ``ValueError``. Devices may differ (loading copies).

    Returns:
        ``state_dict`` itself, or a renamed copy.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"{api}: `state_dict` at '<root>': expected a dict (from EMA.state_dict()), got "
            f"{type(state_dict).__name__}. Pass the object functional_ema.load read back."
        )
    if set(state_dict) != set(own) and all(isinstance(key, str) for key in state_dict):
        mapping = unwrap_keys(state_dict, own)
        if any(key != new for key, new in mapping.items()):
            state_dict = {mapping[key]: value for key, value in state_dict.items()}
    missing, unexpected = set(own) - set(state_dict), set(state_dict) - set(own)
    if not strict:
        missing = unexpected = set()
    problems = [
        problem
        for key in sorted(set(own) & set(state_dict), key=str)
        if (problem := tensor_problem(key, state_dict[key], own[key], device=False)) is not None
    ]
    problems += [
        f"mismatch at {key!r}: expected a tensor with data, got a meta tensor"
        for key in sorted(set(own) & set(state_dict), key=str)
        if isinstance(state_dict[key], Tensor)
        and state_dict[key].device.type == "meta"
        and own[key].device.type != "meta"
    ]
    if missing or unexpected or problems:
        hint = ""
        if missing and {f"averages.{k}" for k in unexpected} <= missing:
            hint = (
                " The keys look like a model's state_dict: load it into the model, and load "
                "the EMA from ema.state_dict()."
            )
        raise ValueError(
            f"{api}: {describe_mismatch(map(str, missing), map(str, unexpected), problems)}. Load "
            f"a state saved by an EMA of the same model architecture with the same `dtype`.{hint}"
        )
    if "step" in state_dict:
        check_step(api, state_dict["step"], "step")
    return state_dict


def _inert_hook(*args: Any) -> None:
    """What a swap guard becomes in a copy of the model: nothing to guard there."""
    del args


def _swap_error(what: str, why: str, fix: str) -> RuntimeError:
    return RuntimeError(
        f"EMA.swap: {what} inside `with ema.swap():` at '<root>': expected the live weights, "
        f"got the averages (swapped in until the block ends). {why} {fix}"
    )


_SAVE_FIX = (
    "Save the model after the `with` block; for the averages use ema.state_dict() (to resume "
    "the EMA) or ema.shadow.state_dict() (the model's keys, for export)."
)


class _Refuse:
    """A hook that raises: saving (``state_dict``) or loading while the averages are in."""

    def __init__(self, loading: bool) -> None:
        self.loading = loading

    def __call__(self, *args: Any) -> None:
        del args
        if self.loading:
            raise _swap_error(
                "model.load_state_dict()",
                "The live weights are restored when the block ends, which would undo this load.",
                "Load after the `with` block.",
            )
        raise _swap_error(
            "model.state_dict()",
            "Saving them as the model's weights is the classic resume bug.",
            _SAVE_FIX,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert_hook  # a copy made inside the block (e.g. ema.shadow) is not guarded

    def __reduce__(self) -> Any:
        raise _swap_error(
            "pickling the model",
            "A pickled model would hold the averages as its weights.",
            _SAVE_FIX,
        )


class SwapGuard:
    """Refuse ``state_dict`` / ``load_state_dict`` of the live model while it holds averages.

    Inside ``with ema.swap():`` the live model's tensors are the averages: saving
    ``model.state_dict()`` then stores the averages as if they were the weights (resuming
    from it silently restarts training from the averages), and ``model.load_state_dict``
    would be undone when the block restores the live weights. The hooks sit on the live
    model's root module, whose hooks run before anything is read or written, so they also
    cover a parent module's ``state_dict`` and DDP / ``torch.compile`` wrappers (not a
    submodule's own ``state_dict``). A ``copy.deepcopy`` of the model made inside the block
    (e.g. ``ema.shadow``) gets an inert hook; pickling the guarded model raises.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._handles = [
            model.register_state_dict_pre_hook(_Refuse(loading=False)),
            model.register_load_state_dict_pre_hook(_Refuse(loading=True)),
        ]

    def remove(self) -> None:
        """Uninstall the hooks (the model is itself again)."""
        for handle in self._handles:
            handle.remove()
