"""The PPO update loop (:class:`CaiPPOTrainer`): rollouts, advantages, clipped updates, checkpoints.

Follows "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024); the arithmetic
is in :mod:`cai_dpo.rl.ppo_math`, the batch layout in :mod:`cai_dpo.rl.rollout`. Loading the
models and running the stage is :mod:`cai_dpo.stages.ppo`.

One step
    1. rollout: ``rollout_batch`` prompts, one sample each (with ``advantage: leave_one_out``,
       ``rollout_batch / rloo_k`` prompts, ``rloo_k`` samples each), through
       :class:`~cai_dpo.engine.Engine` on the policy. The engine returns the sampled token ids,
       which are trained on as they are (EOS appended when the sample ended with EOS); log-probs
       are recomputed on those ids, so the ratio at the first epoch is exactly 1.
    2. score: the preference model's score of (prompt, response), the response being the
       decoded sampled ids (not stripped, not truncated) — or an injected
       ``reward_fn(prompts, responses)`` — minus ``missing_eos_penalty`` for responses that
       hit ``max_new_tokens`` without EOS;
    3. per-token reward ``r_t = -β·(log π(a_t) - log π_ref(a_t))``, plus the score on the
       last response token; β is ``kl_coef``, or adapted toward ``target_kl`` (Ziegler et al.)
       when ``adaptive_kl``;
    4. GAE(γ, λ) advantages (whitened over the batch's response tokens), returns = A + V; with
       ``advantage: leave_one_out`` instead each response's return ``score - β·Σ KL`` minus the
       mean return of the other responses to its prompt, on every token (whitened likewise), and
       no value model (``value_model=None``, no value loss);
    5. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss, clipped value
       loss, optional pretraining-mix term, one AdamW step with gradient-norm clipping.

Objective (per minibatch)
    ``L = L_pg + vf_coef · L_vf + ptx_coef · L_LM``, where ``L_LM`` is the SFT language-model
    loss (mean token NLL of the assistant turns) on a batch of ``data/sl``. This is the
    paper's ``L_total = L_LM + λ·L_RL`` up to a constant factor: with ``ptx_coef > 0`` it
    equals ``ptx_coef · (L_LM + (1/ptx_coef)·L_RL)``, i.e. ``λ = 1/ptx_coef`` with the
    learning rate scaled by ``ptx_coef``. ``ptx_coef = 0`` is plain PPO.

Checkpoints (``step-<n>`` folders): policy and value adapters, the optimizer state as
safetensors + JSON (no pickle), the step and the KL controller.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.config import RunConfig
from cai_dpo.models import reference_mode
from cai_dpo.rl.ppo_math import (
    KLController,
    compute_gae,
    entropy_from_logits,
    kl_penalty_rewards,
    leave_one_out_advantages,
    masked_mean,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)
from cai_dpo.rl.reward import RewardFn
from cai_dpo.rl.rollout import (
    PtxBatches,
    Rollout,
    build_batch,
    response_logits,
    sampled_ids,
    sampled_texts,
    step_prompts,
    token_values,
)
from cai_dpo.schema import Conversation
from cai_dpo.store import atomic_dir

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- optimizer state (no pickle)


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
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
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}), encoding="utf-8")


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what :func:`save_optimizer` wrote."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
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


class CaiPPOTrainer:
    """The PPO loop on one policy (LoRA), its reference (adapter off) and a value model.

    Named ``CaiPPOTrainer`` (it was ``PPOTrainer`` in ``cai_dpo.stages.ppo``) so it does not
    shadow TRL's ``PPOTrainer``, which it neither wraps nor subclasses.

    On several processes (``accelerate launch``, see :class:`~cai_dpo.distributed.DataParallel`)
    each step's ``rollout_batch`` prompts and each ``minibatch`` are split evenly over the
    processes; every process samples, scores and updates on its share, gradients are averaged
    after each backward pass (as DDP does: the mean of the processes' minibatch losses), rewards
    and advantages are whitened with global statistics, and the logged figures (score, KL,
    entropy, losses, ...) are over the whole batch. Every process keeps a full replica of the
    models (no sharding, whatever the accelerate config).
    """

    def __init__(
        self,
        cfg: RunConfig,
        policy: Any,
        tokenizer: Any,
        value_model: Any | None,
        reward: RewardFn,
        prompts: list[Conversation],
        *,
        ptx: PtxBatches | None = None,
        progress: bool = True,
    ):
        import torch

        from cai_dpo.distributed import DataParallel, check_processes
        from cai_dpo.engine import Engine
        from cai_dpo.models import autocast_dtype

        self.cfg = cfg
        self.pc = cfg.ppo
        self.policy = policy
        self.tokenizer = tokenizer
        self.value_model = value_model
        self.reward = reward
        self.prompts = prompts
        self.ptx = ptx
        self.progress = progress
        self.autocast = autocast_dtype(cfg.policy)
        self.engine = Engine(
            policy, tokenizer, batch_size=self.pc.sampling.batch_size, progress=False, autocast=self.autocast
        )
        self.eos_id = tokenizer.eos_token_id
        if value_model is None and self.pc.advantage == "gae":
            raise ValueError("PPO: advantage 'gae' needs a value model")
        value_params = list(value_model.parameters()) if value_model is not None else []
        self.params = [p for p in list(policy.parameters()) + value_params if p.requires_grad]
        if not self.params:
            raise ValueError("PPO: no trainable parameters (is the LoRA adapter attached?)")
        self.dp = DataParallel()
        check_processes("ppo", cfg, self.dp.world_size)
        self.minibatch = max(1, self.pc.minibatch // self.dp.world_size)  # rows per process per minibatch
        self.dp.broadcast(self.params)  # every process starts from rank 0's adapters
        self.optimizer = torch.optim.AdamW(self.params, lr=self.pc.learning_rate, eps=1e-5)
        self.kl_ctl = KLController(
            self.pc.kl_coef, self.pc.target_kl if self.pc.adaptive_kl else None, self.pc.kl_horizon
        )
        self.step = 0
        self.history: list[dict[str, float]] = []

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _mixed_precision(self) -> Any:
        """``torch.autocast`` in the policy's autocast dtype (``policy.autocast``) for forward passes; a no-op
        context when it is None. Backward passes run outside it, as torch's mixed-precision recipe says."""
        import torch

        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    # ---------------------------------------------------------------- rollout

    def batch_prompts(self, step: int) -> list[Conversation]:
        """The prompts of step ``step`` (1-based); see :func:`~cai_dpo.rl.rollout.step_prompts`. With
        ``advantage: leave_one_out`` each prompt comes ``rloo_k`` times in a row (one group)."""
        if self.pc.advantage != "leave_one_out":
            return step_prompts(self.prompts, step, self.pc.rollout_batch, self.cfg.seed)
        k = self.pc.rloo_k
        groups = step_prompts(self.prompts, step, self.pc.rollout_batch // k, self.cfg.seed)
        return [p for p in groups for _ in range(k)]

    def response_ids(self, gens: list[Any]) -> list[list[int]]:
        """The sampled token ids of each generation; see :func:`~cai_dpo.rl.rollout.sampled_ids`."""
        return sampled_ids(gens, self.eos_id)

    def response_texts(self, gens: list[Any]) -> list[str]:
        """The text the reward sees; see :func:`~cai_dpo.rl.rollout.sampled_texts`."""
        return sampled_texts(gens, self.tokenizer)

    def rollout(self, prompts: list[Conversation], seed: int) -> Rollout:
        """Sample one response per prompt; score it; compute log-probs, reference log-probs and values."""
        import torch

        sampling = dataclasses.replace(self.pc.sampling, seed=seed)
        self.policy.eval()
        gens = [g[0] for g in self.engine.generate(prompts, sampling, desc="ppo rollout")]
        query_ids = [self.engine.encode(self.engine.render(p)) for p in prompts]
        response_ids = self.response_ids(gens)
        b = build_batch(query_ids, response_ids, self.tokenizer.pad_token_id, self.device)
        ro = Rollout(
            prompts=prompts,
            responses=self.response_texts(gens),
            finished=[g.finished for g in gens],
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            position_ids=b["position_ids"],
            response_mask=b["response_mask"],
            lengths=b["lengths"],
            query_width=b["query_width"],
        )
        raw = torch.tensor(
            [float(s) for s in self.reward(prompts, ro.responses)], dtype=torch.float, device=self.device
        )
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
        with torch.no_grad(), self._mixed_precision():
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
                vals.append(self._values(*args, P))
        ro.logprobs = torch.cat(logps) * mask
        ro.ref_logprobs = torch.cat(refs) * mask
        ro.entropy = torch.cat(ents)
        ro.values = torch.cat(vals) * mask
        scores = ro.scores
        if self.pc.whiten_rewards and self.pc.rollout_batch > 1:
            scores = whiten(scores, shift_mean=False, all_sum=self._all_sum)
        ro.rewards, ro.kl = kl_penalty_rewards(
            ro.logprobs, ro.ref_logprobs, mask, scores, ro.lengths, self.kl_ctl.value
        )
        if self.pc.advantage == "leave_one_out":
            returns = scores - self.kl_ctl.value * ro.kl.sum(-1)  # the sum of the per-token rewards
            adv = leave_one_out_advantages(returns, self.pc.rloo_k)[:, None] * mask
            ro.returns = torch.zeros_like(adv)
        else:
            adv, ro.returns = compute_gae(ro.rewards, ro.values, mask, self.pc.gamma, self.pc.lam)
        ro.advantages = whiten(adv, mask, all_sum=self._all_sum)

    def _values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, P: int) -> Any:
        """Per-token values ``[B, R]`` of the value model; zeros when there is none (leave_one_out)."""
        import torch

        if self.value_model is None:
            return torch.zeros(input_ids.shape[0], input_ids.shape[1] - P, device=input_ids.device)
        return token_values(self.value_model, input_ids, attention_mask, position_ids, P)

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
        stats: dict[str, list[float]] = {
            k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "ratio", "ptx_loss")
        }
        self.policy.eval()  # dropout stays off: ratios must compare like with like
        if self.value_model is not None:
            self.value_model.eval()
        for _ in range(self.pc.ppo_epochs):
            perm = rng.permutation(B)
            for s in range(0, B, self.minibatch):
                idx = torch.as_tensor(perm[s : s + self.minibatch], device=self.device)
                m = ro.select(idx)
                with self._mixed_precision():
                    args = (m["input_ids"], m["attention_mask"], m["position_ids"])
                    logits = response_logits(self.policy, *args, P, T)
                    logp = token_logprobs(logits, m["input_ids"], P)
                    del logits
                    pg, pg_stats = policy_loss(
                        logp, m["logprobs"], m["advantages"], m["response_mask"], self.pc.clip_range
                    )
                    loss = pg
                    if self.value_model is not None:
                        v = token_values(self.value_model, *args, P)
                        vf, vf_stats = value_loss(
                            v, m["values"], m["returns"], m["response_mask"], self.pc.clip_range_value
                        )
                        loss = loss + self.pc.vf_coef * vf
                        stats["vf_loss"].append(vf.item())
                        stats["vf_clipfrac"].append(vf_stats["vf_clipfrac"])
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
                for k, val in pg_stats.items():
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
            "value_mean": (
                float(masked_mean(ro.values, mask, self._all_sum)) if self.value_model is not None else float("nan")
            ),
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
        """Policy and value adapters (no value adapter with leave_one_out), optimizer, step and KL controller,
        atomically in ``folder``."""
        with atomic_dir(folder) as tmp:
            self.policy.save_pretrained(tmp / "policy", safe_serialization=True)
            if self.value_model is not None:
                self.value_model.save_pretrained(tmp / "value", safe_serialization=True)
            save_optimizer(self.optimizer, tmp)
            (tmp / "state.json").write_text(
                json.dumps({"step": self.step, "kl_ctl": self.kl_ctl.state_dict()}), encoding="utf-8"
            )
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            for name, model in (("policy", self.policy), ("value", self.value_model)):
                if model is None:
                    continue
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
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
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
