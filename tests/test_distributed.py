"""DDP and FSDP2 on two CPU processes (gloo on 127.0.0.1), checked against one process.

Each job runs this file as a script in fresh processes (``python test_distributed.py JOB
OUT``, one per rank, with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set), under a hard timeout;
the ranks write what they saw to ``OUT`` and the tests compare it, bit for bit, with the same
training and EMA run here in one process:

- ``train`` (2 ranks): DDP (the wrapper is rejected with the fix; averages are identical on
  every rank; rank 0 saves), then FSDP2: the adapter and the functional API (in place, pure,
  zero-debiased) on sharded DTensor parameters with a communication counter around every
  update, the errors of the wrong paths, evaluation by in-place swap, a DCP save and a full
  export on rank 0.
- ``load`` on 2 fresh ranks and on 1 rank: the DCP checkpoint loaded into a new EMA (resharded
  for 1 rank, and into plain tensors), then one more update from the restored step.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from helpers import assert_bits_equal
from torch import Tensor, nn

import functional_ema as fe


pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
STEPS = 4
TIMEOUT_S = 150
"""Hard limit of one job (all its ranks), start-up included."""


# --- the training both sides run ---------------------------------------------------------


def make_model() -> nn.Module:
    """A small model with a buffer, uneven shards (3 rows on 2 ranks) and a frozen bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[3].bias.requires_grad_(False)
    return model


def batches() -> Iterator[Tensor]:
    """The same batches on every rank (so FSDP2's averaged gradients are the exact ones)."""
    generator = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(6, 4, generator=generator)


EVAL_X = torch.linspace(-2.0, 2.0, 20).reshape(5, 4)


