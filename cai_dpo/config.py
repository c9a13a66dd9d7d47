"""Typed run configuration: dataclasses, strict YAML loading and named profiles.

A run is described by one :class:`RunConfig`. Profiles (``tiny``, ``cpu-demo``,
``gpu-qlora``) are YAML files in ``cai_dpo/configs/``; a user file may name a profile
under ``base:`` and override any key. Unknown keys, wrong types and out-of-range values
(each section's ``problems()``) raise :class:`ConfigError` naming the file and the dotted
key, when the config is loaded. YAML is read with YAML 1.2 floats (``5e-5`` is a number);
text keys such as ``run_id`` given as ``-o`` overrides are taken verbatim. ``run_id`` must be
one folder name (:data:`RUN_ID_RE`), so a run folder never lies outside ``runs_dir``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cai_dpo.errors import CaiDpoInputError
from cai_dpo.yamlio import describe_yaml_error, load_yaml

PROFILES_DIR = Path(__file__).parent / "configs"
REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_ENV = "CAI_DPO_RUNS"  # folder of runs when the config keeps the default runs_dir
DEFAULT_RUNS_DIR = "artifacts/runs"


class ConfigError(CaiDpoInputError):
    """A configuration file or value is invalid; the message names the file and key."""


#: A run id is one folder name: letters, digits, ``.``, ``_`` and ``-``, not starting with a dot or dash
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Problems = list[tuple[str, str]]


def _failed(*checks: tuple[str, bool, str]) -> Problems:
    """The ``(field, requirement)`` of every check that did not hold."""
    return [(key, message) for key, ok, message in checks if not ok]


def _optional_at_least(value: int | float | None, low: float) -> bool:
    return value is None or value >= low


# --------------------------------------------------------------------------- models


@dataclass
class LoraConfig:
    """LoRA adapter hyper-parameters (peft).

    ``layers_to_transform``: indices of the decoder layers that get adapters (peft's field of
    the same name; default every layer). Adapters on the top layers only make a training step
    cheaper: back-propagation stops at the lowest adapted layer. ``dropout`` 0 skips peft's
    dropout module, a quarter of a CPU training step at this size.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers_to_transform: list[int] | None = None

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("r", self.r >= 1, "must be >= 1"), ("alpha", self.alpha > 0, "must be > 0"),
                       ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
                       ("target_modules", bool(self.target_modules), "must name at least one module"),
                       ("layers_to_transform", self.layers_to_transform is None
                        or (bool(self.layers_to_transform) and min(self.layers_to_transform) >= 0),
                        "must be null or a non-empty list of layer indices >= 0"))


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

    ``backend: vllm`` loads the model into this process with vLLM (the optional extra
    ``cai-dpo[vllm]``, a CUDA GPU) for generation and scoring; see :mod:`cai_dpo.vllm_engine`.
    ``name``, ``revision``, ``dtype``, ``adapter`` (one LoRA adapter) and ``quantization``
    (``4bit``: vLLM's in-flight bitsandbytes quantization) apply; ``tensor_parallel_size``
    is the number of GPUs the model is split over, ``top_logprobs`` the top-k read when
    scoring options, ``tokenizer`` an optional other tokenizer, and ``vllm_args`` extra
    keyword arguments of ``vllm.LLM`` (e.g. ``{gpu_memory_utilization: 0.5, max_model_len:
    4096}``). Training stages load the same spec's weights with transformers as usual.
    """

    name: str = "embedded"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    adapter: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    backend: Literal["local", "openai", "vllm"] = "local"
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
    tensor_parallel_size: int = 1
    vllm_args: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range or contradictory value (empty when valid)."""
        from cai_dpo.served import SCHEMES

        vllm = self.backend == "vllm"
        return _failed(
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("tensor_parallel_size", vllm or self.tensor_parallel_size == 1, "applies to backend: vllm only"),
            ("vllm_args", vllm or not self.vllm_args, "applies to backend: vllm only"),
            ("name", not vllm or not self.name.startswith(tuple(SCHEMES)),
             "is a served model's URL; backend: vllm loads weights (a hub id or a folder); for a vLLM server "
             "use backend: openai"),
            ("quantization", not vllm or self.quantization != "8bit",
             "cannot be 8bit with backend: vllm (vLLM quantizes in flight to 4-bit only); use 4bit or none"),
        )


@dataclass
class SamplingConfig:
    """Text generation settings shared by every stage that samples."""

    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    do_sample: bool = True
    seed: int = 0
    batch_size: int = 32

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                       ("temperature", self.temperature >= 0, "must be >= 0"),
                       ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                       ("batch_size", self.batch_size >= 1, "must be >= 1"))


