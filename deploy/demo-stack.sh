#!/usr/bin/env bash
# The `make demo` topology kept up on fixed ports, with a steady trickle of
# load, so a local Prometheus + Grafana have something to watch
# (deploy/prometheus/prometheus.yml scrapes exactly these ports):
#
#   P/D   engine + router  127.0.0.1:BASE     (pegaflow serve --prefill --decode)
#         sim P / sim D    127.0.0.1:BASE+20 / BASE+21
#   DP2   router           127.0.0.1:BASE+10  (pegaflow serve --backend x2)
#         aggregated sims  127.0.0.1:BASE+30 / BASE+31
#
# BASE is 8080 by default. Ctrl-C (or SIGTERM) stops every process it
# started. deploy/deploy_test.go runs this script on a random BASE.
set -euo pipefail

usage() {
  cat <<EOF
usage: $0 [--port-base N] [--work-dir DIR] [--bin PATH] [--no-load]

  --port-base N   first port (default 8080; uses N, N+10, N+20, N+21, N+30, N+31)
  --work-dir DIR  logs, pid files (pids/<name>.pid), engine sockets (default build/demo-stack)
  --bin PATH      pegaflow binary (default bin/pegaflow)
  --no-load       start the processes only; no pegaflow bench loop
Load per round (both routers at once): LOAD_FLAGS, default
  '$DEFAULT_LOAD'
EOF
}

DEFAULT_LOAD="--num-prompts 8 --request-rate 4 --random-input-len 1000 --random-output-len 32"
base=8080
work=build/demo-stack
bin=bin/pegaflow
load=1
while [ $# -gt 0 ]; do
  case "$1" in
    --port-base) base="$2"; shift 2 ;;
    --work-dir) work="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --no-load) load=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "demo-stack: $bin is not executable (make build)" >&2; exit 2; }
command -v curl >/dev/null || { echo "demo-stack: curl is required" >&2; exit 2; }

pd=127.0.0.1:$base dp2=127.0.0.1:$((base + 10))
p=127.0.0.1:$((base + 20)) d=127.0.0.1:$((base + 21))
a1=127.0.0.1:$((base + 30)) a2=127.0.0.1:$((base + 31))
mkdir -p "$work/logs" "$work/pids"
rm -f "$work"/pids/*.pid "$work"/engine*.sock

# The same sim cost model and router health interval as `pegaflow demo`.
sim_flags=(--log-level warn --num-blocks 4096 --max-batch-tokens 2048
  --decode-us-per-step 8000 --prefill-us-per-token 40 --decode-us-per-token 100)
router_flags=(--health-interval 500ms --log-level warn)

children=() # servers, oldest first
benches=()  # the load round in progress
stop() {
  trap - EXIT INT TERM
  for b in "${benches[@]}"; do kill "$b" 2>/dev/null || true; done
  # Newest first: routers before the backends they call.
  for ((i = ${#children[@]} - 1; i >= 0; i--)); do kill "${children[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() { # name args...
  local name=$1; shift
  "$bin" "$@" >"$work/logs/$name.log" 2>&1 &
  children+=($!)
  echo $! >"$work/pids/$name.pid"
}

wait_health() { # name addr
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "http://$2/health" 2>/dev/null && return 0
    kill -0 "$(cat "$work/pids/$1.pid")" 2>/dev/null || { echo "demo-stack: $1 exited; see $work/logs/$1.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo-stack: $1 not healthy at http://$2/health after 30s; see $work/logs/$1.log" >&2
  exit 1
}

# The engine first: the P/D sims register with it. Its /health is 503 until
# the router has a healthy P and D, so wait for its socket instead. It has
# an SSD tier in the work dir, so the dashboard's SSD row has data.
start engine+router-pd serve --socket "$work/engine.sock" --http-addr "$pd" --pool-size 1GiB \
  --ssd-dir "$work/ssd" --ssd-size 256MiB \
  --prefill "http://$p" --decode "http://$d" "${router_flags[@]}"
for _ in $(seq 1 300); do [ -S "$work/engine.sock" ] && break; sleep 0.1; done
start sim-p sim --http-addr "$p" --engine-socket "$work/engine.sock" --instance-id p0 "${sim_flags[@]}"
start sim-d sim --http-addr "$d" --engine-socket "$work/engine.sock" --instance-id d0 "${sim_flags[@]}"
start sim-agg1 sim --http-addr "$a1" "${sim_flags[@]}"
start sim-agg2 sim --http-addr "$a2" "${sim_flags[@]}"
start router-dp2 serve --engine=false --http-addr "$dp2" \
  --backend "http://$a1" --backend "http://$a2" "${router_flags[@]}"
for s in "sim-p $p" "sim-d $d" "sim-agg1 $a1" "sim-agg2 $a2" "engine+router-pd $pd" "router-dp2 $dp2"; do
  wait_health $s # a router's /health is 200 once it can route
done
echo "demo-stack: ready: P/D router http://$pd, DP2 router http://$dp2 (logs in $work/logs)"

if [ "$load" = 0 ]; then
  wait
  exit 0
fi
read -r -a load_flags <<<"${LOAD_FLAGS:-$DEFAULT_LOAD}"
round=0
while :; do
  round=$((round + 1))
  # A failed round (a backend killed on purpose) must not end the stack.
  benches=()
  for target in "pd $pd" "dp2 $dp2"; do
    set -- $target
    "$bin" bench --base-url "http://$2" --seed "$round" --progress=false "${load_flags[@]}" >>"$work/logs/bench-$1.log" 2>&1 &
    benches+=($!)
  done
  for b in "${benches[@]}"; do wait "$b" || true; done
  sleep 1
done
