"""``--report-dir``: a report folder that cannot be mistaken for the checkpoint (``-o``), that
holds one report (an earlier one is refused before anything runs, or replaced as a whole with
``--force``), whose report.json lists its files; ``--out`` is its deprecated spelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bnscope
from bnscope.errors import UsageError

from ..clirun import one_error_line, run
from ..conftest import sha256, tiny_spec

WARNING = (
    "bnscope: warning: --out is deprecated and will be removed: use --report-dir for the report "
    "folder (-o/--output is the checkpoint)"
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def model_args(data: Path) -> list[str]:
    return ["--model", tiny_spec(), "--data", str(data), "--batch-size", "16", "--batches", "2"]


def test_the_readme_commands_in_order_never_mix_two_reports(precise_env):
    """inspect, then precise into the same folder: refused before anything runs (no
    checkpoint written), then replaced as a whole with --force."""
    tmp, ckpt, data, _, _ = precise_env
    rep = tmp / "report"
    res = run("inspect", ckpt, *model_args(data), "--report-dir", rep, "--json")
    assert res.exit_code == 0, res.stderr
    inspected = names(rep)
    assert inspected == ["batch_means.png", "report.html", "report.json", "staleness.png",
                         "train_test.png"]  # fmt: skip
    doc = json.loads((rep / "report.json").read_text())
    assert doc == json.loads(res.stdout)  # --json prints report.json itself
    assert sorted(doc["report_files"]) == inspected and doc["report_files"][0] == "report.json"
    before = {p.name: p.read_bytes() for p in rep.iterdir()}

    res = run("precise", ckpt, *model_args(data), "--report-dir", rep)
    one_error_line(
        res,
        f"--report-dir {rep} already holds an earlier inspect report of {ckpt} (report.json, "
        "staleness.png, batch_means.png, train_test.png and 1 more), and a report folder holds "
        "one report; pass --force to replace that report, or choose another --report-dir",
    )
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before
    assert not (tmp / "ck.precise.pt").exists()  # refused before anything ran

    res = run("precise", ckpt, *model_args(data), "--report-dir", rep, "--force")
    assert res.exit_code == 0, res.stderr
    assert names(rep) == ["precise_change.png", "report.json"]  # no stale inspect figure
    doc = json.loads((rep / "report.json").read_text())
    assert doc["command"] == "precise" and doc["report_files"] == names(rep)[::-1]
    assert (tmp / "ck.precise.pt").exists()


def test_json_without_a_report_folder_has_no_report_files(tiny_ckpt):
    res = run("inspect", tiny_ckpt, "--json")
    assert res.exit_code == 0, res.stderr
    assert "report_files" not in json.loads(res.stdout)


@pytest.mark.parametrize("command", ["inspect", "precise", "adapt", "ghost"])
@pytest.mark.parametrize("flag", ["--report-dir", "--out"])
def test_a_report_folder_named_like_a_checkpoint_is_refused(precise_env, command, flag):
    """``precise --out fixed.pt`` once made a folder fixed.pt/ and wrote the checkpoint
    elsewhere; now nothing runs and nothing is written."""
    tmp, ckpt, data, _, _ = precise_env
    before = names(tmp)
    digest = sha256(ckpt)
    res = run(command, ckpt, *model_args(data), flag, tmp / "fixed.pt")
    line = (
        f"bnscope: error: --report-dir {tmp / 'fixed.pt'} ends in .pt like a checkpoint file, "
        "but --report-dir names the folder for report.json and the figures; name a folder, "
        "e.g. --report-dir report/ (the checkpoint to write is -o PATH)"
    )
    assert res.exit_code == 2 and res.stdout == ""
    if flag == "--out":  # the warning tells what --out now is
        assert res.stderr.splitlines() == [WARNING, line]
    else:
        assert res.stderr.splitlines() == [line]
    assert names(tmp) == before and sha256(ckpt) == digest


def test_out_is_a_deprecated_spelling_of_report_dir(tiny_ckpt, tmp_path):
    res = run("inspect", tiny_ckpt, "--out", tmp_path / "rep")
    assert res.exit_code == 0
    assert res.stderr == WARNING + "\n"
    assert names(tmp_path / "rep") == ["report.json", "running_stats.png"]
    res = run("inspect", tiny_ckpt, "--out", tmp_path / "a", "--report-dir", tmp_path / "b")
    one_error_line(res, "--out is the old spelling of --report-dir, and both were given")
    res = run("inspect", tiny_ckpt, "--out", tmp_path / "rep", "--quiet")
    one_error_line(res, "already holds an earlier inspect report")  # same rules; no warning


def test_the_checkpoint_and_the_report_folder_must_differ(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run("precise", ckpt, *model_args(data), "-o", tmp / "new", "--report-dir", tmp / "new")
    one_error_line(res, "name the same path: -o is the checkpoint file, --report-dir the folder")
    assert not (tmp / "new").exists()


def test_inspect_and_ghost_take_force_for_the_report_only(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    args = ["ghost", ckpt, *model_args(data), "--sizes", "2,4", "--report-dir", tmp / "g"]
    assert run(*args).exit_code == 0
    one_error_line(run(*args), "already holds an earlier ghost report")
    res = run(*args, "--force", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["report_files"] == ["report.json", "ghost_noise.png",
                                                      "nbs_curve.png"]  # fmt: skip


def test_the_library_refuses_and_replaces_the_same_way(tiny_ckpt, tmp_path):
    rep = tmp_path / "rep"
    report = bnscope.open(tiny_ckpt).inspect()
    written = bnscope.write_report(report, rep)
    assert [p.name for p in written] == ["report.json", "running_stats.png"]
    with pytest.raises(UsageError, match=r"already holds .*pass force=True"):
        bnscope.write_report(report, rep)
    (rep / "staleness.png").write_bytes(b"a stale figure of an older run")
    told: list[str] = []
    bnscope.write_report(report, rep, force=True, notify=told.append)
    assert names(rep) == ["report.json", "running_stats.png"]
    assert told == [
        f"report_dir={rep}: replaced an earlier inspect report of {tiny_ckpt} (report.json, "
        "running_stats.png, staleness.png); removed staleness.png, which this report does "
        "not have"
    ]
