"""Constitutions: the written principles that guide critiques, revisions and the AI judge.

A constitution is a YAML file::

    name: default
    version: "1.0"
    description: ...
    system_prompt: ...            # optional
    principles:
      - id: harm-dangerous
        category: harmlessness    # harmlessness | helpfulness | honesty | ethics
        critique: ...             # request to the model: find the problem
        revision: ...             # request to the model: rewrite the answer
        comparison: Which response is less dangerous?   # the judge's question
        weight: 1.0               # optional, sampling weight
    critique_examples:            # few-shot demonstrations for critique -> revision
      - {principle_id, prompt, response, critique, revision}
    comparison_examples:          # few-shot demonstrations for the judge
      - {principle_id, prompt, response_a, response_b, answer: A|B}

Request texts may use placeholders, filled by the ``render_*`` methods of
:class:`Principle`: ``critique`` and ``comparison`` allow ``{prompt}`` and ``{response}``
(comparison: ``{prompt}`` only), ``revision`` allows ``{prompt}``, ``{response}`` and
``{critique}``. Any other ``{name}`` is an error; write ``{{`` / ``}}`` for literal braces.

Validation raises :class:`ConstitutionError`, whose ``file``, ``item`` (the principle
or example) and ``field`` attributes name where the problem is.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai_dpo.errors import CaiDpoInputError
from cai_dpo.schema import as_conversation
from cai_dpo.store import loads_json
from cai_dpo.yamlio import describe_yaml_error, load_yaml

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("harmlessness", "helpfulness", "honesty", "ethics")
CONSTITUTIONS_DIR = Path(__file__).resolve().parent.parent / "constitutions"

#: Placeholders each template field may use.
ALLOWED_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "critique": frozenset({"prompt", "response"}),
    "revision": frozenset({"prompt", "response", "critique"}),
    "comparison": frozenset({"prompt"}),
    "system_prompt": frozenset(),
}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ConstitutionError(CaiDpoInputError):
    """A constitution (or case file) is invalid; names the file, the item and the field.

    ``errors`` lists every problem found as ``(item, field, message)``; the first one is
    also in ``item`` / ``field``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        item: str | None = None,
        field: str | None = None,
        errors: list[tuple[str | None, str | None, str]] | None = None,
    ):
        self.file = str(file) if file is not None else None
        self.item = item
        self.field = field
        self.message = message
        self.errors = errors if errors is not None else [(item, field, message)]
        super().__init__(self._format())

    @property
    def principle(self) -> str | None:
        """The principle id named by the first error, when it is about a principle."""
        if self.item and self.item.startswith("principle '"):
            return self.item[len("principle '") : -1]
        return None

    def _format(self) -> str:
        lines = []
        for item, fld, msg in self.errors:
            where = [self.file or "<constitution>"]
            if item:
                where.append(item)
            if fld:
                where.append(f"field '{fld}'")
            lines.append(": ".join(where) + ": " + msg)
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- templates


def template_fields(text: str) -> list[str]:
    """Placeholder names used in a template (``{{``/``}}`` are literal braces)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(text):
        if name is not None:
            names.append(name)
    return names


def render_template(text: str, **values: str) -> str:
    """Fill a validated template's placeholders."""
    return text.format(**values)


def escape_braces(text: str) -> str:
    """Make arbitrary text safe to store as a template (braces become literal)."""
    return text.replace("{", "{{").replace("}", "}}")


# --------------------------------------------------------------------------- schema


@dataclass
class Principle:
    """One constitutional principle: a critique request, a revision request, a judge question."""

    id: str
    category: str
    critique: str
    revision: str
    comparison: str
    weight: float = 1.0

    def render_critique(self, prompt: str = "", response: str = "") -> str:
        """The critique request with its placeholders filled."""
        return render_template(self.critique, prompt=prompt, response=response)

    def render_revision(self, prompt: str = "", response: str = "", critique: str = "") -> str:
        """The revision request with its placeholders filled."""
        return render_template(self.revision, prompt=prompt, response=response, critique=critique)

    def render_comparison(self, prompt: str = "") -> str:
        """The judge's question with its placeholders filled."""
        return render_template(self.comparison, prompt=prompt)


