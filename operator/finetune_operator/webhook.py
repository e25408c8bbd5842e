"""The validating admission webhook: the API model's full validation at `kubectl apply` time.

The webhook runs inside the operator (kopf's admission support). kopf manages the
ValidatingWebhookConfiguration: it is created when the operator starts and emptied when it stops,
with failurePolicy Ignore, so an operator outage never blocks anything (FineTuneJobs applied
meanwhile are still validated by the operator, in the Validated condition).

TLS: a certificate directory from cert-manager (tls.crt, tls.key, ca.crt) when given, else a
self-signed CA and serving certificate generated at start-up. The API server reaches the webhook
through a Service (in a cluster) or a fixed URL (a local control plane).
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from finetune_operator.reconcile import parse_spec

CONFIGURATION_NAME = "finetune-operator.finetune.dev"


def admission_error(body: Mapping[str, Any], old: Mapping[str, Any] | None) -> str | None:
    """The one-line reason to refuse this object, or None to admit it.

    Updates that leave the spec alone (labels, annotations, kopf's bookkeeping) are always
    admitted, so an object created before the webhook existed can still be managed."""
    if old and old.get("spec") == body.get("spec"):
        return None
    return parse_spec(body)[1]


@dataclass(frozen=True)
class Certificates:
    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def self_signed(
    directory: Path, dns_names: list[str], ips: list[str], days: int = 3650
) -> Certificates:
    """A CA and a serving certificate it signs, for these DNS names and IP addresses."""
    now = datetime.datetime.now(datetime.UTC)
    ca_usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("finetune-operator-webhook-ca"))
        .issuer_name(_name("finetune-operator-webhook-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_usage, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else ips[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = Certificates(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


@dataclass(frozen=True)
class ServiceRef:
    name: str
    namespace: str
    port: int

    @property
    def dns_names(self) -> list[str]:
        base = f"{self.name}.{self.namespace}"
        return [self.name, base, f"{base}.svc", f"{base}.svc.cluster.local"]


class WebhookEndpoint:
    """Serves kopf's webhook and tells the API server how to reach it: through a Service, or a
    fixed URL, instead of the listening address kopf would advertise."""

    def __init__(
        self, server: kopf.WebhookServer, service: ServiceRef | None, url: str | None
    ) -> None:
        self.server = server
        self.service = service
        self.url = url

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async with self.server as server:
            async for config in server(fn):
                client = kopf.WebhookClientConfig()
                if config.get("caBundle"):
                    client["caBundle"] = config["caBundle"]
                if self.service is not None:
                    client["service"] = kopf.WebhookClientConfigService(
                        name=self.service.name,
                        namespace=self.service.namespace,
                        port=self.service.port,
                        path="",
                    )
                else:
                    client["url"] = self.url or config.get("url")
                yield client


def build_endpoint(
    host: str, port: int, cert_dir: str | None, service: ServiceRef | None, url: str | None
) -> WebhookEndpoint:
    """The webhook server with its certificates: cert-manager's when cert_dir is given."""
    if cert_dir:
        certs = Certificates(
            Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key", Path(cert_dir) / "ca.crt"
        )
    else:
        dns = service.dns_names if service else ["localhost"]
        ips = ["127.0.0.1"]
        if url:
            from urllib.parse import urlparse

            url_host = urlparse(url).hostname or "localhost"
            try:
                ipaddress.ip_address(url_host)
                ips.append(url_host)
            except ValueError:
                dns.append(url_host)
        certs = self_signed(
            Path(tempfile.mkdtemp(prefix="finetune-webhook-")), dns, sorted(set(ips))
        )
    server = kopf.WebhookServer(
        addr=host,
        port=port,
        certfile=str(certs.cert),
        pkeyfile=str(certs.key),
        cafile=str(certs.ca),
    )
    return WebhookEndpoint(server, service, url)
