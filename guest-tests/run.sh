#!/usr/bin/env bash
# End-to-end guest test: a real Linux guest (Debian's cloud kernel + a busybox initramfs)
# boots under QEMU/TCG with its disk served by guardblk over vhost-user-blk, runs the
# scenarios in init.sh, powers off; then the image is checked from the host.
#
# Usage: bash guest-tests/run.sh
#   GUARDBLK_BIN=path         use this daemon binary instead of `cargo build --release`
#   GUARDBLK_TESTS=a,b        guest scenarios to run (default: all below)
#   GUARDBLK_QEMU_TIMEOUT=s   wall-clock limit for the guest (default 240)
#   GUARDBLK_LOG=filter       daemon log filter (default info)
#   GUARDBLK_TOOLS_BIN=path   use this static gbtool instead of building guest-tests/tools
#   GUARDBLK_SERVE_ARGS="..." extra `guardblk serve` options for every daemon, e.g.
#                             "--bounce never" (every mutation detected after the write) or
#                             "--no-mutation-check" (mutating_writer and swap must then fail);
#                             with "--bounce always" every write counts as bounced, so
#                             host:mutation_detected passes without proving detection
#   GUARDBLK_SWAP_SECONDS=s, GUARDBLK_SWAP_EXTRA_MIB=n   tune the swap scenario (see below)
#   GUARDBLK_MIGRATE=0        skip the live-migration boot (see below)
#   GUARDBLK_RBD=0            skip the boot on a Ceph RBD image (see below)
#   GUARDBLK_MIGRATE_READS=1  also run the read-buffer migration boots (see below; they fail
#                             under TCG because of QEMU, as guest-tests/migrate-qsd.sh shows)
#
# Needs (Debian): qemu-system-x86 busybox-static cpio e2fsprogs, plus apt/dpkg, perl and
# GNU coreutils/diffutils, which every Debian has. xz-utils/zstd only if the kernel's
# modules are compressed (bookworm's cloud kernel ships plain .ko). No /dev/kvm needed.
# The guest's workloads (guest-tests/tools, a Cargo project of its own) are built offline
# with the same toolchain as guardblk, as a static x86_64-unknown-linux-gnu binary
# (glibc's libc.a, from libc6-dev).
#
# mutating_writer and swap are guests that change buffers while the device writes them
# (docs/MUTATION.md): the daemon must notice (its disconnect line's counters), no guest I/O
# may fail and `guardblk scrub` must find every block intact. swap runs on a second disk
# (vdb) with a daemon and image of its own.
#
# restart: while the guest's writers verify every block they write, the host kills the
# daemon with SIGKILL seven times and stops it once with SIGTERM, starting it again each time
# on the same socket and image; QEMU reconnects (reconnect=1) and hands back the in-flight
# region, and the daemon resubmits what was left in flight (docs/RESTART.md).
#
# migrate (a boot of its own after the main one): the guest runs gbtool migrate-verify
# (O_DIRECT writes of versioned blocks from two threads) while the host live-migrates it (QMP
# `migrate`, bandwidth capped so most pages go while the guest runs) to a second QEMU started
# with -incoming on the same daemon socket; the daemon serves both frontends, logs its writes
# into guest memory (status bytes, used ring) in QEMU's dirty log, and hands the image over
# when the source stops. The destination guest must find every block at its last version, with
# no I/O error; the daemon must log the hand-over.
#
# With GUARDBLK_MIGRATE_READS=1, two more boots read into thousands of buffers during the
# migration (75 % reads), check each buffer after it, and run a control with
# GUARDBLK_UNSAFE_SKIP_DIRTY_LOG=1 (the daemon marks nothing). QEMU 7.2 under TCG corrupts the
# migrated guest whenever a vhost-user backend logs pages it wrote (qemu-storage-daemon's
# libvhost-user too: guest-tests/migrate-qsd.sh), so they are not run by default; the dirty
# log's page-by-page check is tests/migration.rs (docs/RESTART.md §6). Needs socat for QMP.
#
# rbd (a boot of its own at the end): a one-node Ceph cluster (tests/ceph/cluster.sh) with an
# rbd: image made by `guardblk create` with type 1 PI (tuples in the RBD image IMAGE.pi); the
# guest runs block_size, o_direct_pattern and filesystem on it; then the image is exported
# with `rbd export` for the same host checks, and `guardblk scrub rbd:...` must find it clean.
# Results are prefixed "rbd:". Needs ceph-mon, ceph-osd and ceph-common.
#
# Adding a scenario: a test_<name> function in init.sh, <name> in the default
# GUARDBLK_TESTS below, and optionally host_prepare_<name> (runs after the image is
# created, before the daemon starts; may append to SERVE_ARGS) and host_check_<name>
# (runs on the image after the guest powered off) in this file.
#
# The image has type 1 PI (4096-byte intervals, so a 4096-byte logical block size in the
# guest). Any guard error the daemon logs or journals at an LBA that no host_prepare_<name>
# hook corrupted on purpose (EXPECTED_GUARD_LBAS) fails the run: that is a false guard error.
#
# Prints a guard-error count line, then "N passed, M failed" last; exits 0 only if every
# guest scenario and host check passed. Everything it makes lives in guest-tests/work/ (gitignored): the kernel is
# downloaded once and reused; the run's image, logs and serial output are in work/run/.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
WORK=$HERE/work
RUN=$WORK/run
QEMU_TIMEOUT=${GUARDBLK_QEMU_TIMEOUT:-240}
# pi_corruption last: it reads back the whole disk, verifying what the others wrote.
GUARDBLK_TESTS=${GUARDBLK_TESTS:-block_size,o_direct_pattern,filesystem,write_cache,mutating_writer,swap,restart,pi_corruption}

# Disk layout (MiB), shared with the guest through /etc/guardblk-test.env. The gaps
# between regions must stay zero: a misdirected write lands there and is caught.
IMAGE_MIB=256
FS_MIB=128             # ext2 on [0, 128)
PATTERN_OFFSET_MIB=192 # pattern on [192, 200)
PATTERN_MIB=8
SCRATCH_OFFSET_MIB=224 # scenarios' throwaway writes on [224, 256)
# mutating_writer's region, inside the scratch region: after write_cache's writes at its
# start, before pi_corruption's block at 240 MiB.
MUT_OFFSET_MIB=228
MUT_MIB=8
MUT_SECONDS=5
# restart's region, inside the scratch region past pi_corruption's block; its writers run
# this long while run.sh kills and restarts the daemon at RESTART_AT seconds after it starts
# (SIGKILL at every one but the last, SIGTERM at the last).
RESTART_OFFSET_MIB=244
RESTART_SECONDS=24
RESTART_AT=(3 5 7 9 11 13 15 17)
# migrate's region, past restart's; its buffers (4 KiB each) and how long it reads. The
# migration starts MIGRATE_START_DELAY s after the scenario does and must be over before
# the MIGRATE_SECONDS are.
MIGRATE_OFFSET_MIB=248
MIGRATE_MIB=4
MIGRATE_SLOTS=4096
MIGRATE_SECONDS=30
MIGRATE_START_DELAY=4
# swap's disk: a second guardblk daemon serving an image of its own (the guest's vdb),
# only when swap is selected. Bigger than the guest's RAM, so swap space never runs out.
DISK2_MIB=512
# swap's program uses this much more memory than the guest has available, for this long.
SWAP_EXTRA_MIB=${GUARDBLK_SWAP_EXTRA_MIB:-64}
SWAP_SECONDS=${GUARDBLK_SWAP_SECONDS:-10}

# The image has type 1 PI with one guard tag per PI_INTERVAL bytes, which the guest sees
# as its logical block size; "LBA" below and in the daemon's guard errors counts those.
PI_INTERVAL=4096
# pi_corruption's block, corrupted behind the daemon's back: in the scratch region, 16 MiB
# past write_cache's writes at its start and far from any region a buffered read could
# read ahead into.
CORRUPT_LBA=$(((SCRATCH_OFFSET_MIB + 16) * (1 << 20) / PI_INTERVAL + 13))
# LBAs the daemon may name in guard errors (host_prepare_pi_corruption adds its block);
# a guard error anywhere else is a false positive and fails the run.
EXPECTED_GUARD_LBAS=()
GUARD_SUMMARY=""

