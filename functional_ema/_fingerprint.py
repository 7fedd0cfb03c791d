"""Fingerprints of a model: noticing, at every update, anything that moved since the last plan.

The ``EMA`` adapter keeps its validated update (the engine's plan over the model's tensors)
and its shadow module between calls. A :class:`Fingerprint` tells, without any
process-global state, whether they still match the model:

- **structure**: the same module objects under the same names, the same objects in every
  watched slot dict (``_modules``, ``_parameters``, ``_buffers``), so ``del model[1]``,
  ``del m.weight``, a buffer reassigned by the forward, ``model.double()`` under
  ``torch.__future__.set_overwrite_module_params_on_conversion(True)`` or a parametrization
  registered later all show;
- **tensors**: every fingerprinted tensor still has its data pointer (storage and offset),
  dtype, device, shape and strides (``p.data = ...`` of any shape or layout, ``model.float()``,
  ``buf.resize_(...)``, ``p.data = q.data`` all show).

A data pointer stands for the storage because the fingerprint keeps the fingerprinted
tensors alive: no other storage can take their memory while it is held. Cost, measured on
a 2-core CPU: about 0.2 microseconds per tensor and per module (C-level passes, Dynamo's C++
tensor guards where available): 0.9 ms for 2000 ``Linear`` layers, 0.1 ms for ResNet-50.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, repeat
from typing import Any

from torch import Tensor, nn

from functional_ema._dtensor import TensorRecord


SLOTS = {
    "modules": operator.attrgetter("_modules"),
    "parameters": operator.attrgetter("_parameters"),
    "buffers": operator.attrgetter("_buffers"),
}
"""The slot dicts of a module, by kind."""


def _values_of(dicts: Sequence[Any]) -> Callable[[Any], Iterable[Any]]:
    """``dict.values`` (a C slot) when every slot container is a dict, else a method call."""
    if all(isinstance(d, dict) for d in dicts):
        return dict.values
    return operator.methodcaller("values")


class Fingerprint:
    """What a model looked like when something was built from it.

    Args:
        model: The root module.
        tensors: The tensors (module slot objects) whose storage and layout count.
        watched: Slot kinds whose objects count (by identity).
        named: Slot kinds whose names only count.
        modules: The modules whose slots count (default: all of ``model``'s). A subset
            suits a fingerprint whose other modules another one covers.
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: Sequence[Tensor] = (),
        watched: Sequence[str] = ("modules", "parameters", "buffers"),
        named: Sequence[str] = (),
        modules: Sequence[nn.Module] | None = None,
    ) -> None:
        self.modules = list(model.modules()) if modules is None else list(modules)
        self.kinds = ([SLOTS[k] for k in watched], [SLOTS[k] for k in named])
        watched_dicts, named_dicts = self._dicts()
        every = watched_dicts + named_dicts
        self.values = _values_of(every)
        self.sizes = list(map(len, every))
        self.names = list(chain.from_iterable(filter(None, every)))
        # Kept alive, so no new object can take one of their ids while this is held.
        self.objects = list(chain.from_iterable(map(self.values, filter(None, watched_dicts))))
        self.tensors = list(tensors)
        self.record = TensorRecord(self.tensors)

    def _dicts(self) -> tuple[list[Any], list[Any]]:
        watched, named = self.kinds
        modules = self.modules
        return (
            list(chain.from_iterable(map(map, watched, repeat(modules)))),
            list(chain.from_iterable(map(map, named, repeat(modules)))),
        )

    def structure_holds(self) -> bool:
        """Whether the module tree and every watched slot's object are the ones recorded.

        C-level passes, cheapest first: the dicts' sizes, the slot names (strings compare
        by value), then the objects by identity (never by ``==``, which a tensor answers
        elementwise).
        """
        watched, named = self._dicts()
        every = watched + named
        if list(map(len, every)) != self.sizes:
            return False
        if list(chain.from_iterable(filter(None, every))) != self.names:
            return False
        current = chain.from_iterable(map(self.values, filter(None, watched)))
        return all(map(operator.is_, current, self.objects))

    def holds(self) -> bool:
        """Whether the structure holds and every tensor has its storage, offset and layout.

        A change of ``requires_grad`` alone or of the thread's dispatch state keeps it
        (see :class:`TensorRecord`).
        """
        return self.structure_holds() and self.record.holds(self.tensors)
