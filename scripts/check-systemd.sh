#!/usr/bin/env bash
# Checks the systemd unit and the Debian package (scripts/test.sh runs it in CI):
#  1. `systemd-analyze verify` on deploy/systemd/xks-proxy.service alone and with each
#     drop-in. verify insists that ExecStart's binary exists, so it checks a copy of the
#     unit whose ExecStart names the binary just built (the installed unit is verified
#     as it is in step 3).
#  2. `systemd-analyze security --offline=true`: the unit's exposure must be 2.0 or less
#     ("OK"); the drop-ins' exposures are printed.
#  3. The .deb (scripts/package-deb.sh): `dpkg -i` on this machine, `xks-proxy --version`
#     from /usr/bin, the system user, the conffile and the credentials folder, verify
#     and security on the installed unit; then `dpkg --purge`, leaving the machine as it
#     was. Skipped, saying why, when not root or when a package named xks-proxy is
#     already installed (it is not replaced).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh systemd-analyze:systemd
started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
  echo "check-systemd: FAIL: $*" >&2
  exit 1
}

# The exposure number of `systemd-analyze security --offline=true UNIT`.
exposure() {
  local out
  out=$(systemd-analyze security --offline=true --no-pager "$@" 2>&1) || {
    echo "$out" >&2
    return 1
  }
  echo "$out" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p'
}

# `systemd-analyze verify UNIT`, failing on any message too: verify only warns, exit
# status 0, about an unknown or misspelt setting, which systemd would then ignore.
verify() {
  local out
  if ! out=$(systemd-analyze verify --no-pager "$@" 2>&1) || [ -n "$out" ]; then
    echo "$out" >&2
    echo "check-systemd: FAIL: systemd-analyze verify $*" >&2
    return 1
  fi
}

# $1 ≤ $2, as decimals.
at_most() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a + 0 <= b + 0) }'; }

# The package from the release binary when this run has built one already (another
# check's, shared), else from the debug binary `cargo test` built: a release build of
# its own would add 3.5 to 12 minutes (measured cold, two cores shared or not) to every
# CI run, whose clean clone has no release build to reuse. scripts/package-deb.sh
# builds the release package by hand; both come from the same metadata.
target="${CARGO_TARGET_DIR:-target}"
profile=dev
[ -x "$target/release/xks-proxy" ] && profile=release
deb=$(./scripts/package-deb.sh --profile "$profile")
binary=$(realpath "$target/$([ "$profile" = dev ] && echo debug || echo release)/xks-proxy")
echo "check-systemd: package from the $profile binary: $deb"

# 1 and 2: the unit as shipped, its ExecStart pointed at the built binary.
unit_dir="$work/units"
mkdir -p "$unit_dir"
sed "s#^ExecStart=/usr/bin/xks-proxy #ExecStart=$binary #" deploy/systemd/xks-proxy.service \
  >"$unit_dir/xks-proxy.service"
grep -q "^ExecStart=$binary " "$unit_dir/xks-proxy.service"
verify "$unit_dir/xks-proxy.service"
level=$(exposure "$unit_dir/xks-proxy.service")
echo "check-systemd: xks-proxy.service exposure $level"
at_most "$level" 2.0 || fail "exposure '$level' is above 2.0 (systemd-analyze security --offline=true)"
# Each drop-in on its own, found by verify in the unit's .d folder.
for dropin in deploy/systemd/vendors/*.conf deploy/systemd/listen-443.conf deploy/systemd/live-rotation.conf; do
  rm -rf "$unit_dir/xks-proxy.service.d"
  mkdir "$unit_dir/xks-proxy.service.d"
  cp "$dropin" "$unit_dir/xks-proxy.service.d/"
  verify "$unit_dir/xks-proxy.service"
  echo "check-systemd: with $(basename "$dropin"): exposure $(exposure "$unit_dir/xks-proxy.service")"
done

# 3: the package.
if [ "$(id -u)" -ne 0 ]; then
  echo "check-systemd: SKIP installing $deb: dpkg -i needs root"
  exit 0
fi
if dpkg-query -W -f='${Status}' xks-proxy 2>/dev/null | grep -q "installed"; then
  echo "check-systemd: SKIP installing $deb: a package named xks-proxy is installed here; not replacing it"
  exit 0
fi
had_user=false
getent passwd xks-proxy >/dev/null && had_user=true
cleanup() {
  dpkg --purge xks-proxy >/dev/null 2>&1 || true
  if ! $had_user && getent passwd xks-proxy >/dev/null; then
    userdel xks-proxy >/dev/null 2>&1 || true
    groupdel xks-proxy >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

dpkg -i "$deb" >/dev/null
version=$(/usr/bin/xks-proxy --version)
expected="xks-proxy $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ "$version" = "$expected" ] || fail "/usr/bin/xks-proxy --version says '$version', expected '$expected'"
installed_unit=$(dpkg -L xks-proxy | grep '/systemd/system/xks-proxy\.service$')
verify "$installed_unit"
installed_level=$(exposure "$installed_unit")
at_most "$installed_level" 2.0 || fail "the installed unit's exposure '$installed_level' is above 2.0"
getent passwd xks-proxy >/dev/null || fail "the package made no user xks-proxy"
[ "$(stat -c '%a %U' /etc/xks-proxy/credentials)" = "700 root" ] ||
  fail "/etc/xks-proxy/credentials is not root's, mode 700"
dpkg-query -W -f='${Conffiles}' xks-proxy | grep -q ' /etc/xks-proxy/config.toml ' ||
  fail "/etc/xks-proxy/config.toml is not a conffile"
cmp -s /etc/xks-proxy/config.toml config/systemd.toml || fail "the installed config.toml is not config/systemd.toml"
[ -f /usr/share/doc/xks-proxy/examples/systemd/vendors/luna.conf ] || fail "the vendor drop-ins are not installed"
echo "check-systemd: installed $(basename "$deb"): $version, $installed_unit verified, exposure $installed_level"

dpkg --purge xks-proxy >/dev/null
[ ! -e /usr/bin/xks-proxy ] && [ ! -e /etc/xks-proxy ] && [ ! -e "$installed_unit" ] ||
  fail "dpkg --purge left files behind"
echo "check-systemd: purged; done in $((SECONDS - started)) s"
