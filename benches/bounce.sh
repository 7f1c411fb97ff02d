#!/usr/bin/env bash
# What zero-copy PI writes with mutation detection cost and save, in one run: guardblk with T10 PI
# (type1, 4096-byte intervals) under --bounce auto, never and always, against qemu-storage-daemon
# (no PI) on the same image, driven by the libblkio load generator (benches/loadgen.rs), on each
# target: tmpfs, and XFS on a loop device with direct I/O (see benches/lib.sh).
#
#   bash benches/bounce.sh [--quick] [--seconds S] [--warmup S] [--rounds N] [--size SIZE] [--keep]
#                          [--only CELL,...] [--target tmpfs|xfs|both] [--daemon-cpu N] [--client-cpu N]
#
# 1. Clean load (nobody touches a buffer in flight): 4 KiB random write and read at QD 32, 128 KiB
#    sequential read and write at QD 8, auto / never / always / qsd / nopi (guardblk without PI) in
#    every cell. Targets, per target and workload: auto >= 0.97 x max(never, always); auto (PI) >=
#    1.0 x qsd (no PI) at 4 KiB, >= 0.9 x at 128 KiB; PI reads (auto) >= 0.95 x guardblk without PI;
#    CPU per zero-copy PI 4 KiB write (never) <= 1.3 x a write without PI.
# 2. Mutating load (loadgen --scribble: a thread keeps overwriting every in-flight write buffer;
#    fixed buffer per slot): per mode a fresh daemon, a --warmup run, then a measured run against
#    the same daemon (it keeps what it learned); the fraction of the measured session's writes
#    that had to be rewritten after the fact (target <= 1% for auto). Also a page-file-like load:
#    a quarter of the slots scribbled and confined to the first 64 MiB, the rest clean elsewhere.
# 3. After every PI run: no "PI guard error" line in the daemon's log and `guardblk scrub` clean.
# 4. Labelled demonstrations, last on each target: --scribble without --no-overlap (two writes to
#    one block in flight at once, as a guest may issue; a stuck daemon is reported with its
#    stacks), then --no-mutation-check under --scribble (scrub must find guard errors: proves the
#    harness really changes buffers in flight; it breaks the image's tuples, so it runs last).
#
# Targets run one after the other (--target, default both), each set up fresh and torn down after
# (xfs: backing file on /dev/shm, losetup --direct-io=on, mkfs.xfs, mount under the work
# directory; needs root). Each cell runs --rounds times (default 3; the order of the daemons
# rotates every round) and the tables report the run with the median IOPS; ratios are of those
# medians, with each round's own ratio beside them. The daemon is pinned to --daemon-cpu (default
# 0), the load generator to --client-cpu (default 1). --quick: 3 s runs, 2 s warm-up (about 13
# minutes for both targets; the full run about 27). --keep keeps the logs (kept anyway when
# something failed). --only runs just the named cells (4k-randwrite-qd32, 4k-randread-qd32,
# 128k-read-qd8, 128k-write-qd8, scribble-all, scribble-pagefile, overlap-scribble,
# unchecked-scribble); rows of the others then say n/a. Needs qemu-storage-daemon, jq, a kernel
# whose tmpfs accepts O_DIRECT (6.6+), and for xfs root, losetup and mkfs.xfs; gdb, if present,
# is used to dump a stuck daemon. Honours CARGO_TARGET_DIR.
set -euo pipefail

seconds=10
warmup=5
rounds=3
size=1G
keep=0
only=
target=both
daemon_cpu=0
client_cpu=1

usage() {
    sed -n '2,37s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --quick) seconds=3; warmup=2 ;;
        --seconds) seconds="$2"; shift ;;
        --warmup) warmup="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --size) size="$2"; shift ;;
        --keep) keep=1 ;;
        --only) only="$2"; shift ;;
        --target) target="$2"; shift ;;
        --daemon-cpu) daemon_cpu="$2"; shift ;;
        --client-cpu) client_cpu="$2"; shift ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
