"""The checked-in CRD is exactly what the models generate, and it is a structural schema."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from crdschema import CRD_FILE, schema_errors
from finetune_api.crd import build_crd, render_crd

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == render_crd(), "crds/ is stale: run `make crds`"


def test_generator_cli_writes_the_same_file(tmp_path: Path) -> None:
    target = tmp_path / "crd.yaml"
    subprocess.run(
        [sys.executable, "-m", "finetune_api.crd", str(target)], check=True, capture_output=True
    )
    assert target.read_text() == CRD_FILE.read_text()


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.get("properties", {}).items():
            found += walk(value, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                found += walk(node[key], f"{path}[{key}]")
    return found


def test_schema_is_structural() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(crd)
    assert "$ref" not in text and "anyOf" not in text
    for path, node in walk(root):
        has_type = "type" in node
        special = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        assert has_type or special, f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: {bound} must be boolean (OpenAPI 3.0)"
        if path and path != ".metadata":  # every field explains itself in `kubectl explain`
            assert node.get("description") or path.endswith("]"), f"{path} has no description"


def training_schema() -> dict[str, Any]:
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(root["properties"]["spec"]["properties"]["training"]["properties"])


def test_auto_fields_have_structural_forms() -> None:
    training = training_schema()
    records = training["num_input_records_to_sample"]
    assert records["x-kubernetes-int-or-string"] is True and records["minimum"] == 0
    assert records["pattern"] == "^auto$" and records["default"] == "auto"
    rope = training["rope_scaling_factor"]
    assert rope["x-kubernetes-int-or-string"] is True and rope["minimum"] == 1
    assert "nullable" not in rope  # Safe Synthesizer refuses null here
    rate = training["learning_rate"]
    assert rate["x-kubernetes-preserve-unknown-fields"] is True
    assert (
        rate["minimum"],
        rate["maximum"],
        rate["exclusiveMinimum"],
        rate["exclusiveMaximum"],
    ) == (0, 1, True, True)


def enum_of(node: dict[str, Any]) -> list[str]:
    """The values of an enum, or of a nullable enum's CEL rule `self in [...]`."""
    if "enum" in node:
        return list(node["enum"])
    (rule,) = [v["rule"] for v in node["x-kubernetes-validations"]]
    return list(ast.literal_eval(rule.removeprefix("self in ")))


def test_bounds_and_defaults_come_from_the_model() -> None:
    training = training_schema()
    assert training["lora_r"] == {
        **training["lora_r"],
        "minimum": 0,
        "exclusiveMinimum": True,
        "default": 32,
    }
    # A fractional minimum is a CEL rule: the API server truncates it for integer values, so a
    # schema minimum of 0.5 would let 0 through (issue 14).
    alpha = training["lora_alpha_over_r"]
    assert "minimum" not in alpha and alpha["maximum"] == 3
    assert alpha["x-kubernetes-validations"] == [
        {"rule": "self >= 0.5", "message": "should be greater than or equal to 0.5"}
    ]
    # A nullable enum is a CEL rule: an enum refuses an explicit null under server-side apply.
    scheme = training["quantization_scheme"]
    assert "enum" not in scheme and scheme["nullable"] is True
    assert scheme["x-kubernetes-validations"] == [
        {
            "rule": "self in ['bnb-4bit', 'bnb-8bit', 'fp8', 'nvfp4', 'mxfp4']",
            "message": "must be one of bnb-4bit, bnb-8bit, fp8, nvfp4, mxfp4",
        }
    ]
    assert training["quantization_bits"]["enum"] == [4, 8]
    assert training["lora_target_modules"]["default"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (
        "lora_r" in training["lora_r"]["description"]
        or "rank" in training["lora_r"]["description"].lower()
    )


def test_names_printer_columns_and_status() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    for name in ("Phase", "Scheme", "GPU-Arch", "Node", "Progress", "Loss", "Age"):
        assert name in columns
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert set(enum_of(status["properties"]["phase"])) == {
        "Pending",
        "Queued",
        "Admitted",
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
    }


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"lora_r": 0}, "spec.training.lora_r"),
        ({"learning_rate": 1.5}, "spec.training.learning_rate"),
        ({"learning_rate": "fast"}, "spec.training.learning_rate"),
        ({"num_input_records_to_sample": "many"}, "spec.training.num_input_records_to_sample"),
        ({"quantization_scheme": "int4"}, "spec.training.quantization_scheme"),
        ({"warmup_steps": -1}, "spec.training.warmup_steps"),
        ({"warmup_ratio": -0.5}, "spec.training.warmup_ratio"),
        ({"lora_target_modules": []}, "spec.training.lora_target_modules"),
        ({"pretrained_model": ""}, "spec.training.pretrained_model"),
        ({"lr_scheduler": "exp"}, "spec.training.lr_scheduler"),
        ({"lora_rank": 3}, "spec.training"),
    ],
)
def test_schema_rejects_bad_training_values(training: dict[str, Any], field: str) -> None:
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {
            "dataset": {"claimName": "d", "path": "a.jsonl"},
            "output": {"claimName": "o", "path": "a"},
            "training": training,
        },
    }
    errors = schema_errors(obj)
    assert errors and errors[0].startswith(field), errors


