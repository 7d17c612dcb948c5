# shellcheck shell=bash
# The local PostgreSQL and Redis that `make test` and `make cluster` use: installed from the
# distribution's packages when missing, started when stopped, waited for until they answer.
# Sourced by scripts/test-services.sh and scripts/cluster.sh; it never skips: when a service
# cannot be had, it says why and exits non-zero.
#
# After `ensure_postgres`: PG_BASE is `postgres://<user>[:<password>]@127.0.0.1:<port>` (append
# `/<database>`), for a role that may create databases. After `ensure_redis`: REDIS_URL.
#
# Settings (environment):
#   SWITCHBOARD_PG_SERVER   use this server instead of the local one, as
#                           postgres://user[:password]@host:port (nothing is installed or started)
#   SWITCHBOARD_PG_PORT     local PostgreSQL port (5432)
#   SWITCHBOARD_PG_CLUSTER  the Debian cluster name to start when it is stopped (main)
#   SWITCHBOARD_PG_USER     try this role first (then the login user, then postgres)
#   SWITCHBOARD_REDIS_PORT  local Redis port (6379)
#   SWITCHBOARD_SERVICES_TIMEOUT  seconds to wait for a service to answer (60)

SERVICES_TIMEOUT=${SWITCHBOARD_SERVICES_TIMEOUT:-60}
PG_PORT=${SWITCHBOARD_PG_PORT:-5432}
PG_CLUSTER=${SWITCHBOARD_PG_CLUSTER:-main}
REDIS_PORT=${SWITCHBOARD_REDIS_PORT:-6379}
# A fallback role with a password, for a fresh install whose TCP logins need one.
PG_FALLBACK_ROLE=switchboard_test

svc_log() { echo "services: $*" >&2; }
svc_die() {
    echo "services: FAILED: $*" >&2
    echo "services: the tests need a real PostgreSQL and Redis on loopback; nothing was skipped." >&2
    exit 1
}

# Runs a command as root (directly, or with sudo -n when we are not root).
svc_as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        svc_die "needs root for: $* (run as root, or allow passwordless sudo)"
    fi
}

# Runs a command as the postgres OS user.
svc_as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        svc_as_root runuser -u postgres -- "$@"
    fi
}

# The newest installed PostgreSQL server's bin directory, or nothing.
svc_pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/postgres" ]; then
        echo "$d"
    elif command -v postgres >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v postgres)")"
    fi
}

