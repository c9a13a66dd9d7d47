"""DPO on the constitution-judged preferences: RL-CAI's shortcut, on TRL's ``DPOTrainer``.

Starting point and reference model
----------------------------------
DPO starts from the SL-CAI model (base ``cfg.policy`` + the adapter ``models/sft``) and
its reference must be that same SL-CAI model. No second model copy is kept; how the
reference is obtained depends on ``cfg.dpo.adapter_mode``:

- ``merge`` (``auto`` on an unquantized policy): the SFT adapter is folded into the base
  weights in memory and a fresh LoRA (``cfg.dpo.lora``) is trained on top. The reference is
  the same weights with the adapter switched off, i.e. exactly the SL-CAI model. The saved
  adapter's ``cai_dpo_base.json`` lists the SFT adapter under ``merge_first``, so
  ``models.load_model("models/dpo")`` rebuilds base → merge SFT → DPO adapter.
- ``continue`` (``auto`` on a 4-/8-bit policy, QLoRA): merging into quantized weights would
  re-round them and wash out most of the SFT change, so the SFT adapter itself is trained
  further; TRL keeps a frozen copy of it as the adapter ``"ref"``, and the reference is the
  base with that copy, again exactly the SL-CAI model. The saved adapter applies to the base
  directly. Without an SFT adapter a fresh LoRA is trained and the reference is the base.

Soft labels (conservative DPO)
------------------------------
TRL has no per-example soft target. :class:`~cai_dpo.trl_trainers.SoftLabelDPOTrainer` carries the judge's
``p_chosen`` through tokenization and collation and, in ``label_mode: soft``, minimises

    loss_i = -( p_i · logσ(β·h_i) + (1 - p_i) · logσ(-β·h_i) ),
    h_i = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x)),

which is TRL's ``sigmoid`` loss when ``p_i = 1`` (``label_mode: hard`` uses TRL's own loss,
any of its loss types).

Principle weights (``dpo.weighting: principle``): the batch loss is

    L = Σ_i w_i · loss_i / Σ_i w_i,

``w_i`` the pair's ``weight`` when set (the curation stage's score), else the mean of
``dpo.principle_weights`` over the pair's ``principle_ids`` (1.0 for unlisted ids or none);
in hard label mode ``loss_i`` is the same expression with ``p_i = 1``.

Chosen-likelihood term (``dpo.rpo_alpha`` = α > 0; RPO, Pang et al. 2024, "Iterative Reasoning
Preference Optimization", arXiv 2404.19733; TRL's former ``rpo_alpha``): each pair's loss
gains α times the chosen response's mean token negative log-likelihood,

    loss_i ← loss_i + α · ( -log π(y_c|x) / |y_c| ),

so the policy learns to write the chosen answer, not only to lower the rejected one (plain DPO
on long chosen and short rejected answers mostly pushes the rejected likelihood down). It needs
``loss_type: sigmoid``; weights and soft labels compose as above.

Human labels override AI labels: ``data/preferences_merged`` (written
by :func:`cai_dpo.stages.labels.run_labels`) is read when present, else ``data/preferences``.

Metrics per step go to ``metrics/dpo/log.csv`` (and TensorBoard when installed): loss,
reward accuracy, chosen/rejected implicit rewards, margins and ``kl_proxy`` = mean over the
chosen responses of ``log π(y_c|x) - log π_ref(y_c|x)``. Checkpoints are resumed when the
inputs are unchanged. :func:`run_iterative_dpo` repeats sample → judge → label → DPO rounds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_dpo.config import ConfigError, DPOSection, RunConfig, raise_problems, save_config, to_dict
from cai_dpo.distributed import is_main_process, sharded_state_dict
from cai_dpo.engine import Engine, set_threads
from cai_dpo.errors import InputError
from cai_dpo.labels import queue_path
from cai_dpo.models import (
    ModelLoadError,
    adapter_merge_first,
    autocast_dtype,
    describe,
    load_adapter,
    load_model,
    lora_config,
    merge_adapter,
    write_adapter,
)
from cai_dpo.preferences import load_preferences, preferences_path
from cai_dpo.splits import split_by_prompt
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, locked_stage, read_manifest
from cai_dpo.training import (
    artifact_current,
    artifact_hash,
    example_weights,
    read_metrics_csv,
    seed_everything,
    trainer_setup,
    training_inputs,
)

log = logging.getLogger(__name__)

# TRL 1.16's loss types; used only when they cannot be read from the installed DPOConfig.
_FALLBACK_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# config keys that only change how long training runs: a longer run may resume a shorter one
_LENGTH_KEYS = ("epochs", "max_steps", "save_steps", "rounds", "merge")


# --------------------------------------------------------------------------- config checks


def trl_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL's DPOTrainer accepts (read from its DPOConfig)."""
    from trl import DPOConfig as TrlDPOConfig

    help_text = TrlDPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", "")
    found = tuple(dict.fromkeys(re.findall(r"`'([a-z_]+)'`", help_text)))
    return found or _FALLBACK_LOSS_TYPES


