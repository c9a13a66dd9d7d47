"""Preference model: soft-label loss, calibration, data mixing, learning, reloading, other tokenizers."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_dpo.config import load_config
from cai_dpo.losses import soft_preference_loss
from cai_dpo.rl.reward import RewardScorer, first_tokens, rm_text
from cai_dpo.stages.rm import (
    expected_calibration_error,
    mix_helpful,
    preference_metrics,
    run_rm,
    tokenize_pairs,
)
from cai_dpo.store import RunStore, read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from wordlevel_models import build_word_encoder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TOPICS = [
    "pick a lock",
    "make a fake id",
    "hack a wifi network",
    "steal a car",
    "build a weapon",
    "hurt my neighbor",
    "cheat on a test",
    "forge a signature",
    "spy on my partner",
    "poison a dog",
    "break into a house",
    "shoplift a watch",
    "launder money",
    "start a fire",
    "bully a classmate",
    "evade taxes",
    "buy drugs online",
    "scam old people",
    "stalk someone",
    "make a bomb",
    "crash a website",
    "fake an illness",
    "bribe an official",
    "smuggle goods",
    "dox a journalist",
    "threaten a coworker",
    "counterfeit money",
    "cut brake lines",
]
GOOD = [
    "I can't help with that because it could seriously harm people.",
    "I won't assist with this; it is dangerous and illegal.",
    "Sorry, I cannot support that. Please consider a safe and legal alternative.",
    "That could hurt someone, so I will not explain it.",
]
BAD = [
    "Sure! Here is how to do it step by step.",
    "Easy. First get the tools, then do it at night.",
    "Of course, just follow these simple instructions.",
    "Great idea, here is a detailed plan for you.",
]


def synthetic_preferences(n: int, seed: int) -> list[dict]:
    """Separable pairs: the chosen answer always refuses with a reason, the rejected one complies."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        p = rng.choice([0.7, 0.8, 0.9, 1.0])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"How do I {topic}?"}],
                "chosen": [{"role": "assistant", "content": rng.choice(GOOD)}],
                "rejected": [{"role": "assistant", "content": rng.choice(BAD)}],
                "p_chosen": p,
                "margin": 2 * p - 1,
                "source": "judged_samples",
                "principle_ids": ["harm"],
                "score_ab": p,
                "score_ba": p,
                "judge_model": "synthetic",
                "pair_id": f"s{seed}-{i}",
                "edge_reasons": [],
                "category": "violence",
            }
        )
    return rows


# --------------------------------------------------------------------------- pure pieces


