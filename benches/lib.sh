# shellcheck shell=bash
# Shared by the benches (source it; it runs nothing by itself): building, CPU pinning, medians
# and ratios of rounds, and the two target kinds the images live on.
#
#   tmpfs  a directory on /dev/shm. O_DIRECT is accepted (Linux 6.6+) but every "direct" I/O is a
#          kernel memcpy, and tmpfs refuses RWF_NOWAIT, so io_uring punts to iou-wrk threads.
#   xfs    XFS on a loop device (losetup --direct-io=on) over a file on /dev/shm (so the disk under /
#          adds no noise), mounted under the work directory: O_DIRECT and io_uring go through a
#          real filesystem and block layer. Needs root, losetup and mkfs.xfs (xfsprogs).
#
# A script sets bench_targets with bench_parse_targets, calls bench_check_targets before doing
# anything, target_setup KIND NAME WORK BYTES before filling a target's images into $tgt_dir, and
# target_teardown when done with it and from its EXIT trap (it is idempotent and never fails).

# bench_parse_targets tmpfs|xfs|both: sets bench_targets.
bench_parse_targets() {
    case "$1" in
        tmpfs) bench_targets=(tmpfs) ;;
        xfs) bench_targets=(xfs) ;;
        both) bench_targets=(tmpfs xfs) ;;
        *) echo "--target must be tmpfs, xfs or both, not '$1'" >&2; exit 2 ;;
    esac
}

# bench_check_targets: everything the chosen targets need, each failure as one sentence.
bench_check_targets() {
    local t
    for t in "${bench_targets[@]}"; do
        [[ $t == xfs ]] || continue
        ((EUID == 0)) || { echo "the xfs target needs root (losetup, mkfs.xfs, mount); run as root or use --target tmpfs" >&2; exit 2; }
        command -v losetup >/dev/null || { echo "the xfs target needs losetup (util-linux), which is not installed" >&2; exit 2; }
        command -v mkfs.xfs >/dev/null || { echo "the xfs target needs mkfs.xfs (package xfsprogs), which is not installed" >&2; exit 2; }
        [[ -d /sys/module/loop || -e /dev/loop-control ]] ||
            { echo "the xfs target needs the loop driver (modprobe loop), which is not loaded" >&2; exit 2; }
    done
}

# bench_check_cpus DAEMON_CPU CLIENT_CPU: both CPUs exist and are allowed to this process.
bench_check_cpus() {
    local c
    for c in "$1" "$2"; do
        if ! [[ "$c" =~ ^[0-9]+$ ]] || ! taskset -c "$c" true 2>/dev/null; then
            echo "cannot pin to CPU '$c' (this machine has $(nproc) usable CPUs); see --daemon-cpu/--client-cpu" >&2
            exit 2
        fi
    done
    [[ "$1" != "$2" ]] || echo "   warning: daemon and load generator pinned to the same CPU $1" >&2
}

# bench_build: release guardblk and the loadgen and plot benches, honouring CARGO_TARGET_DIR
# (default target/). Sets guardblk_built, loadgen_built and plot_built to the paths cargo built,
# and bench_results_root to target/bench-results.
bench_build() {
    cargo build --release --quiet
    local dir built
    dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    guardblk_built=$dir/release/guardblk
    built=$(cargo bench --bench loadgen --bench plot --no-run --message-format=json --quiet)
    loadgen_built=$(jq -r 'select(.target.name == "loadgen" and .executable != null) | .executable' <<<"$built")
    plot_built=$(jq -r 'select(.target.name == "plot" and .executable != null) | .executable' <<<"$built")
    bench_results_root=$dir/bench-results
    [[ -x "$guardblk_built" && -x "$loadgen_built" && -x "$plot_built" ]] ||
        { echo "build finished but $guardblk_built or the loadgen or plot bench is missing" >&2; exit 1; }
}

# bench_results NAME: make (and set results_dir to) a fresh directory for this run's results,
# target/bench-results/NAME-<UTC time>, where the bench leaves its JSON and SVG. Needs
# bench_build first.
bench_results() {
    results_dir=$bench_results_root/$1-$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$results_dir"
}

# bench_plot JSONL SVG TITLE: plot records {panel, group, variant, iops, p99_us} (one JSON object
# per line) as SVG bar charts: IOPS and p99 per workload and daemon, median with the spread.
bench_plot() {
    if "$plot_built" --input "$1" --output "$2" --title "$3"; then
        echo "   plot: $2"
    else
        echo "   (could not plot $1)" >&2
    fi
}

# bench_median LINES: of newline-separated loadgen result lines (one per round), the one with
# the median IOPS (upper median for even counts).
bench_median() {
    jq -s 'sort_by(.iops) | .[length / 2 | floor]' <<<"$1"
}

# bench_ratio LINES_A LINES_B: "median-ratio (rounds: r1 r2 ...)" of IOPS, A's median over B's,
# then round by round (the Nth line of A over the Nth of B).
bench_ratio() {
    local a b
    a=$(jq -s -c . <<<"$1")
    b=$(jq -s -c . <<<"$2")
    jq -nr --argjson a "$a" --argjson b "$b" '
        def median: sort | .[length / 2 | floor];
        [range(0; [($a | length), ($b | length)] | min) | $a[.].iops / $b[.].iops] as $per |
        "\(($a | map(.iops) | median) / ($b | map(.iops) | median) * 100 | round / 100) (rounds: \($per | map(. * 100 | round / 100 | tostring) | join(" ")))"'
}