def validate_dpo_config(d: DPOSection, source: str = "config") -> None:
    """Raise ``ConfigError`` naming the key and the fix when the DPO section cannot train.

    ``dpo.loss_type`` is checked against the installed TRL here (reading TRL at config load
    would cost seconds); every other check is the section's own (:meth:`DPOSection.problems`,
    run when the config is loaded), repeated for a section built or changed in code.
    """
    allowed = trl_loss_types()
    if d.loss_type not in allowed:
        raise ConfigError(
            f"{source}: key 'dpo.loss_type' is {d.loss_type!r}; TRL's DPOTrainer allows: {', '.join(allowed)}"
        )
    raise_problems(d, source=source, prefix="dpo.")


def resolve_adapter_mode(cfg: RunConfig) -> str:
    """``merge`` or ``continue`` (``auto``: continue for a quantized policy, else merge)."""
    if cfg.dpo.adapter_mode != "auto":
        return cfg.dpo.adapter_mode
    return "continue" if cfg.policy.quantization != "none" else "merge"


# --------------------------------------------------------------------------- data


def _messages(value: Any, role: str) -> Any:
    """A conversation list as stored, or a plain string wrapped as one message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value


@dataclass
class PreferenceRows:
    """Preference pairs ready for DPO: conversational prompt/chosen/rejected and ``p_chosen``."""

    rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)


def training_rows(
    records: Sequence[dict[str, Any]],
    label_mode: str,
    source: str = "preferences",
    *,
    weighting: str = "none",
    principle_weights: dict[str, float] | None = None,
) -> PreferenceRows:
    """Keep ``prompt``/``chosen``/``rejected``/``p_chosen`` and a training ``weight``; in hard mode orient pairs.

    Soft mode keeps ``p_chosen`` as is. Hard mode sets it to 1, swaps a pair whose
    ``p_chosen`` is below 0.5 and drops exact ties (they carry no hard preference). Rows are
    first checked by :func:`cai_dpo.preferences.check_preference_rows` (identical or empty
    responses dropped and counted; a malformed row raises naming the row and field).
    ``weight`` is :func:`cai_dpo.training.example_weights` of the record (1.0 with
    ``weighting="none"``).
    """
    from cai_dpo.preferences import check_preference_rows

    checked, check_counts = check_preference_rows(records, source)
    weights = example_weights(checked, weighting, principle_weights, source=source)
    rows, swapped, ties = [], 0, 0
    for i, rec in enumerate(checked):
        p = float(rec["p_chosen"])
        chosen, rejected = _messages(rec["chosen"], "assistant"), _messages(rec["rejected"], "assistant")
        if label_mode == "hard":
            if p == 0.5:
                ties += 1
                continue
            if p < 0.5:
                chosen, rejected, swapped = rejected, chosen, swapped + 1
            p = 1.0
        rows.append(
            {
                "prompt": _messages(rec["prompt"], "user"),
                "chosen": chosen,
                "rejected": rejected,
                "p_chosen": p,
                "weight": weights[i],
            }
        )
    return PreferenceRows(
        rows,
        {
            "pairs_in": len(records),
            "pairs_used": len(rows),
            "hard_swapped": swapped,
            "hard_ties_dropped": ties,
            "dropped_identical": check_counts["dropped_identical"],
            "dropped_empty": check_counts["dropped_empty"],
        },
    )


# --------------------------------------------------------------------------- models


@dataclass
class StartPoint:
    """The model DPO trains, how its reference is formed, and what the saved adapter needs."""

    model: Any
    tokenizer: Any
    mode: str
    start_adapter: Path | None
    merge_first: list[Path]
    peft_config: Any | None
    reference: str


def prepare_policy(cfg: RunConfig, start_adapter: Path | None) -> StartPoint:
    """Load the policy to train from the base and ``start_adapter`` (see the module notes)."""
    spec = dataclasses.replace(cfg.policy, adapter=None)
    mode = resolve_adapter_mode(cfg)
    chain: list[Path] = []
    if start_adapter is not None:
        start_adapter = Path(start_adapter).resolve()
        note = start_adapter / "cai_dpo_base.json"
        base = _read_note(start_adapter).get("base", cfg.policy.name)
        if base != cfg.policy.name:
            raise ModelLoadError(
                f"{note}: the adapter was trained on {base!r} but policy.name is {cfg.policy.name!r}; "
                f"set policy.name={base} or retrain the adapter"
            )
        chain = adapter_merge_first(start_adapter)
    quantized = cfg.policy.quantization != "none"
    if mode == "merge" and quantized and start_adapter is not None:
        log.warning(
            "dpo.adapter_mode=merge on a %s policy re-rounds the merged SFT weights; "
            "dpo.adapter_mode=continue keeps the reference exact",
            cfg.policy.quantization,
        )
    merged = chain + ([start_adapter] if mode == "merge" and start_adapter is not None else [])
    model, tokenizer = load_model(spec, trainable=True, merge_first=merged, stack_quantized=False)
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if mode == "continue" and start_adapter is not None:
        model = load_adapter(model, start_adapter, trainable=True)
        return StartPoint(
            model,
            tokenizer,
            mode,
            start_adapter,
            chain,
            None,
            f"base + frozen copy of {start_adapter.name} (adapter 'ref')",
        )
    reference = (
        "base with the SFT adapter merged, DPO adapter off" if start_adapter is not None else "base (adapter off)"
    )
    return StartPoint(model, tokenizer, mode, start_adapter, merged, lora_config(cfg.dpo.lora), reference)


def _read_note(adapter_dir: Path) -> dict[str, Any]:
    """An adapter's ``cai_dpo_base.json`` (base model and merge chain), or {} when it has none."""
    note = Path(adapter_dir) / "cai_dpo_base.json"
    return json.loads(note.read_text(encoding="utf-8")) if note.exists() else {}


