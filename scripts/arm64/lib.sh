# shellcheck shell=bash
# Shared helpers of the emulated-arm64 test harness (sourced by build-rootfs.sh and
# run-tests.sh; not run on its own).
#
# What it knows: where the cached rootfs tarball lives (outside the clone), how the cache key
# is computed from the recipe, how to check that this machine can run aarch64 binaries
# (root + binfmt_misc + qemu-aarch64-static with the F flag), and how to run a command
# inside the arm64 rootfs with a clean environment and private mounts.

ARM64_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ARM64_REPO="$(cd "$ARM64_HERE/../.." && pwd)"
ARM64_CACHE="${EDGEFLEET_ARM64_CACHE:-/var/cache/edgefleet-arm64}"
ARM64_SUITE="${EDGEFLEET_ARM64_SUITE:-bookworm}"
ARM64_VENV=/opt/edgefleet-venv
# PATH inside the chroot: the venv first, then Debian's usual directories.
ARM64_PATH="$ARM64_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

arm64_log() { echo "[arm64] $*" >&2; }

# Cache key: the recipe files (build script + pinned base requirements) and the suite.
arm64_recipe_hash() {
    cat "$ARM64_HERE/build-rootfs.sh" "$ARM64_HERE/requirements.txt" \
        | { cat; echo "suite=$ARM64_SUITE"; } | sha256sum | cut -c1-16
}

arm64_tarball_path() {
    echo "$ARM64_CACHE/rootfs-$ARM64_SUITE-$(arm64_recipe_hash).tar.zst"
}

# Prints a reason and returns 1 when this machine cannot run aarch64 binaries; else
# registers qemu-aarch64 with binfmt_misc (mounting binfmt_misc first if needed).
arm64_check_machine() {
    if [ "$(id -u)" != 0 ]; then
        echo "not root (mounting binfmt_misc, debootstrap and chroot need root)"; return 1
    fi
    if [ "$(uname -m)" = aarch64 ]; then
        return 0  # native arm64: nothing to emulate (the chroot still isolates the install)
    fi
    local qemu=/usr/bin/qemu-aarch64-static
    if [ ! -x "$qemu" ]; then
        echo "qemu-aarch64-static missing (apt-get install qemu-user-static binfmt-support)"; return 1
    fi
    for tool in debootstrap zstd unshare chroot; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "$tool missing (apt-get install debootstrap zstd util-linux coreutils)"; return 1
        fi
    done
    if ! unshare --mount --propagation private true 2>/dev/null; then
        echo "cannot create a private mount namespace (container without CAP_SYS_ADMIN?)"; return 1
    fi
    local bm=/proc/sys/fs/binfmt_misc
    if [ ! -e "$bm/register" ]; then
        if ! mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null; then
            echo "cannot mount binfmt_misc at $bm (container without the privilege?)"; return 1
        fi
    fi
    if [ ! -e "$bm/qemu-aarch64" ]; then
        if command -v update-binfmts >/dev/null 2>&1; then
            update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
        fi
    fi
    if [ ! -e "$bm/qemu-aarch64" ]; then
        # Register by hand. F = open the interpreter now, so the chroot needs no copy of it.
        local magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
        local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
        if ! echo ":qemu-aarch64:M::$magic:$mask:$qemu:PF" > "$bm/register" 2>/dev/null; then
            echo "cannot register qemu-aarch64 with binfmt_misc"; return 1
        fi
    fi
    if [ "$(head -1 "$bm/qemu-aarch64")" != enabled ]; then
        echo 1 > "$bm/qemu-aarch64" 2>/dev/null || { echo "qemu-aarch64 binfmt entry is disabled"; return 1; }
    fi
    if ! grep -q '^flags: .*F' "$bm/qemu-aarch64"; then
        # Without F the kernel looks the interpreter up inside the chroot: give it a copy there.
        ARM64_COPY_QEMU="$(sed -n 's/^interpreter //p' "$bm/qemu-aarch64")"
        export ARM64_COPY_QEMU
    fi
    return 0
}

