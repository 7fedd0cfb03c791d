"""The snapshot store: one run of post-hoc EMA snapshots in a folder, written atomically.

Each :meth:`SnapshotStore.save` writes one file per tracked profile, then the run's manifest
(the list of its snapshots), every file through :func:`functional_ema._io.save` (temporary
file, ``fsync``, rename): a snapshot joins the run only once the manifest lists it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor

from functional_ema._arith import is_inexact
from functional_ema._errors import describe, short_list, wrong_type, wrong_value
from functional_ema._io import load as _load
from functional_ema._io import remove_stale_temps
from functional_ema._io import save as _atomic_save
from functional_ema._posthoc._tracker import PostHocState, check_bank, check_tracker
from functional_ema._profiles import gamma_to_sigma_rel
from functional_ema._tree import check_floating_dtype


_FORMAT = "functional_ema.posthoc/1"
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MANIFEST_SUFFIX = ".manifest.pt"


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: profile ``profile`` of a tracker at time ``t``.

    Attributes:
        file: The file name inside the store's folder.
        t: The time of the snapshot (the tracker's ``t``).
        gamma: The profile's exponent.
        sigma_rel: The profile's length, :func:`gamma_to_sigma_rel` of ``gamma``.
        dtype: The dtype the floating leaves were stored in (e.g. ``"float32"``).
        profile: The row of the tracker the snapshot was taken from.
    """

    file: str
    t: int
    gamma: float
    sigma_rel: float
    dtype: str
    profile: int

    def as_dict(self) -> dict[str, Any]:
        """The manifest entry (plain values, ``weights_only``-loadable)."""
        return {
            "file": self.file,
            "t": self.t,
            "gamma": self.gamma,
            "sigma_rel": self.sigma_rel,
            "dtype": self.dtype,
            "profile": self.profile,
        }


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def _valid_dtype_name(name: object) -> bool:
    if name == "":
        return True
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _dtype_of(name: str) -> torch.dtype | None:
    return None if not name else getattr(torch, name)