# wanted CELL: whether --only (comma-separated cell names) selects CELL; everything without --only.
wanted() { [[ -z "$only" || ",$only," == *",$1,"* ]]; }

cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
source benches/lib.sh
bench_parse_targets "$target"
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }
command -v qemu-storage-daemon >/dev/null || { echo "needs qemu-storage-daemon" >&2; exit 2; }
bench_check_targets
bench_check_cpus "$daemon_cpu" "$client_cpu"

echo "== building"
bench_build
work=$(mktemp -d /tmp/guardblk-bounce.XXXXXX)
# Others may rebuild the target directory while this runs: measure private copies of what was just built.
cp "$guardblk_built" "$work/guardblk"
cp "$loadgen_built" "$work/loadgen"
guardblk=$work/guardblk
loadgen=$work/loadgen
echo "   guardblk $(git describe --always --dirty 2>/dev/null || echo '?'), $(qemu-storage-daemon --version | head -n 1)"
echo "   daemon pinned to CPU $daemon_cpu, load generator to CPU $client_cpu (taskset -c)"

image=
pi_image=
daemon_pid=
failed=0
cleanup() {
    if [[ -n "$daemon_pid" ]]; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    target_teardown
    if ((keep || failed)); then
        echo "logs kept in $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bytes=$(numfmt --from=iec "$size")

# start_daemon NAME LOG: NAME is qsd, nopi (guardblk on the plain image, no PI), a guardblk --bounce
# mode (auto, never, always) or unchecked (--no-mutation-check). Pinned to $daemon_cpu. Sets daemon_pid; returns once it listens.
start_daemon() {
    local name=$1 log=$2 sock="$work/sock"
    local pin=(taskset -c "$daemon_cpu")
    rm -f "$sock"
    case "$name" in
        qsd)
            qsd_args "$image" "$sock"
            "${pin[@]}" qemu-storage-daemon "${qsd_cmd[@]}" >/dev/null 2>"$log" &
            ;;
        nopi)
            RUST_LOG=info "${pin[@]}" "$guardblk" serve "$image" --socket "$sock" --queues 1 --stats-file "${log%.log}.stats.json" >/dev/null 2>"$log" &
            ;;
        unchecked)
            RUST_LOG=info "${pin[@]}" "$guardblk" serve "$pi_image" --socket "$sock" --queues 1 --bounce never \
                --no-mutation-check --stats-file "${log%.log}.stats.json" >/dev/null 2>"$log" &
            ;;
        *)
            RUST_LOG=info "${pin[@]}" "$guardblk" serve "$pi_image" --socket "$sock" --queues 1 --bounce "$name" \
                --stats-file "${log%.log}.stats.json" >/dev/null 2>"$log" &
            ;;
    esac
    daemon_pid=$!
    for _ in $(seq 200); do
        case "$name" in
            qsd) [[ -S "$sock" ]] && return ;;
            *) grep -qs "guardblk ready" "$log" && return ;;
        esac
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "$name did not start; its log:" >&2
    cat "$log" >&2
    exit 1
}

# stop_daemon: SIGTERM, or SIGKILL if it has not exited 10 s later; then wait for the image locks.
stop_daemon() {
    kill -TERM "$daemon_pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$daemon_pid" 2>/dev/null; then
        echo "   daemon $daemon_pid did not exit 10 s after SIGTERM: SIGKILL" >&2
        keep=1
        kill -KILL "$daemon_pid" 2>/dev/null || true
    fi
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
    # An exited process's io_uring is torn down asynchronously and keeps the flock until then.
    for _ in $(seq 100); do
        flock -n "$image" true && flock -n "$pi_image" true && return
        sleep 0.05
    done
    echo "an image is still locked 5 s after the daemon exited" >&2
    exit 1
}

