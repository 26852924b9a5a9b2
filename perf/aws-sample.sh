#!/usr/bin/env bash
# xks-proxy against the AWS sample proxy (aws-samples/aws-kms-xks-proxy) and against
# a bare hyper+rustls server answering a fixed JSON (examples/bare.rs), on the same
# box, at the same time: the two references the issue states its throughput target
# against (the sample at 14.4k req/s, the bare server at 121k, measured on a quieter
# day; 50k is 3.5x the one and 0.41 of the other). Both proxies serve from the same
# SoftHSM2 token and are driven the same way: wrk replaying one pre-signed Encrypt
# (32-byte plaintext, 100-byte AAD) at 64 keep-alive connections. The three servers
# take turns for ROUNDS rounds, in a rotating order so that a drift of the box during
# the run favours none of them; each round gives the ratios xks/bare and xks/sample,
# and the summary their medians and ranges. Round 1 also measures xks-proxy's /livez.
# The bare server is measured twice in its turn: with GET / (the issue's reference,
# nothing to read) and with the same pre-signed Encrypt the proxies get ("bare-post":
# the same bytes through TLS, the kernel and wrk, answered with the fixed JSON). The
# summary also gives each bare/sample ratio, to compare with the issue's 121k/14.4k.
# Beside every wrk run, `xks-loadtest stalls` records the box's own stalls and the CPU
# time the hypervisor took; each round says the largest such share among its runs, and
# the summary also gives the medians of the rounds in which no run lost more than 1 %.
#
# Usage: [ROUNDS=n] perf/aws-sample.sh [SECONDS_PER_RUN]   (defaults 2 and 10)
#        MODE=kms [KMS_RATE=r] perf/aws-sample.sh [SECONDS]
#   MODE=kms checks that `xks-loadtest run --kms` works against another XKS proxy: it
#   starts only the sample and runs KMS's client profile against it at KMS_RATE req/s
#   (default 200), writing sample-kms.json and the text report in README.md; no wrk rounds.
#   PROFILE=dev builds this repository's binaries unoptimized (quicker; a functional
#   check, not figures).
# Needs network the first time: clones the sample at a pinned commit into
# $SAMPLE_HOME (default ~/.cache/xks-proxy/aws-sample: outside this repository, whose
# workspace would otherwise claim the sample's crate) and builds it (a few minutes).
# SAMPLE_REPO=<url or path> clones from elsewhere (a local mirror, on a machine that
# cannot reach GitHub). Writes perf/runs/<UTC time>-aws-sample/
# and writes a summary to README.md there.
set -euo pipefail
cd "$(dirname "$0")/.."

SAMPLE_COMMIT=9f8989851ae0b44f371bcff05b81f6a7a4969f63 # v3.1.2, 2024-10-16
SECONDS_PER_RUN="${1:-10}"
ROUNDS="${ROUNDS:-2}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="perf/runs/$STAMP-aws-sample"
TOOLS="${SAMPLE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/xks-proxy/aws-sample}"
mkdir -p "$OUT" "$TOOLS"
# WORK, a temporary directory; the server running is stopped and WORK removed on exit.
. perf/lib.sh

./scripts/setup.sh wrk git
PROFILE="${PROFILE:-release}"
BUILT="$PWD/target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
cargo build --profile "$PROFILE" -p xks-proxy -p xks-loadtest
cargo build --profile "$PROFILE" --example bare
PROXY="$BUILT/xks-proxy"
BARE="$BUILT/examples/bare"
LOAD="$BUILT/xks-loadtest"

# The sample, pinned. It ships no Cargo.lock, so cargo resolves its dependencies
# afresh; the versions used are recorded with the results.
SAMPLE_SRC="$TOOLS/aws-kms-xks-proxy"
SAMPLE_BIN="$TOOLS/aws-sample-target/release/xks-proxy"
if [ ! -x "$SAMPLE_BIN" ]; then
  [ -d "$SAMPLE_SRC/.git" ] || git clone -q "${SAMPLE_REPO:-https://github.com/aws-samples/aws-kms-xks-proxy}" "$SAMPLE_SRC"
  git -C "$SAMPLE_SRC" checkout -q "$SAMPLE_COMMIT"
  (cd "$SAMPLE_SRC/xks-axum" && CARGO_TARGET_DIR="$TOOLS/aws-sample-target" cargo build --release)
fi

# Credential and certificates from the quickstart; its token is not used.
"$PROXY" quickstart --setup-only --dir "$WORK/q" --listen 127.0.0.1:18443 >/dev/null
Q="$WORK/q"

