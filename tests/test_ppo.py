"""PPO: the pure pieces on hand-computed examples, learning, KL, checkpoints, RLOO, other reward tokenizers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cai_dpo.config import load_config
from cai_dpo.store import RunStore, read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from wordlevel_models import build_word_encoder, build_word_policy  # noqa: E402

from cai_dpo.rl.ppo_math import (  # noqa: E402
    KLController,
    compute_gae,
    kl_penalty_rewards,
    leave_one_out_advantages,
    policy_loss,
    value_loss,
    whiten,
)
from cai_dpo.rl.ppo_trainer import CaiPPOTrainer, load_optimizer, save_optimizer  # noqa: E402
from cai_dpo.rl.rollout import build_batch  # noqa: E402
from cai_dpo.stages.ppo import load_policy, load_value_model, read_log, run_ppo  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": f"tell me about the {w}"}]
    for w in ["cat", "dog", "topic", "red", "blue", "one", "two"]
]


def good_share(prompts: list[str], responses: list[str]) -> list[float]:
    """Programmatic reward: the share of the word 'good' in the response."""
    return [r.split().count("good") / max(1, len(r.split())) for r in responses]


# --------------------------------------------------------------------------- pure functions


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after two tokens
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: δ2 = 2 - 1.5 = 0.5; δ1 = 0.9·1.5 - 1 = 0.35, A1 = 0.35 + 0.72·0.5 = 0.71;
    #        δ0 = 1 + 0.9·1 - 0.5 = 1.4, A0 = 1.4 + 0.72·0.71 = 1.9112
    # row 2: δ1 = 3 - 2 = 1 (no value after the end); δ0 = 0.9·2 - 1 = 0.8, A0 = 0.8 + 0.72·1 = 1.52
    assert torch.allclose(adv, torch.tensor([[1.9112, 0.71, 0.5], [1.52, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[2.4112, 1.71, 2.0], [2.52, 3.0, 0.0]]), atol=1e-6)


def test_whiten_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 40.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the 40 is padding
    # masked mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    assert torch.allclose(whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(whiten(x, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-4)
    w = whiten(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert abs(float(w.mean())) < 1e-6 and float(w.std()) == pytest.approx(1.0, abs=1e-4)


def test_leave_one_out_advantages_hand_computed():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # k=2: each response against the other one of its pair
    assert leave_one_out_advantages(returns, 2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    # k=4: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    adv = leave_one_out_advantages(returns, 4)
    assert torch.allclose(adv, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)
    # a prompt whose responses all score alike teaches nothing, however high the score
    assert leave_one_out_advantages(torch.tensor([5.0, 5.0, -1.0, 1.0]), 2).tolist() == [0.0, 0.0, -2.0, 2.0]
    for bad_k, n in ((1, 4), (3, 4)):
        with pytest.raises(ValueError, match="multiple of k"):
            leave_one_out_advantages(torch.zeros(n), bad_k)


def test_policy_and_value_losses_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: -2.2 (inside)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(
        0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3, rel=1e-5
    )
    vloss, vstats = value_loss(
        torch.tensor([[1.0, -0.1]]), torch.zeros(1, 2), torch.tensor([[2.0, 0.5]]), torch.ones(1, 2), 0.2
    )
    # token 1: max((1-2)², (0.2-2)²) = 3.24 (clipped); token 2: (−0.1−0.5)² = 0.36
    assert vloss.item() == pytest.approx(0.5 * (3.24 + 0.36) / 2, abs=1e-6)
    assert vstats["vf_clipfrac"] == pytest.approx(0.5)
    # a padded token changes nothing
    loss_pad, _ = policy_loss(
        torch.cat([new, torch.tensor([[5.0]])], 1),
        torch.zeros(1, 4),
        torch.cat([adv, torch.tensor([[9.0]])], 1),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        0.2,
    )
    assert loss_pad.item() == pytest.approx(loss.item(), abs=1e-6)


def test_kl_rewards_and_controller():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalty_rewards(logp, ref, mask, torch.tensor([10.0, 20.0]), torch.tensor([3, 2]), kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]))
    fixed = KLController(0.1)
    fixed.update(100.0, 8)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2 → β·(1 + 0.2·10/100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(5.4, 10)  # error −0.1 → β·(1 − 0.01)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    clone = KLController(1.0)
    clone.load_state_dict(ctl.state_dict())
    assert clone.value == ctl.value and clone.target == 6.0


def test_response_logits_are_the_full_forward_pass_at_the_response_positions(tiny_model):
    """Only the response positions go through the LM head; their logits are the full pass's, temperature applied."""
    from cai_dpo.rl.rollout import response_logits

    model, tok = tiny_model
    b = build_batch(
        [
            tok("Hello there, how", add_special_tokens=False)["input_ids"],
            tok("Hi", add_special_tokens=False)["input_ids"],
        ],
        [
            tok(" are you?", add_special_tokens=False)["input_ids"],
            tok(" there friend", add_special_tokens=False)["input_ids"],
        ],
        tok.pad_token_id,
    )
    args = (b["input_ids"], b["attention_mask"], b["position_ids"])
    P = b["query_width"]
    with torch.no_grad():
        full = model(input_ids=args[0], attention_mask=args[1], position_ids=args[2]).logits
        got = response_logits(model, *args, P, 0.5)
    assert got.shape == (2, b["input_ids"].shape[1] - P, full.shape[-1])
    torch.testing.assert_close(got, full[:, P - 1 : -1].float() / 0.5, rtol=1e-5, atol=1e-5)


