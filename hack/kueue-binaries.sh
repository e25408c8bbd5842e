#!/usr/bin/env bash
# Fill the cache for one Kueue release and print its directory: the `kueue` manager binary built
# from the Go module sigs.k8s.io/kueue, and that same module version's CRDs (crds/*.yaml).
#
#   hack/kueue-binaries.sh                      # the version pinned below
#   KUEUE_VERSION=0.17.0 hack/kueue-binaries.sh
#
# sigs.k8s.io/kueue has no replace directives, so `go install module/cmd/kueue@vX` builds it; the
# CRDs (config/components/crd/bases) and the webhook manifests (config/components/webhook) come
# from the module the build downloaded, so binary, CRDs and webhooks are always the same release. The cache is $FINETUNE_KUEUE_CACHE (default
# ~/.cache/finetune-operator/kueue-vX.Y.Z): several minutes once per machine, nothing after.
set -euo pipefail

KUEUE_VERSION_PINNED=0.17.0
version=${KUEUE_VERSION:-$KUEUE_VERSION_PINNED}
version=${version#v}
cache="${FINETUNE_KUEUE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/kueue-v$version}"

log() { echo "kueue-binaries: $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [[ -x "$cache/kueue" && -f "$cache/crds/.complete" && -f "$cache/webhooks.yaml" ]]; then
  echo "$cache"
  exit 0
fi
[[ -d /usr/local/go/bin ]] && export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { log "Go is needed to build Kueue $version"; exit 1; }
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-auto} CGO_ENABLED=0

log "resolving sigs.k8s.io/kueue v$version"
dir=$(go mod download -json "sigs.k8s.io/kueue@v$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[[ -d $dir ]] || { log "the Go module proxy does not serve sigs.k8s.io/kueue v$version"; exit 1; }

if [[ ! -x "$cache/kueue" ]]; then
  log "building kueue v$version from its Go module (one time; several minutes on 2 cores)"
  ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=v$version"
  GOBIN="$cache/build-bin" nice -n 10 go install -trimpath -ldflags "$ldflags" \
    "sigs.k8s.io/kueue/cmd/kueue@v$version" >&2
  install -m 0755 "$cache/build-bin/kueue" "$cache/kueue"
  rm -rf "$cache/build-bin"
fi

rm -rf "$cache/crds"
mkdir -p "$cache/crds"
install -m 0644 "$dir"/config/components/crd/bases/*.yaml "$cache/crds/"
install -m 0644 "$dir"/config/components/webhook/manifests.yaml "$cache/webhooks.yaml"
touch "$cache/crds/.complete"
echo "$cache"
