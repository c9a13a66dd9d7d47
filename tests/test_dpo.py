"""DPO stage: soft-label loss, reference = SL-CAI model, learning, resume, iterative rounds."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from cai_dpo.config import ConfigError, load_config
from cai_dpo.models import attach_lora, load_model, save_adapter
from cai_dpo.store import RunStore, read_manifest

TOPICS = [
    "rivers",
    "stars",
    "bread",
    "chess",
    "trains",
    "music",
    "clouds",
    "honey",
    "maps",
    "glass",
    "wolves",
    "paper",
    "salt",
    "bells",
    "kites",
    "lamps",
]
HELD_OUT = ["boats", "tea", "owls", "snow", "coins", "roses", "drums", "caves"]
WORDS = "the a small quiet green old new bright simple careful useful kind warm cold long short".split()


def synthetic_pairs(topics: list[str], seed: int, p_chosen: float = 0.9) -> list[dict]:
    """Pairs whose chosen response always ends in 'safely' and rejected in 'dangerously'."""
    rng = random.Random(seed)
    rows = []
    for t in topics:
        body = " ".join(rng.choice(WORDS) for _ in range(4))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
                "chosen": [{"role": "assistant", "content": f"{body} {t} safely"}],
                "rejected": [{"role": "assistant", "content": f"{body} {t} dangerously"}],
                "p_chosen": p_chosen,
                "pair_id": f"{t}-{seed}",
                "edge_reasons": [],
            }
        )
    return rows


def write_preferences(folder: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def make_sft_adapter(out: Path, seed: int = 0) -> Path:
    """A LoRA on the tiny model with random (non-zero) B, so the SL-CAI model differs from the base."""
    cfg = load_config("tiny")
    torch.manual_seed(seed)
    model, tok = load_model("tiny", trainable=True)
    model = attach_lora(model, cfg.sft.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return save_adapter(model, tok, out, base="tiny")


def make_run(tmp_path: Path, rows: list[dict] | None = None, **overrides) -> tuple:
    settings = {
        "runs_dir": str(tmp_path / "runs"),
        "dpo.max_length": 80,
        "dpo.max_prompt_length": 48,
        "dpo.learning_rate": 5e-3,
        "dpo.beta": 0.5,
        "dpo.save_steps": 100,
        **overrides,
    }
    cfg = load_config("tiny", settings)
    run = RunStore(cfg.run_dir)
    write_preferences(run.data_dir("preferences"), rows if rows is not None else synthetic_pairs(TOPICS, 0))
    make_sft_adapter(run.model_dir("sft"))
    return cfg, run


def sequence_logps(model, tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, computed with plain forwards."""
    out = []
    for key in ("chosen", "rejected"):
        totals = []
        for r in rows:
            prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            totals.append(sum(lp[i - 1, ids[i]] for i in range(len(p_ids), len(ids))))
        out.append(torch.stack(totals))
    return out[0], out[1]


# --------------------------------------------------------------------------- loss and config


def test_conservative_loss_closed_form():
    from cai_dpo.losses import conservative_dpo_loss

    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    p, beta = torch.tensor([0.8, 0.3]), 0.5
    # h = (pc - rc) - (pr - rr) = [1 - (-0.5), 0.5 - (-1)] = [1.5, 1.5]; beta*h = 0.75
    sig = 1 / (1 + math.exp(-0.75))
    expected = [-(0.8 * math.log(sig) + 0.2 * math.log(1 - sig)), -(0.3 * math.log(sig) + 0.7 * math.log(1 - sig))]
    got = conservative_dpo_loss(pc, pr, rc, rr, p, beta)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # p = 1 is standard sigmoid DPO: -log sigma(beta h)
    hard = conservative_dpo_loss(pc, pr, rc, rr, torch.ones(2), beta)
    assert hard.tolist() == pytest.approx([-math.log(sig)] * 2, rel=1e-6)
    # p = 0.5 is minimised at h = 0: zero gradient there
    h0 = torch.zeros(1, requires_grad=True)
    conservative_dpo_loss(
        h0, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([0.5]), beta
    ).sum().backward()
    assert h0.grad.abs().item() < 1e-7