def train(model: nn.Module, count: Callable[[], Any]) -> dict[str, Any]:
    """Train ``model`` for STEPS steps with the adapter and three functional EMAs.

    ``count()`` is a context manager around every update (the communication counter on the
    ranks); its results are collected in ``counts``.
    """
    ema = fe.EMA(model, 0.9, use_num_updates=True)
    params, buffers = fe.module_state(model)
    in_place = fe.init(params, buffers)
    pure = fe.init(params, buffers)
    debiased = fe.init(params, zero_debias=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    data, counts = batches(), []
    for _ in range(STEPS):
        loss = model(next(data)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with count() as counter:
            ema.update()
            params, buffers = fe.module_state(model)
            fe.update_(in_place, params, fe.tf_warmup(0.9), buffers)
            pure = fe.update(pure, params, 0.8, buffers, buffer_policy="average")
            fe.update_(debiased, params, 0.7)
        counts.append(counter)
    return {"ema": ema, "in_place": in_place, "pure": pure, "debiased": debiased, "counts": counts}


# --- the ranks ---------------------------------------------------------------------------


class Collectives:
    """Count collectives: DTensor / functional / c10d ops (CommDebugMode) and direct calls."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "all_to_all",
        "all_to_all_single",
        "reduce",
        "gather",
        "scatter",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.total = 0

    def __enter__(self) -> Collectives:
        from torch.distributed import distributed_c10d
        from torch.distributed.tensor.debug import CommDebugMode

        self._saved = []
        for namespace in (torch.distributed, distributed_c10d):
            for name in self.NAMES:
                original = getattr(namespace, name, None)
                if original is None:
                    continue
                self._saved.append((namespace, name, original))
                setattr(namespace, name, self._counting(original))
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for namespace, name, original in self._saved:
            setattr(namespace, name, original)
        self.total = self.calls + self._mode.get_total_counts()


def _local(tree: Any) -> Any:
    """Plain copies of a tree's tensors: a DTensor's local shard, tagged with its placements."""
    from torch.distributed.tensor import DTensor

    def one(t: Tensor) -> Any:
        if isinstance(t, DTensor):
            return {"local": t.to_local().detach().clone(), "placements": str(t.placements)}
        return t.detach().clone()

    return optree.tree_map(one, tree)


def _error(call: Callable[[], Any]) -> str:
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _ddp(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    errors = {
        "EMA": _error(lambda: fe.EMA(ddp, 0.9)),
        "module_state": _error(lambda: fe.module_state(ddp)),
    }
    ema = fe.EMA(ddp.module, 0.9, use_num_updates=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(10 + rank)  # different data on each rank
    for _ in range(STEPS):
        loss = ddp(torch.randn(6, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
    if rank == 0:  # save from rank 0 only: the averages are the same on every rank
        torch.save(ema.state_dict(), out / "ddp_ema.pt")
    return {"errors": errors, "state_dict": ema.state_dict()}


def _shard(model: nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root manages the BatchNorm and the last Linear


def _fsdp(rank: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate

    model = make_model()
    _shard(model, WORLD)
    run = train(model, Collectives)
    ema, in_place, pure, debiased = run["ema"], run["in_place"], run["pure"], run["debiased"]
    result: dict[str, Any] = {"counts": [c.total for c in run["counts"]], "errors": {}}
    errors = result["errors"]

    # The averages are DTensors sharded like the parameters.
    params, buffers = fe.module_state(model)
    held = {**ema.state()["params"], **ema.state()["buffers"]}
    live = {n: t for n, t in {**params, **buffers}.items() if n in held}  # frozen: not held
    result["same_placements"] = all(
        isinstance(held[n], DTensor) == isinstance(t, DTensor)
        and (
            not isinstance(t, DTensor)
            or (held[n].placements == t.placements and held[n].device_mesh == t.device_mesh)
        )
        for n, t in live.items()
    )
    result["states"] = _local(
        {"ema": ema.state(), "in_place": in_place, "pure": pure, "debiased": debiased}
    )

    # The counter counts: a gather and an all-reduce inside it are seen.
    with Collectives() as control:
        next(iter(params.values())).full_tensor()
        torch.distributed.all_reduce(torch.ones(1))
    result["control"] = control.total

    # Non-finite values are skipped per rank, shard-local.
    name = "0.weight"
    local = params[name].to_local().clone()
    if rank == 0:
        local[0, 0] = float("nan")
    nan_params = {
        **params,
        name: DTensor.from_local(
            local,
            params[name].device_mesh,
            params[name].placements,
            run_check=False,
            shape=params[name].shape,
            stride=params[name].stride(),
        ),
    }
    with Collectives() as counter:
        skipped = fe.update(in_place, nan_params, 0.9, buffers)
    result["nonfinite_updates"] = {
        "count": int(skipped["nonfinite_updates"] - in_place["nonfinite_updates"]),
        "kept": bool(
            torch.equal(
                skipped["params"][name].to_local()[0, 0], in_place["params"][name].to_local()[0, 0]
            )
        ),
        "collectives": counter.total,
    }

    # Wrong paths raise: placements that differ, functional_call on an FSDP2 model, shadow.
    replicated = {n: p.redistribute(p.device_mesh, [Replicate()]) for n, p in params.items()}
    errors["placements"] = _error(lambda: fe.update(in_place, replicated, 0.9, buffers))
    errors["apply"] = _error(
        lambda: fe.apply(model, fe.average(in_place), in_place["buffers"], EVAL_X)
    )
    errors["shadow"] = _error(lambda: ema.shadow)

    # Evaluation: the averages swapped into the shards, restored bit for bit, resharded.
    result["before"] = _local(fe.module_state(model))
    with Collectives() as counter, ema.swap():
        pass
    result["swap_collectives"] = counter.total
    model.eval()
    ema.eval()
    with torch.no_grad():
        result["out_ema"] = ema(EVAL_X)
        with fe.swapped(model, fe.average(in_place), in_place["buffers"]):
            result["out_swapped"] = model(EVAL_X)
        result["out_live"] = model(EVAL_X)  # gathers the live weights; the root keeps them
        result["out_ema_again"] = ema(EVAL_X)  # the swap reshards first: the averages again
    result["restored"] = _local(fe.module_state(model))  # raises if anything stayed gathered

    # After a no-grad forward the root holds gathered parameters: the update refuses them
    # and names the fix, model.reshard(), after which it runs (with no collective).
    with torch.no_grad():
        model(EVAL_X)
    ema.train()
    model.train()
    errors["unsharded_update"] = _error(ema.update)
    errors["unsharded_state"] = _error(lambda: fe.module_state(model))
    gathered = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    errors["unsharded_pair"] = _error(lambda: fe.update(in_place, gathered, 0.9, buffers))
    model.reshard()
    with Collectives() as counter:
        params, buffers = fe.module_state(model)
        after = fe.update(in_place, params, 0.9, buffers)
    result["after_reshard"] = {"state": _local(after), "collectives": counter.total}

    # Checkpoint: DCP (sharded, with the step), and a full export on rank 0.
    dcp.save(
        {"ema": ema.state_dict(), "state": in_place, "debiased": debiased},
        checkpoint_id=str(out / "dcp"),
    )
    state = ema.state()
    full = fe.full_state_dict(model, state["params"], state["buffers"])
    if rank == 0:
        torch.save(full, out / "full.pt")
    result["full_elsewhere"] = full if rank != 0 else None
    return result


def _load(rank: int, world: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    model = make_model()
    _shard(model, world)
    ema = fe.EMA(model, 0.9, use_num_updates=True)
    params, buffers = fe.module_state(model)
    target = {
        "ema": ema.state_dict(),
        "state": fe.init(params, buffers),
        "debiased": fe.init(params, zero_debias=True),
    }
    dcp.load(target, checkpoint_id=str(out / "dcp"))
    ema.load_state_dict(target["ema"])
    result = {
        "loaded": _local(
            {"ema": ema.state(), "state": target["state"], "debiased": target["debiased"]}
        )
    }
    with Collectives() as counter:
        ema.update()  # from the restored step: the warmup continues where it stopped
    result["next"] = {"ema": _local(ema.state()), "collectives": counter.total}
    if world == 1:  # into plain (unsharded) tensors too
        plain = {"state": fe.init(*fe.module_state(make_model()))}
        dcp.load(plain, checkpoint_id=str(out / "dcp"))
        result["plain"] = plain["state"]
    return result


def _worker(job: str, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if job == "train":
            result = {"ddp": _ddp(rank, out), "fsdp": _fsdp(rank, out)}
        else:
            result = _load(rank, world, out)
        torch.save(result, out / f"{job}{world}_rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


# --- the launcher ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, jobs: list[tuple[str, int]]) -> float:
    """Run ``jobs`` (name, world size) at once; fail with the ranks' logs on error or timeout."""
    start = time.monotonic()
    procs = []
    for job, world in jobs:
        port = _free_port()
        for rank in range(world):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(rank),
                "OMP_NUM_THREADS": "1",
            }
            log = out / f"{job}{world}_rank{rank}.log"
            with log.open("w") as handle:
                proc = subprocess.Popen(
                    [sys.executable, __file__, job, str(out)],
                    env=env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).parent,
                )
            procs.append((proc, log))
    failed = []
    try:
        for proc, log in procs:
            left = TIMEOUT_S - (time.monotonic() - start)
            try:
                code = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                failed.append(f"{log.name}: timed out after {TIMEOUT_S} s")
                break
            if code != 0:
                failed.append(f"{log.name}: exit code {code}")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs)
        pytest.fail(f"distributed job failed: {failed}\n{logs}")
    return time.monotonic() - start


