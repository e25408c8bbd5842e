"""Today's Job API and Pod Security admission, on the real control plane: a disrupted training pod
is replaced without using a retry, and every pod the operator creates passes the API server's own
restricted-profile admission."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpusim import FakeKubelet
from integration.harness import RESTRICTED, Namespace, ftj_manifest, scheme_training, wait_for

pytestmark = pytest.mark.integration


def status(ns: Namespace, name: str) -> dict[str, Any]:
    return dict(ns.ftj(name).get("status", {}))


def running_pods(ns: Namespace, name: str) -> list[Any]:
    return [
        p
        for p in ns.pods(name)
        if p.status.phase == "Running" and not p.metadata.deletion_timestamp
    ]


def test_evicted_pod_is_replaced_without_using_a_retry(
    namespace: Namespace, kubelet: FakeKubelet
) -> None:
    # backoffLimit 0: had the eviction counted as a failure, the Job would fail at once.
    manifest = ftj_manifest("evicted", scheme_training("bnb-4bit"), backoffLimit=0)
    assert namespace.apply(manifest).returncode == 0
    (first,) = wait_for(lambda: running_pods(namespace, "evicted"), what="a running pod")

    eviction = client.V1Eviction(
        metadata=client.V1ObjectMeta(name=first.metadata.name, namespace=namespace.name)
    )
    namespace.cluster.core.create_namespaced_pod_eviction(
        first.metadata.name, namespace.name, eviction
    )

    def replaced() -> Any:
        pods = running_pods(namespace, "evicted")
        return [p for p in pods if p.metadata.uid != first.metadata.uid]

    (second,) = wait_for(replaced, timeout=90, what="a replacement pod running")
    (job,) = namespace.jobs()
    assert not job.status.failed, "the disruption used up a retry"
    assert not any(c.type == "Failed" and c.status == "True" for c in job.status.conditions or [])
    wait_for(lambda: status(namespace, "evicted").get("phase") == "Running", what="Running again")

    # The old pod carried the DisruptionTarget condition the Eviction API sets; the operator read
    # it and told of it once, naming the pod, however late it first looked.
    def told() -> list[Any]:
        events = namespace.cluster.core.list_namespaced_event(
            namespace.name, field_selector="involvedObject.name=evicted"
        ).items
        return [e for e in events if e.reason == "Disrupted"]

    (disrupted,) = wait_for(told, what="the Disrupted event")
    assert "EvictionByEvictionAPI" in disrupted.message
    assert first.metadata.name in disrupted.message
    assert (disrupted.count or 1) == 1
    assert second.spec.node_name is not None


def test_training_pods_pass_restricted_pod_security_admission(
    namespace: Namespace, kubelet: FakeKubelet
) -> None:
    ns = namespace.cluster.core.read_namespace(namespace.name)
    assert RESTRICTED.items() <= (ns.metadata.labels or {}).items()
    # Enforcement is live in this namespace: a privileged pod is refused by the API server.
    bad = client.V1Pod(
        metadata=client.V1ObjectMeta(name="privileged"),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="c",
                    image="busybox",
                    security_context=client.V1SecurityContext(privileged=True),
                )
            ]
        ),
    )
    with pytest.raises(ApiException) as refused:
        namespace.cluster.core.create_namespaced_pod(namespace.name, bad)
    assert refused.value.status == 403 and "restricted" in refused.value.body

    for scheme in ("bnb-4bit", None):
        name = f"psa-{scheme or 'lora'}"
        assert namespace.apply(ftj_manifest(name, scheme_training(scheme))).returncode == 0
        wait_for(lambda n=name: running_pods(namespace, n), what=f"{name}'s pod admitted")
    events = namespace.cluster.core.list_namespaced_event(namespace.name).items
    assert not [e for e in events if e.reason == "FailedCreate"], "a pod was refused"