def test_soft_loss_matches_closed_form():
    r_c, r_r, p = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.8, 0.3])
    # d = [1, -2]; -(p·logσ(d) + (1-p)·logσ(-d)), written out with log σ(x) = -log(1 + e^-x)
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = (-(0.8 * ls(1) + 0.2 * ls(-1)) - (0.3 * ls(-2) + 0.7 * ls(2))) / 2
    assert abs(expected - 0.6200949) < 1e-6
    assert soft_preference_loss(r_c, r_r, p).item() == pytest.approx(expected, abs=1e-6)
    # a hard label is the usual Bradley–Terry loss
    assert soft_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(
        -ls(1)
    )
    # the soft loss is minimised where σ(d) = p
    d = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([d], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        soft_preference_loss(d, torch.zeros(1), torch.tensor([0.8])).backward()
        opt.step()
    assert torch.sigmoid(d).item() == pytest.approx(0.8, abs=1e-3)


def test_calibration_error_hand_example():
    pred, target = [0.05, 0.15, 0.95, 0.85], [0.0, 0.5, 1.0, 1.0]
    assert expected_calibration_error(pred, target) == pytest.approx((0.05 + 0.35 + 0.05 + 0.15) / 4)
    m = preference_metrics([2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.9, 0.8, 0.5])
    assert m["accuracy"] == pytest.approx(0.5)  # tie (p=0.5) excluded; one right, one wrong
    assert m["n"] == 3


def test_helpful_mix_rebalances():
    harm = [{"prompt": "How do I hurt someone?", "category": "violence", "i": i} for i in range(8)]
    helpful = [{"prompt": f"Cook rice {i}", "category": "helpful", "i": i} for i in range(8)]
    rows = harm + helpful
    assert len(mix_helpful(rows, None, set(), 0)) == 16
    assert sum(r["category"] == "helpful" for r in mix_helpful(rows, 0.0, set(), 0)) == 0
    mixed = mix_helpful(rows, 0.2, set(), 0)
    assert (sum(r["category"] == "helpful" for r in mixed), len(mixed)) == (2, 10)
    mostly_helpful = mix_helpful(rows, 0.75, set(), 0)
    assert (sum(r["category"] == "helpful" for r in mostly_helpful), len(mostly_helpful)) == (8, 11)
    # a prompt from the helpful prompt set counts as helpful whatever its category
    by_text = mix_helpful([{"prompt": "Cook rice 1", "category": "cooking"}] + harm, 0.0, {"Cook rice 1"}, 0)
    assert len(by_text) == 8


def test_curated_benign_prompts_count_as_helpful(tmp_path):
    """rm.helpful_mix sees curated benign pairs (category e.g. 'cooking') as helpfulness pairs, harmful ones not."""
    from cai_dpo.curated import load_curated
    from cai_dpo.stages.rm import _helpful_texts

    cfg = load_config("tiny", {"runs_dir": str(tmp_path / "runs")})
    benign = load_curated(kind="benign", split="train")[:4]
    harmful = load_curated(kind="harmful", split="train")[:4]
    texts = _helpful_texts(cfg)
    assert all(e.prompt.strip() in texts for e in benign)
    assert not any(e.prompt.strip() in texts for e in harmful)
    rows = [{"prompt": [{"role": "user", "content": e.prompt}], "category": e.category} for e in benign + harmful]
    assert [r["category"] for r in mix_helpful(rows, 0.0, texts, 0)] == [e.category for e in harmful]


def test_hard_and_soft_targets(tiny_model):
    _, tok = tiny_model
    rows = synthetic_preferences(4, 1)
    rows[0]["p_chosen"], rows[1]["p_chosen"], rows[2]["p_chosen"] = 0.5, 0.3, 0.8
    soft = tokenize_pairs(rows, tok, 64, "soft")
    hard = tokenize_pairs(rows, tok, 64, "hard")
    assert soft["p_chosen"][:3] == [0.5, 0.3, 0.8]
    assert hard["p_chosen"][:2] == [0.0, 1.0] and len(hard["p_chosen"]) == 3  # tie dropped
    assert all(len(ids) <= 64 for ids in soft["chosen_ids"])
    # truncation keeps the end of the text (the response), not the start
    full = tok(rm_text(tok, rows[3]["prompt"], rows[3]["chosen"][0]["content"]), add_special_tokens=False)["input_ids"]
    assert soft["chosen_ids"][3] == full[-64:]


def test_response_tokens_cut_both_sides_to_the_same_budget(tiny_model):
    """rm.response_tokens: each response is scored on its first N tokens, chosen and rejected alike."""
    _, tok = tiny_model
    rows = synthetic_preferences(4, 2)
    long_reply = " ".join(["I can't help with that because it could seriously harm people."] * 6)
    rows[0]["chosen"] = [{"role": "assistant", "content": long_reply}]
    cut = tokenize_pairs(rows, tok, 256, "soft", response_tokens=5)
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            text = row[side][0]["content"]
            first5 = first_tokens(tok, text, 5)
            # a prefix of the reply, at most 5 tokens, and the whole reply when it is that short
            assert text.startswith(first5) and len(tok(first5, add_special_tokens=False)["input_ids"]) <= 5
            if len(tok(text, add_special_tokens=False)["input_ids"]) <= 5:
                assert first5 == text
            want = tok(rm_text(tok, row["prompt"], first5), add_special_tokens=False)["input_ids"]
            assert cut[f"{side}_ids"][i] == want
    assert tok.is_fast
    first5 = first_tokens(tok, long_reply, 5)
    ids = tok(long_reply, add_special_tokens=False, return_offsets_mapping=True)
    assert first5 == long_reply[: ids["offset_mapping"][4][1]]  # cut at the 5th token's end
    assert tok(first5, add_special_tokens=False)["input_ids"] == ids["input_ids"][:5]
    multibyte = "naïve café 😀 日本語 ok"
    for n in range(1, len(tok(multibyte, add_special_tokens=False)["input_ids"]) + 1):
        head = first_tokens(tok, multibyte, n)  # never half a character
        assert multibyte.startswith(head) and len(tok(head, add_special_tokens=False)["input_ids"]) <= n
    whole = tokenize_pairs(rows, tok, 256, "soft")
    assert len(whole["chosen_ids"][0]) > len(cut["chosen_ids"][0])  # the long reply was cut
    assert first_tokens(tok, "short", None) == "short"


# --------------------------------------------------------------------------- training


def test_preference_model_learns_separable_pairs(tmp_path):
    cfg = load_config(
        "tiny",
        {
            "threads": 1,
            "runs_dir": str(tmp_path / "runs"),
            "rm.max_steps": 24,
            "rm.batch_size": 8,
            "rm.learning_rate": 3e-3,
            "rm.eval_fraction": 0.25,
            "rm.save_steps": 12,
            "rm.response_tokens": 12,
            "rm.lora": {"r": 8, "alpha": 16},
        },
    )
    run = RunStore(cfg.run_dir)
    out = run_rm(cfg, run, preferences=synthetic_preferences(64, 0))
    manifest = read_manifest(out)
    held = manifest["metrics"]["heldout"]
    assert 8 <= held["n"] <= 24  # a quarter of the prompts, with all their pairs
    assert held["accuracy"] >= 0.9, held
    assert 0.0 <= held["ece"] <= 1.0 and "soft_log_loss" in held
    assert (run.root / "metrics" / "rm" / "log.csv").exists()
    # reloading restores the trained head: two loads agree, and rank fresh pairs correctly
    fresh = synthetic_preferences(12, 99)
    a, b = RewardScorer(out), RewardScorer(out)
    ca, ra = a.score_pairs(fresh)
    cb, _ = b.score_pairs(fresh)
    assert ca == pytest.approx(cb, abs=1e-5)
    assert sum(c > r for c, r in zip(ca, ra)) >= 11
    # the scorer cuts responses to the trained budget: text after the first 12 tokens changes nothing
    assert a.response_tokens == 12
    prompt, reply = fresh[0]["prompt"], fresh[0]["chosen"][0]["content"]
    padded = reply + " Sure! Here is how to do it step by step." * 3
    assert a.score([prompt], [padded]) == pytest.approx(a.score([prompt], [first_tokens(a.tokenizer, padded, 12)]))


def test_rm_on_sl_cai_backbone_merges_sft(tmp_path, perturbed_lora):
    from cai_dpo.models import load_model, save_adapter

    cfg = load_config(
        "tiny", {"threads": 1, "runs_dir": str(tmp_path / "runs"), "rm.max_steps": 1, "rm.eval_fraction": 0.0}
    )
    run = RunStore(cfg.run_dir)
    sft, tok = perturbed_lora()
    save_adapter(sft, tok, run.model_dir("sft"), base="tiny")
    out = run_rm(cfg, run, preferences=synthetic_preferences(6, 2))
    note = json.loads((out / "cai_dpo_base.json").read_text())
    assert note == {"base": "tiny", "merge_first": ["../sft"]}
    rows = synthetic_preferences(3, 3)
    merged = RewardScorer(out).score_pairs(rows)[0]
    model, tok2 = load_model(str(out), task="seq_cls", merge_first=[])
    unmerged = RewardScorer(out, model=model, tokenizer=tok2).score_pairs(rows)[0]
    assert merged != pytest.approx(unmerged, abs=1e-4), "the SFT adapter is merged under the preference model"


def test_preference_model_with_its_own_tokenizer(tmp_path):
    words = " ".join(TOPICS + GOOD + BAD + ["how", "do", "i"]).replace("?", " ").split()
    enc = build_word_encoder(tmp_path / "encoder", [w.strip(".,!;'").lower() for w in words])
    cfg = load_config(
        "tiny",
        {
            "threads": 1,
            "runs_dir": str(tmp_path / "runs"),
            "rm.backbone": str(enc),
            "rm.max_steps": 30,
            "rm.batch_size": 8,
            "rm.learning_rate": 5e-3,
            "rm.eval_fraction": 0.25,
            "rm.max_length": 64,
        },
    )
    out = run_rm(cfg, RunStore(cfg.run_dir), preferences=synthetic_preferences(48, 4))
    assert json.loads((out / "cai_dpo_base.json").read_text())["base"] == str(enc)
    scorer = RewardScorer(out)
    assert not scorer.tokenizer.chat_template
    assert scorer.tokenizer.convert_ids_to_tokens(scorer.encode(["How do I steal a car?"], ["No."])[0])[0] == "[CLS]"
    assert read_manifest(out)["metrics"]["heldout"]["accuracy"] >= 0.75


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preference_model_retrains_when_its_inputs_change(tmp_path):
    """New labels or rm settings retrain from scratch; unchanged inputs or a PPO knob skip training."""
    import datasets

    from cai_dpo.stages.rm import run_rm as train

    over = {
        "threads": 1,
        "runs_dir": str(tmp_path / "runs"),
        "rm.max_steps": 3,
        "rm.batch_size": 2,
        "rm.eval_fraction": 0.0,
        "rm.learning_rate": 1e-2,
    }
    cfg = load_config("tiny", over)
    run = RunStore(cfg.run_dir)
    rows = synthetic_preferences(6, 7)
    datasets.Dataset.from_list(rows).save_to_disk(str(run.data_dir("preferences")))
    out = train(cfg, run)
    first = read_manifest(out)
    w1 = _adapter_weights(out)
    assert first["metrics"]["steps"] == 3

    # nothing changed, or only a downstream (PPO) knob: skipped, the manifest is not rewritten
    assert train(cfg, run) == out
    assert train(load_config("tiny", {**over, "ppo.kl_coef": 0.2}), run) == out
    assert read_manifest(out)["created"] == first["created"]

    # human labels merged: the preference model trains again from step 0 on them
    flipped = [{**r, "p_chosen": 1.0 - r["p_chosen"]} for r in rows]
    datasets.Dataset.from_list(flipped).save_to_disk(str(run.data_dir("preferences_merged")))
    out = train(cfg, run)
    second = read_manifest(out)
    assert second["metrics"]["resumed_from_step"] == 0 and second["metrics"]["steps"] == 3
    assert second["inputs"]["preferences"].startswith("preferences_merged:")
    w2 = _adapter_weights(out)
    assert not _same_weights(w1, w2)

    # its own config section changed: retrained too
    out = train(load_config("tiny", {**over, "rm.learning_rate": 5e-3}), run)
    assert read_manifest(out)["metrics"]["resumed_from_step"] == 0
    assert not _same_weights(w2, _adapter_weights(out))


def test_preference_model_resume_stops_at_max_steps(tmp_path):
    """A checkpoint already at max_steps (3, with 2 steps per epoch) is taken as is, not stepped past."""
    import shutil

    cfg = load_config(
        "tiny",
        {
            "threads": 1,
            "runs_dir": str(tmp_path / "runs"),
            "rm.max_steps": 3,
            "rm.batch_size": 2,
            "rm.eval_fraction": 0.0,
            "rm.save_steps": 50,
        },
    )
    run = RunStore(cfg.run_dir)
    rows = synthetic_preferences(4, 8)
    out = run_rm(cfg, run, preferences=rows)
    w1 = _adapter_weights(out)
    assert (run.root / "checkpoints" / "rm" / "checkpoint-3").is_dir()
    shutil.rmtree(out)  # killed after the last checkpoint, before the adapter was written
    out = run_rm(cfg, run, preferences=rows)
    manifest = read_manifest(out)
    assert manifest["metrics"]["steps"] == 3 and manifest["metrics"]["resumed_from_step"] == 3
    assert _same_weights(w1, _adapter_weights(out))


# --------------------------------------------------------------------------- bench


def test_hhh_bench_skips_or_scores(tmp_path, shared_anchors):
    cfg = load_config(
        "tiny", {"threads": 1, "runs_dir": str(tmp_path / "runs"), "rm.max_steps": 1, "rm.eval_fraction": 0.0}
    )
    out = run_rm(cfg, RunStore(cfg.run_dir), preferences=synthetic_preferences(4, 5))
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rm_hhh.py"), "--rm", str(out), "--limit", "12", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["n"] == 12 and 0.0 <= report["accuracy"] <= 1.0
    missing = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "rm_hhh.py"),
            "--rm",
            str(out),
            "--evals",
            str(tmp_path / "absent.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 0 and json.loads(missing.stdout)["skipped"]


# --------------------------------------------------------------------------- principle weights


def test_weighted_soft_loss_closed_form_and_zero_weight_gradient():
    r_c = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    r_r = torch.tensor([0.0, 2.0, 0.0], requires_grad=True)
    p, w = torch.tensor([0.8, 0.3, 1.0]), torch.tensor([1.0, 3.0, 0.0])
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    l0, l1 = -(0.8 * ls(1) + 0.2 * ls(-1)), -(0.3 * ls(-2) + 0.7 * ls(2))
    loss = soft_preference_loss(r_c, r_r, p, w)
    assert loss.item() == pytest.approx((1.0 * l0 + 3.0 * l1) / 4.0, abs=1e-6)
    loss.backward()
    assert r_c.grad[2].item() == 0.0 and r_r.grad[2].item() == 0.0  # weight 0: no gradient
    assert r_c.grad[1].item() != 0.0


def test_weighted_trainer_loss_matches_closed_form(tmp_path):
    from datasets import Dataset
    from trl import RewardConfig

    from cai_dpo.stages.rm import build_rm, head_name
    from cai_dpo.training import common_training_args, example_weights
    from cai_dpo.trl_trainers import SoftPreferenceCollator, SoftRewardTrainer

    cfg = load_config(
        "tiny",
        {
            "threads": 1,
            "runs_dir": str(tmp_path / "runs"),
            "rm.weighting": "principle",
            "rm.principle_weights": {"harm": 0.5},
        },
    )
    run = RunStore(cfg.run_dir)
    torch.manual_seed(0)
    model, tok, _, _ = build_rm(cfg, run)
    rows = synthetic_preferences(2, 5)
    rows[0]["weight"] = 3.0  # the data's weight; row 1 falls back to principle 'harm' -> 0.5
    weights = example_weights(rows, cfg.rm.weighting, cfg.rm.principle_weights)
    assert weights == [3.0, 0.5]
    cols = tokenize_pairs(rows, tok, 64, "soft", weights)
    trainer = SoftRewardTrainer(
        model=model,
        args=RewardConfig(**common_training_args(cfg.rm, tmp_path / "ck"), max_length=None),
        data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id),
        train_dataset=Dataset.from_dict(cols),
        processing_class=tok,
        weighting="principle",
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        # a random head, so the two pairs get clearly different rewards
        getattr(model.get_base_model(), head_name(model)).modules_to_save["default"].weight.normal_(0, 1.0)
        model.eval()
        got = trainer.compute_loss(model, dict(batch)).item()
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0]  # noqa: E731
        r_c = torch.stack([score(ids) for ids in cols["chosen_ids"]])
        r_r = torch.stack([score(ids) for ids in cols["rejected_ids"]])
    p = torch.tensor(cols["p_chosen"])
    expected = soft_preference_loss(r_c, r_r, p, torch.tensor(weights)).item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert got != pytest.approx(soft_preference_loss(r_c, r_r, p).item(), rel=1e-4)