def _prompt_messages(prompt: str) -> list[dict[str, str]]:
    """A demo prompt as chat messages: a "Human: … Assistant: …" transcript, or one user turn."""
    if prompt.lstrip().startswith("Human:"):
        from cai_dpo.data import parse_transcript

        try:
            return parse_transcript(prompt)
        except ValueError:
            pass
    return as_conversation(prompt)


@dataclass
class CritiqueExample:
    """A few-shot demonstration: a prompt, a flawed response, its critique and revision."""

    prompt: str
    response: str
    critique: str
    revision: str
    principle_id: str | None = None

    def messages(self) -> list[dict[str, str]]:
        """The demo's conversation up to (not including) the flawed response."""
        return _prompt_messages(self.prompt)


@dataclass
class ComparisonExample:
    """A few-shot demonstration for the judge: two responses and the better one (A or B)."""

    prompt: str
    response_a: str
    response_b: str
    principle_id: str | None = None
    answer: str = "A"

    def messages(self) -> list[dict[str, str]]:
        """The demo's conversation up to (not including) the compared responses."""
        return _prompt_messages(self.prompt)


@dataclass
class Constitution:
    """A named, versioned set of principles with few-shot demonstrations."""

    name: str
    version: str
    description: str
    principles: list[Principle]
    critique_examples: list[CritiqueExample] = field(default_factory=list)
    comparison_examples: list[ComparisonExample] = field(default_factory=list)
    system_prompt: str | None = None
    path: Path | None = None

    def principle(self, id: str) -> Principle:
        """The principle with this id (KeyError naming the known ids otherwise)."""
        for p in self.principles:
            if p.id == id:
                return p
        raise KeyError(f"{self.name}: no principle {id!r}; known: {', '.join(p.id for p in self.principles)}")

    def categories(self) -> list[str]:
        """Categories present, in canonical order."""
        present = {p.category for p in self.principles}
        return [c for c in CATEGORIES if c in present]

    def by_category(self, category: str) -> list[Principle]:
        """Principles of one category."""
        return [p for p in self.principles if p.category == category]

    def critique_examples_for(self, principle_id: str | None = None) -> list[CritiqueExample]:
        """Critique demos, those for ``principle_id`` first, then the rest."""
        own = [e for e in self.critique_examples if principle_id is not None and e.principle_id == principle_id]
        return own + [e for e in self.critique_examples if e not in own]

    def sample_principles(
        self,
        k: int,
        seed: int | str,
        categories: Iterable[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ) -> list[Principle]:
        """``k`` principles (one per round), reproducible under ``seed``.

        Drawn without replacement while the pool lasts (then the pool is drawn again).
        ``categories`` restricts the pool; ``weights`` maps principle ids and/or category
        names to weights (a principle's weight multiplies with its category's and its own
        ``weight`` field), or is a sequence aligned with ``self.principles``. A zero weight
        excludes a principle.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        pool = self._weighted_pool(categories, weights)
        rng = random.Random(seed)
        out: list[Principle] = []
        while len(out) < k:
            # Efraimidis–Spirakis weighted sampling without replacement.
            keyed = sorted(((rng.random() ** (1.0 / w), i) for i, (_, w) in enumerate(pool)), reverse=True)
            for _, i in keyed[: k - len(out)]:
                out.append(pool[i][0])
        return out

    def _weighted_pool(
        self, categories: Iterable[str] | None, weights: Mapping[str, float] | Sequence[float] | None
    ) -> list[tuple[Principle, float]]:
        cats = None if categories is None else list(categories)
        if cats is not None:
            unknown = [c for c in cats if c not in CATEGORIES]
            if unknown:
                raise ConstitutionError(
                    f"unknown categories {unknown}; use {', '.join(CATEGORIES)}", file=self.path, field="categories"
                )
        if weights is None:
            ws = [p.weight for p in self.principles]
        elif isinstance(weights, Mapping):
            ids = {p.id for p in self.principles}
            unknown = [key for key in weights if key not in ids and key not in CATEGORIES]
            if unknown:
                raise ConstitutionError(
                    f"weights name unknown principles/categories {unknown}", file=self.path, field="weights"
                )
            ws = [
                p.weight * float(weights.get(p.category, 1.0)) * float(weights.get(p.id, 1.0)) for p in self.principles
            ]
        else:
            if len(weights) != len(self.principles):
                raise ConstitutionError(
                    f"{len(weights)} weights for {len(self.principles)} principles", file=self.path, field="weights"
                )
            ws = [p.weight * float(w) for p, w in zip(self.principles, weights)]
        if any(w < 0 or math.isnan(w) for w in ws):
            raise ConstitutionError("weights must be >= 0", file=self.path, field="weights")
        pool = [(p, w) for p, w in zip(self.principles, ws) if w > 0 and (cats is None or p.category in cats)]
        if not pool:
            raise ConstitutionError(
                f"no principle with a positive weight in categories {cats}", file=self.path, field="categories"
            )
        return pool

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the YAML schema)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version, "description": self.description}
        if self.system_prompt is not None:
            out["system_prompt"] = self.system_prompt
        out["principles"] = []
        for p in self.principles:
            d = asdict(p)
            if d["weight"] == 1.0:
                d.pop("weight")
            out["principles"].append(d)
        out["critique_examples"] = [_drop_none(asdict(e)) for e in self.critique_examples]
        out["comparison_examples"] = [_drop_none(asdict(e)) for e in self.comparison_examples]
        return out

    def fingerprint(self) -> str:
        """Short content hash (for record keys and manifests)."""
        import hashlib

        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------- validation


class _Checker:
    """Collects problems while building a constitution from plain data."""

    def __init__(self, file: str | Path | None):
        self.file = file
        self.errors: list[tuple[str | None, str | None, str]] = []

    def add(self, item: str | None, fld: str | None, msg: str) -> None:
        self.errors.append((item, fld, msg))

    def text(
        self, d: Mapping[str, Any], key: str, item: str | None, *, required: bool = True, template: str | None = None
    ) -> str | None:
        if key not in d or d[key] is None:
            if required:
                self.add(item, key, "missing field; add it")
            return None
        value = d[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("version", "id"):
            value = str(value)
        if not isinstance(value, str):
            self.add(item, key, f"must be text, got {type(value).__name__}")
            return None
        if not value.strip():
            self.add(item, key, "empty text; write the text or remove the entry")
            return None
        if template is not None:
            self.placeholders(value, template, item, key)
        return value

    def placeholders(self, value: str, template: str, item: str | None, key: str) -> None:
        allowed = ALLOWED_PLACEHOLDERS[template]
        try:
            names = template_fields(value)
        except ValueError as exc:
            self.add(item, key, f"malformed template ({exc}); write {{{{ and }}}} for literal braces")
            return
        for name in names:
            if name not in allowed:
                allowed_txt = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
                self.add(item, key, f"undefined placeholder {{{name}}}; allowed here: {allowed_txt}")

    def unknown_keys(self, d: Mapping[str, Any], known: Iterable[str], item: str | None) -> None:
        for key in d:
            if key not in known:
                self.add(item, str(key), f"unknown field; known fields: {', '.join(known)}")


_PRINCIPLE_KEYS = ("id", "category", "critique", "revision", "comparison", "weight")
_TOP_KEYS = (
    "name",
    "version",
    "description",
    "system_prompt",
    "principles",
    "critique_examples",
    "comparison_examples",
)


def constitution_from_dict(data: Any, path: str | Path | None = None) -> Constitution:
    """Build and validate a :class:`Constitution` from plain data (raises ConstitutionError)."""
    chk = _Checker(path)
    if not isinstance(data, Mapping):
        raise ConstitutionError(f"expected a mapping at the top level, got {type(data).__name__}", file=path)
    chk.unknown_keys(data, _TOP_KEYS, None)
    name = chk.text(data, "name", None)
    version = chk.text(data, "version", None)
    description = chk.text(data, "description", None)
    system_prompt = chk.text(data, "system_prompt", None, required=False, template="system_prompt")

    principles: list[Principle] = []
    raw_principles = data.get("principles")
    if raw_principles is None:
        chk.add(None, "principles", "missing field; add a list of principles")
        raw_principles = []
    elif not isinstance(raw_principles, list) or not raw_principles:
        chk.add(None, "principles", "must be a non-empty list of principles")
        raw_principles = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_principles):
        label = f"principles[{i}]"
        if not isinstance(raw, Mapping):
            chk.add(label, None, f"must be a mapping, got {type(raw).__name__}")
            continue
        pid = chk.text(raw, "id", label)
        if pid is not None:
            label = f"principle '{pid}'"
            if not _ID_RE.match(pid):
                chk.add(label, "id", "ids use letters, digits, '-', '_' and '.' only")
            if pid in CATEGORIES:
                chk.add(label, "id", "an id may not be a category name")
            if pid in seen:
                chk.add(label, "id", "duplicate id; every principle needs its own id")
            seen.add(pid)
        chk.unknown_keys(raw, _PRINCIPLE_KEYS, label)
        category = chk.text(raw, "category", label)
        if category is not None and category not in CATEGORIES:
            chk.add(label, "category", f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
        critique = chk.text(raw, "critique", label, template="critique")
        revision = chk.text(raw, "revision", label, template="revision")
        comparison = chk.text(raw, "comparison", label, template="comparison")
        weight = raw.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            chk.add(label, "weight", f"must be a number >= 0, got {weight!r}")
            weight = 1.0
        if None not in (pid, category, critique, revision, comparison):
            principles.append(Principle(pid, category, critique, revision, comparison, float(weight)))

    critique_examples = []
    for i, raw in enumerate(_example_list(chk, data, "critique_examples")):
        label = f"critique_examples[{i}]"
        if not isinstance(raw, Mapping):
            chk.add(label, None, "must be a mapping")
            continue
        chk.unknown_keys(raw, ("prompt", "response", "critique", "revision", "principle_id"), label)
        vals = {k: chk.text(raw, k, label) for k in ("prompt", "response", "critique", "revision")}
        pid = _example_principle(chk, raw, label, seen)
        if None not in vals.values():
            critique_examples.append(CritiqueExample(principle_id=pid, **vals))

    comparison_examples = []
    for i, raw in enumerate(_example_list(chk, data, "comparison_examples")):
        label = f"comparison_examples[{i}]"
        if not isinstance(raw, Mapping):
            chk.add(label, None, "must be a mapping")
            continue
        chk.unknown_keys(raw, ("prompt", "response_a", "response_b", "principle_id", "answer"), label)
        vals = {k: chk.text(raw, k, label) for k in ("prompt", "response_a", "response_b")}
        answer = chk.text(raw, "answer", label)
        if answer is not None:
            answer = answer.strip().strip("()").upper()
            if answer not in ("A", "B"):
                chk.add(label, "answer", f"must be A or B, got {raw['answer']!r}")
                answer = None
        pid = _example_principle(chk, raw, label, seen)
        if None not in vals.values() and answer is not None:
            comparison_examples.append(ComparisonExample(principle_id=pid, answer=answer, **vals))

    if chk.errors:
        item, fld, msg = chk.errors[0]
        raise ConstitutionError(msg, file=path, item=item, field=fld, errors=chk.errors)
    return Constitution(
        name=name,
        version=version,
        description=description,
        principles=principles,
        critique_examples=critique_examples,
        comparison_examples=comparison_examples,
        system_prompt=system_prompt,
        path=Path(path) if path is not None else None,
    )


def _example_list(chk: _Checker, data: Mapping[str, Any], key: str) -> list[Any]:
    raw = data.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list):
        chk.add(None, key, "must be a list")
        return []
    return raw


def _example_principle(chk: _Checker, raw: Mapping[str, Any], label: str, ids: set[str]) -> str | None:
    pid = raw.get("principle_id")
    if pid is None:
        return None
    if not isinstance(pid, str) or pid not in ids:
        chk.add(label, "principle_id", f"no principle with id {pid!r}")
        return None
    return pid


# --------------------------------------------------------------------------- files


def resolve_constitution_path(path: str | Path) -> Path:
    """A file path, or a bundled name (``default``, ``socratic``) in ``constitutions/``."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute():
        for candidate in (CONSTITUTIONS_DIR / p, CONSTITUTIONS_DIR / f"{p}.yaml"):
            if candidate.exists():
                return candidate
    return p


def bundled_constitutions() -> list[Path]:
    """The constitution files shipped in ``constitutions/`` (case files excluded)."""
    return sorted(p for p in CONSTITUTIONS_DIR.glob("*.yaml") if not p.stem.endswith("_cases"))


def _read_yaml(p: Path) -> Any:
    """The parsed YAML file ``p``; :class:`ConstitutionError` naming it when it is not valid YAML or not UTF-8."""
    try:
        return load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConstitutionError(f"not valid YAML ({describe_yaml_error(exc)})", file=p) from exc
    except UnicodeDecodeError as exc:
        raise ConstitutionError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=p) from exc


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML file (or a bundled name such as ``default``)."""
    p = resolve_constitution_path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{path}: constitution file not found; pass a YAML file or one of "
            f"{', '.join(b.stem for b in bundled_constitutions())}"
        )
    data = _read_yaml(p)
    if data is None:
        raise ConstitutionError("file is empty; see constitutions/default.yaml for the format", file=p)
    c = constitution_from_dict(data, p)
    log.debug("loaded constitution %s v%s (%d principles) from %s", c.name, c.version, len(c.principles), p)
    return c


class _LiteralDumper(yaml.SafeDumper):
    """YAML dumper that writes multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = (
        "|"
        if "\n" in value
        and not value.startswith((" ", "\n"))
        and not any(line != line.rstrip() for line in value.split("\n"))
        else None
    )
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def dump_constitution(c: Constitution) -> str:
    """YAML text of a constitution."""
    return yaml.dump(c.to_dict(), Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True, width=100)


