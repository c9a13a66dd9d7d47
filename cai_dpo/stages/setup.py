"""The setup stage: check the machine, prepare the model cache, validate and test the constitution.

Writes ``constitution/`` in the run: a copy of the constitution used, the results of
its edge-case tests (``<name>_cases.yaml`` beside the constitution, when present)
and a manifest. Later stages read the constitution from the config, so a run can be
re-read later with exactly the text it was built with.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.store import (
    Manifest,
    RunStore,
    Timer,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    file_hash,
    locked_stage,
)

log = logging.getLogger(__name__)


def cases_path_for(constitution_path: Path) -> Path | None:
    """The edge-case file shipped beside a constitution (``default.yaml`` → ``default_cases.yaml``)."""
    candidate = constitution_path.with_name(f"{constitution_path.stem}_cases.yaml")
    return candidate if candidate.exists() else None


@locked_stage
def run_setup(cfg: RunConfig, run: RunStore | None = None, *, engine: Any = None) -> Path:
    """Prepare the policy model, validate the constitution and run its edge-case tests."""
    from cai_dpo.constitution import load_cases, load_constitution
    from cai_dpo.judge import Judge, format_case_table
    from cai_dpo.models import describe, resolve_model_path

    run = run or RunStore(cfg.run_dir)
    final = run.constitution
    with atomic_dir(final) as out:  # constitution copy, case results and manifest in one atomic step
        timings: dict[str, float] = {}
        with Timer() as t:
            resolve_model_path(cfg.policy.name, cfg.policy.revision)
        timings["model_prepare_s"] = round(t.seconds, 2)
        path = cfg.constitution_path()
        constitution = load_constitution(path)
        atomic_write_text(out / "constitution.yaml", Path(constitution.path or path).read_text(encoding="utf-8"))
        counts: dict[str, Any] = {"principles": len(constitution.principles)}
        counts.update({f"category_{c}": len(constitution.by_category(c)) for c in constitution.categories()})
        metrics: dict[str, Any] = {}
        cases_file = cases_path_for(Path(constitution.path or path))
        if cases_file is not None:
            cases = load_cases(cases_file, constitution)
            with Timer() as t:
                results = Judge.load(cfg, engine=engine, constitution=constitution).run_cases(cases)
            timings["cases_s"] = round(t.seconds, 2)
            atomic_write_json(out / "cases.json", [asdict(r) for r in results])
            atomic_write_text(out / "cases.txt", format_case_table(results) + "\n")
            passed = sum(r.passed for r in results)
            metrics["edge_cases"] = {"file": str(cases_file), "passed": passed, "total": len(results)}
            log.info("constitution edge cases: %d/%d passed", passed, len(results))
        Manifest(
            stage="setup",
            config=to_dict(cfg),
            inputs={
                "constitution": file_hash(Path(constitution.path or path)),
                **({"cases": file_hash(cases_file)} if cases_file else {}),
            },
            models={"policy": describe(cfg.policy), "judge": describe(cfg.judge_model())},
            counts=counts,
            timings=timings,
            metrics=metrics,
        ).write(out / "manifest.json")
    return final