# swap makes the guest use more memory than it has: the less it has, the sooner it swaps.
GUEST_MEM=256M
# Extra environment for the daemons launch_daemon starts (the migration control's knob).
DAEMON_ENV=()
# Extra daemon options a host_prepare_<name> hook may append to.
QUEUES=2
SERVE_ARGS=(--queues "$QUEUES")
# shellcheck disable=SC2206 # options, split on spaces
[[ -n ${GUARDBLK_SERVE_ARGS:-} ]] && SERVE_ARGS+=($GUARDBLK_SERVE_ARGS)

# Listed in dependency order is not required: deps are resolved from each module's
# modinfo and put first, and the guest retries anyway.
GUEST_MODULES=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

T0=$SECONDS
PASSED=0
FAILED=0
RESULTS=()
DAEMON_PID=""
DAEMON2_PID=""
QEMU_PID=""
SOCK_DIR=""
# Second disk (vdb), set up by a host_prepare hook that needs one (host_prepare_swap).
DISK2_IMG=""
# Counter lines for the summary (informational, not pass/fail).
NOTES=()

# Carriage returns and the firmware's terminal escapes, out of serial and daemon logs.
STRIP_TERM='s/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'

say() { echo "guest-tests: $*"; }
# Prefix of every result name (the rbd boot sets "rbd:").
RESULT_PREFIX=""
pass() {
    PASSED=$((PASSED + 1))
    RESULTS+=("PASS $RESULT_PREFIX$1")
}
fail() {
    FAILED=$((FAILED + 1))
    RESULTS+=("FAIL $RESULT_PREFIX$1: $2")
}
summary() {
    echo
    echo "== guest-tests results ($((SECONDS - T0)) s) =="
    local r
    for r in "${RESULTS[@]}"; do echo "  $r"; done
    [[ -n $GUARD_SUMMARY ]] && echo "$GUARD_SUMMARY"
    for r in "${NOTES[@]}"; do echo "$r"; done
    echo "$PASSED passed, $FAILED failed"
}
# Setup errors end the run but still produce the summary line CI reads.
die() {
    echo "guest-tests: error: $*" >&2
    fail setup "$*"
    summary
    exit 1
}

cleanup() {
    # TERM, not KILL: timeout passes it on to QEMU; KILL would orphan QEMU.
    [[ -n $QEMU_PID ]] && kill -TERM "$QEMU_PID" 2>/dev/null
    local pid
    for pid in "$DAEMON_PID" "$DAEMON2_PID"; do
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
    [[ -n $SOCK_DIR ]] && rm -rf "$SOCK_DIR"
}
trap cleanup EXIT
# Without this, a signal would end bash without running the EXIT trap.
trap 'exit 130' INT TERM

require_tools() {
    local t missing=()
    for t in qemu-system-x86_64 busybox cpio gzip dpkg-deb apt-get apt-cache e2fsck debugfs \
        perl cmp timeout jq socat; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (apt-get install qemu-system-x86 busybox-static cpio e2fsprogs jq socat)"
    BUSYBOX=$(command -v busybox)
    # A dynamic busybox (package "busybox") would not run in the initramfs.
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; install busybox-static"
    fi
}

# --- kernel ----------------------------------------------------------------------------

kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}

# Download and extract package $1 into $WORK/kernel/$1/root; .extracted marks success.
download_kernel() {
    local pkg=$1 dir=$WORK/kernel/$1 sandbox=()
    [[ -n $pkg ]] || return 1
    say "kernel: downloading $pkg"
    rm -rf "$dir"
    mkdir -p "$dir/deb"
    # As root, apt's download sandbox user _apt cannot write here; it only warns.
    ((EUID == 0)) && sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$dir/deb" && apt-get download "${sandbox[@]}" "$pkg") >"$WORK/kernel-download.log" 2>&1 ||
        ! dpkg-deb -x "$dir"/deb/*.deb "$dir/root"; then
        rm -rf "$dir"
        return 1
    fi
    rm -rf "$dir/deb"
    touch "$dir/.extracted"
}

# Sets VMLINUZ, KVER, MODDIR. Downloads and extracts only when the cache lacks this version.
fetch_kernel() {
    local pkg dir
    pkg=$(kernel_package)
    if [[ -z $pkg ]]; then
        # No apt lists yet (fresh machine before apt-get update): prefer any cached kernel.
        dir=$(printf '%s\n' "$WORK"/kernel/linux-image-*/ | sort -V | tail -n 1)
        if [[ -n $dir && -f $dir/.extracted ]]; then
            pkg=$(basename "$dir")
            say "apt-cache knows no linux-image-cloud-amd64; using cached $pkg"
        elif ((EUID == 0)); then
            apt-get update -qq >/dev/null 2>&1
            pkg=$(kernel_package)
        fi
    fi
    [[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
    dir=$WORK/kernel/$pkg
    if [[ -f $dir/.extracted ]]; then
        say "kernel: $pkg (cached)"
    else
        if ! download_kernel "$pkg"; then
            ((EUID == 0)) || die "apt-get download $pkg failed: $(tail -n 3 "$WORK/kernel-download.log")"
            # Stale apt lists name a package the mirror has since replaced.
            say "download failed; refreshing apt lists and retrying"
            apt-get update -qq >/dev/null 2>&1
            pkg=$(kernel_package)
            dir=$WORK/kernel/$pkg
            download_kernel "$pkg" ||
                die "apt-get download $pkg failed: $(tail -n 3 "$WORK/kernel-download.log")"
        fi
        # Superseded kernels are ~130 MB each extracted.
        find "$WORK/kernel" -mindepth 1 -maxdepth 1 -type d ! -name "$pkg" -exec rm -rf {} +
    fi
    VMLINUZ=$(printf '%s\n' "$dir"/root/boot/vmlinuz-* | head -n 1)
    [[ -f $VMLINUZ ]] || die "no boot/vmlinuz-* in $pkg"
    KVER=${VMLINUZ##*/vmlinuz-}
    for MODDIR in "$dir/root/lib/modules/$KVER" "$dir/root/usr/lib/modules/$KVER"; do
        [[ -d $MODDIR ]] && return 0
    done
    die "no modules directory for $KVER in $pkg"
}

# --- initramfs -------------------------------------------------------------------------

# Deterministic, position-stamped pattern: each 512-byte sector starts with a magic and
# its absolute disk sector number, then xorshift64 noise. A sector written to the wrong
# place, or served from the wrong place, cannot compare equal.
make_pattern() {
    perl -e '
        my ($mib, $first_sector) = @ARGV;
        my $x = 0x9E3779B97F4A7C15;
        my $mask = 0xFFFFFFFFFFFFFFFF;
        binmode STDOUT;
        for my $s (0 .. $mib * 2048 - 1) {
            my @w;
            for (1 .. 62) {
                $x ^= ($x << 13) & $mask;
                $x ^= $x >> 7;
                $x ^= ($x << 17) & $mask;
                push @w, $x;
            }
            print pack("a8 Q<", "GBLKPAT", $first_sector + $s), pack("Q<62", @w);
        }' "$PATTERN_MIB" $((PATTERN_OFFSET_MIB * 2048)) >"$1"
    [[ $(stat -c %s "$1") -eq $((PATTERN_MIB << 20)) ]] || die "pattern generation failed"
}

# Same tree test_filesystem (init.sh) writes; the host compares the image against it.
make_fs_data() {
    local dir=$1 i
    mkdir -p "$dir/notes"
    cp "$RUN/pattern.bin" "$dir/pattern.bin"
    cat "$RUN/pattern.bin" "$RUN/pattern.bin" "$RUN/pattern.bin" >"$dir/big.bin"
    for i in $(seq 1 16); do seq 1 $((i * 500)) >"$dir/notes/file-$i.txt"; done
}

declare -A MOD_FILE MOD_ADDED
MOD_ORDER=()

# Copy module $1 (and, first, its dependencies) into the initramfs, uncompressed:
# busybox insmod cannot be relied on to decompress.
add_module() {
    local m=${1//-/_} src out deps d
    [[ -n ${MOD_ADDED[$m]:-} ]] && return 0
    MOD_ADDED[$m]=1
    src=${MOD_FILE[$m]:-}
    if [[ -z $src ]]; then
        grep -Eq "/${m//_/[-_]}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null && return 0
        die "kernel module $m not found under $MODDIR"
    fi
    out=$INITRD_ROOT/lib/modules/$m.ko
    case $src in
    *.ko) cp "$src" "$out" ;;
    *.ko.xz) xz -dc "$src" >"$out" || die "cannot decompress $src (install xz-utils)" ;;
    *.ko.zst) zstd -qdc "$src" >"$out" || die "cannot decompress $src (install zstd)" ;;
    *.ko.gz) gzip -dc "$src" >"$out" || die "cannot decompress $src" ;;
    esac
    deps=$(tr '\0' '\n' <"$out" | sed -n 's/^depends=//p' | head -n 1)
    for d in ${deps//,/ }; do add_module "$d"; done
    MOD_ORDER+=("$m")
}

