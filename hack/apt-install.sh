#!/usr/bin/env bash
# Install the Debian packages named as arguments that are not installed yet (quiet; a no-op when
# all are). Used by setup.sh, node-binaries.sh and images.sh. Progress goes to stderr.
set -euo pipefail
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -gt 0 ]] || exit 0
sudo_() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
echo "apt-install: installing Debian packages: ${missing[*]}" >&2
sudo_ apt-get update -qq 2>&1 | grep -v '^W:' >&2 || true
sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