def test_config_validation_names_key_and_fix():
    from cai_dpo.stages.dpo import trl_loss_types, validate_dpo_config

    allowed = trl_loss_types()
    assert {"sigmoid", "ipo", "robust", "hinge"} <= set(allowed)
    cfg = load_config("tiny", {"dpo.loss_type": "nonsense", "dpo.label_mode": "hard"})
    with pytest.raises(ValueError, match="dpo.loss_type.*allows: sigmoid"):
        validate_dpo_config(cfg.dpo)
    base = load_config("tiny").dpo
    # a section built or changed in code is checked again when the stage validates it
    with pytest.raises(ConfigError, match="dpo.label_mode.*label_mode=hard"):
        validate_dpo_config(dataclasses.replace(base, loss_type="ipo", label_mode="soft"))
    validate_dpo_config(dataclasses.replace(base, loss_type="ipo", label_mode="hard"))
    with pytest.raises(ConfigError, match="dpo.label_smoothing.*exo_pair"):
        validate_dpo_config(dataclasses.replace(base, loss_type="exo_pair", label_mode="hard", label_smoothing=0.0))
    # the same values in an override are refused when the config is loaded
    with pytest.raises(ConfigError, match="dpo.label_mode"):
        load_config("tiny", {"dpo.loss_type": "ipo", "dpo.label_mode": "soft"})
    load_config("tiny", {"dpo.loss_type": "ipo", "dpo.label_mode": "hard"})
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config("tiny", {"dpo.loss_type": "exo_pair", "dpo.label_mode": "hard", "dpo.label_smoothing": 0.0})


def test_training_rows_hard_mode_orients_and_drops_ties():
    from cai_dpo.stages.dpo import split_by_prompt, training_rows

    rows = synthetic_pairs(TOPICS[:3], 0)
    rows[0]["p_chosen"], rows[1]["p_chosen"], rows[2]["p_chosen"] = 0.2, 0.5, 0.7
    hard = training_rows(rows, "hard")
    assert hard.counts["hard_swapped"] == 1 and hard.counts["hard_ties_dropped"] == 1
    assert hard.rows[0]["chosen"] == rows[0]["rejected"] and all(r["p_chosen"] == 1.0 for r in hard.rows)
    soft = training_rows(rows, "soft")
    assert [r["p_chosen"] for r in soft.rows] == [0.2, 0.5, 0.7]
    bad = [dict(rows[0], p_chosen=float("nan"))]
    with pytest.raises(ValueError, match="p_chosen"):
        training_rows(bad, "soft")
    train, held = split_by_prompt(training_rows(synthetic_pairs(TOPICS, 0), "soft").rows, 0.25, seed=0)
    assert len(held) == 4 and not {json.dumps(r["prompt"]) for r in held} & {json.dumps(r["prompt"]) for r in train}


# --------------------------------------------------------------------------- trainer: reference and loss


def _trainer(cfg, run, rows, label_mode: str, weighting: str = "none", rpo_alpha: float = 0.0):
    """A DPO trainer built like run_dpo's."""
    import datasets
    from trl import DPOConfig as TrlDPOConfig

    from cai_dpo.stages.dpo import prepare_policy
    from cai_dpo.training import common_training_args
    from cai_dpo.trl_trainers import PreferenceCollatorWithLabels, SoftLabelDPOTrainer

    cfg = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, label_mode=label_mode))
    start = prepare_policy(cfg, run.model_dir("sft"))
    args = TrlDPOConfig(
        **common_training_args(cfg.dpo, run.path("ckpt-" + label_mode), seed=0),
        beta=cfg.dpo.beta,
        max_length=cfg.dpo.max_length,
    )
    trainer = SoftLabelDPOTrainer(
        model=start.model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=PreferenceCollatorWithLabels(
            pad_token_id=start.tokenizer.pad_token_id, max_length=cfg.dpo.max_length
        ),
        processing_class=start.tokenizer,
        peft_config=start.peft_config,
        label_mode=label_mode,
        max_prompt_length=cfg.dpo.max_prompt_length,
        weighting=weighting,
        rpo_alpha=rpo_alpha,
    )
    return trainer, start