# --- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 2-rank training job once; its output folder."""
    out = tmp_path_factory.mktemp("distributed")
    _launch(out, [("train", WORLD)])
    return out


@pytest.fixture(scope="module")
def reloaded(out: Path) -> Path:
    """Reload its DCP checkpoint in fresh jobs: 2 ranks, and 1 rank (resharded)."""
    _launch(out, [("load", WORLD), ("load", 1)])
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The same training and EMAs in this process, on the unsharded model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        run = train(model, contextlib.nullcontext)
        ema = run.pop("ema")
        run["ema_state"] = ema.state()
        model.eval()
        ema.eval()
        with torch.no_grad():
            run["out_ema"] = ema(EVAL_X)
            run["out_live"] = model(EVAL_X)
            run["out_swapped"] = fe.apply(
                model, fe.average(run["in_place"]), run["in_place"]["buffers"], EVAL_X
            )
        params, buffers = fe.module_state(model)
        run["after_reshard"] = fe.update(run["in_place"], params, 0.9, buffers)
        # One more update of a fresh model's EMA restored from the checkpointed state.
        fresh = make_model()
        restored = fe.EMA(fresh, 0.9, use_num_updates=True)
        restored.load_state_dict(ema.state_dict())
        restored.update()
        run["next"] = restored.state()
        run["model"] = model
    finally:
        torch.set_num_threads(threads)
    return run


