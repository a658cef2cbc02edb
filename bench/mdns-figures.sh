#!/usr/bin/env bash
# Figures of the multicast registry, measured in a private network namespace
# (the test re-runs itself under unshare -n) with three sidecars:
# registration -> seen elsewhere, SIGTERM -> gone, SIGKILL -> gone, HTTP
# lookups; then the in-process lookup benchmark on a cache of 3000 nodes.
#   bench/mdns-figures.sh [trials] [ttl]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-20}
ttl=${2:-2s}
MICRO_MDNS_FIGURES=$trials MICRO_MDNS_FIGURES_TTL=$ttl \
  go test -count=1 -run '^TestMDNSFigures$' -v . | grep -o 'FIGURE.*' || { echo "figures run failed" >&2; exit 1; }
go test -count=1 -run '^$' -bench '^BenchmarkLookup$' -benchtime=3s . | grep -E '^Benchmark'
