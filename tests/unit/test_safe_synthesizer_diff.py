"""Differential test against the pinned NeMo Safe Synthesizer release (a dev dependency): the same
`training:` blocks through its parameters model and through ours must get the same decision and
the same values, except for the deliberate differences listed in tests/safesynth.py and README.md.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdschema import schema_errors
from finetune_api import FineTuneJobSpec, TrainingHyperparams
from finetune_api.training import LR_SCHEDULERS, SAFE_SYNTHESIZER_VERSION
from finetune_trainer.plan import make_plan
from safesynth import (
    DIFFERENCES,
    READINGS,
    SPEC,
    disagreement,
    ours,
    safe_synthesizer,
    safe_synthesizer_dumps,
)

REPO = Path(__file__).resolve().parents[2]
FIELDS = tuple(TrainingHyperparams.model_fields)

# Values that probe every field at, inside and just outside its boundaries, in the spellings a
# YAML block can carry.
BOUNDARIES: dict[str, list[Any]] = {
    "num_input_records_to_sample": [0, 1, 2, 1000, -1, 1.0, 1.5, "12", "auto"],
    "batch_size": [1, 2, 0, -1, 1.0, 2.5, "3", 10**20],
    "gradient_accumulation_steps": [1, 8, 0, -2, 3.0, "4"],
    "weight_decay": [0, 1e-12, 0.01, 0.5, 0.999999, 1, 1.0, -0.1, "0.1"],
    "warmup_steps": [0, 0.0, 1e-9, 0.05, 0.5, 0.999999, 1, 1.0, 1.5, 2, 2.0, 2.5, 40, -0.01, 10**6],
    "warmup_ratio": [0, 0.05, 0.5, 1, 1.5, 2, 3.0, -1, 10**6],
    "lr_scheduler": [*LR_SCHEDULERS, "Cosine", "COSINE", "exponential", "", "cosine "],
    "learning_rate": [1e-9, 2e-4, 0.5, 0.999999, 0, 1, 1.0, -1e-4, "1e-4", "0.0002"],
    "lora_r": [1, 8, 32, 0, -1, 1.0, 2.5, "16", 2**40],
    "lora_alpha_over_r": [0.5, 0.49, 1, 1.3, 2, 3, 3.0, 3.01, "2"],
    "lora_target_modules": [
        ["q_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        [],
        ["all-linear"],
        ["Q_PROJ"],
        [""],
        "q_proj",
        [1],
        [None],
        ["q_proj"] * 64,
        ["q_proj"] * 65,
        ["t" * 256],
        ["t" * 257],
    ],
    "rope_scaling_factor": [1, 2, 4, 0, -1, 1.0, 1.5, "2"],
    "validation_ratio": [0, 0.0, 0.1, 1, 1.0, -0.01, 1.01, "0.2"],
    "validation_steps": [1, 15, 0, -1, 2.0, "5"],
    "pretrained_model": [
        "HuggingFaceTB/SmolLM3-3B",
        "/models/llama",
        "",
        " ",
        7,
        "m" * 4096,
        "m" * 4097,
    ],
    "quantize_model": [True, False, 1, 0, "true", "yes", "off", "perhaps", 2],
    "quantization_bits": [4, 8, 4.0, 2, 16, "4", 0],
    "quantization_scheme": [
        "bnb-4bit",
        "bnb-8bit",
        "fp8",
        "nvfp4",
        "mxfp4",
        "BNB-4BIT",
        "bnb_4bit",
        "int4",
        4,
        8,
        "",
    ],
    "peft_implementation": [
        "p" * 256,
        "p" * 257,
        "lora",
        "LoRA",
        "QLORA",
        "qlora",
        "loftq",
        "LoftQ",
        "LOFTQ",
        "dora",
        "",
        3,
    ],
    "max_vram_fraction": [0, 0.0, 0.5, 0.8, 1, 1.0, -0.01, 1.01],
    "attn_implementation": [
        "a" * 256,
        "a" * 257,
        "sdpa",
        "eager",
        "flash_attention_2",
        "kernels-community/flash-attn2",
        "",
        2,
    ],
}
# Tried on every field: "auto" (allowed only on some), its case variants, booleans, null, and
# shapes no field takes.
EVERYWHERE: list[Any] = [
    "auto",
    "AUTO",
    "Auto",
    True,
    False,
    None,
    "",
    [],
    {},
    {"a": 1},
    float("nan"),
    float("inf"),
    -float("inf"),
]
UNKNOWN_KEYS = [
    "lora_rank",
    "warmup",
    "LORA_R",
    "Lora_R",
    "lora-r",
    "Warmup_Steps",
    "learningRate",
    "epochs",
]

EXAMPLES = [(f, v) for f, values in BOUNDARIES.items() for v in [*values, *EVERYWHERE]]


def test_the_pinned_release_is_installed() -> None:
    assert metadata.version("nemo-safe-synthesizer") == SAFE_SYNTHESIZER_VERSION


def test_every_field_is_probed() -> None:
    from nemo_safe_synthesizer.config.training import TrainingHyperparams as Theirs

    assert set(Theirs.model_fields) == set(FIELDS) == set(BOUNDARIES)


@pytest.mark.parametrize(("field", "value"), EXAMPLES, ids=repr)
def test_each_field_alone(field: str, value: Any) -> None:
    assert disagreement({field: value}) is None


@pytest.mark.parametrize("key", UNKNOWN_KEYS)
def test_unknown_fields_are_refused_by_both(key: str) -> None:
    assert not safe_synthesizer({key: 1}).accepted
    assert disagreement({key: 1}) is None


def _field_values(field: str) -> st.SearchStrategy[Any]:
    numbers = st.one_of(
        st.integers(-3, 300), st.floats(-2, 5), st.floats(allow_nan=True, allow_infinity=True)
    )
    words = st.sampled_from(["lora", "loftq", "cosine", "sdpa", "q_proj", "bnb-4bit"]).map(
        lambda w: w.upper() if len(w) % 2 else w.capitalize()
    )
    return st.one_of(
        st.sampled_from(BOUNDARIES[field]),
        st.sampled_from(EVERYWHERE),
        numbers,
        words,
        st.text(max_size=6),
        st.lists(st.sampled_from(["q_proj", "v_proj", "", "all-linear"]), max_size=3),
    )


BLOCKS = st.fixed_dictionaries(
    {}, optional={field: _field_values(field) for field in FIELDS}
) | st.builds(
    lambda block, extra: {**block, **extra},
    st.fixed_dictionaries({}, optional={field: _field_values(field) for field in FIELDS}),
    st.dictionaries(st.sampled_from(UNKNOWN_KEYS) | st.text(max_size=8), st.integers(), max_size=2),
)
# Blocks of valid values only, so that accepted blocks (and their resulting values) are common.
VALID_BLOCKS = st.fixed_dictionaries(
    {},
    optional={
        field: st.sampled_from([v for v in BOUNDARIES[field] if ours({field: v}).accepted])
        for field in FIELDS
    },
)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(BLOCKS)
def test_generated_blocks(block: dict[str, Any]) -> None:
    assert disagreement(block) is None


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(VALID_BLOCKS)
def test_generated_combinations_of_valid_values(block: dict[str, Any]) -> None:
    assert disagreement(block) is None


EXAMPLE_OF: dict[str, dict[str, Any]] = {
    "unknown lr_scheduler": {"lr_scheduler": "exponential"},
    "scheduler that needs validation, without validation": {"lr_scheduler": "greedy"},
    "empty lora_target_modules": {"lora_target_modules": []},
    "empty pretrained_model": {"pretrained_model": ""},
    "empty attn_implementation": {"attn_implementation": ""},
    "loftq on a quantized base with a non-bitsandbytes scheme": {
        "quantize_model": True,
        "quantization_scheme": "nvfp4",
        "peft_implementation": "loftq",
    },
    "num_input_records_to_sample 0": {"num_input_records_to_sample": 0},
}


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d.name)
def test_each_listed_difference_is_needed(difference: Any) -> None:
    """Safe Synthesizer accepts the example and we refuse it; without the difference in the list
    the comparison fails, and the README lists it."""
    block = EXAMPLE_OF[difference.name]
    assert safe_synthesizer(block).accepted
    assert not ours(block).accepted
    assert disagreement(block) is None
    others = tuple(d for d in DIFFERENCES if d is not difference)
    assert disagreement(block, others) is not None
    assert f"**{difference.name}**" in (REPO / "README.md").read_text()


EXAMPLE_OF_READING: dict[str, dict[str, Any]] = {
    "strict JSON types": {"lora_r": "16"},
    "bounded strings and lists": {"peft_implementation": "p" * 257},
    "null on a field that is not nullable means unset": {"rope_scaling_factor": None},
}


@pytest.mark.parametrize("reading", READINGS, ids=lambda r: r.name)
def test_each_listed_reading_is_needed(reading: Any) -> None:
    """The example gets another decision from Safe Synthesizer than from us; without the reading
    in the list the comparison fails, and the README lists it."""
    block = EXAMPLE_OF_READING[reading.name]
    assert safe_synthesizer(block).accepted != ours(block).accepted
    assert disagreement(block) is None
    others = tuple(r for r in READINGS if r is not reading)
    assert disagreement(block, readings=others) is not None
    assert f"**{reading.name}**" in (REPO / "README.md").read_text()


def _documented_blocks() -> list[Any]:
    """The `training:` blocks of the YAML examples in the package's documentation."""
    files = [Path(f.locate()) for f in metadata.files("nemo-safe-synthesizer") or []]
    docs = [p for p in files if p.suffix == ".md" or p.name == "METADATA"]
    blocks = []
    for doc in docs:
        for text in re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), flags=re.S):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(parsed, dict) and "training" in parsed:
                blocks.append(parsed["training"])
    return blocks


def test_documented_training_blocks() -> None:
    blocks = _documented_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        assert safe_synthesizer(block).accepted, block
        assert disagreement(block) is None, block


@pytest.mark.parametrize("index", range(4))
def test_safe_synthesizer_dumps_paste_unchanged(index: int) -> None:
    dump = safe_synthesizer_dumps()[index]
    spec = FineTuneJobSpec.model_validate({**SPEC, "training": dump})
    assert ours(dump) == safe_synthesizer(dump)
    assert disagreement(dump) is None
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "pasted"},
        # kubectl apply drops the nulls (quantization_scheme: null); the API server would prune them
        "spec": {**SPEC, "training": {k: v for k, v in _plain(dump).items() if v is not None}},
    }
    assert schema_errors(manifest) == []
    plan = make_plan(spec.training, dataset_records=500)
    assert plan.steps >= 1


def _plain(value: Any) -> Any:
    """A dump as YAML carries it (enum members become their strings)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value