def _copy_adapter(src: Path, dst: Path) -> Path:
    """Copy a saved adapter folder, rewriting its ``merge_first`` paths relative to ``dst``."""
    src, dst = Path(src).resolve(), Path(dst)
    with atomic_dir(dst) as tmp:
        _copy_adapter_into(src, tmp, dst)
    return dst


def _copy_adapter_into(src: Path, tmp: Path, dst: Path) -> None:
    """Copy adapter ``src`` (manifest left out) into ``tmp``, which becomes ``dst``;
    ``merge_first`` rewritten for ``dst``."""
    import os

    src = Path(src).resolve()
    chain = adapter_merge_first(src)
    shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
    note = _read_note(src)
    if chain:
        note["merge_first"] = [os.path.relpath(p, Path(dst).resolve()) for p in chain]
    if note:
        (tmp / "cai_dpo_base.json").write_text(json.dumps(note), encoding="utf-8")


def save_merged(adapter_dir: Path, out_dir: Path, source: Path | None = None) -> Path:
    """Full merged weights of a saved adapter (its chain included) at ``out_dir``.

    ``source`` is the adapter's final folder named in the note, when ``adapter_dir`` is
    where it is staged before an atomic swap (default ``adapter_dir``).
    """
    model, tokenizer = load_model(str(adapter_dir))
    merged = merge_adapter(model)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cai_dpo_source.json").write_text(
            json.dumps({"source": "DPO adapter merged", "adapter": str(source or adapter_dir)}), encoding="utf-8"
        )
    return out_dir


