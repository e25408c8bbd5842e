"""The local control plane runs the pinned Kubernetes release (or the one KUBE_VERSION names)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.harness import Cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def pinned(name: str) -> str:
    script = f". {REPO / 'hack' / 'kube-versions.sh'} && echo ${name}"
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_kubectl_version_reports_the_pinned_release(cluster: Cluster) -> None:
    if os.environ.get("KUBEBUILDER_ASSETS"):
        pytest.skip("KUBEBUILDER_ASSETS chooses the binaries")
    wanted = (os.environ.get("KUBE_VERSION") or pinned("KUBE_VERSION_NEWEST")).removeprefix("v")
    result = cluster.kubectl("version", "-o", "json")
    server = json.loads(result.stdout)["serverVersion"]
    assert server["gitVersion"] == f"v{wanted}"
    assert (server["major"], server["minor"]) == ("1", wanted.split(".")[1])
