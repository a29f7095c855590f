#!/usr/bin/env bash
# System packages the project needs from Debian: openssl and curl (control plane), lua5.4 and lua5.1
# (Argo CD health checks; Argo CD runs Lua 5.1), prometheus (the local Prometheus of hack/prometheus.sh;
# its Debian service is kept stopped: ours runs on a free port), chromium (headless: make demo's report
# screenshot and its test). shellcheck and hadolint come from PyPI (dev extra).
# Installs only what is missing; needs root or sudo for that.
set -euo pipefail

declare -A need=([openssl]=openssl [curl]=curl [lua5.4]=lua5.4 [lua5.1]=lua5.1 [prometheus]=prometheus [chromium]=chromium)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${need[$cmd]}")
done
((${#missing[@]})) || exit 0

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2; exit 1; }
  sudo=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts and enables a packaged service on install where systemd runs; hack/prometheus.sh runs
# its own instance on a free port, so the packaged one (port 9090) is stopped and disabled.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