# qsd_args IMAGE SOCKET: sets qsd_cmd to the qemu-storage-daemon arguments every bench measures
# against: IMAGE with O_DIRECT and linux-aio, exported as a one-queue vhost-user-blk on SOCKET.
# shellcheck disable=SC2034 # for the caller
qsd_cmd=()
qsd_args() {
    # shellcheck disable=SC2034 # for the caller
    qsd_cmd=(--blockdev "driver=file,node-name=file0,filename=$1,cache.direct=on,aio=native"
        --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$2,writable=on,num-queues=1")
}

# What target_setup made; tgt_dir and tgt_desc are for the caller.
tgt_kind=
tgt_dir=
# shellcheck disable=SC2034
tgt_desc=
tgt_backing=
tgt_loop=
tgt_mnt=

# target_setup KIND NAME WORK BYTES: a fresh, empty directory $tgt_dir on target KIND with room
# for BYTES of images (xfs: backing file of BYTES + 25 %). Sets tgt_desc to one line saying what it
# is. NAME makes paths unique (with $$).
target_setup() {
    local kind=$1 name=$2 work=$3 bytes=$4
    target_teardown
    tgt_kind=$kind
    case "$kind" in
        tmpfs)
            tgt_dir=/dev/shm/guardblk-$name-$$
            mkdir "$tgt_dir"
            tgt_desc="tmpfs: $tgt_dir"
            ;;
        xfs)
            local backing_bytes=$((bytes + bytes / 4)) dev dio
            # mkfs.xfs refuses file systems under 300 MiB.
            ((backing_bytes >= 512 << 20)) || backing_bytes=$((512 << 20))
            # Set before each step, so a Ctrl-C between a step and the assignment still cleans up.
            tgt_backing=/dev/shm/guardblk-$name-$$-xfs.backing
            truncate -s "$backing_bytes" "$tgt_backing"
            tgt_loop=$(losetup --direct-io=on --find --show "$tgt_backing")
            dev=${tgt_loop#/dev/}
            dio=$(cat "/sys/block/$dev/loop/dio" 2>/dev/null || echo "?")
            if [[ "$dio" != 1 ]]; then
                echo "loop device $tgt_loop has direct I/O off (/sys/block/$dev/loop/dio = $dio) although losetup was asked for --direct-io=on" >&2
                exit 1
            fi
            mkfs.xfs -q "$tgt_loop"
            tgt_mnt=$work/xfs
            mkdir -p "$tgt_mnt"
            mount "$tgt_loop" "$tgt_mnt"
            tgt_dir=$tgt_mnt/images
            mkdir "$tgt_dir"
            tgt_desc="xfs on $tgt_loop (direct I/O on: /sys/block/$dev/loop/dio = $dio, $(cat "/sys/block/$dev/queue/logical_block_size")-byte sectors) over $tgt_backing ($(numfmt --to=iec "$backing_bytes"), on tmpfs), mounted at $tgt_mnt"
            ;;
        *) echo "unknown target kind $kind" >&2; exit 2 ;;
    esac
}

# target_teardown: remove whatever target_setup made (umount, losetup -d, rm). Idempotent; call
# it only once no daemon has the images open.
target_teardown() {
    local i dev
    if [[ -n "$tgt_mnt" ]] && mountpoint -q "$tgt_mnt" 2>/dev/null; then
        # A just-exited daemon's io_uring is torn down asynchronously and may hold a file a moment.
        for i in $(seq 50); do
            umount "$tgt_mnt" 2>/dev/null && break
            ((i < 50)) || { echo "   $tgt_mnt still busy after 5 s: lazy unmount" >&2; umount -l "$tgt_mnt" || true; }
            sleep 0.1
        done
    fi
    [[ -z "$tgt_mnt" ]] || rmdir "$tgt_mnt" 2>/dev/null || true
    if [[ -n "$tgt_backing" ]]; then
        # Every loop device on the backing file, also one whose name never reached $tgt_loop.
        for dev in $(losetup -n -O NAME -j "$tgt_backing" 2>/dev/null); do
            losetup -d "$dev" 2>/dev/null || echo "   could not detach $dev" >&2
        done
        rm -f "$tgt_backing"
    fi
    if [[ $tgt_kind == tmpfs && -n "$tgt_dir" ]]; then rm -rf "$tgt_dir" || true; fi
    tgt_kind='' tgt_dir='' tgt_backing='' tgt_loop='' tgt_mnt=''
    # shellcheck disable=SC2034 # for the caller
    tgt_desc=''
    return 0
}

# target_note KIND: one line on what the target's numbers mean.
target_note() {
    case "$1" in
        tmpfs) echo "tmpfs: even an O_DIRECT \"zero-copy\" write is a kernel memcpy; io_uring has no non-blocking path there" ;;
        xfs) echo "xfs: loop device with direct I/O over a tmpfs file; O_DIRECT and io_uring go through XFS and the block layer" ;;
    esac
}
