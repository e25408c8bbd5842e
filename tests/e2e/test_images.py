"""The images built from the Dockerfile on this machine (hack/images.sh): what is inside them and
what they run, checked in the real images through buildah.

The first build downloads torch (~5 GB) and takes many minutes; later runs reuse buildah's layer
cache and take seconds. Needs root, buildah and debootstrap (`make setup`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
UID = 65532
TARGETS = ("operator", "trainer")


CACHE = Path(
    os.environ.get(
        "FINETUNE_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-operator",
    )
)


def buildah_env() -> dict[str, str]:
    cache = CACHE
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(cache / "containers" / "storage.conf"),
        "BUILDAH_ISOLATION": os.environ.get("BUILDAH_ISOLATION", "chroot"),
    }


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], env=buildah_env(), capture_output=True, text=True, check=check
    )


@pytest.fixture(scope="module")
def containers(images: dict[str, dict[str, Any]]) -> Iterator[dict[str, str]]:
    """One working container per image, for `buildah run` and `buildah mount`."""
    made = {
        target: buildah("from", "--pull=never", images[target]["ref"]).stdout.strip()
        for target in TARGETS
    }
    yield made
    for container in made.values():
        buildah("rm", container, check=False)


def run(container: str, *command: str) -> subprocess.CompletedProcess[str]:
    return buildah("run", "--network", "none", container, "--", *command, check=False)


def site_packages(container: str) -> Path:
    root = Path(buildah("mount", container).stdout.strip())
    found = sorted(root.glob("opt/venv/lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def test_each_image_is_named_and_exported(images: dict[str, dict[str, Any]]) -> None:
    assert set(images) == set(TARGETS)
    version = (REPO / "pyproject.toml").read_text().split('version = "', 1)[1].split('"', 1)[0]
    for target, image in images.items():
        assert image["ref"] == f"localhost/finetune-operator/{target}:{version}"
        inspected = json.loads(buildah("inspect", "--type", "image", image["ref"]).stdout)
        assert inspected["FromImageID"] == image["id"]
        archive = Path(image["archive"])
        assert archive.stat().st_size // 1048576 == image["size_mb"]
        # docker-archive: ctr images import names the image after RepoTags.
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            manifest = json.load(member)
        assert [entry["RepoTags"] for entry in manifest] == [[image["ref"]]]
        assert manifest[0]["Config"].removesuffix(".json").removeprefix("sha256:") == image["id"]
        # No stale labels from buildah's layer cache: the local build keeps the defaults (it
        # passes no REVISION, which a cached LABEL step would not update; hack/images.sh).
        labels = inspected["OCIv1"]["config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == version
        assert labels["org.opencontainers.image.revision"] == "unknown"
        assert labels["org.opencontainers.image.base.name"] == "localhost/finetune-base:bookworm"


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_65532(containers: dict[str, str], target: str) -> None:
    config = json.loads(buildah("inspect", "--type", "container", containers[target]).stdout)
    assert config["OCIv1"]["config"]["User"] == f"{UID}:{UID}"
    result = run(
        containers[target],
        "python",
        "-c",
        "import os, pwd; print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)",
    )
    assert (result.returncode, result.stdout.split()) == (0, [str(UID), str(UID), "finetune"]), (
        result.stderr
    )


def test_operator_image_has_no_torch(containers: dict[str, str]) -> None:
    packages = site_packages(containers["operator"])
    names = {path.name.lower() for path in packages.iterdir()}
    assert "finetune_operator" in names and "kopf" in names
    for absent in ("torch", "transformers", "peft", "bitsandbytes", "triton", "finetune_trainer"):
        assert absent not in names, f"the operator image ships {absent}"
    assert not [name for name in names if name.startswith("nvidia")]
    result = run(containers["operator"], "python", "-c", "import torch")
    assert result.returncode == 1 and "No module named 'torch'" in result.stderr


def test_operator_image_runs_the_operator(containers: dict[str, str]) -> None:
    result = run(containers["operator"], "finetune-operator", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: finetune-operator")
    assert "--trainer-image" in result.stdout


def test_operator_image_runs_on_jemalloc(containers: dict[str, str]) -> None:
    """The image's allocator is loaded (LD_PRELOAD resolves inside the image, no warning)."""
    result = run(containers["operator"], "python", "-c", "print(open('/proc/self/maps').read())")
    assert result.returncode == 0 and "libjemalloc.so.2" in result.stdout, result.stderr
    assert "cannot be preloaded" not in result.stderr