class SnapshotStore:
    """A folder of post-hoc EMA snapshots of one training run.

    Create one with :meth:`create` (a new run) or :meth:`open` (an existing run: to resume
    training or to :func:`reconstruct`); do not call the constructor directly.

    Each :meth:`save` writes one file per tracked profile, ``<run_id>.t<t>.p<k>.pt``, holding
    ``{"params", "buffers"?, "t", "gamma", "sigma_rel", "dtype", "run_id", ...}`` (tensors,
    numbers and strings only: ``torch.load(weights_only=True)`` reads it), then rewrites the
    manifest ``<run_id>.manifest.pt`` that lists the snapshots. Every file is written
    atomically (:func:`save`: temporary file, ``fsync``, rename), files before the manifest,
    so a crash at any point leaves the run as it was after the previous :meth:`save`: a
    snapshot is part of the run only once the manifest lists it. Files of other runs in the
    same folder are never read: a store reads only its own manifest, and :meth:`open`
    without a run id refuses a folder holding several runs.

    One process writes a run at a time; reading (:func:`reconstruct`) while it writes is safe.

    Example:
        >>> import tempfile, torch, functional_ema as fe
        >>> tracker = fe.posthoc_init({"w": torch.zeros(2)}, sigma_rel=(0.05, 0.1))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     store = fe.SnapshotStore.create(folder, run_id="demo")
        ...     for t in range(1, 201):
        ...         _ = fe.posthoc_update_(tracker, {"w": torch.full((2,), float(t))})
        ...         if t % 50 == 0:
        ...             _ = store.save(tracker)
        ...     runs = fe.SnapshotStore.runs(folder)
        >>> [(s.t, round(s.sigma_rel, 2)) for s in store.snapshots][:3], runs
        ([(50, 0.05), (50, 0.1), (100, 0.05)], ['demo'])
    """

    def __init__(self, folder: str, manifest: dict[str, Any]) -> None:
        self._folder = folder
        self._manifest = manifest

    # -- construction --

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        run_id: str | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
    ) -> SnapshotStore:
        """Start a new run in ``folder`` (created if missing) and write its empty manifest.

        Args:
            folder: The directory of the snapshots; other runs may share it.
            run_id: A name for the run (letters, digits, ``_`` and ``-``); by default the
                current time and a random suffix. Must not exist in ``folder`` yet.
            dtype: Floating dtype of stored snapshots: float32 by default (whatever the
                tracker's), ``None`` keeps the tracker's. Integer leaves keep theirs.

        Returns:
            The store, with no snapshots.

        Raises:
            ValueError: An invalid or already used ``run_id``.
            TypeError: A non-floating ``dtype``, or a ``run_id`` that is not a string.
        """
        api = "SnapshotStore.create"
        check_floating_dtype(api, dtype)
        if run_id is None:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        _check_run_id(api, run_id)
        folder = os.path.abspath(os.fspath(folder))
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(_manifest_path(folder, run_id)):
            raise wrong_value(
                api,
                "run id already used",
                "run_id",
                f"a run id not used in {folder!r} yet",
                f"{run_id!r}, which already has snapshots there",
                f"Continue it with SnapshotStore.open(folder, {run_id!r}), or pick another "
                "run_id (or none, for a generated one).",
            )
        manifest = {
            "format": _FORMAT,
            "run_id": run_id,
            "dtype": _dtype_name(dtype),
            "snapshots": [],
        }
        _atomic_save(manifest, _manifest_path(folder, run_id))
        return cls(folder, manifest)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], run_id: str | None = None) -> SnapshotStore:
        """Open an existing run, to continue saving snapshots or to reconstruct from it.

        Args:
            folder: The directory of the snapshots.
            run_id: The run to open; ``None`` opens the only run in ``folder`` and refuses a
                folder with several (see :meth:`runs`).

        Returns:
            The store, listing the snapshots its manifest lists.

        Raises:
            ValueError: No such run, several runs and no ``run_id``, or a damaged manifest.
        """
        api = "SnapshotStore.open"
        folder = os.path.abspath(os.fspath(folder))
        runs = cls.runs(folder)
        if run_id is None:
            if len(runs) != 1:
                got = "none" if not runs else f"{len(runs)} runs {short_list(runs)}"
                fix = (
                    "Pass run_id=... to choose one: runs are never mixed."
                    if runs
                    else "Check the folder, or create a run with SnapshotStore.create."
                )
                what = "several runs" if runs else "no run"
                raise wrong_value(api, what, folder, "exactly one run of snapshots", got, fix)
            run_id = runs[0]
        _check_run_id(api, run_id)
        if run_id not in runs:
            raise wrong_value(
                api,
                "unknown run",
                "run_id",
                f"one of {short_list(runs)} in {folder!r}",
                repr(run_id),
                "Check the run id (SnapshotStore.runs(folder) lists them).",
            )
        path = _manifest_path(folder, run_id)
        manifest = _load(path, map_location="cpu")
        _check_manifest(api, manifest, run_id, path)
        for name in os.listdir(folder):  # temporary files of writes killed mid-way
            match = re.fullmatch(rf"\.({re.escape(run_id)}\..+)\.[^.]+-\d+-[0-9a-f]+\.tmp", name)
            if match:
                remove_stale_temps(os.path.join(folder, match.group(1)))
        return cls(folder, manifest)

    @staticmethod
    def runs(folder: str | os.PathLike[str]) -> list[str]:
        """The run ids with a manifest in ``folder``, sorted.

        Args:
            folder: The directory of the snapshots.

        Returns:
            The run ids (an empty list for a missing folder).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            return []
        names = os.listdir(folder)
        return sorted(
            name[: -len(_MANIFEST_SUFFIX)]
            for name in names
            if name.endswith(_MANIFEST_SUFFIX) and _RUN_ID.fullmatch(name[: -len(_MANIFEST_SUFFIX)])
        )

    # -- properties --

    @property
    def folder(self) -> str:
        """The directory of the snapshots (absolute)."""
        return self._folder

    @property
    def run_id(self) -> str:
        """The run this store reads and writes."""
        return self._manifest["run_id"]

    @property
    def dtype(self) -> torch.dtype | None:
        """Floating dtype of stored snapshots (``None``: the tracker's)."""
        return _dtype_of(self._manifest["dtype"])

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """The run's snapshots, by time then profile."""
        return tuple(Snapshot(**entry) for entry in self._manifest["snapshots"])

    def __repr__(self) -> str:
        return (
            f"SnapshotStore(folder={self._folder!r}, run_id={self.run_id!r}, "
            f"snapshots={len(self._manifest['snapshots'])})"
        )

    # -- writing --

    def save(self, tracker: PostHocState) -> tuple[Snapshot, ...]:
        """Store a snapshot of every profile of ``tracker`` at its current time.

        Each profile's average is copied to the CPU in the store's dtype (float32 by default;
        integer leaves keep theirs) and written, with the tracker's buffers, to its own file;
        the manifest is rewritten last, so the new snapshots join the run together or not at
        all. Snapshot times must increase.

        Args:
            tracker: A :class:`PostHocState` with ``t > 0``. Not modified.

        Returns:
            The new snapshots.

        Raises:
            ValueError: ``t`` is 0 or not later than the last snapshot of the run.
            TypeError: A malformed tracker, or containers that ``torch.load(weights_only=True)``
                cannot read (use plain ``dict`` / ``list`` / ``tuple`` trees).
        """
        api = "SnapshotStore.save"
        check_bank(api, tracker["params"], check_tracker(api, tracker))
        t = int(tracker["t"])
        entries = self._manifest["snapshots"]
        last = entries[-1]["t"] if entries else 0
        if t <= last:
            fix = (
                "Update the tracker before saving."
                if t == 0
                else (
                    f"After resuming from an earlier checkpoint, drop the later snapshots first "
                    f"with store.truncate({t - 1})."
                )
            )
            raise wrong_value(
                api,
                "time not after the last snapshot",
                "tracker['t']",
                f"a time after the last snapshot ({last}) of run {self.run_id!r}",
                t,
                fix,
            )
        dtype = self.dtype
        gammas = tracker["gamma"].tolist()

        def stored(leaf: Tensor) -> Tensor:
            cast = dtype if dtype is not None and is_inexact(leaf) else leaf.dtype
            return leaf.detach().to(device="cpu", dtype=cast, copy=True)

        new = []
        for k, g in enumerate(gammas):
            params = optree.tree_map(lambda leaf, k=k: stored(leaf[k]), tracker["params"])
            name = f"{self.run_id}.t{t:012d}.p{k}.pt"
            leaves = [leaf for leaf in optree.tree_leaves(params) if is_inexact(leaf)]
            snapshot = Snapshot(
                file=name,
                t=t,
                gamma=float(g),
                sigma_rel=gamma_to_sigma_rel(float(g)),
                dtype=_dtype_name(leaves[0].dtype) if leaves else "",
                profile=k,
            )
            payload: dict[str, Any] = {
                "format": _FORMAT,
                "run_id": self.run_id,
                **snapshot.as_dict(),
                "params": params,
            }
            if "buffers" in tracker:
                payload["buffers"] = optree.tree_map(stored, tracker["buffers"])
            _atomic_save(payload, os.path.join(self._folder, name))
            new.append(snapshot)
        manifest = {**self._manifest, "snapshots": [*entries, *(s.as_dict() for s in new)]}
        _atomic_save(manifest, _manifest_path(self._folder, self.run_id))
        self._manifest = manifest
        return tuple(new)

    def truncate(self, t: int) -> tuple[Snapshot, ...]:
        """Drop the snapshots taken after ``t`` (when training resumes from an earlier point).

        The manifest is rewritten first (atomically), then the files are deleted.

        Args:
            t: Keep the snapshots with time <= ``t``.

        Returns:
            The dropped snapshots.

        Raises:
            TypeError: ``t`` is not an int.

        Example:
            >>> import tempfile, torch, functional_ema as fe
            >>> tracker = fe.posthoc_init({"w": torch.zeros(1)}, sigma_rel=0.1)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     store = fe.SnapshotStore.create(folder)
            ...     for _ in range(3):
            ...         _ = fe.posthoc_update_(tracker, {"w": torch.ones(1)}, dt=10)
            ...         _ = store.save(tracker)
            ...     dropped = store.truncate(15)
            >>> [s.t for s in dropped], [s.t for s in store.snapshots]
            ([20, 30], [10])
        """
        if isinstance(t, bool) or not isinstance(t, int):
            raise wrong_type(
                "SnapshotStore.truncate",
                "time of the wrong type",
                "t",
                "an int",
                describe(t),
                "Pass the time of the last snapshot to keep, e.g. the step you resume from.",
            )
        entries = self._manifest["snapshots"]
        keep = [e for e in entries if e["t"] <= t]
        dropped = tuple(Snapshot(**e) for e in entries if e["t"] > t)
        if dropped:
            manifest = {**self._manifest, "snapshots": keep}
            _atomic_save(manifest, _manifest_path(self._folder, self.run_id))
            self._manifest = manifest
            for snapshot in dropped:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._folder, snapshot.file))
        return dropped

    # -- reading --

    def load(self, snapshot: Snapshot, *, map_location: Any = "cpu") -> dict[str, Any]:
        """Load one snapshot file, checked against the manifest.

        Args:
            snapshot: One of :attr:`snapshots`.
            map_location: As in ``torch.load``.

        Returns:
            The file's dict: ``params`` (and ``buffers``) with the metadata.

        Raises:
            ValueError: A missing, damaged or foreign file (another run's, or another time's).
        """
        api = "SnapshotStore.load"
        path = os.path.join(self._folder, snapshot.file)
        if not os.path.isfile(path):
            raise wrong_value(
                api,
                "missing snapshot",
                path,
                f"the file the manifest of run {self.run_id!r} lists",
                "nothing",
                "It was deleted or moved: restore it, or drop the later snapshots with "
                f"store.truncate({snapshot.t - 1}).",
            )
        payload = _load(path, map_location=map_location)
        expected = {"format": _FORMAT, "run_id": self.run_id, **snapshot.as_dict()}
        got = {k: payload.get(k) for k in expected} if isinstance(payload, dict) else payload
        if got != expected or "params" not in payload:
            raise wrong_value(
                api,
                "foreign snapshot",
                path,
                expected,
                got if isinstance(payload, dict) else describe(payload),
                "The file was replaced by another run's or another time's: restore the folder.",
            )
        return payload


