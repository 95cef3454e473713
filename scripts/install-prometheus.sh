#!/usr/bin/env bash
# Installs the Prometheus server and `promtool` the observability tests run against, from the Debian
# package `prometheus` (it ships both), unless they are already there. Prints two lines on stdout
# (progress goes to stderr):
#
#   bash scripts/install-prometheus.sh
#   MESHGUARD_PROMETHEUS_BIN=/usr/bin/prometheus
#   MESHGUARD_PROMTOOL_BIN=/usr/bin/promtool
#
# so `eval "$(bash scripts/install-prometheus.sh)"` sets them. The server is only ever started by
# the tests (`tests/observability.rs`), on loopback with its own configuration and storage in a
# temporary directory; the Debian service the package enables is stopped where systemd runs it.
set -euo pipefail

find_bin() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }

packages=()
[[ -n "$(find_bin prometheus)" && -n "$(find_bin promtool)" ]] || packages+=(prometheus)

if ((${#packages[@]} > 0)); then
    if ! command -v apt-get >/dev/null; then
        echo "error: missing ${packages[*]} and no apt-get to install them; install Prometheus 2 (server and promtool), then set MESHGUARD_PROMETHEUS_BIN and MESHGUARD_PROMTOOL_BIN" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${packages[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "installing: ${packages[*]}" >&2
    "${sudo[@]}" apt-get update >&2
    # No recommends: they would add the node exporter, which the tests do not use.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" >&2
    # The package starts a system server on port 9090 where systemd runs; the tests do not use it.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        "${sudo[@]}" systemctl disable --now prometheus >&2 || true
    fi
fi

server="$(find_bin prometheus)"
promtool="$(find_bin promtool)"
for pair in "prometheus:$server" "promtool:$promtool"; do
    [[ -n "${pair#*:}" ]] || { echo "error: ${pair%%:*} not found after installing ${packages[*]:-nothing}" >&2; exit 1; }
done
# `promtool test rules` and the rule syntax used in dashboards/alerts.yml need Prometheus 2.
version="$("$server" --version 2>&1 || true)"
version="${version%%$'\n'*}"
[[ "$version" == "prometheus, version 2."* || "$version" == "prometheus, version 3."* ]] || {
    echo "error: $server is not Prometheus 2 or 3: $version" >&2
    exit 1
}

echo "MESHGUARD_PROMETHEUS_BIN=$server"
echo "MESHGUARD_PROMTOOL_BIN=$promtool"
