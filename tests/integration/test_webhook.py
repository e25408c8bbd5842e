"""The validating webhook refuses what the API model refuses, at kubectl apply time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpusim import FakeKubelet
from integration.harness import (
    Cluster,
    Namespace,
    Operator,
    ftj_manifest,
    make_namespace,
    remove_namespace,
    wait_for,
)
from localcluster import free_port

pytestmark = pytest.mark.integration

CONFIG = "finetune-operator.finetune.dev"


def webhook_config(cluster: Cluster) -> Any:
    api = client.AdmissionregistrationV1Api(cluster.api)
    found = api.list_validating_webhook_configuration(
        field_selector=f"metadata.name={CONFIG}"
    ).items
    return found[0] if found else None


@pytest.fixture
def webhooked(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path
) -> Iterator[tuple[Namespace, Operator]]:
    port = free_port()
    op = Operator(
        cluster, tmp_path / "operator.log", "--namespace", "w-*", "--webhook", "true",
        "--webhook-host", "127.0.0.1", "--webhook-port", str(port), "--webhook-url", f"https://127.0.0.1:{port}",
    ).start()  # fmt: skip
    ns = make_namespace(cluster, tmp_path, prefix="w")
    try:
        wait_for(
            lambda: (webhook_config(cluster) or client.V1ValidatingWebhookConfiguration()).webhooks,
            timeout=60,
            what="the managed webhook configuration",
        )
        yield ns, op
    finally:
        op.stop()
        remove_namespace(ns)
        api = client.AdmissionregistrationV1Api(cluster.api)
        if webhook_config(cluster) is not None:
            api.delete_validating_webhook_configuration(CONFIG)


def test_webhook_refuses_what_the_crd_cannot_and_admits_valid_jobs(
    webhooked: tuple[Namespace, Operator],
) -> None:
    ns, _ = webhooked
    (hook,) = webhook_config(ns.cluster).webhooks
    assert hook.failure_policy == "Ignore"
    assert hook.client_config.url.startswith("https://127.0.0.1:") and hook.client_config.ca_bundle
    assert hook.rules[0].resources == ["finetunejobs"] and sorted(hook.rules[0].operations) == [
        "CREATE",
        "UPDATE",
    ]

    # What only the webhook refuses at apply time: learning_rate's type (number or "auto") has
    # no structural schema, so the CRD cannot check it (cross-field rules are the CRD's now).
    bad = ftj_manifest("odd-rate", {"learning_rate": True})
    result = ns.apply(bad)
    assert result.returncode != 0
    assert "denied the request" in result.stderr
    assert "spec.training.learning_rate: must be a number or 'auto', got True" in result.stderr
    good = ftj_manifest("rate", {"learning_rate": 0.0002})
    assert ns.apply(good).returncode == 0, "a valid job is admitted"

    # An update that breaks it is refused too; the stored object stays as it was.
    result = ns.apply(ftj_manifest("rate", {"learning_rate": [0.1]}))
    assert result.returncode != 0 and "learning_rate: must be a number" in result.stderr
    assert ns.ftj("rate")["spec"]["training"]["learning_rate"] == 0.0002

    # Cross-field mistakes are refused by the CRD's CEL rules before the webhook is asked.
    other = ftj_manifest(
        "mixed", {}, dataset={"claimName": "data", "path": "t.csv", "promptField": "q"}
    )
    result = ns.apply(other)
    assert result.returncode != 0 and "denied the request" not in result.stderr
    assert "promptField and completionField must be set together" in result.stderr


def test_operator_outage_blocks_nothing(webhooked: tuple[Namespace, Operator]) -> None:
    ns, op = webhooked
    op.kill()  # no clean shutdown: the configuration stays, pointing at nothing
    assert webhook_config(ns.cluster).webhooks
    result = ns.apply(
        ftj_manifest("while-down", {"quantize_model": True, "quantization_scheme": "fp8"})
    )
    assert result.returncode == 0, result.stderr