def save_constitution(c: Constitution, path: str | Path) -> Path:
    """Validate and write a constitution as YAML (atomically); it loads back equal."""
    from cai_dpo.store import atomic_write_text

    path = Path(path)
    constitution_from_dict(c.to_dict(), path)  # never write an invalid file
    atomic_write_text(path, dump_constitution(c))
    return path


def summary_line(c: Constitution) -> str:
    """One line: name, version, counts per category and demos."""
    counts = ", ".join(f"{cat} {len(c.by_category(cat))}" for cat in c.categories())
    src = f" ({c.path})" if c.path else ""
    return (
        f"{c.name} v{c.version}{src}: {len(c.principles)} principles ({counts}); "
        f"{len(c.critique_examples)} critique and {len(c.comparison_examples)} comparison demos"
    )


def format_table(c: Constitution, width: int = 100) -> str:
    """A readable table of principles: id, category, comparison question."""
    import textwrap

    id_w = max(len("id"), *(len(p.id) for p in c.principles))
    cat_w = max(len("category"), *(len(p.category) for p in c.principles))
    q_w = max(20, width - id_w - cat_w - 4)
    lines = [summary_line(c)]
    if c.description:
        lines += textwrap.wrap(c.description, width)
    lines += ["", f"{'id':<{id_w}}  {'category':<{cat_w}}  comparison", f"{'-' * id_w}  {'-' * cat_w}  {'-' * q_w}"]
    for p in c.principles:
        wrapped = textwrap.wrap(p.comparison, q_w) or [""]
        lines.append(f"{p.id:<{id_w}}  {p.category:<{cat_w}}  {wrapped[0]}")
        lines += [f"{'':<{id_w}}  {'':<{cat_w}}  {more}" for more in wrapped[1:]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- paper-format import

_CATEGORY_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("honesty", ("honest", "truthful", "accurate", "mislead", "deceiv", "fabricat", "uncertain")),
    ("ethics", ("ethic", "moral", "wise", "virtue", "fair", "respectful", "empath", "bias")),
    ("helpfulness", ("helpful", "useful", "answers the human", "informative", "evasive", "preachy")),
)


