"""The adapter's options from the peers: update timing, exclusions, settings in checkpoints, casts.

Each is checked against the functional core (bit for bit) and, where a peer has the feature,
against the real peer (ema-pytorch, torch_ema) on the same inputs.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch_ema
from ema_pytorch import EMA as PeerEMA
from torch import nn

import functional_ema as fe
from tests.helpers import assert_bits_equal


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def train_step(model: nn.Module, step: int) -> None:
    """A deterministic 'optimizer step': every parameter moves, BatchNorm's stats too."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model(torch.randn(6, 4, generator=gen))


def tensors(ema: fe.EMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}


def roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- update_every / update_after ----------------------------------------------------------


@pytest.mark.parametrize(("every", "after"), [(1, 0), (3, 0), (1, 4), (4, 5)])
def test_timing_matches_the_functional_core_with_dt(every: int, after: int) -> None:
    """Warm-up calls copy the weights; then every `every`-th call updates with dt=every."""
    model = make_model()
    ema = fe.EMA(model, fe.warmup(0.99), update_every=every, update_after=after)
    params, buffers = fe.module_state(model)
    state = fe.init(params, buffers)
    for call in range(1, 20):
        train_step(model, call)
        ema.update()
        params, buffers = fe.module_state(model)
        if call <= after:
            state = fe.init(params, buffers)  # the averages follow the weights
        elif (call - after) % every == 0:
            state = fe.update(state, params, fe.warmup(0.99), buffers, dt=every)
        assert_bits_equal(ema.state()["params"], state["params"])
        assert_bits_equal(ema.state()["buffers"], state["buffers"])
        assert int(ema.step) == int(state["step"])


def test_timing_matches_ema_pytorch() -> None:
    """ema-pytorch's update_after_step / update_every: same calls copy and update.

    ema-pytorch counts from 0 and copies on its first call, then on the calls ``s`` with
    ``s % k == 0`` up to ``update_after_step``; ours follows the weights for the first
    ``update_after`` calls, then updates every ``k``. With ``update_after = 1 + jk`` (the
    peer's last copy) the two update on the same calls. The decay is per update in
    ema-pytorch (no interval semantics): ours gets a schedule that ignores ``dt``. The
    peer's ``lerp_`` and TF's step round differently: tolerance 1e-6 relative.
    """
    k, peer_after = 3, 7  # peer copies at calls 1, 4, 7; first update at call 10
    model = make_model()
    peer = PeerEMA(
        model,
        beta=0.9,
        update_after_step=peer_after,
        update_every=k,
        inv_gamma=1e-12,  # the warmup reaches beta at once: a constant decay per update
        power=1.0,
        include_online_model=False,
    )
    ema = fe.EMA(
        model,
        lambda t, dt: torch.tensor(0.9, dtype=torch.float64),
        update_every=k,
        update_after=7,
    )
    peer_changes, our_changes = [], []
    for call in range(1, 25):
        train_step(model, call)
        before_peer = peer.ema_model[0].weight.clone()
        before_ours = ema.state()["params"]["0.weight"].clone()
        peer.update()
        ema.update()
        peer_changes.append(not torch.equal(before_peer, peer.ema_model[0].weight))
        our_changes.append(not torch.equal(before_ours, ema.state()["params"]["0.weight"]))
    assert peer_changes[9:] == our_changes[9:]
    assert [i + 1 for i, c in enumerate(our_changes) if c][:10] == [*range(1, 8), 10, 13, 16]
    # Parameters only: ema-pytorch averages floating buffers, ours copies them by default.
    for name, peer_tensor in peer.ema_model.named_parameters():
        torch.testing.assert_close(ema.state()["params"][name], peer_tensor, rtol=1e-6, atol=1e-7)


def test_timing_skipped_calls_read_nothing_and_dt_accumulates() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9, update_every=3)
    reference = fe.EMA(model, 0.9)
    for call in range(1, 7):
        train_step(model, call)
        ema.update(dt=2)  # e.g. two micro-steps per call
        if call % 3 == 0:
            reference.update(dt=6)
    assert_bits_equal(tensors(ema), {**tensors(reference)})
    assert int(ema.step) == 12


