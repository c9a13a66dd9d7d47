"""The SFT stage's training rows for ``sft.data``: curated, SL-CAI and person-written examples.

:func:`build_rows` is what ``cai-dpo sft`` trains on and what PPO's pretraining-mix term
reads with ``ppo.ptx_data: sft``. Each row is a dict with ``messages`` (user turn, assistant
turn), ``source`` (:data:`ROW_SOURCES`), ``id``, ``kind``, ``principle_ids`` and ``weight``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, raise_problems
from cai_dpo.errors import InputError
from cai_dpo.store import RunStore, content_hash, dataset_hash, file_hash
from cai_dpo.training import example_weights

#: ``source`` of a training row: the curated set, SL-CAI revisions, revisions written by a person.
ROW_SOURCES = ("curated", "sl", "human_revision")


def _subsample(rows: list[dict[str, Any]], n: int, seed: int, tag: str) -> list[dict[str, Any]]:
    """A seeded subset of ``n`` rows, in their original order."""
    if n >= len(rows):
        return rows
    keep = set(sorted(range(len(rows)), key=lambda i: content_hash(seed, tag, i))[:n])
    return [r for i, r in enumerate(rows) if i in keep]


def rebalance_kinds(rows: list[dict[str, Any]], harmful_ratio: float | None, seed: int) -> list[dict[str, Any]]:
    """Curated rows subsampled so ``harmful`` rows are ``harmful_ratio`` of them (None: unchanged).

    The over-represented kind is subsampled (seeded), the other kept whole.
    """
    if harmful_ratio is None:
        return rows
    if not 0.0 <= harmful_ratio <= 1.0:
        raise InputError(f"sft.curated_harmful_ratio must be in [0, 1] or null, got {harmful_ratio}")
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r for r in rows if r["kind"] != "harmful"]
    if harmful_ratio == 0.0:
        return benign
    if harmful_ratio == 1.0:
        return harmful
    want_h = int(round(harmful_ratio / (1 - harmful_ratio) * len(benign)))
    if want_h <= len(harmful):
        harmful = _subsample(harmful, want_h, seed, "harmful")
    else:
        benign = _subsample(benign, int(round((1 - harmful_ratio) / harmful_ratio * len(harmful))), seed, "benign")
    keep = {id(r) for r in harmful + benign}
    return [r for r in rows if id(r) in keep]


def _sl_rows(data_dir: Path) -> list[dict[str, Any]]:
    """``data/sl`` as training rows (``source``: ``human_revision`` for a person's revision, else ``sl``)."""
    import datasets

    if not (data_dir / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"{data_dir}: SL-CAI dataset not found; run `cai-dpo sl` (stages.sl.run_sl) first, or set sft.data=curated"
        )
    dataset = datasets.load_from_disk(str(data_dir), keep_in_memory=True)  # no cache files written into data/sl
    rows = []
    for r in dataset.to_list():
        src = str(r.get("source") or "")
        rows.append(
            {
                "messages": r["messages"],
                "source": "human_revision" if src in ("human", "human_revision") else "sl",
                "kind": "",
                "id": str(r.get("prompt_id") or ""),
                "principle_ids": list(r.get("principle_ids") or []),
                "weight": r.get("weight"),
            }
        )
    return rows


def _curate_rows(data_dir: Path) -> list[dict[str, Any]]:
    """``data/curated`` (the curation stage's output) as training rows; ``weight`` is the curation weight."""
    import datasets

    if not (data_dir / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"{data_dir}: curated dataset not found; run `cai-dpo curate` "
            "(stages.curate.run_curate) first, or set sft.data=curated"
        )
    dataset = datasets.load_from_disk(str(data_dir), keep_in_memory=True)
    rows = []
    for r in dataset.to_list():
        src = str(r.get("source") or "")
        source = (
            "human_revision"
            if src.endswith(("human", "human_revision"))
            else "sl"
            if src.startswith("sl")
            else "curated"
        )
        rows.append(
            {
                "messages": r["messages"],
                "source": source,
                "kind": str(r.get("kind") or ""),
                "id": str(r.get("prompt_id") or ""),
                "principle_ids": list(r.get("principle_ids") or []),
                "weight": r.get("weight"),
            }
        )
    return rows


def _add_human_revisions(cfg: RunConfig, rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` plus a ``human_revision`` row per record a person rewrote in the run's label
    database (:func:`cai_dpo.labels.revision_sft_rows`), whatever ``sft.data`` is. An SL row
    with the same prompt id and the original response is replaced by the revision."""
    from cai_dpo.labels import LabelQueue, queue_path, revision_sft_rows

    db = queue_path(cfg)
    if not db.exists():
        return rows
    with LabelQueue(db, read_only=True) as queue:
        revised = revision_sft_rows(queue)
    if not revised:
        return rows
    replaced = {(r["id"].removeprefix("sl:"), r.pop("original")) for r in revised}
    kept = [r for r in rows if not (r["source"] == "sl" and (r["id"], r["messages"][-1]["content"]) in replaced)]
    info["inputs"]["revisions"] = content_hash([(r["id"], r["messages"]) for r in revised])
    info["counts"]["sl_replaced_by_revision"] = len(rows) - len(kept)
    return kept + revised


def build_rows(cfg: RunConfig, run: RunStore) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The SFT training rows for ``sft.data`` and what they came from.

    Each row: ``messages`` (user turn, assistant turn), ``source`` (one of
    :data:`ROW_SOURCES`), ``id``, ``kind`` (curated rows), ``principle_ids`` and ``weight``
    (the training weight, see :func:`cai_dpo.training.example_weights`). Curated rows come
    from the ``train`` split only; ``heldout`` rows never train. Responses written by a person
    in the run's label database are added whatever ``sft.data`` is (see
    :func:`_add_human_revisions`). Returns (rows, info) with
    ``info`` holding input hashes and counts for the manifest. Raises ``FileNotFoundError``
    for missing data, ``InputError`` for an empty selection and ``ConfigError`` for a bad ``sft`` setting.
    """
    from cai_dpo.curated import curated_files, load_curated

    sc = cfg.sft
    raise_problems(sc, source=str(run.config_file), prefix="sft.")
    info: dict[str, Any] = {"inputs": {}, "counts": {}}
    rows: list[dict[str, Any]] = []
    curated: list[dict[str, Any]] = []
    if sc.data in ("curated", "both"):
        examples = load_curated(sc.curated, split="train")
        curated = [
            {
                "messages": e.messages(),
                "source": "curated",
                "kind": e.kind,
                "id": e.id,
                "principle_ids": list(e.principle_ids),
                "weight": e.meta.get("weight"),
            }
            for e in examples
        ]
        curated = rebalance_kinds(curated, sc.curated_harmful_ratio, cfg.seed)
        if not curated:
            raise InputError(
                f"{sc.curated}: no curated 'train' rows left (sft.curated_harmful_ratio={sc.curated_harmful_ratio})"
            )
        info["inputs"]["curated"] = content_hash([file_hash(f) for f in curated_files(sc.curated)])
        info["counts"]["curated_harmful"] = sum(r["kind"] == "harmful" for r in curated)
        info["counts"]["curated_benign"] = sum(r["kind"] == "benign" for r in curated)
    if sc.data == "curate":
        data_dir = run.curated_data
        rows = _curate_rows(data_dir)
        kinds = [r for r in rows if r["kind"] in ("harmful", "benign")]
        kept = {id(r) for r in rebalance_kinds(kinds, sc.curated_harmful_ratio, cfg.seed)}
        rows = [r for r in rows if r["kind"] not in ("harmful", "benign") or id(r) in kept]
        info["inputs"]["data/curated"] = dataset_hash(data_dir)
        info["counts"]["curated_harmful"] = sum(r["kind"] == "harmful" for r in rows)
        info["counts"]["curated_benign"] = sum(r["kind"] == "benign" for r in rows)
    if sc.data in ("sl", "both"):
        data_dir = run.sl_data
        sl = _sl_rows(data_dir)
        info["inputs"]["data/sl"] = dataset_hash(data_dir)
        if sc.data == "both" and sc.sl_share is not None and sc.sl_share < 1.0:
            sl = _subsample(sl, int(round(sc.sl_share / (1 - sc.sl_share) * len(curated))), cfg.seed, "sl")
        if sc.data == "sl" and not sl:
            raise InputError(f"{data_dir}: the SL-CAI dataset is empty; check data.red_team and rerun `cai-dpo sl`")
        rows.extend(sl)
    rows.extend(curated)
    rows = _add_human_revisions(cfg, rows, info)
    if not rows:
        raise InputError(f"sft.data={sc.data}: no training rows")
    weights = example_weights(rows, sc.weighting, sc.principle_weights, source=f"sft.data={sc.data}")
    for r, w in zip(rows, weights):
        r["weight"] = w
    info["counts"].update({f"rows_{s}": sum(r["source"] == s for r in rows) for s in ROW_SOURCES})
    info["counts"]["weight_mean"] = sum(weights) / len(weights)
    info["data_hash"] = content_hash([(r["messages"], r["weight"]) for r in rows])
    return rows, info
