#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time; exits non-zero
# if any target found a crash (or could not be built or run).
#
#   FUZZ_SECONDS=60 fuzz/run.sh            # every target, 60 s each
#   FUZZ_SECONDS=10 fuzz/run.sh resources  # some targets
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Crashes land in fuzz/artifacts/<target>/; replay one with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
set -uo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
# libFuzzer's own per-input limits: a hang or a blow-up is a finding too.
timeout_per_input="${FUZZ_TIMEOUT:-10}"
rss_limit_mb="${FUZZ_RSS_MB:-2048}"
toolchain="${FUZZ_TOOLCHAIN:-+nightly}"

all_targets=(resources policy_compile config_update http_request access_log_template dns protocol_detect)
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=("${all_targets[@]}")
fi

if ! cargo "$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi

echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
    if ! cargo "$toolchain" fuzz build --debug-assertions "$t"; then
        echo "run.sh: building $t failed" >&2
        exit 2
    fi
done

logs="$(mktemp -d)"
failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== $t for ${seconds}s"
    dict=()
    if [ -f "dict/$t.dict" ]; then
        dict=(-dict="dict/$t.dict")
    fi
    cargo "$toolchain" fuzz run --debug-assertions "$t" "corpus/$t" -- \
        "${dict[@]}" -max_total_time="$seconds" -timeout="$timeout_per_input" \
        -rss_limit_mb="$rss_limit_mb" -print_final_stats=1 \
        >"$logs/$t.log" 2>&1
    rc=$?
    after=$(find "artifacts/$t" -type f | wc -l)
    # libFuzzer's final stats: executions and their rate.
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -1)
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        failed=1
        status="FAILED (exit $rc, $((after - before)) new artifact(s) in fuzz/artifacts/$t, log $logs/$t.log)"
        tail -30 "$logs/$t.log"
    else
        status="ok"
    fi
    summary+=("$(printf '%-20s %4ss  %10s runs  %6s exec/s  %-10s %s' \
        "$t" "$seconds" "${runs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$status")")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
