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


def test_webhook_refuses_cross_field_errors_and_admits_valid_jobs(
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

    bad = ftj_manifest(
        "fp4-loftq",
        {"quantize_model": True, "quantization_scheme": "nvfp4", "peft_implementation": "loftq"},
    )
    result = ns.apply(bad)
    assert result.returncode != 0
    assert (
        "spec.training.quantization_scheme: quantization_scheme nvfp4 cannot be used with peft_implementation loftq"
        in result.stderr
    )
    assert "denied the request" in result.stderr
    good = ftj_manifest(
        "fp4-lora",
        {"quantize_model": True, "quantization_scheme": "nvfp4", "peft_implementation": "lora"},
    )
    assert ns.apply(good).returncode == 0, "a valid job is admitted"

    # An update that breaks a rule is refused too; the stored object stays as it was.
    broken = ftj_manifest(
        "fp4-lora",
        {"quantize_model": True, "quantization_scheme": "nvfp4", "peft_implementation": "loftq"},
    )
    result = ns.apply(broken)
    assert (
        result.returncode != 0 and "cannot be used with peft_implementation loftq" in result.stderr
    )
    assert ns.ftj("fp4-lora")["spec"]["training"]["peft_implementation"] == "lora"

    other = ftj_manifest(
        "mixed", {}, dataset={"claimName": "data", "path": "t.csv", "promptField": "q"}
    )
    result = ns.apply(other)
    assert (
        result.returncode != 0
        and "spec.dataset: promptField and completionField must be set together" in result.stderr
    )


def test_operator_outage_blocks_nothing(webhooked: tuple[Namespace, Operator]) -> None:
    ns, op = webhooked
    op.kill()  # no clean shutdown: the configuration stays, pointing at nothing
    assert webhook_config(ns.cluster).webhooks
    result = ns.apply(
        ftj_manifest("while-down", {"quantize_model": True, "quantization_scheme": "fp8"})
    )
    assert result.returncode == 0, result.stderr