# dump_stuck LOG: the daemon stopped completing requests; keep its threads' stacks.
dump_stuck() {
    keep=1
    if command -v gdb >/dev/null; then
        timeout 60 gdb -p "$daemon_pid" -batch -ex "thread apply all bt 12" >"$1.stacks" 2>&1 || true
        echo "   stuck daemon's stacks: $1.stacks" >&2
        grep -E "^#[0-9]+ .* in (guardblk|std::thread::.*sleep)" "$1.stacks" | head -8 | sed 's/^/     /' >&2 || true
    fi
}

# pi_check LOG: guard error lines in the daemon's log, then scrub the image. Prints "LINES SCRUB"
# where SCRUB is the number of guard errors scrub found.
pi_check() {
    local lines scrub
    lines=$(grep -c "PI guard error" "$1" || true)
    "$guardblk" scrub "$pi_image" --json >"$1.scrub" 2>"$1.scrub-stderr" || true
    scrub=$(jq -rs 'map(select(.summary? != null)) | last | .summary.errors // "?"' "$1.scrub" 2>/dev/null ||
        echo "?")
    echo "$lines $scrub"
}

# session N LOG: session N's plain counters from the stats document the daemon of LOG left
# beside it (start_daemon's --stats-file), as a JSON object ({} if it never ended).
session() {
    jq -c --argjson n "$1" '[.recent_sessions[] | select(.number == $n) | .counters |
        with_entries(select(.value | type == "number"))] | first // {}' "${2%.log}.stats.json" 2>/dev/null ||
        echo '{}'
}

bench_results bounce
results=$results_dir/results.jsonl # one JSON object per run: target, section, cell, daemon, round + loadgen + counters
: >"$results"
run_no=0

# measure SECTION CELL DAEMON ROUND WARMUP_SECONDS LOADGEN_ARGS...: fresh daemon, optional warm-up
# run, measured run, stop, checks, all on target $tgt; appends a record to $results and prints a line.
measure() {
    local section=$1 cell=$2 name=$3 round=$4 warm=$5
    shift 5
    run_no=$((run_no + 1))
    local log="$work/$tgt-run$run_no-$name.log" out="$work/$tgt-run$run_no.out" status=ok n=1 rc
    start_daemon "$name" "$log"
    local args=(--socket "$work/sock" --queues 1 --pid "$daemon_pid" --timeout 10 "$@")
    local pin=(taskset -c "$client_cpu")
    if [[ "$warm" != 0 ]]; then
        rc=0
        "${pin[@]}" "$loadgen" "${args[@]}" --seconds "$warm" >"$out.warmup" 2>&1 || rc=$?
        if ((rc != 0)); then status=$([[ $rc == 3 ]] && echo HANG || echo FAIL); fi
        n=2
    fi
    if [[ $status == ok ]]; then
        rc=0
        "${pin[@]}" "$loadgen" "${args[@]}" --seconds "$seconds" >"$out" 2>&1 || rc=$?
        if ((rc != 0)); then status=$([[ $rc == 3 ]] && echo HANG || echo FAIL); fi
    fi
    if [[ $status != ok ]]; then
        echo "   $tgt $section $cell $name: load generator $status:" >&2
        tail -q -n 2 "$out.warmup" "$out" 2>/dev/null | sed 's/^/     /' >&2 || true
        [[ $status == HANG ]] && dump_stuck "$log"
        if [[ $section == demo ]]; then keep=1; else failed=1; fi
    fi
    stop_daemon
    local lg='{}' counters='{}' warm='{}' checks='{}'
    [[ $status == ok ]] && lg=$(tail -n 1 "$out")
    [[ $name != qsd ]] && counters=$(session "$n" "$log")
    [[ $name != qsd && $n == 2 ]] && warm=$(session 1 "$log")
    if [[ $name != qsd && $name != nopi ]]; then
        read -r lines scrub <<<"$(pi_check "$log")"
        checks=$(jq -n --arg l "$lines" --arg s "$scrub" '{guard_error_lines: ($l | tonumber), scrub_guard_errors: ($s | tonumber? // $s)}')
    fi
    jq -c -n --arg target "$tgt" --arg section "$section" --arg cell "$cell" --arg daemon "$name" --argjson round "$round" \
        --arg status "$status" --argjson lg "$lg" --argjson c "$counters" --argjson w "$warm" \
        --argjson k "$checks" \
        '$lg + {target: $target, section: $section, cell: $cell, daemon: $daemon, round: $round, status: $status,
                session: $c, warmup_session: $w} + $k' >>"$results"
    tail -n 1 "$results" | jq -r '"  \(.target) round \(.round)  \(.section) \(.cell | .[0:22]) \(.daemon | .[0:9])  " +
        (if .status != "ok" then .status else "\(.iops | floor) IOPS  p99 \(.p99_us) us  CPU \(.daemon_cpu_us_per_io) us/IO" end) +
        (if .session.writes? > 0 then "  rewritten \(.session.writes_rewritten)/\(.session.writes)  bounced \(.session.writes_bounced)" else "" end) +
        (if .guard_error_lines? != null then "  guard-error lines \(.guard_error_lines)  scrub \(.scrub_guard_errors)" else "" end)'
}