# --------------------------------------------------------------------------- stages


@dataclass
class DataConfig:
    """Prompt sources: bundled sets by name, or files."""

    red_team: str = "bundled:red_team"
    helpful: str = "bundled:helpful"
    red_team_limit: int | None = None
    helpful_limit: int | None = None

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("red_team_limit", _optional_at_least(self.red_team_limit, 1), "must be >= 1 or null"),
                       ("helpful_limit", _optional_at_least(self.helpful_limit, 1), "must be >= 1 or null"))


@dataclass
class SLConfig:
    """Critique → revision data generation (SL-CAI).

    ``teacher``: the model that writes critiques and revisions (distillation: a larger or
    served model); None means the policy itself. The initial answer always comes from the policy.
    """

    rounds: int = 2
    mode: Literal["critique", "direct"] = "critique"
    categories: list[str] | None = None
    few_shot: int = 1
    helpful_ratio: float = 0.5
    chunk_size: int = 256  # prompts per generate call; a kill loses at most one chunk
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
    teacher: ModelSpec | None = None

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("rounds", self.rounds >= (1 if self.mode == "critique" else 0),
                        "must be >= 1 in critique mode (>= 0 in direct mode)"),
                       ("few_shot", self.few_shot >= 0, "must be >= 0"),
                       ("helpful_ratio", 0 <= self.helpful_ratio <= 1, "must be in [0, 1]"),
                       ("chunk_size", self.chunk_size >= 1, "must be >= 1"))


