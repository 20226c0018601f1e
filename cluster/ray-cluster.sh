#!/usr/bin/env bash
# Stand up a Ray cluster on your own machines (or two nodes on one machine for testing), with token
# authentication set explicitly so every node and client agrees.
#
#   cluster/ray-cluster.sh head   [--ip IP] [--num-cpus N] [--num-gpus N]   start the head on this machine
#   cluster/ray-cluster.sh worker HEAD_IP [--ip IP] [--num-cpus N] [--num-gpus N]   join a head (port 6379)
#   cluster/ray-cluster.sh local  [--num-cpus N]   head + one extra node on this machine, both on 127.0.0.1
#   cluster/ray-cluster.sh env                     print the exports a client (ray job submit) needs
#   cluster/ray-cluster.sh stop                    stop every Ray process of this user on this machine
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

start_head() {  # $1 = node IP, $2 = dashboard host
  ensure_token
  # shellcheck disable=SC2046
  ray start --head --node-ip-address="$1" --port="$GCS_PORT" --dashboard-host="$2" \
    --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true --disable-usage-stats $(resource_args)
}

start_worker() {  # $1 = head IP, $2 = node IP (may be empty)
  require_token_present
  local ip_arg=()
  [ -n "$2" ] && ip_arg=(--node-ip-address="$2")
  # shellcheck disable=SC2046
  ray start --address="$1:$GCS_PORT" "${ip_arg[@]}" --disable-usage-stats $(resource_args)
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
    start_worker "$HEAD" "$IP"
    ;;
  local)
    parse_node_opts "$@"
    NUM_CPUS="${NUM_CPUS:-1}"
    start_head 127.0.0.1 127.0.0.1
    # A second raylet on the same machine: a separate Ray node with its own resources.
    start_worker 127.0.0.1 127.0.0.1
    python - <<'PY'
import time
import ray
ray.init(address="auto", logging_level="ERROR")
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
    ray stop --force
    ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
