"""Run folders, resumable record shards, atomic writes and manifests.

Records are dicts keyed by a content hash of their inputs. A :class:`RecordStore`
appends each finished batch as a new shard file written atomically (temp file, fsync,
rename), so a process killed at any moment loses at most the batch in flight and
never leaves a partial or duplicated record; a rerun reads the shards and skips
every key already present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKED_PACKAGES = ("cai-dpo", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Atomically write JSON (indented, keys kept in order)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Characters ``str.splitlines()`` (and some editors) treat as line breaks that JSON allows raw in a
#: string; a JSON line escapes them so every reader sees one record a line. (The C0 ones, such as
#: ``\x0b`` and ``\x1c``, are always escaped by ``json.dumps``.)
_RAW_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_dumps(obj: Any) -> str:
    """One JSON line for ``obj`` (no trailing newline): UTF-8 text kept readable, but U+0085,
    U+2028 and U+2029 escaped, so no reader can split the record; ``json.loads`` restores them."""
    text = json.dumps(obj, ensure_ascii=False, default=_json_default)
    for char, escaped in _RAW_LINE_BREAKS.items():
        if char in text:
            text = text.replace(char, escaped)  # only possible inside a JSON string
    return text


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of JSON-lines text, split on ``\n`` only (``\r\n`` accepted).

    Never ``str.splitlines()``: that also splits on U+2028, U+0085 and other characters
    that are valid raw inside a JSON string. Blank lines are skipped.
    """
    for i, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            yield i, line


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Atomically write rows as JSON lines (see :func:`jsonl_dumps`)."""
    text = "".join(jsonl_dumps(r) + "\n" for r in rows)
    return atomic_write_text(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines (split on ``\n`` only); a malformed line raises naming the file and line."""
    from cai_dpo.errors import InputError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = []
    for i, line in jsonl_lines(text):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {i} is not valid JSON ({exc.msg}, column {exc.colno})") from exc
    return rows


# --------------------------------------------------------------------------- hashing


def content_hash(*parts: Any, length: int = 16) -> str:
    """Stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes) in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


# --------------------------------------------------------------------------- records


class RecordStore:
    """Append-only, resumable store of keyed records in ``<folder>/shard-*.jsonl``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, dict[str, Any]] | None = None

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.jsonl"))

    def load(self) -> dict[str, dict[str, Any]]:
        """All records by key (first occurrence wins, so a duplicate can never appear)."""
        if self._cache is None:
            records: dict[str, dict[str, Any]] = {}
            for shard in self._shards():
                for row in read_jsonl(shard):
                    records.setdefault(row["key"], row)
            self._cache = records
        return self._cache

    def done_keys(self) -> set[str]:
        """Keys already written."""
        return set(self.load())

    def __len__(self) -> int:
        return len(self.load())

    def __contains__(self, key: str) -> bool:
        return key in self.load()

    def get(self, key: str) -> dict[str, Any] | None:
        """One record, or None."""
        return self.load().get(key)

    def records(self) -> list[dict[str, Any]]:
        """All records in write order."""
        return list(self.load().values())

    def append(self, records: list[dict[str, Any]]) -> int:
        """Write a batch as one new shard; records whose key exists are skipped. Returns count written."""
        existing = self.load()
        fresh = []
        for rec in records:
            if "key" not in rec:
                raise ValueError("every record needs a 'key' field (use content_hash of its inputs)")
            if rec["key"] not in existing and all(r["key"] != rec["key"] for r in fresh):
                fresh.append(rec)
        if not fresh:
            return 0
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.jsonl"
        write_jsonl(self.folder / name, fresh)
        for rec in fresh:
            existing[rec["key"]] = rec
        return len(fresh)


# --------------------------------------------------------------------------- manifests


def git_commit() -> str | None:
    """The current git commit of the project checkout, or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Manifest:
    """What produced an artifact: config, inputs, models, versions, counts, timings."""

    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        """Write ``manifest.json`` (atomically) with versions, git commit and host added."""
        body = {
            "stage": self.stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config,
            "inputs": self.inputs,
            "models": self.models,
            "counts": self.counts,
            "timings": self.timings,
            "metrics": self.metrics,
            "notes": self.notes,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "host": {"python": platform.python_version(), "machine": platform.machine()},
        }
        return atomic_write_json(path, body)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest; a missing file raises naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found; has the stage that writes it run?")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- runs


class RunStore:
    """A run folder ``<runs_dir>/<run_id>/`` and the conventional places inside it."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        """A path inside the run (parents created)."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def records(self, name: str) -> RecordStore:
        """The record store ``records/<name>/``."""
        return RecordStore(self.root / "records" / name)

    def data_dir(self, name: str) -> Path:
        """Folder of dataset ``name`` (``data/<name>``)."""
        return self.path("data", name)

    def model_dir(self, name: str) -> Path:
        """Folder of adapter/model ``name`` (``models/<name>``)."""
        return self.path("models", name)

    def metrics_dir(self, name: str) -> Path:
        """Folder of metrics of stage ``name`` (``metrics/<name>``)."""
        p = self.path("metrics", name)
        p.mkdir(parents=True, exist_ok=True)
        return p


class Timer:
    """Measure wall time of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
