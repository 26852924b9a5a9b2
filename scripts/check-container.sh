#!/usr/bin/env bash
# The container images end to end (docs/container.md): builds them (scripts/image.sh),
# then from outside the containers, over ports published on 127.0.0.1:
#  1. the demo image (quickstart on SoftHSM2), run --read-only as its non-root user with
#     a mounted folder: tests/container.rs (the integration client, given the
#     test-client.env the container wrote) and the public AWS test client when a checkout
#     is at hand ($XKS_TEST_CLIENT, /tmp/tc, or ~/.cache/xks-proxy/aws-kms-xksproxy-test-client);
#  2. the runtime image, run --read-only with the configuration mounted read-only at
#     /etc/xks-proxy, the secrets at /run/secrets/xks-proxy, the PKCS#11 module (the
#     host's SoftHSM2, standing in for a vendor's client) at /opt/pkcs11 and the token
#     from step 1: the same tests/container.rs; its process runs as uid 10001.
# A host that cannot run containers (no podman and it cannot be installed, or podman
# cannot run a trivial container) prints SKIP with the reason; nothing else skips.
#
# Runs as root (CI does): it chowns the mounted folders to the images' uid 10001.
# Usage: scripts/check-container.sh          (XKS_CONTAINER_COLD=1: remove the images and
#        the base first, to time a build from nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/podman-flags.sh
start=$SECONDS
# Read-only as Docker and Kubernetes (readOnlyRootFilesystem) mean it: podman's
# --read-only would otherwise mount writable tmpfs on /run, /tmp and /var/tmp.
READ_ONLY=(--read-only --read-only-tmpfs=false)

skip() {
  echo "check-container: SKIP: $*" >&2
  exit 0
}

if ! ./scripts/setup.sh podman runc mmdebstrap jq xxd; then
  command -v podman >/dev/null 2>&1 || skip "podman is not installed and could not be installed"
fi
command -v podman >/dev/null 2>&1 || skip "podman is not installed and could not be installed"

if [ "${XKS_CONTAINER_COLD:-0}" = 1 ]; then
  "${PODMAN[@]}" rmi --force "$DEMO_IMAGE" "$RUNTIME_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
  "${PODMAN[@]}" image prune --force >/dev/null 2>&1 || true
fi

# Can this host run a container at all? Asked of the base image, before the build (whose
# RUN steps are containers too): past this point every failure is a failure.
out="$("${PODMAN[@]}" info 2>&1 >/dev/null)" || skip "podman does not work here: $out"
./scripts/image.sh --base-only
if ! out="$("${PODMAN[@]}" run --rm "${ULIMITS[@]}" "${READ_ONLY[@]}" "$BASE_IMAGE" true 2>&1)"; then
  skip "podman cannot run a container here: $out"
fi

./scripts/image.sh
version="$("${PODMAN[@]}" run --rm "${ULIMITS[@]}" "${READ_ONLY[@]}" "$RUNTIME_IMAGE" --version)"
echo "check-container: runtime image runs --read-only: $version"
user="$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$RUNTIME_IMAGE")"
[ "$user" = "10001:10001" ] || { echo "check-container: runtime image user is '$user', not 10001:10001" >&2; exit 1; }

work="$(mktemp -d)"
name="xks-check-$$"
cleanup() {
  "${PODMAN[@]}" rm --force --time 5 "$name" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# A port P on 127.0.0.1 with nothing listening on it nor on P+1 (the admin listener),
# below Linux's ephemeral range so that no outgoing connection takes it meanwhile.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null &&
      ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "check-container: no free port pair found" >&2
  return 1
}
port="$(free_port)"
admin=$((port + 1))
publish=(-p "127.0.0.1:$port:$port" -p "127.0.0.1:$admin:$admin")

# Waits until the container's /readyz answers 200; fails with its logs if it exits.
wait_ready() {
  for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then return 0; fi
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      echo "check-container: $name exited:" >&2
      "${PODMAN[@]}" logs "$name" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  echo "check-container: $name not ready after 60 s:" >&2
  "${PODMAN[@]}" logs "$name" >&2 || true
  return 1
}

# The uid the container's main process runs as, seen from the host.
process_uid() {
  local pid
  pid="$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$name")"
  awk '/^Uid:/ {print $2}' "/proc/$pid/status"
}

run_integration_test() {
  if ! XKS_CONTAINER_ENV="$work/xks/test-client.env" XKS_CONTAINER_ADMIN="127.0.0.1:$admin" \
    cargo test -p xks-proxy --test container -- --nocapture 2>&1 | tee "$work/cargo-test.log"; then
    echo "check-container: tests/container.rs failed; the container's log:" >&2
    "${PODMAN[@]}" logs "$name" >&2 || true
    return 1
  fi
  # Ran, not skipped: the test prints SKIP when it is not given the container.
  if grep -q 'SKIP ' "$work/cargo-test.log"; then
    echo "check-container: tests/container.rs skipped" >&2
    return 1
  fi
}

# 1. The demo image.
mkdir -m 0700 "$work/xks"
chown 10001:10001 "$work/xks" # the image's user writes the quickstart's files there
"${PODMAN[@]}" run --detach --name "$name" "${READ_ONLY[@]}" "${ULIMITS[@]}" "${publish[@]}" \
  -v "$work/xks:/xks" "$DEMO_IMAGE" --listen "0.0.0.0:$port" >/dev/null
