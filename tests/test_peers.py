"""``fe.from_peer`` against the real peers: their checkpoints load into ``fe.EMA`` unchanged.

For each peer (AveragedModel, timm ModelEmaV3 / V2, torch_ema, ema-pytorch, diffusers) a small
seeded model (Linear, BatchNorm, Linear; a frozen bias) is trained for a few SGD steps while
the real peer tracks it; the peer's ``state_dict()`` goes through ``torch.save`` and
``torch.load(weights_only=True)`` (every peer's format allows it), ``fe.from_peer`` converts
it and ``fe.EMA.load_state_dict(strict=True)`` loads it. Checked:

- the EMA holds the peer's averages and buffers bit for bit (they are copies), and the input
  is neither modified nor shared;
- ``ema.step`` is the documented mapping of the peer's counter;
- ``ema.shadow(x)`` gives the bits of the peer's averaged model on ``x``;
- one more update gives TensorFlow's formula on the loaded averages, bit for bit, and the
  peer's own next average up to rounding (``rtol=atol=1e-5``: the peers round differently,
  see ``test_migration.py``), which shows the step (hence the schedule) goes on where the
  peer's left off.

timm is not a test dependency (it needs torchvision, which pins torch): its checkpoints were
recorded once by ``peer_checkpoints/record.py`` (timm 1.0.31, torch 2.14.1) into
``peer_checkpoints/timm.pt``, with the live model and timm's next update.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from diffusers.training_utils import EMAModel
from ema_pytorch import EMA as EmaPytorch
from helpers import assert_bits_equal, snapshot
from peer_checkpoints.record import DECAY, STEPS, make_model, training
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch_ema import ExponentialMovingAverage

import functional_ema as fe


TIMM_RECORD = Path(__file__).parent / "peer_checkpoints" / "timm.pt"
RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: one thread avoids thread-pool contention on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def inputs() -> Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(2))


def storages(tree: Any) -> set[int]:
    leaves = [leaf for leaf in optree.tree_leaves(tree) if isinstance(leaf, Tensor)]
    return {leaf.untyped_storage().data_ptr() for leaf in leaves if leaf.numel()}


def convert(checkpoint: Any, model: nn.Module | None, peer: str, **options: Any) -> dict:
    """``fe.from_peer``, checked to be pure and to detect ``peer`` by itself."""
    before = snapshot(checkpoint)
    converted = fe.from_peer(checkpoint, model, **options)
    assert_bits_equal(checkpoint, before)  # not modified
    assert not storages(converted) & storages(checkpoint)  # not shared
    assert_bits_equal(fe.from_peer(checkpoint, model, peer=peer, **options), converted)
    assert list(converted)[:2] == ["step", "nonfinite_updates"]
    assert converted["step"].dtype == converted["nonfinite_updates"].dtype == torch.int64
    assert converted["step"].shape == converted["nonfinite_updates"].shape == ()
    assert int(converted["nonfinite_updates"]) == 0
    return converted


def loaded(model: nn.Module, state_dict: dict, decay: Any, **options: Any) -> fe.EMA:
    """A new ``fe.EMA`` of ``model`` with ``state_dict`` loaded strictly."""
    ema = fe.EMA(model, decay, **options)
    result = ema.load_state_dict(state_dict)
    assert not result.missing_keys and not result.unexpected_keys
    return ema


def assert_holds(ema: fe.EMA, expected: dict[str, Tensor]) -> None:
    """The EMA's averages and buffers are ``expected``'s tensors, bit for bit."""
    state = ema.state()
    held = {**state["params"], **state["buffers"]}
    assert set(held) <= set(expected), sorted(set(held) - set(expected))
    for name, tensor in held.items():
        assert_bits_equal(tensor, expected[name])


def evaluated(model: nn.Module, run: Callable[[], Tensor]) -> Tensor:
    """``run()`` with ``model`` in eval mode and without grad; the mode is restored."""
    model.eval()
    try:
        with torch.no_grad():
            return run()
    finally:
        model.train()


def assert_shadow(ema: fe.EMA, expected: Tensor) -> Tensor:
    """``ema.shadow`` gives the bits of the peer's averaged model on the same input."""
    with torch.no_grad():
        out = ema.shadow(inputs())
    assert_bits_equal(out, expected)
    return out


