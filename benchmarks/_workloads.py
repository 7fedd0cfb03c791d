"""What the benchmark runs its candidates on: the models, and the decay bank.

A ``Workload`` is one table of the report: a model (``ModelSpec``), the decays its averages
follow and the candidates (rows). The model workloads (``MODELS``) average one decay,
``DECAY``, with every candidate of ``CANDIDATES``; the bank workload (``BANK``) averages
``BANK_DECAYS`` at once and has rows of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

import functional_ema as fe

from _candidates import CANDIDATES, DECAY, LOW_PRECISION, Candidate, Ctx, FnRunner, Runner


BANK_KEY = "bank"
BANK_DECAYS = (0.99, 0.995, 0.999, 0.9999)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark on.

    Attributes:
        title: The report section's heading.
        build: Builds the model (called after ``torch.manual_seed(0)``; no weights downloaded).
        dtype: The model's parameter dtype.
        repeats: Default timed rounds (each round times every candidate once).
    """

    title: str
    build: Callable[[], nn.Module]
    dtype: torch.dtype
    repeats: int


@dataclasses.dataclass(frozen=True)
class Workload:
    """One table of the report: a model, the decays of its averages and its candidates.

    Attributes:
        key: Its name for ``--models`` and in the JSON.
        spec: The model.
        candidates: All rows, in table order.
        decays: The decays every candidate averages with; a runner's ``averages()`` has a
            leading dimension of this length when there are several.
        selectable: Whether ``--candidates`` picks among the rows (the bank's rows are not in
            ``CANDIDATES``, so it always runs all of them).
        post_check: Extra checks after the reference check: gets the built runners by key,
            returns text to append to a row's check cell, by key.
    """

    key: str
    spec: ModelSpec
    candidates: tuple[Candidate, ...] = tuple(CANDIDATES)
    decays: tuple[float, ...] = (DECAY,)
    selectable: bool = True
    post_check: Callable[[dict[str, Runner]], dict[str, str]] | None = None

    def rows(self, keys: Collection[str] | None = None) -> list[Candidate]:
        """The candidates that run on this workload.

        Args:
            keys: Only these candidates (None: all), where the workload is ``selectable``.

        Returns:
            The candidates, in table order.
        """
        return [
            c
            for c in self.candidates
            if (not c.only_low_precision or self.spec.dtype in LOW_PRECISION)
            and (not keys or not self.selectable or c.key in keys)
        ]


# --------------------------------------------------------------------------------------- models


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def _vit_b_16() -> nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


def _small() -> nn.Module:
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(2000)])


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("ResNet-50 (fp32)", _resnet50, torch.float32, 25),
    "vit_b_16": ModelSpec("ViT-B/16 (fp32)", _vit_b_16, torch.float32, 8),
    "small": ModelSpec(
        "2000 x Linear(16,16): 4000 small tensors (fp32)", _small, torch.float32, 20
    ),
    "resnet50_bf16": ModelSpec(
        "ResNet-50 in bfloat16 (fp32 averages where the library allows)",
        _resnet50,
        torch.bfloat16,
        25,
    ),
}


# ----------------------------------------------------------------------------------- decay bank


