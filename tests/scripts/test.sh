#!/usr/bin/env bash
# Runs every test of vmd on a fresh Debian 12 machine: installs what the tests
# need, builds the workspace, runs the unit and integration tests.
#   bash tests/scripts/test.sh            # all tests
#   bash tests/scripts/test.sh -- NAME    # only tests matching NAME
set -euo pipefail
cd "$(dirname "$0")/../.."

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v mtype >/dev/null || need_pkgs+=(mtools)
# The web console: its page's npm packages, a real browser to test it in.
command -v npm >/dev/null || need_pkgs+=(npm)
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v ip >/dev/null || need_pkgs+=(iproute2)
# virtiofsd (virtio-fs tests) is built from crates.io; it needs these.
vfsd=$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")
if [ ! -x "$vfsd" ]; then
    for p in libcap-ng-dev libseccomp-dev pkg-config; do
        dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
    done
fi
if ((${#need_pkgs[@]})); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# The OpenMetrics endpoint is scraped by a real Prometheus and linted by
# its promtool; the package alone (its recommends are exporters and their
# services, which the tests do not need).
if ! command -v promtool >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing: prometheus"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# Debian starts a system Redis on install; the tests start their own on
# private sockets and never touch it.
if [ ! -x "$vfsd" ]; then
    echo "installing virtiofsd from crates.io"
    cargo install --locked --quiet virtiofsd --root "$HOME/.cargo"
    vfsd=$HOME/.cargo/bin/virtiofsd
fi
export VMD_TEST_VIRTIOFSD=$vfsd

# xterm.js for the web console's page, pinned by console/web/package-lock.json.
[ -d console/web/node_modules/@xterm/xterm ] ||
    npm ci --prefix console/web --no-audit --no-fund --silent
cargo build --workspace --bins --quiet
cargo test --workspace "$@"
# The double plays v53 above; the tests that run VMs again with it playing
# v39, what Zero-OS ships (VMD_TEST_CH_VERSION, see tests/src/vm.rs). Not
# with a real cloud-hypervisor (VMD_TEST_CH): that is one release already.
if [ $# -eq 0 ] && [ -z "${VMD_TEST_CH:-}" ]; then
    echo "== again with the double playing cloud-hypervisor v39"
    VMD_TEST_CH_VERSION=39 cargo test -p vmd-tests --test shim --test console --test vmd --test streams --test virtiofs --test events
fi
