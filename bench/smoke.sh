#!/usr/bin/env bash
# Quick check that bench/run.sh (ROUNDS=1, 64 MiB, 1 s fio jobs) and bench/migration.sh
# (SMOKE=1) still work end to end.
# Exit non-zero if the harness or any measurement fails. Meant for CI; about a minute.
#   SMOKE_SERVERS="flexnbd nbdkit"   servers to exercise
#   BENCH_INSTALL_DEPS=1             apt-get install missing tools first (default: on when CI is set and root)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

install=${BENCH_INSTALL_DEPS:-}
if [[ -z $install && -n ${CI:-} && $(id -u) == 0 ]]; then install=1; fi
if [[ $install == 1 ]]; then
    "$HERE/install-deps.sh" || { echo "smoke: installing dependencies failed" >&2; exit 1; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/flexnbd-smoke.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT

start=$SECONDS
ROUNDS=1 SIZE=64M RUNTIME=1 RAMP=0 CMD_TIMEOUT=30 LOCK_WAIT=${LOCK_WAIT:-900} \
    SERVERS="${SMOKE_SERVERS:-flexnbd nbdkit}" \
    BENCH_DIR="$work/scratch" RESULTS_MD="$work/results.md" \
    "$HERE/run.sh" >"$work/table.txt" 2>"$work/log.txt"
rc=$?
cat "$work/table.txt"
if ((rc != 0)); then
    echo "smoke: run.sh failed (exit $rc); log:" >&2
    cat "$work/log.txt" >&2
    exit 1
fi
# Every metric row of the markdown must have a number (not FAIL / -) for every server.
if ! python3 - "$work/results.md" ${SMOKE_SERVERS:-flexnbd nbdkit} <<'PY'
import sys
md, servers = sys.argv[1], sys.argv[2:]
rows = [l for l in open(md) if l.startswith("| ")]
header = [c.strip() for c in rows[0].strip("|\n").split("|")]
bad = []
body = rows[1:]
body = body[: next((i for i, l in enumerate(body) if l.startswith("| capability") or l.startswith("| metric")), len(body))]
if len(body) < 11:
    bad.append(f"only {len(body)} metric rows")
for l in body:
    cells = [c.strip() for c in l.strip("|\n").split("|")]
    for s in servers:
        v = cells[header.index(s)]
        # CPU shares come from 10 ms clock ticks, and a 64 MiB copy takes tens of ms: a
        # server can honestly show 0 there. Every other row must be positive.
        floor_ok = 0 if "CPU, % of a core" in cells[0] else 1e-9
        try:
            if float(v.replace(",", "")) < floor_ok:
                bad.append(f"{cells[0]} / {s} = {v}")
        except ValueError:
            bad.append(f"{cells[0]} / {s} = {v}")
if bad:
    print("smoke: bad cells: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1)
PY
then
    cat "$work/log.txt" >&2
    exit 1
fi
# The migration benchmark too: 64 MiB, one round; a failed measurement or check fails CI.
if ! SMOKE=1 "$HERE/migration.sh" >"$work/mig-table.txt" 2>"$work/mig-log.txt"; then
    cat "$work/mig-table.txt" "$work/mig-log.txt" >&2
    echo "smoke: migration.sh failed" >&2
    exit 1
fi
cat "$work/mig-table.txt"
echo "smoke: OK in $((SECONDS - start)) s"