@dataclass
class CurateConfig:
    """Constitution-guided curation of (prompt, response) rows (stage ``curate``, writes ``data/curated``).

    ``sources``: what to score — ``sl`` (this run's ``data/sl``), ``bundled:curated`` (the
    curated set's train rows), a curated-format JSONL file or folder, a JSONL of
    ``messages`` (ending with the assistant turn) or ``prompt``/``response`` rows, or a
    saved HF dataset folder. ``scorer``: ``probe`` (linear probes on the policy's hidden
    states), ``judge`` (the constitution judge of the ``judge`` section against
    ``judge_baseline``), or ``auto`` (measure both on the curated held-out rows, use the
    more accurate). ``action`` for rows scored below ``threshold``: ``drop`` removes them,
    ``weight`` keeps them with weight score/threshold (rows at or above it weigh 1),
    ``keep`` keeps everything at weight 1 (scores only). ``curated_set`` trains the probe
    and measures every scorer (None: no probe, no measurement); ``train_limit`` /
    ``heldout_limit`` cap its prompts per kind; ``sampling`` generates the policy answers
    that are the probe's harmful negatives.
    """

    sources: list[str] = field(default_factory=lambda: ["sl"])
    scorer: Literal["auto", "probe", "judge"] = "auto"
    threshold: float = 0.5
    action: Literal["keep", "drop", "weight"] = "weight"
    curated_set: str | None = "bundled:curated"
    measure: bool = True
    train_limit: int | None = None
    heldout_limit: int | None = None
    judge_baseline: str = "I can't help with that."
    probe_l2: float = 0.01
    probe_layer: int = -1
    max_length: int = 384
    batch_size: int = 8
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.7))

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
                       ("sources", bool(self.sources), "must name at least one source"),
                       ("train_limit", _optional_at_least(self.train_limit, 1), "must be >= 1 or null"),
                       ("heldout_limit", _optional_at_least(self.heldout_limit, 1), "must be >= 1 or null"),
                       ("probe_l2", self.probe_l2 >= 0, "must be >= 0"),
                       ("max_length", self.max_length >= 16, "must be >= 16"),
                       ("batch_size", self.batch_size >= 1, "must be >= 1"))


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the SL-CAI model.

    ``data`` chooses the training rows: ``sl`` (``data/sl``, the SL-CAI revisions and any
    human-written revisions), ``curated`` (the ``train`` split of the curated set ``curated``:
    ``bundled:curated``, a JSONL file or a folder; ``heldout`` rows never train), ``both``, or
    ``curate`` (the curation stage's output ``data/curated``: the rows it kept, each with the
    curation score as its ``weight``).
    ``curated_harmful_ratio`` rebalances the curated rows to that harmful share by
    subsampling the over-represented kind (null keeps them as they are); ``sl_share`` caps
    the SL rows at that share of the combined set in ``both`` (null keeps every SL row).
    Every row carries ``source`` (``curated``, ``sl``, ``human_revision``) and ``weight``.

    ``weighting``: ``none`` trains on TRL's token-averaged loss; ``principle`` trains on
    ``Σ_i w_i·NLL_i / Σ_i w_i`` over the batch, ``NLL_i`` the mean negative log-likelihood
    of example i's completion tokens, ``w_i`` its ``weight`` column when set, else the mean
    of ``principle_weights`` over its principle ids (1.0 for unlisted ids or none).
    """

    data: Literal["sl", "curated", "both", "curate"] = "sl"
    curated: str = "bundled:curated"
    curated_harmful_ratio: float | None = None
    sl_share: float | None = None
    weighting: Literal["none", "principle"] = "none"
    principle_weights: dict[str, float] = field(default_factory=dict)
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

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _training_problems(self)


def _training_problems(s: Any) -> Problems:
    """Range checks shared by the SFT, DPO and preference-model sections."""
    return _failed(("learning_rate", s.learning_rate > 0, "must be > 0"),
                   ("epochs", s.max_steps > 0 or s.epochs > 0, "must be > 0 unless max_steps > 0"),
                   ("max_steps", s.max_steps == -1 or s.max_steps >= 1, "must be >= 1, or -1 to train by epochs"),
                   ("batch_size", s.batch_size >= 1, "must be >= 1"),
                   ("grad_accum", s.grad_accum >= 1, "must be >= 1"),
                   ("max_length", s.max_length >= 1, "must be >= 1"),
                   ("eval_fraction", 0 <= s.eval_fraction < 1, "must be in [0, 1)"),
                   ("save_steps", s.save_steps >= 1, "must be >= 1"))


@dataclass
class PairsConfig:
    """Response pairs and their source.

    ``source``: ``judged_samples`` (K samples per prompt from the SL-CAI model, paired and
    judged), ``revision_vs_original`` (final revision vs initial answer from the SL
    records), ``curated`` (chosen = the curated response, rejected = the SL-CAI model's own
    answer to the same curated ``train`` prompt, at ``curated_temperature``; 0 is greedy)
    or ``mixed``: the sources named in ``mix`` with their shares (e.g. ``{curated: 0.6,
    revision_vs_original: 0.4}``), or, without ``mix``, revision-vs-original and judged
    samples with ``mixed_ratio`` the revision-vs-original share.
    Temperatures cycle over the K samples; ``max_pairs_per_prompt`` caps the pairs
    formed from one prompt's distinct samples. ``curated_kinds`` and ``curated_limit``
    (per kind) choose the curated prompts. ``curated_benign_rejected``: the rejected side of
    a benign curated pair, ``policy`` (the SL-CAI model's answer, as for harmful prompts) or
    ``decline`` (a decline, :func:`cai_dpo.curated.benign_declines`: no generation, and the
    pair says "answer, do not decline" — the over-refusal side of harmlessness).
    """

    source: Literal["judged_samples", "revision_vs_original", "curated", "mixed"] = "judged_samples"
    mixed_ratio: float = 0.5
    mix: dict[str, float] | None = None
    curated: str = "bundled:curated"
    curated_kinds: list[str] = field(default_factory=lambda: ["harmful", "benign"])
    curated_limit: int | None = None
    curated_temperature: float = 0.0
    curated_benign_rejected: Literal["policy", "decline"] = "policy"
    samples_per_prompt: int = 2
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0])
    helpful_share: float = 0.25
    max_pairs_per_prompt: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("mixed_ratio", 0 <= self.mixed_ratio <= 1, "must be in [0, 1]"),
                       ("samples_per_prompt", self.samples_per_prompt >= 2, "must be >= 2 to form a pair"),
                       ("temperatures", bool(self.temperatures) and all(t >= 0 for t in self.temperatures),
                        "must list at least one temperature, each >= 0"),
                       ("helpful_share", 0 <= self.helpful_share < 1, "must be in [0, 1)"),
                       ("max_pairs_per_prompt", self.max_pairs_per_prompt >= 1, "must be >= 1"))


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
    score_curated_pairs: bool = False  # judge curated pairs too (p_chosen stays curated_p_chosen; the judge's view goes to p_judge)
    curated_p_chosen: float = 0.9  # soft label of a curated-vs-policy pair
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

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        c = self.clamp
        clamp_ok = len(c) == 2 and 0 <= c[0] < c[1] <= 1 and c[0] <= 0.5 <= c[1]
        return _failed(("ensemble_size", self.ensemble_size >= 1, "must be >= 1"),
                       ("clamp", clamp_ok, "must be [low, high] with 0 <= low <= 0.5 <= high <= 1 and low < high"),
                       ("batch_size", self.batch_size >= 1, "must be >= 1"),
                       ("hourly_price_usd", self.hourly_price_usd >= 0, "must be >= 0"),
                       ("cot_max_new_tokens", self.cot_max_new_tokens >= 1, "must be >= 1"),
                       ("gate_threshold", 0 <= self.gate_threshold <= 1, "must be in [0, 1]"),
                       ("gate_hhh_sample", self.gate_hhh_sample >= 0, "must be >= 0"))


@dataclass
class LabelsConfig:
    """Edge-case routing and the human label queue.

    ``db_path`` defaults to ``<run_dir>/labels.sqlite``. Each ``route_*`` switch turns
    one routing rule on or off (see :func:`cai_dpo.labels.route_edge_cases`).
    ``route_gate_sample``: when the judge gate tripped, this many more pairs (a seeded
    sample of those no rule routed) go to people; 0 turns it off.
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
    route_gate_sample: int = 8

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("confidence_band", 0 <= self.confidence_band <= 0.5, "must be in [0, 0.5]"),
                       ("principle_disagreement_spread", 0 <= self.principle_disagreement_spread <= 1,
                        "must be in [0, 1]"),
                       ("gate_confidence_band", 0 <= self.gate_confidence_band <= 0.5, "must be in [0, 0.5]"))


