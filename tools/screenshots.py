"""Generate the README's pictures: the labeling widget in JupyterLab and the report's plots.

    python tools/screenshots.py --run-dir artifacts/runs/cpu-demo   # an existing run (read only)
    python tools/screenshots.py                                     # a fresh `tiny` run in a temp folder

Widget: the run's labeling inputs (its config, ``data/preferences`` and ``labels.sqlite``) are
copied into a temporary runs folder (``$CAI_DPO_RUNS``) as the run the labeling notebook opens
with its default parameters, so the run itself is never written to. When its label queue is
empty (the run routed no pair to a person) the first preference rows are queued with the
reason ``sample``. JupyterLab then starts headless on a free port with this interpreter as its
kernel, the shipped ``notebooks/06_labels.ipynb`` is opened unchanged in headless
Chromium (Debian's ``chromium``, through Playwright), its cells run up to the one that shows the
widget, and the widget is saved as ``<out>/labeling-widget.png``.

Plots: every PNG the report stage wrote to ``<run>/report/`` is copied to
``<out>/report-<name>.png`` (older ``report-*.png`` there are removed first).

Every PNG is reduced to a 256-colour palette when that makes it smaller. Run it with the
project's interpreter (``.venv/bin/python``): the kernel is the interpreter that runs this.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's cai_dpo, also when it is not installed

from cai_dpo.config import (  # noqa: E402
    DEFAULT_RUNS_DIR,
    RUNS_ENV,
    RunConfig,
    apply_overrides,
    config_from_yaml_text,
    load_config,
    save_config,
)
from cai_dpo.errors import CaiDpoInputError  # noqa: E402
from cai_dpo.testing import CHROMIUM, CHROMIUM_ARGS, LabError, jupyter_lab, open_notebook, queue_sample_pairs, run_cell  # noqa: E402

NOTEBOOK = REPO / "notebooks" / "06_labels.ipynb"
NOTEBOOK_PROFILE = "cpu-demo"  # the profile in the notebook's parameters cell: it names the run it opens
WIDGET_PNG = "labeling-widget.png"
MARGIN = 8  # pixels of white around the widget
MAX_BYTES = 300_000  # a warning above this: the PNGs are committed


class ToolError(Exception):
    """A problem the user can fix; printed as one ``error:`` line."""


def say(message: str) -> None:
    print(f"[screenshots] {message}", flush=True)


# --------------------------------------------------------------------------- the run


def tiny_run(runs: Path) -> Path:
    """Run the whole pipeline on the ``tiny`` profile into ``runs``; return the run folder."""
    say(f"running the pipeline on the tiny profile into {runs} (a few minutes) ...")
    cmd = [sys.executable, "-m", "cai_dpo.cli", "run", "--profile", "tiny"]
    if subprocess.run(cmd, cwd=REPO, env={**os.environ, RUNS_ENV: str(runs)}).returncode:
        raise ToolError(f"`{' '.join(cmd[2:])}` failed (its output is above)")
    return runs / load_config("tiny").run_id


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ToolError(f"{run_dir}: not a run folder (no config.yaml)")
    return config_from_yaml_text(path.read_text(encoding="utf-8"), source=str(path))


def stage_labeling_run(run_dir: Path, runs: Path) -> RunConfig:
    """Copy what the labeling notebook reads from ``run_dir`` into ``runs`` (the folder
    ``$CAI_DPO_RUNS`` names in this process and the kernels), as the run the notebook opens by
    default; return that copy's config."""
    src_cfg = read_config(run_dir)
    prefs = run_dir / "data" / "preferences"
    if not (prefs / "dataset_info.json").exists():
        raise ToolError(f"{prefs}: no preference dataset; the run has not reached the judge stage yet")
    run_id = load_config(NOTEBOOK_PROFILE).run_id
    cfg = apply_overrides(src_cfg, {"run_id": run_id, "runs_dir": DEFAULT_RUNS_DIR, "labels.db_path": None})
    dst = runs / run_id
    assert cfg.run_dir == dst.resolve(), (cfg.run_dir, dst)
    shutil.copytree(prefs, dst / "data" / "preferences")
    save_config(cfg, dst / "config.yaml")
    db = Path(src_cfg.labels.db_path).expanduser() if src_cfg.labels.db_path else run_dir / "labels.sqlite"
    for suffix in ("", "-wal"):  # the database and its write-ahead log; not even SQLite opens the original
        if Path(f"{db}{suffix}").exists():
            shutil.copyfile(f"{db}{suffix}", dst / f"labels.sqlite{suffix}")
    return cfg


# --------------------------------------------------------------------------- pictures


