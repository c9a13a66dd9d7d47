"""Notebook widgets (ipywidgets): the labeling UI for queued edge cases and a constitution explorer.

``labeling_ui(queue)`` is what the labeling notebook calls; besides the label buttons it has a
"Write a better response" box whose "Save response" button stores a human revision of the
shown pair. ``revision_ui(queue, sl_records)`` does the same for SL-CAI records. Interactively it returns a
:class:`LabelingWidget`; when the notebook runs unattended it returns a
:class:`QueueSummary` instead. Nothing here waits for input: widgets act on clicks.

Unattended detection (:func:`is_unattended`): the environment variable
``CAI_DPO_UNATTENDED`` ("1"/"true"/"yes" on, "0"/"false"/"no" off; the pipeline runner sets
it to 1), else whether the kernel's parent process is papermill (its command line names
``papermill``; papermill itself sets nothing the kernel could see).
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from cai_dpo.labels import LabelQueue

log = logging.getLogger(__name__)

CHOICE_BUTTONS = ("A better", "B better", "Tie", "Skip")
UNDO_BUTTON = "Undo last"
SAVE_BUTTON = "Save response"
REVISION_PLACEHOLDER = "Write a better response"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def is_unattended() -> bool:
    """True when the notebook runs without a person (pipeline runner or papermill)."""
    flag = os.environ.get("CAI_DPO_UNATTENDED", "").strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE:
        return False
    return _parent_is_papermill()


def _parent_is_papermill() -> bool:
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            import psutil

            cmdline = " ".join(psutil.Process(os.getppid()).cmdline())
        except Exception:  # noqa: BLE001 - no way to tell: assume a person is present
            return False
    return "papermill" in cmdline


def _as_queue(queue: LabelQueue | str | Path) -> LabelQueue:
    return queue if isinstance(queue, LabelQueue) else LabelQueue(queue)


def shown_order_for(pair_id: str, seed: int) -> str:
    """Which response goes left: "AB" (response_a left) or "BA", fixed per (seed, pair)."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return "AB" if digest[0] % 2 == 0 else "BA"


def _block(text: str) -> str:
    return f"<div style='white-space: pre-wrap; word-break: break-word'>{html.escape(text)}</div>"


