"""The Helm chart, rendered by the real helm: lint, schema, CRD, RBAC, Pod Security, arguments."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.settings import parse_settings
from podsecurity import restricted_violations

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
VALUE_SETS = [None, *CI_VALUES]


def helm() -> str:
    local = REPO / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    assert found, "helm is not installed: run `make setup`"
    return found


def render(values: Path | None = None, *sets: str, namespace: str = "ops") -> list[dict[str, Any]]:
    args = [helm(), "template", "rel", str(CHART), "-n", namespace]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def name_of(values: Path | None) -> str:
    return values.stem if values else "defaults"


@pytest.mark.parametrize("values", VALUE_SETS, ids=name_of)
def test_helm_lint_is_clean(values: Path | None) -> None:
    args = [helm(), "lint", str(CHART), "--strict"] + (["-f", str(values)] if values else [])
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["bogus=1"], "additional properties 'bogus' not allowed"),
        (["trainer.gpuLables.memory=x"], "additional properties 'gpuLables' not allowed"),
        (["replicaCount=two"], "got string, want integer"),
        (["trainer.minCapability.fp8=nine"], "does not match pattern"),
        (["webhook.enabled=maybe"], "got string, want boolean"),
        (["image.pullPolicy=Sometimes"], "value must be one of"),
        (["gpuAllocation=gpu-operator"], "value must be one of 'device-plugin', 'dra'"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(sets: list[str], message: str) -> None:
    args = [helm(), "template", "rel", str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def leaf_keys_without_comment(text: str) -> list[str]:
    """Leaf keys with no comment on the line above, on their own or on an enclosing key (a
    commented map such as `resources:` documents its entries)."""
    lines = text.splitlines()
    missing = []
    ancestors: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        commented = index > 0 and lines[index - 1].strip().startswith("#")
        next_line = next((x for x in lines[index + 1 :] if x.strip()), "")
        next_indent = len(next_line) - len(next_line.lstrip())
        is_parent = (
            not rest.strip() and next_indent > indent and not next_line.lstrip().startswith("-")
        )
        if is_parent:
            ancestors.append((indent, commented))
        elif not commented and not any(c for _, c in ancestors):
            missing.append(key)
    return missing


def test_every_value_is_commented() -> None:
    assert leaf_keys_without_comment((CHART / "values.yaml").read_text()) == []
    # the check works: an uncommented leaf is found, a commented parent covers its entries
    assert leaf_keys_without_comment("a:\n  b: 1\n# -- c\nc: 2\n") == ["b"]
    assert leaf_keys_without_comment("# -- d\nd:\n  e: 1\n") == []


def test_crd_is_the_generated_one() -> None:
    generated = yaml.safe_load((REPO / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    assert (CHART / "files" / "finetunejobs.finetune.dev.yaml").read_text() == (
        REPO / "crds" / "finetunejobs.finetune.dev.yaml"
    ).read_text()
    (crd,) = of_kind(render(), "CustomResourceDefinition")
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["name"] == generated["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    (unkept,) = of_kind(render(None, "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]
    assert of_kind(render(None, "crds.enabled=false"), "CustomResourceDefinition") == []


@pytest.mark.parametrize("values", VALUE_SETS, ids=name_of)
def test_operator_pod_meets_restricted_pod_security(values: Path | None) -> None:
    (deployment,) = of_kind(render(values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("values", VALUE_SETS, ids=name_of)
def test_rbac_has_no_wildcards(values: Path | None) -> None:
    for doc in render(values):
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert "*" not in rule.get(key, []), (doc["metadata"]["name"], rule)


def test_cluster_wide_by_default_namespaced_on_request() -> None:
    default = render()
    assert {d["metadata"]["name"] for d in of_kind(default, "ClusterRole")} == {
        "rel-finetune-operator",
        "rel-finetune-operator-cluster",
    }
    assert of_kind(default, "Role") == []
    namespaced = render(CHART / "ci" / "namespaced-values.yaml")
    roles = of_kind(namespaced, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-team-a", "ml-team-b"]
    (cluster_role,) = of_kind(
        namespaced, "ClusterRole"
    )  # nodes, webhook config, nothing namespaced
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert resources == {
        "nodes",
        "namespaces",
        "customresourcedefinitions",
        "validatingwebhookconfigurations",
        "mutatingwebhookconfigurations",
        "validatingadmissionpolicies",
        "validatingadmissionpolicybindings",
    }


def test_the_trainer_identity_and_its_policy_only_with_status_reporting() -> None:
    """The operator makes each namespace's trainer account, Role and RoleBinding (never deletes
    them) and keeps the one admission policy that narrows them; without status reporting the
    chart grants none of that."""

    def granted(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
            for rule in role["rules"]:
                for resource in rule["resources"]:
                    if resource in (
                        "serviceaccounts",
                        "roles",
                        "rolebindings",
                    ) or resource.startswith("validatingadmissionpolic"):
                        names = ",".join(rule.get("resourceNames", []))
                        found.setdefault(f"{resource}[{names}]", []).extend(rule["verbs"])
        return {k: sorted(v) for k, v in found.items()}

    policy = "[finetune-trainer.finetune.dev]"
    assert granted(render()) == {
        "serviceaccounts[]": ["create", "get", "list", "watch"],
        "roles[]": ["create", "get", "list", "watch"],
        "rolebindings[]": ["create", "get", "list", "watch"],
        "validatingadmissionpolicies[]": ["create"],
        "validatingadmissionpolicybindings[]": ["create"],
        f"validatingadmissionpolicies{policy}": ["patch"],
        f"validatingadmissionpolicybindings{policy}": ["patch"],
    }
    assert granted(render(None, "trainer.statusReporting=false")) == {}


@pytest.mark.parametrize("values", VALUE_SETS, ids=name_of)
def test_operator_accepts_the_rendered_arguments(values: Path | None) -> None:
    docs = render(values)
    (deployment,) = of_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    settings = parse_settings([*container["args"], "--webhook-namespace=ops"])
    rendered = yaml.safe_load((CHART / "values.yaml").read_text()) if values is None else None
    if rendered is not None:
        assert settings.trainer_image == "ghcr.io/finetune-operator/trainer:0.1.0"
        assert {k: str(v) for k, v in settings.min_capability.items()} == rendered["trainer"][
            "minCapability"
        ]
        assert settings.clusterwide and not settings.webhook and settings.peering is None
        assert settings.gpu_allocation == "device-plugin"
        assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_several_replicas_use_kopf_peering() -> None:
    docs = render(CHART / "ci" / "namespaced-values.yaml")
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert (
        "--peering=rel-finetune-operator"
        in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    peerings = of_kind(docs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["ml-team-a", "ml-team-b"]
    crds = (CHART / "crds" / "kopf-peering.yaml").read_text()  # installed before the templates
    assert "name: kopfpeerings.kopf.dev" in crds and "name: clusterkopfpeerings.kopf.dev" in crds
    (cluster_wide,) = of_kind(render(None, "replicaCount=3"), "ClusterKopfPeering")
    assert cluster_wide["metadata"]["name"] == "rel-finetune-operator"


def test_webhook_off_by_default_service_and_cert_manager_when_on() -> None:
    """The CRD's CEL rules refuse what the webhook refused: by default there is none, and no RBAC
    for webhook configurations."""
    default = render()
    assert of_kind(default, "Service") == [] and of_kind(default, "Certificate") == []
    resources = {
        r
        for role in of_kind(default, "ClusterRole")
        for rule in role["rules"]
        for r in rule["resources"]
    }
    assert "validatingwebhookconfigurations" not in resources
    (service,) = of_kind(render(None, "webhook.enabled=true"), "Service")
    assert service["metadata"]["name"] == "rel-finetune-operator-webhook"
    with_cm = render(CHART / "ci" / "namespaced-values.yaml")
    certificates = {c["metadata"]["name"]: c for c in of_kind(with_cm, "Certificate")}
    serving = certificates["rel-finetune-operator-webhook"]
    assert "rel-finetune-operator-webhook.ops.svc" in serving["spec"]["dnsNames"]
    assert serving["spec"]["issuerRef"] == {
        "name": "rel-finetune-operator-webhook-ca",
        "kind": "Issuer",
    }
    assert certificates["rel-finetune-operator-webhook-ca"]["spec"]["isCA"] is True
    (deployment,) = of_kind(with_cm, "Deployment")
    assert (
        "--webhook-cert-dir=/certs"
        in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    minimal = render(CHART / "ci" / "minimal-values.yaml")
    assert of_kind(minimal, "Service") == []
    (cluster_role,) = [
        r for r in of_kind(minimal, "ClusterRole") if r["metadata"]["name"].endswith("-cluster")
    ]
    assert all(
        "validatingwebhookconfigurations" not in rule["resources"] for rule in cluster_role["rules"]
    )


def test_image_tags_default_to_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (deployment,) = of_kind(render(), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/finetune-operator/operator:{chart['appVersion']}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ghcr.io/finetune-operator/operator:{chart['appVersion']}" in dockerfile
    assert f"ghcr.io/finetune-operator/trainer:{chart['appVersion']}" in dockerfile


def test_dra_rbac_only_with_dra_and_only_what_it_uses() -> None:
    """gpuAllocation=dra: ResourceClaimTemplates (created, read, deleted to undo), ResourceClaims
    (get) and ResourceSlices (list); the default grants nothing of resource.k8s.io."""

    def dra_rules(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
            for rule in role["rules"]:
                if "resource.k8s.io" in rule["apiGroups"]:
                    assert rule["apiGroups"] == ["resource.k8s.io"]
                    for resource in rule["resources"]:
                        found[resource] = sorted(rule["verbs"])
        return found

    assert dra_rules(render()) == {}
    expected = {
        "resourceclaimtemplates": ["create", "delete", "get", "list", "watch"],
        "resourceclaims": ["get"],
        "resourceslices": ["list"],
    }
    assert dra_rules(render(None, "gpuAllocation=dra")) == expected
    namespaced = render(CHART / "ci" / "namespaced-values.yaml", "gpuAllocation=dra")
    assert dra_rules(namespaced) == expected
    (cluster_role,) = [
        r for r in of_kind(namespaced, "ClusterRole") if r["metadata"]["name"].endswith("-cluster")
    ]
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert "resourceslices" in cluster_resources  # cluster-scoped
    assert "resourceclaimtemplates" not in cluster_resources  # only in the watched namespaces
    (deployment,) = of_kind(render(None, "gpuAllocation=dra"), "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_settings([*args, "--webhook-namespace=ops"]).gpu_allocation == "dra"
