#!/bin/sh
# /init of the guest-test initramfs (busybox ash, PID 1). Built and booted by run.sh.
#
# Prints one line per scenario for the host harness to parse:
#   GUARDBLK-TEST PASS <name>
#   GUARDBLK-TEST FAIL <name> <detail>
# then "GUARDBLK-TEST DONE" and powers off.
#
# Adding a scenario: write a function test_<name> that returns non-zero (after setting
# DETAIL) on failure, and add <name> to the default list in run.sh (GUARDBLK_TESTS).
# run.sh may also define host_prepare_<name> (before the daemon starts) and
# host_check_<name> (on the image after the guest has powered off).
# The list can also be overridden on the kernel command line with guardblk.tests=a,b,c.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# If anything below goes badly wrong, still power off: otherwise QEMU runs into the
# host's timeout and the failure is reported as a hang.
trap 'poweroff -f' EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
mount -t tmpfs tmpfs /tmp

# Layout and scenario list, written by run.sh so host and guest agree on offsets.
# shellcheck disable=SC1091
. /etc/guardblk-test.env
# shellcheck disable=SC2013 # kernel parameters are words
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        guardblk.tests=*) GUARDBLK_TESTS=${arg#guardblk.tests=} ;;
        guardblk.migrate_reads=*) MIGRATE_READ_PERCENT=${arg#guardblk.migrate_reads=} ;;
    esac
done

DISK=/dev/vda

say() { echo "GUARDBLK-TEST $*"; }
log() { echo "guest: $*"; }

# need DESCRIPTION CMD ARGS...: run CMD (output to the scenario log); on failure record
# DESCRIPTION as the failure detail. Use as: need "what" cmd ... || return 1
need() {
    desc=$1
    shift
    if ! "$@" >>"$TEST_LOG" 2>&1; then
        DETAIL="$desc failed"
        return 1
    fi
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Without modules.dep, insmod cannot resolve dependencies itself: retry in passes
# until every module is in (a module whose dependency is not loaded yet fails once).
load_modules() {
    pending=$(cat /lib/modules/order)
    pass=0
    while [ -n "$pending" ] && [ $pass -lt 5 ]; do
        pass=$((pass + 1))
        left=""
        for m in $pending; do
            if ! insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then
                # Built into this kernel or loaded already: nothing to do.
                grep -q "File exists" /tmp/insmod.err || left="$left $m"
            fi
        done
        pending=$left
    done
    if [ -n "$pending" ]; then
        log "could not load modules:$pending"
        cat /tmp/insmod.err
        return 1
    fi
}

wait_for_disk() {
    i=0
    while [ ! -b $DISK ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -b $DISK ]
}

# read_blocks FIRST COUNT: O_DIRECT read of logical blocks [FIRST, FIRST+COUNT) to
# /dev/null, in 1 MiB requests where the range allows (bs=4k throughout is slow under TCG).
read_blocks() {
    rb_first=$1
    rb_count=$2
    rb_per=$((1048576 / PI_INTERVAL))
    rb_head=$(((rb_per - rb_first % rb_per) % rb_per))
    [ $rb_head -gt "$rb_count" ] && rb_head=$rb_count
    if [ "$rb_head" -gt 0 ]; then
        dd if=$DISK of=/dev/null bs="$PI_INTERVAL" skip="$rb_first" count="$rb_head" iflag=direct || return 1
    fi
    rb_first=$((rb_first + rb_head))
    rb_count=$((rb_count - rb_head))
    rb_mib=$((rb_count / rb_per))
    if [ $rb_mib -gt 0 ]; then
        dd if=$DISK of=/dev/null bs=1M skip=$((rb_first / rb_per)) count=$rb_mib iflag=direct || return 1
    fi
    rb_first=$((rb_first + rb_mib * rb_per))
    rb_count=$((rb_count - rb_mib * rb_per))
    if [ $rb_count -gt 0 ]; then
        dd if=$DISK of=/dev/null bs="$PI_INTERVAL" skip="$rb_first" count=$rb_count iflag=direct || return 1
    fi
}

# --- scenarios --------------------------------------------------------------------------

# The disk has PI with PI_INTERVAL-byte protection intervals: the guest must see that as
# its logical block size (every other scenario's I/O is aligned to it), and the capacity
# run.sh created.
test_block_size() {
    lbs=$(cat /sys/block/vda/queue/logical_block_size)
    [ "$lbs" -eq "$PI_INTERVAL" ] || { DETAIL="logical_block_size is $lbs, expected $PI_INTERVAL"; return 1; }
    pbs=$(cat /sys/block/vda/queue/physical_block_size)
    [ "$pbs" -ge "$lbs" ] || { DETAIL="physical_block_size $pbs < logical_block_size $lbs"; return 1; }
    ss=$(blockdev --getss $DISK 2>>"$TEST_LOG")
    [ "$ss" = "$PI_INTERVAL" ] || { DETAIL="blockdev --getss says '$ss', expected $PI_INTERVAL"; return 1; }
    bytes=$(($(cat /sys/block/vda/size) * 512))
    [ $bytes -eq $((IMAGE_MIB << 20)) ] || { DETAIL="disk is $bytes bytes, expected $((IMAGE_MIB << 20))"; return 1; }
}

# A block of the image was corrupted behind the daemon's back before it started
# (run.sh: host_prepare_pi_corruption). Reading it must fail with an I/O error, by
# O_DIRECT and through the page cache, alone and inside a larger request; everything
# around it must read fine; rewriting it must heal it. run.sh then checks that the
# daemon logged and journalled exactly this block. Runs last: the whole-disk read also
# verifies the guard tags of everything the other scenarios wrote.
test_pi_corruption() {
    n=$CORRUPT_LBA
    bs=$PI_INTERVAL
    blocks=$(($(cat /sys/block/vda/size) * 512 / bs))
    sector=$((n * bs / 512))
    drop_caches

    if dd if=$DISK of=/tmp/blk bs="$bs" skip="$n" count=1 iflag=direct >>"$TEST_LOG" 2>&1; then
        DETAIL="O_DIRECT read of corrupted block $n succeeded ($(od -A d -c /tmp/blk | head -n 2 | tr '\n' ' '))"
        return 1
    fi
    # The failure must be the device's I/O error on that block, not e.g. EINVAL.
    if ! dmesg | grep -q "I/O error, dev vda, sector $sector "; then
        DETAIL="read of block $n failed, but dmesg has no 'I/O error, dev vda, sector $sector'"
        dmesg | grep -i "vda" | tail -n 5 >>"$TEST_LOG"
        return 1
    fi
    need "O_DIRECT read of block $((n - 1))" dd if=$DISK of=/dev/null bs="$bs" skip=$((n - 1)) count=1 iflag=direct || return 1
    need "O_DIRECT read of block $((n + 1))" dd if=$DISK of=/dev/null bs="$bs" skip=$((n + 1)) count=1 iflag=direct || return 1

    # A 64 KiB request containing the block fails as a whole.
    per=$((65536 / bs))
    if dd if=$DISK of=/dev/null bs=64k skip=$((n / per)) count=1 iflag=direct >>"$TEST_LOG" 2>&1; then
        DETAIL="O_DIRECT 64 KiB read containing corrupted block $n succeeded"
        return 1
    fi
    # Through the page cache (readahead, then the kernel's single-page retry).
    drop_caches
    if dd if=$DISK of=/dev/null bs="$bs" skip="$n" count=1 >>"$TEST_LOG" 2>&1; then
        DETAIL="buffered read of corrupted block $n succeeded"
        return 1
    fi

    need "O_DIRECT read of blocks [0, $n)" read_blocks 0 "$n" || return 1
    need "O_DIRECT read of blocks [$((n + 1)), $blocks)" read_blocks $((n + 1)) $((blocks - n - 1)) || return 1

    # A full-block write replaces data and guard tag: the block reads back fine.
    head -c "$bs" /pattern.bin >/tmp/blk.new
    need "rewrite of block $n" dd if=/tmp/blk.new of=$DISK bs="$bs" seek="$n" count=1 oflag=direct conv=fsync,notrunc || return 1
    need "O_DIRECT read of rewritten block $n" dd if=$DISK of=/tmp/blk bs="$bs" skip="$n" count=1 iflag=direct || return 1
    if ! cmp /tmp/blk.new /tmp/blk >>"$TEST_LOG" 2>&1; then
        DETAIL="rewritten block $n reads back different data"
        return 1
    fi
    rm -f /tmp/blk /tmp/blk.new
}

# O_DIRECT write of the host-made pattern, split over both vCPUs so both virtqueues
# carry I/O, with different request sizes on the way back; read back after dropping
# caches (O_DIRECT and buffered) and compare. run.sh re-checks the bytes in the image.
test_o_direct_pattern() {
    nq=0
    for q in /sys/block/vda/mq/*; do [ -e "$q" ] && nq=$((nq + 1)); done
    [ "$nq" -eq "$QUEUES" ] || { DETAIL="guest sees $nq hardware queues, expected $QUEUES"; return 1; }
    half=$((PATTERN_MIB / 2))
    off=$PATTERN_OFFSET_MIB
    taskset 1 dd if=/pattern.bin of=$DISK bs=1M count=$half seek="$off" \
        oflag=direct conv=fsync,notrunc >>"$TEST_LOG" 2>&1 &
    w0=$!
    taskset 2 dd if=/pattern.bin of=$DISK bs=1M skip=$half count=$half \
        seek=$((off + half)) oflag=direct conv=fsync,notrunc >>"$TEST_LOG" 2>&1 &
    w1=$!
    wait $w0; s0=$?
    wait $w1; s1=$?
    [ $s0 -eq 0 ] || { DETAIL="O_DIRECT write (cpu0) failed"; return 1; }
    [ $s1 -eq 0 ] || { DETAIL="O_DIRECT write (cpu1) failed"; return 1; }
    drop_caches

    taskset 1 dd if=$DISK of=/tmp/rb.0 bs=64k skip=$((off * 16)) count=$((half * 16)) \
        iflag=direct >>"$TEST_LOG" 2>&1 &
    r0=$!
    taskset 2 dd if=$DISK of=/tmp/rb.1 bs=4k skip=$(((off + half) * 256)) \
        count=$(((PATTERN_MIB - half) * 256)) iflag=direct >>"$TEST_LOG" 2>&1 &
    r1=$!
    wait $r0; s0=$?
    wait $r1; s1=$?
    [ $s0 -eq 0 ] || { DETAIL="O_DIRECT read (cpu0) failed"; return 1; }
    [ $s1 -eq 0 ] || { DETAIL="O_DIRECT read (cpu1) failed"; return 1; }
    cat /tmp/rb.0 /tmp/rb.1 >/tmp/readback
    rm -f /tmp/rb.0 /tmp/rb.1
    if ! cmp /pattern.bin /tmp/readback >>"$TEST_LOG" 2>&1; then
        DETAIL="O_DIRECT read-back differs: $(cmp /pattern.bin /tmp/readback 2>&1 | head -n 1)"
        return 1
    fi

    drop_caches
    need "buffered read" dd if=$DISK of=/tmp/readback bs=1M skip="$off" count="$PATTERN_MIB" || return 1
    if ! cmp /pattern.bin /tmp/readback >>"$TEST_LOG" 2>&1; then
        DETAIL="buffered read-back differs: $(cmp /pattern.bin /tmp/readback 2>&1 | head -n 1)"
        return 1
    fi
    rm -f /tmp/readback
}

# ext2 (busybox mke2fs; the kernel's ext4 driver mounts it) on the first FS_MIB of the
# disk, away from the pattern. Files are verified here after a remount with cold
# caches, and by run.sh with e2fsck and debugfs on the image.
test_filesystem() {
    src=/tmp/fsdata
    rm -rf $src
    mkdir -p $src/notes
    cp /pattern.bin $src/pattern.bin
    cat /pattern.bin /pattern.bin /pattern.bin >$src/big.bin
    # Same recipe as make_fs_data in run.sh, which rebuilds the tree to compare against.
    i=1
    while [ $i -le 16 ]; do
        seq 1 $((i * 500)) >$src/notes/file-$i.txt
        i=$((i + 1))
    done
    (cd $src && find . -type f | sort | xargs sha256sum) >/tmp/MANIFEST.sha256

    need "mke2fs" mke2fs -F -b 4096 -L guardblk $DISK $((FS_MIB * 1024)) || return 1
    need "mount" mount -t ext2 $DISK /mnt || return 1
    need "copy files" cp -a $src/. /mnt/ || { umount /mnt; return 1; }
    cp /tmp/MANIFEST.sha256 /mnt/MANIFEST.sha256
    need "sync" sync || { umount /mnt; return 1; }
    need "umount" umount /mnt || return 1

    drop_caches
    need "read-only remount" mount -t ext2 -o ro $DISK /mnt || return 1
    if ! (cd /mnt && sha256sum -c /tmp/MANIFEST.sha256) >>"$TEST_LOG" 2>&1; then
        DETAIL="files differ after remount: $(cd /mnt && sha256sum -c /tmp/MANIFEST.sha256 2>&1 | grep -v ': OK$' | head -n 3 | tr '\n' ' ')"
        umount /mnt
        return 1
    fi
    need "final umount" umount /mnt || return 1
    rm -rf $src
}

# The device offers a guest-writable write-cache mode (VIRTIO_BLK_F_CONFIG_WCE).
# cache_type is virtio_blk's own attribute and reaches the device (a config-space
# write, which run.sh looks for in the daemon log); queue/write_cache only changes the
# block layer's view. Both must read back what was written.
test_write_cache() {
    wc=/sys/block/vda/queue/write_cache
    ct=/sys/block/vda/cache_type
    v=$(cat $wc)
    [ "$v" = "write back" ] || { DETAIL="queue/write_cache is '$v', expected 'write back'"; return 1; }
    [ -e $ct ] || { DETAIL="no $ct: CONFIG_WCE not negotiated"; return 1; }

    for mode in "write through" "write back"; do
        echo "$mode" >$ct 2>>"$TEST_LOG" || { DETAIL="writing '$mode' to cache_type failed"; return 1; }
        v=$(cat $ct)
        [ "$v" = "$mode" ] || { DETAIL="cache_type reads '$v' after writing '$mode'"; return 1; }
        v=$(cat $wc)
        [ "$v" = "$mode" ] || { DETAIL="queue/write_cache reads '$v' after cache_type='$mode'"; return 1; }
        # Some I/O in this mode, with a flush in write-back.
        need "write+fsync in '$mode'" dd if=/pattern.bin of=$DISK bs=4k count=16 \
            seek=$((SCRATCH_OFFSET_MIB * 256)) oflag=direct conv=fsync,notrunc || return 1
    done

    for mode in "write through" "write back"; do
        echo "$mode" >$wc 2>>"$TEST_LOG" || { DETAIL="writing '$mode' to queue/write_cache failed"; return 1; }
        v=$(cat $wc)
        [ "$v" = "$mode" ] || { DETAIL="queue/write_cache reads '$v' after writing '$mode'"; return 1; }
    done
}

# Kernel messages about failed I/O, after line $1 of dmesg (the scenario's start).
io_errors_since() {
    dmesg | tail -n +$(($1 + 1)) |
        grep -iE "I/O error|blk_update_request|critical (medium|target)|(Read|Write)-error on swap|Buffer I/O|out of memory|oom-kill|Killed process" |
        head -n 3
}

# Mirror gbtool's own report lines from the scenario log to the console (run.sh's log).
show_tool_output() {
    grep '^gbtool:' "$TEST_LOG" | sed 's/^/guest: /'
}

# fstests generic/761 in spirit: O_DIRECT writes (the kernel hands the user pages to
# virtio as they are) from a buffer another thread keeps overwriting while they are in
# flight, to [MUT_OFFSET_MIB, +MUT_MIB) of the scratch region. Every write, and every read
# of the region afterwards (into a buffer being overwritten too, then plainly), must
# succeed; a final known pattern must read back exactly (gbtool mutate-write). run.sh
# checks that the daemon saw the mutation and that the image scrubs clean; pi_corruption's
# whole-disk read verifies the region's guard tags once more.
test_mutating_writer() {
    d0=$(dmesg | wc -l)
    if ! gbtool mutate-write $DISK "$MUT_OFFSET_MIB" "$MUT_MIB" "$MUT_SECONDS" >>"$TEST_LOG" 2>&1; then
        DETAIL="gbtool mutate-write: $(grep 'gbtool: FAIL' "$TEST_LOG" | tail -n 1)"
        return 1
    fi
    show_tool_output
    errs=$(io_errors_since "$d0")
    [ -z "$errs" ] || { DETAIL="kernel reported: $(echo "$errs" | tr '\n' ' ')"; return 1; }
}

# The daemon dies under the guest's feet: run.sh kills it with SIGKILL three times and stops
# it once with SIGTERM while this runs, restarting it each time (QEMU reconnects, reconnect=1).
# Two O_DIRECT writers (one per CPU) keep rewriting their own MiB of
# [RESTART_OFFSET_MIB, +2) with rotating slices of the pattern and read each back; every
# write and read must succeed and every read-back must match, across all the restarts.
test_restart() {
    d0=$(dmesg | wc -l)
    say "START restart"
    end=$(($(date +%s) + RESTART_SECONDS))
    i=0
    while [ "$(date +%s)" -lt "$end" ]; do
        for w in 0 1; do
            src=$(((i + w) % PATTERN_MIB))
            seek=$(((RESTART_OFFSET_MIB + w) * 16))
            taskset $((w + 1)) sh -c "dd if=/pattern.bin of=$DISK bs=64k count=16 skip=$((src * 16)) seek=$seek oflag=direct conv=notrunc 2>/dev/null &&
                dd if=$DISK of=/tmp/restart.$w bs=64k count=16 skip=$seek iflag=direct 2>/dev/null &&
                dd if=/pattern.bin of=/tmp/expect.$w bs=64k count=16 skip=$((src * 16)) 2>/dev/null &&
                cmp /tmp/expect.$w /tmp/restart.$w" >>"$TEST_LOG" 2>&1 &
            eval "pid$w=\$!"
        done
        # shellcheck disable=SC2154 # set by the eval above
        wait "$pid0" || { DETAIL="round $i: writer 0 failed (write, read or compare)"; return 1; }
        # shellcheck disable=SC2154
        wait "$pid1" || { DETAIL="round $i: writer 1 failed (write, read or compare)"; return 1; }
        i=$((i + 1))
    done
    rm -f /tmp/restart.* /tmp/expect.*
    log "restart: $i rounds of 2 x 1 MiB O_DIRECT write + read-back, all verified"
    errs=$(io_errors_since "$d0")
    [ -z "$errs" ] || { DETAIL="kernel reported: $(echo "$errs" | tr '\n' ' ')"; return 1; }
}

# Live migration (a boot of its own: run.sh boots the guest with guardblk.tests=migrate and
# migrates it to a second QEMU while this runs). gbtool migrate-verify reads into thousands
# of buffers the daemon fills and the guest never writes, and checks after the migration
# that each still holds what was read into it, and that every block written reads back.
test_migrate() {
    d0=$(dmesg | wc -l)
    say "START migrate"
    if ! gbtool migrate-verify $DISK "$MIGRATE_OFFSET_MIB" "$MIGRATE_MIB" "$MIGRATE_SECONDS" "$MIGRATE_SLOTS" "${MIGRATE_READ_PERCENT:-0}" >>"$TEST_LOG" 2>&1; then
        DETAIL="gbtool migrate-verify: $(grep 'gbtool: FAIL' "$TEST_LOG" | tail -n 1)"
        return 1
    fi
    show_tool_output
    errs=$(io_errors_since "$d0")
    [ -z "$errs" ] || { DETAIL="kernel reported: $(echo "$errs" | tr '\n' ' ')"; return 1; }
}

# Swap on the second guardblk disk (vdb, its own daemon and image), then a program that
# uses SWAP_EXTRA_MIB more memory than the guest has available, sweeping over it from two
# threads (every page verified, then rewritten) for SWAP_SECONDS, then verifying every page
# (gbtool swap-churn).
# The kernel must really have swapped, both ways, without an I/O error or an OOM kill.
test_swap() {
    d2=/dev/vdb
    i=0
    while [ ! -b $d2 ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -b $d2 ] || { DETAIL="$d2 did not appear"; return 1; }
    bytes=$(($(cat /sys/block/vdb/size) * 512))
    [ $bytes -eq $((DISK2_MIB << 20)) ] || { DETAIL="$d2 is $bytes bytes, expected $((DISK2_MIB << 20)) (not the swap disk?)"; return 1; }
    need "mkswap $d2" mkswap $d2 || return 1
    need "swapon $d2" swapon $d2 || return 1
    d0=$(dmesg | wc -l)
    total_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
    swap_kb=$(awk '/^SwapFree:/ { print $2 }' /proc/meminfo)
    mib=$((avail_kb / 1024 + SWAP_EXTRA_MIB))
    log "swap: MemTotal ${total_kb} kB, MemAvailable ${avail_kb} kB, SwapFree ${swap_kb} kB; churning $mib MiB"
    if [ $((mib * 1024)) -ge $((avail_kb + swap_kb * 3 / 4)) ]; then
        DETAIL="$mib MiB would not fit in RAM + swap"
        swapoff $d2
        return 1
    fi
    gbtool swap-churn "$mib" "$SWAP_SECONDS" 2 >>"$TEST_LOG" 2>&1
    rc=$?
    show_tool_output
    log "swap: $(grep -E '^(SwapTotal|SwapFree)' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
    if ! swapoff $d2 >>"$TEST_LOG" 2>&1; then
        DETAIL="swapoff $d2 failed"
        return 1
    fi
    if [ $rc -ne 0 ]; then
        DETAIL="gbtool swap-churn exited $rc: $(grep 'gbtool: FAIL' "$TEST_LOG" | tail -n 1)"
        errs=$(io_errors_since "$d0")
        [ -n "$errs" ] && DETAIL="$DETAIL; kernel: $(echo "$errs" | tr '\n' ' ')"
        return 1
    fi
    errs=$(io_errors_since "$d0")
    [ -z "$errs" ] || { DETAIL="kernel reported: $(echo "$errs" | tr '\n' ' ')"; return 1; }
    out=$(grep -o 'pswpout +[0-9]*' "$TEST_LOG" | tail -n 1)
    in=$(grep -o 'pswpin +[0-9]*' "$TEST_LOG" | tail -n 1)
    # Pages: at least 16 MiB each way, or the test did not exercise swap.
    if ! [ "${out#pswpout +}" -ge 4096 ] 2>/dev/null || ! [ "${in#pswpin +}" -ge 4096 ] 2>/dev/null; then
        DETAIL="the kernel hardly swapped ($out, $in pages)"
        return 1
    fi
}

# --- main -------------------------------------------------------------------------------

if ! load_modules; then
    say FAIL boot "virtio modules did not load"
elif ! wait_for_disk; then
    say FAIL boot "$DISK did not appear"
else
    log "disk $DISK: $(cat /sys/block/vda/size) sectors, tests: $GUARDBLK_TESTS"
    for t in $(echo "$GUARDBLK_TESTS" | tr ',' ' '); do
        TEST_LOG=/tmp/test-$t.log
        : >"$TEST_LOG"
        DETAIL=""
        if ! command -v "test_$t" >/dev/null 2>&1; then
            say FAIL "$t" "no such scenario in init.sh"
            continue
        fi
        start=$(cut -d' ' -f1 /proc/uptime)
        if "test_$t"; then
            say PASS "$t"
        else
            say FAIL "$t" "${DETAIL:-returned non-zero}"
            # The scenario's own output, to diagnose from the serial log alone.
            sed 's/^/    | /' "$TEST_LOG" | tail -n 20
            dmesg | tail -n 20 | sed 's/^/    dmesg| /'
        fi
        log "$t took $(awk -v s="$start" '{ printf "%.1f", $1 - s }' /proc/uptime)s"
    done
fi
say DONE
sync
poweroff -f
