#!/usr/bin/env bash
# Fill the binary cache for a real Kubernetes node (hack/realnode.py) and print its directory.
#
#   hack/node-binaries.sh          # kubelet, kube-proxy, containerd, the node helpers
#
# - kubelet and kube-proxy of the control plane's release: hack/kube-binaries.sh builds them from
#   the same module it builds the control plane from (KUBE_BINARIES), into the same cache.
# - containerd v2 ($CONTAINERD_VERSION): `containerd`, `containerd-shim-runc-v2` and `ctr` from
#   the Go module github.com/containerd/containerd/v2 (Debian's containerd 1.6 is too old for
#   kubelet 1.36+, which needs the CRI v1 API of containerd 2.x), into
#   ~/.cache/finetune-operator/containerd-vX.Y.Z.
# - hack/nodeimages (pause, the in-cluster probe, the device plugin): static Go programs, built
#   once per source version into ~/.cache/finetune-operator/nodeimages-<digest>.
# - CoreDNS (hack/coredns: a main of our own over the Go module github.com/coredns/coredns, only
#   the plugins the cluster DNS uses; its own module, apart from hack/nodeimages, so CoreDNS's
#   dependency set does not move the helpers'): static, built once per source version into
#   ~/.cache/finetune-operator/coredns-<digest>.
# - runc ($RUNC_VERSION) from its Go module github.com/opencontainers/runc, with cgo and the
#   `seccomp` tag (linked to Debian's libseccomp: the RuntimeDefault profile needs it), into
#   ~/.cache/finetune-operator/runc-vX.Y.Z: the release line containerd's own CI runs
#   (script/setup/runc-version says v1.5.2 for containerd v2.4.2). Debian 12's runc 1.1.5 runs
#   the same pods (checked once by hand) but is four minors older and reports a failing
#   `runc init` only as "can't get final child's PID from pipe: EOF", without the cause.
# - Debian packages: containernetworking-plugins (/usr/lib/cni: bridge, host-local, loopback,
#   portmap), iptables (kube-proxy's iptables mode and the bridge plugin's masquerade rule),
#   conntrack (kube-proxy clears stale UDP entries with it), libseccomp-dev and pkg-config (runc).
#
# One build per cache at a time (flock). Prints five lines: the Kubernetes cache, the containerd
# cache, the runc cache, the node-helper cache, the CoreDNS cache.
set -euo pipefail

HACK=$(cd "$(dirname "$0")" && pwd)
CONTAINERD_VERSION=${CONTAINERD_VERSION:-2.4.2}
RUNC_VERSION=${RUNC_VERSION:-1.5.3}
root="${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator"
export PATH=$PATH:/usr/local/go/bin

log() { echo "node-binaries: $*" >&2; }

APT_PACKAGES=(containernetworking-plugins iptables conntrack libseccomp-dev pkg-config gcc)
"$HACK/apt-install.sh" "${APT_PACKAGES[@]}"

kube_cache=$(KUBE_BINARIES="kube-apiserver kube-scheduler kube-controller-manager kubelet kube-proxy" \
  "$HACK/kube-binaries.sh")

command -v go >/dev/null || { log "Go is needed to build containerd and the node helpers"; exit 1; }
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

ctrd="$root/containerd-v$CONTAINERD_VERSION"
mkdir -p "$ctrd"
exec 8>"$ctrd/.lock"
flock 8
if [[ ! -x $ctrd/containerd || ! -x $ctrd/containerd-shim-runc-v2 || ! -x $ctrd/ctr ]]; then
  mod="$ctrd/build"
  mkdir -p "$mod"
  pkg=github.com/containerd/containerd/v2
  gomod=$(cd "$mod" && go mod download -json "$pkg@v$CONTAINERD_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  [[ -f $gomod ]] || { log "the Go module proxy does not serve $pkg v$CONTAINERD_VERSION"; exit 1; }
  printf 'module finetune.dev/containerd-build\n\ngo %s\n\nrequire %s v%s\n' \
    "$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")" "$pkg" "$CONTAINERD_VERSION" >"$mod/go.mod"
  ldflags="-s -w -X $pkg/version.Version=v$CONTAINERD_VERSION -X $pkg/version.Revision=module"
  log "building containerd v$CONTAINERD_VERSION from its Go module (one time)"
  # Static, no cgo: the btrfs snapshotter (cgo) is left out; overlayfs is the snapshotter used.
  (cd "$mod" && CGO_ENABLED=0 go build -trimpath -tags "no_btrfs" -ldflags "$ldflags" -o "$mod/bin/" \
      "$pkg/cmd/containerd" "$pkg/cmd/containerd-shim-runc-v2" "$pkg/cmd/ctr") >&2
  for bin in containerd containerd-shim-runc-v2 ctr; do install -m 0755 "$mod/bin/$bin" "$ctrd/$bin"; done
fi
exec 8>&-

runc="$root/runc-v$RUNC_VERSION"
mkdir -p "$runc"
exec 6>"$runc/.lock"
flock 6
if [[ ! -x $runc/runc ]]; then
  log "building runc v$RUNC_VERSION from its Go module (one time)"
  (cd "$runc" && GOBIN="$runc/bin" CGO_ENABLED=1 go install -trimpath -tags seccomp \
    -ldflags "-s -w -X main.version=$RUNC_VERSION -X main.gitCommit=module" \
    "github.com/opencontainers/runc@v$RUNC_VERSION") >&2
  install -m 0755 "$runc/bin/runc" "$runc/runc"
fi
exec 6>&-

digest=$(cd "$HACK/nodeimages" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-16)
helpers="$root/nodeimages-$digest"
mkdir -p "$helpers"
exec 7>"$helpers/.lock"
flock 7
if [[ ! -x $helpers/pause || ! -x $helpers/kubeprobe || ! -x $helpers/gpu-device-plugin ]]; then
  log "building the node helpers (hack/nodeimages)"
  (cd "$HACK/nodeimages" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$helpers/" \
    ./cmd/pause ./cmd/kubeprobe ./cmd/gpu-device-plugin) >&2
fi
exec 7>&-

digest=$(cd "$HACK/coredns" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)
dns="$root/coredns-$digest"
mkdir -p "$dns"
exec 5>"$dns/.lock"
flock 5
if [[ ! -x $dns/coredns ]]; then
  log "building CoreDNS from its Go module (hack/coredns, one time)"
  (cd "$HACK/coredns" && nice -n 10 env CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
    -o "$dns/coredns.tmp" . && mv "$dns/coredns.tmp" "$dns/coredns") >&2
fi
exec 5>&-

echo "$kube_cache"
echo "$ctrd"
echo "$runc"
echo "$helpers"
echo "$dns"