def tf_average(average: Tensor, value: Tensor, decay: float | Tensor) -> Tensor:
    """TensorFlow's ``assign_moving_average``: ``s - (s - p) * (1 - decay)`` in float32."""
    decay = torch.as_tensor(decay).to(torch.float32)
    return average - (average - value) * (torch.ones((), dtype=torch.float32) - decay)


def check_next_update(
    ema: fe.EMA, model: nn.Module, peer_next: dict[str, Tensor] | None = None
) -> None:
    """One more ``ema.update()``: TF's formula exactly, and close to the peer's next average.

    Parameters (and floating buffers with ``buffer_policy="average"``) follow TF's formula on
    the loaded values; other buffers are the model's. ``peer_next`` maps model names to the
    peer's values after its own next update (only floating ones are compared), if given.
    """
    state = ema.state()
    step = int(ema.step)
    before = snapshot({**state["params"], **state["buffers"]})
    decay = ema.decay
    if callable(decay):
        decay = decay(torch.tensor(step + 1), torch.tensor(1))
    ema.update()
    assert int(ema.step) == step + 1
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    averaged = set(state["params"])
    if ema.buffer_policy == "average":
        averaged |= {name for name in state["buffers"] if before[name].is_floating_point()}
    state = ema.state()
    for name, tensor in {**state["params"], **state["buffers"]}.items():
        if name in averaged:
            expected = tf_average(before[name], live[name].detach(), decay)
            assert_bits_equal(tensor, expected)
            assert_bits_equal(fe.ema_update(before[name], live[name].detach(), decay), expected)
            if peer_next is not None:
                torch.testing.assert_close(tensor, peer_next[name], rtol=RTOL, atol=ATOL, msg=name)
        else:
            assert_bits_equal(tensor, live[name].detach())


def after_step(schedule: Callable[[Tensor, Tensor], Tensor], k: int) -> Callable:
    """As in docs/migration.md: copy up to update ``k + 1``, then ``schedule`` from there."""

    def delayed(t: Tensor, dt: Tensor) -> Tensor:
        return torch.where(t > k + 1, schedule((t - k).clamp(min=1), dt), 0.0)

    return delayed


# --- torch.optim.swa_utils.AveragedModel -------------------------------------------------------


@pytest.mark.parametrize("use_buffers", [False, True], ids=["buffers_copied", "buffers_averaged"])
def test_averaged_model(use_buffers: bool) -> None:
    model = make_model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=use_buffers)
    trainer = training(model, STEPS + 1)
    for _ in range(STEPS):
        next(trainer)
        peer.update_parameters(model)
    checkpoint = roundtrip(peer.state_dict())
    converted = convert(checkpoint, model, "averaged_model")
    assert_bits_equal(fe.from_peer(checkpoint), converted)  # the model only checks here

    # n_averaged counts the first update_parameters(), which copies.
    assert int(peer.n_averaged) == STEPS
    policy = "average" if use_buffers else "copy"
    ema = loaded(model, converted, DECAY, buffer_policy=policy)
    assert int(ema.step) == STEPS - 1
    assert_holds(ema, dict(peer.module.state_dict()))
    assert_shadow(ema, evaluated(peer, lambda: peer(inputs())))

    next(trainer)
    peer.update_parameters(model)
    check_next_update(ema, model, dict(peer.module.state_dict()))


def test_averaged_model_counter_zero_and_step_override() -> None:
    model = make_model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    checkpoint = roundtrip(peer.state_dict())  # never updated: the copy made at construction
    assert int(fe.from_peer(checkpoint, model)["step"]) == 0
    assert int(fe.from_peer(checkpoint, model, step=41)["step"]) == 41