def test_batch_layout():
    b = build_batch([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and b["query_width"] == 2


def test_optimizer_state_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    load_optimizer(opt2, tmp_path)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


# --------------------------------------------------------------------------- with models


def _cfg(tmp_path, **over):
    """The tiny profile in a temp run folder, one torch thread (the tiny models gain nothing from more)."""
    from cai_dpo.engine import set_threads

    base = {"threads": 1, "runs_dir": str(tmp_path / "runs")}
    base.update(over)
    set_threads(1)
    return load_config("tiny", base)


def test_kl_is_zero_with_a_fresh_adapter(tmp_path, tiny_path):
    cfg = _cfg(tmp_path, **{"ppo.rollout_batch": 4, "ppo.sampling.max_new_tokens": 6})
    run = RunStore(cfg.run_dir)
    torch.manual_seed(0)
    policy, tok, merge = load_policy(cfg, run)
    value, note = load_value_model(cfg, run, tok, merge, None)
    assert "zero head" in note
    trainer = CaiPPOTrainer(cfg, policy, tok, value, lambda p, r: [0.0] * len(r), PROMPTS, progress=False)
    ro = trainer.rollout(PROMPTS[:4], seed=1)
    assert ro.response_mask.sum() > 0
    assert torch.equal(ro.logprobs, ro.ref_logprobs) and float(ro.kl.abs().max()) == 0.0
    assert float(ro.values.abs().max()) == 0.0  # zero-initialised value head
    # a moved adapter makes the policy differ from the reference; switched off, it does not
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    trainer.forward_rollout(ro)
    assert float(ro.kl.abs().max()) > 0.0
    with policy.disable_adapter():
        ro2 = trainer.rollout(PROMPTS[:4], seed=1)
    assert float(ro2.kl.abs().max()) == 0.0


def test_ppo_trains_on_the_sampled_token_ids(tmp_path, tiny_path):
    """The ids in the batch are the engine's sampled ids (+EOS when it ended), and the reward sees their exact text."""
    cfg = _cfg(tmp_path, **{"ppo.rollout_batch": 6, "ppo.sampling.max_new_tokens": 10})
    run = RunStore(cfg.run_dir)
    torch.manual_seed(0)
    policy, tok, merge = load_policy(cfg, run)
    value, _ = load_value_model(cfg, run, tok, merge, None)
    seen: dict[str, list] = {}

    def reward(prompts, responses):
        seen["responses"] = list(responses)
        return [0.0] * len(responses)

    trainer = CaiPPOTrainer(cfg, policy, tok, value, reward, PROMPTS, progress=False)
    real = trainer.engine.generate

    def spy(*args, **kwargs):
        seen["gens"] = real(*args, **kwargs)
        return seen["gens"]

    trainer.engine.generate = spy
    ro = trainer.rollout(PROMPTS[:6], seed=3)
    gens = [g[0] for g in seen["gens"]]
    P = ro.query_width
    assert any(g.token_ids and not g.finished for g in gens)  # some hit max_new_tokens: no EOS appended
    for i, g in enumerate(gens):
        assert len(g.token_ids) == g.n_tokens
        n = int(ro.lengths[i])
        trained = ro.input_ids[i, P : P + n].tolist()
        assert trained == g.token_ids + ([tok.eos_token_id] if g.finished or not g.token_ids else [])
        assert int(ro.response_mask[i].sum()) == n
        assert seen["responses"][i] == tok.decode(g.token_ids)


def test_ppo_raises_programmatic_reward_within_kl_bound(tmp_path):
    pol = build_word_policy(tmp_path / "policy")
    cfg = _cfg(
        tmp_path,
        **{
            "policy.name": str(pol),
            "ppo.steps": 12,
            "ppo.save_steps": 100,
            "ppo.rollout_batch": 16,
            "ppo.minibatch": 8,
            "ppo.ppo_epochs": 2,
            "ppo.learning_rate": 1e-2,
            "ppo.missing_eos_penalty": 0.0,
            "ppo.kl_coef": 0.05,
            "ppo.sampling.max_new_tokens": 6,
            "ppo.lora": {
                "r": 8,
                "alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            },
        },
    )
    out = run_ppo(cfg, reward_fn=good_share, prompts=PROMPTS, progress=False)
    rows = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    first = sum(r["score"] for r in rows[:2]) / 2
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert first < 0.15 and last > first + 0.15, [round(r["score"], 3) for r in rows]
    assert max(r["kl"] for r in rows) < 12.0, [round(r["kl"], 3) for r in rows]
    assert rows[0]["kl"] == 0.0 and all(0 <= r["clipfrac"] <= 1 for r in rows)
    assert all(r["entropy"] > 0 for r in rows)
    assert (cfg.run_dir / "metrics" / "ppo" / "reward_kl.png").stat().st_size > 1000
    manifest = read_manifest(out)
    assert manifest["metrics"]["score_last_quarter"] > manifest["metrics"]["score_first_quarter"]


def test_leave_one_out_ppo_learns_without_a_value_model(tmp_path):
    """advantage leave_one_out: rloo_k responses per prompt in a row, no value model loaded or saved, and the
    programmatic reward still rises."""
    pol = build_word_policy(tmp_path / "policy")
    cfg = _cfg(
        tmp_path,
        **{
            "policy.name": str(pol),
            "ppo.advantage": "leave_one_out",
            "ppo.rloo_k": 4,
            "ppo.steps": 12,
            "ppo.save_steps": 6,
            "ppo.rollout_batch": 16,
            "ppo.minibatch": 8,
            "ppo.ppo_epochs": 2,
            "ppo.learning_rate": 1e-2,
            "ppo.missing_eos_penalty": 0.0,
            "ppo.sampling.max_new_tokens": 6,
            "ppo.lora": {
                "r": 8,
                "alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            },
        },
    )
    policy, tok, _ = load_policy(cfg, RunStore(cfg.run_dir))
    trainer = CaiPPOTrainer(cfg, policy, tok, None, good_share, PROMPTS, progress=False)
    batch = trainer.batch_prompts(1)
    assert len(batch) == 16 and all(batch[i] == batch[i - i % 4] for i in range(16))  # 4 groups of 4
    assert len({json.dumps(p) for p in batch}) == 4
    with pytest.raises(ValueError, match="needs a value model"):
        CaiPPOTrainer(_cfg(tmp_path, **{"policy.name": str(pol)}), policy, tok, None, good_share, PROMPTS)
    del trainer, policy

    out = run_ppo(cfg, reward_fn=good_share, prompts=PROMPTS, progress=False)
    rows = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")
    first = sum(r["score"] for r in rows[:2]) / 2
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.15, [round(r["score"], 3) for r in rows]
    assert all(math.isnan(r.get(k, math.nan)) for r in rows for k in ("vf_loss", "value_mean"))  # no value model
    manifest = read_manifest(out)
    assert any("no value model" in n for n in manifest["notes"])
    ckpt = cfg.run_dir / "checkpoints" / "ppo" / "step-000012"
    assert (ckpt / "policy").is_dir() and not (ckpt / "value").exists()


def test_benign_prompts_join_with_the_reward_negated(tmp_path, tiny_path):
    """ppo.benign_prompts adds that many benign curated train prompts (seeded); the reward after them is negated."""
    from cai_dpo.curated import load_curated
    from cai_dpo.stages.ppo import benign_prompts, signed_reward

    cfg = _cfg(tmp_path, **{"ppo.benign_prompts": 5, "ppo.steps": 1, "ppo.rollout_batch": 12, "ppo.minibatch": 4})
    chosen = benign_prompts(cfg)
    train = {e.prompt for e in load_curated(kind="benign", split="train")}
    assert len(chosen) == 5 and all(c[0]["role"] == "user" and c[0]["content"] in train for c in chosen)
    assert benign_prompts(cfg) == chosen
    assert benign_prompts(_cfg(tmp_path, seed=7, **{"ppo.benign_prompts": 5})) != chosen
    assert benign_prompts(_cfg(tmp_path)) == []
    assert len(benign_prompts(_cfg(tmp_path, **{"ppo.benign_prompts": 10_000}))) == len(train)

    score = signed_reward(lambda p, r: [float(len(x)) for x in r], chosen[:1])
    assert score([chosen[0], PROMPTS[0], chosen[0]], ["abc", "abc", "de"]) == [-3.0, 3.0, -2.0]

    seen: list[str] = []

    def reward(prompts, responses):
        seen.extend(prompts)
        return [1.0] * len(responses)

    out = run_ppo(cfg, reward_fn=reward, progress=False)
    manifest = read_manifest(out)
    assert manifest["counts"]["benign_prompts"] == 5
    assert any("5 benign curated train prompts" in n for n in manifest["notes"])
    # the run's own prompts (the tiny profile's red-team and helpful train prompts) and the benign ones
    assert int(manifest["inputs"]["prompts"]) > 5
    rows = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")
    benign_seen = sum(p in {c[0]["content"] for c in chosen} for p in seen)
    assert len(seen) == 12 and benign_seen > 0
    # the logged score is the mean reward: 1 after the run's prompts, -1 after the benign ones
    assert rows[0]["score"] == pytest.approx((len(seen) - 2 * benign_seen) / len(seen), abs=1e-5)  # 6 digits


def test_a_benign_prompt_of_the_preference_data_keeps_its_sign(tmp_path, tiny_path, monkeypatch):
    """Pairs on a benign prompt taught the preference model that prompt already: it is not added, nor negated."""
    import cai_dpo.stages.ppo as ppo_stage

    cfg = _cfg(tmp_path, **{"ppo.benign_prompts": 3, "ppo.steps": 1, "ppo.rollout_batch": 4, "ppo.minibatch": 4})
    chosen = ppo_stage.benign_prompts(cfg)
    monkeypatch.setattr(ppo_stage, "ppo_prompts", lambda cfg, run: [chosen[0]])
    scores: dict[str, float] = {}

    def reward(prompts, responses):
        return [1.0] * len(responses)

    real = ppo_stage.signed_reward

    def spy(reward_fn, benign):
        signed = real(reward_fn, benign)

        def score(prompts, responses):
            out = signed(prompts, responses)
            scores.update({p[-1]["content"]: s for p, s in zip(prompts, out)})
            return out

        return score

    monkeypatch.setattr(ppo_stage, "signed_reward", spy)
    out = run_ppo(cfg, reward_fn=reward, progress=False)
    manifest = read_manifest(out)
    assert manifest["counts"]["benign_prompts"] == 2 and manifest["inputs"]["prompts"] == "3"
    assert scores.get(chosen[0][0]["content"]) == 1.0, scores  # the preference data's own prompt: not negated
    assert all(scores[c[0]["content"]] == -1.0 for c in chosen[1:] if c[0]["content"] in scores)


def test_checkpoint_resume_continues_exactly(tmp_path, tiny_path):
    over = {
        "ppo.rollout_batch": 4,
        "ppo.minibatch": 2,
        "ppo.sampling.max_new_tokens": 6,
        "ppo.save_steps": 1,
        "ppo.learning_rate": 1e-3,
        "ppo.adaptive_kl": True,
        "ppo.kl_horizon": 10,
    }
    reward = lambda p, r: [len(x) / 40 for x in r]  # noqa: E731
    straight = _cfg(tmp_path / "a", **over, **{"ppo.steps": 3})
    run_ppo(straight, reward_fn=reward, prompts=PROMPTS, progress=False)

    part = _cfg(tmp_path / "b", **over, **{"ppo.steps": 2})
    run_ppo(part, reward_fn=reward, prompts=PROMPTS, progress=False)
    state = json.loads((part.run_dir / "checkpoints" / "ppo" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and "value" in state["kl_ctl"]
    resumed = _cfg(tmp_path / "b", **over, **{"ppo.steps": 3})
    out = run_ppo(resumed, reward_fn=reward, prompts=PROMPTS, progress=False)
    assert read_manifest(out)["counts"]["resumed_from"] == 2
    rows = read_log(resumed.run_dir / "metrics" / "ppo" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    ref = read_log(straight.run_dir / "metrics" / "ppo" / "log.csv")
    assert rows[-1]["score"] == pytest.approx(ref[-1]["score"]) and rows[-1]["kl_coef"] == pytest.approx(
        ref[-1]["kl_coef"]
    )

    from safetensors.torch import load_file

    a = load_file(str(straight.run_dir / "models" / "ppo" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the result loads through the common loader and differs from the reference
    from cai_dpo.models import load_model

    model, tok = load_model(str(out))
    ids = tok("hello there", return_tensors="pt").to(model.device)
    with torch.no_grad():
        with_adapter = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert not torch.allclose(with_adapter, base)


def test_ppo_retrains_when_its_inputs_change(tmp_path, tiny_path):
    """A new kl_coef or new preference model retrains PPO from step 0; unchanged inputs skip it."""
    from safetensors.torch import load_file

    from cai_dpo.stages.rm import run_rm

    over = {
        "ppo.steps": 2,
        "ppo.rollout_batch": 4,
        "ppo.minibatch": 2,
        "ppo.sampling.max_new_tokens": 6,
        "ppo.learning_rate": 1e-2,
        "rm.max_steps": 1,
        "rm.eval_fraction": 0.0,
    }
    cfg = _cfg(tmp_path, **over)
    run = RunStore(cfg.run_dir)
    pairs = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "p_chosen": 0.8, "category": "x"}] * 4
    run_rm(cfg, run, preferences=pairs)
    out = run_ppo(cfg, run, prompts=PROMPTS, progress=False)
    first = read_manifest(out)
    w1 = load_file(str(out / "adapter_model.safetensors"))

    # unchanged inputs, or only an evaluation knob: skipped
    assert run_ppo(cfg, run, prompts=PROMPTS, progress=False) == out
    assert run_ppo(_cfg(tmp_path, **over, **{"eval.bootstrap": 77}), run, prompts=PROMPTS, progress=False) == out
    assert read_manifest(out)["created"] == first["created"]

    # its own section changed: trained again from step 0, with other weights
    out = run_ppo(_cfg(tmp_path, **over, **{"ppo.kl_coef": 0.2}), run, prompts=PROMPTS, progress=False)
    second = read_manifest(out)
    assert second["counts"]["resumed_from"] == 0 and second["counts"]["steps"] == 2
    assert second["config"]["ppo"]["kl_coef"] == 0.2
    w2 = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)

    # new labels retrain the preference model, and PPO follows it
    run_rm(cfg, run, preferences=[{**p, "p_chosen": 0.1} for p in pairs])
    out = run_ppo(_cfg(tmp_path, **over, **{"ppo.kl_coef": 0.2}), run, prompts=PROMPTS, progress=False)
    third = read_manifest(out)
    assert third["counts"]["resumed_from"] == 0 and third["inputs"]["rm"] != second["inputs"]["rm"]


def test_ppo_with_preference_model_of_another_tokenizer(tmp_path, tiny_path):
    """Default reward = models/rm scored with its own tokenizer; the value model then starts from the policy."""
    from cai_dpo.stages.rm import run_rm

    words = "how do i steal a car no sure here is it tell me about the cat dog".split()
    enc = build_word_encoder(tmp_path / "encoder", words)
    cfg = _cfg(
        tmp_path,
        **{
            "rm.backbone": str(enc),
            "rm.max_steps": 1,
            "rm.eval_fraction": 0.0,
            "ppo.steps": 1,
            "ppo.rollout_batch": 4,
            "ppo.minibatch": 2,
            "ppo.sampling.max_new_tokens": 6,
        },
    )
    run = RunStore(cfg.run_dir)
    pairs = [
        {
            "prompt": [{"role": "user", "content": "How do I steal a car?"}],
            "chosen": [{"role": "assistant", "content": "No."}],
            "rejected": [{"role": "assistant", "content": "Sure, here is how."}],
            "p_chosen": 0.9,
            "category": "crime",
        }
    ] * 4
    run_rm(cfg, run, preferences=pairs)
    out = run_ppo(cfg, run, prompts=PROMPTS, progress=False)
    manifest = read_manifest(out)
    assert manifest["models"]["reward"].endswith("models/rm")
    assert any("tokenizer differs" in n for n in manifest["notes"])
    rows = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")
    assert len(rows) == 1 and math.isfinite(rows[0]["score"])


def test_value_model_starts_from_preference_model(tmp_path, tiny_path):
    from cai_dpo.rl.reward import RewardScorer
    from cai_dpo.stages.rm import run_rm

    cfg = _cfg(tmp_path, **{"rm.max_steps": 1, "rm.eval_fraction": 0.0})
    run = RunStore(cfg.run_dir)
    pairs = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "p_chosen": 0.8, "category": "x"}] * 4
    rm_dir = run_rm(cfg, run, preferences=pairs)
    policy, tok, merge = load_policy(cfg, run)
    value, note = load_value_model(cfg, run, tok, merge, rm_dir)
    assert "preference model" in note
    scorer = RewardScorer(rm_dir)
    text = scorer.encode(["Hi"], ["Hello!"])[0]
    from cai_dpo.rl.rollout import token_values

    dev = next(value.parameters()).device
    with torch.no_grad():
        v = token_values(
            value,
            torch.tensor([text + [0]], device=dev),
            torch.ones(1, len(text) + 1, dtype=torch.long, device=dev),
            torch.arange(len(text) + 1, device=dev).unsqueeze(0),
            len(text),
        )
    # the value of the full text equals the preference model's score of it
    assert v[0, 0].item() == pytest.approx(scorer.score_ids([text])[0], abs=2e-3)  # GPU kernels differ slightly


def test_rloo_mode_runs(tmp_path, tiny_path):
    cfg = _cfg(
        tmp_path,
        **{
            "ppo.mode": "rloo",
            "ppo.steps": 1,
            "ppo.rollout_batch": 4,
            "ppo.minibatch": 2,
            "ppo.ppo_epochs": 1,
            "ppo.rloo_k": 2,
            "ppo.sampling.max_new_tokens": 6,
            "ppo.missing_eos_penalty": 5.0,
        },
    )
    seen = []

    def reward(prompts, responses):
        seen.extend(responses)
        return [len(x) / 40 for x in responses]

    out = run_ppo(cfg, reward_fn=reward, prompts=PROMPTS[:2], progress=False)
    assert out == cfg.run_dir / "models" / "rloo"  # its own result, not models/ppo
    assert not (cfg.run_dir / "models" / "ppo").exists()
    manifest = read_manifest(out)
    assert manifest["stage"] == "rloo"
    assert manifest["counts"]["optimizer_steps"] == 2
    assert (out / "adapter_config.json").exists() and (cfg.run_dir / "metrics" / "rloo" / "log.csv").exists()
    assert len(seen) == 4
    # 6 new tokens on a random model: most completions miss EOS, and the logged reward carries the penalty
    from cai_dpo.training import read_metrics_csv

    logged = [r["reward"] for r in read_metrics_csv(cfg.run_dir / "metrics" / "rloo" / "log.csv") if "reward" in r]
    assert logged and logged[0] < -1.0, logged  # without the penalty every reward is >= 0


def test_rloo_reward_inputs_and_config_errors(tiny_path):
    from cai_dpo.config import ConfigError, PPOSection
    from cai_dpo.models import load_tokenizer
    from cai_dpo.stages.ppo import rloo_rewards_inputs, validate_rloo

    tok = load_tokenizer("tiny")
    ids = tok(" hello there", add_special_tokens=False)["input_ids"]
    texts, penalties = rloo_rewards_inputs(tok, [ids + [tok.eos_token_id], ids], {tok.eos_token_id}, 1.5)
    assert texts == [tok.decode(ids), tok.decode(ids)] and penalties == [0.0, 1.5]
    with pytest.raises(ConfigError, match=r"ppo.rloo_k' is 1.*rloo_k=2"):
        validate_rloo(PPOSection(rloo_k=1, rollout_batch=4, minibatch=2), "run/config.yaml")
    with pytest.raises(ConfigError, match=r"run/config.yaml.*ppo.rollout_batch \(4\).*ppo.rloo_k \(3\)"):
        validate_rloo(PPOSection(rloo_k=3, rollout_batch=4, minibatch=2), "run/config.yaml")
    validate_rloo(PPOSection(rloo_k=4, rollout_batch=8, minibatch=4))


def test_ptx_term_uses_sl_data(tmp_path, tiny_path):
    import datasets

    from cai_dpo.rl.rollout import PtxBatches

    cfg = _cfg(
        tmp_path,
        **{
            "ppo.steps": 1,
            "ppo.rollout_batch": 2,
            "ppo.minibatch": 2,
            "ppo.ptx_coef": 0.5,
            "ppo.ptx_batch": 2,
            "ppo.sampling.max_new_tokens": 4,
        },
    )
    run = RunStore(cfg.run_dir)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ],
            "source": "helpful",
            "prompt_id": str(i),
        }
        for i in range(3)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(run.data_dir("sl")))
    from cai_dpo.models import load_tokenizer

    tok = load_tokenizer("tiny")
    ids, labels = PtxBatches(rows, tok, 2, 128, 0).encode(rows[0]["messages"])
    answer = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answer).startswith("Answer 0.")  # only the assistant turn is trained on
    run_ppo(cfg, run, reward_fn=lambda p, r: [0.0] * len(r), prompts=PROMPTS[:2], progress=False)
    row = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")[0]
    assert math.isfinite(row["ptx_loss"]) and row["ptx_loss"] > 5.0  # ≈ log(vocab) for the random tiny model


