"""Typed run configuration: dataclasses, strict YAML loading and named profiles.

A run is described by one :class:`RunConfig`. Profiles (``tiny``, ``cpu-demo``,
``gpu-qlora``) are YAML files in ``cai_dpo/configs/``; a user file may name a profile
under ``base:`` and override any key. Unknown keys and wrong types raise
:class:`ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROFILES_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and key."""


# --------------------------------------------------------------------------- models


@dataclass
class LoraConfig:
    """LoRA adapter hyper-parameters (peft)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    ``name`` is ``embedded`` (the bundled SmolLM2-135M-Instruct), ``tiny`` (a random
    test model built locally), a local folder, or a hub id.

    A served model (any OpenAI-compatible server: vLLM, SGLang, TGI, llama.cpp) is
    ``name: openai://host:port/v1`` (``openai+https://`` for TLS), or ``backend: openai``
    with ``name`` an ``http(s)://`` base URL; see :mod:`cai_dpo.served`. Its fields:
    ``model`` the served model id (required; it keys the records), ``replicas`` more base
    URLs serving the same model (requests are spread over all of them), ``tokenizer`` a
    local tokenizer spec (``embedded``, a folder, a hub id) that renders chat templates
    and counts tokens (without it conversations go to the chat endpoint and the judge
    cannot render its contexts), ``concurrency`` requests in flight per URL, ``timeout``
    seconds per request, ``max_retries`` and ``retry_backoff`` (seconds, doubled per try)
    for 429/5xx answers and timeouts, ``top_logprobs`` the top-k asked for when scoring
    options, ``request_extra`` JSON fields added to every request (server-specific, e.g.
    ``{top_k: -1}``), ``api_key_env`` the environment variable holding a bearer token.
    """

    name: str = "embedded"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    adapter: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    backend: Literal["local", "openai"] = "local"
    model: str | None = None
    replicas: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 4
    retry_backoff: float = 0.5
    top_logprobs: int = 20
    request_extra: dict[str, Any] = field(default_factory=dict)
    api_key_env: str | None = None


@dataclass
class SamplingConfig:
    """Text generation settings shared by every stage that samples."""

    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    do_sample: bool = True
    seed: int = 0
    batch_size: int = 32


# --------------------------------------------------------------------------- stages


@dataclass
class DataConfig:
    """Prompt sources: bundled sets by name, or files."""

    red_team: str = "bundled:red_team"
    helpful: str = "bundled:helpful"
    red_team_limit: int | None = None
    helpful_limit: int | None = None


