#!/usr/bin/env bash
# Runs every benchmark and writes BENCHMARKS.md: each figure with its value,
# a baseline measured in the same run, the ratio and the goal.
#   bash tests/scripts/bench.sh            # full (1000 VMs; about 6 minutes on 2 CPUs)
#   VMD_BENCH_VMS=100 VMD_BENCH_SECS=3 bash tests/scripts/bench.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v redis-server >/dev/null || { echo "run tests/scripts/test.sh once first (installs redis-server)"; exit 1; }
cargo build --release --workspace --bins --quiet
out=BENCHMARKS.md
tmp=$(mktemp)
errs=$(mktemp)
trap 'rm -f "$tmp" "$errs"' EXIT
{
    echo "# vmd benchmarks"
    echo
    echo "Written by \`bash tests/scripts/bench.sh\` on $(date -u +%Y-%m-%dT%H:%MZ)."
    echo
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, Linux $(uname -r); $(rustc --version)."
    echo
    for b in zbus callers shim vmd firstbyte console logstream provision; do
        echo "## $b"
        echo
        if ! cargo bench --quiet -p vmd-tests --bench "$b" 2>"$errs"; then
            echo "benchmark $b failed:" >&2
            tail -40 "$errs" >&2
            exit 1
        fi
        echo
    done
} > "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
