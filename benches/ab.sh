#!/usr/bin/env bash
# Does a change make guardblk slower? Builds a base revision in a temporary git worktree and the
# working tree as it is, serves a fresh image with each (side by side, both pinned to the same
# CPU) and drives them with the libblkio load generator (benches/loadgen.rs) in alternating
# rounds, so both see the same machine. Prints every round, and per workload the median IOPS of
# each, the median of the per-round ratios (working tree / base) with their range, and CPU per I/O.
#
#   bash benches/ab.sh --base REV [--rounds N] [--seconds S] [--pi type1|type3|nvme64|none]
#                      [--workload "RW BS QD"]... [--size SIZE] [--target tmpfs|xfs]
#                      [--interval 512|4096] [--serve-arg ARG]...
#                      [--daemon-cpu N] [--client-cpu N]
#
# Defaults: 7 rounds of 3 s; PI type1 and no PI; workloads "randwrite 4k 32" and "randread 4k 32";
# a 1 GiB image of random data per daemon on tmpfs (PI added by each build's own `import`, so
# reads verify real tuples). REV is anything git understands (HEAD~1, a commit, a tag).
# Results go to target/bench-results/ab-TIME/ (rounds.jsonl and an SVG, see lib.sh).
set -euo pipefail

base=
rounds=7
seconds=3
interval=4096
serve_args=()
pis=(type1 none)
workloads=()
size=1G
target=tmpfs
daemon_cpu=0
client_cpu=1

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

pi_set=0
while (($#)); do
    case "$1" in
        --base) base="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --seconds) seconds="$2"; shift ;;
        --interval) interval="$2"; shift ;;
        --serve-arg) serve_args+=("$2"); shift ;;
        --pi) ((pi_set)) || pis=(); pi_set=1; pis+=("$2"); shift ;;
        --workload) workloads+=("$2"); shift ;;
        --size) size="$2"; shift ;;
        --target) target="$2"; shift ;;
        --daemon-cpu) daemon_cpu="$2"; shift ;;
        --client-cpu) client_cpu="$2"; shift ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done