@dataclass
class SLConfig:
    """Critique → revision data generation (SL-CAI)."""

    rounds: int = 2
    mode: Literal["critique", "direct"] = "critique"
    categories: list[str] | None = None
    few_shot: int = 1
    helpful_ratio: float = 0.5
    chunk_size: int = 256  # prompts per generate call; a kill loses at most one chunk
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
    teacher: ModelSpec | None = None  # writes answers, critiques, revisions; None: the policy's base model (e.g. a served model)


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the SL-CAI model."""

    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    eval_fraction: float = 0.1
    save_steps: int = 50
    merge: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PairsConfig:
    """Response pairs and their source.

    ``source``: ``judged_samples`` (K samples per prompt from the SL-CAI model, paired and
    judged), ``revision_vs_original`` (final revision vs initial answer from the SL
    records) or ``mixed`` (both; ``mixed_ratio`` is the revision-vs-original share).
    Temperatures cycle over the K samples; ``max_pairs_per_prompt`` caps the pairs
    formed from one prompt's distinct samples.
    """

    source: Literal["judged_samples", "revision_vs_original", "mixed"] = "judged_samples"
    mixed_ratio: float = 0.5
    samples_per_prompt: int = 2
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0])
    helpful_share: float = 0.25
    max_pairs_per_prompt: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class JudgeConfig:
    """Constitution-judged preference labels (RLAIF).

    ``prompt_format``: ``chat`` puts the multiple-choice question in a user turn and
    "The answer is:" at the start of the assistant turn; ``plain`` is raw text as in the
    paper. ``clamp`` bounds chain-of-thought probabilities. The quality gate measures
    accuracy on ``checkset`` (default: the bundled judge_checkset.jsonl) plus
    ``gate_hhh_sample`` HHH items when ``gate_use_hhh`` and the file is present; it trips
    when ``gate_on`` (the Wilson interval's ``lower_bound``, or the point ``estimate``) is
    below ``gate_threshold``.
    """

    model: ModelSpec | None = None
    principles: Literal["sample", "ensemble"] = "sample"
    ensemble_size: int = 3
    both_orders: bool = True
    few_shot: bool = True
    chain_of_thought: bool = False
    clamp: list[float] = field(default_factory=lambda: [0.4, 0.6])
    calibrate: bool = True
    score_revision_pairs: bool = False
    batch_size: int = 16
    hourly_price_usd: float = 2.0
    prompt_format: Literal["chat", "plain"] = "chat"
    cot_max_new_tokens: int = 96
    gate: bool = True
    gate_threshold: float = 0.6
    gate_on: Literal["lower_bound", "estimate"] = "lower_bound"
    gate_use_hhh: bool = True
    gate_hhh_sample: int = 40
    checkset: str | None = None


@dataclass
class LabelsConfig:
    """Edge-case routing and the human label queue.

    ``db_path`` defaults to ``<run_dir>/labels.sqlite``. Each ``route_*`` switch turns
    one routing rule on or off (see :func:`cai_dpo.labels.route_edge_cases`).
    """

    db_path: str | None = None
    confidence_band: float = 0.1
    route_low_confidence: bool = True
    route_order_disagreement: bool = True
    route_principle_disagreement: bool = True
    principle_disagreement_spread: float = 0.3
    route_judge_prefers_original: bool = True
    route_gate: bool = True
    gate_confidence_band: float = 0.2


@dataclass
class DPOConfig:
    """Direct preference optimisation on the preferences.

    ``loss_type`` is any loss TRL's DPOTrainer offers; ``label_mode: soft`` trains on the
    judge's per-pair ``p_chosen`` (conservative DPO, ``sigmoid`` loss only), ``hard`` treats
    every pair as certain. ``label_smoothing`` is the flip rate of the ``robust``/``exo_pair``
    losses. ``adapter_mode``: ``merge`` folds the SFT adapter into the weights and trains a
    fresh LoRA (reference = adapter off); ``continue`` trains the SFT adapter further against
    a frozen copy of it; ``auto`` merges unless the policy is quantized.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_mode: Literal["soft", "hard"] = "soft"
    label_smoothing: float = 0.0
    adapter_mode: Literal["auto", "merge", "continue"] = "auto"
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 384
    max_prompt_length: int = 192
    eval_fraction: float = 0.1
    save_steps: int = 50
    rounds: int = 1
    merge: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RMConfig:
    """Explicit preference (reward) model."""

    backbone: str | None = None  # None/"sl-cai": policy + SFT merged; "base": policy only; else a model spec
    label_mode: Literal["soft", "hard"] = "soft"
    helpful_mix: float | None = None  # share of helpfulness pairs after rebalancing; None keeps the data as is
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 384
    eval_fraction: float = 0.1
    save_steps: int = 50
    center_rewards_coefficient: float | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PPOConfig:
    """PPO against the preference model (RL-CAI)."""

    mode: Literal["ppo", "rloo"] = "ppo"
    steps: int = 8
    rollout_batch: int = 8
    minibatch: int = 4
    ppo_epochs: int = 2
    learning_rate: float = 1e-5
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    kl_horizon: int = 10000
    missing_eos_penalty: float = 1.0
    ptx_coef: float = 0.0  # L = L_pg + vf_coef·L_vf + ptx_coef·L_LM(data/sl)
    ptx_batch: int = 4
    value_init: Literal["reward", "policy"] = "reward"
    whiten_rewards: bool = False
    rloo_k: int = 2
    save_steps: int = 4
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=1.0))
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvalConfig:
    """Side-by-side evaluation of base, SL-CAI, PPO and DPO."""

    red_team_limit: int | None = None
    helpful_limit: int | None = None
    conditions: list[str] = field(default_factory=lambda: ["plain", "system", "jailbreak", "jailbreak+system"])
    extra_models: list[str] = field(default_factory=list)
    bootstrap: int = 200
    hourly_price_usd: float = 2.0
    tie_band: float = 0.0  # judgments with |P(better) - 0.5| <= tie_band count as ties (half a win)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, do_sample=False))


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """Everything one run needs; one section per stage."""

    profile: str = "custom"
    run_id: str = "demo"
    runs_dir: str = "artifacts/runs"
    seed: int = 0
    threads: int | None = None
    constitution: str = "constitutions/default.yaml"
    policy: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        """The run's output folder (relative paths resolve against the working directory)."""
        return Path(self.runs_dir) / self.run_id

    def judge_model(self) -> ModelSpec:
        """The judge's model spec: its own when given, else the policy's base model."""
        if self.judge.model is not None:
            return self.judge.model
        return dataclasses.replace(self.policy, adapter=None)

    def constitution_path(self) -> Path:
        """The constitution file, resolved against the working directory, then the repo."""
        return resolve_path(self.constitution)


def resolve_path(path: str | Path) -> Path:
    """Resolve a relative path against the working directory, falling back to the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


# --------------------------------------------------------------------------- (de)serialisation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: key '{key}' has value {value!r}, expected {_type_name(tp)}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' is {value!r}; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__}")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], *, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(names))})"
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (YAML-safe)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return data


def _resolve_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and merge it over the profile it names under ``base:``."""
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a profile name or a path")
    return _deep_merge(_resolve_raw(profile_path(base), seen + (path,)), data)


def list_profiles() -> list[str]:
    """Names of the bundled profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """Path of a bundled profile by name, or of a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise ConfigError(f"{candidate}: config file not found")
        return candidate
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown profile '{name_or_path}'; available: {', '.join(list_profiles())}")
    return path


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value as YAML) into a dotted key and a value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(profile: str = "cpu-demo", overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Load a profile (name or YAML path) and apply ``key.sub=value`` overrides."""
    path = profile_path(profile)
    raw = _resolve_raw(path)
    raw.setdefault("profile", path.stem)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        raw = _deep_merge(raw, _nest(key, value))
    return from_dict(RunConfig, raw, source=str(path))


def apply_overrides(cfg: RunConfig, items: dict[str, Any], source: str = "<overrides>") -> RunConfig:
    """A copy of ``cfg`` with dotted-key overrides applied (checked like a file)."""
    raw = to_dict(cfg)
    for key, value in items.items():
        raw = _deep_merge(raw, _nest(key, value))
    return from_dict(RunConfig, raw, source=source)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the config as YAML atomically."""
    from cai_dpo.store import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_yaml_text(text: str, source: str = "<text>") -> RunConfig:
    """Parse a full config from YAML text (as saved by :func:`save_config`)."""
    data = yaml.safe_load(text) or {}
    return from_dict(RunConfig, data, source=source)
