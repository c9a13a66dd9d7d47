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

One step
    1. rollout: ``rollout_batch`` prompts, one sample each, through :class:`~cai_dpo.engine.Engine`
       on the policy. The engine returns the sampled token ids, which are trained on as they
       are (EOS appended when the sample ended with EOS); log-probs are recomputed on those
       ids, so the ratio at the first epoch is exactly 1.
    2. score: the preference model's score of (prompt, response), the response being the
       decoded sampled ids (not stripped, not truncated) — or an injected
       ``reward_fn(prompts, responses)`` — minus ``missing_eos_penalty`` for responses that
       hit ``max_new_tokens`` without EOS;
    3. per-token reward ``r_t = -β·(log π(a_t) - log π_ref(a_t))``, plus the score on the
       last response token; β is ``kl_coef``, or adapted toward ``target_kl`` (Ziegler et al.)
       when ``adaptive_kl``;
    4. GAE(γ, λ) advantages (whitened over the batch's response tokens), returns = A + V;
    5. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss, clipped value
       loss, optional pretraining-mix term, one AdamW step with gradient-norm clipping.

Objective (per minibatch)
    ``L = L_pg + vf_coef · L_vf + ptx_coef · L_LM``, where ``L_LM`` is the SFT language-model
    loss (mean token NLL of the assistant turns) on a batch of ``data/sl``. This is the
    paper's ``L_total = L_LM + λ·L_RL`` up to a constant factor: with ``ptx_coef > 0`` it
    equals ``ptx_coef · (L_LM + (1/ptx_coef)·L_RL)``, i.e. ``λ = 1/ptx_coef`` with the
    learning rate scaled by ``ptx_coef``. ``ptx_coef = 0`` is plain PPO.

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
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai_dpo.config import RunConfig, to_dict
from cai_dpo.errors import InputError
from cai_dpo.models import reference_mode
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, atomic_write_bytes, atomic_write_text, content_hash
from cai_dpo.store import locked_stage

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
Conversation = list[dict[str, str]]
LOG_COLUMNS = [
    "step", "score", "score_std", "reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "pg_loss",
    "vf_loss", "vf_clipfrac", "value_mean", "ptx_loss", "response_length", "eos_frac", "rollout_s", "update_s",
    "tokens_per_s",
]


# --------------------------------------------------------------------------- pure functions


SumFn = Callable[[Any], Any]  # sums a tensor over the processes (DataParallel.sum); None on one process


def _count(x: Any, mask: Any | None) -> Any:
    import torch

    return mask.sum() if mask is not None else torch.tensor(float(x.numel()), device=x.device)


def masked_mean(x: Any, mask: Any | None = None, all_sum: SumFn | None = None) -> Any:
    """Mean of ``x`` over positions where ``mask`` is 1 (all positions when mask is None).

    ``all_sum``: with several processes, the mean over every process's positions.
    """
    if all_sum is None:
        return x.mean() if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)
    total = (x * mask).sum() if mask is not None else x.sum()
    return all_sum(total) / all_sum(_count(x, mask)).clamp(min=1)