def _numel(params: dict[str, Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def _bank_bytes(params: dict[str, Tensor]) -> int:
    """Read and write K fp32 averages, read the params once."""
    return len(BANK_DECAYS) * 2 * 4 * _numel(params) + 4 * _numel(params)


def build_bank(ctx: Ctx) -> Runner:
    """One ``fe.ema_update_bank_`` over a bank of K averages laid out by ``fe.bank``."""
    params = ctx.params()
    bank = fe.bank(params, len(BANK_DECAYS))
    decays = torch.tensor(BANK_DECAYS, dtype=torch.float32, device=ctx.device)
    return FnRunner(
        lambda: fe.ema_update_bank_(bank, params, decays),
        lambda: bank,
        torch.float32,
        bytes_moved=_bank_bytes(params),
    )


def _separate(ctx: Ctx, trees: list[dict[str, Tensor]]) -> Runner:
    """K ``fe.ema_update_`` calls, one per decay, each on its own tree of averages."""
    params = ctx.params()

    def update() -> None:
        for tree, decay in zip(trees, BANK_DECAYS, strict=True):
            fe.ema_update_(tree, params, decay)

    return FnRunner(
        update,
        lambda: {n: torch.stack([tree[n] for tree in trees]) for n in params},
        torch.float32,
        bytes_moved=len(BANK_DECAYS) * 3 * 4 * _numel(params),
    )


def build_separate_init(ctx: Ctx) -> Runner:
    """K separate updates on trees laid out by ``fe.init``."""
    params = ctx.params()
    return _separate(ctx, [fe.init(params)["params"] for _ in BANK_DECAYS])


def build_separate_clone(ctx: Ctx) -> Runner:
    """K separate updates on per-tensor clones."""
    params = ctx.params()
    return _separate(ctx, [{n: p.clone() for n, p in params.items()} for _ in BANK_DECAYS])


class BankBoundRunner(Runner):
    """One ``lerp_`` over a contiguous (K, N) buffer towards the params, broadcast.

    Args:
        ctx: The model whose trainable parameters the flat buffers hold.
    """

    def __init__(self, ctx: Ctx) -> None:
        k_size = len(BANK_DECAYS)
        self.ctx = ctx
        params = ctx.params()
        self.shapes = [p.shape for p in params.values()]
        self.flat_params = torch.cat([p.reshape(-1) for p in params.values()])
        self.flat_avg = self.flat_params.unsqueeze(0).repeat(k_size, 1)
        self.weights = (
            (1.0 - torch.tensor(BANK_DECAYS, dtype=torch.float64))
            .float()
            .to(ctx.device)
            .view(k_size, 1)
        )

    def update(self) -> None:
        """One broadcast ``lerp_`` of all K rows."""
        self.flat_avg.lerp_(self.flat_params.expand(len(BANK_DECAYS), -1), self.weights)

    def sync(self) -> None:
        """Copy the model's current params into the flat buffer."""
        torch.cat([p.reshape(-1) for p in self.ctx.params().values()], out=self.flat_params)

    def averages(self) -> dict[str, Tensor]:
        """(K, numel) views of the flat average, by parameter name."""
        chunks = self.flat_avg.split([s.numel() for s in self.shapes], dim=1)
        return dict(zip(self.ctx.names, chunks, strict=True))

    def stream_bytes(self, ctx: Ctx) -> int:
        """Read and write K fp32 averages, read the params once."""
        return _bank_bytes(ctx.params())


def build_bank_bound(ctx: Ctx) -> Runner:
    """The bank's bound."""
    return BankBoundRunner(ctx)


def bank_bit_identity(runners: dict[str, Runner]) -> dict[str, str]:
    """Whether the bank's averages equal the separate ``fe.ema_update_`` ones bit for bit."""
    bank, separate = runners.get("bank"), runners.get("separate_init")
    if bank is None or separate is None:
        return {}
    ours, theirs = bank.averages(), separate.averages()
    same = all(torch.equal(ours[n], theirs[n]) for n in ours)
    return {"bank": ", bit-identical to separate" if same else ", NOT bit-identical to separate"}


_K = len(BANK_DECAYS)
BANK = Workload(
    BANK_KEY,
    ModelSpec(
        f"Decay bank: K={_K} decays {list(BANK_DECAYS)}, ResNet-50-sized fp32 tree",
        _resnet50,
        torch.float32,
        8,
    ),
    candidates=(
        Candidate("bank", f"fe.ema_update_bank_: one bank of K={_K} (`fe.bank`)", "fe", build_bank),
        Candidate(
            "separate_init",
            f"{_K} x fe.ema_update_ on `fe.init(params)['params']` trees",
            "fe",
            build_separate_init,
        ),
        Candidate(
            "separate_clone",
            f"{_K} x fe.ema_update_ on per-tensor clones",
            "fe",
            build_separate_clone,
        ),
        Candidate(
            "bound", "bound: one lerp_ over a contiguous (K, N) buffer", "ref", build_bank_bound
        ),
    ),
    decays=BANK_DECAYS,
    selectable=False,
    post_check=bank_bit_identity,
)

WORKLOADS: dict[str, Workload] = {
    **{key: Workload(key, spec) for key, spec in MODELS.items()},
    BANK_KEY: BANK,
}
