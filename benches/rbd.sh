#!/usr/bin/env bash
# Compare guardblk serving a Ceph RBD image (rbd:POOL/IMAGE, through librbd's asynchronous
# calls) with qemu-storage-daemon's rbd driver on the same image of the same one-node test
# cluster (tests/ceph/cluster.sh: a monitor and a memstore OSD on 127.0.0.1), both exported as a
# one-queue vhost-user-blk and driven by the libblkio load generator (benches/loadgen.rs); and
# guardblk with T10 PI (type1, 4 KiB intervals, tuples in the RBD image IMAGE.pi) on a copy of
# that image against guardblk without PI.
#
#   bash benches/rbd.sh [--quick] [--seconds S] [--rounds N] [--size SIZE]
#                       [--daemon-cpu N] [--client-cpu N] [--ceph-cpu N]
#
# Both daemons run with librbd's cache off (guardblk always; qsd with cache.direct=on, which
# makes QEMU set rbd_cache=false), so every completed write is on the OSD. The daemon under
# test is pinned to --daemon-cpu (default 0), the load generator to --client-cpu (default 1);
# the Ceph monitor and OSD (the storage both daemons share) to --ceph-cpu if given, else not
# at all, so that on a small machine they compete with both. Every run starts its daemon
# fresh; each workload runs --rounds times per daemon, alternating which goes first; the table
# reports the run with the median IOPS per daemon and the ratio of the medians with each
# round's own ratio beside it.
# Needs ceph-mon, ceph-osd, ceph-common (rbd), qemu-storage-daemon with its rbd module
# (Debian: qemu-block-extra) and jq. Honours CARGO_TARGET_DIR and CEPH_TEST_PORT.
set -euo pipefail

seconds=10
rounds=3
size=1G
daemon_cpu=0
client_cpu=1
ceph_cpu=

usage() {
    sed -n '2,21s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --quick) seconds=3 ;;
        --seconds) seconds="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --size) size="$2"; shift ;;
        --daemon-cpu) daemon_cpu="$2"; shift ;;
        --client-cpu) client_cpu="$2"; shift ;;
        --ceph-cpu) ceph_cpu="$2"; shift ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }

cd "$(dirname "$0")/.."
# shellcheck source=lib.sh
source benches/lib.sh
for tool in jq qemu-storage-daemon ceph-mon ceph-osd rbd; do
    command -v "$tool" >/dev/null || { echo "needs $tool (see the header of $0)" >&2; exit 2; }
done
bench_check_cpus "$daemon_cpu" "$client_cpu"

# Name, --rw, --bs, --iodepth; every workload uses one virtqueue.
workloads=(
    "4k-randread-qd32   randread  4k   32"
    "4k-randwrite-qd32  randwrite 4k   32"
    "128k-read-qd8      read      128k 8"
    "128k-write-qd8     write     128k 8"
)

echo "== building"
bench_build
work=$(mktemp -d /tmp/guardblk-rbd-bench.XXXXXX)
cp "$guardblk_built" "$work/guardblk"
cp "$loadgen_built" "$work/loadgen"
guardblk=$work/guardblk
loadgen=$work/loadgen
echo "   guardblk $(git describe --always --dirty), $(qemu-storage-daemon --version | head -n 1)"
echo "   daemon pinned to CPU $daemon_cpu, load generator to CPU $client_cpu"

