#!/usr/bin/env bash
# Fill the binary cache and print its directory: etcd, kube-apiserver, kube-scheduler and
# kube-controller-manager. The Kubernetes ones are built once from Debian's `kubernetes` source
# package (about 4-8 minutes on 2 cores); etcd is copied from Debian's etcd-server.
#
# The cache is $FINETUNE_KUBE_CACHE (default ~/.cache/finetune-operator/kubernetes-1.20.2).
# hack/localcluster.py looks in $KUBEBUILDER_ASSETS first (the envtest convention) and runs this
# only for binaries not found there (envtest ships no scheduler or controller manager).
# Build prerequisites (Debian): golang-go rsync jq dpkg-dev etcd-server
# golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev, and a deb-src entry.
set -euo pipefail

KUBE_VERSION=1.20.2
cache="${FINETUNE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/kubernetes-$KUBE_VERSION}"
kube_bins=(kube-apiserver kube-scheduler kube-controller-manager)

log() { echo "kube-binaries: $*" >&2; }

have_all() {
  local dir=$1
  for bin in "${kube_bins[@]}" etcd; do [[ -x "$dir/$bin" ]] || return 1; done
}

work=""
cleanup() { if [[ -n $work ]]; then rm -rf "$work"; fi; }
trap cleanup EXIT

build() {
  local src
  for tool in go rsync jq dpkg-source apt-get; do
    command -v "$tool" >/dev/null || { log "missing '$tool' (see DEVELOPERS.md: apt-get install golang-go rsync jq dpkg-dev)"; exit 1; }
  done
  for dir in /usr/share/gocode/src/github.com/modern-go/reflect2 /usr/share/gocode/src/github.com/json-iterator/go; do
    [[ -d $dir ]] || { log "missing $dir (apt-get install golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)"; exit 1; }
  done
  work=$(mktemp -d)
  log "building Kubernetes $KUBE_VERSION from Debian's source package in $work (one time)"
  (cd "$work" && apt-get source kubernetes >"$work/source.log" 2>&1) || { cat "$work/source.log" >&2; log "apt-get source kubernetes failed: is there a deb-src entry?"; exit 1; }
  src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
  # The vendored reflect2 1.0.1 crashes under Go >= 1.18; use Debian's newer reflect2 and the
  # json-iterator that matches it.
  rm -rf "$src/vendor/github.com/modern-go/reflect2" "$src/vendor/github.com/json-iterator/go"
  cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  cp -rL /usr/share/gocode/src/github.com/json-iterator/go "$src/vendor/github.com/json-iterator/go"
  (cd "$src" && env KUBE_GIT_VERSION="v$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean CGO_ENABLED=0 \
    make WHAT="cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager" >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; log "build failed"; exit 1; }
  mkdir -p "$cache"
  for bin in "${kube_bins[@]}"; do install -m 0755 "$src/_output/bin/$bin" "$cache/$bin"; done
}

if ! have_all "$cache"; then
  missing=0
  for bin in "${kube_bins[@]}"; do [[ -x "$cache/$bin" ]] || missing=1; done
  [[ $missing == 0 ]] || build
  if [[ ! -x "$cache/etcd" ]]; then
    etcd_bin=$(command -v etcd || true)
    [[ -n $etcd_bin ]] || { log "no etcd: apt-get install etcd-server, or set KUBEBUILDER_ASSETS"; exit 1; }
    install -m 0755 "$etcd_bin" "$cache/etcd"
  fi
fi
echo "$cache"
