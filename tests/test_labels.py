"""Human label queue: routing, SQLite durability, merge, exchange, the widget and the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pytest

from cai_dpo.config import LabelsSection
from cai_dpo.labels import (
    LabelQueue,
    LabelQueueError,
    edge_reasons,
    merge_labels,
    merge_labels_with_counts,
    pair_from_row,
    route_edge_cases,
)
from cai_dpo.stages.labels import run_labels
from cai_dpo.store import RunStore, read_manifest


def make_row(
    pair_id: str,
    p: float = 0.9,
    *,
    ab: float | None = None,
    ba: float | None = None,
    per: list[float] | None = None,
    source: str = "judged_samples",
    chosen: str | None = None,
    rejected: str | None = None,
    p_judge: float | None = None,
) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"prompt {pair_id}"}],
        "chosen": [{"role": "assistant", "content": chosen or f"chosen {pair_id}"}],
        "rejected": [{"role": "assistant", "content": rejected or f"rejected {pair_id}"}],
        "p_chosen": p,
        "margin": 2 * p - 1,
        "source": source,
        "principle_ids": ["harm-1", "honest-2"],
        "score_ab": ab,
        "score_ba": ba,
        "per_principle": per or [],
        "p_judge": p_judge,
        "judge_model": "tiny",
        "pair_id": pair_id,
        "edge_reasons": [],
        "category": "red_team",
    }


def queue_with(tmp_path: Path, rows: list[dict], name: str = "labels.sqlite") -> LabelQueue:
    q = LabelQueue(tmp_path / name)
    q.enqueue(pair_from_row(r, ["low_confidence"]) for r in rows)
    return q


# --------------------------------------------------------------------------- routing


def test_each_routing_rule():
    cfg = LabelsSection(confidence_band=0.1, principle_disagreement_spread=0.3, gate_confidence_band=0.2)
    assert edge_reasons(make_row("sure", 0.9, ab=0.9, ba=0.85, per=[0.8, 0.9]), cfg) == []
    assert edge_reasons(make_row("low", 0.55), cfg) == ["low_confidence"]
    assert edge_reasons(make_row("edge", 0.6), cfg) == []  # |0.6-0.5| is not < 0.1
    # both scores are P(the same response better); opposite sides of 0.5 = the orders disagree
    assert edge_reasons(make_row("order", 0.8, ab=0.9, ba=0.3), cfg) == ["order_disagreement"]
    assert edge_reasons(make_row("order-ok", 0.8, ab=0.9, ba=0.7), cfg) == []
    assert edge_reasons(make_row("nan", 0.8, ab=0.9, ba=math.nan), cfg) == []
    assert edge_reasons(make_row("princ", 0.8, per=[0.2, 0.9]), cfg) == ["principle_disagreement"]
    assert edge_reasons(make_row("princ-narrow", 0.8, per=[0.45, 0.6]), cfg) == []  # spread 0.15
    assert edge_reasons(make_row("princ-same-side", 0.8, per=[0.55, 0.99]), cfg) == []
    orig = make_row("orig", 1.0, source="revision_vs_original", p_judge=0.3)
    assert edge_reasons(orig, cfg) == ["judge_prefers_original"]
    assert edge_reasons(make_row("orig-unjudged", 1.0, source="revision_vs_original"), cfg) == []
    judged_soft = make_row("orig-soft", 0.42, ab=0.4, ba=0.44, source="revision_vs_original")
    assert edge_reasons(judged_soft, cfg) == ["low_confidence", "judge_prefers_original"]
    gate_row = make_row("gate", 0.65)
    assert edge_reasons(gate_row, cfg) == []
    assert edge_reasons(gate_row, cfg, gate_tripped=True) == ["gate"]
    assert edge_reasons(make_row("human", 0.5, source="human"), cfg) == []


def test_routing_switches():
    row = make_row("all", 0.52, ab=0.9, ba=0.2, per=[0.1, 0.9])
    on = LabelsSection()
    assert edge_reasons(row, on, gate_tripped=True) == [
        "low_confidence",
        "order_disagreement",
        "principle_disagreement",
        "gate",
    ]
    off = LabelsSection(
        route_low_confidence=False,
        route_order_disagreement=False,
        route_principle_disagreement=False,
        route_gate=False,
        route_judge_prefers_original=False,
    )
    assert edge_reasons(row, off, gate_tripped=True) == []
    rows = [make_row("a", 0.9), row, make_row("b", 0.51)]
    routed = route_edge_cases(rows, on)
    assert [(r["pair_id"], reasons[0]) for r, reasons in routed] == [("all", "low_confidence"), ("b", "low_confidence")]


# --------------------------------------------------------------------------- queue


def test_schema_wal_and_idempotent_enqueue(tmp_path):
    q = queue_with(tmp_path, [make_row("p1", 0.55), make_row("p2", 0.45)])
    assert q.schema_version == 1
    with sqlite3.connect(q.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
        assert {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {
            "meta",
            "pairs",
            "labels",
        }
    assert q.enqueue([pair_from_row(make_row("p1", 0.55), ["x"])]) == 0
    assert q.status()["queued"] == 2 and q.pending_count() == 2
    assert q.pair("p1")["response_a"] == "chosen p1" and q.pair("p1")["principle_ids"] == ["harm-1", "honest-2"]
    q.close()
    with sqlite3.connect(tmp_path / "labels.sqlite") as raw:
        raw.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(LabelQueueError, match="schema_version"):
        LabelQueue(tmp_path / "labels.sqlite")


def test_labels_next_and_undo(tmp_path):
    q = queue_with(tmp_path, [make_row("p1"), make_row("p2"), make_row("p3")])
    assert q.next_unlabeled()["pair_id"] == "p1"
    q.record_label("p1", "A", "AB", "ann", "clear")
    q.record_label("p2", "B", "BA", "bob")
    assert q.next_unlabeled()["pair_id"] == "p3" and q.pending_count() == 1
    q.record_label("p3", "tie", "AB", "ann")
    labels = q.labels()
    assert [(lab["pair_id"], lab["choice"], lab["shown_order"], lab["labeler"]) for lab in labels] == [
        ("p1", "A", "AB", "ann"),
        ("p2", "B", "BA", "bob"),
        ("p3", "tie", "AB", "ann"),
    ]
    assert labels[0]["comment"] == "clear" and labels[0]["created_at"]
    undone = q.undo_last("ann")
    assert undone["pair_id"] == "p3"
    assert [lab["pair_id"] for lab in q.labels()] == ["p1", "p2"]
    assert q.next_unlabeled()["pair_id"] == "p3"
    assert q.undo_last("nobody") is None
    status = q.status()
    assert (status["queued"], status["labeled"], status["pending"]) == (3, 2, 1)
    assert status["by_choice"] == {"A": 1, "B": 1}
    with pytest.raises(ValueError):
        q.record_label("p1", "left", "AB", "ann")
    with pytest.raises(ValueError):
        q.record_label("p1", "A", "XY", "ann")
    with pytest.raises(KeyError):
        q.record_label("nope", "A", "AB", "ann")


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from cai_dpo.labels import LabelQueue
    db, labeler, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    q = LabelQueue(db)
    print("ready", flush=True)
    while not go.exists():
        pass
    i = 0
    while n < 0 or i < n:
        label = q.record_label(f"p{i % 4}", "AB"[i % 2], "BA", labeler, comment="c" * 200)
        print(label["label_id"], flush=True)
        i += 1
""")


