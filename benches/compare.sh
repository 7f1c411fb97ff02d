#!/usr/bin/env bash
# Compare guardblk with qemu-storage-daemon on the same tmpfs image, driven by the libblkio
# load generator (benches/loadgen.rs) over vhost-user-blk.
#
#   bash benches/compare.sh [--quick] [--seconds S] [--rounds N] [--size SIZE] [--with-io-uring]
#
# --with-io-uring also measures guardblk with --io-engine io-uring (on tmpfs its default is the
# inline engine, because tmpfs has no non-blocking I/O), so the engine choice is measured too.
#
# Every run starts its daemon fresh, so no run inherits another's state. Each workload is run
# --rounds times per daemon, alternating which daemon goes first, and the table reports the run
# with the median IOPS per daemon (its p99 and CPU/IO too, so each row's columns belong together).
set -euo pipefail

seconds=10
rounds=3
size=2G
with_uring=0

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --quick) seconds=3 ;;
        --seconds) seconds="$2"; shift ;;
        --rounds) rounds="$2"; shift ;;
        --size) size="$2"; shift ;;
        --with-io-uring) with_uring=1 ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive integer" >&2; exit 2; }

cd "$(dirname "$0")/.."

# Name, --rw, --bs, --iodepth; every workload uses one virtqueue.
workloads=(
    "4k-randread-qd32   randread  4k   32"
    "4k-randwrite-qd32  randwrite 4k   32"
    "128k-read-qd8      read      128k 8"
    "128k-write-qd8     write     128k 8"
)

echo "== building"
cargo build --release --quiet
loadgen=$(cargo bench --bench loadgen --no-run --message-format=json --quiet |
    jq -r 'select(.target.name == "loadgen" and .executable != null) | .executable')
guardblk=target/release/guardblk
# src/ may be changing under us: record exactly which tree was measured.
echo "   guardblk $(git describe --always --dirty), $(qemu-storage-daemon --version | head -n 1)"

work=$(mktemp -d /tmp/guardblk-compare.XXXXXX)
image=/dev/shm/guardblk-compare-$$.img
daemon_pid=
cleanup() {
    if [[ -n "$daemon_pid" ]]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -f "$image"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bytes=$(numfmt --from=iec "$size")
echo "== filling $image ($size) with random data, so every read hits allocated pages"
dd if=/dev/urandom of="$image" bs=1M count=$((bytes >> 20)) status=none
# qemu-storage-daemon's cache.direct=on needs O_DIRECT on tmpfs (Linux 6.6+); fail early if absent.
if ! dd if="$image" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; then
    echo "this kernel's tmpfs refuses O_DIRECT; cache.direct=on cannot work on $image" >&2
    exit 1
fi

# start_daemon NAME SOCKET: start the daemon in the background, set daemon_pid, wait until it listens.
start_daemon() {
    local name=$1 sock=$2 log="$work/$1.log"
    rm -f "$sock"
    case "$name" in
        guardblk)
            RUST_LOG=info "$guardblk" serve "$image" --socket "$sock" --queues 1 >/dev/null 2>"$log" &
            ;;
        guardblk-uring)
            RUST_LOG=info "$guardblk" serve "$image" --socket "$sock" --queues 1 --io-engine io-uring \
                >/dev/null 2>"$log" &
            ;;
        qsd)
            qemu-storage-daemon \
                --blockdev "driver=file,node-name=file0,filename=$image,cache.direct=on,aio=native" \
                --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
                >/dev/null 2>"$log" &
            ;;
    esac
    daemon_pid=$!
    for _ in $(seq 200); do
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
    # The kernel tears an exited process's io_uring down asynchronously, and until then the ring
    # keeps the image open, so guardblk's flock outlives the process by some milliseconds.
    # Wait for it, or a guardblk started right after would find the image still locked.
    for _ in $(seq 100); do
        flock -n "$image" true && return
        sleep 0.05
    done
    echo "the image is still locked 5 s after the daemon exited" >&2
    exit 1
}

