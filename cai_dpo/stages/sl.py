"""SL-CAI data: initial answer → N rounds of critique → revision, one sampled principle per round.

For every red-team train prompt the helpful-only base model (the policy) answers; then,
each round, a principle is drawn from the constitution (seeded by ``(seed, prompt id,
round)``) and the **teacher** is asked, as chat turns after the few-shot demonstrations,

- ``critique`` mode: to critique its last answer under the principle, then to revise it
  in the light of that critique;
- ``direct`` mode: to revise its last answer under the principle straight away.

The teacher is ``sl.teacher`` (any model spec: a larger local model, a served one for
distillation), by default the policy itself. Its id is kept in every record and in the
manifest (``models.teacher``); a teacher other than the policy is part of the record keys.

Each round starts from ``[user: prompt, assistant: current answer]``, so the context
stays short however many rounds run. All prompts of a phase go through one batched
:meth:`Engine.generate` call; the few-shot demonstrations are the shared rendered
``prefix`` (its key/value cache is computed once).

Outputs are cleaned (role-label leakage, "Revision:" echoes, lead-ins, wrapping quotes)
and flagged, never dropped: ``empty``, ``truncated`` (no EOS), ``identical`` (same as its
input), ``label_leak`` (a label was stripped), ``kept_previous`` (an empty revision keeps
the previous text).

Resumable: each phase's results are appended to ``records/sl-phases`` under keys hashed
from (prompt, model, constitution, stage parameters, seed), so a rerun skips finished work
and a kill loses at most the generate call in flight. ``records/sl`` then holds one
record per prompt (``prompt_id, prompt, category, initial, rounds, final, flags, model, teacher``) and
``data/sl`` the SFT dataset (``messages, source, prompt_id``), red-team revisions mixed
with the base model's answers to helpful prompts at ``sl.helpful_ratio``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_dpo.config import RunConfig, SamplingSection, to_dict
from cai_dpo.data import name_prompt_error
from cai_dpo.engine import Engine, set_threads
from cai_dpo.errors import ContextLengthError, InputError
from cai_dpo.models import describe, load_engine
from cai_dpo.schema import Conversation, as_conversation
from cai_dpo.store import Manifest, RunStore, Timer, atomic_dir, content_hash, file_hash, locked_stage, write_jsonl

log = logging.getLogger(__name__)

#: Appended to every revision request so the model answers with the new text only.
REVISION_SUFFIX = " Reply with the new answer only."
#: Requests used for a demonstration that names no principle.
GENERIC_CRITIQUE = "Point out anything harmful, unethical, dishonest or unhelpful in the assistant's last answer."
GENERIC_REVISION = "Rewrite the assistant's answer to remove anything harmful, unethical, dishonest or unhelpful."

PHASES_STORE = "sl-phases"


# --------------------------------------------------------------------------- cleaning

_LABEL_WORDS = (
    r"assistant|user|human|ai|system|"
    r"critique\s*request|revision\s*request|critique|revision|revised\s+(?:answer|response|version)|"
    r"rewritten\s+(?:answer|response|version)|new\s+answer|response|answer"
)
_LEAD_LABEL = re.compile(rf"^\s*(?:\*\*|#+\s*)?(?:{_LABEL_WORDS})(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_TURN_LEAK = re.compile(
    (
        r"(?:\n|^)\s*(?:\*\*)?(?:assistant|user|human|critique\s*request|revision\s*request|critique|"
        r"revision)(?:\*\*)?\s*:"
    ),
    re.IGNORECASE,
)
_TEMPLATE_LEAK = re.compile(r"<\|im_(?:start|end)\|>|<\|endoftext\|>")
_LEAD_IN = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course)[,!.]?\s*)?"
    r"here(?:'s| is| are)\s+(?:a|the|my|an)?\s*"
    r"(?:revised|rewritten|new|updated|improved|better|safer)\b[^:\n]{0,60}:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»"}


@dataclass
class Cleaned:
    """A cleaned model output, the raw text and the flags raised while cleaning."""

    text: str
    raw: str
    flags: list[str] = field(default_factory=list)


def _normalise(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def clean_output(raw: str, *, finished: bool = True, previous: str | None = None) -> Cleaned:
    """Strip role-label leakage, echoed labels, lead-ins and wrapping quotes; flag problems.

    Flags: ``label_leak`` (something was stripped or a new turn was cut off), ``empty``,
    ``truncated`` (generation did not end at EOS), ``identical`` (equals ``previous``).
    """
    flags: list[str] = []
    text = raw.strip()
    cut = _TEMPLATE_LEAK.split(text, maxsplit=1)[0]
    if cut != text:
        text, flags = cut.strip(), flags + ["label_leak"]
    for _ in range(3):  # "Assistant: Revision: ..." has stacked labels
        stripped = _LEAD_LABEL.sub("", text, count=1).strip()
        stripped = _LEAD_IN.sub("", stripped, count=1).strip()
        if stripped == text:
            break
        text = stripped
        if "label_leak" not in flags:
            flags.append("label_leak")
    leak = _TURN_LEAK.search(text)
    if leak and leak.start() > 0:
        text = text[: leak.start()].strip()
        if "label_leak" not in flags:
            flags.append("label_leak")
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]] and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    if not text:
        flags.append("empty")
    if not finished:
        flags.append("truncated")
    if previous is not None and text and _normalise(text) == _normalise(previous):
        flags.append("identical")
    return Cleaned(text, raw, flags)


# --------------------------------------------------------------------------- prompts


def _revision_request(principle: Any, prompt: str, response: str, critique: str) -> str:
    return principle.render_revision(prompt=prompt, response=response, critique=critique).rstrip() + REVISION_SUFFIX


def _context(prompt: str | Conversation) -> tuple[Conversation, str]:
    """Chat turns before the answer, and the prompt text for ``{prompt}`` placeholders."""
    if isinstance(prompt, str):
        return as_conversation(prompt), prompt
    turns = [dict(m) for m in prompt]
    users = [m["content"] for m in turns if m["role"] == "user"]
    return turns, users[-1] if users else ""


def critique_turns(principle: Any, prompt: str | Conversation, response: str) -> Conversation:
    """``[user prompt, assistant answer, user critique request]`` (``prompt`` may be a whole transcript)."""
    turns, text = _context(prompt)
    return turns + [
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.render_critique(prompt=text, response=response)},
    ]


def revision_turns(principle: Any, prompt: str | Conversation, response: str, critique: str | None) -> Conversation:
    """The revision request after the critique exchange (``critique`` mode) or straight
    after the answer (``direct``)."""
    turns, text = _context(prompt)
    if critique is None:
        head = turns + [{"role": "assistant", "content": response}]
        return head + [{"role": "user", "content": _revision_request(principle, text, response, "")}]
    return critique_turns(principle, prompt, response) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": _revision_request(principle, text, response, critique)},
    ]


@dataclass
class _DemoPrinciple:
    critique: str = GENERIC_CRITIQUE
    revision: str = GENERIC_REVISION

    def render_critique(self, prompt: str = "", response: str = "") -> str:
        return self.critique

    def render_revision(self, prompt: str = "", response: str = "", critique: str = "") -> str:
        return self.revision


def demo_turns(constitution: Any, k: int, mode: str, phase: str) -> Conversation:
    """The first ``k`` critique demonstrations as chat turns ending with the ``phase`` answer.

    ``phase`` is ``critique`` (each demo ends with its critique) or ``revision`` (each demo
    goes on to its revision; in ``direct`` mode the critique exchange is left out).
    """
    turns: Conversation = []
    for ex in constitution.critique_examples[: max(0, k)]:
        try:
            principle = constitution.principle(ex.principle_id) if ex.principle_id else _DemoPrinciple()
        except KeyError:
            principle = _DemoPrinciple()
        if phase == "critique":
            turns += critique_turns(principle, ex.prompt, ex.response)
            turns.append({"role": "assistant", "content": ex.critique})
        else:
            turns += revision_turns(principle, ex.prompt, ex.response, None if mode == "direct" else ex.critique)
            turns.append({"role": "assistant", "content": ex.revision})
    return turns


def split_prefix(
    render: Callable[..., str], shared: Conversation, conversations: Sequence[Conversation]
) -> tuple[str | None, list[str]]:
    """Render ``shared + conversation`` for each item and split off the shared rendered text.

    Returns ``(prefix, rests)`` with ``prefix + rest`` equal to the unsplit rendering of
    every item, the prefix ending at a message boundary. When no split is possible (no
    shared turns, or a template that renders the shared part differently) the prefix is
    None and the rests are the full texts.
    """
    full = [render(list(shared) + list(c), add_generation_prompt=True) for c in conversations]
    if not shared or not full:
        return None, full
    prefix = render(list(shared), add_generation_prompt=False)
    if prefix and all(f.startswith(prefix) and len(f) > len(prefix) for f in full):
        return prefix, [f[len(prefix) :] for f in full]
    log.warning("the chat template renders the few-shot turns differently inside a conversation; not caching them")
    return None, full


# --------------------------------------------------------------------------- stage


def _prompt_turns(p: Any) -> Conversation:
    """The prompt as chat turns (a whole transcript when the prompt came from one)."""
    return p.conversation(full=True)


def _limit(items: list[Any], limit: int | None) -> list[Any]:
    return items if limit is None else items[: max(0, limit)]


def helpful_count(n_red: int, n_available: int, ratio: float) -> int:
    """How many helpful rows make them ``ratio`` of the mix with ``n_red`` red-team rows (capped)."""
    if ratio <= 0 or n_available == 0:
        return 0
    if ratio >= 1:
        return n_available
    return min(n_available, int(round(ratio / (1 - ratio) * n_red)))


def _phase_seed(cfg: RunConfig, phase: str) -> int:
    return int(content_hash(cfg.seed, cfg.sl.sampling.seed, phase, length=8), 16)


class _LazyEngine:
    """Loads a model (the base policy, or the teacher) the first time a phase has work to do."""

    def __init__(self, cfg: RunConfig, spec: Any = None):
        self.cfg = cfg
        self.spec = spec if spec is not None else dataclasses.replace(cfg.policy, adapter=None)
        self.engine: Engine | None = None
        self.load_seconds = 0.0

    def get(self) -> Engine:
        if self.engine is None:
            with Timer() as t:
                self.engine = load_engine(self.spec, batch_size=self.cfg.sl.sampling.batch_size)
            self.load_seconds = t.seconds
        return self.engine


class _SLRun:
    """State of one ``run_sl`` call: inputs, keys, the phase store and counters."""

    def __init__(self, cfg: RunConfig, run: RunStore):
        from cai_dpo.constitution import load_constitution
        from cai_dpo.data import load_prompts, split_prompts

        self.cfg, self.run = cfg, run
        self.constitution = load_constitution(cfg.constitution_path())
        self.red = _limit(split_prompts(load_prompts(cfg.data.red_team), "train"), cfg.data.red_team_limit)
        if not self.red:
            raise InputError(
                f"{cfg.data.red_team}: no red-team prompts in the 'train' split; "
                "point data.red_team at a prompt file with train prompts"
            )
        helpful_all: list[Any] = []
        if cfg.sl.helpful_ratio > 0:
            helpful_all = _limit(split_prompts(load_prompts(cfg.data.helpful), "train"), cfg.data.helpful_limit)
        n_help = helpful_count(len(self.red), len(helpful_all), cfg.sl.helpful_ratio)
        picked = sorted(random.Random(cfg.seed).sample(range(len(helpful_all)), n_help))
        self.helpful = [helpful_all[i] for i in picked]
        self.spec = dataclasses.replace(cfg.policy, adapter=None)
        self.model_id = describe(self.spec)
        # the teacher writes critiques and revisions; by default it is the policy itself
        self.teacher_spec = cfg.sl.teacher if cfg.sl.teacher is not None else self.spec
        self.teacher_id = describe(self.teacher_spec)
        self.distilled = self.teacher_spec != self.spec
        self.constitution_hash = self.constitution.fingerprint()
        sampling = dataclasses.asdict(cfg.sl.sampling)
        sampling.pop("batch_size", None)
        self.sampling_params = sampling
        self.params = {
            "mode": cfg.sl.mode,
            "few_shot": cfg.sl.few_shot,
            "categories": cfg.sl.categories,
            "sampling": sampling,
            "revision_suffix": REVISION_SUFFIX,
        }
        self.store = run.records(PHASES_STORE)
        self.engine = _LazyEngine(cfg, self.spec)
        self.teacher = _LazyEngine(cfg, self.teacher_spec) if self.distilled else self.engine
        self.timings: dict[str, float] = {}
        self.generated = Counter()

    # keys ------------------------------------------------------------------

    def initial_key(self, p: Any) -> str:
        """Initial answers depend on the prompt, the model, the sampling settings and the seed only."""
        return content_hash("sl-initial", _prompt_turns(p), self.model_id, self.sampling_params, self.cfg.seed)

    def base_key(self, p: Any) -> str:
        """Key of a prompt's critique/revision chain: prompt, model (and teacher),
        constitution, stage parameters, seed."""
        teacher = [self.teacher_id] if self.distilled else []  # keys of policy-only runs stay as they were
        return content_hash(
            "sl", _prompt_turns(p), self.model_id, self.constitution_hash, self.params, self.cfg.seed, *teacher
        )

    def phase_key(self, p: Any, phase: str, rnd: int) -> str:
        return content_hash(self.base_key(p), phase, rnd)

    def principle(self, prompt: Any, rnd: int) -> Any:
        return self.constitution.sample_principles(
            1, seed=f"{self.cfg.seed}:{prompt.id}:{rnd}", categories=self.cfg.sl.categories
        )[0]

    # generation ------------------------------------------------------------

    def _generate(
        self, phase: str, conversations: list[Conversation], shared: Conversation, prompts: Sequence[Any] = ()
    ) -> list[Any]:
        """Generate one phase: the initial answer with the policy, critiques and revisions with the teacher.

        ``conversations`` are made from ``prompts``, which a too-long error then names.
        """
        engine = (self.engine if phase == "initial" else self.teacher).get()
        prefix, texts = split_prefix(engine.render, shared, conversations)
        sampling: SamplingSection = dataclasses.replace(self.cfg.sl.sampling, seed=_phase_seed(self.cfg, phase))
        try:
            outs = engine.generate(texts, sampling, prefix=prefix, desc=f"sl {phase}")
        except ContextLengthError as exc:
            named = name_prompt_error(exc, prompts)
            raise ContextLengthError(
                f"SL {phase}: {named} (fix: shorter prompts, fewer sl.few_shot demos or a "
                "lower sl.sampling.max_new_tokens)",
                index=exc.index,
            ) from exc
        self.generated[phase] += len(texts)
        return [o[0] for o in outs]

    def _chunks(self, items: list[Any]) -> list[list[Any]]:
        size = max(1, self.cfg.sl.chunk_size)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def initial_phase(self) -> None:
        todo, seen = [], set()
        for kind, prompts in (("red_team", self.red), ("helpful", self.helpful)):
            for p in prompts:
                key = self.initial_key(p)
                if key not in self.store and key not in seen:
                    seen.add(key)
                    todo.append((key, kind, p))
        if todo:
            self.engine.get()
        with Timer() as t:
            for chunk in self._chunks(todo):
                gens = self._generate("initial", [_prompt_turns(p) for _, _, p in chunk], [], [p for _, _, p in chunk])
                rows = []
                for (key, kind, p), g in zip(chunk, gens):
                    c = clean_output(g.text, finished=g.finished)
                    rows.append(
                        {
                            "key": key,
                            "phase": "initial",
                            "kind": kind,
                            "prompt_id": p.id,
                            "text": c.text,
                            "raw": c.raw,
                            "flags": c.flags,
                            "tokens": g.n_tokens,
                            "prompt_tokens": g.prompt_tokens,
                        }
                    )
                self.store.append(rows)
        if todo:
            self.timings["initial"] = self.timings.get("initial", 0.0) + t.seconds

    def current_text(self, p: Any, rnd: int) -> str:
        """The answer round ``rnd`` starts from: the initial answer, or the previous round's revision."""
        if rnd == 1:
            return self.store.get(self.initial_key(p))["text"]
        return self.store.get(self.phase_key(p, "revision", rnd - 1))["text"]

    def round_phase(self, rnd: int, phase: str) -> None:
        mode = self.cfg.sl.mode
        todo = [p for p in self.red if self.phase_key(p, phase, rnd) not in self.store]
        if not todo:
            return
        shared = demo_turns(self.constitution, self.cfg.sl.few_shot, mode, phase)
        self.teacher.get()
        with Timer() as t:
            for chunk in self._chunks(todo):
                convs, meta = [], []
                for p in chunk:
                    principle = self.principle(p, rnd)
                    response = self.current_text(p, rnd)
                    if phase == "critique":
                        convs.append(critique_turns(principle, _prompt_turns(p), response))
                        critique = None
                    else:
                        critique = None
                        if mode == "critique":
                            critique = self.store.get(self.phase_key(p, "critique", rnd))["text"]
                        convs.append(revision_turns(principle, _prompt_turns(p), response, critique))
                    meta.append((p, principle, response))
                gens = self._generate(f"r{rnd}-{phase}", convs, shared, [m[0] for m in meta])
                rows = []
                for (p, principle, response), g in zip(meta, gens):
                    c = clean_output(g.text, finished=g.finished, previous=response)
                    text, flags = c.text, list(c.flags)
                    if phase == "revision" and not text:
                        text = response
                        flags.append("kept_previous")
                    rows.append(
                        {
                            "key": self.phase_key(p, phase, rnd),
                            "phase": phase,
                            "round": rnd,
                            "prompt_id": p.id,
                            "principle_id": principle.id,
                            "input": response,
                            "text": text,
                            "raw": c.raw,
                            "flags": flags,
                            "tokens": g.n_tokens,
                            "prompt_tokens": g.prompt_tokens,
                            "teacher": self.teacher_id,
                        }
                    )
                self.store.append(rows)
        self.timings[f"r{rnd}_{phase}"] = t.seconds

    # assembly --------------------------------------------------------------

    def prompt_record(self, p: Any) -> dict[str, Any]:
        init = self.store.get(self.initial_key(p))
        rounds, flags = [], set(init["flags"])
        for rnd in range(1, self.cfg.sl.rounds + 1):
            crit = self.store.get(self.phase_key(p, "critique", rnd)) if self.cfg.sl.mode == "critique" else None
            rev = self.store.get(self.phase_key(p, "revision", rnd))
            round_flags = sorted(set(rev["flags"]) | ({f"critique_{f}" for f in crit["flags"]} if crit else set()))
            flags.update(rev["flags"])
            rounds.append(
                {
                    "round": rnd,
                    "principle_id": rev["principle_id"],
                    "input": rev["input"],
                    "critique": crit["text"] if crit else None,
                    "revision": rev["text"],
                    "flags": round_flags,
                    "tokens": {
                        "critique": crit["tokens"] if crit else 0,
                        "revision": rev["tokens"],
                        "critique_prompt": crit["prompt_tokens"] if crit else 0,
                        "revision_prompt": rev["prompt_tokens"],
                    },
                }
            )
        final = rounds[-1]["revision"] if rounds else init["text"]
        return {
            "key": self.base_key(p),
            "prompt_id": p.id,
            "prompt": p.text,
            "category": p.category,
            "initial": init["text"],
            "initial_flags": init["flags"],
            "rounds": rounds,
            "final": final,
            "flags": sorted(flags),
            "model": self.model_id,
            "teacher": self.teacher_id,
            "constitution": self.constitution.name,
            "mode": self.cfg.sl.mode,
        }


