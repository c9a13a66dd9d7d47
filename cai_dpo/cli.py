"""The ``cai-dpo`` command line: thin wrappers over the library.

Each command group lives in its own ``_add_*`` function; commands parse arguments,
load the run config and call one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, load_config, parse_override
from cai_dpo.errors import CaiDpoInputError, InputError

log = logging.getLogger("cai_dpo")


def _config_args(p: argparse.ArgumentParser) -> None:
    """Options every stage command shares: profile, run id and key=value overrides."""
    p.add_argument("--profile", default="cpu-demo", help="profile name (tiny, cpu-demo, gpu-qlora) or a YAML file")
    p.add_argument("--run-id", default=None, help="run folder name under runs_dir (default: the profile's)")
    p.add_argument(
        "-o",
        "-p",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. -o sl.rounds=3 (repeatable)",
    )


def _launch_args(p: argparse.ArgumentParser) -> None:
    """Options of the training stages that can run as several processes (``train.launcher`` & co.)."""
    p.add_argument(
        "--launcher",
        choices=["none", "accelerate"],
        default=None,
        help="accelerate: run as several processes under accelerate launch (default train.launcher; "
        "implied by --num-processes or --config-file)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="processes to launch (default train.num_processes, else the config file's, else one per GPU)",
    )
    p.add_argument(
        "--config-file",
        default=None,
        metavar="FILE",
        help="accelerate config file, or a bundled one: ddp, deepspeed_zero2, deepspeed_zero3, fsdp "
        "(default train.accelerate_config; none: plain data parallelism)",
    )


def _count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config named by ``--profile``, ``--run-id``, ``-o`` overrides and the launch options.

    ``--run-id`` travels as a string, never through YAML (``007`` stays ``"007"``); it is
    checked like any run id (one folder name) when the config loads. ``--launcher``,
    ``--num-processes`` and ``--config-file`` set ``train.launcher``, ``train.num_processes``
    and ``train.accelerate_config`` (checked like the file's values).
    """
    items = dict(parse_override(o) for o in args.overrides)
    if args.run_id is not None:
        items["run_id"] = str(args.run_id)
    launch = {
        "train.num_processes": getattr(args, "num_processes", None),
        "train.accelerate_config": getattr(args, "config_file", None),
    }
    items.update({k: v for k, v in launch.items() if v is not None})
    launcher = getattr(args, "launcher", None)
    if launcher is None and any(v is not None for v in launch.values()):
        launcher = "accelerate"
    if launcher is not None:
        items["train.launcher"] = launcher
    return load_config(args.profile, items)


# --------------------------------------------------------------------------- foundation


def _cmd_doctor(args: argparse.Namespace) -> int:
    from cai_dpo.doctor import doctor_report, format_report

    report = doctor_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from cai_dpo.models import prepare_embedded, prepare_tiny

    for name in args.which:
        path = prepare_embedded() if name == "embedded" else prepare_tiny()
        print(f"{name}: {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from cai_dpo.generate import generate_file

    cfg = config_from_args(args)
    out = generate_file(cfg, Path(args.prompts), Path(args.output), n=args.n, model=args.model)
    print(f"wrote {out}")
    return 0


def _add_foundation_commands(sub: Any) -> None:
    p = sub.add_parser("doctor", help="versions, threads, GPU, bitsandbytes, model cache, disk")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_doctor)

    models = sub.add_parser("models", help="model cache").add_subparsers(dest="models_cmd", required=True)
    p = models.add_parser(
        "prepare", help="convert the embedded GGUF model to safetensors once (and build the tiny test model)"
    )
    p.add_argument("which", nargs="*", default=["embedded"], choices=["embedded", "tiny"])
    p.set_defaults(func=_cmd_models_prepare)

    p = sub.add_parser("generate", help="prompts file -> completions JSONL")
    _config_args(p)
    p.add_argument("prompts", help="prompt file (.jsonl, .csv, .txt, transcript, or dataset folder)")
    p.add_argument("output", help="output .jsonl")
    p.add_argument("-n", type=_count, default=1, help="completions per prompt (>= 1)")
    p.add_argument(
        "--model",
        default=None,
        help="model spec: embedded, a folder, a hub id or a served model as openai://host:port/v1#<id> "
        "(default: the profile's policy)",
    )
    p.set_defaults(func=_cmd_generate)


