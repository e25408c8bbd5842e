#!/usr/bin/env bash
# Fill the cache for one KWOK release and print its directory: the `kwok` controller binary built
# from the Go module sigs.k8s.io/kwok, and that same module version's stages (stages/*.yaml).
#
#   hack/kwok-binaries.sh                     # the version pinned below
#   KWOK_VERSION=0.8.0 hack/kwok-binaries.sh
#
# sigs.k8s.io/kwok has no replace directives, so `go install module/cmd/kwok@vX` builds it. The
# kwok controller does nothing without stages (what happens to a node or a pod, and when): v0.8
# reads them from its --config file or, with --enable-crds=Stage, from Stage objects. The default
# ones ship in the module (kustomize/stage/...), so binary and stages are always the same release.
# The cache is $FINETUNE_KWOK_CACHE (default ~/.cache/finetune-operator/kwok-vX.Y.Z): a few
# minutes once per machine, nothing after.
set -euo pipefail

KWOK_VERSION_PINNED=0.8.0
version=${KWOK_VERSION:-$KWOK_VERSION_PINNED}
version=${version#v}
cache="${FINETUNE_KWOK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/kwok-v$version}"

log() { echo "kwok-binaries: $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [[ -x "$cache/kwok" && -f "$cache/stages/.complete" ]]; then
  echo "$cache"
  exit 0
fi
[[ -d /usr/local/go/bin ]] && export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { log "Go is needed to build KWOK $version"; exit 1; }
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-auto} CGO_ENABLED=0

log "resolving sigs.k8s.io/kwok v$version"
dir=$(go mod download -json "sigs.k8s.io/kwok@v$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[[ -d $dir ]] || { log "the Go module proxy does not serve sigs.k8s.io/kwok v$version"; exit 1; }

if [[ ! -x "$cache/kwok" ]]; then
  log "building kwok v$version from its Go module (one time; a few minutes on 2 cores)"
  GOBIN="$cache/build-bin" nice -n 15 go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@v$version" >&2
  install -m 0755 "$cache/build-bin/kwok" "$cache/kwok"
  rm -rf "$cache/build-bin"
fi

# The stages kwokctl gives a cluster by default: a node becomes Ready (node/fast), its heartbeat
# with a lease (node/heartbeat-with-lease), a pod becomes Running, a Job's pod Succeeded, a deleted
# pod goes away (pod/fast). Which of them run is up to the caller's --config.
rm -rf "$cache/stages"
mkdir -p "$cache/stages"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
  pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  install -m 0644 "$dir/kustomize/stage/$stage.yaml" "$cache/stages/"
done
touch "$cache/stages/.complete"
echo "$cache"
