#!/usr/bin/env bash
# Build (or reuse) the cached arm64 Debian rootfs used by scripts/arm64/run-tests.sh.
#
# Called by run-tests.sh (and by hand: `bash scripts/arm64/build-rootfs.sh [--force]`).
# Result: $EDGEFLEET_ARM64_CACHE/rootfs-<suite>-<recipe hash>.tar.zst (default cache dir
# /var/cache/edgefleet-arm64, outside the clone), holding Debian minbase + python3 and a venv
# /opt/edgefleet-venv with scripts/arm64/requirements.txt installed from PyPI (aarch64 wheels).
# The hash covers this file and requirements.txt, so editing either rebuilds. Needs root,
# binfmt_misc with qemu-aarch64 (lib.sh checks), debootstrap, zstd and network to the
# Debian mirror and PyPI. Prints the tarball path on stdout.
set -euo pipefail
# shellcheck source=scripts/arm64/lib.sh
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"

force=0
[ "${1:-}" = --force ] && force=1

if ! reason="$(arm64_check_machine)"; then
    arm64_log "cannot build the arm64 rootfs: $reason"; exit 2
fi

tarball="$(arm64_tarball_path)"
if [ -f "$tarball" ] && [ "$force" = 0 ]; then
    arm64_log "rootfs cached: $tarball"; echo "$tarball"; exit 0
fi

mkdir -p "$ARM64_CACHE"
work="$(mktemp -d "$ARM64_CACHE/build.XXXXXX")"
root="$work/rootfs"
cleanup() { arm64_umount_all "$root"; rm -rf "$work"; }
trap cleanup EXIT

start=$(date +%s)
mirror="$(arm64_mirror)"
arm64_log "debootstrap arm64 $ARM64_SUITE from $mirror into $root"
# Inside a private mount namespace: whatever debootstrap mounts goes away with it.
unshare --mount --propagation private \
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,ca-certificates \
        "$ARM64_SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -30 "$work/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -30 "$root/debootstrap/debootstrap.log" >&2
    arm64_log "debootstrap failed"; exit 1
}
arm64_log "debootstrap done in $(( $(date +%s) - start ))s"

arm64_sync_host_files "$root"
cp "$ARM64_HERE/requirements.txt" "$root/tmp/requirements.txt"
# The venv and the pip install run under qemu inside the rootfs, with private mounts.
unshare --mount --propagation private bash -c '
    set -euo pipefail
    source "$1/lib.sh"
    arm64_mount_all "$2"
    arm64_chroot_raw "$2" /usr/bin/python3 -m venv "$3"
    arm64_chroot_raw "$2" "$3/bin/python" -m pip install --no-cache-dir --upgrade pip
    arm64_chroot_raw "$2" "$3/bin/python" -m pip install --no-cache-dir -r /tmp/requirements.txt
    arm64_chroot_raw "$2" "$3/bin/python" -c "import onnxruntime, numpy, cryptography, google.protobuf, paho.mqtt, bsdiff4, zstandard, psutil, platform; print(\"[arm64] venv ok:\", platform.machine(), \"onnxruntime\", onnxruntime.__version__, \"numpy\", numpy.__version__)"
' _ "$ARM64_HERE" "$root" "$ARM64_VENV"
rm -f "$root/tmp/requirements.txt"
# Slim: apt lists and caches are not needed to run tests.
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/root/.cache"

arm64_umount_all "$root"
if awk -v r="$root" 'index($2, r) == 1 {found = 1} END {exit !found}' /proc/self/mounts; then
    arm64_log "mounts still active under $root; refusing to archive"; exit 1
fi
arm64_log "archiving rootfs to $tarball"
tar -C "$root" --numeric-owner -cf - . | zstd -q -T0 -6 -o "$tarball.tmp.$$"
mv -f "$tarball.tmp.$$" "$tarball"
arm64_log "rootfs built in $(( $(date +%s) - start ))s: $tarball ($(du -h "$tarball" | cut -f1))"
echo "$tarball"