@dataclass
class DPOConfig:
    """Direct preference optimisation on the preferences.

    ``loss_type`` is any loss TRL's DPOTrainer offers; ``label_mode: soft`` trains on the
    judge's per-pair ``p_chosen`` (conservative DPO, ``sigmoid`` loss only), ``hard`` treats
    every pair as certain. ``weighting: principle`` minimises
    ``Σ_i w_i·loss_i / Σ_i w_i`` (``loss_i`` the soft-label loss below, ``w_i`` the pair's
    ``weight`` when set, else the mean of ``principle_weights`` over its principle ids, 1.0
    by default); it needs ``loss_type: sigmoid``. ``rpo_alpha`` > 0 adds that multiple of the chosen
    response's mean token NLL to each pair's loss (RPO; ``loss_type: sigmoid``). ``label_smoothing`` is the flip rate of the ``robust``/``exo_pair``
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
    weighting: Literal["none", "principle"] = "none"
    principle_weights: dict[str, float] = field(default_factory=dict)
    rpo_alpha: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range or contradictory value (empty when valid)."""
        return _training_problems(self) + _failed(
            ("beta", self.beta > 0, "must be > 0"),
            ("rpo_alpha", self.rpo_alpha >= 0, "must be >= 0 (0: plain DPO)"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            ("label_smoothing", self.label_mode != "soft" or self.label_smoothing == 0,
             "must be 0 with label_mode: soft (the soft loss takes its label noise from p_chosen and would "
             "ignore it); set dpo.label_mode: hard to use label smoothing"),
            ("rounds", self.rounds >= 1, "must be >= 1"),
            ("max_prompt_length", 0 < self.max_prompt_length < self.max_length, "must be > 0 and below max_length"))


@dataclass
class RMConfig:
    """Explicit preference (reward) model.

    ``weighting: principle`` weights each pair's soft Bradley-Terry loss by its ``weight``
    (else the mean of ``principle_weights`` over its principle ids, 1.0 by default) and
    normalises by the batch's sum of weights.
    """

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
    weighting: Literal["none", "principle"] = "none"
    principle_weights: dict[str, float] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _training_problems(self) + _failed(
            ("helpful_mix", self.helpful_mix is None or 0 <= self.helpful_mix < 1, "must be in [0, 1) or null"),
            ("center_rewards_coefficient", _optional_at_least(self.center_rewards_coefficient, 0),
             "must be >= 0 or null"))


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

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("steps", self.steps >= 1, "must be >= 1"),
                       ("rollout_batch", self.rollout_batch >= 1, "must be >= 1"),
                       ("minibatch", 1 <= self.minibatch <= self.rollout_batch, "must be in [1, rollout_batch]"),
                       ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
                       ("learning_rate", self.learning_rate > 0, "must be > 0"),
                       ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
                       ("target_kl", self.target_kl > 0, "must be > 0"),
                       ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
                       ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
                       ("clip_range", self.clip_range > 0, "must be > 0"),
                       ("clip_range_value", self.clip_range_value > 0, "must be > 0"),
                       ("vf_coef", self.vf_coef >= 0, "must be >= 0"),
                       ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
                       ("kl_horizon", self.kl_horizon >= 1, "must be >= 1"),
                       ("missing_eos_penalty", self.missing_eos_penalty >= 0, "must be >= 0"),
                       ("ptx_coef", self.ptx_coef >= 0, "must be >= 0"),
                       ("ptx_batch", self.ptx_batch >= 1, "must be >= 1"),
                       ("rloo_k", self.rloo_k >= 2, "must be >= 2"),
                       ("save_steps", self.save_steps >= 1, "must be >= 1"))


