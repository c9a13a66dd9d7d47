"""PPO's batches: one rollout's tensors, their padded layout, the model forwards over them, the pretraining mix.

A :class:`Rollout` holds one batch of sampled responses and everything the update needs.
Queries are left-padded to width ``P`` and responses right-padded to width ``R``
(:func:`build_batch`); the policy's logits for the response tokens and the value model's
per-state values come from :func:`response_logits` and :func:`token_values`. The trainer
(:class:`~cai_dpo.rl.ppo_trainer.CaiPPOTrainer`) samples the responses through
:class:`~cai_dpo.engine.Engine` and trains on exactly the sampled token ids (EOS appended when
the sample ended with EOS), so log-probs recomputed here give a ratio of exactly 1 at the first
epoch. :class:`PtxBatches` draws the SFT examples of the optional pretraining-mix term
``ptx_coef · L_LM`` (InstructGPT's PPO-ptx, Ouyang et al. 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.errors import InputError
from cai_dpo.schema import Conversation

if TYPE_CHECKING:
    import torch


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update needs.

    Layout: queries left-padded to width ``P``, responses right-padded to width ``R``;
    ``input_ids [B, P+R]``; response-aligned tensors are ``[B, R]``.
    """

    prompts: list[Conversation]
    responses: list[str]
    finished: list[bool]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    query_width: int
    scores: torch.Tensor | None = None
    raw_scores: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors of a minibatch (rows ``idx``)."""
        names = (
            "input_ids",
            "attention_mask",
            "position_ids",
            "response_mask",
            "logprobs",
            "values",
            "advantages",
            "returns",
        )
        return {n: getattr(self, n)[idx] for n in names}


def build_batch(
    query_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
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


def response_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    P: int,
    temperature: float,
) -> torch.Tensor:
    """Logits ``[B, R, V]`` predicting each response token (divided by the sampling temperature).

    Only positions ``P - 1`` onwards go through the LM head (``logits_to_keep``): the prompt's would be dropped.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=input_ids.shape[1] - P + 1,
    )
    logits = out.logits[:, :-1].float()
    return logits / max(temperature, 1e-6)


def token_values(
    value_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, P: int
) -> torch.Tensor:
    """Value of each state before a response token (``[B, R]``) from a scalar-head model."""
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    head = base.score
    return head(hidden[:, P - 1 : -1]).squeeze(-1).float()


# --------------------------------------------------------------------------- sampling


def step_prompts(prompts: Sequence[Conversation], step: int, batch_size: int, seed: int) -> list[Conversation]:
    """The ``batch_size`` prompts of step ``step`` (1-based): a seeded shuffle per pass over the prompt list."""
    n, k = len(prompts), batch_size
    out = []
    for j in range((step - 1) * k, step * k):
        epoch, pos = divmod(j, n)
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(n)
        out.append(prompts[int(order[pos])])
    return out


def sampled_ids(gens: Sequence[Any], eos_id: int) -> list[list[int]]:
    """The sampled token ids of each generation, EOS appended when the sample ended with it.

    These are exactly the ids the policy emitted (no decode/re-encode round trip), so the
    log-probs, KL and gradients are those of the sampled actions. A sample with no token
    at all (possible only with ``max_new_tokens`` 0) gets EOS so it has one action.
    """
    out = []
    for g in gens:
        ids = list(g.token_ids)
        if g.finished or not ids:
            ids.append(eos_id)
        out.append(ids)
    return out


def sampled_texts(gens: Sequence[Any], tokenizer: Any) -> list[str]:
    """The text the reward sees: the decoded sampled ids (EOS excluded), not stripped or re-tokenized."""
    return [tokenizer.decode(g.token_ids, skip_special_tokens=False) for g in gens]


# --------------------------------------------------------------------------- pretraining mix


class PtxBatches:
    """Endless seeded batches of SFT examples (``messages``) for the language-model term."""

    def __init__(self, dataset: Any, tokenizer: Any, batch_size: int, max_length: int, seed: int):
        self.rows = [r["messages"] for r in dataset]
        if not self.rows:
            raise InputError("ppo.ptx_data is empty; the ptx term needs SFT examples (set ppo.ptx_coef=0 to skip it)")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.rng = np.random.default_rng(seed)

    def encode(self, messages: Conversation) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and labels masking everything but the final assistant turn."""
        tok = self.tokenizer
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        head = tok(
            tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        n = min(len(head), len(full))
        labels = [-100] * n + full[n:]
        return full[-self.max_length :], labels[-self.max_length :]

    def next(self, device: torch.device | str) -> dict[str, torch.Tensor]:
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
