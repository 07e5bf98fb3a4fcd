#!/usr/bin/env bash
# vmd's main job on a fresh Debian 12 machine, unprivileged paths in a temp
# dir: a local Redis on a private socket, zinit (the real one if on PATH,
# else the test double), vmd, and a demo VM (a real cloud-hypervisor and
# guest if given, else the cloud-hypervisor double) that you can list,
# inspect, read the logs of and delete. Ctrl-C stops everything.
#
#   bash tests/scripts/demo.sh          # stays up for you to play with
#   bash tests/scripts/demo.sh --once   # runs through the demo, deletes, exits
#
# Real components: ZINIT=/path/to/zinit CH=/path/to/cloud-hypervisor
# KERNEL=/path/to/vmlinux [INITRD=/path/to/initramfs] (see shared/guest/).
set -euo pipefail
cd "$(dirname "$0")/../.."
once=0; [ "${1:-}" = "--once" ] && once=1

if ! command -v redis-server >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --workspace --bins --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
VMD=$bin/vmd
ZINIT=${ZINIT:-$(command -v zinit || echo "$bin/zinit-double")}
CH=${CH:-$(command -v cloud-hypervisor || true)}

work=$(mktemp -d /tmp/vmd-demo.XXXXXX)
pids=()
cleanup() {
    set +e
    trap - EXIT INT TERM
    # vmd first (it may be mid-call), then zinit with every service, then Redis.
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    pkill -KILL -f -- "--dir $work/" 2>/dev/null
    rm -rf "$work"
    exit 0
}
trap cleanup EXIT INT TERM

step() { echo; echo "\$ $*"; "$@" || true; }
ctl() { "$VMD" --broker "$broker" ctl "$@"; }

redis-server --port 0 --unixsocket "$work/redis.sock" --unixsocketperm 700 \
    --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids=($! "${pids[@]}")
for _ in $(seq 100); do [ -S "$work/redis.sock" ] && break; sleep 0.05; done
broker="unix://$work/redis.sock"

mkdir -p "$work/zinit"
"$ZINIT" -s "$work/zinit.sock" init -c "$work/zinit" --container >"$work/zinit.log" 2>&1 &
pids=($! "${pids[@]}")
for _ in $(seq 100); do [ -S "$work/zinit.sock" ] && break; sleep 0.05; done

if [ -n "$CH" ] && [ -n "${KERNEL:-}" ]; then
    kernel=$KERNEL; initrd=${INITRD:-}
    # The shared/guest kernel needs these on an emulated KVM.
    extra='"clearcpuid": "141,151,158,306,308,145,298,59,534", "noxsave": "", "nofsgsbase": "",'
    echo "using cloud-hypervisor $CH with kernel $kernel"
else
    CH=$bin/ch-double; kernel=$work/vmlinux; initrd=""; extra=""
    echo "not a kernel: the cloud-hypervisor double only opens it" > "$kernel"
    echo "using the cloud-hypervisor double (set CH and KERNEL for a real guest)"
fi
echo "using zinit $ZINIT"

"$VMD" --broker "$broker" --root "$work/root" --runtime-dir "$work/run" \
    --zinit-socket "$work/zinit.sock" --zinit-dir "$work/zinit" \
    --cloud-hypervisor "$CH" --grace-secs 10 2>"$work/vmd.log" &
pids=($! "${pids[@]}")
for _ in $(seq 100); do ctl --timeout 1 status >/dev/null 2>&1 && break; sleep 0.1; done

cat > "$work/demo.json" <<JSON
{
  "Name": "demo",
  "CPU": 1,
  "Memory": 268435456,
  "KernelImage": "$kernel",
  "InitrdImage": "$initrd",
  "KernelArgs": { $extra "gaction": "wait", "gtick": "2" }
}
JSON

step "$VMD" --broker "$broker" ctl run "$work/demo.json"
step "$VMD" --broker "$broker" ctl list
step "$VMD" --broker "$broker" ctl inspect demo
sleep 3
step "$VMD" --broker "$broker" ctl logs demo
step "$ZINIT" -s "$work/zinit.sock" list
step "$ZINIT" -s "$work/zinit.sock" log -s vm:demo
step "$VMD" --broker "$broker" ctl metrics

if [ "$once" = 1 ]; then
    step "$VMD" --broker "$broker" ctl delete demo
    step "$VMD" --broker "$broker" ctl list
    left=$(find "$work/run/vms" -mindepth 1 | wc -l)
    [ "$left" = 0 ] || { echo "demo: files left behind"; exit 1; }
    echo; echo "demo ok"
    exit 0
fi
echo
echo "vmd is serving zbus on $broker. Try, then Ctrl-C to stop everything:"
echo "  $VMD --broker $broker ctl list"
echo "  $VMD --broker $broker ctl inspect demo"
echo "  $VMD --broker $broker ctl logs demo -f"
echo "  $VMD --broker $broker ctl delete demo"
echo "  $ZINIT -s $work/zinit.sock list"
wait "${pids[0]}"
