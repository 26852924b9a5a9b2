#!/usr/bin/env bash
# Reproduces the headline numbers of perf/RESULTS.md on one machine: xks-proxy on a
# SoftHSM2 token and on the in-process software backend, driven by xks-loadtest on the
# same box (closed loop at 1/8/64 connections, open loop at KMS's default quota of
# 1800 req/s, a capacity search), and the raw HSM with `xks-loadtest hsm`, so that
# proxy overhead = end-to-end minus raw HSM. Then wrk replays one pre-signed Encrypt
# (`xks-loadtest presign`) at 64 connections: the setting of the issue's reference
# numbers (the AWS sample proxy and a bare hyper+rustls server, both driven by wrk),
# with a generator that spends far less of the two cores than xks-loadtest does.
# For the ceiling, wrk also drives the proxy's /livez and such a bare server
# (examples/bare.rs), so both references are measured at the same moment. First,
# `xks-loadtest stalls` measures how long the idle box stalls a sleeping thread by
# itself, and every xks-loadtest run reports the same during its window.
#
# Usage: perf/run.sh [SECONDS_PER_RUN]   (default 10)
# Writes perf/runs/<UTC time>/ (JSON reports and the console output, committed; HTML
# charts and the proxy's log, which .gitignore keeps out of git) and
# writes its summary to that folder's README.md (link it from perf/RESULTS.md when it
# changes a figure there). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN="${1:-10}"
# WORK, a temporary directory; the proxy is stopped and WORK removed on exit.
. perf/lib.sh

./scripts/setup.sh wrk
# A SoftHSM2 token, keys, credential, certificates and config (the quickstart's).
prepare_run ""
ENV="$WORK/q/test-client.env"

# The same credential and certificate in front of the software backend.
write_software_config "$WORK/q" "$WORK/software.toml"

# Every run: Encrypt, 32-byte plaintext, 100-byte AAD, HTTP/1.1 keep-alive.
COMMON=(--env "$ENV" --mix encrypt=1 --plaintext-bytes 32 --aad-bytes 100 -q)
COMMANDS="$OUT/commands.txt"
: >"$COMMANDS"
run() { # name, then xks-loadtest arguments
  local name="$1"
  shift
  echo "xks-loadtest $*" >>"$COMMANDS"
  local chart=(--chart "$OUT/$name.html")
  [ "$1" = hsm ] && chart=()
  "$LOAD" "$@" --report "$OUT/$name.json" "${chart[@]}" >"$OUT/$name.txt" 2>&1 ||
    echo "(xks-loadtest exited with $?)" >>"$OUT/$name.txt"
  echo "== $name"
  grep -E "^overall|requests in|^machine stalls" "$OUT/$name.txt" || true
}

wrk_run() { # name, connections, [path]: the pre-signed Encrypt, or a plain GET of path
  local args=(-t2 -c"$2" -d"${SECONDS_PER_RUN}s" --latency)
  # wrk does not measure the box's stalls; the meter runs beside it.
  "$LOAD" stalls --duration "$SECONDS_PER_RUN" >"$OUT/$1-stalls.txt" &
  local meter=$!
  if [ -n "${3:-}" ]; then
    echo "wrk ${args[*]} https://127.0.0.1:18443$3" >>"$COMMANDS"
    wrk "${args[@]}" "https://127.0.0.1:18443$3" >"$OUT/$1.txt" 2>&1 ||
      echo "(wrk exited with $?)" >>"$OUT/$1.txt"
  else
    "$LOAD" presign --env "$ENV" --plaintext-bytes 32 --aad-bytes 100 -o "$WORK/encrypt.lua" 2>/dev/null
    echo "xks-loadtest presign --plaintext-bytes 32 --aad-bytes 100 -o encrypt.lua; wrk ${args[*]} -s encrypt.lua https://127.0.0.1:18443" >>"$COMMANDS"
    wrk "${args[@]}" -s "$WORK/encrypt.lua" https://127.0.0.1:18443 >"$OUT/$1.txt" 2>&1 ||
      echo "(wrk exited with $?)" >>"$OUT/$1.txt"
  fi
  wait "$meter" || true
  cat "$OUT/$1-stalls.txt" >>"$OUT/$1.txt"
  rm -f "$OUT/$1-stalls.txt"
  echo "== $1"
  grep -E "Requests/sec|^ +99%|Non-2xx|Latency |^machine stalls" "$OUT/$1.txt" || true
}

