"""The labels stage: route the judge's edge cases to a person and merge the labels so far.

Reads ``data/preferences``, queues the pairs the judge is unsure of in the run's label queue
(:mod:`cai_dpo.labels`, labelled in :class:`cai_dpo.widgets.LabelingWidget`), lets each human
label override the AI's, adds a pair per response a person wrote, and writes
``data/preferences_merged`` with a manifest.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.labels import (
    LabelQueue,
    gate_tripped,
    merge_labels_with_counts,
    pair_from_row,
    queue_path,
    revision_pref_rows,
    route_edge_cases,
    rows_to_dataset,
)
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, file_hash, locked_stage, read_manifest

log = logging.getLogger(__name__)


@locked_stage
def run_labels(cfg: RunConfig, run: RunStore | None = None) -> Path:
    """Route edge cases of ``data/preferences`` into the queue, merge the labels so far, add a
    pair per written response (:func:`revision_pref_rows`) and write ``data/preferences_merged``
    (with a manifest). Safe to rerun: pairs are queued once."""
    import datasets

    run = run or RunStore(cfg.run_dir)
    src = run.preferences
    if not (src / "dataset_info.json").exists():
        raise FileNotFoundError(f"{src}: preference dataset not found; run the judge stage first (cai-dpo judge)")
    with Timer() as timer:
        prefs = datasets.load_from_disk(str(src))
        try:
            tripped = gate_tripped(read_manifest(src))
        except FileNotFoundError:
            tripped = False
        rows = prefs.to_list()
        routed = route_edge_cases(rows, cfg.labels, gate_tripped=tripped, seed=cfg.seed)
        reasons_by_id = {row["pair_id"]: reasons for row, reasons in routed}
        qpath = queue_path(cfg)
        with LabelQueue(qpath) as queue:
            added = queue.enqueue(pair_from_row(row, reasons) for row, reasons in routed)
            if "edge_reasons" in prefs.column_names:
                for row in rows:
                    if row.get("pair_id") in reasons_by_id:
                        row["edge_reasons"] = sorted(
                            set(row.get("edge_reasons") or []) | set(reasons_by_id[row["pair_id"]])
                        )
            features = prefs.features.copy()
            if "edge_reasons" in features:  # an all-empty column loads as a list of nulls
                features["edge_reasons"] = datasets.List(datasets.Value("string"))
            merged, counts = merge_labels_with_counts(rows_to_dataset(rows, features), queue)
            revised = revision_pref_rows(queue, features)
            if revised:
                merged = datasets.concatenate_datasets([merged, rows_to_dataset(revised, features)])
            status = queue.status()
    final = run.preferences_merged
    with atomic_dir(final) as tmp:
        merged.save_to_disk(str(tmp))
        Manifest(
            stage="labels",
            config=to_dict(cfg.labels),
            inputs={"preferences": file_hash(src), "labels_db": str(qpath)},
            counts={
                "rows_in": len(prefs),
                "rows_out": len(merged),
                "routed": len(routed),
                "queued_new": added,
                "queued": status["queued"],
                "pending": status["pending"],
                "labeled": counts["labeled"],
                "overridden": counts["overridden"],
                "swapped": counts["swapped"],
                "excluded": counts["excluded_tie"] + counts["excluded_skip"],
                "excluded_tie": counts["excluded_tie"],
                "excluded_skip": counts["excluded_skip"],
                "mismatched": counts["mismatched"],
                "by_reason": dict(Counter(r for _, rs in routed for r in rs)),
                "human_revisions": len(revised),
            },
            timings={"seconds": timer.seconds},
            metrics={"gate_tripped": tripped},
        ).write(tmp / "manifest.json")
    log.info(
        "labels: %d routed (%d new), %d labeled, %d overridden, %d excluded -> %s",
        len(routed),
        added,
        counts["labeled"],
        counts["overridden"],
        counts["excluded_tie"] + counts["excluded_skip"],
        final,
    )
    return final