# --------------------------------------------------------------------------- held-out check


def implicit_reward_stats(
    policy: Engine, reference: Engine, rows: Sequence[dict[str, Any]], beta: float
) -> dict[str, float]:
    """Reward accuracy and mean margin ``β·h`` of ``rows`` under a policy and its reference."""
    contexts, chosen, rejected = [], [], []
    for r in rows:
        prompt = _messages(r["prompt"], "user")
        ctx = policy.render(prompt)
        contexts.append(ctx)
        for msgs, out in ((r["chosen"], chosen), (r["rejected"], rejected)):
            full = policy.render(prompt + _messages(msgs, "assistant"), add_generation_prompt=False)
            if not full.startswith(ctx):
                raise ValueError("the chat template renders the prompt differently inside a conversation")
            out.append(full[len(ctx) :])
    pc = [x.total for x in policy.logprob(contexts, chosen)]
    pr = [x.total for x in policy.logprob(contexts, rejected)]
    rc = [x.total for x in reference.logprob(contexts, chosen)]
    rr = [x.total for x in reference.logprob(contexts, rejected)]
    h = [(a - b) - (c - d) for a, b, c, d in zip(pc, rc, pr, rr)]
    return {
        "accuracy": sum(x > 0 for x in h) / len(h),
        "margin": beta * sum(h) / len(h),
        "kl_proxy": sum(a - b for a, b in zip(pc, rc)) / len(h),
    }


# --------------------------------------------------------------------------- the stage