# The box's own stalls with nothing of ours running: the floor under every tail below.
echo "xks-loadtest stalls --duration $SECONDS_PER_RUN" >>"$COMMANDS"
"$LOAD" stalls --duration "$SECONDS_PER_RUN" --report "$OUT/machine-idle.json" >"$OUT/machine-idle.txt"
echo "== machine-idle"
cat "$OUT/machine-idle.txt"

start_proxy "$WORK/q/config.toml" "$OUT/proxy-softhsm.log"
for c in 1 8 64; do
  run "softhsm-closed-$c" run "${COMMON[@]}" --connections "$c" --warmup 2 --duration "$SECONDS_PER_RUN"
done
run softhsm-open-1800 run "${COMMON[@]}" --rate 1800 --connections 64 --warmup 2 --duration "$SECONDS_PER_RUN"
run softhsm-search search "${COMMON[@]}" --connections 64 --slo-p99-ms 2 \
  --start 2000 --factor 1.4 --max 100000 --step-duration 5 --step-warmup 1
wrk_run softhsm-wrk-64 64
# The ceiling of this box at this moment: the same TLS and HTTP stack answering a fixed
# JSON (/livez: no signature, no body, no key, no audit line). The issue's 121k req/s
# for a bare hyper+rustls server is this number on a quieter day; compare ratios.
wrk_run ceiling-livez-wrk-64 64 /livez
stop_proxy

start_proxy "$WORK/software.toml" "$OUT/proxy-software.log"
for c in 1 64; do
  run "software-closed-$c" run "${COMMON[@]}" --connections "$c" --warmup 2 --duration "$SECONDS_PER_RUN"
done
run software-open-1800 run "${COMMON[@]}" --rate 1800 --connections 64 --warmup 2 --duration "$SECONDS_PER_RUN"
wrk_run software-wrk-64 64
stop_proxy

# The issue's other reference: hyper 1 + rustls answering a fixed JSON and nothing else
# (no routing, metrics, timers or logging), on the same port and certificate.
target/release/examples/bare "$WORK/q/server.pem" "$WORK/q/server-key.pem" 127.0.0.1:18443 2>/dev/null &
PROXY_PID=$!
sleep 1
wrk_run ceiling-bare-wrk-64 64 /
stop_proxy

run softhsm-raw hsm --config "$WORK/q/config.toml" --sessions 1,2,4 --duration "$SECONDS_PER_RUN"
# Like for like with the proxy, which works on session copies (session_key_copies).
run softhsm-raw-copy hsm --config "$WORK/q/config.toml" --sessions 1,2,4 --session-copy --duration "$SECONDS_PER_RUN"

# The summary: machine, versions, commands, results.
{
  echo
  echo "## Run $STAMP"
  echo
  echo "- machine: $(hostname), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -sr)"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src loadtest || echo ' (dirty)')"
  echo "- $(rustc --version); SoftHSM2 $(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null || echo '?')"
  echo "- command: \`perf/run.sh $SECONDS_PER_RUN\`; reports and charts in \`$OUT/\`"
  echo
  echo '```'
  for f in "$OUT"/*.txt; do
    [ "$(basename "$f")" = commands.txt ] && continue
    echo "== $(basename "$f" .txt)"
    grep -E "^overall|requests in|^machine stalls|^best|sessions:|highest|max rate|Requests/sec|^ +99%|Non-2xx|Latency " "$f" || true
  done
  echo '```'
  commands_section "$COMMANDS"
} | tee "$OUT/README.md"
