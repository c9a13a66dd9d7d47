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
import difflib
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

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
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # at most 200: file systems cap a name at 255 bytes

Problems = list[tuple[str, str]]

#: Field metadata key: :func:`to_dict` leaves the field out while it is empty
OMIT_EMPTY = "omit_empty"

#: The sources of response pairs that ``pairs.mix`` may name (``pairs.source`` adds ``mixed``)
PAIR_SOURCES: tuple[str, ...] = ("judged_samples", "revision_vs_original", "curated")
#: The kinds of curated prompts (:data:`cai_dpo.curated.KINDS`)
CURATED_KINDS: tuple[str, ...] = ("harmful", "benign")


def _failed(*checks: tuple[str, bool, str]) -> Problems:
    """The ``(field, requirement)`` of every check that did not hold."""
    return [(key, message) for key, ok, message in checks if not ok]


def _is_device(text: str) -> bool:
    """``auto`` or a device string torch parses (``cpu``, ``cuda:1``, ``mps``, ``xpu``, ...); torch is
    imported only for a form other than auto, cpu and cuda[:N]."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return True
    import torch

    try:
        torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _optional_at_least(value: int | float | None, low: float) -> bool:
    return value is None or value >= low


def _principle_weights_problem(weights: dict[str, float]) -> tuple[str, bool, str]:
    """The check of a section's ``principle_weights``: every weight a finite number >= 0."""
    bad = [name for name, w in weights.items() if not (math.isfinite(w) and w >= 0)]
    key = f"principle_weights.{bad[0]}" if bad else "principle_weights"
    return (key, not bad, "must be a finite number >= 0")


def _optional_share(value: float | None) -> bool:
    """Whether ``value`` is null or a share in [0, 1]."""
    return value is None or 0 <= value <= 1


# --------------------------------------------------------------------------- models


