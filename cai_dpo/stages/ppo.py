"""PPO against the preference model (RL-CAI), following "The N+ Implementation Details of
RLHF with PPO" (Huang et al. 2024).

Models
    - policy: the SL-CAI model (base + ``models/sft`` merged in memory) with a fresh LoRA
      adapter (dropout 0, so log-prob ratios are exact);
    - reference: the same weights with the adapter switched off (:func:`~cai_dpo.models.reference_mode`);
      on a 4-/8-bit policy the SFT adapter is stacked frozen under the new one instead of
      merged into the quantized weights, so the reference is exactly the SL-CAI model there too;
    - value function: a separate scalar-head model. ``ppo.value_init: reward`` (default)
      starts it from the preference model (``models/rm``: its adapter and head keep
      training), as in Ouyang et al. and the N+ paper — it already maps text to reward-scale
      numbers. That needs the preference model to share the policy's tokenizer (values are
      per policy token); otherwise, or with ``value_init: policy``, the value model is the
      SL-CAI weights with a new LoRA adapter and a zero-initialised head.

Training
    :class:`~cai_dpo.rl.ppo_trainer.CaiPPOTrainer` runs the steps (rollout, score, KL-penalised
    rewards, GAE, clipped updates; its module docstring gives the objective); the arithmetic
    is :mod:`cai_dpo.rl.ppo_math`, the batches :mod:`cai_dpo.rl.rollout`, the preference
    model's scorer :class:`~cai_dpo.rl.reward.RewardScorer`. This module loads the models,
    picks the prompts, and writes the logs, checkpoints and the artifact.

Outputs: ``models/ppo`` (adapter; its note lists ``models/sft`` under ``merge_first``),
``metrics/ppo/log.csv`` and ``metrics/ppo/reward_kl.png``, checkpoints in
``checkpoints/ppo/step-*`` (policy and value adapters, optimizer, step, KL controller) that
a rerun resumes from. ``ppo.mode: rloo`` runs TRL's ``RLOOTrainer`` with the same reward
(missing-EOS penalty included) and writes its own result, ``models/rloo``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import PPOSection, RunConfig, raise_problems, to_dict
from cai_dpo.errors import InputError
from cai_dpo.rl.ppo_trainer import CaiPPOTrainer, last_ppo_checkpoint
from cai_dpo.rl.reward import RewardFn, RewardScorer, prompt_text, rm_spec, sft_adapter
from cai_dpo.rl.rollout import PtxBatches
from cai_dpo.schema import Conversation, as_conversation
from cai_dpo.sft_rows import build_rows
from cai_dpo.splits import prompt_key
from cai_dpo.store import (
    Manifest,
    RunStore,
    Timer,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    content_hash,
    locked_stage,
)

log = logging.getLogger(__name__)

LOG_COLUMNS = [
    "step",
    "score",
    "score_std",
    "reward",
    "kl",
    "kl_coef",
    "entropy",
    "clipfrac",
    "approx_kl",
    "pg_loss",
    "vf_loss",
    "vf_clipfrac",
    "value_mean",
    "ptx_loss",
    "response_length",
    "eos_frac",
    "rollout_s",
    "update_s",
    "tokens_per_s",
]


# --------------------------------------------------------------------------- prompts and data


def ppo_prompts(cfg: RunConfig, run: RunStore) -> list[Conversation]:
    """Training prompts: those of the preference data, else of ``data/sl``, else the
    configured prompt sets (train split)."""
    from datasets import load_from_disk

    from cai_dpo.preferences import preferences_path

    seen: dict[str, Conversation] = {}
    pref = preferences_path(run)
    if pref.exists():
        ds = load_from_disk(str(pref))
        if "prompt" not in ds.column_names:
            raise InputError(
                f"{pref}: field 'prompt' is missing (columns: {', '.join(ds.column_names)}); "
                "rerun the judge stage to write prompt/chosen/rejected"
            )
        for p in ds["prompt"]:
            conv = as_conversation(p)
            seen.setdefault(prompt_key(conv), conv)
    elif run.sl_data.exists():
        for msgs in load_from_disk(str(run.sl_data))["messages"]:
            conv = as_conversation([m for m in msgs[:-1]])
            seen.setdefault(prompt_key(conv), conv)
    else:
        from cai_dpo.data import load_prompts, split_prompts

        for spec, limit in ((cfg.data.red_team, cfg.data.red_team_limit), (cfg.data.helpful, cfg.data.helpful_limit)):
            prompts = split_prompts(load_prompts(spec), "train")[: limit or None]
            for p in prompts:
                conv = as_conversation(p.text)
                seen.setdefault(prompt_key(conv), conv)
    if not seen:
        raise InputError(f"{run.root}: no prompts for PPO (data/preferences, data/sl and the prompt sets are empty)")
    return list(seen.values())


def benign_prompts(cfg: RunConfig) -> list[Conversation]:
    """``ppo.benign_prompts`` benign train prompts of ``pairs.curated`` (a sample seeded by the run's
    seed; all of them when there are fewer), as conversations; none when the setting is 0."""
    if cfg.ppo.benign_prompts <= 0:
        return []
    from cai_dpo.curated import load_curated

    examples = load_curated(cfg.pairs.curated, kind="benign", split="train")
    order = np.random.default_rng(cfg.seed).permutation(len(examples))[: cfg.ppo.benign_prompts]
    return [as_conversation(examples[int(i)].prompt) for i in sorted(order)]


def signed_reward(
    reward: Callable[[list[Conversation], list[str]], Sequence[float]], benign: Sequence[Conversation]
) -> Callable[[list[Conversation], list[str]], Sequence[float]]:
    """``reward`` with its score negated after the ``benign`` prompts (Llama 2 picks the reward by the
    prompt's kind too; Touvron et al. 2023). The preference model of harmful-prompt pairs
    scores declining, so its negation pays for answering a benign request. ``reward`` itself when
    there are no benign prompts."""
    if not benign:
        return reward
    keys = {prompt_key(p) for p in benign}

    def score(prompts: list[Conversation], responses: list[str]) -> list[float]:
        raw = reward(prompts, responses)
        return [-float(r) if prompt_key(p) in keys else float(r) for p, r in zip(prompts, raw)]

    return score


def ptx_rows(cfg: RunConfig, run: RunStore) -> Any:
    """Rows (``messages``) of the pretraining-mix term for ``ppo.ptx_data``: ``data/sl``, or the SFT
    stage's training rows (:func:`cai_dpo.sft_rows.build_rows`).

    Raises ``FileNotFoundError`` naming the missing dataset.
    """
    from datasets import load_from_disk

    if cfg.ppo.ptx_data == "sft":
        return build_rows(cfg, run)[0]
    if not run.sl_data.exists():
        raise FileNotFoundError(
            f"{run.sl_data}: ppo.ptx_coef > 0 with ppo.ptx_data 'sl' needs the SL-CAI dataset; run `cai-dpo sl`, "
            "set ppo.ptx_data=sft or ppo.ptx_coef=0"
        )
    return load_from_disk(str(run.sl_data))


# --------------------------------------------------------------------------- logging


def write_log(path: Path, rows: list[dict[str, float]]) -> None:
    """The per-step metrics as CSV (atomic rewrite)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, restval="", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of ``log.csv`` with numbers parsed."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]


def plot_log(path: Path, rows: list[dict[str, float]]) -> Path:
    """PNG with the mean score/reward and the KL to the reference per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [r["score"] for r in rows], marker="o", label="preference score")
    ax1.plot(steps, [r["reward"] for r in rows], marker=".", label="score - β·KL - penalty")
    ax1.set_xlabel("PPO step")
    ax1.set_title("reward")
    ax1.legend(fontsize=8)
    ax2.plot(steps, [r["kl"] for r in rows], marker="o", color="tab:red")
    ax2.set_xlabel("PPO step")
    ax2.set_title("KL(policy ‖ reference), nats per response")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- models


def load_policy(cfg: RunConfig, run: RunStore) -> tuple[Any, Any, list[Path]]:
    """The SL-CAI model (SFT adapter merged) with a fresh LoRA adapter (dropout 0)."""
    from cai_dpo.models import attach_lora, load_model

    merge = [sft_adapter(run)] if sft_adapter(run) else []
    model, tok = load_model(cfg.policy, trainable=True, merge_first=merge)
    lora = dataclasses.replace(cfg.ppo.lora, dropout=0.0)
    return attach_lora(model, lora, task_type="CAUSAL_LM"), tok, merge


def same_vocab(tok_a: Any, tok_b: Any) -> bool:
    """True when two tokenizers map every token to the same id."""
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def load_value_model(
    cfg: RunConfig, run: RunStore, policy_tok: Any, merge: list[Path], rm_dir: Path | None
) -> tuple[Any, str]:
    """The value model and a note saying where it was initialised from."""
    import torch

    from cai_dpo.models import attach_lora, load_model, load_tokenizer

    if cfg.ppo.value_init == "reward" and rm_dir is not None and (rm_dir / "adapter_config.json").exists():
        if same_vocab(load_tokenizer(str(rm_dir)), policy_tok):
            model, _ = load_model(rm_spec(rm_dir, cfg.policy.device), task="seq_cls", trainable=True)
            if hasattr(model, "get_base_model") and hasattr(model.get_base_model(), "score"):
                model.config.pad_token_id = policy_tok.pad_token_id
                return model, f"value model initialised from the preference model {rm_dir}"
        reason = "its tokenizer differs from the policy's"
    elif cfg.ppo.value_init == "reward":
        reason = "no preference model adapter available"
    else:
        reason = "ppo.value_init is 'policy'"
    model, _ = load_model(cfg.policy, task="seq_cls", trainable=True, merge_first=merge)
    with torch.no_grad():
        model.score.weight.zero_()
    lora = dataclasses.replace(cfg.ppo.lora, dropout=0.0)
    return attach_lora(model, lora, task_type="SEQ_CLS", modules_to_save=["score"]), (
        f"value model initialised from the SL-CAI policy weights with a zero head ({reason})"
    )


def reward_model_dir(run: RunStore) -> Path:
    """``models/rm``; a missing one raises naming the fix."""
    rm_dir = run.preference_model
    if not rm_dir.exists():
        raise FileNotFoundError(f"{rm_dir}: no preference model; run `cai-dpo rm` first (or pass reward_fn=)")
    return rm_dir


def default_reward(run: RunStore, cfg: RunConfig) -> tuple[Any, Path]:
    """The RewardScorer of ``models/rm``; a missing one raises naming the fix."""
    rm_dir = reward_model_dir(run)
    return RewardScorer(rm_dir, batch_size=max(1, cfg.ppo.sampling.batch_size), device=cfg.policy.device), rm_dir


def _reward_adapter(
    reward_fn: RewardFn | None, scorer: Any
) -> Callable[[list[Conversation], list[str]], Sequence[float]]:
    """Prompts go to an injected reward_fn as user-text strings, to the scorer as conversations."""
    if reward_fn is not None:
        return lambda prompts, responses: reward_fn([prompt_text(p) for p in prompts], list(responses))
    return lambda prompts, responses: scorer.score(prompts, list(responses))


# --------------------------------------------------------------------------- stage

# PPO config keys that only change how long training runs: a longer run may resume a shorter one
_LENGTH_KEYS = ("steps", "save_steps")


def training_note(
    cfg: RunConfig, run: RunStore, prompts: list[Conversation], rm_dir: Path | None, merge: list[Path], mode: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs note, length target) of a PPO or RLOO run, for checkpoint resumption and skipping.

    The note holds every input the weights depend on: the ``ppo`` settings (less
    ``steps``/``save_steps``), the policy spec and its mixed precision, the seed, the prompts, the SFT adapter, the
    preference model (``"programmatic"`` for an injected ``reward_fn``) and, with a
    pretraining mix, its rows (``ppo.ptx_data``).
    """
    from cai_dpo.models import autocast_dtype
    from cai_dpo.training import artifact_hash

    settings = {k: v for k, v in to_dict(cfg.ppo).items() if k not in _LENGTH_KEYS}
    note: dict[str, Any] = {
        "mode": mode,
        "ppo": settings,
        "policy": to_dict(cfg.policy),
        "bf16": autocast_dtype(cfg.policy) is not None,
        "seed": cfg.seed,
        "prompts": content_hash(prompts),
        "sft_adapter": [artifact_hash(m) for m in merge],
        "reward": artifact_hash(rm_dir) if rm_dir is not None else "programmatic",
    }
    if mode == "ppo" and cfg.ppo.ptx_coef > 0:
        if cfg.ppo.ptx_data == "sft":
            note["ptx_data"] = build_rows(cfg, run)[1]["data_hash"]
        elif run.sl_data.exists():
            note["ptx_data"] = artifact_hash(run.sl_data)
    return note, {k: getattr(cfg.ppo, k) for k in _LENGTH_KEYS}


@locked_stage
def run_ppo(
    cfg: RunConfig,
    run: RunStore | None = None,
    reward_fn: RewardFn | None = None,
    prompts: list[Conversation] | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """RL-CAI: PPO (or RLOO with ``ppo.mode: rloo``) of the SL-CAI policy against the preference model.

    ``reward_fn(prompts, responses) -> list[float]`` (prompts as user-text strings) replaces
    the preference model; ``prompts`` (conversations) replace the run's prompts. Writes
    ``models/ppo`` (``models/rloo`` in RLOO mode) and returns it; resumes from its checkpoints
    unless ``resume=False``. Raises ``ConfigError`` for an RLOO setup that cannot run.
    """

    from cai_dpo.distributed import is_main_process, maybe_kill_for_test, rank, world_size
    from cai_dpo.engine import set_threads
    from cai_dpo.training import artifact_current, clear_stale_checkpoints, seed_everything, training_inputs

    run = run or RunStore(cfg.run_dir)
    set_threads(cfg.threads)
    benign: list[Conversation] = []
    if not prompts:
        prompts = ppo_prompts(cfg, run)
        # a benign prompt the preference data already has keeps its score's sign: its pairs taught it
        known = {prompt_key(p) for p in prompts}
        benign = [b for b in benign_prompts(cfg) if prompt_key(b) not in known]
        prompts = prompts + benign
    if cfg.ppo.mode == "rloo":
        return run_rloo(cfg, run, reward_fn, prompts, resume=resume, benign=benign)
    rm_dir = None if reward_fn is not None else reward_model_dir(run)
    merge = [sft_adapter(run)] if sft_adapter(run) else []
    note, target = training_note(cfg, run, prompts, rm_dir, merge, "ppo")
    out_dir = run.ppo_adapter
    if resume and artifact_current(out_dir, note, target):
        log.info("PPO adapter in %s is up to date (same prompts, preference model, SFT adapter and settings)", out_dir)
        return out_dir
    scorer = None if reward_fn is not None else default_reward(run, cfg)[0]
    reward = signed_reward(_reward_adapter(reward_fn, scorer), benign)

    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    with Timer() as t_load:
        policy, tok, merge = load_policy(cfg, run)
        if cfg.ppo.advantage == "gae":
            value_model, value_note = load_value_model(cfg, run, tok, merge, rm_dir or run.preference_model)
        else:
            value_model, value_note = None, f"no value model: leave-one-out advantages over ppo.rloo_k={cfg.ppo.rloo_k}"
    timings["load_s"] = t_load.seconds
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        # ptx_batch is global, like rollout_batch: each process draws its share with its own seed
        ptx = PtxBatches(
            ptx_rows(cfg, run),
            tok,
            max(1, cfg.ppo.ptx_batch // world_size()),
            cfg.sft.max_length,
            cfg.seed + rank(),
        )
    trainer = CaiPPOTrainer(cfg, policy, tok, value_model, reward, prompts, ptx=ptx, progress=progress)

    ckpt_root = run.checkpoint_dir("ppo")
    metrics_dir = run.metrics_dir("ppo")
    log_path = metrics_dir / "log.csv"
    resumed_from = None
    main = is_main_process()  # several processes: rank 0 alone writes checkpoints, metrics and the artifact
    if not resume and ckpt_root.exists() and main:
        shutil.rmtree(ckpt_root)
    clear_stale_checkpoints(ckpt_root, note)
    if resume and (last := last_ppo_checkpoint(ckpt_root, cfg.ppo.steps)) is not None:
        trainer.load_checkpoint(last)
        resumed_from = trainer.step
        trainer.history = [r for r in read_log(log_path) if r.get("step", math.inf) <= trainer.step]
        log.info("PPO resumes from %s (step %d)", last, trainer.step)

    from cai_dpo.progress import progress_bar as tqdm
    from cai_dpo.training import StepLogger

    # TensorBoard etc. per train.report_to; log.csv always
    tracker = StepLogger(metrics_dir, cfg.train.report_to if main else "none")
    bar = tqdm(
        total=cfg.ppo.steps, initial=trainer.step, desc="ppo", unit="step", disable=not progress, dynamic_ncols=True
    )
    while trainer.step < cfg.ppo.steps:
        row = trainer.train_step()
        maybe_kill_for_test(trainer.step)
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if not main:
            continue
        write_log(log_path, trainer.history)
        tracker.log_step(row, trainer.step)
        if trainer.step % max(1, cfg.ppo.save_steps) == 0 or trainer.step == cfg.ppo.steps:
            trainer.save_checkpoint(ckpt_root / f"step-{trainer.step:06d}")
            _prune_checkpoints(ckpt_root, keep=2)
    bar.close()
    tracker.close()
    if not main:
        return out_dir  # rank 0 writes the artifact
    if trainer.history:
        plot_log(metrics_dir / "reward_kl.png", trainer.history)

    from cai_dpo.models import write_adapter

    hist = trainer.history
    new_rows = [r for r in hist if resumed_from is None or r["step"] > resumed_from]
    timings.update(
        {
            "rollout_s_per_step": float(np.mean([r["rollout_s"] for r in new_rows])) if new_rows else float("nan"),
            "update_s_per_step": float(np.mean([r["update_s"] for r in new_rows])) if new_rows else float("nan"),
        }
    )
    metrics: dict[str, Any] = {}
    if hist:
        k = max(1, len(hist) // 4)
        metrics = {
            "score_first": hist[0]["score"],
            "score_last": hist[-1]["score"],
            "score_first_quarter": float(np.mean([r["score"] for r in hist[:k]])),
            "score_last_quarter": float(np.mean([r["score"] for r in hist[-k:]])),
            "kl_last": hist[-1]["kl"],
            "kl_max": float(max(r["kl"] for r in hist)),
            "kl_coef_last": hist[-1]["kl_coef"],
            "entropy_last": hist[-1]["entropy"],
            "response_length_last": hist[-1]["response_length"],
        }
    inputs = {"prompts": str(len(prompts)), **training_inputs(note, target)}
    if rm_dir is not None:
        inputs["rm"] = note["reward"]
    if merge:
        inputs["sft_adapter"] = note["sft_adapter"][0]
    manifest = Manifest(
        stage="ppo",
        config={"ppo": to_dict(cfg.ppo), "policy": to_dict(cfg.policy), "seed": cfg.seed},
        inputs=inputs,
        models={
            "base": cfg.policy.name,
            "merged_first": ", ".join(str(m) for m in merge) or "none",
            "reward": str(rm_dir) if rm_dir else "reward_fn (programmatic)",
        },
        counts={
            "steps": trainer.step,
            "resumed_from": resumed_from or 0,
            "rollouts": trainer.step * cfg.ppo.rollout_batch,
            "benign_prompts": len(benign),
        },
        timings=timings,
        metrics=metrics,
        notes=[
            value_note,
            "reference = policy with its LoRA adapter disabled; "
            "KL per token = log pi - log pi_ref (k1), summed per response",
            "loss = L_pg + vf_coef*L_vf + ptx_coef*L_LM "
            "(paper's L_LM + lambda*L_RL with lambda = 1/ptx_coef, rescaled)"
            + ("; no L_vf with leave-one-out advantages" if value_model is None else ""),
            "trained on the sampled token ids; the reward scores the decoded text of exactly those ids",
            *(
                [f"{len(benign)} benign curated train prompts added; their reward is the preference score negated"]
                if benign
                else []
            ),
        ],
    )
    with atomic_dir(out_dir) as tmp:  # adapter and manifest in one atomic step
        write_adapter(trainer.policy, tok, tmp, base=cfg.policy.name, merge_first=merge, final=out_dir)
        manifest.write(tmp / "manifest.json")
    log.info("PPO: %d steps -> %s", trainer.step, out_dir)
    return out_dir


def _prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name)), key=lambda p: p.name)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- RLOO


def validate_rloo(pc: PPOSection, source: str = "config") -> None:
    """Raise :class:`~cai_dpo.config.ConfigError` naming the key and the fix when RLOO cannot run with ``pc``.

    The checks are :meth:`~cai_dpo.config.PPOSection.problems` in mode ``rloo`` (run when a config
    with ``ppo.mode: rloo`` is loaded), repeated for a section built or changed in code.
    """
    raise_problems(dataclasses.replace(pc, mode="rloo"), source=source, prefix="ppo.")


def _generation_eos(model: Any) -> set[int]:
    """EOS ids of a model's generation config (an int or a list), as a set."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def rloo_rewards_inputs(
    tokenizer: Any, completion_ids: Sequence[Sequence[int]], eos_ids: set[int], missing_eos_penalty: float
) -> tuple[list[str], list[float]]:
    """Texts the reward scores (the decoded ids, EOS excluded) and each completion's missing-EOS penalty."""
    texts, penalties = [], []
    for ids in completion_ids:
        ids = list(ids)
        finished = bool(ids) and ids[-1] in eos_ids
        texts.append(tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False))
        penalties.append(0.0 if finished else float(missing_eos_penalty))
    return texts, penalties


