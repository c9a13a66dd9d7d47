"""Human label queue: edge-case routing, a SQLite queue, and the merge into preferences.

Pairs the AI judge is unsure about go to a queue (``<run_dir>/labels.sqlite`` by default)
where a person labels them in :class:`cai_dpo.widgets.LabelingWidget`; :func:`merge_labels`
then lets each human label override the AI label.

Conventions
-----------
* A queued pair has ``response_a`` = the AI's ``chosen`` response and ``response_b`` = the
  AI's ``rejected`` response; ``p_chosen`` is the judge's P(response_a better).
* A label's ``choice`` names the *response*, not the screen side: ``"A"`` means the person
  preferred ``response_a``, ``"B"`` ``response_b``; ``"tie"`` and ``"skip"`` prefer neither.
  ``shown_order`` records what was on screen: ``"AB"`` = response_a on the left,
  ``"BA"`` = response_b on the left.
* Judge order scores follow the judge's ``Verdict``: ``score_ab`` is P(response A better)
  when shown as (A, B) and ``score_ba`` is P(the *same* response A better) when the two are
  shown swapped. The two orders disagree when ``(score_ab - .5) * (score_ba - .5) < 0``.
* ``per_principle`` (optional list column) holds one such probability per principle, all
  about the same response.

Human revisions: a person may also *write* a better response (for a queued pair, or for an
SL-CAI record). :meth:`LabelQueue.record_revision` commits it at once to the ``revisions``
table; the latest revision of each ``record_key`` becomes an SFT row (source
``human_revision``, see :func:`revision_sft_rows`) and a preference pair with the written
response chosen over the original (:func:`revision_pref_rows`, merged by :func:`cai_dpo.stages.labels.run_labels`).

The database has a ``meta`` table with ``schema_version``, runs in WAL mode and commits
every label in its own transaction, so a killed labeling process loses nothing already
clicked and several processes may label at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_dpo.config import LabelsSection, RunConfig
from cai_dpo.errors import CaiDpoInputError
from cai_dpo.schema import as_conversation
from cai_dpo.store import (
    RunLayout,
    jsonl_lines,
    loads_json,
    write_jsonl,
)

if TYPE_CHECKING:  # datasets is imported lazily: the queue and the widget do not need it
    import datasets

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHOICES = ("A", "B", "tie", "skip")
ORDERS = ("AB", "BA")
REASONS = (
    "low_confidence",
    "order_disagreement",
    "principle_disagreement",
    "judge_prefers_original",
    "gate",
    "gate_sample",
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS pairs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        pair_id TEXT NOT NULL UNIQUE,
        prompt TEXT NOT NULL,
        response_a TEXT NOT NULL,
        response_b TEXT NOT NULL,
        p_chosen REAL,
        principle_ids TEXT NOT NULL DEFAULT '[]',
        reasons TEXT NOT NULL DEFAULT '[]',
        source TEXT,
        category TEXT,
        extra TEXT NOT NULL DEFAULT '{}',
        enqueued_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS labels (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        label_id TEXT NOT NULL UNIQUE,
        pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
        choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
        shown_order TEXT NOT NULL CHECK (shown_order IN ('AB', 'BA')),
        labeler TEXT NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS labels_pair ON labels(pair_id)",
    "CREATE INDEX IF NOT EXISTS labels_labeler ON labels(labeler, created_at)",
    """CREATE TABLE IF NOT EXISTS revisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        revision_id TEXT NOT NULL UNIQUE,
        record_key TEXT NOT NULL,
        pair_id TEXT,
        prompt TEXT NOT NULL,
        original TEXT NOT NULL,
        response TEXT NOT NULL,
        principle_ids TEXT NOT NULL DEFAULT '[]',
        author TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS revisions_key ON revisions(record_key, created_at)",
)
_PAIR_FIELDS = (
    "pair_id",
    "prompt",
    "response_a",
    "response_b",
    "p_chosen",
    "principle_ids",
    "reasons",
    "source",
    "category",
    "extra",
    "enqueued_at",
)
_LABEL_FIELDS = ("label_id", "pair_id", "choice", "shown_order", "labeler", "comment", "created_at")
_REVISION_FIELDS = (
    "revision_id",
    "record_key",
    "pair_id",
    "prompt",
    "original",
    "response",
    "principle_ids",
    "author",
    "created_at",
)
#: ``source`` of the SFT rows and preference pairs made from revisions written by a person.
REVISION_SOURCE = "human_revision"


_EPS = 1e-9  # band edges are exclusive: 0.6 is not inside a 0.1 band around 0.5 despite rounding