def test_averaged_model_of_a_compiled_model_drops_the_prefix() -> None:
    model = make_model()
    peer = AveragedModel(torch.compile(model), multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    trainer = training(model, STEPS)
    for _ in range(2):
        next(trainer)
        peer.update_parameters(model)
    checkpoint = roundtrip(peer.state_dict())
    assert "module._orig_mod.0.weight" in checkpoint
    converted = fe.from_peer(checkpoint, model)
    assert_bits_equal(fe.from_peer(checkpoint), converted)
    assert "averages.0.weight" in converted
    ema = loaded(model, converted, DECAY)
    assert_holds(ema, {k.removeprefix("module._orig_mod."): v for k, v in checkpoint.items()})


def test_ddp_prefix_is_dropped_and_a_submodule_named_module_is_kept() -> None:
    model = make_model()
    checkpoint = roundtrip(AveragedModel(model).state_dict())
    # AveragedModel(DistributedDataParallel(model)): names start with "module.module."
    ddp = {k.replace("module.", "module.module.", 1) if k != "n_averaged" else k: v
           for k, v in checkpoint.items()}  # fmt: skip
    assert_bits_equal(fe.from_peer(ddp, model), fe.from_peer(checkpoint, model))
    assert_bits_equal(fe.from_peer(ddp), fe.from_peer(checkpoint))

    # A model whose own submodule is called "module": the names are the model's.
    holder = nn.Module()
    holder.module = make_model()
    checkpoint = roundtrip(AveragedModel(holder).state_dict())
    converted = fe.from_peer(checkpoint, holder)
    assert "averages.module.0.weight" in converted
    loaded(holder, converted, DECAY)
    assert "averages.0.weight" in fe.from_peer(checkpoint)  # without the model: stripped


def test_tied_aliases_dropped_and_non_persistent_buffers_added() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 3)
            self.decoder = nn.Linear(3, 3)
            self.decoder.weight = self.encoder.weight
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    model = Tied()
    checkpoint = roundtrip(AveragedModel(model).state_dict())
    assert "module.decoder.weight" in checkpoint and "module.scale" not in checkpoint
    converted = fe.from_peer(checkpoint, model)
    assert "averages.decoder.weight" not in converted
    assert_bits_equal(converted["averages.scale"], model.scale)
    loaded(model, converted, DECAY)


# --- timm ModelEmaV3 / ModelEmaV2 (recorded) ----------------------------------------------------


@pytest.fixture(scope="module")
def timm_record() -> dict[str, Any]:
    return torch.load(TIMM_RECORD, weights_only=True)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_timm(timm_record: dict[str, Any], version: str) -> None:
    record = timm_record
    assert record["versions"]["timm"] == "1.0.31"
    assert record["config"]["decay"] == DECAY
    model = make_model()
    model.load_state_dict(record["model"])
    checkpoint = record[version]
    assert all(key.startswith("module.") for key in checkpoint)
    # timm keeps no counter: step is what the training loop passed to update(model, step=n).
    step = record["v3_step"] if version == "v3" else None
    converted = convert(checkpoint, model, "timm", step=step)
    assert int(converted["step"]) == (STEPS if version == "v3" else 0)
    assert int(fe.from_peer(checkpoint, model)["step"]) == 0

    # V3 with use_warmup=True is fe.warmup (its first update copies); V2 a constant decay.
    # Both average floating buffers and copy integer ones.
    decay = fe.warmup(DECAY, inv_gamma=1.0, power=2 / 3) if version == "v3" else DECAY
    ema = loaded(model, converted, decay, buffer_policy="average")
    peer_tensors = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    assert_holds(ema, peer_tensors)
    # timm's forward is its module's, in eval mode: the same model holding its tensors.
    peer_model = make_model()
    peer_model.load_state_dict(peer_tensors)
    y_peer = evaluated(peer_model, lambda: peer_model(inputs()))
    if version == "v2":
        # V2's `decay * e + (1 - decay) * m` moves a frozen parameter by rounding (0.9 * b +
        # 0.1 * b != b); fe.EMA uses the live frozen ones: the same bits with those.
        frozen = peer_tensors["0.bias"]
        assert not torch.equal(frozen, model[0].bias)
        torch.testing.assert_close(frozen, model[0].bias, rtol=0, atol=1e-7)
        with torch.no_grad():
            peer_model[0].bias.copy_(model[0].bias)
        y = assert_shadow(ema, evaluated(peer_model, lambda: peer_model(inputs())))
        torch.testing.assert_close(y, y_peer, rtol=1e-6, atol=1e-6)
    else:
        y = assert_shadow(ema, y_peer)
    assert_bits_equal(inputs(), record["x"])
    # timm's own output, recorded under torch 2.14.1 (another torch may round otherwise)
    torch.testing.assert_close(y, record[f"y_{version}"], rtol=1e-6, atol=1e-6)

    model.load_state_dict(record["model_next"])  # the next training step, in place
    peer_next = record[f"{version}_next"]
    check_next_update(ema, model, {k.removeprefix("module."): v for k, v in peer_next.items()})


