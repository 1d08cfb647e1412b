#!/usr/bin/env bash
# Benchmark flexnbd's live migration (serve -> listen on loopback, data in /dev/shm).
#
# Per round (medians over rounds are reported):
#   1. migration throughput: SIZE / wall time of `flexnbd mirror --wait` (no client load),
#      next to nbdcopy between two fresh `serve`s of the same files (ratio migration/nbdcopy)
#   2. time to converge under a steady 4 KiB random-write load (fio, --rate_iops=LOAD_IOPS):
#      mirror start -> handover; the destination is then compared with the source file
#   3. freeze window: "clients were held for X" from the source's log in test 2
#   4. client write latency (fio clat p50/p99) during a rate-limited migration vs without one
#
# Knobs (environment):
#   SIZE=1G            export size (IEC suffix, whole MiB, >= 16M)
#   ROUNDS=3           rounds (medians)
#   LOAD_IOPS=2000     fio rate for tests 2 and 4
#   LOAD_DELAY=2       seconds of fio load before the mirror starts (test 2)
#   BASE_RUNTIME=10    fio runtime without a migration (test 4 baseline)
#   LAT_RUNTIME=5      fio runtime during the migration (test 4)
#   LAT_MAX_BPS=...    mirror --max-bps for test 4 (default: SIZE / (LAT_RUNTIME + 3 s), so
#                      the migration outlasts fio; it is lifted to unlimited once fio is done)
#   FLEXNBD=path       binary (default: cargo build --release, target/release/flexnbd; a
#                      private copy is benchmarked)
#   RESULTS_MD=bench/migration-results.md   markdown output ("" = none)
#   CMD_TIMEOUT=300    bound (s) for one client command / migration
#   LOCK_WAIT=3600     runs are serialised per machine with bench/run.sh (same flock)
#   KEEP=1             keep the scratch dir (logs)
#   DEST_FILLED=0      1: each round's destination file is written full of zeros first instead
#                      of created sparse, so no test pays for the first touch of fresh memory
#                      (on the benchmark VM that made idle migrations bimodal, 0.4-2.1 GB/s)
#   SMOKE=1            64 MiB, 1 round, short runtimes; for CI (~30-40 s)
#   BASIC=1            0: skip tests 1-4 and run only the optional rounds below
#
# Optional rounds (off by default):
#   RTT_MS="0.2 10 40" round trip times (ms): per RTT, test 2's migration (fio at LOAD_IOPS on
#                      the source) runs through a user-space delay proxy between the source and
#                      the destination; reports migration time and MB/s, link use (MB/s, % of
#                      LINK_MBIT) and the freeze next to the RTT ("" = off)
#   LINK_MBIT=1000     the proxy's rate limit per direction (Mbit/s)
#   WANEM=path         the proxy (a python3 script taking LISTEN_PORT TARGET_PORT --rtt-ms R
#                      --mbit B; it reports "link c->s: N B in T s" on SIGTERM); needed for RTT_MS
#   UNTHROTTLED=1      migration under an unthrottled writer: fio randwrite 4 KiB, iodepth
#                      UNT_IODEPTH, no rate limit, on the source from UNT_DELAY s before the
#                      mirror until the handover; reports migration time (or no convergence
#                      within CMD_TIMEOUT), passes, the dirty remainder at the freeze, the
#                      freeze, and fio IOPS and clat p99/max during the migration against the
#                      same load for UNT_BASE_RUNTIME s without one; checks the data
#   UNT_IODEPTH=16  UNT_DELAY=2  UNT_BASE_RUNTIME=5
#   UNTHROTTLED_RTT_MS="10"  round trip times (ms): the unthrottled round again, each with the
#                      destination behind the delay proxy (LINK_MBIT, WANEM as above); same
#                      report plus freeze - RTT (target <= 20 ms) ("" = off; independent of
#                      UNTHROTTLED, which runs it on loopback)
#   MIRROR_MODE=       passed as `mirror --mode MIRROR_MODE` (auto, background, active); empty:
#                      no --mode (the binary's default; binaries before --mode need this)
# Each unthrottled round also reports the mode the migration ended in: "background", "active
# from pass N" (auto switched: the source logged "mirroring client writes actively"), or
# "active" (asked for), and how many client writes were mirrored actively (the handover line).
# Exit status: 0 if every measurement and check succeeded (targets missed do not fail the
# run unless STRICT=1), 1 if any failed, 2 on a setup error.
{
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    SIZE=${SIZE:-64M}; ROUNDS=${ROUNDS:-1}; LOAD_DELAY=${LOAD_DELAY:-1}
    BASE_RUNTIME=${BASE_RUNTIME:-2}; LAT_RUNTIME=${LAT_RUNTIME:-2}; CMD_TIMEOUT=${CMD_TIMEOUT:-30}
    RESULTS_MD=${RESULTS_MD-}
fi
SIZE=${SIZE:-1G}
ROUNDS=${ROUNDS:-3}
LOAD_IOPS=${LOAD_IOPS:-2000}
LOAD_DELAY=${LOAD_DELAY:-2}
BASE_RUNTIME=${BASE_RUNTIME:-10}
LAT_RUNTIME=${LAT_RUNTIME:-5}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
RESULTS_MD=${RESULTS_MD-$HERE/migration-results.md}
KEEP=${KEEP:-0}
DEST_FILLED=${DEST_FILLED:-0}
STRICT=${STRICT:-0}
BASIC=${BASIC:-1}
RTT_MS=${RTT_MS:-}
LINK_MBIT=${LINK_MBIT:-1000}
WANEM=${WANEM:-}
UNTHROTTLED=${UNTHROTTLED:-0}
UNT_IODEPTH=${UNT_IODEPTH:-16}
UNT_DELAY=${UNT_DELAY:-2}
UNT_BASE_RUNTIME=${UNT_BASE_RUNTIME:-5}
UNTHROTTLED_RTT_MS=${UNTHROTTLED_RTT_MS:-}
MIRROR_MODE=${MIRROR_MODE:-}

LOG_TAG=migbench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

parse_size
for v in ROUNDS LOAD_IOPS LOAD_DELAY BASE_RUNTIME LAT_RUNTIME CMD_TIMEOUT LINK_MBIT UNT_IODEPTH UNT_DELAY UNT_BASE_RUNTIME; do
    [[ ${!v} =~ ^[0-9]+$ ]] && (( ${!v} >= 1 )) || die "bad $v=${!v}"
done
for v in BASIC UNTHROTTLED; do [[ ${!v} == [01] ]] || die "bad $v=${!v} (0 or 1)"; done
read -ra RTTS <<<"$RTT_MS"
for v in "${RTTS[@]}"; do [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad RTT_MS entry $v (milliseconds)"; done
read -ra UNT_RTTS <<<"$UNTHROTTLED_RTT_MS"
for v in "${UNT_RTTS[@]}"; do [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad UNTHROTTLED_RTT_MS entry $v (milliseconds)"; done
if (( ${#RTTS[@]} + ${#UNT_RTTS[@]} > 0 )); then
    [[ -n $WANEM && -r $WANEM ]] || die "RTT_MS and UNTHROTTLED_RTT_MS need WANEM=/path/to/the delay proxy (got '${WANEM}')"
fi
MODE_ARGS=()
if [[ -n $MIRROR_MODE ]]; then
    [[ $MIRROR_MODE =~ ^(auto|background|active)$ ]] || die "bad MIRROR_MODE=$MIRROR_MODE (auto, background or active)"
    MODE_ARGS=(--mode "$MIRROR_MODE")
fi
LAT_MAX_BPS=${LAT_MAX_BPS:-$(( SIZE_BYTES / (LAT_RUNTIME + 3) ))}
for t in nbdinfo nbdcopy fio python3 numfmt timeout cmp; do
    command -v "$t" >/dev/null || die "missing tool: $t (bench/install-deps.sh installs them)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine"

build_flexnbd

take_bench_lock

base=${TMPDIR:-/tmp}
if [[ -d /dev/shm && -w /dev/shm ]] \
    && (( $(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1) > 4 * SIZE_BYTES )); then
    base=/dev/shm
fi
BENCH_DIR=$(mktemp -d "$base/flexnbd-migbench.XXXXXX") || die "mktemp failed"
mkdir -p "$BENCH_DIR/logs"
RAW=$BENCH_DIR/raw.tsv; : >"$RAW"
NOTES=$BENCH_DIR/notes.txt; : >"$NOTES"

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do kill_pid "$pid"; done
    STARTED_PIDS=()
    if [[ $KEEP == 1 ]]; then log "kept scratch dir $BENCH_DIR"; else rm -rf "$BENCH_DIR"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
trap 'exit 129' HUP

FAILURES=0
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RAW"; }        # ROUND METRIC VALUE
fail()   { log "FAIL r$1 $2: $3"; record "$1" "$2" nan; FAILURES=$((FAILURES + 1)); }
note()   { log "NOTE: $*"; printf '%s\n' "$*" >>"$NOTES"; }


# Wait (bounded) for a PID we started to exit; its status in WAIT_RC ("timeout" if it did
# not). Not a $(...) helper: a subshell cannot wait for our children.
WAIT_RC=""
wait_exit() {   # wait_exit PID SECS
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then WAIT_RC=timeout; return; fi
    wait "$pid"; WAIT_RC=$?
}

# ---------------------------------------------------------------- data
log "scratch $BENCH_DIR; SIZE=$SIZE ROUNDS=$ROUNDS LOAD_IOPS=$LOAD_IOPS LAT_MAX_BPS=$LAT_MAX_BPS SMOKE=$SMOKE DEST_FILLED=$DEST_FILLED"
cp "$FLEXNBD" "$BENCH_DIR/flexnbd" || die "cannot copy $FLEXNBD"
FLEXNBD_ORIG=$FLEXNBD; FLEXNBD=$BENCH_DIR/flexnbd
MASTER=$BENCH_DIR/master.img
head -c "$SIZE_BYTES" /dev/urandom >"$MASTER" || die "cannot write $MASTER"
SRCF=$BENCH_DIR/src.img
DSTF=$BENCH_DIR/dst.img
fresh_files() {  # random source, empty destination of the same size (sparse unless DEST_FILLED=1)
    rm -f "$SRCF" "$DSTF"
    cp "$MASTER" "$SRCF" || return 1
    if [[ $DEST_FILLED == 1 ]]; then
        head -c "$SIZE_BYTES" /dev/zero >"$DSTF"
    else
        truncate -s "$SIZE_BYTES" "$DSTF"
    fi
}

# ---------------------------------------------------------------- servers
# start_srv VAR MODE FILE SOCK LOG: starts `flexnbd MODE` on a free port; sets ${VAR}_PID and
# ${VAR}_PORT; 0 once it answers (serve: nbdinfo; listen: control socket status).
start_srv() {
    local var=$1 mode=$2 file=$3 sock=$4 logf=$5 port pid i
    port=$(free_port)
    rm -f "$sock"
    "$FLEXNBD" "$mode" -l 127.0.0.1 -p "$port" -f "$file" --sock "$sock" -v >"$logf" 2>&1 9>&- &
    pid=$!; STARTED_PIDS+=("$pid")
    printf -v "${var}_PID" %s "$pid"; printf -v "${var}_PORT" %s "$port"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { log "$mode on $file exited at startup:"; sed 's/^/    /' "$logf" >&2; return 1; }
        if [[ $mode == serve ]]; then
            timeout 5 nbdinfo --size "nbd://127.0.0.1:$port" >/dev/null 2>&1 && return 0
        else
            [[ -S $sock ]] && timeout 5 "$FLEXNBD" status -s "$sock" >/dev/null 2>&1 && return 0
        fi
        sleep 0.1
    done
    log "$mode not ready on port $port after 10 s"; return 1
}
stop_srv() { kill_pid "$1"; forget_pid "$1"; }

# After a handover both servers must exit 0 by themselves.
check_exits() {   # check_exits ROUND TAG SRC_PID DST_PID SRC_LOG DST_LOG
    local r=$1 tag=$2 s d
    wait_exit "$3" 10; s=$WAIT_RC; wait_exit "$4" 10; d=$WAIT_RC
    [[ $s == timeout ]] || forget_pid "$3"
    [[ $d == timeout ]] || forget_pid "$4"
    if [[ $s != 0 ]]; then
        note "r$r $tag: source did not exit 0 after the handover (status $s); log tail: $(tail -3 "$5" | tr '\n' '|')"
        FAILURES=$((FAILURES + 1))
    fi
    if [[ $d != 0 ]]; then
        note "r$r $tag: destination did not exit 0 after the handover (status $d); log tail: $(tail -3 "$6" | tr '\n' '|')"
        FAILURES=$((FAILURES + 1))
    fi
    [[ $s == timeout ]] && stop_srv "$3"
    [[ $d == timeout ]] && stop_srv "$4"
    return 0
}

# "clients were held for 12.345ms" (Rust Duration Debug) -> milliseconds
freeze_ms() {
    python3 - "$1" <<'EOF'
import re, sys
m = None
for line in open(sys.argv[1], errors="replace"):
    x = re.search(r"clients were held for ([0-9.]+)(ns|µs|us|ms|s)\b", line)
    if x: m = x
if not m: sys.exit(1)
f = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
print(f"{float(m.group(1)) * f:.6g}")
EOF
}
passes() { grep -c 'pass [0-9]* done' "$1" 2>/dev/null || true; }

FIO_COMMON=(--ioengine=nbd --rw=randwrite --bs=4k --iodepth=1 --numjobs=1
            --rate_iops="$LOAD_IOPS" --norandommap --randrepeat=0 --time_based)

# ---------------------------------------------------------------- tests
test_migration_speed() {  # r
    local r=$1 L=$BENCH_DIR/logs t0 t1 rc secs
    fresh_files || { fail "$r" mig_mbps "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/t1-src-r$r.log" \
        && start_srv D listen "$DSTF" "$BENCH_DIR/d.sock" "$L/t1-dst-r$r.log" \
        || { fail "$r" mig_mbps "servers did not start"; stop_srv "${S_PID:-}"; stop_srv "${D_PID:-}"; return; }
    t0=$(now)
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror "${MODE_ARGS[@]}" -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --wait \
        >"$L/t1-mirror-r$r.out" 2>&1 9>&-
    rc=$?; t1=$(now)
    if (( rc == 0 )); then
        secs=$(elapsed "$t0" "$t1")
        record "$r" mig_mbps "$(calc "$SIZE_BYTES/1e6/$secs")"
        record "$r" mig_secs "$secs"
        v=$(freeze_ms "$L/t1-src-r$r.log") && record "$r" freeze_idle_ms "$v"
        check_exits "$r" "migration (idle)" "$S_PID" "$D_PID" "$L/t1-src-r$r.log" "$L/t1-dst-r$r.log"
        cmp -s "$MASTER" "$DSTF" || { fail "$r" mig_data "destination differs from the source after an idle migration"; }
    else
        fail "$r" mig_mbps "mirror --wait exited $rc: $(tr '\n' '|' <"$L/t1-mirror-r$r.out")"
        note "r$r idle migration failed; source log tail: $(tail -5 "$L/t1-src-r$r.log" | tr '\n' '|')"
        stop_srv "$S_PID"; stop_srv "$D_PID"
    fi
}

test_nbdcopy() {  # r
    local r=$1 L=$BENCH_DIR/logs t0 t1 secs
    fresh_files || { fail "$r" nbdcopy_mbps "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/nc-src-r$r.log" \
        && start_srv D serve "$DSTF" "$BENCH_DIR/d.sock" "$L/nc-dst-r$r.log" \
        || { fail "$r" nbdcopy_mbps "servers did not start"; stop_srv "${S_PID:-}"; stop_srv "${D_PID:-}"; return; }
    t0=$(now)
    if timeout "$CMD_TIMEOUT" nbdcopy "nbd://127.0.0.1:$S_PORT" "nbd://127.0.0.1:$D_PORT" \
            2>"$L/nc-r$r.client" 9>&-; then
        t1=$(now); secs=$(elapsed "$t0" "$t1")
        record "$r" nbdcopy_mbps "$(calc "$SIZE_BYTES/1e6/$secs")"
        cmp -s "$MASTER" "$DSTF" || fail "$r" nbdcopy_data "nbdcopy destination differs from the source"
    else
        fail "$r" nbdcopy_mbps "nbdcopy failed: $(tr '\n' '|' <"$L/nc-r$r.client")"
    fi
    stop_srv "$S_PID"; stop_srv "$D_PID"
}

test_converge() {  # r
    local r=$1 L=$BENCH_DIR/logs t0 t1 rc fio_pid secs v
    fresh_files || { fail "$r" converge_s "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/t2-src-r$r.log" \
        && start_srv D listen "$DSTF" "$BENCH_DIR/d.sock" "$L/t2-dst-r$r.log" \
        || { fail "$r" converge_s "servers did not start"; stop_srv "${S_PID:-}"; stop_srv "${D_PID:-}"; return; }
    fio --name=load "${FIO_COMMON[@]}" --uri="nbd://127.0.0.1:$S_PORT" --runtime=$((CMD_TIMEOUT + 60)) \
        --continue_on_error=all --output-format=json --output="$L/t2-fio-r$r.json" \
        >"$L/t2-fio-r$r.stdout" 2>&1 9>&- &
    fio_pid=$!; STARTED_PIDS+=("$fio_pid")
    sleep "$LOAD_DELAY"
    if ! kill -0 "$fio_pid" 2>/dev/null; then
        fail "$r" converge_s "fio load died before the mirror started: $(tail -5 "$L/t2-fio-r$r.stdout" | tr '\n' '|')"
        stop_srv "$S_PID"; stop_srv "$D_PID"; return
    fi
    t0=$(now)
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror "${MODE_ARGS[@]}" -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --wait \
        >"$L/t2-mirror-r$r.out" 2>&1 9>&-
    rc=$?; t1=$(now)
    kill -0 "$fio_pid" 2>/dev/null || note "r$r converge: fio was no longer running at the handover (load stopped early?)"
    kill_pid "$fio_pid"; forget_pid "$fio_pid"
    if (( rc == 0 )); then
        secs=$(elapsed "$t0" "$t1")
        record "$r" converge_s "$secs"
        record "$r" converge_passes "$(passes "$L/t2-src-r$r.log")"
        if v=$(freeze_ms "$L/t2-src-r$r.log"); then
            record "$r" freeze_ms "$v"
        else
            fail "$r" freeze_ms "no 'clients were held for' line in the source log"
        fi
        check_exits "$r" "migration under load" "$S_PID" "$D_PID" "$L/t2-src-r$r.log" "$L/t2-dst-r$r.log"
        # every acknowledged write must have reached the destination
        cmp -s "$SRCF" "$DSTF" || fail "$r" converge_data "destination differs from the source file after the handover under load"
    else
        fail "$r" converge_s "mirror --wait exited $rc: $(tr '\n' '|' <"$L/t2-mirror-r$r.out")"
        note "r$r migration under load failed; source log tail: $(tail -5 "$L/t2-src-r$r.log" | tr '\n' '|')"
        stop_srv "$S_PID"; stop_srv "$D_PID"
    fi
}

fio_lat() {  # fio_lat PORT RUNTIME JSON -> "p50_us p99_us"
    timeout --kill-after=5 $(($2 + 60)) fio --name=lat "${FIO_COMMON[@]}" --uri="nbd://127.0.0.1:$1" \
        --runtime="$2" --output-format=json --output="$3" >"$3.stdout" 2>&1 9>&- || return 1
    python3 - "$3" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]
if j.get("error"): sys.exit(1)
p = j["write"]["clat_ns"]["percentile"]
if j["write"]["total_ios"] <= 0: sys.exit(1)
print(p["50.000000"] / 1e3, p["99.000000"] / 1e3)
EOF
}

test_latency_base() {  # r
    local r=$1 L=$BENCH_DIR/logs v
    fresh_files || { fail "$r" lat_base_p99 "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/t4b-src-r$r.log" \
        || { fail "$r" lat_base_p99 "server did not start"; stop_srv "${S_PID:-}"; return; }
    if v=$(fio_lat "$S_PORT" "$BASE_RUNTIME" "$L/t4b-fio-r$r.json"); then
        record "$r" lat_base_p50 "${v% *}"; record "$r" lat_base_p99 "${v#* }"
    else
        fail "$r" lat_base_p99 "fio failed: $(tail -5 "$L/t4b-fio-r$r.json.stdout" | tr '\n' '|')"
    fi
    stop_srv "$S_PID"
}

test_latency_mig() {  # r
    local r=$1 L=$BENCH_DIR/logs v mpid i rc ok=1
    fresh_files || { fail "$r" lat_mig_p99 "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/t4m-src-r$r.log" \
        && start_srv D listen "$DSTF" "$BENCH_DIR/d.sock" "$L/t4m-dst-r$r.log" \
        || { fail "$r" lat_mig_p99 "servers did not start"; stop_srv "${S_PID:-}"; stop_srv "${D_PID:-}"; return; }
    "$FLEXNBD" mirror "${MODE_ARGS[@]}" -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --max-bps "$LAT_MAX_BPS" --wait \
        >"$L/t4m-mirror-r$r.out" 2>&1 9>&- &
    mpid=$!; STARTED_PIDS+=("$mpid")
    for ((i = 0; i < 100; i++)); do
        grep -q 'Migration started' "$L/t4m-mirror-r$r.out" 2>/dev/null && break
        kill -0 "$mpid" 2>/dev/null || break
        sleep 0.05
    done
    if ! grep -q 'Migration started' "$L/t4m-mirror-r$r.out"; then
        fail "$r" lat_mig_p99 "mirror did not start: $(tr '\n' '|' <"$L/t4m-mirror-r$r.out")"
        stop_srv "$mpid"; stop_srv "$S_PID"; stop_srv "$D_PID"; return
    fi
    v=$(fio_lat "$S_PORT" "$LAT_RUNTIME" "$L/t4m-fio-r$r.json") || ok=0
    if ! kill -0 "$mpid" 2>/dev/null; then
        ok=0
        fail "$r" lat_mig_p99 "the migration ended before fio did (lower LAT_MAX_BPS)"
    elif (( ok == 1 )); then
        record "$r" lat_mig_p50 "${v% *}"; record "$r" lat_mig_p99 "${v#* }"
    else
        fail "$r" lat_mig_p99 "fio failed during the migration: $(tail -5 "$L/t4m-fio-r$r.json.stdout" | tr '\n' '|')"
    fi
    # finish the migration quickly (and check it still completes)
    timeout 10 "$FLEXNBD" mirror-speed -s "$BENCH_DIR/s.sock" --max-bps 0 >/dev/null 2>&1 9>&-
    wait_exit "$mpid" "$CMD_TIMEOUT"; rc=$WAIT_RC
    [[ $rc == timeout ]] && stop_srv "$mpid"
    forget_pid "$mpid"
    if [[ $rc == 0 ]]; then
        check_exits "$r" "rate-limited migration" "$S_PID" "$D_PID" "$L/t4m-src-r$r.log" "$L/t4m-dst-r$r.log"
        cmp -s "$SRCF" "$DSTF" || fail "$r" lat_mig_data "destination differs from the source after the rate-limited migration"
    else
        fail "$r" lat_mig_handover "rate-limited migration did not complete (mirror status $rc: $(tr '\n' '|' <"$L/t4m-mirror-r$r.out"))"
        stop_srv "$S_PID"; stop_srv "$D_PID"
    fi
}

# ---------------------------------------------------------------- optional rounds
# "pass N done, D bytes dirty: freezing clients" -> "N D FREEZES" (the last freeze; the first
# sweep is pass 0; FREEZES counts every freeze begun, abandoned ones included)
freeze_facts() {
    python3 - "$1" <<'PY'
import re, sys
last, n = None, 0
for line in open(sys.argv[1], errors="replace"):
    x = re.search(r"pass (\d+) done, (\d+) bytes dirty: freezing clients", line)
    if x: last, n = x, n + 1
if not last: sys.exit(1)
print(last.group(1), last.group(2), n)
PY
}

# start_proxy VAR TARGET_PORT RTT LOG: the delay proxy in front of TARGET_PORT; sets ${VAR}_PID
# and ${VAR}_PORT once it listens (it prints "... -> 127.0.0.1:TARGET_PORT" after binding).
start_proxy() {
    local var=$1 target=$2 rtt=$3 logf=$4 port pid i
    port=$(free_port)
    python3 "$WANEM" "$port" "$target" --rtt-ms "$rtt" --mbit "$LINK_MBIT" >"$logf" 2>&1 9>&- &
    pid=$!; STARTED_PIDS+=("$pid")
    printf -v "${var}_PID" %s "$pid"; printf -v "${var}_PORT" %s "$port"
    for ((i = 0; i < 100; i++)); do
        grep -q -- "-> 127.0.0.1:$target" "$logf" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { log "delay proxy exited at startup:"; sed 's/^/    /' "$logf" >&2; return 1; }
        sleep 0.1
    done
    log "delay proxy not ready on port $port after 10 s"; return 1
}
# start_trio TAG RTT: serve, listen and, with an RTT, the delay proxy in front of listen (logs
# $BENCH_DIR/logs/TAG-{src,dst,proxy}.log); MIRROR_PORT is where the mirror goes. If one fails
# to start, stops the others and returns 1.
start_trio() {
    local tag=$1 rtt=$2 L=$BENCH_DIR/logs
    S_PID=""; D_PID=""; W_PID=""
    if start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/$tag-src.log" \
        && start_srv D listen "$DSTF" "$BENCH_DIR/d.sock" "$L/$tag-dst.log" \
        && { [[ -z $rtt ]] || start_proxy W "$D_PORT" "$rtt" "$L/$tag-proxy.log"; }; then
        if [[ -n $rtt ]]; then MIRROR_PORT=$W_PORT; else MIRROR_PORT=$D_PORT; fi
        return 0
    fi
    stop_trio
    return 1
}
stop_trio() { stop_srv "$S_PID"; stop_srv "$D_PID"; stop_srv "$W_PID"; }

# "link c->s: N B in T s = R MB/s" (printed on SIGTERM) -> "N T"
proxy_link() {
    python3 - "$1" <<'PY'
import re, sys
m = None
for line in open(sys.argv[1], errors="replace"):
    x = re.search(r"link c->s: (\d+) B in ([0-9.]+) s", line)
    if x: m = x
if not m or float(m.group(2)) <= 0: sys.exit(1)
print(m.group(1), m.group(2))
PY
}

test_rtt() {  # r rtt: test 2 with the destination behind the delay proxy
    local r=$1 rtt=$2 L=$BENCH_DIR/logs t0 t1 rc fio_pid secs v tag k
    tag="rtt$rtt-r$r"; k="rtt$rtt"
    fresh_files || { fail "$r" "${k}_mig_s" "file setup failed"; return; }
    start_trio "$tag" "$rtt" || { fail "$r" "${k}_mig_s" "servers or proxy did not start"; return; }
    fio --name=load "${FIO_COMMON[@]}" --uri="nbd://127.0.0.1:$S_PORT" --runtime=$((CMD_TIMEOUT + 60)) \
        --continue_on_error=all --output-format=json --output="$L/$tag-fio.json" \
        >"$L/$tag-fio.stdout" 2>&1 9>&- &
    fio_pid=$!; STARTED_PIDS+=("$fio_pid")
    sleep "$LOAD_DELAY"
    if ! kill -0 "$fio_pid" 2>/dev/null; then
        fail "$r" "${k}_mig_s" "fio load died before the mirror started: $(tail -5 "$L/$tag-fio.stdout" | tr '\n' '|')"
        stop_trio; return
    fi
    t0=$(now)
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror "${MODE_ARGS[@]}" -l 127.0.0.1 -p "$MIRROR_PORT" -s "$BENCH_DIR/s.sock" --wait \
        >"$L/$tag-mirror.out" 2>&1 9>&-
    rc=$?; t1=$(now)
    kill -0 "$fio_pid" 2>/dev/null || note "r$r rtt $rtt ms: fio was no longer running at the handover (load stopped early?)"
    kill_pid "$fio_pid"; forget_pid "$fio_pid"
    if (( rc == 0 )); then
        secs=$(elapsed "$t0" "$t1")
        record "$r" "${k}_mig_s" "$secs"
        record "$r" "${k}_mig_mbps" "$(calc "$SIZE_BYTES/1e6/$secs")"
        if v=$(freeze_ms "$L/$tag-src.log"); then
            record "$r" "${k}_freeze_ms" "$v"
        else
            fail "$r" "${k}_freeze_ms" "no 'clients were held for' line in the source log"
        fi
        v=$(freeze_facts "$L/$tag-src.log") && record "$r" "${k}_passes" "$(( ${v%% *} + 1 ))"
        v=$(mode_facts "$L/$tag-src.log") && record "$r" "${k}_mode" "${v%% *}"
        check_exits "$r" "migration at rtt $rtt ms" "$S_PID" "$D_PID" "$L/$tag-src.log" "$L/$tag-dst.log"
        cmp -s "$SRCF" "$DSTF" || fail "$r" "${k}_data" "destination differs from the source after the migration at rtt $rtt ms"
    else
        fail "$r" "${k}_mig_s" "mirror --wait exited $rc: $(tr '\n' '|' <"$L/$tag-mirror.out")"
        note "r$r migration at rtt $rtt ms failed; source log tail: $(tail -5 "$L/$tag-src.log" | tr '\n' '|')"
        stop_srv "$S_PID"; stop_srv "$D_PID"
    fi
    # SIGTERM makes the proxy print what crossed the link (source -> destination)
    stop_srv "$W_PID"
    if (( rc == 0 )); then
        if v=$(proxy_link "$L/$tag-proxy.log"); then
            record "$r" "${k}_link_mbps" "$(calc "${v% *}/1e6/${v#* }")"
        else
            fail "$r" "${k}_link_mbps" "no link summary from the delay proxy: $(tail -3 "$L/$tag-proxy.log" | tr '\n' '|')"
        fi
    fi
}

# The unthrottled writer. fio's stats start after --ramp_time (when the mirror starts), and
# without continue_on_error it stops at the first failed write, which is the source closing
# its clients at the handover; so its IOPS and latencies cover the migration. The writes held
# by the freeze never complete and are in no latency.
UNT_FIO=(--ioengine=nbd --rw=randwrite --bs=4k --iodepth="$UNT_IODEPTH" --numjobs=1
         --norandommap --randrepeat=0 --time_based --ramp_time="$UNT_DELAY")
# fio_unt_stats JSON -> "iops p99_us max_us total_ios"
fio_unt_stats() {
    python3 - "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
if j["total_ios"] <= 0: sys.exit(1)
c = j["clat_ns"]
print(j["iops"], c["percentile"]["99.000000"] / 1e3, c["max"] / 1e3, j["total_ios"])
PY
}

test_unthrottled_base() {  # r
    local r=$1 L=$BENCH_DIR/logs v a b c
    fresh_files || { fail "$r" unt_base_iops "file setup failed"; return; }
    start_srv S serve "$SRCF" "$BENCH_DIR/s.sock" "$L/unb-src-r$r.log" \
        || { fail "$r" unt_base_iops "server did not start"; stop_srv "${S_PID:-}"; return; }
    timeout --kill-after=5 $((UNT_DELAY + UNT_BASE_RUNTIME + 60)) fio --name=unt "${UNT_FIO[@]}" \
        --uri="nbd://127.0.0.1:$S_PORT" --runtime="$UNT_BASE_RUNTIME" \
        --output-format=json --output="$L/unb-fio-r$r.json" >"$L/unb-fio-r$r.stdout" 2>&1 9>&-
    if v=$(fio_unt_stats "$L/unb-fio-r$r.json" 2>/dev/null); then
        read -r a b c _ <<<"$v"
        record "$r" unt_base_iops "$a"; record "$r" unt_base_p99 "$b"; record "$r" unt_base_max "$c"
    else
        fail "$r" unt_base_iops "fio failed: $(tail -5 "$L/unb-fio-r$r.stdout" | tr '\n' '|')"
    fi
    stop_srv "$S_PID"
}

# mode_facts LOG -> "MODE SWITCH_PASS ACTIVE_WRITES": MODE 0 background, 1 auto switched to
# active after pass SWITCH_PASS, 2 active as asked; ACTIVE_WRITES from the handover line (-1 if
# the binary does not log it)
mode_facts() {
    python3 - "$1" "$MIRROR_MODE" <<'PY'
import re, sys
mode, sw, n = (2 if sys.argv[2] == "active" else 0), -1, -1
for line in open(sys.argv[1], errors="replace"):
    x = re.search(r"pass (\d+) done, \d+ bytes dirty and not shrinking: mirroring client writes actively", line)
    if x and mode == 0: mode, sw = 1, int(x.group(1))
    x = re.search(r"(\d+) client writes were mirrored actively", line)
    if x: n = int(x.group(1))
print(mode, sw, n)
PY
}

test_unthrottled() {  # r [rtt]: the destination behind the delay proxy at rtt ms if given
    local r=$1 rtt=${2:-} L=$BENCH_DIR/logs t0 t1 rc fio_pid secs v a b c n0 i k tag
    if [[ -n $rtt ]]; then k="untrtt$rtt"; tag="untrtt$rtt-r$r"; else k=unt; tag="unt-r$r"; fi
    fresh_files || { fail "$r" "${k}_mig_s" "file setup failed"; return; }
    start_trio "$tag" "$rtt" || { fail "$r" "${k}_mig_s" "servers or proxy did not start"; return; }
    n0=$(grep -c ': connected$' "$L/$tag-src.log")
    fio --name=unt "${UNT_FIO[@]}" --uri="nbd://127.0.0.1:$S_PORT" --runtime=$((CMD_TIMEOUT + 60)) \
        --output-format=json --output="$L/$tag-fio.json" >"$L/$tag-fio.stdout" 2>&1 9>&- &
    fio_pid=$!; STARTED_PIDS+=("$fio_pid")
    # fio's ramp starts once it has connected; the mirror starts just after the ramp ends
    for ((i = 0; i < 100; i++)); do
        (( $(grep -c ': connected$' "$L/$tag-src.log") > n0 )) && break
        kill -0 "$fio_pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep "$UNT_DELAY.1"
    if ! kill -0 "$fio_pid" 2>/dev/null; then
        fail "$r" "${k}_mig_s" "fio died before the mirror started: $(tail -5 "$L/$tag-fio.stdout" | tr '\n' '|')"
        stop_trio; return
    fi
    t0=$(now)
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror "${MODE_ARGS[@]}" -l 127.0.0.1 -p "$MIRROR_PORT" -s "$BENCH_DIR/s.sock" --wait \
        >"$L/$tag-mirror.out" 2>&1 9>&-
    rc=$?; t1=$(now)
    if (( rc == 124 )); then
        # not a harness failure: the target is that it converges, and this says it did not
        record "$r" "${k}_converged" 0
        v=$(freeze_facts "$L/$tag-src.log") || v="- - 0"
        note "r$r unthrottled${rtt:+ at rtt $rtt ms}: the migration did not converge within CMD_TIMEOUT=${CMD_TIMEOUT}s (${v##* } freezes begun)"
        kill_pid "$fio_pid"; forget_pid "$fio_pid"
        stop_trio; return
    fi
    # fio stops by itself once the source closes its connection at the handover
    wait_exit "$fio_pid" 30
    [[ $WAIT_RC == timeout ]] && { note "r$r unthrottled${rtt:+ at rtt $rtt ms}: fio still ran 30 s after the migration ended"; kill_pid "$fio_pid"; }
    forget_pid "$fio_pid"
    stop_srv "$W_PID"
    if (( rc != 0 )); then
        fail "$r" "${k}_mig_s" "mirror --wait exited $rc: $(tr '\n' '|' <"$L/$tag-mirror.out")"
        note "r$r unthrottled migration${rtt:+ at rtt $rtt ms} failed; source log tail: $(tail -5 "$L/$tag-src.log" | tr '\n' '|')"
        stop_srv "$S_PID"; stop_srv "$D_PID"; return
    fi
    secs=$(elapsed "$t0" "$t1")
    record "$r" "${k}_converged" 1
    record "$r" "${k}_mig_s" "$secs"
    if v=$(freeze_facts "$L/$tag-src.log"); then
        read -r a b c <<<"$v"
        record "$r" "${k}_passes" "$((a + 1))"; record "$r" "${k}_remainder" "$b"; record "$r" "${k}_freezes" "$c"
    else
        fail "$r" "${k}_remainder" "no 'freezing clients' line in the source log"
    fi
    if v=$(freeze_ms "$L/$tag-src.log"); then
        record "$r" "${k}_freeze_ms" "$v"
    else
        fail "$r" "${k}_freeze_ms" "no 'clients were held for' line in the source log"
    fi
    if v=$(mode_facts "$L/$tag-src.log"); then
        read -r a b c <<<"$v"
        record "$r" "${k}_mode" "$a"; record "$r" "${k}_switch_pass" "$b"; record "$r" "${k}_active_writes" "$c"
    fi
    if v=$(fio_unt_stats "$L/$tag-fio.json" 2>/dev/null); then
        read -r a b c _ <<<"$v"
        record "$r" "${k}_mig_iops" "$a"; record "$r" "${k}_mig_p99" "$b"; record "$r" "${k}_mig_max" "$c"
    else
        fail "$r" "${k}_mig_iops" "no fio stats for the migration: $(tail -5 "$L/$tag-fio.stdout" | tr '\n' '|')"
    fi
    check_exits "$r" "migration under an unthrottled writer${rtt:+ at rtt $rtt ms}" "$S_PID" "$D_PID" "$L/$tag-src.log" "$L/$tag-dst.log"
    cmp -s "$SRCF" "$DSTF" || fail "$r" "${k}_data" "destination differs from the source after the migration under an unthrottled writer${rtt:+ at rtt $rtt ms}"
}

# ---------------------------------------------------------------- main
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (1-min load $(cut -d' ' -f1 /proc/loadavg))"
    if [[ $BASIC == 1 ]]; then
        if (( r % 2 == 1 )); then test_migration_speed "$r"; test_nbdcopy "$r"
        else test_nbdcopy "$r"; test_migration_speed "$r"; fi
        test_converge "$r"
        if (( r % 2 == 1 )); then test_latency_base "$r"; test_latency_mig "$r"
        else test_latency_mig "$r"; test_latency_base "$r"; fi
    fi
    for ((i = 0; i < ${#RTTS[@]}; i++)); do   # the order reverses every other round
        if (( r % 2 == 1 )); then test_rtt "$r" "${RTTS[i]}"; else test_rtt "$r" "${RTTS[-1 - i]}"; fi
    done
    if [[ $UNTHROTTLED == 1 ]] || (( ${#UNT_RTTS[@]} > 0 )); then
        (( r % 2 == 1 )) && test_unthrottled_base "$r"
        [[ $UNTHROTTLED == 1 ]] && test_unthrottled "$r"
        for v in "${UNT_RTTS[@]}"; do test_unthrottled "$r" "$v"; done
        (( r % 2 == 0 )) && test_unthrottled_base "$r"
    fi
done

# ---------------------------------------------------------------- report
OPT=""
[[ $BASIC == 1 ]] || OPT+=" BASIC=0"
(( ${#RTTS[@]} > 0 )) && OPT+=" RTT_MS=\"${RTTS[*]}\" LINK_MBIT=$LINK_MBIT"
[[ $UNTHROTTLED == 1 ]] && OPT+=" UNTHROTTLED=1"
(( ${#UNT_RTTS[@]} > 0 )) && OPT+=" UNTHROTTLED_RTT_MS=\"${UNT_RTTS[*]}\""
(( ${#UNT_RTTS[@]} > 0 && ${#RTTS[@]} == 0 )) && OPT+=" LINK_MBIT=$LINK_MBIT"
[[ $UNTHROTTLED == 1 ]] || (( ${#UNT_RTTS[@]} > 0 )) && OPT+=" UNT_IODEPTH=$UNT_IODEPTH UNT_DELAY=${UNT_DELAY}s UNT_BASE_RUNTIME=${UNT_BASE_RUNTIME}s"
[[ -n $MIRROR_MODE ]] && OPT+=" MIRROR_MODE=$MIRROR_MODE"
META="SIZE=$SIZE ROUNDS=$ROUNDS LOAD_IOPS=$LOAD_IOPS LOAD_DELAY=${LOAD_DELAY}s BASE_RUNTIME=${BASE_RUNTIME}s LAT_RUNTIME=${LAT_RUNTIME}s LAT_MAX_BPS=$LAT_MAX_BPS DEST_FILLED=$DEST_FILLED$OPT CMD_TIMEOUT=${CMD_TIMEOUT}s; $(nproc) cores, $(uname -sr); $(fio --version), $(nbdcopy --version 2>&1 | tail -1); flexnbd git $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown) (binary $FLEXNBD_ORIG); scratch on $(stat -f -c %T "$BENCH_DIR")"
python3 - "$RAW" "$NOTES" "$RESULTS_MD" "$META" "$STRICT" "$BASIC" "${RTTS[*]}" "$LINK_MBIT" "$UNTHROTTLED" "$SIZE_BYTES" "${UNT_RTTS[*]}" <<'EOF'
import math, statistics, sys
raw, notes, md_path, meta, strict, basic, rtts, link_mbit, unthrottled, size, unt_rtts = sys.argv[1:12]
rtts, link_mbit, size, unt_rtts = rtts.split(), float(link_mbit), int(size), unt_rtts.split()
vals, by_round = {}, {}
for line in open(raw):
    r, m, v = line.rstrip("\n").split("\t")
    vals.setdefault(m, []).append(float(v))
    by_round[(int(r), m)] = float(v)
def med(m):
    xs = vals.get(m, [])
    if not xs or any(math.isnan(x) for x in xs): return None
    return statistics.median(xs)
def mx(m):
    xs = vals.get(m, [])
    if not xs or any(math.isnan(x) for x in xs): return None
    return max(xs)
def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b
def fmt(v, nd=3):
    if v is None: return "FAIL"
    return f"{v:,.{nd}g}" if abs(v) < 1000 else f"{v:,.0f}"
n = max((len(v) for v in vals.values()), default=0)
rows = []  # metric, value, target, met
def row(name, v, target="", ok=None, nd=3, suffix=""):
    met = "-" if ok is None else ("yes" if ok else "NO")
    if v is None and target: met = "FAIL"
    rows.append((name, fmt(v, nd) + (suffix if v is not None else ""), target or "-", met))
def basic_rows():
    mig, cp = med("mig_mbps"), med("nbdcopy_mbps")
    row("migration throughput, idle, MB/s", mig)
    row("nbdcopy serve->serve, MB/s", cp)
    rt = ratio(mig, cp)
    row("migration / nbdcopy", rt, ">= 0.90x", None if rt is None else rt >= 0.90, suffix="x")
    row("converge under 4K randwrite load, s (mirror start -> handover)", med("converge_s"))
    row("passes before freezing, under load", med("converge_passes"))
    fz = med("freeze_ms")
    row("freeze window under load, ms (median)", fz, "<= 50 ms", None if fz is None else fz <= 50)
    fzx = mx("freeze_ms")
    row("freeze window under load, ms (worst round)", fzx, "<= 50 ms", None if fzx is None else fzx <= 50)
    row("freeze window idle, ms", med("freeze_idle_ms"))
    b50, b99, m50, m99 = med("lat_base_p50"), med("lat_base_p99"), med("lat_mig_p50"), med("lat_mig_p99")
    row("write clat p50 without migration, us", b50)
    row("write clat p50 during migration, us", m50)
    row("write clat p99 without migration, us", b99)
    row("write clat p99 during migration, us", m99)
    r50 = ratio(m50, b50)
    row("p50 during / without", r50, suffix="x")
    r99 = ratio(m99, b99)
    row("p99 during / without", r99, "<= 2x", None if r99 is None else r99 <= 2.0, suffix="x")
if basic == "1":
    basic_rows()

# the unthrottled round on loopback (prefix "unt") and behind the proxy ("untrttR")
unt_runs = ([("unt", "loopback", None)] if unthrottled == "1" else []) + \
    [(f"untrtt{t}", f"{t} ms RTT", float(t)) for t in unt_rtts]
def unthrottled_rows(p, where, rtt):
    pre = f"unthrottled, {where}: "
    conv = vals.get(p + "_converged", [])
    k = sum(1 for x in conv if x == 1)
    rows.append((pre + "rounds that converged within CMD_TIMEOUT", f"{k}/{len(conv)}",
                 "every round", "yes" if conv and k == len(conv) else "NO"))
    if k == 0:
        return
    modes = vals.get(p + "_mode", [])
    rows.append((pre + "rounds that ended mirroring actively", f"{sum(1 for x in modes if x > 0)}/{len(modes)}", "-", "-"))
    row(pre + "migration, s (mirror start -> handover)", med(p + "_mig_s"))
    row(pre + "passes before the freeze (the first sweep is one)", med(p + "_passes"))
    row(pre + "freezes begun (abandoned ones too)", med(p + "_freezes"))
    rem = med(p + "_remainder")
    row(pre + "dirty at the freeze, MB", None if rem is None else rem / 1e6)
    row(pre + "dirty at the freeze, % of the export", None if rem is None else 100 * rem / size, suffix="%")
    fz, fzx = med(p + "_freeze_ms"), mx(p + "_freeze_ms")
    if rtt is None:
        row(pre + "freeze, ms (median)", fz, "<= 50 ms", None if fz is None else fz <= 50)
        row(pre + "freeze, ms (worst round)", fzx, "<= 50 ms", None if fzx is None else fzx <= 50)
    else:
        row(pre + "freeze, ms (median)", fz)
        row(pre + "freeze - RTT, ms (median)", None if fz is None else fz - rtt, "<= 20 ms",
            None if fz is None else fz - rtt <= 20)
        row(pre + "freeze - RTT, ms (worst round)", None if fzx is None else fzx - rtt, "<= 20 ms",
            None if fzx is None else fzx - rtt <= 20)
    bi, mi = med("unt_base_iops"), med(p + "_mig_iops")
    if rtt is None or unthrottled != "1":
        row("unthrottled: fio IOPS without migration", bi)
    row(pre + "fio IOPS during migration", mi)
    row(pre + "IOPS during / without", ratio(mi, bi), suffix="x")
    if rtt is None or unthrottled != "1":
        row("unthrottled: clat p99 without migration, us", med("unt_base_p99"))
    row(pre + "clat p99 during migration, us", med(p + "_mig_p99"))
    if rtt is None or unthrottled != "1":
        row("unthrottled: clat max without migration, us", med("unt_base_max"))
    row(pre + "clat max during migration, us", med(p + "_mig_max"))
for p, where, rtt in unt_runs:
    unthrottled_rows(p, where, rtt)

# the unthrottled round has been bimodal (the writer or the migration wins the CPUs), so each
# round is shown too
unt_hdr = ("round", "link", "migration s", "passes", "mode", "active writes", "dirty at freeze MB",
           "freeze ms", "freeze - RTT ms", "IOPS during", "IOPS without", "p99 during us", "max during us")
unt_rows = []
def mode_name(m, sw):
    if m is None: return "?"
    return {0: "background", 1: f"active from pass {sw:g}" if sw is not None else "active (switched)",
            2: "active"}.get(int(m), "?")
for p, where, rtt in unt_runs:
    for r in sorted({r for r, m in by_round if m == p + "_converged"}):
        g = lambda m, scale=1: None if math.isnan(by_round.get((r, p + m), math.nan)) else by_round[(r, p + m)] * scale
        gb = lambda m: None if math.isnan(by_round.get((r, m), math.nan)) else by_round[(r, m)]
        conv = by_round[(r, p + "_converged")] == 1
        fz, aw = g("_freeze_ms"), g("_active_writes")
        unt_rows.append((r, where, fmt(g("_mig_s")) if conv else "no convergence", fmt(g("_passes")),
                         mode_name(g("_mode"), g("_switch_pass")) if conv else "-",
                         "-" if aw is None or aw < 0 else f"{aw:,.0f}",
                         fmt(g("_remainder", 1e-6)), fmt(fz),
                         "-" if rtt is None else fmt(None if fz is None else fz - rtt),
                         fmt(g("_mig_iops")), fmt(gb("unt_base_iops")), fmt(g("_mig_p99")), fmt(g("_mig_max"))))

# RTT round: one line per round trip time
link_MBps = link_mbit / 8
rtt_hdr = ("RTT ms", "migration s", "migration MB/s", "link MB/s", "link % of " + f"{link_mbit:g} Mbit",
           "freeze ms", "freeze - RTT ms", "worst freeze - RTT", "passes", "rounds active")
rtt_rows = []
for t in rtts:
    k, rt = f"rtt{t}", float(t)
    fz, fzx, lk = med(k + "_freeze_ms"), mx(k + "_freeze_ms"), med(k + "_link_mbps")
    rtt_rows.append((t, fmt(med(k + "_mig_s")), fmt(med(k + "_mig_mbps")), fmt(lk),
                     fmt(None if lk is None else 100 * lk / link_MBps, 3) + ("%" if lk else ""),
                     fmt(fz), fmt(None if fz is None else fz - rt), fmt(None if fzx is None else fzx - rt),
                     fmt(med(k + "_passes")),
                     f"{sum(1 for x in vals.get(k + '_mode', []) if x > 0)}/{len(vals.get(k + '_mode', []))}"))
hdr = ("metric", "value", "target", "met?")
w = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(4)]
print(f"flexnbd migration benchmark: medians of {n} round(s)")
for x in [hdr] + rows:
    print("  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(x)))
if unt_rows:
    uw = [max(len(str(x[i])) for x in unt_rows + [unt_hdr]) for i in range(len(unt_hdr))]
    print("\nunthrottled writer, each round")
    for x in [unt_hdr] + unt_rows:
        print("  ".join(str(c).rjust(uw[i]) for i, c in enumerate(x)))
if rtt_rows:
    rw = [max(len(str(x[i])) for x in rtt_rows + [rtt_hdr]) for i in range(len(rtt_hdr))]
    print(f"\nthrough the delay proxy ({link_mbit:g} Mbit/s each way; target: freeze - RTT <= 20 ms)")
    for x in [rtt_hdr] + rtt_rows:
        print("  ".join(str(c).rjust(rw[i]) for i, c in enumerate(x)))
nt = [l.strip() for l in open(notes) if l.strip()]
if nt:
    print("\nnotes:"); [print("  " + l) for l in nt]
if md_path:
    with open(md_path, "w") as f:
        f.write(f"# flexnbd migration benchmark\n\nMedians of {n} round(s) of `bench/migration.sh`. {meta}\n\n")
        f.write("| metric | value | target | met? |\n|---|---:|---|---|\n")
        for x in rows: f.write("| " + " | ".join(map(str, x)) + " |\n")
        if unt_rows:
            f.write("\nUnthrottled writer, each round:\n\n")
            f.write("| " + " | ".join(unt_hdr) + " |\n|" + "---:|" * len(unt_hdr) + "\n")
            for x in unt_rows: f.write("| " + " | ".join(map(str, x)) + " |\n")
        if rtt_rows:
            f.write(f"\nThrough the delay proxy ({link_mbit:g} Mbit/s each way, {meta.split('LOAD_IOPS=')[1].split()[0]} "
                    "random 4 KiB writes/s on the source; target: freeze - RTT <= 20 ms):\n\n")
            f.write("| " + " | ".join(rtt_hdr) + " |\n|" + "---:|" * len(rtt_hdr) + "\n")
            for x in rtt_rows: f.write("| " + " | ".join(map(str, x)) + " |\n")
        if nt:
            f.write("\nNotes:\n\n" + "".join(f"- {l}\n" for l in nt))
bad = [x for x in rows if x[3] == "FAIL"] + [x for x in rtt_rows if "FAIL" in x] + ([x for x in rows if x[3] == "NO"] if strict == "1" else [])
sys.exit(1 if bad else 0)
EOF
prc=$?
[[ -n $RESULTS_MD ]] && log "markdown written to $RESULTS_MD"
if (( FAILURES > 0 || prc != 0 )); then
    log "$FAILURES measurement(s) or check(s) failed${STRICT:+ (STRICT=$STRICT)}"
    exit 1
fi
exit 0
}