def masked_var(x: Any, mask: Any | None = None, unbiased: bool = True, all_sum: SumFn | None = None) -> Any:
    """Variance of ``x`` over masked positions (Bessel-corrected by default; global with ``all_sum``)."""
    mean = masked_mean(x, mask, all_sum)
    centred = (x - mean) ** 2
    var = masked_mean(centred, mask, all_sum)
    if unbiased:
        n = _count(x, mask)
        n = float(all_sum(n) if all_sum is not None else n)
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: Any, mask: Any | None = None, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: SumFn | None = None) -> Any:
    """``(x - mean) / sqrt(var + eps)`` over masked positions; ``shift_mean=False`` keeps the mean.

    ``all_sum``: mean and variance over every process's positions (several processes).
    """
    import torch

    mean, var = masked_mean(x, mask, all_sum), masked_var(x, mask, all_sum=all_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = out * mask
    return out


def compute_gae(rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Generalised advantage estimates and returns for right-padded response tokens.

    ``rewards``, ``values``, ``mask``: ``[B, T]``; positions past a response's end (mask 0)
    contribute nothing, and the value after the last token is 0 (episode end).
    ``δ_t = r_t + γ·V_{t+1} - V_t``, ``A_t = δ_t + γ·λ·A_{t+1}``, returns ``A_t + V_t``.
    """
    import torch

    rewards = rewards * mask
    values = values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logp: Any, old_logp: Any, advantages: Any, mask: Any, clip_range: float) -> tuple[Any, dict[str, float]]:
    """Clipped surrogate loss ``mean(max(-A·ρ, -A·clip(ρ, 1±ε)))`` and its stats.

    Stats: ``clipfrac`` (share of tokens where the clipped term is active), ``approx_kl``
    (``0.5·mean((log ρ)²)``) and ``ratio`` (mean ρ).
    """
    import torch

    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((loss2 > loss1).float(), mask)),
            "approx_kl": float(0.5 * masked_mean(log_ratio**2, mask)),
            "ratio": float(masked_mean(ratio, mask)),
        }
    return loss, stats


def value_loss(values: Any, old_values: Any, returns: Any, mask: Any, clip_range_value: float) -> tuple[Any, dict[str, float]]:
    """Clipped value loss ``0.5·mean(max((V-R)², (V_clip-R)²))``, ``V_clip = V_old + clip(V-V_old, ±ε)``."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean((loss2 > loss1).float(), mask))}
    return loss, stats


def kl_penalty_rewards(logp: Any, ref_logp: Any, mask: Any, scores: Any, lengths: Any, kl_coef: float) -> tuple[Any, Any]:
    """Per-token rewards ``-β·(log π - log π_ref)`` with each score added on its last response token.

    Returns ``(rewards [B, T], kl [B, T])`` with ``kl = (log π - log π_ref)·mask`` (the k1 estimator).
    """
    import torch

    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards, kl


def entropy_from_logits(logits: Any) -> Any:
    """Entropy of the categorical distribution at each position."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class KLController:
    """Fixed KL coefficient, or the adaptive controller of Ziegler et al. (2019).

    Adaptive: ``β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n/horizon)`` after each batch of ``n`` rollouts.
    """

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value = float(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = state.get("target")
        self.horizon = int(state.get("horizon", self.horizon))


# --------------------------------------------------------------------------- batches


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update needs.

    Layout: queries left-padded to width ``P``, responses right-padded to width ``R``;
    ``input_ids [B, P+R]``; response-aligned tensors are ``[B, R]``.
    """

    prompts: list[Conversation]
    responses: list[str]
    finished: list[bool]
    input_ids: Any
    attention_mask: Any
    position_ids: Any
    response_mask: Any
    lengths: Any
    query_width: int
    scores: Any = None
    raw_scores: Any = None
    logprobs: Any = None
    ref_logprobs: Any = None
    values: Any = None
    entropy: Any = None
    kl: Any = None
    rewards: Any = None
    advantages: Any = None
    returns: Any = None

    def select(self, idx: Any) -> dict[str, Any]:
        """Tensors of a minibatch (rows ``idx``)."""
        names = ("input_ids", "attention_mask", "position_ids", "response_mask", "logprobs", "values", "advantages", "returns")
        return {n: getattr(self, n)[idx] for n in names}


def build_batch(query_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Left-pad queries and right-pad responses into one ``[B, P+R]`` batch with position ids."""
    import torch

    P = max(len(q) for q in query_ids)
    R = max(max(len(r) for r in response_ids), 1)
    ids, mask, rmask = [], [], []
    for q, r in zip(query_ids, response_ids):
        ids.append([pad_id] * (P - len(q)) + q + r + [pad_id] * (R - len(r)))
        mask.append([0] * (P - len(q)) + [1] * (len(q) + len(r)) + [0] * (R - len(r)))
        rmask.append([1] * len(r) + [0] * (R - len(r)))
    attention = torch.tensor(mask, device=device)
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": attention,
        "position_ids": position,
        "response_mask": torch.tensor(rmask, device=device, dtype=torch.float),
        "lengths": torch.tensor([len(r) for r in response_ids], device=device),
        "query_width": P,
    }


def response_logits(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any, P: int, temperature: float) -> Any:
    """Logits ``[B, R, V]`` predicting each response token (divided by the sampling temperature)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, P - 1 : -1].float()
    return logits / max(temperature, 1e-6)


def token_logprobs(logits: Any, input_ids: Any, P: int) -> Any:
    """Log-probs of the response tokens under ``logits`` (``[B, R]``)."""
    import torch

    targets = input_ids[:, P:]
    return torch.gather(torch.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)


def token_values(value_model: Any, input_ids: Any, attention_mask: Any, position_ids: Any, P: int) -> Any:
    """Value of each state before a response token (``[B, R]``) from a scalar-head model."""
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    head = getattr(base, "score")
    return head(hidden[:, P - 1 : -1]).squeeze(-1).float()


# --------------------------------------------------------------------------- pretraining mix


class PtxBatches:
    """Endless seeded batches of SFT examples (``messages``) for the language-model term."""

    def __init__(self, dataset: Any, tokenizer: Any, batch_size: int, max_length: int, seed: int):
        self.rows = [r["messages"] for r in dataset]
        if not self.rows:
            raise InputError("data/sl is empty; the ptx term needs SFT examples (set ppo.ptx_coef=0 to skip it)")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.rng = np.random.default_rng(seed)

    def encode(self, messages: Conversation) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and labels masking everything but the final assistant turn."""
        tok = self.tokenizer
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        head = tok(tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        n = min(len(head), len(full))
        labels = [-100] * n + full[n:]
        return full[-self.max_length :], labels[-self.max_length :]

    def next(self, device: Any) -> dict[str, Any]:
        """One right-padded batch with ``labels``."""
        import torch

        idx = self.rng.choice(len(self.rows), size=min(self.batch_size, len(self.rows)), replace=False)
        pairs = [self.encode(self.rows[i]) for i in idx]
        width = max(len(p[0]) for p in pairs)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([p[0] + [pad] * (width - len(p[0])) for p in pairs], device=device),
            "attention_mask": torch.tensor([[1] * len(p[0]) + [0] * (width - len(p[0])) for p in pairs], device=device),
            "labels": torch.tensor([p[1] + [-100] * (width - len(p[1])) for p in pairs], device=device),
        }


# --------------------------------------------------------------------------- optimizer state (no pickle)


def save_optimizer(optimizer: Any, folder: Path) -> None:
    """Optimizer state as ``optimizer.safetensors`` (tensors) + ``optimizer.json`` (the rest)."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if hasattr(v, "shape"):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}))


def load_optimizer(optimizer: Any, folder: Path) -> None:
    """Restore what :func:`save_optimizer` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- prompts and data


def ppo_prompts(cfg: RunConfig, run: RunStore) -> list[Conversation]:
    """Training prompts: those of the preference data, else of ``data/sl``, else the configured prompt sets (train split)."""
    from datasets import load_from_disk

    from cai_dpo.labels import preferences_path
    from cai_dpo.stages.rm import as_conversation

    seen: dict[str, Conversation] = {}
    pref = preferences_path(run)
    if pref.exists():
        ds = load_from_disk(str(pref))
        if "prompt" not in ds.column_names:
            raise InputError(f"{pref}: field 'prompt' is missing (columns: {', '.join(ds.column_names)}); "
                             "rerun the judge stage to write prompt/chosen/rejected")
        for p in ds["prompt"]:
            conv = as_conversation(p)
            seen.setdefault(json.dumps(conv, sort_keys=True), conv)
    elif (run.root / "data" / "sl").exists():
        for msgs in load_from_disk(str(run.root / "data" / "sl"))["messages"]:
            conv = as_conversation([m for m in msgs[:-1]])
            seen.setdefault(json.dumps(conv, sort_keys=True), conv)
    else:
        from cai_dpo.data import load_prompts, split_prompts, to_conversation

        for spec, limit in ((cfg.data.red_team, cfg.data.red_team_limit), (cfg.data.helpful, cfg.data.helpful_limit)):
            prompts = split_prompts(load_prompts(spec), "train")[: limit or None]
            for p in prompts:
                conv = to_conversation(p.text)
                seen.setdefault(json.dumps(conv, sort_keys=True), conv)
    if not seen:
        raise InputError(f"{run.root}: no prompts for PPO (data/preferences, data/sl and the prompt sets are empty)")
    return list(seen.values())


# --------------------------------------------------------------------------- trainer


class PPOTrainer:
    """The PPO loop on one policy (LoRA), its reference (adapter off) and a value model.

    On several processes (``accelerate launch``, see :class:`~cai_dpo.distributed.DataParallel`)
    each step's ``rollout_batch`` prompts and each ``minibatch`` are split evenly over the
    processes; every process samples, scores and updates on its share, gradients are averaged
    after each backward pass (as DDP does: the mean of the processes' minibatch losses), rewards
    and advantages are whitened with global statistics, and the logged figures (score, KL,
    entropy, losses, ...) are over the whole batch. Every process keeps a full replica of the
    models (no sharding, whatever the accelerate config).
    """

    def __init__(self, cfg: RunConfig, policy: Any, tokenizer: Any, value_model: Any, reward: RewardFn,
                 prompts: list[Conversation], *, ptx: PtxBatches | None = None, progress: bool = True):
        import torch

        from cai_dpo.distributed import DataParallel, check_processes
        from cai_dpo.engine import Engine

        self.cfg = cfg
        self.pc = cfg.ppo
        self.policy = policy
        self.tokenizer = tokenizer
        self.value_model = value_model
        self.reward = reward
        self.prompts = prompts
        self.ptx = ptx
        self.progress = progress
        self.engine = Engine(policy, tokenizer, batch_size=self.pc.sampling.batch_size, progress=False)
        self.eos_id = tokenizer.eos_token_id
        self.params = [p for p in list(policy.parameters()) + list(value_model.parameters()) if p.requires_grad]
        if not self.params:
            raise ValueError("PPO: no trainable parameters (is the LoRA adapter attached?)")
        self.dp = DataParallel()
        check_processes("ppo", cfg, self.dp.world_size)
        self.minibatch = max(1, self.pc.minibatch // self.dp.world_size)  # rows per process per minibatch
        self.dp.broadcast(self.params)  # every process starts from rank 0's adapters
        self.optimizer = torch.optim.AdamW(self.params, lr=self.pc.learning_rate, eps=1e-5)
        self.kl_ctl = KLController(self.pc.kl_coef, self.pc.target_kl if self.pc.adaptive_kl else None, self.pc.kl_horizon)
        self.step = 0
        self.history: list[dict[str, float]] = []

    @property
    def device(self) -> Any:
        return next(self.policy.parameters()).device

    # ---------------------------------------------------------------- rollout

    def batch_prompts(self, step: int) -> list[Conversation]:
        """The prompts of step ``step`` (1-based): a seeded shuffle per pass over the prompt list."""
        n, k = len(self.prompts), self.pc.rollout_batch
        out = []
        for j in range((step - 1) * k, step * k):
            epoch, pos = divmod(j, n)
            order = np.random.default_rng(self.cfg.seed * 100_003 + epoch).permutation(n)
            out.append(self.prompts[int(order[pos])])
        return out

    def response_ids(self, gens: list[Any]) -> list[list[int]]:
        """The sampled token ids of each generation, EOS appended when the sample ended with it.

        These are exactly the ids the policy emitted (no decode/re-encode round trip), so the
        log-probs, KL and gradients are those of the sampled actions. A sample with no token
        at all (possible only with ``max_new_tokens`` 0) gets EOS so it has one action.
        """
        out = []
        for g in gens:
            ids = list(g.token_ids)
            if g.finished or not ids:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def response_texts(self, gens: list[Any]) -> list[str]:
        """The text the reward sees: the decoded sampled ids (EOS excluded), not stripped or re-tokenized."""
        return [self.tokenizer.decode(g.token_ids, skip_special_tokens=False) for g in gens]

    def rollout(self, prompts: list[Conversation], seed: int) -> Rollout:
        """Sample one response per prompt; score it; compute log-probs, reference log-probs and values."""
        import torch

        sampling = dataclasses.replace(self.pc.sampling, seed=seed)
        self.policy.eval()
        gens = [g[0] for g in self.engine.generate(prompts, sampling, desc="ppo rollout")]
        query_ids = [self.engine.encode(self.engine.render(p)) for p in prompts]
        response_ids = self.response_ids(gens)
        b = build_batch(query_ids, response_ids, self.tokenizer.pad_token_id, self.device)
        ro = Rollout(prompts=prompts, responses=self.response_texts(gens), finished=[g.finished for g in gens],
                     input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     response_mask=b["response_mask"], lengths=b["lengths"], query_width=b["query_width"])
        raw = torch.tensor([float(s) for s in self.reward(prompts, ro.responses)], dtype=torch.float, device=self.device)
        if raw.shape[0] != len(prompts):
            raise ValueError(f"reward function returned {raw.shape[0]} scores for {len(prompts)} responses")
        ro.raw_scores = raw
        penalty = torch.tensor([0.0 if f else self.pc.missing_eos_penalty for f in ro.finished], device=self.device)
        ro.scores = raw - penalty
        self.forward_rollout(ro)
        return ro

    def forward_rollout(self, ro: Rollout) -> None:
        """Fill log-probs (policy and reference), entropy, values, rewards, advantages and returns."""
        import torch

        T = self.pc.sampling.temperature if self.pc.sampling.do_sample else 1.0
        P, mask = ro.query_width, ro.response_mask
        logps, refs, ents, vals = [], [], [], []
        mb = self.minibatch
        with torch.no_grad():
            for s in range(0, ro.input_ids.shape[0], mb):
                sl = slice(s, s + mb)
                args = (ro.input_ids[sl], ro.attention_mask[sl], ro.position_ids[sl])
                logits = response_logits(self.policy, *args, P, T)
                logps.append(token_logprobs(logits, ro.input_ids[sl], P))
                ents.append(entropy_from_logits(logits))
                del logits
                with reference_mode(self.policy):
                    ref_logits = response_logits(self.policy, *args, P, T)
                refs.append(token_logprobs(ref_logits, ro.input_ids[sl], P))
                del ref_logits
                vals.append(token_values(self.value_model, *args, P))
        ro.logprobs = torch.cat(logps) * mask
        ro.ref_logprobs = torch.cat(refs) * mask
        ro.entropy = torch.cat(ents)
        ro.values = torch.cat(vals) * mask
        scores = ro.scores
        if self.pc.whiten_rewards and self.pc.rollout_batch > 1:
            scores = whiten(scores, shift_mean=False, all_sum=self._all_sum)
        ro.rewards, ro.kl = kl_penalty_rewards(ro.logprobs, ro.ref_logprobs, mask, scores, ro.lengths, self.kl_ctl.value)
        adv, ro.returns = compute_gae(ro.rewards, ro.values, mask, self.pc.gamma, self.pc.lam)
        ro.advantages = whiten(adv, mask, all_sum=self._all_sum)

    @property
    def _all_sum(self) -> Any:
        """Sum over the processes for global statistics; None on one process."""
        return self.dp.sum if self.dp.world_size > 1 else None

    # ---------------------------------------------------------------- update

    def update(self, ro: Rollout, seed: int) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped policy/value (+ptx) updates over shuffled minibatches."""
        import torch

        T = self.pc.sampling.temperature if self.pc.sampling.do_sample else 1.0
        P = ro.query_width
        rng = np.random.default_rng(seed)
        B = ro.input_ids.shape[0]
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "ratio", "ptx_loss")}
        self.policy.eval()  # dropout stays off: ratios must compare like with like
        self.value_model.eval()
        for _ in range(self.pc.ppo_epochs):
            perm = rng.permutation(B)
            for s in range(0, B, self.minibatch):
                idx = torch.as_tensor(perm[s : s + self.minibatch], device=self.device)
                m = ro.select(idx)
                logits = response_logits(self.policy, m["input_ids"], m["attention_mask"], m["position_ids"], P, T)
                logp = token_logprobs(logits, m["input_ids"], P)
                del logits
                pg, pg_stats = policy_loss(logp, m["logprobs"], m["advantages"], m["response_mask"], self.pc.clip_range)
                v = token_values(self.value_model, m["input_ids"], m["attention_mask"], m["position_ids"], P)
                vf, vf_stats = value_loss(v, m["values"], m["returns"], m["response_mask"], self.pc.clip_range_value)
                loss = pg + self.pc.vf_coef * vf
                if self.ptx is not None and self.pc.ptx_coef > 0:
                    lm = self.policy(**self.ptx.next(self.device), use_cache=False).loss
                    loss = loss + self.pc.ptx_coef * lm
                    stats["ptx_loss"].append(lm.item())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.dp.average_gradients(self.params)
                torch.nn.utils.clip_grad_norm_(self.params, self.pc.max_grad_norm)
                self.optimizer.step()
                stats["pg_loss"].append(pg.item())
                stats["vf_loss"].append(vf.item())
                for k, val in {**pg_stats, **vf_stats}.items():
                    stats[k].append(val)
        return {k: self.dp.mean(np.mean(v)) if v else float("nan") for k, v in stats.items()}

    # ---------------------------------------------------------------- one step

    def train_step(self) -> dict[str, float]:
        """Rollout + update for the next step; returns the logged row."""
        import torch

        step = self.step + 1
        # each process samples its share of the prompts with its own seed (rank 0's is the one-process seed)
        seed = self.pc.sampling.seed + self.cfg.seed * 7919 + step * 1_000_033 + self.dp.rank * 104_729
        t0 = time.perf_counter()
        ro = self.rollout(self.dp.shard(self.batch_prompts(step)), seed)
        rollout_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        up = self.update(ro, seed)
        update_s = time.perf_counter() - t1
        mask = ro.response_mask
        # figures over the whole batch: per-response values gathered, token means summed over the processes
        raw, scores = self.dp.gather(ro.raw_scores), self.dp.gather(ro.scores)
        kl_seq = self.dp.gather(ro.kl.sum(-1))
        lengths = self.dp.gather(ro.lengths.float())
        finished = self.dp.gather(torch.tensor(ro.finished, dtype=torch.float, device=self.device))
        n_tokens = float(self.dp.sum(mask.sum()))
        row = {
            "step": step,
            "score": float(raw.mean()),
            "score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "reward": float((scores - self.kl_ctl.value * kl_seq).mean()),
            "kl": float(kl_seq.mean()),
            "kl_coef": self.kl_ctl.value,
            "entropy": float(masked_mean(ro.entropy, mask, self._all_sum)),
            "value_mean": float(masked_mean(ro.values, mask, self._all_sum)),
            "response_length": float(lengths.mean()),
            "eos_frac": float(finished.mean()),
            "rollout_s": rollout_s,
            "update_s": update_s,
            "tokens_per_s": n_tokens / max(rollout_s, 1e-9),
            **{k: up[k] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "ptx_loss")},
        }
        self.kl_ctl.update(row["kl"], int(kl_seq.shape[0]))
        self.step = step
        self.history.append(row)
        del ro
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: Path) -> Path:
        """Policy and value adapters, optimizer, step and KL controller, atomically in ``folder``."""
        with atomic_dir(folder) as tmp:
            self.policy.save_pretrained(tmp / "policy", safe_serialization=True)
            self.value_model.save_pretrained(tmp / "value", safe_serialization=True)
            save_optimizer(self.optimizer, tmp)
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "kl_ctl": self.kl_ctl.state_dict()}))
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            for name, model in (("policy", self.policy), ("value", self.value_model)):
                weights = load_file(str(folder / name / "adapter_model.safetensors"), device=str(self.device))
                result = set_peft_model_state_dict(model, weights)
                unexpected = getattr(result, "unexpected_keys", [])
                if unexpected:
                    raise ValueError(f"unexpected keys {unexpected[:3]}")
            load_optimizer(self.optimizer, folder)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ValueError(
                f"{folder}: checkpoint does not match the current PPO setup ({exc}); "
                f"delete {folder.parent} to start PPO over"
            ) from exc
        state = json.loads((folder / "state.json").read_text())
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])


