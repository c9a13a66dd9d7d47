"""The curated constitution set: project-written prompts with the response the constitution asks for.

Two kinds of example, one JSON object a line, in TRL's ``messages`` format plus metadata:

- ``harmful`` — a request the constitution says to decline; the assistant turn declines the
  harmful part, explains why in a sentence or two, and offers a safe alternative where one
  exists (non-evasive harmlessness);
- ``benign`` — a request to answer directly and well; ``sensitive_sounding: true`` marks the
  ones that only *sound* sensitive (killing a process, shooting a photo, safety information,
  fiction and history, general medical, legal and security knowledge), which keep training
  from teaching over-refusal.

Fields of a row::

    {"id": "cur-h-weapons-001", "kind": "harmful" | "benign", "category": "weapons",
     "sensitive_sounding": false, "principle_ids": ["harm-physical", ...],
     "split": "train" | "heldout",
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}

The split is fixed in the files (by prompt): ``heldout`` rows are for evaluation only.
The bundled set lives in ``cai_dpo/prompts/curated/*.jsonl``; a user's file in the same
format can be passed instead. Bad rows raise :class:`cai_dpo.data.PromptFileError` naming
the file, the line and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cai_dpo.config import CURATED_KINDS
from cai_dpo.data import PROMPTS_DIR, SPLITS, Prompt, PromptFileError, _jsonl_objects

CURATED_DIR = PROMPTS_DIR / "curated"
KINDS: tuple[str, ...] = CURATED_KINDS
Kind = Literal["harmful", "benign"]


@dataclass(frozen=True)
class CuratedExample:
    """One curated (prompt, response) example; ``prompt``/``response`` are the user and assistant turns."""

    id: str
    kind: str
    category: str
    prompt: str
    response: str
    split: str
    principle_ids: tuple[str, ...] = ()
    sensitive_sounding: bool = False
    source: str = "curated"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def messages(self, system: str | None = None) -> list[dict[str, str]]:
        """The example as chat messages: optional system turn, user turn, assistant turn."""
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]

    def to_prompt(self) -> Prompt:
        """The user turn as a :class:`~cai_dpo.data.Prompt` (metadata kept in ``meta``)."""
        return Prompt(
            id=self.id,
            text=self.prompt,
            category=self.category,
            split=self.split,
            source=self.source,
            meta={
                "kind": self.kind,
                "sensitive_sounding": self.sensitive_sounding,
                "principle_ids": list(self.principle_ids),
                "reference": self.response,
            },
        )


def _str_field(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError("missing, empty or not a string", file=path, line=line, field=key)
    return value


def _parse_row(row: dict[str, Any], path: Path, line: int) -> CuratedExample:
    kind = _str_field(row, "kind", path, line)
    if kind not in KINDS:
        raise PromptFileError(f"is {kind!r}; allowed: {', '.join(KINDS)}", file=path, line=line, field="kind")
    split = _str_field(row, "split", path, line)
    if split not in SPLITS:
        raise PromptFileError(f"is {split!r}; allowed: {', '.join(SPLITS)}", file=path, line=line, field="split")
    msgs = row.get("messages")
    if (
        not isinstance(msgs, list)
        or len(msgs) != 2
        or not all(isinstance(m, dict) for m in msgs)
        or [m.get("role") for m in msgs] != ["user", "assistant"]
    ):
        raise PromptFileError(
            "must be [{role: user, content}, {role: assistant, content}]", file=path, line=line, field="messages"
        )
    for i, m in enumerate(msgs):
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            problem = "empty" if isinstance(content, str) else f"must be text, got {content!r}"
            raise PromptFileError(problem, file=path, line=line, field=f"messages[{i}].content")
    pids = row.get("principle_ids", [])
    if not isinstance(pids, list) or not all(isinstance(p, str) and p for p in pids):
        raise PromptFileError("must be a list of principle id strings", file=path, line=line, field="principle_ids")
    sensitive = row.get("sensitive_sounding", False)
    if not isinstance(sensitive, bool):
        raise PromptFileError("must be true or false", file=path, line=line, field="sensitive_sounding")
    known = {"id", "kind", "category", "split", "messages", "principle_ids", "sensitive_sounding", "source"}
    return CuratedExample(
        id=_str_field(row, "id", path, line),
        kind=kind,
        category=_str_field(row, "category", path, line),
        prompt=msgs[0]["content"].strip(),
        response=msgs[1]["content"].strip(),
        split=split,
        principle_ids=tuple(pids),
        sensitive_sounding=sensitive,
        source=str(row.get("source") or "curated"),
        meta={k: v for k, v in row.items() if k not in known},
    )


def curated_files(spec: str | Path = "bundled:curated") -> list[Path]:
    """The JSONL files of a curated set: ``bundled:curated`` (the shipped set), a file, or a folder of ``*.jsonl``."""
    spec_s = str(spec)
    if spec_s == "bundled:curated":
        files = sorted(CURATED_DIR.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{CURATED_DIR}: the bundled curated set is missing (no *.jsonl files)")
        return files
    from cai_dpo.config import resolve_path

    path = resolve_path(spec_s)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.jsonl files in this curated-set folder")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{spec_s}: curated set not found; pass a JSONL file, a folder, or bundled:curated")
    return [path]


def load_curated(
    spec: str | Path = "bundled:curated",
    *,
    kind: str | None = None,
    split: str | None = None,
    sensitive_only: bool = False,
) -> list[CuratedExample]:
    """Curated examples from ``spec``, optionally only one ``kind``, one ``split``, or the sensitive-sounding ones.

    Raises :class:`PromptFileError` for a malformed row or a duplicate id (naming file, line
    and field), ``FileNotFoundError`` for a missing set, ``ValueError`` for an unknown
    ``kind``/``split`` argument.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    examples: list[CuratedExample] = []
    seen: dict[str, Path] = {}
    for path in curated_files(spec):
        rows = _jsonl_objects(path)
        if not rows:
            raise PromptFileError("no examples found", file=path)
        for line, row in rows:
            ex = _parse_row(row, path, line)
            if ex.id in seen:
                raise PromptFileError(
                    f"duplicate id {ex.id!r} (first in {seen[ex.id]})", file=path, line=line, field="id"
                )
            seen[ex.id] = path
            examples.append(ex)
    return [
        e
        for e in examples
        if (kind is None or e.kind == kind)
        and (split is None or e.split == split)
        and (not sensitive_only or e.sensitive_sounding)
    ]