def infer_category(text: str) -> str:
    """Category of a principle from keywords; ``harmlessness`` when nothing else fits.

    Harm-related words win: a request mentioning harm is about harmlessness first.
    """
    low = text.lower()
    if any(w in low for w in ("harm", "danger", "illegal", "toxic", "racist", "sexist", "crimin", "violen")):
        return "harmlessness"
    for cat, words in _CATEGORY_KEYWORDS:
        if any(w in low for w in words):
            return cat
    return "harmlessness"


def _strip_label(text: str, *labels: str) -> str:
    text = text.strip()
    for label in labels:
        if text.startswith(label):
            text = text[len(label) :]
        if text.endswith(label.rstrip()):
            text = text[: -len(label.rstrip())]
        text = text.strip()
    return text


def _comparison_question(text: str) -> str:
    text = text.strip()
    if text.endswith("Options:"):
        text = text[: -len("Options:")].strip()
    return text


_TURN_RE = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")


def _split_turns(text: str) -> list[tuple[str, str]]:
    text = "\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text
    parts = _TURN_RE.split(text)
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _format_dialogue(turns: list[tuple[str, str]]) -> str:
    """The prompt of a demo: the text alone for one human turn, else a labelled transcript."""
    if len(turns) == 1 and turns[0][0] == "Human":
        return turns[0][1]
    return "\n\n".join(f"{role}: {text}" for role, text in turns)


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing; the paper's prompt folder holds "
            "CritiqueRevisionInstructions.json and RLMadisonInstructions.json"
        )
    try:
        return loads_json(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"not valid JSON ({exc.msg}, line {exc.lineno})", file=path) from exc
    except UnicodeDecodeError as exc:
        raise ConstitutionError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from exc


