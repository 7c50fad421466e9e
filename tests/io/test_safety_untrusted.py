"""Untrusted and damaged checkpoints: nothing in them runs, and every failure is one clean line.

A malicious pickle (an object whose ``__reduce__`` would create a marker file) must be refused
without ``--trust-checkpoint`` and must not run: the marker file never appears, through the
library and through the CLI. Damaged TorchScript archives and safetensors files raise
:class:`~bnscope.errors.CheckpointError` (exit 2 with one stderr line from the CLI).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import bnscope
from bnscope.errors import BnscopeError, CheckpointError

from ..clirun import one_error_line, run
from ..conftest import tiny_spec, trained_tiny

TRUST = "--trust-checkpoint"  # the CLI's flag
LIB_TRUST = "trust=True"  # the library's parameter, named by its errors


# --------------------------------------------------------------------------------------------
# Payloads: unpickling either of these (unrestricted) creates the marker file


class TouchMarker:
    """``pickle.loads`` of this calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class ShellMarker:
    """``pickle.loads`` of this calls ``os.system("touch marker")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS = {"touch": TouchMarker, "system": ShellMarker}


def _state_dict() -> dict[str, torch.Tensor]:
    return trained_tiny(steps=2).state_dict()


def _write_zip_object(path: Path, evil: object, protocol: int) -> None:
    torch.save(evil, path, pickle_protocol=protocol)


def _write_zip_dict(path: Path, evil: object, protocol: int) -> None:
    """A normal-looking checkpoint (real state dict, epoch) with one poisoned entry."""
    obj = {"state_dict": _state_dict(), "epoch": 3, "extra": evil}
    torch.save(obj, path, pickle_protocol=protocol)


def _write_legacy_dict(path: Path, evil: object, protocol: int) -> None:
    obj = {"state_dict": _state_dict(), "extra": evil}
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=False)


def _write_raw_pickle(path: Path, evil: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _state_dict(), "extra": evil}, protocol))


WRITERS: dict[str, Callable[[Path, object, int], None]] = {
    "zip-object": _write_zip_object,
    "zip-dict": _write_zip_dict,
    "legacy-dict": _write_legacy_dict,
    "raw-pickle": _write_raw_pickle,
}


def make_evil(tmp_path: Path, form: str = "zip-dict", payload: str = "touch", protocol: int = 2):
    """Write a malicious checkpoint; return (path, marker). Asserts the payload really works."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    WRITERS[form](path, PAYLOADS[payload](marker), protocol)
    assert not marker.exists()
    return path, marker


def test_payload_is_live(tmp_path: Path) -> None:
    """Control: unpickling the file unrestricted does create the marker (so its absence in the
    other tests means bnscope refused to run it, not that the payload is broken)."""
    for payload in PAYLOADS:
        path, marker = make_evil(tmp_path, "zip-dict", payload)
        torch.load(path, weights_only=False)
        assert marker.exists(), payload
        marker.unlink()


# --------------------------------------------------------------------------------------------
# Library


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("form", sorted(WRITERS))
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_pickle_refused_without_trust(
    tmp_path: Path, form: str, payload: str, protocol: int
) -> None:
    path, marker = make_evil(tmp_path, form, payload, protocol)
    with pytest.raises(BnscopeError) as info:
        bnscope.load_checkpoint(path)
    assert isinstance(info.value, CheckpointError)
    line = info.value.line()
    assert LIB_TRUST in line, line
    assert "\n" not in line
    assert str(path) in line
    assert not marker.exists()


def test_malicious_pickle_refused_for_every_key(tmp_path: Path) -> None:
    """``--key`` pointing at the clean state dict does not get the file past the check."""
    path, marker = make_evil(tmp_path, "zip-dict")
    with pytest.raises(CheckpointError, match=LIB_TRUST):
        bnscope.load_checkpoint(path, key="state_dict")
    assert not marker.exists()


def test_protocol4_state_dict_needs_trust_and_loads_with_it(tmp_path: Path) -> None:
    """A harmless state dict pickled with protocol 4 cannot be read by torch's safe loader
    (it lacks protocol 4's opcodes): refused with the trust hint, loaded with trust."""
    sd = _state_dict()
    path = tmp_path / "p4.pt"
    torch.save(sd, path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match=LIB_TRUST) as info:
        bnscope.load_checkpoint(path)
    assert "damaged" not in info.value.line()
    ckpt = bnscope.load_checkpoint(path, trust=True)
    assert ckpt.format == "torch" and list(ckpt.state_dict) == list(sd)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())