@dataclass
class LoraSection:
    """LoRA adapter hyper-parameters (peft)."""

    r: int = field(default=8, metadata={"help": "LoRA rank: inner dimension of each adapter's low-rank update (>= 1)"})
    alpha: int = field(
        default=16,
        metadata={"help": "LoRA scaling: the adapter update is multiplied by alpha / r (> 0)"},
    )
    dropout: float = field(
        default=0.05,
        metadata={
            "help": "Dropout probability on the adapter input, in [0, 1); 0 skips peft's dropout module (a "
            "quarter of a CPU training step at this size)"
        },
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Names of the linear modules that get adapters, e.g. q_proj, v_proj (at least one)"},
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Indices (>= 0) of the decoder layers that get adapters; null: every layer. Top layers only "
            "make a step cheaper: back-propagation stops at the lowest adapted layer"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("r", self.r >= 1, "must be >= 1"),
            ("alpha", self.alpha > 0, "must be > 0"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("target_modules", bool(self.target_modules), "must name at least one module"),
            (
                "layers_to_transform",
                self.layers_to_transform is None
                or (bool(self.layers_to_transform) and min(self.layers_to_transform) >= 0),
                "must be null or a non-empty list of layer indices >= 0",
            ),
        )


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    ``backend: local`` loads ``name`` with transformers in this process. A served model (any
    OpenAI-compatible server: vLLM, SGLang, TGI, llama.cpp) is ``name: openai://host:port/v1``
    (``openai+https://`` for TLS), or ``backend: openai`` with ``name`` an ``http(s)://`` base URL;
    see :mod:`cai_dpo.served`. ``backend: vllm`` loads the model into this process with vLLM for
    generation and scoring (see :mod:`cai_dpo.vllm_engine`); training stages load the same spec's
    weights with transformers as usual. Each field's help says which backends it applies to.
    """

    name: str = field(
        default="embedded",
        metadata={
            "help": "The model: embedded (the bundled SmolLM2-135M-Instruct), tiny (a random test model built "
            "locally), a local folder, a hub id, or a served model's URL (openai://host:port/v1, "
            "openai+https://...)"
        },
    )
    quantization: Literal["none", "8bit", "4bit"] = field(
        default="none",
        metadata={
            "help": "Weight quantization through bitsandbytes: none, 8bit, or 4bit (nf4, double quantization); "
            "backend vllm: none or 4bit (vLLM's in-flight bitsandbytes)"
        },
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Compute dtype of 4-bit layers (bnb_4bit_compute_dtype): float32, bfloat16 or float16"},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Dtype the weights are loaded in (transformers and vLLM): float32, bfloat16 or float16"},
    )
    autocast: Literal["auto", "none", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "Mixed precision of this model's local forward passes (generation, scoring, training: TRL's "
            "bf16, torch.autocast in PPO): bfloat16 runs matrix products in bf16 over the loaded weights, none "
            "keeps the weights' dtype; auto: bfloat16 on a GPU that has it or a CPU with native bf16 "
            "instructions (AVX512-BF16, AMX), none elsewhere (where bf16 is emulated it is slower than fp32)"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "Device to load on: auto (cuda when available, else cpu) or a torch device such as cpu, "
            "cuda, cuda:1"
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "A peft LoRA adapter folder applied on top of the model; null: none (a served model takes none)"
        },
    )
    revision: str | None = field(
        default=None,
        metadata={"help": "Hub revision (branch, tag or commit) of name; null: the default branch"},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model repository's own Python code (transformers/vLLM trust_remote_code)"},
    )
    backend: Literal["local", "openai", "vllm"] = field(
        default="local",
        metadata={
            "help": "How the model runs: local (transformers in this process), openai (an OpenAI-compatible "
            "server at name), vllm (vLLM in this process: the extra cai-dpo[vllm] and a CUDA GPU)"
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "Served models: the model id the server serves (required with backend openai; it keys the records)"
        },
    )
    replicas: list[str] = field(
        default_factory=list,
        metadata={"help": "Served models: more base URLs serving the same model; requests are spread over all of them"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Served and vLLM models: a local tokenizer spec (embedded, a folder, a hub id) that renders "
            "chat templates and counts tokens; null: served conversations go to the chat endpoint (the "
            "judge then cannot render its contexts), vLLM uses the model's own"
        },
    )
    concurrency: int = field(default=4, metadata={"help": "Served models: requests in flight per base URL (>= 1)"})
    timeout: float = field(default=120.0, metadata={"help": "Served models: seconds to wait for one request"})
    max_retries: int = field(
        default=4,
        metadata={"help": "Served models: retries of a request after a 429/5xx answer or a timeout"},
    )
    retry_backoff: float = field(
        default=0.5,
        metadata={"help": "Served models: seconds before the first retry, doubled per try"},
    )
    top_logprobs: int = field(
        default=20,
        metadata={"help": "Served and vLLM models: top-k log-probabilities read when scoring options"},
    )
    request_extra: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Served models: JSON fields added to every request (server-specific, e.g. {top_k: -1})"},
    )
    api_key_env: str | None = field(
        default=None,
        metadata={"help": "Served models: environment variable holding the bearer token; null: no token"},
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "backend vllm: number of GPUs the model is split over (>= 1; 1 with other backends)"},
    )
    vllm_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "backend vllm: extra keyword arguments of vllm.LLM, e.g. {gpu_memory_utilization: 0.5, "
            "max_model_len: 4096}; empty with other backends"
        },
    )

    @classmethod
    def from_text(cls, text: str) -> ModelSpec:
        """The spec a command-line argument or a list entry names: ``embedded``, a folder, a hub id, or
        a served model as ``openai://host:port/v1#<id>`` (the id the server serves, after ``#``).

        A served URL without ``#<id>`` keeps ``model`` empty; the served engine then says how to set it.
        """
        from cai_dpo.served import HTTP_SCHEMES, url_scheme

        text = text.strip()
        scheme = url_scheme(text)
        if scheme is None:
            return cls(name=text)
        url, _, served_id = text.partition("#")
        http = scheme in HTTP_SCHEMES  # an openai:// name says it is served by itself
        return cls(name=url.strip(), model=served_id.strip() or None, backend="openai" if http else "local")

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range or contradictory value (empty when valid)."""
        from cai_dpo.served import SCHEMES, url_scheme

        vllm = self.backend == "vllm"
        return _failed(
            ("device", _is_device(self.device), "must be auto or a torch device such as cpu, cuda, cuda:1, mps, xpu"),
            ("concurrency", self.concurrency >= 1, "must be >= 1"),
            ("timeout", self.timeout > 0, "must be > 0 (seconds)"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("retry_backoff", self.retry_backoff >= 0, "must be >= 0 (seconds)"),
            ("top_logprobs", self.top_logprobs >= 1, "must be >= 1"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("tensor_parallel_size", vllm or self.tensor_parallel_size == 1, "applies to backend: vllm only"),
            ("vllm_args", vllm or not self.vllm_args, "applies to backend: vllm only"),
            (
                "name",
                not vllm or url_scheme(self.name) not in SCHEMES,
                "is a served model's URL; backend: vllm loads weights (a hub id or a folder); for a vLLM server "
                "use backend: openai",
            ),
            (
                "quantization",
                not vllm or self.quantization != "8bit",
                "cannot be 8bit with backend: vllm (vLLM quantizes in flight to 4-bit only); use 4bit or none",
            ),
        )


@dataclass
class SamplingSection:
    """Text generation settings shared by every stage that samples."""

    max_new_tokens: int = field(default=96, metadata={"help": "Tokens generated at most per response (>= 1)"})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (>= 0); 0 decodes greedily"})
    top_p: float = field(
        default=0.95,
        metadata={
            "help": "Nucleus sampling: draw from the smallest set of tokens with this total probability, in (0, "
            "1]; 1: off"
        },
    )
    do_sample: bool = field(
        default=True,
        metadata={"help": "Sample (true) or decode greedily (false); decoding is greedy whenever temperature is 0"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Sampling seed, combined with the run's seed, so reruns draw the same samples"},
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts generated together in one batch (>= 1)"})

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
        )


# --------------------------------------------------------------------------- stages


@dataclass
class DataSection:
    """Prompt sources: bundled sets by name, or files."""

    red_team: str = field(
        default="bundled:red_team",
        metadata={
            "help": "Red-team (harmful) prompts: bundled:NAME, a .jsonl/.csv/.txt/transcript file or a dataset "
            "folder; its train split feeds the stages, its heldout split the evaluation"
        },
    )
    helpful: str = field(
        default="bundled:helpful",
        metadata={"help": "Helpful (benign) prompts, in the same forms as red_team"},
    )
    red_team_limit: int | None = field(
        default=None,
        metadata={"help": "Keep the first N red-team train prompts (>= 1); null: all"},
    )
    helpful_limit: int | None = field(
        default=None,
        metadata={"help": "Keep the first N helpful train prompts (>= 1); null: all"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("red_team_limit", _optional_at_least(self.red_team_limit, 1), "must be >= 1 or null"),
            ("helpful_limit", _optional_at_least(self.helpful_limit, 1), "must be >= 1 or null"),
        )


@dataclass
class SLSection:
    """Critique → revision data generation (SL-CAI)."""

    rounds: int = field(
        default=2,
        metadata={"help": "Critique → revision rounds per red-team prompt; >= 1 in critique mode, >= 0 in direct mode"},
    )
    mode: Literal["critique", "direct"] = field(
        default="critique",
        metadata={
            "help": "critique: the teacher critiques the answer under a sampled principle, then revises it; "
            "direct: it revises straight away"
        },
    )
    categories: list[str] | None = field(
        default=None,
        metadata={"help": "Constitution categories the round's principle is drawn from; null: every principle"},
    )
    few_shot: int = field(
        default=1,
        metadata={"help": "Critique demonstrations from the constitution put before each request (>= 0)"},
    )
    helpful_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Share in [0, 1] of the policy's answers to helpful prompts in data/sl beside the red-team "
            "revisions (capped by the prompts available); 0: none"
        },
    )
    chunk_size: int = field(
        default=256,
        metadata={"help": "Prompts per generate call (>= 1); a kill loses at most one chunk"},
    )
    sampling: SamplingSection = field(
        default_factory=lambda: SamplingSection(temperature=0.7),
        metadata={"help": "Generation settings of the initial answers, critiques and revisions"},
    )
    teacher: ModelSpec | None = field(
        default=None,
        metadata={
            "help": "Model that writes the critiques and revisions (distillation: a larger or served model); "
            "null: the policy itself. The initial answer always comes from the policy"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            (
                "rounds",
                self.rounds >= (1 if self.mode == "critique" else 0),
                "must be >= 1 in critique mode (>= 0 in direct mode)",
            ),
            ("few_shot", self.few_shot >= 0, "must be >= 0"),
            ("helpful_ratio", 0 <= self.helpful_ratio <= 1, "must be in [0, 1]"),
            ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
        )


@dataclass
class CurateSection:
    """Constitution-guided curation of (prompt, response) rows (stage ``curate``, writes ``data/curated``).

    Each row of ``sources`` gets a score in [0, 1] from the ``scorer``; rows below ``threshold``
    are dropped, down-weighted or kept (``action``). ``curated_set`` trains the probe and, with
    ``measure``, measures every scorer on its held-out rows, which is how ``scorer: auto`` chooses.
    """

    sources: list[str] = field(
        default_factory=lambda: ["sl"],
        metadata={
            "help": "Rows to score: sl (this run's data/sl), bundled:curated (the curated set's train rows), a "
            "curated-format JSONL file or folder, a JSONL of messages or prompt/response rows, or a "
            "saved HF dataset folder (at least one)"
        },
    )
    scorer: Literal["auto", "probe", "judge"] = field(
        default="auto",
        metadata={
            "help": "probe (linear probes on the policy's hidden states), judge (the constitution judge against "
            "judge_baseline), or auto (measure both on the curated held-out rows, use the more "
            "accurate)"
        },
    )
    threshold: float = field(default=0.5, metadata={"help": "Score in [0, 1] below which a row gets action"})
    action: Literal["keep", "drop", "weight"] = field(
        default="weight",
        metadata={
            "help": "For rows scored below threshold: drop removes them; weight keeps them with weight "
            "score/threshold (rows at or above it weigh 1); keep keeps every row at weight 1 (scores "
            "only)"
        },
    )
    curated_set: str | None = field(
        default="bundled:curated",
        metadata={
            "help": "Curated set that trains the probe and measures every scorer (bundled:curated, a JSONL file "
            "or a folder); null: no probe, no measurement"
        },
    )
    measure: bool = field(
        default=True,
        metadata={"help": "Measure each scorer's accuracy on the curated held-out rows (scorer auto chooses by it)"},
    )
    train_limit: int | None = field(
        default=None,
        metadata={"help": "Curated train prompts per kind (harmful, benign) that train the probe (>= 1); null: all"},
    )
    heldout_limit: int | None = field(
        default=None,
        metadata={"help": "Curated held-out prompts per kind used for the measurement (>= 1); null: all"},
    )
    judge_baseline: str = field(
        default="I can't help with that.",
        metadata={
            "help": "Fixed response the judge scorer compares each row's response with (score: P(row is better))"
        },
    )
    probe_l2: float = field(default=0.01, metadata={"help": "L2 penalty of the logistic-regression probes (>= 0)"})
    probe_layer: int = field(
        default=-1,
        metadata={"help": "Hidden-state layer the probes read (Python index; -1: the last, after the final norm)"},
    )
    max_length: int = field(
        default=384,
        metadata={"help": "Tokens per conversation for probe features; longer ones keep their last max_length (>= 16)"},
    )
    batch_size: int = field(
        default=8,
        metadata={"help": "Conversations per forward pass when computing probe features (>= 1)"},
    )
    sampling: SamplingSection = field(
        default_factory=lambda: SamplingSection(max_new_tokens=64, temperature=0.7),
        metadata={"help": "Generation settings of the policy answers that are the probe's harmful negatives"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
            ("sources", bool(self.sources), "must name at least one source"),
            ("train_limit", _optional_at_least(self.train_limit, 1), "must be >= 1 or null"),
            ("heldout_limit", _optional_at_least(self.heldout_limit, 1), "must be >= 1 or null"),
            ("probe_l2", self.probe_l2 >= 0, "must be >= 0"),
            ("max_length", self.max_length >= 16, "must be >= 16"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
        )


@dataclass
class TrainingSection:
    """Training settings shared by the sections of the TRL trainers (SFT, DPO, preference model).

    Like TRL's ``DPOConfig(TrainingArguments)``, :class:`SFTSection`, :class:`DPOSection` and
    :class:`RMSection` inherit these fields and re-declare one only where their default differs
    (:func:`_redeclared` keeps its help). ``section_key`` is the section's key in :class:`RunConfig`,
    ``trl_config`` the ``trl`` config class its stage builds; ``trainer_kwargs`` reach that class
    (:func:`cai_dpo.training.trl_config`) after :func:`trainer_option_problem`'s checks.
    """

    section_key: ClassVar[str] = ""
    trl_config: ClassVar[str] = ""

    learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "Peak learning rate of AdamW (> 0), decayed linearly to 0 over training, no warm-up (unless "
            "trainer_kwargs set lr_scheduler_type or warmup_steps)"
        },
    )
    epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the training rows (fractions allowed); > 0 unless max_steps is set"},
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "Optimizer steps to train (>= 1); -1 trains by epochs instead"},
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Examples per process per step (>= 1); the global batch is batch_size × processes × grad_accum"
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step (>= 1)"})
    max_length: int = field(default=512, metadata={"help": "Tokens; prompt + completion are truncated to this (>= 1)"})
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share in [0, 1) of the rows held out (split by prompt) for the evaluation loss during "
            "training; 0: no evaluation (rm: the held-out accuracy and ECE come from these)"
        },
    )
    save_steps: int = field(
        default=50,
        metadata={
            "help": "Optimizer steps between checkpoints and evaluations (>= 1); a rerun resumes from the "
            "newest checkpoint"
        },
    )
    trainer_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any further option of the stage's TRL/transformers trainer config (trl.SFTConfig, "
            "trl.DPOConfig, trl.RewardConfig), e.g. {warmup_steps: 0.1, lr_scheduler_type: cosine}; an option "
            "cai-dpo sets itself is refused (the message names the field to set instead)",
            OMIT_EMPTY: True,
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value or refused ``trainer_kwargs`` key (empty when valid)."""
        options = trainer_options(self.trl_config) if self.trainer_kwargs else None
        refused = [(key, trainer_option_problem(self, key, options)) for key in self.trainer_kwargs]
        return _failed(
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("epochs", self.max_steps > 0 or self.epochs > 0, "must be > 0 unless max_steps > 0"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "must be >= 1, or -1 to train by epochs"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("max_length", self.max_length >= 1, "must be >= 1"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)"),
            ("save_steps", self.save_steps >= 1, "must be >= 1"),
        ) + [(f"trainer_kwargs.{key}", problem) for key, problem in refused if problem]


#: Trainer options cai-dpo sets from its own fields: option -> ``(field, in the section)``; a field
#: not in the section is a :class:`RunConfig` key
TRAINER_OPTION_FIELDS: dict[str, tuple[str, bool]] = {
    "learning_rate": ("learning_rate", True),
    "num_train_epochs": ("epochs", True),
    "max_steps": ("max_steps", True),
    "per_device_train_batch_size": ("batch_size", True),
    "per_device_eval_batch_size": ("batch_size", True),
    "gradient_accumulation_steps": ("grad_accum", True),
    "save_steps": ("save_steps", True),
    "eval_steps": ("save_steps", True),
    "seed": ("seed", False),
    "data_seed": ("seed", False),
    "report_to": ("train.report_to", False),
    "gradient_checkpointing": ("train.gradient_checkpointing", False),
    "activation_checkpointing": ("train.gradient_checkpointing", False),
}


@functools.cache
def trainer_options(trl_config: str) -> frozenset[str] | None:
    """The options (init fields) of ``trl.<trl_config>``; None when trl cannot be imported."""
    try:
        import trl
    except ImportError:
        return None
    return frozenset(f.name for f in dataclasses.fields(getattr(trl, trl_config)) if f.init)


def trainer_option_problem(section: TrainingSection, key: str, options: frozenset[str] | None) -> str | None:
    """Why ``section.trainer_kwargs[key]`` is refused, or None: an option cai-dpo sets from one of its
    fields (named), or one that ``options`` (the TRL config's, None: unchecked) lacks."""
    mapped = TRAINER_OPTION_FIELDS.get(key)
    if mapped is not None:
        target = f"{section.section_key}.{mapped[0]}" if mapped[1] else mapped[0]
        return f"is set by cai-dpo from {target}; set {target} instead"
    if options is not None and key not in options:
        close = difflib.get_close_matches(key, sorted(options), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"is not an option of trl.{section.trl_config}{hint}"
    if key in {f.name for f in dataclasses.fields(section)}:
        target = f"{section.section_key}.{key}"
        return f"is set by cai-dpo from {target}; set {target} instead"
    return None


def _redeclared(name: str, default: Any) -> Any:
    """A :class:`TrainingSection` field with another default and the same help, for a section to re-declare."""
    return field(default=default, metadata=TrainingSection.__dataclass_fields__[name].metadata)


@dataclass
class SFTSection(TrainingSection):
    """Supervised fine-tuning of the SL-CAI model.

    Every training row carries ``source`` (``curated``, ``sl``, ``human_revision``) and ``weight``;
    ``weighting: principle`` uses the weights, ``none`` ignores them.
    """

    section_key: ClassVar[str] = "sft"
    trl_config: ClassVar[str] = "SFTConfig"

    data: Literal["sl", "curated", "both", "curate"] = field(
        default="sl",
        metadata={
            "help": "Training rows: sl (data/sl: the SL-CAI revisions and human revisions), curated (the train "
            "split of curated), both, or curate (data/curated: the rows the curate stage kept, weighted "
            "by their score)"
        },
    )
    curated: str = field(
        default="bundled:curated",
        metadata={
            "help": "Curated set for data curated/both: bundled:curated, a JSONL file or a folder (heldout rows "
            "never train)"
        },
    )
    curated_harmful_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Rebalance the curated rows to this harmful share in [0, 1] by subsampling the "
            "over-represented kind; null: keep them as they are"
        },
    )
    sl_share: float | None = field(
        default=None,
        metadata={
            "help": "data both: cap the SL rows at this share in [0, 1] of the combined set; null: keep every SL row"
        },
    )
    weighting: Literal["none", "principle"] = field(
        default="none",
        metadata={
            "help": "none: TRL's token-averaged loss; principle: Σ w_i·NLL_i / Σ w_i over the batch, NLL_i the "
            "mean completion NLL of example i, w_i its weight column, else the mean of "
            "principle_weights over its principle ids"
        },
    )
    principle_weights: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Loss weight per principle id for weighting: principle (unlisted ids, and rows without ids: 1.0)"
        },
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write the merged weights (base + adapter) to models/sft-merged"},
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "The LoRA adapter trained (models/sft)"})

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return super().problems() + _failed(
            ("curated_harmful_ratio", _optional_share(self.curated_harmful_ratio), "must be in [0, 1] or null"),
            ("sl_share", _optional_share(self.sl_share), "must be in [0, 1] or null"),
            _principle_weights_problem(self.principle_weights),
        )