# One token holding one key, `foo`. The sample finds the key by label on every request,
# and SoftHSM2 reads every token object's file to do it, so its speed depends on how
# many objects the token holds (the quickstart's five make it about 40 % slower); a
# token with one key is the sample at its best. xks-proxy serves from the same token.
mkdir -p "$WORK/token"
cat >"$WORK/softhsm2.conf" <<EOF
directories.tokendir = $WORK/token
objectstore.backend = file
log.level = ERROR
EOF
export SOFTHSM2_CONF="$WORK/softhsm2.conf"
PIN="$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
softhsm2-util --init-token --free --label xks-bench --pin "$PIN" --so-pin "$PIN$PIN" >/dev/null
(umask 077 && printf "%s" "$PIN" >"$WORK/pin")
sed -e 's/^token_label = .*/token_label = "xks-bench"/' \
  -e "s|^pin_file = .*|pin_file = \"$WORK/pin\"|" \
  -e "s|^SOFTHSM2_CONF = .*|SOFTHSM2_CONF = \"$SOFTHSM2_CONF\"|" \
  -e '/^health_check_key = /d' \
  -e 's/^pin_threads = false$/pin_threads = true/' \
  "$Q/config.toml" >"$Q/bench.toml"
grep -q "xks-bench" "$Q/bench.toml" && grep -q "$SOFTHSM2_CONF" "$Q/bench.toml" &&
  grep -q '^pin_threads = true$' "$Q/bench.toml"
"$PROXY" keys create --config "$Q/bench.toml" foo >/dev/null

cat >"$WORK/sample.toml" <<EOF
[server]
ip = "127.0.0.1"
port = 28443
port_http_ping = 28443
region = "us-east-1"
service = "kms-xks-proxy"
[server.tcp_keepalive]
tcp_keepalive_secs = 60
tcp_keepalive_retries = 3
tcp_keepalive_interval_secs = 1
[tracing]
is_stdout_writer_enabled = true
is_file_writer_enabled = false
level = "WARN"
directory = "$WORK"
file_prefix = "sample.log"
rotation_kind = "NEVER"
[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = false
[tls]
tls_cert_pem = "$Q/server.pem"
tls_key_pem = "$Q/server-key.pem"
[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "$(cat "$Q/sigv4-access-key-id")"
sigv4_secret_access_key = "$(cat "$Q/sigv4-secret")"
xks_key_id_set = ["foo"]
[pkcs11]
session_pool_max_size = 30
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "$PIN"
PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
context_read_timeout_milli = 10
[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384
[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
EOF
chmod 600 "$WORK/sample.toml"

wait_for() { # url
  for _ in $(seq 100); do
    curl -s -o /dev/null --cacert "$Q/ca.pem" "$1" && return
    sleep 0.1
  done
  echo "nothing answers $1" >&2
  exit 1
}
start() { # sample|ours|bare
  if [ "$1" = bare ]; then
    "$BARE" "$Q/server.pem" "$Q/server-key.pem" 127.0.0.1:18445 2>>"$OUT/bare.log" &
    PROXY_PID=$!
    wait_for https://localhost:18445/
  elif [ "$1" = sample ]; then
    XKS_PROXY_SETTINGS_TOML="$WORK/sample.toml" "$SAMPLE_BIN" >>"$OUT/sample.log" 2>&1 &
    PROXY_PID=$!
    wait_for https://localhost:28443/ping
  else
    "$PROXY" serve --config "$Q/bench.toml" 2> >(grep -av --line-buffered ' xks request ' >>"$OUT/xks-proxy.log") >/dev/null &
    PROXY_PID=$!
    wait_for https://localhost:18443/livez
  fi
}
COMMANDS="$OUT/commands.txt"
: >"$COMMANDS"
if [ "${MODE:-}" = kms ]; then
  start sample
  kms=(run --kms --env "$Q/test-client.env" --endpoint https://localhost:28443
    --rate "${KMS_RATE:-200}" --warmup 2 --duration "$SECONDS_PER_RUN" --report "$OUT/sample-kms.json")
  echo "xks-loadtest ${kms[*]}" >>"$COMMANDS"
  "$LOAD" "${kms[@]}" >"$WORK/sample-kms.txt" 2>&1 || true
  stop_proxy
  {
    echo "# xks-loadtest run --kms against the AWS sample ($STAMP)"
    echo
    echo "MODE=kms KMS_RATE=${KMS_RATE:-200} PROFILE=$PROFILE perf/aws-sample.sh $SECONDS_PER_RUN"
    echo
    echo '```'
    cat "$WORK/sample-kms.txt"
    echo '```'
  } >"$OUT/README.md"
  cat "$WORK/sample-kms.txt"
  exit 0
fi
measure() { # name, port, [path]: the pre-signed Encrypt, or a GET of path
  local args=(-t2 -c64 -d"${SECONDS_PER_RUN}s" --latency)
  # Beside wrk, the box's own stalls and the CPU time the hypervisor took meanwhile.
  "$LOAD" stalls --duration "$SECONDS_PER_RUN" --report "$OUT/$1-stalls.json" >"$OUT/$1-stalls.txt" &
  local meter=$!
  # The sample's rustls refuses an IP address as SNI: connect by name.
  local url="https://localhost:$2"
  if [ -n "${3:-}" ]; then
    echo "wrk ${args[*]} $url$3" >>"$COMMANDS"
    wrk "${args[@]}" "$url$3" >"$OUT/$1.txt" 2>&1 || true
  else
    "$LOAD" presign --env "$Q/test-client.env" --endpoint "$url" -o "$WORK/encrypt.lua" 2>/dev/null
    echo "xks-loadtest presign --endpoint $url -o encrypt.lua; wrk ${args[*]} -s encrypt.lua $url" >>"$COMMANDS"
    wrk "${args[@]}" -s "$WORK/encrypt.lua" "$url" >"$OUT/$1.txt" 2>&1 || true
  fi
  wait "$meter" || true
  echo "== $1: $(grep -E "Requests/sec" "$OUT/$1.txt" | xargs), p99 $(awk '$1=="99%"{print $2}' "$OUT/$1.txt")$(grep -E "Non-2xx" "$OUT/$1.txt" | sed 's/^ */, /'), $(stolen "$1")% stolen" |
    tee -a "$OUT/summary.txt"
}
# The hypervisor's share of the CPU time during run $1 (0 if unknown).
stolen() { sed -n 's/.*; \([0-9.]*\)% of CPU time stolen.*/\1/p' "$OUT/$1-stalls.txt" | grep . || echo 0; }

rps() { awk '/Requests\/sec/ { print $2 }' "$OUT/$1.txt"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
for round in $(seq "$ROUNDS"); do
  case $((round % 3)) in
    1) order="sample ours bare" ;;
    2) order="ours bare sample" ;;
    *) order="bare sample ours" ;;
  esac
  for server in $order; do
    start "$server"
    case $server in
      sample) measure "sample-$round" 28443 ;;
      bare)
        measure "bare-$round" 18445 /
        measure "bare-post-$round" 18445
        ;;
      ours)
        measure "xks-proxy-$round" 18443
        [ "$round" = 1 ] && measure "ceiling-livez" 18443 /livez
        ;;
    esac
    stop_proxy
  done
  ours=$(rps "xks-proxy-$round")
  bare=$(rps "bare-$round")
  post=$(rps "bare-post-$round")
  sample=$(rps "sample-$round")
  most_stolen=$(for run in xks-proxy bare bare-post sample; do stolen "$run-$round"; done | sort -g | tail -1)
  echo "round $round: xks-proxy/bare $(ratio "$ours" "$bare")," \
    "xks-proxy/bare-post $(ratio "$ours" "$post")," \
    "xks-proxy/sample $(ratio "$ours" "$sample")," \
    "bare/sample $(ratio "$bare" "$sample")," \
    "bare-post/sample $(ratio "$post" "$sample")," \
    "most stolen $most_stolen" | tee -a "$OUT/ratios.txt"
