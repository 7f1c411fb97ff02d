#!/usr/bin/env bash
# Throw-away one-node Ceph (16.2 "pacific") test cluster for librbd tests.
#
# Usage:
#   cluster.sh start  DIR   create and start a cluster under DIR (DIR must not
#                           exist or be empty); returns once RBD I/O works
#   cluster.sh status DIR   print `ceph -s`
#   cluster.sh stop   DIR   kill the daemons started for DIR, wait, remove DIR
#
# What `start` runs (directly, never as systemd services):
#   - ceph-mon  mon.a, listening on 127.0.0.1 only:
#       msgr2 on $CEPH_TEST_PORT (default 26789), msgr1 on $CEPH_TEST_PORT+1
#   - ceph-osd  osd.0, objectstore $CEPH_TEST_OBJECTSTORE, ports in
#       $CEPH_TEST_PORT+2 .. +99 on 127.0.0.1. memstore (default): data in
#       RAM (4 KiB pages; the OSD's RSS grows with the data written, ~4x for
#       random 4 KiB writes), capacity $CEPH_TEST_OSD_BYTES (default 2 GiB);
#       nothing survives `stop`. bluestore: a sparse file of that size under
#       DIR, RSS ~250 MB, slower to start (~6 s instead of ~3 s).
#   - no ceph-mgr: RBD I/O does not need one. `ceph -s` shows 0 pools/PGs
#       and no usage (those stats come from the mgr), and after 2 minutes
#       HEALTH_WARN "no active mgr"; both are expected
#   - pool "rbd" (size 1, min_size 1, 8 PGs), initialised with `rbd pool init`
#
# Everything lives under DIR: ceph.conf, keyring (client.admin), mon store,
# OSD data, logs (DIR/log), admin sockets and pid files (DIR/run).
# Clients use it with `-c DIR/ceph.conf` or `CEPH_CONF=DIR/ceph.conf`, e.g.
#   rbd -c DIR/ceph.conf create --size 1G rbd/test
#   qemu: driver=rbd,pool=rbd,image=test,conf=DIR/ceph.conf,user=admin
# Environment: CEPH_TEST_PORT, CEPH_TEST_OBJECTSTORE (memstore|bluestore),
# CEPH_TEST_OSD_BYTES, CEPH_TEST_TIMEOUT (seconds for start, default 120).
# Needs (Debian bookworm): ceph-mon ceph-osd ceph-common.
set -euo pipefail

readonly MARKER=".guardblk-ceph-test-cluster"
STARTED=()   # "name:pid" of the daemons started by this invocation
SIGNALLED=() # pids of the daemons that stop_kind signalled

die() {
    echo "cluster.sh: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 {start|stop|status} DIR" >&2
    exit 2
}

# ceph CLI bounded in time, so that a dead cluster fails instead of hanging.
ceph_cmd() {
    timeout 30 ceph -c "$DIR/ceph.conf" --connect-timeout 20 "$@"
}

# Print the last lines of every daemon log, for failure diagnostics.
show_logs() {
    local f
    for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
        [[ -s $f ]] || continue
        echo "----- tail -n 30 $f -----" >&2
        tail -n 30 "$f" >&2
    done
}

# PIDs of this cluster's daemons of one kind ("osd" or "mon"), from pid
# files, checked against /proc so that a stale pid file never makes us signal
# an unrelated process.
cluster_pids() {
    local f pid
    for f in "$DIR"/run/"$1".*.pid; do
        [[ -f $f ]] || continue
        pid=$(<"$f")
        [[ $pid =~ ^[0-9]+$ ]] || continue
        if [[ -r /proc/$pid/cmdline ]] &&
            tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/ceph.conf"; then
            echo "$pid"
        fi
    done
}

# running PID: the process exists and is not a zombie (the daemons are
# reparented to init once `start` exits, and init may reap them late).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# wait_gone TENTHS PID...: wait until all PIDs exited; fails on timeout.
wait_gone() {
    local n=$1 i pid alive
    shift
    for ((i = 0; i < n; i++)); do
        alive=0
        for pid in "$@"; do
            running "$pid" && alive=1
        done
        ((alive)) || return 0
        sleep 0.1
    done
    return 1
}

