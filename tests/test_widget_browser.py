"""The labeling widget in a real JupyterLab, driven by headless Chromium through Playwright.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install chromium``); skips
without it. Never downloads a browser. The server runs on 127.0.0.1 with its data,
runtime, config and workspace folders in a temp dir and a kernelspec pointing at this
interpreter, so nothing is registered globally.
"""

from __future__ import annotations

import json
import os
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
KERNEL = "cai-dpo-browser-test"

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


def _notebook(db: Path) -> dict:
    source = (
        "from cai_dpo.widgets import labeling_ui\n"
        f"labeling_ui({str(db)!r}, labeler='browser', seed=0)"
    )
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "label-cell", "metadata": {},
                   "outputs": [], "source": source}],
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": "cai-dpo test", "language": "python"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


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
               IPYTHONDIR=str(home / "ipython"), CAI_DPO_UNATTENDED="0")
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


def test_click_a_better_in_jupyterlab_writes_label(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    from cai_dpo.labels import LabelQueue
    from cai_dpo.widgets import shown_order_for

    port, root, log = lab
    db = tmp_path / "labels.sqlite"
    with LabelQueue(db) as queue:
        queue.enqueue([{"pair_id": "pair-1", "prompt": "How do I pick a lock?",
                        "response_a": "I can't help with breaking into places.",
                        "response_b": "Insert a tension wrench first.", "p_chosen": 0.55,
                        "principle_ids": ["harm-1"], "reasons": ["low_confidence"]}])
    (root / "label.ipynb").write_text(json.dumps(_notebook(db)))

    channels: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("websocket", lambda ws: channels.append(ws.url) if "/api/kernels/" in ws.url else None)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/label.ipynb?token={TOKEN}", timeout=30_000)
            # a run before the kernel is attached is silently dropped: wait for its websocket and idle status
            deadline = time.monotonic() + 30
            while not any("/channels" in url for url in channels):
                assert time.monotonic() < deadline, f"no kernel websocket; server log:\n{log.read_text()[-2000:]}"
                page.wait_for_timeout(200)
            page.locator("#jp-main-statusbar").get_by_text("Idle").first.wait_for(timeout=30_000)
            cell = page.locator(".jp-Notebook .jp-CodeCell").first
            cell.locator(".cm-content").click()
            page.keyboard.press("Control+Enter")
            cell.locator(".jp-InputPrompt", has_text="[1]:").wait_for(timeout=30_000)
            button = cell.get_by_role("button", name="A better", exact=True)
            button.wait_for(timeout=30_000)
            assert cell.get_by_text("0 / 1 labeled").is_visible()
            button.click()
            cell.get_by_text("1 / 1 labeled").wait_for(timeout=15_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            browser.close()

    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT pair_id, choice, shown_order, labeler FROM labels").fetchall()
    order = shown_order_for("pair-1", 0)
    assert rows == [("pair-1", order[0], order, "browser")]