class LabelingWidget(widgets.VBox):
    """Shows one queued pair at a time (prompt, the two responses side by side in a seeded
    random order, the principle and the AI's confidence) and stores each click in the queue.

    ``buttons`` maps the stable descriptions "A better", "B better", "Tie", "Skip" and
    "Undo last" to their buttons; "A" is the left response, "B" the right one. ``revision``
    (a text area prefilled with the AI's chosen response) and the "Save response" button
    store a response written by the person (:meth:`LabelQueue.record_revision`); the pair
    stays on screen until it is labeled.
    """

    def __init__(
        self, queue: LabelQueue | str | Path, labeler: str = "anonymous", seed: int = 0, constitution: Any = None
    ):
        self.queue = _as_queue(queue)
        self.labeler = labeler
        self.seed = seed
        self.constitution = constitution
        self.current: dict[str, Any] | None = None
        self.shown_order: str | None = None
        self.title = widgets.HTML()
        self.prompt = widgets.HTML()
        self.left = widgets.HTML()
        self.right = widgets.HTML()
        self.info = widgets.HTML()
        self.comment = widgets.Textarea(placeholder="optional comment", layout=widgets.Layout(width="100%"))
        self.progress = widgets.IntProgress(min=0, max=1, value=0, description="Labeled")
        self.progress_text = widgets.HTML()
        self.message = widgets.HTML()
        self.revision = widgets.Textarea(placeholder=REVISION_PLACEHOLDER, rows=6, layout=widgets.Layout(width="100%"))
        self.buttons: dict[str, widgets.Button] = {}
        styles = {
            "A better": "primary",
            "B better": "primary",
            "Tie": "",
            "Skip": "",
            UNDO_BUTTON: "warning",
            SAVE_BUTTON: "success",
        }
        for name in (*CHOICE_BUTTONS, UNDO_BUTTON, SAVE_BUTTON):
            button = widgets.Button(description=name, button_style=styles[name], tooltip=name)
            button.on_click(self._on_click)
            self.buttons[name] = button
        half = widgets.Layout(width="50%", padding="0 8px", border="1px solid #ddd")
        sides = widgets.HBox(
            [
                widgets.VBox([widgets.HTML("<b>Response A</b>"), self.left], layout=half),
                widgets.VBox([widgets.HTML("<b>Response B</b>"), self.right], layout=half),
            ]
        )
        super().__init__(
            children=[
                self.title,
                self.prompt,
                sides,
                self.info,
                self.comment,
                widgets.HBox([self.buttons[n] for n in (*CHOICE_BUTTONS, UNDO_BUTTON)]),
                widgets.HBox([self.progress, self.progress_text]),
                widgets.HTML(
                    "<b>Write a better response</b> (optional; it trains SFT on the next run and is preferred "
                    "over the AI's response)"
                ),
                self.revision,
                self.buttons[SAVE_BUTTON],
                self.message,
            ]
        )
        self.show(self.queue.next_unlabeled())

    # ---------------------------------------------------------------- display

    def _principles(self, ids: list[str]) -> str:
        parts = []
        for pid in ids:
            text = pid
            if self.constitution is not None:
                try:
                    text = f"{pid}: {self.constitution.principle(pid).comparison}"
                except Exception:  # noqa: BLE001 - unknown id in this constitution: show the id
                    pass
            parts.append(html.escape(text))
        return "; ".join(parts) or "(none)"

    def show(self, pair: dict[str, Any] | None) -> None:
        """Display ``pair`` (None: the queue is done)."""
        self.current = pair
        self.comment.value = ""
        for name in (*CHOICE_BUTTONS, SAVE_BUTTON):
            self.buttons[name].disabled = pair is None
        self.revision.value = pair["response_a"] if pair is not None else ""
        self.revision.disabled = pair is None
        if pair is None:
            self.shown_order = None
            self.title.value = "<h4>Nothing left to label</h4>"
            self.prompt.value = self.left.value = self.right.value = self.info.value = ""
        else:
            self.shown_order = shown_order_for(pair["pair_id"], self.seed)
            left, right = ("response_a", "response_b") if self.shown_order == "AB" else ("response_b", "response_a")
            self.title.value = f"<h4>Which response is better? <small>pair {html.escape(pair['pair_id'])}</small></h4>"
            self.prompt.value = f"<b>Prompt</b>{_block(pair['prompt'])}"
            self.left.value = _block(pair[left])
            self.right.value = _block(pair[right])
            p_a = pair.get("p_chosen")
            if p_a is None:
                confidence = "no AI score"
            else:
                p_left = p_a if self.shown_order == "AB" else 1.0 - p_a
                confidence = f"P(A better) = {p_left:.2f}, P(B better) = {1.0 - p_left:.2f}"
            self.info.value = (
                f"<b>Principle</b>: {self._principles(pair.get('principle_ids') or [])}<br>"
                f"<b>AI judge</b>: {confidence}<br>"
                f"<b>Queued because</b>: {html.escape(', '.join(pair.get('reasons') or []) or '-')}"
            )
        self.refresh_progress()

    def refresh_progress(self) -> None:
        """Update the labeled / queued indicator from the database."""
        status = self.queue.status()
        self.progress.max = max(status["queued"], 1)
        self.progress.value = status["labeled"]
        self.progress_text.value = f"{status['labeled']} / {status['queued']} labeled"

    # ---------------------------------------------------------------- actions

    def _on_click(self, button: widgets.Button) -> None:
        if button.disabled:
            return
        try:
            if button.description == UNDO_BUTTON:
                self.undo()
            elif button.description == SAVE_BUTTON:
                self.revise()
            else:
                self.choose(button.description)
        except Exception as exc:  # noqa: BLE001 - show the failure in the widget, keep it usable
            log.exception("labeling widget: %s failed", button.description)
            self.message.value = f"<span style='color:#b00'>{html.escape(f'{button.description} failed: {exc}')}</span>"

    def choose(self, name: str) -> dict[str, Any]:
        """Record the current pair's label for button ``name`` and show the next pair."""
        if self.current is None or self.shown_order is None:
            raise RuntimeError("no pair on screen")
        if name == "A better":
            choice = self.shown_order[0]
        elif name == "B better":
            choice = self.shown_order[1]
        elif name in ("Tie", "Skip"):
            choice = name.lower()
        else:
            raise ValueError(f"unknown button {name!r}")
        label = self.queue.record_label(
            self.current["pair_id"], choice, self.shown_order, self.labeler, self.comment.value.strip()
        )
        self.message.value = f"Saved: {html.escape(name)} for pair {html.escape(label['pair_id'])}"
        self.show(self.queue.next_unlabeled())
        return label

    def revise(self, text: str | None = None) -> dict[str, Any]:
        """Store ``text`` (default: the text area) as a better response for the current pair."""
        if self.current is None:
            raise RuntimeError("no pair on screen")
        revision = self.queue.record_revision(
            self.revision.value if text is None else text, pair_id=self.current["pair_id"], author=self.labeler
        )
        self.message.value = (
            f"Saved your response for pair {html.escape(revision['record_key'])}; it trains SFT on the next run"
        )
        return revision

    def undo(self) -> dict[str, Any] | None:
        """Delete this labeler's latest label and show that pair again."""
        label = self.queue.undo_last(self.labeler)
        if label is None:
            self.message.value = "Nothing to undo."
            self.refresh_progress()
            return None
        self.message.value = f"Undid the label for pair {html.escape(label['pair_id'])}"
        self.show(self.queue.pair(label["pair_id"]))
        return label


