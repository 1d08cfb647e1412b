# Shared by bench/run.sh and bench/migration.sh (sourced, not run). The caller sets LOG_TAG and
# REPO first, and keeps the PIDs it starts in STARTED_PIDS.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$LOG_TAG" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# Sets FLEXNBD to a release build of this checkout unless the caller gave one.
build_flexnbd() {
    if [[ -z ${FLEXNBD:-} ]]; then
        log "building flexnbd (cargo build --release)"
        (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
        FLEXNBD=$REPO/target/release/flexnbd
    fi
    [[ -x $FLEXNBD ]] || die "flexnbd binary not found: $FLEXNBD"
}

# One benchmark at a time per machine: concurrent runs would skew each other's numbers.
# Holds the lock on fd 9 until the process exits (children get `9>&-`).
take_bench_lock() {
    command -v flock >/dev/null || return 0
    exec 9>"${TMPDIR:-/tmp}/flexnbd-bench.lock"
    if ! flock -n 9; then
        log "another benchmark holds the lock; waiting up to ${LOCK_WAIT:-3600} s (LOCK_WAIT)"
        flock -w "${LOCK_WAIT:-3600}" 9 || die "gave up waiting for the other benchmark run"
    fi
}

STARTED_PIDS=()
kill_pid() {      # kill_pid PID: TERM, wait up to 5 s, then KILL; only for our own PIDs
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}
forget_pid() {    # drop PID from STARTED_PIDS (after it was killed/reaped)
    local p keep=()
    for p in "${STARTED_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    STARTED_PIDS=("${keep[@]}")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# Sets SIZE_BYTES and MIB from $SIZE (IEC suffixes), which must be whole MiB and >= 16M.
parse_size() {
    SIZE_BYTES=$(numfmt --from=iec "$SIZE" 2>/dev/null) || die "bad SIZE=$SIZE"
    MIB=$((1024 * 1024))
    (( SIZE_BYTES >= 16 * MIB && SIZE_BYTES % MIB == 0 )) \
        || die "SIZE must be a whole number of MiB and >= 16M (got $SIZE)"
}
now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2])-float(sys.argv[1]):.6f}")' "$1" "$2"; }
calc() { python3 -c "print(f'{($1):.6g}')"; }
