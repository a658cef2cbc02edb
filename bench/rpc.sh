#!/usr/bin/env bash
# Benchmark of RPC and the proxy against the app called directly and nginx
# proxying to the same app, in one run with the same load tool, connections
# and duration. Loopback only; bounded in time (about 5 x ROUNDS x DURATION
# for wrk plus 4 x RATE_DURATION for the fixed-rate row).
#
# The load tools run on CPU 0; everything under test (app, sidecar, nginx)
# shares CPU 1 (taskset), so that the load tool does not steal from them.
# With ROUNDS above 1 the five saturation runs take turns ROUNDS times and
# each figure is the median of its rounds: on a shared machine a burst of
# other work then skews one round, not the ratio.
#
#   bench/rpc.sh                       # defaults below
#   DURATION=5s CONNS=32 bench/rpc.sh
#   ROUNDS=3 DURATION=5s bench/rpc.sh
#
# Needs: go, wrk, nginx (Debian's nginx-light), taskset (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
RATE=${RATE:-1000}
RATE_CONNS=${RATE_CONNS:-16}
RATE_DURATION=${RATE_DURATION:-10s}
ROUNDS=${ROUNDS:-1}
LOAD_CPU=${LOAD_CPU:-0}
TEST_CPU=${TEST_CPU:-1}

for tool in wrk nginx taskset; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install wrk nginx-light util-linux)"; exit 1; }
done

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

CGO_ENABLED=0 go build -trimpath -o "$tmp/micro" .
go build -o "$tmp/app" ./bench/app
go build -o "$tmp/loadgen" ./bench/loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench: nothing listens on port $1"; exit 1
}

APP_PORT=$(free_port); SC_PORT=$(free_port); NGINX_PORT=$(free_port); NGINX_XFF_PORT=$(free_port)

taskset -c "$TEST_CPU" "$tmp/app" -address "127.0.0.1:$APP_PORT" & pids+=($!)
wait_port "$APP_PORT"
taskset -c "$TEST_CPU" "$tmp/micro" sidecar --address="127.0.0.1:$SC_PORT" --registry=memory --log_level=warn & pids+=($!)
SC_PID=$!
wait_port "$SC_PORT"
curl -sf -d "{\"name\":\"go.micro.srv.bench\",\"nodes\":[{\"id\":\"bench-1\",\"address\":\"127.0.0.1:$APP_PORT\"}]}" \
  "http://127.0.0.1:$SC_PORT/registry" >/dev/null

mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  upstream app { server 127.0.0.1:$APP_PORT; keepalive 64; }
  # The forwarding fields the sidecar's proxy sets, so that nginx does the
  # same job and the app reads the same number of fields behind both.
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host \$http_host;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
  # The same with X-Forwarded-For alone, as this benchmark had it before.
  server {
    listen 127.0.0.1:$NGINX_XFF_PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
taskset -c "$TEST_CPU" nginx -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" 2>/dev/null & pids+=($!)
NGINX_PID=$!
wait_port "$NGINX_PORT"
NGINX_WORKER=$(pgrep -P "$NGINX_PID" | head -1)

ENVELOPE='{"jsonrpc":"2.0","id":1,"method":"Example.Call","params":[{"name":"John"}]}'
FORM='service=go.micro.srv.bench&method=Example.Call&request={"name":"John"}'
lua() { # method body content-type
  cat >"$tmp/$1.lua" <<EOF
wrk.method = "POST"
wrk.body = [[$2]]
wrk.headers["Content-Type"] = "$3"
EOF
  echo "$tmp/$1.lua"
}
JSON_LUA=$(lua json "$ENVELOPE" application/json)
FORM_LUA=$(lua form "$FORM" application/x-www-form-urlencoded)

# The same answer must come back through every hop before anything is timed.
for url in "http://127.0.0.1:$APP_PORT/" "http://127.0.0.1:$SC_PORT/proxy/go.micro.srv.bench/" "http://127.0.0.1:$NGINX_PORT/" "http://127.0.0.1:$NGINX_XFF_PORT/"; do
  curl -sf -H 'Content-Type: application/json' -d "$ENVELOPE" "$url" | grep -q 'Hello John' || { echo "bench: $url does not answer"; exit 1; }
done
curl -sf -d "$FORM" "http://127.0.0.1:$SC_PORT/rpc" | grep -q 'Hello John' || { echo "bench: /rpc does not answer"; exit 1; }

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)
secs() { awk -v d="$1" 'BEGIN{ if (d ~ /ms$/) print substr(d,1,length(d)-2)/1000; else if (d ~ /s$/) print substr(d,1,length(d)-1); else print d }'; }

