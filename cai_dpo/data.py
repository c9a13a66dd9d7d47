"""Prompt sources: bundled sets, JSONL, CSV, plain text, hh-rlhf transcripts and saved datasets.

Every source becomes a list of :class:`Prompt`. A spec string picks the source:

- ``bundled:red_team`` / ``bundled:helpful`` — the sets in ``cai_dpo/prompts/``;
- ``*.jsonl`` (or a ``*.json`` list) — one object a line, text in ``text`` or ``prompt`` (or ``messages``, or an
  hh-rlhf ``chosen`` transcript); optional ``id``, ``category``, ``split``;
- ``*.csv`` / ``*.tsv`` — a header row with a ``text`` or ``prompt`` column (comma- or tab-separated by the
  extension); optional ``id``, ``category``, ``split``;
- ``*.txt`` — one prompt per line; a file whose first line starts with ``Human:`` is read
  as transcripts instead (also ``*.transcript(s)``);
- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``).

Transcripts ("Human: … Assistant: …", hh-rlhf style) are separated by a line holding only
``---`` (or given one per JSONL row). The prompt is the conversation up to and including the
*last* human turn (:attr:`Prompt.transcript`, what :meth:`Prompt.conversation` gives with
``full=True``); text-only consumers (:attr:`Prompt.text`) get that last human turn. Assistant
turns after it (the data set's reference reply) are kept in ``meta["reference_reply"]`` and
never shown to the model as part of the prompt.

Files are split into lines on ``\n`` only (never ``str.splitlines()``), so U+2028, U+2029 and
U+0085 inside a JSON string or a prompt stay part of their line.

Bad input raises :class:`PromptFileError` naming the file, the line or row, and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_dpo.errors import CaiDpoInputError, ContextLengthError
from cai_dpo.schema import as_conversation

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).parent / "prompts"
BUNDLED_SETS: tuple[str, ...] = ("red_team", "helpful")
SPLITS: tuple[str, ...] = ("train", "heldout")
TEXT_FIELDS: tuple[str, ...] = ("text", "prompt")
_SPLIT_ALIASES = {
    "train": "train",
    "heldout": "heldout",
    "test": "heldout",
    "eval": "heldout",
    "validation": "heldout",
    "valid": "heldout",
    "dev": "heldout",
}
_SEPARATOR_RE = re.compile(r"^\s*(-{3,}|={3,})\s*$", re.M)
_TURN_RE = re.compile(r"^[ \t]*(Human|Assistant):[ \t]?", re.M)


class PromptFileError(CaiDpoInputError):
    """A prompt source is unusable; names the file, the line/row and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        row_kind: str = "line",
    ):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.message = message
        where = [self.file or "<prompts>"]
        if line is not None:
            where.append(f"{row_kind} {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where) + ": " + message)


@dataclass
class Prompt:
    """One prompt: stable id, user text, category, split (train/heldout) and source.

    ``transcript`` holds the prompt conversation when the prompt came from a transcript or a
    message list (list of {role, content}, ending with the last user turn; ``text`` is that
    turn); ``meta`` keeps any other fields of the source row (and ``reference_reply``, the
    assistant turn(s) a transcript had after its last user turn). ``file`` / ``line`` say
    where the prompt was read (None for built prompts), so errors can point at it.
    """

    id: str
    text: str
    category: str = "general"
    split: str | None = None
    source: str = "file"
    transcript: list[dict[str, str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    file: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)

    def where(self) -> str:
        """``file line N (prompt id X)`` — where this prompt came from, for error messages."""
        place = f"{self.file} line {self.line}" if self.file and self.line else (self.file or "prompt")
        return f"{place} (prompt id {self.id})"

    def conversation(self, system: str | None = None, full: bool = False) -> list[dict[str, str]]:
        """Chat messages for this prompt (one user turn), or the whole transcript with ``full``."""
        if full and self.transcript:
            msgs = [dict(m) for m in self.transcript]
            if system is not None and (not msgs or msgs[0]["role"] != "system"):
                msgs.insert(0, {"role": "system", "content": system})
            return msgs
        return as_conversation(self.text, system)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        d: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "category": self.category,
            "split": self.split,
            "source": self.source,
        }
        if self.transcript is not None:
            d["transcript"] = self.transcript
        if self.meta:
            d["meta"] = self.meta
        return d


def name_prompt_error(exc: ContextLengthError, prompts: Sequence[Prompt]) -> ContextLengthError:
    """``exc`` (raised for ``prompts[exc.index]``) restated to name that prompt's file, line and id."""
    if exc.index is None or not 0 <= exc.index < len(prompts):
        return exc
    return ContextLengthError(f"{prompts[exc.index].where()}: {exc}", index=exc.index)


def prompt_id(text: str, prefix: str = "p") -> str:
    """Stable id from a prompt's text."""
    return f"{prefix}-{hashlib.sha256(text.strip().encode('utf-8')).hexdigest()[:12]}"


# --------------------------------------------------------------------------- transcripts


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split a "Human: … Assistant: …" transcript into chat messages (user/assistant).

    Raises ValueError when there is no ``Human:`` turn. An empty trailing turn (a transcript
    ending in ``Assistant:``) is dropped.
    """
    matches = list(_TURN_RE.finditer(text))
    if not matches or matches[0].group(1) != "Human":
        raise ValueError("no 'Human:' turn at the start of the transcript")
    if text[: matches[0].start()].strip():
        raise ValueError("text before the first 'Human:' turn")
    msgs = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        content = text[m.end() : end].strip()
        role = "user" if m.group(1) == "Human" else "assistant"
        if not content:
            if i == len(matches) - 1:
                break
            raise ValueError(f"turn {i + 1} ({m.group(1)}:) is empty")
        msgs.append({"role": role, "content": content})
    return msgs


def _is_transcript(text: str) -> bool:
    return bool(re.match(r"\s*Human:", text))


def _lines(text: str) -> list[str]:
    """Lines of a text file split on ``\n`` only (``str.splitlines`` also splits on U+2028 etc.)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def prompt_turns(msgs: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, str | None]:
    """Split a conversation into (the prompt up to and including its last user turn, that turn's
    text, the reference reply after it or None). Raises ValueError when there is no user turn."""
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user" and m["content"].strip()), default=None)
    if last is None:
        raise ValueError("no user turn")
    tail = [m["content"] for m in msgs[last + 1 :] if m["role"] == "assistant"]
    return msgs[: last + 1], msgs[last]["content"].strip(), ("\n\n".join(tail) if tail else None)


def _conversation_prompt(
    msgs: list[dict[str, str]],
    file: Path,
    line: int,
    source: str,
    category: str,
    split: str | None,
    pid: str,
    meta: dict[str, Any],
) -> Prompt:
    """The prompt of a conversation: its turns up to the last user turn, that turn's text, and the
    assistant reply after it (if any) as ``meta["reference_reply"]``."""
    prompt_msgs, last, reference = prompt_turns(msgs)
    if reference is not None:
        meta = {**meta, "reference_reply": reference}
    return Prompt(
        id=pid,
        text=last,
        category=category,
        split=split,
        source=source,
        transcript=prompt_msgs,
        meta=meta,
        file=str(file),
        line=line,
    )


def _from_transcript(
    raw: str,
    file: Path,
    line: int,
    fld: str | None,
    source: str,
    category: str,
    split: str | None,
    pid: str | None,
    meta: dict[str, Any],
    row_kind: str = "line",
) -> Prompt:
    try:
        msgs = parse_transcript(raw)
    except ValueError as exc:
        raise PromptFileError(
            f"bad transcript: {exc}; write 'Human: …' then 'Assistant: …'",
            file=file,
            line=line,
            field=fld,
            row_kind=row_kind,
        ) from exc
    return _conversation_prompt(msgs, file, line, source, category, split, pid or prompt_id(raw), meta)


# --------------------------------------------------------------------------- rows -> prompts


def _norm_split(value: Any, file: Path, line: int, row_kind: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    key = str(value).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise PromptFileError(
            f"unknown split {value!r}; use train or heldout", file=file, line=line, field="split", row_kind=row_kind
        )
    return _SPLIT_ALIASES[key]


def _row_to_prompt(
    row: Mapping[str, Any], file: Path, line: int, source: str, text_field: str | None, row_kind: str = "line"
) -> Prompt:
    """One JSONL object / CSV row / dataset row as a Prompt."""
    category = str(row.get("category") or "general")
    split = _norm_split(row.get("split"), file, line, row_kind)
    pid = row.get("id")
    pid = str(pid) if pid not in (None, "") else None
    fields = (text_field,) if text_field else TEXT_FIELDS
    meta = {
        k: v
        for k, v in row.items()
        if k not in (*fields, "id", "category", "split", "messages", "conversation", "chosen", "rejected")
    }
    for f in fields:
        if f in row and row[f] is not None:
            value = row[f]
            if not isinstance(value, str):
                raise PromptFileError(
                    f"must be text, got {type(value).__name__}", file=file, line=line, field=f, row_kind=row_kind
                )
            if not value.strip():
                raise PromptFileError("empty prompt text", file=file, line=line, field=f, row_kind=row_kind)
            if _is_transcript(value):
                return _from_transcript(value, file, line, f, source, category, split, pid, meta, row_kind)
            return Prompt(
                id=pid or prompt_id(value),
                text=value.strip(),
                category=category,
                split=split,
                source=source,
                meta=meta,
                file=str(file),
                line=line,
            )
    if text_field is None:
        for f in ("messages", "conversation"):
            if isinstance(row.get(f), list):
                return _from_messages(row[f], file, line, f, source, category, split, pid, meta, row_kind)
        if isinstance(row.get("chosen"), str):  # hh-rlhf rows
            return _from_transcript(row["chosen"], file, line, "chosen", source, category, split, pid, meta, row_kind)
    want = " or ".join(repr(f) for f in fields)
    raise PromptFileError(
        f"missing the prompt text: expected a {want} field (found {sorted(row)})",
        file=file,
        line=line,
        field=fields[0],
        row_kind=row_kind,
    )


def _from_messages(
    msgs: Any,
    file: Path,
    line: int,
    fld: str,
    source: str,
    category: str,
    split: str | None,
    pid: str | None,
    meta: dict[str, Any],
    row_kind: str,
) -> Prompt:
    ok = all(
        isinstance(m, Mapping)
        and isinstance(m.get("content"), str)
        and m.get("role") in ("system", "user", "assistant")
        for m in msgs
    )
    users = [m["content"] for m in msgs if ok and m["role"] == "user" and m["content"].strip()]
    if not ok or not users:
        raise PromptFileError(
            "must be a list of {role, content} with at least one user turn",
            file=file,
            line=line,
            field=fld,
            row_kind=row_kind,
        )
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return _conversation_prompt(clean, file, line, source, category, split, pid or prompt_id(json.dumps(clean)), meta)


# --------------------------------------------------------------------------- file formats


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from exc
    if not text.strip():
        raise PromptFileError("file is empty; add at least one prompt", file=path)
    return text


def load_jsonl(path: str | Path, source: str | None = None, text_field: str | None = None) -> list[Prompt]:
    """Prompts from a JSON-lines file."""
    path = Path(path)
    src = source or path.stem
    out = [_row_to_prompt(row, path, i, src, text_field) for i, row in _jsonl_objects(path)]
    return _finish(out, path)


def _jsonl_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line (split on ``\n`` only); errors name the file and line."""
    from cai_dpo.store import jsonl_lines, loads_json

    rows = []
    for i, line in jsonl_lines(_read_text(path)):
        try:
            row = loads_json(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"not valid JSON ({exc.msg}, column {exc.colno})", file=path, line=i) from exc
        if not isinstance(row, dict):
            raise PromptFileError(f"expected a JSON object, got {type(row).__name__}", file=path, line=i)
        rows.append((i, row))
    return rows


def load_json_array(path: str | Path, source: str | None = None, text_field: str | None = None) -> list[Prompt]:
    """Prompts from a JSON file holding a list of objects."""
    from cai_dpo.store import loads_json

    path = Path(path)
    try:
        data = loads_json(_read_text(path))
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"not valid JSON ({exc.msg}, column {exc.colno})", file=path, line=exc.lineno) from exc
    if not isinstance(data, list):
        raise PromptFileError("expected a list of objects (or use .jsonl, one object a line)", file=path)
    out = []
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise PromptFileError(
                f"expected a JSON object, got {type(row).__name__}", file=path, line=i, row_kind="item"
            )
        out.append(_row_to_prompt(row, path, i, source or path.stem, text_field, row_kind="item"))
    return _finish(out, path)


def load_csv(
    path: str | Path, source: str | None = None, text_field: str | None = None, delimiter: str | None = None
) -> list[Prompt]:
    """Prompts from a CSV file with a header row; ``*.tsv`` (or ``delimiter="\t"``) is tab-separated.

    Quoted cells may span lines; rows are numbered from the header (row 1).
    """
    path = Path(path)
    src = source or path.stem
    text = _read_text(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # strict: a quote left open swallowed the rest of the file into one cell
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    try:
        header = list(reader.fieldnames or [])
        rows.extend(reader)
    except csv.Error as exc:  # rows are numbered by record, the header being row 1
        raise PromptFileError(
            f"not valid CSV ({exc}); a cell that starts with a quote must be quoted whole, inner quotes doubled",
            file=path,
            line=len(rows) + (1 if header is None else 2),
            row_kind="row",
        ) from exc
    fields = (text_field,) if text_field else TEXT_FIELDS
    if not any(f in header for f in fields):
        raise PromptFileError(
            f"no {' or '.join(repr(f) for f in fields)} column in the header {header}; name the prompt column 'text'",
            file=path,
            line=1,
            field=fields[0],
            row_kind="row",
        )
    out = []
    for i, row in enumerate(rows, 2):
        if None in row:
            raise PromptFileError(f"more cells than header columns ({len(header)})", file=path, line=i, row_kind="row")
        if all(not (v or "").strip() for v in row.values()):
            continue
        out.append(_row_to_prompt(row, path, i, src, text_field, row_kind="row"))
    return _finish(out, path)


def load_text(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Prompts from a text file, one a line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    text = _read_text(path)
    first = next(line for line in _lines(text) if line.strip())
    if _is_transcript(first):
        return load_transcripts(path, source)
    src = source or path.stem
    out = [
        Prompt(id=prompt_id(line), text=line.strip(), source=src, file=str(path), line=i)
        for i, line in enumerate(_lines(text), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return _finish(out, path)


def load_transcripts(path: str | Path, source: str | None = None) -> list[Prompt]:
    """Prompts from "Human: … Assistant: …" transcripts separated by ``---`` lines."""
    path = Path(path)
    src = source or path.stem
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 1
    for i, line in enumerate(_lines(_read_text(path)), 1):
        if _SEPARATOR_RE.fullmatch(line):
            blocks.append((start, current))
            current, start = [], i + 1
        else:
            if not current and not line.strip():
                start = i + 1
                continue
            current.append(line)
    blocks.append((start, current))
    out = [
        _from_transcript("\n".join(lines).strip(), path, first, None, src, "general", None, None, {})
        for first, lines in blocks
        if "".join(lines).strip()
    ]
    return _finish(out, path)


def load_dataset_dir(path: str | Path, source: str | None = None, text_field: str | None = None) -> list[Prompt]:
    """Prompts from a ``save_to_disk`` folder (Dataset, or DatasetDict whose split names map to splits)."""
    import datasets

    path = Path(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise PromptFileError(
            f"not a saved dataset folder ({exc}); write it with Dataset.save_to_disk", file=path
        ) from exc
    src = source or path.name
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    out = []
    for split_name, part in parts:
        for i, row in enumerate(part):
            if split_name is not None and not row.get("split"):
                row = {**row, "split": _SPLIT_ALIASES.get(split_name.lower(), split_name)}
            name = f"{path} [{split_name}]" if split_name else path
            out.append(_row_to_prompt(row, Path(str(name)), i + 1, src, text_field, row_kind="row"))
    if not out:
        raise PromptFileError("dataset has no rows", file=path)
    return _finish(out, path)


def _finish(prompts: list[Prompt], path: Path) -> list[Prompt]:
    """Drop exact duplicates (same id and text, with a warning); reject conflicting ids."""
    if not prompts:
        raise PromptFileError("no prompts found; add at least one", file=path)
    seen: dict[str, Prompt] = {}
    unique = []
    for p in prompts:
        if p.id in seen:
            if seen[p.id].text != p.text:
                raise PromptFileError(
                    f"duplicate id {p.id!r} for two different prompts; ids must be unique", file=path, field="id"
                )
            log.warning("%s: duplicate prompt %s skipped", path, p.id)
            continue
        seen[p.id] = p
        unique.append(p)
    return unique


# --------------------------------------------------------------------------- entry points


def bundled_path(name: str) -> Path:
    """Path of a bundled prompt file (``red_team``, ``helpful``, ``judge_checkset``)."""
    path = PROMPTS_DIR / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"bundled:{name}: no such prompt set; use one of {', '.join('bundled:' + s for s in BUNDLED_SETS)}"
        )
    return path


def load_prompts(
    spec: str | Path, *, source: str | None = None, text_field: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """Load prompts from a spec: ``bundled:NAME``, a .jsonl/.csv/.txt/transcript file or a dataset folder.

    ``source`` overrides each prompt's source label (default: the set or file name);
    ``limit`` keeps the first N.
    """
    spec_s = str(spec)
    if spec_s.startswith("bundled:"):
        name = spec_s.split(":", 1)[1]
        prompts = load_jsonl(bundled_path(name), source=source or name)
    else:
        from cai_dpo.config import resolve_path

        path = resolve_path(spec_s)
        if not path.exists():
            raise FileNotFoundError(
                f"{spec_s}: prompt file not found; pass a file, a dataset folder or "
                f"one of {', '.join('bundled:' + s for s in BUNDLED_SETS)}"
            )
        if path.is_dir():
            prompts = load_dataset_dir(path, source, text_field)
        else:
            suffix = path.suffix.lower()
            if suffix == ".json" and _read_text(path).lstrip().startswith("["):  # _read_text: errors name the file
                prompts = load_json_array(path, source, text_field)
            elif suffix in (".jsonl", ".json", ".ndjson"):
                prompts = load_jsonl(path, source, text_field)
            elif suffix in (".csv", ".tsv"):
                prompts = load_csv(path, source, text_field)
            elif suffix in (".transcript", ".transcripts"):
                prompts = load_transcripts(path, source)
            else:
                prompts = load_text(path, source)
    if limit is not None:
        prompts = prompts[:limit]
    log.debug("loaded %d prompts from %s", len(prompts), spec_s)
    return prompts


def assign_splits(prompts: list[Prompt], heldout_fraction: float = 0.25, seed: int | str = 0) -> list[Prompt]:
    """Give prompts without a split one: a stable, per-category (stratified) hash order.

    Prompts that already have a split keep it; returns new Prompt objects.
    """
    from dataclasses import replace

    if not 0 <= heldout_fraction <= 1:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.split is None:
            by_cat[p.category].append(i)
    out = list(prompts)
    for idx in by_cat.values():
        order = sorted(idx, key=lambda i: hashlib.sha256(f"{seed}|{prompts[i].id}".encode()).hexdigest())
        n_held = round(len(order) * heldout_fraction)
        for rank, i in enumerate(order):
            out[i] = replace(prompts[i], split="heldout" if rank < n_held else "train")
    return out


def split_prompts(
    prompts: Iterable[Prompt], split: str = "train", heldout_fraction: float = 0.25, seed: int | str = 0
) -> list[Prompt]:
    """The prompts of one split (``train`` or ``heldout``); unsplit prompts are assigned first."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p for p in assign_splits(list(prompts), heldout_fraction, seed) if p.split == split]


# --------------------------------------------------------------------------- judge check set


@dataclass
class CheckPair:
    """A clear-cut comparison with a known better response (for measuring judge accuracy)."""

    id: str
    prompt: str
    better: str
    worse: str
    category: str
    principle_id: str | None = None


def load_checkset(spec: str | Path = "bundled:judge_checkset") -> list[CheckPair]:
    """Labelled pairs {id?, prompt, better, worse, category, principle_id?} from JSONL."""
    path = bundled_path(str(spec).split(":", 1)[1]) if str(spec).startswith("bundled:") else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: check set not found")
    out = []
    for i, row in _jsonl_objects(path):
        for key in ("prompt", "better", "worse", "category"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise PromptFileError("missing or empty", file=path, line=i, field=key)
        out.append(
            CheckPair(
                id=str(row.get("id") or prompt_id(row["prompt"] + row["better"], "check")),
                prompt=row["prompt"],
                better=row["better"],
                worse=row["worse"],
                category=row["category"],
                principle_id=row.get("principle_id"),
            )
        )
    if not out:
        raise PromptFileError("no pairs found", file=path)
    return out