def shrink_png(path: Path) -> int:
    """Re-encode ``path`` with a 256-colour palette when that is smaller; return its size in bytes."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    tmp = path.with_suffix(".tmp.png")
    small.save(tmp, optimize=True)
    if tmp.stat().st_size < path.stat().st_size:
        tmp.replace(path)
    else:
        tmp.unlink()
    size = path.stat().st_size
    if size > MAX_BYTES:
        say(f"warning: {path} is {size / 1000:.0f} KB (over {MAX_BYTES // 1000} KB)")
    return size


def widget_screenshot(workdir: Path, runs: Path, out: Path, width: int) -> Path:
    """Open the shipped labeling notebook in JupyterLab, run it up to the widget, save the widget."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    target = out / WIDGET_PNG
    say("starting JupyterLab (headless, 127.0.0.1, a free port) ...")
    with jupyter_lab(workdir, runs, labeler="screenshots") as lab, sync_playwright() as pw:
        (lab.root / NOTEBOOK.name).write_bytes(NOTEBOOK.read_bytes())  # unchanged
        say(f"JupyterLab on port {lab.port}; opening {NOTEBOOK.name} in headless Chromium ...")
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        # side bar and cell prompts take about 400 px; tall enough that the notebook never clips the widget
        page = browser.new_page(viewport={"width": width + 400, "height": 2400})
        try:
            cells = open_notebook(page, lab, NOTEBOOK.name, timeout=60)
            for i in range(cells.count()):
                cell = cells.nth(i)
                source = cell.locator(".jp-InputArea-editor").inner_text()
                say(f"running cell {i + 1}: {source.strip().splitlines()[-1][:70]}")
                run_cell(page, cell, f"[{i + 1}]:", timeout=300_000)
                # JupyterLab shows an exception like stderr; IPython's traceback header tells them apart
                if cell.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count():
                    raise ToolError(f"cell {i + 1} of {NOTEBOOK.name} failed:\n{cell.inner_text()[-2000:]}")
                if "labeling_ui(" in source:
                    break
            else:
                raise ToolError(f"{NOTEBOOK.name} has no cell calling labeling_ui(")
            cell.get_by_role("button", name="A better", exact=True).wait_for(timeout=60_000)
            widget = cell.locator(".jp-OutputArea-output").last
            # size the page so that the widget and a margin of MARGIN pixels around it are `width` pixels wide
            box = widget.bounding_box()
            page.set_viewport_size({"width": int(width + 400 + width - 2 * MARGIN - box["width"]), "height": 2400})
            page.wait_for_timeout(500)
            page.mouse.move(0, 0)  # no hover highlight on the picture
            widget.screenshot(path=str(target), animations="disabled")
        except (PlaywrightError, ToolError) as exc:
            failure = workdir / "failure.png"
            try:
                page.screenshot(path=str(failure))
            except PlaywrightError:
                failure = "none"
            raise ToolError(f"{exc}\n(the page as it was: {failure}; server log: {lab.log})") from exc
        finally:
            browser.close()
    from PIL import Image, ImageOps

    with Image.open(target) as img:  # a white margin, so the widget's edges do not touch the picture's
        ImageOps.expand(img.convert("RGB"), border=MARGIN, fill="white").save(target)
    return target


def copy_report_plots(run_dir: Path, out: Path) -> list[Path]:
    plots = sorted((run_dir / "report").glob("*.png"))
    for old in out.glob("report-*.png"):
        old.unlink()
    copied = []
    for plot in plots:
        target = out / f"report-{plot.name}"
        shutil.copyfile(plot, target)
        copied.append(target)
    return copied


# --------------------------------------------------------------------------- main


def check_prerequisites(run_dir: Path | None, widget: bool, plots: bool) -> None:
    if widget:
        if not CHROMIUM.exists():
            raise ToolError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as exc:
            raise ToolError(f"Playwright is not installed in {sys.executable} (pip install -e '.[test]')") from exc
    if run_dir is None:
        return
    if not run_dir.is_dir():
        raise ToolError(f"--run-dir {run_dir}: no such folder")
    read_config(run_dir)
    if widget and not (run_dir / "data" / "preferences" / "dataset_info.json").exists():
        raise ToolError(f"--run-dir {run_dir}: no data/preferences yet (the judge stage writes it)")
    if plots and not list((run_dir / "report").glob("*.png")):
        raise ToolError(
            f"--run-dir {run_dir}: no PNG plots in report/ (the eval stage writes them; "
            "`cai-dpo report` renders them again); `--only widget` skips the plots"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "--run-dir", type=Path, help="an existing run folder, read only (default: a fresh tiny run in a temp folder)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go (default: docs/img)")
    parser.add_argument("--only", choices=("widget", "plots"), help="make only the widget screenshot or only the plots")
    parser.add_argument("--pairs", type=int, default=3, help="pairs to queue when the run's queue is empty (default 3)")
    parser.add_argument(
        "--width", type=int, default=1000, help="width of the widget screenshot in pixels (default 1000)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (runs, server log) and print it")
    args = parser.parse_args(argv)
    widget, plots = args.only in (None, "widget"), args.only in (None, "plots")
    run_dir = args.run_dir.resolve() if args.run_dir else None
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cai-dpo-screenshots-"))
    try:
        check_prerequisites(run_dir, widget, plots)
        args.out.mkdir(parents=True, exist_ok=True)
        if run_dir is None:
            run_dir = tiny_run(workdir / "tiny-runs")
        say(f"run: {run_dir}")
        made: list[Path] = []
        if widget:
            runs = workdir / "runs"
            os.environ[RUNS_ENV] = str(runs)  # this process's configs resolve there too
            cfg = stage_labeling_run(run_dir, runs)
            queued = queue_sample_pairs(cfg, n=args.pairs)
            say(f"label queue: {'had pairs' if not queued else f'empty; queued {queued} sample pair(s)'}")
            made.append(widget_screenshot(workdir, runs, args.out, args.width))
        if plots:
            copied = copy_report_plots(run_dir, args.out)
            if not copied:
                raise ToolError(f"{run_dir / 'report'}: no PNG plots (the eval stage writes them)")
            made += copied
        for path in made:
            say(f"wrote {path} ({shrink_png(path) / 1000:.0f} KB)")
        say(f"done in {time.monotonic() - t0:.0f} s")
        return 0
    except (ToolError, LabError, CaiDpoInputError) as exc:  # bad config, run folder or setup: one line
        print(f"error: {exc}", file=sys.stderr)
        args.keep = args.keep or any(workdir.iterdir())  # what it names (failure picture, server log) stays
        return 1
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
