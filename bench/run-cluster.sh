#!/usr/bin/env bash
# One node vs three nodes, measured in one run (issue 6): idle sockets held and fan-out
# deliveries/s. Every run is `switchboard-bench` starting its own nodes on loopback
# (`--cluster N`: one shared database, a redis-server of its own for N > 1) and stopping
# them (by their own pids) at the end; each run is also bounded by `timeout`.
#
#   bench/run-cluster.sh                 # defaults below
#   IDLE_SOCKETS=5000 BIG_SOCKETS=9000 SUBSCRIBERS=3000 DURATION=15 bench/run-cluster.sh
#   PG_SERVER=postgres://root@127.0.0.1:5432 bench/run-cluster.sh   # nodes on PostgreSQL
#
# Settings (environment):
#   IDLE_SOCKETS  idle sockets, on one node and then spread over three   (19000)
#   BIG_SOCKETS   idle sockets over three nodes only, more than one node's open files allow;
#                 0 skips it                                              (30000)
#   HOLD          seconds every idle socket is held                       (10)
#   SUBSCRIBERS   fanout subscribers                                      (10000)
#   RATE          fanout publishes/s                                      (15)
#   DURATION      fanout seconds of publishing                            (30)
#   FACE          chat or pusher                                          (chat)
#   NODES         nodes of the cluster runs                               (3)
#   DATABASE      --database for every run (default: SQLite, one file shared by the nodes)
#   PG_SERVER     postgres://ROLE[:PW]@127.0.0.1:PORT of a loopback PostgreSQL where ROLE may
#                 create databases: each run gets a fresh database there (created with psql,
#                 dropped after the run); overrides DATABASE
#   BROKER        --broker for the cluster runs (default: a redis-server the bench starts)
#   OUT           directory for the JSON files and summary                (bench/results/cluster-<UTC time>)
#   BENCH         the load generator                        (target/release/switchboard-bench)
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE_SOCKETS=${IDLE_SOCKETS:-19000}
BIG_SOCKETS=${BIG_SOCKETS:-30000}
HOLD=${HOLD:-10}
SUBSCRIBERS=${SUBSCRIBERS:-10000}
RATE=${RATE:-15}
DURATION=${DURATION:-30}
FACE=${FACE:-chat}
NODES=${NODES:-3}
BENCH=${BENCH:-target/release/switchboard-bench}
OUT=${OUT:-bench/results/cluster-$(date -u +%Y%m%dT%H%M%SZ)}

[ -x "$BENCH" ] || {
    echo "missing $BENCH: cargo build --release -p switchboard-integration --bin switchboard-bench" >&2
    exit 2
}
command -v jq >/dev/null || { echo "jq is needed for the summary (apt-get install jq)" >&2; exit 2; }
# The sockets of one bench process and of each node need open files (at most 20,000 here).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"

common=(--face "$FACE" --results-dir "$OUT")
[ -n "${DATABASE:-}" ] && [ -z "${PG_SERVER:-}" ] && common+=(--database "$DATABASE")
if [ -n "${PG_SERVER:-}" ]; then
    PG_SERVER=${PG_SERVER%/}
    case "$PG_SERVER" in
    postgres://*@127.* | postgres://*@localhost* | postgresql://*@127.* | postgresql://*@localhost*) ;;
    *) echo "PG_SERVER must be postgres://ROLE@127.0.0.1:PORT (loopback)" >&2; exit 2 ;;
    esac
    command -v psql >/dev/null || { echo "PG_SERVER needs psql" >&2; exit 2; }
fi
cluster=(--cluster "$NODES")
[ -n "${BROKER:-}" ] && cluster+=(--broker "$BROKER")

status=0
files=()
# run LABEL BOUND_SECS ARGS...: one bench run; its results file is remembered under LABEL.
run() {
    local label=$1 bound=$2
    shift 2
    local db=""
    if [ -n "${PG_SERVER:-}" ]; then
        db="switchboard_bench_$(date -u +%Y%m%d%H%M%S)_$$_${label//-/_}"
        PGCONNECT_TIMEOUT=10 psql -w -X -q "$PG_SERVER/postgres" -c "create database $db" ||
            { echo "!!! $label: cannot create database $db on PG_SERVER"; status=1; return; }
        set -- "$@" --database "$PG_SERVER/$db"
    fi
    echo
    echo "=== $label: switchboard-bench $*"
    local log="$OUT/$label.log"
    if timeout --kill-after=30 "$bound" "$BENCH" "$@" 2>&1 | tee "$log"; then :; else
        echo "!!! $label did not pass (exit ${PIPESTATUS[0]})"
        status=1
    fi
    if [ -n "$db" ]; then
        PGCONNECT_TIMEOUT=10 psql -w -X -q "$PG_SERVER/postgres" -c "drop database if exists $db" ||
            echo "warning: database $db on PG_SERVER was not dropped"
    fi
    local f
    f=$(sed -n 's/^results written to //p' "$log" | tail -n 1)
    [ -n "$f" ] && files+=("$label=$f")
}

