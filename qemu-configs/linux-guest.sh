#!/usr/bin/env bash
# Boot a Linux guest whose disk is served by guardblk.
#
# Start the daemon first:   guardblk serve disk.img --socket /run/guardblk.sock --queues 4
# Then run this script with your kernel/initrd or a bootable image on the guardblk disk.
#
# Why each piece:
# - memory-backend-memfd,share=on + -numa: vhost-user daemons map guest RAM; it must be
#   shared memory. The size must equal -m.
# - reconnect=1: if guardblk restarts, QEMU reconnects within a second instead of failing.
# - num-queues must not exceed guardblk's --queues; queue-size must not exceed --queue-size.
# - Add -accel kvm on hosts where KVM works (this project's CI uses TCG).
set -euo pipefail
SOCKET=${SOCKET:-/run/guardblk.sock}
MEM=${MEM:-2G}

exec qemu-system-x86_64 \
    -machine q35 -accel "${ACCEL:-kvm}" -cpu host -smp 4 -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
    -chardev socket,id=disk0,path="$SOCKET",reconnect=1 \
    -device vhost-user-blk-pci,chardev=disk0,num-queues=4,queue-size=256,bootindex=1 \
    -nographic "$@"
