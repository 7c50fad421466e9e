"""`bnscope inspect --model --data` end to end, including report.html in a headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from ..clirun import run
from ..conftest import sha256, tiny_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_dynamic_table_json_and_report_dir(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    digest = sha256(ckpt)
    args = ("inspect", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16")
    res = run(*args)
    assert res.exit_code == 0, res.stderr
    verdict = res.stdout.splitlines()[0]
    assert "Train/test consistency" in res.stdout and "BN layers, worst first" in res.stdout

    res = run(*args, "--json", "--report-dir", tmp / "rep")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "bnscope.inspect/2" and doc["checkpoint"] == str(ckpt)
    assert [lay["name"] for lay in doc["layers"]] == ["1", "4"]
    assert doc["metrics"]["samples"] == 90 and doc["metrics"]["has_labels"] is True
    files = sorted(p.name for p in (tmp / "rep").iterdir())
    assert files == [
        "batch_means.png", "report.html", "report.json", "staleness.png", "train_test.png",
    ]  # fmt: skip
    assert json.loads((tmp / "rep" / "report.json").read_text()) == doc
    assert doc["verdict_text"].startswith(verdict)  # the terminal report starts with it
    assert sha256(ckpt) == digest
    assert not list(tmp.glob("ck.*.pt"))


def test_static_flag_and_project_file_data(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run("inspect", ckpt, "--model", tiny_spec(), "--data", data, "--static", "--json")
    assert res.exit_code == 0, res.stderr
    assert "verdict" not in json.loads(res.stdout)
    (tmp / "bnscope.toml").write_text(f'model = "{tiny_spec()}"\ndata = "d.pt"\n')
    res = run("inspect", ckpt, "--json", cwd=tmp)
    assert res.exit_code == 0, res.stderr
    assert "verdict" in json.loads(res.stdout)  # the project file's model and data
    (tmp / "bnscope.toml").write_text('data = "d.pt"\n')
    res = run("inspect", ckpt, "--json", cwd=tmp)  # data from the file, no model: static
    assert res.exit_code == 0, res.stderr
    assert "verdict" not in json.loads(res.stdout)


def test_data_without_model_gives_static_report_and_one_error_line(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run("inspect", ckpt, "--data", data)
    assert res.exit_code == 2
    assert "BatchNorm layers" in res.stdout  # the static report was produced
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnscope: error: --data needs --model")
    assert "static report above" in lines[0] and "Traceback" not in res.stderr


def test_dynamic_bad_input(precise_env):
    from ..clirun import one_error_line

    tmp, ckpt, data, _, _ = precise_env
    base = ("inspect", ckpt, "--model", tiny_spec())
    one_error_line(run(*base, "--data", data, "--batches", "0"), "greater than or equal to 1")
    one_error_line(run(*base, "--data", data, "--batches", "50"), "the data holds 3 batches")
    one_error_line(run(*base, "--data", tmp / "missing"), "missing")
    one_error_line(run(*base, "--data", data, "--eval-data", data), "no --eval-data")
    assert sorted(p.name for p in tmp.iterdir()) == ["ck.pt", "d.pt"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (the CI script installs it)")
def test_report_html_renders_in_headless_chromium(precise_env):
    tmp, ckpt, data, _, _ = precise_env
    res = run("inspect", ckpt, "--model", tiny_spec(), "--data", data, "--batch-size", "16",
              "--report-dir", tmp / "rep")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    page = (tmp / "rep" / "report.html").resolve().as_uri()
    browser = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp / 'profile'}"]  # fmt: skip
    # the DOM after loading: the verdict and every figure, each image decoded (naturalWidth)
    script = tmp / "check.html"
    script.write_text(
        "<!DOCTYPE html><html><body><iframe id=f src='" + page + "' width=1200 height=800>"
        "</iframe><pre id=out></pre><script>"
        "document.getElementById('f').onload=function(){"
        "var d=this.contentDocument;var imgs=[].slice.call(d.images);"
        "document.getElementById('out').textContent=JSON.stringify({"
        "verdict:d.getElementById('verdict').textContent,"
        "images:imgs.map(function(i){return [i.alt,i.complete,i.naturalWidth]})});};"
        "</script></body></html>"
    )
    dom = subprocess.run(
        [*browser, "--allow-file-access-from-files", "--virtual-time-budget=5000",
         "--dump-dom", script.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    start = text.index('<pre id="out">') + len('<pre id="out">')
    info = json.loads(text[start : text.index("</pre>", start)].replace("&quot;", '"'))
    doc = json.loads((tmp / "rep" / "report.json").read_text())
    assert info["verdict"] == doc["verdict_text"]
    assert sorted(alt for alt, _, _ in info["images"]) == ["batch_means", "staleness", "train_test"]
    assert all(done and width > 100 for _, done, width in info["images"]), info["images"]
    shot = tmp / "report.png"
    png = subprocess.run(
        [*browser, "--window-size=1200,2400", f"--screenshot={shot}", page],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert png.returncode == 0 and shot.stat().st_size > 50_000, png.stderr[-2000:]
