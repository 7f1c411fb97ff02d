#!/usr/bin/env bash
# Install or boot a Windows guest on a guardblk disk.
#
# Start the daemon first:   guardblk serve win.img --socket /run/guardblk.sock --queues 4
#
# Windows has no in-box virtio-blk driver: attach the virtio-win ISO (from the Fedora
# virtio-win project) and, during setup, "Load driver" -> viostor\<version>\amd64. After
# installation the disk boots like any virtio-blk disk; vhost-user is invisible to the guest.
# Windows reuses page-file and hibernation buffers while their writes are in flight, which is
# exactly the traffic guardblk's mutation handling is built for.
#
# Why each piece: see linux-guest.sh (shared memfd RAM, reconnect=1, queue limits). UEFI
# firmware (OVMF, Debian package ovmf) is needed for Windows 11.
set -euo pipefail
SOCKET=${SOCKET:-/run/guardblk.sock}
MEM=${MEM:-4G}
WIN_ISO=${WIN_ISO:?set WIN_ISO to the Windows installation ISO}
VIRTIO_ISO=${VIRTIO_ISO:?set VIRTIO_ISO to virtio-win.iso}

exec qemu-system-x86_64 \
    -machine q35 -accel "${ACCEL:-kvm}" -cpu host -smp 4 -m "$MEM" \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
    -chardev socket,id=disk0,path="$SOCKET",reconnect=1 \
    -device vhost-user-blk-pci,chardev=disk0,num-queues=4,bootindex=0 \
    -drive file="$WIN_ISO",media=cdrom,index=1 \
    -drive file="$VIRTIO_ISO",media=cdrom,index=2 \
    -usb -device usb-tablet "$@"