def test_timm_training_checkpoint(timm_record: dict[str, Any]) -> None:
    """timm's train.py saves the unwrapped EMA model as checkpoint['state_dict_ema']."""
    model = make_model()
    model.load_state_dict(timm_record["model"])
    plain = {k.removeprefix("module."): v for k, v in timm_record["v3"].items()}
    full = {"epoch": 3, "state_dict": timm_record["model"], "state_dict_ema": plain}
    with pytest.raises(ValueError, match=re.escape("pass checkpoint['state_dict_ema']")):
        fe.from_peer(full)
    with pytest.raises(ValueError, match=re.escape("needs peer='timm'")):
        fe.from_peer(plain)
    converted = fe.from_peer(plain, model, peer="timm", step=STEPS)
    assert_bits_equal(converted, fe.from_peer(timm_record["v3"], model, step=STEPS))


# --- torch_ema ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trainable_only", "use_num_updates"), [(False, True), (True, False)], ids=["all", "trainable"]
)
def test_torch_ema(trainable_only: bool, use_num_updates: bool) -> None:
    model = make_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    peer = ExponentialMovingAverage(params, decay=DECAY, use_num_updates=use_num_updates)
    trainer = training(model, STEPS + 1)
    for _ in range(STEPS):
        next(trainer)
        peer.update()
    checkpoint = roundtrip(peer.state_dict())
    with pytest.raises(TypeError, match=re.escape("pass the model to name them")):
        fe.from_peer(checkpoint)
    converted = convert(checkpoint, model, "torch_ema")

    # num_updates counts update() calls (None without use_num_updates: no count kept).
    assert peer.num_updates == (STEPS if use_num_updates else None)
    ema = loaded(model, converted, DECAY, use_num_updates=use_num_updates)
    assert int(ema.step) == (STEPS if use_num_updates else 0)
    # torch_ema holds no buffers: the model's are taken, as its averaged model uses them.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert_holds(ema, {**dict(zip(names, peer.shadow_params, strict=True)), **buffers})

    def peer_output() -> Tensor:
        with peer.average_parameters():
            return model(inputs())

    assert_shadow(ema, evaluated(model, peer_output))

    next(trainer)
    peer.update()
    check_next_update(ema, model, dict(zip(names, peer.shadow_params, strict=True)))


# --- ema-pytorch --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update_after_step", "update_every", "include_online_model"),
    [(0, 1, True), (2, 3, False)],
    ids=["every_step", "every_3rd"],
)
def test_ema_pytorch(update_after_step: int, update_every: int, include_online_model: bool) -> None:
    model = make_model()
    peer = EmaPytorch(
        model,
        beta=DECAY,
        update_after_step=update_after_step,
        update_every=update_every,
        include_online_model=include_online_model,
    )
    trainer = training(model, STEPS + 1)
    for _ in range(STEPS):
        next(trainer)
        peer.update()
    checkpoint = roundtrip(peer.state_dict())
    assert any(key.startswith("online_model.") for key in checkpoint) == include_online_model
    converted = convert(checkpoint, model, "ema_pytorch")
    assert_bits_equal(fe.from_peer(checkpoint), converted)

    # step counts update() calls, the first of which copies (initted): fe.warmup's t.
    assert bool(peer.initted) and int(peer.step) == STEPS
    ema = loaded(model, converted, fe.warmup(DECAY), buffer_policy="average")
    assert int(ema.step) == STEPS
    # num_batches_tracked: ema-pytorch never updates it (0, from the copy at construction)
    assert int(ema.state()["buffers"]["1.num_batches_tracked"]) == 0
    assert_holds(ema, dict(peer.ema_model.state_dict()))
    peer.eval()  # puts its ema_model in eval mode
    with torch.no_grad():
        assert_shadow(ema, peer(inputs()))

    next(trainer)
    peer.update()
    # with update_every > 1 ema-pytorch's next update is not fe.warmup's (see the guide)
    check_next_update(ema, model, dict(peer.ema_model.state_dict()) if update_every == 1 else None)