# run_one DAEMON RW BS QD: run the load generator against a fresh daemon; set json to its
# result line. Runs in this shell (not a $(...) subshell) so the EXIT trap sees daemon_pid.
run_one() {
    local name=$1 rw=$2 bs=$3 qd=$4 sock="$work/$1.sock" out="$work/loadgen.out"
    start_daemon "$name" "$sock"
    if ! "$loadgen" --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues 1 \
        --seconds "$seconds" --pid "$daemon_pid" >"$out" 2>&1; then
        echo "load generator failed against $name:" >&2
        cat "$out" "$work/$name.log" >&2
        exit 1
    fi
    stop_daemon
    json=$(tail -n 1 "$out")
}

echo "== $rounds round(s) x ${seconds}s per workload and daemon; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A results # "workload daemon" -> newline-separated JSON lines
for ((round = 1; round <= rounds; round++)); do
    # Alternate who goes first, so neither daemon always runs on a cooler (or hotter) machine.
    if ((round % 2)); then order=(guardblk qsd); else order=(qsd guardblk); fi
    ((with_uring)) && order+=(guardblk-uring)
    for w in "${workloads[@]}"; do
        read -r label rw bs qd <<<"$w"
        for d in "${order[@]}"; do
            run_one "$d" "$rw" "$bs" "$qd"
            results["$label $d"]+="$json"$'\n'
            printf '  round %d  %-18s %-8s %s\n' "$round" "$label" "$d" \
                "$(jq -r '"\(.iops|floor) IOPS  p50 \(.p50_us) us  p99 \(.p99_us) us  CPU \(.daemon_cpu_us_per_io) us/IO"' <<<"$json")"
        done
    done
done

if ! grep -q "direct_io=true" "$work/guardblk.log"; then
    echo "warning: guardblk did not open the image with O_DIRECT; see $work/guardblk.log" >&2
fi

# median DAEMON-RESULTS: the JSON line with the median IOPS (upper median for even counts).
median() {
    jq -s 'sort_by(.iops) | .[length / 2 | floor]' <<<"$1"
}

echo
echo "== results: median-IOPS run of $rounds round(s) per cell (upper median when even), ${seconds}s each, image on tmpfs"
printf '%-18s | %13s | %13s | %6s | %10s | %10s | %13s | %13s\n' \
    workload "guardblk IOPS" "qsd IOPS" ratio "g p99 us" "qsd p99 us" "g CPU us/IO" "qsd CPU us/IO"
printf -- '-%.0s' $(seq 118)
echo
for w in "${workloads[@]}"; do
    read -r label _ <<<"$w"
    g=$(median "${results["$label guardblk"]}")
    q=$(median "${results["$label qsd"]}")
    jq -nr --arg name "$label" --argjson g "$g" --argjson q "$q" \
        '[$name, $g.iops, $q.iops, $g.iops / $q.iops, $g.p99_us, $q.p99_us,
          $g.daemon_cpu_us_per_io, $q.daemon_cpu_us_per_io] | @tsv' |
        while IFS=$'\t' read -r name gi qi ratio gp qp gc qc; do
            printf '%-18s | %13.0f | %13.0f | %6.2f | %10.1f | %10.1f | %13.2f | %13.2f\n' \
                "$name" "$gi" "$qi" "$ratio" "$gp" "$qp" "$gc" "$qc"
        done
done
echo "ratio = guardblk IOPS / qsd IOPS; CPU = daemon utime+stime (all threads) per I/O"
if ((with_uring)); then
    echo
    echo "== guardblk --io-engine io-uring (median-IOPS run), against the same qsd runs"
    for w in "${workloads[@]}"; do
        read -r label _ <<<"$w"
        u=$(median "${results["$label guardblk-uring"]}")
        q=$(median "${results["$label qsd"]}")
        jq -nr --arg name "$label" --argjson u "$u" --argjson q "$q" \
            '"\($name)  io_uring \($u.iops|floor) IOPS  ratio \($u.iops / $q.iops * 100 | floor / 100)  p99 \($u.p99_us) us  CPU \($u.daemon_cpu_us_per_io) us/IO"'
    done
fi
