#!/usr/bin/env bash
# `xks-loadtest plan` as an operator runs it, end to end with the real binaries: it
# starts xks-proxy itself from a configuration template (the simulated HSM of
# config/simulated.toml, `hsm.sessions` swept), watches the proxy's CPU in /proc and its
# session pool in /metrics, stops each proxy it started, and writes the plan. The
# in-process tests (loadtest/tests/kms.rs, in `cargo test --workspace`) cover --kms's
# counting and plan against a proxy it did not start; this covers --proxy-cmd and
# --config-template, which need the xks-proxy binary. Takes under a minute.
# Usage: scripts/check-kms.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
target=${CARGO_TARGET_DIR:-target}
cargo build --bin xks-proxy
cargo build -p xks-loadtest --bin xks-loadtest
proxy=$PWD/$target/debug/xks-proxy
loadtest=$PWD/$target/debug/xks-loadtest
case $target in /*) proxy=$target/debug/xks-proxy loadtest=$target/debug/xks-loadtest ;; esac

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 20000))
# The quickstart makes the certificate and the credential (its SoftHSM2 token is unused).
"$proxy" quickstart --setup-only --dir "$dir/qs" --listen "127.0.0.1:$port" >/dev/null
admin=$(sed -n 's/^listen = "\(127.0.0.1:[0-9]*\)"$/\1/p' "$dir/qs/config.toml" | sed -n 2p)
sed -e "s#\.\./xks-quickstart/#$dir/qs/#" -e "s/127.0.0.1:8443/127.0.0.1:$port/" \
    -e "s/127.0.0.1:8444/$admin/" \
    -e "s/AAAAAAAAAAAAAAAAAAAAAAAAAA/$(cat "$dir/qs/sigv4-access-key-id")/" \
    -e 's/^sessions = 32/sessions = {sessions}/' config/simulated.toml >"$dir/template.toml"
grep -q '{sessions}' "$dir/template.toml"

"$loadtest" plan --quiet --env "$dir/qs/test-client.env" \
  --config-template "$dir/template.toml" --set sessions=4,16 \
  --proxy-cmd "$proxy serve --config {config}" --metrics-url "http://$admin/metrics" \
  --connections 16 --kms-health-interval 0 --start 20 --factor 2 --max 40 \
  --step-duration 0.5 --step-warmup 0 --objective-failed-pct 100 --objective-p99-ms 5000 \
  --target-tps 5400 --key-stores 3 -o "$dir/plan.md" --json "$dir/plan.json" >/dev/null

fail() {
  echo "check-kms: FAIL: $*" >&2
  cat "$dir/plan.md" >&2 || true
  exit 1
}
for section in "## Objective" "### connections=16 sessions=4" "### connections=16 sessions=16" \
  "## What saturates first" "## For the target" "proxy replicas: **" "## KMS quota"; do
  grep -qF "$section" "$dir/plan.md" || fail "no \"$section\" in the plan"
done
# Each proxy it started was watched: its CPU (from /proc) and its pool (from /metrics).
grep -q '"proxy_cpu_pct"' "$dir/plan.json" || fail "the proxy's CPU was not read"
grep -q '"sessions": 16.0' "$dir/plan.json" || fail "the pool's size was not read from /metrics"
# ... and stopped: nothing listens on the port any more.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  fail "a proxy plan started is still listening on $port"
fi
ls "$dir"/.xks-loadtest-plan-* >/dev/null 2>&1 && fail "rendered configurations were left behind"
echo "check-kms: ok ($((SECONDS - start)) s)"
