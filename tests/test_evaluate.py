"""Evaluation stage on the tiny profile: base vs a perturbed tiny adapter, plus a tiny preference model."""

from __future__ import annotations

import json

import pytest

from cai_dpo.config import LoraConfig, ModelSpec
from cai_dpo.store import RunStore, read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _perturbed_adapter(out_dir, task: str = "causal_lm"):
    import torch

    from cai_dpo.models import attach_lora, load_model, save_adapter

    torch.manual_seed(1)
    model, tok = load_model("tiny", trainable=True, task=task)
    task_type = "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), task_type=task_type,
                       modules_to_save=["score"] if task == "seq_cls" else None)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # a fresh LoRA is a no-op; make this one change the outputs
    save_adapter(peft, tok, out_dir, base="tiny")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_path):
    from cai_dpo.config import load_config
    from cai_dpo.stages.evaluate import run_eval

    root = tmp_path_factory.mktemp("eval")
    cfg = load_config("tiny", {"runs_dir": str(root / "runs"), "threads": 1})
    run = RunStore(cfg.run_dir)
    _perturbed_adapter(run.model_dir("sft"))
    _perturbed_adapter(run.model_dir("rm"), task="seq_cls")
    path = run_eval(cfg, run, progress=False)
    return cfg, run, path


def test_results_have_every_section(evaluated):
    cfg, run, path = evaluated
    assert path == run.root / "eval" / "results.json"
    res = json.loads(path.read_text())
    assert [m["name"] for m in res["models"]] == ["base", "sft"]
    conds = cfg.eval.conditions
    assert res["settings"]["conditions"] == conds
    n_red = res["settings"]["n_red_team_prompts"]
    assert n_red == cfg.eval.red_team_limit and res["settings"]["n_helpful_prompts"] == cfg.eval.helpful_limit
    for key in ("definitions", "elo_matches", "judge_cost", "examples"):
        assert res[key]
    for m in res["models"]:
        h = m["harmlessness"]
        assert h["overall"]["n"] == n_red * len(conds)
        assert set(h["by_condition"]) == set(conds)
        for c in conds:
            e = h["by_condition"][c]
            assert e["harmless"]["n"] == n_red and e["pm_score"]["n"] == n_red
            for k in ("refusal", "explained_refusal", "evasive"):
                assert 0.0 <= e[k]["rate"] <= 1.0 and e[k]["lo"] <= e[k]["rate"] <= e[k]["hi"]
        assert m["evasiveness"]["n"] == n_red * len(conds) and m["over_refusal"]["n"] == cfg.eval.helpful_limit
        assert m["pm_score"]["red_team"]["n"] == n_red * len(conds) and m["pm_score"]["helpful"]["n"] == cfg.eval.helpful_limit
        assert set(m["diversity"]) == {"red_team", "helpful"} and 0 <= m["diversity"]["red_team"]["distinct_2"] <= 1
        for axis in ("overall", "harmlessness", "helpfulness"):
            e = m["elo"][axis]
            assert e["lo"] <= e["elo"] <= e["hi"]
        assert m["cost"]["n_responses"] == n_red * len(conds) + cfg.eval.helpful_limit
        assert m["cost"]["tokens_per_response"] > 0 and m["cost"]["seconds_per_response"] > 0
    base, sft = res["models"]
    assert base["harmlessness"]["win_rate_vs_base"] is None and base["helpfulness"]["win_rate_vs_base"] is None
    assert sft["harmlessness"]["win_rate_vs_base"]["n"] == n_red * len(conds)
    assert sft["helpfulness"]["win_rate_vs_base"]["n"] == cfg.eval.helpful_limit
    # Elo is zero-sum around 1000 for two players
    assert base["elo"]["overall"]["elo"] + sft["elo"]["overall"]["elo"] == pytest.approx(2000, abs=1e-6)
    assert res["elo_matches"]["overall"] == n_red * len(conds) + cfg.eval.helpful_limit
    jc = res["judge_cost"]
    assert 0 < jc["n_judgments"] <= res["elo_matches"]["overall"]
    assert jc["tokens_per_judgment"] > 0 and jc["cost_per_1k_judgments_usd"] > 0
    assert all(set(ex["responses"]) == {"base", "sft"} for ex in res["examples"])