# rotate R ITEMS...: the items rotated by R, reversed on even R (so every daemon takes turns
# first and last).
rotate() {
    local r=$1
    shift
    local items=("$@") n=$# out=()
    for ((i = 0; i < n; i++)); do out+=("${items[(i + r) % n]}"); done
    if ((r % 2 == 0)); then
        for ((i = n - 1; i >= 0; i--)); do printf '%s\n' "${out[i]}"; done
    else
        printf '%s\n' "${out[@]}"
    fi
}

# Cell name, daemons, loadgen arguments.
clean=(
    "4k-randwrite-qd32|auto never always qsd nopi|--rw randwrite --bs 4k --iodepth 32"
    "4k-randread-qd32|auto never always qsd nopi|--rw randread --bs 4k --iodepth 32"
    "128k-read-qd8|auto never always qsd nopi|--rw read --bs 128k --iodepth 8"
    "128k-write-qd8|auto never always qsd nopi|--rw write --bs 128k --iodepth 8"
)
mutating=(
    "scribble-all|auto never always|--rw randwrite --bs 4k --iodepth 32 --scribble --no-overlap"
    "scribble-pagefile|auto never|--rw randwrite --bs 4k --iodepth 32 --scribble --no-overlap --scribble-fraction 0.25 --scribble-extent 64m"
)