def import_anthropic(
    prompts_dir: str | Path, name: str = "anthropic-cai", version: str = "1.0", description: str | None = None
) -> Constitution:
    """Build a constitution from the JSON prompt files published with the CAI paper.

    Reads ``CritiqueRevisionInstructions.json`` (``{id: {prompt: [critique request],
    edit_request}}``) and ``RLMadisonInstructions.json`` (list of judge instructions),
    pairing the n-th critique principle with the n-th judge instruction (cycling when the
    counts differ); and, when present, ``CritiqueRevisionFewShotPrompts.json`` (transcripts
    with CritiqueRequest/Critique/RevisionRequest/Revision) and ``RLMadisonFewShotPrompts.json``
    (``{prompt, corrects, incorrects}``). Categories are inferred from keywords.
    """
    if not name.strip():  # checked here, not as a field of the first JSON file it would be blamed on
        raise ConstitutionError("the constitution's name is empty; give one (constitution import --name NAME)")
    d = Path(prompts_dir)
    crit_path = d / "CritiqueRevisionInstructions.json"
    cmp_path = d / "RLMadisonInstructions.json"
    crit = _read_json(crit_path)
    comparisons = _read_json(cmp_path)
    if not isinstance(crit, dict) or not crit:
        raise ConstitutionError("expected a non-empty object {id: {prompt, edit_request}}", file=crit_path)
    if not isinstance(comparisons, list) or not comparisons or not all(isinstance(x, str) for x in comparisons):
        raise ConstitutionError("expected a non-empty list of instruction strings", file=cmp_path)

    principles: list[Principle] = []
    for i, (pid, entry) in enumerate(crit.items()):
        item = f"principle '{pid}'"
        if not isinstance(entry, dict):
            raise ConstitutionError("expected an object with prompt and edit_request", file=crit_path, item=item)
        prompt = entry.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else None
        if not isinstance(prompt, str):
            raise ConstitutionError("missing critique request text", file=crit_path, item=item, field="prompt")
        edit = entry.get("edit_request")
        if not isinstance(edit, str):
            raise ConstitutionError("missing revision request text", file=crit_path, item=item, field="edit_request")
        critique = _strip_label(prompt, "CritiqueRequest:", "Critique:")
        revision = _strip_label(edit, "RevisionRequest:", "Revision:")
        comparison = _comparison_question(comparisons[i % len(comparisons)])
        category = infer_category(critique + " " + revision)
        principles.append(
            Principle(str(pid), category, escape_braces(critique), escape_braces(revision), escape_braces(comparison))
        )

    critique_examples = _import_critique_examples(d / "CritiqueRevisionFewShotPrompts.json", principles)
    comparison_examples = _import_comparison_examples(d / "RLMadisonFewShotPrompts.json")
    c = Constitution(
        name=name,
        version=version,
        description=description or f"Imported from the CAI paper's prompt files in {d}",
        principles=principles,
        critique_examples=critique_examples,
        comparison_examples=comparison_examples,
        system_prompt=None,
        path=None,
    )
    constitution_from_dict(c.to_dict(), crit_path)  # validate
    log.info(
        "imported %d principles, %d critique and %d comparison demos from %s",
        len(principles),
        len(critique_examples),
        len(comparison_examples),
        d,
    )
    return c


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _import_critique_examples(path: Path, principles: list[Principle]) -> list[CritiqueExample]:
    if not path.exists():
        return []
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConstitutionError("expected a list of transcripts", file=path)
    out = []
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise ConstitutionError("expected a transcript string", file=path, item=f"example {i}")
        turns = _split_turns(text)
        roles = [r for r, _ in turns]
        if "CritiqueRequest" not in roles:
            raise ConstitutionError("no CritiqueRequest: section", file=path, item=f"example {i}")
        k = roles.index("CritiqueRequest")
        dialogue = turns[:k]
        sections: dict[str, str] = {}
        for role, body in turns[k:]:
            sections.setdefault(role, body)  # first critique round only
        if len(dialogue) < 2 or dialogue[-1][0] != "Assistant" or not dialogue[-1][1]:
            raise ConstitutionError(
                "expected the dialogue to end with an Assistant turn before CritiqueRequest",
                file=path,
                item=f"example {i}",
            )
        for key in ("Critique", "Revision"):
            if not sections.get(key):
                raise ConstitutionError(f"missing {key}: text", file=path, item=f"example {i}", field=key)
        request = _words(sections["CritiqueRequest"])
        best = max(
            principles, key=lambda p: len(request & _words(p.critique)) / (len(request | _words(p.critique)) or 1)
        )
        out.append(
            CritiqueExample(
                prompt=_format_dialogue(dialogue[:-1]),
                response=dialogue[-1][1],
                critique=sections["Critique"],
                revision=sections["Revision"],
                principle_id=best.id,
            )
        )
    return out


