#!/usr/bin/env bash
# Soak: three sidecars with apps under mixed load for a bounded time
# (default 3 minutes, capped at 30) while apps and sidecars are killed and
# restarted; loopback only. Prints PASS or FAIL with the figures.
# Usage: bench/soak.sh [duration]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
CGO_ENABLED=0 go build -o "$out/micro" .
go run ./bench/soak -micro="$out/micro" -duration="${1:-3m}"