declare -A tdesc # target -> what it was (device, mount, dio)
for tgt in "${bench_targets[@]}"; do
    echo "== target $tgt"
    # Both images and the PI metadata (8 bytes per 4 KiB interval, plus room).
    target_setup "$tgt" bounce "$work" $((2 * bytes + bytes / 256))
    tdesc[$tgt]=$tgt_desc
    echo "   $tgt_desc"
    image=$tgt_dir/plain.img
    pi_image=$tgt_dir/pi.img
    echo "   filling $image ($size) with random data; PI copy $pi_image (guardblk import --pi type1 --interval 4096)"
    # Written with O_DIRECT: nothing left in the page cache or to write back during the runs, and
    # it proves the target takes O_DIRECT (qsd's cache.direct=on needs it).
    if ! dd if=/dev/urandom of="$image" bs=1M count=$((bytes >> 20)) oflag=direct status=none 2>"$work/dd.err"; then
        echo "the $tgt target refuses O_DIRECT writes ($(head -n 1 "$work/dd.err")); cache.direct=on cannot work on $image" >&2
        exit 1
    fi
    # A real copy (never a reflink on XFS: shared extents would turn the first writes into CoW).
    dd if="$image" of="$pi_image" bs=1M iflag=direct oflag=direct status=none
    "$guardblk" import "$pi_image" --pi type1 --interval 4096 >"$work/$tgt-import.log" 2>&1 ||
        { cat "$work/$tgt-import.log" >&2; exit 1; }
    sync -f "$tgt_dir"

    echo "== $tgt: $rounds round(s): ${seconds}s runs (mutating load: ${warmup}s warm-up first); $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    for ((round = 1; round <= rounds; round++)); do
        for spec in "${clean[@]}"; do
            IFS='|' read -r cell daemons args <<<"$spec"
            wanted "$cell" || continue
            # shellcheck disable=SC2086
            for d in $(rotate "$round" $daemons); do
                # shellcheck disable=SC2086
                measure clean "$cell" "$d" "$round" 0 $args
            done
        done
        for spec in "${mutating[@]}"; do
            IFS='|' read -r cell daemons args <<<"$spec"
            wanted "$cell" || continue
            # shellcheck disable=SC2086
            for d in $(rotate "$round" $daemons); do
                # shellcheck disable=SC2086
                measure mutating "$cell" "$d" "$round" "$warmup" $args
            done
        done
    done

    if wanted overlap-scribble || wanted unchecked-scribble; then
        echo "== $tgt: demonstrations (labelled; not part of the targets)"
    fi
    if wanted overlap-scribble; then
        measure demo "overlap-scribble" never 1 0 --rw randwrite --bs 4k --iodepth 32 --scribble
    fi
    # Last on this target: it breaks the image's tuples on purpose, and nothing after it may read them.
    if wanted unchecked-scribble; then
        measure demo "unchecked-scribble" unchecked 1 0 --rw randwrite --bs 4k --iodepth 32 --scribble --no-overlap
    fi
    target_teardown
done

# ---------------------------------------------------------------- report
# med TARGET SECTION CELL DAEMON: the run with the median IOPS among the successful ones (upper median).
med() {
    jq -s -c --arg t "$1" --arg s "$2" --arg c "$3" --arg d "$4" \
        'map(select(.target == $t and .section == $s and .cell == $c and .daemon == $d and .status == "ok")) |
         sort_by(.iops) | if length == 0 then null else .[length / 2 | floor] end' "$results"
}
# ratio TARGET SECTION CELL A B[,B2...]: "median-ratio (round ratios)" of IOPS, A over B, or over
# the larger of several B (median against the larger median; each round against that round's larger).
ratio() {
    jq -s -r --arg t "$1" --arg s "$2" --arg c "$3" --arg a "$4" --arg b "$5" '
        def runs($d): map(select(.target == $t and .section == $s and .cell == $c and .daemon == $d and .status == "ok"));
        def median: sort | if length == 0 then null else .[length / 2 | floor] end;
        . as $all | ($b | split(",")) as $bs |
        (runs($a) | map(.iops) | median) as $ma |
        [$bs[] as $d | $all | runs($d) | map(.iops) | median] as $mbs |
        [runs($a)[] as $x | [$bs[] as $d | $all | runs($d)[] | select(.round == $x.round) | .iops] |
            select(length == ($bs | length)) | $x.iops / max] as $per |
        if $ma == null or any($mbs[]; . == null) then "n/a"
        else "\($ma / ($mbs | max) * 1000 | round / 1000) (rounds: \($per | map(. * 100 | round / 100 | tostring) | join(" ")))" end' \
        "$results"
}
# cpu_ratio TARGET SECTION CELL A B: "median-ratio (round ratios)" of daemon CPU per I/O, A over B
# (medians over all of each daemon's runs).
cpu_ratio() {
    jq -s -r --arg t "$1" --arg s "$2" --arg c "$3" --arg a "$4" --arg b "$5" '
        def runs($d): map(select(.target == $t and .section == $s and .cell == $c and .daemon == $d and .status == "ok"));
        def median: sort | if length == 0 then null else .[length / 2 | floor] end;
        (runs($a) | map(.daemon_cpu_us_per_io) | median) as $ma | (runs($b) | map(.daemon_cpu_us_per_io) | median) as $mb |
        [runs($a)[] as $x | runs($b)[] | select(.round == $x.round) | $x.daemon_cpu_us_per_io / .daemon_cpu_us_per_io] as $per |
        if $ma == null or $mb == null then "n/a"
        else "\($ma / $mb * 1000 | round / 1000) (rounds: \($per | map(. * 100 | round / 100 | tostring) | join(" ")))" end' \
        "$results"
}
rval() { echo "${1%% *}"; }
verdict() { # verdict VALUE OP TARGET
    [[ "$1" == n/a ]] && { echo "n/a"; return; }
    if awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { exit !((op == ">=" && v >= t) || (op == "<=" && v <= t)) }'; then
        echo "MET"
    else
        echo "NOT MET"
    fi
}
# first_line PATTERN LOG...: the first line matching PATTERN in the logs, without colour codes,
# timestamp, level and module.
first_line() {
    local p=$1
    shift
    cat "$@" 2>/dev/null | grep -m 1 -e "$p" | sed -E 's/\x1b\[[0-9;]*m//g; s/^[0-9T:.Z-]+ +[A-Z]+ +[a-z_:]+: //' || true
}

