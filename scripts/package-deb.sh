#!/usr/bin/env bash
# Builds the Debian package of xks-proxy and prints its path (under
# $CARGO_TARGET_DIR/debian/, default target/debian/). The package's contents are
# [package.metadata.deb] in Cargo.toml; the guide is docs/deployment-systemd.md.
# Usage: scripts/package-deb.sh [--profile release|dev]   (default release: the package to
#        ship; dev packages the debug binary that `cargo test` built, for checks)
# Installs cargo-deb into ~/.cargo/bin when missing (kept there between runs).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--profile" ]; then
  profile="${2:?--profile needs release or dev}"
fi
case "$profile" in
  release) build=(--release) ;;
  dev) build=() ;;
  *) echo "package-deb: unknown profile $profile" >&2; exit 2 ;;
esac

# dpkg-shlibdeps works out the package's library dependencies.
./scripts/setup.sh dpkg-shlibdeps:dpkg-dev >&2
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "package-deb: installing cargo-deb into ~/.cargo/bin" >&2
  # Built in a temporary folder, not in the project's target directory.
  # Pinned: a later cargo-deb means to refuse `--profile dev`, which CI uses.
  env -u CARGO_TARGET_DIR cargo install cargo-deb --version 3.8.0 --locked >&2
fi
cargo build "${build[@]}" --bin xks-proxy >&2
# --strip: the release profile keeps line tables for profiling (debug = 1), which the
# package does not need. The last line cargo-deb prints is the package's path.
cargo deb -p xks-proxy --no-build --profile "$profile" --strip | tail -n 1