def test_protocol4_whole_module_loads_with_trust(tmp_path: Path) -> None:
    model = trained_tiny(steps=2)
    path = tmp_path / "m4.pt"
    torch.save(model, path, pickle_protocol=4, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=LIB_TRUST):
        bnscope.load_checkpoint(path)
    ckpt = bnscope.load_checkpoint(path, trust=True)
    assert ckpt.format == "module" and ckpt.trusted_module


def test_garbage_is_not_mistaken_for_a_pickle_needing_trust(tmp_path: Path) -> None:
    """Bytes the safe loader rejects with 'Unsupported operand' are only called pickles needing
    trust when they parse as pickle opcodes: a truncated protocol-4 pickle is 'damaged'."""
    path = tmp_path / "t.pt"
    path.write_bytes(pickle.dumps({"a": torch.ones(3)}, protocol=4)[:-7])
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(path)
    assert LIB_TRUST not in info.value.line()
    path.write_bytes(b"@" * 64)  # 0x40: "Unsupported operand 64", not a pickle opcode
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(path)
    assert LIB_TRUST not in info.value.line()


def test_fake_torchscript_archive_does_not_run_pickles(tmp_path: Path) -> None:
    """A torch.save zip with a poisoned data.pkl, dressed up as TorchScript (a constants.pkl and
    a code/ entry) so bnscope hands it to torch.jit.load: its C++ unpickler resolves no Python
    globals, so the payload still cannot run."""
    path, marker = make_evil(tmp_path, "zip-dict")
    fake = tmp_path / "fake_ts.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(fake, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(f"{root}/constants.pkl", pickle.dumps((), protocol=2))
        dst.writestr(f"{root}/code/__torch__/x.py", "")
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(fake)
    assert "\n" not in info.value.line()
    assert "CRC" not in info.value.line()  # it did reach torch.jit.load
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_inspect_refuses_malicious(tmp_path: Path) -> None:
    path, marker = make_evil(tmp_path, "zip-dict", "system")
    res = run("inspect", path)
    one_error_line(res, TRUST)
    assert not marker.exists()
    res = run("inspect", path, "--json")
    one_error_line(res, TRUST)
    assert not marker.exists()


def test_cli_inspect_refuses_malicious_protocol4(tmp_path: Path) -> None:
    path, marker = make_evil(tmp_path, "legacy-dict", "touch", protocol=4)
    one_error_line(run("inspect", path), TRUST)
    assert not marker.exists()


