"""The CRD (schema + CEL rules) and the pydantic models agree on every FineTuneJob, checked by
sending the same generated specs to both: the model, and the real API server (a server-side dry
run with strict field validation, no webhook and no operator running).

The generator starts from a valid spec and changes a few fields at a time, with values picked at
and around every boundary, of the wrong type, null, absent, and in the combinations the
cross-field rules are about. Any case where one side accepts and the other refuses fails the test.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from finetune_api.resource import GROUP, PLURAL, VERSION, FineTuneJob
from finetune_api.training import LR_SCHEDULERS
from integration.harness import Cluster, Namespace, make_namespace, remove_namespace

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

MIN_CASES = 500
ABSENT = object()  # a mutation that removes the field

BASE: dict[str, Any] = {
    "dataset": {"claimName": "data", "path": "train.jsonl"},
    "output": {"claimName": "out", "path": "adapter"},
}

ints = st.sampled_from([-1, 0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 100, 101, 2**31])
numbers = st.sampled_from([-0.5, 0, 0.0, 1e-9, 0.01, 0.3, 0.5, 0.49, 1, 1.0, 1.5, 2, 3, 3.01, 5])
words = st.sampled_from(["", "auto", "Auto", "x", "lora", "a/b", "q_proj", " ", "..", "ok.csv"])
junk = st.sampled_from([None, True, False, [], {}, ["x"], {"a": 1}, "1", "0.5"])
scalars = st.one_of(ints, numbers, words, junk)

# Field path -> values worth trying there (plus any scalar).
FIELDS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("training", "num_input_records_to_sample"): st.one_of(ints, st.just("auto"), numbers),
    ("training", "batch_size"): ints,
    ("training", "gradient_accumulation_steps"): ints,
    ("training", "weight_decay"): numbers,
    ("training", "warmup_ratio"): numbers,
    ("training", "warmup_steps"): st.one_of(numbers, st.sampled_from([2.5, 40, 1e20])),
    ("training", "lr_scheduler"): st.sampled_from([*LR_SCHEDULERS, "Cosine", "nope"]),
    ("training", "learning_rate"): st.one_of(numbers, st.just("auto")),
    ("training", "lora_r"): ints,
    ("training", "lora_alpha_over_r"): numbers,
    ("training", "lora_target_modules"): st.sampled_from([[], ["q_proj"], ["a", "b"], [1], "x"]),
    ("training", "rope_scaling_factor"): st.one_of(ints, st.just("auto"), st.none()),
    ("training", "validation_ratio"): numbers,
    ("training", "validation_steps"): ints,
    ("training", "pretrained_model"): st.sampled_from(["a/b", "c/d", "HuggingFaceTB/SmolLM3-3B"]),
    ("training", "quantize_model"): st.booleans(),
    ("training", "quantization_bits"): st.sampled_from([4, 8, 16, "4"]),
    ("training", "quantization_scheme"): st.sampled_from(
        ["bnb-4bit", "bnb-8bit", "fp8", "nvfp4", "mxfp4", "BNB-4BIT", "int4", None]
    ),
    ("training", "peft_implementation"): st.sampled_from(
        ["lora", "LoRA", "qlora", "QLORA", "loftq", "LoftQ", "LOFTQ", "dora"]
    ),
    ("training", "max_vram_fraction"): numbers,
    ("training", "attn_implementation"): st.sampled_from(["sdpa", "eager", ""]),
    ("training", "unknown_field"): scalars,
    ("model", "hub"): st.sampled_from(
        [
            {},
            {"id": "a/b"},
            {"id": "c/d"},
            {"id": ""},
            {"revision": "main"},
            {"revision": "a b"},
            {"tokenSecretRef": {"name": "hf"}},
            {"tokenSecretRef": {"name": "hf", "key": "HF_TOKEN.v2"}},
            {"tokenSecretRef": {"name": "hf", "key": ".x"}},
            {"tokenSecretRef": {"name": "hf", "key": "."}},
            {"tokenSecretRef": {"name": "hf", "key": "..x"}},
            {"tokenSecretRef": {"name": "hf", "key": "a/b"}},
            {"tokenSecretRef": {"name": "Bad_Name"}},
        ]
    ),
    ("model", "volume"): st.sampled_from([{"claimName": "m", "path": "llm"}, {"path": "x"}]),
    ("model", "parametersBillions"): numbers,
    ("model", "trustRemoteCode"): st.booleans(),
    ("dataset", "path"): st.sampled_from(
        [
            "t.jsonl",
            "t.JSON",
            "d/t.csv",
            "t.parquet",
            "t.txt",
            ".jsonl",
            "a/.csv",
            "../t.csv",
            "a/../t.csv",
            "/t.csv",
            "a..csv",
            "t",
            "a/",
            "x/y.Parquet",
        ]
    ),
    ("dataset", "format"): st.sampled_from(["jsonl", "csv", "parquet", "txt", None]),
    ("dataset", "textField"): st.sampled_from(["text", ""]),
    ("dataset", "promptField"): st.sampled_from(["prompt", ""]),
    ("dataset", "completionField"): st.sampled_from(["completion", ""]),
    ("dataset", "maxSequenceLength"): st.sampled_from([15, 16, 2048, 1_048_576, 1_048_577]),
    ("dataset", "claimName"): st.sampled_from(["data", "Data", "a_b", "", "a.b"]),
    ("output", "path"): st.sampled_from(["out", "a/b", "..", "a/..", "/x", "a/.../b"]),
    ("resources", "gpus"): ints,
    ("resources", "nodes"): st.sampled_from([-1, 0, 1, 2, 63, 64, 65]),
    ("resources", "cpu"): st.sampled_from([1, "2", "500m", "1.5", "x", "1Gi", "-2", -2, 0, "+1"]),
    ("resources", "memory"): st.sampled_from(["64Gi", "1e3", "1G", "Gi", 64, "-48Gi", "9" * 65]),
    ("placement", "priorityClassName"): st.sampled_from(["high", "", "Bad_Name", "a" * 254]),
    ("placement", "nodeSelector"): st.sampled_from(
        [
            {},
            {"zone": "a"},
            {"topology.kubernetes.io/zone": "us-east-1a"},
            {"example.com/pool": ""},
            {"bad key": "x"},
            {"-a": "x"},
            {"a" * 63: "x"},
            {"a" * 64: "x"},
            {"p" * 253 + "/n": "x"},
            {"p" * 254 + "/n": "x"},
            {"zone": "a b"},
            {"zone": "v" * 63},
            {"zone": "v" * 64},
            {"zone": 1},
            {f"k{i}": "v" for i in range(64)},
            {f"k{i}": "v" for i in range(65)},
        ]
    ),
    ("placement", "tolerations"): st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "key": st.sampled_from(["", "k", "example.com/ml", "bad key", "a" * 64]),
                "operator": st.sampled_from(["Exists", "Equal", "", "Lt"]),
                "value": st.sampled_from(["", "v", "bad value", "v" * 64]),
                "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute", "x"]),
                "tolerationSeconds": st.sampled_from([-1, 0, 60, 2**31]),
            },
        ),
        max_size=2,
    ),
    ("suspend",): st.booleans(),
    ("backoffLimit",): ints,
    ("activeDeadlineSeconds",): ints,
    ("image",): st.sampled_from(
        ["trainer:1", "", " trainer:1 ", "a b", "r.io/t@sha256:" + "a" * 64]
    ),
    ("unknownSpecField",): scalars,
}


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    paths = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    for path in paths:
        value = draw(
            st.one_of(FIELDS[path], scalars, st.just(ABSENT))
            if draw(st.integers(0, 9)) == 0
            else FIELDS[path]
        )
        node = spec
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            if value is ABSENT:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return spec


def structural_gap(spec: dict[str, Any]) -> bool:
    """learning_rate is a number or "auto": a structural schema has no type for that (its node is
    untyped, so CEL cannot see it either); the schema checks bounds and the string's pattern, and
    a boolean, list or object gets past the API server. The model refuses it, and the operator
    reports Validated=False with the model's message."""
    training = spec.get("training")
    if not isinstance(training, dict) or "learning_rate" not in training:
        return False
    return isinstance(training["learning_rate"], bool | list | dict)


