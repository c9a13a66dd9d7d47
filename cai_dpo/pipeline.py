"""The notebook chain: every stage notebook executed in order with papermill.

``cai-dpo run --profile cpu-demo`` writes the run config to ``<run>/config.yaml`` and
executes ``notebooks/NN_*.ipynb`` into ``<run>/notebooks/``. A stage whose notebook,
config and upstream artifacts are unchanged since its last successful execution is
skipped; a failure stops the chain, names the notebook and the cell, and keeps the
executed notebook with its error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_dpo.config import (
    REPO_ROOT,
    RUNS_ENV,
    RunConfig,
    apply_overrides,
    config_from_yaml_text,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from cai_dpo.errors import InputError
from cai_dpo.store import (
    RUN_LAYOUT,
    RunLayout,
    RunStore,
    artifact_manifest,
    atomic_write_json,
    content_hash,
    file_hash,
    run_lock,
)

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
UNATTENDED_ENV = "CAI_DPO_UNATTENDED"


@dataclass(frozen=True)
class Stage:
    """One notebook of the chain and what its result depends on.

    ``inputs``: run artifacts it reads (their manifests are hashed); ``outputs``: what it
    writes; ``volatile_inputs``: state outside the artifacts (``labels``: the label queue's labels,
    ``revisions``: the responses people wrote in it; see :data:`VOLATILE_INPUTS`).
    ``sections``: the :class:`RunConfig` sections (and top-level fields) it reads;
    ``conditional``: ``(condition, sections)`` pairs read only when ``condition(cfg)`` holds
    (e.g. iterative DPO rounds run the pair, judge and label stages). ``files``: input files
    whose contents it reads, by kind (see :func:`input_files`).
    """

    name: str
    notebook: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    volatile_inputs: tuple[str, ...] = field(default=())
    sections: tuple[str, ...] = ()
    conditional: tuple[tuple[Callable[[RunConfig], bool], tuple[str, ...]], ...] = ()
    files: tuple[str, ...] = ()

    def path(self) -> Path:
        return NOTEBOOKS_DIR / self.notebook

    def outputs_for(self, cfg: RunConfig) -> tuple[str, ...]:
        """``outputs`` with ``{ppo_mode}`` filled in (``ppo`` or ``rloo``: the RL stage's own result)."""
        return tuple(o.format(ppo_mode=cfg.ppo.mode) for o in self.outputs)

    def inputs_for(self, cfg: RunConfig) -> tuple[str, ...]:
        """``inputs`` with ``{ppo_mode}`` filled in."""
        return tuple(i.format(ppo_mode=cfg.ppo.mode) for i in self.inputs)

    def sections_for(self, cfg: RunConfig) -> tuple[str, ...]:
        """The config sections this stage reads under ``cfg``, in declaration order."""
        out = list(self.sections)
        for condition, extra in self.conditional:
            if condition(cfg):
                out += [s for s in extra if s not in out]
        return tuple(out)

    def all_sections(self) -> set[str]:
        """Every section this stage may read, whatever the config."""
        return set(self.sections).union(*(extra for _, extra in self.conditional))


def _dpo_rounds(cfg: RunConfig) -> bool:
    return cfg.dpo.rounds > 1


def _ppo_ptx(cfg: RunConfig) -> bool:
    return cfg.ppo.ptx_coef > 0


def _ppo_benign(cfg: RunConfig) -> bool:
    return cfg.ppo.benign_prompts > 0


def _rm_helpful_mix(cfg: RunConfig) -> bool:
    return cfg.rm.helpful_mix is not None  # helpful rows: prompts of data.helpful and pairs.curated's benign ones


_MODEL = ("policy", "seed", "threads")
_m = artifact_manifest  # "<artifact>/manifest.json" of a named artifact of the run layout
STAGES: tuple[Stage, ...] = (
    Stage(
        "setup",
        "00_setup.ipynb",
        (_m("constitution"),),
        sections=("constitution", "judge", *_MODEL),
        files=("constitution", "constitution_cases"),
    ),
    Stage(
        "sl",
        "01_sl.ipynb",
        (_m("sl_data"),),
        sections=("sl", "constitution", "data", *_MODEL),
        files=("constitution", "prompts"),
    ),
    Stage(
        "curate",
        "02_curate.ipynb",
        (_m("curated_data"),),
        (_m("sl_data"),),
        sections=("curate", "judge", "constitution", *_MODEL),
        files=("constitution", "curated"),
    ),
    Stage(
        "sft",
        "03_sft.ipynb",
        (_m("sft_adapter"),),
        (_m("sl_data"), _m("curated_data")),
        sections=("sft", "train", *_MODEL),
        files=("curated",),
        volatile_inputs=("revisions",),
    ),
    Stage(
        "pairs",
        "04_pairs.ipynb",
        (_m("pairs"),),
        (_m("sft_adapter"), _m("sl_data")),
        sections=("pairs", "data", *_MODEL),
        files=("prompts", "curated"),
    ),
    Stage(
        "judge",
        "05_judge.ipynb",
        (_m("preferences"),),
        (_m("pairs"),),
        sections=("judge", "pairs", "constitution", *_MODEL),
        files=("constitution", "checkset"),
    ),
    Stage(
        "labels",
        "06_labels.ipynb",
        (_m("preferences_merged"),),
        (_m("preferences"),),
        ("labels",),
        sections=("labels", "seed"),
    ),
    Stage(
        "dpo",
        "07_dpo.ipynb",
        (_m("dpo_adapter"),),
        (_m("preferences_merged"), _m("sft_adapter")),
        sections=("dpo", "train", *_MODEL),
        conditional=((_dpo_rounds, ("pairs", "judge", "labels", "constitution", "data")),),
        files=("constitution?rounds", "prompts?rounds", "checkset?rounds", "curated?rounds"),
    ),
    Stage(
        "rm",
        "08_rm.ipynb",
        (_m("preference_model"),),
        (_m("preferences_merged"), _m("sft_adapter")),
        sections=("rm", "train", "data", *_MODEL),
        conditional=((_rm_helpful_mix, ("pairs",)),),
        files=("prompts", "curated"),
    ),
    Stage(
        "ppo",
        "09_ppo.ipynb",
        (_m("rl_adapter"),),
        (_m("preference_model"), _m("preferences_merged"), _m("sft_adapter")),
        sections=("ppo", "train", "data", *_MODEL),
        conditional=((_ppo_ptx, ("sft",)), (_ppo_benign, ("pairs",))),
        # with ptx_data sft, the SFT rows come from sft.curated; benign prompts from pairs.curated
        files=("prompts", "curated"),
    ),
    Stage(
        "eval",
        "10_eval.ipynb",
        (RUN_LAYOUT["eval_results"], RUN_LAYOUT["report_file"]),
        (_m("sft_adapter"), _m("dpo_adapter"), _m("rl_adapter"), _m("preference_model")),
        sections=("eval", "judge", "constitution", "data", *_MODEL),
        files=("constitution", "prompts", "jailbreaks", "curated"),
    ),
)

#: stage names the pipeline used before, with the stages that do their work now
RENAMED_STAGES: dict[str, tuple[str, ...]] = {"constitution": ("setup",), "feedback": ("pairs", "judge")}


class PipelineError(RuntimeError):
    """A stage notebook failed; the message names the notebook and the cell."""


def stage_names() -> list[str]:
    """The stage names in pipeline order (each also a module, a notebook and a ``cai-dpo`` command)."""
    return [s.name for s in STAGES]


def check_stage_name(name: str) -> str:
    """``name`` when it names a stage; else ValueError naming the stages (and, for an old name, its replacement)."""
    if name in stage_names():
        return name
    if name in RENAMED_STAGES:
        new = RENAMED_STAGES[name]
        now = f"stage '{new[0]}'" if len(new) == 1 else "stages " + " and ".join(f"'{n}'" for n in new)
        raise ValueError(f"stage '{name}' is now {now}; stages: {', '.join(stage_names())}")
    raise ValueError(f"unknown stage '{name}'; stages: {', '.join(stage_names())}")


def check_named_files(cfg: RunConfig, saved: Path) -> None:
    """Before ``cfg`` is saved over ``saved`` (a run's ``config.yaml``): a constitution, or a model named
    by a local path (``policy``, ``judge.model``, ``sl.teacher``), that differs from the saved config's
    must exist, so a mistyped value fails without replacing the run's working config. Values the saved
    config already holds are not checked again (a teacher folder removed after SL still lets later
    stages run), nor paths inside the run folder, which its stages write.

    Raises FileNotFoundError or ConstitutionError for the constitution, InputError naming the key for a
    model path.
    """
    from cai_dpo.constitution import load_constitution
    from cai_dpo.models import names_a_folder

    before = None
    if saved.exists():
        try:
            before = config_from_yaml_text(saved.read_text(encoding="utf-8"), source=str(saved))
        except (ValueError, OSError):  # a damaged saved config is replaced: check every value
            before = None
    if before is None or before.constitution != cfg.constitution:
        load_constitution(cfg.constitution_path())
    run_dir = cfg.run_dir.resolve()
    for key in ("policy", "judge.model", "sl.teacher"):
        name = _model_name(cfg, key)
        path = Path(name).expanduser()
        if not names_a_folder(name) or path.exists() or path.resolve().is_relative_to(run_dir):
            continue
        if before is None or _model_name(before, key) != name:
            raise InputError(f"key '{key}.name': '{name}': no such folder")


def _model_name(cfg: RunConfig, key: str) -> str:
    """``name`` of the model spec at dotted ``key`` (empty when the spec is null)."""
    section, _, field_name = key.rpartition(".")
    spec = getattr(getattr(cfg, section) if section else cfg, field_name)
    return spec.name if spec is not None else ""


def open_run(
    profile: str = "cpu-demo",
    run_id: str | None = None,
    overrides: list[str] | None = None,
    config_path: str | None = None,
    knobs: dict[str, Any] | None = None,
    *,
    create: bool = True,
) -> tuple[RunConfig, RunStore]:
    """The run config and folder a notebook works in.

    With ``config_path`` (what the pipeline passes) the saved config is the base. Otherwise
    the profile names the run folder (``<runs_dir>/<run_id>``, resolved from the project
    root, see :attr:`RunConfig.run_dir`): with ``create`` (the first notebook) the profile
    is the base; without it the run's saved ``config.yaml`` is, and a missing run raises
    FileNotFoundError naming the folder looked in and the command that creates it.
    ``overrides`` (``key=value`` strings) and ``knobs`` (dotted keys; ``None`` values
    ignored) apply on top, and the result is saved to ``<run>/config.yaml``.
    """
    extra_items: dict[str, Any] = dict(parse_override(o) for o in overrides or [])
    if run_id is not None and run_id != "":
        extra_items["run_id"] = str(run_id)  # a run id is text: never read as YAML
    extra_items.update({k: v for k, v in (knobs or {}).items() if v is not None})
    if not config_path and not create:
        run_dir = load_config(profile, extra_items).run_dir
        saved = RunLayout(run_dir).config_file
        if not saved.exists():
            rid = f" --run-id {run_id}" if run_id else ""
            raise FileNotFoundError(
                f"no run at {run_dir} (no config.yaml there). Create it with `cai-dpo run --profile {profile}{rid}` "
                f"(every stage) or `cai-dpo setup --profile {profile}{rid}` (the first) from the project folder, "
                "or run notebooks/00_setup.ipynb first with the same profile and run_id "
                f"(set {RUNS_ENV} or runs_dir to use another runs folder)."
            )
        config_path = str(saved)
    if config_path:
        path = Path(config_path)
        cfg = config_from_yaml_text(path.read_text(encoding="utf-8"), source=str(path))
        if extra_items:
            cfg = apply_overrides(cfg, extra_items, source=str(path))
    else:
        cfg = load_config(profile, extra_items)
    saves = not config_path or bool(extra_items)
    if saves:
        check_named_files(cfg, RunLayout(cfg.run_dir).config_file)  # before RunStore makes the folder
    run = RunStore(cfg.run_dir)
    if saves:
        save_config(cfg, run.config_file)
    return cfg, run


def _labels_digest(run: RunStore, cfg: RunConfig) -> str:
    """Content of the human labels (so new labels make the labels stage rerun)."""
    from cai_dpo.labels import LabelQueue, queue_path

    db = queue_path(cfg)  # the database the labels stage reads (labels.db_path, ~ expanded)
    if not db.exists():
        return "none"
    with LabelQueue(db, read_only=True) as queue:
        return content_hash(queue.labels())


def _revisions_digest(run: RunStore, cfg: RunConfig) -> str:
    """Content of the responses written by people (so a new one makes SFT, and all after it, rerun)."""
    from cai_dpo.labels import LabelQueue, queue_path

    db = queue_path(cfg)  # the database SFT reads its revisions from
    if not db.exists():
        return "none"
    with LabelQueue(db, read_only=True) as queue:
        revisions = queue.revisions()
    return content_hash(revisions) if revisions else "none"


#: digest functions of the ``volatile_inputs`` a stage may declare
VOLATILE_INPUTS: dict[str, Callable[[RunStore, RunConfig], str]] = {
    "labels": _labels_digest,
    "revisions": _revisions_digest,
}


def _spec_hash(spec: str | None) -> str | None:
    """Content hash of a prompt-set or curated-set spec (``bundled:NAME``, a file or a folder);
    ``missing:<spec>`` when it cannot be found."""
    from cai_dpo.config import resolve_path
    from cai_dpo.data import PROMPTS_DIR, bundled_path

    if spec is None:
        return None
    try:
        if str(spec).startswith("bundled:"):
            name = str(spec).split(":", 1)[1]
            path = PROMPTS_DIR / name if (PROMPTS_DIR / name).is_dir() else bundled_path(name)
        else:
            path = resolve_path(spec)
    except FileNotFoundError:
        return f"missing:{spec}"
    return file_hash(path) if path.exists() else f"missing:{spec}"


#: the config fields, by section, that name a curated set or a row file read from disk: a spec, a
#: list of specs, or a list of sections with a ``path`` (``eval.benchmarks``); ``sl`` in
#: ``curate.sources`` is this run's data/sl, an upstream artifact, not a file
CURATED_FIELDS: dict[str, tuple[str, ...]] = {
    "curate": ("curated_set", "sources"),
    "sft": ("curated",),
    "pairs": ("curated",),
    "eval": ("curated", "benchmarks"),
}


def _curated_hashes(stage: Stage, cfg: RunConfig) -> dict[str, str | None]:
    """Content hash of each curated set or row file the stage's sections name (:data:`CURATED_FIELDS`)."""
    out: dict[str, str | None] = {}
    for section in stage.sections_for(cfg):
        for name in CURATED_FIELDS.get(section, ()):
            value = getattr(getattr(cfg, section), name)
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                spec = getattr(item, "path", item)
                if spec is not None and spec != "sl":
                    out[f"{section}.{name}" + (f"[{i}]" if isinstance(value, list) else "")] = _spec_hash(spec)
    return out


def input_files(stage: Stage, cfg: RunConfig) -> dict[str, str | None]:
    """Content hashes of the files a stage reads, by kind.

    Kinds: ``constitution`` (the constitution file), ``constitution_cases`` (its edge-case
    file), ``prompts`` (the prompt sets named in ``data``), ``checkset`` (the judge check
    set), ``jailbreaks`` (the evaluation's templates), ``curated`` (the curated sets and row
    files the stage's sections name, :data:`CURATED_FIELDS`, keyed ``section.field``). A
    ``?rounds`` suffix reads the kind only with ``dpo.rounds > 1``.
    """
    from cai_dpo.data import PROMPTS_DIR

    out: dict[str, str | None] = {}
    for kind in stage.files:
        kind, _, when = kind.partition("?")
        if when == "rounds" and not _dpo_rounds(cfg):
            continue
        if kind == "constitution":
            path = cfg.constitution_path()
            out[kind] = file_hash(path) if path.exists() else f"missing:{cfg.constitution}"
        elif kind == "constitution_cases":
            path = cfg.constitution_path()
            cases = path.with_name(f"{path.stem}_cases.yaml")
            out[kind] = file_hash(cases) if cases.exists() else None
        elif kind == "prompts":
            out["red_team"] = _spec_hash(cfg.data.red_team)
            out["helpful"] = _spec_hash(cfg.data.helpful)
        elif kind == "checkset":
            out[kind] = _spec_hash(cfg.judge.checkset or "bundled:judge_checkset")
        elif kind == "jailbreaks":
            out[kind] = file_hash(PROMPTS_DIR / "jailbreaks.yaml")
        elif kind == "curated":
            out.update(_curated_hashes(stage, cfg))
        else:
            raise ValueError(f"stage '{stage.name}': unknown input file kind {kind!r}")
    return out


def stage_config(stage: Stage, cfg: RunConfig) -> dict[str, Any]:
    """The parts of ``cfg`` a stage reads (its sections and the shared fields it uses)."""
    out: dict[str, Any] = {}
    for name in stage.sections_for(cfg):
        value = getattr(cfg, name)
        out[name] = to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def _fingerprint(stage: Stage, cfg: RunConfig, run: RunStore) -> str:
    """Hash of what a stage depends on: its notebook, its config sections, its input files,
    upstream manifests, labels."""
    upstream = {p: (file_hash(run.root / p) if (run.root / p).exists() else None) for p in stage.inputs_for(cfg)}
    volatile = {v: VOLATILE_INPUTS[v](run, cfg) for v in stage.volatile_inputs}
    return content_hash(file_hash(stage.path()), stage_config(stage, cfg), input_files(stage, cfg), upstream, volatile)


def _state_path(run: RunStore, stage: Stage) -> Path:
    return run.path("pipeline", f"{stage.name}.json")


def _is_fresh(stage: Stage, fingerprint: str, run: RunStore, cfg: RunConfig | None = None) -> bool:
    """Whether the stage's recorded fingerprint equals ``fingerprint`` and its outputs exist; an
    unreadable record (edited or damaged by hand) is not fresh, so the stage reruns and rewrites it."""
    import json

    state = _state_path(run, stage)
    if not state.exists():
        return False
    try:
        recorded = json.loads(state.read_text(encoding="utf-8"))
    except ValueError:  # bad JSON or not UTF-8
        recorded = None
    if not isinstance(recorded, dict):
        log.warning("%s: not a readable stage record; %s reruns", state, stage.name)
        return False
    outputs = stage.outputs_for(cfg) if cfg is not None else stage.outputs
    return recorded.get("fingerprint") == fingerprint and all((run.root / o).exists() for o in outputs)


def select_stages(from_stage: str | None = None, only: str | None = None) -> list[Stage]:
    """The stages to consider, in order, after ``--from`` / ``--only``."""
    names = stage_names()
    if from_stage is not None and only is not None:
        raise ValueError(f"give --from ({from_stage}) or --only ({only}), not both")
    for given in (from_stage, only):
        if given is not None:
            check_stage_name(given)
    if only:
        return [s for s in STAGES if s.name == only]
    start = names.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


def _kernel_manager_class() -> type:
    """The kernel manager of executed stage notebooks: CurveZMQ-encrypted transport when
    pyzmq and the kernelspec support it (the ipykernel default spec does), else IPC (local
    sockets) — so the kernel's channels are never plain TCP and it has nothing to warn about —
    and no interrupt signal before its shutdown."""
    import zmq
    from jupyter_client import AsyncKernelManager

    class StageKernelManager(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            supports_curve = getattr(self, "_kernel_supports_curve_encryption", lambda: False)
            if zmq.has("curve") and supports_curve():
                self.transport_encryption = "auto"
            elif sys.platform != "win32":
                self.transport = "ipc"
            return await super()._async_pre_start_kernel(**kw)

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts before every shutdown; the stage kernel is idle by then, and the
            # SIGINT only makes it log "KeyboardInterrupt caught in kernel". A hung kernel is still killed.
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return StageKernelManager


def _execute(
    stage: Stage,
    out: Path,
    params: dict[str, Any],
    kernel: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    progress_file: Path | None = None,
) -> None:
    """Run one stage notebook with papermill; its progress events go to ``on_progress`` while it runs.

    The kernel inherits ``$CAI_DPO_PROGRESS = progress_file``, so every
    :func:`cai_dpo.progress.progress_bar` and trainer in the notebook appends events there;
    a thread tails the file every half second and the rest is drained after the run.
    """
    import threading

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from cai_dpo.progress import PROGRESS_ENV, ProgressTail

    logging.getLogger("papermill").setLevel(logging.WARNING)
    previous = os.environ.get(PROGRESS_ENV)
    stop = threading.Event()
    tail = ProgressTail(progress_file) if progress_file else None
    watcher = None
    if tail is not None:
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        progress_file.write_text("", encoding="utf-8")
        os.environ[PROGRESS_ENV] = str(progress_file)

        def watch() -> None:
            while not stop.wait(0.5):
                for event in tail.poll():
                    if on_progress:
                        on_progress(event)

        watcher = threading.Thread(target=watch, name=f"progress-{stage.name}", daemon=True)
        watcher.start()
    try:
        pm.execute_notebook(
            str(stage.path()),
            str(out),
            parameters=params,
            kernel_name=kernel,
            progress_bar=False,
            cwd=str(Path.cwd()),
            log_output=False,
            kernel_manager_class=_kernel_manager_class(),
        )
    except PapermillExecutionError as exc:
        raise PipelineError(
            f"stage '{stage.name}' failed in {stage.notebook}, cell {exc.cell_index} "
            f"(execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\nThe executed notebook with the error is kept at {out}"
        ) from exc
    finally:
        if tail is not None:
            stop.set()
            watcher.join()
            for event in tail.poll():
                if on_progress:
                    on_progress(event)
            if previous is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = previous


@dataclass
class StageResult:
    name: str
    status: str
    seconds: float


def run_pipeline(
    profile: str = "cpu-demo",
    overrides: list[str] | None = None,
    run_id: str | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    kernel: str = "python3",
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[RunConfig, list[StageResult]]:
    """Execute the stage notebooks in order; skip the unchanged ones; stop at a failure.

    Holds the run's lock throughout (:func:`cai_dpo.store.run_lock`; the stage notebooks
    inherit it): a second pipeline or stage command on the same run fails with
    :class:`cai_dpo.store.RunInUseError` instead of racing. ``echo`` gets one line per stage
    start and end; ``progress`` gets the running stage's progress events (see
    :mod:`cai_dpo.progress`; default: each event formatted as a line and passed to ``echo``).
    Each stage's events are kept in ``<run>/pipeline/progress/<stage>.jsonl``.
    """
    from cai_dpo.progress import format_event

    on_progress = progress or (lambda event: echo("    " + format_event(event)))
    items: dict[str, Any] = dict(parse_override(o) for o in overrides or [])
    if run_id is not None and run_id != "":
        items["run_id"] = str(run_id)  # a run id is text: never read as YAML
    cfg = load_config(profile, items)
    run = RunStore(cfg.run_dir)
    with run_lock(run.root):
        return _run_stages(cfg, run, profile, from_stage, only, kernel, force, echo, on_progress)


def stale_upstream(stages: list[Stage], cfg: RunConfig, run: RunStore) -> list[str]:
    """The stages, in pipeline order, whose outputs the chosen ``stages`` read directly or through
    other stages not chosen, that ran once but whose inputs, settings or notebook changed since."""
    chosen = {s.name for s in stages}
    needed = {path for s in stages for path in s.inputs_for(cfg)}
    ancestors = []
    for stage in reversed(STAGES[: max((i for i, s in enumerate(STAGES) if s.name in chosen), default=-1)]):
        if stage.name not in chosen and needed.intersection(stage.outputs_for(cfg)):
            ancestors.append(stage)
            needed.update(stage.inputs_for(cfg))
    return [
        s.name
        for s in reversed(ancestors)
        if _state_path(run, s).exists() and not _is_fresh(s, _fingerprint(s, cfg, run), run, cfg)
    ]


def _run_stages(
    cfg: RunConfig,
    run: RunStore,
    profile: str,
    from_stage: str | None,
    only: str | None,
    kernel: str,
    force: bool,
    echo: Callable[[str], None],
    on_progress: Callable[[dict[str, Any]], None],
) -> tuple[RunConfig, list[StageResult]]:
    config_path = run.config_file
    check_named_files(cfg, config_path)
    save_config(cfg, config_path)
    os.environ[UNATTENDED_ENV] = "1"
    stages = select_stages(from_stage, only)
    chosen = {s.name for s in stages}
    if from_stage is not None or only is not None:
        stale = stale_upstream(stages, cfg, run)
        if stale:
            echo(
                f"warning: {', '.join(stale)}: out of date (inputs, settings or notebook changed since the last run, "
                f"or an older cai-dpo ran it), and the stages chosen read the old output; --from {stale[0]} brings "
                f"{'it' if len(stale) == 1 else 'them'} up to date"
            )
    results: list[StageResult] = []
    t_all = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        if stage.name not in chosen:
            continue
        fingerprint = _fingerprint(stage, cfg, run)
        label = f"[{i}/{len(STAGES)}] {stage.name} ({stage.notebook})"
        if not force and only is None and from_stage is None and _is_fresh(stage, fingerprint, run, cfg):
            echo(f"{label}: unchanged, skipped")
            results.append(StageResult(stage.name, "skipped", 0.0))
            continue
        echo(f"{label}: running ...")
        t0 = time.perf_counter()
        out = run.path("notebooks", stage.notebook)
        params = {"profile": profile, "run_id": cfg.run_id, "config_path": str(config_path.resolve())}
        _execute(stage, out, params, kernel, on_progress, run.path("pipeline", "progress", f"{stage.name}.jsonl"))
        seconds = time.perf_counter() - t0
        # record what the stage saw *after* running, so an unchanged rerun matches
        atomic_write_json(
            _state_path(run, stage),
            {
                "fingerprint": _fingerprint(stage, cfg, run),
                "seconds": round(seconds, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        echo(f"{label}: done in {seconds:.0f} s")
        results.append(StageResult(stage.name, "ran", seconds))
    total = time.perf_counter() - t_all
    atomic_write_json(
        run.path("pipeline", "last_run.json"),
        {
            "profile": profile,
            "seconds": round(total, 1),
            "stages": [r.__dict__ for r in results],
            "python": sys.executable,
        },
    )
    return cfg, results
