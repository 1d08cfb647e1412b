#!/usr/bin/env bash
# Fuzz smoke test for CI (called from the repo root by .ci/run): every cargo-fuzz target runs for
# FUZZ_SECONDS (default 20) from its committed seed corpus. Any crash, panic, leak or timeout fails
# the run; the crashing input is left in fuzz/artifacts/<target>/ (git-ignored).
# New corpus entries go to a temporary copy, so the checkout stays clean.
#   FUZZ_SECONDS=60 fuzz/ci.sh             # longer run
#   FUZZ_TARGETS="acl_entry" fuzz/ci.sh    # a subset
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

seconds=${FUZZ_SECONDS:-20}
ALL_TARGETS=(client_session handshake_options greeting_client request_header structured_reply control_request acl_entry
    write_segments migration_sim)
read -r -a targets <<<"${FUZZ_TARGETS:-${ALL_TARGETS[*]}}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/flexnbd-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
echo "fuzz: building ${#targets[@]} targets"
t0=$SECONDS
cargo +nightly fuzz build --fuzz-dir fuzz >"$tmp/build.log" 2>&1 || {
    cat "$tmp/build.log"
    echo "fuzz: FAILED: build" >&2
    exit 1
}
echo "fuzz: built in $((SECONDS - t0))s"

failed=()
for t in "${targets[@]}"; do
    [ -d "fuzz/corpus/$t" ] || { echo "fuzz: no corpus dir fuzz/corpus/$t" >&2; exit 1; }
    cp -r "fuzz/corpus/$t" "$tmp/$t"
    log="$tmp/$t.log"
    t0=$SECONDS
    if cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$tmp/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        cov=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]*' | tail -n1 || true)
        echo "fuzz: $t ok in $((SECONDS - t0))s (${runs:-?} execs, ${cov:-cov: ?})"
    else
        # The panic message or sanitizer report, then libFuzzer's summary and the input's path.
        grep -m 2 -A 4 -E 'panicked at|==ERROR: |ERROR: libFuzzer' "$log" || true
        grep -E '^(SUMMARY|artifact_prefix|Test unit written)' "$log" || tail -n 20 "$log"
        echo "fuzz: $t FAILED; input saved under fuzz/artifacts/$t/" >&2
        failed+=("$t")
    fi
done

echo "fuzz: ${#targets[@]} targets in $((SECONDS - start))s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