# Installs what is missing from Debian's packages (apt-get).
svc_install_missing() {
    local want=()
    [ -n "$(svc_pg_bindir)" ] || want+=(postgresql)
    command -v psql >/dev/null 2>&1 || want+=(postgresql-client)
    command -v pg_isready >/dev/null 2>&1 || want+=(postgresql-client)
    command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || want+=(redis-tools)
    # libpq for the postgres driver the server links against.
    if command -v dpkg >/dev/null 2>&1 && ! dpkg -s libpq-dev >/dev/null 2>&1; then
        want+=(libpq-dev)
    fi
    [ ${#want[@]} -eq 0 ] && return 0
    local pkgs
    pkgs=$(printf '%s\n' "${want[@]}" | sort -u | tr '\n' ' ')
    command -v apt-get >/dev/null 2>&1 ||
        svc_die "missing: $pkgs and there is no apt-get here; install PostgreSQL and Redis yourself"
    svc_log "installing from Debian's packages: $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! svc_as_root apt-get install -y -q $pkgs >&2; then
        svc_log "apt-get install failed; updating the package lists and trying again"
        svc_as_root apt-get update -q >&2 || svc_die "apt-get update failed"
        # shellcheck disable=SC2086
        svc_as_root apt-get install -y -q $pkgs >&2 || svc_die "apt-get install $pkgs failed"
    fi
    [ -n "$(svc_pg_bindir)" ] || svc_die "PostgreSQL was installed but no postgres binary is found"
    command -v redis-server >/dev/null 2>&1 || svc_die "redis-server was installed but is not on PATH"
}

svc_pg_ready() {
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

# Waits until `$1` (a function) succeeds, at most SERVICES_TIMEOUT seconds.
svc_wait() {
    local check=$1 deadline=$((SECONDS + SERVICES_TIMEOUT))
    until "$check"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# Starts the local PostgreSQL cluster (Debian's pg_ctlcluster; creates it if none exists).
svc_pg_start() {
    local version
    command -v pg_ctlcluster >/dev/null 2>&1 ||
        svc_die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT and there is no pg_ctlcluster to start it"
    version=$(ls -d /etc/postgresql/*/"$PG_CLUSTER" 2>/dev/null | sort -V | tail -n 1)
    version=${version%/*}
    version=${version##*/}
    if [ -z "$version" ]; then
        version=$(basename "$(dirname "$(svc_pg_bindir)")")
        svc_log "creating PostgreSQL $version cluster '$PG_CLUSTER' on port $PG_PORT"
        svc_as_root pg_createcluster "$version" "$PG_CLUSTER" -p "$PG_PORT" >&2 ||
            svc_die "pg_createcluster $version $PG_CLUSTER failed"
    fi
    svc_log "starting PostgreSQL $version/$PG_CLUSTER"
    svc_as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start >&2 ||
        svc_log "pg_ctlcluster $version $PG_CLUSTER start failed (waiting anyway)"
    PG_LOG_HINT="/var/log/postgresql/postgresql-$version-$PG_CLUSTER.log"
}

# Can role `$1` (password `$2`, may be empty) log in over TCP and create databases?
svc_pg_try_role() {
    local url="postgres://$1${2:+:$2}@127.0.0.1:$PG_PORT/postgres"
    [ "$(PGCONNECT_TIMEOUT=5 psql -w -X -q -At "$url" \
        -c "select rolsuper or rolcreatedb from pg_roles where rolname = current_user" 2>/dev/null)" = t ]
}

# Picks a role that can create databases over TCP; sets PG_BASE.
svc_pg_pick_role() {
    local role
    for role in ${SWITCHBOARD_PG_USER:-} "$(id -un)" postgres; do
        if svc_pg_try_role "$role" ""; then
            PG_BASE="postgres://$role@127.0.0.1:$PG_PORT"
            return 0
        fi
    done
    # A fresh Debian install asks for a password on TCP: make a role that has one, through
    # the unix socket (peer auth as the postgres OS user).
    svc_log "no passwordless role can create databases on 127.0.0.1:$PG_PORT; creating role $PG_FALLBACK_ROLE"
    svc_as_postgres psql -X -q -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -c "
        DO \$\$ BEGIN
          IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_FALLBACK_ROLE') THEN
            CREATE ROLE $PG_FALLBACK_ROLE LOGIN CREATEDB PASSWORD '$PG_FALLBACK_ROLE';
          ELSE
            ALTER ROLE $PG_FALLBACK_ROLE LOGIN CREATEDB PASSWORD '$PG_FALLBACK_ROLE';
          END IF;
        END \$\$;" >&2 ||
        svc_die "could not create role $PG_FALLBACK_ROLE through the unix socket as the postgres user"
    svc_pg_try_role "$PG_FALLBACK_ROLE" "$PG_FALLBACK_ROLE" ||
        svc_die "role $PG_FALLBACK_ROLE cannot log in on 127.0.0.1:$PG_PORT with its password (check pg_hba.conf)"
    PG_BASE="postgres://$PG_FALLBACK_ROLE:$PG_FALLBACK_ROLE@127.0.0.1:$PG_PORT"
}

# Makes sure a PostgreSQL answers and we can create databases on it; sets PG_BASE.
ensure_postgres() {
    if [ -n "${SWITCHBOARD_PG_SERVER:-}" ]; then
        command -v psql >/dev/null 2>&1 || svc_install_missing
        PG_BASE=${SWITCHBOARD_PG_SERVER%/}
        [ "$(PGCONNECT_TIMEOUT=5 psql -w -X -q -At "$PG_BASE/postgres" -c 'select 1' 2>&1)" = 1 ] ||
            svc_die "SWITCHBOARD_PG_SERVER=$PG_BASE does not accept a connection to database postgres"
        return 0
    fi
    svc_install_missing
    PG_LOG_HINT=""
    if ! svc_pg_ready; then
        svc_pg_start
        svc_wait svc_pg_ready || svc_die "PostgreSQL did not answer on 127.0.0.1:$PG_PORT within ${SERVICES_TIMEOUT}s${PG_LOG_HINT:+; its log: $(tail -n 5 "$PG_LOG_HINT" 2>/dev/null)}"
    fi
    svc_pg_pick_role
}

svc_redis_ready() {
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

# Makes sure a Redis answers PING on loopback; sets REDIS_URL.
ensure_redis() {
    svc_install_missing
    # shellcheck disable=SC2034 # used by the scripts that source this
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    svc_redis_ready && return 0
    local dir=/var/lib/redis logdir=/var/log/redis logfile
    if [ "$(id -u)" != 0 ]; then
        dir=${TMPDIR:-/tmp}/switchboard-redis-$(id -u)
        logdir=$dir
    fi
    mkdir -p "$dir" "$logdir" || svc_die "cannot create $dir or $logdir for Redis"
    logfile=$logdir/ci.log
    [ "$REDIS_PORT" = 6379 ] || logfile=$logdir/ci-$REDIS_PORT.log
    svc_log "starting Redis on 127.0.0.1:$REDIS_PORT (no persistence)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir "$dir" --logfile "$logfile" >&2 ||
        svc_log "redis-server did not start (waiting anyway)"
    svc_wait svc_redis_ready ||
        svc_die "Redis did not answer PING on 127.0.0.1:$REDIS_PORT within ${SERVICES_TIMEOUT}s; its log: $(tail -n 5 "$logfile" 2>/dev/null)"
}

# Runs SQL on the server's maintenance database (postgres); prints rows unaligned.
pg_admin() {
    PGCONNECT_TIMEOUT=10 psql -w -X -q -At -v ON_ERROR_STOP=1 "$PG_BASE/postgres" -c "$1"
}

# Drops database `$1` and every database named `$1_…`, closing their connections.
pg_drop_tree() {
    local prefix=$1 db failed=0
    for db in $(pg_admin "select datname from pg_database
                          where datname = '$prefix' or left(datname, ${#prefix} + 1) = '${prefix}_'
                          order by length(datname) desc"); do
        pg_admin "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || failed=1
    done
    return $failed
}