def _cmd_config_explain(args: argparse.Namespace) -> int:
    from cai_dpo.config_help import explain

    print(explain(args.section, profile=args.profile))
    return 0


def _add_config_commands(sub: Any) -> None:
    """``config explain [SECTION]``: every config field with its type, default and help."""
    config = sub.add_parser("config", help="describe the run config").add_subparsers(dest="config_cmd", required=True)
    p = config.add_parser("explain", help="every field of the config (or of SECTION) with its type, default and help")
    p.add_argument(
        "section",
        nargs="?",
        default=None,
        help="a section (dpo, dpo.lora, ppo.sampling, judge.model) or one key (dpo.beta); default: all",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="also show this profile's value (a name or a YAML file) where it differs from the default",
    )
    p.set_defaults(func=_cmd_config_explain)


# --------------------------------------------------------------------------- setup, constitution and SL-CAI
# (setup, constitution validate|show|import|test, sl, curate, sft)


def _cmd_setup(args: argparse.Namespace) -> int:
    from cai_dpo.pipeline import open_run
    from cai_dpo.stages.setup import run_setup
    from cai_dpo.store import read_manifest

    cfg, run = open_run(args.profile, args.run_id, args.overrides, create=True)  # as notebooks/00_setup does
    out = run_setup(cfg, run)
    print(f"run folder: {run.root}")
    print(f"constitution: {out} ({read_manifest(out)['counts']['principles']} principles)")
    cases = out / "cases.txt"
    print(
        cases.read_text(encoding="utf-8").rstrip() if cases.exists() else "no edge-case file beside this constitution"
    )
    return 0


def _add_setup_command(sub: Any) -> None:
    """``setup``: the first stage; creates the run folder with its config."""
    p = sub.add_parser(
        "setup",
        help="create the run (config.yaml from the profile and -o; an existing run's config.yaml is replaced), "
        "prepare the policy model, check the constitution and run its edge-case tests -> constitution/",
    )
    _config_args(p)
    p.set_defaults(func=_cmd_setup)


def _cmd_sl(args: argparse.Namespace) -> int:
    from cai_dpo.stages.sl import run_sl

    out = run_sl(config_from_args(args))
    print(f"SL-CAI dataset: {out}")
    print(f"records: {out.parent.parent / 'records' / 'sl'}")
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    from cai_dpo.stages.curate import run_curate
    from cai_dpo.store import read_manifest

    if args.sources:
        args.overrides = list(args.overrides) + [f"curate.sources={json.dumps(args.sources)}"]
    out = run_curate(config_from_args(args))
    m = read_manifest(out)
    counts, metrics = m["counts"], m["metrics"]
    acc = (metrics.get("accuracy") or {}).get("pairwise") or {}
    measured = (
        f"{acc['accuracy']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] on {acc['n']} held-out pairs"
        if acc.get("accuracy") is not None
        else "not measured"
    )
    print(f"curated dataset: {out}")
    print(
        f"rows {counts['rows_in']}: kept {counts['kept']}, dropped {counts['dropped']}, "
        f"below threshold {counts['below_threshold']} ({metrics['action']} at {metrics['threshold']})"
    )
    print(f"scorer: {metrics['scorer']} ({metrics['scorer_reason']}); accuracy {measured}")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from cai_dpo.distributed import run_stage

    out = run_stage("sft", config_from_args(args))
    print(f"SL-CAI adapter: {out}")
    return 0


