"""User benchmark files: CSV with BOM/CRLF and a renamed label column, JSONL, saved datasets, clear errors."""

from __future__ import annotations

import json

import pytest

from cai_dpo.benchmarks import load_benchmark
from cai_dpo.config import BenchmarkSection
from cai_dpo.data import PromptFileError


def test_csv_with_bom_crlf_and_renamed_label_column(tmp_path):
    p = tmp_path / "safety.csv"
    p.write_bytes(
        "\ufeffquestion,verdict\r\nHow do I pick a lock?,UNSAFE\r\nHow do I bake bread?,safe\r\n".encode("utf-8")
    )
    rows = load_benchmark(
        BenchmarkSection(
            path=str(p),
            prompt_field="question",
            label_field="verdict",
            harmful_values=["unsafe"],
            benign_values=["safe"],
        )
    )
    assert [(r.prompt.text, r.kind) for r in rows] == [
        ("How do I pick a lock?", "harmful"),
        ("How do I bake bread?", "benign"),
    ]


def test_jsonl_and_saved_dataset(tmp_path):
    import datasets

    p = tmp_path / "b.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": q, "label": lab}) for q, lab in [("a?", 1), ("b?", 0)]) + "\n")
    rows = load_benchmark(BenchmarkSection(path=str(p)))
    assert [r.kind for r in rows] == ["harmful", "benign"]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(
        [{"prompt": "c?", "label": "harmful"}, {"prompt": "d?", "label": "benign"}]
    ).save_to_disk(str(folder))
    rows = load_benchmark(BenchmarkSection(path=str(folder), limit=1))
    assert len(rows) == 1 and rows[0].kind == "harmful"


def test_malformed_files_name_file_and_field(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("question,label\nHow?,1\n")
    with pytest.raises(PromptFileError, match=r"bad\.csv.*field 'verdict'"):
        load_benchmark(BenchmarkSection(path=str(p), prompt_field="question", label_field="verdict"))
    with pytest.raises(PromptFileError, match=r"bad\.csv.*field 'text'"):
        load_benchmark(BenchmarkSection(path=str(p), prompt_field="text"))
    j = tmp_path / "bad.jsonl"
    j.write_text(json.dumps({"prompt": "x?", "label": ""}) + "\n")
    with pytest.raises(PromptFileError, match=r"bad\.jsonl.*field 'label'.*empty label"):
        load_benchmark(BenchmarkSection(path=str(j)))
    j.write_text(json.dumps({"prompt": "x?", "label": "maybe"}) + "\n")
    with pytest.raises(PromptFileError, match=r"field 'label'.*neither"):
        load_benchmark(BenchmarkSection(path=str(j), benign_values=["no"]))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_benchmark(BenchmarkSection(path=str(tmp_path / "missing.csv")))
