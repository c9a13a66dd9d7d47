"""Batched generation and log-prob scoring behind one small interface.

Every stage talks to models through :class:`Engine`:

- :meth:`Engine.generate` — sampled or greedy completions for chat conversations,
  length-sorted into batches, left-padded, stopped at EOS, seeded per batch;
- :meth:`Engine.score_options` — normalised probabilities of option continuations
  (``" (A)"`` vs ``" (B)"``): one forward pass per context, the options' differing
  tokens branched from its key/value cache;
- :meth:`Engine.logprob` — summed and per-token log-probs of completions.

Shared prefixes are computed once: an explicit ``prefix`` (few-shot examples, a system
prompt) and, per batch, whatever leading tokens all of its rows have in common (the chat
template's system prompt, a judge's instructions); how their key/value caches are
reused, cloned and grown is :mod:`cai_dpo.kv_cache`. Decoding is the engine's own loop:
rows that reach EOS leave the batch, and nucleus sampling avoids a full-vocabulary sort
(:mod:`cai_dpo.sampling`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cai_dpo.config import SamplingSection
from cai_dpo.errors import ContextLengthError
from cai_dpo.kv_cache import SharedPrefixes, cache_argument, grow_in_place, returned_cache
from cai_dpo.sampling import next_tokens
from cai_dpo.schema import Conversation

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Prompts = Sequence[Conversation | str]  # what generate takes: conversations, or already-rendered text


@dataclass
class Generation:
    """One completion: its text, token count and whether it ended with EOS.

    ``text`` is the decoded completion with special tokens dropped and whitespace stripped
    (for reading and judging); ``token_ids`` are the sampled ids exactly as the model emitted
    them (EOS excluded, ``len == n_tokens``), for training on what was sampled.
    """

    text: str
    n_tokens: int
    finished: bool
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


@dataclass
class LogProb:
    """Log-probability of a completion given its context."""

    total: float
    per_token: list[float] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.per_token)


@dataclass
class EngineStats:
    """Running totals, for throughput reports and cost estimates."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    generate_seconds: float = 0.0
    scored_items: int = 0
    score_seconds: float = 0.0

    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


@dataclass
class _Prefill:
    """A batch after its prompt pass: kept logits, the cache, attention mask and last positions."""

    logits: torch.Tensor
    cache: Any
    mask: torch.Tensor
    last_position: torch.Tensor


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from cai_dpo.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