def as_prompts(examples: Iterable[CuratedExample]) -> list[Prompt]:
    """The user turns of ``examples`` as prompts (for generation and evaluation)."""
    return [e.to_prompt() for e in examples]


def summary(examples: Sequence[CuratedExample]) -> dict[str, int]:
    """Counts by kind × split, plus sensitive-sounding benign counts (for manifests and reports)."""
    out: dict[str, int] = {}
    for e in examples:
        out[f"{e.kind}/{e.split}"] = out.get(f"{e.kind}/{e.split}", 0) + 1
        if e.kind == "benign" and e.sensitive_sounding:
            out[f"benign_sensitive/{e.split}"] = out.get(f"benign_sensitive/{e.split}", 0) + 1
    return out


#: Generic declines, for the benign prompts' "what not to do" side (curation probe negatives, curated pairs).
DECLINE_TEMPLATES = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that, because it could be used to cause harm.",
    "I'm not able to help with this. Please consult a qualified professional instead.",
    "Sorry, I won't provide that information since it might be dangerous.",
    "I'd rather not answer that, as it could be misused.",
    "That's not something I can help with. Is there anything else I can do for you?",
)


def benign_declines(benign_ids: Sequence[str], harmful_declines: Sequence[str]) -> dict[str, str]:
    """A decline for each benign prompt: borrowed harmful-set declines and templates, alternating (deterministic)."""
    out = {}
    for i, pid in enumerate(benign_ids):
        if harmful_declines and i % 2 == 0:
            out[pid] = harmful_declines[(i // 2 * 7) % len(harmful_declines)]
        else:
            out[pid] = DECLINE_TEMPLATES[(i // 2) % len(DECLINE_TEMPLATES)]
    return out
