#!/usr/bin/env bash
# Benchmark flexnbd against nbdkit (file plugin) and qemu-nbd on one machine.
#
# Each server serves its own copy of the same data (under $BENCH_DIR) on its own free
# loopback port. In every round all servers are started, then each test is run on each
# server back to back (test 1: A B C, test 2: A B C, ...), so that whatever else the
# machine is doing hits all servers alike; the server order rotates every round
# (r1: A B C, r2: B C A, ...). bench/report.py prints medians over rounds.
#
# Knobs (environment):
#   ROUNDS=3            rounds (>=1; use >=3 for a real run)
#   SIZE=1G             size of the exported file (IEC suffixes: 256M, 1G, ...; >= 16M)
#   RUNTIME=10          fio time_based runtime per job, seconds
#   RAMP=2              fio ramp_time, seconds
#   SERVERS="flexnbd nbdkit qemu-nbd"   subset/order of servers
#   BENCH_DIR=...       scratch dir (default: mktemp -d under /dev/shm if it has 5 x SIZE
#                       free, else under ${TMPDIR:-/tmp}); removed at exit unless KEEP=1 or
#                       BENCH_DIR was given
#   RESULTS_MD=bench/results.md   where the markdown table is written ("" = don't)
#   FLEXNBD=path        flexnbd binary (default: `cargo build --release`, then
#                       target/release/flexnbd; a private copy is benchmarked)
#   FLEXNBD_ARGS=""     extra flexnbd serve args (e.g. "--workers 8")
#   NBDKIT_ARGS=""      extra nbdkit args (before the plugin name)
#   QEMU_NBD_ARGS=...   qemu-nbd cache/aio args (default: "--cache=writeback --aio=io_uring"
#                       if io_uring works here, else "--cache=writeback --aio=threads")
#   NBDCOPY_ARGS=""     extra args for the nbdcopy runs (e.g. "-C 1" to force one connection)
#   SEQ_REPS=3          sequential reads and writes per round (each server in turn, each rep);
#                       a single copy's rate varies by up to 2x from run to run on 2 cores
#   NICE=0              run servers and clients under `nice -n $NICE` (e.g. -10 as root on a
#                       busy machine; it only changes the priority of what this script starts)
#   CMD_TIMEOUT=300     upper bound (s) for one client command
#   LOCK_WAIT=3600      runs are serialised per machine (flock); how long to wait for another
# Exit status: 0 if every measurement and data check succeeded, 1 if any failed (their
# cells show FAIL), 2 on a setup error.

