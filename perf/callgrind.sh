#!/usr/bin/env bash
# Instructions per request on the proxy's hot path, counted by callgrind: deterministic
# numbers for spotting regressions without timing noise. See perf/callgrind.md.
#
# Usage: perf/callgrind.sh [scenario ...]     (default: every scenario)
#   N=10000   iterations of the shorter measured run (the longer one runs 2N)
#   KEEP=dir  keep the callgrind.out files in dir (default: a temporary folder)
#
# Each scenario of benches/instructions.rs runs three times under callgrind, with 0, N
# and 2N iterations after the same setup and warm-up. The N and 2N runs count only
# inside the measured loop (the function `measured`, with --toggle-collect); the 0 run
# counts the whole process:
#   Ir/iteration = (Ir(2N) - Ir(N)) / N   (constant costs cancel out)
#   check        =  Ir(N) / N             (should agree: a second estimate)
#   setup        =  whole-process Ir(0)   (the control: setup + warm-up, no measured loop)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-10000}
ALL="service-encrypt service-encrypt-logged service-decrypt service-control handler-encrypt handler-decrypt
sigv4-cached sigv4-uncached route-hit route-404 route-405 aes-gcm-seal"
if [ $# -gt 0 ]; then scenarios="$*"; else scenarios=$ALL; fi

if ! command -v valgrind >/dev/null; then
    echo "valgrind is not installed (Debian: apt-get install valgrind)" >&2
    exit 1
fi

# The bench profile (release settings), exactly as `cargo bench` builds it.
bin=$(cargo bench --bench instructions --no-run --message-format=json-render-diagnostics |
    sed -n 's/.*"executable":"\([^"]*\/instructions-[^"]*\)".*/\1/p' | tail -n 1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "could not find the instructions bench binary" >&2
    exit 1
fi

out=${KEEP:-$(mktemp -d)}
mkdir -p "$out"

# Instructions (Ir) of one callgrind run of `scenario iterations [callgrind options]`.
count() {
    local file="$out/$1.$2.out"
    valgrind --tool=callgrind --callgrind-out-file="$file" "${@:3}" "$bin" "$1" "$2" \
        2>"$file.log" || {
        echo "callgrind run of $1 $2 failed:" >&2
        cat "$file.log" >&2
        exit 1
    }
    sed -n 's/^summary: \([0-9]*\)$/\1/p' "$file"
}

echo "# xks-proxy instructions per iteration (callgrind Ir), N=$N"
echo "# commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (working tree dirty)')," \
    "$(rustc --version), $(valgrind --version), $(uname -m)"
printf '%-22s %14s %14s %16s\n' scenario "Ir/iteration" "check" "setup+warm-up"
measured=(--collect-atstart=no "--toggle-collect=instructions::measured*")
declare -A per
for scenario in $scenarios; do
    i0=$(count "$scenario" 0)
    i1=$(count "$scenario" "$N" "${measured[@]}")
    i2=$(count "$scenario" $((2 * N)) "${measured[@]}")
    per[$scenario]=$(((i2 - i1) / N))
    printf '%-22s %14d %14d %16d\n' "$scenario" "${per[$scenario]}" $((i1 / N)) "$i0"
done

# xks-proxy's own share of a request over HTTP, without hyper's HTTP/1.1 framing
# (client and server) that the control measures.
for operation in encrypt decrypt; do
    if [ -n "${per[service-$operation]:-}" ] && [ -n "${per[service-control]:-}" ]; then
        printf '%-22s %14d   (service-%s minus service-control)\n' "proxy-$operation" \
            $((per[service-$operation] - per[service-control])) "$operation"
    fi
done
[ -n "${KEEP:-}" ] || rm -rf "$out"
