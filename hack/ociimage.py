"""Write a one-layer OCI image archive (an OCI image layout in a tar), as `ctr images import`
reads it: no registry and no image builder needed for the real node's pause and probe images.

The archive holds `oci-layout`, `index.json` (the manifest, named by the
`io.containerd.image.name` annotation containerd imports it as) and `blobs/sha256/`: the image
config, the manifest and one gzip layer. Everything is deterministic (mtime 0, root-owned
entries), so the same files give the same image digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class ImageFile:
    path: str  # inside the image, absolute
    source: Path
    mode: int = 0o755


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(
    name: str, *, data: bytes | None = None, mode: int = 0o755
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.mode = 0, 0, 0, mode
    if data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    return info, data


def _layer(files: list[ImageFile]) -> bytes:
    dirs: set[str] = set()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for file in files:
        parts = file.path.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in dirs:
                dirs.add(parent)
                entries.append(_entry(parent + "/"))
        entries.append(_entry("/".join(parts), data=file.source.read_bytes(), mode=file.mode))
    return _tar_bytes(entries)


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob)}  # fmt: skip


def write_image(
    archive: Path, name: str, files: list[ImageFile], entrypoint: list[str], user: str
) -> str:
    """Write the image `name` (e.g. `localhost/finetune-node/pause:local`) to `archive`; return
    the manifest's digest."""
    layer_tar = _layer(files)
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "WorkingDir": "/",
                   "Env": ["PATH=/"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }, sort_keys=True).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": _descriptor(CONFIG, config),
        "layers": [_descriptor(LAYER, layer)],
    }, sort_keys=True).encode()  # fmt: skip
    tag = name.rpartition(":")[2]
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{**_descriptor(MANIFEST, manifest), "annotations": {
            "io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}}],
    }  # fmt: skip
    blobs = [config, layer, manifest]
    entries = [
        _entry("oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}', mode=0o644),
        _entry("index.json", data=json.dumps(index, sort_keys=True).encode(), mode=0o644),
        _entry("blobs/"),
        _entry("blobs/sha256/"),
    ]
    entries += [
        _entry(f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", data=blob, mode=0o644)
        for blob in blobs
    ]
    archive.write_bytes(_tar_bytes(entries))
    return str(_descriptor(MANIFEST, manifest)["digest"])