def rules_at(*path: str) -> list[dict[str, str]]:
    node = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for key in path:
        node = node["properties"][key]
    return list(node.get("x-kubernetes-validations", []))


def test_every_cross_field_rule_of_the_models_is_a_cel_rule_with_its_message() -> None:
    from finetune_api.resource import DatasetSource, FineTuneJobSpec, ModelSource, VolumePath
    from finetune_api.training import TrainingHyperparams

    for model, path in [
        (FineTuneJobSpec, ()),
        (TrainingHyperparams, ("training",)),
        (ModelSource, ("model",)),
        (DatasetSource, ("dataset",)),
        (VolumePath, ("output",)),
    ]:
        published = rules_at(*path)
        assert model.cel_rules(), model
        assert [r["rule"] for r in published] == [rule.cel for rule in model.cel_rules()]
        assert [r for r in published if r["message"] == ""] == []
    assert any("loftq" in r["rule"] for r in rules_at("training"))
    # loftq without quantize_model trains plain LoRA, as in Safe Synthesizer: no spec-level rule
    assert not any("loftq" in r["rule"] for r in rules_at())
    assert any("warmup_steps" in r["rule"] for r in rules_at("training"))


def test_messages_with_values_become_message_expressions() -> None:
    (rule,) = [r for r in rules_at("training") if "loftq" in r["rule"]]
    assert rule["messageExpression"] == (
        "'peft_implementation loftq cannot be used with quantization_scheme ' + "
        "self.quantization_scheme + ': LoftQ needs a bitsandbytes scheme (bnb-4bit or bnb-8bit), "
        "and Safe Synthesizer\\'s LoRA setup fails on any other'"
    )
    assert rule["message"].startswith("peft_implementation loftq cannot be used with")
    assert rule["fieldPath"] == ".quantization_scheme" and rule["reason"] == "FieldValueInvalid"


def test_strings_and_lists_that_cel_reads_are_bounded() -> None:
    """Unbounded strings make the API server's CEL cost estimate exceed its budget."""
    assert rules_at("dataset") and build_crd()  # the paths the rules read:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["dataset"]["properties"]["path"]["maxLength"] == 4096
    training = spec["properties"]["training"]["properties"]
    for name in ("peft_implementation", "pretrained_model", "attn_implementation"):
        assert training[name]["maxLength"] <= 4096, name
    assert training["lora_target_modules"]["maxItems"] == 64


def test_warmup_steps_has_no_stored_default() -> None:
    """With a default in the CRD the API server would store warmup_steps in every object, and a
    block that sets only the deprecated warmup_ratio would lose it (warmup_steps wins when set)."""
    training = training_schema()
    assert "default" not in training["warmup_steps"]
    assert "default" not in training["warmup_ratio"]
    assert training["warmup_steps"]["minimum"] == 0