class QueueSummary(dict):
    """Queue counts shown instead of the widget when nobody is there to click."""

    def _repr_html_(self) -> str:
        return (
            f"<p><b>Label queue</b> {html.escape(str(self.get('db_path')))}: {self['queued']} pair(s) queued, "
            f"{self['labeled']} labeled, {self['pending']} pending, {self.get('revisions', 0)} written response(s). "
            "Open this notebook in JupyterLab to label.</p>"
        )

    def __str__(self) -> str:
        return (
            f"label queue {self.get('db_path')}: {self['queued']} queued, {self['labeled']} labeled, "
            f"{self['pending']} pending, {self.get('revisions', 0)} written response(s)"
        )


def labeling_ui(
    queue: LabelQueue | str | Path,
    labeler: str | None = None,
    seed: int = 0,
    constitution: Any = None,
    unattended: bool | None = None,
) -> LabelingWidget | QueueSummary:
    """The labeling widget, or (unattended, see :func:`is_unattended`) a summary of the queue.

    ``labeler`` defaults to ``$CAI_DPO_LABELER``, then ``$USER``.
    """
    q = _as_queue(queue)
    if unattended is None:
        unattended = is_unattended()
    if unattended:
        summary = QueueSummary(q.status())
        log.info("%s", summary)
        return summary
    name = labeler or os.environ.get("CAI_DPO_LABELER") or os.environ.get("USER") or "anonymous"
    return LabelingWidget(q, labeler=name, seed=seed, constitution=constitution)


def sl_record_key(record: dict[str, Any]) -> str:
    """The revision ``record_key`` of an SL-CAI record: ``sl:<prompt_id>`` (else a hash of its messages)."""
    from cai_dpo.store import content_hash

    return f"sl:{record.get('prompt_id') or content_hash(record['messages'])}"


