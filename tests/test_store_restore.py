"""``ema.store()`` / ``ema.restore()``: ``swap()`` as two calls, for framework hooks."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import assert_bits_equal
from torch import nn

import functional_ema as fe


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model.train()
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_store_puts_the_averages_in_and_restore_takes_them_out_bit_for_bit() -> None:
    model = _model()
    ema = fe.EMA(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _step(model, optimizer, torch.randn(16, 4))
        ema.update()
    live = copy.deepcopy(model.state_dict())
    slots = {n: id(b) for n, b in model.named_buffers()}
    returned = ema.store()
    assert returned is model
    for name, average in ema.state()["params"].items():
        assert torch.equal(dict(model.named_parameters())[name], average)
    model.eval()
    with torch.no_grad():
        stored_out = model(torch.ones(2, 4))
    ema.restore()
    ema.eval()  # the same averages through the shadow module
    with torch.no_grad():
        assert torch.equal(ema(torch.ones(2, 4)), stored_out)
    assert_bits_equal(model.state_dict(), live)
    assert {n: id(b) for n, b in model.named_buffers()} == slots


def test_misuse_is_a_clear_error_and_changes_nothing() -> None:
    model = _model()
    ema = fe.EMA(model, 0.5)
    with pytest.raises(RuntimeError, match=r"EMA.restore: called without store\(\)"):
        ema.restore()
    ema.store()
    with pytest.raises(
        RuntimeError, match=r"EMA\.store: called while the model holds the averages"
    ):
        ema.store()
    with pytest.raises(RuntimeError, match=r"EMA.swap: called after store\(\)"), ema.swap():
        pass
    with pytest.raises(RuntimeError, match=r"EMA\.update"):
        ema.update()
    with pytest.raises(RuntimeError):
        model.state_dict()
    with pytest.raises(RuntimeError):
        pickle.dumps(ema)
    ema.restore()
    with pytest.raises(RuntimeError, match=r"EMA.restore: called without store\(\)"):
        ema.restore()
    with ema.swap():
        with pytest.raises(RuntimeError, match=r"EMA\.restore: called in a swap block"):
            ema.restore()
        with pytest.raises(RuntimeError, match=r"EMA\.store: called while the model holds"):
            ema.store()
    ema.update()  # usable again
    pickle.loads(pickle.dumps(ema))


def test_restore_undoes_a_forward_that_reassigned_a_buffer() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.tensor(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1
            return self.lin(x)

    model = Counting()
    ema = fe.EMA(model, 0.9)
    before = model.calls
    ema.store()
    model(torch.ones(1, 2))
    ema.restore()
    assert model.calls is before and int(model.calls) == 5


def _run(steps: int, checkpoint_at: int | None = None) -> tuple[dict, dict, list[torch.Tensor]]:
    """A Lightning-style loop: update after each step, validate on the averages between a
    "validation starts" store() and a "validation ends" restore(); optionally stop at
    ``checkpoint_at``, save everything, and resume in new objects."""
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 4, generator=generator) for _ in range(steps)]
    val = torch.randn(32, 4, generator=generator)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = fe.EMA(model, 0.9, use_num_updates=True)
    metrics: list[torch.Tensor] = []
    step = 0
    while step < steps:
        _step(model, optimizer, batches[step])
        ema.update()
        step += 1
        if step % 3 == 0:  # on_validation_epoch_start / on_validation_epoch_end
            ema.store()
            model.eval()
            with torch.no_grad():
                metrics.append(model(val).pow(2).mean())
            model.train()
            ema.restore()
        if step == checkpoint_at:
            buffer = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": optimizer.state_dict(),
                    "ema": ema.state_dict(),
                },
                buffer,
            )
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model = _model()
            model.load_state_dict(saved["model"])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            optimizer.load_state_dict(saved["opt"])
            ema = fe.EMA(model, 0.9, use_num_updates=True)
            ema.load_state_dict(saved["ema"])
    return model.state_dict(), ema.state_dict(), metrics


def test_validation_hooks_and_a_resume_are_bit_identical_to_an_uninterrupted_run() -> None:
    model, ema, metrics = _run(10)
    resumed_model, resumed_ema, resumed_metrics = _run(10, checkpoint_at=4)
    assert_bits_equal(resumed_model, model)
    assert_bits_equal(resumed_ema, ema)
    assert len(metrics) == 3
    for got, expected in zip(resumed_metrics, metrics, strict=True):
        assert torch.equal(got, expected)


def test_the_torch_ema_validation_flow_gives_the_same_evaluation() -> None:
    """torch_ema: ``store(); copy_to(); ...; restore()``; here ``store(); ...; restore()``.

    The averages differ by rounding only (torch_ema computes ``1 - decay`` in float64 and
    ``shadow -= w * (shadow - param)``; TF's order rounds each step in float32): the outputs
    agree to 1e-6, and both give the live weights back bit for bit.
    """
    from torch_ema import ExponentialMovingAverage

    ours_model, peer_model = _model(), _model()
    ours, peer = (
        fe.EMA(ours_model, 0.9),
        ExponentialMovingAverage(peer_model.parameters(), 0.9, use_num_updates=False),
    )
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.1)
    peer_opt = torch.optim.SGD(peer_model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(5)
    val = torch.randn(8, 4, generator=generator)
    for _ in range(6):
        x = torch.randn(16, 4, generator=generator)
        _step(ours_model, ours_opt, x)
        _step(peer_model, peer_opt, x)
        ours.update()
        peer.update()
    ours_live = copy.deepcopy(ours_model.state_dict())
    peer_live = copy.deepcopy(peer_model.state_dict())
    ours.store()
    peer.store()
    peer.copy_to()
    ours_model.eval()
    peer_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours_model(val), peer_model(val), rtol=1e-6, atol=1e-6)
    ours.restore()
    peer.restore()
    assert_bits_equal(ours_model.state_dict(), ours_live)
    assert_bits_equal(peer_model.state_dict(), peer_live)


def test_messages_between_store_and_restore_say_restore() -> None:
    model = _model()
    ema = fe.EMA(model, 0.5)
    ema.store()
    with pytest.raises(RuntimeError, match=r"between store\(\) and restore\(\).*after restore\(\)"):
        ema.update()
    with pytest.raises(RuntimeError, match=r"between store\(\) and restore\(\).*after restore\(\)"):
        copy.deepcopy(ema)
    with pytest.raises(RuntimeError, match=r"between ema\.store\(\) and ema\.restore\(\)"):
        model.state_dict()
    with pytest.raises(RuntimeError, match=r"Load after ema\.restore\(\)"):
        model.load_state_dict({})
    ema.restore()


def test_a_store_from_another_thread_during_update_is_refused_not_averaged_in() -> None:
    """``update()`` checks again under the EMA's lock, which ``store()`` takes too."""
    import threading

    class Hooked(nn.Module):
        def __init__(self) -> None:
            self.hook = None
            super().__init__()
            self.lin = nn.Linear(2, 2)

        @property
        def training(self) -> bool:  # read by update() after its first check
            if self.hook is not None:
                hook, self.hook = self.hook, None
                thread = threading.Thread(target=hook)
                thread.start()
                thread.join()
            return self.__dict__.get("_training", True)

        @training.setter
        def training(self, mode: bool) -> None:
            self.__dict__["_training"] = mode

    model = Hooked()
    ema = fe.EMA(model, 0.5)
    averages = {k: v.clone() for k, v in ema.state()["params"].items()}
    with torch.no_grad():
        model.lin.weight.fill_(10.0)
    model.hook = ema.store
    with pytest.raises(RuntimeError, match=r"EMA\.update: called between store\(\)"):
        ema.update()
    assert_bits_equal(ema.state()["params"], averages)
    ema.restore()
    assert torch.all(model.lin.weight == 10.0)


def test_stored_says_whether_a_restore_is_due() -> None:
    model = torch.nn.Linear(2, 1)
    ema = fe.EMA(model, 0.9)
    assert not ema.stored
    with ema.swap():
        assert not ema.stored  # the block restores by itself
    ema.store()
    assert ema.stored
    ema.restore()
    assert not ema.stored
