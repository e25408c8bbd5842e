"""Webhook pieces that need no cluster: the admission decision, certificates, settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from finetune_operator.settings import parse_settings
from finetune_operator.webhook import ServiceRef, admission_error, self_signed

VALID: dict[str, Any] = {
    "metadata": {"name": "x"},
    "spec": {
        "dataset": {"claimName": "d", "path": "t.jsonl"},
        "output": {"claimName": "o", "path": "a"},
    },
}
INVALID: dict[str, Any] = {
    "metadata": {"name": "x"},
    "spec": {
        **VALID["spec"],
        "training": {
            "quantize_model": True,
            "quantization_scheme": "fp8",
            "peft_implementation": "loftq",
        },
    },
}


def test_admits_valid_and_refuses_invalid_with_the_models_message() -> None:
    assert admission_error(VALID, None) is None
    message = admission_error(INVALID, None)
    assert message is not None and message.startswith(
        "spec.training.quantization_scheme: peft_implementation loftq cannot be used with "
        "quantization_scheme fp8"
    )


def test_update_without_spec_change_is_admitted_even_if_invalid() -> None:
    """Objects created before the webhook existed must stay manageable (labels, kopf's annotations)."""
    relabelled = {**INVALID, "metadata": {"name": "x", "labels": {"team": "a"}}}
    assert admission_error(relabelled, INVALID) is None
    assert admission_error(INVALID, VALID) is not None


def test_self_signed_certificate_is_signed_by_its_ca_for_the_service(tmp_path: Path) -> None:
    service = ServiceRef("finetune-operator-webhook", "ops", 9443)
    files = self_signed(tmp_path, service.dns_names, ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "finetune-operator-webhook.ops.svc" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert files.key.stat().st_mode & 0o077 == 0


def test_webhook_settings() -> None:
    settings = parse_settings(
        ["--webhook", "true", "--webhook-service", "svc", "--webhook-namespace", "ops"]
    )
    assert settings.webhook and settings.webhook_service == "svc" and settings.webhook_port == 9443
    assert not parse_settings([]).webhook


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--webhook", "true"], "--webhook needs --webhook-service"),
        (["--webhook", "maybe"], "expected true or false"),
        (["--min-capability", "fp16=8.0"], "invalid scheme capability entry 'fp16=8.0'"),
        (["--min-capability", "fp8=nine"], "invalid compute capability 'nine'"),
    ],
)
def test_bad_settings_exit_with_a_usage_error(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv)
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_NAMESPACES", "a, b")
    monkeypatch.setenv("FINETUNE_TRAINER_IMAGE", "registry/trainer:2")
    monkeypatch.setenv("FINETUNE_MIN_CAPABILITY", "none=7.5")
    monkeypatch.setenv("FINETUNE_MEMORY_AFFINITY", "false")
    settings = parse_settings([])
    assert settings.namespaces == ("a", "b") and not settings.clusterwide
    assert settings.trainer_image == "registry/trainer:2"
    assert (
        str(settings.min_capability["none"]) == "7.5"
        and str(settings.min_capability["fp8"]) == "9.0"
    )
    assert settings.memory_affinity is False
    assert parse_settings(["--namespace", "x"]).namespaces == ("x",)
