#!/usr/bin/env bash
# Several "hosts" on one Linux machine, for trying multi-host training without a cluster: one network namespace
# per host (their own addresses, ports and loopback), joined by a bridge, as root.
#
#   cluster/netns-testbed.sh up [PREFIX]       # hosts PREFIX-store 198.18.0.2, PREFIX-head .3, PREFIX-worker .4;
#                                              # this (root) namespace is 198.18.0.1 on the bridge
#   cluster/netns-testbed.sh addr HOST [PREFIX] # a host's address (store, head, worker)
#   cluster/netns-testbed.sh kill HOST [PREFIX] # SIGKILL every process on a host (a lost node)
#   cluster/netns-testbed.sh down [PREFIX]     # kill what runs in them, remove namespaces and bridge
#
# Run a command on a host with `ip netns exec PREFIX-head COMMAND`. Namespaces separate the network only: they
# share this machine's disk, so give each host its own directories (HOME, TMPDIR, Ray's --temp-dir) when you
# want to see that nothing passes through a shared disk. PREFIX defaults to "dcg". 198.18.0.0/15 is the range
# reserved for benchmarks (RFC 2544): nothing else on a network uses it.
set -euo pipefail

cmd=${1:-}
case "$cmd" in up|down) prefix=${2:-dcg} ;; *) prefix=${3:-dcg} ;; esac
HOSTS=(store head worker)

host_index() {
  case "$1" in store) echo 2 ;; head) echo 3 ;; worker) echo 4 ;; *) echo "unknown host '$1' (store, head, worker)" >&2; exit 2 ;; esac
}

kill_host() {  # every process in the namespace, then wait until they are gone
  local ns="$prefix-$1" pids
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -n "$pids" ] || return 0
  kill -9 $pids 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && return 0
    sleep 0.1
  done
}

case "$cmd" in
  up)
    bridge="$prefix-br"
    ip link add "$bridge" type bridge
    ip addr add 198.18.0.1/24 dev "$bridge"
    ip link set "$bridge" up
    for host in "${HOSTS[@]}"; do
      ns="$prefix-$host" i=$(host_index "$host")
      ip netns add "$ns"
      ip link add "$prefix-v$i" type veth peer name eth0 netns "$ns"
      ip link set "$prefix-v$i" master "$bridge" up
      ip netns exec "$ns" ip addr add "198.18.0.$i/24" dev eth0
      ip netns exec "$ns" ip link set eth0 up
      ip netns exec "$ns" ip link set lo up
    done
    echo "hosts: $(for h in "${HOSTS[@]}"; do printf '%s-%s=198.18.0.%s ' "$prefix" "$h" "$(host_index "$h")"; done)"
    ;;
  addr)
    echo "198.18.0.$(host_index "${2:?host}")"
    ;;
  kill)
    host_index "${2:?host}" >/dev/null
    kill_host "$2"
    ;;
  down)
    for host in "${HOSTS[@]}"; do
      kill_host "$host"
      ip netns delete "$prefix-$host" 2>/dev/null || true
    done
    ip link delete "$prefix-br" 2>/dev/null || true
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