def _shard_of(full: Tensor, rank: int, world: int) -> Tensor:
    chunks = torch.chunk(full, world, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def _is_shard(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"local", "placements"}


def assert_shards_equal(saved: Any, full: Any, rank: int, world: int) -> None:
    """Each saved local shard is the rank's dim-0 chunk of the full tensor, bit for bit."""
    saved_leaves, saved_spec = optree.tree_flatten(saved, is_leaf=_is_shard)
    full_leaves, full_spec = optree.tree_flatten(full)
    assert saved_spec == full_spec, (saved_spec, full_spec)
    for got, expected in zip(saved_leaves, full_leaves, strict=True):
        if _is_shard(got):
            assert got["placements"] == "(Shard(dim=0),)", got["placements"]
            assert_bits_equal(got["local"], _shard_of(expected, rank, world))
        else:
            assert_bits_equal(got, expected)


def _rank(out: Path, name: str, rank: int) -> dict[str, Any]:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def test_ddp_wrapper_is_rejected_and_averages_are_identical_on_every_rank(out: Path) -> None:
    ranks = [_rank(out, f"train{WORLD}", r)["ddp"] for r in range(WORLD)]
    for errors in (r["errors"] for r in ranks):
        for message in errors.values():
            assert message.startswith("ValueError") and "Pass `model.module` instead" in message
    # The averages of the parameters are the same on every rank. Buffers are each rank's own
    # (BatchNorm's running statistics saw the rank's last batch), as in the live models.
    params = [f"averages.{n}" for n, p in make_model().named_parameters() if p.requires_grad]
    averages = [{n: r["state_dict"][n] for n in ["step", *params]} for r in ranks]
    assert_bits_equal(averages[1], averages[0])
    saved = torch.load(out / "ddp_ema.pt", weights_only=True)  # written by rank 0 only
    assert_bits_equal(saved, ranks[0]["state_dict"])
    assert int(saved["step"]) == STEPS


def test_fsdp2_sharded_ema_equals_the_shard_of_one_process(
    out: Path, reference: dict[str, Any]
) -> None:
    expected = {
        "ema": reference["ema_state"],
        "in_place": reference["in_place"],
        "pure": reference["pure"],
        "debiased": reference["debiased"],
    }
    for rank in range(WORLD):
        fsdp = _rank(out, f"train{WORLD}", rank)["fsdp"]
        assert fsdp["same_placements"]
        assert_shards_equal(fsdp["states"], expected, rank, WORLD)


def test_fsdp2_update_runs_no_collective(out: Path) -> None:
    for rank in range(WORLD):
        fsdp = _rank(out, f"train{WORLD}", rank)["fsdp"]
        assert fsdp["control"] >= 2  # the counter sees a gather and an all-reduce
        assert fsdp["counts"] == [0] * STEPS
        assert fsdp["after_reshard"]["collectives"] == 0
        assert fsdp["nonfinite_updates"]["collectives"] == 0
        assert fsdp["swap_collectives"] == 0


def test_fsdp2_nonfinite_values_are_skipped_and_counted_per_rank(out: Path) -> None:
    seen = [_rank(out, f"train{WORLD}", r)["fsdp"]["nonfinite_updates"] for r in range(WORLD)]
    assert [s["count"] for s in seen] == [1, 0]  # only rank 0's shard held the NaN
    assert seen[0]["kept"]  # and its average was left unchanged there


def test_fsdp2_eval_swaps_averages_in_place(out: Path, reference: dict[str, Any]) -> None:
    for rank in range(WORLD):
        fsdp = _rank(out, f"train{WORLD}", rank)["fsdp"]
        assert_bits_equal(fsdp["out_ema"], reference["out_ema"])
        assert_bits_equal(fsdp["out_ema_again"], reference["out_ema"])
        assert_bits_equal(fsdp["out_swapped"], reference["out_swapped"])
        assert_bits_equal(fsdp["out_live"], reference["out_live"])
        assert_bits_equal(fsdp["restored"], fsdp["before"])  # the live shards, bit for bit
        assert not torch.equal(reference["out_ema"], reference["out_live"])


def test_fsdp2_wrong_paths_raise_with_the_fix(out: Path, reference: dict[str, Any]) -> None:
    fsdp = _rank(out, f"train{WORLD}", 0)["fsdp"]
    errors = fsdp["errors"]
    assert errors["apply"].startswith("ValueError: apply: FSDP2 module at '<root>'")
    assert "silently evaluate the live weights" in errors["apply"]
    assert "fe.swapped(model, params, buffers)" in errors["apply"]
    assert errors["placements"].startswith("ValueError: update: placement mismatch at '0.bias'")
    assert errors["shadow"].startswith("ValueError: EMA.shadow: FSDP2 module")
    for key in ("unsharded_update", "unsharded_state"):
        assert "unsharded FSDP2 parameters at '<root>'" in errors[key]
        assert "Call model.reshard() first" in errors[key]
    assert errors["unsharded_pair"].startswith("ValueError: update: sharding mismatch at '1.bias'")
    assert "call model.reshard() first" in errors["unsharded_pair"]
    # The documented path, model.reshard() then update, gives the one-process update.
    assert_shards_equal(fsdp["after_reshard"]["state"], reference["after_reshard"], 0, WORLD)


def test_full_export_on_rank_0_loads_into_a_plain_model(
    out: Path, reference: dict[str, Any]
) -> None:
    full = torch.load(out / "full.pt", weights_only=True)
    plain = make_model()
    plain.load_state_dict(full, strict=True)
    expected = {**reference["ema_state"]["params"], **reference["ema_state"]["buffers"]}
    assert_bits_equal({k: full[k] for k in expected}, expected)
    assert _rank(out, f"train{WORLD}", 1)["fsdp"]["full_elsewhere"] == {}


@pytest.mark.parametrize("world", [WORLD, 1])
def test_dcp_checkpoint_reloads_in_a_fresh_job(
    reloaded: Path, reference: dict[str, Any], world: int
) -> None:
    expected = {
        "ema": reference["ema_state"],
        "state": reference["in_place"],
        "debiased": reference["debiased"],
    }
    for rank in range(world):
        loaded = _rank(reloaded, f"load{world}", rank)
        assert_shards_equal(loaded["loaded"], expected, rank, world)
        assert int(loaded["loaded"]["ema"]["step"]) == STEPS
        assert loaded["next"]["collectives"] == 0
        assert_shards_equal(loaded["next"]["ema"], reference["next"], rank, world)
    if world == 1:
        assert_bits_equal(_rank(reloaded, "load1", 0)["plain"], reference["in_place"])


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