# --- diffusers EMAModel --------------------------------------------------------------------------


@pytest.mark.parametrize("trainable_only", [False, True], ids=["all", "trainable"])
def test_diffusers(trainable_only: bool) -> None:
    model = make_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]

    def params() -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad or not trainable_only]

    peer = EMAModel(params(), decay=DECAY)
    trainer = training(model, STEPS + 1)
    for _ in range(STEPS):
        next(trainer)
        peer.step(params())
    checkpoint = roundtrip(peer.state_dict())
    with pytest.raises(TypeError, match=re.escape("pass the model to name them")):
        fe.from_peer(checkpoint)
    converted = convert(checkpoint, model, "diffusers")

    # optimization_step counts step() calls; the first has decay 0 and copies.
    assert peer.optimization_step == STEPS
    schedule = after_step(lambda t, dt: fe.tf_decay(DECAY, t - 1), 0)  # docs/migration.md
    ema = loaded(model, converted, schedule)
    assert int(ema.step) == STEPS
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert_holds(ema, {**dict(zip(names, peer.shadow_params, strict=True)), **buffers})

    def peer_output() -> Tensor:
        peer.store(params())
        peer.copy_to(params())
        try:
            return model(inputs())
        finally:
            peer.restore(params())

    assert_shadow(ema, evaluated(model, peer_output))

    next(trainer)
    peer.step(params())
    check_next_update(ema, model, dict(zip(names, peer.shadow_params, strict=True)))


# --- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def averaged() -> tuple[nn.Module, dict[str, Any]]:
    model = make_model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    peer.update_parameters(model)
    return model, roundtrip(peer.state_dict())


@pytest.fixture
def listed() -> tuple[nn.Module, dict[str, Any]]:
    model = make_model()
    peer = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    peer.update()
    return model, roundtrip(peer.state_dict())


def test_unrecognised_checkpoints() -> None:
    with pytest.raises(TypeError, match=re.escape("from_peer: not a checkpoint at 'state_dict'")):
        fe.from_peer([torch.ones(2)])  # type: ignore[arg-type]
    message = re.escape("from_peer: unrecognised checkpoint at 'state_dict': expected the ")
    with pytest.raises(ValueError, match=message + ".*got a dict with keys \\['decay', 'foo'\\]"):
        fe.from_peer({"foo": torch.ones(1), "decay": 0.9})
    model = make_model()
    with pytest.raises(ValueError, match=r"already a functional_ema checkpoint.*load_state_dict"):
        fe.from_peer(fe.EMA(model, DECAY).state_dict())
    with pytest.raises(ValueError, match=re.escape("unknown option at 'peer'")):
        fe.from_peer({"n_averaged": torch.tensor(1)}, peer="swa")  # type: ignore[arg-type]


def test_checkpoint_of_another_peer(averaged: tuple[nn.Module, dict[str, Any]]) -> None:
    model, checkpoint = averaged
    expected = re.escape(
        "from_peer: a checkpoint of another peer than 'diffusers' at 'state_dict': expected a "
        "'diffusers' checkpoint, got a 'averaged_model' one (keys "
    )
    with pytest.raises(ValueError, match=expected + ".*Pass peer='averaged_model'"):
        fe.from_peer(checkpoint, model, peer="diffusers")
    expected = re.escape(
        "from_peer: not a 'ema_pytorch' checkpoint at 'state_dict': expected a dict with "
        "['ema_model.*', 'step'], got a dict with keys ['initted', 'step'] (lacking "
        "['ema_model.*'])."
    )
    with pytest.raises(ValueError, match=expected):
        fe.from_peer({"step": torch.tensor(3), "initted": torch.tensor(True)}, peer="ema_pytorch")
    with pytest.raises(ValueError, match=re.escape("(lacking ['optimization_step'])")):
        fe.from_peer({"shadow_params": [torch.ones(1)]}, peer="diffusers")


