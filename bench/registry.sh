#!/usr/bin/env bash
# Registry figures for the README: binary size, idle RSS, and lookup
# throughput through GET /registry?service= against a minimal Go HTTP server
# answering the same JSON (the baseline), both driven by wrk in the same run.
# Loopback only, bounded: two 5-second runs. The load tool is pinned to CPU 0
# and the servers to CPU 1 when there are two CPUs.
# Usage: bench/registry.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)"; exit 1; }
out=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"' EXIT

CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$out/micro" .
go build -o "$out/hello" ./bench/hello
echo "binary: $(stat -c %s "$out/micro") bytes stripped, static: $(file -b "$out/micro" | grep -o 'statically linked' || echo no)"

pin_load="" pin_srv=""
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then pin_load="taskset -c 0"; pin_srv="taskset -c 1"; fi

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not up: $1"; exit 1; }

mp=$(port); hp=$(port)
$pin_srv "$out/micro" sidecar --address=127.0.0.1:$mp --registry=memory --server_name=foo --server_address=127.0.0.1:9090 2>"$out/micro.log" &
pids+=($!); micro_pid=$!
$pin_srv "$out/hello" --address=127.0.0.1:$hp &
pids+=($!)
wait_up "http://127.0.0.1:$mp/registry?service=foo"
wait_up "http://127.0.0.1:$hp/"
sleep 1
echo "idle RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$micro_pid/status)"

rps() { $pin_load wrk -t1 -c16 -d"${secs}s" --latency "$1" | tee "$out/wrk.txt" | awk '/Requests\/sec/ {print $2}'; }
base=$(rps "http://127.0.0.1:$hp/registry?service=foo"); base_lat=$(awk '/ 50%/ {print $2}' "$out/wrk.txt")
side=$(rps "http://127.0.0.1:$mp/registry?service=foo"); side_lat=$(awk '/ 50%/ {print $2}' "$out/wrk.txt")
echo "baseline (minimal Go server): $base req/s, p50 $base_lat"
echo "sidecar lookup:               $side req/s, p50 $side_lat"
awk -v s="$side" -v b="$base" 'BEGIN {printf "ratio sidecar/baseline: %.2f\n", s/b}'
echo "RSS after load: $(awk '/VmRSS/ {print $2, $3}' /proc/$micro_pid/status)"
