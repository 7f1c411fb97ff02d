#!/usr/bin/env bash
# Is guardblk's speed stable when its CPU is shared? Runs guardblk and qemu-storage-daemon side by
# side, both pinned to the same CPU, and drives each with the libblkio load generator
# (benches/loadgen.rs) in short alternating rounds, under each scenario:
#
#   alone  nothing else runs on the daemons' CPU
#   hog    a CPU-bound process (a shell busy loop) runs on the daemons' CPU during every round
#   peer   both daemons serve a load at the same time (each its own load generator)
#
#   bash benches/stability.sh [--rounds N] [--seconds S] [--scenario alone|hog|peer|all]
#                             [--rw randwrite|randread|write|read] [--bs SIZE] [--iodepth N]
#                             [--size SIZE] [--target tmpfs|xfs] [--guardblk-args "ARGS"]
#                             [--daemon-cpu N] [--client-cpu N]
#
# Defaults: 5 rounds of 3 s, every scenario, 4 KiB random writes at QD 32 on a 1 GiB image on tmpfs,
# daemons on CPU 0, load generators on CPU 1. --guardblk-args adds options to `guardblk serve`
# (e.g. "--poll-us 0"), to measure a setting against the default. Honours CARGO_TARGET_DIR.
#
# For each scenario and daemon it prints the median, lowest and highest IOPS, the spread
# ((highest - lowest) / median) and the p99 latency (median and worst round), and checks the
# goal: guardblk's spread at most 10 % and its median p99 at most qsd's. Exit status 1 if a
# scenario misses it, so the goal cannot be missed silently.
set -euo pipefail

rounds=5
seconds=3
scenario=all
rw=randwrite
bs=4k
iodepth=32
size=1G
target=tmpfs
guardblk_args=
daemon_cpu=0
client_cpu=1

usage() {
    sed -n '2,23s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --rounds) rounds="$2"; shift ;;
        --seconds) seconds="$2"; shift ;;
        --scenario) scenario="$2"; shift ;;
        --rw) rw="$2"; shift ;;
        --bs) bs="$2"; shift ;;
        --iodepth) iodepth="$2"; shift ;;
        --size) size="$2"; shift ;;
        --target) target="$2"; shift ;;
        --guardblk-args) guardblk_args="$2"; shift ;;
        --daemon-cpu) daemon_cpu="$2"; shift ;;
        --client-cpu) client_cpu="$2"; shift ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
case "$scenario" in
    alone | hog | peer) scenarios=("$scenario") ;;
    all) scenarios=(alone hog peer) ;;
    *) echo "--scenario must be alone, hog, peer or all, not '$scenario'" >&2; exit 2 ;;
esac
[[ "$target" == tmpfs || "$target" == xfs ]] || { echo "--target must be tmpfs or xfs, not '$target'" >&2; exit 2; }

cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
source benches/lib.sh
bench_parse_targets "$target"
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }
command -v qemu-storage-daemon >/dev/null || { echo "needs qemu-storage-daemon" >&2; exit 2; }
bench_check_targets
bench_check_cpus "$daemon_cpu" "$client_cpu"
read -r -a extra <<<"$guardblk_args"

echo "== building"
bench_build
work=$(mktemp -d /tmp/guardblk-stability.XXXXXX)
cp "$guardblk_built" "$work/guardblk"
cp "$loadgen_built" "$work/loadgen"
echo "   guardblk $(git describe --always --dirty)${guardblk_args:+ serve $guardblk_args}, $(qemu-storage-daemon --version | head -n 1)"
echo "   daemons pinned to CPU $daemon_cpu, load generators to CPU $client_cpu"

