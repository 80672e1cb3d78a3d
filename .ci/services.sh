#!/usr/bin/env bash
# Services the test suite needs on a fresh Debian machine: headless Chromium
# for the feedback app's browser tests, and a PostgreSQL server for the
# storage tests. Idempotent; run as root.
#
# Meant to be sourced by .ci/run so that the exported URL reaches pytest:
#
#     source .ci/services.sh
#
# It can also be executed; then it prints the export line to copy. It never
# turns on `set -e` in the caller's shell: the work runs in a subshell.

ALIGNKIT_PG_USER=${ALIGNKIT_PG_USER:-alignkit_test}
ALIGNKIT_PG_PASSWORD=${ALIGNKIT_PG_PASSWORD:-alignkit_test}
ALIGNKIT_PG_DB=${ALIGNKIT_PG_DB:-alignkit_test}
ALIGNKIT_PG_PORT=${ALIGNKIT_PG_PORT:-5432}

_alignkit_services() (
    set -euo pipefail
    export DEBIAN_FRONTEND=noninteractive

    if ! command -v chromium >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1 \
        || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium postgresql >/dev/null
    fi

    # The package's postinst normally creates a cluster; a trimmed image may not.
    local version
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
        pg_createcluster --port "$ALIGNKIT_PG_PORT" "$version" main >/dev/null
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        pg_ctlcluster "$version" main start
    fi

    # Wait until it accepts connections (start can return a moment early).
    local i
    for i in $(seq 1 30); do
        if su postgres -c "psql -p $ALIGNKIT_PG_PORT -tAc 'select 1'" >/dev/null 2>&1; then
            break
        fi
        sleep 1
    done

    local psql="psql -p $ALIGNKIT_PG_PORT -v ON_ERROR_STOP=1 -tA"
    if [ "$(su postgres -c "$psql -c \"select 1 from pg_roles where rolname = '$ALIGNKIT_PG_USER'\"")" != "1" ]; then
        su postgres -c "$psql -c \"create role $ALIGNKIT_PG_USER login password '$ALIGNKIT_PG_PASSWORD'\"" >/dev/null
    fi
    if [ "$(su postgres -c "$psql -c \"select 1 from pg_database where datname = '$ALIGNKIT_PG_DB'\"")" != "1" ]; then
        su postgres -c "$psql -c \"create database $ALIGNKIT_PG_DB owner $ALIGNKIT_PG_USER\"" >/dev/null
    fi
)

if _alignkit_services; then
    export ALIGNKIT_TEST_PG_URL="postgresql+psycopg://${ALIGNKIT_PG_USER}:${ALIGNKIT_PG_PASSWORD}@127.0.0.1:${ALIGNKIT_PG_PORT}/${ALIGNKIT_PG_DB}"
    echo "export ALIGNKIT_TEST_PG_URL=${ALIGNKIT_TEST_PG_URL}"
else
    echo "services.sh: could not set up chromium/postgresql; browser and postgres tests will skip" >&2
fi
unset -f _alignkit_services
