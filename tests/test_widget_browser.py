"""The shipped labeling notebook in a real JupyterLab, driven by headless Chromium through Playwright.

After the stages the labeling notebook needs have run (through the library, into
``$CAI_DPO_RUNS``), ``notebooks/06_labels.ipynb`` is opened unchanged from a
folder that is not the project root, as a user opens it: it finds the run, shows the
queued pairs, one written response and one click land in SQLite, and the merge cell counts both.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install chromium``); skips
without it. Never downloads a browser. The server runs on 127.0.0.1 with its data,
runtime, config and workspace folders in a temp dir and a kernelspec pointing at this
interpreter, so nothing is registered globally.
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from cai_dpo.testing import CHROMIUM, CHROMIUM_ARGS, jupyter_lab, open_notebook, queue_sample_pairs, run_cell

WRITTEN = "I can't help with that, but here is a safe alternative."

pytestmark = pytest.mark.browser


@pytest.fixture()
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 whose only kernelspec runs this interpreter."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    with jupyter_lab(tmp_path, tmp_path / "runs") as server:
        yield server


@pytest.fixture()
def labeling_run(tmp_path, monkeypatch, tiny_path):
    """The run the labeling notebook opens by default (profile cpu-demo's run id), built
    on the tiny model through the library up to the judge; a pair is queued if none was routed."""
    from cai_dpo.config import load_config, save_config
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
    assert queue_sample_pairs(cfg) == 1  # the notebook routes the rest
    return cfg, run


def test_shipped_labeling_notebook_edit_and_click_land_in_sqlite_and_merge_counts_them(lab, labeling_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from cai_dpo.pipeline import NOTEBOOKS_DIR

    cfg, run = labeling_run
    root = lab.root
    shipped = NOTEBOOKS_DIR / "06_labels.ipynb"
    (root / shipped.name).write_bytes(shipped.read_bytes())  # unchanged; the kernel's cwd is not the project

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            cells = open_notebook(page, lab, shipped.name)
            assert cells.count() == 5
            for i in range(3):  # parameters, open the run, route + merge
                run_cell(page, cells.nth(i), f"[{i + 1}]:")
            assert str(run.root) in cells.nth(1).inner_text()  # "run folder: ..." names the run built above
            widget = cells.nth(3)
            run_cell(page, widget, "[4]:")
            button = widget.get_by_role("button", name="A better", exact=True)
            button.wait_for(timeout=30_000)
            widget.get_by_text(re.compile(r"^0 / [1-9]\d* labeled$")).wait_for(timeout=15_000)  # the queued pairs
            # write a better response for the pair on screen (its box is prefilled with the AI's answer)
            box = widget.get_by_placeholder("Write a better response")
            box.fill(WRITTEN)
            widget.get_by_role("button", name="Save response", exact=True).click()
            widget.get_by_text(re.compile(r"^Saved your response for pair ")).wait_for(timeout=15_000)
            button.click()
            widget.get_by_text(re.compile(r"^1 / [1-9]\d* labeled$")).wait_for(timeout=15_000)
            merge = cells.nth(4)
            run_cell(page, merge, "[5]:")
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
