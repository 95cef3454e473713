#!/usr/bin/env bash
# Installs the Kafka-protocol broker the tests run against, tansu 0.6, into the meshguard cache
# unless it is already there, and prints the binary's path on stdout (progress goes to stderr).
#
#   bash scripts/install-broker.sh    # -> ${MESHGUARD_CACHE:-$HOME/.cache/meshguard}/tansu/bin/tansu
#
# The first run builds tansu from source (about 10 minutes on 2 cores); later runs return at once.
set -euo pipefail

cache="${MESHGUARD_CACHE:-$HOME/.cache/meshguard}"
root="$cache/tansu"
bin="$root/bin/tansu"

installed() {
    [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q '^tansu 0\.6\.'
}

if ! installed; then
    mkdir -p "$cache"
    # Two concurrent runs (say, two terminals) would build it twice; the second waits instead.
    if command -v flock >/dev/null; then
        exec 9>"$cache/.tansu-install.lock"
        flock 9
    fi
    if ! installed; then
        echo "Installing tansu 0.6 into $root: builds from source, about 10 minutes on 2 cores the first time..." >&2
        # cargo's own temporary target dir, not the project's: tansu's release build is large and
        # shares nothing with the workspace.
        env -u CARGO_TARGET_DIR \
            cargo install --root "$root" 'tansu@^0.6' --features dynostore,libsql --locked >&2
        if ! installed; then
            echo "error: cargo install finished but $bin is not a tansu 0.6 binary" >&2
            exit 1
        fi
    fi
fi

echo "$bin"
