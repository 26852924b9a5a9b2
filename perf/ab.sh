#!/usr/bin/env bash
# Interleaved A/B of proxy variants at 64 keep-alive connections on a SoftHSM2 token.
# On a shared box single runs move by 15-25 % (steps.md, "The target's ratios, with their spread"), so a change
# is only judged against runs of the other variants taken in between: every round runs
# each variant once, in an order that rotates from round to round, each time on a fresh
# proxy, driven by xks-loadtest (Encrypt, 32-byte plaintext, 100-byte AAD).
#
# Usage: [ROUNDS=n] [RATE=r] perf/ab.sh SECONDS_PER_RUN NAME=EXECUTABLE ...   (ROUNDS default 3)
#   RATE        optional: open loop at r req/s over the 64 connections (e.g. 1800, KMS's
#               default quota) instead of closed loop; the runs then show p99.9 where
#               they show p99 / mean in a closed loop
#   EXECUTABLE  an xks-proxy binary, or a wrapper script that execs one with "$@"
#               (another build, an LD_PRELOAD, an environment variable)
#   HOOK_NAME   optional: a shell command run once the variant's proxy listens, with
#               PID set to its process id (e.g. renice some of its threads)
#               (a hook that fails stops the script)
# Example: HOOK_sess='for t in /proc/$PID/task/*; do if [ "$(cat "$t/comm")" = \
#            pkcs11-session- ]; then renice -n -5 -p "${t##*/}"; fi; done'
#          perf/ab.sh 8 base=target/release/xks-proxy sess=target/release/xks-proxy
# Prints one line per run (req/s, p99, p99 / mean where mean = 64 / throughput by
# Little's law, max, the proxy's CPU per request) and the range of each variant; writes
# them to perf/runs/<UTC time>-ab/ and writes them to README.md there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
SECONDS_PER_RUN="$1"
shift
VARIANTS=("$@")
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-}"
if [ -n "$RATE" ]; then
  RATE_ARGS=(--rate "$RATE")
  SPREAD="p99.9"
else
  RATE_ARGS=()
  SPREAD="p99/mean"
fi
# WORK, a temporary directory; the proxy is stopped and WORK removed on exit.
. perf/lib.sh
prepare_run -ab
TICK=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

: >"$OUT/runs.txt"
for round in $(seq "$ROUNDS"); do
  for i in "${!VARIANTS[@]}"; do
    variant=${VARIANTS[$(((i + round) % ${#VARIANTS[@]}))]}
    name=${variant%%=*}
    PROXY=${variant#*=}
    start_proxy "$WORK/q/config.toml" "$OUT/proxy-$name.log"
    hook="HOOK_$name"
    if [ -n "${!hook:-}" ]; then
      PID=$PROXY_PID bash -c "${!hook}" >/dev/null
    fi
    before=$(cpu_ticks "$PROXY_PID")
    "$LOAD" run --env "$WORK/q/test-client.env" --mix encrypt=1 --plaintext-bytes 32 \
      --aad-bytes 100 --connections 64 --warmup 1 --duration "$SECONDS_PER_RUN" "${RATE_ARGS[@]}" -q \
      >"$WORK/run.txt"
    after=$(cpu_ticks "$PROXY_PID")
    stop_proxy
    awk -v round="$round" -v name="$name" -v ticks="$((after - before))" -v tick="$TICK" \
      -v open="$RATE" '
      / requests in / { requests = $1 }
      /^overall/ { rps = $4; p99 = $7; p999 = $8; max = $10 }
      END {
        if (open) { label = "p99.9"; spread = p999 } else { label = "p99/mean"; spread = p99 / (64000 / rps) }
        printf "round %d %-12s %8.0f req/s  p99 %6.3f ms  %s %5.2f  max %7.3f ms  cpu %5.1f us/req\n",
          round, name, rps, p99, label, spread, max, ticks * 1e6 / tick / requests
      }' "$WORK/run.txt" | tee -a "$OUT/runs.txt"
  done
done

{
  echo
  echo "## A/B $STAMP"
  echo
  echo "- machine: $(hostname), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -sr)"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src loadtest || echo ' (dirty)')"
  echo "- command: \`ROUNDS=$ROUNDS${RATE:+ RATE=$RATE} perf/ab.sh $SECONDS_PER_RUN ${VARIANTS[*]}\`"
  for variant in "${VARIANTS[@]}"; do
    hook="HOOK_${variant%%=*}"
    [ -n "${!hook:-}" ] && echo "- \`$hook='${!hook}'\`"
  done
  echo
  echo '```'
  cat "$OUT/runs.txt"
  echo
  awk '{ n = $3; r[n] = r[n] " " $4; p[n] = p[n] " " $7; q[n] = q[n] " " $10; m[n] = m[n] " " $12 }
    function range(list,   a, k, lo, hi) {
      split(list, a, " "); lo = hi = a[1]
      for (k in a) { if (a[k] + 0 < lo + 0) lo = a[k]; if (a[k] + 0 > hi + 0) hi = a[k] }
      return lo "-" hi
    }
    END { for (n in r) printf "%-12s req/s %s  p99 %s ms  %s %s  max %s ms\n",
      n, range(r[n]), range(p[n]), spread, range(q[n]), range(m[n]) }' spread="$SPREAD" "$OUT/runs.txt" | sort
  echo '```'
} | tee "$OUT/README.md"