def run_rloo(
    cfg: RunConfig,
    run: RunStore,
    reward_fn: RewardFn | None,
    prompts: list[Conversation],
    *,
    resume: bool = True,
    benign: Sequence[Conversation] = (),
) -> Path:
    """RLOO (TRL's ``RLOOTrainer``) on the same policy, reference and reward, for comparison with PPO.

    Writes ``models/rloo`` (manifest stage ``rloo``), metrics in ``metrics/rloo``, checkpoints
    in ``checkpoints/rloo``. The reward is the preference score minus ``missing_eos_penalty``
    for completions without EOS, as in PPO. Mapping: one PPO step = one generation batch of
    ``rollout_batch`` completions (``rloo_k`` per prompt), ``ppo_epochs`` passes in
    minibatches of ``minibatch``;
    ``beta = kl_coef``, ``epsilon = clip_range``. The reward is negated after the ``benign`` prompts
    (:func:`signed_reward`).
    """
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from cai_dpo.distributed import is_main_process, sharded_state_dict
    from cai_dpo.models import load_model, lora_config, write_adapter
    from cai_dpo.training import (
        artifact_current,
        common_training_args,
        resume_checkpoint,
        seed_everything,
        train_to_target,
        training_callbacks,
        training_inputs,
    )

    pc = cfg.ppo
    validate_rloo(pc, source=str(run.config_file))
    k = pc.rloo_k
    rm_dir = None if reward_fn is not None else reward_model_dir(run)
    merge = [sft_adapter(run)] if sft_adapter(run) else []
    note, target = training_note(cfg, run, prompts, rm_dir, merge, "rloo")
    out_dir = run.rloo_adapter
    if resume and artifact_current(out_dir, note, target):
        log.info("RLOO adapter in %s is up to date; nothing to train", out_dir)
        return out_dir
    scorer = None if reward_fn is not None else default_reward(run, cfg)[0]
    reward = signed_reward(_reward_adapter(reward_fn, scorer), benign)
    steps_per_gen = pc.rollout_batch // pc.minibatch
    seed_everything(cfg.seed)  # before RLOOTrainer wraps the peft_config adapter
    model, tok = load_model(cfg.policy, trainable=True, merge_first=merge)

    eos_ids = {tok.eos_token_id} | _generation_eos(model)

    def preference_reward(
        prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **_: Any
    ) -> list[float]:
        if completion_ids is None:
            raise RuntimeError(
                "RLOOTrainer passed no completion_ids; this TRL version is not supported for ppo.mode=rloo"
            )
        texts, penalties = rloo_rewards_inputs(tok, completion_ids, eos_ids, pc.missing_eos_penalty)
        return [float(s) - p for s, p in zip(reward(prompts, texts), penalties)]

    section = dataclasses.replace(pc, save_steps=pc.save_steps * steps_per_gen * pc.ppo_epochs)
    ckpt = run.checkpoint_dir("rloo")
    if not resume and ckpt.exists():
        shutil.rmtree(ckpt)
    resume_from = resume_checkpoint(ckpt, note)
    max_steps = pc.steps * steps_per_gen * pc.ppo_epochs
    args = RLOOConfig(
        **common_training_args(
            section,
            ckpt,
            seed=cfg.seed,
            save_steps=section.save_steps,
            per_device_train_batch_size=pc.minibatch,
            max_steps=max_steps,
            num_train_epochs=1.0,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            bf16=note["bf16"],
        ),
        num_generations=k,
        generation_batch_size=pc.rollout_batch,
        num_iterations=pc.ppo_epochs,
        max_completion_length=pc.sampling.max_new_tokens,
        temperature=pc.sampling.temperature,
        top_p=pc.sampling.top_p,
        beta=pc.kl_coef,
        epsilon=pc.clip_range,
        max_grad_norm=pc.max_grad_norm,
    )
    dataset = Dataset.from_dict({"prompt": prompts})
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=preference_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(dataclasses.replace(pc.lora, dropout=0.0)),
        callbacks=training_callbacks(run.metrics_dir("rloo"), cfg.train.report_to),
    )
    with Timer() as t:
        _, resumed_step = train_to_target(trainer, resume_from, max_steps)
    state = sharded_state_dict(trainer)  # every process takes part when the weights are sharded
    if not is_main_process():
        return out_dir  # rank 0 writes the artifact
    manifest = Manifest(
        stage="rloo",
        config={"ppo": to_dict(pc), "policy": to_dict(cfg.policy), "seed": cfg.seed},
        inputs={
            "prompts": str(len(prompts)),
            **({"rm": note["reward"]} if rm_dir else {}),
            **training_inputs(note, target),
        },
        models={
            "base": cfg.policy.name,
            "merged_first": ", ".join(str(m) for m in merge) or "none",
            "reward": str(rm_dir) if rm_dir else "reward_fn (programmatic)",
        },
        counts={
            "optimizer_steps": int(trainer.state.global_step),
            "resumed_from_step": resumed_step,
            "benign_prompts": len(benign),
        },
        timings={"train_s": t.seconds},
        notes=[
            "mode rloo: TRL RLOOTrainer, k completions per prompt, leave-one-out baseline; "
            "metrics in metrics/rloo/log.csv",
            f"reward = preference score of the decoded completion ids - missing_eos_penalty ({pc.missing_eos_penalty}) "
            "for completions that hit max_new_tokens without EOS (as in PPO)",
        ],
    )
    with atomic_dir(out_dir) as tmp:  # adapter and manifest in one atomic step
        write_adapter(trainer.model, tok, tmp, base=cfg.policy.name, merge_first=merge, final=out_dir, state_dict=state)
        manifest.write(tmp / "manifest.json")
    return out_dir