def _inside(p: float, band: float) -> bool:
    return abs(p - 0.5) < band - _EPS


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def _num(value: Any) -> float | None:
    """A finite float, or None for missing / NaN values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# --------------------------------------------------------------------------- routing


def edge_reasons(row: dict[str, Any], cfg: LabelsSection, *, gate_tripped: bool = False) -> list[str]:
    """Why one preference row needs a person (empty list: it does not).

    Rules (each switchable in ``LabelsSection``): ``low_confidence`` |p_chosen-0.5| <
    confidence_band; ``order_disagreement`` the two display orders pick different
    responses; ``principle_disagreement`` per-principle probabilities fall on both sides of
    0.5 with max-min > principle_disagreement_spread; ``judge_prefers_original`` a
    revision-vs-original pair whose judge score (``p_judge``, else the soft ``p_chosen``
    when the pair was judged) is below 0.5; ``gate`` the judge-quality gate tripped and
    |p_chosen-0.5| < gate_confidence_band. Rows already labeled by a person never route.
    """
    if row.get("source") == "human":
        return []
    reasons: list[str] = []
    p = _num(row.get("p_chosen"))
    if cfg.route_low_confidence and p is not None and _inside(p, cfg.confidence_band):
        reasons.append("low_confidence")
    ab, ba = _num(row.get("score_ab")), _num(row.get("score_ba"))
    if cfg.route_order_disagreement and ab is not None and ba is not None and (ab - 0.5) * (ba - 0.5) < 0:
        reasons.append("order_disagreement")
    per = [v for v in (_num(x) for x in (row.get("per_principle") or [])) if v is not None]
    if (
        cfg.route_principle_disagreement
        and len(per) >= 2
        and min(per) < 0.5 < max(per)
        and max(per) - min(per) > cfg.principle_disagreement_spread
    ):
        reasons.append("principle_disagreement")
    if cfg.route_judge_prefers_original and row.get("source") == "revision_vs_original":
        p_judge = _num(row.get("p_judge"))
        if p_judge is None and ab is not None:  # judged pair: its soft label is the judge's score
            p_judge = p
        if p_judge is not None and p_judge < 0.5:
            reasons.append("judge_prefers_original")
    if cfg.route_gate and gate_tripped and p is not None and _inside(p, cfg.gate_confidence_band):
        reasons.append("gate")
    return reasons


def route_edge_cases(
    rows: Iterable[dict[str, Any]], cfg: LabelsSection, *, gate_tripped: bool = False, seed: int = 0
) -> list[tuple[dict[str, Any], list[str]]]:
    """The rows that need a person, each with its reasons (see :func:`edge_reasons`).

    When the judge gate tripped, ``cfg.route_gate_sample`` more rows that no rule routed
    (and no person labeled) are added with the reason ``gate_sample``: a sample seeded by
    ``seed`` and the pair id, so a rerun picks the same pairs. The rules alone route nothing
    when the AI labels are certain by construction (revision-vs-original pairs have
    ``p_chosen`` 1 and no judge scores), which is exactly when the gate says they cannot be
    trusted; the sample gives the label queue work there.
    """
    rows = list(rows)
    out = []
    rest = []
    for row in rows:
        reasons = edge_reasons(row, cfg, gate_tripped=gate_tripped)
        if reasons:
            out.append((row, reasons))
        elif row.get("source") != "human" and row.get("pair_id"):
            rest.append(row)
    if gate_tripped and cfg.route_gate_sample > 0 and rest:
        from cai_dpo.store import content_hash

        picked = sorted(rest, key=lambda r: content_hash("gate_sample", seed, r["pair_id"]))[: cfg.route_gate_sample]
        chosen = {id(r) for r in picked}
        out.extend((r, ["gate_sample"]) for r in rest if id(r) in chosen)
    return out


def gate_tripped(manifest: dict[str, Any]) -> bool:
    """Whether a preferences manifest says the judge-quality gate tripped.

    Reads ``metrics.gate_tripped`` (bool), or ``metrics.gate.tripped`` / ``metrics.gate.passed``.
    """
    metrics = manifest.get("metrics") or {}
    if "gate_tripped" in metrics:
        return bool(metrics["gate_tripped"])
    gate = metrics.get("gate")
    if isinstance(gate, dict):
        if "tripped" in gate:
            return bool(gate["tripped"])
        if "passed" in gate:
            return not gate["passed"]
    return False


def _text(messages: Any) -> str:
    """Plain text of a message list (or a plain string)."""
    if isinstance(messages, str):
        return messages
    messages = list(messages or [])
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def pair_from_row(row: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """A queue entry for one preference row (response_a = chosen, response_b = rejected)."""
    if not row.get("pair_id"):
        raise ValueError("preference row has no 'pair_id'; rerun the judge stage to write it")
    extra = {
        k: row.get(k)
        for k in ("score_ab", "score_ba", "per_principle", "judge_model", "p_judge", "margin")
        if row.get(k) is not None
    }
    return {
        "pair_id": row["pair_id"],
        "prompt": _text(row.get("prompt")),
        "response_a": _text(row.get("chosen")),
        "response_b": _text(row.get("rejected")),
        "p_chosen": _num(row.get("p_chosen")),
        "principle_ids": list(row.get("principle_ids") or []),
        "reasons": list(reasons),
        "source": row.get("source"),
        "category": row.get("category"),
        "extra": extra,
    }


# --------------------------------------------------------------------------- queue


class LabelQueueError(CaiDpoInputError, RuntimeError):
    """The label database cannot be used as is; the message names the file and the fix."""


class LabelQueue:
    """A SQLite queue of pairs for people to label, and their labels.

    Safe to open from several processes: WAL journal, a 30 s busy timeout, and one
    short ``BEGIN IMMEDIATE`` transaction per write. ``read_only=True`` opens an existing
    database without creating or changing it (SQLite ``mode=ro``; SQLite may still leave its
    usual ``-wal``/``-shm`` companion files); a missing file raises :class:`LabelQueueError`
    naming it.
    """

    def __init__(self, db_path: str | Path, read_only: bool = False):
        self.path = Path(db_path).expanduser()
        self.read_only = read_only
        self._lock = threading.RLock()
        if read_only:
            self._conn = self._open_read_only()
            return
        if self.path.is_dir():
            raise LabelQueueError(f"{self.path}: a folder, not a label database; name a .sqlite file (--db)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 30000")
        try:
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise LabelQueueError(
                f"{self.path}: not a usable label database ({exc}); move it away or set labels.db_path to a new file"
            ) from exc
        if str(mode).lower() != "wal":
            log.warning("%s: journal mode is %s, not WAL (is the file on a network drive?)", self.path, mode)
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._init_schema()

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise LabelQueueError(
                f"{self.path}: label database not found; check --db / labels.db_path (the labels stage creates it)"
            )
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=30.0,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise LabelQueueError(f"{self.path}: not a label database ({exc}); check --db / labels.db_path") from exc
        if row is None or int(row[0]) > SCHEMA_VERSION:
            conn.close()
            raise LabelQueueError(
                f"{self.path}: meta.schema_version is {row[0] if row else 'missing'}; this cai-dpo "
                f"reads version {SCHEMA_VERSION}"
            )
        return conn

    def __repr__(self) -> str:
        return f"LabelQueue({str(self.path)!r})"

    def __enter__(self) -> LabelQueue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate write transaction, committed on exit."""
        if self.read_only:
            raise LabelQueueError(f"{self.path}: opened read-only; open it with read_only=False to change it")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _init_schema(self) -> None:
        try:
            with self._write() as db:
                for stmt in _SCHEMA:
                    db.execute(stmt)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (_now(),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise LabelQueueError(
                        f"{self.path}: meta.schema_version is {row[0]}, newer than this cai-dpo reads "
                        f"({SCHEMA_VERSION}); upgrade cai-dpo or point labels.db_path at another file"
                    )
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise LabelQueueError(
                f"{self.path}: not a usable label database ({exc}); move it away or set labels.db_path to a new file"
            ) from exc

    @property
    def schema_version(self) -> int:
        """The database's schema version (``meta.schema_version``)."""
        with self._lock:
            return int(self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # ---------------------------------------------------------------- pairs

    def enqueue(self, pairs: Iterable[dict[str, Any]]) -> int:
        """Add pairs (dicts with pair_id, prompt, response_a, response_b, p_chosen,
        principle_ids, reasons; optional source, category, extra). Pairs whose ``pair_id`` is
        queued already are left as they are. Returns how many were new."""
        rows = [_pair_values(pair, f"enqueue: pair #{i}") for i, pair in enumerate(pairs)]
        if not rows:
            return 0
        with self._write() as db:
            added = _insert_pairs(db, rows)
        log.info("%s: %d new pair(s) queued (%d offered)", self.path, added, len(rows))
        return added

    @staticmethod
    def _pair(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        out = {k: row[k] for k in _PAIR_FIELDS}
        for k in ("principle_ids", "reasons", "extra"):
            out[k] = json.loads(out[k])
        return out

    def pair(self, pair_id: str) -> dict[str, Any] | None:
        """One queued pair, or None."""
        with self._lock:
            return self._pair(
                self._conn.execute(
                    f"SELECT {', '.join(_PAIR_FIELDS)} FROM pairs WHERE pair_id = ?", (pair_id,)
                ).fetchone()
            )

    def pairs(self) -> list[dict[str, Any]]:
        """All queued pairs in queue order."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {', '.join(_PAIR_FIELDS)} FROM pairs ORDER BY seq").fetchall()
        return [self._pair(r) for r in rows]

    def next_unlabeled(self) -> dict[str, Any] | None:
        """The oldest queued pair that has no label yet, or None when all are labeled."""
        with self._lock:
            return self._pair(
                self._conn.execute(
                    f"SELECT {', '.join(_PAIR_FIELDS)} FROM pairs p WHERE NOT EXISTS "
                    "(SELECT 1 FROM labels l WHERE l.pair_id = p.pair_id) ORDER BY seq LIMIT 1"
                ).fetchone()
            )

    def pending_count(self) -> int:
        """Queued pairs without a label."""
        with self._lock:
            return self._conn.execute(
                "SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.pair_id)"
            ).fetchone()[0]

    # ---------------------------------------------------------------- labels

    def record_label(
        self, pair_id: str, choice: str, shown_order: str, labeler: str, comment: str = ""
    ) -> dict[str, Any]:
        """Store one human label and commit it at once. ``choice`` is "A" | "B" (the
        preferred response, see the module notes) | "tie" | "skip"; ``shown_order`` is "AB"
        (response_a was on the left) or "BA". Returns the stored label."""
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
        if shown_order not in ORDERS:
            raise ValueError(f"shown_order {shown_order!r} is not 'AB' or 'BA'")
        if not labeler or not isinstance(labeler, str):
            raise ValueError("labeler must be a non-empty name")
        label = {
            "label_id": uuid.uuid4().hex,
            "pair_id": pair_id,
            "choice": choice,
            "shown_order": shown_order,
            "labeler": labeler,
            "comment": comment or "",
            "created_at": _now(),
        }
        with self._write() as db:
            if db.execute("SELECT 1 FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone() is None:
                raise KeyError(f"{self.path}: pair_id {pair_id!r} is not in the queue")
            db.execute(
                f"INSERT INTO labels({', '.join(_LABEL_FIELDS)}) VALUES ({', '.join('?' * len(_LABEL_FIELDS))})",
                tuple(label[k] for k in _LABEL_FIELDS),
            )
        log.debug("label %s for %s: %s (shown %s) by %s", label["label_id"], pair_id, choice, shown_order, labeler)
        return label

    def undo_last(self, labeler: str) -> dict[str, Any] | None:
        """Delete ``labeler``'s most recent label; returns it, or None when there is none."""
        with self._write() as db:
            row = db.execute(
                f"SELECT id, {', '.join(_LABEL_FIELDS)} FROM labels WHERE labeler = ? "
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (labeler,),
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (row["id"],))
        return {k: row[k] for k in _LABEL_FIELDS}

    def labels(self, pair_id: str | None = None) -> list[dict[str, Any]]:
        """All labels (or one pair's), oldest first."""
        query = f"SELECT {', '.join(_LABEL_FIELDS)} FROM labels"
        args: tuple[Any, ...] = ()
        if pair_id is not None:
            query, args = query + " WHERE pair_id = ?", (pair_id,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY created_at, id", args).fetchall()
        return [{k: r[k] for k in _LABEL_FIELDS} for r in rows]

    def final_labels(self) -> dict[str, dict[str, Any]]:
        """The latest label of every labeled pair, by pair_id."""
        return {label["pair_id"]: label for label in self.labels()}

    # ---------------------------------------------------------------- revisions

    def record_revision(
        self,
        response: str,
        *,
        pair_id: str | None = None,
        record_key: str | None = None,
        prompt: Any = None,
        original: str | None = None,
        principle_ids: Iterable[str] | None = None,
        author: str = "",
    ) -> dict[str, Any]:
        """Store a response written by a person and commit it at once; returns the stored revision.

        For a queued pair give ``pair_id``: ``record_key`` is the pair id and ``prompt``,
        ``original`` (the AI's chosen response, ``response_a``) and ``principle_ids`` default
        to the pair's. For anything else (an SL-CAI record) give ``record_key`` (e.g.
        ``"sl:<prompt_id>"``), ``prompt`` (a message list or a plain user text) and
        ``original``. The latest revision of a ``record_key`` is the one used. Raises
        ``KeyError`` for an unknown pair and :class:`LabelQueueError` (a ``ValueError``) for an
        empty response, one identical to the original, or a missing field.
        """
        if pair_id is not None:
            pair = self.pair(pair_id)
            if pair is None:
                raise KeyError(f"{self.path}: pair_id {pair_id!r} is not in the queue")
            record_key = record_key or pair_id
            prompt = pair["prompt"] if prompt is None else prompt
            original = pair["response_a"] if original is None else original
            principle_ids = pair["principle_ids"] if principle_ids is None else principle_ids
        if isinstance(prompt, str):
            prompt = as_conversation(prompt)
        revision = {
            "revision_id": uuid.uuid4().hex,
            "record_key": record_key,
            "pair_id": pair_id,
            "prompt": prompt,
            "original": original,
            "response": response,
            "principle_ids": list(principle_ids or []),
            "author": author or "",
            "created_at": _now(),
        }
        values = _revision_values(revision, "record_revision")
        with self._write() as db:
            db.execute(
                f"INSERT INTO revisions({', '.join(_REVISION_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(_REVISION_FIELDS))})",
                values,
            )
        log.debug("revision %s for %s by %s", revision["revision_id"], record_key, author or "-")
        return dict(zip(_REVISION_FIELDS, values), prompt=prompt, principle_ids=revision["principle_ids"])

    def revisions(self) -> list[dict[str, Any]]:
        """All written responses, oldest first (``prompt`` a message list). A database made
        before revisions existed, opened read-only, has none."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    f"SELECT {', '.join(_REVISION_FIELDS)} FROM revisions ORDER BY created_at, id"
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        out = []
        for r in rows:
            rev = {k: r[k] for k in _REVISION_FIELDS}
            rev["prompt"], rev["principle_ids"] = json.loads(rev["prompt"]), json.loads(rev["principle_ids"])
            out.append(rev)
        return out

    def final_revisions(self) -> list[dict[str, Any]]:
        """The latest revision of every ``record_key``, in the order the keys were first revised."""
        return list({rev["record_key"]: rev for rev in self.revisions()}.values())

    def status(self) -> dict[str, Any]:
        """Counts: queued pairs, labeled / pending pairs, labels, final choices, reasons, labelers, revisions."""
        with self._lock:
            reason_lists = [json.loads(r[0]) for r in self._conn.execute("SELECT reasons FROM pairs")]
        labels = self.labels()
        final = {lab["pair_id"]: lab for lab in labels}
        reasons = Counter(r for rs in reason_lists for r in rs)
        return {
            "db_path": str(self.path),
            "schema_version": self.schema_version,
            "queued": len(reason_lists),
            "labeled": len(final),
            "pending": len(reason_lists) - len(final),
            "labels": len(labels),
            "by_choice": dict(Counter(lab["choice"] for lab in final.values())),
            "by_reason": dict(sorted(reasons.items())),
            "labelers": dict(Counter(lab["labeler"] for lab in labels)),
            "revisions": len(self.revisions()),
        }

    # ---------------------------------------------------------------- exchange

    def export_jsonl(self, path: str | Path) -> Path:
        """Write every pair, label and revision as JSON lines (``kind``: meta | pair | label |
        revision), atomically."""
        meta = {"kind": "meta", "schema_version": self.schema_version, "exported_at": _now(), "db_path": str(self.path)}
        rows = (
            [meta] + [{"kind": "pair", **p} for p in self.pairs()] + [{"kind": "label", **lab} for lab in self.labels()]
        )
        rows += [{"kind": "revision", **rev} for rev in self.revisions()]
        return write_jsonl(Path(path), rows)

    def import_jsonl(self, path: str | Path) -> dict[str, int]:
        """Read an export: new pairs, labels and revisions are added, known ones (same pair_id /
        label_id / revision_id) skipped, so importing twice adds nothing. Labels deleted with
        ``undo_last`` at the source are not deleted here. Returns counts added (``pairs``,
        ``labels``, ``revisions``).

        The whole file is checked first and then applied in one transaction: a bad line
        (its error names the file, the line and the field) or a label whose pair is neither
        queued nor in the file leaves the database as it was.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: label export not found")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is no text
        except UnicodeDecodeError as exc:
            raise LabelQueueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        pair_rows, labels, label_lines, revisions, pair_lines = [], [], {}, [], {}
        first: dict[tuple[str, str], tuple[int, tuple[Any, ...]]] = {}  # (id field, id) -> (line, what must agree)

        def new_id(field: str, agree: tuple[Any, ...], line: int) -> bool:
            """True for the first row with id ``agree[0]``; False for a repeat (skipped, as a queued id is) when
            ``agree`` matches the first row's; a repeat that differs raises."""
            seen = first.setdefault((field, agree[0]), (line, agree))
            if seen[0] != line and seen[1] != agree:
                raise LabelQueueError(
                    f"{path}: line {line}: field '{field}' {agree[0]!r} is already on line {seen[0]} with other "
                    "content; give each its own id or remove one; nothing was imported"
                )
            return seen[0] == line

        for i, line in jsonl_lines(text):
            try:
                row = loads_json(line)
            except json.JSONDecodeError as exc:
                raise LabelQueueError(f"{path}: line {i} is not valid JSON ({exc.msg}, column {exc.colno})") from exc
            kind = row.get("kind") if isinstance(row, dict) else None
            where = f"{path}: line {i}"
            if kind == "meta":
                version = row.get("schema_version", 0)
                if isinstance(version, bool) or not isinstance(version, int):
                    raise LabelQueueError(f"{where}: field 'schema_version' must be an integer, got {version!r}")
                if version > SCHEMA_VERSION:
                    raise LabelQueueError(
                        f"{where}: schema_version {version} is newer than "
                        f"this cai-dpo reads ({SCHEMA_VERSION}); upgrade cai-dpo"
                    )
            elif kind == "pair":
                values = _pair_values(row, where)
                if new_id("pair_id", values[:4], i):  # a pair is its prompt and responses (not when it was queued)
                    pair_rows.append(values)
                    pair_lines[values[0]] = i
            elif kind == "label":
                values = _label_values(row, where)
                if new_id("label_id", values, i):
                    labels.append(values)
                    label_lines[values[1]] = i
            elif kind == "revision":
                values = _revision_values(row, where)
                if new_id("revision_id", values, i):
                    revisions.append(values)
            else:
                raise LabelQueueError(f"{where}: field 'kind' must be meta, pair, label or revision, got {kind!r}")
        with self._write() as db:
            queued = {r[0]: tuple(r) for r in db.execute("SELECT pair_id, prompt, response_a, response_b FROM pairs")}
            for values in pair_rows:
                if values[0] in queued and queued[values[0]] != values[:4]:
                    raise LabelQueueError(
                        f"{path}: line {pair_lines[values[0]]}: field 'pair_id' {values[0]!r} is queued in {self.path} "
                        "with another prompt or responses (labels would apply to other answers); nothing was imported"
                    )
            added_pairs = _insert_pairs(db, pair_rows)
            known = {r[0] for r in db.execute("SELECT pair_id FROM pairs")}
            orphans = sorted({lab[1] for lab in labels} - known)
            if orphans:
                raise LabelQueueError(
                    f"{path}: line {label_lines[orphans[0]]}: field 'pair_id' {orphans[0]!r} is neither queued in "
                    f"{self.path} nor a pair in the file ({len(orphans)} such pair id(s)); nothing was imported"
                )
            before = db.total_changes
            db.executemany(
                f"INSERT INTO labels({', '.join(_LABEL_FIELDS)}) VALUES ({', '.join('?' * len(_LABEL_FIELDS))}) "
                "ON CONFLICT(label_id) DO NOTHING",
                labels,
            )
            added_labels = db.total_changes - before
            db.executemany(
                f"INSERT INTO revisions({', '.join(_REVISION_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(_REVISION_FIELDS))}) "
                "ON CONFLICT(revision_id) DO NOTHING",
                revisions,
            )
            added_revisions = db.total_changes - before - added_labels
        log.info(
            "%s: imported %d pair(s), %d label(s) and %d revision(s) from %s",
            self.path,
            added_pairs,
            added_labels,
            added_revisions,
            path,
        )
        return {"pairs": added_pairs, "labels": added_labels, "revisions": added_revisions}


def _str_list(value: Any, where: str, key: str) -> list[str]:
    """A list of strings (None: empty); a bare string is refused, not split into characters."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise LabelQueueError(f"{where}: field '{key}' must be a list of strings, got {value!r}")
    return list(value)


def _timestamp(value: Any, where: str, key: str) -> str:
    """An ISO-8601 date-time with a time zone, normalised to UTC (``created_at``, ``enqueued_at``)."""
    parsed = None
    if isinstance(value, str) and len(value) >= 16:  # at least YYYY-MM-DDTHH:MM: not a bare year like "9999"
        try:
            parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    try:
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(_dt.UTC).isoformat(timespec="microseconds")
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is past year 9999 in UTC
        pass
    raise LabelQueueError(
        f"{where}: field '{key}' must be an ISO-8601 date-time with a time zone (in years 1 to 9999 UTC), "
        f"e.g. 2026-01-31T12:00:00+00:00; got {value!r}"
    )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats as null, at any depth (JSON has no NaN: an export
    holding one would not load)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _optional_text(value: Any, where: str, key: str) -> str | None:
    """A string or null (``source``, ``category``)."""
    if value is not None and not isinstance(value, str):
        raise LabelQueueError(f"{where}: field '{key}' must be a string or null, got {value!r}")
    return value


def _pair_values(pair: dict[str, Any], where: str) -> tuple[Any, ...]:
    """The ``pairs`` row for one pair dict, checked (errors name ``where`` and the field)."""
    missing = [k for k in ("pair_id", "prompt", "response_a", "response_b") if not isinstance(pair.get(k), str)]
    if missing:
        raise LabelQueueError(
            f"{where}: field '{missing[0]}' must be a string (missing or wrong type: {', '.join(missing)})"
        )
    if not pair["pair_id"].strip():
        raise LabelQueueError(f"{where}: field 'pair_id' is empty")
    p = pair.get("p_chosen")
    if p is not None and (_num(p) is None or not 0.0 <= _num(p) <= 1.0):
        raise LabelQueueError(f"{where}: field 'p_chosen' must be a number in [0, 1] or null, got {p!r}")
    extra = pair.get("extra") or {}
    if not isinstance(extra, dict):
        raise LabelQueueError(f"{where}: field 'extra' must be an object, got {extra!r}")
    enqueued = pair.get("enqueued_at")
    return (
        pair["pair_id"],
        pair["prompt"],
        pair["response_a"],
        pair["response_b"],
        _num(p),
        json.dumps(_str_list(pair.get("principle_ids"), where, "principle_ids")),
        json.dumps(_str_list(pair.get("reasons"), where, "reasons")),
        _optional_text(pair.get("source"), where, "source"),
        _optional_text(pair.get("category"), where, "category"),
        json.dumps(_finite(extra), default=str, allow_nan=False),
        _timestamp(enqueued, where, "enqueued_at") if enqueued is not None else _now(),
    )


def _label_values(row: dict[str, Any], where: str) -> tuple[Any, ...]:
    """The ``labels`` row for one exported label, checked (errors name ``where`` and the field)."""
    for key in ("label_id", "pair_id", "labeler"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise LabelQueueError(f"{where}: field '{key}' must be a non-empty string, got {row.get(key)!r}")
    if row.get("choice") not in CHOICES:
        raise LabelQueueError(f"{where}: field 'choice' must be one of {', '.join(CHOICES)}, got {row.get('choice')!r}")
    if row.get("shown_order") not in ORDERS:
        raise LabelQueueError(f"{where}: field 'shown_order' must be 'AB' or 'BA', got {row.get('shown_order')!r}")
    comment = row.get("comment") or ""
    if not isinstance(comment, str):
        raise LabelQueueError(f"{where}: field 'comment' must be a string, got {comment!r}")
    created = _timestamp(row.get("created_at"), where, "created_at")
    return (row["label_id"], row["pair_id"], row["choice"], row["shown_order"], row["labeler"], comment, created)


def _revision_values(row: dict[str, Any], where: str) -> tuple[Any, ...]:
    """The ``revisions`` row for one revision dict, checked (errors name ``where`` and the field)."""
    for key in ("revision_id", "record_key"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise LabelQueueError(f"{where}: field '{key}' must be a non-empty string, got {row.get(key)!r}")
    for key in ("original", "response"):
        if not isinstance(row.get(key), str):
            raise LabelQueueError(f"{where}: field '{key}' must be a string, got {row.get(key)!r}")
    if not row["response"].strip():
        raise LabelQueueError(f"{where}: field 'response' is empty; write the better response first")
    if row["response"].strip() == row["original"].strip():
        raise LabelQueueError(f"{where}: field 'response' is the same as the original; edit it first")
    prompt = row.get("prompt")
    if (
        not isinstance(prompt, list)
        or not prompt
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
    ):
        raise LabelQueueError(
            f"{where}: field 'prompt' must be a non-empty list of messages "
            f"({{'role': ..., 'content': ...}}), got {prompt!r}"
        )
    pair_id = row.get("pair_id")
    if pair_id is not None and not isinstance(pair_id, str):
        raise LabelQueueError(f"{where}: field 'pair_id' must be a string or null, got {pair_id!r}")
    author = row.get("author") or ""
    if not isinstance(author, str):
        raise LabelQueueError(f"{where}: field 'author' must be a string, got {author!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return (
        row["revision_id"],
        row["record_key"],
        pair_id,
        json.dumps(messages, ensure_ascii=False),
        row["original"],
        row["response"],
        json.dumps(_str_list(row.get("principle_ids"), where, "principle_ids")),
        author,
        _timestamp(row.get("created_at"), where, "created_at"),
    )


def _insert_pairs(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Insert checked pair rows inside the caller's transaction; returns how many were new."""
    before = db.total_changes
    db.executemany(
        f"INSERT INTO pairs({', '.join(_PAIR_FIELDS)}) VALUES ({', '.join('?' * len(_PAIR_FIELDS))}) "
        "ON CONFLICT(pair_id) DO NOTHING",
        rows,
    )
    return db.total_changes - before


# --------------------------------------------------------------------------- merge


def rows_to_dataset(rows: list[dict[str, Any]], features: Any) -> datasets.Dataset:
    """A dataset of ``rows`` with the columns and types of ``features``."""
    import datasets

    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def merge_labels_with_counts(dataset: datasets.Dataset, queue: LabelQueue) -> tuple[datasets.Dataset, dict[str, int]]:
    """:func:`merge_labels`, also returning counts (labeled, overridden, swapped, excluded_tie,
    excluded_skip, mismatched)."""
    final = queue.final_labels()
    pairs = {p["pair_id"]: p for p in queue.pairs()} if final else {}
    counts = Counter(
        {"labeled": 0, "overridden": 0, "swapped": 0, "excluded_tie": 0, "excluded_skip": 0, "mismatched": 0}
    )
    out = []
    for row in dataset.to_list():
        label = final.get(row.get("pair_id"))
        if label is None:
            out.append(row)
            continue
        counts["labeled"] += 1
        if label["choice"] in ("tie", "skip"):
            counts[f"excluded_{label['choice']}"] += 1
            continue
        pair = pairs[label["pair_id"]]
        preferred = pair["response_a"] if label["choice"] == "A" else pair["response_b"]
        if preferred == _text(row["chosen"]):
            pass
        elif preferred == _text(row["rejected"]):
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            counts["swapped"] += 1
        else:
            log.warning(
                "pair %s: the queued responses no longer match the preference row; label not applied", row["pair_id"]
            )
            counts["mismatched"] += 1
            out.append(row)
            continue
        row["p_chosen"] = 1.0
        if "margin" in row:
            row["margin"] = 1.0
        if "source" in row:
            row["source"] = "human"
        counts["overridden"] += 1
        out.append(row)
    return rows_to_dataset(out, dataset.features), dict(counts)


def merge_labels(dataset: datasets.Dataset, queue: LabelQueue) -> datasets.Dataset:
    """Apply the latest human label of each queued pair to the preference rows.

    "A"/"B" become hard labels (p_chosen=1.0, margin=1.0, source="human", chosen/rejected
    swapped when the person preferred the AI's rejected response); "tie" and "skip" remove
    the row. Merging an already merged dataset changes nothing.
    """
    return merge_labels_with_counts(dataset, queue)[0]


# --------------------------------------------------------------------------- revisions as training data


def revision_sft_rows(queue: LabelQueue) -> list[dict[str, Any]]:
    """SFT rows from the latest revision of each record: ``messages`` (the prompt turns, then
    the written response as the assistant turn), ``source`` ``human_revision``, ``id`` (the
    record key), ``kind`` "", ``principle_ids``, ``weight`` None (set by the SFT weighting),
    and ``original`` (the response it replaces)."""
    return [
        {
            "messages": [*rev["prompt"], {"role": "assistant", "content": rev["response"]}],
            "source": REVISION_SOURCE,
            "kind": "",
            "id": rev["record_key"],
            "principle_ids": rev["principle_ids"],
            "weight": None,
            "original": rev["original"],
        }
        for rev in queue.final_revisions()
    ]


def revision_pref_rows(queue: LabelQueue, columns: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Preference pairs from the latest revision of each record: chosen = the written
    response, rejected = the original, ``p_chosen`` = ``margin`` = 1.0, ``source``
    ``human_revision``, ``pair_id`` ``revision:<record_key>``. With ``columns`` every row has
    exactly those keys (missing ones None, list-valued ones an empty list)."""
    rows = []
    for rev in queue.final_revisions():
        row = {
            "prompt": rev["prompt"],
            "chosen": [{"role": "assistant", "content": rev["response"]}],
            "rejected": [{"role": "assistant", "content": rev["original"]}],
            "p_chosen": 1.0,
            "margin": 1.0,
            "source": REVISION_SOURCE,
            "principle_ids": rev["principle_ids"],
            "per_principle": [],
            "edge_reasons": [],
            "pair_id": f"revision:{rev['record_key']}",
        }
        if columns is not None:
            row = {k: row.get(k) for k in columns}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the run's queue


def queue_path(cfg: RunConfig) -> Path:
    """The label database of a run: ``labels.db_path`` or ``<run_dir>/labels.sqlite``."""
    return Path(cfg.labels.db_path).expanduser() if cfg.labels.db_path else RunLayout(cfg.run_dir).labels_db


def open_queue(cfg: RunConfig) -> LabelQueue:
    """Open (creating if needed) the run's label queue."""
    return LabelQueue(queue_path(cfg))