def test_trainer_image_runs_the_trainer(containers: dict[str, str]) -> None:
    result = run(containers["trainer"], "finetune-trainer", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: finetune-trainer")
    assert "--model" in result.stdout


def test_trainer_image_imports_its_libraries(containers: dict[str, str]) -> None:
    script = (
        "import json, bitsandbytes, peft, torch, transformers, finetune_trainer.pipeline; "
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,"
        " 'peft': peft.__version__, 'bitsandbytes': bitsandbytes.__version__,"
        " 'cuda': torch.version.cuda, 'matmul': torch.ones(2, 2).matmul(torch.ones(2, 2)).sum().item()}))"
    )
    result = run(containers["trainer"], "python", "-c", script)
    assert result.returncode == 0, result.stderr[-4000:]
    versions = json.loads(result.stdout.strip().splitlines()[-1])
    dockerfile = (REPO / "Dockerfile").read_text()
    torch_version = dockerfile.split("ARG TORCH_VERSION=", 1)[1].split()[0]
    assert versions["torch"].split("+")[0] == torch_version
    assert versions["cuda"], "torch is not the CUDA build"
    assert versions["matmul"] == 8.0
    assert all(versions[name] for name in ("transformers", "peft", "bitsandbytes"))


def test_trainer_image_has_no_operator(containers: dict[str, str]) -> None:
    names = {path.name.lower() for path in site_packages(containers["trainer"]).iterdir()}
    assert "finetune_trainer" in names and "torch" in names
    assert "finetune_operator" not in names and "kopf" not in names
    # Status reports go through finetune_trainer.kubeapi (the standard library), not the client.
    assert "kubernetes" not in names


def containerd_binaries() -> Path | None:
    """A containerd build in the cache (the real node's, hack/node-binaries.sh), if any."""
    for folder in sorted(CACHE.glob("containerd-v*"), reverse=True):
        if (folder / "containerd").is_file() and (folder / "ctr").is_file():
            return folder
    return None


def test_containerd_imports_the_archives_by_name(
    images: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """`ctr -n k8s.io images import` (what loads them into a node) names each image as built,
    so a pod's `image:` finds it without a registry. A private containerd on its own socket;
    the layers are not unpacked (the name is what this checks; the node's tests run them)."""
    binaries = containerd_binaries()
    if binaries is None:
        pytest.skip(f"no containerd built in {CACHE} (the real node's binaries)")
    socket = tmp_path / "containerd.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 3\n"
        f'root = "{tmp_path / "root"}"\nstate = "{tmp_path / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",'
        ' "io.containerd.cri.v1.runtime"]\n'
        f'[grpc]\n  address = "{socket}"\n[ttrpc]\n  address = "{socket}.ttrpc"\n'
    )
    with (tmp_path / "containerd.log").open("w") as log:
        daemon = subprocess.Popen(
            [str(binaries / "containerd"), "--config", str(config)], stdout=log, stderr=log
        )
    try:
        ctr = [str(binaries / "ctr"), "--address", str(socket), "--namespace", "k8s.io"]
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode:
            assert time.monotonic() < deadline, (tmp_path / "containerd.log").read_text()[-2000:]
            time.sleep(0.5)
        for image in images.values():
            imported = subprocess.run(
                [*ctr, "images", "import", "--no-unpack", image["archive"]],
                capture_output=True,
                text=True,
                check=False,
                timeout=1800,
            )
            assert imported.returncode == 0, imported.stderr[-2000:]
        listed = subprocess.run(
            [*ctr, "images", "list", "--quiet"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert sorted(listed) == sorted(image["ref"] for image in images.values())
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
