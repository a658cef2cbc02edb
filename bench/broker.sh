#!/usr/bin/env bash
# Broker load figures, micro side by side with nats-server's WebSocket
# listener, driven by the same load tool (bench/brokerload). Loopback only,
# bounded: each run publishes for DURATION, about 20 runs in all (~3 min).
#
#   bash bench/broker.sh            # needs go and Debian's nats-server
#   DURATION=10s bash bench/broker.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
BASE=${BASE_PORT:-28000}   # ports BASE..BASE+40 on 127.0.0.1
command -v nats-server >/dev/null || { echo "nats-server not found: apt-get install nats-server" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

CGO_ENABLED=0 go build -o "$work/micro" .
go build -o "$work/brokerload" ./bench/brokerload

# wait_port HOST:PORT: until something listens there (10s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; exit 1
}

start_micro() { # name port [extra flags]
  local name=$1 port=$2; shift 2
  "$work/micro" sidecar --address="127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!); eval "${name}_pid=$!"
  wait_port "127.0.0.1:$port"
}

start_nats() { # name client_port ws_port [cluster_port route_port]
  local name=$1 cport=$2 wport=$3
  {
    echo "listen: 127.0.0.1:$cport"
    echo "websocket { listen: \"127.0.0.1:$wport\", no_tls: true }"
    if [ $# -ge 5 ]; then
      echo "cluster { name: bench, listen: \"127.0.0.1:$4\", routes: [\"nats-route://127.0.0.1:$5\"] }"
    fi
  } >"$work/$name.conf"
  nats-server -c "$work/$name.conf" >"$work/$name.log" 2>&1 &
  pids+=($!); eval "${name}_pid=$!"
  wait_port "127.0.0.1:$wport"
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

load() { "$work/brokerload" -duration="$DURATION" "$@"; }

M=127.0.0.1:$((BASE+1)); M2=127.0.0.1:$((BASE+2)); N=127.0.0.1:$((BASE+11)); N2=127.0.0.1:$((BASE+13))

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, $(go version | cut -d' ' -f3), $(nats-server --version), payload 128 B, $DURATION per run"
echo "## one server"
start_micro m1 $((BASE+1)) --registry=memory
start_nats n1 $((BASE+10)) $((BASE+11))
for rate in 200 1000 4000; do
  load -target=micro -pub=$M -sub=$M -subs=50 -rate=$rate -label="micro 1 sidecar"
  load -target=nats -pub=$N -sub=$N -subs=50 -rate=$rate -label="nats 1 server"
done
for rate in 200 1000; do
  load -target=micro -pub=$M -sub=$M -subs=1000 -rate=$rate -label="micro 1 sidecar"
  load -target=nats -pub=$N -sub=$N -subs=1000 -rate=$rate -label="nats 1 server"
done
stop "$m1_pid"; stop "$n1_pid"

echo "## two servers: publisher on the first, subscribers on the second"
start_micro ma $((BASE+1)) --registry=file --registry_address="$work/registry.json"
start_micro mb $((BASE+2)) --registry=file --registry_address="$work/registry.json"
start_nats na $((BASE+10)) $((BASE+11)) $((BASE+20)) $((BASE+21))
start_nats nb $((BASE+12)) $((BASE+13)) $((BASE+21)) $((BASE+20))
for rate in 200 1000 4000; do
  load -target=micro -pub=$M -sub=$M2 -subs=50 -rate=$rate -label="micro 2 sidecars"
  load -target=nats -pub=$N -sub=$N2 -subs=50 -rate=$rate -label="nats 2 servers"
done
load -target=micro -pub=$M -sub=$M2 -subs=1000 -rate=200 -label="micro 2 sidecars"
load -target=nats -pub=$N -sub=$N2 -subs=1000 -rate=200 -label="nats 2 servers"
stop "$ma_pid"; stop "$mb_pid"; stop "$na_pid"; stop "$nb_pid"

echo "## memory per idle subscriber (fresh servers, 5000 subscribers)"
start_micro m1 $((BASE+1)) --registry=memory
start_nats n1 $((BASE+10)) $((BASE+11))
load -target=micro -sub=$M -idle=5000 -pid="$m1_pid" -label="micro idle"
load -target=nats -sub=$N -idle=5000 -pid="$n1_pid" -label="nats idle"
