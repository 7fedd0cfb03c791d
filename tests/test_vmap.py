"""torch.func.vmap over stacked ensembles: per-member decays give each member's own bits."""

from __future__ import annotations

import optree
import pytest
import torch
from helpers import assert_bits_equal
from torch import nn
from torch.func import stack_module_state, vmap

import functional_ema as fe


def _ensemble(n: int = 4, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    models = [nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)) for _ in range(n)]
    params, buffers = stack_module_state([m.to(dtype) for m in models])
    return params, buffers


def _member(tree: dict, i: int) -> dict:
    return optree.tree_map(lambda t: t[i], tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_per_member_decay_bit_equal_to_each_member(dtype: torch.dtype) -> None:
    params, _ = _ensemble(dtype=dtype)
    shadow = optree.tree_map(lambda t: t + torch.randn_like(t), params)
    decays = torch.tensor([0.0, 0.5, 0.999, 1.0])
    pure = vmap(fe.ema_update)(shadow, params, decays)
    inplace = optree.tree_map(torch.clone, shadow)
    vmap(fe.ema_update_)(inplace, params, decays)
    for i in range(4):
        alone = fe.ema_update(_member(shadow, i), _member(params, i), decays[i])
        assert_bits_equal(_member(pure, i), alone)
        assert_bits_equal(_member(inplace, i), alone)


def test_one_decay_for_all_members() -> None:
    params, _ = _ensemble()
    shadow = optree.tree_map(lambda t: t * 2, params)
    out = vmap(fe.ema_update, in_dims=(0, 0, None))(shadow, params, torch.tensor(0.9))
    for i in range(4):
        assert_bits_equal(
            _member(out, i), fe.ema_update(_member(shadow, i), _member(params, i), 0.9)
        )


def test_state_api_under_vmap_with_buffers_and_schedule() -> None:
    params, buffers = _ensemble()
    states = vmap(fe.init)(params, buffers)
    singles = [fe.init(_member(params, i), _member(buffers, i)) for i in range(4)]
    decays = torch.tensor([0.9, 0.99, 0.999, 0.9999])
    for step in range(3):
        params = optree.tree_map(lambda t: t + 0.1, params)
        buffers["1.num_batches_tracked"] += 1
        vmap(fe.update_)(states, params, decays, buffers)
        singles = [
            fe.update(s, _member(params, i), decays[i], _member(buffers, i))
            for i, s in enumerate(singles)
        ]
        assert states["step"].tolist() == [step + 1] * 4
    for i in range(4):
        assert_bits_equal(_member(states, i), singles[i])
    profile = fe.power(sigma_rel=0.1)
    scheduled = vmap(fe.update, in_dims=(0, 0, None, 0))(states, params, profile, buffers)
    assert scheduled["step"].tolist() == [4] * 4


def test_zero_debias_under_vmap() -> None:
    params, _ = _ensemble()
    states = vmap(lambda p: fe.init(p, zero_debias=True))(params)
    decays = torch.tensor([0.5, 0.9, 0.99, 0.999])
    vmap(fe.update_)(states, params, decays)
    for i in range(4):
        alone = fe.update(
            fe.init(_member(params, i), zero_debias=True), _member(params, i), decays[i]
        )
        assert_bits_equal(_member(states, i), alone)


def test_training_ensemble_with_vmap_and_grad() -> None:
    """An ensemble trained with vmap(grad) and averaged with one decay per member."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    base = make()
    params, _ = stack_module_state([make() for _ in range(3)])
    state = vmap(fe.init)(params)
    decays = torch.tensor([0.5, 0.9, 0.99])

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(base, (p, {}), (x,)) - y).pow(2).mean()

    x, y = torch.randn(32, 3), torch.randn(32, 1)
    for _ in range(5):
        grads = vmap(torch.func.grad(loss), in_dims=(0, None, None))(params, x, y)
        params = optree.tree_map(lambda p, g: p - 0.1 * g, params, grads)
        state = vmap(fe.update)(state, params, decays)
    assert state["step"].tolist() == [5, 5, 5]
    spread = [fe.average(_member(state, i))["0.weight"] for i in range(3)]
    assert not torch.equal(spread[0], spread[2])
