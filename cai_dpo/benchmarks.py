"""User-supplied benchmark files: labelled prompts (harmful / benign) from CSV, JSONL or a saved dataset.

Public safety test sets are usually distributed as a table of prompts with a label column
(``unsafe``/``safe``, ``1``/``0``, ``harmful``/``benign``). :func:`load_benchmark` reads such a
file with the project's prompt readers (:mod:`cai_dpo.data`: UTF-8 with or without BOM, any
line ending) into prompts with a kind, which the evaluation turns into the same independent
figures as its own held-out sets, one block per benchmark. Nothing is downloaded.

Errors are :class:`cai_dpo.data.PromptFileError` naming the file, the row and the field
(a missing prompt or label column, an empty or unknown label); a missing file is
``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from cai_dpo.config import BenchmarkSection, ConfigError, resolve_path
from cai_dpo.data import Prompt, PromptFileError, _read_text, load_csv, load_dataset_dir, load_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One benchmark prompt with its kind (``harmful`` or ``benign``) and its raw label."""

    prompt: Prompt
    kind: str
    label: str


def benchmark_name(spec: BenchmarkSection) -> str:
    """``spec.name`` or the file / folder stem."""
    return spec.name or Path(spec.path.rstrip("/")).stem or "benchmark"


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    return "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"


def load_benchmark(spec: BenchmarkSection) -> list[BenchmarkPrompt]:
    """The labelled prompts of one benchmark file (at most ``spec.limit``)."""
    if not spec.path:
        raise ConfigError("eval.benchmarks: an entry has no 'path'")
    path = resolve_path(spec.path)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec.path}: benchmark file not found (eval.benchmarks path); nothing is downloaded, "
            "point it at a local CSV/JSONL file or a saved dataset folder"
        )
    fmt = _format(path, spec.format)
    source = f"benchmark:{benchmark_name(spec)}"
    if fmt == "csv":
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        header = next(csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter), [])
        if spec.label_field not in header:
            raise PromptFileError(
                f"no label column {spec.label_field!r} in the header {header}; set label_field",
                file=path,
                line=1,
                field=spec.label_field,
                row_kind="row",
            )
        prompts = load_csv(path, source=source, text_field=spec.prompt_field)
    elif fmt == "jsonl":
        prompts = load_jsonl(path, source=source, text_field=spec.prompt_field)
    elif fmt == "hf":
        prompts = load_dataset_dir(path, source=source, text_field=spec.prompt_field)
    else:
        raise ConfigError(f"eval.benchmarks: format {spec.format!r} for {path}; use auto, csv, jsonl or hf")
    harmful = {v.strip().lower() for v in spec.harmful_values}
    benign = {v.strip().lower() for v in spec.benign_values}
    out = []
    for i, p in enumerate(prompts, 1):
        raw = p.category if spec.label_field == "category" else p.meta.get(spec.label_field)
        if raw is None or not str(raw).strip():
            raise PromptFileError(
                f"missing or empty label in prompt {p.id!r}",
                file=path,
                line=i,
                field=spec.label_field,
                row_kind="prompt",
            )
        value = str(raw).strip().lower()
        if value in harmful:
            kind = "harmful"
        elif not benign or value in benign:
            kind = "benign"
        else:
            raise PromptFileError(
                f"label {raw!r} is in neither harmful_values {sorted(harmful)} nor benign_values {sorted(benign)}",
                file=path,
                line=i,
                field=spec.label_field,
                row_kind="prompt",
            )
        out.append(BenchmarkPrompt(p, kind, str(raw)))
    if spec.limit is not None:
        out = out[: spec.limit]
    log.info(
        "benchmark %s: %d prompts (%d harmful, %d benign) from %s",
        benchmark_name(spec),
        len(out),
        sum(b.kind == "harmful" for b in out),
        sum(b.kind == "benign" for b in out),
        path,
    )
    return out
