"""The trainer's one kind of request to the API server (a merge patch of its FineTuneJob's status),
over the standard library's HTTP client.

The kubernetes client package cost the trainer about 0.5 s of start-up and 45 MiB of memory for
that one PATCH (measured with hack/bench_trainer.py), so the trainer reads the same credentials
itself. In a pod: the ServiceAccount's token (read again for every request: the kubelet rotates
it) and CA, and KUBERNETES_SERVICE_HOST/PORT. Elsewhere: the current context of the kubeconfig at
KUBECONFIG (server; CA file, CA data or insecure-skip-tls-verify; token, tokenFile or a client
certificate, as files or data). A kubeconfig that authenticates otherwise (exec, auth-provider,
username/password) is refused with a message naming the field.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ApiError(Exception):
    """The API server answered with an error status, or the request could not be made."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class _Cluster(_Model):
    server: str
    certificate_authority: str | None = Field(None, alias="certificate-authority")
    certificate_authority_data: str | None = Field(None, alias="certificate-authority-data")
    insecure_skip_tls_verify: bool = Field(False, alias="insecure-skip-tls-verify")
    tls_server_name: str | None = Field(None, alias="tls-server-name")


class _User(_Model):
    token: str | None = None
    token_file: str | None = Field(None, alias="tokenFile")
    client_certificate: str | None = Field(None, alias="client-certificate")
    client_certificate_data: str | None = Field(None, alias="client-certificate-data")
    client_key: str | None = Field(None, alias="client-key")
    client_key_data: str | None = Field(None, alias="client-key-data")


class _Named(_Model):
    name: str


class _NamedCluster(_Named):
    cluster: _Cluster


class _NamedUser(_Named):
    user: _User = _User()


class _Context(_Model):
    cluster: str
    user: str | None = None


class _NamedContext(_Named):
    context: _Context


class _Kubeconfig(_Model):
    clusters: list[_NamedCluster] = []
    users: list[_NamedUser] = []
    contexts: list[_NamedContext] = []
    current_context: str | None = Field(None, alias="current-context")


UNSUPPORTED_AUTH = ("exec", "auth-provider", "username", "password")


