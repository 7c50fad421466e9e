"""The report folder (``report_dir=``, ``--report-dir``): one report per folder, never a folder
named like a checkpoint, an earlier report replaced only with ``force=True`` and then as a
whole (its files that the new report lacks removed, other files left alone), and a failure
while writing leaves the folder as it was (docs/cli.md, section 6)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from bnscope.errors import UsageError
from bnscope.io import outputs
from bnscope.io.outputs import (
    CHECKPOINT_SUFFIXES,
    check_report_dir,
    earlier_report,
    write_report_dir,
)

KNOWN = ("report.json", "report.html", "staleness.png", "running_stats.png", "nbs_curve.png")


def manifest(command: str, files: list[str], checkpoint: str = "runs/ck.pt") -> bytes:
    doc = {"schema": f"bnscope.{command}/1", "command": command, "checkpoint": checkpoint,
           "report_files": files}  # fmt: skip
    return json.dumps(doc).encode()


def report(command: str, *figures: str, checkpoint: str = "runs/ck.pt") -> dict[str, bytes]:
    names = ["report.json", *figures]
    files = {name: f"{command} {name}".encode() for name in figures}
    return {"report.json": manifest(command, names, checkpoint), **files}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", ["fixed.pt", "w.PTH", "last.ckpt", "m.safetensors",
                                  "pytorch_model.bin", "fixed.pt/"])  # fmt: skip
def test_a_folder_named_like_a_checkpoint_is_refused(tmp_path: Path, name: str):
    with pytest.raises(UsageError) as info:
        check_report_dir(f"{tmp_path}/{name}")
    line = str(info.value)
    assert "like a checkpoint file" in line and "output=PATH" in line
    assert "report_dir=" in line
    assert listing(tmp_path) == []
    assert set(CHECKPOINT_SUFFIXES) == {".pt", ".pth", ".ckpt", ".safetensors", ".bin"}


def test_a_file_in_place_of_the_folder_or_a_parent(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_report_dir(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match=r"cannot create report_dir= folder .*notes.txt is a file"):
        check_report_dir(tmp_path / "notes.txt" / "rep")


def test_new_and_empty_folders_and_unrelated_files_are_fine(tmp_path: Path):
    assert check_report_dir(tmp_path / "new" / "rep") is None
    (tmp_path / "empty").mkdir()
    assert check_report_dir(tmp_path / "empty", known=KNOWN) is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("my notes")
    (tmp_path / "mine" / "plot.png").write_bytes(b"mine")
    assert check_report_dir(tmp_path / "mine", known=KNOWN) is None
    done = write_report_dir(tmp_path / "mine", report("ghost", "nbs_curve.png"), known=KNOWN)
    assert done.earlier is None and done.removed == []
    assert listing(tmp_path / "mine") == ["nbs_curve.png", "notes.md", "plot.png", "report.json"]


def test_an_earlier_report_is_refused_without_force(tmp_path: Path):
    folder = tmp_path / "rep"
    write_report_dir(folder, report("inspect", "running_stats.png"), known=KNOWN)
    with pytest.raises(UsageError) as info:
        check_report_dir(folder, known=KNOWN)
    assert str(info.value) == (
        f"report_dir={folder} already holds an earlier inspect report of runs/ck.pt "
        "(report.json, running_stats.png), and a report folder holds one report; pass "
        "force=True to replace that report, or choose another report_dir="
    )
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(UsageError, match="already holds an earlier inspect report"):
        write_report_dir(folder, report("precise", "precise_change.png"), known=KNOWN)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_force_replaces_the_earlier_report_as_a_whole(tmp_path: Path):
    folder = tmp_path / "rep"
    first = report("inspect", "staleness.png", "batch_means.png", "train_test.png")
    write_report_dir(folder, {**first, "report.html": b"<html>"}, known=KNOWN)
    (folder / "notes.md").write_text("mine")  # not bnscope's: left alone
    done = write_report_dir(folder, report("ghost", "nbs_curve.png", "ghost_noise.png"),
                            force=True, known=KNOWN)  # fmt: skip
    assert done.earlier is not None and done.earlier.command == "inspect"
    assert sorted(p.name for p in done.removed) == [
        "batch_means.png", "report.html", "staleness.png", "train_test.png"]  # fmt: skip
    assert listing(folder) == ["ghost_noise.png", "nbs_curve.png", "notes.md", "report.json"]
    assert (folder / "nbs_curve.png").read_bytes() == b"ghost nbs_curve.png"
    assert json.loads((folder / "report.json").read_bytes())["command"] == "ghost"


def test_reports_without_a_manifest_are_found_by_their_file_names(tmp_path: Path):
    """A report of an older version (no report_files) or with report.json deleted."""
    (tmp_path / "staleness.png").write_bytes(b"old")
    (tmp_path / "mine.png").write_bytes(b"mine")
    found = earlier_report(tmp_path, KNOWN)
    assert found is not None and found.files == ("staleness.png",) and found.command is None
    with pytest.raises(UsageError, match=r"already holds an earlier report \(staleness.png\)"):
        check_report_dir(tmp_path, known=KNOWN)
    write_report_dir(tmp_path, report("ghost", "nbs_curve.png"), force=True, known=KNOWN)
    assert listing(tmp_path) == ["mine.png", "nbs_curve.png", "report.json"]


def test_a_foreign_report_json_counts_as_an_earlier_report(tmp_path: Path):
    (tmp_path / "report.json").write_text('{"from": "another tool"}')
    with pytest.raises(UsageError, match=r"an earlier report \(report.json\)"):
        check_report_dir(tmp_path)


def test_a_manifest_never_removes_files_outside_the_folder(tmp_path: Path):
    folder = tmp_path / "rep"
    folder.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (folder / "sub").mkdir()
    names = ["report.json", "../precious.txt", str(tmp_path / "precious.txt"), "sub", "", 7]
    (folder / "report.json").write_bytes(manifest("inspect", names))  # type: ignore[arg-type]
    found = earlier_report(folder)
    assert found is not None and found.files == ("report.json",)
    write_report_dir(folder, report("ghost", "nbs_curve.png"), force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep" and (folder / "sub").is_dir()


def test_files_get_the_usual_permissions(tmp_path: Path):
    mask = os.umask(0o022)
    try:
        write_report_dir(tmp_path / "rep", report("ghost", "nbs_curve.png"))
    finally:
        os.umask(mask)
    for path in (tmp_path / "rep").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def _enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_earlier_report_and_no_new_folder(tmp_path, monkeypatch):
    folder = tmp_path / "rep"
    write_report_dir(folder, report("inspect", "running_stats.png"), known=KNOWN)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(outputs.os, "fsync", _enospc)
    with pytest.raises(UsageError, match="No space left on device"):
        write_report_dir(folder, report("ghost", "nbs_curve.png"), force=True, known=KNOWN)
    with pytest.raises(UsageError, match="No space left on device"):
        write_report_dir(tmp_path / "new" / "rep", report("ghost", "nbs_curve.png"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file
    assert listing(tmp_path) == ["rep"]  # the folders it created are gone


def test_an_interrupt_while_writing_changes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "rep"
    write_report_dir(folder, report("inspect", "running_stats.png"), known=KNOWN)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = []

    def interrupted(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second file
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report_dir(folder, report("ghost", "nbs_curve.png", "ghost_noise.png"),
                         force=True, known=KNOWN)  # fmt: skip
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