class RevisionWidget(widgets.VBox):
    """Pick an SL-CAI record (``messages`` ending with the assistant's revision), rewrite its
    response and save it as a human revision (``record_key`` from :func:`sl_record_key`)."""

    def __init__(self, queue: LabelQueue | str | Path, records: Any, author: str = "anonymous"):
        self.queue = _as_queue(queue)
        self.author = author
        self.records = [dict(r) for r in records]
        options = [(f"{i}: {str(r['messages'][0]['content'])[:80]}", i) for i, r in enumerate(self.records)]
        self.dropdown = widgets.Dropdown(options=options, description="Record", layout=widgets.Layout(width="100%"))
        self.prompt = widgets.HTML()
        self.revision = widgets.Textarea(placeholder=REVISION_PLACEHOLDER, rows=6, layout=widgets.Layout(width="100%"))
        self.button = widgets.Button(description=SAVE_BUTTON, button_style="success", disabled=not options)
        self.message = widgets.HTML()
        self.button.on_click(lambda _: self._save())
        self.dropdown.observe(lambda change: self.show(change["new"]), names="value")
        super().__init__(children=[self.dropdown, self.prompt, self.revision, self.button, self.message])
        if options:
            self.show(self.dropdown.value)

    def show(self, index: int) -> None:
        """Show record ``index``: its prompt turns and, in the text area, its response."""
        messages = self.records[index]["messages"]
        self.prompt.value = "".join(f"<b>{html.escape(m['role'])}</b>{_block(m['content'])}" for m in messages[:-1])
        self.revision.value = messages[-1]["content"]

    def _save(self) -> None:
        try:
            self.save()
        except Exception as exc:  # noqa: BLE001 - show the failure in the widget, keep it usable
            log.exception("revision widget: save failed")
            self.message.value = f"<span style='color:#b00'>{html.escape(f'Save failed: {exc}')}</span>"

    def save(self, text: str | None = None) -> dict[str, Any]:
        """Store ``text`` (default: the text area) as the better response of the selected record."""
        record = self.records[self.dropdown.value]
        revision = self.queue.record_revision(
            self.revision.value if text is None else text,
            record_key=sl_record_key(record),
            prompt=record["messages"][:-1],
            original=record["messages"][-1]["content"],
            principle_ids=record.get("principle_ids") or [],
            author=self.author,
        )
        self.message.value = (
            f"Saved your response for {html.escape(revision['record_key'])}; it trains SFT on the next run"
        )
        return revision


def revision_ui(
    queue: LabelQueue | str | Path, sl_records: Any, author: str | None = None, unattended: bool | None = None
) -> RevisionWidget | QueueSummary:
    """Rewrite SL-CAI records (e.g. ``datasets.load_from_disk(run.data_dir('sl'))``); unattended
    (see :func:`is_unattended`) a summary of the queue instead. ``author`` defaults like
    :func:`labeling_ui`'s ``labeler``."""
    q = _as_queue(queue)
    if is_unattended() if unattended is None else unattended:
        return QueueSummary(q.status())
    name = author or os.environ.get("CAI_DPO_LABELER") or os.environ.get("USER") or "anonymous"
    return RevisionWidget(q, sl_records, author=name)


class ConstitutionExplorer(widgets.VBox):
    """A dropdown of principles showing each one's critique, revision and comparison texts."""

    def __init__(self, constitution: Any):
        self.constitution = constitution
        options = [(f"{p.id} ({p.category})", p.id) for p in constitution.principles]
        self.dropdown = widgets.Dropdown(options=options, description="Principle")
        self.detail = widgets.HTML()
        header = widgets.HTML(
            f"<b>{html.escape(str(constitution.name))}</b> v{html.escape(str(constitution.version))}: "
            f"{len(options)} principles in {html.escape(', '.join(constitution.categories()))}"
        )
        self.dropdown.observe(lambda change: self.show(change["new"]), names="value")
        super().__init__(children=[header, self.dropdown, self.detail])
        if options:
            self.show(self.dropdown.value)

    def show(self, principle_id: str) -> None:
        """Show one principle's texts."""
        p = self.constitution.principle(principle_id)
        self.detail.value = "".join(
            f"<p><b>{title}</b>{_block(text)}</p>"
            for title, text in (
                ("Critique request", p.critique),
                ("Revision request", p.revision),
                ("Comparison question", p.comparison),
            )
        )


def constitution_explorer(constitution: Any) -> ConstitutionExplorer:
    """Browse a constitution's principles (accepts a Constitution or a path to one)."""
    if isinstance(constitution, (str, Path)):
        from cai_dpo.constitution import load_constitution

        constitution = load_constitution(constitution)
    return ConstitutionExplorer(constitution)