def _writer(db: Path, labeler: str, n: int, go: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), labeler, str(n), str(go)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as raw:
        return raw.execute("PRAGMA integrity_check").fetchone()[0]


def test_killed_writer_keeps_committed_labels(tmp_path):
    q = queue_with(tmp_path, [make_row(f"p{i}") for i in range(4)])
    go = tmp_path / "go"
    go.touch()
    proc = _writer(q.path, "killed", -1, go)
    committed = [proc.stdout.readline().strip() for _ in range(40)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    fresh = LabelQueue(q.path)
    assert _integrity(q.path) == "ok"
    ids = {lab["label_id"] for lab in fresh.labels()}
    assert set(committed) <= ids
    fresh.record_label("p0", "A", "AB", "after")  # still writable
    assert len(fresh.labels()) == len(ids) + 1


def test_concurrent_writers_lose_nothing(tmp_path):
    q = queue_with(tmp_path, [make_row(f"p{i}") for i in range(4)])
    go = tmp_path / "go"
    procs = [_writer(q.path, f"w{k}", 25, go) for k in range(4)]
    go.touch()
    written = set()
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        written |= set(out.split())
    assert len(written) == 100
    assert _integrity(q.path) == "ok"
    labels = q.labels()
    assert {lab["label_id"] for lab in labels} == written
    assert {lab["labeler"] for lab in labels} == {"w0", "w1", "w2", "w3"}


# --------------------------------------------------------------------------- merge and exchange


def _dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def test_merge_overrides_excludes_and_is_idempotent(tmp_path):
    rows = [
        make_row("keep", 0.55),
        make_row("swap", 0.52),
        make_row("tie", 0.5),
        make_row("skip", 0.45),
        make_row("untouched", 0.9),
    ]
    ds = _dataset(rows)
    q = queue_with(tmp_path, rows[:4])
    q.record_label("keep", "A", "BA", "ann")
    q.record_label("swap", "A", "AB", "ann")
    q.record_label("swap", "B", "BA", "bob")  # latest label wins
    q.record_label("tie", "tie", "AB", "ann")
    q.record_label("skip", "skip", "AB", "ann")
    merged, counts = merge_labels_with_counts(ds, q)
    by_id = {r["pair_id"]: r for r in merged.to_list()}
    assert set(by_id) == {"keep", "swap", "untouched"}
    assert by_id["keep"]["chosen"][0]["content"] == "chosen keep"
    assert by_id["keep"]["p_chosen"] == 1.0 and by_id["keep"]["source"] == "human" and by_id["keep"]["margin"] == 1.0
    assert by_id["swap"]["chosen"][0]["content"] == "rejected swap"
    assert by_id["swap"]["rejected"][0]["content"] == "chosen swap"
    assert by_id["swap"]["p_chosen"] == 1.0 and by_id["swap"]["source"] == "human"
    assert by_id["untouched"] == rows[4]
    assert counts["overridden"] == 2 and counts["swapped"] == 1
    assert counts["excluded_tie"] == 1 and counts["excluded_skip"] == 1
    assert merged.features == ds.features
    again = merge_labels(merged, q)
    assert again.to_list() == merged.to_list()


def test_export_import_round_trip(tmp_path):
    q = queue_with(tmp_path, [make_row("p1"), make_row("p2")], "a.sqlite")
    q.record_label("p1", "B", "BA", "ann", "why")
    q.record_label("p2", "skip", "AB", "bob")
    out = q.export_jsonl(tmp_path / "queue.jsonl")
    fresh = LabelQueue(tmp_path / "b.sqlite")
    assert fresh.import_jsonl(out) == {"pairs": 2, "labels": 2, "revisions": 0}
    assert fresh.import_jsonl(out) == {"pairs": 0, "labels": 0, "revisions": 0}
    assert fresh.pairs() == q.pairs()
    assert fresh.labels() == q.labels()
    assert fresh.status()["labeled"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "meta", "schema_version": 1}\n{"kind": "nope"}\n')
    with pytest.raises(ValueError, match="line 2"):
        fresh.import_jsonl(bad)


def test_non_finite_extra_values_export_as_valid_json(tmp_path):
    """``extra: {"x": NaN}`` (from an import or a judge score) was exported as ``NaN``, which no JSON reader loads."""
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"kind": "meta", "schema_version": 1}\n'
        '{"kind": "pair", "pair_id": "p1", "prompt": "q", "response_a": "a", "response_b": "b", '
        '"extra": {"x": NaN, "y": [1.5, Infinity], "z": "kept"}}\n'
    )
    q = LabelQueue(tmp_path / "q.sqlite")
    q.import_jsonl(src)
    out = q.export_jsonl(tmp_path / "out.jsonl")
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the export")) for line in open(out)]
    assert rows[1]["extra"] == {"x": None, "y": [1.5, None], "z": "kept"}


