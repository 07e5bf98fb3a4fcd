#!/usr/bin/env bash
# vmd's main job on a fresh Debian 12 machine, in a temp dir and unprivileged
# paths: a local Redis on a private unix socket and vmd serving zbus on it.
# Shows the operator client, then keeps vmd in the foreground until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v redis-server >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --workspace --bins --quiet
VMD=$PWD/target/release/vmd

work=$(mktemp -d /tmp/vmd-demo.XXXXXX)
cleanup() {
    set +e
    trap - EXIT INT TERM
    for pid in ${vmd_pid:-} ${redis_pid:-}; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    rm -rf "$work"
    exit 0
}
trap cleanup EXIT INT TERM

redis-server --port 0 --unixsocket "$work/redis.sock" --unixsocketperm 700 \
    --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do [ -S "$work/redis.sock" ] && break; sleep 0.05; done

broker="unix://$work/redis.sock"
"$VMD" --broker "$broker" --root "$work/root" --runtime-dir "$work/run" \
    --zinit-socket "$work/zinit.sock" --zinit-dir "$work/zinit" &
vmd_pid=$!
for _ in $(seq 100); do "$VMD" --broker "$broker" ctl --timeout 1 status >/dev/null 2>&1 && break; sleep 0.1; done

show() { echo; echo "\$ vmd ctl $*"; "$VMD" --broker "$broker" ctl "$@" || true; }
show status
show list
show exists demo
show inspect demo
echo
echo "vmd is serving zbus on $broker (Ctrl-C stops it). Try:"
echo "  $VMD --broker $broker ctl status"
wait "$vmd_pid"
