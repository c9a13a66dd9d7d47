"""Train/held-out splits by prompt (SFT, DPO, preference model): no prompt on both sides."""

from __future__ import annotations

import datasets

from cai_dpo.splits import prompt_key, split_by_prompt, split_indices_by_prompt


def _rows(n_prompts: int, per_prompt: int) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"a{j}", "rejected": f"b{j}"}
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]


def test_no_prompt_on_both_sides_and_fraction_of_prompts():
    rows = _rows(10, 3)
    train, held = split_by_prompt(rows, 0.2, seed=0)
    assert len(train) + len(held) == 30
    assert {prompt_key(r["prompt"]) for r in train}.isdisjoint({prompt_key(r["prompt"]) for r in held})
    assert len({prompt_key(r["prompt"]) for r in held}) == 2 and len(held) == 6
    # seeded, and independent of the row order
    assert split_by_prompt(rows, 0.2, seed=0) == (train, held)
    assert {prompt_key(r["prompt"]) for r in split_by_prompt(rows[::-1], 0.2, seed=0)[1]} == {
        prompt_key(r["prompt"]) for r in held
    }


def test_string_prompt_equals_its_conversation_and_small_sets_stay_whole():
    assert prompt_key("Hi") == prompt_key([{"role": "user", "content": "Hi"}])
    assert split_indices_by_prompt(["a", "a", "a", "a"], 0.5, 0) == ([0, 1, 2, 3], [])  # one prompt only
    assert split_indices_by_prompt(["a", "b", "c"], 0.5, 0) == ([0, 1, 2], [])  # fewer than 4 rows
    assert split_indices_by_prompt(["a", "b", "c", "d"], 0.0, 0) == ([0, 1, 2, 3], [])


def test_stages_split_by_prompt():
    from cai_dpo.stages import dpo, rm, sft

    assert dpo.split_by_prompt is split_by_prompt and rm.split_by_prompt is split_by_prompt
    # SFT: several rows of one prompt (e.g. revisions from different rounds) stay on one side
    msgs = [
        [{"role": "user", "content": f"q{i % 6}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(24)
    ]
    train, held = sft.split_eval(datasets.Dataset.from_dict({"messages": msgs}), 0.34, seed=0)
    train_q = {m[0]["content"] for m in train["messages"]}
    held_q = {m[0]["content"] for m in held["messages"]}
    assert train_q.isdisjoint(held_q) and len(held_q) == 2 and len(held) == 8
    pc = datasets.Dataset.from_dict({"prompt": [m[:1] for m in msgs], "completion": [m[1:] for m in msgs]})
    train, held = sft.split_eval(pc, 0.34, seed=0)
    assert {p[0]["content"] for p in train["prompt"]}.isdisjoint({p[0]["content"] for p in held["prompt"]})