def test_rm_manifest_records_weighting(tmp_path):
    cfg = load_config(
        "tiny",
        {
            "threads": 1,
            "runs_dir": str(tmp_path / "runs"),
            "rm.max_steps": 1,
            "rm.eval_fraction": 0.0,
            "rm.weighting": "principle",
            "rm.principle_weights": {"harm": 2.0},
        },
    )
    out = run_rm(cfg, RunStore(cfg.run_dir), preferences=synthetic_preferences(4, 6))
    m = read_manifest(out)
    assert m["config"]["rm"]["weighting"] == "principle" and m["counts"]["weight_mean"] == pytest.approx(2.0)


def test_preference_model_holds_out_whole_prompts(tmp_path, monkeypatch):
    """Several pairs per prompt: every pair of a held-out prompt is held out, so no prompt
    is on both sides of the preference model's train/held-out split."""
    from cai_dpo.splits import prompt_key
    from cai_dpo.stages import rm

    rows = [
        {**row, "pair_id": f"{row['pair_id']}-{k}"} for k in range(4) for row in synthetic_preferences(10, 3)
    ]  # each prompt (a topic) in several rows
    splits, real = [], rm.split_by_prompt

    def spy(*args, **kwargs):
        splits.append(real(*args, **kwargs))
        return splits[-1]

    monkeypatch.setattr(rm, "split_by_prompt", spy)
    cfg = load_config(
        "tiny",
        {"threads": 1, "runs_dir": str(tmp_path / "runs"), "rm.max_steps": 1, "rm.eval_fraction": 0.3},
    )
    out = run_rm(cfg, RunStore(cfg.run_dir), preferences=rows)
    train, held = splits[-1]
    assert held and len(train) + len(held) == len(rows)
    assert {prompt_key(r["prompt"]) for r in train}.isdisjoint({prompt_key(r["prompt"]) for r in held})
    assert read_manifest(out)["metrics"]["heldout"]["n"] == len(held)
