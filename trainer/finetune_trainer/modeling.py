"""Load the base model and tokenizer, quantized and RoPE-scaled as the spec says.

The model is a local directory (`paths.model`) or a Hugging Face Hub id downloaded first (the
`HF_TOKEN` environment variable authenticates, `spec.model.hub.revision` pins the revision). Only
safetensors weights are read, and the model's own Python code runs only when
`spec.model.trustRemoteCode` is true.

RoPE scaling (see plan.rope_factor for when; 'auto' needs the longest record's token count, so
the pipeline reads the config, tokenizes, then scales): a model with plain RoPE gets linear scaling by the
factor; one that already scales RoPE with a factor relative to its pre-training context (linear,
yarn, llama3) gets that factor multiplied. Either way max_position_embeddings becomes native x
factor. Other RoPE variants (dynamic, longrope, ...) are not stacked: asking to scale them is an
error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.resource import FineTuneJobSpec
from finetune_api.training import QuantizationScheme
from finetune_trainer import plan
from finetune_trainer.errors import InvalidInputError, TrainerError
from finetune_trainer.hardware import Device

log = logging.getLogger(__name__)

# What a Hub download fetches: config, safetensors weights and tokenizer files, never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
SCALABLE_ROPE_TYPES = ("linear", "yarn", "llama3")


@dataclass(frozen=True)
class ModelSource:
    """A local model directory and the name users know it by."""

    path: str
    name: str


def resolve_model_source(spec: FineTuneJobSpec, local_path: str | None) -> ModelSource:
    """The local directory to load from: `local_path`, else the Hub download of spec.model_name."""
    trust = spec.model.trust_remote_code
    if local_path is not None:
        _check_model_dir(Path(local_path), local_path)
        return ModelSource(local_path, local_path)
    name = spec.model_name
    revision = spec.model.hub.revision if spec.model.hub else None
    path = _download(name, revision, trust)
    _check_model_dir(Path(path), name)
    return ModelSource(path, name if revision is None else f"{name}@{revision}")


def _check_model_dir(path: Path, name: str) -> None:
    if not path.is_dir():
        raise InvalidInputError(f"model {name}: no such directory")
    if not (path / "config.json").is_file():
        raise InvalidInputError(
            f"model {name}: no config.json (expected a Hugging Face model directory)"
        )
    if not any(path.glob("*.safetensors")):
        raise InvalidInputError(
            f"model {name}: no *.safetensors weights (only safetensors are loaded)"
        )


def _download(name: str, revision: str | None, trust_remote_code: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [*HUB_PATTERNS, "*.py"] if trust_remote_code else HUB_PATTERNS
    where = name if revision is None else f"{name} (revision {revision})"
    try:
        path: str = snapshot_download(
            name,
            revision=revision,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=patterns,
        )
    except GatedRepoError:
        raise InvalidInputError(
            f"model {where}: gated on the Hugging Face Hub; set spec.model.hub.tokenSecretRef to a "
            "token that was granted access"
        ) from None
    except RepositoryNotFoundError:
        raise InvalidInputError(
            f"model {where}: not found on the Hugging Face Hub (or private: set "
            "spec.model.hub.tokenSecretRef)"
        ) from None
    except RevisionNotFoundError:
        raise InvalidInputError(
            f"model {where}: no such revision on the Hugging Face Hub"
        ) from None
    except HFValidationError as exc:
        raise InvalidInputError(f"model {name}: not a valid Hub id or local path ({exc})") from None
    except Exception as exc:  # network and cache failures: a retry may succeed
        raise TrainerError(
            f"model {where}: download from the Hugging Face Hub failed: {exc}"
        ) from exc
    return path


def load_config(
    source: ModelSource, spec: FineTuneJobSpec, longest_tokens: int = 0
) -> tuple[Any, int | None]:
    """The model config with RoPE scaling applied, and the factor applied (None: unscaled)."""
    config = read_config(source, spec)
    return config, apply_rope_scaling(config, spec, longest_tokens)


def read_config(source: ModelSource, spec: FineTuneJobSpec) -> Any:
    """The model's config as it is."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source.path, trust_remote_code=spec.model.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise InvalidInputError(
                f"model {source.name}: its repository contains custom code; set "
                "spec.model.trustRemoteCode: true to run it (only for sources you trust)"
            ) from None
        raise InvalidInputError(f"model {source.name}: cannot read its config ({exc})") from None
    return config