declare -A RPS P50 P99 CPU RSS PERREQ # each a list, a value per round
ms() { awk -v d="$1" 'BEGIN{ if (d ~ /us$/) printf "%.3f", substr(d,1,length(d)-2)/1000; else if (d ~ /ms$/) printf "%.3f", substr(d,1,length(d)-2); else if (d ~ /s$/) printf "%.3f", 1000*substr(d,1,length(d)-1); else print d }'; }
median() { # of a list of numbers, with as many decimals as they have
  tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1; n=split($1, p, "."); if (n > 1 && length(p[2]) > d) d=length(p[2])}
    END{ m = NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.*f\n", d, m }'
}
run_wrk() { # name url script [pid of the hop, default the sidecar]
  local t0 t1 pid=${4:-$SC_PID} n out=$tmp/wrk-$1.txt
  t0=$(cpu_ticks "$pid")
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$3" "$2" >"$out"
  t1=$(cpu_ticks "$pid")
  n=$(awk '/requests in/{print $1}' "$out")
  PERREQ[$1]+=" $(awk -v a="$t0" -v b="$t1" -v t="$TCK" -v n="$n" 'BEGIN{printf "%.2f", 1e6*(b-a)/t/n}')"
  RPS[$1]+=" $(awk '/^Requests\/sec/{print $2}' "$out")"
  P50[$1]+=" $(ms "$(awk '$1=="50%"{print $2}' "$out")")"
  P99[$1]+=" $(ms "$(awk '$1=="99%"{print $2}' "$out")")"
  CPU[$1]+=" $(awk -v a="$t0" -v b="$t1" -v t="$TCK" -v d="$(secs "$DURATION")" 'BEGIN{printf "%.0f", 100*(b-a)/t/d}')"
  RSS[$1]+=" $(( $(rss_kb "$SC_PID") / 1024 ))"
  if grep -q "Non-2xx" "$out"; then echo "bench: $1 had errors:"; cat "$out"; fi
}

echo "# micro sidecar benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(go version | awk '{print $3}'), $(nginx -v 2>&1 | sed 's/.*\///')"
echo "# wrk -t1 -c$CONNS -d$DURATION on CPU $LOAD_CPU; app, sidecar and nginx on CPU $TEST_CPU; median of $ROUNDS round(s)"
for _ in $(seq "$ROUNDS"); do
  run_wrk direct "http://127.0.0.1:$APP_PORT/" "$JSON_LUA"
  run_wrk rpc "http://127.0.0.1:$SC_PORT/rpc" "$FORM_LUA"
  run_wrk proxy "http://127.0.0.1:$SC_PORT/proxy/go.micro.srv.bench/" "$JSON_LUA"
  run_wrk nginx "http://127.0.0.1:$NGINX_PORT/" "$JSON_LUA" "${NGINX_WORKER:-$NGINX_PID}"
  run_wrk nginx-xff "http://127.0.0.1:$NGINX_XFF_PORT/" "$JSON_LUA" "${NGINX_WORKER:-$NGINX_PID}"
done
ROWS="direct rpc proxy nginx nginx-xff"
declare -A MRPS
for k in $ROWS; do MRPS[$k]=$(median "${RPS[$k]}"); done