guardblk_pid=
qsd_pid=
hog_pid=
# The hog first: while it spins, everything else on its CPU (cleanup included) crawls.
stop_hog() {
    if [[ -n "$hog_pid" ]]; then
        kill -KILL "$hog_pid" 2>/dev/null || true
        wait "$hog_pid" 2>/dev/null || true
        hog_pid=
    fi
}
stop_daemons() {
    local p
    for p in "$guardblk_pid" "$qsd_pid"; do
        [[ -z "$p" ]] || kill -TERM "$p" 2>/dev/null || true
    done
    for p in "$guardblk_pid" "$qsd_pid"; do
        [[ -z "$p" ]] || wait "$p" 2>/dev/null || true
    done
    guardblk_pid='' qsd_pid=''
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_hog
    stop_daemons
    target_teardown
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bytes=$(numfmt --from=iec "$size")
target_setup "$target" stability "$work" $((2 * bytes))
echo "   $tgt_desc"
for d in guardblk qsd; do
    # Written with O_DIRECT: nothing in the page cache or left to write back during the runs.
    dd if=/dev/urandom of="$tgt_dir/$d.img" bs=1M count=$((bytes >> 20)) oflag=direct status=none
done

# start_daemons: both daemons, pinned to $daemon_cpu, each on its own image; wait until both listen.
start_daemons() {
    local pin=(taskset -c "$daemon_cpu") i
    rm -f "$work/guardblk.sock" "$work/qsd.sock"
    RUST_LOG=info "${pin[@]}" "$work/guardblk" serve "$tgt_dir/guardblk.img" --socket "$work/guardblk.sock" \
        --queues 1 "${extra[@]}" >/dev/null 2>>"$work/guardblk.log" &
    guardblk_pid=$!
    qsd_args "$tgt_dir/qsd.img" "$work/qsd.sock"
    "${pin[@]}" qemu-storage-daemon "${qsd_cmd[@]}" >/dev/null 2>>"$work/qsd.log" &
    qsd_pid=$!
    for i in $(seq 200); do
        [[ -S "$work/qsd.sock" ]] && grep -q "guardblk ready" "$work/guardblk.log" && return
        if ! kill -0 "$guardblk_pid" 2>/dev/null || ! kill -0 "$qsd_pid" 2>/dev/null || ((i == 200)); then break; fi
        sleep 0.05
    done
    echo "a daemon did not start; the logs:" >&2
    cat "$work/guardblk.log" "$work/qsd.log" >&2
    exit 1
}

# load NAME OUT: one load generator run against daemon NAME (pinned to $client_cpu), in the
# background; sets load_pid.
load() {
    local name=$1 out=$2 pid
    if [[ $name == guardblk ]]; then pid=$guardblk_pid; else pid=$qsd_pid; fi
    taskset -c "$client_cpu" "$work/loadgen" --socket "$work/$name.sock" --rw "$rw" --bs "$bs" \
        --iodepth "$iodepth" --queues 1 --seconds "$seconds" --pid "$pid" >"$out" 2>&1 &
    load_pid=$!
}

# finish NAME OUT PID SCENARIO ROUND: wait for a load generator, record and print its result.
declare -A results # "scenario daemon" -> newline-separated JSON lines, one per round
bench_results stability
rounds_file=$results_dir/rounds.jsonl # every round: target, scenario, daemon, round + loadgen's line
finish() {
    local name=$1 out=$2 pid=$3 sc=$4 round=$5 json
    if ! wait "$pid"; then
        stop_hog
        echo "load generator failed against $name ($sc, round $round):" >&2
        cat "$out" >&2
        exit 1
    fi
    json=$(tail -n 1 "$out")
    results["$sc $name"]+="$json"$'\n'
    jq -c --arg t "$target" --arg s "$sc" --arg d "$name" --argjson r "$round" \
        '. + {target: $t, scenario: $s, daemon: $d, round: $r}' <<<"$json" >>"$rounds_file"
    printf '  %-5s round %d  %-8s %s\n' "$sc" "$round" "$name" \
        "$(jq -r '"\(.iops|floor) IOPS  p50 \(.p50_us) us  p99 \(.p99_us) us  CPU \(.daemon_cpu_us_per_io) us/IO"' <<<"$json")"
}

start_hog() {
    taskset -c "$daemon_cpu" bash -c 'while :; do :; done' &
    hog_pid=$!
}

: >"$work/guardblk.log"
: >"$work/qsd.log"
for sc in "${scenarios[@]}"; do
    echo "== scenario $sc: $rounds round(s) x ${seconds}s, $rw $bs QD $iodepth; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    start_daemons
    for ((round = 1; round <= rounds; round++)); do
        if [[ $sc == peer ]]; then
            load guardblk "$work/g.out"
            g=$load_pid
            load qsd "$work/q.out"
            q=$load_pid
            finish guardblk "$work/g.out" "$g" "$sc" "$round"
            finish qsd "$work/q.out" "$q" "$sc" "$round"
            continue
        fi
        # Alternate who goes first, so neither always runs on a cooler (or hotter) machine.
        if ((round % 2)); then order=(guardblk qsd); else order=(qsd guardblk); fi
        for d in "${order[@]}"; do
            [[ $sc != hog ]] || start_hog
            load "$d" "$work/$d.out"
            p=$load_pid
            # Kill the hog before anything waits on it (wait in finish would crawl beside it).
            wait "$p" || true
            stop_hog
            finish "$d" "$work/$d.out" "$p" "$sc" "$round"
        done
    done
    stop_daemons
done

errors=$(grep -c "panicked\|ERROR" "$work/guardblk.log" || true)
((errors == 0)) || { echo "guardblk logged $errors error line(s):" >&2; grep "panicked\|ERROR" "$work/guardblk.log" >&2; }

echo
echo "== per scenario: $rounds round(s) of ${seconds}s, $rw $bs QD $iodepth, $tgt_desc"
printf '%-6s | %-8s | %11s | %11s | %11s | %7s | %11s | %11s\n' \
    scenario daemon "median IOPS" "lowest" "highest" spread "p99 med us" "p99 max us"
printf -- '-%.0s' $(seq 98)
echo
status=0
summary() {
    jq -s -c '
        def median: sort | .[length / 2 | floor];
        (map(.iops)) as $i | (map(.p99_us)) as $p |
        {median: ($i | median), low: ($i | min), high: ($i | max),
         spread: ((($i | max) - ($i | min)) / ($i | median)),
         p99: ($p | median), p99max: ($p | max)}' <<<"$1"
}
for sc in "${scenarios[@]}"; do
    declare -A s=()
    for d in guardblk qsd; do
        s[$d]=$(summary "${results["$sc $d"]}")
        jq -r --arg sc "$sc" --arg d "$d" '[$sc, $d, .median, .low, .high, .spread * 100, .p99, .p99max] | @tsv' <<<"${s[$d]}" |
            while IFS=$'\t' read -r a b m l h sp p pm; do
                printf '%-6s | %-8s | %11.0f | %11.0f | %11.0f | %6.1f%% | %11.1f | %11.1f\n' "$a" "$b" "$m" "$l" "$h" "$sp" "$p" "$pm"
            done
    done
    verdict=$(jq -nr --argjson g "${s[guardblk]}" --argjson q "${s[qsd]}" '
        [if $g.spread <= 0.10 then empty else "spread \($g.spread * 1000 | round / 10)% > 10%" end,
         if $g.p99 <= $q.p99 then empty else "p99 \($g.p99) us > qsd \($q.p99) us" end] |
        if length == 0 then "met" else "NOT MET: " + join(", ") end')
    echo "       goal (guardblk spread <= 10 %, median p99 <= qsd's): $verdict; IOPS guardblk/qsd $(jq -nr --argjson g "${s[guardblk]}" --argjson q "${s[qsd]}" '$g.median / $q.median * 100 | round / 100')"
    [[ $verdict == met ]] || status=1
done
((errors == 0)) || status=1
jq -c '{panel: .target, group: .scenario, variant: .daemon, iops, p99_us}' "$rounds_file" >"$results_dir/plot.jsonl"
bench_plot "$results_dir/plot.jsonl" "$results_dir/stability.svg" \
    "stability.sh at $(git describe --always --dirty): $rounds rounds x ${seconds}s, 4 KiB random writes QD 32"
echo "   results: $rounds_file"
exit "$status"