def apply_rope_scaling(config: Any, spec: FineTuneJobSpec, longest_tokens: int) -> int | None:
    """Scale the config's RoPE as spec.training.rope_scaling_factor says, given the longest
    record's token count; the factor applied (None: unscaled)."""
    setting = spec.training.rope_scaling_factor
    factor = plan.rope_factor(setting, longest_tokens)
    if factor is not None:
        scale_rope(config, factor, setting)
    native = getattr(config, "max_position_embeddings", None)
    trained = min(longest_tokens, spec.dataset.max_sequence_length)
    if native is not None and trained > native:
        log.warning(
            "examples of up to %d tokens exceed the model's context of %d positions; "
            "rope_scaling_factor %r scales only past %d tokens (as Safe Synthesizer's 'auto'): "
            "set it to a number to stretch the context",
            trained,
            native,
            setting,
            plan.AUTO_ROPE_CONTEXT,
        )
    return factor


def scale_rope(config: Any, factor: int, setting: object) -> None:
    """Stretch the config's RoPE by `factor` (see the module docstring)."""
    why = f"spec.training.rope_scaling_factor {setting!r} (factor {factor})"
    parameters = getattr(config, "rope_parameters", None)
    native = getattr(config, "max_position_embeddings", None)
    if not parameters or native is None:
        raise InvalidInputError(f"{why}: the model has no RoPE parameters to scale")
    nested = all(isinstance(value, dict) for value in parameters.values())
    for entry in parameters.values() if nested else [parameters]:
        kind = entry.get("rope_type", "default")
        if kind == "default":
            entry["rope_type"] = "linear"
            entry["factor"] = float(factor)
        elif kind in SCALABLE_ROPE_TYPES:
            entry["factor"] = float(entry["factor"]) * factor
        else:
            raise InvalidInputError(
                f"{why}: the model already uses {kind!r} RoPE scaling, which cannot be stretched "
                f"further; RoPE types that can: default, {', '.join(SCALABLE_ROPE_TYPES)}"
            )
    config.max_position_embeddings = native * factor
    log.info("RoPE scaled by %d: context %d -> %d tokens", factor, native, native * factor)


def _load_error(
    exc: Exception, source: ModelSource, attn: str, scheme: QuantizationScheme | None
) -> InvalidInputError:
    """One line naming what could not be loaded: the attention kernel, the scheme, or the model."""
    text = str(exc)
    if "attn" in text.lower() or "attention" in text.lower():
        return InvalidInputError(f"spec.training.attn_implementation {attn!r}: {text}")
    if isinstance(exc, ImportError) and scheme is not None:
        return InvalidInputError(
            f"quantization scheme {scheme.value} cannot be loaded here: {text}"
        )
    return InvalidInputError(f"model {source.name}: cannot be loaded ({text})")


def load_tokenizer(source: ModelSource, spec: FineTuneJobSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.path, trust_remote_code=spec.model.trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"model {source.name}: cannot load its tokenizer ({exc})") from None


def empty_model(source: ModelSource, spec: FineTuneJobSpec, config: Any) -> Any:
    """The model built from its config without weights (on the meta device), to check the LoRA
    targets before anything loads; None when it cannot be built that way (the loaded model is
    checked anyway)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.model.trust_remote_code
            )
    except Exception as exc:
        log.info("model %s not built without weights (%s): checked once loaded", source.name, exc)
        return None


def get_quantization_config(scheme: QuantizationScheme | None) -> Any:
    """The transformers quantization_config for the scheme (None: load unquantized)."""
    return None if scheme is None else scheme.to_transformers_config()


def load_model(
    source: ModelSource,
    spec: FineTuneJobSpec,
    config: Any,
    device: Device,
    scheme: QuantizationScheme | None,
) -> Any:
    """Load the base model: quantized when `scheme` is set, in bfloat16 on GPUs that support it
    and float32 otherwise, with the spec's attention implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    training = spec.training
    kwargs: dict[str, Any] = {
        "config": config,
        "use_safetensors": True,
        "trust_remote_code": spec.model.trust_remote_code,
        "attn_implementation": training.attn_implementation,
        "dtype": torch.bfloat16 if device.bf16 else torch.float32,
    }
    quantization = get_quantization_config(scheme)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device.cuda:
        kwargs["device_map"] = {"": device.gpus[0].index}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (ImportError, ValueError, OSError, KeyError) as exc:
        raise _load_error(exc, source, training.attn_implementation, scheme) from None
    model.config.use_cache = False
    return model
