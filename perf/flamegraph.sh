#!/usr/bin/env bash
# Profiles the proxy under load and draws flamegraphs of where its CPU goes: xks-proxy
# on the quickstart's SoftHSM2 token (iv_source as given), driven by xks-loadtest at
# 64 keep-alive connections (Encrypt, 32-byte plaintext, 100-byte AAD), sampled by
# `perf record` with DWARF call graphs, folded and drawn by inferno.
#
# Usage: perf/flamegraph.sh [SECONDS] [IV_SOURCE]   (defaults: 5, hsm_random)
# Writes perf/flamegraph-<iv_source>.svg and perf/flamegraph-<iv_source>.folded (the
# folded stacks, for `inferno-diff-folded` against a later run). Needs `perf` (Debian:
# linux-perf) and permission to profile (perf_event_paranoid <= 1, or root).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_PROFILE="${1:-5}"
IV_SOURCE="${2:-hsm_random}"
TOOLS="perf/.tools"
if ! [ -x "$TOOLS/bin/inferno-flamegraph" ]; then
  cargo install --locked --root "$TOOLS" inferno
fi
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }

# WORK, a temporary directory; the proxy is stopped and WORK removed on exit.
. perf/lib.sh

./scripts/setup.sh
# Line tables let perf unwind and name inlined frames; the code is the release code.
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release -p xks-proxy -p xks-loadtest
PROXY=target/release/xks-proxy
LOAD=target/release/xks-loadtest

"$PROXY" quickstart --setup-only --dir "$WORK/q" --listen 127.0.0.1:18443 >/dev/null
pin_threads "$WORK/q/config.toml"
sed -i "s/^session_key_copies = true/session_key_copies = true\niv_source = \"$IV_SOURCE\"/" "$WORK/q/config.toml"
start_proxy "$WORK/q/config.toml" "$WORK/proxy.log" audit

LOAD_SECONDS=$((SECONDS_TO_PROFILE + 3))
"$LOAD" run --env "$WORK/q/test-client.env" --mix encrypt=1 --plaintext-bytes 32 \
  --aad-bytes 100 --connections 64 --duration "$LOAD_SECONDS" --warmup 1 -q \
  >"$WORK/load.txt" &
LOAD_PID=$!
sleep 1.5
perf record -F 499 -g --call-graph dwarf,32768 -p "$PROXY_PID" -o "$WORK/perf.data" \
  -- sleep "$SECONDS_TO_PROFILE" 2>/dev/null
wait "$LOAD_PID"

perf script -i "$WORK/perf.data" 2>/dev/null \
  | "$TOOLS/bin/inferno-collapse-perf" >"perf/flamegraph-$IV_SOURCE.folded"
"$TOOLS/bin/inferno-flamegraph" --title "xks-proxy on SoftHSM2, Encrypt, 64 connections, iv_source=$IV_SOURCE" \
  <"perf/flamegraph-$IV_SOURCE.folded" >"perf/flamegraph-$IV_SOURCE.svg"
grep -E "req/s" "$WORK/load.txt" || true
echo "wrote perf/flamegraph-$IV_SOURCE.svg"
