#!/usr/bin/env bash
# Stand up a Ray cluster on your own machines (or two nodes on one machine for testing), with token
# authentication set explicitly so every node and client agrees.
#
#   cluster/ray-cluster.sh head   [--ip IP] [--num-cpus N] [--num-gpus N]   start the head on this machine
#   cluster/ray-cluster.sh worker HEAD_IP [--ip IP] [--num-cpus N] [--num-gpus N]   join a head (port 6379)
#   cluster/ray-cluster.sh local  [--num-cpus N]   head + one extra node on this machine, both on 127.0.0.1
#   cluster/ray-cluster.sh env                     print the exports a client (ray job submit) needs
#   cluster/ray-cluster.sh stop                    stop the nodes this script started here, and wait until
#                                                  they have exited (other Ray instances keep running)
#
# Each node runs as `ray start --block` in a process group of its own, with its own --temp-dir under
# $RAY_CLUSTER_DIR (default /tmp/dcgan-ray-<GCS port>); its pid file there is what `stop` stops. (Two nodes on
# one machine sharing /tmp/ray would each forward the other's worker logs: every job line printed twice.)
# Ports: RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001), for a second cluster beside one.
#
# Authentication: RAY_AUTH_MODE defaults to "token" here. The token lives in $RAY_AUTH_TOKEN_PATH
# (default ~/.ray/auth_token) and is generated on the head if missing; copy that file to every worker
# machine and client (same path), or set RAY_AUTH_TOKEN. RAY_AUTH_MODE=disabled turns it off (trusted
# networks only: anyone who reaches the ports can run code).
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
STATE="${RAY_CLUSTER_DIR:-/tmp/dcgan-ray-$GCS_PORT}"
START_TIMEOUT_S="${RAY_START_TIMEOUT_S:-120}"
STOP_TIMEOUT_S="${RAY_STOP_TIMEOUT_S:-60}"

die() { echo "error: $*" >&2; exit 2; }
command -v ray >/dev/null || die "the 'ray' command is missing: pip install 'ray[default,train]==2.60.0'"

ensure_token() {
  [ "$RAY_AUTH_MODE" = token ] || return 0
  [ -n "${RAY_AUTH_TOKEN:-}" ] && return 0
  if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
    echo "generated a Ray auth token in $RAY_AUTH_TOKEN_PATH (copy it to worker machines and clients)"
  fi
}

require_token_present() {
  [ "$RAY_AUTH_MODE" = token ] || return 0
  [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "$RAY_AUTH_TOKEN_PATH" ] ||
    die "RAY_AUTH_MODE=token but no token: copy the head's $RAY_AUTH_TOKEN_PATH here or set RAY_AUTH_TOKEN"
}

print_env() {
  local ip="$1"
  echo "export RAY_ADDRESS=http://$ip:$DASHBOARD_PORT"
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  return 0
}

parse_node_opts() {  # sets IP NUM_CPUS NUM_GPUS from --ip/--num-cpus/--num-gpus
  IP="" NUM_CPUS="" NUM_GPUS=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --ip) IP="$2"; shift 2 ;;
      --num-cpus) NUM_CPUS="$2"; shift 2 ;;
      --num-gpus) NUM_GPUS="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
}

resource_args() {
  [ -n "$NUM_CPUS" ] && printf -- '--num-cpus=%s ' "$NUM_CPUS"
  [ -n "$NUM_GPUS" ] && printf -- '--num-gpus=%s ' "$NUM_GPUS"
  return 0
}

with_children() {  # the given pids and all their descendants (Ray's worker processes are the raylet's children)
  local pid
  for pid in "$@"; do
    echo "$pid"
    # shellcheck disable=SC2046
    with_children $(pgrep -P "$pid" 2>/dev/null || true)
  done
}

node_pids() {  # $1 = a node's name: its `ray start --block`, its process group, what runs in its temp dir, their children
  local pid_file="$STATE/$1.pid" pgid
  [ -f "$pid_file" ] || return 0
  pgid="$(cat "$pid_file")"
  # shellcheck disable=SC2046
  with_children $( { pgrep -g "$pgid" -f ray 2>/dev/null || true; pgrep -f -- "$STATE/$1/" 2>/dev/null || true; } | sort -u) | sort -u
}

run_node() {  # $1 = node name, then ray start's arguments: `ray start --block` in a session (process group) of its own
  local name="$1"; shift
  local dir="$STATE/$name"
  [ -z "$(node_pids "$name")" ] || die "a node '$name' started by this script still runs (pid file $STATE/$name.pid): cluster/ray-cluster.sh stop first"
  mkdir -p "$dir"
  rm -f "$dir/ray_current_cluster"
  setsid ray start "$@" --temp-dir="$dir" --block --disable-usage-stats >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
  local waited=0
  # `ray start` writes the cluster's address into its temp dir once the node is up.
  until [ -s "$dir/ray_current_cluster" ]; do
    if ! kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
      tail -n 20 "$STATE/$name.log" >&2
      die "Ray node '$name' did not start (log: $STATE/$name.log)"
    fi
    [ "$waited" -lt $((START_TIMEOUT_S * 2)) ] || die "Ray node '$name' did not come up in ${START_TIMEOUT_S} s (log: $STATE/$name.log)"
    sleep 0.5; waited=$((waited + 1))
  done
  echo "Ray node '$name' is up (pid $(cat "$STATE/$name.pid"), temp dir $dir, log $STATE/$name.log)"
}

