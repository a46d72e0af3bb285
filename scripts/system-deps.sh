#!/usr/bin/env bash
# Installs the system packages the demo and the tests use (Debian/Ubuntu, as root):
# mosquitto (MQTT broker), chromium + chromium-driver (dashboard browser test),
# postgresql (PostgreSQL tests), qemu-user-static + binfmt-support + debootstrap (arm64 tests).
# Usage: scripts/system-deps.sh [demo|test]. Without root or apt it prints what is missing
# and goes on: the demo falls back to the embedded Python broker, tests skip with a reason.
set -u
want=(mosquitto)
if [ "${1:-test}" = "test" ]; then
  want+=(chromium chromium-driver postgresql qemu-user-static binfmt-support debootstrap zstd)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root or no apt-get; missing: ${missing[*]} (tests that need them will skip)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
  echo "system-deps: apt-get install failed for: ${missing[*]}" >&2
  exit 1
}
# the package's own broker service is not wanted: tests and the demo start their own
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
pkill -x mosquitto 2>/dev/null || true
exit 0