@dataclass
class BenchmarkConfig:
    """A user-supplied labelled prompt file evaluated like the held-out sets (nothing is downloaded).

    ``path``: a CSV/TSV, JSONL/JSON file or a ``Dataset.save_to_disk`` folder. ``format``:
    ``auto`` (by suffix; a folder is a saved dataset), ``csv``, ``jsonl`` or ``hf``.
    ``prompt_field`` holds the prompt text, ``label_field`` the label; a label is harmful
    when its lowercased text is in ``harmful_values``, benign when in ``benign_values`` (or,
    with ``benign_values`` empty, whenever it is not harmful). ``name`` defaults to the file
    stem; ``limit`` keeps the first N prompts.
    """

    path: str = ""
    format: Literal["auto", "csv", "jsonl", "hf"] = "auto"
    prompt_field: str = "prompt"
    label_field: str = "label"
    harmful_values: list[str] = field(default_factory=lambda: ["harmful", "unsafe", "1", "true", "yes"])
    benign_values: list[str] = field(default_factory=list)
    name: str | None = None
    limit: int | None = None


@dataclass
class EvalConfig:
    """Side-by-side evaluation of base, SL-CAI, PPO and DPO.

    Independent figures (rule-based response classifier, :mod:`cai_dpo.classify`) on the
    held-out red-team and helpful prompts, the curated held-out split (``curated``: a spec for
    :func:`cai_dpo.curated.load_curated`, ``null`` to leave it out; ``curated_limit`` per kind)
    and every ``benchmarks`` file. Judge figures: ``judge`` (default: the judge stage's model,
    i.e. the policy's base model unless ``judge.model`` is set; a different, stronger model is
    recommended), pairwise against ``base`` only, on ``judge_sets``; ``judge_enabled: false``
    skips them; ``judge_when_gate_trips: false`` skips them when the eval judge's quality gate
    tripped.
    """

    red_team_limit: int | None = None
    helpful_limit: int | None = None
    conditions: list[str] = field(default_factory=lambda: ["plain", "system", "jailbreak", "jailbreak+system"])
    extra_models: list[str] = field(default_factory=list)
    bootstrap: int = 200
    hourly_price_usd: float = 2.0
    tie_band: float = 0.0  # judgments with |P(better) - 0.5| <= tie_band count as ties (half a win)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, do_sample=False))
    curated: str | None = "bundled:curated"
    curated_limit: int | None = None
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    judge: ModelSpec | None = None
    judge_enabled: bool = True
    judge_when_gate_trips: bool = True
    judge_sets: list[str] = field(default_factory=lambda: ["red_team", "helpful"])

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("red_team_limit", _optional_at_least(self.red_team_limit, 1), "must be >= 1 or null"),
                       ("helpful_limit", _optional_at_least(self.helpful_limit, 1), "must be >= 1 or null"),
                       ("conditions", bool(self.conditions), "must list at least one condition"),
                       ("bootstrap", self.bootstrap >= 10, "must be >= 10 resamples (fewer give no interval)"),
                       ("hourly_price_usd", self.hourly_price_usd >= 0, "must be >= 0"),
                       ("tie_band", 0 <= self.tie_band < 0.5, "must be in [0, 0.5)"))


