#!/usr/bin/env bash
# Installs `psql`, the PostgreSQL client the SQL tests talk to meshguard's PostgreSQL endpoint
# with, from the Debian package `postgresql-client` (no server), unless it is already there.
# Prints one line on stdout (progress goes to stderr):
#
#   bash scripts/install-psql.sh
#   MESHGUARD_PSQL_BIN=/usr/bin/psql
#
# so `eval "$(bash scripts/install-psql.sh)"` sets it.
set -euo pipefail

if ! command -v psql >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "error: psql is missing and there is no apt-get to install it; install the PostgreSQL client, then set MESHGUARD_PSQL_BIN" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to install postgresql-client" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "installing: postgresql-client" >&2
    "${sudo[@]}" apt-get update >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-client >&2
fi
psql="$(command -v psql)" || { echo "error: psql not found after installing postgresql-client" >&2; exit 1; }
echo "MESHGUARD_PSQL_BIN=$psql"