def model_accepts(obj: dict[str, Any]) -> tuple[bool, str]:
    try:
        FineTuneJob.model_validate(obj)
    except ValidationError as exc:
        return False, str(exc).splitlines()[1:3].__str__()
    return True, ""


def server_accepts(ns: Namespace, obj: dict[str, Any]) -> tuple[bool, str]:
    try:
        ns.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns.name, PLURAL, obj, dry_run="All", field_validation="Strict"
        )
    except ApiException as exc:
        if exc.status not in (400, 422):
            raise
        return False, json.loads(exc.body).get("message", "")
    return True, ""


@pytest.fixture(scope="module")
def scratch(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    ns = make_namespace(cluster, tmp_path_factory.mktemp("cel"), prefix="cel")
    yield ns
    remove_namespace(ns)


def test_cross_field_invalid_example_is_refused_by_kubectl_apply(scratch: Namespace) -> None:
    """Only the API server judges here: no validating webhook is registered for FineTuneJobs."""
    hooks = client.AdmissionregistrationV1Api(scratch.cluster.api)
    assert not [
        w
        for config in hooks.list_validating_webhook_configuration().items
        for w in config.webhooks or []
        for r in w.rules or []
        if "finetunejobs" in (r.resources or [])
    ]
    example = REPO / "examples" / "invalid" / "loftq-with-nvfp4.yaml"
    result = scratch.cluster.kubectl("apply", "-n", scratch.name, "-f", str(example), check=False)
    assert result.returncode != 0
    assert 'The FineTuneJob "loftq-on-nvfp4" is invalid' in result.stderr, result.stderr
    assert "spec.training.quantization_scheme: Invalid value" in result.stderr
    assert (
        "peft_implementation loftq cannot be used with quantization_scheme nvfp4: LoftQ needs a "
        "bitsandbytes scheme (bnb-4bit or bnb-8bit), and Safe Synthesizer's LoRA setup fails on "
        "any other"
    ) in result.stderr


def test_model_and_api_server_agree_on_generated_specs(scratch: Namespace) -> None:
    seen: list[dict[str, Any]] = []
    disagreements: list[str] = []

    @settings(
        max_examples=MIN_CASES + 100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(specs())
    def check(spec: dict[str, Any]) -> None:
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": f"agree-{len(seen)}"},
            "spec": spec,
        }
        seen.append(spec)
        model, why_model = model_accepts(obj)
        server, why_server = server_accepts(scratch, obj)
        if structural_gap(spec):
            # The one documented gap: the API server accepts what the model refuses only for
            # learning_rate. Checked both ways, so it fails if the gap ever closes or widens.
            rest = copy.deepcopy(obj)
            del rest["spec"]["training"]["learning_rate"]
            expected = (False, model_accepts(rest)[0])
            if (model, server) != expected:
                disagreements.append(f"gap changed: {why_model} / {why_server}: {spec}")
            return
        if model != server:
            disagreements.append(
                f"model {'accepts' if model else 'refuses'} ({why_model}), API server "
                f"{'accepts' if server else 'refuses'} ({why_server}): {json.dumps(spec)}"
            )

    check()
    accepted = sum(model_accepts({"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
                                  "metadata": {"name": "x"}, "spec": s})[0] for s in seen)  # fmt: skip
    assert len(seen) >= MIN_CASES, f"only {len(seen)} cases generated"
    assert 0.2 * len(seen) < accepted < 0.8 * len(seen), f"{accepted}/{len(seen)} valid: unbalanced"
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(
        disagreements[:25]
    )
