"""Run config: profiles, strict keys and types, YAML round trip."""

from __future__ import annotations

import pytest

from cai_dpo.config import ConfigError, RunConfig, config_from_yaml_text, list_profiles, load_config, save_config


def test_profiles_load():
    assert {"tiny", "cpu-demo", "gpu-qlora"} <= set(list_profiles())
    assert load_config("tiny").policy.name == "tiny"
    assert load_config("cpu-demo").policy.name == "embedded"
    gpu = load_config("gpu-qlora")
    assert gpu.policy.quantization == "4bit" and gpu.sl.rounds == 4


def test_unknown_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nsl:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'sl.roundz'"):
        load_config(str(bad))


def test_wrong_type_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\ndpo:\n  beta: fast\n")
    with pytest.raises(ConfigError, match=r"'dpo.beta' must be a number"):
        load_config(str(bad))


def test_literal_values_checked():
    with pytest.raises(ConfigError, match=r"policy.quantization.*allowed"):
        load_config("tiny", {"policy.quantization": "3bit"})


def test_unknown_profile_lists_available():
    with pytest.raises(ConfigError, match="available: .*tiny"):
        load_config("no-such-profile")


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("tiny", ["sl.rounds=3", "judge.clamp=[0.3, 0.7]", "run_id=x"])
    assert cfg.sl.rounds == 3 and cfg.judge.clamp == [0.3, 0.7] and cfg.run_id == "x"
    path = save_config(cfg, tmp_path / "config.yaml")
    again = config_from_yaml_text(path.read_text(), source=str(path))
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_user_file_extends_profile(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: cpu-demo\nrun_id: mine\nsl: {rounds: 1}\n")
    cfg = load_config(str(f))
    assert cfg.run_id == "mine" and cfg.sl.rounds == 1
    assert cfg.sl.sampling.max_new_tokens == load_config("cpu-demo").sl.sampling.max_new_tokens


def test_a_relative_base_file_is_read_beside_the_file_naming_it(tmp_path, monkeypatch):
    """``base: common.yaml`` was looked up in the working folder, not beside the file (alignment-handbook style
    recipes keep a shared base next to them); a loop through relative names is still found."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "common.yaml").write_text("base: tiny\nsl: {rounds: 3}\n")
    (recipes / "mine.yaml").write_text("base: common.yaml\nrun_id: mine\n")
    monkeypatch.chdir(tmp_path)  # common.yaml is not in the working folder
    cfg = load_config(str(recipes / "mine.yaml"))
    assert (cfg.run_id, cfg.sl.rounds) == ("mine", 3)
    (recipes / "common.yaml").write_text("base: mine.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config("recipes/mine.yaml")


def test_mappings_of_weights_and_shares(tmp_path):
    cfg = load_config(
        "tiny", {"pairs.mix": {"curated": 3, "revision_vs_original": 1}, "sft.principle_weights": {"harm-physical": 2}}
    )
    assert cfg.pairs.mix == {"curated": 3.0, "revision_vs_original": 1.0}
    assert cfg.sft.principle_weights == {"harm-physical": 2.0} and cfg.dpo.principle_weights == {}
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\ndpo:\n  principle_weights: {harm-physical: lots}\n")
    with pytest.raises(ConfigError, match=r"'dpo.principle_weights.harm-physical' must be a number"):
        load_config(str(bad))
    bad.write_text("base: tiny\nrm:\n  principle_weights: [harm-physical]\n")
    with pytest.raises(ConfigError, match=r"'rm.principle_weights' must be a mapping"):
        load_config(str(bad))
    cpu = load_config("cpu-demo")
    assert cpu.sft.data == "curated" and cpu.pairs.source == "curated"
    assert cpu.sft.weighting == cpu.dpo.weighting == cpu.rm.weighting == "principle"


def test_run_folder_is_the_same_from_any_working_directory(tmp_path, monkeypatch):
    from cai_dpo.config import REPO_ROOT, RUNS_ENV

    monkeypatch.delenv(RUNS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny")
    assert cfg.run_dir == REPO_ROOT / "artifacts" / "runs" / "tiny"
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    assert load_config("tiny").run_dir == cfg.run_dir
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "elsewhere"))
    assert load_config("tiny").run_dir == tmp_path / "elsewhere" / "tiny"
    explicit = load_config("tiny", {"runs_dir": str(tmp_path / "mine")})
    assert explicit.run_dir == tmp_path / "mine" / "tiny"  # the config wins over the environment


def test_notebook_opens_the_existing_run_and_says_where_it_looked_when_there_is_none(tmp_path, monkeypatch):
    from cai_dpo.config import RUNS_ENV, save_config
    from cai_dpo.pipeline import open_run

    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no run at .*runs/tiny.*cai-dpo run --profile tiny"):
        open_run("tiny", create=False)
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written while looking
    made = load_config("tiny", {"sft.max_steps": 7})
    save_config(made, made.run_dir / "config.yaml")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)
    cfg, run = open_run("tiny", create=False)
    assert run.root == made.run_dir and cfg.sft.max_steps == 7  # the run's own config, not the profile's
    assert not (notebooks / "artifacts").exists()


def test_train_report_to_resolves_and_rejects_unknown_trackers(tmp_path):
    from cai_dpo.training import resolve_report_to, tensorboard_available, training_callbacks

    assert load_config("tiny").train.report_to == "auto"
    assert resolve_report_to("auto") == (["tensorboard"] if tensorboard_available() else [])
    assert resolve_report_to("none") == [] and resolve_report_to(["none"]) == []
    assert resolve_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert load_config("tiny", {"train.report_to": ["mlflow"]}).train.report_to == ["mlflow"]
    with pytest.raises(ConfigError, match="train.report_to"):
        training_callbacks(tmp_path, "no-such-tracker")
