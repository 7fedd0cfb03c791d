"""The migration guide's equivalents give the peers' averages (``docs/migration.md``).

Each test trains one small model (Linear, BatchNorm, a frozen bias) with SGD and lets a peer
and its ``functional_ema`` equivalent from the guide track the same live model, then compares
every average after every step.

Tolerance: the peers compute the same average in another rounding order (``torch.lerp``,
``decay * s + (1 - decay) * p``) or with another rounding of the weight: ``1 - decay`` in
float64, then rounded to float32, where TensorFlow and functional_ema take
``float32(1) - float32(decay)`` (for 0.99 the two weights differ by 9.3e-7 relative, for 0.999
by 1.3e-5, which scales every difference ``shadow - value``). Warmup decays that a peer
computes in float64 and TF's formula in float32 differ the same way. The float32 averages
(of weights of magnitude ~1 that move by up to ~10 during the run) are therefore compared with
``torch.testing.assert_close(rtol=1e-5, atol=1e-5)``, never bitwise; the largest differences
seen are printed at the end of the module (``pytest -s``). With a decay whose float32 rounding
is exact (0.9375), the peers that use TF's operation order give the same bits
(``test_tf_order_peers_are_bit_exact_for_a_dyadic_decay``).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import functional_ema as fe


RTOL, ATOL = 1e-5, 1e-5
STEPS = 60


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter
    return model


def training(model: nn.Module, steps: int = STEPS) -> Iterator[int]:
    """Train ``model`` in place; yield after each optimizer step (0-based step index)."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9
    )
    generator = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        inputs = torch.randn(32, 4, generator=generator)
        target = inputs[:, :2] * 3 + 1
        loss = (model(inputs) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


MAX_DIFF: dict[str, tuple[float, str, float]] = {}


def assert_averages_close(name: str, peer: dict[str, Tensor], ours: dict[str, Tensor]) -> None:
    """Compare the peer's averages with ours, key by key, and record the largest difference."""
    assert set(ours) <= set(peer), sorted(set(ours) - set(peer))
    worst, worst_key, worst_rel = MAX_DIFF.get(name, (0.0, "", 0.0))
    for key, value in ours.items():
        if not value.is_floating_point():
            continue
        expected = peer[key]
        torch.testing.assert_close(value, expected, rtol=RTOL, atol=ATOL, msg=key)
        diff = (value - expected).abs()
        if float(diff.max()) > worst:
            worst, worst_key = float(diff.max()), key
        # the largest difference relative to the tolerance allowed for that element
        worst_rel = max(worst_rel, float((diff / (ATOL + RTOL * expected.abs())).max()))
    MAX_DIFF[name] = (worst, worst_key, worst_rel)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report() -> Iterator[None]:
    # The tensors are tiny: one thread avoids thread-pool contention on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name, (worst, key, used) in sorted(MAX_DIFF.items()):
        sys.stderr.write(
            f"\nmigration {name}: max |difference| {worst:.3g} at {key!r}; "
            f"at most {used:.0%} of the tolerance"
        )


def ema_averages(ema: fe.EMA) -> dict[str, Tensor]:
    """The averaged model's every tensor (frozen parameters are the live ones)."""
    return dict(ema.shadow.state_dict())


def after_step(
    schedule: Callable[[Tensor, Tensor], Tensor], update_after_step: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """As in docs/migration.md: copy up to update ``k + 1``, then ``schedule`` from there."""

    def delayed(t: Tensor, dt: Tensor) -> Tensor:
        k = update_after_step
        return torch.where(t > k + 1, schedule((t - k).clamp(min=1), dt), 0.0)

    return delayed


# --- the classic EMA(nn.Module) snippet ----------------------------------------------------


class SeedEMA(nn.Module):
    """A faithful copy of the classic snippet (zijianhu's gist, widely copied as ``EMA``)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay

        self.model = model
        self.shadow = copy.deepcopy(self.model)

        for param in self.shadow.parameters():
            param.detach_()

    @torch.no_grad()
    def update(self):
        if not self.training:
            print("EMA update should only be called during training", file=sys.stderr, flush=True)
            return

        model_params = OrderedDict(self.model.named_parameters())
        shadow_params = OrderedDict(self.shadow.named_parameters())

        # check if both model contains the same set of keys
        assert model_params.keys() == shadow_params.keys()

        for name, param in model_params.items():
            # see https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage
            # shadow_variable -= (1 - decay) * (shadow_variable - variable)
            shadow_params[name].sub_((1.0 - self.decay) * (shadow_params[name] - param))

        model_buffers = OrderedDict(self.model.named_buffers())
        shadow_buffers = OrderedDict(self.shadow.named_buffers())

        # check if both model contains the same set of keys
        assert model_buffers.keys() == shadow_buffers.keys()

        for name, buffer in model_buffers.items():
            # buffers are copied
            shadow_buffers[name].copy_(buffer)

    def forward(self, inputs: Tensor, return_feature: bool = False) -> Tensor:
        if self.training:
            return self.model(inputs, return_feature)
        else:  # noqa: RET505 - kept as in the snippet
            return self.shadow(inputs, return_feature)


class FeatureModel(nn.Module):
    """The snippet forwards ``return_feature`` to the model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, inputs: Tensor, return_feature: bool = False) -> Tensor:
        del return_feature
        return self.body(inputs)


@pytest.mark.parametrize("decay", [0.99, 0.999])
def test_seed_snippet(decay: float, capsys: pytest.CaptureFixture[str]) -> None:
    model = FeatureModel()
    seed = SeedEMA(model, decay)
    ema = fe.EMA(model, decay)
    for _ in training(model):
        seed.update()
        ema.update()
        theirs = dict(seed.shadow.state_dict())
        assert_averages_close(f"seed snippet, decay {decay}", theirs, ema_averages(ema))
    # Buffers are copied by both, bit for bit (num_batches_tracked included).
    for name, buffer in seed.shadow.named_buffers():
        assert torch.equal(ema_averages(ema)[name], buffer)
    # Forward: train mode runs the live model, eval mode the averages.
    inputs = torch.randn(5, 4)
    assert torch.equal(seed(inputs), ema(inputs))
    seed.eval()
    ema.eval()
    torch.testing.assert_close(ema(inputs), seed(inputs), rtol=RTOL, atol=ATOL)
    # update() in eval mode: the snippet prints and skips, the adapter warns and skips.
    before = {k: v.clone() for k, v in ema_averages(ema).items()}
    seed.update()
    assert "only be called during training" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="eval mode"):
        ema.update()
    assert all(torch.equal(before[k], v) for k, v in ema_averages(ema).items())