def _perturb_lora(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name and ".default." in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05


def test_soft_loss_in_trainer_matches_closed_form_and_reference_is_sft(tmp_path):
    from cai_dpo.losses import conservative_dpo_loss
    from cai_dpo.stages.dpo import training_rows

    cfg, run = make_run(tmp_path)
    rows = training_rows(synthetic_pairs(TOPICS[:2], 0), "soft").rows
    rows[0]["p_chosen"], rows[1]["p_chosen"] = 0.9, 0.3
    sft_model, tok = load_model("tiny", adapter=str(run.model_dir("sft")))
    ref_c, ref_r = sequence_logps(sft_model, tok, rows)
    base_c, _ = sequence_logps(load_model("tiny")[0], tok, rows)
    assert not torch.allclose(ref_c, base_c, atol=1e-3), "the SFT adapter must change the model for this test"

    losses = {}
    for mode in ("soft", "hard"):
        trainer, start = _trainer(cfg, run, rows, mode)
        assert start.mode == "merge" and start.peft_config is not None
        batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
        assert batch["p_chosen"].tolist() == pytest.approx([0.9, 0.3])
        # the reference (DPO adapter switched off) is the SL-CAI model
        got_ref = torch.cat(
            trainer.compute_ref_log_probs(trainer.model, {k: v for k, v in batch.items() if k != "p_chosen"})
        )
        assert got_ref.tolist() == pytest.approx(torch.cat([ref_c, ref_r]).tolist(), abs=1e-3)
        _perturb_lora(trainer.model)
        trainer.model.eval()
        pol_c, pol_r = sequence_logps(trainer.model, tok, rows)
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(trainer.model, batch).item()
        p = torch.tensor([0.9, 0.3]) if mode == "soft" else torch.ones(2)
        expected = conservative_dpo_loss(pol_c, pol_r, ref_c, ref_r, p, cfg.dpo.beta).mean().item()
        assert losses[mode] == pytest.approx(expected, rel=1e-3), mode
    assert losses["soft"] != pytest.approx(losses["hard"], rel=1e-3)


def test_continue_mode_reference_is_frozen_copy_of_sft(tmp_path):
    from cai_dpo.stages.dpo import training_rows

    cfg, run = make_run(tmp_path, **{"dpo.adapter_mode": "continue"})
    rows = training_rows(synthetic_pairs(TOPICS[:2], 0), "soft").rows
    sft_model, tok = load_model("tiny", adapter=str(run.model_dir("sft")))
    ref_c, ref_r = sequence_logps(sft_model, tok, rows)
    trainer, start = _trainer(cfg, run, rows, "soft")
    assert start.mode == "continue" and "ref" in trainer.model.peft_config
    _perturb_lora(trainer.model)  # the trained adapter moves; the reference must not
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    got = torch.cat(trainer.compute_ref_log_probs(trainer.model, {k: v for k, v in batch.items() if k != "p_chosen"}))
    assert got.tolist() == pytest.approx(torch.cat([ref_c, ref_r]).tolist(), abs=1e-3)


# --------------------------------------------------------------------------- end to end


def test_dpo_learns_the_preferred_feature_on_held_out_pairs(tmp_path):
    from cai_dpo.engine import Engine
    from cai_dpo.stages.dpo import implicit_reward_stats, run_dpo, split_by_prompt, training_rows
    from cai_dpo.training import read_metrics_csv

    cfg, run = make_run(tmp_path, **{"dpo.max_steps": 6, "dpo.eval_fraction": 0.25})
    out = run_dpo(cfg, run)
    assert out == run.model_dir("dpo")
    note = json.loads((out / "cai_dpo_base.json").read_text())
    assert note["base"] == "tiny" and note["merge_first"] == ["../sft"]

    rows = read_metrics_csv(run.metrics_dir("dpo") / "log.csv")
    train = [r for r in rows if "rewards/accuracies" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl_proxy"} <= set(train[0])
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]

    manifest = read_manifest(out)
    assert manifest["counts"]["steps"] == 6 and manifest["counts"]["eval_pairs"] == 4
    assert manifest["inputs"]["preferences"].endswith("data/preferences")

    # the saved adapter loads through its chain (base -> merge SFT -> DPO) ...
    policy = Engine(*load_model(str(out)), progress=False)
    reference = Engine(*load_model("tiny", adapter=str(run.model_dir("sft"))), progress=False)
    # ... and reproduces the trainer's final eval figures on the eval split
    _, eval_rows = split_by_prompt(training_rows(synthetic_pairs(TOPICS, 0), "soft").rows, 0.25, cfg.seed)
    stats = implicit_reward_stats(policy, reference, eval_rows, cfg.dpo.beta)
    assert stats["margin"] == pytest.approx(manifest["metrics"]["eval_rewards/margins"], rel=1e-3, abs=1e-4)
    # on prompts and bodies it never saw, the chosen feature now wins
    held = training_rows(synthetic_pairs(HELD_OUT, seed=7), "soft").rows
    before = implicit_reward_stats(reference, reference, held, cfg.dpo.beta)
    after = implicit_reward_stats(policy, reference, held, cfg.dpo.beta)
    assert before["margin"] == 0 and before["accuracy"] == 0
    assert after["accuracy"] >= 0.85 and after["margin"] > 0.1


class _Crash(Exception):
    pass


def test_resume_continues_step_count_in_hard_mode(tmp_path):
    from transformers import TrainerCallback

    from cai_dpo.stages.dpo import run_dpo
    from cai_dpo.training import read_metrics_csv

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash

    cfg, run = make_run(
        tmp_path,
        **{
            "dpo.max_steps": 4,
            "dpo.save_steps": 2,
            "dpo.eval_fraction": 0.0,
            "dpo.label_mode": "hard",
            "dpo.loss_type": "ipo",
        },
    )
    with pytest.raises(_Crash):
        run_dpo(cfg, run, callbacks=[CrashAtStep3()])
    assert (run.root / "checkpoints" / "dpo" / "checkpoint-2").is_dir()
    assert not (run.model_dir("dpo") / "adapter_config.json").exists()
    out = run_dpo(cfg, run)
    manifest = read_manifest(out)
    assert manifest["counts"]["resumed_from_step"] == 2 and manifest["counts"]["steps"] == 4
    steps = [r["step"] for r in read_metrics_csv(run.metrics_dir("dpo") / "log.csv") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    # unchanged inputs: skipped; killed after the last checkpoint: its weights, not a fifth step
    assert run_dpo(cfg, run) == out and read_manifest(out)["created"] == manifest["created"]
    import shutil

    from safetensors.torch import load_file

    before = load_file(str(out / "adapter_model.safetensors"))
    shutil.rmtree(out)
    out = run_dpo(cfg, run)
    assert read_manifest(out)["counts"]["steps"] == 4 and read_manifest(out)["counts"]["resumed_from_step"] == 4
    after = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # other inputs: the old checkpoints are not reused
    write_preferences(run.data_dir("preferences_merged"), synthetic_pairs(TOPICS, 3))
    out = run_dpo(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, max_steps=1)), run)
    assert read_manifest(out)["counts"]["resumed_from_step"] == 0
    assert read_manifest(out)["inputs"]["preferences"].endswith("preferences_merged")