def last_ppo_checkpoint(folder: Path, max_step: int | None = None) -> Path | None:
    """The ``step-<n>`` checkpoint with the highest n (at most ``max_step`` when given) under ``folder``, or None."""
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / "state.json").exists() and (max_step is None or int(m.group(1)) <= max_step):
                found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


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
    with open(path, newline="") as fh:
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
    from cai_dpo.stages.rm import sft_adapter

    merge = [sft_adapter(run)] if sft_adapter(run) else []
    model, tok = load_model(cfg.policy, trainable=True, merge_first=merge)
    lora = dataclasses.replace(cfg.ppo.lora, dropout=0.0)
    return attach_lora(model, lora, task_type="CAUSAL_LM"), tok, merge


def same_vocab(tok_a: Any, tok_b: Any) -> bool:
    """True when two tokenizers map every token to the same id."""
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def load_value_model(cfg: RunConfig, run: RunStore, policy_tok: Any, merge: list[Path], rm_dir: Path | None) -> tuple[Any, str]:
    """The value model and a note saying where it was initialised from."""
    import torch

    from cai_dpo.models import attach_lora, load_model, load_tokenizer
    from cai_dpo.stages.rm import rm_spec

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
    rm_dir = run.root / "models" / "rm"
    if not rm_dir.exists():
        raise FileNotFoundError(f"{rm_dir}: no preference model; run `cai-dpo rm` first (or pass reward_fn=)")
    return rm_dir