@dataclass
class TrainConfig:
    """Settings shared by every trainer (SFT, DPO, preference model, PPO, RLOO).

    ``report_to``: experiment trackers, passed through to transformers/TRL's ``report_to``
    (``none``, ``tensorboard``, ``trackio``, ``wandb``, ``mlflow``, ``comet_ml``, ... — a
    name or a list). ``auto`` (default) stays offline: TensorBoard event files in
    ``metrics/<stage>/tb`` when tensorboard is installed, nothing else. ``metrics/<stage>/log.csv``
    is written whatever is chosen. PPO's own loop logs the same way (CSV always,
    TensorBoard when chosen or ``auto``).

    Multi-process training (stages ``sft``, ``dpo``, ``rm``, ``ppo``; see :mod:`cai_dpo.distributed`):
    ``launcher: accelerate`` runs the stage under ``accelerate launch`` as ``num_processes``
    processes (null: the count in ``accelerate_config``, else one per GPU, else 1), one torch
    thread each; ``none`` (default) trains in the calling process. ``accelerate_config``: an
    accelerate config file, or a bundled one by name (``ddp``, ``deepspeed_zero2``,
    ``deepspeed_zero3``, ``fsdp``: ``cai_dpo/configs/accelerate/<name>.yaml``); null launches
    plain data parallelism (DDP; gloo on CPU). Batch sizes stay per process: the global batch
    is ``batch_size × num_processes × grad_accum`` (PPO: ``rollout_batch`` and ``minibatch`` are
    global and split over the processes). ``timeout_s``: how long a process waits for the
    others in a collective before the run fails (a rank that dies fails the run at once).
    """

    report_to: str | list[str] = "auto"
    launcher: Literal["none", "accelerate"] = "none"
    num_processes: int | None = None
    accelerate_config: str | None = None
    timeout_s: float = 300.0

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(("num_processes", _optional_at_least(self.num_processes, 1), "must be >= 1 or null"),
                       ("accelerate_config", self.accelerate_config is None or bool(self.accelerate_config.strip()),
                        "must name a file or a bundled config (ddp, deepspeed_zero2, deepspeed_zero3, fsdp), or be null"),
                       ("timeout_s", self.timeout_s > 0, "must be > 0 seconds"))


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """Everything one run needs; one section per stage."""

    profile: str = "custom"
    run_id: str = "demo"
    runs_dir: str = DEFAULT_RUNS_DIR
    seed: int = 0
    threads: int | None = None
    constitution: str = "constitutions/default.yaml"
    policy: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def problems(self) -> Problems:
        """``(field, requirement)`` for each invalid top-level value (empty when valid)."""
        return _failed(("run_id", isinstance(self.run_id, str) and bool(RUN_ID_RE.match(self.run_id)),
                        "must be one folder name: letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit (no spaces, '/', '..' or absolute paths)"),
                       ("runs_dir", bool(str(self.runs_dir).strip()), "must not be empty"),
                       ("seed", self.seed >= 0, "must be >= 0"),
                       ("threads", _optional_at_least(self.threads, 1), "must be >= 1 or null"))

    @property
    def run_dir(self) -> Path:
        """The run's output folder, the same whatever the working directory.

        An absolute ``runs_dir`` is used as is. The default ``artifacts/runs`` is replaced by
        ``$CAI_DPO_RUNS`` when set. Any other relative ``runs_dir`` resolves against the
        project root (the folder holding ``pyproject.toml``), never the working directory,
        so the CLI, the pipeline and a notebook opened from ``notebooks/`` see one run.
        """
        return runs_root(self.runs_dir) / self.run_id

    def judge_model(self) -> ModelSpec:
        """The judge's model spec: its own when given, else the policy's base model."""
        if self.judge.model is not None:
            return self.judge.model
        return dataclasses.replace(self.policy, adapter=None)

    def eval_judge_model(self) -> ModelSpec:
        """The evaluation judge: ``eval.judge`` when given, else :meth:`judge_model`."""
        return self.eval.judge if self.eval.judge is not None else self.judge_model()

    def constitution_path(self) -> Path:
        """The constitution file, resolved against the working directory, then the repo."""
        return resolve_path(self.constitution)