build_initramfs() {
    INITRD_ROOT=$RUN/initramfs
    mkdir -p "$INITRD_ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,lib/modules}
    cp "$BUSYBOX" "$INITRD_ROOT/bin/busybox"
    local applet
    while read -r applet; do
        [[ $applet == bin/busybox || -e $INITRD_ROOT/$applet ]] && continue
        ln -s /bin/busybox "$INITRD_ROOT/$applet"
    done < <("$BUSYBOX" --list-full)

    local f b
    while IFS= read -r -d '' f; do
        b=${f##*/}
        b=${b%%.ko*}
        MOD_FILE[${b//-/_}]=$f
    done < <(find "$MODDIR/kernel" \( -name '*.ko' -o -name '*.ko.*' \) -print0)
    for f in "${GUEST_MODULES[@]}"; do add_module "$f"; done
    printf '%s\n' "${MOD_ORDER[@]}" >"$INITRD_ROOT/lib/modules/order"

    cp "$RUN/pattern.bin" "$INITRD_ROOT/pattern.bin"
    install -m 0755 "$GBTOOL" "$INITRD_ROOT/bin/gbtool"
    cat >"$INITRD_ROOT/etc/guardblk-test.env" <<EOF
GUARDBLK_TESTS=$GUARDBLK_TESTS
FS_MIB=$FS_MIB
PATTERN_OFFSET_MIB=$PATTERN_OFFSET_MIB
PATTERN_MIB=$PATTERN_MIB
SCRATCH_OFFSET_MIB=$SCRATCH_OFFSET_MIB
IMAGE_MIB=$IMAGE_MIB
PI_INTERVAL=$PI_INTERVAL
CORRUPT_LBA=$CORRUPT_LBA
QUEUES=$QUEUES
MUT_OFFSET_MIB=$MUT_OFFSET_MIB
MUT_MIB=$MUT_MIB
MUT_SECONDS=$MUT_SECONDS
RESTART_OFFSET_MIB=$RESTART_OFFSET_MIB
RESTART_SECONDS=$RESTART_SECONDS
DISK2_MIB=$DISK2_MIB
SWAP_SECONDS=$SWAP_SECONDS
SWAP_EXTRA_MIB=$SWAP_EXTRA_MIB
MIGRATE_OFFSET_MIB=$MIGRATE_OFFSET_MIB
MIGRATE_MIB=$MIGRATE_MIB
MIGRATE_SLOTS=$MIGRATE_SLOTS
MIGRATE_SECONDS=$MIGRATE_SECONDS
EOF
    install -m 0755 "$HERE/init.sh" "$INITRD_ROOT/init"
    (cd "$INITRD_ROOT" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -1 >"$RUN/initrd.gz" ||
        die "cpio/gzip of the initramfs failed"
}

# --- guest tools ------------------------------------------------------------------------

# gbtool (guest-tests/tools): the workloads busybox has no applet for, as a static binary
# (the initramfs has no libc). Its own Cargo project, built offline: its only dependency,
# libc, is one guardblk already has.
build_tools() {
    if [[ -n ${GUARDBLK_TOOLS_BIN:-} ]]; then
        [[ -x $GUARDBLK_TOOLS_BIN ]] || die "GUARDBLK_TOOLS_BIN=$GUARDBLK_TOOLS_BIN is not executable"
        GBTOOL=$GUARDBLK_TOOLS_BIN
    else
        say "building gbtool (guest-tests/tools, static)"
        (cd "$HERE/tools" && CARGO_TARGET_DIR=$HERE/tools/target RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --offline --target x86_64-unknown-linux-gnu) >"$RUN/tools-build.log" 2>&1 ||
            die "building guest-tests/tools failed: $(tail -n 20 "$RUN/tools-build.log")"
        GBTOOL=$HERE/tools/target/x86_64-unknown-linux-gnu/release/gbtool
    fi
    # A dynamically linked gbtool would not run in the initramfs (static-pie: ldd says
    # "statically linked", plain static: "not a dynamic executable").
    if ! LC_ALL=C ldd "$GBTOOL" 2>&1 | grep -qE "statically linked|not a dynamic executable"; then
        die "$GBTOOL is dynamically linked: $(ldd "$GBTOOL" 2>&1 | head -n 2 | tr '\n' ' ')"
    fi
}

# --- daemon ----------------------------------------------------------------------------

build_daemon() {
    if [[ -n ${GUARDBLK_BIN:-} ]]; then
        [[ -x $GUARDBLK_BIN ]] || die "GUARDBLK_BIN=$GUARDBLK_BIN is not executable"
        return 0
    fi
    say "building guardblk (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin guardblk) >"$RUN/build.log" 2>&1 ||
        die "cargo build failed: $(tail -n 20 "$RUN/build.log")"
    GUARDBLK_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/guardblk
    [[ -x $GUARDBLK_BIN ]] || die "built, but $GUARDBLK_BIN is missing"
}

create_image() {
    IMG=$RUN/disk.img
    # Metadata in $IMG.pi; guard errors are journalled to $JOURNAL.
    JOURNAL=$IMG.pi-journal.jsonl
    "$GUARDBLK_BIN" create "$IMG" --size "${IMAGE_MIB}M" --pi type1 --interval "$PI_INTERVAL" \
        >"$RUN/create.log" 2>&1 ||
        die "guardblk create failed: $(cat "$RUN/create.log")"
}

# Call $1_<scenario> for every selected scenario that has one.
run_hooks() {
    local t
    for t in ${GUARDBLK_TESTS//,/ }; do
        if declare -F "$1_$t" >/dev/null; then "$1_$t"; fi
    done
}

# launch_daemon IMAGE SOCKET LOG OUT: start a daemon serving IMAGE, wait until it is ready;
# sets LAUNCHED_PID.
launch_daemon() {
    local img=$1 sock=$2 log=$3 out=$4 i
    # NO_COLOR: tracing would otherwise put ANSI colour codes in the log file.
    # The stats document (per-session counters) goes beside the log: ${log%.log}-stats.json.
    env "${DAEMON_ENV[@]}" NO_COLOR=1 RUST_LOG="${GUARDBLK_LOG:-info}" "$GUARDBLK_BIN" serve "$img" --socket "$sock" \
        --stats-file "${log%.log}-stats.json" "${SERVE_ARGS[@]}" \
        >"$out" 2>"$log" </dev/null &
    LAUNCHED_PID=$!
    for i in $(seq 1 300); do
        grep -q "guardblk ready" "$log" && [[ -S $sock ]] && return 0
        kill -0 "$LAUNCHED_PID" 2>/dev/null || die "daemon for $img exited during startup: $(tail -n 5 "$log")"
        sleep 0.1
    done
    die "daemon for $img not ready after 30 s: $(tail -n 5 "$log")"
}

start_daemon() {
    DAEMON_LOG=$RUN/daemon.log
    SOCK=$SOCK_DIR/guardblk.sock
    launch_daemon "$IMG" "$SOCK" "$DAEMON_LOG" "$RUN/daemon.out"
    DAEMON_PID=$LAUNCHED_PID
    if [[ -n $DISK2_IMG ]]; then
        DAEMON2_LOG=$RUN/daemon2.log
        SOCK2=$SOCK_DIR/guardblk2.sock
        launch_daemon "$DISK2_IMG" "$SOCK2" "$DAEMON2_LOG" "$RUN/daemon2.out"
        DAEMON2_PID=$LAUNCHED_PID
    fi
}

# stop_one PID SOCKET LOG NAME: SIGTERM must end the daemon promptly, with status 0,
# removing its socket (result NAME).
stop_one() {
    local pid=$1 sock=$2 log=$3 name=$4 i rc
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        fail "$name" "still running 15 s after SIGTERM (killed)"
        return
    fi
    wait "$pid"
    rc=$?
    # In case a colour-forcing environment beat NO_COLOR: the checks grep plain text.
    sed -i "$STRIP_TERM" "$log"
    if ((rc != 0)); then
        fail "$name" "exit status $rc after SIGTERM"
    elif [[ -e $sock || -e $sock.stats ]]; then
        fail "$name" "socket $sock or $sock.stats left behind"
    else
        pass "$name"
    fi
}

stop_daemon() {
    stop_one "$DAEMON_PID" "$SOCK" "$DAEMON_LOG" daemon_clean_stop
    DAEMON_PID=""
    if [[ -n $DAEMON2_PID ]]; then
        stop_one "$DAEMON2_PID" "$SOCK2" "$DAEMON2_LOG" daemon2_clean_stop
        DAEMON2_PID=""
    fi
}

# --- QEMU ------------------------------------------------------------------------------

run_guest() {
    say "booting guest (TCG, timeout ${QEMU_TIMEOUT}s); serial output follows"
    local start=$SECONDS rc daemon_died="" disk2=()
    : >"$RUN/serial.raw"
    # The second disk's PCI slot comes after the first's: the guest names it vdb.
    # shellcheck disable=SC2054 # commas inside QEMU option values
    [[ -n $DAEMON2_PID ]] && disk2=(-chardev socket,id=disk1,path="$SOCK2",reconnect=1
        -device vhost-user-blk-pci,chardev=disk1,num-queues="$QUEUES")
    timeout --kill-after=10 "$QEMU_TIMEOUT" \
        qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m "$GUEST_MEM" \
        -nographic -no-reboot -nic none \
        -object memory-backend-memfd,id=mem,size="$GUEST_MEM",share=on -numa node,memdev=mem \
        -kernel "$VMLINUZ" -initrd "$RUN/initrd.gz" \
        -append "console=ttyS0 panic=-1 quiet" \
        -chardev socket,id=disk0,path="$SOCK",reconnect=1 \
        -device vhost-user-blk-pci,chardev=disk0,num-queues="$QUEUES" "${disk2[@]}" \
        </dev/null >"$RUN/serial.raw" 2>"$RUN/qemu.err" &
    QEMU_PID=$!
    # Live copy of the serial console for CI logs; ends by itself when QEMU does.
    tail -n +1 -f --pid="$QEMU_PID" "$RUN/serial.raw" | sed -u "$STRIP_TERM; s/^/  serial| /" &
    local tail_pid=$!
    # With reconnect=1 QEMU stalls the guest's I/O instead of failing it when the daemon
    # dies, so a dead daemon would only show up as a timeout: stop early instead.
    local restart_start="" next_restart=0
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [[ ,$GUARDBLK_TESTS, == *,restart,* ]] && ((next_restart < ${#RESTART_AT[@]})); then
            if [[ -z $restart_start ]] && grep -q "GUARDBLK-TEST START restart" "$RUN/serial.raw"; then
                restart_start=$SECONDS
            fi
            if [[ -n $restart_start ]] && ((SECONDS - restart_start >= RESTART_AT[next_restart])); then
                next_restart=$((next_restart + 1))
                restart_daemon "$next_restart" "$( ((next_restart < ${#RESTART_AT[@]})) && echo KILL || echo TERM)"
            fi
        fi
        if ! kill -0 "$DAEMON_PID" 2>/dev/null ||
            { [[ -n $DAEMON2_PID ]] && ! kill -0 "$DAEMON2_PID" 2>/dev/null; }; then
            daemon_died=1
            kill -TERM "$QEMU_PID" 2>/dev/null
            break
        fi
        sleep 0.2
    done
    wait "$QEMU_PID"
    rc=$?
    QEMU_PID=""
    wait "$tail_pid" 2>/dev/null
    sed "$STRIP_TERM" "$RUN/serial.raw" >"$RUN/serial.log"
    GUEST_SECONDS=$((SECONDS - start))
    if [[ -n $daemon_died ]]; then
        fail qemu_exit "a daemon exited while the guest was running: $(tail -n 3 "$DAEMON_LOG" ${DAEMON2_LOG:+"$DAEMON2_LOG"})"
    elif ((rc == 124 || rc == 137)); then
        fail qemu_exit "guest still running after ${QEMU_TIMEOUT}s (timeout)"
    elif ((rc != 0)); then
        fail qemu_exit "qemu exited with status $rc: $(tail -n 5 "$RUN/qemu.err")"
    elif ! grep -q "GUARDBLK-TEST DONE" "$RUN/serial.log"; then
        fail qemu_exit "guest powered off without GUARDBLK-TEST DONE"
    else
        pass qemu_exit
    fi
    say "guest ran ${GUEST_SECONDS}s"
}

# restart_daemon N SIGNAL: stop the vda daemon with SIGNAL (KILL: a crash; TERM: an upgrade)
# and start it again on the same socket and image, logging to daemon-restart-N.log; the
# earlier incarnation's log is kept as DAEMON_LOG was. A killed daemon's image lock can
# outlive it for a moment (io_uring teardown), so the start is retried for 5 s.
RESTART_LOGS=()
RESTART_EVENTS=()
# The stats document of each incarnation taken just before it was stopped (a SIGKILLed daemon
# never ends its session, so its counters live only there); `counter` adds them up.
INCARNATION_STATS=()
restart_daemon() {
    local n=$1 sig=$2 t0=$SECONDS log tries
    "$GUARDBLK_BIN" stats --socket "$SOCK" --json >"$RUN/daemon-stats-incarnation-$n.json" 2>/dev/null &&
        INCARNATION_STATS+=("$RUN/daemon-stats-incarnation-$n.json")
    kill -"$sig" "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
    RESTART_LOGS+=("$DAEMON_LOG")
    log=$RUN/daemon-restart-$n.log
    for tries in $(seq 1 25); do
        if NO_COLOR=1 RUST_LOG=${GUARDBLK_LOG:-info} "$GUARDBLK_BIN" serve "$IMG" --socket "$SOCK" \
            --stats-file "$DAEMON_STATS" "${SERVE_ARGS[@]}" >>"$RUN/daemon.out" 2>"$log" </dev/null &
        then
            DAEMON_PID=$!
        fi
        local i
        for i in $(seq 1 50); do
            grep -q "guardblk ready" "$log" && break 2
            kill -0 "$DAEMON_PID" 2>/dev/null || break
            sleep 0.1
        done
        sleep 0.2
    done
    DAEMON_LOG=$log
    RESTART_EVENTS+=("$sig after $((SECONDS - t0))s, $tries start(s)")
    say "restart $n: SIG$sig, daemon serving again (pid $DAEMON_PID) after $((SECONDS - t0))s"
}

collect_guest_results() {
    local t line
    for t in ${GUARDBLK_TESTS//,/ }; do
        if grep -Eq "GUARDBLK-TEST PASS $t( |\$)" "$RUN/serial.log"; then
            pass "guest:$t"
        elif line=$(grep -Em1 "GUARDBLK-TEST FAIL $t( |\$)" "$RUN/serial.log"); then
            fail "guest:$t" "${line#*GUARDBLK-TEST FAIL "$t" }"
        else
            fail "guest:$t" "no result line (guest died or hung before it)"
        fi
    done
    # Failures outside the scenario list (e.g. boot).
    while IFS= read -r line; do
        t=${line#*GUARDBLK-TEST FAIL }
        [[ ,$GUARDBLK_TESTS, == *",${t%% *},"* ]] && continue
        fail "guest:${t%% *}" "${t#* }"
    done < <(grep "GUARDBLK-TEST FAIL " "$RUN/serial.log")
}

# --- host-side checks on the image (after the guest powered off) --------------------------

# Regions no scenario writes must still read as zero.
host_untouched_regions() {
    local a b bad=""
    for range in "$FS_MIB $PATTERN_OFFSET_MIB" "$((PATTERN_OFFSET_MIB + PATTERN_MIB)) $SCRATCH_OFFSET_MIB"; do
        read -r a b <<<"$range"
        cmp --ignore-initial=$((a << 20)):0 --bytes=$(((b - a) << 20)) "$IMG" /dev/zero >/dev/null 2>&1 ||
            bad+=" [${a}M,${b}M)"
    done
    if [[ -z $bad ]]; then pass host:untouched_regions_zero; else fail host:untouched_regions_zero "non-zero bytes in$bad"; fi
}

host_check_o_direct_pattern() {
    local out
    if out=$(cmp --ignore-initial=0:$((PATTERN_OFFSET_MIB << 20)) --bytes=$((PATTERN_MIB << 20)) \
        "$RUN/pattern.bin" "$IMG" 2>&1); then
        pass host:pattern_in_image
    else
        local byte
        byte=$(sed -n 's/.* differ: byte \([0-9]*\).*/\1/p' <<<"$out")
        if [[ -n $byte ]]; then
            byte=$((byte - 1 + (PATTERN_OFFSET_MIB << 20)))
            out="first difference at image byte $byte (sector $((byte / 512)))"
        fi
        fail host:pattern_in_image "image differs from the pattern written at ${PATTERN_OFFSET_MIB}M: $out"
    fi
}

host_check_filesystem() {
    local fs=$RUN/fs.img out
    dd if="$IMG" of="$fs" bs=1M count="$FS_MIB" conv=sparse status=none
    if out=$(e2fsck -fn "$fs" 2>&1); then
        pass host:fs_fsck_clean
    else
        fail host:fs_fsck_clean "e2fsck -fn: $(echo "$out" | tail -n 5 | tr '\n' ' ')"
    fi

    local dump=$RUN/fs-dump expect=$RUN/fs-expected
    rm -rf "$dump" "$expect"
    mkdir -p "$dump"
    make_fs_data "$expect"
    (cd "$expect" && find . -type f | LC_ALL=C sort | xargs sha256sum) >"$RUN/fs-expected.sha256"
    debugfs -R "rdump / $dump" "$fs" >"$RUN/debugfs.log" 2>&1
    if ! out=$(cd "$dump" && sha256sum --quiet -c "$RUN/fs-expected.sha256" 2>&1); then
        fail host:fs_content "files read with debugfs differ: $(echo "$out" | head -n 3 | tr '\n' ' ')"
    elif ! diff -q <(LC_ALL=C sort "$RUN/fs-expected.sha256") <(LC_ALL=C sort "$dump/MANIFEST.sha256") >/dev/null 2>&1; then
        fail host:fs_content "guest's MANIFEST.sha256 differs from the host's expectation"
    else
        pass host:fs_content
    fi
    rm -rf "$dump" "$expect" "$fs"
}

# cache_type writes are config-space writes; the daemon logs each mode change.
host_check_write_cache() {
    local modes
    # Every incarnation of the daemon (restart restarts it), in order.
    modes=$(cat "${RESTART_LOGS[@]}" "$DAEMON_LOG" | grep "guest changed the write-cache mode" | grep -o 'mode="\?[a-z]*' | sed 's/mode="\?//' | tr '\n' ' ')
    if [[ $modes == "writethrough writeback " ]]; then
        pass host:wce_reached_daemon
    else
        fail host:wce_reached_daemon "daemon saw mode changes '${modes% }', expected 'writethrough writeback'"
    fi
}

# pi_corruption: corrupt one unwritten block of the image before the daemon starts, with
# `guardblk inject` where this daemon has it, else by writing into the raw image file. An
# unwritten block must read as zeros, so the bytes are a guard error on the next read.
host_prepare_pi_corruption() {
    local out
    CORRUPT_HOW=""
    if "$GUARDBLK_BIN" inject --help >/dev/null 2>&1; then
        if out=$("$GUARDBLK_BIN" inject "$IMG" --lba "$CORRUPT_LBA" --kind data 2>&1); then
            CORRUPT_HOW="guardblk inject --kind data"
        else
            fail host:pi_corruption_inject "guardblk inject --lba $CORRUPT_LBA --kind data: $(tail -n 3 <<<"$out" | tr '\n' ' ')(falling back to a raw write)"
        fi
    fi
    if [[ -z $CORRUPT_HOW ]]; then
        printf 'GUARDBLK-CORRUPT' |
            dd of="$IMG" bs=1 seek=$((CORRUPT_LBA * PI_INTERVAL + 100)) conv=notrunc status=none ||
            die "cannot write into $IMG"
        CORRUPT_HOW="raw write into the image"
    fi
    EXPECTED_GUARD_LBAS+=("$CORRUPT_LBA")
    say "pi_corruption: block $CORRUPT_LBA corrupted ($CORRUPT_HOW)"
}

# The guest saw the read fail (its result line); the daemon must have said which block and
# journalled it. The guest rewrote the block at the end; that data must be in the image.
host_check_pi_corruption() {
    local n=$CORRUPT_LBA lines records
    lines=$(grep "PI guard error" "$DAEMON_LOG" | grep -E "[[:space:]]lba=$n( |\$)")
    if [[ -z $lines ]]; then
        fail host:pi_guard_error_logged "no 'PI guard error' line with lba=$n in the daemon log"
    elif ! grep -Eq "[[:space:]]byte_offset=$((n * PI_INTERVAL))( |\$)" <<<"$lines"; then
        fail host:pi_guard_error_logged "guard error for lba=$n without byte_offset=$((n * PI_INTERVAL)): $(head -n 1 <<<"$lines")"
    else
        pass host:pi_guard_error_logged
    fi

    records=$(grep -E "\"event\":\"guard_error\"" "$JOURNAL" 2>/dev/null | grep -E "\"lba\":${n}[,}]")
    if [[ ! -e $JOURNAL ]]; then
        fail host:pi_guard_error_journalled "no journal $JOURNAL"
    elif [[ -z $records ]]; then
        fail host:pi_guard_error_journalled "no guard_error record with \"lba\":$n in $JOURNAL: $(head -n 2 "$JOURNAL" | tr '\n' ' ')"
    elif ! grep -q '"source":"read"' <<<"$records"; then
        fail host:pi_guard_error_journalled "guard_error record for lba $n is not from a read: $(head -n 1 <<<"$records")"
    else
        pass host:pi_guard_error_journalled
    fi

    if cmp --ignore-initial=0:$((n * PI_INTERVAL)) --bytes="$PI_INTERVAL" "$RUN/pattern.bin" "$IMG" >/dev/null 2>&1; then
        pass host:pi_rewritten_block_in_image
    else
        fail host:pi_rewritten_block_in_image "block $n in the image is not what the guest rewrote it with"
    fi
}

# The stats documents the daemons leave (see launch_daemon).
DAEMON_STATS=$RUN/daemon-stats.json
DAEMON2_STATS=$RUN/daemon2-stats.json

# ended STATS: did the daemon's stats document record a session that ended?
ended() {
    jq -e '.recent_sessions | length > 0' "$1" >/dev/null 2>&1
}

# counter NAME STATS: counter NAME summed over the sessions of stats document STATS (0 if
# absent); for the vda daemon's document, also over the earlier incarnations that restart
# stopped (their documents as taken just before, running session included).
counter() {
    local total f v
    total=$(jq -r --arg n "$1" '[.recent_sessions[].counters[$n] // 0] | add // 0' "$2" 2>/dev/null || echo 0)
    if [[ $2 == "$DAEMON_STATS" ]]; then
        for f in "${INCARNATION_STATS[@]}"; do
            v=$(jq -r --arg n "$1" '([.recent_sessions[].counters[$n] // 0] | add // 0) +
                (.current_session.counters[$n] // 0)' "$f" 2>/dev/null || echo 0)
            total=$((total + v))
        done
    fi
    echo "$total"
}

# The last session's counters of a stats document, as a line; the detection counters first.
session_counters() {
    local stats=$1 c out=""
    for c in writes_rewritten intervals_rewritten writes_bounced read_retries_healed bytes_bounced \
        writes_zero_copy writes reads io_errors guard_errors rejected; do
        out+=" $c=$(counter "$c" "$stats")"
    done
    echo "${out# }"
}

# scrub_clean IMAGE NAME: `guardblk scrub` (the daemon has stopped) must verify every block.
# scrub_clean IMAGE NAME [OPTION...]: `guardblk scrub IMAGE OPTION...` must find no corrupt block.
scrub_clean() {
    local img=$1 name=$2 out rc summary
    out=$("$GUARDBLK_BIN" scrub "$img" --json "${@:3}" 2>"$RUN/scrub-$name.err")
    rc=$?
    printf '%s\n' "$out" >"$RUN/scrub-$name.jsonl"
    summary=$(grep '"summary"' <<<"$out" | tail -n 1)
    if ((rc == 0)) && [[ -n $summary ]] && grep -q '"errors":0[,}]' <<<"$summary"; then
        pass "host:$name"
    elif ((rc == 1)); then
        fail "host:$name" "guardblk scrub found corrupt blocks at LBA(s) $(grep -oE '"lba":[0-9]+' <<<"$out" |
            sed 's/.*://' | head -n 10 | tr '\n' ' ')$summary"
    else
        fail "host:$name" "guardblk scrub exit status $rc: $summary $(tail -n 3 "$RUN/scrub-$name.err" | tr '\n' ' ')"
    fi
}

# `--bounce auto` may find bouncing every write the cheaper path on this CPU (always exact, but
# then no mutation is left to detect): unless the run chose a policy itself, mutating_writer
# runs auto on its zero-copy path, so the run proves detection.
host_prepare_mutating_writer() {
    if [[ " ${SERVE_ARGS[*]} " != *" --bounce "* && " ${SERVE_ARGS[*]} " != *" --no-mutation-check "* &&
        " ${SERVE_ARGS[*]} " != *" --auto-path "* ]]; then
        SERVE_ARGS+=(--auto-path zero-copy)
    fi
}

# mutating_writer: the daemon must have seen the guest change buffers in flight (detected
# after a write and rewritten, or bounced up front where it had seen it before), without a
# guard error (host_guard_errors) or an I/O error (host_daemon_log), and the image must
# scrub clean: every block's guard matches the data that ended up on disk.
host_check_mutating_writer() {
    local stats=$DAEMON_STATS rewritten bounced
    rewritten=$(counter writes_rewritten "$stats")
    # Bounced because the guest was seen mutating there (not because bouncing is cheaper).
    bounced=$(($(counter writes_bounced "$stats") - $(counter writes_bounced_by_cost "$stats")))
    NOTES+=("vda daemon: $(session_counters "$stats")")
    if ! ended "$stats"; then
        fail host:mutation_detected "$stats records no ended session"
    elif ((rewritten > 0 || bounced > 0)); then
        pass host:mutation_detected
    else
        fail host:mutation_detected "writes_rewritten=0 writes_bounced=0: the daemon saw no buffer change in flight: $(session_counters "$stats")"
    fi
    scrub_clean "$IMG" scrub_clean
}

# restart: every incarnation of the vda daemon came back, none panicked or logged an
# error, each restart was followed by a reconnect, and the guest's verifying writers saw
# nothing (guest:restart). What the in-flight region gave back is reported, not judged:
# under TCG the guest rarely has more than a request or two in flight at a kill.
host_check_restart() {
    local problems resubmitted=0 recovered_lines=0 f n
    if ((${#RESTART_EVENTS[@]} != ${#RESTART_AT[@]})); then
        fail host:restart_daemon "only ${#RESTART_EVENTS[@]} of ${#RESTART_AT[@]} restarts happened (did the guest start the scenario?)"
        return
    fi
    # Guard errors are judged by LBA (pi_corruption's block is expected), other errors not at all.
    problems=$(grep -hE "panicked|ERROR" "${RESTART_LOGS[@]}" "$DAEMON_LOG" | grep -v "PI guard error" | head -n 3)
    while IFS= read -r n; do
        [[ " ${EXPECTED_GUARD_LBAS[*]} " == *" $n "* ]] || problems+=" guard error at LBA $n before a restart;"
    done < <(grep -h "PI guard error" "${RESTART_LOGS[@]}" | grep -oE "[[:space:]]lba=[0-9]+" | sed 's/.*=//')
    for f in "${RESTART_LOGS[@]:1}" "$DAEMON_LOG"; do
        grep -q "frontend connected" "$f" || problems+=" no reconnect in $(basename "$f");"
        while IFS= read -r n; do
            resubmitted=$((resubmitted + n))
            recovered_lines=$((recovered_lines + 1))
        done < <(grep "recovered the requests" "$f" | grep -oE "resubmitted=[0-9]+" | sed 's/.*=//')
    done
    if [[ -n $problems ]]; then
        fail host:restart_daemon "$problems"
    else
        pass host:restart_daemon
    fi
    NOTES+=("restart: ${RESTART_EVENTS[*]}; in-flight region: $recovered_lines queue recoveries, $resubmitted requests resubmitted")
}

# swap: vdb is the guest's swap device, served by a second daemon. Prepared here: its image.
host_prepare_swap() {
    DISK2_IMG=$RUN/swap.img
    "$GUARDBLK_BIN" create "$DISK2_IMG" --size "${DISK2_MIB}M" --pi type1 --interval "$PI_INTERVAL" \
        >"$RUN/create2.log" 2>&1 ||
        die "guardblk create (swap disk) failed: $(cat "$RUN/create2.log")"
}

# The swap disk's daemon: no error of any kind (nothing corrupted it), a clean scrub. Whether
# it saw swap pages change under writeback is reported, not judged: that depends on the
# guest kernel, and the guest checks that it did swap.
host_check_swap() {
    local stats=$DAEMON2_STATS problems journal=$DISK2_IMG.pi-journal.jsonl
    problems=$(grep -E "panicked|ERROR" "$DAEMON2_LOG" | head -n 3)
    if [[ -n $problems ]]; then
        fail host:swap_daemon_log "$problems"
    elif ! ended "$stats"; then
        fail host:swap_daemon_log "$stats records no ended session (session never ended cleanly)"
    elif (($(counter rejected "$stats") != 0 || $(counter io_errors "$stats") != 0 ||
        $(counter guard_errors "$stats") != 0)); then
        fail host:swap_daemon_log "$(session_counters "$stats")"
    elif (($(counter writes "$stats") == 0)); then
        fail host:swap_daemon_log "the swap disk was never written: $(session_counters "$stats")"
    else
        pass host:swap_daemon_log
    fi
    if [[ -s $journal ]] && grep -q '"event":"guard_error"' "$journal"; then
        fail host:swap_no_guard_errors "guard errors journalled for the swap disk: $(grep '"event":"guard_error"' "$journal" | head -n 2 | tr '\n' ' ')"
    else
        pass host:swap_no_guard_errors
    fi
    scrub_clean "$DISK2_IMG" swap_scrub_clean
    local detected
    detected=$(($(counter writes_rewritten "$stats") + $(counter writes_bounced "$stats") + $(counter read_retries_healed "$stats")))
    NOTES+=("vdb (swap) daemon: $(session_counters "$stats")$( ((detected > 0)) || echo " -- no in-flight mutation seen on swap")")
}

# Every guard error the daemon reported, in its log and its journal, must name a block the
# run corrupted on purpose: anything else is a false guard error. Runs for every selection.
host_guard_errors() {
    local log_lbas journal_lbas n_log n_journal lba bad="" expected=" ${EXPECTED_GUARD_LBAS[*]} "
    log_lbas=$(grep "PI guard error" "$DAEMON_LOG" | grep -oE "[[:space:]]lba=[0-9]+" | sed 's/.*=//')
    journal_lbas=$(grep -E '"event":"guard_error"' "$JOURNAL" 2>/dev/null | grep -oE '"lba":[0-9]+' | sed 's/.*://')
    n_log=$(grep -c "PI guard error" "$DAEMON_LOG")
    n_journal=$(grep -cE '"event":"guard_error"' "$JOURNAL" 2>/dev/null)
    n_journal=${n_journal:-0}
    for lba in $log_lbas $journal_lbas; do
        [[ $expected == *" $lba "* || $bad == *" $lba"* ]] || bad+=" $lba"
    done
    # shellcheck disable=SC2086 # the two lists are split into words on purpose
    lba=$(printf '%s\n' $log_lbas $journal_lbas | sed '/^$/d' | sort -nu | tr '\n' ' ')
    lba=${lba% }
    GUARD_SUMMARY="guard errors: $n_log logged by the daemon, $n_journal journalled; LBAs: ${lba:-none} (expected: ${EXPECTED_GUARD_LBAS[*]:-none})"
    if [[ -n $bad ]]; then
        local pat=${bad# }
        fail host:no_false_guard_errors "guard errors at LBA(s)$bad, which nothing corrupted: $(grep "PI guard error" "$DAEMON_LOG" |
            grep -E "[[:space:]]lba=(${pat// /|})( |\$)" | head -n 2 | sed 's/^[^ ]* *//' | tr '\n' ' ')"
    elif ((n_log != $(wc -w <<<"$log_lbas"))); then
        fail host:no_false_guard_errors "'PI guard error' lines without an lba= field"
    elif ((n_journal != $(wc -w <<<"$journal_lbas"))); then
        fail host:no_false_guard_errors "guard_error journal records without an lba field"
    else
        pass host:no_false_guard_errors
    fi
}

# Panics, errors, failed I/O or rejected requests in the daemon's own account of the run.
# Guard errors are ERROR lines and I/O errors by design; host_guard_errors judges those, so
# here every I/O error must be a guard error and no other ERROR line may appear.
host_daemon_log() {
    local problems stats=$DAEMON_STATS io_errors guard_errors
    problems=$(grep -E "panicked|ERROR" "$DAEMON_LOG" | grep -v "PI guard error" | head -n 3)
    io_errors=$(counter io_errors "$stats")
    guard_errors=$(counter guard_errors "$stats")
    if [[ -n $problems ]]; then
        fail host:daemon_log "$problems"
    elif ! ended "$stats"; then
        fail host:daemon_log "$stats records no ended session (session never ended cleanly)"
    elif (($(counter rejected "$stats") != 0)); then
        fail host:daemon_log "requests rejected: $(session_counters "$stats")"
    elif ((io_errors != guard_errors)); then
        fail host:daemon_log "io_errors=$io_errors but guard_errors=$guard_errors: I/O errors other than guard errors: $(session_counters "$stats")"
    else
        pass host:daemon_log
    fi
}

# --- live migration ------------------------------------------------------------------------

# qmp SOCKET COMMAND [ARGUMENTS-JSON]: one QMP command; prints QEMU's answer line.
qmp() {
    local sock=$1 cmd=$2 args=${3:-}
    local request="{\"execute\":\"$cmd\"${args:+,\"arguments\":$args}}"
    printf '%s\n%s\n' '{"execute":"qmp_capabilities"}' "$request" |
        socat -t 2 - UNIX-CONNECT:"$sock" 2>/dev/null | grep -v '"QMP"' | tail -n 1
}

# migrate_vm SERIAL QMP READ_PERCENT [QEMU OPTIONS...]: start a guest that runs only the
# migrate scenario, with a QMP socket; sets VM_PID.
migrate_vm() {
    local serial=$1 qmp_sock=$2 reads=$3
    shift 3
    timeout --kill-after=10 "$QEMU_TIMEOUT" \
        qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp "${MIGRATE_SMP:-2}" -m "$GUEST_MEM" \
        -nographic -no-reboot -nic none \
        -object memory-backend-memfd,id=mem,size="$GUEST_MEM",share=on -numa node,memdev=mem \
        -kernel "$VMLINUZ" -initrd "$RUN/initrd.gz" \
        -append "console=ttyS0 panic=-1 quiet guardblk.tests=migrate guardblk.migrate_reads=$reads" \
        -chardev socket,id=disk0,path="$SOCK",reconnect=1 \
        -device vhost-user-blk-pci,chardev=disk0,num-queues="$QUEUES" \
        -qmp unix:"$qmp_sock",server=on,wait=off "$@" \
        </dev/null >"$serial" 2>"${serial%.raw}.err" &
    VM_PID=$!
}

# wait_for PATTERN FILE SECONDS: until FILE contains PATTERN; false on timeout.
wait_for() {
    local i
    for i in $(seq 1 $(($3 * 5))); do
        grep -q "$1" "$2" 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

# run_migration NAME CONTROL: boot a guest, live-migrate it to a second QEMU while
# migrate-verify runs, and record the destination's verdict (CONTROL=1: dirty log skipped).
run_migration() {
    local name=$1 control=$2 reads=$3 src_pid dst_pid status="" i t0 src=$RUN/$1-source dst=$RUN/$1-destination
    say "$name: booting the migration source (TCG)"
    DAEMON_ENV=()
    ((control)) && DAEMON_ENV=(GUARDBLK_UNSAFE_SKIP_DIRTY_LOG=1)
    DAEMON_LOG=$RUN/daemon-$name.log
    launch_daemon "$IMG" "$SOCK" "$DAEMON_LOG" "$RUN/daemon-$name.out"
    DAEMON_PID=$LAUNCHED_PID
    DAEMON_ENV=()
    migrate_vm "$src.raw" "$SOCK_DIR/qmp-src" "$reads"
    src_pid=$VM_PID
    QEMU_PID=$src_pid
    if ! wait_for "GUARDBLK-TEST START migrate" "$src.raw" 180; then
        fail "$name:migrated" "the source guest never started the scenario: $(tail -n 3 "$src.raw" | tr '\n' ' ')"
        kill -TERM "$src_pid" 2>/dev/null
        wait "$src_pid" 2>/dev/null
        stop_one "$DAEMON_PID" "$SOCK" "$DAEMON_LOG" "$name:daemon_clean_stop"
        return
    fi
    sleep "$MIGRATE_START_DELAY"
    migrate_vm "$dst.raw" "$SOCK_DIR/qmp-dst" "$reads" -incoming unix:"$SOCK_DIR/migration"
    dst_pid=$VM_PID
    # The destination attaches to the daemon (after its grace period for a reconnecting
    # frontend) before it listens for the migration stream.
    for i in $(seq 1 150); do
        [[ -S $SOCK_DIR/migration ]] && break
        sleep 0.2
    done
    t0=$SECONDS
    # Slow enough that most pages are sent while the guest runs (a fast link with a generous
    # downtime would stop the guest at once and send everything during the downtime, and a
    # missing dirty log could not show), fast enough to converge against the daemon's reads.
    qmp "$SOCK_DIR/qmp-src" migrate-set-parameters '{"max-bandwidth":33554432,"downtime-limit":300}' >/dev/null
    qmp "$SOCK_DIR/qmp-src" migrate "{\"uri\":\"unix:$SOCK_DIR/migration\"}" >"$RUN/$name-migrate.json"
    for i in $(seq 1 300); do
        status=$(qmp "$SOCK_DIR/qmp-src" query-migrate | jq -r '.return.status // empty' 2>/dev/null)
        [[ $status == completed || $status == failed || $status == cancelled ]] && break
        sleep 0.2
    done
    qmp "$SOCK_DIR/qmp-src" query-migrate >"$RUN/$name-query-migrate.json"
    local figures
    figures=$(jq -c '.return | {"total-time","downtime","ram":{transferred:.ram.transferred,"dirty-sync-count":.ram."dirty-sync-count"}}' "$RUN/$name-query-migrate.json" 2>/dev/null)
    say "$name: migration $status after $((SECONDS - t0))s: $figures"
    qmp "$SOCK_DIR/qmp-src" quit >/dev/null
    wait "$src_pid" 2>/dev/null
    QEMU_PID=$dst_pid
    wait "$dst_pid"
    QEMU_PID=""
    sed "$STRIP_TERM" "$src.raw" >"$src.log"
    sed "$STRIP_TERM" "$dst.raw" >"$dst.log"
    stop_one "$DAEMON_PID" "$SOCK" "$DAEMON_LOG" "$name:daemon_clean_stop"
    DAEMON_PID=""
    local verdict
    verdict=$(grep -Em1 "GUARDBLK-TEST (PASS|FAIL) migrate" "$dst.log")
    if [[ $status != completed ]]; then
        fail "$name:migrated" "migration status '$status' (source stderr: $(tail -n 2 "$src.err" | tr '\n' ' '); destination: $(tail -n 2 "$dst.err" | tr '\n' ' '))"
    elif grep -q "GUARDBLK-TEST .* migrate" <(grep -v START "$src.log"); then
        fail "$name:migrated" "the scenario ended on the source: the migration came after the workload"
    elif [[ -z $verdict ]]; then
        fail "$name:migrated" "no verdict from the destination guest: $(tail -n 3 "$dst.log" | tr '\n' ' ')"
    else
        pass "$name:migrated"
    fi
    if ((control)); then
        if [[ $verdict == *"FAIL migrate"*"stale read buffers"* ]] && ! [[ $verdict == *" 0 stale read buffers"* ]]; then
            pass "$name:stale_buffers_seen_without_the_log"
            NOTES+=("$name (dirty log skipped): ${verdict#*FAIL migrate }")
        else
            fail "$name:stale_buffers_seen_without_the_log" "without the dirty log the destination should find stale buffers; it said: ${verdict:-nothing}"
        fi
    else
        if [[ $verdict == *"PASS migrate"* ]]; then
            pass "$name:guest_verified_every_buffer"
            NOTES+=("$name: $(grep -m1 'gbtool: migrate-verify: .* reads' "$dst.log" | sed 's/.*migrate-verify: //'); QEMU: $figures")
        else
            fail "$name:guest_verified_every_buffer" "${verdict:-no verdict}"
        fi
        local io_errors
        io_errors=$(jq '[.recent_sessions[].counters.io_errors // 0] | add // 0' "${DAEMON_LOG%.log}-stats.json" 2>/dev/null)
        if [[ $io_errors == 0 ]]; then
            pass "$name:no_io_errors"
        else
            fail "$name:no_io_errors" "daemon counted io_errors=${io_errors:-unknown} (${DAEMON_LOG%.log}-stats.json)"
        fi
        if grep -q "frontend connection ended with an error" "$DAEMON_LOG"; then
            fail "$name:daemon_handed_over" "a frontend connection broke: $(grep -m1 "ended with an error" "$DAEMON_LOG" | cut -c1-300)"
        elif ! grep -q "live migration started" "$DAEMON_LOG"; then
            fail "$name:daemon_handed_over" "QEMU never turned dirty logging on (no 'live migration started' in $DAEMON_LOG)"
        elif grep -q "image passes to the destination" "$DAEMON_LOG"; then
            pass "$name:daemon_handed_over"
        else
            fail "$name:daemon_handed_over" "no hand-over line in $DAEMON_LOG"
        fi
    fi
}

# --- rbd boot --------------------------------------------------------------------------

# run_rbd_boot: the guest's disk is an rbd: image with PI on a one-node test cluster.
run_rbd_boot() {
    local tool cluster=$RUN/ceph state=$RUN/rbd-state image=rbd:rbd/guest
    for tool in ceph-mon ceph-osd rbd; do
        command -v "$tool" >/dev/null || { fail rbd:cluster "$tool is not installed (apt-get install ceph-mon ceph-osd ceph-common)"; return; }
    done
    say "rbd boot: one-node Ceph cluster, $image with type 1 PI"
    if ! CEPH_TEST_PORT=${GUARDBLK_RBD_PORT:-29789} bash "$ROOT/tests/ceph/cluster.sh" start "$cluster" >"$RUN/ceph-start.log" 2>&1; then
        fail rbd:cluster "the test cluster did not start: $(tail -n 3 "$RUN/ceph-start.log" | tr '\n' ' ')"
        return
    fi
    local ceph=(--ceph-conf "$cluster/ceph.conf" --rbd-state-dir "$state")
    RESULT_PREFIX=rbd:
    if ! "$GUARDBLK_BIN" create "$image" --size "${IMAGE_MIB}M" --pi type1 --interval "$PI_INTERVAL" "${ceph[@]}" \
        >"$RUN/rbd-create.log" 2>&1; then
        fail create "$(cat "$RUN/rbd-create.log")"
    else
        # This boot's scenarios; the main boot's logs are kept under other names.
        local main_tests=$GUARDBLK_TESTS main_args=("${SERVE_ARGS[@]}")
        GUARDBLK_TESTS=block_size,o_direct_pattern,filesystem
        mv "$RUN/serial.log" "$RUN/serial-main.log"
        build_initramfs
        SERVE_ARGS+=("${ceph[@]}")
        DAEMON_LOG=$RUN/daemon-rbd.log
        DAEMON_STATS=${DAEMON_LOG%.log}-stats.json
        SOCK=$SOCK_DIR/rbd.sock
        launch_daemon "$image" "$SOCK" "$DAEMON_LOG" "$RUN/daemon-rbd.out"
        DAEMON_PID=$LAUNCHED_PID
        run_guest
        stop_one "$DAEMON_PID" "$SOCK" "$DAEMON_LOG" daemon_clean_stop
        DAEMON_PID=""
        collect_guest_results
        scrub_clean "$image" scrub_clean "${ceph[@]}"
        if rbd -c "$cluster/ceph.conf" export --no-progress rbd/guest "$RUN/rbd.img" >"$RUN/rbd-export.log" 2>&1; then
            local main_img=$IMG
            IMG=$RUN/rbd.img
            host_untouched_regions
            host_check_o_direct_pattern
            host_check_filesystem
            IMG=$main_img
            rm -f "$RUN/rbd.img"
        else
            fail host:rbd_export "$(cat "$RUN/rbd-export.log")"
        fi
        if grep -q "PI guard error" "$DAEMON_LOG"; then
            fail host:no_guard_errors "$(grep -m1 "PI guard error" "$DAEMON_LOG")"
        else
            pass host:no_guard_errors
        fi
        GUARDBLK_TESTS=$main_tests
        SERVE_ARGS=("${main_args[@]}")
    fi
    RESULT_PREFIX=""
    bash "$ROOT/tests/ceph/cluster.sh" stop "$cluster" >/dev/null 2>&1
}

# --- main ------------------------------------------------------------------------------

require_tools
mkdir -p "$WORK"
rm -rf "$RUN"
mkdir -p "$RUN"
fetch_kernel
build_daemon
build_tools
make_pattern "$RUN/pattern.bin"
build_initramfs
say "kernel $KVER, modules: ${MOD_ORDER[*]}, initramfs $(($(stat -c %s "$RUN/initrd.gz") >> 10)) KiB, setup took $((SECONDS - T0))s"
create_image
# Unix socket paths are limited to 108 bytes; the checkout path may be long.
SOCK_DIR=$(mktemp -d /tmp/guardblk-guest.XXXXXX)
run_hooks host_prepare
start_daemon
run_guest
stop_daemon
collect_guest_results
host_untouched_regions
run_hooks host_check
host_guard_errors
host_daemon_log
MAIN_DAEMON_LOG=$DAEMON_LOG
MAIN_DAEMON_STATS=$DAEMON_STATS
if [[ ${GUARDBLK_MIGRATE:-1} != 0 ]]; then
    run_migration migrate 0 0
    if [[ ${GUARDBLK_MIGRATE_READS:-0} == 1 ]]; then
        run_migration migrate_reads 0 75
        run_migration migrate_reads_control 1 75
    fi
    scrub_clean "$IMG" migrate_scrub_clean
fi
if [[ ${GUARDBLK_RBD:-1} != 0 ]]; then
    run_rbd_boot
fi
DAEMON_LOG=$MAIN_DAEMON_LOG
DAEMON_STATS=$MAIN_DAEMON_STATS

if ((FAILED > 0)); then
    echo
    echo "--- daemon log (tail; full: $DAEMON_LOG) ---"
    tail -n 30 "$DAEMON_LOG"
    [[ -s $RUN/qemu.err ]] && { echo "--- qemu stderr ---"; tail -n 10 "$RUN/qemu.err"; }
else
    echo "daemon: $(session_counters "$DAEMON_STATS")"
fi
summary
((FAILED == 0))
