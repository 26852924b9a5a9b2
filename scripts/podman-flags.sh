# Sourced by scripts/image.sh and scripts/check-container.sh: how podman is called.
#
# On the Debian 12 hosts this project is built and tested on (cgroup v1/hybrid, no
# systemd as cgroup manager in the session), crun refuses the cgroup layout and the
# systemd cgroup manager is not reachable, so podman runs with runc and cgroupfs; and
# the ulimits podman asks for by default (nofile 1048576) exceed the host's hard limits
# and are refused, so builds and containers get explicit ones, capped at the host's.
# Hosts where podman's defaults work may set PODMAN_GLOBAL_OPTS="" (and PODMAN_ULIMITS).
# shellcheck shell=bash

read -r -a PODMAN <<<"podman ${PODMAN_GLOBAL_OPTS---runtime runc --cgroup-manager=cgroupfs}"

# The smaller of WANT and the shell's hard limit (ulimit -H prints "unlimited" or a number).
cap_limit() {
  local want="$1" hard="$2"
  if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then echo "$want"; else echo "$hard"; fi
}
if [ -z "${PODMAN_ULIMITS+set}" ]; then
  _nofile="$(cap_limit 65536 "$(ulimit -Hn)")"
  _nproc="$(cap_limit 4096 "$(ulimit -Hu)")"
  PODMAN_ULIMITS="--ulimit nofile=$_nofile:$_nofile --ulimit nproc=$_nproc:$_nproc"
  unset _nofile _nproc
fi
read -r -a ULIMITS <<<"$PODMAN_ULIMITS"

# The base image the Containerfile starts from (its ARG BASE).
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
# The images scripts/image.sh builds.
RUNTIME_IMAGE="${RUNTIME_IMAGE:-localhost/xks-proxy:latest}"
DEMO_IMAGE="${DEMO_IMAGE:-localhost/xks-proxy:demo}"