def test_tf_order_peers_are_bit_exact_for_a_dyadic_decay() -> None:
    """The snippet and torch_ema use TF's order; only the rounding of ``1 - decay`` differs."""
    from torch_ema import ExponentialMovingAverage

    model = FeatureModel()
    seed = SeedEMA(model, 0.9375)
    peer = ExponentialMovingAverage(model.parameters(), decay=0.9375, use_num_updates=False)
    ema = fe.EMA(model, 0.9375)
    names = [name for name, _ in model.named_parameters()]
    for _ in training(model):
        seed.update()
        peer.update()
        ema.update()
    ours = ema_averages(ema)
    for name, tensor in seed.shadow.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    for name, tensor in zip(names, peer.shadow_params, strict=True):
        assert torch.equal(ours[name], tensor), name


# --- the dict-shadow register / update / apply_shadow / restore variant ------------------


class DictEMA:
    """A faithful copy of the dict-shadow variant (``register`` / ``apply_shadow``)."""

    def __init__(self, model, decay):
        self.model = model
        self.decay = decay
        self.shadow = {}
        self.backup = {}

    def register(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def update(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()

    def apply_shadow(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow
                self.backup[name] = param.data
                param.data = self.shadow[name]

    def restore(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                assert name in self.backup
                param.data = self.backup[name]
        self.backup = {}


def test_dict_shadow_variant() -> None:
    model = make_model()
    peer = DictEMA(model, 0.99)
    peer.register()
    # The guide's functional equivalent: the trainable parameters only, like the variant.
    params, _ = fe.module_state(model)
    state = fe.init(params)
    ema = fe.EMA(model, 0.99)  # and the adapter
    for _ in training(model):
        peer.update()
        fe.update_(state, params, 0.99)
        ema.update()
        assert_averages_close("dict-shadow variant", peer.shadow, fe.average(state))
    assert set(peer.shadow) == set(fe.average(state))
    inputs = torch.randn(5, 4)
    model.eval()
    peer.apply_shadow()
    expected = model(inputs)
    peer.restore()
    live = model(inputs)
    with ema.swap():
        swapped = model(inputs)
    torch.testing.assert_close(swapped, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(model(inputs), live)


# --- torch.optim.swa_utils.AveragedModel -----------------------------------------------------


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_ema(use_buffers: bool) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=use_buffers)
    ema = None
    for _ in training(model):
        peer.update_parameters(model)
        if ema is None:  # AveragedModel's first update copies: create the EMA there
            ema = fe.EMA(model, 0.99, buffer_policy="average" if use_buffers else "copy")
        else:
            ema.update()
        ours = ema_averages(ema)
        theirs = dict(peer.module.state_dict())
        assert_averages_close(f"AveragedModel use_buffers={use_buffers}", theirs, ours)
    assert ema is not None
    count = ours["1.num_batches_tracked"]
    assert int(count) == STEPS  # copied, never averaged
    # AveragedModel averages the integer counter too, truncating it; it copies it otherwise.
    assert (int(theirs["1.num_batches_tracked"]) < STEPS) == use_buffers


def test_averaged_model_ema_avg_fn() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    model = make_model()
    peer = AveragedModel(model, avg_fn=get_ema_avg_fn(0.99))
    ema = None
    for _ in training(model):
        peer.update_parameters(model)
        if ema is None:
            ema = fe.EMA(model, 0.99)
        else:
            ema.update()
        assert_averages_close(
            "AveragedModel avg_fn", dict(peer.module.state_dict()), ema_averages(ema)
        )


# --- torch_ema -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema(use_num_updates: bool) -> None:
    from torch_ema import ExponentialMovingAverage

    model = make_model()
    peer = ExponentialMovingAverage(model.parameters(), decay=0.99, use_num_updates=use_num_updates)
    # torch_ema's default num_updates warmup is TF's: fe.tf_warmup.
    ema = fe.EMA(model, 0.99, use_num_updates=use_num_updates)
    names = [name for name, _ in model.named_parameters()]
    for _ in training(model):
        peer.update()
        ema.update()
        theirs = dict(zip(names, peer.shadow_params, strict=True))
        assert_averages_close(
            f"torch_ema use_num_updates={use_num_updates}",
            theirs,
            {k: v for k, v in ema_averages(ema).items() if k in theirs},
        )
    # average_parameters() and swap() put the same averages into the model.
    inputs = torch.randn(5, 4)
    model.eval()
    with peer.average_parameters():
        expected = model(inputs)
    with ema.swap():
        got = model(inputs)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# --- ema-pytorch ---------------------------------------------------------------------------


def test_ema_pytorch_every_step() -> None:
    from ema_pytorch import EMA

    model = make_model()
    peer = EMA(model, beta=0.99, update_after_step=0, update_every=1)
    ema = fe.EMA(model, fe.warmup(0.99), buffer_policy="average")
    for _ in training(model, 100):
        peer.update()
        ema.update()
        assert_averages_close(
            "ema-pytorch after=0 every=1", dict(peer.ema_model.state_dict()), ema_averages(ema)
        )


def ema_pytorch_decay(
    beta: float = 0.9999,
    update_after_step: int = 100,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
) -> Callable[[Tensor, Tensor], Tensor]:
    """As in docs/migration.md: ema-pytorch's decay, applied once per update whatever dt."""
    schedule = after_step(fe.warmup(beta, inv_gamma=inv_gamma, power=power), update_after_step)
    return lambda t, dt: schedule(t, torch.ones_like(dt))


@pytest.mark.parametrize(("beta", "after", "every"), [(0.9999, 100, 10), (0.99, 20, 3)])
def test_ema_pytorch_defaults_replica(beta: float, after: int, every: int) -> None:
    from ema_pytorch import EMA

    model = make_model()
    peer = EMA(model, beta=beta, update_after_step=after, update_every=every)
    ema = fe.EMA(model, ema_pytorch_decay(beta, after), buffer_policy="average")
    for step in training(model, 160):
        peer.update()
        if step % every == 0:
            ema.update(dt=every if step else 1)
        assert int(ema.step) == int(peer.step) - (step % every)
        assert_averages_close(
            f"ema-pytorch after={after} every={every}",
            dict(peer.ema_model.state_dict()),
            ema_averages(ema),
        )


# --- diffusers -----------------------------------------------------------------------------


def diffusers_decay(
    decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0
) -> Callable[[Tensor, Tensor], Tensor]:
    """As in docs/migration.md: diffusers' decay without ``use_ema_warmup``."""
    return after_step(
        lambda t, dt: fe.tf_decay(decay, t - 1).clamp(min=min_decay), update_after_step
    )


@pytest.mark.parametrize(
    ("kwargs", "schedule"),
    [
        ({"decay": 0.99}, diffusers_decay(0.99)),
        ({"decay": 0.99, "update_after_step": 5}, diffusers_decay(0.99, update_after_step=5)),
        ({"decay": 0.99, "min_decay": 0.5}, diffusers_decay(0.99, min_decay=0.5)),
        ({"decay": 0.99, "use_ema_warmup": True}, fe.warmup(0.99)),
        (
            {"decay": 0.99, "use_ema_warmup": True, "power": 3 / 4, "update_after_step": 5},
            after_step(fe.warmup(0.99, power=3 / 4), 5),
        ),
    ],
    ids=["default", "after_step", "min_decay", "warmup", "warmup_after_step"],
)
def test_diffusers(kwargs: dict[str, float], schedule: Callable[[Tensor, Tensor], Tensor]) -> None:
    from diffusers.training_utils import EMAModel

    model = make_model()
    peer = EMAModel(model.parameters(), **kwargs)
    ema = fe.EMA(model, schedule)
    names = [name for name, _ in model.named_parameters()]
    for _ in training(model):
        peer.step(model.parameters())
        ema.update()
        theirs = dict(zip(names, peer.shadow_params, strict=True))
        ours = {k: v for k, v in ema_averages(ema).items() if k in theirs}
        assert_averages_close(f"diffusers {sorted(kwargs)}", theirs, ours)