def _import_comparison_examples(path: Path) -> list[ComparisonExample]:
    if not path.exists():
        return []
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConstitutionError("expected a list of {prompt, corrects, incorrects}", file=path)
    out = []
    for i, row in enumerate(data):
        item = f"example {i}"
        if not isinstance(row, dict):
            raise ConstitutionError("expected an object", file=path, item=item)
        for key in ("prompt", "corrects", "incorrects"):
            if key not in row:
                raise ConstitutionError("missing field", file=path, item=item, field=key)
        turns = _split_turns(row["prompt"])
        if turns and turns[-1][0] == "Assistant" and not turns[-1][1]:
            turns = turns[:-1]
        prompt = _format_dialogue(turns) if turns else row["prompt"].strip()
        good, bad = row["corrects"], row["incorrects"]
        good = good[0] if isinstance(good, list) and good else good
        bad = bad[0] if isinstance(bad, list) and bad else bad
        if not isinstance(good, str) or not isinstance(bad, str):
            raise ConstitutionError("corrects/incorrects must hold a response string", file=path, item=item)
        # Alternate positions so the demos do not teach a position preference.
        if i % 2 == 0:
            out.append(ComparisonExample(prompt, good.strip(), bad.strip(), None, "A"))
        else:
            out.append(ComparisonExample(prompt, bad.strip(), good.strip(), None, "B"))
    return out


