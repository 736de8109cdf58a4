#!/bin/sh
# /init of the pi-check guest (busybox sh, PID 1). Mounts what the tests use, loads
# the kernel modules by path (the .deb ships no modules.dep), runs every test
# binary in /tests one after the other, and powers off. The host reads the console:
# lines starting with "PICHECK " are for it; the rest is the tests' own output.
# The applets in a directory of their own, last on PATH: the tests run `ip` and `tc`
# with execvp, which must find iproute2's (in /bin and /sbin); busybox's cannot make
# namespaces or name a veth peer. (This script's own commands are busybox applets:
# its shell prefers them.)
/bin/busybox mkdir -p /busybox
/bin/busybox --install -s /busybox
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/busybox
# iproute2's `ip` and its libraries come from Debian's arm64 packages; no ld.so.cache here.
export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu
export HOME=/root
# A test that would skip must fail here, as under CI.
export CI=true
export RUST_BACKTRACE=1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
ip link set lo up

echo "PICHECK KERNEL $(uname -r) $(uname -m) cpus=$(grep -c ^processor /proc/cpuinfo)"
for m in $(cat /modules/order); do
    if ! insmod "/modules/$m"; then
        echo "PICHECK INSMOD-FAILED $m"
    fi
done

# Each line: a test binary, then its libtest filters.
while read -r t filters; do
    echo "PICHECK BEGIN $t"
    start=$(cut -d. -f1 /proc/uptime)
    # shellcheck disable=SC2086 # the filters are separate words
    "/tests/$t" --test-threads=1 $filters < /dev/null
    rc=$?
    end=$(cut -d. -f1 /proc/uptime)
    echo "PICHECK END $t rc=$rc secs=$((end - start))"
done < /tests/order
echo "PICHECK DONE"
sync
poweroff -f
