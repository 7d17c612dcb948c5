#!/usr/bin/env bash
# Runs a command (the test suite) with a PostgreSQL and a Redis on loopback:
#
#   scripts/test-services.sh cargo test --workspace
#   scripts/test-services.sh --ensure    # only make sure the services run (make services)
#
# Installs them from Debian's packages when missing, starts them when stopped, waits until
# they answer, creates a throwaway database `switchboard_test_<unix time>_<pid>` for this run
# and exports
#
#   SWITCHBOARD_TEST_POSTGRES=postgres://<role>@127.0.0.1:5432/switchboard_test_<time>_<pid>
#   SWITCHBOARD_TEST_REDIS=redis://127.0.0.1:6379
#
# Tests make their own databases named `<that database>_<random>` (integration/src/pg_server.rs).
# Afterwards — on success, failure or Ctrl-C — it drops the run's database and all of those,
# and exits with the command's exit code. It also drops what runs killed before they could
# clean up left behind (older than an hour, their process gone). If a service cannot be had,
# it fails and says why: the tests never skip.
set -uo pipefail

# shellcheck source=scripts/services.sh
source "$(dirname "$0")/services.sh"

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...] | --ensure" >&2
    exit 2
fi

ensure_postgres
ensure_redis

if [ "$1" = --ensure ]; then
    svc_log "PostgreSQL ${PG_BASE##*@} and Redis $REDIS_URL answer"
    exit 0
fi

# Databases of earlier runs that were killed before their cleanup (no trap runs on SIGKILL).
drop_stale_runs() {
    local name ts pid now
    now=$(date +%s)
    for name in $(pg_admin "select datname from pg_database where datname ~ '^switchboard_test_[0-9]+_[0-9]+'" |
        sed -E 's/^(switchboard_test_[0-9]+_[0-9]+).*/\1/' | sort -u); do
        ts=${name#switchboard_test_}
        pid=${ts#*_}
        ts=${ts%%_*}
        if [ $((now - ts)) -gt 3600 ] && ! kill -0 "$pid" 2>/dev/null; then
            svc_log "dropping databases left by an earlier run: $name*"
            pg_drop_tree "$name" || svc_log "could not drop all of $name*"
        fi
    done
}
drop_stale_runs

RUN_DB="switchboard_test_$(date +%s)_$$"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ! pg_drop_tree "$RUN_DB"; then
        svc_log "WARNING: could not drop every database named $RUN_DB*"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pg_admin "CREATE DATABASE \"$RUN_DB\"" || svc_die "cannot create database $RUN_DB on ${PG_BASE##*@}"

export SWITCHBOARD_TEST_POSTGRES="$PG_BASE/$RUN_DB"
export SWITCHBOARD_TEST_REDIS="$REDIS_URL"
svc_log "PostgreSQL $SWITCHBOARD_TEST_POSTGRES, Redis $SWITCHBOARD_TEST_REDIS"

"$@"
