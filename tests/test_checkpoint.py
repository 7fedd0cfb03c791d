"""Checkpoints: atomic save, verified weights-only load, checks against the model, swap guard."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bits_equal, snapshot
from torch import nn

import functional_ema as fe
from functional_ema import _io


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def step_model(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        model[1].running_mean.add_(0.5)
        model[1].num_batches_tracked.add_(1)


def temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


# --- save: atomic and durable ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_save_load_roundtrip_bit_identical(tmp_path: Path, dtype: torch.dtype) -> None:
    params = {"w": torch.randn(5, 3).to(dtype), "n": torch.tensor(7)}
    state = fe.update(
        fe.init(params), {"w": torch.randn(5, 3).to(dtype), "n": torch.tensor(8)}, 0.9
    )
    path = tmp_path / "ema.pt"
    fe.save(state, path)
    assert_bits_equal(fe.load(path), state)
    assert_bits_equal(torch.load(path, weights_only=True), state)  # a plain torch checkpoint
    assert temp_files(tmp_path) == []


def test_save_accepts_model_optimizer_and_ema_state_dicts(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ema = fe.EMA(model, 0.9)
    ckpt = {"model": model.state_dict(), "opt": optimizer.state_dict(), "ema": ema.state_dict()}
    fe.save(ckpt, str(tmp_path / "all.pt"))  # str and Path both work
    loaded = fe.load(tmp_path / "all.pt")
    assert_bits_equal(dict(loaded["ema"]), dict(ema.state_dict()))
    assert_bits_equal(dict(loaded["model"]), dict(model.state_dict()))
    assert loaded["opt"]["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_save_replaces_atomically_fsyncs_file_then_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ema.pt"
    fe.save({"v": torch.tensor(1)}, path)
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        # The old checkpoint is intact until the rename; the new one is complete and synced.
        assert int(torch.load(path, weights_only=True)["v"]) == 1
        assert int(torch.load(src, weights_only=True)["v"]) == 2
        assert os.path.dirname(src) == os.path.dirname(dst)
        events.append(("replace", os.path.basename(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fe.save({"v": torch.tensor(2)}, path)
    kinds = [e if e[0] == "fsync" else ("replace",) for e in events]
    if sys.platform.startswith("linux"):
        assert kinds == [("fsync", "file"), ("replace",), ("fsync", "dir")]
    temp_name = events[[e[0] for e in events].index("replace")][1]
    assert temp_name.startswith(".ema.pt.") and temp_name.endswith(".tmp")
    assert int(fe.load(path)["v"]) == 2
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["torch.save", "fsync", "replace"])
def test_failed_save_leaves_previous_checkpoint_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "ema.pt"
    old = {"w": torch.randn(100)}
    fe.save(old, path)
    before = path.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        if fail_at == "torch.save":  # a partial write, then the failure (e.g. a full disk)
            args[1].write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    if fail_at == "torch.save":
        monkeypatch.setattr(_io.torch, "save", boom)
    else:
        monkeypatch.setattr(os, "fsync" if fail_at == "fsync" else "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        fe.save({"w": torch.zeros(100)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert_bits_equal(fe.load(path), old)
    assert temp_files(tmp_path) == []


def test_save_respects_umask(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    mask = os.umask(0o027)
    try:
        fe.save({"v": torch.tensor(1)}, tmp_path / "a.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o640


def test_save_into_missing_directory_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fe.save({"v": torch.tensor(1)}, tmp_path / "missing" / "a.pt")
    assert os.listdir(tmp_path) == []


Point = namedtuple("Point", "x y")


class Config:
    lr = 0.1


@pytest.mark.parametrize(
    ("obj", "where", "got"),
    [
        ({"a": Point(torch.ones(1), 2)}, "a", "Point"),
        ({"a": [1, Config()]}, "a.1", "Config"),
        ({"model": nn.Linear(2, 2)}, "model", "Linear"),
    ],
    ids=["namedtuple", "object-in-list", "module"],
)
def test_save_rejects_what_weights_only_load_cannot_read(
    tmp_path: Path, obj: Any, where: str, got: str
) -> None:
    path = tmp_path / "ema.pt"
    fe.save({"v": torch.tensor(1)}, path)
    before = path.read_bytes()
    pattern = rf"^save: value that torch.load\(weights_only=True\) cannot read at '{where}': "
    with pytest.raises(TypeError, match=rf"{pattern}.*got .*{got}\. Convert it"):
        fe.save(obj, path)
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_save_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("stale temporary files are only removed on POSIX")
    path = tmp_path / "ema.pt"
    host = _io._host_tag()
    dead = tmp_path / f".ema.pt.{host}-{_dead_pid()}-0123abcd.tmp"
    alive = tmp_path / f".ema.pt.{host}-{os.getppid()}-0123abcd.tmp"  # a running process
    mine = tmp_path / f".ema.pt.{host}-{os.getpid()}-0123abcd.tmp"  # e.g. another thread's
    other_host = tmp_path / f".ema.pt.otherhost-{_dead_pid()}-0123abcd.tmp"
    other_target = tmp_path / f".other.pt.{host}-{_dead_pid()}-0123abcd.tmp"
    for leftover in (dead, alive, mine, other_host, other_target):
        leftover.write_bytes(b"PK\x03\x04 partial")
    fe.save({"v": torch.tensor(1)}, path)
    assert not dead.exists()
    assert alive.exists() and mine.exists() and other_host.exists() and other_target.exists()


# --- load: weights only, verified ------------------------------------------------------


def test_load_uses_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fe.save({"v": torch.tensor(1)}, tmp_path / "a.pt")
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_io.torch, "load", spy)
    fe.load(tmp_path / "a.pt", map_location="cpu")
    fe.load(tmp_path / "a.pt", verify=False)
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)


class _Payload:
    def __reduce__(self) -> Any:
        return (os.mkdir, (str(_Payload.marker),))

    marker = Path()


def test_load_never_runs_code_from_the_file(tmp_path: Path) -> None:
    _Payload.marker = tmp_path / "pwned"
    torch.save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(
        ValueError,
        match=r"^load: checkpoint holding objects that torch.load\(weights_only=True\) refuses "
        r"at '.*evil.pt': ",
    ):
        fe.load(tmp_path / "evil.pt")
    assert not _Payload.marker.exists()


def test_load_reports_refused_classes_with_the_fix(tmp_path: Path) -> None:
    torch.save({"p": Point(1, 2)}, tmp_path / "nt.pt")
    with pytest.raises(
        ValueError,
        match=r"refuses at '.*nt.pt': expected tensors, .*got Unsupported global: GLOBAL "
        r".*Point\. .*add_safe_globals",
    ):
        fe.load(tmp_path / "nt.pt")


def _saved(tmp_path: Path) -> tuple[Path, bytes, dict[str, torch.Tensor]]:
    obj = {"w": torch.randn(2000), "n": torch.arange(10)}
    path = tmp_path / "ema.pt"
    fe.save(obj, path)
    return path, path.read_bytes(), obj


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_a_clear_error(tmp_path: Path, keep: float) -> None:
    path, data, _ = _saved(tmp_path)
    path.write_bytes(data[: int(len(data) * keep)])
    before = path.read_bytes()
    with pytest.raises(
        ValueError,
        match=rf"^load: unreadable checkpoint at {str(path)!r}: expected a file written by "
        r"torch.save .*got (an empty file|a zip archive without its central directory).* "
        r"truncated",
    ):
        fe.load(path)
    assert path.read_bytes() == before


def test_corrupted_tensor_data_is_detected_by_crc(tmp_path: Path) -> None:
    path, data, obj = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    damaged = bytearray(data)
    damaged[offset] ^= 0x40
    path.write_bytes(bytes(damaged))
    loaded = fe.load(path, verify=False)  # torch.load alone does not notice...
    assert not torch.equal(loaded["w"], obj["w"])
    with pytest.raises(  # ... the CRC32 check does
        ValueError,
        match=r"^load: unreadable .*got a failed CRC32 checksum in the record '.*data/0'",
    ):
        fe.load(path)


@pytest.mark.parametrize(
    ("content", "got"),
    [
        (b"", "an empty file"),
        (
            b"hello, world\n",
            r"a file that is not a torch checkpoint \(it starts with b'hello, w'\)",
        ),
        (pickle.dumps({"a": 1}, protocol=2), r"\w+ from torch.load"),
        (b"PK\x03\x04" + b"\x00" * 200, "a zip archive without its central directory"),
    ],
    ids=["empty", "text", "plain-pickle", "zip-header-only"],
)
def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes, got: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^load: unreadable checkpoint at '.*x.pt': .*got {got}"):
        fe.load(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"^load: no checkpoint at '.*nope.pt'.*got nothing"
    ):
        fe.load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"got a directory"):
        fe.load(tmp_path)


def test_legacy_format_and_map_location(tmp_path: Path) -> None:
    obj = {"w": torch.randn(3)}
    torch.save(obj, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_bits_equal(fe.load(tmp_path / "old.pt"), obj)
    loaded = fe.load(tmp_path / "old.pt", map_location="meta")
    assert loaded["w"].device.type == "meta"


# --- a loaded functional state against the current model -------------------------------


def _state(model: nn.Module, **options: Any) -> fe.EmaState:
    return fe.init(*fe.module_state(model), **options)


def test_check_state_resume_continues_bit_identically(tmp_path: Path) -> None:
    model = make_model()
    state = _state(model)
    for seed in range(3):
        step_model(model, seed)
        state = fe.update(state, *fe.module_state(model)[:1], 0.9, fe.module_state(model)[1])
    fe.save(state, tmp_path / "ema.pt")
    resumed = fe.check_state(fe.load(tmp_path / "ema.pt"), like=_state(model))
    for seed in range(3, 6):
        step_model(model, seed)
        params, buffers = fe.module_state(model)
        state = fe.update_(state, params, 0.9, buffers)
        resumed = fe.update_(resumed, params, 0.9, buffers)
    assert_bits_equal(resumed, state)


def test_check_state_returns_the_loaded_tensors() -> None:
    model = make_model()
    loaded = _state(model)
    out = fe.check_state(loaded, like=_state(model))
    assert out["params"]["0.weight"] is loaded["params"]["0.weight"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_check_state_strips_wrapper_prefixes(prefix: str) -> None:
    model = make_model()
    step_model(model, 0)
    saved = _state(model)
    prefixed = {
        key: ({prefix + name: t for name, t in value.items()} if key != "step" else value)
        for key, value in saved.items()
        if key in ("step", "params", "buffers")
    }
    prefixed = {**saved, **prefixed}
    out = fe.check_state(prefixed, like=_state(make_model()))
    assert_bits_equal(out, saved)


def test_check_state_keeps_real_module_names() -> None:
    class Holder(nn.Module):  # a submodule really called 'module': not a wrapper prefix
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    saved = _state(Holder())
    assert list(fe.check_state(saved, like=_state(Holder()))["params"]) == [
        "module.weight",
        "module.bias",
    ]


def test_check_state_lists_every_difference_of_another_model() -> None:
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2), nn.Linear(2, 2))
    loaded, like = _state(other), _state(make_model())
    before, like_before = snapshot(loaded), snapshot(like)
    with pytest.raises(ValueError, match=r"^check_state: ") as info:
        fe.check_state(loaded, like=like)
    message = str(info.value)
    assert message.startswith(
        "check_state: state does not match the model at '<root>': expected the names, shapes, "
        "dtypes and devices of `like`, got at 'params': "
    )
    assert "unexpected keys ['3.bias', '3.weight']" in message
    assert "mismatch at '0.weight': expected (4, 3) torch.float32, got (5, 3)" in message
    assert "mismatch at '2.weight': expected (2, 4) torch.float32, got (2, 5)" in message
    assert "at 'buffers': mismatch at '1.running_mean': expected (4,)" in message
    assert message.endswith("map_location=...)).")
    assert_bits_equal(loaded, before)
    assert_bits_equal(like, like_before)


def test_check_state_dtype_change() -> None:
    model = make_model()
    loaded = _state(model, dtype=torch.float64)
    with pytest.raises(  # only dtypes differ: a TypeError
        TypeError, match=r"mismatch at '0.bias': expected \(4,\) torch.float32, got \(4,\) "
    ):
        fe.check_state(loaded, like=_state(model))


def test_check_state_device_change_names_map_location() -> None:
    model = make_model()
    loaded = optree_to(_state(model), "meta")
    with pytest.raises(
        ValueError,
        match=r"expected \(4, 3\) torch.float32 on cpu, got \(4, 3\) torch.float32 on meta",
    ):
        fe.check_state(loaded, like=_state(model))


def optree_to(state: Any, device: str) -> Any:
    import optree

    return optree.tree_map(lambda t: t.to(device), state)


def test_check_state_entries_and_zero_debias() -> None:
    model = make_model()
    params, buffers = fe.module_state(model)
    with pytest.raises(ValueError, match=r"^check_state: entries at '<root>': expected .*buffers"):
        fe.check_state(fe.init(params), like=fe.init(params, buffers))
    with pytest.raises(ValueError, match=r"entries at '<root>': .*'biased'.*zero_debias"):
        fe.check_state(fe.init(params, zero_debias=True), like=fe.init(params))
    debiased = fe.init(params, zero_debias=True)
    assert_bits_equal(fe.check_state(debiased, like=fe.init(params, zero_debias=True)), debiased)


# --- the adapter's state dict ----------------------------------------------------------


def test_adapter_resume_from_file_continues_bit_identically(tmp_path: Path) -> None:
    model = make_model()
    ema = fe.EMA(model, 0.9, use_num_updates=True)
    for seed in range(3):
        step_model(model, seed)
        ema.update()
    fe.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = fe.EMA(model, 0.9, use_num_updates=True)
    resumed.load_state_dict(fe.load(tmp_path / "ema.pt"))
    for seed in range(3, 6):
        step_model(model, seed)
        ema.update()
        resumed.update()
    assert_bits_equal(resumed.state(), ema.state())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
@pytest.mark.parametrize("where", ["outer", "inner"])
def test_adapter_load_maps_wrapper_prefixes(prefix: str, where: str) -> None:
    model = make_model()
    step_model(model, 0)
    ema = fe.EMA(model, 0.9)
    saved = ema.state_dict()
    if where == "outer":  # the EMA itself was wrapped (DDP(ema), torch.compile(ema))
        renamed = {prefix + key: value for key, value in saved.items()}
    else:  # names of a wrapped model inside the averages
        renamed = {key.replace("averages.", "averages." + prefix): v for key, v in saved.items()}
    fresh = fe.EMA(make_model(), 0.9)
    fresh.load_state_dict(renamed)
    assert_bits_equal(dict(fresh.state_dict()), dict(saved))


def test_adapter_load_lists_every_difference_of_another_model() -> None:
    ema = fe.EMA(make_model(), 0.9)
    other = fe.EMA(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), 0.9)
    before = snapshot(dict(ema.state_dict()))
    with pytest.raises(ValueError, match=r"^EMA.load_state_dict: ") as info:
        ema.load_state_dict(other.state_dict())
    message = str(info.value)
    assert message.startswith(
        "EMA.load_state_dict: state dict does not match the EMA at '<root>': expected the keys, "
        "shapes and dtypes of the EMA's own state_dict(), got mismatch at 'averages.0.bias': "
        "expected (4,)"
    )
    for key in ("0.weight", "1.weight", "1.running_var", "2.weight", "2.bias"):
        assert f"mismatch at 'averages.{key}'" in message
    assert_bits_equal(dict(ema.state_dict()), before)


def test_adapter_load_dtype_change_and_model_state_dict_hint() -> None:
    model = make_model().to(torch.bfloat16)
    ema = fe.EMA(model, 0.9, dtype=torch.float32)
    narrow = fe.EMA(model, 0.9)
    before = snapshot(dict(ema.state_dict()))
    with pytest.raises(  # only dtypes differ: a TypeError
        TypeError,
        match=r"mismatch at 'averages.0.bias': expected \(4,\) torch.float32, got \(4,\) "
        r"torch.bfloat16.*same `dtype`",
    ):
        ema.load_state_dict(narrow.state_dict())
    with pytest.raises(ValueError, match=r"got missing keys .*look like a model's state_dict"):
        ema.load_state_dict(model.state_dict())
    assert_bits_equal(dict(ema.state_dict()), before)


def test_adapter_load_non_strict_skips_missing_but_checks_shapes() -> None:
    model = make_model()
    step_model(model, 0)
    ema, fresh = fe.EMA(model, 0.9), fe.EMA(make_model(), 0.9)
    partial = {k: v for k, v in ema.state_dict().items() if k.startswith("averages.0.")}
    result = fresh.load_state_dict(partial, strict=False)
    assert "averages.2.weight" in result.missing_keys
    assert torch.equal(fresh.state()["params"]["0.weight"], ema.state()["params"]["0.weight"])
    with pytest.raises(ValueError, match=r"mismatch at 'averages.0.bias'"):
        fresh.load_state_dict({"averages.0.bias": torch.zeros(7)}, strict=False)


def test_adapter_load_from_another_device_copies() -> None:
    ema = fe.EMA(make_model(), 0.9)
    tensors = {k: v for k, v in ema.state_dict().items() if k != "_extra_state"}
    meta = {k: v.to("meta") for k, v in tensors.items()}
    before = snapshot(tensors)
    with pytest.raises(
        ValueError, match=r"mismatch at 'averages.0.bias': expected a tensor with data, got a meta"
    ):
        ema.load_state_dict(meta)
    assert_bits_equal({k: v for k, v in ema.state_dict().items() if k != "_extra_state"}, before)
    # (a CUDA checkpoint into a CPU EMA is copied, as nn.Module.load_state_dict does)


# --- swapped-in averages can't be saved as the live weights -----------------------------


def _swapped_setup() -> tuple[nn.Module, fe.EMA]:
    model = make_model()
    ema = fe.EMA(model, 0.5)
    step_model(model, 0)
    ema.update()
    return model, ema


def test_live_state_dict_inside_swap_raises_with_the_fix() -> None:
    model, ema = _swapped_setup()
    live = snapshot(dict(model.state_dict()))
    with ema.swap():
        with pytest.raises(
            RuntimeError,
            match=r"^EMA.swap: model.state_dict\(\) inside `with ema.swap\(\):` at '<root>': "
            r"expected the live weights, got the averages .*classic resume bug.*ema.state_dict\(\)"
            r".*ema.shadow.state_dict\(\)",
        ):
            model.state_dict()
        with pytest.raises(RuntimeError, match=r"model.state_dict\(\) inside"):
            nn.ModuleDict({"net": model}).state_dict()  # a parent module's save
        with pytest.raises(RuntimeError, match=r"pickling the model inside"):
            torch.save(model, io.BytesIO())
        averages = dict(ema.state_dict())  # the EMA's own state is always fine
        exported = ema.shadow.state_dict()  # the explicit way to take the averages
    assert_bits_equal(dict(model.state_dict()), live)
    assert_bits_equal(
        {k[len("averages.") :]: v for k, v in averages.items() if "." in k},
        {
            **ema.state()["params"],
            **ema.state()["buffers"],
        },
    )
    assert_bits_equal(dict(exported), {**ema.state()["params"], **ema.state()["buffers"]})
    assert not model._state_dict_pre_hooks and not model._load_state_dict_pre_hooks


def test_live_load_state_dict_inside_swap_raises_and_writes_nothing() -> None:
    model, ema = _swapped_setup()
    other = make_model().state_dict()
    with ema.swap():
        inside = snapshot(dict(model.named_parameters()))
        with pytest.raises(RuntimeError, match=r"model.load_state_dict\(\) inside.*undo this load"):
            model.load_state_dict(other)
        assert_bits_equal(dict(model.named_parameters()), inside)
    model.load_state_dict(other)  # after the block: allowed


def test_guard_removed_when_the_block_raises() -> None:
    model, ema = _swapped_setup()
    with pytest.raises(KeyError), ema.swap():
        raise KeyError("boom")
    model.state_dict()
    torch.save(model, io.BytesIO())


def test_copies_made_inside_swap_are_not_guarded() -> None:
    model, ema = _swapped_setup()
    with ema.swap():
        shadow, clone = ema.shadow, copy.deepcopy(model)
    assert_bits_equal(dict(shadow.state_dict()), dict(clone.state_dict()))
    torch.save(shadow, io.BytesIO())  # pickles (the inert hook is a module-level function)
    with ema.swap():
        torch.save(clone, io.BytesIO())
        clone.state_dict()


def test_check_state_reads_the_counter_under_its_former_name() -> None:
    model = torch.nn.Linear(2, 1)
    state = fe.init(*fe.module_state(model))
    old = {("nonfinite" if k == "nonfinite_updates" else k): v for k, v in state.items()}
    resumed = fe.check_state(old, like=fe.init(*fe.module_state(model)))
    assert set(resumed) == set(state)
    assert resumed["nonfinite_updates"] is state["nonfinite_updates"]


def test_a_state_with_the_former_counter_name_points_to_check_state() -> None:
    state = fe.init({"w": torch.zeros(2)})
    old = {("nonfinite" if k == "nonfinite_updates" else k): v for k, v in state.items()}
    with pytest.raises(TypeError, match=r"former name 'nonfinite' is read by .*check_state"):
        fe.update(old, {"w": torch.ones(2)}, 0.9)  # type: ignore[arg-type]