for tgt in "${bench_targets[@]}"; do
    echo
    echo "== $tgt, clean load: median-IOPS run of $rounds round(s), ${seconds}s each, 1 queue, ${size} image"
    echo "   ${tdesc[$tgt]}"
    auto_logs=("$work/$tgt"-run*-auto.log)
    engine=$(first_line "guardblk ready" "${auto_logs[@]}" | grep -oE 'io_engine=[^ ]+' || true)
    [[ -z "$engine" ]] || echo "   guardblk --bounce auto: $engine"
    wpath=$(first_line "write path" "${auto_logs[@]}")
    [[ -z "$wpath" ]] || echo "   $wpath"
    printf '%-18s | %-7s | %10s | %9s | %11s | %7s | %7s | %9s\n' workload daemon IOPS "p99 us" "CPU us/IO" bounced zerocopy rewritten
    printf -- '-%.0s' $(seq 96)
    echo
    for spec in "${clean[@]}"; do
        IFS='|' read -r cell daemons _ <<<"$spec"
        for d in $daemons; do
            m=$(med "$tgt" clean "$cell" "$d")
            [[ "$m" == null ]] && { printf '%-18s | %-7s | %10s\n' "$cell" "$d" "no run"; continue; }
            jq -r --arg cell "$cell" '[$cell, .daemon, .iops, .p99_us, .daemon_cpu_us_per_io,
                (.session.writes_bounced // "-"), (.session.writes_zero_copy // "-"), (.session.writes_rewritten // "-")] | @tsv' <<<"$m" |
                while IFS=$'\t' read -r c d i p cpu b z w; do
                    printf '%-18s | %-7s | %10.0f | %9.1f | %11.2f | %7s | %7s | %9s\n' "$c" "$d" "$i" "$p" "$cpu" "$b" "$z" "$w"
                done
        done
    done

    echo
    echo "== $tgt, mutating load (4 KiB random write QD 32, loadgen --scribble --no-overlap): measured session after a ${warmup}s warm-up on the same daemon"
    printf '%-18s | %-7s | %10s | %9s | %9s | %9s | %9s | %9s | %s\n' load daemon IOPS "p99 us" writes "rewritten" "bounced" "zerocopy" \
        "warm-up: rewritten/writes"
    printf -- '-%.0s' $(seq 124)
    echo
    for spec in "${mutating[@]}"; do
        IFS='|' read -r cell daemons _ <<<"$spec"
        for d in $daemons; do
            m=$(med "$tgt" mutating "$cell" "$d")
            [[ "$m" == null ]] && { printf '%-18s | %-7s | %10s\n' "$cell" "$d" "no run"; continue; }
            jq -r --arg cell "$cell" '[$cell, .daemon, .iops, .p99_us, .session.writes,
                (.session.writes_rewritten / .session.writes * 100), (.session.writes_bounced / .session.writes * 100),
                (.session.writes_zero_copy / .session.writes * 100),
                "\(.warmup_session.writes_rewritten)/\(.warmup_session.writes)"] | @tsv' <<<"$m" |
                while IFS=$'\t' read -r c d i p w rw b z wu; do
                    printf '%-18s | %-7s | %10.0f | %9.1f | %9s | %8.3f%% | %8.2f%% | %8.2f%% | %s\n' "$c" "$d" "$i" "$p" "$w" "$rw" "$b" "$z" "$wu"
                done
        done
    done
    auto_rw_rounds=$(jq -s -r --arg t "$tgt" 'map(select(.target == $t and .section == "mutating" and .daemon == "auto" and .status == "ok")) |
        map("\(.cell) r\(.round) \(.session.writes_rewritten)/\(.session.writes)") | join(", ")' "$results")
    echo "auto, rewritten/writes of every measured session: $auto_rw_rounds"

    echo
    echo "== $tgt, demonstrations"
    jq -s -r --arg t "$tgt" 'map(select(.target == $t and .section == "demo"))[] |
        if .cell == "unchecked-scribble" then
            "--no-mutation-check under --scribble (UNSAFE mode, expected to break): \(.status)  \(.iops // 0 | floor) IOPS; scrub afterwards finds \(.scrub_guard_errors) guard errors (expected > 0: the harness really changes buffers in flight)"
        else
            "--bounce never, --scribble with overlapping in-flight writes allowed: " +
            (if .status == "ok" then "ok, \(.iops | floor) IOPS, rewritten \(.session.writes_rewritten)/\(.session.writes), scrub \(.scrub_guard_errors) guard errors"
             else "\(.status): no completion for 10 s (see the stacks above); scrub \(.scrub_guard_errors) guard errors" end)
        end' "$results"
done

echo
echo "== targets (ratios of median IOPS; each round's own ratio in parentheses)"
printf '%-64s %-34s %s\n' check value verdict
printf -- '-%.0s' $(seq 110)
echo
row() { printf '%-64s %-34s %s\n' "$1" "$2" "$3"; }
all_bad=0
for tgt in "${bench_targets[@]}"; do
    for spec in "${clean[@]}"; do
        IFS='|' read -r cell _ <<<"$spec"
        case "$cell" in 4k-*) qmin=1.0 ;; *) qmin=0.9 ;; esac
        r=$(ratio "$tgt" clean "$cell" auto never,always)
        row "$tgt $cell: auto / max(never, always) (>= 0.97)" "$r" "$(verdict "$(rval "$r")" '>=' 0.97)"
        r=$(ratio "$tgt" clean "$cell" auto qsd)
        row "$tgt $cell: auto / qsd              (>= $qmin)" "$r" "$(verdict "$(rval "$r")" '>=' "$qmin")"
        row "$tgt $cell: always / never (cost of a bounce; info)" "$(ratio "$tgt" clean "$cell" always never)" ""
        case "$cell" in
            *read*) row "$tgt $cell: auto / guardblk without PI (>= 0.95)" "$(ratio "$tgt" clean "$cell" auto nopi)" \
                "$(verdict "$(rval "$(ratio "$tgt" clean "$cell" auto nopi)")" '>=' 0.95)" ;;
            *) row "$tgt $cell: auto / guardblk without PI (info)" "$(ratio "$tgt" clean "$cell" auto nopi)" "" ;;
        esac
        if [[ $cell == 4k-randwrite-qd32 ]]; then
            r=$(cpu_ratio "$tgt" clean "$cell" never nopi)
            row "$tgt $cell: CPU/IO never (zero-copy) / without PI (<= 1.3)" "$r" "$(verdict "$(rval "$r")" '<=' 1.3)"
        fi
    done
    # Rewrite fraction of auto's measured sessions, every round (the target applies to each).
    auto_rw=$(jq -s -r --arg t "$tgt" 'map(select(.target == $t and .section == "mutating" and .cell == "scribble-all" and .daemon == "auto" and .status == "ok")) |
        map(.session.writes_rewritten / .session.writes * 100) |
        if length == 0 then "n/a" else max | . * 10000 | round / 10000 end' "$results")
    row "$tgt scribble, auto: rewritten / writes, measured (<= 1%)" "max over rounds $auto_rw%" "$(verdict "$auto_rw" '<=' 1)"
    row "$tgt scribble, never: rewritten / writes (contrast)" "$(jq -s -r --arg t "$tgt" 'map(select(.target == $t and .section == "mutating" and .cell == "scribble-all" and .daemon == "never" and .status == "ok") | .session.writes_rewritten / .session.writes * 100 | . * 10 | round / 10) | map(tostring + "%") | join(" ")' "$results")" ""
    row "$tgt scribble: auto / never IOPS" "$(ratio "$tgt" mutating scribble-all auto never)" ""
    row "$tgt scribble: auto / always IOPS" "$(ratio "$tgt" mutating scribble-all auto always)" ""
    row "$tgt page-file scribble: auto / never IOPS" "$(ratio "$tgt" mutating scribble-pagefile auto never)" ""
    # Guard errors after every PI run except the unchecked demonstration.
    # shellcheck disable=SC2016 # a jq program
    sel='map(select(.target == $t and .daemon != "qsd" and .daemon != "nopi" and .cell != "unchecked-scribble"))'
    pi_runs=$(jq -s --arg t "$tgt" "$sel | length" "$results")
    bad_lines=$(jq -s --arg t "$tgt" "$sel | map(.guard_error_lines) | add // 0" "$results")
    bad_scrubs=$(jq -s --arg t "$tgt" "$sel | map(select(.scrub_guard_errors != 0)) | length" "$results")
    hangs=$(jq -s --arg t "$tgt" 'map(select(.target == $t and .status != "ok" and .cell != "overlap-scribble")) | length' "$results")
    row "$tgt PI guard error log lines, $pi_runs PI runs (must be 0)" "$bad_lines" "$( ((bad_lines == 0)) && echo MET || echo 'NOT MET')"
    row "$tgt runs whose scrub found guard errors (must be 0)" "$bad_scrubs" "$( ((bad_scrubs == 0)) && echo MET || echo 'NOT MET')"
    row "$tgt runs that hung or failed (overlap demo excluded)" "$hangs" "$( ((hangs == 0)) && echo MET || echo 'NOT MET')"
    ((bad_lines == 0 && bad_scrubs == 0)) || all_bad=1
done
echo "IOPS = loadgen completions in the window; CPU = daemon utime+stime per I/O; rewritten/bounced/zerocopy from the daemon's stats document (--stats-file)."
for tgt in "${bench_targets[@]}"; do target_note "$tgt"; done
echo "On tmpfs always/never compares one fused copy+guard pass against never's guard pass plus its after-completion"
echo "re-check, not against DMA from guest memory as on a real disk."
echo "2-core machine: the daemon (CPU $daemon_cpu) and the load generator plus the scribbler (CPU $client_cpu) already fill it;"
echo "runs vary by +-10% and more (whole runs in a slow mode happen), so read single-round ratios with care."
jq -c 'select(.status == "ok") | {panel: "\(.target) \(.section)", group: .cell, variant: .daemon, iops, p99_us}' \
    "$results" >"$results_dir/plot.jsonl"
bench_plot "$results_dir/plot.jsonl" "$results_dir/bounce.svg" \
    "bounce.sh at $(git describe --always --dirty): medians of $rounds round(s) x ${seconds}s"
echo "   results: $results"
((all_bad == 0)) || failed=1
((failed == 0)) || exit 1
