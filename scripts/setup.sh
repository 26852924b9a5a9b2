#!/usr/bin/env bash
# Installs what xks-proxy's quickstart and tests need beyond Rust, when missing:
# SoftHSM2 (the PKCS#11 token) and curl (an independent SigV4 signer in the tests).
# Usage: scripts/setup.sh [TOOL[:PACKAGE] ...]   (extra commands; PACKAGE when its name differs,
#        e.g. promtool:prometheus)
set -euo pipefail

need=()
softhsm_found=false
for module in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
  [ -e "$module" ] && softhsm_found=true
done
$softhsm_found || need+=(softhsm2)
command -v curl >/dev/null 2>&1 || need+=(curl)
# Extra commands a caller asks for (perf/run.sh: wrk), each with its Debian package when the
# names differ (promtool:prometheus).
for spec in "$@"; do
  tool="${spec%%:*}"
  package="${spec#*:}"
  command -v "$tool" >/dev/null 2>&1 || need+=("$package")
done

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
