"""Decays and intervals: validation, TF's float32 averaging weight, ``num_updates`` warmup.

Values are range-checked where reading them is free: Python numbers, and tensors on the CPU
outside ``torch.compile`` and ``torch.func`` transforms (:func:`_host_readable`). Other
tensors (on an accelerator, or traced) are not read on the host: :func:`unread_in_range`
gives a 0-dim bool on their device, and the updates leave the averages unchanged and count
the update where it is false.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from functional_ema._compat import is_functorch_wrapped
from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._types import Decay, Schedule


def _float32(value: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _host_readable(tensor: Tensor) -> bool:
    """Whether reading ``tensor`` on the host costs no device sync and breaks no transform.

    The one predicate choosing between the host check (raise) and the device check (count):
    tests replace it to run the accelerator branch on CPU tensors.
    """
    return (
        tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not is_functorch_wrapped(tensor)
    )


_DECAY_FIX = (
    "Pass a decay in [0, 1]: 1.0 freezes the average and 0.0 follows the values; typical "
    "values are 0.99 to 0.9999."
)


def check_decay(api: str, decay: object, path: str = "decay") -> Decay:
    """Validate ``decay`` and return it as a Python float or a 0-dim floating tensor.

    Python numbers and CPU tensors are checked to lie in [0, 1] (NaN is rejected): reading a
    CPU tensor costs no device sync. A tensor on an accelerator (or seen through
    ``torch.compile`` or a ``torch.func`` transform) is not read on the host; only its shape
    and dtype are checked here, and the state updates check its range on the device
    (:func:`unread_in_range`: an out-of-range decay leaves the averages unchanged and counts
    in ``state["nonfinite_updates"]``). ``path`` names the argument in messages (e.g.
    ``'min_decay'`` or ``'decays[1]'``).

    Raises:
        ValueError: ``decay`` is not 0-dim, or is a number or CPU tensor outside [0, 1].
        TypeError: ``decay`` is neither a number nor a floating tensor.
    """
    if isinstance(decay, Tensor):
        if decay.ndim != 0:
            raise wrong_value(
                api,
                "decay not a scalar",
                path,
                "a 0-dim tensor",
                describe(decay),
                "Pass one decay per call (use torch.func.vmap for one decay per ensemble member).",
            )
        if not decay.is_floating_point():
            raise wrong_type(
                api,
                "decay of a non-floating dtype",
                path,
                "a 0-dim floating tensor, e.g. torch.float32",
                describe(decay),
                "Pass torch.tensor(0.999) or a Python float.",
            )
        if _host_readable(decay):
            value = float(decay)
            if not 0.0 <= value <= 1.0:
                got = f"a tensor holding {value!r}"
                raise wrong_value(
                    api, "decay out of range", path, "a number in [0, 1]", got, _DECAY_FIX
                )
        return decay
    if isinstance(decay, bool) or not isinstance(decay, int | float):
        raise wrong_type(
            api,
            "decay of the wrong type",
            path,
            "a Python float or a 0-dim floating tensor",
            describe(decay),
            "Pass e.g. decay=0.999.",
        )
    value = float(decay)
    if not 0.0 <= value <= 1.0:
        raise wrong_value(
            api, "decay out of range", path, "a number in [0, 1]", repr(value), _DECAY_FIX
        )
    return value


def check_decays_tensor(api: str, decays: Tensor, path: str = "decays") -> None:
    """Range-check a tensor of several decays where reading it is free (a CPU tensor).

    Each must lie in [0, 1] (NaN is rejected); the message names the first one that does
    not, as ``decays[i]``. A tensor on an accelerator (or traced) is not read.

    Raises:
        ValueError: A decay of a CPU tensor outside [0, 1].
    """
    if not _host_readable(decays):
        return
    outside = ~((decays >= 0) & (decays <= 1))
    if bool(outside.any()):
        index = int(outside.nonzero()[0, 0])
        got = f"a tensor holding {float(decays.reshape(-1)[index])!r}"
        raise wrong_value(
            api, "decay out of range", f"{path}[{index}]", "a number in [0, 1]", got, _DECAY_FIX
        )


def averaging_weight(decay: Decay) -> float | Tensor:
    """TensorFlow's weight ``float32(1) - float32(decay)``.

    A Python float in, a Python float out (exactly a float32 value); a tensor in, a 0-dim
    float32 tensor on the same device out (no host sync).
    """
    if isinstance(decay, Tensor):
        return 1 - decay.to(torch.float32)
    # 1 - x is exact in float64 for a float32 x in [0, 1] (down to 2**-30), so rounding the
    # float64 difference to float32 once gives the float32 subtraction TF performs.
    return _float32(1.0 - _float32(decay))


def weight_as(weight: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """Cast the float32 weight to a leaf dtype, as TF's ``cast(1 - decay, var.dtype)``.

    For a Python weight the result is a Python float exactly representable in ``dtype``, so
    ``tensor * result`` multiplies by the rounded value (PyTorch would otherwise keep a
    Python scalar in float32 for bfloat16 and float16 arithmetic).
    """
    if isinstance(weight, Tensor):
        return weight.to(dtype)
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return weight
    return torch.tensor(weight, dtype=dtype).item()


_COUNT_FIX = "Pass the number of updates applied so far (0 before the first one)."


def _check_count(api: str, num_updates: object) -> Tensor | int:
    if isinstance(num_updates, Tensor):
        if num_updates.is_complex() or num_updates.dtype == torch.bool:
            raise wrong_type(
                api,
                "num_updates of a non-integer dtype",
                "num_updates",
                "an integer tensor, e.g. torch.int64",
                describe(num_updates),
                "Pass e.g. torch.tensor(step, dtype=torch.int64).",
            )
        if _host_readable(num_updates) and bool((num_updates < 0).any()):
            raise wrong_value(
                api,
                "negative num_updates",
                "num_updates",
                "a count >= 0",
                num_updates.tolist(),
                _COUNT_FIX,
            )
        return num_updates
    if isinstance(num_updates, bool) or not isinstance(num_updates, int):
        raise wrong_type(
            api,
            "num_updates of the wrong type",
            "num_updates",
            "an int or an integer tensor",
            describe(num_updates),
            "Pass the number of updates applied so far, e.g. 0.",
        )
    if num_updates < 0:
        raise wrong_value(
            api, "negative num_updates", "num_updates", "a count >= 0", num_updates, _COUNT_FIX
        )
    return num_updates


def tf_decay(decay: Decay, num_updates: int | Tensor) -> Tensor:
    r"""TensorFlow's decay with the ``num_updates`` warmup, computed in float32 as TF does.

    .. math:: \beta_n = \min\left(\beta, \frac{1 + n}{10 + n}\right)

    Both ``decay`` and ``n`` are rounded to float32 first and every operation is rounded in
    float32, exactly as ``tf.train.ExponentialMovingAverage(decay, num_updates=n)`` computes
    it; counts beyond 2**24 therefore round like TF's. Tensors stay on their device and are
    not read on the host (negative tensor counts are rejected only for CPU tensors outside
    ``torch.compile`` and ``torch.func`` transforms).

    Args:
        decay: The decay :math:`\beta` in [0, 1]: a Python float or a 0-dim floating tensor.
        num_updates: The count :math:`n \ge 0`: an int or an integer tensor.

    Returns:
        A float32 tensor (0-dim for scalar inputs) on the device of the tensor inputs.

    Raises:
        ValueError: If ``decay`` is outside [0, 1] or ``num_updates`` is negative.
        TypeError: If either has the wrong type.

    Example:
        >>> import functional_ema as fe
        >>> fe.tf_decay(0.999, 0)
        tensor(0.1000)
        >>> fe.tf_decay(0.999, 10**6)
        tensor(0.9990)
    """
    api = "tf_decay"
    decay = check_decay(api, decay)
    count = _check_count(api, num_updates)
    if isinstance(decay, Tensor):
        device = decay.device
    elif isinstance(count, Tensor):
        device = count.device
    else:
        device = torch.device("cpu")
    decay32 = torch.as_tensor(decay, device=device).to(torch.float32)
    if isinstance(count, Tensor):
        count32 = count.to(torch.float32)
    else:
        count32 = torch.tensor(count, dtype=torch.int64, device=device).to(torch.float32)
    return torch.minimum(decay32, (1.0 + count32) / (10.0 + count32))


_INTERVAL_FIX = "Pass the number of steps since the last update (1 when you update every step)."


def check_interval(api: str, dt: object) -> int | Tensor:
    """Validate the number of steps an update covers: an int >= 1 or a 0-dim int tensor.

    Ints and CPU tensors are checked to be >= 1; a tensor on an accelerator (or traced) is
    not read on the host (see :func:`unread_in_range` and :func:`steps_covered`).

    Raises:
        ValueError: ``dt`` is not 0-dim, or is an int or CPU tensor below 1.
        TypeError: ``dt`` is neither an int nor an integer tensor.
    """
    expected = "an int >= 1 or a 0-dim integer tensor"
    if isinstance(dt, Tensor):
        if dt.is_floating_point() or dt.is_complex() or dt.dtype == torch.bool:
            raise wrong_type(
                api, "dt of a non-integer dtype", "dt", expected, describe(dt), _INTERVAL_FIX
            )
        if dt.ndim != 0:
            raise wrong_value(api, "dt not a scalar", "dt", expected, describe(dt), _INTERVAL_FIX)
        if _host_readable(dt) and int(dt) < 1:
            got = f"a tensor holding {int(dt)}"
            raise wrong_value(api, "dt out of range", "dt", "an int >= 1", got, _INTERVAL_FIX)
        return dt
    if isinstance(dt, bool) or not isinstance(dt, int):
        raise wrong_type(api, "dt of the wrong type", "dt", expected, describe(dt), _INTERVAL_FIX)
    if dt < 1:
        raise wrong_value(api, "dt out of range", "dt", "an int >= 1", dt, _INTERVAL_FIX)
    return dt


def unread_in_range(decay: Decay, dt: int | Tensor = 1) -> Tensor | None:
    """Whether the values the host did not check are in range, as a 0-dim bool on the device.

    The checks :func:`check_decay` and :func:`check_interval` leave to the device: ``decay``
    in [0, 1] (NaN is out) and ``dt >= 1``, for tensors that are not host-readable. Computed
    with device operations only (no host sync). ``None`` when every value was checked on the
    host (numbers, CPU tensors): nothing is left to check.
    """
    flags: list[Tensor] = []
    if isinstance(decay, Tensor) and not _host_readable(decay):
        flags.append((decay >= 0) & (decay <= 1))
    if isinstance(dt, Tensor) and not _host_readable(dt):
        flags.append(dt >= 1)
    if not flags:
        return None
    if len(flags) == 1:
        return flags[0]
    return flags[0] & flags[1].to(flags[0].device)


def steps_covered(dt: int | Tensor) -> int | Tensor:
    """What ``state["step"]`` advances by: ``dt``, or 0 for a ``dt`` found below 1 on the device."""
    if isinstance(dt, Tensor) and not _host_readable(dt):
        return torch.where(dt >= 1, dt, torch.zeros_like(dt))
    return dt


def resolve_decay(
    api: str, decay: Decay | Schedule, step: Tensor, dt: int | Tensor
) -> tuple[Decay, Tensor | None]:
    """The decay of an update covering ``(step, step + dt]``, and its device-side range check.

    A schedule is called as ``schedule(step + dt, dt)``; a constant decay is raised to the
    power ``dt`` when ``dt != 1`` (so it keeps its per-step meaning), and passed through
    untouched when ``dt == 1`` (TF's exact value). The decay (a schedule's result included)
    and ``dt`` are range-checked on the host where that is free (:func:`check_decay`,
    :func:`check_interval`); the second result is :func:`unread_in_range` of the rest.

    Raises:
        ValueError: A number or CPU tensor out of range (the decay a schedule returned too).
        TypeError: A decay (or a schedule's result) of the wrong type.
    """
    if callable(decay) and not isinstance(decay, Tensor):
        value = check_decay(
            f"{api} (schedule)", decay(step + dt, torch.as_tensor(dt, device=step.device))
        )
        return value, unread_in_range(value, dt)
    decay = check_decay(api, decay)
    valid = unread_in_range(decay, dt)
    if isinstance(dt, int) and dt == 1:
        return decay, valid
    return torch.as_tensor(decay, dtype=torch.float64, device=step.device) ** dt, valid