def _check_run_id(api: str, run_id: object) -> None:
    expected = "1 to 64 letters, digits, '_' or '-'"
    fix = "Pass e.g. run_id='exp1-seed0'."
    if not isinstance(run_id, str):
        raise wrong_type(api, "run id of the wrong type", "run_id", expected, describe(run_id), fix)
    if not _RUN_ID.fullmatch(run_id):
        raise wrong_value(api, "invalid run id", "run_id", expected, repr(run_id), fix)


def _manifest_path(folder: str, run_id: str) -> str:
    return os.path.join(folder, f"{run_id}{_MANIFEST_SUFFIX}")


def _check_manifest(api: str, manifest: Any, run_id: str, path: str) -> None:
    ok = (
        isinstance(manifest, dict)
        and manifest.get("format") == _FORMAT
        and manifest.get("run_id") == run_id
        and isinstance(manifest.get("snapshots"), list)
        and _valid_dtype_name(manifest.get("dtype"))
    )
    if not ok:
        got = (
            {k: manifest.get(k) for k in ("format", "run_id")}
            if isinstance(manifest, dict)
            else describe(manifest)
        )
        raise wrong_value(
            api,
            "invalid manifest",
            path,
            f"a {_FORMAT!r} manifest of run {run_id!r}",
            got,
            "The file was not written by SnapshotStore or was renamed.",
        )
