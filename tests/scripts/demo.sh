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
#
# As root (network namespaces), with the double, the demo VM is on a private
# network with a web console, as on a Zero-OS node: a namespace n-demo<pid>
# holding 10.20.2.1, the network-module double naming it, and the console at
# 10.20.2.1:20005 inside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
once=0; [ "${1:-}" = "--once" ] && once=1

if ! command -v redis-server >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if [ ! -d console/web/node_modules/@xterm/xterm ]; then
    if ! command -v npm >/dev/null; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
    fi
    # The web console's page: xterm.js, pinned by the lockfile.
    npm ci --prefix console/web --no-audit --no-fund --silent
fi
cargo build --release --workspace --bins --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
VMD=$bin/vmd
ZINIT=${ZINIT:-$(command -v zinit || echo "$bin/zinit-double")}
CH=${CH:-$(command -v cloud-hypervisor || true)}

work=$(mktemp -d /tmp/vmd-demo.XXXXXX)
pids=()
console_ns=""
cleanup() {
    set +e
    trap - EXIT INT TERM
    # vmd first (it may be mid-call), then zinit with every service, then Redis.
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    pkill -KILL -f -- "--dir $work/" 2>/dev/null
    [ -n "$console_ns" ] && ip netns del "$console_ns" 2>/dev/null
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

# The private network and its web console (root and the double only: a real
# cloud-hypervisor would need a real tap).
ifaces=""
netflags=(--network-module none)
action='"gaction": "wait", "gtick": "2"'
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && [ "$CH" = "$bin/ch-double" ]; then
    netid=demo$$; console_ns=n-$netid
    ip netns add "$console_ns"
    ip -n "$console_ns" link set lo up
    ip -n "$console_ns" addr add 10.20.2.1/24 dev lo
    "$bin/network-double" --broker "$broker" --net "$netid=10.20.2.0/24" 2>"$work/network.log" &
    pids=($! "${pids[@]}")
    # The tap the network module would have made, as vmd looks it up.
    mkdir -p "$work/sysnet/t-demo/statistics"
    echo 0x1002 > "$work/sysnet/t-demo/tun_flags"
    for f in rx_bytes rx_packets tx_bytes tx_packets; do echo 0 > "$work/sysnet/t-demo/statistics/$f"; done
    netflags=(--network-module network --netns-dir /var/run/netns --sys-net "$work/sysnet")
    ifaces='"Network": {"Ifaces": [{"Tap": "t-demo", "MAC": "de:ad:be:ef:00:05", "NetID": "'$netid'", "IPs": [{"IP": "10.20.2.5", "Mask": "255.255.255.0"}]}]},'
    action='"gaction": "shell"'
    echo "web console: namespace $console_ns (10.20.2.1), network-module double for $netid"
fi

# The demo's files are in $work (and where KERNEL is), not where a node keeps
# VM files (/mnt, /var/cache/modules/flistd): allow those.
allowed=(--allowed-path "$work")
[ -n "${KERNEL:-}" ] && allowed+=(--allowed-path "$(dirname "$(realpath "$KERNEL")")")
[ -n "${INITRD:-}" ] && allowed+=(--allowed-path "$(dirname "$(realpath "$INITRD")")")
"$VMD" --broker "$broker" --root "$work/root" --runtime-dir "$work/run" \
    --api-socket-dir "$work/api" --go-config-dir "$work/go-config" --provision-module none \
    --zinit-socket "$work/zinit.sock" --zinit-dir "$work/zinit" "${allowed[@]}" \
    --cloud-hypervisor "$CH" --grace-secs 10 "${netflags[@]}" 2>"$work/vmd.log" &
pids=($! "${pids[@]}")
for _ in $(seq 100); do ctl --timeout 1 status >/dev/null 2>&1 && break; sleep 0.1; done

cat > "$work/demo.json" <<JSON
{
  "Name": "demo",
  "CPU": 1,
  "Memory": 268435456,
  "KernelImage": "$kernel",
  "InitrdImage": "$initrd",
  $ifaces
  "KernelArgs": { $extra $action }
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
if [ -n "$console_ns" ]; then
    # The page, fetched from inside the namespace (nothing listens outside).
    page=$(ip netns exec "$console_ns" bash -c 'exec 3<>/dev/tcp/10.20.2.1/20005 &&
        printf "GET / HTTP/1.0\r\nHost: 10.20.2.1\r\n\r\n" >&3 && cat <&3' || true)
    case "$page" in
        *xterm.js*) echo; echo "web console: http://10.20.2.1:20005/ serves the terminal page" ;;
        *) echo "demo: the web console does not serve its page"; [ "$once" = 1 ] && exit 1 ;;
    esac
fi

if [ "$once" = 1 ]; then
    if [ -n "${KERNEL:-}" ]; then
        # `Run` answers once the VMM booted the guest; a real guest's
        # userspace (the shared guest: its ACPI handler) comes up to
        # minutes later on an emulated KVM. A delete before that can only
        # be forced at the grace: the guest cannot hear the power button.
        echo; echo "waiting for the guest to be up (GUEST-READY) before deleting it"
        for _ in $(seq 1800); do
            ctl logs demo 2>/dev/null | grep -q GUEST-READY && break
            sleep 0.5
        done
    fi
    t0=$(date +%s.%N)
    step "$VMD" --broker "$broker" ctl delete demo
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "(the delete took %.2f s)\n", b - a }'
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
echo "  $VMD ctl console demo --runtime-dir $work/run    # the serial console; Ctrl-] detaches"
if [ -n "$console_ns" ]; then
    echo
    echo "The web console is at http://10.20.2.1:20005/ inside namespace $console_ns."
    echo "Open it from this host's browser through a forward, for example:"
    echo "  socat TCP-LISTEN:8080,bind=127.0.0.1,fork,reuseaddr EXEC:'ip netns exec $console_ns socat STDIO TCP:10.20.2.1:20005'"
    echo "then http://127.0.0.1:8080/ (or: ip netns exec $console_ns chromium http://10.20.2.1:20005/)"
fi
wait "${pids[0]}"