wait_ready
[ "$(process_uid)" = 10001 ] || { echo "check-container: demo runs as uid $(process_uid)" >&2; exit 1; }
echo "check-container: demo container ready on 127.0.0.1:$port (uid 10001, read-only root)"
run_integration_test

client=""
cached="${XDG_CACHE_HOME:-$HOME/.cache}/xks-proxy/aws-kms-xksproxy-test-client"
for dir in "${XKS_TEST_CLIENT:-}" /tmp/tc "$cached"; do
  [ -n "$dir" ] && [ -x "$dir/test-xks-proxy" ] && { client="$dir"; break; }
done
# Not at hand: one try at cloning it into the cache (hosts without GitHub access skip it).
if [ -z "$client" ] && command -v git >/dev/null 2>&1 &&
  GIT_TERMINAL_PROMPT=0 timeout 60 git clone --quiet --depth 1 \
    "${XKS_TEST_CLIENT_REPO:-https://github.com/aws-samples/aws-kms-xksproxy-test-client}" \
    "$cached.tmp" 2>/dev/null; then
  mv "$cached.tmp" "$cached"
  client="$cached"
fi
rm -rf "$cached.tmp"
if [ -n "$client" ]; then
  # The env file names the CA at its path in the container; on the host it is in $work/xks.
  (
    set -a
    . "$work/xks/test-client.env"
    CACERT="$work/xks/ca.pem"
    SECURE="--cacert $CACERT"
    set +a
    cd "$client"
    ./test-xks-proxy -a
  ) >"$work/test-client.log" 2>&1 || true
  # It exits 0 whatever the outcome; its summary line says.
  summary="$(sed 's/\x1b\[[0-9;]*m//g' "$work/test-client.log" | grep -aE 'tests? (PASSED|FAILED)\.' | tail -1)"
  if ! grep -qE 'All [0-9]+ tests PASSED\.$' <<<"$summary"; then
    cat "$work/test-client.log" >&2
    echo "check-container: the AWS test client failed: $summary" >&2
    exit 1
  fi
  echo "check-container: aws-kms-xksproxy-test-client ($client): $summary"
else
  echo "check-container: aws-kms-xksproxy-test-client not found (XKS_TEST_CLIENT, /tmp/tc, $cached) nor clonable: its run is skipped"
fi
"${PODMAN[@]}" rm --force --time 10 "$name" >/dev/null

# 2. The runtime image, with the operator's mounts: the demo's token and files, laid out
# as docs/container.md describes. The token folder is mounted read-write (SoftHSM2 keeps
# its objects and locks there); everything else read-only.
mkdir -p "$work/etc" "$work/secrets"
cp "$work/xks/server.pem" "$work/etc/"
cp "$work/xks/hsm-pin" "$work/xks/sigv4-secret" "$work/xks/server-key.pem" "$work/secrets/"
sed -e 's|^module = .*|module = "/opt/pkcs11/libsofthsm2.so"|' \
  -e 's|^pin_file = "hsm-pin"|pin_file = "/run/secrets/xks-proxy/hsm-pin"|' \
  -e 's|^tls_private_key = "server-key.pem"|tls_private_key = "/run/secrets/xks-proxy/server-key.pem"|' \
  -e 's|^secret_access_key_file = "sigv4-secret"|secret_access_key_file = "/run/secrets/xks-proxy/sigv4-secret"|' \
  "$work/xks/config.toml" >"$work/etc/config.toml"
for line in 'module = "/opt/pkcs11/libsofthsm2.so"' 'pin_file = "/run/secrets/xks-proxy/hsm-pin"' \
  'tls_private_key = "/run/secrets/xks-proxy/server-key.pem"' \
  'secret_access_key_file = "/run/secrets/xks-proxy/sigv4-secret"'; do
  grep -qxF "$line" "$work/etc/config.toml" || { echo "check-container: config lacks: $line" >&2; exit 1; }
done
chown -R 10001:10001 "$work/etc" "$work/secrets"
chmod 0600 "$work/secrets"/* "$work/etc/config.toml"
module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
  [ -e "$m" ] && { module="$(readlink -f "$m")"; break; }
done
[ -n "$module" ] || { echo "check-container: SoftHSM2's module not found on the host" >&2; exit 1; }
module_dir="$(dirname "$module")"
"${PODMAN[@]}" run --detach --name "$name" "${READ_ONLY[@]}" "${ULIMITS[@]}" "${publish[@]}" \
  -v "$work/etc:/etc/xks-proxy:ro" -v "$work/secrets:/run/secrets/xks-proxy:ro" \
  -v "$module_dir:/opt/pkcs11:ro" -v "$work/xks:/xks" "$RUNTIME_IMAGE" >/dev/null
wait_ready
[ "$(process_uid)" = 10001 ] || { echo "check-container: runtime runs as uid $(process_uid)" >&2; exit 1; }
# /tmp is the telling one: world-writable in the image, so only a read-only root
# (without podman's tmpfs) refuses uid 10001 there.
for path in / /tmp /run /etc/xks-proxy; do
  if "${PODMAN[@]}" exec "$name" touch "$path/.write-probe" 2>/dev/null; then
    echo "check-container: $path is writable in the runtime container" >&2
    exit 1
  fi
done
echo "check-container: runtime container ready on 127.0.0.1:$port (uid 10001, read-only root, mounted config)"
run_integration_test
"${PODMAN[@]}" rm --force --time 10 "$name" >/dev/null

echo "check-container: passed in $((SECONDS - start)) s"
