#!/usr/bin/env bash
# The peer for guest-tests/run.sh's read-buffer migration (GUARDBLK_MIGRATE_READS=1): the same
# live migration of the same guest, with qemu-storage-daemon's vhost-user-blk export (QEMU's
# own libvhost-user, which logs every descriptor it writes) in place of guardblk. Under TCG,
# QEMU 7.2 corrupts the destination guest here too, which is why run.sh does not check read
# buffers by default (docs/RESTART.md §6).
#
# Usage: bash guest-tests/migrate-qsd.sh   (after guest-tests/run.sh, whose kernel, initramfs
# and image it reuses from guest-tests/work/)
# Prints the destination guest's verdict (a PASS/FAIL line, or its kernel panic).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN=$HERE/work/run
VMLINUZ=$(find "$HERE/work/kernel" -name 'vmlinuz-*' | head -n 1)
[[ -f $RUN/initrd.gz && -f $RUN/disk.img && -n $VMLINUZ ]] || {
    echo "migrate-qsd: run guest-tests/run.sh first (it builds the kernel, initramfs and image)" >&2
    exit 2
}
W=$(mktemp -d /tmp/guardblk-migrate-qsd.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; rm -rf "$W"' EXIT
cp "$RUN/disk.img" "$W/disk.img"

# One export per QEMU (the destination's daemon opens the same file: locking off).
for side in source destination; do
    qemu-storage-daemon \
        --blockdev driver=file,node-name=disk,filename="$W/disk.img",locking=off \
        --export type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path="$W/$side.sock",writable=on,num-queues=2 \
        >"$W/qsd-$side.log" 2>&1 &
    PIDS+=($!)
done
sleep 1

vm() {
    local side=$1
    shift
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 256M -nographic -no-reboot -nic none \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$VMLINUZ" -initrd "$RUN/initrd.gz" \
        -append "console=ttyS0 panic=-1 quiet guardblk.tests=migrate guardblk.migrate_reads=75" \
        -chardev socket,id=disk0,path="$W/$side.sock" -device vhost-user-blk-pci,chardev=disk0,num-queues=2 \
        -qmp unix:"$W/qmp-$side",server=on,wait=off "$@" </dev/null >"$W/$side.serial" 2>&1 &
    PIDS+=($!)
}
qmp() {
    printf '%s\n%s\n' '{"execute":"qmp_capabilities"}' "$2" |
        socat -t 2 - UNIX-CONNECT:"$1" 2>/dev/null | grep -v '"QMP"' | tail -n 1
}

vm source
for _ in $(seq 1 900); do grep -q "START migrate" "$W/source.serial" && break; sleep 0.2; done
sleep 4
vm destination -incoming unix:"$W/migration"
for _ in $(seq 1 150); do [[ -S $W/migration ]] && break; sleep 0.2; done
qmp "$W/qmp-source" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":33554432,"downtime-limit":300}}' >/dev/null
qmp "$W/qmp-source" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$W/migration\"}}" >/dev/null
status=""
for _ in $(seq 1 300); do
    status=$(qmp "$W/qmp-source" '{"execute":"query-migrate"}' | jq -r '.return.status // empty')
    [[ $status == completed || $status == failed ]] && break
    sleep 0.2
done
echo "migrate-qsd: migration $status"
qmp "$W/qmp-source" '{"execute":"quit"}' >/dev/null
for _ in $(seq 1 600); do grep -qaE "GUARDBLK-TEST (PASS|FAIL) migrate|Kernel panic|reboot: Power down" "$W/destination.serial" && break; sleep 0.2; done
sleep 1
echo "migrate-qsd: destination guest: $(grep -aEm1 "GUARDBLK-TEST (PASS|FAIL) migrate|Kernel panic.*" "$W/destination.serial" || echo "no verdict")"