def test_iterative_round_consumes_fresh_pairs(tmp_path):
    from cai_dpo.stages.dpo import run_iterative_dpo

    cfg, run = make_run(tmp_path, **{"dpo.max_steps": 2, "dpo.eval_fraction": 0.0, "dpo.rounds": 2})
    calls = []
    fresh = synthetic_pairs(HELD_OUT, seed=11, p_chosen=0.8)

    def sample(sub_cfg, sub):
        # the round's policy is the previous round's DPO model, loadable through its chain
        policy_dir = sub.model_dir("sft")
        assert json.loads((policy_dir / "cai_dpo_base.json").read_text())["base"] == "tiny"
        load_model(str(policy_dir))
        calls.append(("sample", sub.root, sub_cfg.pairs.source, sub_cfg.labels.db_path))

    def judge(sub_cfg, sub):
        calls.append(("judge", sub.root))
        return write_preferences(sub.data_dir("preferences"), fresh)

    out = run_iterative_dpo(cfg, run, sample=sample, judge=judge, label=lambda c, r: None)
    round2 = run.root / "dpo_rounds" / "round-2"
    assert [c[0] for c in calls] == ["sample", "judge"]
    assert calls[0][1] == round2 and calls[0][2] == "judged_samples"
    assert calls[0][3] == str(run.root / "labels.sqlite")
    manifest = read_manifest(out)
    figures = manifest["metrics"]["rounds"]
    assert [f["round"] for f in figures] == [1, 2]
    assert figures[1]["pairs"] == len(fresh) and figures[1]["counts"]["pairs_used"] == len(fresh)
    assert figures[1]["mean_p_chosen"] == pytest.approx(0.8)
    assert manifest["counts"]["steps_total"] == 4
    # the final adapter chains base -> SFT -> round-1 DPO -> round-2 DPO and loads from models/dpo
    note = json.loads((out / "cai_dpo_base.json").read_text())
    assert [Path(p).name for p in note["merge_first"]] == ["sft", "sft"]
    assert (out / note["merge_first"][1]).resolve() == (round2 / "models" / "sft").resolve()
    policy, tok = load_model(str(out))
    assert policy is not None