def test_run_labels_routes_merges_and_reruns(tmp_cfg_path):
    cfg, run = tmp_cfg_path
    rows = [make_row("a", 0.55), make_row("b", 0.95, ab=0.9, ba=0.2), make_row("c", 0.95)]
    _dataset(rows).save_to_disk(str(run.data_dir("preferences")))
    out = run_labels(cfg, run)
    assert out == run.root / "data" / "preferences_merged"
    manifest = read_manifest(out)
    assert manifest["counts"]["queued_new"] == 2 and manifest["counts"]["by_reason"] == {
        "low_confidence": 1,
        "order_disagreement": 1,
    }
    merged = datasets.load_from_disk(str(out))
    assert {r["pair_id"]: r["edge_reasons"] for r in merged.to_list()} == {
        "a": ["low_confidence"],
        "b": ["order_disagreement"],
        "c": [],
    }
    q = LabelQueue(run.root / "labels.sqlite")
    q.record_label("a", "B", "AB", "ann")
    q.record_label("b", "tie", "BA", "ann")
    out = run_labels(cfg, run)
    manifest = read_manifest(out)
    assert manifest["counts"]["queued_new"] == 0 and manifest["counts"]["queued"] == 2
    assert manifest["counts"]["overridden"] == 1 and manifest["counts"]["excluded"] == 1
    merged = {r["pair_id"]: r for r in datasets.load_from_disk(str(out)).to_list()}
    assert set(merged) == {"a", "c"}
    assert merged["a"]["chosen"][0]["content"] == "rejected a" and merged["a"]["source"] == "human"