def _final(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


@locked_stage
def run_dpo(
    cfg: RunConfig,
    run: RunStore | None = None,
    preferences: Path | None = None,
    start_adapter: Path | None = None,
    out_dir: Path | None = None,
    *,
    callbacks: list[Any] | None = None,
) -> Path:
    """Train a DPO adapter from the SL-CAI model on the run's preferences; returns ``models/dpo``.

    ``preferences`` defaults to ``data/preferences_merged`` (else ``data/preferences``),
    ``start_adapter`` to ``models/sft`` when present (else the base model). ``callbacks``
    are extra ``transformers.TrainerCallback`` objects (live plots, tests).
    """
    import datasets
    from trl import DPOConfig as TrlDPOConfig

    from cai_dpo.trl_trainers import PreferenceCollatorWithLabels, SoftLabelDPOTrainer

    run = run or RunStore(cfg.run_dir)
    validate_dpo_config(cfg.dpo, source=str(run.config_file))
    threads = set_threads(cfg.threads)
    out_dir = Path(out_dir) if out_dir is not None else run.dpo_adapter
    if start_adapter is None and (run.sft_adapter / "adapter_config.json").exists():
        start_adapter = run.sft_adapter
    records, pref_path = load_preferences(run, preferences)
    prepared = training_rows(
        records,
        cfg.dpo.label_mode,
        source=str(pref_path),
        weighting=cfg.dpo.weighting,
        principle_weights=cfg.dpo.principle_weights,
    )
    if not prepared.rows:
        raise InputError(f"{pref_path}: no usable pairs (all ties in hard label mode); use dpo.label_mode=soft")
    train_rows, eval_rows = split_by_prompt(prepared.rows, cfg.dpo.eval_fraction, cfg.seed)
    pref_hash = artifact_hash(pref_path)  # the dataset's files, its manifest left out
    start_hash = artifact_hash(start_adapter) if start_adapter is not None else ""

    note = {
        "preferences": pref_hash,
        "start_adapter": start_hash,
        "policy": to_dict(cfg.policy),
        "bf16": autocast_dtype(cfg.policy) is not None,  # mixed precision
        "seed": cfg.seed,
        "dpo": {k: v for k, v in to_dict(cfg.dpo).items() if k not in _LENGTH_KEYS},
        "mode": resolve_adapter_mode(cfg),
    }
    target = {k: getattr(cfg.dpo, k) for k in _LENGTH_KEYS}
    if artifact_current(out_dir, note, target):
        log.info(
            "DPO adapter in %s is up to date (same preferences, start adapter and settings); nothing to train", out_dir
        )
        return out_dir

    timings: dict[str, float] = {}
    seed_everything(cfg.seed)
    with Timer() as t_load:
        start = prepare_policy(cfg, start_adapter)
    timings["model_load"] = t_load.seconds

    metrics_dir = run.metrics_dir("dpo")
    setup = trainer_setup(
        TrlDPOConfig,
        cfg.dpo,
        run.checkpoint_dir(out_dir.name),
        metrics_dir,
        note,
        seed=cfg.seed,
        has_eval=bool(eval_rows),
        train=cfg.train,
        bf16=note["bf16"],
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        max_length=cfg.dpo.max_length,
        remove_unused_columns=True,
    )
    trainer = SoftLabelDPOTrainer(
        model=start.model,
        args=setup.args,
        data_collator=PreferenceCollatorWithLabels(
            pad_token_id=start.tokenizer.pad_token_id, max_length=cfg.dpo.max_length
        ),
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=start.tokenizer,
        peft_config=start.peft_config,
        callbacks=setup.callbacks + list(callbacks or []),
        label_mode=cfg.dpo.label_mode,
        max_prompt_length=cfg.dpo.max_prompt_length,
        weighting=cfg.dpo.weighting,
        rpo_alpha=cfg.dpo.rpo_alpha,
    )
    with Timer() as t_train:
        result, resumed_step = setup.train(trainer, cfg.dpo.max_steps)
    timings["train"] = t_train.seconds
    steps_here = trainer.state.global_step - resumed_step
    timings["seconds_per_step"] = t_train.seconds / steps_here if steps_here > 0 else 0.0
    eval_metrics: dict[str, Any] = {}
    if eval_rows:
        with Timer() as t_eval:
            eval_metrics = trainer.evaluate()
        timings["eval"] = t_eval.seconds

    state = sharded_state_dict(trainer)  # every process takes part when the weights are sharded
    if not is_main_process():
        return out_dir  # rank 0 writes the artifact
    log_rows = read_metrics_csv(metrics_dir / "log.csv") if (metrics_dir / "log.csv").exists() else []
    train_log = [r for r in log_rows if "loss" in r and "eval_loss" not in r]
    metrics = {
        "train_loss_mean": float(result.training_loss) if result is not None else _final(train_log, "loss"),
        "train_loss_first": _final(train_log[:1], "loss"),
        "train_loss_final": _final(train_log, "loss"),
        "train_reward_accuracy_final": _final(train_log, "rewards/accuracies"),
        "train_margin_final": _final(train_log, "rewards/margins"),
        "train_kl_proxy_final": _final(train_log, "kl_proxy"),
        **{k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
    }
    # adapter, merged weights and manifest: one atomic step (a kill leaves the old artifact or the new one)
    with atomic_dir(out_dir) as tmp:
        with Timer() as t_save:
            model = trainer.model
            if "ref" in getattr(model, "peft_config", {}):
                model.delete_adapter("ref")
            write_adapter(
                model,
                start.tokenizer,
                tmp,
                base=cfg.policy.name,
                merge_first=start.merge_first,
                final=out_dir,
                state_dict=state,
            )
            merged_dir = None
            if cfg.dpo.merge:
                if cfg.policy.quantization != "none":
                    log.warning(
                        "dpo.merge: not merging into a %s base; load models/%s as an adapter instead",
                        cfg.policy.quantization,
                        out_dir.name,
                    )
                else:
                    merged_dir = save_merged(tmp, out_dir.parent / f"{out_dir.name}-merged", source=out_dir)
        timings["save"] = t_save.seconds

        Manifest(
            stage="dpo",
            config={"dpo": to_dict(cfg.dpo), "policy": to_dict(cfg.policy), "seed": cfg.seed},
            inputs={
                "preferences": str(pref_path),
                "preferences_hash": pref_hash,
                "start_adapter": str(start_adapter or ""),
                "start_adapter_hash": start_hash,
                **training_inputs(note, target),
            },
            models={
                "base": describe(cfg.policy),
                "adapter": str(out_dir),
                "adapter_mode": start.mode,
                "reference": start.reference,
                "merge_first": ", ".join(str(p) for p in start.merge_first),
                **({"merged": str(merged_dir)} if merged_dir else {}),
            },
            counts={
                **prepared.counts,
                "train_pairs": len(train_rows),
                "eval_pairs": len(eval_rows),
                "weighting": cfg.dpo.weighting,
                "weight_mean": sum(r["weight"] for r in prepared.rows) / len(prepared.rows),
                "train_pairs_after_tokenizing": len(trainer.train_dataset),
                "steps": trainer.state.global_step,
                "resumed_from_step": resumed_step,
                "batch_size": cfg.dpo.batch_size,
                "grad_accum": cfg.dpo.grad_accum,
                "threads": threads,
            },
            timings=timings,
            metrics=metrics,
            notes=[
                f"label_mode={cfg.dpo.label_mode}, loss_type={cfg.dpo.loss_type}, "
                f"beta={cfg.dpo.beta}, rpo_alpha={cfg.dpo.rpo_alpha}, "
                f"weighting={cfg.dpo.weighting}",
                "kl_proxy = mean over chosen responses of log pi(y|x) - log pi_ref(y|x)",
            ],
        ).write(tmp / "manifest.json")
    log.info(
        "DPO adapter saved to %s (%d steps, %.1f s/step)",
        out_dir,
        trainer.state.global_step,
        timings["seconds_per_step"],
    )
    return out_dir


# --------------------------------------------------------------------------- iterative DPO

RoundStage = Callable[[RunConfig, RunStore], Any]


def round_config(cfg: RunConfig, run: RunStore, round_no: int) -> RunConfig:
    """The config of round ``round_no`` >= 2: its own run folder, fresh samples, the run's label queue."""
    sub = copy.deepcopy(cfg)
    sub.runs_dir = str(run.dpo_rounds)
    sub.run_id = f"round-{round_no}"
    sub.seed = cfg.seed + round_no - 1
    sub.pairs.source = "judged_samples"  # new on-policy samples; revision pairs do not depend on the policy
    sub.pairs.sampling.seed = cfg.pairs.sampling.seed + round_no - 1
    sub.labels.db_path = str(queue_path(cfg))
    return sub


def _default_stage(module: str, name: str) -> RoundStage:
    import importlib

    return getattr(importlib.import_module(module), name)


def _round_figures(adapter: Path, pref_path: Path | None, seconds: dict[str, float]) -> dict[str, Any]:
    import datasets

    manifest = read_manifest(adapter)
    figures: dict[str, Any] = {
        "adapter": str(adapter),
        "counts": manifest["counts"],
        "metrics": manifest["metrics"],
        "timings": {**manifest["timings"], **seconds},
    }
    if pref_path is not None:
        rows = datasets.load_from_disk(str(pref_path)).to_list()
        ps = [float(r["p_chosen"]) for r in rows if r.get("p_chosen") is not None]
        figures["preferences"] = str(pref_path)
        figures["pairs"] = len(rows)
        figures["mean_p_chosen"] = sum(ps) / len(ps) if ps else None
        figures["edge_cases"] = sum(1 for r in rows if r.get("edge_reasons"))
    return figures


@locked_stage
def run_iterative_dpo(
    cfg: RunConfig,
    run: RunStore | None = None,
    *,
    rounds: int | None = None,
    sample: RoundStage | None = None,
    judge: RoundStage | None = None,
    label: RoundStage | None = None,
    callbacks: list[Any] | None = None,
) -> Path:
    """DPO in ``rounds`` rounds (default ``cfg.dpo.rounds``); returns ``models/dpo``.

    Round 1 is :func:`run_dpo` on the run's preferences. Each later round works in
    ``dpo_rounds/round-<r>/``, whose ``models/sft`` is the previous round's policy: ``sample``
    draws new pairs from it (default :func:`cai_dpo.stages.pairs.run_pairs`), ``judge`` labels
    them (:func:`cai_dpo.stages.judge.run_judge`), ``label`` routes edge cases into the run's
    label queue and applies human labels (:func:`cai_dpo.stages.labels.run_labels`), and DPO
    continues from the previous round with it as the reference. The last round's adapter is
    copied to ``models/dpo`` with a manifest of per-round figures.
    """
    run = run or RunStore(cfg.run_dir)
    total = rounds or cfg.dpo.rounds
    if total < 1:
        raise ConfigError("dpo.rounds must be >= 1")
    if total == 1:
        return run_dpo(cfg, run, callbacks=callbacks)
    validate_dpo_config(cfg.dpo, source=str(run.config_file))
    sample = sample or _default_stage("cai_dpo.stages.pairs", "run_pairs")
    judge = judge or _default_stage("cai_dpo.stages.judge", "run_judge")
    label = label or _default_stage("cai_dpo.stages.labels", "run_labels")

    with Timer() as t_total:
        first = RunStore(run.dpo_rounds / "round-1")
        adapter = run_dpo(cfg, run, out_dir=first.dpo_adapter, callbacks=callbacks)
        figures = [{"round": 1, **_round_figures(adapter, preferences_path(run), {})}]
        for r in range(2, total + 1):
            sub_cfg = round_config(cfg, run, r)
            sub = RunStore(sub_cfg.run_dir)
            save_config(sub_cfg, sub.config_file)
            _copy_adapter(adapter, sub.sft_adapter)
            seconds: dict[str, float] = {}
            for name, stage in (("sample", sample), ("judge", judge), ("label", label)):
                with Timer() as t:
                    stage(sub_cfg, sub)
                seconds[name] = t.seconds
            pref = preferences_path(sub)
            adapter = run_dpo(
                sub_cfg,
                sub,
                preferences=pref,
                start_adapter=sub.sft_adapter,
                out_dir=sub.dpo_adapter,
                callbacks=callbacks,
            )
            figures.append({"round": r, **_round_figures(adapter, pref, seconds)})
            log.info("DPO round %d/%d done: %s", r, total, adapter)

    out = run.dpo_adapter
    with atomic_dir(out) as tmp:  # adapter, merged weights and manifest in one atomic step
        _copy_adapter_into(adapter, tmp, out)
        merged_dir = (
            save_merged(tmp, run.dpo_merged, source=out)
            if cfg.dpo.merge and cfg.policy.quantization == "none"
            else None
        )
        last = read_manifest(adapter)
        Manifest(
            stage="dpo",
            config={"dpo": to_dict(cfg.dpo), "policy": to_dict(cfg.policy), "seed": cfg.seed},
            inputs=last["inputs"],
            models={
                **last["models"],
                "adapter": str(out),
                "final_round_adapter": str(adapter),
                **({"merged": str(merged_dir)} if merged_dir else {}),
            },
            counts={
                "rounds": total,
                "pairs_total": sum(f["counts"]["pairs_used"] for f in figures),
                "steps_total": sum(f["counts"]["steps"] for f in figures),
            },
            timings={"total": t_total.seconds},
            metrics={"rounds": figures, **last["metrics"]},
            notes=[
                f"iterative DPO, {total} rounds; round r >= 2 samples and judges new pairs from round r-1's policy "
                "and uses that policy as its reference"
            ],
        ).write(tmp / "manifest.json")
    return out