def test_list_of_another_length(listed: tuple[nn.Module, dict[str, Any]]) -> None:
    _, checkpoint = listed
    expected = re.escape(
        "from_peer: a list of averages of another length at 'shadow_params': expected 2 "
        "(model.parameters()), got 6 tensors. Pass the model"
    )
    with pytest.raises(ValueError, match=expected):
        fe.from_peer(checkpoint, nn.Linear(4, 8))
    model = make_model()
    with pytest.raises(ValueError, match=re.escape("expected 6 (model.parameters()) or 5 (the")):
        fe.from_peer({**checkpoint, "shadow_params": checkpoint["shadow_params"][:4]}, model)


def test_shape_mismatches_name_the_key(
    averaged: tuple[nn.Module, dict[str, Any]], listed: tuple[nn.Module, dict[str, Any]]
) -> None:
    model, checkpoint = averaged
    broken = {**checkpoint, "module.3.weight": torch.zeros(3, 8)}
    expected = re.escape(
        "from_peer: checkpoint does not match the model at '<root>': expected the names and "
        "shapes of `model`'s parameters and buffers, got mismatch at 'module.3.weight': "
        "expected shape (2, 8), got (3, 8)."
    )
    with pytest.raises(ValueError, match=expected):
        fe.from_peer(broken, model)

    model, checkpoint = listed
    shadow = list(checkpoint["shadow_params"])
    shadow[4] = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=re.escape("mismatch at 'shadow_params[4] (3.weight)'")):
        fe.from_peer({**checkpoint, "shadow_params": shadow}, model)
    shadow[4] = "weights"
    with pytest.raises(TypeError, match=re.escape("not a tensor at 'shadow_params[4]'")):
        fe.from_peer({**checkpoint, "shadow_params": shadow}, model)


def test_missing_and_unexpected_names(averaged: tuple[nn.Module, dict[str, Any]]) -> None:
    model, checkpoint = averaged
    broken = {k: v for k, v in checkpoint.items() if k != "module.3.bias"}
    broken["module.4.weight"] = torch.zeros(1)
    expected = re.escape("got missing keys ['3.bias'], unexpected keys ['module.4.weight']")
    with pytest.raises(ValueError, match=expected):
        fe.from_peer(broken, model)
    # without the model nothing is checked here: EMA.load_state_dict names the difference
    with pytest.raises(ValueError, match=re.escape("missing keys ['averages.3.bias']")):
        fe.EMA(model, DECAY).load_state_dict(fe.from_peer(broken))


def test_bad_counters_and_step(averaged: tuple[nn.Module, dict[str, Any]]) -> None:
    model, checkpoint = averaged
    with pytest.raises(ValueError, match=re.escape("negative counter at 'n_averaged'")):
        fe.from_peer({**checkpoint, "n_averaged": torch.tensor(-1)}, model)
    with pytest.raises(TypeError, match=re.escape("counter of the wrong type at 'n_averaged'")):
        fe.from_peer({**checkpoint, "n_averaged": torch.tensor(1.0)}, model)
    with pytest.raises(ValueError, match=re.escape("negative step at 'step'")):
        fe.from_peer(checkpoint, model, step=-1)
    with pytest.raises(TypeError, match=re.escape("step of the wrong type at 'step'")):
        fe.from_peer(checkpoint, model, step=True)


def test_wrapped_model_is_refused(averaged: tuple[nn.Module, dict[str, Any]]) -> None:
    model, checkpoint = averaged
    with pytest.raises(ValueError, match=re.escape("Pass `model._orig_mod` instead")):
        fe.from_peer(checkpoint, torch.compile(model))  # type: ignore[arg-type]
    unused = copy.deepcopy(model)
    assert_bits_equal(fe.from_peer(checkpoint, unused), fe.from_peer(checkpoint, model))
