#!/usr/bin/env bash
# Builds the container images (docs/container.md): localhost/xks-proxy:latest (the
# runtime image) and localhost/xks-proxy:demo (the quickstart on SoftHSM2), from
# deploy/container/Containerfile, with podman.
#
# The binary is built here, on the host (`cargo build --release --bin xks-proxy`; a
# Debian 12 host for the Debian 12 base, same glibc), and copied into a build context
# that holds only it: no Rust toolchain or crate registry is needed inside a container.
#
# The base image (debian:bookworm-slim) is pulled from the registry when it can be
# reached; when it cannot (a host without registry access, as many HSM sites are), it is
# bootstrapped from Debian's packages with mmdebstrap and imported under the same name.
# Either way it stays in podman's storage (outside this clone), so the next run reuses
# it and the layers built on it.
#
# Usage: scripts/image.sh [--binary PATH] [--base-only]
#   --binary PATH  a release binary built elsewhere (no cargo build here)
#   --base-only    only make sure the base image is there
# Environment: BASE_IMAGE, RUNTIME_IMAGE, DEMO_IMAGE, DEBIAN_MIRROR (for mmdebstrap),
#              PODMAN_GLOBAL_OPTS, PODMAN_ULIMITS (scripts/podman-flags.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/podman-flags.sh

binary=""
base_only=false
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --base-only) base_only=true; shift ;;
    *) echo "usage: $0 [--binary PATH] [--base-only]" >&2; exit 2 ;;
  esac
done

# The base image: in storage already, else from the registry, else bootstrapped.
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  echo "image: base $BASE_IMAGE in podman's storage" >&2
elif pull_error="$("${PODMAN[@]}" pull --quiet "$BASE_IMAGE" 2>&1 >/dev/null)"; then
  echo "image: pulled $BASE_IMAGE" >&2
else
  echo "image: cannot pull $BASE_IMAGE ($(tail -1 <<<"$pull_error")); bootstrapping it from Debian's packages with mmdebstrap" >&2
  ./scripts/setup.sh mmdebstrap
  tarball="$(mktemp --suffix=.tar)"
  trap 'rm -f "$tarball"' EXIT
  # minbase: essential packages and apt, as the official image. Like its -slim variant,
  # without documentation, manual pages and translations.
  mmdebstrap --variant=minbase --mode=root \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    bookworm "$tarball" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"}
  "${PODMAN[@]}" import --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
  rm -f "$tarball"
  echo "image: imported $BASE_IMAGE from mmdebstrap" >&2
fi

$base_only && exit 0

if [ -z "$binary" ]; then
  cargo build --release --bin xks-proxy
  binary="${CARGO_TARGET_DIR:-target}/release/xks-proxy"
fi

# The build context: the binary alone (the repository, with target/, would be sent whole).
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/xks-proxy"
# The release profile keeps line tables (debug = 1, for perf's profiles); the image
# does not need them. Symbols stay, so a backtrace still names its functions.
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$context/xks-proxy"; fi
for target in runtime demo; do
  image="$RUNTIME_IMAGE"
  [ "$target" = demo ] && image="$DEMO_IMAGE"
  previous="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  "${PODMAN[@]}" build --pull=never "${ULIMITS[@]}" --build-arg "BASE=$BASE_IMAGE" \
    --target "$target" --tag "$image" --file deploy/container/Containerfile "$context"
  echo "image: built $image" >&2
  # The image this tag named before (an older binary) would stay behind untagged, one
  # per build: remove it unless a container still uses it.
  current="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image")"
  if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    "${PODMAN[@]}" rmi "$previous" >/dev/null 2>&1 || true
  fi
done
