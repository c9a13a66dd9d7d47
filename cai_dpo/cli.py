"""The ``cai-dpo`` command line: thin wrappers over the library.

Each command group lives in its own ``_add_*`` function; commands parse arguments,
load the run config and call one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from cai_dpo.config import ConfigError, RunConfig, load_config

log = logging.getLogger("cai_dpo")


def _config_args(p: argparse.ArgumentParser) -> None:
    """Options every stage command shares: profile, run id and key=value overrides."""
    p.add_argument("--profile", default="cpu-demo", help="profile name (tiny, cpu-demo, gpu-qlora) or a YAML file")
    p.add_argument("--run-id", default=None, help="run folder name under runs_dir (default: the profile's)")
    p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. -o sl.rounds=3 (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config named by ``--profile``, ``--run-id`` and ``-o`` overrides."""
    overrides = list(args.overrides)
    if args.run_id:
        overrides.append(f"run_id={args.run_id}")
    return load_config(args.profile, overrides)


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
    p = models.add_parser("prepare", help="convert the embedded GGUF model to safetensors once (and build the tiny test model)")
    p.add_argument("which", nargs="*", default=["embedded"], choices=["embedded", "tiny"])
    p.set_defaults(func=_cmd_models_prepare)

    p = sub.add_parser("generate", help="prompts file -> completions JSONL")
    _config_args(p)
    p.add_argument("prompts", help="prompt file (.jsonl, .csv, .txt, transcript, or dataset folder)")
    p.add_argument("output", help="output .jsonl")
    p.add_argument("-n", type=int, default=1, help="completions per prompt")
    p.add_argument("--model", default=None, help="model spec (default: the profile's policy)")
    p.set_defaults(func=_cmd_generate)


# --------------------------------------------------------------------------- constitution and SL-CAI
# (constitution validate|show|import|test, sl, sft)


def _add_sl_commands(sub: Any) -> None:
    pass


# --------------------------------------------------------------------------- AI feedback and labels
# (pairs, judge, labels export|import|status)


def _add_feedback_commands(sub: Any) -> None:
    pass


# --------------------------------------------------------------------------- DPO


def _add_dpo_commands(sub: Any) -> None:
    pass


# --------------------------------------------------------------------------- preference model and PPO


def _add_ppo_commands(sub: Any) -> None:
    pass


# --------------------------------------------------------------------------- evaluation and report


def _add_eval_commands(sub: Any) -> None:
    pass


# --------------------------------------------------------------------------- pipeline


def _add_pipeline_commands(sub: Any) -> None:
    pass


COMMAND_GROUPS: list[Callable[[Any], None]] = [
    _add_foundation_commands,
    _add_sl_commands,
    _add_feedback_commands,
    _add_dpo_commands,
    _add_ppo_commands,
    _add_eval_commands,
    _add_pipeline_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="cai-dpo", description="Constitutional AI with DPO and PPO, from a written constitution.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cai-dpo`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last-resort message naming the failure
        from cai_dpo.models import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