echo
echo "| path | requests/s | vs direct | vs nginx | p50 | p99 | sidecar CPU | sidecar RSS | CPU per request of the hop |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for k in $ROWS; do
  ratio=$(awk -v a="${MRPS[$k]}" -v b="${MRPS[direct]}" 'BEGIN{printf "%.2f", a/b}')
  vsng=$(awk -v a="${MRPS[$k]}" -v b="${MRPS[nginx]}" 'BEGIN{printf "%.2f", a/b}')
  cpu="$(median "${CPU[$k]}")%"; rss="$(median "${RSS[$k]}") MB"; per="$(median "${PERREQ[$k]}") us"
  [ "$k" = rpc ] || [ "$k" = proxy ] || { cpu="-"; rss="-"; }
  [ "$k" = direct ] && { vsng="-"; per="-"; }
  name=$k; [ "$k" = nginx-xff ] && name="nginx, X-Forwarded-For only"
  echo "| $name | ${MRPS[$k]} | $ratio | $vsng | $(median "${P50[$k]}") ms | $(median "${P99[$k]}") ms | $cpu | $rss | $per |"
done
if [ "$ROUNDS" -gt 1 ]; then
  echo
  echo "requests/s per round:"
  for k in $ROWS; do echo "  $k:${RPS[$k]}"; done
fi

echo
echo "# fixed rate: $RATE requests/s over $RATE_CONNS connections for $RATE_DURATION (bench/loadgen on CPU $LOAD_CPU)"
declare -A FP50 FP99 FOUT
run_rate() { # name url body content-type
  local out
  out=$(taskset -c "$LOAD_CPU" "$tmp/loadgen" -url "$2" -body "$3" -content_type "$4" -rate "$RATE" -conns "$RATE_CONNS" -duration "$RATE_DURATION")
  FOUT[$1]=$out
  FP50[$1]=$(sed -E 's/.* p50 ([0-9.]+)ms.*/\1/' <<<"$out")
  FP99[$1]=$(sed -E 's/.* p99 ([0-9.]+)ms.*/\1/' <<<"$out")
}
run_rate direct "http://127.0.0.1:$APP_PORT/" "$ENVELOPE" application/json
t0=$(cpu_ticks "$SC_PID")
run_rate rpc "http://127.0.0.1:$SC_PORT/rpc" "$FORM" application/x-www-form-urlencoded
RATE_RSS_RPC=$(( $(rss_kb "$SC_PID") / 1024 ))
run_rate proxy "http://127.0.0.1:$SC_PORT/proxy/go.micro.srv.bench/" "$ENVELOPE" application/json
t1=$(cpu_ticks "$SC_PID")
RATE_RSS_PROXY=$(( $(rss_kb "$SC_PID") / 1024 ))
run_rate nginx "http://127.0.0.1:$NGINX_PORT/" "$ENVELOPE" application/json
echo
echo "| path | p50 | p99 | p50 added by the hop | p99 added | |"
echo "| --- | ---: | ---: | ---: | ---: | --- |"
for k in direct rpc proxy nginx; do
  add50=$(awk -v a="${FP50[$k]}" -v b="${FP50[direct]}" 'BEGIN{printf "%.3f ms", a-b}')
  add99=$(awk -v a="${FP99[$k]}" -v b="${FP99[direct]}" 'BEGIN{printf "%.3f ms", a-b}')
  echo "| $k | ${FP50[$k]} ms | ${FP99[$k]} ms | $add50 | $add99 | ${FOUT[$k]%% p50*} |"
done
echo
echo "sidecar at $RATE requests/s: RSS ${RATE_RSS_RPC} MB after /rpc, ${RATE_RSS_PROXY} MB after the proxy, peak $(( $(hwm_kb "$SC_PID") / 1024 )) MB over the whole run; CPU $(awk -v a="$t0" -v b="$t1" -v t="$TCK" -v d="$(secs "$RATE_DURATION")" 'BEGIN{printf "%.0f%%", 100*(b-a)/t/(2*d)}') of one core"
