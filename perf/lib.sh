# Shared by the perf/ scripts (sourced from the repository root, not run). Sourcing it
# makes WORK, a temporary directory, and stops the proxy and removes WORK on exit.
# start_proxy needs PROXY (the xks-proxy binary) and sets PROXY_PID.

WORK="$(mktemp -d)"
PROXY_PID=""
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# prepare_run SUFFIX: sets STAMP (the UTC time) and OUT, perf/runs/<STAMP><SUFFIX>
# (created); builds xks-proxy, xks-loadtest and the bare server (examples/bare.rs),
# sets PROXY and LOAD to them, and writes the quickstart's SoftHSM2 token, keys,
# credential, certificates and config to $WORK/q (the config at $WORK/q/config.toml,
# the client's settings at $WORK/q/test-client.env).
prepare_run() {
  STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
  OUT="perf/runs/$STAMP$1"
  mkdir -p "$OUT"
  cargo build --release -p xks-proxy -p xks-loadtest
  cargo build --release --example bare
  PROXY=target/release/xks-proxy
  LOAD=target/release/xks-loadtest
  "$PROXY" quickstart --setup-only --dir "$WORK/q" --listen 127.0.0.1:18443 >/dev/null
  pin_threads "$WORK/q/config.toml"
}

# pin_threads CONFIG: the proxy's workers and session threads held on CPUs, as every
# run here since steps.md, "SoftHSM2 without its locks (no), and the busy threads held on CPUs (yes)", measures it.
pin_threads() {
  sed -i 's/^pin_threads = false$/pin_threads = true/' "$1"
  grep -q '^pin_threads = true$' "$1"
}

# write_software_config QUICKSTART_DIR FILE: the quickstart's credential and
# certificate in front of the in-process software backend, on the same port.
write_software_config() {
  cat >"$2" <<EOF
[server]
listen = "127.0.0.1:18443"
tls_certificate = "$1/server.pem"
tls_private_key = "$1/server-key.pem"
pin_threads = true

[hsm]
backend = "software"
[[hsm.software_key]]
id = "foo"
usage = ["ENCRYPT", "DECRYPT"]

[[key_store]]
name = "bench"
uri_prefix = "example/uri/path/prefix"
region = "us-east-1"
keys = ["foo"]
[[key_store.credential]]
access_key_id = "$(cat "$1/sigv4-access-key-id")"
secret_access_key_file = "$1/sigv4-secret"
EOF
}

# start_proxy CONFIG LOG [audit]: serves CONFIG in the background and waits until it
# listens. The per-request audit lines (hundreds of MB per run) are dropped from LOG
# unless the third argument is `audit`.
start_proxy() {
  if [ "${3:-}" = audit ]; then
    "$PROXY" serve --config "$1" 2>"$2" >/dev/null &
  else
    "$PROXY" serve --config "$1" 2> >(grep -av --line-buffered ' xks request ' >"$2") >/dev/null &
  fi
  PROXY_PID=$!
  for _ in $(seq 100); do
    grep -q "serving the XKS API" "$2" 2>/dev/null && return
    sleep 0.1
  done
  echo "the proxy did not start; see $2" >&2
  exit 1
}

# commands_section FILE: the end of a run's README.md, the commands FILE lists.
commands_section() {
  echo
  echo "Commands:"
  echo
  echo '```'
  cat "$1"
  echo '```'
}

stop_proxy() {
  kill "$PROXY_PID"
  wait "$PROXY_PID" || true
  PROXY_PID=""
}
