#!/usr/bin/env bash
# Services the test suite needs on a fresh Debian machine: headless Chromium for
# the feedback app's browser tests, and a PostgreSQL server for its storage
# tests. Idempotent; run as root.
#
# Meant to be sourced by .ci/run, so that the database URL reaches pytest:
#
#     source .ci/services.sh     # exports ALIGNKIT_TEST_PG_URL
#
# Executed directly it does the same and prints the export line to copy.
# The installation runs in a child bash with `set -euo pipefail` of its own: a
# failure there stops the installation, not the caller (whose tests then skip
# what needs the missing service, saying why).

ALIGNKIT_PG_USER=${ALIGNKIT_PG_USER:-alignkit_test}
ALIGNKIT_PG_PASSWORD=${ALIGNKIT_PG_PASSWORD:-alignkit_test}
ALIGNKIT_PG_DB=${ALIGNKIT_PG_DB:-alignkit_test}
ALIGNKIT_PG_PORT=${ALIGNKIT_PG_PORT:-5432}
export ALIGNKIT_PG_USER ALIGNKIT_PG_PASSWORD ALIGNKIT_PG_DB ALIGNKIT_PG_PORT

if [ "${ALIGNKIT_SERVICES_CHILD:-}" = "1" ]; then
    set -euo pipefail
    export DEBIAN_FRONTEND=noninteractive

    if ! command -v chromium >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium postgresql >/dev/null
    fi

    # The package's postinst normally creates a cluster; a trimmed image may not.
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
        pg_createcluster --port "$ALIGNKIT_PG_PORT" "$version" main >/dev/null
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        pg_ctlcluster "$version" main start
    fi

    as_postgres() { su postgres -c "psql -p $ALIGNKIT_PG_PORT -v ON_ERROR_STOP=1 -tA -c \"$1\""; }
    for _ in $(seq 1 30); do  # start can return a moment before it accepts connections
        as_postgres "select 1" >/dev/null 2>&1 && break
        sleep 1
    done
    if [ "$(as_postgres "select 1 from pg_roles where rolname = '$ALIGNKIT_PG_USER'")" != "1" ]; then
        as_postgres "create role $ALIGNKIT_PG_USER login password '$ALIGNKIT_PG_PASSWORD'" >/dev/null
    fi
    if [ "$(as_postgres "select 1 from pg_database where datname = '$ALIGNKIT_PG_DB'")" != "1" ]; then
        as_postgres "create database $ALIGNKIT_PG_DB owner $ALIGNKIT_PG_USER" >/dev/null
    fi
    exit 0
fi

if ALIGNKIT_SERVICES_CHILD=1 bash "${BASH_SOURCE[0]}"; then
    export ALIGNKIT_TEST_PG_URL="postgresql+psycopg://${ALIGNKIT_PG_USER}:${ALIGNKIT_PG_PASSWORD}@127.0.0.1:${ALIGNKIT_PG_PORT}/${ALIGNKIT_PG_DB}"
    echo "export ALIGNKIT_TEST_PG_URL=${ALIGNKIT_TEST_PG_URL}"
else
    echo "services.sh: setting up chromium/postgresql failed; browser and postgres tests will skip" >&2
fi
