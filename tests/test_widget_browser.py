"""The shipped labeling notebook in a real JupyterLab, driven by headless Chromium through Playwright.

After the stages the labeling notebook needs have run (through the library, into
``$CAI_DPO_RUNS``), ``notebooks/05_label_edge_cases.ipynb`` is opened unchanged from a
folder that is not the project root, as a user opens it: it finds the run, shows the
queued pairs, one written response and one click land in SQLite, and the merge cell counts both.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install chromium``); skips
without it. Never downloads a browser. The server runs on 127.0.0.1 with its data,
runtime, config and workspace folders in a temp dir and a kernelspec pointing at this
interpreter, so nothing is registered globally.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "cai-dpo-browser-test"
WRITTEN = "I can't help with that, but here is a safe alternative."
KERNEL = "python3"  # the shipped notebooks' kernelspec; the test's own spec of that name runs this interpreter

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def _wait_for_server(port: int, proc: subprocess.Popen, log: Path, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _api(port, "/api/status")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 whose only kernelspec runs this interpreter."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path / "jupyter"
    spec_dir = home / "data" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cai-dpo test", "language": "python"}))
    root = tmp_path / "notebooks"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "CAI_DPO_UNATTENDED"))}
    env.update(JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_PLATFORM_DIRS="1",
               IPYTHONDIR=str(home / "ipython"), CAI_DPO_UNATTENDED="0", CAI_DPO_RUNS=str(tmp_path / "runs"),
               CAI_DPO_LABELER="browser", OMP_NUM_THREADS="1")
    port = _free_port()
    log = tmp_path / "lab.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={port}", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
             f"--LabApp.workspaces_dir={home / 'workspaces'}", "--ServerApp.port_retries=0",
             f"--KernelSpecManager.allowed_kernelspecs={KERNEL}"],
            cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for_server(port, proc, log)
        yield port, root, log
    finally:
        try:
            for kernel in _api(port, "/api/kernels") or []:
                _api(port, f"/api/kernels/{kernel['id']}", method="DELETE")
        except (urllib.error.URLError, OSError):
            pass
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture()
def labeling_run(tmp_path, monkeypatch, tiny_path):
    """The run the labeling notebook opens by default (profile cpu-demo's run id), built
    on the tiny model through the library up to the judge; a pair is queued if none was routed."""
    from cai_dpo.config import load_config, save_config
    from cai_dpo.labels import LabelQueue, pair_from_row, queue_path
    from cai_dpo.stages.judge import run_judge
    from cai_dpo.stages.pairs import run_pairs
    from cai_dpo.stages.sft import run_sft
    from cai_dpo.stages.sl import run_sl
    from cai_dpo.store import RunStore

    monkeypatch.setenv("CAI_DPO_RUNS", str(tmp_path / "runs"))
    demo_id = load_config("cpu-demo").run_id  # the run the notebook's default parameters open
    cfg = load_config("tiny", {"run_id": demo_id, "threads": 1})
    run = RunStore(cfg.run_dir)
    assert run.root == tmp_path / "runs" / demo_id
    save_config(cfg, run.path("config.yaml"))
    for stage in (run_sl, run_sft, run_pairs, run_judge):
        stage(cfg, run)
    import datasets

    rows = datasets.load_from_disk(str(run.root / "data" / "preferences")).to_list()
    with LabelQueue(queue_path(cfg)) as queue:
        queue.enqueue([pair_from_row(rows[0], ["low_confidence"])])  # the notebook routes the rest
    return cfg, run


def _run_cell(page, cell, prompt: str, timeout: float = 120_000) -> None:
    cell.click()
    page.keyboard.press("Escape")  # command mode: Ctrl+Enter runs the selected cell
    page.keyboard.press("Control+Enter")
    cell.locator(".jp-InputPrompt", has_text=prompt).wait_for(timeout=timeout)


def test_shipped_labeling_notebook_edit_and_click_land_in_sqlite_and_merge_counts_them(lab, labeling_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from cai_dpo.pipeline import NOTEBOOKS_DIR

    port, root, log = lab
    cfg, run = labeling_run
    shipped = NOTEBOOKS_DIR / "05_label_edge_cases.ipynb"
    (root / shipped.name).write_bytes(shipped.read_bytes())  # unchanged; the kernel's cwd is not the project

    channels: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("websocket", lambda ws: channels.append(ws.url) if "/api/kernels/" in ws.url else None)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{shipped.name}?token={TOKEN}", timeout=30_000)
            # a run before the kernel is attached is silently dropped: wait for its websocket and idle status
            deadline = time.monotonic() + 30
            while not any("/channels" in url for url in channels):
                assert time.monotonic() < deadline, f"no kernel websocket; server log:\n{log.read_text()[-2000:]}"
                page.wait_for_timeout(200)
            page.locator("#jp-main-statusbar").get_by_text("Idle").first.wait_for(timeout=30_000)
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            assert cells.count() == 5
            for i in range(3):  # parameters, open the run, route + merge
                _run_cell(page, cells.nth(i), f"[{i + 1}]:")
            assert str(run.root) in cells.nth(1).inner_text()  # "run folder: ..." names the run built above
            widget = cells.nth(3)
            _run_cell(page, widget, "[4]:")
            button = widget.get_by_role("button", name="A better", exact=True)
            button.wait_for(timeout=30_000)
            widget.get_by_text(re.compile(r"^0 / [1-9]\d* labeled$")).wait_for(timeout=15_000)  # the queued pairs
            if os.environ.get("CAI_DPO_SCREENSHOTS"):  # README pictures: CAI_DPO_SCREENSHOTS=docs pytest -m browser
                widget.screenshot(path=str(Path(os.environ["CAI_DPO_SCREENSHOTS"]) / "labeling_widget.png"))
            # write a better response for the pair on screen (its box is prefilled with the AI's answer)
            box = widget.get_by_placeholder("Write a better response")
            box.fill(WRITTEN)
            widget.get_by_role("button", name="Save response", exact=True).click()
            widget.get_by_text(re.compile(r"^Saved your response for pair ")).wait_for(timeout=15_000)
            button.click()
            widget.get_by_text(re.compile(r"^1 / [1-9]\d* labeled$")).wait_for(timeout=15_000)
            merge = cells.nth(4)
            _run_cell(page, merge, "[5]:")
            merged = merge.locator(".jp-OutputArea").inner_text()
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()

    with sqlite3.connect(run.root / "labels.sqlite") as raw:
        rows = raw.execute("SELECT pair_id, choice, labeler FROM labels").fetchall()
        revisions = raw.execute("SELECT record_key, response, author FROM revisions").fetchall()
    assert len(rows) == 1 and rows[0][2] == "browser", rows
    assert revisions == [(rows[0][0], WRITTEN, "browser")], revisions  # the pair then labeled
    assert "'labeled': 1" in merged and "'human_revisions': 1" in merged, merged
    assert not (root / "artifacts").exists()  # nothing written relative to the notebook's folder
