"""hack/ociimage.py: the image archives the real node imports (pause, kubeprobe)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from ociimage import ImageFile, write_image


def _read(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_layout_digests_and_config(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    archive = tmp_path / "pause.tar"
    digest = write_image(archive, "localhost/x/pause:local", [ImageFile("/bin/pause", binary)],
                         ["/bin/pause"], "65535:65535")  # fmt: skip
    files = _read(archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, blob in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(blob).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    assert entry["digest"] == digest
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/x/pause:local"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "local"
    manifest = json.loads(files[f"blobs/sha256/{digest.split(':')[1]}"])
    assert entry["size"] == len(files[f"blobs/sha256/{digest.split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["config"]["Entrypoint"] == ["/bin/pause"]
    assert config["config"]["User"] == "65535:65535"
    layer = files[f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}"]
    layer_tar = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["bin"].isdir()
        assert members["bin/pause"].mode == 0o755
        assert tar.extractfile("bin/pause").read() == binary.read_bytes()  # type: ignore[union-attr]


def test_same_files_same_digest(tmp_path: Path) -> None:
    binary = tmp_path / "probe"
    binary.write_bytes(b"probe")
    first = write_image(tmp_path / "a.tar", "n:t", [ImageFile("/probe", binary)], ["/probe"], "1")
    second = write_image(tmp_path / "b.tar", "n:t", [ImageFile("/probe", binary)], ["/probe"], "1")
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