def test_conditions_shape_the_conversations(evaluated):
    from cai_dpo.stages.evaluate import load_jailbreaks

    cfg, run, _ = evaluated
    system, _ = load_jailbreaks()
    rows = read_jsonl(run.root / "eval" / "responses.jsonl")
    assert len(rows) == 2 * (cfg.eval.red_team_limit * len(cfg.eval.conditions) + cfg.eval.helpful_limit)
    by = {(r["model"], r["prompt_id"], r["condition"]): r for r in rows if r["source"] == "red_team"}
    pid = next(iter(by))[1]
    plain, jb, sysr = by[("base", pid, "plain")], by[("base", pid, "jailbreak")], by[("base", pid, "system")]
    assert plain["shown"] == plain["prompt"] and not plain["system"]
    assert jb["shown"] != jb["prompt"] and jb["prompt"] in jb["shown"]
    assert sysr["system"] and sysr["shown"] == sysr["prompt"]
    assert by[("base", pid, "jailbreak+system")]["system"]
    judgments = read_jsonl(run.root / "eval" / "judgments.jsonl")
    assert {j["axis"] for j in judgments} == {"harmlessness", "helpfulness"}
    assert all(j["identical"] or 0.0 <= j["p_a"] <= 1.0 for j in judgments)
    manifest = json.loads((run.root / "eval" / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and set(manifest["models"]) >= {"base", "sft", "judge"}


def test_rerun_resumes_without_models(evaluated, monkeypatch):
    import cai_dpo.stages.evaluate as ev

    cfg, run, _ = evaluated
    before = json.loads((run.root / "eval" / "results.json").read_text())
    def no_engine(spec, *args, **kwargs):
        raise AssertionError("rerun should reuse the stored responses and judgments")

    monkeypatch.setattr(ev, "load_engine", no_engine)
    after = json.loads(ev.run_eval(cfg, run, progress=False).read_text())
    for b, a in zip(before["models"], after["models"]):
        assert a["harmlessness"] == b["harmlessness"] and a["elo"] == b["elo"] and a["pm_score"] == b["pm_score"]


def test_report_renders_from_eval(evaluated):
    import matplotlib.image as mpimg

    from cai_dpo.cli import main

    _, run, _ = evaluated
    assert main(["report", "--run-dir", str(run.root)]) == 0
    text = (run.root / "report" / "report.md").read_text()
    for section in ("## Comparison", "## Red-team conditions", "## Elo ratings", "## Cost", "## Example responses", "## Definitions"):
        assert section in text
    assert "sft" in text and "jailbreak+system" in text
    for png in ("pareto.png", "elo.png"):
        data = (run.root / "report" / png).read_bytes()
        assert data[:8] == PNG_SIGNATURE and mpimg.imread(run.root / "report" / png).ndim == 3


def test_model_args_and_bad_conditions(tiny_cfg):
    from cai_dpo.stages.evaluate import build_items, default_models, parse_model_arg

    assert parse_model_arg("mine=some/folder") == ("mine", ModelSpec(name="some/folder"))
    assert parse_model_arg("runs/x/models/dpo/")[0] == "dpo"
    with pytest.raises(ValueError, match="NAME=SPEC"):
        parse_model_arg("=x")
    tiny_cfg.eval.extra_models = ["other=tiny"]
    models = default_models(tiny_cfg, RunStore(tiny_cfg.run_dir))
    assert list(models) == ["base", "other"] and models["base"].adapter is None
    with pytest.raises(ValueError, match="eval.conditions"):
        build_items([], [], ["plain", "sideways"])


def test_win_counting_with_tie_band():
    from cai_dpo.stages.evaluate import _win_k

    assert _win_k([0.6, 0.5, 0.4, 0.51]) == 2.5
    assert _win_k([0.6, 0.5, 0.4, 0.51], band=0.02) == 2.0