def _add_sl_stage_commands(sub: Any) -> None:
    """``sl`` (critique -> revision data), ``curate`` (scored, thresholded rows) and ``sft`` (LoRA fine-tuning)."""
    p = sub.add_parser("sl", help="SL-CAI data: initial answers, critique -> revision rounds -> data/sl")
    _config_args(p)
    p.set_defaults(func=_cmd_sl)

    p = sub.add_parser(
        "curate",
        help="score (prompt, response) rows against the constitution; keep, drop or weight them -> data/curated",
    )
    _config_args(p)
    p.add_argument(
        "--source",
        dest="sources",
        action="append",
        default=[],
        metavar="SPEC",
        help="rows to curate: sl, bundled:curated, a JSONL file or a dataset folder (repeatable; "
        "default: curate.sources)",
    )
    p.set_defaults(func=_cmd_curate)

    p = sub.add_parser("sft", help="fine-tune a LoRA adapter on data/sl -> models/sft")
    _config_args(p)
    _launch_args(p)
    p.set_defaults(func=_cmd_sft)


def _cmd_constitution_validate(args: argparse.Namespace) -> int:
    from cai_dpo.constitution import ConstitutionError, load_constitution, summary_line

    failed = 0
    for path in args.files:
        try:
            print(f"ok: {summary_line(load_constitution(path))}")
        except (ConstitutionError, OSError) as exc:
            failed += 1  # a folder or an unreadable file is one more invalid argument, not another exit code
            print(f"invalid: {_one_line(exc)}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_constitution_show(args: argparse.Namespace) -> int:
    from cai_dpo.constitution import format_table, load_constitution

    print(format_table(load_constitution(args.file)))
    return 0


def _cmd_constitution_import(args: argparse.Namespace) -> int:
    from cai_dpo.constitution import import_anthropic, save_constitution, summary_line

    c = import_anthropic(args.prompts_dir, name=args.name)
    out = save_constitution(c, args.output)
    print(f"wrote {out}: {summary_line(c)}")
    return 0


def _add_constitution_commands(sub: Any) -> Any:
    """``constitution validate|show|import``; returns the subparsers for more commands."""
    cons = sub.add_parser("constitution", help="check, show and import constitutions")
    csub = cons.add_subparsers(dest="constitution_cmd", required=True)
    p = csub.add_parser("validate", help="validate constitution YAML files (exit 1 if any is invalid)")
    p.add_argument("files", nargs="+", help="constitution files or bundled names (default, socratic)")
    p.set_defaults(func=_cmd_constitution_validate)

    p = csub.add_parser("show", help="table of a constitution's principles")
    p.add_argument("file", help="constitution file or bundled name")
    p.set_defaults(func=_cmd_constitution_show)

    p = csub.add_parser("import", help="convert the CAI paper's JSON prompt files to a constitution YAML")
    p.add_argument("prompts_dir", help="folder with CritiqueRevisionInstructions.json and RLMadisonInstructions.json")
    p.add_argument("output", help="output .yaml")
    p.add_argument("--name", default="anthropic-cai", help="constitution name")
    p.set_defaults(func=_cmd_constitution_import)
    return csub


def _add_sl_commands(sub: Any) -> None:
    _add_setup_command(sub)
    _add_constitution_test_command(_add_constitution_commands(sub))
    _add_sl_stage_commands(sub)


# --------------------------------------------------------------------------- pairs, judge and labels
# (pairs, judge, labels merge|export|import|status)


def _label_queue(args: argparse.Namespace, read_only: bool = False) -> Any:
    """The label queue of ``--db`` (or the run's); ``read_only`` opens an existing file without writing."""
    from cai_dpo.labels import LabelQueue, queue_path

    return LabelQueue(args.db or queue_path(config_from_args(args)), read_only=read_only)


def _cmd_labels_export(args: argparse.Namespace) -> int:
    with _label_queue(args, read_only=True) as queue:
        out = queue.export_jsonl(Path(args.path))
        status = queue.status()
    print(f"wrote {out}: {status['queued']} pair(s), {status['labels']} label(s), {status['revisions']} revision(s)")
    return 0


def _cmd_labels_import(args: argparse.Namespace) -> int:
    with _label_queue(args) as queue:
        added = queue.import_jsonl(Path(args.path))
    print(
        f"imported {added['pairs']} new pair(s), {added['labels']} new label(s) and {added['revisions']} new "
        f"revision(s) into {queue.path}"
    )
    return 0


def _cmd_labels_status(args: argparse.Namespace) -> int:
    with _label_queue(args, read_only=True) as queue:
        status = queue.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(
            f"{status['db_path']}: {status['queued']} queued, {status['labeled']} labeled, "
            f"{status['pending']} pending; choices {status['by_choice']}; reasons {status['by_reason']}"
        )
    return 0


def _cmd_labels_merge(args: argparse.Namespace) -> int:
    from cai_dpo.stages.labels import run_labels
    from cai_dpo.store import read_manifest

    out = run_labels(config_from_args(args))
    counts = read_manifest(out)["counts"]
    print(
        f"preferences with human labels: {out} ({counts['rows_out']} rows; {counts['queued_new']} newly queued, "
        f"{counts['pending']} pending, {counts['overridden']} overridden)"
    )
    return 0


def _add_labels_commands(sub: Any) -> None:
    """``labels merge`` (the labels stage) and ``labels export|import|status`` (the queue itself)."""
    labels = sub.add_parser(
        "labels", help="the labels stage (merge) and the human label queue: export, import, status"
    ).add_subparsers(dest="labels_cmd", required=True)
    p = labels.add_parser(
        "merge",
        help="route the judge's edge cases into the queue and merge the labels so far -> data/preferences_merged",
    )
    _config_args(p)
    p.set_defaults(func=_cmd_labels_merge)
    for name, func, help_text in (
        ("export", _cmd_labels_export, "write the queue's pairs and labels to a JSONL file"),
        ("import", _cmd_labels_import, "add pairs and labels from a JSONL export (idempotent)"),
        ("status", _cmd_labels_status, "queued / labeled / pending counts"),
    ):
        p = labels.add_parser(name, help=help_text)
        _config_args(p)
        p.add_argument("--db", default=None, help="label database (default: labels.db_path or <run_dir>/labels.sqlite)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON")
        else:
            p.add_argument("path", help="JSONL file")
        p.set_defaults(func=func)


def _cmd_pairs(args: argparse.Namespace) -> int:
    from cai_dpo.stages.pairs import run_pairs

    out = run_pairs(config_from_args(args))
    print(f"pairs: {out}")
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from cai_dpo.judge import GateResult
    from cai_dpo.stages.judge import run_judge
    from cai_dpo.store import read_manifest

    out = run_judge(config_from_args(args))
    m = read_manifest(out)
    gate = m["metrics"].get("judge_gate") or {}
    print(f"preferences: {out} ({m['counts']['rows']} rows, {m['counts']['by_source']})")
    if "accuracy" in gate:
        print(
            f"judge gate: {GateResult(**{'statistic': 'estimate', **gate}).summary()}"
        )  # older runs compared the estimate
    for note in m["notes"]:
        print(f"note: {note}")
    return 0


def _add_pairs_judge_commands(sub: Any) -> None:
    """``pairs`` (sampled / revision pairs) and ``judge`` (constitution-judged soft labels)."""
    p = sub.add_parser(
        "pairs",
        help="response pairs: K samples per prompt from the SL-CAI model and/or "
        "revision-vs-original pairs -> data/pairs",
    )
    _config_args(p)
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser("judge", help="constitution judge: soft labels for data/pairs -> data/preferences")
    _config_args(p)
    p.set_defaults(func=_cmd_judge)


def _cmd_constitution_test(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from cai_dpo.config import ModelSpec
    from cai_dpo.constitution import load_cases, load_constitution
    from cai_dpo.judge import Judge, format_case_table

    cfg = config_from_args(args)
    constitution = load_constitution(args.file)
    cases = load_cases(args.cases, constitution)
    if args.no_few_shot:
        cfg = replace(cfg, judge=replace(cfg.judge, few_shot=False))
    spec = ModelSpec.from_text(args.model) if args.model else None
    results = Judge.load(cfg, model=spec, constitution=constitution, progress=False).run_cases(cases)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2, default=str))
    else:
        print(format_case_table(results))
    return 0 if all(r.passed for r in results) else 1