[[ -n "$base" ]] || { echo "--base REV is required" >&2; usage 2 >&2; }
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }
((${#workloads[@]})) || workloads=("randwrite 4k 32" "randread 4k 32")
[[ "$target" == tmpfs || "$target" == xfs ]] || { echo "--target must be tmpfs or xfs, not '$target'" >&2; exit 2; }

cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
source benches/lib.sh
bench_parse_targets "$target"
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }
bench_check_targets
bench_check_cpus "$daemon_cpu" "$client_cpu"
base_rev=$(git rev-parse --verify --quiet "$base^{commit}") ||
    { echo "--base $base is not a revision of this repository" >&2; exit 2; }

echo "== building the working tree ($(git describe --always --dirty))"
bench_build
work=$(mktemp -d /tmp/guardblk-ab.XXXXXX)
cp "$guardblk_built" "$work/guardblk-new"
cp "$loadgen_built" "$work/loadgen"
echo "== building base $base ($(git rev-parse --short "$base_rev")) in a temporary worktree"
git worktree add --quiet --detach "$work/base-tree" "$base_rev"
(cd "$work/base-tree" && CARGO_TARGET_DIR="$work/base-target" cargo build --release --quiet)
cp "$work/base-target/release/guardblk" "$work/guardblk-base"

declare -A pid=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local p
    for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pid[@]}"; do wait "$p" 2>/dev/null || true; done
    git worktree remove --force "$work/base-tree" 2>/dev/null || true
    target_teardown
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bytes=$(numfmt --from=iec "$size")
target_setup "$target" ab "$work" $(((2 * ${#pis[@]} + 1) * bytes))
echo "   $tgt_desc"
bench_results ab
rounds_file=$results_dir/rounds.jsonl

# Random data written once with O_DIRECT, copied for every daemon, PI added by each build's own
# `import`: reads hit allocated blocks with real tuples, writes find their pages allocated.
echo "   writing $size of random data"
dd if=/dev/urandom of="$tgt_dir/seed.img" bs=1M count=$((bytes >> 20)) oflag=direct status=none
# One daemon per build and PI format, alive for the whole run.
for pi in "${pis[@]}"; do
    for v in base new; do
        n=$v-$pi
        dd if="$tgt_dir/seed.img" of="$tgt_dir/$n.img" bs=1M iflag=direct oflag=direct status=none
        if [[ $pi != none ]]; then
            "$work/guardblk-$v" import "$tgt_dir/$n.img" --pi "$pi" --interval "$interval" >"$work/$n.import" 2>&1 ||
                { cat "$work/$n.import" >&2; exit 1; }
        fi
        taskset -c "$daemon_cpu" "$work/guardblk-$v" serve "$tgt_dir/$n.img" --socket "$work/$n.sock" \
            --queues 1 "${serve_args[@]}" >/dev/null 2>"$work/$n.log" &
        pid[$n]=$!
        for _ in $(seq 200); do
            grep -qs "guardblk ready" "$work/$n.log" && break
            kill -0 "${pid[$n]}" 2>/dev/null || { cat "$work/$n.log" >&2; exit 1; }
            sleep 0.05
        done
    done
done
rm -f "$tgt_dir/seed.img"

echo "== $rounds round(s) x ${seconds}s per workload, PI format and build; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for w in "${workloads[@]}"; do
    read -r rw bs qd <<<"$w"
    for pi in "${pis[@]}"; do
        for ((round = 1; round <= rounds; round++)); do
            if ((round % 2)); then order=(base new); else order=(new base); fi
            for v in "${order[@]}"; do
                n=$v-$pi
                json=$(taskset -c "$client_cpu" "$work/loadgen" --socket "$work/$n.sock" --rw "$rw" --bs "$bs" \
                    --iodepth "$qd" --queues 1 --seconds "$seconds" --pid "${pid[$n]}" 2>"$work/loadgen.err" |
                    tail -n 1) || { cat "$work/loadgen.err" >&2; exit 1; }
                jq -c --arg w "$rw $bs QD $qd" --arg pi "$pi" --arg v "$v" --argjson r "$round" \
                    '. + {workload: $w, pi: $pi, build: $v, round: $r}' <<<"$json" >>"$rounds_file"
                printf '  %-22s pi %-6s round %d  %-4s %s\n' "$rw $bs QD $qd" "$pi" "$round" "$v" \
                    "$(jq -r '"\(.iops|floor) IOPS  p99 \(.p99_us) us  CPU \(.daemon_cpu_us_per_io) us/IO"' <<<"$json")"
            done
        done
    done
done

echo
echo "== working tree / base $base ($(git rev-parse --short "$base_rev")): median of per-round IOPS ratios (range)"
printf '%-22s | %-6s | %11s | %11s | %-22s | %9s | %9s\n' workload pi "base IOPS" "new IOPS" "new/base (range)" "base CPU" "new CPU"
printf -- '-%.0s' $(seq 106)
echo
jq -s -r '
    def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    group_by([.workload, .pi])[] |
    (map(select(.build == "base")) | sort_by(.round)) as $b |
    (map(select(.build == "new")) | sort_by(.round)) as $n |
    [range(0; [($b | length), ($n | length)] | min) | $n[.].iops / $b[.].iops] as $r |
    [.[0].workload, .[0].pi, ($b | map(.iops) | median), ($n | map(.iops) | median),
     "\($r | median * 100 | round / 100) (\($r | min * 100 | round / 100)-\($r | max * 100 | round / 100))",
     ($b | map(.daemon_cpu_us_per_io) | median), ($n | map(.daemon_cpu_us_per_io) | median)] | @tsv' "$rounds_file" |
    while IFS=$'\t' read -r w pi bi ni r bc nc; do
        printf '%-22s | %-6s | %11.0f | %11.0f | %-22s | %6.2f us | %6.2f us\n' "$w" "$pi" "$bi" "$ni" "$r" "$bc" "$nc"
    done
echo "CPU = daemon utime+stime per I/O (median of rounds). On this machine single rounds swing by 10-30 %:"
echo "read the median ratio with its range, and repeat before believing a difference under ~5 %."
jq -c '{panel: "\(.workload), pi \(.pi)", group: .workload, variant: .build, iops, p99_us}' "$rounds_file" \
    >"$results_dir/plot.jsonl"
bench_plot "$results_dir/plot.jsonl" "$results_dir/ab.svg" \
    "ab.sh: $(git describe --always --dirty) against $base, $rounds rounds x ${seconds}s"
echo "   results: $rounds_file"