# --------------------------------------------------------------------------- human revisions


def _sl_dataset(run: RunStore) -> None:
    _dataset(
        [
            {
                "messages": [
                    {"role": "user", "content": f"sl prompt {i}"},
                    {"role": "assistant", "content": f"sl answer {i}"},
                ],
                "prompt_id": f"s{i}",
                "principle_ids": ["harm-1"],
                "source": "sl",
                "weight": None,
            }
            for i in range(2)
        ]
    ).save_to_disk(str(run.data_dir("sl")))


def test_revisions_feed_sft_rows_merged_preferences_and_the_sft_fingerprint(tmp_path):
    from cai_dpo.config import load_config
    from cai_dpo.pipeline import STAGES, _fingerprint
    from cai_dpo.sft_rows import build_rows
    from cai_dpo.widgets import RevisionWidget

    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs"), "sft.data": "sl"})
    run = RunStore(cfg.run_dir)
    _sl_dataset(run)
    rows = [make_row("a", 0.55), make_row("c", 0.95)]
    _dataset(rows).save_to_disk(str(run.data_dir("preferences")))
    stage = {s.name: s for s in STAGES}
    sft_before = _fingerprint(stage["sft"], cfg, run)
    assert {r["source"] for r in build_rows(cfg, run)[0]} == {"sl"}
    run_labels(cfg, run)  # queues pair "a"; creates labels.sqlite
    assert _fingerprint(stage["sft"], cfg, run) == sft_before  # a database without revisions changes nothing
    before = {n: _fingerprint(stage[n], cfg, run) for n in ("labels", "dpo")}

    q = LabelQueue(run.root / "labels.sqlite")
    rev = q.record_revision("a much better answer", pair_id="a", author="ann")
    q.close()  # committed at once: another connection sees it
    with sqlite3.connect(run.root / "labels.sqlite") as raw:
        stored = raw.execute("SELECT record_key, original, response, author, created_at FROM revisions").fetchall()
    assert stored == [("a", "chosen a", "a much better answer", "ann", rev["created_at"])]
    assert rev["created_at"].endswith("+00:00")
    assert _fingerprint(stage["sft"], cfg, run) != sft_before
    assert {n: _fingerprint(stage[n], cfg, run) for n in before} == before  # they rerun through SFT's new manifest

    # an SL record rewritten in the SL widget replaces its SL row
    w = RevisionWidget(
        LabelQueue(run.root / "labels.sqlite"), datasets.load_from_disk(str(run.data_dir("sl"))), author="bob"
    )
    w.revision.value = "sl answer 0, made kinder"
    w.button.click()
    assert "Saved your response for sl:s0" in w.message.value
    w.button.click()  # unchanged text -> the same revision again; the latest of a record is used
    w.save("sl answer 0, made kinder still")
    w.revision.value = "sl answer 1"  # identical to the original: refused, shown in the widget
    w.dropdown.value = 1
    w.button.click()
    assert "same as the original" in w.message.value

    train, info = build_rows(cfg, run)
    by_source = {}
    for r in train:
        by_source.setdefault(r["source"], []).append(r)
    assert [r["messages"][-1]["content"] for r in by_source["sl"]] == ["sl answer 1"]
    assert [(r["id"], r["messages"]) for r in by_source["human_revision"]] == [
        ("a", [{"role": "user", "content": "prompt a"}, {"role": "assistant", "content": "a much better answer"}]),
        (
            "sl:s0",
            [
                {"role": "user", "content": "sl prompt 0"},
                {"role": "assistant", "content": "sl answer 0, made kinder still"},
            ],
        ),
    ]
    assert all(r["weight"] == 1.0 for r in train)
    assert info["counts"]["rows_human_revision"] == 2 and info["counts"]["sl_replaced_by_revision"] == 1
    assert "revisions" in info["inputs"]

    out = run_labels(cfg, run)
    merged = {r["pair_id"]: r for r in datasets.load_from_disk(str(out)).to_list()}
    pair = merged["revision:a"]
    assert pair["chosen"] == [{"role": "assistant", "content": "a much better answer"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "chosen a"}]
    assert (pair["source"], pair["p_chosen"], pair["prompt"]) == (
        "human_revision",
        1.0,
        [{"role": "user", "content": "prompt a"}],
    )
    assert merged["revision:sl:s0"]["rejected"][0]["content"] == "sl answer 0"
    assert read_manifest(out)["counts"]["human_revisions"] == 2
    assert merged["a"]["source"] == "judged_samples"  # a revision is not a label


