"""The trainer's API access (finetune_trainer.kubeapi): which server and credentials it takes from
a kubeconfig or a pod's ServiceAccount, and what it refuses. Requests over TLS against the real API
server are in tests/integration/test_trainer_status_api.py."""

from __future__ import annotations

import base64
import re
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer import kubeapi
from training.fake_apiserver import fake_apiserver


def write_kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {"name": "other", "context": {"cluster": "missing"}},
                    {"name": "x", "context": {"cluster": "c", "user": "u"}},
                ],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and its key, made by openssl."""
    folder = tmp_path_factory.mktemp("pki")
    key, crt = folder / "client.key", folder / "client.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=trainer", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"key": key, "crt": crt}


def test_token_and_plain_http_from_the_current_context(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc", {"server": "http://127.0.0.1:1"}, {"token": "abc"})
    endpoint = kubeapi.from_kubeconfig(path)
    assert (endpoint.server, endpoint.token, endpoint.tls) == ("http://127.0.0.1:1", "abc", None)


def test_token_file_is_relative_to_the_kubeconfig_and_read_for_every_request(
    tmp_path: Path,
) -> None:
    with fake_apiserver(tmp_path) as (recorder, served):
        server = yaml.safe_load(served.read_text())["clusters"][0]["cluster"]["server"]
        (tmp_path / "token").write_text("first\n")
        path = write_kubeconfig(tmp_path / "kc", {"server": server}, {"tokenFile": "token"})
        endpoint = kubeapi.from_kubeconfig(path)
        assert endpoint.token_file == tmp_path / "token"
        endpoint.merge_patch("/apis/g/v1/namespaces/n/things/a/status", {"a": 1}, timeout=5)
        (tmp_path / "token").write_text("second\n")  # rotated
        endpoint.merge_patch("/apis/g/v1/namespaces/n/things/a/status", {"a": 2}, timeout=5)
    assert [r["authorization"] for r in recorder.requests] == ["Bearer first", "Bearer second"]
    assert [r["body"] for r in recorder.requests] == [{"a": 1}, {"a": 2}]


def test_an_error_status_is_an_api_error_with_the_servers_message(tmp_path: Path) -> None:
    with fake_apiserver(tmp_path) as (recorder, served):
        recorder.status_code = 500
        endpoint = kubeapi.from_kubeconfig(served)
        with pytest.raises(kubeapi.ApiError, match=r"^500 .*: refused$"):
            endpoint.merge_patch("/apis/g/v1/namespaces/n/things/a/status", {}, timeout=5)


def test_nothing_listening_is_an_api_error(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc", {"server": "http://127.0.0.1:9"}, {})
    with pytest.raises(kubeapi.ApiError, match=re.escape("PATCH http://127.0.0.1:9/p: ")):
        kubeapi.from_kubeconfig(path).merge_patch("/p", {}, timeout=5)


def test_ca_and_client_certificate_as_files_or_data(tmp_path: Path, pki: dict[str, Path]) -> None:
    pem = pki["crt"].read_bytes()
    as_files = write_kubeconfig(
        tmp_path / "files",
        {"server": "https://10.0.0.1:6443", "certificate-authority": str(pki["crt"])},
        {"client-certificate": str(pki["crt"]), "client-key": str(pki["key"])},
    )
    as_data = write_kubeconfig(
        tmp_path / "data",
        {
            "server": "https://10.0.0.1:6443",
            "certificate-authority-data": base64.b64encode(pem).decode(),
        },
        {
            "client-certificate-data": base64.b64encode(pem).decode(),
            "client-key-data": base64.b64encode(pki["key"].read_bytes()).decode(),
        },
    )
    for path in (as_files, as_data):
        tls = kubeapi.from_kubeconfig(path).tls
        assert tls is not None and tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
        assert [c["subject"] for c in tls.get_ca_certs()] == [((("commonName", "trainer"),),)]
    assert not list(Path(tempfile.gettempdir()).glob("finetune-kubeapi-*"))  # key file gone


def test_insecure_skip_tls_verify(tmp_path: Path) -> None:
    path = write_kubeconfig(
        tmp_path / "kc", {"server": "https://a:1", "insecure-skip-tls-verify": True}, {}
    )
    tls = kubeapi.from_kubeconfig(path).tls
    assert tls is not None and tls.verify_mode == ssl.CERT_NONE and not tls.check_hostname


@pytest.mark.parametrize(
    ("user", "field"),
    [
        ({"exec": {"command": "aws"}}, "users[u].user.exec"),
        ({"auth-provider": {"name": "gcp"}}, "users[u].user.auth-provider"),
        ({"username": "a", "password": "b"}, "users[u].user.username"),
    ],
)
def test_credentials_it_cannot_use_are_refused_naming_the_field(
    tmp_path: Path, user: dict[str, Any], field: str
) -> None:
    path = write_kubeconfig(tmp_path / "kc", {"server": "https://a:1"}, user)
    with pytest.raises(kubeapi.ApiError) as caught:
        kubeapi.from_kubeconfig(path)
    assert field in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_context_or_cluster_is_named(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc", {"server": "https://a:1"}, {})
    text = path.read_text()
    path.write_text(text.replace("current-context: x", "current-context: nope"))
    with pytest.raises(kubeapi.ApiError, match="current-context 'nope' not found"):
        kubeapi.from_kubeconfig(path)
    path.write_text(text.replace("current-context: x", "current-context: other"))
    with pytest.raises(kubeapi.ApiError, match="cluster 'missing' not found"):
        kubeapi.from_kubeconfig(path)


def test_in_a_pod_the_service_account_and_the_service_address(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(pki["crt"].read_bytes())
    monkeypatch.setattr(kubeapi, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")  # the pod's own account comes first
    endpoint = kubeapi.from_environment()
    assert endpoint.server == "https://[fd00::1]:443"
    assert endpoint.token_file == tmp_path / "token"
    assert endpoint.tls is not None and len(endpoint.tls.get_ca_certs()) == 1


def test_outside_a_pod_without_kubeconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(kubeapi.ApiError, match="KUBECONFIG is unset"):
        kubeapi.from_environment()


def test_object_path_quotes_names() -> None:
    assert (
        kubeapi.object_path("finetune.dev", "v1alpha1", "team-1", "finetunejobs", "a")
        == "/apis/finetune.dev/v1alpha1/namespaces/team-1/finetunejobs/a"
    )


def test_a_missing_token_file_is_an_api_error_not_a_crash(tmp_path: Path) -> None:
    """The reporter's thread only survives failures it is told of as ApiError."""
    path = write_kubeconfig(
        tmp_path / "kc", {"server": "http://127.0.0.1:9"}, {"tokenFile": "gone"}
    )
    with pytest.raises(kubeapi.ApiError, match=r"token file .*gone: No such file or directory"):
        kubeapi.from_kubeconfig(path).merge_patch("/p", {}, timeout=5)