def _add_constitution_test_command(csub: Any) -> None:
    p = csub.add_parser("test", help="run the judge over test cases and print a pass/fail table (exit 1 on a failure)")
    p.add_argument("file", help="constitution file or bundled name")
    p.add_argument("cases", help="cases YAML (e.g. constitutions/default_cases.yaml)")
    _config_args(p)
    p.add_argument(
        "--model",
        default=None,
        help="judge model spec: embedded, a folder or a hub id (default: the profile's judge; a served judge "
        "needs a local tokenizer: set judge.model in the config)",
    )
    p.add_argument("--no-few-shot", action="store_true", help="leave out the constitution's comparison demos")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_constitution_test)


def _add_pairs_judge_labels_commands(sub: Any) -> None:
    _add_pairs_judge_commands(sub)
    _add_labels_commands(sub)


# --------------------------------------------------------------------------- DPO


def _cmd_dpo(args: argparse.Namespace) -> int:
    from cai_dpo.distributed import run_stage

    cfg = config_from_args(args)
    if args.rounds is not None:
        cfg.dpo.rounds = args.rounds
    out = run_stage("dpo", cfg)
    print(f"DPO adapter: {out}")
    return 0


def _add_dpo_commands(sub: Any) -> None:
    p = sub.add_parser("dpo", help="DPO from the SL-CAI model on data/preferences(_merged) -> models/dpo")
    _config_args(p)
    _launch_args(p)
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="iterative DPO rounds (default dpo.rounds); each later round samples and judges new pairs",
    )
    p.set_defaults(func=_cmd_dpo)


