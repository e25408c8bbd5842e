"""Validate objects against the generated CRD's OpenAPI v3 schema with the jsonschema library.

A unit-tier stand-in for the API server's validation (the integration tier uses the real one):
OpenAPI 3.0 `nullable`, boolean exclusive bounds and the Kubernetes extensions are translated to a
JSON Schema draft 4 document, and unknown fields are refused as `kubectl apply` refuses them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "finetunejobs.finetune.dev.yaml"


def _to_draft4(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties",):
            out[key] = {k: _to_draft4(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_draft4(value)
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    for validation in node.get("x-kubernetes-validations", []):
        _cel_as_schema(validation["rule"], out)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("nullable") and "type" not in out:
        pass  # int-or-string / preserve-unknown-fields: any type already
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string", *(["null"] if node.get("nullable") else [])]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_CEL_BOUND = re.compile(r"^self (>=|>|<=|<) ([-0-9.e]+)$")


def _cel_as_schema(rule: str, out: dict[str, Any]) -> None:
    """The CRD generator's scalar CEL rules (`self in [...]`, `self >= 0.5`) as JSON Schema."""
    if rule.startswith("self in ["):
        out["enum"] = [*ast.literal_eval(rule.removeprefix("self in ")), None]
    elif match := _CEL_BOUND.match(rule):
        op, value = match.group(1), float(match.group(2))
        out["minimum" if op.startswith(">") else "maximum"] = value
        if len(op) == 1:
            out["exclusiveMinimum" if op == ">" else "exclusiveMaximum"] = True


def spec_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_to_draft4(schema))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Error messages, each prefixed with the dotted path of the field."""
    return [
        ".".join(str(p) for p in error.absolute_path) + ": " + error.message
        for error in spec_validator().iter_errors(obj)
    ]
