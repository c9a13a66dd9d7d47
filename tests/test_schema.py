"""The rows stages hand each other (cai_dpo.schema): one text-to-conversation converter, and the
pair and preference-row types matching what the pairs and judge stages write."""

from __future__ import annotations

from typing import get_type_hints

from cai_dpo.schema import Pair, PreferenceRow, as_conversation


def test_as_conversation():
    assert as_conversation("hi") == [{"role": "user", "content": "hi"}]
    assert as_conversation("hi", system="s") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    ]
    conv = [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}]
    assert as_conversation(conv) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert as_conversation(conv) is not conv


def test_one_converter_and_one_conversation_alias():
    from cai_dpo import data, engine, schema, splits
    from cai_dpo.rl import reward
    from cai_dpo.stages import sl

    assert engine.Conversation is schema.Conversation and sl.Conversation is schema.Conversation
    assert reward.Conversation is schema.Conversation and reward.as_conversation is as_conversation
    assert not hasattr(data, "to_conversation")
    assert data.Prompt(id="p", text="t").conversation(system="s") == as_conversation("t", system="s")
    assert splits.prompt_key("t") == splits.prompt_key(as_conversation("t"))


def test_preference_row_fields_are_the_judge_stage_schema():
    from cai_dpo.stages.judge import preference_features

    assert list(get_type_hints(PreferenceRow)) == list(preference_features())


def test_pair_fields_are_what_the_pairs_stage_writes():
    from cai_dpo.stages.pairs import pairs_from_samples

    record = {
        "key": "k",
        "prompt_id": "p1",
        "prompt": "How do I boil an egg?",
        "category": "cooking",
        "prompt_source": "helpful",
        "model": "m",
        "samples": [
            {"index": i, "temperature": 0.7, "text": f"answer {i}", "n_tokens": 2, "finished": True, "flags": []}
            for i in range(3)
        ],
    }
    pairs = pairs_from_samples(record, max_pairs=2)
    assert pairs and all(set(p) == set(get_type_hints(Pair)) for p in pairs)