def test_revision_export_import_round_trip_and_bad_rows(tmp_path):
    q = queue_with(tmp_path, [make_row("p1")], "a.sqlite")
    q.record_label("p1", "A", "AB", "ann")
    text = "first line\u2028second line \u00e9 \U0001f600"
    q.record_revision(text, pair_id="p1", author="ann")
    q.record_revision(
        "x",
        record_key="sl:s9",
        prompt=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
        original="y",
    )
    out = q.export_jsonl(tmp_path / "queue.jsonl")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 5  # U+2028 does not split a line
    fresh = LabelQueue(tmp_path / "b.sqlite")
    assert fresh.import_jsonl(out) == {"pairs": 1, "labels": 1, "revisions": 2}
    assert fresh.import_jsonl(out) == {"pairs": 0, "labels": 0, "revisions": 0}
    assert fresh.revisions() == q.revisions() and fresh.revisions()[0]["response"] == text
    assert fresh.status()["revisions"] == 2

    lines = out.read_text(encoding="utf-8").splitlines()
    good_pair = json.loads(lines[1]) | {"pair_id": "p2"}
    bad_rev = json.loads(lines[3]) | {"revision_id": "new", "pair_id": "p2", "prompt": "just text"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(good_pair), json.dumps(bad_rev)]) + "\n", encoding="utf-8")
    target = LabelQueue(tmp_path / "c.sqlite")
    with pytest.raises(LabelQueueError, match=r"bad\.jsonl: line 3: field 'prompt'"):
        target.import_jsonl(bad)
    bad.write_text(
        "\n".join(
            [
                json.dumps(good_pair),
                json.dumps(bad_rev | {"prompt": [{"role": "user", "content": "q"}], "created_at": "yesterday"}),
            ]
        )
        + "\n"
    )
    with pytest.raises(LabelQueueError, match=r"line 2: field 'created_at'"):
        target.import_jsonl(bad)
    assert target.pairs() == [] and target.revisions() == []  # nothing committed
    with pytest.raises(LabelQueueError, match="field 'response' is empty"):
        target.record_revision("  ", record_key="k", prompt="q", original="o")
    with pytest.raises(KeyError, match="nope"):
        target.record_revision("better", pair_id="nope")


