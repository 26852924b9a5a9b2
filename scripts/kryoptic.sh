#!/usr/bin/env bash
# Builds kryoptic's PKCS#11 module (libkryoptic_pkcs11.so, the published `kryoptic` crate) outside
# the clone, caches it, and prints its path on stdout; a second run only prints the path.
# Usage: scripts/kryoptic.sh            (build output goes to stderr)
#   KRYOPTIC_VERSION   crate version (default below)
#   XKS_CACHE_DIR      cache root (default ~/.cache/xks-proxy); the module lands in
#                      $XKS_CACHE_DIR/kryoptic/<version>/libkryoptic_pkcs11.so
# Exits non-zero, with the reason on stderr, when the module cannot be built here.
#
# Features: kryoptic's defaults include EdDSA, which needs OpenSSL >= 3.2 (Debian 12 ships 3.0).
# The proxy needs AES-GCM and the sqlite store only, so the module is built with kryoptic's
# `minimal` feature set (sqlite store, AES, ECDSA/ECDH, hashes, RSA) linked dynamically against
# the system libcrypto (`kryoptic-lib/dynamic`, OpenSSL >= 3.0.7 per kryoptic's build script).
# That avoids compiling OpenSSL from source, which would add ~10 minutes on two cores.
# Release profile: the suites run thousands of AES-GCM calls through it. docs/kryoptic.md.
set -euo pipefail

version="${KRYOPTIC_VERSION:-1.5.4}"
cache="${XKS_CACHE_DIR:-${HOME}/.cache/xks-proxy}/kryoptic/${version}"
module="${cache}/libkryoptic_pkcs11.so"

if [ -e "$module" ]; then
  echo "$module"
  exit 0
fi

# Build dependencies: bindgen (libclang) for kryoptic's OpenSSL bindings, the OpenSSL and
# sqlite headers, pkg-config to find them.
missing=()
for package in libclang-dev libssl-dev libsqlite3-dev pkg-config; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kryoptic: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$cache"
work="${cache}/build"
rm -rf "$work"
mkdir -p "$work/fetch/src"
# The crate is a cdylib, so it cannot be a dependency to build; `cargo vendor` on a one-line
# manifest is cargo's own way to fetch its published source (with its Cargo.lock).
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
kryoptic = { version = "=${version}", default-features = false }
[workspace]
EOF
: >"$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo vendor --quiet --versioned-dirs vendor >/dev/null)
src="$work/kryoptic-${version}"
cp -a "$work/fetch/vendor/kryoptic-${version}" "$src"
rm -rf "$work/fetch"
# A crate from a registry carries no workspace of its own; give it one so the cache's
# target dir, not a parent's, is used.
grep -q '^\[workspace\]' "$src/Cargo.toml" || printf '\n[workspace]\n' >>"$src/Cargo.toml"

echo "kryoptic: building ${version} (cold build, several minutes)" >&2
start=$(date +%s)
(
  cd "$src"
  CARGO_TARGET_DIR="${cache}/target" cargo build --release --locked --lib \
    --no-default-features --features minimal,kryoptic-lib/dynamic >&2
)
cp "${cache}/target/release/libkryoptic_pkcs11.so" "${module}.tmp"
mv "${module}.tmp" "$module"
# Keep only the module: the target dir is ~1 GB.
rm -rf "${cache}/target" "$work"
echo "kryoptic: built in $(($(date +%s) - start)) s" >&2
echo "$module"
