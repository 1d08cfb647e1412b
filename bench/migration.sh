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

LOG_TAG=migbench
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

parse_size
for v in ROUNDS LOAD_IOPS LOAD_DELAY BASE_RUNTIME LAT_RUNTIME CMD_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] && (( ${!v} >= 1 )) || die "bad $v=${!v}"
done
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
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --wait \
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
    timeout "$CMD_TIMEOUT" "$FLEXNBD" mirror -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --wait \
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
    "$FLEXNBD" mirror -l 127.0.0.1 -p "$D_PORT" -s "$BENCH_DIR/s.sock" --max-bps "$LAT_MAX_BPS" --wait \
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

# ---------------------------------------------------------------- main
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (1-min load $(cut -d' ' -f1 /proc/loadavg))"
    if (( r % 2 == 1 )); then test_migration_speed "$r"; test_nbdcopy "$r"
    else test_nbdcopy "$r"; test_migration_speed "$r"; fi
    test_converge "$r"
    if (( r % 2 == 1 )); then test_latency_base "$r"; test_latency_mig "$r"
    else test_latency_mig "$r"; test_latency_base "$r"; fi
done

# ---------------------------------------------------------------- report
META="SIZE=$SIZE ROUNDS=$ROUNDS LOAD_IOPS=$LOAD_IOPS LOAD_DELAY=${LOAD_DELAY}s BASE_RUNTIME=${BASE_RUNTIME}s LAT_RUNTIME=${LAT_RUNTIME}s LAT_MAX_BPS=$LAT_MAX_BPS DEST_FILLED=$DEST_FILLED; $(nproc) cores, $(uname -sr); $(fio --version), $(nbdcopy --version 2>&1 | tail -1); flexnbd git $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown); scratch on $(stat -f -c %T "$BENCH_DIR")"
python3 - "$RAW" "$NOTES" "$RESULTS_MD" "$META" "$STRICT" <<'EOF'
import math, statistics, sys
raw, notes, md_path, meta, strict = sys.argv[1:6]
vals = {}
for line in open(raw):
    r, m, v = line.rstrip("\n").split("\t")
    vals.setdefault(m, []).append(float(v))
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
hdr = ("metric", "value", "target", "met?")
w = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(4)]
print(f"flexnbd migration benchmark: medians of {n} round(s)")
for x in [hdr] + rows:
    print("  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(x)))
nt = [l.strip() for l in open(notes) if l.strip()]
if nt:
    print("\nnotes:"); [print("  " + l) for l in nt]
if md_path:
    with open(md_path, "w") as f:
        f.write(f"# flexnbd migration benchmark\n\nMedians of {n} round(s) of `bench/migration.sh`. {meta}\n\n")
        f.write("| metric | value | target | met? |\n|---|---:|---|---|\n")
        for x in rows: f.write("| " + " | ".join(map(str, x)) + " |\n")
        if nt:
            f.write("\nNotes:\n\n" + "".join(f"- {l}\n" for l in nt))
bad = [x for x in rows if x[3] == "FAIL"] + ([x for x in rows if x[3] == "NO"] if strict == "1" else [])
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