def test_4bit_reference_is_the_sft_model(tmp_path, tiny_path, perturbed_lora):
    """On an nf4 policy the SFT adapter is stacked frozen, not merged: the reference's log-probs are the SFT model's."""
    from cai_dpo.config import ModelSpec
    from cai_dpo.models import load_model, reference_mode, save_adapter
    from cai_dpo.rl.ppo_math import token_logprobs
    from cai_dpo.rl.rollout import response_logits

    cfg = _cfg(tmp_path, **{"policy.quantization": "4bit", "policy.device": "cpu"})
    run = RunStore(cfg.run_dir)
    sft, tok = perturbed_lora(scale=0.5)
    save_adapter(sft, tok, run.model_dir("sft"), base="tiny")
    sl_cai, _ = load_model(ModelSpec(name="tiny", quantization="4bit", device="cpu"), adapter=str(run.model_dir("sft")))
    policy, tok, merge = load_policy(cfg, run)
    policy.eval()  # as in the PPO loop: no dropout, ratios compare like with like
    assert merge == [run.model_dir("sft")]
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():  # the new adapter moved: the policy differs from the reference, which stays the SFT model
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.add_(torch.randn_like(p) * 0.5)
    ids = build_batch(
        [tok("Hello there, how are", add_special_tokens=False)["input_ids"]],
        [tok(" you today?", add_special_tokens=False)["input_ids"]],
        tok.pad_token_id,
    )
    args = (ids["input_ids"], ids["attention_mask"], ids["position_ids"], ids["query_width"], 1.0)
    with torch.no_grad():
        want = token_logprobs(response_logits(sl_cai, *args), ids["input_ids"], ids["query_width"])
        with reference_mode(policy):
            ref = token_logprobs(response_logits(policy, *args), ids["input_ids"], ids["query_width"])
        pol = token_logprobs(response_logits(policy, *args), ids["input_ids"], ids["query_width"])
        with sl_cai.disable_adapter():
            base = token_logprobs(response_logits(sl_cai, *args), ids["input_ids"], ids["query_width"])
    assert torch.allclose(ref, want, atol=1e-5), (ref, want)
    assert not torch.allclose(want, base, atol=1e-3)  # the SFT adapter matters here
    assert not torch.allclose(pol, ref, atol=1e-4)  # and the trainable adapter sits on top of it
    # saved: only the new adapter; reloading stacks the SFT adapter again
    out = save_adapter(policy, tok, tmp_path / "ppo", base="tiny", merge_first=merge)
    assert not (out / "frozen_0").exists()
    again, _ = load_model(ModelSpec(name=str(out), quantization="4bit", device="cpu"))
    with torch.no_grad():
        assert torch.allclose(
            token_logprobs(response_logits(again, *args), ids["input_ids"], ids["query_width"]), pol, atol=1e-5
        )