# The Debian mirror this machine's apt uses (same host for debootstrap), or deb.debian.org.
arm64_mirror() {
    if [ -n "${EDGEFLEET_ARM64_MIRROR:-}" ]; then echo "$EDGEFLEET_ARM64_MIRROR"; return; fi
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
            /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk '/^deb / && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            /etc/apt/sources.list)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# Copy what the chroot needs from the host each time: DNS, and any extra CA certificates
# this machine trusts (a TLS-inspecting egress proxy), so pip inside reaches PyPI.
arm64_sync_host_files() {
    local root="$1"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    # Appended to the bundle directly: update-ca-certificates under qemu takes ~30 s.
    local bundle="$root/etc/ssl/certs/ca-certificates.crt" crt
    if [ -f "$bundle" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        for crt in /usr/local/share/ca-certificates/*.crt; do
            if ! grep -qF "$(sed -n 2p "$crt")" "$bundle"; then
                { echo; cat "$crt"; } >> "$bundle"
            fi
        done
    fi
    if [ -n "${ARM64_COPY_QEMU:-}" ]; then
        mkdir -p "$root$(dirname "$ARM64_COPY_QEMU")"
        cp /usr/bin/qemu-aarch64-static "$root$ARM64_COPY_QEMU"
    fi
}

# chroot with a clean environment (no host PIP_*, SSL_*, proxies leak in). No mounts.
arm64_chroot_raw() {
    local root="$1"; shift
    env -i PATH="$ARM64_PATH" HOME=/root LANG=C.UTF-8 TERM=dumb \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
        ${ARM64_EXTRA_ENV:-} chroot "$root" "$@"
}

# Mount what a program in the rootfs needs. Call only inside a private mount namespace
# (unshare --mount --propagation private), so the mounts vanish with it even on a crash.
#   /proc with a fake arm64 /proc/cpuinfo (onnxruntime's cpuinfo otherwise reads the host's
#   x86 one under qemu-user and crashes on import); no /sys, for the same reason.
arm64_mount_all() {
    local root="$1"
    mkdir -p "$root/proc" "$root/dev" "$root/tmp"
    mount -t proc proc "$root/proc"
    mount --bind "$ARM64_HERE/cpuinfo.arm64" "$root/proc/cpuinfo"
    mount --bind /dev "$root/dev"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    if mountpoint -q /dev/pts; then mount --bind /dev/pts "$root/dev/pts" 2>/dev/null || true; fi
}

# Unmount everything under root (lazy, innermost first); safe to call twice.
arm64_umount_all() {
    local root="$1"
    [ -d "$root" ] || return 0
    local m
    for m in $(awk -v r="$root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

# Remove what earlier runs left behind: rootfs tarballs of other recipes, and work folders
# older than an hour with nothing mounted under them (a run killed with SIGKILL).
arm64_prune_cache() {
    local keep="$1" f d
    for f in "$ARM64_CACHE"/rootfs-*.tar.zst; do
        [ -e "$f" ] && [ "$f" != "$keep" ] && rm -f "$f" && arm64_log "pruned old rootfs $f"
    done
    for d in $(find "$ARM64_CACHE" -maxdepth 1 -type d \( -name 'run.*' -o -name 'build.*' \) -mmin +60 2>/dev/null); do
        if ! awk -v r="$d" 'index($2, r) == 1 {f = 1} END {exit !f}' /proc/self/mounts; then
            rm -rf "$d"
        fi
    done
}

# Copy the working tree (tracked + untracked, not ignored files; the whole tree minus build
# outputs when this is not a git checkout) into folder $1.
arm64_copy_tree() {
    local dest="$1"
    mkdir -p "$dest"
    if git -C "$ARM64_REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ARM64_REPO" ls-files -co --exclude-standard -z \
            | (cd "$ARM64_REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
            | tar -C "$ARM64_REPO" --null -T - -cf - | tar -C "$dest" -xf -
    else
        tar -C "$ARM64_REPO" --exclude=.git --exclude=.venv --exclude=build --exclude='*.egg-info' \
            --exclude=__pycache__ -cf - . | tar -C "$dest" -xf -
    fi
}
