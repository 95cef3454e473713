#!/usr/bin/env bash
# Installs the MQTT broker the enforcer tests run against, Mosquitto 2 with its dynamic-security
# plugin and `mosquitto_ctrl` (which writes the plugin's first configuration), from the Debian
# package `mosquitto` (Debian ships all three in it), unless they are already there.
# Prints three lines on stdout (progress goes to stderr):
#
#   bash scripts/install-mosquitto.sh
#   MESHGUARD_MOSQUITTO_BIN=/usr/sbin/mosquitto
#   MESHGUARD_MOSQUITTO_DYNSEC=/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so
#   MESHGUARD_MOSQUITTO_CTRL=/usr/bin/mosquitto_ctrl
#
# so `eval "$(bash scripts/install-mosquitto.sh)"` sets them. The broker is only ever started by the
# tests (testkit's `Mosquitto::start`), on loopback with its own configuration; the Debian service
# the package enables is stopped where systemd runs it, since the tests need no system-wide broker.
set -euo pipefail

find_bin() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }

# The plugin's path depends on the architecture (and on the distribution's layout).
find_plugin() {
    local candidate
    for candidate in \
        /usr/lib/*-linux-gnu/mosquitto_dynamic_security.so \
        /usr/lib/mosquitto_dynamic_security.so \
        /usr/lib/mosquitto/mosquitto_dynamic_security.so \
        /usr/local/lib/mosquitto_dynamic_security.so; do
        [[ -f "$candidate" ]] && { echo "$candidate"; return; }
    done
    if command -v dpkg >/dev/null; then
        dpkg -L mosquitto 2>/dev/null | grep -m1 'mosquitto_dynamic_security\.so$' || true
    fi
}

packages=()
[[ -n "$(find_bin mosquitto)" && -n "$(find_plugin)" && -n "$(find_bin mosquitto_ctrl)" ]] || packages+=(mosquitto)

if ((${#packages[@]} > 0)); then
    if ! command -v apt-get >/dev/null; then
        echo "error: missing ${packages[*]} and no apt-get to install them; install Mosquitto 2 with its dynamic-security plugin and mosquitto_ctrl, then set MESHGUARD_MOSQUITTO_BIN, MESHGUARD_MOSQUITTO_DYNSEC and MESHGUARD_MOSQUITTO_CTRL" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${packages[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "installing: ${packages[*]}" >&2
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" >&2
    # The package starts a system broker on port 1883 where systemd runs; the tests do not use it.
    if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
        "${sudo[@]}" systemctl disable --now mosquitto >&2 || true
    fi
fi

bin="$(find_bin mosquitto)"
plugin="$(find_plugin)"
ctrl="$(find_bin mosquitto_ctrl)"
for pair in "mosquitto:$bin" "mosquitto_dynamic_security.so:$plugin" "mosquitto_ctrl:$ctrl"; do
    [[ -n "${pair#*:}" ]] || { echo "error: ${pair%%:*} not found after installing ${packages[*]:-nothing}" >&2; exit 1; }
done
# `mosquitto -h` prints its version first and exits non-zero.
version="$("$bin" -h 2>&1 || true)"
version="${version%%$'\n'*}"
[[ "$version" == "mosquitto version 2."* ]] || {
    echo "error: $bin is not Mosquitto 2 (the dynamic-security plugin needs 2.0 or later): $version" >&2
    exit 1
}

echo "MESHGUARD_MOSQUITTO_BIN=$bin"
echo "MESHGUARD_MOSQUITTO_DYNSEC=$plugin"
echo "MESHGUARD_MOSQUITTO_CTRL=$ctrl"