def _quality(records: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Collapse/quality signals: diversity, repetition, identical-revision share, lengths per round."""
    from cai_dpo.metrics import diversity_signals, mean_length

    out: dict[str, Any] = {"initial": diversity_signals([r["initial"] for r in records])}
    per_round = []
    for i in range(rounds):
        revs = [r["rounds"][i] for r in records]
        entry = diversity_signals([x["revision"] for x in revs])
        entry["identical_fraction"] = sum("identical" in x["flags"] for x in revs) / max(1, len(revs))
        crits = [x["critique"] for x in revs if x["critique"] is not None]
        if crits:
            entry["critique_mean_length"] = mean_length(crits)
        per_round.append(entry)
    out["rounds"] = per_round
    out["final"] = diversity_signals([r["final"] for r in records])
    out["identical_fraction"] = (sum(e["identical_fraction"] for e in per_round) / len(per_round)) if per_round else 0.0
    out["mean_length_per_round"] = [out["initial"]["mean_length"]] + [e["mean_length"] for e in per_round]
    flag_counts: Counter[str] = Counter()
    for r in records:
        for x in r["rounds"]:
            flag_counts.update(x["flags"])
    out["flag_counts"] = dict(sorted(flag_counts.items()))
    return out


def _sum_stats(stats: list[Any]) -> Any:
    """Engine statistics of the policy and the teacher added together."""
    total = dataclasses.replace(stats[0])
    for s in stats[1:]:
        for f in dataclasses.fields(total):
            setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


def _prompts_hash(prompts: list[Any]) -> str:
    return content_hash([(p.id, p.text, p.category) for p in prompts])


@locked_stage
def run_sl(cfg: RunConfig, run: RunStore | None = None) -> Path:
    """Generate the SL-CAI data of ``cfg``'s run: ``records/sl`` and the dataset ``data/sl``; returns ``data/sl``."""
    import datasets

    run = run or RunStore(cfg.run_dir)
    threads = set_threads(cfg.threads)
    with Timer() as total:
        state = _SLRun(cfg, run)
        log.info(
            "SL-CAI: %d red-team prompts, %d helpful, %d round(s), mode=%s",
            len(state.red),
            len(state.helpful),
            cfg.sl.rounds,
            cfg.sl.mode,
        )
        state.initial_phase()
        for rnd in range(1, cfg.sl.rounds + 1):
            if cfg.sl.mode == "critique":
                state.round_phase(rnd, "critique")
            state.round_phase(rnd, "revision")

        records = [state.prompt_record(p) for p in state.red]
        with atomic_dir(run.records_dir("sl")) as tmp:
            write_jsonl(tmp / "shard-00000000000000000000-final.jsonl", records)

        rows = [
            {
                "messages": _prompt_turns(p) + [{"role": "assistant", "content": r["final"]}],
                "source": "red_team",
                "prompt_id": r["prompt_id"],
            }
            for p, r in zip(state.red, records)
        ]
        helpful_flags: Counter[str] = Counter()
        for p in state.helpful:
            rec = state.store.get(state.initial_key(p))
            helpful_flags.update(rec["flags"])
            if not rec["text"]:
                continue
            rows.append(
                {
                    "messages": _prompt_turns(p) + [{"role": "assistant", "content": rec["text"]}],
                    "source": "helpful",
                    "prompt_id": p.id,
                }
            )
        random.Random(cfg.seed).shuffle(rows)
        dataset = datasets.Dataset.from_list(rows)

        engines = [e.engine for e in dict.fromkeys([state.engine, state.teacher]) if e.engine is not None]
        stats = _sum_stats([e.stats for e in engines]) if engines else None
        quality = _quality(records, cfg.sl.rounds)
        out = run.sl_data
        manifest = Manifest(
            stage="sl",
            config=to_dict(cfg),
            inputs={
                "constitution": file_hash(cfg.constitution_path()),
                "constitution_fingerprint": state.constitution_hash,
                "red_team": f"{cfg.data.red_team}#{_prompts_hash(state.red)}",
                "helpful": f"{cfg.data.helpful}#{_prompts_hash(state.helpful)}",
            },
            models={"policy": state.model_id, "teacher": state.teacher_id},
            counts={
                "red_team_prompts": len(state.red),
                "helpful_prompts": len(state.helpful),
                "rows": len(rows),
                "helpful_rows": sum(r["source"] == "helpful" for r in rows),
                "generated_this_run": dict(state.generated),
                "reused_phases": len(state.red) * (1 + cfg.sl.rounds * (2 if cfg.sl.mode == "critique" else 1))
                + len(state.helpful)
                - sum(state.generated.values()),
                "generated_tokens": stats.generated_tokens if stats else 0,
                "prompt_tokens": stats.prompt_tokens if stats else 0,
                "record_tokens": {
                    "initial": sum(state.store.get(state.initial_key(p))["tokens"] for p in state.red),
                    "critique": sum(x["tokens"]["critique"] for r in records for x in r["rounds"]),
                    "revision": sum(x["tokens"]["revision"] for r in records for x in r["rounds"]),
                },
                "helpful_flags": dict(helpful_flags),
            },
            timings={
                **state.timings,
                "model_load": state.engine.load_seconds + (state.teacher.load_seconds if state.distilled else 0.0),
                "generate": stats.generate_seconds if stats else 0.0,
            },
            metrics={**quality, "tokens_per_second": stats.tokens_per_second() if stats else 0.0, "threads": threads},
        )
        with atomic_dir(out) as tmp:
            dataset.save_to_disk(str(tmp))
            manifest.timings["total"] = time.perf_counter() - total.start
            manifest.write(tmp / "manifest.json")
    log.info("SL-CAI data: %d rows (%d helpful) in %s", len(rows), manifest.counts["helpful_rows"], out)
    return out