@dataclass
class PairsSection:
    """Response pairs and their source.

    ``source`` picks where pairs come from; ``mixed`` combines sources (``mix``, else
    ``mixed_ratio``). Judged samples use ``samples_per_prompt``, ``temperatures`` and
    ``max_pairs_per_prompt``; curated pairs use the ``curated*`` fields (a benign decline as the
    rejected side comes from :func:`cai_dpo.curated.benign_declines`).
    """

    source: Literal["judged_samples", "revision_vs_original", "curated", "mixed"] = field(
        default="judged_samples",
        metadata={
            "help": "judged_samples (K samples per prompt from the SL-CAI model, paired, then judged), "
            "revision_vs_original (final revision vs initial answer from records/sl), curated (the "
            "curated response vs the SL-CAI model's answer), or mixed (see mix and mixed_ratio)"
        },
    )
    mixed_ratio: float = field(
        default=0.5,
        metadata={
            "help": "source mixed without mix: share in [0, 1] of revision-vs-original pairs, the rest judged samples"
        },
    )
    mix: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "source mixed: the sources and their shares, e.g. {curated: 0.6, revision_vs_original: "
            "0.4}; null: use mixed_ratio"
        },
    )
    curated: str = field(
        default="bundled:curated",
        metadata={"help": "Curated set of curated pairs (its train split): bundled:curated, a JSONL file or a folder"},
    )
    curated_kinds: list[str] = field(
        default_factory=lambda: ["harmful", "benign"],
        metadata={"help": "Kinds of curated prompts that form pairs: harmful and/or benign"},
    )
    curated_limit: int | None = field(
        default=None,
        metadata={"help": "Curated prompts per kind (seeded pick); null: all"},
    )
    curated_temperature: float = field(
        default=0.0,
        metadata={"help": "Temperature (>= 0) of the SL-CAI model's answer to a curated prompt; 0 is greedy"},
    )
    curated_rejected_model: Literal["sl-cai", "base"] = field(
        default="sl-cai",
        metadata={
            "help": "Who answers a curated prompt for the rejected side: sl-cai (the policy with models/sft: what "
            "the model does now) or base (the policy without it). At small scale the SL-CAI model already "
            "declines many harmful prompts, so sl-cai pairs rank its own declines below the curated ones, and a "
            "preference model trained on them scores the SL-CAI model's declines low"
        },
    )
    curated_benign_rejected: Literal["policy", "decline"] = field(
        default="policy",
        metadata={
            "help": "Rejected side of a benign curated pair: policy (the SL-CAI model's answer) or decline (a "
            "canned decline, so the pair teaches not to over-refuse)"
        },
    )
    samples_per_prompt: int = field(
        default=2,
        metadata={"help": "K: responses sampled per prompt for judged pairs (>= 2)"},
    )
    temperatures: list[float] = field(
        default_factory=lambda: [0.7, 1.0],
        metadata={"help": "Sampling temperatures cycled over the K samples (at least one, each >= 0)"},
    )
    helpful_share: float = field(
        default=0.25,
        metadata={"help": "Share in [0, 1) of helpful train prompts among the sampled prompts (the rest red-team)"},
    )
    max_pairs_per_prompt: int = field(
        default=1,
        metadata={"help": "Pairs formed at most from one prompt's distinct samples (>= 1)"},
    )
    sampling: SamplingSection = field(
        default_factory=SamplingSection,
        metadata={
            "help": "Generation settings of the sampled responses (temperature and do_sample come from "
            "temperatures and curated_temperature)"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return (
            _failed(
                ("mixed_ratio", 0 <= self.mixed_ratio <= 1, "must be in [0, 1]"),
                ("samples_per_prompt", self.samples_per_prompt >= 2, "must be >= 2 to form a pair"),
                (
                    "temperatures",
                    bool(self.temperatures) and all(t >= 0 for t in self.temperatures),
                    "must list at least one temperature, each >= 0",
                ),
                ("helpful_share", 0 <= self.helpful_share < 1, "must be in [0, 1)"),
                ("max_pairs_per_prompt", self.max_pairs_per_prompt >= 1, "must be >= 1"),
                (
                    "curated_kinds",
                    bool(self.curated_kinds) and all(k in CURATED_KINDS for k in self.curated_kinds),
                    f"must be a non-empty list of {', '.join(CURATED_KINDS)}",
                ),
                ("curated_limit", _optional_at_least(self.curated_limit, 1), "must be >= 1 or null"),
                ("curated_temperature", self.curated_temperature >= 0, "must be >= 0 (0 is greedy)"),
            )
            + self._mix_problems()
        )

    def _mix_problems(self) -> Problems:
        """The problems of ``mix``: an unknown source, a share that is negative or not finite, no share > 0."""
        if self.mix is None:
            return []
        for name, share in self.mix.items():
            if name not in PAIR_SOURCES:
                return [("mix", f"names unknown source {name!r}; sources: {', '.join(PAIR_SOURCES)}")]
            if not math.isfinite(share) or share < 0:
                return [(f"mix.{name}", "must be a share >= 0")]
        if sum(self.mix.values()) <= 0:
            return [
                ("mix", "must give at least one source a share > 0, e.g. {curated: 0.6, revision_vs_original: 0.4}")
            ]
        return []


@dataclass
class JudgeSection:
    """Constitution-judged preference labels (RLAIF).

    The quality gate measures accuracy on ``checkset`` plus ``gate_hhh_sample`` HHH items (when
    ``gate_use_hhh`` and the file is present); it trips when ``gate_on`` (the Wilson interval's
    ``lower_bound``, or the point ``estimate``) is below ``gate_threshold``.
    """

    model: ModelSpec | None = field(
        default=None,
        metadata={
            "help": "Judge model spec; null: the policy's base model (no adapter). A larger judge is where "
            "RLAIF labels start to carry signal"
        },
    )
    principles: Literal["sample", "ensemble"] = field(
        default="sample",
        metadata={
            "help": "sample: one seeded principle per pair; ensemble: ensemble_size principles, probabilities averaged"
        },
    )
    ensemble_size: int = field(default=3, metadata={"help": "Principles per pair with principles: ensemble (>= 1)"})
    both_orders: bool = field(
        default=True,
        metadata={"help": "Score both display orders of the two responses and average them (against position bias)"},
    )
    few_shot: bool = field(
        default=True,
        metadata={
            "help": "Put the constitution's comparison demonstrations before each question (a shared, cached prefix)"
        },
    )
    chain_of_thought: bool = field(
        default=False,
        metadata={
            "help": "The judge writes its reasoning first, then the options are scored; probabilities are clamped"
        },
    )
    clamp: list[float] = field(
        default_factory=lambda: [0.4, 0.6],
        metadata={
            "help": "[low, high] bounds of chain-of-thought probabilities: 0 <= low <= 0.5 <= high <= 1 and low < high"
        },
    )
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "Contextual calibration (Zhao et al. 2021): divide out the judge's prior over the letters, "
            "measured on content-free inputs, and renormalise"
        },
    )
    score_revision_pairs: bool = field(
        default=False,
        metadata={
            "help": "Judge revision-vs-original pairs too (p_chosen stays 1.0; the judge's view goes to p_judge)"
        },
    )
    score_curated_pairs: bool = field(
        default=False,
        metadata={
            "help": "Judge curated pairs too (p_chosen stays curated_p_chosen; the judge's view goes to p_judge)"
        },
    )
    curated_p_chosen: float = field(
        default=0.9,
        metadata={
            "help": "Soft label in (0.5, 1] of a curated-vs-policy pair: the probability the curated response is better"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Comparisons scored per batch (>= 1)"})
    hourly_price_usd: float = field(
        default=2.0,
        metadata={"help": "Hardware price in USD per hour, for the reported cost per 1000 judgments (>= 0)"},
    )
    prompt_format: Literal["chat", "plain"] = field(
        default="chat",
        metadata={
            "help": "chat: the question in a user turn, 'The answer is:' opening the assistant turn; plain: raw "
            "text as in the paper"
        },
    )
    cot_max_new_tokens: int = field(
        default=96,
        metadata={"help": "Tokens of chain-of-thought reasoning generated at most (>= 1)"},
    )
    gate: bool = field(
        default=True,
        metadata={
            "help": "Measure the judge's accuracy on check pairs before labeling (the quality gate); false: no gate"
        },
    )
    gate_threshold: float = field(
        default=0.6,
        metadata={
            "help": "Accuracy in [0, 1] below which the gate trips (source mixed then labels "
            "revision-vs-original and curated pairs instead)"
        },
    )
    gate_on: Literal["lower_bound", "estimate"] = field(
        default="lower_bound",
        metadata={
            "help": "Statistic compared with gate_threshold: lower_bound (of the Wilson 95 % interval) or estimate"
        },
    )
    gate_use_hhh: bool = field(
        default=True,
        metadata={"help": "Add HHH evaluation items to the gate's check pairs when their file is present"},
    )
    gate_hhh_sample: int = field(default=40, metadata={"help": "HHH items drawn (seeded) for the gate (>= 0)"})
    checkset: str | None = field(
        default=None,
        metadata={
            "help": "The gate's check pairs: a JSONL file or bundled:NAME; null: the bundled judge_checkset.jsonl"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        c = self.clamp
        clamp_ok = len(c) == 2 and 0 <= c[0] < c[1] <= 1 and c[0] <= 0.5 <= c[1]
        return _failed(
            ("ensemble_size", self.ensemble_size >= 1, "must be >= 1"),
            ("clamp", clamp_ok, "must be [low, high] with 0 <= low <= 0.5 <= high <= 1 and low < high"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("hourly_price_usd", self.hourly_price_usd >= 0, "must be >= 0"),
            ("cot_max_new_tokens", self.cot_max_new_tokens >= 1, "must be >= 1"),
            ("gate_threshold", 0 <= self.gate_threshold <= 1, "must be in [0, 1]"),
            ("gate_hhh_sample", self.gate_hhh_sample >= 0, "must be >= 0"),
            ("curated_p_chosen", 0.5 < self.curated_p_chosen <= 1, "must be in (0.5, 1]"),
        )


@dataclass
class LabelsSection:
    """Edge-case routing and the human label queue.

    Each ``route_*`` switch turns one routing rule on or off (see
    :func:`cai_dpo.labels.route_edge_cases`).
    """

    db_path: str | None = field(
        default=None,
        metadata={"help": "SQLite file of the human label queue; null: <run_dir>/labels.sqlite"},
    )
    confidence_band: float = field(
        default=0.1,
        metadata={"help": "low_confidence rule: route pairs with |p_chosen - 0.5| < confidence_band, in [0, 0.5]"},
    )
    route_low_confidence: bool = field(
        default=True,
        metadata={"help": "Route pairs whose AI label is close to 0.5 (see confidence_band) to people"},
    )
    route_order_disagreement: bool = field(
        default=True,
        metadata={"help": "Route pairs whose two display orders prefer different responses"},
    )
    route_principle_disagreement: bool = field(
        default=True,
        metadata={
            "help": "Route pairs whose per-principle probabilities fall on both sides of 0.5 (see "
            "principle_disagreement_spread)"
        },
    )
    principle_disagreement_spread: float = field(
        default=0.3,
        metadata={"help": "principle_disagreement rule: the per-principle max - min must exceed this, in [0, 1]"},
    )
    route_judge_prefers_original: bool = field(
        default=True,
        metadata={"help": "Route revision-vs-original pairs whose judge score (below 0.5) prefers the original"},
    )
    route_gate: bool = field(
        default=True,
        metadata={"help": "When the judge gate tripped, route pairs with |p_chosen - 0.5| < gate_confidence_band"},
    )
    gate_confidence_band: float = field(default=0.2, metadata={"help": "gate rule: the band around 0.5, in [0, 0.5]"})
    route_gate_sample: int = field(
        default=8,
        metadata={
            "help": "When the judge gate tripped, this many more pairs (a seeded sample of those no rule "
            "routed) go to people; 0: off"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("confidence_band", 0 <= self.confidence_band <= 0.5, "must be in [0, 0.5]"),
            ("principle_disagreement_spread", 0 <= self.principle_disagreement_spread <= 1, "must be in [0, 1]"),
            ("gate_confidence_band", 0 <= self.gate_confidence_band <= 0.5, "must be in [0, 0.5]"),
        )


@dataclass
class DPOSection(TrainingSection):
    """Direct preference optimisation on the preferences.

    ``weighting: principle`` minimises ``Σ_i w_i·loss_i / Σ_i w_i`` (``loss_i`` the soft-label loss,
    ``w_i`` the pair's ``weight`` when set, else the mean of ``principle_weights`` over its principle
    ids, 1.0 by default). See :mod:`cai_dpo.stages.dpo` for the reference model of each ``adapter_mode``.
    """

    section_key: ClassVar[str] = "dpo"
    trl_config: ClassVar[str] = "DPOConfig"

    beta: float = field(
        default=0.1,
        metadata={
            "help": "β of the DPO loss (> 0): how strongly the policy is held to the reference (the SL-CAI "
            "model); higher stays closer"
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Any loss type of TRL's DPOTrainer (sigmoid, ipo, robust, exo_pair, ...); label_mode soft "
            "and weighting principle need sigmoid"
        },
    )
    label_mode: Literal["soft", "hard"] = field(
        default="soft",
        metadata={
            "help": "soft: train on the judge's per-pair p_chosen (conservative DPO, sigmoid loss only); hard: "
            "treat every pair as certain"
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Flip rate in [0, 0.5) of the robust/exo_pair losses; must be 0 with label_mode soft"},
    )
    adapter_mode: Literal["auto", "merge", "continue"] = field(
        default="auto",
        metadata={
            "help": "merge: fold the SFT adapter into the weights, train a fresh LoRA (reference: adapter off); "
            "continue: train the SFT adapter further against a frozen copy; auto: merge unless the "
            "policy is quantized"
        },
    )
    learning_rate: float = _redeclared("learning_rate", 5e-5)
    max_length: int = field(
        default=384,
        metadata={"help": "Tokens; prompt + response are truncated to this (above max_prompt_length)"},
    )
    max_prompt_length: int = field(
        default=192,
        metadata={"help": "Tokens kept of each prompt (its end, where the question sits); > 0 and below max_length"},
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Iterative DPO rounds (>= 1); each later round samples and judges new pairs from the "
            "previous round's policy"
        },
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write merged weights to models/dpo-merged (unquantized policy only)"},
    )
    weighting: Literal["none", "principle"] = field(
        default="none",
        metadata={
            "help": "none: the plain loss; principle: each example's loss weighted by its weight column, else "
            "by the mean of principle_weights over its principle ids, normalised by the batch's sum of "
            "weights (needs loss_type sigmoid)"
        },
    )
    principle_weights: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Loss weight per principle id for weighting: principle (unlisted ids, and rows without ids: 1.0)"
        },
    )
    rpo_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of the chosen response's mean token NLL added to each pair's loss (RPO, "
            "Pang et al. 2024); 0: plain DPO; needs loss_type sigmoid"
        },
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "The LoRA adapter trained (models/dpo)"})

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range or contradictory value (empty when valid)."""
        return super().problems() + _failed(
            ("beta", self.beta > 0, "must be > 0"),
            _principle_weights_problem(self.principle_weights),
            ("rpo_alpha", self.rpo_alpha >= 0, "must be >= 0 (0: plain DPO)"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            (
                "label_smoothing",
                self.label_mode != "soft" or self.label_smoothing == 0,
                "must be 0 with label_mode: soft (the soft loss takes its label noise from p_chosen and would "
                "ignore it); set dpo.label_mode: hard to use label smoothing",
            ),
            ("rounds", self.rounds >= 1, "must be >= 1"),
            ("max_prompt_length", 0 < self.max_prompt_length < self.max_length, "must be > 0 and below max_length"),
            (
                "label_mode",
                self.label_mode != "soft" or self.loss_type == "sigmoid",
                "must be hard unless dpo.loss_type is sigmoid: dpo.label_mode=soft (per-pair judge probabilities) is "
                f"defined for dpo.loss_type=sigmoid only; set dpo.label_mode=hard to train with {self.loss_type!r}, "
                "or dpo.loss_type=sigmoid",
            ),
            (
                "rpo_alpha",
                not self.rpo_alpha or self.loss_type == "sigmoid",
                "must be 0 unless dpo.loss_type is sigmoid: the chosen-NLL term dpo.rpo_alpha is defined for "
                f"dpo.loss_type=sigmoid only; set dpo.rpo_alpha=0 to train with {self.loss_type!r}, or "
                "dpo.loss_type=sigmoid",
            ),
            (
                "weighting",
                self.weighting != "principle" or self.loss_type == "sigmoid",
                "must be none unless dpo.loss_type is sigmoid: dpo.weighting=principle (per-pair weights) is defined "
                f"for dpo.loss_type=sigmoid only; set dpo.weighting=none to train with {self.loss_type!r}, or "
                "dpo.loss_type=sigmoid",
            ),
            (
                "label_smoothing",
                self.loss_type != "exo_pair" or self.label_smoothing > 0,
                "must be > 0 with dpo.loss_type=exo_pair (the EXO paper uses 1e-3)",
            ),
        )


@dataclass
class RMSection(TrainingSection):
    """Explicit preference (reward) model, trained with the soft Bradley-Terry loss."""

    section_key: ClassVar[str] = "rm"
    trl_config: ClassVar[str] = "RewardConfig"

    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Preference model backbone: null or sl-cai (the policy base with the SFT adapter merged), "
            "base (the policy base alone), or a model spec loaded as a sequence classifier"
        },
    )
    label_mode: Literal["soft", "hard"] = field(
        default="soft",
        metadata={
            "help": "soft: Bradley-Terry loss against the judge's p_chosen; hard: p_chosen rounded to 0/1, ties dropped"
        },
    )
    helpful_mix: float | None = field(
        default=None,
        metadata={
            "help": "Share in [0, 1) of helpfulness pairs (category helpful, or a prompt of data.helpful or a benign "
            "prompt of pairs.curated) after rebalancing; null: keep the data as it is"
        },
    )
    learning_rate: float = _redeclared("learning_rate", 1e-4)
    max_length: int = field(
        default=384,
        metadata={"help": "Tokens; each (prompt, response) text is truncated to this (>= 1)"},
    )
    response_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens (>= 1); score only the first N tokens of every response, in training and when PPO and "
            "evaluation score with the model, so a chosen answer that is complete and a rejected one cut at the "
            "sampling limit cannot be told apart by length; at most ppo.sampling.max_new_tokens; null: whole "
            "responses"
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight (>= 0) of the penalty mean((r_chosen + r_rejected)^2) that centres the rewards on 0 "
            "(TRL's); null: off"
        },
    )
    weighting: Literal["none", "principle"] = field(
        default="none",
        metadata={
            "help": "none: the plain loss; principle: each example's loss weighted by its weight column, else "
            "by the mean of principle_weights over its principle ids, normalised by the batch's sum of "
            "weights"
        },
    )
    principle_weights: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Loss weight per principle id for weighting: principle (unlisted ids, and rows without ids: 1.0)"
        },
    )
    lora: LoraSection = field(
        default_factory=LoraSection,
        metadata={"help": "The LoRA adapter trained with the scalar head (models/rm)"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return super().problems() + _failed(
            ("helpful_mix", self.helpful_mix is None or 0 <= self.helpful_mix < 1, "must be in [0, 1) or null"),
            ("response_tokens", _optional_at_least(self.response_tokens, 1), "must be >= 1 or null"),
            (
                "center_rewards_coefficient",
                _optional_at_least(self.center_rewards_coefficient, 0),
                "must be >= 0 or null",
            ),
            _principle_weights_problem(self.principle_weights),
        )


@dataclass
class PPOSection:
    """PPO against the preference model (RL-CAI)."""

    mode: Literal["ppo", "rloo"] = field(
        default="ppo",
        metadata={
            "help": "ppo: this package's PPO loop (models/ppo); rloo: TRL's RLOOTrainer with the same reward "
            "(models/rloo)"
        },
    )
    steps: int = field(
        default=8,
        metadata={
            "help": "Steps (>= 1): each samples rollout_batch responses, scores them and makes ppo_epochs passes"
        },
    )
    rollout_batch: int = field(
        default=8,
        metadata={
            "help": "Responses sampled per step, global over processes (>= 1): one per prompt in ppo, rloo_k "
            "per prompt in rloo (a multiple of rloo_k and minibatch)"
        },
    )
    minibatch: int = field(
        default=4,
        metadata={"help": "Responses per optimizer step, in [1, rollout_batch] (global over processes)"},
    )
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout batch (>= 1)"})
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Learning rate of AdamW (> 0): constant in ppo, TRL's linear decay in rloo"},
    )
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "β: weight (>= 0) of the per-token KL penalty against the reference (SL-CAI) model; the "
            "start value when adaptive_kl"
        },
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={"help": "Adapt kl_coef toward target_kl after each step (Ziegler et al. 2019)"},
    )
    target_kl: float = field(
        default=6.0,
        metadata={"help": "adaptive_kl: the KL per response (nats, summed over its tokens) aimed for (> 0)"},
    )
    advantage: Literal["gae", "leave_one_out"] = field(
        default="gae",
        metadata={
            "help": "mode ppo: gae (GAE(γ, λ) against the value model) or leave_one_out (rloo_k responses per "
            "prompt; each response's return, score - β·KL, minus the mean return of the other rloo_k - 1 responses "
            "to its prompt, on every token, as RLOO does; no value model)"
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ, in [0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ, in [0, 1]"})
    clip_range: float = field(
        default=0.2,
        metadata={"help": "Clip ε of the policy probability ratio (> 0); also RLOO's epsilon"},
    )
    clip_range_value: float = field(
        default=0.2,
        metadata={"help": "Clip range of the value predictions around the rollout's values (> 0)"},
    )
    vf_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the value loss in L = L_pg + vf_coef·L_vf + ptx_coef·L_LM (>= 0)"},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping threshold (> 0)"})
    kl_horizon: int = field(
        default=10000,
        metadata={"help": "adaptive_kl: horizon in rollouts; larger adapts kl_coef more slowly (>= 1)"},
    )
    missing_eos_penalty: float = field(
        default=1.0,
        metadata={"help": "Subtracted from the score of a response that hits max_new_tokens without EOS (>= 0)"},
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of the pretraining-mix term: the language-model loss on a batch of "
            "ptx_data; 0 is plain PPO"
        },
    )
    ptx_data: Literal["sl", "sft"] = field(
        default="sl",
        metadata={
            "help": "Rows of the pretraining-mix term: sl (the SL-CAI dataset data/sl) or sft (the SFT stage's "
            "training rows for sft.data, e.g. the curated train split)"
        },
    )
    ptx_batch: int = field(
        default=4,
        metadata={"help": "ptx_data rows per pretraining-mix batch, global over processes (>= 1)"},
    )
    value_init: Literal["reward", "policy"] = field(
        default="reward",
        metadata={
            "help": "Value model start: reward (the preference model models/rm, which must share the policy's "
            "tokenizer) or policy (the SL-CAI weights, a new LoRA and a zero-initialised head)"
        },
    )
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Scale the batch's scores to unit variance (mean kept) before the KL penalty is added"},
    )
    rloo_k: int = field(
        default=2,
        metadata={
            "help": "Completions per prompt for the leave-one-out baseline (>= 2), in mode rloo and with "
            "advantage leave_one_out"
        },
    )
    benign_prompts: int = field(
        default=0,
        metadata={
            "help": "Benign train prompts of pairs.curated added to the preference data's prompts (>= 0; a seeded "
            "sample, all when there are fewer; none the preference data already has). Their reward is the preference "
            "score negated: the preference model scores declining, which is right after a harmful request and wrong "
            "after a benign one. 0: none"
        },
    )
    save_steps: int = field(
        default=4,
        metadata={"help": "Steps between checkpoints (>= 1); a rerun resumes from the newest"},
    )
    sampling: SamplingSection = field(
        default_factory=lambda: SamplingSection(max_new_tokens=48, temperature=1.0, top_p=1.0),
        metadata={"help": "Rollout generation settings (max_new_tokens, temperature, top_p)"},
    )
    lora: LoraSection = field(
        default_factory=LoraSection,
        metadata={"help": "The policy's LoRA adapter (trained with dropout 0, so log-probability ratios are exact)"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return (
            _failed(
                ("steps", self.steps >= 1, "must be >= 1"),
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
                (
                    "rloo_k",
                    self.rloo_k >= 2,
                    "must be >= 2: RLOO's leave-one-out baseline needs at least 2 completions per prompt; set "
                    "ppo.rloo_k=2 or more",
                ),
                ("benign_prompts", self.benign_prompts >= 0, "must be >= 0"),
                ("save_steps", self.save_steps >= 1, "must be >= 1"),
            )
            + self._rloo_problems()
        )

    @property
    def grouped(self) -> bool:
        """True when each step samples ``rloo_k`` responses per prompt (mode rloo, or advantage leave_one_out)."""
        return self.mode == "rloo" or self.advantage == "leave_one_out"

    def _rloo_problems(self) -> Problems:
        """With ``rloo_k`` responses per prompt: ``rollout_batch`` must split into groups of ``rloo_k``, and in
        mode rloo into minibatches."""
        if not self.grouped or self.rloo_k < 2 or self.minibatch < 1:
            return []  # the ranges themselves are checked by problems()
        fit = self.rloo_k * max(1, self.rollout_batch // self.rloo_k)
        where = "in mode rloo" if self.mode == "rloo" else "with ppo.advantage leave_one_out"
        return _failed(
            (
                "rollout_batch",
                self.rollout_batch % self.rloo_k == 0,
                f"must be a multiple of ppo.rloo_k {where}: ppo.rollout_batch ({self.rollout_batch}) is not a "
                f"multiple of ppo.rloo_k ({self.rloo_k}); set ppo.rollout_batch={fit}",
            ),
            (
                "rollout_batch",
                self.mode != "rloo" or self.rollout_batch % self.minibatch == 0,
                f"must be a multiple of ppo.minibatch in mode rloo: ppo.rollout_batch ({self.rollout_batch}) is not a "
                f"multiple of ppo.minibatch ({self.minibatch})",
            ),
        )


@dataclass
class BenchmarkSection:
    """A user-supplied labelled prompt file evaluated like the held-out sets (nothing is downloaded).

    A label is harmful when its lowercased text is in ``harmful_values``, benign when in
    ``benign_values`` (or, with ``benign_values`` empty, whenever it is not harmful).
    """

    path: str = field(
        default="",
        metadata={"help": "The file: a CSV/TSV or JSONL/JSON file, or a Dataset.save_to_disk folder (required)"},
    )
    format: Literal["auto", "csv", "jsonl", "hf"] = field(
        default="auto",
        metadata={"help": "auto (by suffix; a folder is a saved dataset), csv, jsonl or hf"},
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Column holding the prompt text"})
    label_field: str = field(default="label", metadata={"help": "Column holding the label"})
    harmful_values: list[str] = field(
        default_factory=lambda: ["harmful", "unsafe", "1", "true", "yes"],
        metadata={"help": "Labels (lowercased text) that mark a prompt harmful"},
    )
    benign_values: list[str] = field(
        default_factory=list,
        metadata={"help": "Labels (lowercased text) that mark a prompt benign; empty: every label that is not harmful"},
    )
    name: str | None = field(default=None, metadata={"help": "Name in the results and report; null: the file stem"})
    limit: int | None = field(default=None, metadata={"help": "Keep the first N prompts; null: all"})


@dataclass
class EvalSection:
    """Side-by-side evaluation of base, SL-CAI, PPO and DPO.

    Independent figures (rule-based response classifier, :mod:`cai_dpo.classify`) on the
    held-out red-team and helpful prompts, the curated held-out split and every ``benchmarks``
    file. Judge figures: the eval ``judge`` compares each model with ``base`` only, on
    ``judge_sets``.
    """

    red_team_limit: int | None = field(
        default=None,
        metadata={"help": "Held-out red-team prompts evaluated at most (>= 1); null: all"},
    )
    helpful_limit: int | None = field(
        default=None,
        metadata={"help": "Held-out helpful prompts evaluated at most (>= 1); null: all"},
    )
    conditions: list[str] = field(
        default_factory=lambda: ["plain", "system", "jailbreak", "jailbreak+system"],
        metadata={
            "help": "How each red-team prompt is posed: plain, system (after the bundled safety system prompt), "
            "jailbreak (inside a bundled jailbreak template), jailbreak+system; at least one"
        },
    )
    extra_models: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More models to evaluate beside base and the run's sft/dpo/ppo/rloo: NAME=SPEC or SPEC (a "
            "folder, an adapter folder, a hub id or a served model as openai://host:port/v1#<id>)"
        },
    )
    bootstrap: int = field(
        default=200,
        metadata={"help": "Cluster-bootstrap resamples over prompts for the 95 % intervals (>= 10)"},
    )
    hourly_price_usd: float = field(
        default=2.0,
        metadata={"help": "Hardware price in USD per hour, for the cost per 1000 responses and judgments (>= 0)"},
    )
    tie_band: float = field(
        default=0.0,
        metadata={"help": "Judgments with |P(better) - 0.5| <= tie_band count as ties (half a win); in [0, 0.5)"},
    )
    sampling: SamplingSection = field(
        default_factory=lambda: SamplingSection(temperature=0.0, do_sample=False),
        metadata={"help": "Generation settings shared by every evaluated model (default greedy)"},
    )
    curated: str | None = field(
        default="bundled:curated",
        metadata={
            "help": "Curated held-out split evaluated (bundled:curated, a JSONL file or a folder); null: leave it out"
        },
    )
    curated_limit: int | None = field(
        default=None,
        metadata={"help": "Curated held-out prompts per kind (harmful, benign); null: all"},
    )
    benchmarks: list[BenchmarkSection] = field(
        default_factory=list,
        metadata={
            "help": "User-supplied labelled prompt files evaluated like the held-out sets (nothing is downloaded)"
        },
    )
    judge: ModelSpec | None = field(
        default=None,
        metadata={
            "help": "Evaluation judge spec; null: the judge stage's model (judge.model, else the policy's base "
            "model). A different, stronger model is recommended"
        },
    )
    judge_enabled: bool = field(
        default=True,
        metadata={"help": "Compute the judge figures (each model's responses against base's); false skips them"},
    )
    judge_when_gate_trips: bool = field(
        default=True,
        metadata={
            "help": "Compute the judge figures even when the eval judge's quality gate tripped (they are marked "
            "uninformative); false skips them then"
        },
    )
    judge_sets: list[str] = field(
        default_factory=lambda: ["red_team", "helpful"],
        metadata={"help": "Prompt sets the judge compares on: red_team, helpful, curated or benchmark:NAME"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("red_team_limit", _optional_at_least(self.red_team_limit, 1), "must be >= 1 or null"),
            ("helpful_limit", _optional_at_least(self.helpful_limit, 1), "must be >= 1 or null"),
            ("conditions", bool(self.conditions), "must list at least one condition"),
            ("bootstrap", self.bootstrap >= 10, "must be >= 10 resamples (fewer give no interval)"),
            ("hourly_price_usd", self.hourly_price_usd >= 0, "must be >= 0"),
            ("tie_band", 0 <= self.tie_band < 0.5, "must be in [0, 0.5)"),
        )


@dataclass
class TrainSection:
    """Settings shared by every trainer (SFT, DPO, preference model, PPO, RLOO).

    ``metrics/<stage>/log.csv`` is written whatever ``report_to`` chooses; PPO's own loop logs the
    same way. Multi-process training (stages ``sft``, ``dpo``, ``rm``, ``ppo``; see
    :mod:`cai_dpo.distributed`): batch sizes stay per process, so the global batch is
    ``batch_size × num_processes × grad_accum`` (PPO: ``rollout_batch`` and ``minibatch`` are
    global and split over the processes); a rank that dies fails the run at once.
    """

    report_to: str | list[str] = field(
        default="auto",
        metadata={
            "help": "Experiment trackers for transformers/TRL's report_to, a name or a list (none, tensorboard, "
            "trackio, wandb, mlflow, comet_ml, ...); auto: TensorBoard files in metrics/<stage>/tb when "
            "tensorboard is installed, nothing online. metrics/<stage>/log.csv is always written"
        },
    )
    launcher: Literal["none", "accelerate"] = field(
        default="none",
        metadata={
            "help": "none: train in the calling process; accelerate: run sft, dpo, rm and ppo under accelerate "
            "launch as num_processes processes, one torch thread each"
        },
    )
    num_processes: int | None = field(
        default=None,
        metadata={"help": "Processes to launch (>= 1); null: the count in accelerate_config, else one per GPU, else 1"},
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "accelerate config file, or a bundled one by name (ddp, deepspeed_zero2, deepspeed_zero3, "
            "fsdp); null: plain data parallelism (DDP; gloo on CPU)"
        },
    )
    timeout_s: float = field(
        default=300.0,
        metadata={"help": "Seconds a process waits for the others in a collective before the run fails (> 0)"},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass of the TRL trainers (sft, dpo, rm, ppo.mode rloo): "
            "less activation memory for more compute (on the CPU up to 40 % more time a step). null: on with a GPU, "
            "off on the CPU"
        },
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each out-of-range value (empty when valid)."""
        return _failed(
            ("num_processes", _optional_at_least(self.num_processes, 1), "must be >= 1 or null"),
            (
                "accelerate_config",
                self.accelerate_config is None or bool(self.accelerate_config.strip()),
                "must name a file or a bundled config (ddp, deepspeed_zero2, deepspeed_zero3, fsdp), or be null",
            ),
            ("timeout_s", self.timeout_s > 0, "must be > 0 seconds"),
        )


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """Everything one run needs; one section per stage."""

    profile: str = field(
        default="custom",
        metadata={"help": "Name of the profile the config was loaded from (set by the loader; informational)"},
    )
    run_id: str = field(
        default="demo",
        metadata={
            "help": "Run folder name under runs_dir: letters, digits, '.', '_' and '-', starting with a letter or digit"
        },
    )
    runs_dir: str = field(
        default=DEFAULT_RUNS_DIR,
        metadata={
            "help": "Folder of the runs: absolute as given; the default artifacts/runs yields to $CAI_DPO_RUNS; "
            "other relative paths resolve against the project root"
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Run seed (>= 0): prompt picks, principle draws, data splits, sampling and training"},
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "Torch intra-op threads (>= 1); null: $CAI_DPO_THREADS, else every core"},
    )
    constitution: str = field(
        default="constitutions/default.yaml",
        metadata={
            "help": "Constitution YAML file (a relative path is looked up in the working directory, then the repo)"
        },
    )
    policy: ModelSpec = field(
        default_factory=ModelSpec,
        metadata={"help": "The policy: the base model every stage starts from"},
    )
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Prompt sources"})
    sl: SLSection = field(default_factory=SLSection, metadata={"help": "SL-CAI critique → revision data (stage sl)"})
    curate: CurateSection = field(
        default_factory=CurateSection,
        metadata={"help": "Constitution-guided curation of rows (stage curate)"},
    )
    sft: SFTSection = field(
        default_factory=SFTSection,
        metadata={"help": "Supervised fine-tuning of the SL-CAI adapter (stage sft)"},
    )
    pairs: PairsSection = field(
        default_factory=PairsSection, metadata={"help": "Response pairs to label (stage pairs)"}
    )
    judge: JudgeSection = field(
        default_factory=JudgeSection,
        metadata={"help": "Constitution judge: soft preference labels (stage judge)"},
    )
    labels: LabelsSection = field(
        default_factory=LabelsSection,
        metadata={"help": "Edge-case routing to the human label queue"},
    )
    dpo: DPOSection = field(default_factory=DPOSection, metadata={"help": "Direct preference optimisation (stage dpo)"})
    rm: RMSection = field(default_factory=RMSection, metadata={"help": "Preference (reward) model (stage rm)"})
    ppo: PPOSection = field(
        default_factory=PPOSection,
        metadata={"help": "PPO or RLOO against the preference model (stage ppo)"},
    )
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "Side-by-side evaluation (stage eval)"})
    train: TrainSection = field(
        default_factory=TrainSection,
        metadata={"help": "Settings shared by every trainer: experiment trackers and multi-process launch"},
    )

    def problems(self) -> Problems:
        """``(field, requirement)`` for each invalid top-level value (empty when valid)."""
        return _failed(
            (
                "run_id",
                isinstance(self.run_id, str) and bool(RUN_ID_RE.match(self.run_id)),
                "must be one folder name of at most 200 characters: letters, digits, '.', '_' or '-', starting "
                "with a letter or digit (no spaces, '/', '..' or absolute paths)",
            ),
            ("runs_dir", bool(str(self.runs_dir).strip()), "must not be empty"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("threads", _optional_at_least(self.threads, 1), "must be >= 1 or null"),
        )

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
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"{source}: key '{key}' has value {value!r}, expected {_type_name(tp)}")
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
        return {
            _convert(k, args[0], f"{key}", source): _convert(v, args[1], f"{key}.{k}", source) for k, v in value.items()
        }
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
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # a range check passes inf, and NaN where it short-circuits
            raise ConfigError(f"{source}: key '{key}' is {value!r}; must be a finite number")
        return number
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
            hint = (
                f"; quote it to keep it as text: {key.rsplit('.', 1)[-1]}: '…'"
                if isinstance(value, (int, float))
                else ""
            )
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
    raise_problems(obj, source=source, prefix=prefix)
    return obj


