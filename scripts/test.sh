#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine (installs SoftHSM2 and
# curl when missing). This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
