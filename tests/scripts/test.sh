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
if ((${#need_pkgs[@]})); then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# Debian starts a system Redis on install; the tests start their own on
# private sockets and never touch it.

cargo build --workspace --bins --quiet
cargo test --workspace "$@"
