"""Storage guards: noticing, cheaply, that a model's tensors moved to other storage.

The ``EMA`` adapter caches its validated update while the live model's tensors keep their
storage. Reading one data pointer per tensor at every update costs Python work per tensor
(a few hundred nanoseconds each once the model's objects have left the CPU caches: about
1.4 ms for 4000 tensors). The buffers :func:`flatten_parameters_` lays out are instead
watched through their storage's reference count: every tensor viewing the buffer holds one
reference, so a tensor moved elsewhere (``p.data = ...``, ``model.to(...)``, ``.half()``,
flattening again) drops one. That check is O(1) per buffer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from functional_ema._compat import available, storage_key, storage_use_count
from functional_ema._dtensor import data_ptrs


StorageKey = tuple[int, int, int]
"""A storage's identity: its ``StorageImpl`` address, data pointer and size in bytes."""

_laid_out: weakref.WeakKeyDictionary[nn.Module, set[StorageKey]] = weakref.WeakKeyDictionary()
"""The storages :func:`flatten_parameters_` laid out, by the module it was called on."""


def _key(tensor: Tensor) -> StorageKey | None:
    """The identity of a plain tensor's storage (``None`` for a subclass such as DTensor)."""
    if type(tensor) not in (Tensor, nn.Parameter):
        return None
    return storage_key(tensor)


def _use_count(storage: torch.UntypedStorage) -> int | None:
    return storage_use_count(storage)


def register_layout(module: nn.Module, views: Iterable[Tensor]) -> None:
    """Record the buffers ``views`` (the module's tensors, just laid out) live in."""
    if available("storage_use_count"):  # else every tensor is watched by pointer
        _laid_out[module] = {key for key in map(_key, views) if key is not None}


class StorageGuard:
    """Holds while the tensors it was made with keep the storage they had.

    Tensors in buffers laid out by :func:`flatten_parameters_` are checked together, by
    the reference count of each buffer's storage; the others by their data pointers.

    A reference count moves with views made or dropped too (an autograd graph alive during
    the update, a view the caller keeps): then every pointer is read and, if none moved, the
    new counts are the reference. What a count cannot see is a change that takes one
    reference as it drops one: a tensor re-pointed into the same buffer (``p.data = q.data``
    on two flattened parameters), or a tensor moved out while a new view of the buffer is
    kept; :func:`flatten_parameters_` documents it.
    """

    def __init__(self, modules: Iterable[nn.Module], tensors: Sequence[Tensor]) -> None:
        laid_out: set[StorageKey] = set()
        for module in modules:
            laid_out |= _laid_out.get(module, set())
        self.tensors = list(tensors)
        self.pointers = data_ptrs(self.tensors)
        self.loose: list[Tensor] = []
        storages: dict[StorageKey, torch.UntypedStorage] = {}
        for tensor in self.tensors:
            key = _key(tensor) if laid_out else None
            if key is not None and key in laid_out:
                storages.setdefault(key, tensor.untyped_storage())
            else:
                self.loose.append(tensor)
        self.loose_pointers = data_ptrs(self.loose)
        self.storages = list(storages.values())
        self.counts = [_use_count(storage) for storage in self.storages]

    def holds(self) -> bool:
        """Whether every tensor still has the storage (and offset) it had."""
        if self.loose and data_ptrs(self.loose) != self.loose_pointers:
            return False
        counts = [_use_count(storage) for storage in self.storages]
        if counts == self.counts and None not in counts:
            return True
        if data_ptrs(self.tensors) != self.pointers:
            return False
        self.counts = counts
        return True
