"""Kubernetes-side building blocks of the FineTuneJob spec, bounded as Kubernetes judges them in
the training Job: names, label keys and values, Secret keys, quantities, tolerations, placement.

A spec these accept never makes the API server refuse a child built from it (issue 14): each
bound is a schema pattern/length or a `@cel_rule`, so `kubectl apply` refuses the mistake.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_api.rules import RuledModel, cel_rule

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Kubernetes resource.Quantity, as the built-in types' OpenAPI schema writes it, without the
# minus sign: a request or limit cannot be negative.
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
MAX_QUANTITY = 64
# A label key (qualified name): an optional DNS-subdomain prefix and '/', then a name of at most
# 63 characters. The prefix's own limit (253) is a rule of its own (see label_key_ok).
_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = rf"^({_PREFIX}/)?{_NAME_PART}$"
MAX_LABEL_KEY = 253 + 1 + 63
LABEL_VALUE = rf"^({_NAME_PART})?$"
MAX_LABEL_VALUE = 63
# A Secret or ConfigMap key: not '.', '..' or anything starting with '..'.
SECRET_KEY = r"^(\.[-_a-zA-Z0-9][-._a-zA-Z0-9]*|[-_a-zA-Z0-9][-._a-zA-Z0-9]*)$"
# A container image reference: no whitespace (the kubelet would never pull it).
IMAGE = r"^[^\s]+$"
MAX_NODE_SELECTOR = 64
MAX_TOLERATIONS = 32

MAX_PATH = 4096  # PATH_MAX; also bounds the CEL rules' cost
MAX_NAME = 256
ResourceName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE, pattern=LABEL_VALUE)]


def label_key_ok(key: str) -> bool:
    """Whether Kubernetes accepts `key` as a label key (the Python twin of LABEL_KEY_CEL)."""
    prefix, _, _name = key.rpartition("/")
    return re.fullmatch(LABEL_KEY[1:-1], key) is not None and len(prefix) <= 253


def label_key_cel(expr: str) -> str:
    """CEL: `expr` (a string) is a valid label key."""
    return f"{expr}.matches({LABEL_KEY!r}) && ({expr}.indexOf('/') <= 253)"


Quantity = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[str, Field(max_length=MAX_QUANTITY, pattern=QUANTITY)],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class KubeModel(RuledModel):
    """Base for the Kubernetes-side models: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, validate_default=True
    )


class SecretKeyRef(KubeModel):
    """A key of a Secret in the FineTuneJob's namespace."""

    name: Annotated[ResourceName, Field(description="Name of the Secret.")]
    key: Annotated[
        str,
        Field(
            min_length=1,
            max_length=253,
            pattern=SECRET_KEY,
            description="Key in the Secret holding the value (not '.', '..' or '..'-prefixed).",
        ),
    ] = "token"


MAX_NODES = 64


class Resources(KubeModel):
    """Compute for the training pods: `nodes` pods of `gpus` GPUs each."""

    nodes: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_NODES,
            description=(
                "Pods (nodes) training together, data-parallel; N > 1 runs an Indexed Job of N "
                "pods that meet at pod 0 (torch's c10d rendezvous), all with `gpus` GPUs. The "
                "output claim must be shared by all of them (ReadWriteMany) for N > 1."
            ),
        ),
    ] = 1
    gpus: Annotated[
        int,
        Field(
            ge=1,
            le=16,
            description=(
                "GPUs per training pod (nvidia.com/gpu), one data-parallel worker each; "
                "batch_size and gradient_accumulation_steps are per GPU."
            ),
        ),
    ] = 1
    cpu: Annotated[Quantity | None, Field(description="CPU request and limit, e.g. 8.")] = None
    memory: Annotated[
        Quantity | None, Field(description="Memory request and limit, e.g. 64Gi.")
    ] = None


class Toleration(KubeModel):
    """A Kubernetes toleration, as in a pod spec, with the pod API's rules."""

    key: Annotated[
        str | None,
        Field(
            max_length=MAX_LABEL_KEY,
            pattern=rf"^({LABEL_KEY[1:-1]})?$",
            description="Taint key (a label key); empty with Exists matches all.",
        ),
    ] = None
    operator: Annotated[
        Literal["Exists", "Equal"] | None, Field(description="Exists or Equal (default Equal).")
    ] = None
    value: Annotated[
        LabelValue | None, Field(description="Taint value for Equal (a label value).")
    ] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="Taint effect to match; all effects when unset."),
    ] = None
    toleration_seconds: Annotated[
        int | None,
        Field(
            ge=0,
            le=2**31 - 1,
            description="For NoExecute only: how long the pod stays after the taint.",
        ),
    ] = None

    @cel_rule(
        "!has(self.key) || self.key == '' || self.key.indexOf('/') <= 253",
        "the key's prefix (before '/') must be at most 253 characters",
        field_path=".key",
    )
    def _key_prefix(self) -> bool:
        return not self.key or label_key_ok(self.key)

    @cel_rule(
        "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        "operator must be Exists when key is empty (which tolerates every taint)",
        field_path=".operator",
    )
    def _empty_key_exists(self) -> bool:
        return bool(self.key) or self.operator == "Exists"

    @cel_rule(
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "value must be empty when operator is Exists",
        field_path=".value",
    )
    def _exists_without_value(self) -> bool:
        return self.operator != "Exists" or not self.value

    @cel_rule(
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "tolerationSeconds needs effect NoExecute",
        field_path=".tolerationSeconds",
    )
    def _seconds_with_no_execute(self) -> bool:
        return self.toleration_seconds is None or self.effect == "NoExecute"


class Placement(KubeModel):
    """Extra scheduling constraints, merged with the GPU requirement the operator derives."""

    node_selector: Annotated[
        dict[str, LabelValue],
        Field(
            max_length=MAX_NODE_SELECTOR,
            description="Labels the node must carry, in addition to the GPU requirement.",
        ),
    ] = Field(default_factory=dict)
    tolerations: Annotated[
        list[Toleration],
        Field(
            max_length=MAX_TOLERATIONS,
            description="Tolerations added to the nvidia.com/gpu toleration the pod always has.",
        ),
    ] = Field(default_factory=list)
    priority_class_name: Annotated[
        ResourceName | None, Field(description="PriorityClass of the training pod.")
    ] = None
    same_gpu_product: Annotated[
        bool,
        Field(
            alias="sameGPUProduct",
            description=(
                "With resources.nodes > 1: every pod on the same GPU product (the "
                "nvidia.com/gpu.product node label), so no pod waits on a slower one. false lets "
                "the pods mix products that each meet the scheme's requirement."
            ),
        ),
    ] = True

    @cel_rule(
        f"!has(self.nodeSelector) || self.nodeSelector.all(k, {label_key_cel('k')})",
        "every nodeSelector key must be a label key: an optional DNS-subdomain prefix and '/', "
        "then at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric",
        field_path=".nodeSelector",
    )
    def _node_selector_keys(self) -> bool:
        return all(label_key_ok(key) for key in self.node_selector)