idle_bound=$((HOLD + 420))
run idle-1 "$idle_bound" idle --cluster 1 --sockets "$IDLE_SOCKETS" --hold "$HOLD" "${common[@]}"
run "idle-$NODES" "$idle_bound" idle "${cluster[@]}" --sockets "$IDLE_SOCKETS" --hold "$HOLD" "${common[@]}"
if [ "$BIG_SOCKETS" -gt 0 ]; then
    run "idle-$NODES-big" "$idle_bound" idle "${cluster[@]}" --sockets "$BIG_SOCKETS" --hold "$HOLD" "${common[@]}"
fi
fan_timeout=$((DURATION + 240))
fan=(--subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --timeout "$fan_timeout")
run fanout-1 $((fan_timeout + 60)) fanout --cluster 1 "${fan[@]}" "${common[@]}"
run "fanout-$NODES" $((fan_timeout + 60)) fanout "${cluster[@]}" "${fan[@]}" "${common[@]}"

# Summary: one table per scenario, from the results files.
summary="$OUT/summary.md"
{
    echo "## One node vs $NODES nodes ($(date -u +%Y-%m-%dT%H:%MZ), face $FACE)"
    echo
    echo "| idle run | nodes | broker | database | sockets held / requested | all up in | server RSS total | KiB per socket | lost | result |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for entry in "${files[@]}"; do
        label=${entry%%=*} f=${entry#*=}
        [ "$(jq -r .scenario "$f")" = idle ] || continue
        jq -r --arg l "$label" '"| \($l) | \(.cluster.nodes) | \(.cluster.broker_kind) | \(.cluster.database_kind) | \(.hold.held) / \(.params.sockets) | \(.connect.secs * 100 | round / 100) s | \((.samples.server_after_hold.rss_kb // 0) / 1024 | round) MiB | \(.memory.server_rss_per_socket_kib // "n/a" | if type == "number" then (. * 10 | round / 10) else . end) | \(.hold.lost) | \(if .passed then "pass" else "FAIL" end) |"' "$f"
    done
    echo
    echo "| fanout run | nodes | subscribers | sustained deliveries/s (min 1 s) | mean | p99 ms | missing / dup | server CPU s | deliveries per CPU s | result |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for entry in "${files[@]}"; do
        label=${entry%%=*} f=${entry#*=}
        [ "$(jq -r .scenario "$f")" = fanout ] || continue
        jq -r --arg l "$label" '"| \($l) | \(.cluster.nodes) | \(.sockets.established) | \(.deliveries.sustained_min_per_sec // "n/a") | \(.deliveries.window_mean_per_sec // 0 | round) | \(.latency_send_to_receive.p99_ms) | \(.correctness.missing) / \(.correctness.duplicates) | \(.server.cpu_secs // "n/a" | if type == "number" then (. * 100 | round / 100) else . end) | \(.server.deliveries_per_cpu_sec // 0 | round) | \(if .passed then "pass" else "FAIL" end) |"' "$f"
    done
    echo
    echo "Per node (cluster runs):"
    echo
    for entry in "${files[@]}"; do
        label=${entry%%=*} f=${entry#*=}
        [ "$(jq -r .cluster.nodes "$f")" -gt 1 ] || continue
        jq -r --arg l "$label" '.nodes[] | "- \($l) node \(.node): " + (if .held != null then "\(.held) held, \(.rss_per_socket_kib // "n/a" | if type == "number" then (. * 10 | round / 10) else . end) KiB/socket" else "\(.sockets) sockets, \(.deliveries) deliveries, \(.missing) missing, CPU \(.cpu_secs // "n/a" | if type == "number" then (. * 100 | round / 100) else . end) s" + (if .publishes_here then " (publishes here)" else "" end) end)' "$f"
    done
    echo
    echo "Load: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end; generator on the same machine."
} >"$summary"
echo
cat "$summary"
echo
echo "results in $OUT"
exit "$status"
