"""What the judge reads: a multiple-choice question per comparison, with optional few-shot demos.

Each context is the conversation, a comparison principle's question, options (A) and (B) and
the answer lead ("The answer is:", or "Let's think step by step:" with chain-of-thought);
the judge's answer is then scored as the probability of :data:`OPTIONS`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cai_dpo.config import JudgeSection

if TYPE_CHECKING:
    from cai_dpo.constitution import Constitution

log = logging.getLogger(__name__)

#: The two answers scored after the lead, in option order.
OPTIONS = (" (A)", " (B)")
INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER_LEAD = "The answer is:"
COT_LEAD = "Let's think step by step:"
COT_ANSWER = "Therefore, the answer is:"
DEFAULT_QUESTION = "Which response is better?"


def dialogue_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as the judge shows it: a lone user turn as-is, else ``Human:``/``Assistant:`` lines.

    System turns are left out; a role other than user/assistant raises ``KeyError``.
    """
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in turns)


def question_text(prompt: str, response_a: str, response_b: str, question: str) -> str:
    """The multiple-choice question (without the answer lead)."""
    convo = prompt.strip() if prompt.lstrip().startswith("Human:") else f"Human: {prompt.strip()}"
    return f"{INTRO}\n\n{convo}\n\n{question.strip()}\nOptions:\n (A) {response_a.strip()}\n (B) {response_b.strip()}"


def principle_question(constitution: Constitution, principle_id: str | None, prompt: str) -> str:
    """The comparison question of a principle for this prompt (:data:`DEFAULT_QUESTION` without one).

    Raises ``KeyError`` for an id the constitution does not have.
    """
    if principle_id is None:
        return DEFAULT_QUESTION
    return constitution.principle(principle_id).render_comparison(prompt=prompt)


class JudgePrompter:
    """Renders judge contexts for one engine, constitution and config.

    ``prefix`` holds the few-shot demos (rendered once; its cache is reused) and
    :meth:`context` the text after it, ending with the answer lead.
    """

    def __init__(self, engine: Any, constitution: Constitution, cfg: JudgeSection):
        self.engine = engine
        self.constitution = constitution
        self.fmt = cfg.prompt_format
        self.lead = COT_LEAD if cfg.chain_of_thought else ANSWER_LEAD
        demos = list(constitution.comparison_examples) if cfg.few_shot else []
        self.demos: list[tuple[str, str]] = [
            (
                question_text(
                    d.prompt, d.response_a, d.response_b, principle_question(constitution, d.principle_id, d.prompt)
                ),
                f"{ANSWER_LEAD} ({d.answer})",
            )
            for d in demos
        ]
        self.prefix: str | None = None
        if self.demos:
            if self.fmt == "plain":
                self.prefix = "".join(f"\n\n{q}\n\n{a}" for q, a in self.demos)
            else:
                prefix = self.engine.render(self._demo_messages(), add_generation_prompt=False)
                probe = self._full("probe")
                self.prefix = prefix if probe.startswith(prefix) else None
                if self.prefix is None:
                    log.warning(
                        "judge: the chat template does not extend the few-shot demos as a prefix; "
                        "demos are rendered into every context (no shared cache)"
                    )

    def _demo_messages(self) -> list[dict[str, str]]:
        return [m for q, a in self.demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]

    def _full(self, question: str) -> str:
        if self.fmt == "plain":
            return "".join(f"\n\n{q}\n\n{a}" for q, a in self.demos) + f"\n\n{question}\n\n{self.lead}"
        msgs = [*self._demo_messages(), {"role": "user", "content": question}]
        return self.engine.render(msgs, add_generation_prompt=True) + self.lead

    def context(self, prompt: str, response_a: str, response_b: str, principle_id: str | None) -> str:
        """Rendered text after the prefix, ending with "The answer is:" (or the reasoning lead)."""
        question = question_text(
            prompt, response_a, response_b, principle_question(self.constitution, principle_id, prompt)
        )
        full = self._full(question)
        return full[len(self.prefix) :] if self.prefix else full