def test_cli_has_dpo_command():
    import argparse

    from cai_dpo.cli import _add_dpo_commands, config_from_args

    parser = argparse.ArgumentParser()
    _add_dpo_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dpo", "--profile", "tiny", "--rounds", "2", "-o", "dpo.beta=0.2"])
    assert args.rounds == 2 and args.func.__name__ == "_cmd_dpo"
    assert config_from_args(args).dpo.beta == 0.2


# --------------------------------------------------------------------------- principle weights


def test_weighted_dpo_loss_closed_form_and_zero_weight_gradient():
    from cai_dpo.losses import weighted_dpo_loss

    pc = torch.tensor([-10.0, -4.0, -6.0], requires_grad=True)
    pr = torch.tensor([-12.0, -3.0, -5.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -4.5, -6.0]), torch.tensor([-11.5, -2.0, -5.0])
    p, w, beta = torch.tensor([0.8, 1.0, 0.6]), torch.tensor([3.0, 1.0, 0.0]), 0.5
    # m = (pc - rc) - (pr - rr) = [1.5, 1.5, 0]; loss_i = -(p logσ(βm) + (1-p) logσ(-βm))
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    losses = [-(0.8 * ls(0.75) + 0.2 * ls(-0.75)), -ls(0.75), -(0.6 * ls(0.0) + 0.4 * ls(0.0))]
    expected = (3.0 * losses[0] + 1.0 * losses[1] + 0.0 * losses[2]) / 4.0
    got = weighted_dpo_loss(pc, pr, rc, rr, p, w, beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert pc.grad[2].item() == 0.0 and pr.grad[2].item() == 0.0  # weight 0: no gradient from that pair
    assert pc.grad[0].item() != 0.0
    # without weights it is the plain mean
    assert weighted_dpo_loss(pc.detach(), pr.detach(), rc, rr, p, None, beta).item() == pytest.approx(sum(losses) / 3)


def test_rpo_term_adds_the_chosen_mean_token_nll():
    from cai_dpo.losses import mean_chosen_nll, weighted_dpo_loss

    pc = torch.tensor([-10.0, -4.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    p, w, n, alpha, beta = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]), torch.tensor([5, 2]), 0.5, 0.5
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    # h = [1.5, 1.5]; NLL per token = [10/5, 4/2] = [2, 2]
    losses = [-ls(0.75) + alpha * 2.0, -ls(0.75) + alpha * 2.0]
    assert mean_chosen_nll(pc, n).tolist() == pytest.approx([2.0, 2.0])
    assert mean_chosen_nll(pc, torch.tensor([0, 2])).tolist() == pytest.approx([10.0, 2.0])  # a count of 0 is 1
    got = weighted_dpo_loss(pc, pr, rc, rr, p, w, beta, rpo_alpha=alpha, chosen_nll=mean_chosen_nll(pc, n))
    assert got.item() == pytest.approx((losses[0] + 3 * losses[1]) / 4, rel=1e-6)
    got.backward()
    # d/dpc_i = w_i/Σw · (-β·σ(-βh_i) - α/n_i): the NLL term pulls the chosen log-prob up
    sig = 1 / (1 + math.exp(0.75))
    assert pc.grad.tolist() == pytest.approx([0.25 * (-beta * sig - alpha / 5), 0.75 * (-beta * sig - alpha / 2)])
    assert weighted_dpo_loss(pc.detach(), pr, rc, rr, p, None, beta).item() == pytest.approx(-ls(0.75))  # alpha 0
    with pytest.raises(ValueError, match="chosen_nll"):
        weighted_dpo_loss(pc, pr, rc, rr, p, None, beta, rpo_alpha=1.0)


def test_rpo_alpha_needs_the_sigmoid_loss_and_a_non_negative_value():
    from cai_dpo.config import DPOSection
    from cai_dpo.stages.dpo import validate_dpo_config

    with pytest.raises(ValueError, match=r"dpo.rpo_alpha .* dpo.loss_type=sigmoid"):
        validate_dpo_config(DPOSection(loss_type="ipo", label_mode="hard", rpo_alpha=1.0))
    with pytest.raises(ValueError, match=r"dpo.rpo_alpha.*must be >= 0"):
        load_config("tiny", {"dpo.rpo_alpha": -1})


def test_training_rows_weights_from_column_or_principles():
    from cai_dpo.stages.dpo import training_rows

    recs = synthetic_pairs(TOPICS[:3], 0)
    recs[0]["weight"], recs[0]["principle_ids"] = 0.25, ["harm-physical"]  # the data's weight wins
    recs[1]["weight"], recs[1]["principle_ids"] = None, ["harm-physical", "help-answer"]
    recs[2]["principle_ids"] = []
    pw = {"harm-physical": 3.0}
    got = training_rows(recs, "soft", weighting="principle", principle_weights=pw).rows
    assert [r["weight"] for r in got] == pytest.approx([0.25, 2.0, 1.0])
    assert [r["weight"] for r in training_rows(recs, "soft", principle_weights=pw).rows] == [1.0, 1.0, 1.0]
    recs[0]["weight"] = -1.0
    with pytest.raises(ValueError, match=r"prefs: row 0 field 'weight'"):
        training_rows(recs, "soft", "prefs", weighting="principle")


def test_weighting_needs_the_sigmoid_loss():
    from cai_dpo.config import DPOSection
    from cai_dpo.stages.dpo import validate_dpo_config

    with pytest.raises(ValueError, match=r"dpo.weighting=principle .* dpo.loss_type=sigmoid"):
        validate_dpo_config(DPOSection(loss_type="ipo", label_mode="hard", weighting="principle"))


def test_weighted_loss_in_trainer_matches_closed_form(tmp_path):
    from cai_dpo.losses import weighted_dpo_loss
    from cai_dpo.stages.dpo import training_rows

    cfg, run = make_run(tmp_path)
    recs = synthetic_pairs(TOPICS[:2], 0)  # one batch of the tiny profile (batch_size 2)
    for rec, w, p in zip(recs, (2.0, 0.5), (0.9, 0.3)):
        rec["weight"], rec["p_chosen"] = w, p
    sft_model, tok = load_model("tiny", adapter=str(run.model_dir("sft")))
    for mode in ("soft", "hard"):
        rows = training_rows(recs, mode, weighting="principle").rows
        ref_c, ref_r = sequence_logps(sft_model, tok, rows)
        trainer, _ = _trainer(cfg, run, rows, mode, weighting="principle")
        batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
        assert batch["weight"].tolist() == [r["weight"] for r in rows]
        _perturb_lora(trainer.model)
        trainer.model.eval()
        pol_c, pol_r = sequence_logps(trainer.model, tok, rows)
        with torch.no_grad():
            got = trainer.compute_loss(trainer.model, batch).item()
        p = torch.tensor([r["p_chosen"] for r in rows])
        expected = weighted_dpo_loss(
            pol_c, pol_r, ref_c, ref_r, p, torch.tensor([r["weight"] for r in rows]), cfg.dpo.beta
        ).item()
        unweighted = weighted_dpo_loss(pol_c, pol_r, ref_c, ref_r, p, None, cfg.dpo.beta).item()
        assert got == pytest.approx(expected, rel=1e-3), mode
        assert got != pytest.approx(unweighted, rel=1e-3)


def test_rpo_loss_in_trainer_matches_closed_form(tmp_path):
    from cai_dpo.losses import mean_chosen_nll, weighted_dpo_loss
    from cai_dpo.stages.dpo import training_rows

    cfg, run = make_run(tmp_path)
    recs = synthetic_pairs(TOPICS[:2], 0)
    sft_model, tok = load_model("tiny", adapter=str(run.model_dir("sft")))
    rows = training_rows(recs, "hard").rows
    ref_c, ref_r = sequence_logps(sft_model, tok, rows)
    n = torch.tensor(
        [
            len(
                tok(tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            - len(
                tok(
                    tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False,
                )["input_ids"]
            )
            for r in rows
        ]
    )
    trainer, _ = _trainer(cfg, run, rows, "hard", rpo_alpha=0.5)
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    _perturb_lora(trainer.model)
    trainer.model.eval()
    pol_c, pol_r = sequence_logps(trainer.model, tok, rows)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    ones = torch.ones(len(rows))
    expected = weighted_dpo_loss(
        pol_c, pol_r, ref_c, ref_r, ones, None, cfg.dpo.beta, rpo_alpha=0.5, chosen_nll=mean_chosen_nll(pol_c, n)
    )
    plain = weighted_dpo_loss(pol_c, pol_r, ref_c, ref_r, ones, None, cfg.dpo.beta).item()
    assert got == pytest.approx(expected.item(), rel=1e-3)
    assert got - plain == pytest.approx(0.5 * (-pol_c / n).mean().item(), rel=1e-3)  # the NLL term, and only it


def test_same_config_trains_the_same_dpo_adapter_whatever_the_process_rng(tmp_path):
    """DPO's fresh adapter (TRL wraps the peft_config) is reproducible too: the stage seeds first."""
    from safetensors.torch import load_file

    from cai_dpo.stages.dpo import run_dpo

    outs = []
    for disturb in (1, 2):
        cfg, run = make_run(tmp_path / f"rng{disturb}", **{"dpo.max_steps": 2})
        torch.manual_seed(disturb)
        outs.append(load_file(str(run_dpo(cfg, run) / "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