# The whole script is one { ... } block: bash parses it completely before running it, so
# editing this file while a benchmark runs cannot change the running instance.
{
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
SERVERS=${SERVERS:-flexnbd nbdkit qemu-nbd}
RESULTS_MD=${RESULTS_MD-$HERE/results.md}
FLEXNBD_ARGS=${FLEXNBD_ARGS:-}
NBDKIT_ARGS=${NBDKIT_ARGS:-}
QEMU_NBD_ARGS=${QEMU_NBD_ARGS:-}
NBDCOPY_ARGS=${NBDCOPY_ARGS:-}
SEQ_REPS=${SEQ_REPS:-3}
NICE=${NICE:-0}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
KEEP=${KEEP:-0}

LOG_TAG=bench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- checks
parse_size
[[ $ROUNDS =~ ^[0-9]+$ ]] && (( ROUNDS >= 1 )) || die "bad ROUNDS=$ROUNDS"
[[ $SEQ_REPS =~ ^[0-9]+$ ]] && (( SEQ_REPS >= 1 )) || die "bad SEQ_REPS=$SEQ_REPS"
[[ $RUNTIME =~ ^[0-9]+$ ]] && (( RUNTIME >= 1 )) || die "bad RUNTIME=$RUNTIME"
[[ $RAMP =~ ^[0-9]+$ ]] || die "bad RAMP=$RAMP"
[[ $NICE =~ ^-?[0-9]+$ ]] || die "bad NICE=$NICE"
read -r -a SERVER_LIST <<<"$SERVERS"
(( ${#SERVER_LIST[@]} >= 1 )) || die "SERVERS is empty"
declare -A seen=()
for s in "${SERVER_LIST[@]}"; do
    case $s in flexnbd|nbdkit|qemu-nbd) ;; *) die "unknown server '$s' (flexnbd|nbdkit|qemu-nbd)";; esac
    [[ -z ${seen[$s]:-} ]] || die "server '$s' listed twice"
    seen[$s]=1
done
has_server() { [[ " ${SERVER_LIST[*]} " == *" $1 "* ]]; }

need=(nbdinfo nbdcopy fio qemu-img python3 numfmt timeout strip cmp)
for s in "${SERVER_LIST[@]}"; do [[ $s == flexnbd ]] || need+=("$s"); done
for t in "${need[@]}"; do
    command -v "$t" >/dev/null || die "missing tool: $t (bench/install-deps.sh installs them)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"
RUN=()
if (( NICE != 0 )); then
    nice -n "$NICE" true 2>/dev/null || die "cannot run nice -n $NICE"
    RUN=(nice -n "$NICE")
fi

if has_server flexnbd; then
    build_flexnbd
fi

take_bench_lock

# ---------------------------------------------------------------- scratch + cleanup
if [[ -n ${BENCH_DIR:-} ]]; then
    mkdir -p "$BENCH_DIR" || die "cannot create $BENCH_DIR"
    OWN_DIR=0
else
    # Default to tmpfs when it has room (5 x SIZE): no disk writeback of the dirtied
    # 1 GiB files running in the background of later tests (a big noise source on disk).
    base=${TMPDIR:-/tmp}
    if [[ -d /dev/shm && -w /dev/shm ]] \
        && (( $(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1) > 5 * SIZE_BYTES )); then
        base=/dev/shm
    fi
    BENCH_DIR=$(mktemp -d "$base/flexnbd-bench.XXXXXX") || die "mktemp failed"
    OWN_DIR=1
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
mkdir -p "$BENCH_DIR/logs"
RAW=$BENCH_DIR/raw.tsv
META=$BENCH_DIR/meta.tsv
: >"$RAW"; : >"$META"

STARTED_PIDS=()   # every background process this script started (servers, samplers)
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do kill_pid "$pid"; done
    STARTED_PIDS=()
    if (( OWN_DIR == 1 && KEEP != 1 )); then
        rm -rf "$BENCH_DIR"
    elif (( OWN_DIR == 1 )); then
        log "kept scratch dir $BENCH_DIR"
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

FAILURES=0
record() {   # record ROUND SERVER METRIC VALUE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"
}
fail() {     # fail ROUND SERVER METRIC MESSAGE
    log "FAIL r$1 $2 $3: $4"
    record "$1" "$2" "$3" nan
    FAILURES=$((FAILURES + 1))
}

port_is_free() {
    python3 -c 'import socket,sys
s=socket.socket()
try: s.bind(("127.0.0.1",int(sys.argv[1])))
except OSError: sys.exit(1)' "$1"
}

# Process tree (pid + descendants), for RSS / CPU accounting.
tree_pids() {
    local pid=$1 c
    echo "$pid"
    for c in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}
rss_kib() {   # summed VmRSS (KiB) of the tree
    local total=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
cpu_ticks() { # summed utime+stime+cutime+cstime (clock ticks) of the tree
    local total=0 p st
    local -a f
    for p in $(tree_pids "$1"); do
        st=$(cat /proc/"$p"/stat 2>/dev/null) || continue
        read -r -a f <<<"${st##*) }"    # f[0] = field 3 (state)
        total=$((total + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)
# CPU shares of one client run: cpu_mark 0 just before it, cpu_mark 1 right after, then
# cpu_share ROUND SERVER TEST. The marks start no process of their own (python3 would take tens of
# ms, inside the timed part of a sequential run), except cpu_ticks, which runs outside the
# client's interval: before the children's time in mark 0, after it in mark 1.
cpu_mark() {  # cpu_mark 0|1 SERVER
    local st ct
    (( $1 == 0 )) && st=$(cpu_ticks "${SPID[$2]}")
    # `times` must run in this shell (a subshell has its own children); its second line is the
    # CPU of this shell's reaped children and their descendants: "XmY.YYYs XmY.YYYs".
    times >"$BENCH_DIR/times.tmp"
    (( $1 == 1 )) && st=$(cpu_ticks "${SPID[$2]}")
    { read -r _; read -r ct; } <"$BENCH_DIR/times.tmp"
    CPU_MARK[$1]="$EPOCHREALTIME $st $ct"
}
declare -A CPU_MARK=()
children_secs() { # children_secs "XmY.YYYs XmY.YYYs" -> seconds
    [[ $1 =~ ^([0-9]+)m([0-9.]+)s\ ([0-9]+)m([0-9.]+)s ]] || die "cannot parse 'times' output: $1"
    calc "${BASH_REMATCH[1]}*60+${BASH_REMATCH[2]}+${BASH_REMATCH[3]}*60+${BASH_REMATCH[4]}"
}
cpu_share() { # cpu_share ROUND SERVER TEST: record client and server CPU, % of one core
    local t0 s0 c0 t1 s1 c1 secs
    read -r t0 s0 c0 <<<"${CPU_MARK[0]}"
    read -r t1 s1 c1 <<<"${CPU_MARK[1]}"
    secs=$(elapsed "$t0" "$t1")
    c0=$(children_secs "$c0"); c1=$(children_secs "$c1")
    record "$1" "$2" "${3}_client_cpu" "$(calc "100*($c1-$c0)/$secs")"
    record "$1" "$2" "${3}_server_cpu" "$(calc "100*($s1-$s0)/$CLK_TCK/$secs")"
}
busy_pct() {  # whole-machine CPU busy % over 1 s (taken while our servers sit idle)
    local a b
    a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
    local i tot=0 idle
    for ((i = 1; i < ${#a[@]}; i++)); do tot=$((tot + b[i] - a[i])); done
    idle=$(( (b[4] - a[4]) + (b[5] - a[5]) ))
    (( tot > 0 )) && echo $(( (tot - idle) * 100 / tot )) || echo 0
}


# ---------------------------------------------------------------- data
log "scratch dir $BENCH_DIR; SIZE=$SIZE ($SIZE_BYTES bytes) ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP SERVERS='${SERVER_LIST[*]}'"

# qemu-nbd: io_uring is ~2-3x faster than its thread pool at QD32 here; use it when it works.
if has_server qemu-nbd && [[ -z $QEMU_NBD_ARGS ]]; then
    QEMU_NBD_ARGS="--cache=writeback --aio=threads"
    truncate -s 1M "$BENCH_DIR/probe.img"
    pport=$(free_port)
    qemu-nbd -f raw -x '' -b 127.0.0.1 -p "$pport" -t --cache=writeback --aio=io_uring \
        "$BENCH_DIR/probe.img" >"$BENCH_DIR/logs/qemu-nbd-probe.log" 2>&1 9>&- &
    probe_pid=$!; STARTED_PIDS+=("$probe_pid")
    for ((i = 0; i < 50; i++)); do
        kill -0 "$probe_pid" 2>/dev/null || break
        if timeout 5 nbdinfo --size "nbd://127.0.0.1:$pport" >/dev/null 2>&1; then
            QEMU_NBD_ARGS="--cache=writeback --aio=io_uring"; break
        fi
        sleep 0.1
    done
    kill_pid "$probe_pid"; forget_pid "$probe_pid"
    rm -f "$BENCH_DIR/probe.img"
fi
has_server qemu-nbd && log "qemu-nbd settings: $QEMU_NBD_ARGS"

log "creating data files"
SRC=$BENCH_DIR/source.img      # random, fully allocated; also the nbdcopy write source
head -c "$SIZE_BYTES" /dev/urandom >"$SRC" || die "cannot write $SRC"
SPARSE=$BENCH_DIR/sparse-master.img   # SIZE, 16 x 1 MiB random data regions, rest holes
truncate -s "$SIZE_BYTES" "$SPARSE"
stride_mib=$((SIZE_BYTES / MIB / 16))
for ((i = 0; i < 16; i++)); do
    dd if=/dev/urandom of="$SPARSE" bs=1M count=1 seek=$((i * stride_mib + stride_mib / 3)) \
        conv=notrunc status=none || die "dd failed"
done
FLEXNBD_ORIG=${FLEXNBD:-}
if [[ -n ${FLEXNBD:-} ]]; then
    # Benchmark a private copy so a concurrent `cargo build` cannot swap the binary mid-run.
    cp "$FLEXNBD" "$BENCH_DIR/flexnbd" || die "cannot copy $FLEXNBD"
    FLEXNBD=$BENCH_DIR/flexnbd
    log "flexnbd: $FLEXNBD_ORIG ($("$FLEXNBD" --version 2>&1 | head -1))"
fi
for s in "${SERVER_LIST[@]}"; do
    cp "$SRC" "$BENCH_DIR/data-$s.img" || die "cp failed"
    cp --sparse=always "$SPARSE" "$BENCH_DIR/sparse-$s.img" || die "cp failed"
done
sync

# ---------------------------------------------------------------- servers
declare -A SPID=() SPORT=()
start_server() {  # start_server NAME FILE LOG -> SPID[NAME], SPORT[NAME]; 0 when ready
    local name=$1 file=$2 logf=$3 port tries pid
    for tries in 1 2 3 4 5; do
        port=$(free_port)
        port_is_free "$port" && break
    done
    case $name in
    flexnbd)
        # shellcheck disable=SC2086
        "${RUN[@]}" "$FLEXNBD" serve -l 127.0.0.1 -p "$port" -f "$file" $FLEXNBD_ARGS >"$logf" 2>&1 9>&- &
        ;;
    nbdkit)
        # shellcheck disable=SC2086
        "${RUN[@]}" nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" $NBDKIT_ARGS file "$file" \
            >"$logf" 2>&1 9>&- &
        ;;
    qemu-nbd)
        # -t: stay up across connections; --shared=0: unlimited clients (nbdcopy multi-conn)
        # shellcheck disable=SC2086
        "${RUN[@]}" qemu-nbd -f raw -x '' -b 127.0.0.1 -p "$port" -t --shared=0 $QEMU_NBD_ARGS "$file" \
            >"$logf" 2>&1 9>&- &
        ;;
    esac
    pid=$!   # `nice` execs the server, so this is the server's own PID
    SPID[$name]=$pid
    SPORT[$name]=$port
    STARTED_PIDS+=("$pid")
    # Bounded readiness poll (10 s). The successful probe is the "one connection".
    for ((tries = 0; tries < 100; tries++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during startup; log:"; sed 's/^/    /' "$logf" >&2
            return 1
        fi
        if timeout 5 nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "$name not ready on port $port after 10 s"
    return 1
}
stop_server() {
    local pid=${SPID[$1]:-}
    [[ -n $pid ]] || return 0
    kill_pid "$pid"; forget_pid "$pid"
    unset "SPID[$1]" "SPORT[$1]"
}
alive() {         # alive ROUND NAME METRIC: the server is up, else record the failure
    local pid=${SPID[$2]:-}
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then return 0; fi
    fail "$1" "$2" "$3" "server is not running"
    return 1
}

# RSS sampler (python, one process, cheap): keeps the max tree RSS (KiB) seen every 0.1 s in FILE.
SAMPLER_PID=""
start_sampler() {
    python3 "$HERE/report.py" rss-sample "$1" "$2" 9>&- &
    SAMPLER_PID=$!
    STARTED_PIDS+=("$SAMPLER_PID")
}
stop_sampler() {
    [[ -n $SAMPLER_PID ]] || return 0
    kill_pid "$SAMPLER_PID"; forget_pid "$SAMPLER_PID"
    SAMPLER_PID=""
}

# fio job against a running server; prints IOPS or returns non-zero.
run_fio() {  # run_fio PORT RW DEPTH JSONOUT (report.py fio-iops reads the IOPS from it)
    local port=$1 rw=$2 depth=$3 out=$4
    timeout --kill-after=5 $((RUNTIME + RAMP + 60)) "${RUN[@]}" \
        fio --name="$rw-qd$depth" --ioengine=nbd --uri="nbd://127.0.0.1:$port" \
            --rw="$rw" --bs=4k --iodepth="$depth" --numjobs=1 \
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --norandommap --randrepeat=1 \
            --output-format=json --output="$out" >"$out.stdout" 2>"$out.stderr" || {
        log "fio $rw qd$depth exited non-zero:"; sed 's/^/    /' "$out.stderr" >&2
        return 1
    }
}

ALL_METRICS=(rss_idle data_check seq_read seq_write cpu_per_gib randread_qd1 randread_qd32
             randwrite_qd1 randwrite_qd32 rss_load sparse_convert)

# ---------------------------------------------------------------- one round
run_round() {  # run_round ROUND SERVER...   (servers in this round's order)
    local r=$1; shift
    local order=("$@") up=() s m uri t0 t1 secs v rw d out
    declare -A c0=() moved=()
    sync   # flush the previous round's dirty pages (matters when BENCH_DIR is on a disk)
    local busy; busy=$(busy_pct)
    log "round $r: order ${order[*]}; machine ${busy}% busy just before (1-min load $(cut -d' ' -f1 /proc/loadavg))"
    for s in "${order[@]}"; do record "$r" "$s" busy_before "$busy"; done

    # start every server on its data file; idle RSS after startup + one (probe) connection
    for s in "${order[@]}"; do
        if start_server "$s" "$BENCH_DIR/data-$s.img" "$BENCH_DIR/logs/$s-r$r.log"; then
            up+=("$s")
        else
            for m in "${ALL_METRICS[@]}"; do fail "$r" "$s" "$m" "server did not start"; done
            stop_server "$s"
        fi
    done
    sleep 0.5
    for s in "${up[@]}"; do
        record "$r" "$s" rss_idle "$(calc "$(rss_kib "${SPID[$s]}")/1024")"
        if (( r == 1 )); then
            timeout 10 nbdinfo --json "nbd://127.0.0.1:${SPORT[$s]}" >"$BENCH_DIR/nbdinfo-$s.json" 2>/dev/null \
                && python3 "$HERE/report.py" caps "$BENCH_DIR/nbdinfo-$s.json" "$s" >>"$META"
        fi
    done

    # warm-up read (not measured), checked against the served file
    for s in "${up[@]}"; do
        alive "$r" "$s" data_check || continue
        # shellcheck disable=SC2086
        if timeout "$CMD_TIMEOUT" "${RUN[@]}" nbdcopy $NBDCOPY_ARGS --no-extents \
                "nbd://127.0.0.1:${SPORT[$s]}" - 2>>"$BENCH_DIR/logs/$s-r$r.client" \
                | cmp -s - "$BENCH_DIR/data-$s.img"; then
            record "$r" "$s" data_check 1
        else
            fail "$r" "$s" data_check "warm-up read failed or returned data that differs from the file"
        fi
    done

    # sequential reads, then sequential writes, SEQ_REPS of each with the servers taking turns;
    # CPU accounted per server across all of them
    for s in "${up[@]}"; do c0[$s]=$(cpu_ticks "${SPID[$s]}"); moved[$s]=0; done
    for ((rep = 1; rep <= SEQ_REPS; rep++)); do for s in "${up[@]}"; do
        alive "$r" "$s" seq_read || continue
        cpu_mark 0 "$s"
        t0=$(now)
        # shellcheck disable=SC2086
        if timeout "$CMD_TIMEOUT" "${RUN[@]}" nbdcopy $NBDCOPY_ARGS --no-extents \
                "nbd://127.0.0.1:${SPORT[$s]}" null: 2>>"$BENCH_DIR/logs/$s-r$r.client"; then
            t1=$(now)
            cpu_mark 1 "$s"
            secs=$(elapsed "$t0" "$t1")
            record "$r" "$s" seq_read "$(calc "$SIZE_BYTES/1e6/$secs")"
            cpu_share "$r" "$s" seq_read
            moved[$s]=$((moved[$s] + SIZE_BYTES))
        else
            fail "$r" "$s" seq_read "nbdcopy read failed (see logs/$s-r$r.client)"
        fi
    done; done
    for ((rep = 1; rep <= SEQ_REPS; rep++)); do for s in "${up[@]}"; do
        alive "$r" "$s" seq_write || continue
        cpu_mark 0 "$s"
        t0=$(now)
        # shellcheck disable=SC2086
        if timeout "$CMD_TIMEOUT" "${RUN[@]}" nbdcopy $NBDCOPY_ARGS \
                "$SRC" "nbd://127.0.0.1:${SPORT[$s]}" 2>>"$BENCH_DIR/logs/$s-r$r.client"; then
            t1=$(now); secs=$(elapsed "$t0" "$t1")
            cpu_mark 1 "$s"
            record "$r" "$s" seq_write "$(calc "$SIZE_BYTES/1e6/$secs")"
            cpu_share "$r" "$s" seq_write
            moved[$s]=$((moved[$s] + SIZE_BYTES))
            cmp -s "$SRC" "$BENCH_DIR/data-$s.img" \
                || fail "$r" "$s" data_check "after the sequential write the served file differs from the source"
        else
            fail "$r" "$s" seq_write "nbdcopy write failed (see logs/$s-r$r.client)"
        fi
    done; done
    for s in "${up[@]}"; do
        if (( moved[$s] == 2 * SEQ_REPS * SIZE_BYTES )) && kill -0 "${SPID[$s]}" 2>/dev/null; then
            record "$r" "$s" cpu_per_gib \
                "$(calc "($(cpu_ticks "${SPID[$s]}")-${c0[$s]})/$CLK_TCK/(${moved[$s]}/1073741824)")"
        else
            fail "$r" "$s" cpu_per_gib "a sequential transfer failed"
        fi
    done

    # 4 KiB random IOPS; RSS sampled during the QD32 runs (max over both)
    for s in "${up[@]}"; do rm -f "$BENCH_DIR/rss-load-$s"; done
    for rw in randread randwrite; do
        for d in 1 32; do
            for s in "${up[@]}"; do
                alive "$r" "$s" "${rw}_qd$d" || continue
                (( d == 32 )) && start_sampler "${SPID[$s]}" "$BENCH_DIR/rss-load-$s"
                out=$BENCH_DIR/logs/fio-$s-r$r-$rw-qd$d.json
                cpu_mark 0 "$s"
                # The IOPS are read out only after cpu_mark 1: python3 is not fio's CPU.
                if run_fio "${SPORT[$s]}" "$rw" "$d" "$out" && cpu_mark 1 "$s" \
                        && v=$(python3 "$HERE/report.py" fio-iops "$out" "$rw" "$RUNTIME"); then
                    record "$r" "$s" "${rw}_qd$d" "$v"
                    (( d == 32 )) && cpu_share "$r" "$s" "${rw}_qd$d"
                else
                    fail "$r" "$s" "${rw}_qd$d" "fio failed (see logs/${out##*/}*)"
                fi
                (( d == 32 )) && stop_sampler
            done
        done
    done
    for s in "${up[@]}"; do
        if [[ -s $BENCH_DIR/rss-load-$s ]]; then
            record "$r" "$s" rss_load "$(calc "$(cat "$BENCH_DIR/rss-load-$s")/1024")"
        else
            fail "$r" "$s" rss_load "no RSS samples"
        fi
        if ! kill -0 "${SPID[$s]}" 2>/dev/null; then
            log "$s died during round $r; log:"; sed 's/^/    /' "$BENCH_DIR/logs/$s-r$r.log" >&2
        fi
        stop_server "$s"
    done

    # sparse qemu-img convert from a mostly-holes export (output compared with the source)
    local sup=()
    for s in "${up[@]}"; do
        if start_server "$s" "$BENCH_DIR/sparse-$s.img" "$BENCH_DIR/logs/$s-r$r-sparse.log"; then
            sup+=("$s")
        else
            fail "$r" "$s" sparse_convert "server did not start on the sparse file"
            stop_server "$s"
        fi
    done
    out=$BENCH_DIR/convert-out.raw
    for s in "${sup[@]}"; do
        alive "$r" "$s" sparse_convert || continue
        rm -f "$out"
        t0=$(now)
        if timeout "$CMD_TIMEOUT" "${RUN[@]}" qemu-img convert -f raw -O raw \
                "nbd://127.0.0.1:${SPORT[$s]}" "$out" 2>>"$BENCH_DIR/logs/$s-r$r.client"; then
            t1=$(now)
            if cmp -s "$out" "$SPARSE"; then
                record "$r" "$s" sparse_convert "$(elapsed "$t0" "$t1")"
            else
                fail "$r" "$s" sparse_convert "converted image differs from the source"
                record "$r" "$s" data_check nan
            fi
        else
            fail "$r" "$s" sparse_convert "qemu-img convert failed (see logs/$s-r$r.client)"
        fi
        rm -f "$out"
    done
    for s in "${sup[@]}"; do stop_server "$s"; done
}

# ---------------------------------------------------------------- main
n=${#SERVER_LIST[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    order=()
    for ((k = 0; k < n; k++)); do order+=("${SERVER_LIST[$(((k + r - 1) % n))]}"); done
    run_round "$r" "${order[@]}"
done

# binary sizes (stripped copies)
strip_size() {  # strip_size FILE... -> summed stripped size in bytes
    local total=0 f tmp=$BENCH_DIR/strip.tmp
    for f in "$@"; do
        cp "$f" "$tmp" && strip "$tmp" 2>/dev/null
        total=$((total + $(stat -c %s "$tmp"))); rm -f "$tmp"
    done
    echo "$total"
}
for s in "${SERVER_LIST[@]}"; do
    case $s in
    flexnbd)  v=$(strip_size "$FLEXNBD") ;;
    nbdkit)   v=$(strip_size "$(command -v nbdkit)" "$(nbdkit file --dump-plugin | sed -n 's/^path=//p')") ;;
    qemu-nbd) v=$(strip_size "$(command -v qemu-nbd)") ;;
    esac
    record 0 "$s" binary_size "$(calc "$v/1e6")"
done

{
    if [[ -n ${FLEXNBD:-} ]]; then
        printf 'versions\tflexnbd\t%s (%s, git %s)\n' "$("$FLEXNBD" --version 2>&1 | head -1)" "$FLEXNBD_ORIG" \
            "$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    fi
    has_server nbdkit && printf 'versions\tnbdkit\t%s\n' "$(nbdkit --version 2>&1 | head -1)"
    has_server qemu-nbd && printf 'versions\tqemu-nbd\t%s\n' "$(qemu-nbd --version 2>&1 | head -1)"
    printf 'versions\tfio\t%s\n' "$(fio --version)"
    printf 'versions\tlibnbd\t%s\n' "$(nbdcopy --version 2>&1 | tail -1)"
    printf 'versions\tqemu-img\t%s\n' "$(qemu-img --version 2>&1 | head -1)"
    printf 'settings\tSIZE\t%s\n' "$SIZE"
    printf 'settings\tROUNDS\t%s\n' "$ROUNDS"
    printf 'settings\tRUNTIME\t%s\n' "$RUNTIME"
    printf 'settings\tRAMP\t%s\n' "$RAMP"
    printf 'settings\tNICE\t%s\n' "$NICE"
    printf 'settings\tSEQ_REPS\t%s\n' "$SEQ_REPS"
    printf 'settings\tmachine\t%s cores, %s\n' "$(nproc)" "$(uname -sr)"
    printf 'settings\tscratch dir\t%s (%s)\n' "$BENCH_DIR" "$(stat -f -c %T "$BENCH_DIR")"
    has_server flexnbd && printf 'settings\tflexnbd args\tserve -l 127.0.0.1 -p PORT -f FILE %s\n' "$FLEXNBD_ARGS"
    has_server nbdkit && printf 'settings\tnbdkit args\t-f --exit-with-parent -i 127.0.0.1 -p PORT %s file FILE\n' "$NBDKIT_ARGS"
    has_server qemu-nbd && printf 'settings\tqemu-nbd args\t-f raw -x "" -b 127.0.0.1 -p PORT -t --shared=0 %s FILE\n' "$QEMU_NBD_ARGS"
    printf 'settings\tnbdcopy args\t%s\n' "${NBDCOPY_ARGS:-(defaults)}"
} >>"$META"

python3 "$HERE/report.py" table "$RAW" "$META" "${SERVER_LIST[@]}" --md "$RESULTS_MD" || FAILURES=$((FAILURES + 1))
[[ -n $RESULTS_MD ]] && log "markdown written to $RESULTS_MD"

if (( FAILURES > 0 )); then
    log "$FAILURES measurement(s) or check(s) failed"
    exit 1
fi
exit 0
}