def test_widget_save_response_writes_a_revision(tmp_path):
    from cai_dpo.widgets import LabelingWidget

    q = queue_with(tmp_path, [make_row("p0", 0.55)])
    w = LabelingWidget(q, labeler="ann")
    assert w.revision.value == "chosen p0"  # prefilled with the AI's chosen response
    w.revision.value = "a kinder answer"
    w.buttons["Save response"].click()
    assert "Saved your response for pair p0" in w.message.value
    assert [(r["record_key"], r["response"], r["author"]) for r in q.revisions()] == [("p0", "a kinder answer", "ann")]
    assert w.current["pair_id"] == "p0" and q.labels() == []  # still on screen to label
    w.buttons["Save response"].click()  # the same text again is stored again (latest wins)
    w.revision.value = "chosen p0"
    w.buttons["Save response"].click()
    assert "same as the original" in w.message.value and len(q.revisions()) == 2
    w.buttons["A better"].click()
    assert w.current is None and w.buttons["Save response"].disabled and w.revision.value == ""


@pytest.fixture()
def tmp_cfg_path(tmp_path):
    from cai_dpo.config import load_config

    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    return cfg, RunStore(cfg.run_dir)


def test_run_labels_missing_input_names_fix(tmp_cfg_path):
    cfg, run = tmp_cfg_path
    with pytest.raises(FileNotFoundError, match="judge"):
        run_labels(cfg, run)


# --------------------------------------------------------------------------- widgets


def test_widget_buttons_write_rows_with_shown_order(tmp_path):
    from cai_dpo.widgets import LabelingWidget, shown_order_for

    q = queue_with(tmp_path, [make_row(f"p{i}", 0.55) for i in range(3)])
    w = LabelingWidget(q, labeler="ann", seed=3)
    assert set(w.buttons) == {"A better", "B better", "Tie", "Skip", "Undo last", "Save response"}
    assert w.progress_text.value == "0 / 3 labeled"
    first, order = w.current["pair_id"], w.shown_order
    assert first == "p0" and order == shown_order_for("p0", 3)
    left_text = "chosen p0" if order == "AB" else "rejected p0"
    assert left_text in w.left.value and "prompt p0" in w.prompt.value and "harm-1" in w.info.value
    w.comment.value = "left looks fine"
    w.buttons["A better"].click()
    label = q.labels()[-1]
    assert (label["pair_id"], label["choice"], label["shown_order"], label["labeler"], label["comment"]) == (
        "p0",
        order[0],
        order,
        "ann",
        "left looks fine",
    )
    assert w.current["pair_id"] == "p1" and w.progress.value == 1 and w.progress_text.value == "1 / 3 labeled"
    order1 = w.shown_order
    w.buttons["B better"].click()
    assert q.labels()[-1]["choice"] == order1[1] and q.labels()[-1]["shown_order"] == order1
    w.buttons["Undo last"].click()
    assert [lab["pair_id"] for lab in q.labels()] == ["p0"]
    assert w.current["pair_id"] == "p1" and w.progress.value == 1
    w.buttons["Tie"].click()
    w.buttons["Skip"].click()
    assert [lab["choice"] for lab in q.labels()] == [order[0], "tie", "skip"]
    assert w.current is None and w.buttons["A better"].disabled and w.progress_text.value == "3 / 3 labeled"
    w.buttons["A better"].click()  # disabled in the browser; a programmatic click must not write
    assert len(q.labels()) == 3


