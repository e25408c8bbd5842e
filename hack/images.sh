#!/usr/bin/env bash
# Build both images of the Dockerfile on this machine, daemonless, with buildah; export each as an
# archive that `ctr -n k8s.io images import` takes with its name.
#
#   hack/images.sh                  # both targets (make images)
#   hack/images.sh operator         # one
#
# Here no registry can be pulled from, so the production bases are swapped through build args:
#   - one local base, Debian bookworm made with debootstrap (minbase + python3, python3-venv,
#     python-is-python3, ca-certificates) and committed as localhost/finetune-base:bookworm, once
#     per machine; it stands in for python:3.12-slim (operator) and the CUDA runtime (trainer);
#   - the trainer's interpreter is Debian's python3.11 (TRAINER_PYTHON), and torch is PyPI's
#     build, downloaded once into a wheelhouse (~/.cache/finetune-operator/wheels) that is
#     mounted into the build and serves as the torch step's index (TORCH_INDEX_URL=file://...).
# `docker build --target operator .` without arguments is still the production build.
#
# Everything lives under ~/.cache/finetune-operator (FINETUNE_CACHE): buildah's storage in
# containers/ (its own storage.conf: overlay when the kernel mounts it there, else vfs), the
# wheelhouse in wheels/, the archives in images/<target>.tar (re-exported only when the image id
# changes). A target whose inputs (Dockerfile, the files it copies, arguments, base) match its
# last build is not built again (a fraction of a second); otherwise `--layers` reuses every step
# whose inputs did not change. One build at a time (flock). Needs root (buildah, debootstrap; both installed from Debian when missing).
#
# Last line of stdout: {"operator": {"ref", "id", "archive", "size_mb"}, "trainer": {...}}.
# Progress goes to stderr. Use the same storage by hand:
#   CONTAINERS_STORAGE_CONF=~/.cache/finetune-operator/containers/storage.conf buildah images
set -euo pipefail
# buildah's chroot isolation: no OCI runtime and no cgroup setup (this VM mounts cgroups v1 and v2
# together, "hybrid", which crun refuses to run in).
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FINETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
STORE=$CACHE/containers
WHEELS_ROOT=$CACHE/wheels
ARCHIVES=$CACHE/images
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO/charts/finetune-operator/Chart.yaml")
BASE=localhost/finetune-base:bookworm
SUITE=bookworm
MIRROR=${FINETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
TRAINER_PYTHON=python3.11
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/Dockerfile")
TORCH_INDEX_URL=${FINETUNE_TORCH_INDEX_URL:-https://pypi.org/simple}

log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer)
for target in "${targets[@]}"; do
  [[ $target == operator || $target == trainer ]] || die "unknown target '$target' (operator, trainer)"
done
[[ $(id -u) == 0 ]] || die "needs root (buildah's rootful storage, debootstrap)"
# Debian's buildah (1.28 on bookworm) and debootstrap; installed here rather than by `make setup`,
# since only the images need them. No OCI runtime: the builds use chroot isolation.
"$REPO/hack/apt-install.sh" buildah debootstrap
[[ -n $VERSION && -n $TORCH_VERSION ]] || die "cannot read appVersion or TORCH_VERSION"

mkdir -p "$STORE" "$WHEELS_ROOT" "$ARCHIVES"
exec 9>"$STORE/build.lock"
flock 9
# buildah stages each committed layer as a tar in TMPDIR (the trainer's largest is several GB):
# keep those with the storage, and clear what a build that was killed left there.
export TMPDIR=$STORE/tmp
rm -rf "$TMPDIR"
mkdir -p "$TMPDIR"

# --- storage ------------------------------------------------------------------------------------
# overlay where this kernel and filesystem mount it (copying nothing per layer), else vfs (a full
# copy of the tree per layer: several times the trainer's size on disk). Chosen once: storage
# made with one driver cannot be opened with the other.
export CONTAINERS_STORAGE_CONF=$STORE/storage.conf
if [[ ! -f $CONTAINERS_STORAGE_CONF ]]; then
  probe=$(mktemp -d "$STORE/probe.XXXXXX")
  mkdir -p "$probe"/{lower,upper,work,merged}
  driver=vfs
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
    "$probe/merged" 2>/dev/null; then
    umount "$probe/merged"
    driver=overlay
  fi
  rm -rf "$probe"
  cat >"$CONTAINERS_STORAGE_CONF.tmp" <<EOF
# Written by hack/images.sh: buildah's storage for finetune-operator's images.
[storage]
driver = "$driver"
graphroot = "$STORE/storage"
runroot = "$STORE/run"
EOF
  mv "$CONTAINERS_STORAGE_CONF.tmp" "$CONTAINERS_STORAGE_CONF"
  log "storage: $driver driver in $STORE"
fi

# TLS: the base trusts the certificate authorities this machine added to its own store
# (/usr/local/share/ca-certificates, e.g. a TLS-intercepting proxy's), and then pip in it uses
# the system store (/etc/pip.conf) instead of its bundled one. Nothing is added where there are
# none.
local_cas=(/usr/local/share/ca-certificates/*.crt)
[[ -f ${local_cas[0]} ]] || local_cas=()
cas_digest=$(cat /dev/null "${local_cas[@]}" | sha256sum | cut -c1-16)

# --- the local base -------------------------------------------------------------------------------
# The base's recipe: a change makes a new base.
BASE_RECIPE=$(echo "$SUITE $MIRROR $BASE_PACKAGES minbase LANG=C.UTF-8 cas=$cas_digest v2" | sha256sum | cut -c1-16)
base_recipe() { buildah inspect --type image --format '{{index .ImageAnnotations "dev.finetune.base-recipe"}}' "$BASE" 2>/dev/null || true; }
if [[ $(base_recipe) != "$BASE_RECIPE" ]]; then
  log "making $BASE with debootstrap ($SUITE minbase + ${BASE_PACKAGES//,/ }; once per machine)"
  rootfs=$(mktemp -d "$STORE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs" "$rootfs.tar"' EXIT
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2
  if [[ ${#local_cas[@]} -gt 0 ]]; then
    cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    TMPDIR=/tmp chroot "$rootfs" update-ca-certificates >&2
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* \
    "$rootfs"/run/* "$rootfs"/tmp/*
  tar -C "$rootfs" -cf "$rootfs.tar" .
  ctr=$(buildah from --pull=never scratch)
  buildah add "$ctr" "$rootfs.tar" / >/dev/null
  buildah config --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 --annotation "dev.finetune.base-recipe=$BASE_RECIPE" "$ctr"
  buildah commit --rm "$ctr" "$BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.tar"
  trap - EXIT
fi

# --- the torch wheelhouse -------------------------------------------------------------------------
# torch and its dependencies (PyPI's build: CUDA libraries included, ~2.6 GB of wheels) for the
# base's interpreter, downloaded once by pip inside the base, so the wheels match what the build
# installs; then a PEP 503 index of them (simple/<project>/index.html), which the build's torch
# step uses as its only index: nothing of torch's is downloaded again.
wheels=$WHEELS_ROOT/torch-$TORCH_VERSION-$TRAINER_PYTHON
if [[ " ${targets[*]} " == *" trainer "* && ! -f $wheels/.complete ]]; then
  log "downloading torch $TORCH_VERSION and its dependencies into $wheels (once per machine)"
  mkdir -p "$wheels"
  ctr=$(buildah from --pull=never "$BASE")
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah run --network host -v "$wheels:/mnt" "$ctr" -- sh -ec \
    "$TRAINER_PYTHON -m venv /tmp/venv
     /tmp/venv/bin/pip download --disable-pip-version-check --no-cache-dir --progress-bar off \
       --index-url '$TORCH_INDEX_URL' --dest /mnt 'torch==$TORCH_VERSION'" >&2
  buildah rm "$ctr" >/dev/null
  trap - EXIT
  touch "$wheels/.complete"
fi
if [[ " ${targets[*]} " == *" trainer "* && ! -f $wheels/simple/.complete ]]; then
  python3 - "$wheels" <<'EOF'
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects = {}
for wheel in sorted(root.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel.name)
for name, files in projects.items():
    page = root / "simple" / name
    page.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../{f}">{f}</a>\n' for f in files)
    (page / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
EOF
  touch "$wheels/simple/.complete"
fi

# --- build and export -----------------------------------------------------------------------------
json=()
for target in "${targets[@]}"; do
  ref=localhost/finetune-operator/$target:$VERSION
  # VERSION and REVISION keep their defaults (the project's version, which
  # tests/unit/test_dockerfile.py holds the default to, and "unknown"): buildah 1.28 reuses a cached LABEL step whose
  # ${ARG} values changed (its cache key is the unexpanded instruction), so a commit passed as
  # REVISION would stay the first build's in every later image, and --label is not applied when
  # the last step of a multi-stage build comes from the cache.
  args=(--build-arg "OPERATOR_BASE=$BASE" --build-arg "TRAINER_BASE=$BASE"
    --build-arg "TRAINER_PYTHON=$TRAINER_PYTHON")
  volumes=()
  if [[ $target == trainer ]]; then
    # /mnt: a folder every base has, so the mount leaves no mountpoint behind in a layer.
    args+=(--build-arg "TORCH_INDEX_URL=file:///mnt/simple")
    volumes+=(-v "$wheels:/mnt:ro")
  fi
  # Every input of the build: the Dockerfile, the context it copies (filtered as .dockerignore
  # does), the arguments, the base's id and the wheelhouse's files. When the image last built
  # from the same inputs is still in the storage, nothing is built: buildah's layer cache would
  # give the same image, but checking `COPY --from` means hashing the trainer's whole venv
  # (~1.5 min here). FINETUNE_IMAGES_REBUILD=1 always runs buildah.
  inputs=$(
    cd "$REPO"
    {
      printf '%s\n' "$target" "${args[@]}" ${volumes[@]+"${volumes[@]}"}
      buildah inspect --type image --format '{{.FromImageID}}' "$BASE"
      find Dockerfile .dockerignore pyproject.toml README.md api "$target" -type f \
        ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -path '*.egg-info/*' \
        ! -path '*/.pytest_cache/*' ! -path '*/.mypy_cache/*' ! -path '*/.ruff_cache/*' \
        -print0 | sort -z | xargs -0 sha256sum
      [[ $target != trainer ]] || (cd "$wheels" && find . -type f ! -name '.*' | sort)
    } | sha256sum | cut -c1-64
  )
  id=
  if [[ ${FINETUNE_IMAGES_REBUILD:-0} != 1 && -f $STORE/$target.inputs ]]; then
    read -r last_inputs last_id <"$STORE/$target.inputs" || true
    if [[ $last_inputs == "$inputs" ]] &&
      [[ $(buildah inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null) == "$last_id" ]]; then
      id=$last_id
      log "$ref is up to date ($id)"
    fi
  fi
  if [[ -z $id ]]; then
    log "building $ref"
    start=$SECONDS
    buildah bud --layers --pull=never --network host --target "$target" --tag "$ref" \
      --iidfile "$STORE/$target.iid" "${args[@]}" ${volumes[@]+"${volumes[@]}"} \
      -f "$REPO/Dockerfile" "$REPO" >&2
    id=$(<"$STORE/$target.iid")
    id=${id#sha256:}
    echo "$inputs $id" >"$STORE/$target.inputs"
    log "built $ref ($id) in $((SECONDS - start)) s"
  fi

  archive=$ARCHIVES/$target.tar
  if [[ ! -f $archive || $(cat "$archive.id" 2>/dev/null) != "$id" ]]; then
    # docker-archive: `ctr images import` names the image after the archive's RepoTags.
    log "exporting $ref to $archive"
    rm -f "$archive" "$archive.id"
    buildah push --quiet "$ref" "docker-archive:$archive.tmp:$ref" >&2
    mv "$archive.tmp" "$archive"
    echo "$id" >"$archive.id"
  fi
  size_mb=$(($(stat -c %s "$archive") / 1048576))
  json+=("\"$target\": {\"ref\": \"$ref\", \"id\": \"$id\", \"archive\": \"$archive\", \"size_mb\": $size_mb}")
done
(IFS=,; echo "{${json[*]}}")