def default_reward(run: RunStore, cfg: RunConfig) -> tuple[Any, Path]:
    """The RewardScorer of ``models/rm``; a missing one raises naming the fix."""
    from cai_dpo.stages.rm import RewardScorer

    rm_dir = reward_model_dir(run)
    return RewardScorer(rm_dir, batch_size=max(1, cfg.ppo.sampling.batch_size), device=cfg.policy.device), rm_dir


def _reward_adapter(reward_fn: RewardFn | None, scorer: Any) -> Callable[[list[Conversation], list[str]], Sequence[float]]:
    """Prompts go to an injected reward_fn as user-text strings, to the scorer as conversations."""
    from cai_dpo.stages.rm import prompt_text

    if reward_fn is not None:
        return lambda prompts, responses: reward_fn([prompt_text(p) for p in prompts], list(responses))
    return lambda prompts, responses: scorer.score(prompts, list(responses))


# --------------------------------------------------------------------------- stage

# PPO config keys that only change how long training runs: a longer run may resume a shorter one
_LENGTH_KEYS = ("steps", "save_steps")


def training_note(cfg: RunConfig, run: RunStore, prompts: list[Conversation], rm_dir: Path | None,
                  merge: list[Path], mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs note, length target) of a PPO or RLOO run, for checkpoint resumption and skipping.

    The note holds every input the weights depend on: the ``ppo`` settings (less
    ``steps``/``save_steps``), the policy spec, the seed, the prompts, the SFT adapter, the
    preference model (``"programmatic"`` for an injected ``reward_fn``) and, with a
    pretraining mix, ``data/sl``.
    """
    from cai_dpo.training import artifact_hash

    settings = {k: v for k, v in to_dict(cfg.ppo).items() if k not in _LENGTH_KEYS}
    note: dict[str, Any] = {
        "mode": mode, "ppo": settings, "policy": to_dict(cfg.policy), "seed": cfg.seed,
        "prompts": content_hash(prompts),
        "sft_adapter": [artifact_hash(m) for m in merge],
        "reward": artifact_hash(rm_dir) if rm_dir is not None else "programmatic",
    }
    sl_dir = run.root / "data" / "sl"
    if mode == "ppo" and cfg.ppo.ptx_coef > 0 and sl_dir.exists():
        note["ptx_data"] = artifact_hash(sl_dir)
    return note, {k: getattr(cfg.ppo, k) for k in _LENGTH_KEYS}


@locked_stage
def run_ppo(cfg: RunConfig, run: RunStore | None = None, reward_fn: RewardFn | None = None,
            prompts: list[Conversation] | None = None, *, resume: bool = True, progress: bool = True) -> Path:
    """RL-CAI: PPO (or RLOO with ``ppo.mode: rloo``) of the SL-CAI policy against the preference model.

    ``reward_fn(prompts, responses) -> list[float]`` (prompts as user-text strings) replaces
    the preference model; ``prompts`` (conversations) replace the run's prompts. Writes
    ``models/ppo`` (``models/rloo`` in RLOO mode) and returns it; resumes from its checkpoints
    unless ``resume=False``. Raises ``ConfigError`` for an RLOO setup that cannot run.
    """
    import torch

    from cai_dpo.distributed import is_main_process, maybe_kill_for_test, rank, world_size
    from cai_dpo.engine import set_threads

    from cai_dpo.stages.rm import sft_adapter
    from cai_dpo.training import artifact_current, clear_stale_checkpoints, training_inputs

    run = run or RunStore(cfg.run_dir)
    set_threads(cfg.threads)
    prompts = prompts or ppo_prompts(cfg, run)
    if cfg.ppo.mode == "rloo":
        return run_rloo(cfg, run, reward_fn, prompts, resume=resume)
    rm_dir = None if reward_fn is not None else reward_model_dir(run)
    merge = [sft_adapter(run)] if sft_adapter(run) else []
    note, target = training_note(cfg, run, prompts, rm_dir, merge, "ppo")
    out_dir = run.model_dir("ppo")
    if resume and artifact_current(out_dir, note, target):
        log.info("PPO adapter in %s is up to date (same prompts, preference model, SFT adapter and settings)", out_dir)
        return out_dir
    scorer = None if reward_fn is not None else default_reward(run, cfg)[0]
    reward = _reward_adapter(reward_fn, scorer)

    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    with Timer() as t_load:
        policy, tok, merge = load_policy(cfg, run)
        value_model, value_note = load_value_model(cfg, run, tok, merge, rm_dir if rm_dir else run.root / "models" / "rm")
    timings["load_s"] = t_load.seconds
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        from datasets import load_from_disk

        sl_dir = run.root / "data" / "sl"
        if not sl_dir.exists():
            raise FileNotFoundError(f"{sl_dir}: ppo.ptx_coef > 0 needs the SL-CAI dataset; run `cai-dpo sl` or set ppo.ptx_coef=0")
        # ptx_batch is global, like rollout_batch: each process draws its share with its own seed
        ptx = PtxBatches(load_from_disk(str(sl_dir)), tok, max(1, cfg.ppo.ptx_batch // world_size()),
                         cfg.sft.max_length, cfg.seed + rank())
    trainer = PPOTrainer(cfg, policy, tok, value_model, reward, prompts, ptx=ptx, progress=progress)

    ckpt_root = run.path("checkpoints", "ppo")
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
    bar = tqdm(total=cfg.ppo.steps, initial=trainer.step, desc="ppo", unit="step", disable=not progress, dynamic_ncols=True)
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
    timings.update({
        "rollout_s_per_step": float(np.mean([r["rollout_s"] for r in new_rows])) if new_rows else float("nan"),
        "update_s_per_step": float(np.mean([r["update_s"] for r in new_rows])) if new_rows else float("nan"),
    })
    metrics: dict[str, Any] = {}
    if hist:
        k = max(1, len(hist) // 4)
        metrics = {
            "score_first": hist[0]["score"], "score_last": hist[-1]["score"],
            "score_first_quarter": float(np.mean([r["score"] for r in hist[:k]])),
            "score_last_quarter": float(np.mean([r["score"] for r in hist[-k:]])),
            "kl_last": hist[-1]["kl"], "kl_max": float(max(r["kl"] for r in hist)),
            "kl_coef_last": hist[-1]["kl_coef"], "entropy_last": hist[-1]["entropy"],
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
        models={"base": cfg.policy.name, "merged_first": ", ".join(str(m) for m in merge) or "none",
                "reward": str(rm_dir) if rm_dir else "reward_fn (programmatic)"},
        counts={"steps": trainer.step, "resumed_from": resumed_from or 0, "rollouts": trainer.step * cfg.ppo.rollout_batch},
        timings=timings,
        metrics=metrics,
        notes=[
            value_note,
            "reference = policy with its LoRA adapter disabled; KL per token = log pi - log pi_ref (k1), summed per response",
            "loss = L_pg + vf_coef*L_vf + ptx_coef*L_LM (paper's L_LM + lambda*L_RL with lambda = 1/ptx_coef, rescaled)",
            "trained on the sampled token ids; the reward scores the decoded text of exactly those ids",
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


def validate_rloo(pc: Any, source: str = "config") -> None:
    """Raise :class:`~cai_dpo.config.ConfigError` naming the key and the fix when RLOO cannot run with ``pc``."""
    from cai_dpo.config import ConfigError

    if pc.rloo_k < 2:
        raise ConfigError(f"{source}: ppo.rloo_k is {pc.rloo_k}; RLOO's leave-one-out baseline needs at least 2 "
                          "completions per prompt: set ppo.rloo_k=2 or more")
    if pc.rollout_batch % pc.rloo_k:
        raise ConfigError(f"{source}: ppo.rollout_batch ({pc.rollout_batch}) must be a multiple of ppo.rloo_k "
                          f"({pc.rloo_k}) in RLOO mode; set ppo.rollout_batch={pc.rloo_k * max(1, pc.rollout_batch // pc.rloo_k)}")
    if pc.minibatch < 1 or pc.rollout_batch % pc.minibatch:
        raise ConfigError(f"{source}: ppo.rollout_batch ({pc.rollout_batch}) must be a multiple of ppo.minibatch "
                          f"({pc.minibatch}) in RLOO mode")


def _generation_eos(model: Any) -> set[int]:
    """EOS ids of a model's generation config (an int or a list), as a set."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def rloo_rewards_inputs(tokenizer: Any, completion_ids: Sequence[Sequence[int]], eos_ids: set[int],
                        missing_eos_penalty: float) -> tuple[list[str], list[float]]:
    """Texts the reward scores (the decoded ids, EOS excluded) and each completion's missing-EOS penalty."""
    texts, penalties = [], []
    for ids in completion_ids:
        ids = list(ids)
        finished = bool(ids) and ids[-1] in eos_ids
        texts.append(tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False))
        penalties.append(0.0 if finished else float(missing_eos_penalty))
    return texts, penalties