class EngineBase:
    """What every engine shares: ``render`` and ``encode`` through ``self.tokenizer`` (a transformers
    tokenizer), and the public ``generate``, ``score_options`` and ``logprob`` with their defaults and
    argument checks, which hand over to the engine's own ``_generate``, ``_score_options`` and ``_logprob``."""

    tokenizer: Any
    progress: bool

    def _progress_bar(self, total: int, desc: str, unit: str, show: bool = True) -> Any:
        """A progress bar over ``total`` items counted in ``unit``; disabled unless ``self.progress`` and ``show``."""
        return _progress(total, desc, unit, self.progress and show)

    def render(self, conversation: Conversation | str, add_generation_prompt: bool = True) -> str:
        """Chat-template text of a conversation (a plain string is passed through)."""
        if isinstance(conversation, str):
            return conversation
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        conversations: Sequence[Conversation | str],
        sampling: SamplingSection | None = None,
        n: int = 1,
        *,
        prefix: str | None = None,
        desc: str = "generate",
    ) -> list[list[Generation]]:
        """``n`` completions per conversation, in input order.

        ``prefix`` (rendered text) goes before every rendered conversation; ``sampling``
        defaults to :class:`~cai_dpo.config.SamplingSection`'s defaults; ``desc`` names the
        progress bar and log line. How the engine batches, seeds and checks lengths: its ``_generate``.
        """
        return self._generate(conversations, sampling or SamplingSection(), n, prefix, desc)

    def score_options(
        self,
        contexts: Sequence[str],
        options: Sequence[str] = (" (A)", " (B)"),
        *,
        prefix: str | None = None,
        desc: str = "score",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised probabilities ``[N, K]`` of each option after each context, and raw log-probs ``[N, K]``.

        Raises ``ValueError`` with fewer than two options. How the engine scores: its ``_score_options``.
        """
        check_options(options)
        return self._score_options(contexts, options, prefix, desc)

    def logprob(
        self, contexts: Sequence[str], completions: Sequence[str], *, prefix: str | None = None, desc: str = "logprob"
    ) -> list[LogProb]:
        """Summed and per-token log-probs of each completion after its (rendered) context.

        Raises ``ValueError`` when the lengths differ. How the engine scores: its ``_logprob``.
        """
        if len(contexts) != len(completions):
            raise ValueError(f"{len(contexts)} contexts but {len(completions)} completions")
        return self._logprob(contexts, completions, prefix, desc)

    def _generate(
        self, conversations: Prompts, sampling: SamplingSection, n: int, prefix: str | None, desc: str
    ) -> list[list[Generation]]:
        raise NotImplementedError

    def _score_options(
        self, contexts: Sequence[str], options: Sequence[str], prefix: str | None, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _logprob(
        self, contexts: Sequence[str], completions: Sequence[str], prefix: str | None, desc: str
    ) -> list[LogProb]:
        raise NotImplementedError


class Engine(EngineBase):
    """Generation and scoring for one model + tokenizer pair.

    ``autocast``: a dtype (``torch.bfloat16``) every forward pass runs in under ``torch.autocast``, or None
    for the weights' own (see :func:`cai_dpo.models.autocast_dtype`); logits come back as float32 either way.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        progress: bool = True,
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
        autocast: torch.dtype | None = None,
    ):
        self.model = model
        self.autocast = autocast
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        # scoring batches are also capped in tokens: on CPU, passes much larger than this run slower per token
        self.max_batch_tokens = max_batch_tokens or (1024 if self.device.type == "cpu" else 32768)
        self.stats = EngineStats()
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 2048
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ rendering

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_length(self, n: int, extra: int, what: str, index: int | None = None) -> None:
        """Raise :class:`ContextLengthError` (with the input's ``index``) when it does not fit the context."""
        check_context(n, extra, self.max_length, what, index)

    # ------------------------------------------------------------------ forward passes

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """Name of the forward pass's key/value-cache argument (:func:`cai_dpo.kv_cache.cache_argument`)."""
        return cache_argument(self.model)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, keep: int
    ) -> tuple[torch.Tensor, Any]:
        """Logits (float32) of the last ``keep`` positions and the (extended) key/value cache; under
        ``torch.autocast`` in :attr:`autocast` when that is set."""
        import torch

        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            "logits_to_keep": keep,
        }
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(**kwargs)
        return out.logits.float(), returned_cache(out)

    @property
    def _branching_masks(self) -> bool:
        """Whether the attention takes custom 4D masks (sdpa and eager do; flash-attention kernels do not)."""
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        return impl in ("sdpa", "eager")

    def _prefill(
        self,
        rows: list[list[int]],
        limits: list[int],
        keep: int,
        shared: SharedPrefixes,
        branches: list[list[list[int]]] | None = None,
    ) -> _Prefill:
        """One forward pass over left-padded ``rows``, reusing the cache of their common prefix.

        ``limits[i]`` is how many leading tokens of row ``i`` may come from a cache (the
        positions whose logits are needed must be computed here). ``branches[i]`` are
        continuations of row ``i`` placed after it side by side: each attends to the row and
        to its own earlier tokens only, so K option tails cost K short branches, not K rows.
        Returns the logits of each row's last ``keep`` positions followed by every branch position.
        """
        import torch

        dev = self.device
        c = min(_common_prefix_len(rows), *limits)
        c, cache = shared.prefix(rows[0][:c], len(rows))
        rest = [r[c:] for r in rows]
        width = max(len(r) for r in rest)
        pad = self.tokenizer.pad_token_id
        body = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=dev)
        head = torch.ones(len(rows), c, dtype=body.dtype, device=dev)
        mask = torch.cat([head, body], dim=1)
        positions = (body.cumsum(-1) - 1).clamp(min=0) + c
        ids = [[pad] * (width - len(r)) + r for r in rest]
        n_branch = 0
        attention: torch.Tensor = mask
        if branches:
            n_branch = max(sum(len(t) for t in per) for per in branches)
            attention, branch_positions = self._branch_layout(ids, head, body, branches, n_branch)
            positions = torch.cat([positions, positions[:, -1:] + branch_positions], dim=1)
        logits, cache = self._forward(torch.tensor(ids, device=dev), attention, positions, cache, keep + n_branch)
        return _Prefill(logits[:, -(keep + n_branch) :], cache, mask, positions[:, width - 1])

    def _branch_layout(
        self,
        ids: list[list[int]],
        head: torch.Tensor,
        body: torch.Tensor,
        branches: list[list[list[int]]],
        n_branch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's branches to ``ids`` (in place); return the 4D additive mask and branch position offsets."""
        import torch

        dev, pad = self.device, self.tokenizer.pad_token_id
        group, order, offset = [], [], []  # per branch column: which branch (-1 padding), index inside it
        for row, per in zip(ids, branches):
            g, o = [], []
            for k, tail in enumerate(per):
                g += [k + 1] * len(tail)
                o += list(range(len(tail)))
            row += [t for tail in per for t in tail] + [pad] * (n_branch - len(g))
            group.append(g + [-1] * (n_branch - len(g)))
            order.append(o + [0] * (n_branch - len(o)))
            offset.append([x + 1 for x in o] + [0] * (n_branch - len(o)))
        width = body.shape[1]
        cols = torch.arange(width, device=dev).expand_as(body)
        q_group = torch.cat([torch.where(body.bool(), 0, -1), torch.tensor(group, device=dev)], dim=1)
        q_order = torch.cat([cols, torch.tensor(order, device=dev)], dim=1)
        k_group = torch.cat([torch.where(head.bool(), 0, -1), q_group], dim=1)  # cached columns: context or padding
        k_order = torch.cat([torch.full(head.shape, -1, device=dev), q_order], dim=1)
        same = (q_group[:, :, None] == k_group[:, None, :]) & (k_order[:, None, :] <= q_order[:, :, None])
        context_for_branch = (k_group[:, None, :] == 0) & (q_group[:, :, None] > 0)
        allowed = (k_group[:, None, :] >= 0) & (same | context_for_branch)
        allowed[:, torch.arange(allowed.shape[1]), head.shape[1] + torch.arange(allowed.shape[1])] = (
            True  # padding sees itself
        )
        dtype = self.model.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        additive = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return additive[:, None], torch.tensor(offset, device=dev)

    # ------------------------------------------------------------------ generation

    def _generate(
        self, conversations: Prompts, sampling: SamplingSection, n: int, prefix: str | None, desc: str
    ) -> list[list[Generation]]:
        """``n`` completions per conversation, in input order.

        ``prefix`` (rendered text) is prepended to every rendered conversation and its
        cache computed once. Results are reproducible for the same inputs, seed and batch size.
        """
        prefix_ids = self.encode(prefix) if prefix else []
        items = []
        for ci, conv in enumerate(conversations):
            ids = self.encode(self.render(conv))
            self._check_length(len(prefix_ids) + len(ids), sampling.max_new_tokens, f"conversation {ci}", index=ci)
            for si in range(n):
                items.append((ci, si, prefix_ids + ids))
        order = sorted(range(len(items)), key=lambda i: (-len(items[i][2]), i))
        results: list[list[Generation | None]] = [[None] * n for _ in conversations]
        shared = SharedPrefixes(self)
        eos_ids = set(self._eos_ids())
        bar = self._progress_bar(len(items), desc, "seq")
        bs = max(1, sampling.batch_size or self.batch_size)
        for b, start in enumerate(range(0, len(order), bs)):
            batch = [items[i] for i in order[start : start + bs]]
            t0 = time.perf_counter()
            new = self._decode(
                [it[2] for it in batch], sampling, eos_ids, seed=sampling.seed * 1_000_003 + b, shared=shared
            )
            n_new = 0
            for (ci, si, ids), (toks, finished) in zip(batch, new):
                text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
                results[ci][si] = Generation(text, len(toks), finished, len(ids), list(toks))
                n_new += len(toks)
            self.stats.generated_tokens += n_new
            self.stats.prompt_tokens += sum(len(it[2]) for it in batch)
            self.stats.generate_seconds += time.perf_counter() - t0
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.stats.tokens_per_second():.1f}")
        bar.close()
        log.info(
            "%s: %d sequences, %d tokens, %.1f tok/s",
            desc,
            len(items),
            self.stats.generated_tokens,
            self.stats.tokens_per_second(),
        )
        return results  # type: ignore[return-value]

    def _decode(
        self, rows: list[list[int]], sampling: SamplingSection, eos_ids: set[int], *, seed: int, shared: SharedPrefixes
    ) -> list[tuple[list[int], bool]]:
        """New tokens (EOS excluded) and whether EOS was reached, per row; finished rows leave the batch."""
        import torch

        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        alive = list(range(len(rows)))
        with torch.inference_mode():
            state = self._prefill(rows, [len(r) - 1 for r in rows], 1, shared)
            logits, cache, mask, position = state.logits[:, -1], state.cache, state.mask, state.last_position
            grow_in_place(cache, spare=sampling.max_new_tokens)
            for step in range(sampling.max_new_tokens):
                chosen = next_tokens(logits, sampling, generator)
                keep = []
                for j, (r, t) in enumerate(zip(alive, chosen.tolist())):
                    if t in eos_ids:
                        finished[r] = True
                    else:
                        tokens[r].append(t)
                        keep.append(j)
                if not keep or step == sampling.max_new_tokens - 1:
                    break
                if len(keep) < len(alive):
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask, position, chosen = mask[idx], position[idx], chosen[idx]
                    alive = [alive[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
                position = position + 1
                logits, cache = self._forward(chosen[:, None], mask, position[:, None], cache, 1)
                logits = logits[:, -1]
        return list(zip(tokens, finished))

    def _scoring_batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """``order`` (longest first) cut into batches of at most ``batch_size`` rows and
        ``max_batch_tokens`` padded tokens."""
        batches: list[list[int]] = []
        for i in order:
            if (
                batches
                and len(batches[-1]) < self.batch_size
                and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= self.max_batch_tokens
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------ scoring

    def _split(self, context: str, completion: str) -> tuple[list[int], int]:
        """Token ids of context+completion and where the completion's tokens start."""
        return split_completion(self.encode, context, completion)

    def _logprob(
        self, contexts: Sequence[str], completions: Sequence[str], prefix: str | None, desc: str
    ) -> list[LogProb]:
        """Summed and per-token log-probs of each completion after its (rendered) context."""
        import torch

        prefix_ids = self.encode(prefix) if prefix else []
        seqs, starts = [], []
        for c, x in zip(contexts, completions):
            ids, s = self._split(c, x)
            self._check_length(len(prefix_ids) + len(ids), 0, "logprob input")
            if not prefix_ids and s == 0:
                raise ValueError("a completion needs a non-empty context to be scored")
            seqs.append(prefix_ids + ids)
            starts.append(len(prefix_ids) + s)
        t0 = time.perf_counter()
        shared = SharedPrefixes(self)
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        per_token: list[list[float]] = [[] for _ in seqs]
        bar = self._progress_bar(len(seqs), desc, "seq")
        with torch.inference_mode():
            for idx in self._scoring_batches(order, [len(x) - len(prefix_ids) for x in seqs]):
                keep = max(len(seqs[i]) - starts[i] for i in idx) + 1
                state = self._prefill([seqs[i] for i in idx], [starts[i] - 1 for i in idx], keep, shared)
                logp = torch.log_softmax(state.logits.float(), dim=-1)
                for row, i in enumerate(idx):
                    seq = seqs[i]
                    # token p is predicted by the logits one position before it; kept index = keep - len + p - 1
                    per_token[i] = [
                        float(logp[row, keep - len(seq) + p - 1, seq[p]]) for p in range(starts[i], len(seq))
                    ]
                bar.update(len(idx))
        bar.close()
        self.stats.scored_items += len(seqs)
        self.stats.score_seconds += time.perf_counter() - t0
        return [LogProb(float(sum(v)), v) for v in per_token]

    def _score_options(
        self, contexts: Sequence[str], options: Sequence[str], prefix: str | None, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised probabilities ``[N, K]`` of each option after each context, and raw log-probs.

        Each context (with the tokens its options share, e.g. ``" ("``) takes one forward
        pass; the options' remaining tokens (``"A)"`` vs ``"B)"``) are scored from its
        key/value cache, all options of a batch in one more short pass.
        """
        import torch

        prefix_ids = self.encode(prefix) if prefix else []
        t0 = time.perf_counter()
        items = []
        for ctx in contexts:
            splits = [self._split(ctx, opt) for opt in options]
            seqs = [prefix_ids + ids for ids, _ in splits]
            common = _common_prefix_len(seqs)
            starts = [len(prefix_ids) + s for _, s in splits]
            if min(starts) == 0:
                raise ValueError("score_options needs a non-empty context")
            self._check_length(max(len(s) for s in seqs), 0, "score_options input")
            items.append((seqs, starts, common))
        raw = np.zeros((len(contexts), len(options)))
        shared = SharedPrefixes(self)
        order = sorted(range(len(items)), key=lambda i: (-items[i][2], i))
        bar = self._progress_bar(len(items), desc, "ctx")
        with torch.inference_mode():
            for idx in self._scoring_batches(
                order, [max(len(x) for x in seqs) - len(prefix_ids) for seqs, _, _ in items]
            ):
                for i, row in zip(idx, self._score_batch([items[i] for i in idx], shared)):
                    raw[i] = row
                bar.update(len(idx))
        bar.close()
        probs = option_probs(raw)
        self.stats.scored_items += len(contexts)
        self.stats.score_seconds += time.perf_counter() - t0
        return probs, raw

    def _score_batch(
        self, items: list[tuple[list[list[int]], list[int], int]], shared: SharedPrefixes
    ) -> list[list[float]]:
        """Summed option log-probs for a batch of ``(option sequences, option starts, common length)``.

        The options' tokens after the branch point go into the same forward pass as
        branches (:meth:`_prefill`); where the attention kernel takes no custom masks they
        are scored from the context's cache instead, one option at a time.
        """
        import torch

        keep = max(common - min(starts) + 1 for _, starts, common in items)
        tails = [[seq[common:-1] for seq in seqs] for seqs, _, common in items]
        branched = self._branching_masks and any(t for per in tails for t in per)
        state = self._prefill(
            [seqs[0][:common] for seqs, _, common in items],
            [min(starts) - 1 for _, starts, _ in items],
            keep,
            shared,
            branches=tails if branched else None,
        )
        logp = torch.log_softmax(state.logits.float(), dim=-1)
        out = []
        for row, (seqs, starts, common) in enumerate(items):
            scores, offset = [], keep
            for seq, s in zip(seqs, starts):
                # tokens before the branch point, then the first token after it (last context position)
                total = sum(float(logp[row, keep - common + p - 1, seq[p]]) for p in range(s, min(common, len(seq))))
                if len(seq) > common:
                    total += float(logp[row, keep - 1, seq[common]])
                if branched:  # the option's own branch predicts the rest of its tokens
                    n = max(0, len(seq) - common - 1)
                    total += sum(float(logp[row, offset + t, seq[common + 1 + t]]) for t in range(n))
                    offset += n
                scores.append(total)
            out.append(scores)
        if not branched:
            self._score_tails_from_cache(items, tails, state, out)
        return out

    def _score_tails_from_cache(
        self,
        items: list[tuple[list[list[int]], list[int], int]],
        tails: list[list[list[int]]],
        state: _Prefill,
        out: list[list[float]],
    ) -> None:
        """Add each option's remaining log-probs, one pass per option over the contexts' cache (cropped back after)."""
        import torch

        dev, pad, cache = self.device, self.tokenizer.pad_token_id, state.cache
        for o in range(len(items[0][0])):
            width = max(len(per[o]) for per in tails)
            if width == 0:
                continue
            ids = torch.tensor([per[o] + [pad] * (width - len(per[o])) for per in tails], device=dev)
            mask = torch.cat([state.mask, state.mask.new_ones(len(items), width)], dim=1)
            positions = state.last_position[:, None] + 1 + torch.arange(width, device=dev)
            logits, cache = self._forward(ids, mask, positions, cache, width)
            tail_logp = torch.log_softmax(logits[:, -width:].float(), dim=-1)
            for row, (seqs, _, common) in enumerate(items):
                seq = seqs[o]
                out[row][o] += sum(float(tail_logp[row, t, seq[common + 1 + t]]) for t in range(len(seq) - common - 1))
            cache.crop(-width)


def check_context(n: int, extra: int, max_length: int | None, what: str, index: int | None = None) -> None:
    """Raise :class:`ContextLengthError` (with the input's ``index``) when ``n`` prompt tokens plus
    ``extra`` new ones exceed ``max_length`` (None: no known limit)."""
    if max_length is not None and n + extra > max_length:
        raise ContextLengthError(
            f"{what}: {n} prompt tokens + {extra} new tokens exceed the model's context of {max_length}; "
            "shorten the prompt or lower max_new_tokens",
            index=index,
        )


def split_completion(encode: Callable[[str], list[int]], context: str, completion: str) -> tuple[list[int], int]:
    """Token ids of ``context + completion`` (by ``encode``) and the index where the completion's tokens start.

    The context is tokenized alone and with the completion; the completion starts after their
    common prefix, so a token that straddles the context's end counts as the completion's.
    Raises ``ValueError`` when the completion adds no tokens.
    """
    ctx = encode(context)
    full = encode(context + completion)
    start = _common_prefix_len([ctx, full]) if ctx else 0
    if start == len(full):
        raise ValueError(f"completion {completion!r} adds no tokens to its context")
    return full, start


def check_options(options: Sequence[str]) -> None:
    """Raise ``ValueError`` unless there are at least two options to choose between."""
    if len(options) < 2:
        raise ValueError("score_options needs at least two options")


def option_probs(raw: np.ndarray) -> np.ndarray:
    """Normalised option probabilities ``[N, K]`` from summed option log-probs ``raw`` ``[N, K]`` (softmax per row)."""
    raw = np.asarray(raw, dtype=np.float64)
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


def naive_option_probs(model: Any, tokenizer: Any, context: str, options: Sequence[str]) -> np.ndarray:
    """Reference computation: full log-prob of each option, one unbatched pass each."""
    import torch

    raw = []
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    for opt in options:
        full = tokenizer(context + opt, add_special_tokens=False)["input_ids"]
        s = _common_prefix_len([ctx, full])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([full], device=model.device)).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        raw.append(sum(float(lp[p - 1, full[p]]) for p in range(s, len(full))))
    t = torch.tensor(raw)
    return torch.softmax(t, -1).numpy()


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (default: all cores); return the count in use."""
    import os

    import torch

    n = n or int(os.environ.get("CAI_DPO_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