# --------------------------------------------------------------------------- edge-case tests


@dataclass
class ConstitutionCase:
    """A clear-cut comparison the judge should get right under a constitution."""

    id: str
    prompt: str
    response_a: str
    response_b: str
    expected: str
    principle: str | None = None
    conversation: list[dict[str, str]] | None = None

    def messages(self) -> list[dict[str, str]]:
        """The conversation up to the compared responses (the prompt as one user turn by default)."""
        return list(self.conversation) if self.conversation else as_conversation(self.prompt)


def load_cases(path: str | Path, constitution: Constitution | None = None) -> list[ConstitutionCase]:
    """Read a constitution test-case YAML file (``cases: [...]`` or a bare list).

    Each case: ``id``, ``prompt`` or ``conversation`` (list of {role, content}, ending
    with a user turn), ``response_a``, ``response_b``, ``expected`` (A|B), optional
    ``principle`` (checked against ``constitution`` when given).
    """
    p = resolve_constitution_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: case file not found")
    data = _read_yaml(p)
    if isinstance(data, Mapping):
        data = data.get("cases")
    if not isinstance(data, list) or not data:
        raise ConstitutionError("expected a non-empty list of cases (under 'cases:')", file=p, field="cases")
    chk = _Checker(p)
    cases: list[ConstitutionCase] = []
    seen: set[str] = set()
    for i, raw in enumerate(data):
        label = f"cases[{i}]"
        if not isinstance(raw, Mapping):
            chk.add(label, None, "must be a mapping")
            continue
        cid = chk.text(raw, "id", label)
        if cid is not None:
            label = f"case '{cid}'"
            if cid in seen:
                chk.add(label, "id", "duplicate id")
            seen.add(cid)
        chk.unknown_keys(
            raw, ("id", "prompt", "conversation", "response_a", "response_b", "expected", "principle", "note"), label
        )
        conversation = _case_conversation(chk, raw, label)
        prompt = chk.text(raw, "prompt", label, required=conversation is None)
        if prompt is None and conversation:
            prompt = conversation[-1]["content"]
        a = chk.text(raw, "response_a", label)
        b = chk.text(raw, "response_b", label)
        expected = chk.text(raw, "expected", label)
        if expected is not None:
            expected = expected.strip().strip("()").upper()
            if expected not in ("A", "B"):
                chk.add(label, "expected", f"must be A or B, got {raw['expected']!r}")
                expected = None
        principle = raw.get("principle")
        if principle is not None:
            if not isinstance(principle, str):
                chk.add(label, "principle", "must be a principle id")
                principle = None
            elif constitution is not None and principle not in {q.id for q in constitution.principles}:
                chk.add(label, "principle", f"no principle {principle!r} in constitution {constitution.name!r}")
        if None not in (cid, prompt, a, b, expected):
            cases.append(ConstitutionCase(cid, prompt, a, b, expected, principle, conversation))
    if chk.errors:
        item, fld, msg = chk.errors[0]
        raise ConstitutionError(msg, file=p, item=item, field=fld, errors=chk.errors)
    return cases


def _case_conversation(chk: _Checker, raw: Mapping[str, Any], label: str) -> list[dict[str, str]] | None:
    conv = raw.get("conversation")
    if conv is None:
        return None
    ok = (
        isinstance(conv, list)
        and conv
        and all(
            isinstance(m, Mapping)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            and m["content"].strip()
            for m in conv
        )
    )
    if not ok:
        chk.add(label, "conversation", "must be a list of {role: system|user|assistant, content: text}")
        return None
    if conv[-1]["role"] != "user":
        chk.add(label, "conversation", "must end with a user turn (the responses answer it)")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in conv]
