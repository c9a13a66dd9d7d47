"""Run folders, resumable record shards, atomic writes and manifests.

Records are dicts keyed by a content hash of their inputs. A :class:`RecordStore`
appends each finished batch as a new shard file written atomically (temp file, fsync,
rename), so a process killed at any moment loses at most the batch in flight and
never leaves a partial or duplicated record; a rerun reads the shards and skips
every key already present.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
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
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename. Raises
    IsADirectoryError naming ``path`` when a folder is there (the rename would name the temp file)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder is there; name a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
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
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one atomic step.

    Write the artifact *and every side file* (notes, manifest) into the yielded folder:
    a process killed at any moment leaves either the old ``final`` or the new one, never
    a mix. The files are fsynced, then the swap is one ``renameat2(RENAME_EXCHANGE)`` on
    Linux (two renames elsewhere, which :func:`recover_dir` repairs after a kill between
    them), then the parent folder is fsynced. Leftovers of killed writers are cleared first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_dir(tmp, final)
        _fsync_dir(final.parent)
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


# a \uD800-\uDFFF escape, not preceded by an escaped backslash ("C:\\ud800" is text)
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object (raised inside ``json.loads``; see :func:`loads_json`)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


#: a JSON string (``group(1)``: the colon after it, when it is a key) or a brace
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"(\s*:)?|[{}]')


def _repeat_at(text: str, key: str) -> int:
    """Index in valid JSON ``text`` of the first key ``key`` that its object already has (0 if none)."""
    keys: list[set[str]] = []  # one set per open object
    for m in _JSON_TOKEN.finditer(text):
        if m.group(0) == "{":
            keys.append(set())
        elif m.group(0) == "}":
            keys.pop()
        elif m.group(1) and keys:
            name = json.loads(text[m.start() : m.start(1)])
            if name == key and name in keys[-1]:
                return m.start()
            keys[-1].add(name)
    return 0


def loads_json(text: str) -> Any:
    """``json.loads`` for input files, refusing what JSON's grammar allows but no writer means:
    a key given twice in one object (``json.loads`` keeps the last, so a second ``"response"``
    silently replaced the first), and a lone UTF-16 surrogate escape (``"\\ud800"`` without its
    pair), which is no text (UTF-8 cannot encode it, and tokenizers, SQLite and hashing fail on it
    later, with a traceback). Raises ``json.JSONDecodeError`` at the column of the second key or of
    the escape."""
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        key = exc.args[0]
        raise json.JSONDecodeError(f"key {key!r} given twice in one object", text, _repeat_at(text, key)) from None
    if _SURROGATE_ESCAPE.search(text) is None:
        return obj
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        matches = list(_SURROGATE_ESCAPE.finditer(text))
        codes = [int(m.group(1)[2:], 16) for m in matches]
        pos, i = matches[0].start(1), 0
        while i < len(matches):  # skip high + low pairs; the first other escape is the lone one
            pair = i + 1 < len(matches) and matches[i + 1].start(1) == matches[i].end(1)
            if pair and codes[i] < 0xDC00 <= codes[i + 1]:
                i += 2
                continue
            pos = matches[i].start(1)
            break
        raise json.JSONDecodeError(
            f"a lone UTF-16 surrogate escape ({text[pos : pos + 6]}) is not text", text, pos
        ) from None
    return obj


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange_function() -> Any:
    """glibc's ``renameat2`` (Linux), or None where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _exchange_function()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False where the system cannot."""
    if _renameat2 is None:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def _swap_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``; what was there ends up in ``tmp`` (then removed)."""
    if final.exists() and _exchange(tmp, final):
        return
    if not final.exists():
        os.replace(tmp, final)
        return
    # fallback: two renames; a kill between them leaves ``final`` missing and ``.<name>.old-<pid>``
    # present, which recover_dir() renames back
    old = _old_name(final)
    os.replace(final, old)
    _fsync_dir(final.parent)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(final: Path) -> bool:
    """Repair what a writer of ``final`` killed mid-swap left; True when ``final`` was restored.

    ``final`` missing and ``.<name>.old-<pid>`` present (killed between the two renames of
    the fallback swap): the old folder is renamed back. Old folders beside an existing
    ``final`` and temp folders of writers no longer alive are removed.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return False
    restored = False
    olds = sorted(parent.glob(f".{glob.escape(final.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds[-1], final)
        _fsync_dir(parent)
        log.warning("%s: restored from %s (a writer was killed while replacing it)", final, olds[-1].name)
        olds, restored = olds[:-1], True
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2 :].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    return restored


def recover_tree(root: Path) -> list[Path]:
    """:func:`recover_dir` for every interrupted swap under ``root``; returns the folders restored."""
    root = Path(root)
    restored = []
    if not root.is_dir():
        return restored
    for old in sorted(root.rglob(".*.old-*")):
        name = old.name[1:].rsplit(".old-", 1)[0]
        final = old.with_name(name)
        if recover_dir(final):
            restored.append(final)
    return restored


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so renames inside it survive a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place)."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Atomically write rows as JSON lines (see :func:`jsonl_dumps`)."""
    text = "".join(jsonl_dumps(r) + "\n" for r in rows)
    return atomic_write_text(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON lines (split on ``\n`` only); a malformed line raises naming the file and line."""
    from cai_dpo.errors import InputError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    rows = []
    for i, line in jsonl_lines(text):
        try:
            rows.append(loads_json(line))
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


def dataset_hash(folder: Path) -> str:
    """Content hash of a saved dataset's Arrow data (not its manifest, metadata or cache files)."""
    files = sorted(Path(folder).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no data-*.arrow files; is this a dataset saved with save_to_disk?")
    return content_hash([file_hash(f) for f in files])


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
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- runs

#: The run layout: every artifact's place inside a run folder, by name, relative to the run
#: folder. :class:`RunLayout`'s named paths and the inputs and outputs of
#: :data:`cai_dpo.pipeline.STAGES` are built from this one table; runs made before use the
#: same paths. ``{ppo_mode}`` is the RL stage's own result (``ppo`` or ``rloo``).
RUN_LAYOUT: dict[str, str] = {
    "config_file": "config.yaml",
    "labels_db": "labels.sqlite",
    "constitution": "constitution",
    "sl_data": "data/sl",
    "curated_data": "data/curated",
    "pairs": "data/pairs",
    "pairs_file": "data/pairs/pairs.jsonl",
    "preferences": "data/preferences",
    "preferences_merged": "data/preferences_merged",
    "sft_adapter": "models/sft",
    "sft_merged": "models/sft-merged",
    "dpo_adapter": "models/dpo",
    "dpo_merged": "models/dpo-merged",
    "preference_model": "models/rm",
    "rl_adapter": "models/{ppo_mode}",
    "eval_dir": "eval",
    "eval_results": "eval/results.json",
    "report_dir": "report",
    "report_file": "report/report.md",
    "dpo_rounds": "dpo_rounds",
    "checkpoints": "checkpoints",
    "exports": "export",
    "records": "records",
    "metrics": "metrics",
    "data": "data",
    "models": "models",
}

MANIFEST = "manifest.json"


def artifact_manifest(name: str) -> str:
    """``<artifact>/manifest.json`` of the artifact ``name`` of :data:`RUN_LAYOUT`, relative to the run folder."""
    return f"{RUN_LAYOUT[name]}/{MANIFEST}"


class RunLayout:
    """The named places of a run folder (:data:`RUN_LAYOUT`); creates nothing.

    Build one from any run folder (``RunLayout(cfg.run_dir)``) to read a run without
    touching it; :class:`RunStore` has the same names and creates parent folders as its
    paths are asked for.
    """

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir)

    def _at(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def named(self, name: str, **fmt: str) -> Path:
        """The path of artifact ``name`` of :data:`RUN_LAYOUT` (``fmt`` fills its placeholders)."""
        return self._at(*RUN_LAYOUT[name].format(**fmt).split("/"))

    # files
    @property
    def config_file(self) -> Path:
        """``config.yaml``: the run's config."""
        return self.named("config_file")

    @property
    def labels_db(self) -> Path:
        """``labels.sqlite``: the label queue, unless ``labels.db_path`` puts it elsewhere."""
        return self.named("labels_db")

    @property
    def pairs_file(self) -> Path:
        """``data/pairs/pairs.jsonl``: every pair the pairs stage wrote (the reserve included)."""
        return self.named("pairs_file")

    @property
    def eval_results(self) -> Path:
        """``eval/results.json``."""
        return self.named("eval_results")

    @property
    def report_file(self) -> Path:
        """``report/report.md``."""
        return self.named("report_file")

    # artifacts (folders with a manifest.json)
    @property
    def constitution(self) -> Path:
        """``constitution/``: the checked constitution (setup stage)."""
        return self.named("constitution")

    @property
    def sl_data(self) -> Path:
        """``data/sl``: SL-CAI critique/revision dataset."""
        return self.named("sl_data")

    @property
    def curated_data(self) -> Path:
        """``data/curated``: the curate stage's dataset."""
        return self.named("curated_data")

    @property
    def pairs(self) -> Path:
        """``data/pairs``: the pairs stage's folder."""
        return self.named("pairs")

    @property
    def preferences(self) -> Path:
        """``data/preferences``: AI-judged preference dataset."""
        return self.named("preferences")

    @property
    def preferences_merged(self) -> Path:
        """``data/preferences_merged``: preferences with human labels applied."""
        return self.named("preferences_merged")

    @property
    def sft_adapter(self) -> Path:
        """``models/sft``."""
        return self.named("sft_adapter")

    @property
    def sft_merged(self) -> Path:
        """``models/sft-merged``: the SFT adapter merged into the base model."""
        return self.named("sft_merged")

    @property
    def dpo_adapter(self) -> Path:
        """``models/dpo``."""
        return self.named("dpo_adapter")

    @property
    def dpo_merged(self) -> Path:
        """``models/dpo-merged``."""
        return self.named("dpo_merged")

    @property
    def preference_model(self) -> Path:
        """``models/rm``: the preference (reward) model."""
        return self.named("preference_model")

    def rl_adapter(self, mode: str) -> Path:
        """``models/<mode>``: the RL stage's policy (``ppo`` or ``rloo``)."""
        return self.named("rl_adapter", ppo_mode=mode)

    @property
    def ppo_adapter(self) -> Path:
        """``models/ppo``."""
        return self.rl_adapter("ppo")

    @property
    def rloo_adapter(self) -> Path:
        """``models/rloo``."""
        return self.rl_adapter("rloo")

    @property
    def eval_dir(self) -> Path:
        """``eval/``: the evaluation's results."""
        return self.named("eval_dir")

    @property
    def report_dir(self) -> Path:
        """``report/``: the report and its figures."""
        return self.named("report_dir")

    @property
    def dpo_rounds(self) -> Path:
        """``dpo_rounds/``: the run folders of iterative DPO's rounds."""
        return self.named("dpo_rounds")

    # families of folders
    def data_dir(self, name: str) -> Path:
        """Folder of dataset ``name`` (``data/<name>``)."""
        return self._at(RUN_LAYOUT["data"], name)

    def model_dir(self, name: str) -> Path:
        """Folder of adapter/model ``name`` (``models/<name>``)."""
        return self._at(RUN_LAYOUT["models"], name)

    def metrics_dir(self, name: str) -> Path:
        """Folder of metrics of stage ``name`` (``metrics/<name>``)."""
        return self._at(RUN_LAYOUT["metrics"], name)

    def records_dir(self, name: str) -> Path:
        """Folder of the record store ``name`` (``records/<name>``)."""
        return self._at(RUN_LAYOUT["records"], name)

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: every trainer's checkpoints."""
        return self.named("checkpoints")

    def checkpoint_dir(self, name: str) -> Path:
        """Checkpoints of trainer ``name`` (``checkpoints/<name>``)."""
        return self._at(RUN_LAYOUT["checkpoints"], name)

    @property
    def exports(self) -> Path:
        """``export/``: exported models."""
        return self.named("exports")

    def export_dir(self, model: str) -> Path:
        """Default folder of an exported model (``export/<model>``)."""
        return self._at(RUN_LAYOUT["exports"], model)


class RunStore(RunLayout):
    """A run folder ``<runs_dir>/<run_id>/`` and the conventional places inside it (:class:`RunLayout`).

    Folders are created as paths are asked for (the parent of every path, and the
    ``metrics/<name>`` folder itself), except on a rank other than 0 of a multi-process stage
    (:mod:`cai_dpo.distributed`), which writes nothing in the run.
    """

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self._mkdir(self.root)

    @staticmethod
    def _mkdir(folder: Path) -> None:
        from cai_dpo.distributed import is_main_process

        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)

    def _at(self, *parts: str) -> Path:
        return self.path(*parts)

    def path(self, *parts: str) -> Path:
        """A path inside the run (parents created)."""
        p = self.root.joinpath(*parts)
        self._mkdir(p.parent)
        return p

    def records(self, name: str) -> RecordStore:
        """The record store ``records/<name>/``."""
        return RecordStore(self.root / RUN_LAYOUT["records"] / name)

    def metrics_dir(self, name: str) -> Path:
        """Folder of metrics of stage ``name`` (``metrics/<name>``, created)."""
        p = super().metrics_dir(name)
        self._mkdir(p)
        return p


class Timer:
    """Measure wall time of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- run lock

LOCK_ENV = "CAI_DPO_RUN_LOCK"
LOCK_FILE = ".lock"
LOCK_INFO = ".lock.json"

_held: dict[str, int] = {}


class RunInUseError(RuntimeError):
    """Another process holds the run's lock; the message names its pid and start time."""


def _inherited_tokens() -> dict[str, str]:
    try:
        tokens = json.loads(os.environ.get(LOCK_ENV) or "{}")
    except json.JSONDecodeError:
        return {}
    return tokens if isinstance(tokens, dict) else {}


def _lock_info(root: Path) -> dict[str, Any]:
    try:
        info = json.loads((root / LOCK_INFO).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _holds_by_inheritance(root: Path) -> bool:
    """True when a live ancestor process holds the lock of ``root`` and passed its token down."""
    token = _inherited_tokens().get(str(root))
    info = _lock_info(root)
    return bool(token) and info.get("token") == token and _pid_alive(int(info.get("pid", 0) or 0))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold the run folder's lock (``<run>/.lock``) for the block; yields the run folder.

    One process at a time works in a run: a second pipeline or stage command on the same
    run raises :class:`RunInUseError` ("run <id> is in use by pid N since ...") at once
    instead of racing. Re-entrant within a process, and inherited by child processes
    (papermill kernels) through the ``CAI_DPO_RUN_LOCK`` environment variable, so a
    stage notebook executed by the pipeline does not wait on its parent. On taking the
    lock, swaps a killed writer left half done are repaired (:func:`recover_tree`).
    A rank other than 0 of a multi-process stage (:mod:`cai_dpo.distributed`) never takes
    the lock: rank 0 holds it (or inherits it from the process that launched the ranks).
    """
    from filelock import FileLock, Timeout

    from cai_dpo.distributed import is_main_process

    root = Path(run_dir).resolve()
    key = str(root)
    if not is_main_process():
        yield root
        return
    if key in _held or _holds_by_inheritance(root):
        _held[key] = _held.get(key, 0) + 1
        try:
            yield root
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_FILE), timeout=0)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        info = _lock_info(root)
        raise RunInUseError(
            f"run {root.name} is in use by pid {info.get('pid', '?')} since {info.get('since', '?')} "
            f"({info.get('command', 'unknown command')}); wait for it to finish or stop it ({root})"
        ) from None
    token = os.urandom(8).hex()
    previous_env = os.environ.get(LOCK_ENV)
    try:
        atomic_write_json(
            root / LOCK_INFO,
            {
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv) or "python",
                "token": token,
            },
        )
        os.environ[LOCK_ENV] = json.dumps({**_inherited_tokens(), key: token})
        _held[key] = 1
        for folder in recover_tree(root):
            log.warning("run %s: %s restored after an interrupted write", root.name, folder)
        yield root
    finally:
        _held.pop(key, None)
        if previous_env is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous_env
        with contextlib.suppress(OSError):
            (root / LOCK_INFO).unlink()
        if created:
            _remove_if_only_lock(root)
        lock.release()


def _remove_if_only_lock(root: Path) -> None:
    """Remove a run folder this lock created when it holds no file but the lock (empty subfolders
    aside): a command that failed before writing anything leaves no run behind. Called while the
    lock is held, so no other process can have started in it."""
    with contextlib.suppress(OSError):  # a folder that holds a file refuses rmdir: nothing is ever lost
        if all(p.is_dir() or p == root / LOCK_FILE for p in root.rglob("*")):
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                folder.rmdir()
            (root / LOCK_FILE).unlink()
            root.rmdir()


def locked_stage(func: Any) -> Any:
    """Decorator for a stage entry point ``f(cfg, run=None, ...)``: run it under :func:`run_lock`."""
    import functools

    @functools.wraps(func)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        run = kwargs.get("run", args[0] if args else None)
        root = run.root if isinstance(run, RunStore) else Path(cfg.run_dir)
        with run_lock(root):
            return func(cfg, *args, **kwargs)

    return wrapper
