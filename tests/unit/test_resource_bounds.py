"""Kubernetes-side fields are bounded as Kubernetes judges them in the children (issue 14): a spec
the model accepts never makes the API server refuse the Job (or another child) built from
it. Each case was a spec that got no status and was retried forever before the bounds."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_api import FineTuneJobSpec, format_validation_error
from finetune_api.crd import build_crd
from finetune_api.kube_fields import label_key_ok

MINIMAL: dict[str, Any] = {
    "dataset": {"claimName": "data", "path": "train.jsonl"},
    "output": {"claimName": "out", "path": "adapter"},
}


def spec_with(**parts: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(parts)
    return spec


def error_of(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        FineTuneJobSpec.model_validate(spec)
    return format_validation_error(info.value, "spec")


def hub_key(key: str) -> dict[str, Any]:
    return spec_with(model={"hub": {"tokenSecretRef": {"name": "hf", "key": key}}})


def toleration(**fields: Any) -> dict[str, Any]:
    return spec_with(placement={"tolerations": [fields]})


REFUSED = [
    (hub_key("."), "spec.model.hub.tokenSecretRef.key"),
    (hub_key(".."), "spec.model.hub.tokenSecretRef.key"),
    (hub_key("..token"), "spec.model.hub.tokenSecretRef.key"),
    (hub_key("a key"), "spec.model.hub.tokenSecretRef.key"),
    (spec_with(placement={"priorityClassName": "Not_A_Name"}), "spec.placement.priorityClassName"),
    (spec_with(placement={"nodeSelector": {"bad key!": "x"}}), "spec.placement.nodeSelector"),
    (spec_with(placement={"nodeSelector": {"a" * 64: "x"}}), "spec.placement.nodeSelector"),
    (
        spec_with(placement={"nodeSelector": {"x" * 254 + "/name": "v"}}),
        "spec.placement.nodeSelector",
    ),
    (spec_with(placement={"nodeSelector": {"zone": "a b"}}), "spec.placement.nodeSelector.zone"),
    (spec_with(placement={"nodeSelector": {"zone": "v" * 64}}), "spec.placement.nodeSelector.zone"),
    (
        spec_with(placement={"nodeSelector": {f"k{i}": "v" for i in range(65)}}),
        "spec.placement.nodeSelector",
    ),
    (
        toleration(key="k", operator="Exists", value="v"),
        "spec.placement.tolerations[0].value: value must be empty when operator is Exists",
    ),
    (
        toleration(key="k", effect="NoSchedule", tolerationSeconds=5),
        "spec.placement.tolerations[0].tolerationSeconds: tolerationSeconds needs effect NoExecute",
    ),
    (toleration(key="k", tolerationSeconds=5), "tolerationSeconds needs effect NoExecute"),
    (
        toleration(value="v"),
        "spec.placement.tolerations[0].operator: operator must be Exists when key is empty",
    ),
    (toleration(key="bad key"), "spec.placement.tolerations[0].key"),
    (toleration(key="k", value="bad value"), "spec.placement.tolerations[0].value"),
    (
        toleration(key="k", effect="NoExecute", tolerationSeconds=-1),
        "spec.placement.tolerations[0].tolerationSeconds",
    ),
    (spec_with(placement={"tolerations": [{"key": "k"}] * 33}), "spec.placement.tolerations"),
    (spec_with(resources={"cpu": "-2"}), "spec.resources.cpu"),
    (spec_with(resources={"cpu": -2}), "spec.resources.cpu"),
    (spec_with(resources={"memory": "-48Gi"}), "spec.resources.memory"),
    (spec_with(resources={"memory": "1" * 65}), "spec.resources.memory"),
    (spec_with(image=" trainer:1 "), "spec.image"),
    (spec_with(image="trainer:1\n"), "spec.image"),
    (spec_with(training={"pretrained_model": "m" * 1_100_000}), "spec.training.pretrained_model"),
    (spec_with(activeDeadlineSeconds=2**31), "spec.activeDeadlineSeconds"),
]


@pytest.mark.parametrize(("spec", "expected"), REFUSED, ids=lambda v: str(v)[:60])
def test_model_refuses_what_kubernetes_would_refuse_in_a_child(
    spec: dict[str, Any], expected: str
) -> None:
    error = error_of(spec)
    assert error.startswith(expected) or expected in error, error
    assert "\n" not in error


ACCEPTED = [
    hub_key("token"),
    hub_key(".hidden"),
    hub_key("HF_TOKEN-2.txt"),
    spec_with(placement={"nodeSelector": {"topology.kubernetes.io/zone": "us-east-1a"}}),
    spec_with(placement={"nodeSelector": {"example.com/gpu_pool": ""}}),
    toleration(operator="Exists"),
    toleration(key="dedicated", operator="Exists", effect="NoSchedule"),
    toleration(key="dedicated", value="ml", effect="NoExecute", tolerationSeconds=60),
    toleration(key="example.com/ml", operator="Equal", value="", effect="PreferNoSchedule"),
    spec_with(resources={"cpu": "500m", "memory": "64Gi"}),
    spec_with(resources={"cpu": 0, "memory": "+1e3"}),
    spec_with(image="registry.example.com:5000/trainer@sha256:" + "a" * 64),
]


@pytest.mark.parametrize("spec", ACCEPTED, ids=lambda v: json.dumps(v)[-60:])
def test_model_accepts_what_kubernetes_accepts(spec: dict[str, Any]) -> None:
    FineTuneJobSpec.model_validate(spec)


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("a", True),
        ("kubernetes.io/hostname", True),
        ("A.b-c_d", True),
        ("-a", False),
        ("a-", False),
        ("/a", False),
        ("Upper.com/a", False),
        ("a/b/c", False),
        ("a" * 63, True),
        ("a" * 64, False),
        ("p" * 253 + "/n", True),
        ("p" * 254 + "/n", False),
    ],
)
def test_label_keys(key: str, ok: bool) -> None:
    assert label_key_ok(key) is ok


def _string_size(node: dict[str, Any]) -> int:
    if "enum" in node:
        return max(len(v) for v in node["enum"])
    if "maxLength" not in node and not any(c in node["pattern"] for c in "*+{"):
        return len(node["pattern"])  # a fixed word such as ^auto$
    assert "maxLength" in node, node
    return int(node["maxLength"])


def _worst_case_size(node: dict[str, Any]) -> int:
    """An upper bound, in bytes of JSON, of any object the schema node admits (strings at their
    maxLength, lists and maps at their max size), ignoring syntax. Fails on an unbounded string,
    list or map."""
    if node.get("type") == "object" and "properties" in node:
        return sum(len(k) + _worst_case_size(v) for k, v in node["properties"].items())
    if node.get("type") == "object" and "additionalProperties" in node:
        assert "maxProperties" in node, node
        value = _worst_case_size(node["additionalProperties"])
        return node["maxProperties"] * (320 + value)  # keys are label keys (<= 317) by CEL
    if node.get("type") == "array":
        assert "maxItems" in node, node
        return int(node["maxItems"]) * _worst_case_size(node["items"])
    if node.get("type") == "string" or "pattern" in node:
        return _string_size(node)
    return 32  # numbers and booleans


def test_every_spec_fits_the_annotations_of_a_pod_template() -> None:
    """The trainer's config (the whole spec, and a few paths) travels in an annotation of the
    Job's pod template (all annotations together: 256 KiB), and `kubectl apply` keeps the spec in
    one of the FineTuneJob's: the schema bounds every string, list and map so that even the
    largest spec fits."""
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _worst_case_size(spec) < 200 * 1024