def raise_problems(section: Any, source: str = "config", prefix: str = "") -> None:
    """Raise ConfigError for the first of ``section.problems()``, naming ``source`` and the key ``<prefix><field>``.

    The loader calls it on every section it builds; a stage calls it on a section it is given, which
    may have been built or changed in code (``prefix`` then names the section, e.g. ``"dpo."``).
    """
    for key, requirement in section.problems() if hasattr(section, "problems") else ():
        raise ConfigError(f"{source}: key '{prefix}{key}' is {_value_at(section, key)!r}; it {requirement}")


def _value_at(obj: Any, dotted: str) -> Any:
    """The value of a dotted key below ``obj`` (dataclass fields, then mapping keys), None when absent."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (YAML-safe).

    A field marked :data:`OMIT_EMPTY` (``trainer_kwargs``) is left out while empty: the dict, and the
    hashes of it (stage fingerprints, training notes), of a config that does not use it stay as they
    were before the field existed, and ``from_dict`` restores the empty default.
    """
    out = dataclasses.asdict(cfg)
    _omit_empty(cfg, out)
    return out


def _omit_empty(obj: Any, out: dict[str, Any]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(OMIT_EMPTY) and not value:
            del out[f.name]
        elif dataclasses.is_dataclass(value):
            _omit_empty(value, out[f.name])
        elif isinstance(value, list):
            for item, item_out in zip(value, out[f.name]):
                if dataclasses.is_dataclass(item):
                    _omit_empty(item, item_out)


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
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {describe_yaml_error(exc)}") from exc
    if data is None:  # empty, comments only or null: a mistake, not "every default" under run id demo
        raise ConfigError(f"{source}: no settings (the file is empty or null); a config sets at least run_id or base")
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
    if path.resolve() in {p.resolve() for p in seen}:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base' must be a profile name or a path")
    beside = path.parent / base  # a relative base file is read beside the file that names it
    if Path(base).suffix in (".yaml", ".yml") and not Path(base).is_absolute() and beside.exists():
        base = str(beside)
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
        raise ConfigError(
            f"override '{text}': the value of '{key}' is not valid YAML ({describe_yaml_error(exc)}); "
            "quote it, e.g. key='value'"
        ) from exc


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_config(profile: str = "cpu-demo", overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Load a profile (name or YAML path) and apply ``key.sub=value`` overrides.

    Raises ConfigError naming the profile file for its own faults, and the file with the overriding
    keys (``tiny.yaml with -o dpo.beta``) for a fault an override brings in."""
    path = profile_path(profile)
    raw = _resolve_raw(path)
    raw.setdefault("profile", path.stem)
    items = list(overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or []))
    if not items:
        return from_dict(RunConfig, raw, source=str(path))
    merged = raw
    for key, value in items:
        merged = _deep_merge(merged, _nest(key, value))
    try:
        return from_dict(RunConfig, merged, source=f"{path} with -o {', '.join(k for k, _ in items)}")
    except ConfigError:
        from_dict(RunConfig, raw, source=str(path))  # a fault of the file itself names the file alone
        raise


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
