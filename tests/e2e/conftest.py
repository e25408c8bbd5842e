"""Fixtures of the e2e tier (opt-in: tests/conftest.py): the images (hack/images.sh), and for the
tests that train in the trainer image one control plane on this machine's address with one real
node (hack/realnode.py: kubelet, containerd, runc, CNI, kube-proxy, cluster DNS) carrying an
H100's labels and two `nvidia.com/gpu` from the device plugin, the trainer image imported into
its containerd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realnode import RealNode, default_address

from integration.harness import Cluster, running_cluster
from localcluster import LocalCluster
from nodetier import NODE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def images() -> dict[str, dict[str, Any]]:
    """Both images, built or reused (hack/images.sh): {target: {ref, id, archive, size_mb}}."""
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        pytest.fail("buildah and debootstrap are needed: make setup (apt-get install them)")
    if os.geteuid() != 0:
        pytest.fail("building the images needs root (buildah's storage, debootstrap)")
    result = subprocess.run(
        [str(REPO / "hack" / "images.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    described: dict[str, dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return described


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane that binds this machine's address, so pods reach it."""
    assert os.geteuid() == 0, "a real node needs root (containerd, runc, iptables, mounts)"
    with running_cluster(tmp_path_factory.mktemp("cp"), node_address=default_address()) as c:
        yield c


@pytest.fixture(scope="session")
def real_node(
    node_cluster: Cluster,
    images: dict[str, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RealNode]:
    """One H100 node with two GPUs (the device plugin's), the trainer image imported."""
    local = LocalCluster(node_cluster.root, node_address=default_address())
    with RealNode(local, tmp_path_factory.mktemp("node"), name=NODE, gpu="h100", gpus=2) as node:
        node.import_image(Path(images["trainer"]["archive"]))
        yield node


@pytest.fixture(scope="session")
def trainer_image(images: dict[str, dict[str, Any]]) -> str:
    return str(images["trainer"]["ref"])


@pytest.fixture
def volume_root() -> Iterator[Path]:
    """Where a test's PersistentVolumes live: outside pytest's private (0700) temporary tree,
    since the trainer runs as UID 65532 and must reach them."""
    root = Path(tempfile.mkdtemp(prefix="finetune-e2e-volumes-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