# --------------------------------------------------------------------------- preference model and PPO


def _cmd_rm(args: argparse.Namespace) -> int:
    from cai_dpo.distributed import run_stage
    from cai_dpo.store import read_manifest

    cfg = config_from_args(args)
    if args.backbone:
        cfg.rm.backbone = args.backbone
    out = run_stage("rm", cfg)
    held = read_manifest(out)["metrics"].get("heldout") or {}
    print(f"preference model: {out}")
    if held:
        print(f"held-out: accuracy {held['accuracy']:.3f}, ECE {held['ece']:.3f} over {held['n']} pairs")
    return 0


def _cmd_ppo(args: argparse.Namespace) -> int:
    from cai_dpo.distributed import run_stage
    from cai_dpo.store import read_manifest

    cfg = config_from_args(args)
    if args.mode:
        cfg.ppo.mode = args.mode
    if args.steps is not None:
        cfg.ppo.steps = args.steps
    out = run_stage("ppo", cfg, resume=not args.restart)
    manifest = read_manifest(out)
    print(f"{cfg.ppo.mode.upper()} adapter: {out}")
    metrics, timings = manifest.get("metrics") or {}, manifest.get("timings") or {}
    if metrics:
        print(
            f"score {metrics['score_first']:.3f} -> {metrics['score_last']:.3f}, KL {metrics['kl_last']:.3f}; "
            f"{timings.get('rollout_s_per_step', float('nan')):.1f} s rollout + "
            f"{timings.get('update_s_per_step', float('nan')):.1f} s update per step"
        )
    return 0


