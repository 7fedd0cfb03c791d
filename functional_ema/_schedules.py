r"""Decay schedules: pure functions of the step, tensors in and out, interval-correct.

A schedule is called by :func:`update` as ``schedule(t, dt)`` for an update that covers the
steps ``(t - dt, t]``: ``t`` is the step the update reaches (``state["step"] + dt``, so 1 at
the first update when every step is an update) and ``dt`` the number of steps it covers. Both
are 0-dim integer tensors on the state's device, and the result is a 0-dim tensor on that
device: no host sync, no recompiles under ``torch.compile``. The decay returned is the one for
all ``dt`` steps together, so the average's time constant does not depend on how often it is
updated. The built-in ones are small objects (picklable, ``torch.save`` of an ``EMA`` included)
whose repr is the call that made them; any callable ``(t, dt) -> decay`` is a schedule too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from functional_ema._decay import check_decay, tf_decay
from functional_ema._errors import describe, wrong_type, wrong_value
from functional_ema._profiles import gamma_to_sigma_rel as gamma_to_sigma_rel
from functional_ema._profiles import parse
from functional_ema._profiles import sigma_rel_to_gamma as sigma_rel_to_gamma
from functional_ema._types import Decay


def _check_positive(api: str, path: str, value: object) -> float:
    """A number > 0: ``TypeError`` for another type, ``ValueError`` for a number <= 0 or NaN."""
    name = path.split("[")[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(
            api,
            f"{name} of the wrong type",
            path,
            "a number > 0",
            describe(value),
            f"Pass e.g. {name}=1.0.",
        )
    if not value > 0:
        raise wrong_value(
            api, f"{name} out of range", path, "a number > 0", repr(value), f"Pass e.g. {name}=1.0."
        )
    return float(value)


def _check_unit(api: str, path: str, value: object) -> float:
    return float(check_decay(api, value, path))


def _values(
    api: str,
    name: str,
    value: float | Tensor | Sequence[float],
    check: Callable[[str, str, object], float],
) -> float | Tensor | tuple[float, ...]:
    """Validate a schedule parameter: a number, a 0-dim tensor, or a sequence (a bank).

    A 0-dim ``decay`` tensor is kept as it is (not read on the host).
    """
    if isinstance(value, Tensor) and value.ndim == 0:
        return value if name == "decay" else check(api, name, value.item())
    if isinstance(value, Tensor):
        values = value.reshape(-1).tolist()
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        return check(api, name, value)
    if not values:
        raise wrong_value(
            api,
            f"no {name}",
            name,
            "one value per bank row",
            "an empty sequence",
            "Pass a number, or a non-empty sequence of them for a bank.",
        )
    return tuple(check(api, f"{name}[{index}]", v) for index, v in enumerate(values))


def _as_float64(value: float | Tensor | tuple[float, ...], like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float64, device=like.device)


class _Schedule:
    """A built-in schedule: ``schedule(t, dt) -> decay``, picklable, with a readable repr.

    Each one is made by its function (:func:`constant`, :func:`tf_warmup`, :func:`warmup`,
    :func:`half_life`, :func:`power`) from validated parameters, which it keeps as plain
    attributes, so ``torch.save`` and ``pickle`` (spawned workers included) carry it, and its
    repr is the call that made it.
    """

    _api = ""
    _fields: tuple[str, ...] = ()

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self._api}({args})"

    def config(self) -> dict[str, Any]:
        """The schedule as plain values (``torch.load(weights_only=True)`` reads them back).

        ``{"schedule": name, **parameters}``; :func:`from_config` makes the schedule again.
        """
        return {"schedule": self._api, **{name: getattr(self, name) for name in self._fields}}


class _Constant(_Schedule):
    _api, _fields = "constant", ("decay",)

    def __init__(self, decay: float | Tensor | tuple[float, ...]) -> None:
        self.decay = decay

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        return _as_float64(self.decay, t) ** dt


class _TfWarmup(_Schedule):
    _api, _fields = "tf_warmup", ("decay",)

    def __init__(self, decay: float | Tensor) -> None:
        self.decay = decay

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        # x ** 1 is exact, so dt == 1 keeps TF's float32 value bit for bit.
        return tf_decay(self.decay, t).to(torch.float64) ** dt


class _Warmup(_Schedule):
    _api, _fields = "warmup", ("decay", "inv_gamma", "power", "min_decay")

    def __init__(self, decay: float, inv_gamma: float, power: float, min_decay: float) -> None:
        self.decay, self.inv_gamma, self.power, self.min_decay = decay, inv_gamma, power, min_decay

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        s = (t - 1).to(torch.float64).clamp(min=0)
        value = (1 - (1 + s / self.inv_gamma) ** -self.power).clamp(self.min_decay, self.decay)
        return value**dt


class _HalfLife(_Schedule):
    _api, _fields = "half_life", ("steps",)

    def __init__(self, steps: float | Tensor | tuple[float, ...]) -> None:
        self.steps = steps

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        return 0.5 ** (dt.to(torch.float64) / _as_float64(self.steps, t))


class _Power(_Schedule):
    _api, _fields = "power", ("gamma",)

    def __init__(self, gamma: float | tuple[float, ...]) -> None:
        self.gamma = gamma

    def __call__(self, t: Tensor, dt: Tensor) -> Tensor:
        ratio = (1 - dt.to(torch.float64) / t.to(torch.float64)).clamp(min=0)
        return ratio ** (_as_float64(self.gamma, t) + 1)


def constant(decay: Decay | Sequence[float]) -> _Schedule:
    r"""A constant per-step decay :math:`\beta`, applied as :math:`\beta^{dt}`.

    .. math:: \beta_{t, dt} = \beta^{dt}

    For ``dt == 1`` the value is :math:`\beta` itself, so updates every step are TF's.

    Args:
        decay: :math:`\beta \in [0, 1]`, or a sequence of decays for a bank
            (:func:`ema_update_bank`): the schedule then returns one decay per row.

    Returns:
        A schedule ``(t, dt) -> decay``.

    Example:
        >>> import torch, functional_ema as fe
        >>> schedule = fe.constant(0.99)
        >>> round(float(schedule(torch.tensor(10), torch.tensor(10))), 6)  # 0.99 ** 10
        0.904382
    """
    return _Constant(_values("constant", "decay", decay, _check_unit))


def tf_warmup(decay: Decay) -> _Schedule:
    r"""TensorFlow's ``num_updates`` warmup with ``num_updates = t``, in float32 as TF.

    .. math:: \beta_{t, dt} = \min\left(\beta, \frac{1 + t}{10 + t}\right)^{dt}

    With one update per step, ``t`` is the number of updates including this one, as in
    ``tf.train.ExponentialMovingAverage(decay, num_updates=global_step)`` applied after the
    optimizer step, ``torch_ema`` and diffusers. Values for ``decay = 0.999``:

    ====  ======  ======  ======  =======  ==========
    t     1       2       10      100      10000
    ====  ======  ======  ======  =======  ==========
    beta  0.1818  0.25    0.55    0.9182   0.999
    ====  ======  ======  ======  =======  ==========

    Args:
        decay: The maximum decay :math:`\beta \in [0, 1]`.

    Returns:
        A schedule ``(t, dt) -> decay`` (TF's float32 value from :func:`tf_decay`, raised to
        ``dt`` in float64).

    Example:
        >>> import torch, functional_ema as fe
        >>> round(float(fe.tf_warmup(0.999)(torch.tensor(1), torch.tensor(1))), 4)
        0.1818
    """
    return _TfWarmup(check_decay("tf_warmup", decay))


def warmup(
    decay: float = 0.9999, *, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
) -> _Schedule:
    r"""The inverse-gamma / power warmup of timm ``ModelEmaV3``, diffusers and ema-pytorch.

    .. math::
        \beta(s) = \mathrm{clamp}\big(1 - (1 + s / \gamma)^{-p},\ \beta_{\min},\ \beta\big),
        \qquad s = t - 1, \qquad \beta_{t, dt} = \beta(s)^{dt}

    ``s`` counts the steps before this one, so the first update (``t = 1``) has decay 0 and
    copies, as in timm and diffusers. For updates every ``dt`` steps the decay at ``s`` is
    applied for the whole interval (the warmup changes slowly, so this is the interval's
    product up to a relative error of order ``dt / s``). Values for the defaults
    (``gamma = 1``, ``p = 2/3``, ``decay = 0.9999``):

    ====  ===  ======  ======  ======  ======  =======
    t     1    2       11      101     1001    1000001
    ====  ===  ======  ======  ======  ======  =======
    beta  0    0.3700  0.7978  0.9539  0.9900  0.9999
    ====  ===  ======  ======  ======  ======  =======

    Args:
        decay: The maximum decay.
        inv_gamma: :math:`\gamma > 0`, the time scale of the warmup.
        power: :math:`p > 0`; 2/3 reaches 0.999 at about 31.6K steps, 3/4 at about 10K.
        min_decay: The minimum decay :math:`\beta_{\min}`.

    Returns:
        A schedule ``(t, dt) -> decay`` (float64).

    Example:
        >>> import torch, functional_ema as fe
        >>> round(float(fe.warmup()(torch.tensor(11), torch.tensor(1))), 4)
        0.7978
    """
    api = "warmup"
    decay = float(check_decay(api, decay))
    min_decay = float(check_decay(api, min_decay))
    if min_decay > decay:
        raise wrong_value(
            api,
            "min_decay above decay",
            "min_decay",
            f"at most decay={decay}",
            min_decay,
            "Lower min_decay or raise decay.",
        )
    inv_gamma = _check_positive(api, "inv_gamma", inv_gamma)
    power = _check_positive(api, "power", power)
    return _Warmup(decay, inv_gamma, power, min_decay)


def half_life(steps: float | Sequence[float]) -> _Schedule:
    r"""A constant decay given by its half-life in steps.

    .. math:: \beta_{t, dt} = 2^{-dt / h}

    After :math:`h` steps the weight of older values has halved, whatever the update interval.
    Values per step (``dt = 1``): ``h = 10`` gives 0.933033, ``h = 693.1`` gives 0.999,
    ``h = 6931.1`` gives 0.9999.

    Args:
        steps: The half-life :math:`h > 0`, in steps (or a sequence, for a bank).

    Returns:
        A schedule ``(t, dt) -> decay`` (float64).

    Example:
        >>> import torch, functional_ema as fe
        >>> float(fe.half_life(100)(torch.tensor(100), torch.tensor(100)))
        0.5
    """
    return _HalfLife(_values("half_life", "steps", steps, _check_positive))


def power(
    gamma: float | Sequence[float] | None = None,
    *,
    sigma_rel: float | Sequence[float] | None = None,
) -> _Schedule:
    r"""EDM2's power-function EMA profile (Karras et al. 2024, arXiv 2312.02696, Eq. 127).

    .. math:: \beta_{t, dt} = \left(1 - \frac{dt}{t}\right)^{\gamma + 1}

    The average at step :math:`t` then weights step :math:`\tau` by
    :math:`(\gamma + 1)\tau^\gamma / t^{\gamma + 1}`, for any update interval: the product of
    the per-step decays over an interval telescopes to this closed form, so skipping or
    batching updates does not change the profile. The first update (``t == dt``) has decay 0
    and copies. On a ramp :math:`w_\tau = \tau` the average is
    :math:`\frac{\gamma + 1}{\gamma + 2}\, t` (tested for intervals 1, 10 and 100). Values
    for ``gamma = 6.94`` (``sigma_rel = 0.1``), ``dt = 1``:

    ====  ===  ======  ======  ======  =======
    t     1    2       10      100     10000
    ====  ===  ======  ======  ======  =======
    beta  0    0.0041  0.4333  0.9233  0.99921
    ====  ===  ======  ======  ======  =======

    Args:
        gamma: The exponent :math:`\gamma > 0` (give exactly one of ``gamma`` and
            ``sigma_rel``), or a sequence of exponents for a bank (one decay per row, e.g.
            EDM2's two tracked profiles).
        sigma_rel: The relative standard deviation of the profile, EDM2's length parameter,
            converted with :func:`sigma_rel_to_gamma` (or a sequence, for a bank).

    Returns:
        A schedule ``(t, dt) -> decay`` (float64).

    Raises:
        ValueError: Both or neither of ``gamma`` and ``sigma_rel``, or a value out of range.
        TypeError: A value that is not a number.

    Example:
        >>> import torch, functional_ema as fe
        >>> round(float(fe.power(sigma_rel=0.1)(torch.tensor(10), torch.tensor(1))), 4)
        0.4333
    """
    profiles = parse("power", sigma_rel, gamma)
    return _Power(tuple(profiles.gammas) if profiles.several else profiles.gammas[0])


def is_bank(schedule: object) -> bool:
    """Whether ``schedule`` is a built-in schedule of several decays (one per bank row)."""
    return isinstance(schedule, _Schedule) and any(
        isinstance(getattr(schedule, name), tuple)
        or (isinstance(getattr(schedule, name), Tensor) and getattr(schedule, name).ndim > 0)
        for name in schedule._fields
    )


def config_of(schedule: object) -> dict[str, Any] | None:
    """A built-in schedule's :meth:`_Schedule.config`; ``None`` for any other callable."""
    return schedule.config() if isinstance(schedule, _Schedule) else None


_MAKERS: dict[str, Callable[..., _Schedule]] = {
    "constant": constant,
    "tf_warmup": tf_warmup,
    "warmup": warmup,
    "half_life": half_life,
    "power": power,
}


def from_config(api: str, config: Mapping[str, Any], path: str) -> _Schedule:
    """The built-in schedule a :meth:`_Schedule.config` describes, validated as it was made.

    Raises:
        ValueError: An unknown schedule name, or a parameter its function rejects.
        TypeError: A parameter of the wrong type.
    """
    name = config.get("schedule")
    if name not in _MAKERS:
        raise wrong_value(
            api,
            "unknown schedule",
            f"{path}['schedule']",
            f"one of {sorted(_MAKERS)}",
            describe(name),
            "The checkpoint was written by another version or edited: load it with "
            "keep_hyperparameters=True to keep the constructor's decay.",
        )
    parameters = {key: value for key, value in config.items() if key != "schedule"}
    if isinstance(parameters.get("gamma"), list):
        parameters["gamma"] = tuple(parameters["gamma"])
    try:
        return _MAKERS[name](**parameters)
    except ValueError as error:
        raise wrong_value(
            api,
            "schedule parameters out of range",
            path,
            f"the parameters fe.{name} accepts",
            parameters,
            f"{error}. Load with keep_hyperparameters=True to keep the constructor's decay.",
        ) from None
    except TypeError as error:
        raise wrong_type(
            api,
            "schedule parameters that do not fit",
            path,
            f"the parameters of fe.{name}",
            sorted(parameters),
            f"{error}. Load with keep_hyperparameters=True to keep the constructor's decay.",
        ) from None
