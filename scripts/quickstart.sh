#!/usr/bin/env bash
# One command to a working local proxy: installs SoftHSM2 if needed, builds, then runs
# `xks-proxy quickstart` (token, keys, credentials, certificates, config) and serves.
# Arguments go to the quickstart, e.g. --dir DIR --listen 127.0.0.1:8443.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release --bin xks-proxy
exec ./target/release/xks-proxy quickstart "$@"
