#!/usr/bin/env bash
# Checks deploy/monitoring: the alert rules load (`promtool check rules`) and behave as
# their unit tests say (`promtool test rules alerts.test.yml`: each alert fires on the
# series that should fire it, not on a healthy one). Installs promtool (Debian's
# `prometheus` package) when missing. That every metric the rules and the dashboard use
# is exported by a real proxy is tests/monitoring.rs, run by `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh promtool:prometheus
if ! command -v promtool >/dev/null 2>&1; then
  echo "check-monitoring: FAILED: promtool is not installed and could not be (apt-get install prometheus)" >&2
  exit 1
fi
echo "check-monitoring: $(promtool --version 2>&1 | head -1)"
promtool check rules deploy/monitoring/alerts.yml
(cd deploy/monitoring && promtool test rules alerts.test.yml)
# The dashboard's queries through Prometheus's own parser, now that promtool is here
# (without it, cargo test skips that part and says so). --workspace: the same features
# as scripts/test.sh's `cargo test --workspace`, so nothing is rebuilt.
XKS_REQUIRE_PROMTOOL=1 cargo test --workspace --test monitoring -- the_dashboard_is_importable
