"""Progress of long steps, shown where the user is and streamed to the pipeline runner.

In a notebook or a terminal, :func:`progress_bar` is ``tqdm.auto.tqdm`` (a widget bar in
Jupyter, a text bar in a terminal). When the environment variable ``CAI_DPO_PROGRESS``
names a file (the runner of ``cai-dpo run`` sets it for the stage notebook it executes),
every update is also appended to that file as one JSON line, an *event*::

    {"bar": "12345-1", "desc": "sl generate", "n": 12, "total": 40, "unit": "seq",
     "elapsed": 4.2, "rate": 2.86, "postfix": "tok_s=74.1", "closed": false}

(``elapsed`` in seconds, ``rate`` in units per second, ``postfix`` the bar's text after
the counts, e.g. tokens/s). Trainers report through :func:`trainer_progress_callback`.
The runner reads new events with :class:`ProgressTail` and shows them with
:func:`format_event` or a :class:`ProgressPrinter`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

PROGRESS_ENV = "CAI_DPO_PROGRESS"
_ids = itertools.count(1)
_bar_class: type | None = None


def _report(event: dict[str, Any]) -> None:
    """Append one event to the file named by ``$CAI_DPO_PROGRESS`` (no-op when unset, and on
    every rank but 0 of a multi-process stage)."""
    from cai_dpo.distributed import is_main_process

    target = os.environ.get(PROGRESS_ENV)
    if not target or not is_main_process():
        return
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
    except OSError as exc:  # progress is a courtesy: never fail a stage over it
        log.debug("progress file %s not writable: %s", target, exc)


def _reporting_class() -> type:
    """A subclass of ``tqdm.auto.tqdm`` that also reports its state on every update."""
    global _bar_class
    if _bar_class is None:
        from tqdm.auto import tqdm as base

        class ReportingBar(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._report_id = f"{os.getpid()}-{next(_ids)}"
                self._report_closed = False
                super().__init__(*args, **kwargs)

            def __iter__(self) -> Any:
                if self.disable:
                    yield from super().__iter__()
                    return
                for obj in self.iterable:  # through update(), so every step is reported
                    yield obj
                    self.update(1)
                self.close()

            def update(self, n: float | None = 1) -> Any:
                out = super().update(n)
                if not self.disable and n and not self._report_closed:
                    self._send(closed=bool(self.total) and self.n >= self.total)
                return out

            def close(self) -> None:
                if not self.disable and not getattr(self, "_report_closed", True):
                    self._send(closed=True)
                super().close()

            def _send(self, closed: bool) -> None:
                self._report_closed = closed
                d = self.format_dict
                elapsed = float(d.get("elapsed") or 0.0)
                n = d.get("n") or 0
                _report(
                    {
                        "bar": self._report_id,
                        "desc": d.get("prefix") or "",
                        "n": n,
                        "total": d.get("total"),
                        "unit": d.get("unit") or "it",
                        "elapsed": round(elapsed, 2),
                        "rate": round(n / elapsed, 4) if elapsed > 0 and n else None,
                        "postfix": d.get("postfix") or "",
                        "closed": closed,
                    }
                )

        _bar_class = ReportingBar
    return _bar_class


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` that also streams to the pipeline runner (shown on rank 0 only)."""
    from cai_dpo.distributed import is_main_process

    if not is_main_process():
        kwargs["disable"] = True
    return _reporting_class()(iterable, **kwargs)


def trainer_progress_callback(desc: str) -> Any:
    """A transformers ``TrainerCallback`` reporting ``step / max_steps`` and the last loss as events."""
    from transformers import TrainerCallback

    class TrainerProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar = f"{os.getpid()}-{next(_ids)}"
            self.t0 = time.perf_counter()
            self.first_step = 0
            self.postfix = ""
            self.closed = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()
            self.first_step = state.global_step
            self.closed = False

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.postfix = f"loss={logs['loss']:.4g}"

        def _send(self, state: Any, closed: bool) -> None:
            if not state.is_world_process_zero or self.closed:
                return
            self.closed = closed
            elapsed = time.perf_counter() - self.t0
            done = state.global_step - self.first_step
            _report(
                {
                    "bar": self.bar,
                    "desc": f"{desc} train",
                    "n": state.global_step,
                    "total": state.max_steps or None,
                    "unit": "step",
                    "elapsed": round(elapsed, 2),
                    "rate": round(done / elapsed, 4) if elapsed > 0 and done else None,
                    "postfix": self.postfix,
                    "closed": closed,
                }
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._send(state, closed=bool(state.max_steps) and state.global_step >= state.max_steps)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._send(state, closed=True)

    return TrainerProgress()


# --------------------------------------------------------------------------- runner side


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def format_event(event: dict[str, Any]) -> str:
    """One line for an event: ``desc: n/total unit, rate unit/s, elapsed, ~left, postfix``."""
    n, total, unit = event.get("n") or 0, event.get("total"), event.get("unit") or "it"
    rate = event.get("rate")
    counts = f"{n:g}/{total:g} {unit}" if total else f"{n:g} {unit}"
    parts = [f"{event.get('desc') or 'progress'}: {counts}"]
    if rate:
        parts.append(f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}")
    parts.append(f"elapsed {_clock(event.get('elapsed'))}")
    if event.get("closed"):
        parts.append("done")
    elif total and rate:
        parts.append(f"~{_clock((total - n) / rate)} left")
    if event.get("postfix"):
        parts.append(str(event["postfix"]))
    return ", ".join(parts)


class ProgressTail:
    """New events appended to a progress file since the last :meth:`poll` (complete lines only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.partial = ""

    def poll(self) -> list[dict[str, Any]]:
        """Events written since the last call; a malformed line is skipped."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
            self.offset = fh.tell()
        text = self.partial + chunk
        lines = text.split("\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                log.debug("skipped a malformed progress line in %s", self.path)
        return events


class ProgressPrinter:
    """Shows events for a person: in a terminal, one line per bar rewritten in place;
    otherwise a line per event, at most one per ``min_interval`` seconds per bar (a bar's
    last event always shows)."""

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, min_interval: float = 5.0, indent: str = "    "
    ):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval
        self.indent = indent
        self.last_shown: dict[str, float] = {}
        self.open_line: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.indent + format_event(event)
        bar = str(event.get("bar"))
        if self.tty:
            if self.open_line is not None and self.open_line != bar:
                self.stream.write("\n")
            self.stream.write("\r\x1b[2K" + text)
            self.open_line = bar
            if event.get("closed"):
                self.stream.write("\n")
                self.open_line = None
            self.stream.flush()
            return
        now = time.monotonic()
        if not event.get("closed") and now - self.last_shown.get(bar, -1e9) < self.min_interval:
            return
        self.last_shown[bar] = now
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """Finish a bar line left open in a terminal (before other output)."""
        if self.tty and self.open_line is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = None


EventSink = Callable[[dict[str, Any]], None]