def test_widget_order_is_randomized_by_seed(tmp_path):
    from cai_dpo.widgets import shown_order_for

    orders = {shown_order_for(f"p{i}", 0) for i in range(20)}
    assert orders == {"AB", "BA"}
    assert [shown_order_for(f"p{i}", 0) for i in range(20)] != [shown_order_for(f"p{i}", 1) for i in range(20)]


def test_labeling_ui_unattended_returns_summary(tmp_path, monkeypatch):
    from cai_dpo.widgets import LabelingWidget, QueueSummary, is_unattended, labeling_ui

    q = queue_with(tmp_path, [make_row("p1"), make_row("p2")])
    monkeypatch.setenv("CAI_DPO_UNATTENDED", "1")
    assert is_unattended()
    summary = labeling_ui(str(q.path))
    assert isinstance(summary, QueueSummary)
    assert summary["queued"] == 2 and summary["pending"] == 2
    assert "2 pair(s) queued" in summary._repr_html_()
    monkeypatch.setenv("CAI_DPO_UNATTENDED", "0")
    assert not is_unattended()
    widget = labeling_ui(q, labeler="ann")
    assert isinstance(widget, LabelingWidget) and widget.labeler == "ann"
    assert isinstance(labeling_ui(q, unattended=True), QueueSummary)


@dataclass
class _Principle:
    id: str
    category: str
    critique: str
    revision: str
    comparison: str


@dataclass
class _Constitution:
    name: str = "stand-in"
    version: str = "0"
    principles: list = field(
        default_factory=lambda: [
            _Principle("harm-1", "harmlessness", "Point out harm.", "Remove the harm.", "Which is less harmful?"),
            _Principle("honest-2", "honesty", "Point out falsehoods.", "Fix them.", "Which is more honest?"),
        ]
    )

    def principle(self, pid):
        return next(p for p in self.principles if p.id == pid)

    def categories(self):
        return sorted({p.category for p in self.principles})


def test_constitution_explorer_and_principle_text(tmp_path):
    from cai_dpo.widgets import LabelingWidget, constitution_explorer

    c = _Constitution()
    ex = constitution_explorer(c)
    assert "Point out harm." in ex.detail.value and "Which is less harmful?" in ex.detail.value
    ex.dropdown.value = "honest-2"
    assert "Which is more honest?" in ex.detail.value and "Point out harm." not in ex.detail.value
    w = LabelingWidget(queue_with(tmp_path, [make_row("p1")]), constitution=c)
    assert "Which is less harmful?" in w.info.value


# --------------------------------------------------------------------------- CLI


