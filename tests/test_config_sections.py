"""The training sections share :class:`TrainingSection`; ``trainer_kwargs`` reach the TRL configs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import cai_dpo.config as config_mod
from cai_dpo.config import (
    ConfigError,
    DPOSection,
    RMSection,
    SFTSection,
    TrainingSection,
    config_from_yaml_text,
    load_config,
    save_config,
    to_dict,
)
from cai_dpo.store import content_hash

SECTIONS = {"sft": SFTSection, "dpo": DPOSection, "rm": RMSection}
WANTED = {"warmup_steps": 0.1, "lr_scheduler_type": "cosine"}


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("key", SECTIONS)
def test_training_sections_inherit_the_shared_fields_and_help(key):
    cls = SECTIONS[key]
    assert issubclass(cls, TrainingSection) and cls.section_key == key
    base = {f.name: f for f in dataclasses.fields(TrainingSection)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(base) <= set(fields)
    assert list(fields)[: len(base)] == list(base)  # the shared fields come first, in the base's order
    own = set(cls.__dict__.get("__annotations__", {}))
    for name, shared in base.items():
        if name not in own:
            assert fields[name] is shared or fields[name].metadata["help"] == shared.metadata["help"]
        else:  # re-declared only for another default
            assert _default(fields[name]) != _default(shared), f"{key}.{name} re-declared with the base's default"
    assert fields["learning_rate"].metadata["help"] == base["learning_rate"].metadata["help"]
    # the range checks are the base's
    assert ("batch_size", "must be >= 1") in dataclasses.replace(cls(), batch_size=0).problems()


def test_training_defaults_are_the_ones_before_the_shared_section():
    expected = {
        "sft": {"learning_rate": 2e-4, "max_length": 512},
        "dpo": {"learning_rate": 5e-5, "max_length": 384, "max_prompt_length": 192},
        "rm": {"learning_rate": 1e-4, "max_length": 384},
    }
    for key, cls in SECTIONS.items():
        s = cls()
        assert (s.epochs, s.max_steps, s.batch_size, s.grad_accum, s.eval_fraction, s.save_steps) == (
            1.0,
            -1,
            4,
            1,
            0.1,
            50,
        )
        assert s.trainer_kwargs == {}
        for name, value in expected[key].items():
            assert getattr(s, name) == value


def test_empty_trainer_kwargs_leave_dicts_and_hashes_unchanged(tmp_path):
    cfg = load_config("tiny", {"runs_dir": str(tmp_path)})
    for key in SECTIONS:
        assert "trainer_kwargs" not in to_dict(getattr(cfg, key))
    # a hash of a section is independent of the field order
    before = {"learning_rate": 2e-4, "data": "sl"}
    assert content_hash(before) == content_hash(dict(reversed(list(before.items()))))
    path = save_config(cfg, tmp_path / "config.yaml")
    assert all("trainer_kwargs" not in yaml.safe_load(path.read_text())[key] for key in SECTIONS)
    assert config_from_yaml_text(path.read_text()) == cfg
    used = load_config("tiny", {"runs_dir": str(tmp_path), "sft.trainer_kwargs": WANTED})
    assert to_dict(used.sft)["trainer_kwargs"] == WANTED
    save_config(used, tmp_path / "used.yaml")
    assert config_from_yaml_text((tmp_path / "used.yaml").read_text()).sft.trainer_kwargs == WANTED


def _build(key: str, cfg, tmp_path):
    """The TRL config the stage builds, with its stage-specific keys (no training)."""
    from trl import DPOConfig, RewardConfig, SFTConfig

    from cai_dpo.training import trl_config

    section = getattr(cfg, key)
    if key == "sft":
        return trl_config(
            SFTConfig,
            section,
            tmp_path / key,
            seed=cfg.seed,
            has_eval=True,
            max_length=section.max_length,
            packing=False,
            completion_only_loss=None,
            assistant_only_loss=False,
        )
    if key == "dpo":
        return trl_config(
            DPOConfig,
            section,
            tmp_path / key,
            seed=cfg.seed,
            has_eval=True,
            beta=section.beta,
            loss_type=[section.loss_type],
            label_smoothing=section.label_smoothing,
            max_length=section.max_length,
            remove_unused_columns=True,
        )
    return trl_config(
        RewardConfig,
        section,
        tmp_path / key,
        seed=cfg.seed,
        has_eval=True,
        max_length=None,
        disable_dropout=True,
        center_rewards_coefficient=section.center_rewards_coefficient,
    )


@pytest.mark.parametrize("key", SECTIONS)
def test_trainer_kwargs_reach_the_trl_config(key, tmp_path):
    cfg = load_config("tiny", {"runs_dir": str(tmp_path), f"{key}.trainer_kwargs": WANTED})
    args = _build(key, cfg, tmp_path)
    assert args.warmup_steps == 0.1 and getattr(args.lr_scheduler_type, "value", None) == "cosine"
    assert args.learning_rate == getattr(cfg, key).learning_rate  # the project's own fields still apply
    plain = _build(key, load_config("tiny", {"runs_dir": str(tmp_path)}), tmp_path)
    assert plain.warmup_steps == 0 and getattr(plain.lr_scheduler_type, "value", None) == "linear"


def test_trainer_kwargs_from_an_override(tmp_path):
    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "dpo.trainer_kwargs.lr_scheduler_type=cosine"])
    assert cfg.dpo.trainer_kwargs == {"lr_scheduler_type": "cosine"} and cfg.sft.trainer_kwargs == {}


@pytest.mark.parametrize("key", SECTIONS)
def test_unknown_trainer_option_fails_at_load_naming_the_key(key, tmp_path):
    with pytest.raises(ConfigError, match=rf"{key}\.trainer_kwargs\.warmup_ratio' .*not an option of trl\."):
        load_config("tiny", {"runs_dir": str(tmp_path), f"{key}.trainer_kwargs": {"warmup_ratio": 0.1}})


@pytest.mark.parametrize(
    ("key", "option", "field"),
    [
        ("sft", "learning_rate", "sft.learning_rate"),
        ("dpo", "num_train_epochs", "dpo.epochs"),
        ("rm", "per_device_train_batch_size", "rm.batch_size"),
        ("dpo", "beta", "dpo.beta"),
        ("dpo", "max_length", "dpo.max_length"),
        ("rm", "center_rewards_coefficient", "rm.center_rewards_coefficient"),
        ("sft", "seed", "seed"),
        ("rm", "report_to", "train.report_to"),
        ("dpo", "gradient_checkpointing", "train.gradient_checkpointing"),
        ("sft", "activation_checkpointing", "train.gradient_checkpointing"),
    ],
)
def test_trainer_option_shadowing_a_project_field_fails_at_load(key, option, field, tmp_path):
    with pytest.raises(ConfigError, match=rf"{key}\.trainer_kwargs\.{option}' .*set {field} instead"):
        load_config("tiny", {"runs_dir": str(tmp_path), f"{key}.trainer_kwargs": {option: 1}})


@pytest.mark.parametrize(("key", "option"), [("sft", "packing"), ("dpo", "output_dir"), ("rm", "disable_dropout")])
def test_trainer_option_the_stage_sets_fails_at_assembly(key, option, tmp_path):
    cfg = load_config("tiny", {"runs_dir": str(tmp_path)})
    getattr(cfg, key).trainer_kwargs = {option: True}  # a valid TRL option: accepted at load
    with pytest.raises(ConfigError, match=rf"^{key}\.trainer_kwargs\.{option} is set by cai-dpo"):
        _build(key, cfg, tmp_path)


def test_unknown_and_shadowing_keys_fail_at_assembly_too(tmp_path):
    cfg = load_config("tiny", {"runs_dir": str(tmp_path)})
    cfg.sft.trainer_kwargs = {"warmup_ratio": 0.1}  # set after loading: not checked yet
    with pytest.raises(ConfigError, match=r"^sft\.trainer_kwargs\.warmup_ratio is not an option of trl\.SFTConfig"):
        _build("sft", cfg, tmp_path)
    cfg.sft.trainer_kwargs = {"gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError, match=r"^sft\.trainer_kwargs\.gradient_accumulation_steps .*set sft\.grad_accum"):
        _build("sft", cfg, tmp_path)


def test_old_section_names_are_gone():
    old = [
        "LoraConfig",
        "SamplingConfig",
        "DataConfig",
        "SLConfig",
        "CurateConfig",
        "SFTConfig",
        "PairsConfig",
        "JudgeConfig",
        "LabelsConfig",
        "DPOConfig",
        "RMConfig",
        "PPOConfig",
        "BenchmarkConfig",
        "EvalConfig",
        "TrainConfig",
    ]
    assert [name for name in old if hasattr(config_mod, name)] == []
    for name in old:
        assert hasattr(config_mod, name.replace("Config", "Section")), name
    assert config_mod.RunConfig and config_mod.ConfigError


#: Checks that run when a config is loaded: (overrides, the key the error names, a part of the requirement)
LOAD_CHECKS = [
    ({"judge.curated_p_chosen": 0.5}, "judge.curated_p_chosen", r"must be in \(0\.5, 1\]"),
    ({"rm.response_tokens": 0}, "rm.response_tokens", ">= 1"),
    ({"dpo.loss_type": "ipo"}, "dpo.label_mode", "dpo.label_mode=hard"),
    ({"dpo.loss_type": "ipo", "dpo.label_mode": "hard", "dpo.rpo_alpha": 1.0}, "dpo.rpo_alpha", "dpo.rpo_alpha=0"),
    (
        {"dpo.loss_type": "ipo", "dpo.label_mode": "hard", "dpo.weighting": "principle"},
        "dpo.weighting",
        "dpo.weighting=none",
    ),
    ({"dpo.loss_type": "exo_pair", "dpo.label_mode": "hard"}, "dpo.label_smoothing", "exo_pair"),
    ({"dpo.principle_weights": {"harm": -1.0}}, "dpo.principle_weights.harm", "finite number >= 0"),
    ({"rm.principle_weights": {"harm": float("inf")}}, "rm.principle_weights.harm", "finite number"),
    ({"sft.principle_weights": {"harm": -0.5}}, "sft.principle_weights.harm", "finite number >= 0"),
    ({"sft.curated_harmful_ratio": 1.5}, "sft.curated_harmful_ratio", r"in \[0, 1\] or null"),
    ({"sft.sl_share": -0.1}, "sft.sl_share", r"in \[0, 1\] or null"),
    ({"ppo.mode": "rloo", "ppo.rloo_k": 3, "ppo.rollout_batch": 4}, "ppo.rollout_batch", r"ppo.rloo_k \(3\)"),
    (
        {"ppo.mode": "rloo", "ppo.rloo_k": 2, "ppo.rollout_batch": 6, "ppo.minibatch": 4},
        "ppo.rollout_batch",
        r"ppo.minibatch \(4\)",
    ),
    ({"ppo.rloo_k": 1}, "ppo.rloo_k", "rloo_k=2 or more"),
    (
        {"ppo.advantage": "leave_one_out", "ppo.rloo_k": 3, "ppo.rollout_batch": 4},
        "ppo.rollout_batch",
        r"with ppo.advantage leave_one_out: ppo.rollout_batch \(4\) is not a multiple of ppo.rloo_k \(3\)",
    ),
    ({"ppo.benign_prompts": -1}, "ppo.benign_prompts", ">= 0"),
    ({"pairs.curated_kinds": ["harmful", "evil"]}, "pairs.curated_kinds", "harmful, benign"),
    ({"pairs.curated_kinds": []}, "pairs.curated_kinds", "non-empty"),
    ({"pairs.curated_limit": 0}, "pairs.curated_limit", ">= 1 or null"),
    ({"pairs.curated_temperature": -0.1}, "pairs.curated_temperature", ">= 0"),
    ({"pairs.mix": {"human": 1.0}}, "pairs.mix", "unknown source 'human'"),
    ({"pairs.mix": {"curated": -1.0}}, "pairs.mix.curated", "share >= 0"),
    ({"pairs.mix": {"curated": 0.0}}, "pairs.mix", "share > 0"),
]


@pytest.mark.parametrize(("overrides", "key", "requirement"), LOAD_CHECKS, ids=[c[1] for c in LOAD_CHECKS])
def test_section_checks_fail_at_load_naming_file_and_key(overrides, key, requirement, tmp_path):
    with pytest.raises(ConfigError, match=rf"tiny\.yaml with -o [^:]*: key '{key}' is .*{requirement}"):
        load_config("tiny", overrides)
    raw = to_dict(load_config("tiny"))
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        raw[section][name] = value
    with pytest.raises(ConfigError, match=rf"^my-run\.yaml: key '{key}' is "):
        config_from_yaml_text(yaml.safe_dump(raw), source="my-run.yaml")


def test_rloo_multiples_are_checked_in_rloo_mode_only():
    cfg = load_config("tiny", {"ppo.mode": "ppo", "ppo.rloo_k": 3, "ppo.rollout_batch": 4})
    assert cfg.ppo.rollout_batch == 4


def test_stages_repeat_the_section_checks_for_a_section_changed_in_code(tmp_path):
    from cai_dpo.stages.dpo import validate_dpo_config

    cfg = load_config("tiny")
    bad = dataclasses.replace(cfg.dpo, loss_type="ipo")
    with pytest.raises(ConfigError, match=r"^run/config\.yaml: key 'dpo\.label_mode' is 'soft'; it must be hard"):
        validate_dpo_config(bad, source="run/config.yaml")
    with pytest.raises(ConfigError, match=r"key 'dpo\.beta' is 0"):
        validate_dpo_config(dataclasses.replace(cfg.dpo, beta=0), source="run/config.yaml")