def _add_ppo_commands(sub: Any) -> None:
    p = sub.add_parser("rm", help="preference model on data/preferences(_merged) (soft labels) -> models/rm")
    _config_args(p)
    _launch_args(p)
    p.add_argument(
        "--backbone",
        default=None,
        help="sl-cai (default: policy + SFT merged), base, or a sequence-classification model folder",
    )
    p.set_defaults(func=_cmd_rm)

    p = sub.add_parser("ppo", help="PPO (RL-CAI) of the SL-CAI model against models/rm -> models/ppo")
    _config_args(p)
    _launch_args(p)
    p.add_argument("--mode", choices=["ppo", "rloo"], default=None, help="own PPO (default) or TRL's RLOO")
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default ppo.steps)")
    p.add_argument("--restart", action="store_true", help="ignore checkpoints/ppo and start over")
    p.set_defaults(func=_cmd_ppo)


# --------------------------------------------------------------------------- evaluation and report


def _cmd_eval(args: argparse.Namespace) -> int:
    from cai_dpo.report import render_report
    from cai_dpo.stages.eval import default_models, parse_model_arg, run_eval
    from cai_dpo.store import RunStore

    cfg = config_from_args(args)
    run = RunStore(cfg.run_dir)
    models = default_models(cfg, run)
    for text in args.model:
        name, spec = parse_model_arg(text)
        if name in models:
            raise InputError(f"--model {text}: name '{name}' is already used ({', '.join(models)}); pick another NAME")
        models[name] = spec
    path = run_eval(cfg, run, models)
    print(f"wrote {path}")
    if not args.no_report:
        print(f"wrote {render_report(cfg.run_dir)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cai_dpo.report import render_report

    run_dir = Path(args.run_dir) if args.run_dir else config_from_args(args).run_dir
    print(f"wrote {render_report(run_dir)}")
    return 0


def _add_eval_commands(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="side-by-side evaluation: independent classifier figures with paired differences vs base, "
        "gated judge figures, benchmark files, cost",
    )
    _config_args(p)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="evaluate another model too: a folder, adapter folder, hub id or served model as "
        "openai://host:port/v1#<id> (repeatable)",
    )
    p.add_argument("--no-report", action="store_true", help="write eval/results.json only, not report/")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="render report/ (Markdown, CSV, PNG) from eval/results.json")
    _config_args(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: the one the config names)")
    p.set_defaults(func=_cmd_report)


# --------------------------------------------------------------------------- pipeline


def _cmd_run(args: argparse.Namespace) -> int:
    from cai_dpo.pipeline import PipelineError, run_pipeline
    from cai_dpo.progress import ProgressPrinter

    printer = ProgressPrinter(sys.stdout)

    def echo(line: str) -> None:
        printer.end_line()
        print(line, flush=True)

    try:
        cfg, results = run_pipeline(
            args.profile,
            args.overrides,
            args.run_id,
            args.from_stage,
            args.only,
            args.kernel,
            args.force,
            echo=echo,
            progress=printer,
        )
    except PipelineError as exc:
        printer.end_line()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(run_summary(cfg, results))
    return 0