def test_cli_labels_export_import_status(tmp_path, capsys):
    from cai_dpo.cli import main

    q = queue_with(tmp_path, [make_row("p1"), make_row("p2")], "a.sqlite")
    q.record_label("p1", "A", "AB", "ann")
    q.record_revision("better", pair_id="p2")
    assert main(["labels", "export", "--profile", "tiny", "--db", str(q.path), str(tmp_path / "x.jsonl")]) == 0
    assert "1 revision(s)" in capsys.readouterr().out
    b = tmp_path / "b.sqlite"
    assert main(["labels", "import", "--profile", "tiny", "--db", str(b), str(tmp_path / "x.jsonl")]) == 0
    assert "1 new revision(s)" in capsys.readouterr().out
    assert main(["labels", "status", "--profile", "tiny", "--db", str(b), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["queued"], status["labeled"], status["pending"], status["revisions"]) == (2, 1, 1, 1)


def test_run_labels_widens_band_when_gate_tripped(tmp_cfg_path):
    from dataclasses import replace

    from cai_dpo.store import Manifest

    cfg, run = tmp_cfg_path
    cfg = replace(cfg, labels=replace(cfg.labels, route_gate_sample=0))
    src = run.data_dir("preferences")
    _dataset([make_row("a", 0.65), make_row("b", 0.95)]).save_to_disk(str(src))
    Manifest(stage="judge", metrics={"gate_tripped": True}).write(src / "manifest.json")
    manifest = read_manifest(run_labels(cfg, run))
    assert manifest["metrics"]["gate_tripped"] is True
    assert manifest["counts"]["by_reason"] == {"gate": 1}
    assert [p["pair_id"] for p in LabelQueue(run.root / "labels.sqlite").pairs()] == ["a"]


def _rvo_rows(n: int) -> list[dict]:
    """Revision-vs-original rows as the judge writes them when the gate tripped: p_chosen 1, no judge scores."""
    return [make_row(f"r{i}", 1.0, source="revision_vs_original", p_judge=float("nan")) for i in range(n)]


def test_gate_sample_routes_n_pairs_only_when_tripped():
    cfg = LabelsSection(route_gate_sample=3)
    rows = _rvo_rows(10)
    assert route_edge_cases(rows, cfg, gate_tripped=False) == []
    routed = route_edge_cases(rows, cfg, gate_tripped=True, seed=1)
    assert len(routed) == 3 and all(reasons == ["gate_sample"] for _, reasons in routed)
    again = route_edge_cases(list(reversed(rows)), cfg, gate_tripped=True, seed=1)
    assert {r["pair_id"] for r, _ in again} == {r["pair_id"] for r, _ in routed}  # seeded by pair id, not order
    # rows a rule already routes are not counted in the sample; human rows never route
    rows2 = [make_row("low", 0.52)] + _rvo_rows(5) + [dict(make_row("h", 1.0), source="human")]
    routed2 = route_edge_cases(rows2, cfg, gate_tripped=True)
    reasons = {r["pair_id"]: rs for r, rs in routed2}
    assert "low_confidence" in reasons["low"] and "h" not in reasons
    assert sum(rs == ["gate_sample"] for rs in reasons.values()) == 3
    assert route_edge_cases(rows, LabelsSection(route_gate_sample=0), gate_tripped=True) == []


def test_run_labels_queues_gate_sample_when_tripped(tmp_cfg_path):
    from dataclasses import replace

    from cai_dpo.store import Manifest

    cfg, run = tmp_cfg_path
    cfg = replace(cfg, labels=replace(cfg.labels, route_gate_sample=4))
    src = run.data_dir("preferences")
    _dataset(_rvo_rows(9)).save_to_disk(str(src))
    Manifest(stage="judge", metrics={"gate_tripped": True}).write(src / "manifest.json")
    manifest = read_manifest(run_labels(cfg, run))
    assert manifest["counts"]["by_reason"] == {"gate_sample": 4}
    queued = LabelQueue(run.root / "labels.sqlite").pairs()
    assert len(queued) == 4 and all(p["reasons"] == ["gate_sample"] for p in queued)
    run_labels(cfg, run)  # a rerun queues the same pairs, nothing new
    assert len(LabelQueue(run.root / "labels.sqlite").pairs()) == 4


CHILD = "from cai_dpo.widgets import is_unattended; print(is_unattended())"
PARENT = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1]]))"


@pytest.mark.parametrize("marker, expected", [("papermill", "True"), ("jupyter-lab", "False")])
def test_unattended_detects_papermill_parent(marker, expected):
    env = {k: v for k, v in os.environ.items() if k != "CAI_DPO_UNATTENDED"}
    out = subprocess.run(
        [sys.executable, "-c", PARENT, CHILD, marker], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == expected