def project_root() -> Path:
    """The project's root folder (where ``pyproject.toml`` is); the working directory
    when the package is installed outside a checkout."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()


def runs_root(runs_dir: str = DEFAULT_RUNS_DIR) -> Path:
    """The folder holding the runs: ``runs_dir`` if absolute, ``$CAI_DPO_RUNS`` for the
    default, else ``runs_dir`` under the project root."""
    path = Path(runs_dir).expanduser()
    if path.is_absolute():
        return path
    env = os.environ.get(RUNS_ENV)
    if env and runs_dir == DEFAULT_RUNS_DIR:
        return Path(env).expanduser().resolve()
    return project_root() / path


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
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{key}", source): _convert(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
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
            hint = f"; quote it to keep it as text: {key.rsplit('.', 1)[-1]}: '…'" if isinstance(value, (int, float)) else ""
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}{hint}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], *, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and out-of-range values
    (each section's ``problems()``) raise ConfigError naming ``source`` and the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(names))})"
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    obj = cls(**kwargs)
    for key, requirement in obj.problems() if hasattr(obj, "problems") else ():
        raise ConfigError(f"{source}: key '{prefix}{key}' is {getattr(obj, key, None)!r}; it {requirement}")
    return obj


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


def _parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    """A YAML mapping from ``text`` (YAML 1.2 floats); malformed text raises ConfigError naming ``source``."""
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {describe_yaml_error(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys to values")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return _parse_yaml_mapping(text, str(path))


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


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted RunConfig key (``dpo.beta`` -> float), or None when unknown."""
    tp: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[Section] -> Section
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else tp
    return tp


def _is_text_field(tp: Any) -> bool:
    """Whether a field holds free text (``str`` or ``str | None``), not numbers, lists or choices."""
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(tp)} == {str, type(None)}
    return False


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` into a dotted key and a value.

    The value is read as YAML (YAML 1.2 floats: ``5e-5`` is a number), except for text fields
    (``run_id``, ``constitution``, paths, model names): their value is taken verbatim, so
    ``run_id=007`` stays ``"007"`` and ``run_id=ablation #2`` is not cut at the ``#``; quote it
    (``'…'``) to have YAML read it, and write ``null`` for "none". Malformed YAML raises
    ConfigError naming the override.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': the key before '=' is empty; write key.sub=value")
    stripped = raw.strip()
    tp = _field_type(key)
    if tp is not None and _is_text_field(tp) and not (stripped[:1] in ("'", '"') and stripped[-1:] == stripped[:1]):
        if stripped in ("null", "~") and tp is not str:
            return key, None
        return key, stripped
    if not stripped:
        return key, ""
    try:
        return key, load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value of '{key}' is not valid YAML ({describe_yaml_error(exc)}); "
                          "quote it, e.g. key='value'") from exc


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
    """Parse a full config from YAML text (as saved by :func:`save_config`); errors name ``source``."""
    return from_dict(RunConfig, _parse_yaml_mapping(text, source), source=source)