# stop_kind KIND SIGNAL: signal one kind of daemon, wait for exit, SIGKILL
# after 10 s.
stop_kind() {
    local pids
    mapfile -t pids < <(cluster_pids "$1")
    ((${#pids[@]})) || return 0
    SIGNALLED+=("${pids[@]}")
    kill "-$2" "${pids[@]}" 2>/dev/null || true
    wait_gone 100 "${pids[@]}" && return 0
    echo "cluster.sh: $1 daemons ${pids[*]} still running 10 s after SIG$2, sending SIGKILL" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_gone 50 "${pids[@]}" || die "$1 daemons ${pids[*]} still running after SIGKILL"
}

# kill_daemons SIGNAL. OSDs first: on SIGTERM an OSD whose mon is gone
# waits 5 s (osd_mon_shutdown_timeout), and a memstore OSD writes all of its
# RAM contents to DIR (seconds of I/O). `stop` deletes DIR anyway, so it uses
# SIGKILL; a failed `start` uses SIGTERM so that the kept logs are complete.
kill_daemons() {
    stop_kind osd "$1"
    stop_kind mon "$1"
}

# Start a ceph daemon in the foreground (-f) in the background, so that its
# pid is known at once.
start_daemon() {
    local name=$1
    shift
    # setsid: a Ctrl-C or a signal to the caller's process group must not
    # reach the daemons; `stop` ends them. (In a non-interactive shell the
    # background child is no group leader, so setsid execs in place and $!
    # is the daemon's pid; the daemon rewrites the pid file itself anyway.)
    setsid "$@" -f -c "$DIR/ceph.conf" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/run/$name.pid"
    STARTED+=("$name:$!")
}

# Fails (with a message) if a daemon started by this run has exited.
daemons_alive() {
    local d
    for d in "${STARTED[@]}"; do
        if ! running "${d#*:}"; then
            echo "cluster.sh: ${d%%:*} (pid ${d#*:}) exited; see $DIR/log/${d%%:*}.log" >&2
            return 1
        fi
    done
}

write_conf() {
    local port=$1 store=$2 bytes=$3
    local v1=$((port + 1)) pmin=$((port + 2)) pmax=$((port + 99))
    cat >"$DIR/ceph.conf" <<EOF
# generated by tests/ceph/cluster.sh
[global]
fsid = $FSID
mon_initial_members = a
mon_host = [v2:127.0.0.1:$port,v1:127.0.0.1:$v1]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
ms_bind_port_min = $pmin
ms_bind_port_max = $pmax
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $DIR/run
crash_dir = $DIR/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
paxos_propose_interval = 0.1
# [global] is read by clients too (librbd in qemu/guardblk): keep client
# tunables at their defaults here, except a shorter connect timeout.
client_mount_timeout = 30

[mon]
mon_data = $DIR/mon.\$id
log_file = $DIR/log/\$name.log
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid
mon_cluster_log_file = $DIR/log/cluster.log
ms_async_op_threads = 2

[osd]
osd_data = $DIR/osd.\$id
osd_journal = $DIR/osd.\$id/journal
keyring = $DIR/osd.\$id/keyring
log_file = $DIR/log/\$name.log
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid
osd_objectstore = $store
ms_async_op_threads = 2
osd_crush_update_on_start = true
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_memory_target = 536870912
osd_memory_cache_min = 67108864
memstore_device_bytes = $bytes
# page set with 4 KiB pages: the default (one flat buffer per object) zero-
# fills whole 4 MiB RBD objects and copies them on writes: ~5x slower random
# writes and ~1.4 GB RSS after 64 MiB of random 4 KiB writes to a 1 GiB image
memstore_page_set = true
# A client that dies holding an RBD image's exclusive lock (a daemon killed by
# a crash test) keeps it until its watch times out; 30 s by default, 10 here
# so that crash tests take over the image quickly.
osd_client_watch_timeout = 10
memstore_page_size = 4096
bluestore_block_path = $DIR/osd.\$id/block.file
bluestore_block_create = true
bluestore_block_size = $bytes
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
bluestore_rocksdb_options_annex = max_background_jobs=1

[client]
keyring = $DIR/keyring
EOF
}

wait_until() {
    # wait_until DEADLINE DESCRIPTION CMD...
    local deadline=$1 what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        daemons_alive || return 1
        if ((SECONDS >= deadline)); then
            echo "cluster.sh: timed out waiting for: $what" >&2
            return 1
        fi
        sleep 0.5
    done
}

osd_is_up() {
    ceph_cmd osd dump 2>/dev/null | grep -q '^osd\.0 up '
}

rbd_probe() {
    timeout 30 rbd -c "$DIR/ceph.conf" create --size 64M rbd/probe &&
        timeout 30 rbd -c "$DIR/ceph.conf" rm --no-progress rbd/probe
}

start_failed() {
    echo "cluster.sh: start of the cluster in $DIR FAILED; log tails:" >&2
    show_logs
    kill_daemons TERM || true
    echo "cluster.sh: daemons stopped; DIR kept for inspection, remove it with: $0 stop $DIR" >&2
    exit 1
}

cmd_start() {
    local port=${CEPH_TEST_PORT:-26789}
    local store=${CEPH_TEST_OBJECTSTORE:-memstore}
    local bytes=${CEPH_TEST_OSD_BYTES:-2147483648}
    local tmo=${CEPH_TEST_TIMEOUT:-120}
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port + 99 > 65535)); then
        die "bad CEPH_TEST_PORT=$port"
    fi
    [[ $store == memstore || $store == bluestore ]] || die "CEPH_TEST_OBJECTSTORE must be memstore or bluestore"
    [[ $bytes =~ ^[0-9]+$ ]] || die "bad CEPH_TEST_OSD_BYTES=$bytes"
    local bin
    for bin in ceph ceph-mon ceph-osd ceph-authtool monmaptool rbd uuidgen timeout setsid; do
        command -v "$bin" >/dev/null || die "$bin not found (apt-get install ceph-mon ceph-osd ceph-common)"
    done
    local p
    for p in "$port" $((port + 1)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            die "127.0.0.1:$p is already in use (another cluster? set CEPH_TEST_PORT)"
        fi
    done
    if [[ -e $DIR ]]; then
        [[ -d $DIR && -z $(ls -A "$DIR") ]] || die "$DIR exists and is not an empty directory"
    fi
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    touch "$DIR/$MARKER"
    mkdir -p "$DIR/log" "$DIR/run" "$DIR/crash" "$DIR/mon.a" "$DIR/osd.0"
    local deadline=$((SECONDS + tmo))
    trap start_failed ERR

    FSID=$(uuidgen)
    write_conf "$port" "$store" "$bytes"

    # Keys: mon., client.admin; the mon keyring holds both for --mkfs.
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
    chmod 0644 "$DIR/keyring" # test cluster: let unprivileged test clients read it

    monmaptool --create --fsid "$FSID" \
        --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" \
        "$DIR/monmap" >/dev/null
    ceph-mon -c "$DIR/ceph.conf" --mkfs -i a --monmap "$DIR/monmap" \
        --keyring "$DIR/mon.keyring" >"$DIR/log/mkfs-mon.a.out" 2>&1
    start_daemon mon.a ceph-mon -i a
    wait_until "$deadline" "mon.a to answer" ceph_cmd mon stat || start_failed

    # OSD: register id 0, mkfs, register its key, start it.
    local osd_uuid
    osd_uuid=$(uuidgen)
    ceph_cmd osd new "$osd_uuid" 0 >/dev/null
    ceph-osd -c "$DIR/ceph.conf" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$osd_uuid" \
        >"$DIR/log/mkfs-osd.0.out" 2>&1
    ceph_cmd auth add osd.0 osd 'allow *' mon 'allow profile osd' \
        -i "$DIR/osd.0/keyring" >/dev/null 2>&1
    start_daemon osd.0 ceph-osd -i 0
    wait_until "$deadline" "osd.0 to be up" osd_is_up || start_failed

    # Pool "rbd" of size 1, initialised for RBD.
    # (size 1 / min_size 1 come from osd_pool_default_size/min_size)
    ceph_cmd osd pool create rbd 8 8 replicated >/dev/null 2>&1
    local size
    size=$(ceph_cmd osd pool get rbd size 2>/dev/null)
    [[ $size == "size: 1" ]] || { echo "cluster.sh: pool rbd has '$size', want 'size: 1'" >&2; start_failed; }
    timeout 60 rbd -c "$DIR/ceph.conf" pool init rbd
    wait_until "$deadline" "RBD I/O (rbd create/rm rbd/probe)" rbd_probe || start_failed

    trap - ERR
    echo "cluster.sh: cluster up in $DIR (mon 127.0.0.1:$port v2, :$((port + 1)) v1; $store OSD) after ${SECONDS}s"
    echo "cluster.sh: clients: CEPH_CONF=$DIR/ceph.conf (keyring $DIR/keyring, user admin)"
}

cmd_status() {
    [[ -f $DIR/ceph.conf ]] || die "no cluster in $DIR"
    ceph_cmd -s
}

cmd_stop() {
    [[ -d $DIR ]] || {
        echo "cluster.sh: $DIR does not exist; nothing to stop"
        return 0
    }
    DIR=$(cd "$DIR" && pwd -P)
    [[ -f $DIR/$MARKER ]] || die "$DIR was not made by cluster.sh start (no $MARKER); not touching it"
    kill_daemons KILL
    # Best effort: give init up to 3 s to reap the zombies, so that a
    # `pgrep ceph` right after `stop` comes back empty.
    local i pid left
    for ((i = 0; i < 30; i++)); do
        left=0
        for pid in "${SIGNALLED[@]}"; do
            [[ -e /proc/$pid ]] && left=1
        done
        ((left)) || break
        sleep 0.1
    done
    rm -rf -- "$DIR"
    echo "cluster.sh: stopped and removed $DIR"
}

(($# == 2)) || usage
DIR=$2
[[ -n $DIR ]] || usage
case $1 in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) usage ;;
esac
