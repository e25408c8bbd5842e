"""A cluster's own admission rule for the fault tests: a ValidatingAdmissionPolicy that refuses
Jobs whose image starts with 'refused:' in one namespace (what an admission webhook would do)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from kubernetes import client

from integration.harness import Namespace, wait_for

MESSAGE = "images named refused are not allowed in this namespace"


@contextlib.contextmanager
def refusing_images(namespace: Namespace) -> Iterator[str]:
    """The policy, in force (probed with a dry run) until the block ends."""
    api = client.AdmissionregistrationV1Api(namespace.cluster.api)
    name = f"no-refused-images-{namespace.name}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"],
                     "resources": ["jobs"]}
                ]
            },
            "validations": [
                {"expression": "!object.spec.template.spec.containers.exists(c, "
                               "c.image.startsWith('refused:'))",
                 "message": MESSAGE}
            ],
        },
    }  # fmt: skip
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": namespace.name}
                }
            },
        },
    }
    api.create_validating_admission_policy(policy)
    api.create_validating_admission_policy_binding(binding)
    probe = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "refused:0"}]}}},
    }  # fmt: skip
    try:
        wait_for(
            lambda: namespace.cluster.kubectl(
                "create", "--dry-run=server", "-n", namespace.name, "-f", "-",
                input=json.dumps(probe), check=False,
            ).returncode != 0,
            what="the admission policy in force",
        )  # fmt: skip
        yield name
    finally:
        api.delete_validating_admission_policy_binding(name)
        api.delete_validating_admission_policy(name)