@pytest.mark.parametrize("form", ["zip-dict", "legacy-dict"])
def test_cli_precise_refuses_malicious(tmp_path: Path, form: str) -> None:
    path, marker = make_evil(tmp_path, form, "touch")
    data = tmp_path / "d.pt"
    torch.save(torch.randn(20, 3, 8, 8), data)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run("precise", path, "--model", tiny_spec(), "--data", data, "--batch-size", "10")
    one_error_line(res, TRUST)
    assert not marker.exists()
    assert not (tmp_path / "evil.precise.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------
# Damaged TorchScript archives


def _scripted(tmp_path: Path) -> Path:
    model = trained_tiny(steps=2).eval()
    path = tmp_path / "full.ts.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    ckpt = bnscope.load_checkpoint(path)  # control: the intact archive loads
    assert ckpt.format == "torchscript"
    return path


def _member_span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Byte range of a zip member's (possibly compressed) data inside the archive."""
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def _flip(data: bytes, at: int, count: int = 8) -> bytes:
    out = bytearray(data)
    for i in range(at, min(at + count, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def _torchscript_damage(full: Path) -> dict[str, bytes]:
    data = full.read_bytes()
    with zipfile.ZipFile(full) as zf:
        infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
    out = {
        "half": data[: len(data) // 2],
        "no-central-directory": data[: data.rfind(b"PK\x01\x02")],
        "last-byte-missing": data[:-1],
    }
    # Bytes flipped in the middle of the members torch.jit.load must read and parse.
    for member in ("data.pkl", "constants.pkl"):
        start, end = _member_span(data, infos[member])
        out[f"flip-{member}"] = _flip(data, (start + end) // 2, 4)
    code = _batchnorm_code(infos)
    start, end = _member_span(data, infos[code])
    out["flip-code"] = _flip(data, (start + end) // 2)
    cd = data.rfind(b"PK\x01\x02")
    out["flip-central-directory"] = _flip(data, cd + 20, 12)
    return out


DAMAGE_KINDS = [
    "half",
    "no-central-directory",
    "last-byte-missing",
    "flip-data.pkl",
    "flip-constants.pkl",
    "flip-code",
    "flip-central-directory",
]


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_torchscript(tmp_path: Path, kind: str) -> None:
    damaged = _torchscript_damage(_scripted(tmp_path))[kind]
    path = tmp_path / "ts.pt"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(path)
    line = info.value.line()
    assert "\n" not in line and str(path) in line
    assert info.value.fix


@pytest.mark.parametrize("kind", ["half", "flip-code", "flip-data.pkl"])
def test_cli_damaged_torchscript(tmp_path: Path, kind: str) -> None:
    damaged = _torchscript_damage(_scripted(tmp_path))[kind]
    path = tmp_path / "ts.pt"
    path.write_bytes(damaged)
    one_error_line(run("inspect", path), str(path))


def _batchnorm_code(names) -> str:
    """The archive's BatchNorm code file: ``.../batchnorm.py``, or ``.../batchnorm/
    ___torch_mangle_N.py`` when this process scripted a BatchNorm class before."""
    return next(
        n for n in names if n.startswith("code/") and "/batchnorm" in n and n.endswith(".py")
    )


def _rewritten(full: Path, out: Path, member: str, content: bytes) -> None:
    """Copy a zip archive with one member's content replaced (CRC-32s valid)."""
    with zipfile.ZipFile(full) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            inner = info.filename.split("/", 1)[1]
            dst.writestr(info, content if inner == member else src.read(info))


@pytest.mark.parametrize(
    ("member", "content"),
    [
        ("data.pkl", b"\x80\x02}q\x00(X\x01\x00\x00\x00a"),  # a pickle cut short
        ("constants.pkl", b"not a pickle"),
        ("version", b"999999"),
        ("batchnorm code", b"def broken(:\n"),
    ],
)
def test_torchscript_with_valid_crcs_but_bad_content(
    tmp_path: Path, member: str, content: bytes
) -> None:
    """Past the CRC check: torch.jit.load's own errors become CheckpointError as well."""
    full = _scripted(tmp_path)
    path = tmp_path / "ts.pt"
    if member == "batchnorm code":
        with zipfile.ZipFile(full) as zf:
            member = _batchnorm_code([i.filename.split("/", 1)[1] for i in zf.infolist()])
    _rewritten(full, path, member, content)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(path)
    assert "\n" not in info.value.line() and str(path) in info.value.line()


def _aborting_torchscript(path: Path) -> None:
    """A TorchScript archive whose code and debug info are both damaged (one byte each, as
    found by fuzzing): torch 2.13's torch.jit.load aborts the whole process on it
    (``terminate called after throwing an instance of 'c10::Error'``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.jit.save(torch.jit.script(model), str(path))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
    code = "code/__torch__/torch/nn/functional.py"
    data[_member_span(bytes(data), infos[code])[0] + 112] ^= 0x0F
    data[_member_span(bytes(data), infos[code + ".debug_pkl"])[0] + 370] ^= 0xE5
    path.write_bytes(bytes(data))


def test_torchscript_that_aborts_torch_is_refused(tmp_path: Path) -> None:
    """Run in a child process: were the archive handed to torch.jit.load, the process would
    die from SIGABRT instead of printing one error line and exiting 2."""
    path = tmp_path / "abort.pt"
    _aborting_torchscript(path)
    res = subprocess.run(
        [sys.executable, "-m", "bnscope", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnscope: error: "), res.stderr
    assert "CRC" in lines[0] and res.stdout == ""


def _flipped_tensor(tmp_path: Path, form: str) -> Path:
    model = trained_tiny(steps=2).eval()
    full = tmp_path / "full.pt"
    if form == "torchscript":
        torch.jit.save(torch.jit.script(model), str(full))
    else:
        torch.save(model.state_dict(), full)
    data = full.read_bytes()
    with zipfile.ZipFile(full) as zf:
        weight = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    start, end = _member_span(data, weight)
    path = tmp_path / "bad.pt"
    path.write_bytes(_flip(data, (start + end) // 2, 4))
    return path


def test_flipped_tensor_bytes_in_torchscript_are_detected(tmp_path: Path) -> None:
    path = _flipped_tensor(tmp_path, "torchscript")
    with pytest.raises(CheckpointError, match="CRC-32 mismatch in .*data/0"):
        bnscope.load_checkpoint(path)


def test_flipped_tensor_bytes_in_torch_zip_are_detected(tmp_path: Path) -> None:
    path = _flipped_tensor(tmp_path, "zip")
    with pytest.raises(CheckpointError):
        bnscope.load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Damaged safetensors files


def _safetensors_damage(tmp_path: Path) -> dict[str, bytes]:
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file(_state_dict(), full, metadata={"epoch": "3"})
    assert bnscope.load_checkpoint(full).format == "safetensors"  # control
    data = full.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = data[8 : 8 + n], data[8 + n :]
    garbage = b"{" + b"\x00\xffnot json;" * (n // 11)
    garbage += b"}" * (n - len(garbage))
    return {
        "header-length-beyond-file": struct.pack("<Q", len(data) * 4) + data[8:],
        "header-length-huge": struct.pack("<Q", 2**62) + data[8:],
        "garbage-json": data[:8] + garbage + body,
        "json-not-an-object": struct.pack("<Q", 8) + b"[1, 2]  " + body,
        "truncated-data": data[: 8 + n + len(body) // 2],
        "truncated-header": data[: 8 + n // 2],
        "length-only": data[:8],
        "offsets-out-of-range": data[:8]
        + header.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1)
        + body,
        "unknown-dtype": data[:8] + header.replace(b'"F32"', b'"F33"', 1) + body,
        "shape-mismatch": data[:8] + header.replace(b'"shape":[4]', b'"shape":[5]', 1) + body,
    }


SAFETENSORS_KINDS = [
    "header-length-beyond-file",
    "header-length-huge",
    "garbage-json",
    "json-not-an-object",
    "truncated-data",
    "truncated-header",
    "length-only",
    "offsets-out-of-range",
    "unknown-dtype",
    "shape-mismatch",
]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", SAFETENSORS_KINDS)
def test_damaged_safetensors(tmp_path: Path, kind: str, suffix: str) -> None:
    damaged = _safetensors_damage(tmp_path)
    assert damaged[kind] != (tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / f"w{suffix}"
    path.write_bytes(damaged[kind])
    with pytest.raises(CheckpointError) as info:
        bnscope.load_checkpoint(path)
    line = info.value.line()
    assert "\n" not in line and str(path) in line
    assert info.value.fix


@pytest.mark.parametrize("kind", ["header-length-beyond-file", "garbage-json", "truncated-data"])
def test_cli_damaged_safetensors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_damage(tmp_path)[kind])
    one_error_line(run("inspect", path), "safetensors")


def test_damaged_files_load_nothing_into_a_model(tmp_path: Path) -> None:
    """`precise` on a damaged checkpoint fails before any output file is written."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_damage(tmp_path)["truncated-data"])
    data = tmp_path / "d.pt"
    torch.save(torch.randn(20, 3, 8, 8), data)
    res = run("precise", path, "--model", tiny_spec(), "--data", data)
    one_error_line(res, "safetensors")
    assert not (tmp_path / "w.precise.safetensors").exists()


def test_broken_whole_module_with_trust_is_a_clean_error(tmp_path: Path) -> None:
    """A trusted pickle of a module whose attributes are damaged: one clean error."""
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    del module.__dict__["_modules"]
    path = tmp_path / "broken.pt"
    torch.save(module, path)
    with pytest.raises(CheckpointError, match="is broken"):
        bnscope.load_checkpoint(path, trust=True)


@pytest.mark.parametrize("protocol", [4, 5])
def test_cli_protocol_4_state_dict_is_one_line(tmp_path: Path, protocol: int) -> None:
    """The safe loader cannot check protocol 4/5 opcodes: one line naming --trust-checkpoint
    (torch's own "Detected pickle protocol" warning is not a second line)."""
    path = tmp_path / "p.pt"
    torch.save(trained_tiny().state_dict(), path, pickle_protocol=protocol)
    one_error_line(run("inspect", path), "--trust-checkpoint")
    res = run("inspect", path, "--trust-checkpoint", "--json")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
