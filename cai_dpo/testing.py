"""The shipped notebooks in a real JupyterLab, driven by headless Chromium: helpers shared by
the browser test (``tests/test_widget_browser.py``) and ``tools/screenshots.py``.

:func:`jupyter_lab` starts a server on 127.0.0.1 with its data, runtime, config and workspace
folders in a given folder and one kernelspec (``python3``) that runs this interpreter, so
nothing is registered globally. :func:`open_notebook` and :func:`run_cell` drive it through a
Playwright page. Uses Debian's ``chromium`` (:data:`CHROMIUM`); never downloads a browser.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_dpo.config import RUNS_ENV, RunConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "cai-dpo-browser-test"
KERNEL = "python3"  # the shipped notebooks' kernelspec; the server's own spec of that name runs this interpreter


class LabError(RuntimeError):
    """The JupyterLab server did not start, or a notebook did not open; the message carries its log."""


@dataclass(frozen=True)
class Lab:
    """A running server: its port, the folder it serves (the kernels' working directory) and its log."""

    port: int
    root: Path
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={TOKEN}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace", encoding="utf-8")[-chars:] if self.log.exists() else "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_api(port: int, path: str, method: str = "GET") -> Any:
    """One authenticated call to the server's REST API; the decoded JSON body (None when empty)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers={"Authorization": f"token {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def _wait_for_server(lab: Lab, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"jupyter lab exited with {proc.returncode}:\n{lab.log_tail()}")
        try:
            lab_api(lab.port, "/api/status")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.3)
    raise LabError(f"jupyter lab did not answer within {timeout:.0f} s:\n{lab.log_tail()}")


@contextmanager
def jupyter_lab(
    workdir: str | Path, runs_dir: str | Path, *, labeler: str = "browser", timeout: float = 120.0
) -> Iterator[Lab]:
    """A JupyterLab server on 127.0.0.1 whose only kernelspec runs this interpreter.

    Everything it writes goes under ``workdir``; it serves ``workdir/notebooks`` (empty: copy
    the notebooks to open there). Its kernels see ``$CAI_DPO_RUNS`` = ``runs_dir``, run
    attended (``CAI_DPO_UNATTENDED=0``: the labeling notebook shows its widget) and label as
    ``labeler``. On exit the kernels are shut down and the server stopped.
    """
    workdir = Path(workdir)
    home = workdir / "jupyter"
    spec_dir = home / "data" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "cai-dpo",
                "language": "python",
            }
        ),
        encoding="utf-8",
    )
    root = workdir / "notebooks"
    root.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "CAI_DPO_UNATTENDED"))}
    env.update(
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(home / "ipython"),
        CAI_DPO_UNATTENDED="0",
        **{RUNS_ENV: str(runs_dir)},
        CAI_DPO_LABELER=labeler,
        OMP_NUM_THREADS="1",
    )
    lab = Lab(free_port(), root, workdir / "lab.log")
    with open(lab.log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                "--allow-root",
                "--ip=127.0.0.1",
                f"--port={lab.port}",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={root}",
                f"--LabApp.workspaces_dir={home / 'workspaces'}",
                "--ServerApp.port_retries=0",
                f"--KernelSpecManager.allowed_kernelspecs={KERNEL}",
            ],
            cwd=root,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_server(lab, proc, timeout)
        yield lab
    finally:
        try:
            for kernel in lab_api(lab.port, "/api/kernels") or []:
                lab_api(lab.port, f"/api/kernels/{kernel['id']}", method="DELETE")
        except (urllib.error.URLError, OSError):
            pass
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def queue_sample_pairs(cfg: RunConfig, n: int = 1, reason: str = "sample") -> int:
    """Make sure the run's label queue has pairs to show: when it holds none (the run routed
    none), queue the first ``n`` rows of ``data/preferences`` with the reason ``reason``.
    Returns how many were queued (0 when the queue had pairs already)."""
    import datasets

    from cai_dpo.labels import LabelQueue, pair_from_row, queue_path
    from cai_dpo.store import RunLayout

    with LabelQueue(queue_path(cfg)) as queue:
        if queue.status()["queued"]:
            return 0
        src = RunLayout(cfg.run_dir).preferences
        if not (src / "dataset_info.json").exists():
            raise FileNotFoundError(f"{src}: preference dataset not found; run the judge stage first (cai-dpo judge)")
        rows = datasets.load_from_disk(str(src)).to_list()[:n]
        return queue.enqueue(pair_from_row(row, [reason]) for row in rows)


def open_notebook(page: Any, lab: Lab, name: str, timeout: float = 30.0) -> Any:
    """Open ``name`` (a notebook in ``lab.root``) in a Playwright ``page`` and wait until its
    kernel is connected and idle (a cell run before that is silently dropped) and every code cell
    of the file is rendered (JupyterLab adds them to the page one by one). Returns the locator of
    its code cells."""
    expected = sum(c["cell_type"] == "code" for c in json.loads((lab.root / name).read_text(encoding="utf-8"))["cells"])
    channels: list[str] = []
    page.on("websocket", lambda ws: channels.append(ws.url) if "/api/kernels/" in ws.url else None)
    page.goto(lab.url(f"lab/tree/{name}"), timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    while not any("/channels" in url for url in channels):
        if time.monotonic() > deadline:
            raise LabError(f"{name}: no kernel websocket within {timeout:.0f} s; server log:\n{lab.log_tail(2000)}")
        page.wait_for_timeout(200)
    page.locator("#jp-main-statusbar").get_by_text("Idle").first.wait_for(timeout=timeout * 1000)
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    while cells.count() != expected:
        if time.monotonic() > deadline:
            raise LabError(f"{name}: {cells.count()} of its {expected} code cells rendered after {timeout:.0f} s")
        page.wait_for_timeout(200)
    return cells


def run_cell(page: Any, cell: Any, prompt: str, timeout: float = 120_000) -> None:
    """Run one code cell (a locator) and wait until its prompt reads ``prompt`` (e.g. ``"[3]:"``)."""
    cell.click()
    page.keyboard.press("Escape")  # command mode: Ctrl+Enter runs the selected cell
    page.keyboard.press("Control+Enter")
    cell.locator(".jp-InputPrompt", has_text=prompt).wait_for(timeout=timeout)