@dataclass(frozen=True)
class Endpoint:
    """An API server and the credentials to use with it."""

    server: str  # scheme://host[:port][/prefix]
    tls: ssl.SSLContext | None = None  # None for plain http (tests' stand-in API server)
    token: str | None = None
    token_file: Path | None = None

    def merge_patch(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """PATCH `path` (with its query) with a JSON merge patch; the answer's JSON object."""
        return self._request("PATCH", path, body, "application/merge-patch+json", timeout)

    def _request(
        self, method: str, path: str, body: dict[str, Any], content_type: str, timeout: float
    ) -> dict[str, Any]:
        url = urlsplit(self.server)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        try:
            token = self.token_file.read_text().strip() if self.token_file else self.token
        except OSError as exc:
            raise ApiError(f"token file {self.token_file}: {exc.strerror}") from exc
        if token:
            headers["Authorization"] = f"Bearer {token}"
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=timeout, context=self.tls
            )
        else:
            connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        try:
            connection.request(method, url.path.rstrip("/") + path, json.dumps(body), headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS
            raise ApiError(f"{method} {self.server}{path}: {exc!r}") from exc
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            raise ApiError(f"{response.status} {response.reason}: {_status_message(data)}")
        try:
            answer: dict[str, Any] = json.loads(data) if data else {}
        except ValueError as exc:
            raise ApiError(f"{method} {path}: the answer is not JSON: {data[:200]!r}") from exc
        return answer


def object_path(group: str, version: str, namespace: str, plural: str, name: str) -> str:
    return f"/apis/{group}/{version}/namespaces/{quote(namespace)}/{plural}/{quote(name)}"


def _status_message(data: bytes) -> str:
    """The message of the API server's Status object, else the answer's start."""
    try:
        message = json.loads(data).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else data[:200].decode(errors="replace")


def from_environment() -> Endpoint:
    """In a pod, its ServiceAccount; elsewhere the kubeconfig at KUBECONFIG; else ApiError."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if host and (SERVICE_ACCOUNT_DIR / "token").exists():
        return in_cluster(host, os.environ.get("KUBERNETES_SERVICE_PORT", "443"))
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise ApiError("not in a pod with a ServiceAccount token, and KUBECONFIG is unset")
    # (kubectl merges a list of files; the trainer takes the first, which is what tools pass it.)
    return from_kubeconfig(Path(kubeconfig.split(os.pathsep)[0]))


def in_cluster(host: str, port: str, directory: Path | None = None) -> Endpoint:
    directory = directory or SERVICE_ACCOUNT_DIR
    server_host = f"[{host}]" if ":" in host else host  # an IPv6 Service address
    return Endpoint(
        server=f"https://{server_host}:{port}",
        tls=ssl.create_default_context(cafile=str(directory / "ca.crt")),
        token_file=directory / "token",
    )


def from_kubeconfig(path: Path) -> Endpoint:
    """The current context's server and credentials; a field it cannot use is an ApiError."""
    try:
        config = _Kubeconfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ApiError(f"kubeconfig {path}: {exc}") from exc
    contexts = {c.name: c.context for c in config.contexts}
    if config.current_context not in contexts:
        raise ApiError(f"kubeconfig {path}: current-context {config.current_context!r} not found")
    context = contexts[config.current_context or ""]
    clusters = {c.name: c.cluster for c in config.clusters}
    users = {u.name: u.user for u in config.users}
    if context.cluster not in clusters:
        raise ApiError(f"kubeconfig {path}: cluster {context.cluster!r} not found")
    cluster = clusters[context.cluster]
    user = users.get(context.user or "", _User())
    unsupported = [k for k in UNSUPPORTED_AUTH if k in (user.model_extra or {})]
    if unsupported:
        raise ApiError(
            f"kubeconfig {path}: users[{context.user}].user.{unsupported[0]} is not supported "
            "by the trainer's status reports: use a token, tokenFile or client certificate"
        )
    if cluster.tls_server_name:
        raise ApiError(
            f"kubeconfig {path}: clusters[{context.cluster}].tls-server-name is not supported"
        )
    base = path.parent
    tls = _tls(cluster, user, base) if cluster.server.startswith("https:") else None
    token_file = base / user.token_file if user.token_file else None
    return Endpoint(server=cluster.server, tls=tls, token=user.token, token_file=token_file)


def _tls(cluster: _Cluster, user: _User, base: Path) -> ssl.SSLContext:
    if cluster.insecure_skip_tls_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif cluster.certificate_authority_data:
        pem = base64.b64decode(cluster.certificate_authority_data, validate=True).decode()
        context = ssl.create_default_context(cadata=pem)
    elif cluster.certificate_authority:
        context = ssl.create_default_context(cafile=str(base / cluster.certificate_authority))
    else:
        context = ssl.create_default_context()
    certificate = _pem(user.client_certificate, user.client_certificate_data, base)
    key = _pem(user.client_key, user.client_key_data, base)
    if certificate is not None:
        _load_client_certificate(context, certificate, key)
    return context


def _pem(file: str | None, data: str | None, base: Path) -> bytes | None:
    if data:
        return base64.b64decode(data, validate=True)
    return (base / file).read_bytes() if file else None


def _load_client_certificate(
    context: ssl.SSLContext, certificate: bytes, key: bytes | None
) -> None:
    """ssl loads a certificate chain only from files: a private temporary one, removed at once."""
    with tempfile.TemporaryDirectory(prefix="finetune-kubeapi-") as directory:
        chain = Path(directory) / "client.pem"
        descriptor = os.open(chain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(certificate.rstrip(b"\n") + b"\n" + (key or b""))
        context.load_cert_chain(str(chain))