cluster=$work/cluster
daemon_pid=
cleanup() {
    if [[ -n "$daemon_pid" ]]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    bash tests/ceph/cluster.sh stop "$cluster" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bytes=$(numfmt --from=iec "$size")
echo "== starting the test cluster"
CEPH_TEST_OSD_BYTES=$((bytes * 2 + (1 << 30))) bash tests/ceph/cluster.sh start "$cluster" | sed 's/^/   /'
conf=$cluster/ceph.conf
if [[ -n $ceph_cpu ]]; then
    for pidfile in "$cluster"/run/*.pid; do
        taskset -a -p -c "$ceph_cpu" "$(<"$pidfile")" >/dev/null
    done
    echo "   Ceph daemons pinned to CPU $ceph_cpu"
fi
pool=rbd
rbd_image=bench
pi_image=bench-pi
echo "   filling rbd:$pool/$rbd_image and rbd:$pool/$pi_image ($size each) with the same random data, so every read hits written objects"
head -c "$bytes" /dev/urandom >"$work/fill.raw"
rbd -c "$conf" import --no-progress "$work/fill.raw" "$pool/$rbd_image"
rbd -c "$conf" import --no-progress "$work/fill.raw" "$pool/$pi_image"
rm -f "$work/fill.raw"
echo "   generating the PI tuples of rbd:$pool/$pi_image (guardblk import)"
"$guardblk" import "rbd:$pool/$pi_image" --pi type1 --interval 4096 --ceph-conf "$conf" \
    --rbd-state-dir "$work/state" >"$work/import.log" 2>&1 || { cat "$work/import.log" >&2; exit 1; }

# start_daemon NAME SOCKET: start the daemon pinned to $daemon_cpu, set daemon_pid, wait until
# it listens. Its log is $work/NAME.log (the last run's).
start_daemon() {
    local name=$1 sock=$2 log="$work/$1.log"
    local pin=(taskset -c "$daemon_cpu")
    rm -f "$sock"
    case "$name" in
        guardblk | guardblk-pi)
            local target=$rbd_image
            [[ $name == guardblk-pi ]] && target=$pi_image
            RUST_LOG=info "${pin[@]}" "$guardblk" serve "rbd:$pool/$target" --ceph-conf "$conf" \
                --rbd-state-dir "$work/state" --socket "$sock" --queues 1 >/dev/null 2>"$log" &
            ;;
        qsd)
            "${pin[@]}" qemu-storage-daemon \
                --blockdev "driver=rbd,node-name=rbd0,pool=$pool,image=$rbd_image,conf=$conf,user=admin,cache.direct=on" \
                --export "type=vhost-user-blk,id=exp0,node-name=rbd0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
                >/dev/null 2>"$log" &
            ;;
    esac
    daemon_pid=$!
    for _ in $(seq 400); do
        case "$name" in
            guardblk*) grep -q "guardblk ready" "$log" && return ;;
            qsd) [[ -S "$sock" ]] && return ;;
        esac
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "$name did not start; its log:" >&2
    cat "$log" >&2
    exit 1
}

stop_daemon() {
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || true
    daemon_pid=
}

# run_one DAEMON RW BS QD: the load generator against a fresh daemon; sets json to its result.
run_one() {
    local name=$1 rw=$2 bs=$3 qd=$4 sock="$work/$1.sock" out="$work/loadgen.out"
    start_daemon "$name" "$sock"
    if ! taskset -c "$client_cpu" "$loadgen" --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues 1 \
        --seconds "$seconds" --pid "$daemon_pid" >"$out" 2>&1; then
        echo "load generator failed against $name:" >&2
        cat "$out" "$work/$name.log" >&2
        exit 1
    fi
    stop_daemon
    [[ "$name" == qsd ]] || cat "$work/$name.log" >>"$work/guardblk.all.log"
    json=$(tail -n 1 "$out")
}

declare -A results # "workload daemon" -> newline-separated JSON lines, one per round
bench_results rbd
rounds_file=$results_dir/rounds.jsonl
echo "== $rounds round(s) x ${seconds}s per workload and daemon; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for ((round = 1; round <= rounds; round++)); do
    if ((round % 2)); then order=(guardblk qsd guardblk-pi); else order=(guardblk-pi qsd guardblk); fi
    for w in "${workloads[@]}"; do
        read -r label rw bs qd <<<"$w"
        for d in "${order[@]}"; do
            run_one "$d" "$rw" "$bs" "$qd"
            results["$label $d"]+="$json"$'\n'
            jq -c --arg w "$label" --arg d "$d" --argjson r "$round" \
                '. + {target: "rbd", workload: $w, daemon: $d, round: $r}' <<<"$json" >>"$rounds_file"
            printf '  round %d  %-18s %-8s %s\n' "$round" "$label" "$d" \
                "$(jq -r '"\(.iops|floor) IOPS  p50 \(.p50_us) us  p99 \(.p99_us) us  CPU \(.daemon_cpu_us_per_io) us/IO"' <<<"$json")"
        done
    done
done

median() {
    bench_median "$1"
}
ratio() {
    bench_ratio "${results["$1 $2"]}" "${results["$1 $3"]}"
}

# table A B LABEL_A LABEL_B: per workload, the median-IOPS runs of daemons A and B and the
# ratio of their medians (with each round's ratio).
table() {
    local a=$1 b=$2 w label ga gb r
    printf '%-18s | %13s | %13s | %-28s | %15s | %15s | %15s | %15s\n' \
        workload "$3 IOPS" "$4 IOPS" "ratio (rounds)" "$3 p99 us" "$4 p99 us" "$3 CPU/IO" "$4 CPU/IO"
    printf -- '-%.0s' $(seq 140)
    echo
    for w in "${workloads[@]}"; do
        read -r label _ <<<"$w"
        ga=$(median "${results["$label $a"]}")
        gb=$(median "${results["$label $b"]}")
        r=$(ratio "$label" "$a" "$b")
        jq -nr --arg name "$label" --arg r "$r" --argjson g "$ga" --argjson q "$gb" \
            '[$name, $g.iops, $q.iops, $r, $g.p99_us, $q.p99_us,
              $g.daemon_cpu_us_per_io, $q.daemon_cpu_us_per_io] | @tsv' |
            while IFS=$'\t' read -r n gi qi rr gp qp gc qc; do
                printf '%-18s | %13.0f | %13.0f | %-28s | %15.1f | %15.1f | %15.2f | %15.2f\n' \
                    "$n" "$gi" "$qi" "$rr" "$gp" "$qp" "$gc" "$qc"
            done
    done
}

echo
echo "== rbd:$pool/$rbd_image ($size, one-node memstore cluster): median-IOPS run of $rounds round(s) per cell, ${seconds}s each"
table guardblk qsd guardblk qsd
echo "ratio = guardblk IOPS / qsd IOPS; CPU = daemon utime+stime (all threads, librbd's included) per I/O, in us"
echo
echo "== guardblk with T10 PI (type1, 4 KiB intervals, tuples in rbd:$pool/$pi_image.pi) against guardblk without PI"
table guardblk-pi guardblk PI no-PI
errors=$(grep -c "PI guard error" "$work/guardblk.all.log" || true)
echo "PI guard errors logged during the runs: $errors (must be 0)"
jq -c '{panel: .target, group: .workload, variant: .daemon, iops, p99_us}' "$rounds_file" >"$results_dir/plot.jsonl"
bench_plot "$results_dir/plot.jsonl" "$results_dir/rbd.svg" \
    "rbd.sh at $(git describe --always --dirty): $rounds round(s) x ${seconds}s"
echo "   results: $rounds_file"
((errors == 0)) || exit 1