def run_rloo(cfg: RunConfig, run: RunStore, reward_fn: RewardFn | None, prompts: list[Conversation], *,
             resume: bool = True) -> Path:
    """RLOO (TRL's ``RLOOTrainer``) on the same policy, reference and reward, for comparison with PPO.

    Writes ``models/rloo`` (manifest stage ``rloo``), metrics in ``metrics/rloo``, checkpoints
    in ``checkpoints/rloo``. The reward is the preference score minus ``missing_eos_penalty``
    for completions without EOS, as in PPO. Mapping: one PPO step = one generation batch of ``rollout_batch`` completions
    (``rloo_k`` per prompt), ``ppo_epochs`` passes in minibatches of ``minibatch``;
    ``beta = kl_coef``, ``epsilon = clip_range``.
    """
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from cai_dpo.distributed import is_main_process, sharded_state_dict

    from cai_dpo.models import load_model, lora_config, write_adapter
    from cai_dpo.stages.rm import sft_adapter
    from cai_dpo.training import (
        artifact_current,
        common_training_args,
        resume_checkpoint,
        train_to_target,
        training_callbacks,
        training_inputs,
    )

    pc = cfg.ppo
    validate_rloo(pc, source=str(run.root / "config.yaml"))
    k = pc.rloo_k
    rm_dir = None if reward_fn is not None else reward_model_dir(run)
    merge = [sft_adapter(run)] if sft_adapter(run) else []
    note, target = training_note(cfg, run, prompts, rm_dir, merge, "rloo")
    out_dir = run.model_dir("rloo")
    if resume and artifact_current(out_dir, note, target):
        log.info("RLOO adapter in %s is up to date; nothing to train", out_dir)
        return out_dir
    scorer = None if reward_fn is not None else default_reward(run, cfg)[0]
    reward = _reward_adapter(reward_fn, scorer)
    steps_per_gen = pc.rollout_batch // pc.minibatch
    model, tok = load_model(cfg.policy, trainable=True, merge_first=merge)

    eos_ids = {tok.eos_token_id} | _generation_eos(model)

    def preference_reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                          **_: Any) -> list[float]:
        if completion_ids is None:
            raise RuntimeError("RLOOTrainer passed no completion_ids; this TRL version is not supported for ppo.mode=rloo")
        texts, penalties = rloo_rewards_inputs(tok, completion_ids, eos_ids, pc.missing_eos_penalty)
        return [float(s) - p for s, p in zip(reward(prompts, texts), penalties)]

    section = dataclasses.replace(pc, save_steps=pc.save_steps * steps_per_gen * pc.ppo_epochs)
    ckpt = run.path("checkpoints", "rloo")
    if not resume and ckpt.exists():
        shutil.rmtree(ckpt)
    resume_from = resume_checkpoint(ckpt, note)
    max_steps = pc.steps * steps_per_gen * pc.ppo_epochs
    args = RLOOConfig(
        **common_training_args(section, ckpt, seed=cfg.seed, save_steps=section.save_steps,
                               per_device_train_batch_size=pc.minibatch,
                               max_steps=max_steps, num_train_epochs=1.0),
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
    trainer = RLOOTrainer(model=model, reward_funcs=preference_reward, args=args, train_dataset=dataset,
                          processing_class=tok, peft_config=lora_config(dataclasses.replace(pc.lora, dropout=0.0)),
                          callbacks=training_callbacks(run.metrics_dir("rloo"), cfg.train.report_to))
    with Timer() as t:
        _, resumed_step = train_to_target(trainer, resume_from, max_steps)
    state = sharded_state_dict(trainer)  # every process takes part when the weights are sharded
    if not is_main_process():
        return out_dir  # rank 0 writes the artifact
    manifest = Manifest(
        stage="rloo",
        config={"ppo": to_dict(pc), "policy": to_dict(cfg.policy), "seed": cfg.seed},
        inputs={"prompts": str(len(prompts)), **({"rm": note["reward"]} if rm_dir else {}), **training_inputs(note, target)},
        models={"base": cfg.policy.name, "merged_first": ", ".join(str(m) for m in merge) or "none",
                "reward": str(rm_dir) if rm_dir else "reward_fn (programmatic)"},
        counts={"optimizer_steps": int(trainer.state.global_step), "resumed_from_step": resumed_step},
        timings={"train_s": t.seconds},
        notes=["mode rloo: TRL RLOOTrainer, k completions per prompt, leave-one-out baseline; metrics in metrics/rloo/log.csv",
               f"reward = preference score of the decoded completion ids - missing_eos_penalty ({pc.missing_eos_penalty}) "
               "for completions that hit max_new_tokens without EOS (as in PPO)"],
    )
    with atomic_dir(out_dir) as tmp:  # adapter and manifest in one atomic step
        write_adapter(trainer.model, tok, tmp, base=cfg.policy.name, merge_first=merge, final=out_dir, state_dict=state)
        manifest.write(tmp / "manifest.json")
    return out_dir
