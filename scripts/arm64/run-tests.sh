#!/usr/bin/env bash
# Run the agent's arm64 tests: an emulated aarch64 Debian (qemu-user + binfmt_misc + chroot).
#
# Called by `make test-arm64` (and by hand: `sudo bash scripts/arm64/run-tests.sh` from the
# repository root). Steps:
#   1. check root + binfmt_misc + qemu-aarch64; print "SKIPPED: <reason>" and exit 0 when this
#      machine cannot run aarch64 binaries (not root, no binfmt_misc);
#   2. restore the cached arm64 rootfs tarball (build-rootfs.sh builds it once per recipe);
#   3. build the fixtures on the host (x86_64): models, inputs, onnxruntime reference outputs,
#      root-signed key list, signed offers, delta (tests/arm64/prepare_fixtures.py);
#   4. copy the working tree into the rootfs, build its wheel, `pip install "<wheel>[agent]"`
#      there (dependencies resolved on arm64: already in the cached venv, else from PyPI);
#   5. start Mosquitto on the host on a free port (the chroot shares the host network);
#   6. run pytest on tests/arm64 inside the chroot (the tests compare with the x86_64 outputs);
#   7. unmount and clean up on every exit path (private mount namespace + trap).
# Exit status: 0 passed or skipped, non-zero on a test or setup failure.
# Environment: EDGEFLEET_ARM64_CACHE (cache dir, default /var/cache/edgefleet-arm64),
# EDGEFLEET_ARM64_RESULTS (where results are copied, default build/arm64),
# EDGEFLEET_HOST_PYTHON (host interpreter with onnx + onnxruntime, default .venv/bin/python),
# EDGEFLEET_ARM64_PYTEST_ARGS (extra pytest arguments, e.g. "-k smoke").
set -euo pipefail
# shellcheck source=scripts/arm64/lib.sh
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"

t0=$(date +%s)
if ! reason="$(arm64_check_machine)"; then
    echo "SKIPPED: arm64 tests: $reason"
    exit 0
fi

cd "$ARM64_REPO"
host_python="${EDGEFLEET_HOST_PYTHON:-$ARM64_REPO/.venv/bin/python}"
[ -x "$host_python" ] || host_python="$(command -v python3)"
results_out="${EDGEFLEET_ARM64_RESULTS:-$ARM64_REPO/build/arm64}"
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
if [ ! -x "$mosquitto_bin" ]; then
    echo "arm64 tests: mosquitto not installed (apt-get install mosquitto)" >&2; exit 2
fi

tarball="$(bash "$ARM64_HERE/build-rootfs.sh" | tail -1)"
arm64_prune_cache "$tarball"

mkdir -p "$ARM64_CACHE"
work="$(mktemp -d "$ARM64_CACHE/run.XXXXXX")"
root="$work/rootfs"
broker_pid=""
cleanup() {
    local rc=$?
    if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    arm64_umount_all "$root"
    if [ -d "$root/srv/results" ]; then
        mkdir -p "$results_out"
        cp -r "$root/srv/results/." "$results_out/" 2>/dev/null || true
    fi
    [ -f "$work/mosquitto.log" ] && [ "$rc" != 0 ] && tail -20 "$work/mosquitto.log" >&2
    # Never rm -rf through a live mount.
    if awk -v r="$root" 'index($2, r) == 1 {f = 1} END {exit !f}' /proc/self/mounts; then
        arm64_log "mounts still active under $root; leaving $work in place"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$root"
zstd -q -dc "$tarball" | tar -C "$root" --numeric-owner -xf -
arm64_sync_host_files "$root"
t_restore=$(date +%s)
arm64_log "rootfs restored in $(( t_restore - t0 ))s"

# Fixtures, built on the host (x86_64) with onnx + onnxruntime there.
mkdir -p "$root/srv/fixtures" "$root/srv/results"
"$host_python" -m tests.arm64.prepare_fixtures "$root/srv/fixtures"

# The working tree as a board would get it (tracked + untracked, not ignored files).
arm64_copy_tree "$root/srv/src"
mkdir -p "$root/srv/t"
# The wheel is built on the host (pure Python, py3-none-any: the same file PyPI would serve);
# building it under qemu took ~4x longer. Its install and all dependencies happen on arm64.
"$host_python" -m pip wheel --quiet --no-deps --no-build-isolation --isolated \
    -w "$root/srv/dist" "$root/srv/src" >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log" >&2; exit 2; }
rm -rf "$root/srv/src/build"
# The tests run from a separate folder, so `import agent` / `import protos` resolve to the
# installed package, not the source tree.
cp -r "$root/srv/src/tests" "$root/srv/t/tests"

# Mosquitto on the host, loopback only.
port="$("$host_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
"$mosquitto_bin" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker_pid=$!
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    kill -0 "$broker_pid" 2>/dev/null || { arm64_log "mosquitto exited"; exit 2; }
    sleep 0.1
done

# Everything that touches mounts runs in a private mount namespace: the mounts vanish with
# it, whatever happens; the trap above is the second line of defence.
ARM64_EXTRA_ENV="EDGEFLEET_ARM64_FIXTURES=/srv/fixtures EDGEFLEET_ARM64_RESULTS=/srv/results EDGEFLEET_ARM64_MQTT_PORT=$port"
export ARM64_EXTRA_ENV
set +e
unshare --mount --propagation private bash -c '
    set -euo pipefail
    source "$1/lib.sh"
    root="$2"; shift 2
    arm64_mount_all "$root"
    t=$(date +%s)
    arm64_chroot_raw "$root" sh -c "python -m pip install --quiet \"\$(ls /srv/dist/edgefleet-*.whl)[agent]\""
    arm64_chroot_raw "$root" python -m pip check
    arm64_log "pip install \"edgefleet[agent]\" on arm64: $(( $(date +%s) - t ))s"
    arm64_chroot_raw "$root" sh -c "cd /srv/t && python -m pytest -p no:cacheprovider \
        --rootdir=/srv/t -c /dev/null --timeout=300 \
        -v -rs tests/arm64 --junitxml=/srv/results/junit.xml $*"
' _ "$ARM64_HERE" "$root" "${EDGEFLEET_ARM64_PYTEST_ARGS:-}"
rc=$?
set -e
arm64_log "arm64 tests finished with status $rc in $(( $(date +%s) - t0 ))s (results: $results_out)"
exit "$rc"