def run_summary(cfg: RunConfig, results: list[Any]) -> str:
    """The end-of-run table (stage, status, seconds) and where the report and exported model are."""
    rows = [f"{'stage':<14}{'status':<10}{'seconds':>9}"]
    rows += [f"{r.name:<14}{r.status:<10}{r.seconds:>9.0f}" for r in results]
    ran = sum(r.seconds for r in results)
    rows.append(f"{'total':<14}{'':<10}{ran:>9.0f}")
    lines = [f"run '{cfg.run_id}' complete: {cfg.run_dir}", *rows]
    from cai_dpo.store import RunLayout

    layout = RunLayout(cfg.run_dir)
    report = layout.report_file
    if report.exists():
        lines.append(f"report: {report}")
    exports = sorted(layout.exports.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if exports:
        lines.append(f"exported model: {exports[-1].parent}")
    return "\n".join(lines)


def _stage_arg(text: str) -> str:
    """A ``--from``/``--only`` value: a stage name (an old name fails with the name that replaced it)."""
    from cai_dpo.pipeline import check_stage_name

    try:
        return check_stage_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_pipeline_commands(sub: Any) -> None:
    from cai_dpo.pipeline import stage_names

    p = sub.add_parser("run", help="execute the stage notebooks in order with papermill (the whole pipeline)")
    _config_args(p)
    names = ", ".join(stage_names())
    which = p.add_mutually_exclusive_group()  # --only with --from: --from was ignored
    which.add_argument(
        "--from", dest="from_stage", type=_stage_arg, metavar="STAGE", help=f"rerun from this stage on: {names}"
    )
    which.add_argument("--only", type=_stage_arg, metavar="STAGE", help=f"rerun just this stage: {names}")
    p.add_argument("--force", action="store_true", help="rerun stages even when unchanged")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel (default: this environment's python3)")
    p.set_defaults(func=_cmd_run)


def _cmd_export(args: argparse.Namespace) -> int:
    from cai_dpo.export import ExportError, export_model, push_to_hub

    cfg = config_from_args(args)
    try:
        result = export_model(cfg, model=args.model, out_dir=args.output)
        print(f"exported {result.model} ({result.reason}): {result.folder}")
        print(f"files: {', '.join(result.files)}")
        if args.push_to_hub:
            print(f"pushed: {push_to_hub(result.folder, args.push_to_hub, private=not args.public)}")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_export_commands(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="merge a run's model into one folder (safetensors, tokenizer, chat template, model card)"
    )
    _config_args(p)
    p.add_argument(
        "--model",
        choices=["sft", "dpo", "ppo"],
        default=None,
        help="model to export (default: the highest harmful-prompt decline rate with benign compliance "
        ">= 90%% in the evaluation, else dpo)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="output folder: new, empty or an earlier export, which is replaced (default: <run>/export/<model>)",
    )
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the folder to this hub repo")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create a public repo (default private)")
    p.set_defaults(func=_cmd_export)


COMMAND_GROUPS: list[Callable[[Any], None]] = [
    _add_foundation_commands,
    _add_config_commands,
    _add_sl_commands,
    _add_pairs_judge_labels_commands,
    _add_dpo_commands,
    _add_ppo_commands,
    _add_eval_commands,
    _add_pipeline_commands,
    _add_export_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="cai-dpo", description="Constitutional AI with DPO and PPO, from a written constitution."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


# commands that write into a run folder: they hold the run's lock while they work
RUN_COMMANDS = frozenset({"setup", "sl", "curate", "sft", "pairs", "judge", "dpo", "rm", "ppo", "eval"})


def _command_lock(args: argparse.Namespace) -> Any:
    """The run lock a command holds (:func:`cai_dpo.store.run_lock`), or a no-op context."""
    import contextlib

    from cai_dpo.store import run_lock

    if args.command not in RUN_COMMANDS:
        return contextlib.nullcontext()
    return run_lock(config_from_args(args).run_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cai-dpo`` console script."""
    from cai_dpo.distributed import LaunchError
    from cai_dpo.served import ServedModelError
    from cai_dpo.store import RunInUseError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        with _command_lock(args):
            return int(args.func(args) or 0)
    except RunInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (LaunchError, ServedModelError) as exc:  # a launcher or a served model that failed: named, no traceback
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (CaiDpoInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # bad input (the project's own error types): one line naming the file/argument and field
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise  # a real bug: let it show as one
        print(
            f"error: a database is locked by another process ({exc}); wait for it to finish and retry", file=sys.stderr
        )
        return 3


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` (FileNotFoundError from the OS gets its file name)."""
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc.strerror or ""):
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
