#!/usr/bin/env bash
# Installs the headless browser the status-page test renders meshguard's page in, from the Debian
# package `chromium`, unless it is already there. Prints one line on stdout (progress to stderr):
#
#   bash scripts/install-chromium.sh
#   MESHGUARD_CHROMIUM_BIN=/usr/bin/chromium
#
# so `eval "$(bash scripts/install-chromium.sh)"` sets it.
set -euo pipefail

find_browser() { command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || command -v google-chrome 2>/dev/null || true; }

if [[ -z "$(find_browser)" ]]; then
    if ! command -v apt-get >/dev/null; then
        echo "error: no Chromium and no apt-get to install it; install Chromium, then set MESHGUARD_CHROMIUM_BIN" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to install chromium" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "installing: chromium" >&2
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >&2
fi
browser="$(find_browser)"
[[ -n "$browser" ]] || { echo "error: chromium not found after installing it" >&2; exit 1; }
echo "MESHGUARD_CHROMIUM_BIN=$browser"
