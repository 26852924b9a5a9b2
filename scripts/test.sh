#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine (installs SoftHSM2 and
# curl when missing). This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The token suites again on kryoptic, a second PKCS#11 soft token: docs/kryoptic.md.
./scripts/check-kryoptic.sh
# Alert rules and their unit tests (promtool); deploy/monitoring.
./scripts/check-monitoring.sh
# deploy/kubernetes: rendered, schema-validated and cross-checked with the proxy.
./scripts/check-kube.sh
# deploy/loadtest: the generator's Indexed Job, rendered, validated and run locally.
./scripts/check-loadtest-kube.sh
# The container images, built and run (podman), checked from outside: docs/container.md.
./scripts/check-container.sh
# The systemd unit (verify, exposure ≤ 2.0) and the Debian package (dpkg -i, then purge).
./scripts/check-systemd.sh
# xks-loadtest plan starting and watching real proxies (docs/capacity.md#capacity-plans).
./scripts/check-kms.sh
# The fuzz crate is its own workspace (it links libFuzzer); CI builds its targets and
# replays the seed corpora on stable Rust. Long fuzzing runs: fuzz/README.md.
export CARGO_TARGET_DIR_FUZZ="${CARGO_TARGET_DIR:-target}/fuzz"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
CARGO_TARGET_DIR="$CARGO_TARGET_DIR_FUZZ" cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
CARGO_TARGET_DIR="$CARGO_TARGET_DIR_FUZZ" cargo build --manifest-path fuzz/Cargo.toml --bins
CARGO_TARGET_DIR="$CARGO_TARGET_DIR_FUZZ" cargo test --manifest-path fuzz/Cargo.toml