stop_node() {  # $1 = node name: SIGTERM to its `ray start --block` (which stops its processes in order), wait
  local name="$1" pid_file="$STATE/$1.pid" pids waited=0
  pids="$(node_pids "$name")"
  if [ -n "$pids" ]; then
    kill -TERM "$(cat "$pid_file")" 2>/dev/null || kill -TERM $pids 2>/dev/null || true
    while [ -n "$(node_pids "$name")" ]; do
      if [ "$waited" -ge $((STOP_TIMEOUT_S * 2)) ]; then
        echo "Ray node '$name' still runs after ${STOP_TIMEOUT_S} s: SIGKILL" >&2
        # shellcheck disable=SC2046
        kill -KILL $(node_pids "$name") 2>/dev/null || true
        sleep 1; break
      fi
      sleep 0.5; waited=$((waited + 1))
    done
    echo "stopped Ray node '$name'"
  fi
  rm -f "$pid_file" "$STATE/$name/ray_current_cluster"  # no longer a cluster to join (launch/ray_address.py)
}

stop_nodes() {  # every node this script started here (workers first: a stopping node tells the head), then wait
  local pid_file names=()
  for pid_file in "$STATE"/*.pid; do
    [ -f "$pid_file" ] && names+=("$(basename "$pid_file" .pid)")
  done
  [ "${#names[@]}" -gt 0 ] || { echo "no Ray node started by this script in $STATE: nothing to stop"; return 0; }
  for name in "${names[@]}"; do
    [ "$name" = head ] || stop_node "$name"
  done
  [ -f "$STATE/head.pid" ] && stop_node head
  return 0
}

start_head() {  # $1 = node IP, $2 = dashboard host
  ensure_token
  # The head drains for up to 30 s on SIGTERM (Ray's default) although the whole cluster is going: not here.
  # shellcheck disable=SC2046
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}" run_node head --head --node-ip-address="$1" --port="$GCS_PORT" --dashboard-host="$2" \
    --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" --include-dashboard=true \
    $(resource_args)
}

start_worker() {  # $1 = head IP, $2 = node IP (may be empty), $3 = node name
  require_token_present
  local ip_arg=()
  [ -n "$2" ] && ip_arg=(--node-ip-address="$2")
  # shellcheck disable=SC2046
  run_node "$3" --address="$1:$GCS_PORT" "${ip_arg[@]}" $(resource_args)
}

cmd="${1:-}"; shift || true
case "$cmd" in
  head)
    parse_node_opts "$@"
    IP="${IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
    [ -n "$IP" ] || die "cannot tell this machine's IP: pass --ip"
    start_head "$IP" 0.0.0.0
    echo; echo "Head is up. On each worker machine: cluster/ray-cluster.sh worker $IP"
    echo "Clients (ray job submit) need:"; print_env "$IP"
    ;;
  worker)
    HEAD="${1:-}"; [ -n "$HEAD" ] || die "usage: cluster/ray-cluster.sh worker HEAD_IP [--ip IP] [--num-cpus N] [--num-gpus N]"
    shift
    parse_node_opts "$@"
    n=1; while [ -f "$STATE/worker$n.pid" ] && [ -n "$(node_pids "worker$n")" ]; do n=$((n + 1)); done
    start_worker "$HEAD" "$IP" "worker$n"
    ;;
  local)
    parse_node_opts "$@"
    NUM_CPUS="${NUM_CPUS:-1}"
    start_head 127.0.0.1 127.0.0.1
    # A second raylet on the same machine: a separate Ray node with its own resources.
    start_worker 127.0.0.1 127.0.0.1 worker1
    GCS_PORT="$GCS_PORT" python - <<'PY'
import os
import time
import ray
ray.init(address=f"127.0.0.1:{os.environ['GCS_PORT']}", logging_level="ERROR", log_to_driver=False)
for _ in range(60):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= 2:
        break
    time.sleep(1)
print(f"local Ray cluster: {len(nodes)} nodes, {ray.cluster_resources().get('CPU', 0):g} CPUs")
PY
    echo "Submit jobs after:"; print_env 127.0.0.1
    ;;
  env)
    print_env "${1:-127.0.0.1}"
    ;;
  stop)
    stop_nodes
    ;;
  *)
    sed -n '2,22p' "$0"; exit 2 ;;
esac