def test_ptx_data_sft_trains_on_the_sft_stage_rows(tmp_path, tiny_path):
    """ppo.ptx_data=sft: the LM term draws the SFT stage's rows (here the curated train split), no data/sl needed,
    and the rows' hash is an input of the PPO adapter, so other SFT rows retrain it."""
    from cai_dpo.sft_rows import build_rows
    from cai_dpo.stages.ppo import ptx_rows, training_note

    over = {
        "ppo.steps": 1,
        "ppo.rollout_batch": 2,
        "ppo.minibatch": 2,
        "ppo.ptx_coef": 0.5,
        "ppo.ptx_batch": 2,
        "ppo.ptx_data": "sft",
        "ppo.sampling.max_new_tokens": 4,
        "sft.data": "curated",
    }
    cfg = _cfg(tmp_path, **over)
    run = RunStore(cfg.run_dir)
    assert not run.sl_data.exists()
    rows, info = build_rows(cfg, run)
    assert [r["messages"] for r in ptx_rows(cfg, run)] == [r["messages"] for r in rows]
    assert {r["source"] for r in rows} == {"curated"}
    note = training_note(cfg, run, PROMPTS[:2], None, [], "ppo")[0]
    assert note["ptx_data"] == info["data_hash"]
    other = _cfg(tmp_path, **over, **{"sft.curated_harmful_ratio": 0.8})
    assert training_note(other, run, PROMPTS[:2], None, [], "ppo")[0]["ptx_data"] != note["ptx_data"]
    run_ppo(cfg, run, reward_fn=lambda p, r: [0.0] * len(r), prompts=PROMPTS[:2], progress=False)
    row = read_log(cfg.run_dir / "metrics" / "ppo" / "log.csv")[0]
    assert math.isfinite(row["ptx_loss"]) and row["ptx_loss"] > 5.0


def test_ptx_data_sl_without_the_sl_dataset_names_the_fix(tmp_path, tiny_path):
    from cai_dpo.stages.ppo import ptx_rows

    cfg = _cfg(tmp_path, **{"ppo.ptx_coef": 0.5})
    with pytest.raises(FileNotFoundError, match=r"data/sl.*ppo.ptx_data=sft"):
        ptx_rows(cfg, RunStore(cfg.run_dir))