done
# Median and range of column $1 (awk field) of the ratio lines; with a second argument,
# only of the rounds in which no run lost more than that percentage of the CPU time.
spread() {
  awk -v f="$1" -v most="${2:-101}" '{ gsub(/,/, ""); if ($NF <= most) print $f }' "$OUT/ratios.txt" | sort -g |
    awk '{ v[NR] = $1 } END {
      if (NR == 0) { printf "no such round"; exit }
      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "median %.3f (%.3f-%.3f over %d rounds)", m, v[1], v[NR], NR }'
}
{
  echo "xks-proxy/bare:      $(spread 4); target 0.41 (50k against 121k)"
  echo "xks-proxy/bare-post: $(spread 6); target 0.41"
  echo "xks-proxy/sample:    $(spread 8); target 3.5 (50k against 14.4k)"
  echo "bare/sample:         $(spread 10); the issue's references: 8.4 (121k against 14.4k)"
  echo "bare-post/sample:    $(spread 12)"
  echo "Rounds in which no run lost more than 1 % of the CPU time to the hypervisor:"
  echo "  xks-proxy/bare:      $(spread 4 1)"
  echo "  xks-proxy/bare-post: $(spread 6 1)"
  echo "  xks-proxy/sample:    $(spread 8 1)"
} | tee -a "$OUT/summary.txt"

locked() { # the version of crate $1 the sample was built with
  awk -v n="name = \"$1\"" '$0 == n { getline; gsub(/"/, ""); print n " " $3; exit }' "$SAMPLE_SRC/xks-axum/Cargo.lock" | sed 's/name = //; s/"//g'
}
{
  echo
  echo "## AWS sample and bare-server comparison $STAMP"
  echo
  echo "- machine: $(hostname), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -sr)"
  echo "- xks-proxy $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src loadtest || echo ' (dirty)'); aws-kms-xks-proxy ${SAMPLE_COMMIT:0:7} ($(locked axum), $(locked rustls), $(locked hyper))"
  echo "- one SoftHSM2 token with one key for both; the sample logs at WARN, xks-proxy writes its audit line per request"
  echo "- command: \`ROUNDS=$ROUNDS perf/aws-sample.sh $SECONDS_PER_RUN\`; wrk output in \`$OUT/\`"
  echo
  echo '```'
  cat "$OUT/summary.txt"
  echo
  cat "$OUT/ratios.txt"
  echo '```'
} | tee "$OUT/README.md"
