#!/usr/bin/env bash
# The project's test command, locally and in CI: installs what the build needs (Debian packages
# only if missing, the tansu broker into the cache, Mosquitto and Prometheus from Debian), then formatting, lints
# and every test against real brokers. Needs only rustup's cargo, gcc, make and python3 to begin with.
#
#   bash scripts/test.sh
#
# MESHGUARD_CACHE (default ~/.cache/meshguard) holds the broker and, unless CARGO_TARGET_DIR says
# otherwise, the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export MESHGUARD_CACHE="${MESHGUARD_CACHE:-$HOME/.cache/meshguard}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MESHGUARD_CACHE/target}"

started=$SECONDS
section() { printf '\n==> %s\n' "$*"; }

section "System packages"
# rdkafka-sys builds librdkafka from source with ./configure and make; its configure refuses to run
# without a C++ compiler even though the C library needs none. zlib needs no package: libz-sys
# builds its bundled copy when the system has no zlib headers.
packages=()
command -v cc >/dev/null || packages+=(gcc)
command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null || packages+=(g++)
command -v make >/dev/null || packages+=(make)
if command -v dpkg >/dev/null && ! dpkg -s libc6-dev >/dev/null 2>&1; then packages+=(libc6-dev); fi
if ((${#packages[@]} == 0)); then
    echo "all present (cc, c++, make)"
elif command -v apt-get >/dev/null; then
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${packages[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "installing: ${packages[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
else
    echo "error: missing ${packages[*]} and no apt-get to install them; install them and rerun" >&2
    exit 1
fi

section "Rust toolchain"
cargo --version
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi

section "Broker (tansu)"
if [[ -n "${MESHGUARD_TANSU_BIN:-}" && -x "$MESHGUARD_TANSU_BIN" ]]; then
    echo "using MESHGUARD_TANSU_BIN=$MESHGUARD_TANSU_BIN"
else
    MESHGUARD_TANSU_BIN="$(bash scripts/install-broker.sh)"
    echo "$MESHGUARD_TANSU_BIN"
fi
export MESHGUARD_TANSU_BIN
"$MESHGUARD_TANSU_BIN" --version

section "MQTT broker (Mosquitto 2 with dynamic security)"
# The enforcer's Mosquitto target is tested against the real plugin (Debian package, if missing).
eval "$(bash scripts/install-mosquitto.sh)"
export MESHGUARD_MOSQUITTO_BIN MESHGUARD_MOSQUITTO_DYNSEC MESHGUARD_MOSQUITTO_CTRL
echo "$MESHGUARD_MOSQUITTO_BIN, $MESHGUARD_MOSQUITTO_DYNSEC, $MESHGUARD_MOSQUITTO_CTRL"

section "Prometheus (server and promtool)"
# The observability tests check the live /metrics, the alert rules and every dashboard query against
# a real Prometheus (Debian package, if missing).
eval "$(bash scripts/install-prometheus.sh)"
export MESHGUARD_PROMETHEUS_BIN MESHGUARD_PROMTOOL_BIN
echo "$MESHGUARD_PROMETHEUS_BIN, $MESHGUARD_PROMTOOL_BIN"
"$MESHGUARD_PROMETHEUS_BIN" --version 2>&1 | head -n 1

section "PostgreSQL client (psql)"
# The SQL tests query meshguard's PostgreSQL endpoint with the real psql (Debian package, if missing).
eval "$(bash scripts/install-psql.sh)"
export MESHGUARD_PSQL_BIN
"$MESHGUARD_PSQL_BIN" --version

section "Headless browser (Chromium)"
# The status page is rendered in a real browser by the tests (Debian package, if missing).
eval "$(bash scripts/install-chromium.sh)"
export MESHGUARD_CHROMIUM_BIN
"$MESHGUARD_CHROMIUM_BIN" --version 2>/dev/null || true

section "Build cache ($CARGO_TARGET_DIR)"
# The cache outlives the clone, and each change of Cargo.lock, features or checkout path leaves a set of
# artifacts behind. After the suite, scripts/sweep-target.py keeps only what this build used (set
# MESHGUARD_SWEEP=0 to keep everything). Before it, a disk too full for a build (a debug build of the
# workspace and its tests takes about 10 GiB) is made room on: first the incremental folders, then the
# release profile (benchmarks only; the suite does not use it), then the whole debug profile (a build
# from nothing still fits in CI's time).
need_gib=${MESHGUARD_MIN_FREE_GIB:-15}
free_gib() {
    mkdir -p "$CARGO_TARGET_DIR"
    echo $(($(df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print $4 }') / 1048576))
}
echo "$(free_gib) GiB free (a build needs about $need_gib)"
if (($(free_gib) < need_gib)); then
    echo "low on disk: removing incremental build folders"
    rm -rf "$CARGO_TARGET_DIR"/*/incremental
    if (($(free_gib) < need_gib)) && [[ -d "$CARGO_TARGET_DIR/release" ]]; then
        echo "still low on disk: removing $CARGO_TARGET_DIR/release (benchmark builds)"
        rm -rf "$CARGO_TARGET_DIR/release"
    fi
    if (($(free_gib) < need_gib)); then
        echo "still low on disk: removing $CARGO_TARGET_DIR/debug (everything will be rebuilt)"
        rm -rf "$CARGO_TARGET_DIR/debug"
    fi
    echo "$(free_gib) GiB free"
fi
sweep() {
    # Only after a build got through: sweeping needs the build's list of artifacts.
    [[ "${MESHGUARD_SWEEP:-1}" != 0 && -n "${built:-}" ]] || return 0
    section "Build cache sweep"
    local used
    used="$(mktemp)"
    cargo test --no-run --workspace --all-targets --locked --message-format=json >"$used" 2>/dev/null || true
    cargo clippy --workspace --all-targets --locked --message-format=json -- -D warnings >>"$used" 2>/dev/null || true
    python3 scripts/sweep-target.py "$CARGO_TARGET_DIR/debug" "$used" || true
    rm -f "$used"
}
trap sweep EXIT

section "Format (cargo fmt --check)"
cargo fmt --all --check

section "Lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
built=1

section "Tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --locked --no-fail-fast
else
    echo "(cargo-nextest not installed: using cargo test)"
    cargo test --workspace --all-targets --locked --no-fail-fast
fi

section "All passed in $((SECONDS - started)) s"
