"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

The models are the one source of truth; this turns their JSON Schema into a structural OpenAPI v3
schema that apiextensions.k8s.io/v1 accepts on Kubernetes 1.20 and later: references inlined, no
`anyOf` of types, OpenAPI 3.0 style exclusive bounds, and the structural forms for "auto" fields:

* integer or "auto": `x-kubernetes-int-or-string` with `minimum` (checked for integers only) and
  `pattern: ^auto$` (checked for strings only);
* number or "auto": the same bounds under `x-kubernetes-preserve-unknown-fields`, since
  int-or-string admits no fractions; the webhook and the operator check the type.

Run `python -m finetune_api.crd [PATH...]` (or `make crds`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from finetune_api.resource import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

CRD_FILE = f"{PLURAL}.{GROUP}.yaml"
# The CRD for `kubectl apply -f crds/`, and the copy the Helm chart templates (charts cannot read
# files outside their directory).
CRD_PATHS = (Path("crds") / CRD_FILE, Path("charts") / "finetune-operator" / "files" / CRD_FILE)

# JSON Schema keywords a Kubernetes JSONSchemaProps has no field for.
_DROP = {"title", "deprecated", "$defs"}
_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_INT_OR_STRING = "x-kubernetes-int-or-string"
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_VALIDATIONS = "x-kubernetes-validations"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Scheme", "type": "string", "jsonPath": ".status.placement.scheme"},
    {
        "name": "GPU-Arch",
        "type": "string",
        "description": "Oldest GPU architecture that can run the scheme",
        "jsonPath": ".status.placement.architecture",
    },
    {"name": "Node", "type": "string", "jsonPath": ".status.placement.node"},
    {
        "name": "Progress",
        "type": "integer",
        "description": "Percent of training steps done",
        "jsonPath": ".status.progress.percent",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "GPU",
        "type": "string",
        "priority": 1,
        "description": "GPU product of the node",
        "jsonPath": ".status.placement.gpuProduct",
    },
    {
        "name": "Message",
        "type": "string",
        "priority": 1,
        "jsonPath": ".status.message",
    },
]


class _DefaultFactories(GenerateJsonSchema):
    """Also publish defaults built by default_factory: nested objects default to {} (their own
    field defaults then apply), lists to their value."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            return {} if isinstance(value, BaseModel) else value
        return schema.get("default", NoDefault)


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one JSON Schema node (and its children) to a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = _structural(defs[node.pop("$ref").rsplit("/", 1)[-1]], defs)
        node = {**target, **{k: v for k, v in node.items() if k in ("description", "default")}}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_structural(node.pop("allOf")[0], defs), **node}
    if "anyOf" in node:
        node = _merge_any_of(node, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]  # null is "unset", not a value to store
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # apiextensions/v1 prunes unknown fields instead
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _structural(node["items"], defs)
    return _as_cel(node)


def _as_cel(node: dict[str, Any]) -> dict[str, Any]:
    """Move two schema checks the API server gets wrong into CEL rules (issue 14):

    * an enum on a nullable field refuses an explicit null under server-side apply ("Unsupported
      value: null"), which every Safe Synthesizer dump has (`quantization_scheme: null`); CEL
      rules are not run on null, so `self in [...]` refuses the same values and lets null through;
    * a fractional minimum or maximum of a number is truncated when the value is written as an
      integer (minimum 0.5 lets 0 through): compared in CEL, where the value is a double.
    """
    node = {k: v for k, v in node.items() if k not in _DROP}
    rules: list[dict[str, str]] = []
    if node.get("nullable") and "enum" in node and node.get("type") == "string":
        values = [v for v in node.pop("enum") if v is not None]
        node["maxLength"] = max(len(v) for v in values)  # also bounds the rule's cost
        rules.append(
            {"rule": f"self in {values!r}", "message": "must be one of " + ", ".join(values)}
        )
    if node.get("type") == "number":
        for bound, exclusive, op, words in (
            ("minimum", "exclusiveMinimum", ">", "greater than"),
            ("maximum", "exclusiveMaximum", "<", "less than"),
        ):
            value = node.get(bound)
            if isinstance(value, float) and not value.is_integer():
                strict = bool(node.pop(exclusive, False))
                del node[bound]
                rules.append(
                    {
                        "rule": f"self {op}{'' if strict else '='} {value!r}",
                        "message": f"should be {words}{'' if strict else ' or equal to'} {value!r}",
                    }
                )
    if rules:
        node[_VALIDATIONS] = [*node.get(_VALIDATIONS, []), *rules]
    return node


def _merge_any_of(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Fold an anyOf into one structural node: nullable X, int-or-string, or number-or-string."""
    branches = [_structural(b, defs) for b in node.pop("anyOf")]
    nullable = any(b.get("type") == "null" for b in branches)
    branches = [b for b in branches if b.get("type") != "null"]
    merged: dict[str, Any] = {}
    if len(branches) == 1:
        merged = dict(branches[0])
    else:
        types = {b.get("type") for b in branches}
        strings = [b for b in branches if b.get("type") == "string"]
        numbers = [b for b in branches if b.get("type") in ("integer", "number")]
        if types not in ({"integer", "string"}, {"number", "string"}) or len(strings) != 1:
            raise ValueError(f"no structural form for anyOf {branches}")
        merged = {_INT_OR_STRING if "integer" in types else _PRESERVE: True}
        for key in _NUMERIC_BOUNDS:
            if key in numbers[0]:
                merged[key] = numbers[0][key]
        string = strings[0]
        if "enum" in string:
            words = [re.escape(v) for v in string["enum"]]
            merged["pattern"] = f"^{words[0]}$" if len(words) == 1 else f"^({'|'.join(words)})$"
        elif "pattern" in string:
            merged["pattern"] = string["pattern"]
        for key in ("minLength", "maxLength"):  # checked for strings only, as the pattern
            if key in string:
                merged[key] = string[key]
    if nullable:
        merged["nullable"] = True
    merged.update(node)
    return merged


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, schema_generator=_DefaultFactories)
    return _structural(schema, schema.get("$defs", {}))


def _without_defaults(node: Any) -> Any:
    """Status is written by controllers only: it carries no defaults."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec_schema = _schema_of(FineTuneJobSpec)
    status_schema = _without_defaults(_schema_of(FineTuneJobStatus))
    # Keep what kopf (and future versions) write into status alongside the typed fields.
    status_schema[_PRESERVE] = True
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "finetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "FineTuneJob fine-tunes a LoRA adapter on a quantized base model "
                                "on a GPU that can run the chosen quantization scheme."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "Versioned schema of this object: finetune.dev/v1alpha1.",
                                },
                                "kind": {"type": "string", "description": "FineTuneJob."},
                                # The API server allows nothing but the type here.
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML text checked in under crds/."""
    header = "# Generated from the finetune_api models by `make crds`. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write the CRD to the given paths (default: crds/ and the chart's copy)."""
    args = sys.argv[1:] if argv is None else argv
    text = render_crd()
    for target in [Path(a) for a in args] or CRD_PATHS:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
