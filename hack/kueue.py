"""The real Kueue controller manager against the local control plane (tests and the demo).

`hack/kueue-binaries.sh` builds `kueue` from the Go module sigs.k8s.io/kueue (pinned there) and
keeps that release's CRDs beside it. `LocalKueue` installs the CRDs, runs the manager as a local
process (batch/job integration only, no leader election, internal certificate management off) and
registers Kueue's own admission and conversion webhooks, from the same release's manifests, with
a `url` client config on 127.0.0.1 and the CA bundle of a serving certificate made here (the API
server cannot reach an in-cluster Service: nothing routes to Pods in the local control plane).

Only the webhooks of what runs are registered: batch/v1 Jobs and Kueue's own kinds. The others
in Kueue's manifests (Pods, Deployments, JobSets, Kubeflow, Ray, ...) belong to integrations
this manager does not start, so their paths would not answer.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from localcluster import free_port, stop_process

HACK = Path(__file__).resolve().parent
KUEUE_NAMESPACE = "kueue-system"
METRICS_CERTS = "/etc/kueue/metrics/certs"
WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}
# The CRDs Kueue's release serves through its conversion webhook (config/components/crd/patches).
CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
WEBHOOK_CONFIGS = {
    "MutatingWebhookConfiguration": "finetune-local-kueue-mutating",
    "ValidatingWebhookConfiguration": "finetune-local-kueue-validating",
}


class KueueError(RuntimeError):
    pass


def kueue_cache() -> Path:
    """The cache directory with `kueue` and `crds/`; built once by hack/kueue-binaries.sh."""
    result = subprocess.run(
        [str(HACK / "kueue-binaries.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KueueError(f"hack/kueue-binaries.sh failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_serving_cert(directory: Path) -> bytes:
    """A self-signed serving certificate for 127.0.0.1 as tls.crt/tls.key; returns the PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"),
        "-subj", "/CN=kueue-webhook", "-addext", "subjectAltName=IP:127.0.0.1",
    )  # fmt: skip
    return (directory / "tls.crt").read_bytes()


def manager_config(webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
        "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
    }


def webhook_configurations(manifests: str, url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, reduced to the Job and Kueue kinds and pointed at `url`."""
    bundle = base64.b64encode(ca_bundle).decode()
    found = []
    for doc in yaml.safe_load_all(manifests):
        if not doc or doc.get("kind") not in WEBHOOK_CONFIGS:
            continue
        hooks = []
        for hook in doc.get("webhooks", []):
            groups = {g for rule in hook.get("rules", []) for g in rule.get("apiGroups", [])}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": bundle}
            hooks.append(hook)
        doc["metadata"] = {"name": WEBHOOK_CONFIGS[doc["kind"]]}
        doc["webhooks"] = hooks
        found.append(doc)
    return found


def crds(directory: Path, url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """The release's CRDs; those Kueue converts get its conversion webhook at `url`/convert."""
    bundle = base64.b64encode(ca_bundle).decode()
    found = []
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED_CRDS:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{url}/convert", "caBundle": bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        found.append(crd)
    return found


@dataclass
class LocalKueue:
    """One Kueue manager for the control plane behind `kubeconfig`, its state under `root`."""

    root: Path
    kubeconfig: Path
    proc: subprocess.Popen[bytes] | None = None
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    api: client.ApiClient | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "kueue.log"

    def start(self, timeout: float = 180.0) -> LocalKueue:
        cache = kueue_cache()
        self.root.mkdir(parents=True, exist_ok=True)
        cert_dir = self.root / "certs"
        ca = make_serving_cert(cert_dir)
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        api = self.api = config.new_client_from_config(str(self.kubeconfig))
        ext = client.ApiextensionsV1Api(api)
        for crd in crds(cache / "crds", url, ca):
            _create_or_replace(
                lambda c=crd: ext.create_custom_resource_definition(c),
                lambda c=crd: ext.replace_custom_resource_definition(
                    c["metadata"]["name"], _with_version(c, ext)
                ),
            )
        self._wait_established(ext, [c["metadata"]["name"] for c in crds(cache / "crds", url, ca)])
        core = client.CoreV1Api(api)
        with contextlib.suppress(ApiException):
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=KUEUE_NAMESPACE))
            )
        config_path = self.root / "config.yaml"
        config_path.write_text(yaml.safe_dump(manager_config(port, cert_dir)))
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        argv = [
            str(cache / "kueue"), "--config", str(config_path),
            # The on-demand visibility API is an aggregated API server: the API server reaches
            # it only through a Service, which nothing routes here. Off.
            "--feature-gates", "VisibilityOnDemand=false", "--zap-log-level", "2",
        ]  # fmt: skip
        # Without internal certificate management Kueue reads its metrics serving certificate
        # from a fixed path, METRICS_CERTS: a private mount namespace (root, as podrunner) puts
        # the certificate made here there, for this process only.
        script = (
            f"mkdir -p {METRICS_CERTS} && mount --bind {shlex.quote(str(cert_dir))} "
            f"{METRICS_CERTS} && exec {shlex.join(argv)}"
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
        self._wait_serving(port, timeout)
        manifests = (cache / "webhooks.yaml").read_text()
        admission = client.AdmissionregistrationV1Api(api)
        self.webhooks = webhook_configurations(manifests, url, ca)
        for hook in self.webhooks:
            if hook["kind"] == "MutatingWebhookConfiguration":
                _create_or_replace(
                    lambda h=hook: admission.create_mutating_webhook_configuration(h),
                    lambda h=hook: admission.patch_mutating_webhook_configuration(
                        h["metadata"]["name"], h
                    ),
                )
            else:
                _create_or_replace(
                    lambda h=hook: admission.create_validating_webhook_configuration(h),
                    lambda h=hook: admission.patch_validating_webhook_configuration(
                        h["metadata"]["name"], h
                    ),
                )
        return self

    @staticmethod
    def _wait_established(
        ext: client.ApiextensionsV1Api, names: list[str], timeout: float = 60
    ) -> None:
        """Until the API server serves every CRD (Kueue's manager exits when a kind is missing)."""
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                crd = ext.read_custom_resource_definition(name)
                conditions = (crd.status.conditions if crd.status else None) or []
                if any(c.type == "Established" and c.status == "True" for c in conditions):
                    break
                if time.monotonic() > deadline:
                    raise KueueError(f"CRD {name} not established after {timeout:.0f}s")
                time.sleep(0.3)

    def _wait_serving(self, port: int, timeout: float) -> None:
        """Until the webhook server accepts connections (the manager has started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise KueueError(f"kueue exited during start-up:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.5)
        raise KueueError(f"kueue's webhook server not up after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """Remove the webhook configurations first (nothing may point at a stopped server)."""
        if self.api is not None:
            admission = client.AdmissionregistrationV1Api(self.api)
            with contextlib.suppress(ApiException):
                admission.delete_mutating_webhook_configuration(
                    WEBHOOK_CONFIGS["MutatingWebhookConfiguration"]
                )
            with contextlib.suppress(ApiException):
                admission.delete_validating_webhook_configuration(
                    WEBHOOK_CONFIGS["ValidatingWebhookConfiguration"]
                )
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _with_version(crd: dict[str, Any], ext: client.ApiextensionsV1Api) -> dict[str, Any]:
    current = ext.read_custom_resource_definition(crd["metadata"]["name"])
    return {
        **crd,
        "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version},
    }


def _create_or_replace(create: Any, replace: Any) -> None:
    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise
        replace()
