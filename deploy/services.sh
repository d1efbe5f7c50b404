#!/usr/bin/env bash
# Starts and stops the carhook services (receiver, processor) in the background for `make up`.
# Usage: deploy/services.sh start|stop|status
# Pids in .stack/run/, logs in .stack/logs/. Configuration comes from the caller's CARHOOK__* environment,
# else from .stack/env (written by deploy/stack/stack.sh: the local stack with its development credentials).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
stack="${CARHOOK_STACK_DIR:-$root/.stack}"
run="$stack/run"; logs="$stack/logs"; bin="$root/target/release"
mkdir -p "$run" "$logs"

export CARHOOK__SMARTCAR__MANAGEMENT_TOKENS="${CARHOOK__SMARTCAR__MANAGEMENT_TOKENS:-carhook-dev-token-NOT-FOR-PRODUCTION}"
# The local stack's secured listeners and development credentials (SASL_SSL Kafka, TLS CQL as role
# carhook), unless the caller points at another cluster.
# shellcheck source=/dev/null
[[ -f "$stack/env" ]] && source "$stack/env"
receiver_admin="${CARHOOK__RECEIVER__ADMIN_LISTEN:-127.0.0.1:9090}"
admin_listen="${CARHOOK__PROCESSOR__ADMIN_LISTEN:-127.0.0.1:9091}"

alive() { local f="$run/$1.pid"; [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

wait_ready() { # name url deadline_s
  local name=$1 url=$2 deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! alive "$name"; then
      echo "error: $name exited during start-up; last lines of $logs/$name.log:" >&2
      tail -n 30 "$logs/$name.log" >&2 || true
      return 1
    fi
    if (( SECONDS > deadline )); then
      echo "error: $name not ready at $url after $3 s; see $logs/$name.log" >&2
      tail -n 30 "$logs/$name.log" >&2 || true
      return 1
    fi
    sleep 0.3
  done
}

start_one() { # name args...
  local name=$1; shift
  if alive "$name"; then echo "$name already running (pid $(cat "$run/$name.pid"))"; return; fi
  [[ -x "$bin/$name" ]] || { echo "error: $bin/$name missing; run 'cargo build --release' (make up does)" >&2; exit 1; }
  nohup "$bin/$name" "$@" >>"$logs/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
}

stop_one() {
  local name=$1 f="$run/$1.pid"
  [[ -f "$f" ]] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { echo "$name did not stop in 20 s; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

case "${1:-}" in
  start)
    start_one processor
    start_one receiver
    wait_ready processor "http://$admin_listen/ready" 120
    wait_ready receiver "http://$receiver_admin/ready" 60
    ;;
  stop)
    stop_one receiver
    stop_one processor
    ;;
  status)
    for n in receiver processor; do
      if alive "$n"; then echo "$n: running (pid $(cat "$run/$n.pid"))"; else echo "$n: stopped"; fi
    done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
