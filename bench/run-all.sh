#!/usr/bin/env bash
# `make bench`: every scenario of issue 4 at its target size, one after another (each starts
# its own server on a fresh database), then one merged file bench/results/<date>.json.
# Takes about 4 minutes on the 2-core build machine. Loopback only; every run is bounded.
set -u
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y%m%dT%H%M%SZ)
dir=bench/results/run-$stamp
mkdir -p "$dir"
bench=./target/release/switchboard-bench
status=0
run() {
  local name=$1; shift
  echo "== $name: $*"
  if ! "$bench" "$@" --results-dir "$dir"; then
    echo "!! $name failed its correctness checks"
    status=1
  fi
}
run idle idle --sockets 19000 --hold 10
run fanout fanout --subscribers 10000 --rate 15 --duration 60
run chat chat --rooms 200 --members 10 --rate 500 --duration 30
run ai-stream ai-stream --streams 100 --rate 50 --subscribers 5 --duration 20
run reconnect reconnect --clients 1000 --events 500
echo "== persistence: 200000 appends through the persistence actor"
./target/release/examples/persistence_bench 200000 16384 | tee "$dir/persistence.out"
tail -n 1 "$dir/persistence.out" > "$dir/persistence-$stamp.json"
rm -f "$dir/persistence.out"
python3 - "$dir" "bench/results/$stamp.json" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
merged = {}
for name in sorted(os.listdir(src)):
    if name.endswith(".json"):
        with open(os.path.join(src, name)) as f:
            merged[name.split("-")[0]] = json.load(f)
with open(out, "w") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
print("results written to", out)
PY
rm -rf "$dir"
exit $status
