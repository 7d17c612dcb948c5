#!/usr/bin/env bash
# `make cluster`: three local Switchboard nodes on one PostgreSQL database and one Redis, so a
# user can try cluster mode on one machine. Ctrl-C stops the three nodes (only them).
#
# Settings (environment):
#   CLUSTER_DATABASE   database URL (default: postgres://<role>@127.0.0.1:5432/switchboard_cluster
#                      on the local PostgreSQL, created if missing)
#   CLUSTER_BROKER     broker URL (default: redis://127.0.0.1:6379, the local Redis)
#   CLUSTER_HOST       address the nodes bind (127.0.0.1)
#   CLUSTER_PORTS      the nodes' ports ("6001 6002 6003")
#   CLUSTER_DIR        where node logs go (data/cluster)
#   SWITCHBOARD_BIN    the server binary (./target/release/switchboard)
#   SWITCHBOARD_BOOTSTRAP_APP  the workspace every node makes sure exists, id:key:secret
#                      (1000:demo-app-key:demo-app-secret-change-me)
# Other SWITCHBOARD_* settings (docs/cluster.md) pass through to every node.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/services.sh
source scripts/services.sh

BIN=${SWITCHBOARD_BIN:-./target/release/switchboard}
HOST=${CLUSTER_HOST:-127.0.0.1}
read -r -a PORTS <<<"${CLUSTER_PORTS:-6001 6002 6003}"
DIR=${CLUSTER_DIR:-data/cluster}
export SWITCHBOARD_BOOTSTRAP_APP=${SWITCHBOARD_BOOTSTRAP_APP:-1000:demo-app-key:demo-app-secret-change-me}
IFS=: read -r APP_ID APP_KEY _ <<<"$SWITCHBOARD_BOOTSTRAP_APP"
READY_TIMEOUT=${CLUSTER_READY_TIMEOUT:-60}

[ -x "$BIN" ] || { echo "cluster: $BIN is missing: run make cluster (it builds it)" >&2; exit 1; }
command -v curl >/dev/null 2>&1 || { echo "cluster: curl is needed to check the nodes' health" >&2; exit 1; }

if [ -n "${CLUSTER_DATABASE:-}" ]; then
    DATABASE=$CLUSTER_DATABASE
else
    ensure_postgres
    if [ "$(pg_admin "select count(*) from pg_database where datname = 'switchboard_cluster'")" != 1 ]; then
        echo "cluster: creating database switchboard_cluster" >&2
        pg_admin 'CREATE DATABASE switchboard_cluster' || svc_die "cannot create database switchboard_cluster"
    fi
    DATABASE="$PG_BASE/switchboard_cluster"
fi
if [ -n "${CLUSTER_BROKER:-}" ]; then
    BROKER=$CLUSTER_BROKER
else
    ensure_redis
    BROKER=$REDIS_URL
fi

mkdir -p "$DIR"
PIDS=()

# Stops the nodes this script started, by pid: SIGTERM (sockets close with 4200, writes are
# flushed), SIGKILL after 15 s.
stop_nodes() {
    trap - EXIT INT TERM
    [ ${#PIDS[@]} -eq 0 ] && return 0
    echo >&2
    echo "cluster: stopping nodes (pids ${PIDS[*]})" >&2
    local pid deadline=$((SECONDS + 15))
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster: node $pid did not stop in time; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    echo "cluster: stopped" >&2
}
trap 'stop_nodes' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until node $1 (pid $2) answers /readyz.
wait_ready() {
    local i=$1 pid=$2 port=${PORTS[$1 - 1]} deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fs -o /dev/null "http://127.0.0.1:$port/readyz"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "cluster: node $i exited while starting; the end of $DIR/node$i.log:" >&2
            tail -n 20 "$DIR/node$i.log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster: node $i not ready on port $port within ${READY_TIMEOUT}s; see $DIR/node$i.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

echo "cluster: database $DATABASE" >&2
echo "cluster: broker   $BROKER" >&2
for i in "${!PORTS[@]}"; do
    n=$((i + 1))
    port=${PORTS[$i]}
    if curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz"; then
        echo "cluster: something already serves port $port (an earlier make cluster or make run?)" >&2
        exit 1
    fi
    demo=()
    # Node 1 also makes the demo members (alice, bob, helper) so the examples below work.
    [ "$n" = 1 ] && demo=(--demo)
    # One after the other: the first migrates the database.
    "$BIN" serve --database "$DATABASE" --broker "$BROKER" --bind "$HOST:$port" "${demo[@]}" \
        >"$DIR/node$n.log" 2>&1 </dev/null &
    pid=$!
    PIDS+=("$pid")
    wait_ready "$n" "$pid"
    echo "cluster: node $n ready on port $port (pid $pid, log $DIR/node$n.log)" >&2
done

token() {
    "$BIN" admin token --database "$DATABASE" --workspace "$APP_ID" --entity "$1" 2>/dev/null
}
ALICE=$(token alice) || ALICE='<token: switchboard admin token --workspace '"$APP_ID"' --entity alice>'
BOB=$(token bob) || BOB='<token: switchboard admin token --workspace '"$APP_ID"' --entity bob>'
N1="http://127.0.0.1:${PORTS[0]}"
N2="127.0.0.1:${PORTS[1]}"

cat <<EOF

=== Switchboard cluster: ${#PORTS[@]} nodes, one database, one broker ===
database:  $DATABASE
broker:    $BROKER
workspace: id $APP_ID, key $APP_KEY (members alice, bob, helper)
EOF
for i in "${!PORTS[@]}"; do
    echo "node $((i + 1)):    http://127.0.0.1:${PORTS[$i]}   health: /healthz (alive)  /readyz (database reachable)   log: $DIR/node$((i + 1)).log"
done
cat <<EOF

export ALICE=$ALICE
export BOB=$BOB

# bob reads his realtime stream on node 2 (replays from the start, then live):
websocat "ws://$N2/api/realtime/ws?after_cursor=0" -H "Authorization: Bearer \$BOB"
#   or: npx wscat -c "ws://$N2/api/realtime/ws?after_cursor=0" -H "Authorization: Bearer \$BOB"

# alice opens a direct channel with bob and posts on node 1; bob's socket on node 2 gets it:
CH=\$(curl -s -X POST $N1/api/direct-channels -H "Authorization: Bearer \$ALICE" -H 'Content-Type: application/json' -d '{"entity_id":"bob"}' | sed 's/.*"id":"\\(chn_[a-z0-9]*\\)".*/\\1/')
curl -s -X POST $N1/api/channels/\$CH/messages -H "Authorization: Bearer \$ALICE" -H 'Content-Type: application/json' -d '{"data":"hello from node 1"}'

# a node's health, as a load balancer checks it:
curl -s $N1/healthz; curl -s $N1/readyz
=== Ctrl-C stops the ${#PORTS[@]} nodes ===
EOF

# Until Ctrl-C, or until a node dies (then the others are stopped too).
while true; do
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            echo "cluster: node $((i + 1)) (pid ${PIDS[$i]}) exited; the end of its log:" >&2
            tail -n 20 "$DIR/node$((i + 1)).log" >&2
            exit 1
        fi
    done
    sleep 1
done