def test_timing_survives_a_checkpoint_mid_interval() -> None:
    model = make_model()
    ema = fe.EMA(model, fe.tf_warmup(0.99), update_every=4, update_after=2)
    for call in range(1, 8):
        train_step(model, call)
        ema.update()
    saved = roundtrip(ema.state_dict())
    resumed = fe.EMA(model, 0.5)  # settings come from the checkpoint
    resumed.load_state_dict(saved)
    assert (resumed.update_every, resumed.update_after) == (4, 2)
    for call in range(8, 20):
        train_step(model, call)
        ema.update()
        resumed.update()
        assert_bits_equal(tensors(resumed), tensors(ema))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"update_every": 0}, ValueError, r"update_every out of range at 'update_every'"),
        ({"update_every": 1.5}, TypeError, r"update_every of the wrong type"),
        ({"update_after": -1}, ValueError, r"expected an int >= 0, got -1"),
        ({"update_after": True}, TypeError, r"update_after of the wrong type"),
    ],
)
def test_timing_errors(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fe.EMA(make_model(), 0.9, **kwargs)  # type: ignore[arg-type]


def test_a_bad_dt_is_refused_on_skipped_calls_too() -> None:
    ema = fe.EMA(make_model(), 0.9, update_every=5)
    with pytest.raises(ValueError, match=r"dt out of range"):
        ema.update(dt=0)
    assert ema._calls == 0


# --- exclude --------------------------------------------------------------------------------


def test_exclude_behaves_like_frozen() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9, exclude=["2.*", "1.running_var"])
    assert sorted(ema.state()["params"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert "1.running_var" not in ema.state()["buffers"]
    assert "averages.2.weight" not in ema.state_dict()
    for call in range(1, 4):
        train_step(model, call)
        ema.update()
    # The shadow and copy_to use the live tensors for what is excluded (shared, no copy).
    assert ema.shadow[2].weight.data_ptr() == model[2].weight.data_ptr()
    assert ema.shadow[1].running_var is model[1].running_var
    fresh = make_model(seed=5)
    ema.copy_to(fresh)
    assert torch.equal(fresh[2].weight, model[2].weight)
    assert torch.equal(fresh[1].running_var, model[1].running_var)
    assert torch.equal(fresh[0].weight, ema.state()["params"]["0.weight"])
    with ema.swap():
        assert torch.equal(model[0].weight, ema.state()["params"]["0.weight"])
    # A checkpoint of the unexcluded EMA loads (the excluded averages are ignored).
    full = fe.EMA(model, 0.9)
    ema.load_state_dict(full.state_dict())
    assert torch.equal(ema.state()["params"]["0.weight"], full.state()["params"]["0.weight"])


def test_exclude_matches_ema_pytorch_no_ema_names() -> None:
    """ema-pytorch's param_or_buffer_names_no_ema copies those tensors at each update: the
    values the averaged model uses are the live ones, as ours (which shares them)."""
    model = make_model()
    names = {"2.weight", "2.bias", "1.running_mean"}
    peer = PeerEMA(
        model,
        beta=0.9,
        update_after_step=0,
        update_every=1,
        inv_gamma=1e-12,
        power=1.0,
        param_or_buffer_names_no_ema=names,
        include_online_model=False,
    )
    ema = fe.EMA(model, lambda t, dt: torch.tensor(0.9, dtype=torch.float64), exclude=sorted(names))
    peer.update()  # its first call copies
    for call in range(1, 6):
        train_step(model, call)
        peer.update()
        ema.update()
    shadow = ema.shadow.state_dict()
    for name, peer_tensor in peer.ema_model.state_dict().items():
        if name in names:
            assert torch.equal(shadow[name], peer_tensor)
        elif name in ema.state()["params"]:  # ema-pytorch averages the other buffers
            torch.testing.assert_close(shadow[name], peer_tensor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("exclude", "error", "match"),
    [
        (["nope.*"], ValueError, r"a pattern that matches nothing \('nope.\*'\) at 'exclude\[0\]'"),
        ("2.*", TypeError, r"exclude of the wrong type at 'exclude'"),
    ],
)
def test_exclude_errors(exclude: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fe.EMA(make_model(), 0.9, exclude=exclude)  # type: ignore[arg-type]


# --- settings in the checkpoint ----------------------------------------------------------


SCHEDULES = [
    0.995,
    torch.tensor(0.995, dtype=torch.float64),
    fe.constant(0.99),
    fe.tf_warmup(0.999),
    fe.warmup(0.999, inv_gamma=2.0, power=0.75, min_decay=0.1),
    fe.half_life(50.0),
    fe.power(sigma_rel=0.1),
]


@pytest.mark.parametrize("decay", SCHEDULES, ids=repr)
def test_decay_and_settings_are_restored(decay: object) -> None:
    model = make_model()
    ema = fe.EMA(model, decay, buffer_policy="average", nonfinite="propagate", update_every=2)  # type: ignore[arg-type]
    for call in range(1, 4):
        train_step(model, call)
        ema.update()
    loaded = roundtrip(ema.state_dict())
    fresh = fe.EMA(model, 0.0)
    fresh.load_state_dict(loaded)
    assert repr(fresh.decay) == repr(ema.decay)
    assert (fresh.buffer_policy, fresh.nonfinite, fresh.update_every) == ("average", "propagate", 2)
    for call in range(4, 8):
        train_step(model, call)
        ema.update()
        fresh.update()
    assert_bits_equal(tensors(fresh), tensors(ema))


def test_keep_hyperparameters_keeps_the_constructors() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.995, update_every=3)
    ema.update()
    fresh = fe.EMA(model, 0.5)
    fresh.load_state_dict(ema.state_dict(), keep_hyperparameters=True)
    assert (fresh.decay, fresh.update_every) == (0.5, 1)
    assert fresh._calls == 1  # counters always load


def test_decay_restored_as_torch_ema_restores_it() -> None:
    """torch_ema's load_state_dict restores decay and num_updates; so does ours."""
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    peer = torch_ema.ExponentialMovingAverage(params, decay=0.995)
    peer.update()
    other = torch_ema.ExponentialMovingAverage(params, decay=0.0)
    other.load_state_dict(peer.state_dict())
    ema = fe.EMA(model, 0.995)
    ema.update()
    fresh = fe.EMA(model, 0.0)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == other.decay == 0.995
    assert int(fresh.step) == other.num_updates == 1


def test_a_schedule_of_your_own_is_not_saved_and_is_kept() -> None:
    model = make_model()
    ema = fe.EMA(model, lambda t, dt: torch.tensor(0.9, dtype=torch.float64))
    saved = ema.state_dict()
    assert saved["_extra_state"]["decay"] is None
    roundtrip(saved)
    fresh = fe.EMA(model, 0.3)
    fresh.load_state_dict(saved)
    assert fresh.decay == 0.3


def test_old_checkpoints_without_settings_load() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    old = {k: v for k, v in ema.state_dict().items() if k != "_extra_state"}
    fresh = fe.EMA(model, 0.7)
    fresh.load_state_dict(old)
    assert fresh.decay == 0.7


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"decay": 1.5}, r"_extra_state'\]\['decay'\]"),
        ({"update_every": 0}, r"_extra_state'\]\['update_every'\]"),
        ({"decay": {"schedule": "nope"}}, r"unknown schedule"),
        ({"format": 99}, r"unreadable settings"),
    ],
)
def test_bad_settings_are_refused_before_any_write(change: dict[str, object], match: str) -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    saved = {
        k: (v.clone() + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in ema.state_dict().items()
    }
    saved["_extra_state"] = {**saved["_extra_state"], **change}
    before = tensors(ema)
    with pytest.raises(ValueError, match=match):
        ema.load_state_dict(saved)
    assert_bits_equal(tensors(ema), before)
    assert ema.decay == 0.9


def test_ema_pickles_with_settings() -> None:
    model = make_model()
    ema = fe.EMA(model, fe.warmup(0.99), update_every=2, update_after=1, exclude=["2.*"])
    ema.update()
    copy = pickle.loads(pickle.dumps(ema))
    assert (copy.update_every, copy.update_after, copy._calls) == (2, 1, 1)
    assert copy._excluded_buffers == []


# --- cast=True ------------------------------------------------------------------------------


def test_cast_loads_float32_into_a_float16_ema_as_torch_ema_does() -> None:
    model32 = make_model()
    ema32 = fe.EMA(model32, 0.9)
    train_step(model32, 1)
    ema32.update()
    model16 = make_model().half()
    ema16 = fe.EMA(model16, 0.9)
    with pytest.raises(TypeError, match=r"dtype"):
        ema16.load_state_dict(ema32.state_dict())
    ema16.load_state_dict(ema32.state_dict(), cast=True)
    # torch_ema casts its shadow to each parameter's dtype on load.
    params16 = list(model16.parameters())
    peer32 = torch_ema.ExponentialMovingAverage(list(model32.parameters()), decay=0.9)
    peer32.shadow_params = [
        ema32.state()["params"][n].clone() for n, _ in model32.named_parameters()
    ]
    peer16 = torch_ema.ExponentialMovingAverage(params16, decay=0.9)
    peer16.load_state_dict(peer32.state_dict())
    for (name, _), peer_tensor in zip(
        model16.named_parameters(), peer16.shadow_params, strict=True
    ):
        assert_bits_equal(ema16.state()["params"][name], peer_tensor)
    assert ema16.state()["buffers"]["1.num_batches_tracked"].dtype == torch.int64


def test_cast_never_casts_counters() -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9)
    saved = dict(ema.state_dict())
    saved["step"] = saved["step"].float()
    with pytest.raises(TypeError, match=r"'step'"):
        ema.load_state_dict(saved, cast=True)
